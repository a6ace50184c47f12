/// What the protocol layer needs to know about an export: its identity, size and capabilities.
public struct NBDExportInfo: Sendable, Hashable {
    public var name: String
    public var description: String
    public var size: UInt64
    public var readOnly: Bool
    public var canFlush: Bool
    public var canFUA: Bool
    public var canTrim: Bool
    public var canZero: Bool
    public var canFastZero: Bool
    public var canCache: Bool
    public var canMultiConn: Bool
    /// Advertised minimum block size (1, 512, 4096...); requests not aligned to it get EINVAL.
    public var minimumBlockSize: UInt32

    public init(name: String, description: String = "", size: UInt64, readOnly: Bool = false,
                canFlush: Bool = true, canFUA: Bool = true, canTrim: Bool = true, canZero: Bool = true,
                canFastZero: Bool = true, canCache: Bool = true, canMultiConn: Bool = true,
                minimumBlockSize: UInt32 = 1) {
        self.name = name
        self.description = description
        self.size = size
        self.readOnly = readOnly
        self.canFlush = canFlush
        self.canFUA = canFUA
        self.canTrim = canTrim
        self.canZero = canZero
        self.canFastZero = canFastZero
        self.canCache = canCache
        self.canMultiConn = canMultiConn
        self.minimumBlockSize = minimumBlockSize
    }

    /// What is advertised (and so accepted): writes and their flags never on a read-only export.
    var fuaAdvertised: Bool { canFUA && !readOnly }
    var trimAdvertised: Bool { canTrim && !readOnly }
    var zeroAdvertised: Bool { canZero && !readOnly }
    var fastZeroAdvertised: Bool { canFastZero && zeroAdvertised }

    /// The transmission flags sent to a client. DF is only advertised with structured replies.
    public func transmissionFlags(structuredReplies: Bool) -> NBDTransmissionFlags {
        var f: NBDTransmissionFlags = [.hasFlags]
        if readOnly { f.insert(.readOnly) }
        if canFlush { f.insert(.sendFlush) }
        if fuaAdvertised { f.insert(.sendFUA) }
        if trimAdvertised { f.insert(.sendTrim) }
        if zeroAdvertised { f.insert(.sendWriteZeroes) }
        if fastZeroAdvertised { f.insert(.sendFastZero) }
        if canCache { f.insert(.sendCache) }
        if canMultiConn { f.insert(.canMultiConn) }
        if structuredReplies { f.insert(.sendDF) }
        return f
    }
}

/// The state a client negotiated during the handshake.
public struct NBDSession: Sendable, Hashable {
    public var export: NBDExportInfo
    public var structuredReplies: Bool
    /// Context id of base:allocation when the client selected it.
    public var baseAllocationContext: UInt32?
    /// Largest READ/WRITE accepted: the advertised maximum block size when the client asked for the
    /// block sizes, else `NBDLimits.maxRequestLengthUnadvertised`.
    public var maximumRequestLength: UInt32
    /// The connection runs over TLS.
    public var tls = false

    public init(export: NBDExportInfo, structuredReplies: Bool, baseAllocationContext: UInt32?,
                maximumRequestLength: UInt32 = NBDLimits.maxRequestLength) {
        self.export = export
        self.structuredReplies = structuredReplies
        self.baseAllocationContext = baseAllocationContext
        self.maximumRequestLength = maximumRequestLength
    }
}
