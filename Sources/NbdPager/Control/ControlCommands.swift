/// The control commands and their replies (see `ControlCommand` for the wire format).

/// `status`: the daemon's state. Reply: `DaemonStatus`.
public struct StatusCommand: ControlCommand {
    public static let name = "status"
    public typealias Reply = DaemonStatus
    public init() {}
}

/// `prefetch pause|resume`: stops or restarts a lazy export's background pull.
public struct PrefetchCommand: ControlCommand {
    public static let name = "prefetch"
    public enum Action: String, Codable, Sendable, CaseIterable { case pause, resume }
    public var action: Action
    public init(action: Action) { self.action = action }

    public struct Reply: Codable, Sendable, Equatable {
        /// "paused", "running" or "done".
        public var prefetch: String
        public init(prefetch: String) { self.prefetch = prefetch }
    }
}

/// `gate open`: lets a gated lazy export pull from its source.
public struct GateCommand: ControlCommand {
    public static let name = "gate"
    public enum Action: String, Codable, Sendable, CaseIterable { case open }
    public var action: Action
    public init(action: Action) { self.action = action }

    public struct Reply: Codable, Sendable, Equatable {
        public var gate: String
        /// Whether the gate was closed before this command.
        public var wasClosed: Bool
        /// The demand pulls that were waiting at the gate.
        public var releasedPulls: Int
        /// A swap export: source pages that were zero when staging asked but are not now, copied into
        /// the staged RAM file before the gate opened.
        public var latePages: UInt64?

        public init(gate: String, wasClosed: Bool, releasedPulls: Int, latePages: UInt64? = nil) {
            self.gate = gate
            self.wasClosed = wasClosed
            self.releasedPulls = releasedPulls
            self.latePages = latePages
        }

        enum CodingKeys: String, CodingKey {
            case gate, wasClosed = "was_closed", releasedPulls = "released_pulls", latePages = "late_pages"
        }
    }
}

/// `staging open|zero-pages|seal`: a swap export's staging (see `SwapSlots`). `open` hands out the
/// run's key; `zero-pages` lists the source pages that are zero now (they are not staged); `seal` ends
/// marker decoding for good.
public struct StagingCommand: ControlCommand {
    public static let name = "staging"
    public enum Action: String, Codable, Sendable, CaseIterable {
        case open, seal
        case zeroPages = "zero-pages"
    }
    public var action: Action
    /// `open`: the RAM file being staged (late pages are copied into it at gate open).
    public var ramFile: String?

    public init(action: Action, ramFile: String? = nil) {
        self.action = action
        self.ramFile = ramFile
    }

    enum CodingKeys: String, CodingKey { case action, ramFile = "ram_file" }

    public struct Reply: Codable, Sendable, Equatable {
        public var staging: String
        /// `open`: the key markers are authenticated with (32 hex digits).
        public var key: String?
        public var sourceSize: UInt64
        public var pageSize: UInt64
        public var slots: UInt64
        /// `zero-pages`: runs of zero source pages, as [first page, page count] pairs.
        public var zeroPages: [[UInt64]]?
        public var markersDecoded: UInt64
        public var mappedSlots: UInt64
        public var stagedSlots: UInt64
        public var duplicateMarkers: UInt64
        public var invalidMarkers: UInt64

        public init(staging: String, key: String? = nil, sourceSize: UInt64, pageSize: UInt64, slots: UInt64,
                    zeroPages: [[UInt64]]? = nil, counts: SwapSlots.Counts) {
            self.staging = staging
            self.key = key
            self.sourceSize = sourceSize
            self.pageSize = pageSize
            self.slots = slots
            self.zeroPages = zeroPages
            markersDecoded = counts.markersDecoded
            mappedSlots = counts.mapped
            stagedSlots = counts.stagedAtSeal
            duplicateMarkers = counts.duplicates
            invalidMarkers = counts.invalidMarkers
        }

        enum CodingKeys: String, CodingKey {
            case staging, key, sourceSize = "source_size", pageSize = "page_size", slots
            case zeroPages = "zero_pages", markersDecoded = "markers_decoded", mappedSlots = "mapped_slots"
            case stagedSlots = "staged_slots", duplicateMarkers = "duplicate_markers", invalidMarkers = "invalid_markers"
        }
    }
}

