import NIOCore

/// A request header as it arrives in the transmission phase (magic already checked).
public struct NBDRequestHeader: Sendable, Hashable {
    public var flags: UInt16
    public var type: UInt16
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32

    public init(flags: UInt16, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32) {
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }

    public var command: NBDCommand? { NBDCommand(rawValue: type) }
    public var commandFlags: NBDCommandFlags { NBDCommandFlags(rawValue: flags) }
    /// Only NBD_CMD_WRITE carries a payload (this server does not negotiate extended headers).
    public var hasPayload: Bool { type == NBDCommand.write.rawValue }
}

/// Parsed NBD_OPT_INFO / NBD_OPT_GO payload.
public struct NBDInfoRequest: Sendable, Hashable {
    public var exportName: String
    public var requests: [UInt16]
}

/// Parsed NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT payload.
public struct NBDMetaContextRequest: Sendable, Hashable {
    public var exportName: String
    public var queries: [String]
}

/// One base:allocation extent.
public struct NBDExtent: Sendable, Hashable {
    public var length: UInt32
    public var flags: NBDAllocationFlags
    public init(length: UInt32, flags: NBDAllocationFlags) {
        self.length = length
        self.flags = flags
    }
}

extension ByteBuffer {
    // MARK: decoding

    /// Reads a request header (28 bytes) if available. Returns nil when more bytes are needed.
    /// The magic is returned separately so that the caller can drop the connection on a bad one.
    public mutating func readNBDRequestHeader() -> (magic: UInt32, header: NBDRequestHeader)? {
        guard readableBytes >= NBDLimits.requestHeaderSize,
              let magic = readInteger(as: UInt32.self),
              let flags = readInteger(as: UInt16.self),
              let type = readInteger(as: UInt16.self),
              let cookie = readInteger(as: UInt64.self),
              let offset = readInteger(as: UInt64.self),
              let length = readInteger(as: UInt32.self)
        else { return nil }
        return (magic, NBDRequestHeader(flags: flags, type: type, cookie: cookie, offset: offset, length: length))
    }

    /// Reads a length-prefixed (32-bit) string bounded by the spec's 4096 bytes; nil if malformed.
    mutating func readNBDString(lengthPrefix: Int = 4) -> String? {
        let length: Int
        if lengthPrefix == 4 {
            guard let l = readInteger(as: UInt32.self) else { return nil }
            length = Int(l)
        } else {
            guard let l = readInteger(as: UInt16.self) else { return nil }
            length = Int(l)
        }
        guard length <= NBDLimits.maxStringLength, length <= readableBytes,
              let bytes = readBytes(length: length)
        else { return nil }
        return NBDString.decode(bytes)
    }

    /// Parses the payload of NBD_OPT_INFO / NBD_OPT_GO. Nil if the lengths are inconsistent.
    public static func parseInfoRequest(_ payload: ByteBuffer) -> NBDInfoRequest? {
        var buffer = payload
        guard let name = buffer.readNBDString(),
              let count = buffer.readInteger(as: UInt16.self),
              buffer.readableBytes == Int(count) * 2
        else { return nil }
        var requests: [UInt16] = []
        requests.reserveCapacity(Int(count))
        for _ in 0..<count {
            guard let r = buffer.readInteger(as: UInt16.self) else { return nil }
            requests.append(r)
        }
        return NBDInfoRequest(exportName: name, requests: requests)
    }

    /// Parses the payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
    public static func parseMetaContextRequest(_ payload: ByteBuffer) -> NBDMetaContextRequest? {
        var buffer = payload
        guard let name = buffer.readNBDString(),
              let count = buffer.readInteger(as: UInt32.self),
              count <= NBDLimits.maxMetaQueries
        else { return nil }
        var queries: [String] = []
        for _ in 0..<count {
            guard let q = buffer.readNBDString() else { return nil }
            queries.append(q)
        }
        guard buffer.readableBytes == 0 else { return nil }
        return NBDMetaContextRequest(exportName: name, queries: queries)
    }

    // MARK: encoding

    @discardableResult
    public mutating func writeNBDGreeting() -> Int {
        writeInteger(NBDMagic.initPassword)
            + writeInteger(NBDMagic.iHaveOpt)
            + writeInteger(NBDHandshakeFlags([.fixedNewstyle, .noZeroes]).rawValue)
    }

    /// Writes an option reply header followed by `dataLength` bytes the caller appends.
    @discardableResult
    public mutating func writeOptionReplyHeader(option: UInt32, type: NBDOptionReplyType, dataLength: Int) -> Int {
        writeInteger(NBDMagic.optionReply)
            + writeInteger(option)
            + writeInteger(type.rawValue)
            + writeInteger(UInt32(dataLength))
    }

    @discardableResult
    public mutating func writeOptionReply(option: UInt32, type: NBDOptionReplyType, message: String = "") -> Int {
        let bytes = Array(message.utf8.prefix(NBDLimits.maxStringLength))
        return writeOptionReplyHeader(option: option, type: type, dataLength: bytes.count) + writeBytes(bytes)
    }

    @discardableResult
    public mutating func writeSimpleReply(error: NBDErrno, cookie: UInt64) -> Int {
        writeInteger(NBDMagic.simpleReply) + writeInteger(error.rawValue) + writeInteger(cookie)
    }

    @discardableResult
    public mutating func writeStructuredReplyHeader(flags: NBDReplyFlags, type: NBDReplyType, cookie: UInt64, length: UInt32) -> Int {
        writeInteger(NBDMagic.structuredReply)
            + writeInteger(flags.rawValue)
            + writeInteger(type.rawValue)
            + writeInteger(cookie)
            + writeInteger(length)
    }

    /// A final NBD_REPLY_TYPE_ERROR chunk carrying a human-readable message.
    @discardableResult
    public mutating func writeStructuredError(error: NBDErrno, cookie: UInt64, message: String) -> Int {
        let bytes = Array(message.utf8.prefix(1024))
        return writeStructuredReplyHeader(flags: .done, type: .error, cookie: cookie, length: UInt32(6 + bytes.count))
            + writeInteger(error.rawValue)
            + writeInteger(UInt16(bytes.count))
            + writeBytes(bytes)
    }

    /// A final NBD_REPLY_TYPE_BLOCK_STATUS chunk.
    @discardableResult
    public mutating func writeBlockStatusReply(cookie: UInt64, contextID: UInt32, extents: [NBDExtent]) -> Int {
        var n = writeStructuredReplyHeader(flags: .done, type: .blockStatus, cookie: cookie,
                                           length: UInt32(4 + 8 * extents.count))
        n += writeInteger(contextID)
        for e in extents {
            n += writeInteger(e.length) + writeInteger(e.flags.rawValue)
        }
        return n
    }
}

/// Strict UTF-8 decoding for names and queries: NUL is not allowed.
enum NBDString {
    static func decode(_ bytes: [UInt8]) -> String? {
        guard !bytes.contains(0) else { return nil }
        return String(validating: bytes, as: UTF8.self)
    }
}
