// NBD protocol constants (NetworkBlockDevice/nbd doc/proto.md). Pure values, no behaviour.

public enum NBDMagic {
    /// "NBDMAGIC", first 8 bytes the server sends.
    public static let initPassword: UInt64 = 0x4e42_444d_4147_4943
    /// "IHAVEOPT": newstyle greeting and the prefix of every option the client sends.
    public static let iHaveOpt: UInt64 = 0x4948_4156_454f_5054
    /// Prefix of every option reply.
    public static let optionReply: UInt64 = 0x0003_e889_0455_65a9
    public static let request: UInt32 = 0x2560_9513
    public static let simpleReply: UInt32 = 0x6744_6698
    public static let structuredReply: UInt32 = 0x668e_33ef
}

/// Handshake flags the server sends (16 bits).
public struct NBDHandshakeFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fixedNewstyle = NBDHandshakeFlags(rawValue: 1 << 0)
    public static let noZeroes = NBDHandshakeFlags(rawValue: 1 << 1)
}

/// Client flags (32 bits) sent in reply to the greeting.
public struct NBDClientFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let fixedNewstyle = NBDClientFlags(rawValue: 1 << 0)
    public static let noZeroes = NBDClientFlags(rawValue: 1 << 1)
    public static let known: NBDClientFlags = [.fixedNewstyle, .noZeroes]
}

/// Transmission flags (16 bits) describing an export.
public struct NBDTransmissionFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let hasFlags = NBDTransmissionFlags(rawValue: 1 << 0)
    public static let readOnly = NBDTransmissionFlags(rawValue: 1 << 1)
    public static let sendFlush = NBDTransmissionFlags(rawValue: 1 << 2)
    public static let sendFUA = NBDTransmissionFlags(rawValue: 1 << 3)
    public static let rotational = NBDTransmissionFlags(rawValue: 1 << 4)
    public static let sendTrim = NBDTransmissionFlags(rawValue: 1 << 5)
    public static let sendWriteZeroes = NBDTransmissionFlags(rawValue: 1 << 6)
    public static let sendDF = NBDTransmissionFlags(rawValue: 1 << 7)
    public static let canMultiConn = NBDTransmissionFlags(rawValue: 1 << 8)
    public static let sendResize = NBDTransmissionFlags(rawValue: 1 << 9)
    public static let sendCache = NBDTransmissionFlags(rawValue: 1 << 10)
    public static let sendFastZero = NBDTransmissionFlags(rawValue: 1 << 11)
}

/// Option codes (client to server during the handshake).
public enum NBDOption: UInt32, Sendable {
    case exportName = 1
    case abort = 2
    case list = 3
    case peekExport = 4
    case startTLS = 5
    case info = 6
    case go = 7
    case structuredReply = 8
    case listMetaContext = 9
    case setMetaContext = 10
    case extendedHeaders = 11
}

/// Option reply types. Errors have bit 31 set.
public enum NBDOptionReplyType: UInt32, Sendable {
    case ack = 1
    case server = 2
    case info = 3
    case metaContext = 4
    case errUnsupported = 0x8000_0001
    case errPolicy = 0x8000_0002
    case errInvalid = 0x8000_0003
    case errPlatform = 0x8000_0004
    case errTLSRequired = 0x8000_0005
    case errUnknown = 0x8000_0006
    case errShutdown = 0x8000_0007
    case errBlockSizeRequired = 0x8000_0008
    case errTooBig = 0x8000_0009
}

/// Information types for NBD_OPT_INFO / NBD_OPT_GO.
public enum NBDInfoType: UInt16, Sendable {
    case export = 0
    case name = 1
    case description = 2
    case blockSize = 3
}

/// Request types in the transmission phase.
public enum NBDCommand: UInt16, Sendable, CaseIterable {
    case read = 0
    case write = 1
    case disconnect = 2
    case flush = 3
    case trim = 4
    case cache = 5
    case writeZeroes = 6
    case blockStatus = 7
}

