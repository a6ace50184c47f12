/// A request that passed validation and is ready to run against the export.
public struct NBDRequest: Sendable, Hashable {
    public var command: NBDCommand
    public var flags: NBDCommandFlags
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32

    public init(command: NBDCommand, flags: NBDCommandFlags, cookie: UInt64, offset: UInt64, length: UInt32) {
        self.command = command
        self.flags = flags
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }
}

/// Why a request was refused: the error to send and a message for structured replies and logs.
public struct NBDRejection: Sendable, Hashable, Error {
    public var cookie: UInt64
    /// The raw command type (READ needs a structured error reply, never a simple reply with data).
    public var type: UInt16
    public var error: NBDErrno
    public var message: String

    public init(cookie: UInt64, type: UInt16, error: NBDErrno, message: String) {
        self.cookie = cookie
        self.type = type
        self.error = error
        self.message = message
    }
}

/// Checks a request header against the export and the negotiated session, in the order nbdkit uses:
/// command and flags first, then permissions, then length and range, then alignment.
public enum NBDRequestValidator {
    /// Flags each command accepts besides FUA (which the spec allows on every command once advertised).
    static func extraFlags(for command: NBDCommand, session: NBDSession) -> NBDCommandFlags {
        switch command {
        case .read: return session.structuredReplies ? [.dontFragment] : []
        case .writeZeroes:
            return session.export.fastZeroAdvertised ? [.noHole, .fastZero] : [.noHole]
        case .blockStatus: return [.reqOne]
        case .write, .disconnect, .flush, .trim, .cache: return []
        }
    }

    public static func validate(_ h: NBDRequestHeader, session: NBDSession) -> Result<NBDRequest, NBDRejection> {
        func reject(_ e: NBDErrno, _ message: String) -> Result<NBDRequest, NBDRejection> {
            .failure(NBDRejection(cookie: h.cookie, type: h.type, error: e, message: message))
        }
        let export = session.export
        guard let command = h.command else {
            return reject(.einval, "unknown command \(h.type)")
        }
        var allowed = extraFlags(for: command, session: session)
        if export.fuaAdvertised { allowed.insert(.fua) }
        let flags = h.commandFlags
        guard flags.isSubset(of: allowed) else {
            return reject(.einval, "invalid flags 0x\(String(h.flags, radix: 16)) for \(command)")
        }
        switch command {
        case .disconnect:
            return .success(NBDRequest(command: command, flags: flags, cookie: h.cookie, offset: h.offset, length: h.length))
        case .flush:
            guard export.canFlush else { return reject(.einval, "flush is not supported") }
            guard h.offset == 0 && h.length == 0 else {
                return reject(.einval, "flush offset and length must be zero")
            }
            return .success(NBDRequest(command: command, flags: flags, cookie: h.cookie, offset: 0, length: 0))
        case .write, .trim, .writeZeroes:
            guard !export.readOnly else { return reject(.eperm, "export is read-only") }
            if command == .trim && !export.trimAdvertised { return reject(.einval, "trim is not supported") }
            if command == .writeZeroes && !export.zeroAdvertised { return reject(.einval, "write zeroes is not supported") }
        case .cache:
            guard export.canCache else { return reject(.einval, "cache is not supported") }
        case .blockStatus:
            guard session.structuredReplies, session.baseAllocationContext != nil else {
                return reject(.einval, "block status needs structured replies and a selected meta context")
            }
        case .read:
            break
        }
        guard h.length > 0 else { return reject(.einval, "\(command) length must not be zero") }
        let limit = session.maximumRequestLength
        if (command == .read || command == .write) && h.length > limit {
            if command == .read && flags.contains(.dontFragment) {
                return reject(.eoverflow, "read of \(h.length) bytes is larger than the maximum \(limit)")
            }
            return reject(.einval, "\(command) of \(h.length) bytes is larger than the maximum \(limit)")
        }
        let (end, overflow) = h.offset.addingReportingOverflow(UInt64(h.length))
        guard !overflow, end <= export.size else {
            let e: NBDErrno = (command == .write || command == .writeZeroes) ? .enospc : .einval
            return reject(e, "\(command) at \(h.offset)+\(h.length) is beyond the end of the export (\(export.size))")
        }
        let align = UInt64(export.minimumBlockSize)
        if align > 1 && (h.offset % align != 0 || UInt64(h.length) % align != 0) {
            return reject(.einval, "\(command) at \(h.offset)+\(h.length) is not aligned to \(align)")
        }
        return .success(NBDRequest(command: command, flags: flags, cookie: h.cookie, offset: h.offset, length: h.length))
    }
}