/// The status of the daemon. With one export, that export's fields are also at the top level (the
/// fields `nbd-umemd status` has always printed); `exports` lists every export.
public struct DaemonStatus: Codable, Sendable, Equatable {
    public var connections: Int
    public var swap: SwapStatus?
    public var exports: [ExportStatus]

    public init(connections: Int, swap: SwapStatus?, exports: [ExportStatus]) {
        self.connections = connections
        self.swap = swap
        self.exports = exports
    }

    enum Keys: String, CodingKey { case connections, exports, swapMode = "swap_mode" }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: Keys.self)
        connections = try c.decode(Int.self, forKey: .connections)
        exports = try c.decode([ExportStatus].self, forKey: .exports)
        swap = try c.decodeIfPresent(Bool.self, forKey: .swapMode) == true ? try SwapStatus(from: decoder) : nil
    }

    public func encode(to encoder: any Encoder) throws {
        if exports.count == 1 { try exports[0].encode(to: encoder) }
        try swap?.encode(to: encoder)
        var c = encoder.container(keyedBy: Keys.self)
        try c.encode(connections, forKey: .connections)
        try c.encode(exports, forKey: .exports)
    }

    /// The export called `name`.
    public func export(_ name: String) -> ExportStatus? { exports.first { $0.export == name } }
}

/// `--swap` mode's state: whether every thread has IO_FLUSHER, locked memory, OOM score.
public struct SwapStatus: Codable, Sendable, Equatable {
    public var swapMode = true
    public var threads: Int
    public var ioFlusher: Bool
    public var threadsWithoutIOFlusher: Int
    public var memoryLockedBytes: UInt64
    public var oomScoreAdj: Int

    public init(threads: Int, ioFlusher: Bool, threadsWithoutIOFlusher: Int, memoryLockedBytes: UInt64, oomScoreAdj: Int) {
        self.threads = threads
        self.ioFlusher = ioFlusher
        self.threadsWithoutIOFlusher = threadsWithoutIOFlusher
        self.memoryLockedBytes = memoryLockedBytes
        self.oomScoreAdj = oomScoreAdj
    }

    enum CodingKeys: String, CodingKey {
        case swapMode = "swap_mode", threads, ioFlusher = "io_flusher"
        case threadsWithoutIOFlusher = "threads_without_io_flusher"
        case memoryLockedBytes = "memory_locked_bytes", oomScoreAdj = "oom_score_adj"
    }
}

/// One export's status: what every export has, plus the fields of its kind (an object).
public struct ExportStatus: Codable, Sendable, Equatable {
    public var export: String
    public var kind: String
    public var size: UInt64
    public var readOnly: Bool
    /// The kind's own fields (for a lazy export: pages, bytes pulled, miss latency, gate, prefetch...).
    public var fields: JSONValue

    public init(export: String, kind: String, size: UInt64, readOnly: Bool, fields: JSONValue = .object([])) {
        self.export = export
        self.kind = kind
        self.size = size
        self.readOnly = readOnly
        self.fields = fields
    }

    enum Keys: String, CodingKey, CaseIterable { case export, kind, size, readOnly = "read_only" }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: Keys.self)
        export = try c.decode(String.self, forKey: .export)
        kind = try c.decode(String.self, forKey: .kind)
        size = try c.decode(UInt64.self, forKey: .size)
        readOnly = try c.decode(Bool.self, forKey: .readOnly)
        let common = Set(Keys.allCases.map(\.rawValue))
        if case .object(let all) = try JSONValue(from: decoder) {
            fields = .object(all.filter { !common.contains($0.0) })
        } else {
            fields = .object([])
        }
    }

    public func encode(to encoder: any Encoder) throws {
        if case .object(let f) = fields, !f.isEmpty { try fields.encode(to: encoder) }
        var c = encoder.container(keyedBy: Keys.self)
        try c.encode(export, forKey: .export)
        try c.encode(kind, forKey: .kind)
        try c.encode(size, forKey: .size)
        try c.encode(readOnly, forKey: .readOnly)
    }

    /// A field of the kind's own (`status.field("complete")`).
    public func field(_ key: String) -> JSONValue? { fields[key] }
}