/// Command flags (16 bits) on a request.
public struct NBDCommandFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fua = NBDCommandFlags(rawValue: 1 << 0)
    public static let noHole = NBDCommandFlags(rawValue: 1 << 1)
    public static let dontFragment = NBDCommandFlags(rawValue: 1 << 2)
    public static let reqOne = NBDCommandFlags(rawValue: 1 << 3)
    public static let fastZero = NBDCommandFlags(rawValue: 1 << 4)
}

/// Structured reply chunk types.
public enum NBDReplyType: UInt16, Sendable {
    case none = 0
    case offsetData = 1
    case offsetHole = 2
    case blockStatus = 5
    case error = 0x8001
    case errorOffset = 0x8002
}

public struct NBDReplyFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let done = NBDReplyFlags(rawValue: 1 << 0)
}

/// The error values the protocol allows on the wire. Any other errno is mapped onto one of these.
public enum NBDErrno: UInt32, Sendable, Error, CustomStringConvertible {
    case ok = 0
    case eperm = 1
    case eio = 5
    case enomem = 12
    case einval = 22
    case enospc = 28
    case eoverflow = 75
    case enotsup = 95
    case eshutdown = 108

    /// Maps a host errno onto a wire error value, as the spec asks (EDQUOT/EFBIG become ENOSPC).
    public init(hostErrno: Int32) {
        switch hostErrno {
        case 0: self = .ok
        case 1, 13, 30: self = .eperm          // EPERM, EACCES, EROFS
        case 12: self = .enomem
        case 22: self = .einval
        case 27, 28, 122: self = .enospc       // EFBIG, ENOSPC, EDQUOT
        case 75: self = .eoverflow
        case 95: self = .enotsup               // EOPNOTSUPP == ENOTSUP on Linux
        case 108: self = .eshutdown
        default: self = .eio
        }
    }

    public var description: String {
        switch self {
        case .ok: return "success"
        case .eperm: return "EPERM"
        case .eio: return "EIO"
        case .enomem: return "ENOMEM"
        case .einval: return "EINVAL"
        case .enospc: return "ENOSPC"
        case .eoverflow: return "EOVERFLOW"
        case .enotsup: return "ENOTSUP"
        case .eshutdown: return "ESHUTDOWN"
        }
    }
}

/// base:allocation flags.
public struct NBDAllocationFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let hole = NBDAllocationFlags(rawValue: 1 << 0)
    public static let zero = NBDAllocationFlags(rawValue: 1 << 1)
}

public enum NBDLimits {
    /// Largest request payload (READ/WRITE length) accepted from a client that asked for the block
    /// sizes (NBD_INFO_BLOCK_SIZE): the advertised maximum block size.
    public static let maxRequestLength: UInt32 = 32 * 1024 * 1024
    /// Largest payload accepted from a client that never asked for block sizes (NBD_OPT_EXPORT_NAME,
    /// or NBD_OPT_GO without NBD_INFO_BLOCK_SIZE): such a client may not know the 32 MiB limit, and
    /// nbdkit accepts 64 MiB from it too.
    public static let maxRequestLengthUnadvertised: UInt32 = 64 * 1024 * 1024
    /// Preferred block size advertised in NBD_INFO_BLOCK_SIZE.
    public static let preferredBlockSize: UInt32 = 4096
    /// Longest option payload accepted during the handshake; longer options drop the connection.
    public static let maxOptionLength: UInt32 = 64 * 1024
    /// Most options a client may send before entering transmission.
    public static let maxOptions = 256
    /// Longest string the spec allows (export names, queries).
    public static let maxStringLength = 4096
    /// Most meta context queries in one LIST/SET_META_CONTEXT.
    public static let maxMetaQueries = 128
    /// Size of a request header on the wire.
    public static let requestHeaderSize = 28
    /// Context id given to base:allocation.
    public static let baseAllocationContextID: UInt32 = 1
    public static let baseAllocation = "base:allocation"
}
