import NIOCore

// The server's handshake messages as values, and their encoding: one type and one `ByteBuffer` writer
// per message kind. `NBDServerStateMachine` returns these inside its actions; the connection handler
// encodes them. Pure: no I/O.

/// One option reply without data of its own: an ACK, or an error type with a human-readable message.
public struct NBDOptionReply: Sendable, Hashable {
    public var option: UInt32
    public var type: NBDOptionReplyType
    public var message: String

    public init(option: UInt32, type: NBDOptionReplyType, message: String = "") {
        self.option = option
        self.type = type
        self.message = message
    }
}

/// The reply to NBD_OPT_LIST: one NBD_REP_SERVER per export, then an ACK.
public struct NBDExportListReply: Sendable, Hashable {
    public struct Entry: Sendable, Hashable {
        public var name: String
        public var description: String
        public init(name: String, description: String) {
            self.name = name
            self.description = description
        }
    }

    public var option: UInt32
    public var exports: [Entry]

    public init(option: UInt32, exports: [Entry]) {
        self.option = option
        self.exports = exports
    }
}

/// The reply to NBD_OPT_INFO / NBD_OPT_GO: NBD_INFO_EXPORT, NBD_INFO_NAME and NBD_INFO_DESCRIPTION when
/// present, NBD_INFO_BLOCK_SIZE, then an ACK.
public struct NBDExportInfoReply: Sendable, Hashable {
    public var option: UInt32
    public var size: UInt64
    public var flags: NBDTransmissionFlags
    /// Sent only when the client asked for it.
    public var name: String?
    /// Sent only when the client asked for it and it is not empty.
    public var description: String?
    public var minimumBlockSize: UInt32
    public var preferredBlockSize: UInt32
    public var maximumBlockSize: UInt32

    public init(option: UInt32, size: UInt64, flags: NBDTransmissionFlags, name: String?, description: String?,
                minimumBlockSize: UInt32, preferredBlockSize: UInt32, maximumBlockSize: UInt32) {
        self.option = option
        self.size = size
        self.flags = flags
        self.name = name
        self.description = description
        self.minimumBlockSize = minimumBlockSize
        self.preferredBlockSize = preferredBlockSize
        self.maximumBlockSize = maximumBlockSize
    }
}

/// The reply to NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: the matching context (if any) as
/// NBD_REP_META_CONTEXT, then an ACK.
public struct NBDMetaContextReply: Sendable, Hashable {
    public struct Context: Sendable, Hashable {
        /// 0 in a LIST reply; the id requests refer to in a SET reply.
        public var id: UInt32
        public var name: String
        public init(id: UInt32, name: String) {
            self.id = id
            self.name = name
        }
    }

    public var option: UInt32
    public var context: Context?

    public init(option: UInt32, context: Context?) {
        self.option = option
        self.context = context
    }
}

/// What the server sends as it enters the transmission phase.
public enum NBDTransmissionReply: Sendable, Hashable {
    /// NBD_OPT_EXPORT_NAME: size and transmission flags, then 124 zero bytes unless the client set
    /// NO_ZEROES.
    case exportName(size: UInt64, flags: NBDTransmissionFlags, noZeroes: Bool)
    /// NBD_OPT_GO: the same replies as NBD_OPT_INFO.
    case go(NBDExportInfoReply)
}

extension ByteBuffer {
    @discardableResult
    public mutating func writeOptionReply(_ reply: NBDOptionReply) -> Int {
        writeOptionReply(option: reply.option, type: reply.type, message: reply.message)
    }

    @discardableResult
    public mutating func writeExportListReply(_ reply: NBDExportListReply) -> Int {
        var n = 0
        for e in reply.exports {
            let name = Array(e.name.utf8)
            let description = Array(e.description.utf8.prefix(NBDLimits.maxStringLength))
            n += writeOptionReplyHeader(option: reply.option, type: .server, dataLength: 4 + name.count + description.count)
            n += writeInteger(UInt32(name.count))
            n += writeBytes(name)
            n += writeBytes(description)
        }
        return n + writeOptionReply(option: reply.option, type: .ack)
    }

    @discardableResult
    public mutating func writeExportInfoReply(_ reply: NBDExportInfoReply) -> Int {
        let option = reply.option
        var n = writeOptionReplyHeader(option: option, type: .info, dataLength: 12)
        n += writeInteger(NBDInfoType.export.rawValue)
        n += writeInteger(reply.size)
        n += writeInteger(reply.flags.rawValue)
        if let name = reply.name {
            let bytes = Array(name.utf8)
            n += writeOptionReplyHeader(option: option, type: .info, dataLength: 2 + bytes.count)
            n += writeInteger(NBDInfoType.name.rawValue)
            n += writeBytes(bytes)
        }
        if let description = reply.description {
            let text = Array(description.utf8.prefix(NBDLimits.maxStringLength))
            n += writeOptionReplyHeader(option: option, type: .info, dataLength: 2 + text.count)
            n += writeInteger(NBDInfoType.description.rawValue)
            n += writeBytes(text)
        }
        n += writeOptionReplyHeader(option: option, type: .info, dataLength: 14)
        n += writeInteger(NBDInfoType.blockSize.rawValue)
        n += writeInteger(reply.minimumBlockSize)
        n += writeInteger(reply.preferredBlockSize)
        n += writeInteger(reply.maximumBlockSize)
        return n + writeOptionReply(option: option, type: .ack)
    }

    @discardableResult
    public mutating func writeMetaContextReply(_ reply: NBDMetaContextReply) -> Int {
        var n = 0
        if let context = reply.context {
            let name = Array(context.name.utf8)
            n += writeOptionReplyHeader(option: reply.option, type: .metaContext, dataLength: 4 + name.count)
            n += writeInteger(context.id)
            n += writeBytes(name)
        }
        return n + writeOptionReply(option: reply.option, type: .ack)
    }

    @discardableResult
    public mutating func writeTransmissionReply(_ reply: NBDTransmissionReply) -> Int {
        switch reply {
        case .exportName(let size, let flags, let noZeroes):
            var n = writeInteger(size) + writeInteger(flags.rawValue)
            if !noZeroes { n += writeRepeatingByte(0, count: 124) }
            return n
        case .go(let info):
            return writeExportInfoReply(info)
        }
    }
}
