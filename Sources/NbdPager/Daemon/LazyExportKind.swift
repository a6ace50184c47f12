import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

// The lazy export kind: the one file of the daemon that knows the lazy stack's types (`LazyBackend`,
// `Prefetcher`, `PageStore`, `ReconnectingSource`, `LibnbdSource`, `FaultList`). Everything the
// daemon does with a lazy export goes through `LazyExport` (settings, opening) and
// `LazyOpenedExport` (background pull, commit cadence, progress line, status fields, the `prefetch`
// and `gate` commands).

/// A lazy copy of a remote NBD export: pages are pulled from the source on first access (and in the
/// background) into a local page store.
public struct LazyExport: ExportKind {
    public static let kindName = "lazy"
    public static let commands = ControlHandlers<LazyOpenedExport>()
        .on(PrefetchCommand.self) { export, request in try export.prefetch(request.command.action) }
        .on(GateCommand.self) { export, _ in try export.openGate() }
        .on(StagingCommand.self) { export, request in try export.staging(request.command) }

    /// The background pull: off, a sweep from the start, or adaptive (a sweep plus a window around
    /// each miss).
    public enum PrefetchMode: String, Sendable, CaseIterable {
        case off, sequential, adaptive
    }

    /// The source: a libnbd URI.
    public var source: String
    /// TLS credentials for an `nbds://` source.
    public var sourceTLS = SourceTLS()
    /// The page store's directory.
    public var store: String
    public var resetStore = false
    public var fetchSize: UInt64 = 64 * 1024
    public var sourceConnections = 2
    /// Seconds requests wait for a failing source before EIO.
    public var sourceTimeout = 60
    public var prefetch: PrefetchMode = .adaptive
    public var maxRate: UInt64?
    public var prefetchConnections = 1
    public var hotList: String?
    public var recordFaults: String?
    /// Hold every pull until the `gate open` command.
    public var gated = false
    /// Print a progress line on stderr (also when stderr is a terminal).
    public var progress = false
    /// Serve a swap device of this many bytes whose slots staging maps to source pages (swap-mode
    /// post-copy; see `SwapSlots`), instead of a copy of the source.
    public var swapSize: UInt64?

    public var needsControlSocket: Bool { gated || swapSize != nil }

    public init(source: String, store: String) {
        self.source = source
        self.store = store
    }

    /// Connects to the source, opens (or creates) the store, and marks the source's zero extents present.
    public func open(_ context: ExportContext) async throws -> LazyOpenedExport {
        let logger = context.logger, pool = context.runtime.threadPool
        let uri = source, connections = sourceConnections, tls = sourceTLS
        let remote = try ReconnectingSource(timeout: .seconds(Int64(sourceTimeout)), threadPool: pool, logger: logger) {
            try LibnbdSource.connect(uri: uri, connections: connections, tls: tls, logger: logger)
        }
        let pages: PageStore
        var slots: SwapSlots? = nil
        do {
            if let swapSize {
                (pages, slots) = try openSwapStore(size: swapSize, source: remote)
            } else {
                pages = try PageStore.open(directory: store, size: remote.size, identity: uri, reset: resetStore)
            }
        } catch {
            remote.close()
            throw error
        }
        var background: ReconnectingSource? = nil
        if prefetch != .off && (pages.snapshot().absent > 0 || slots != nil) {
            let n = prefetchConnections
            do {
                background = try ReconnectingSource(timeout: .seconds(Int64(sourceTimeout)), threadPool: pool, logger: logger) {
                    try LibnbdSource.connect(uri: uri, connections: n, tls: tls, logger: logger)
                }
            } catch {
                remote.close()
                try? pages.close()
                throw error
            }
        }
        let lazy = LazyBackend(store: pages, source: remote, fetchSize: fetchSize, logger: logger,
                               eventLoop: context.runtime.eventLoopGroup.next(), threadPool: pool,
                               mapping: slots ?? IdentityMapping(), backgroundSource: background, gated: gated,
                               completionArmed: slots.map { $0.stagingState == .sealed } ?? true,
                               missWindow: slots == nil ? 0 : Self.swapMissWindow)
        if let slots {
            do {
                try Self.settleSwapStore(lazy, slots: slots, logger: logger)
            } catch {
                try? lazy.close()
                throw error
            }
        }
        let snap = pages.snapshot()
        logger.info("store \(store): \(snap.present) present, \(snap.local) local, \(snap.absent) absent pages")
        if gated {
            logger.info("gate closed: nothing is pulled from the source until `nbd-umemd gate open`")
        } else {
            await LazyOpenedExport.markSourceZeros(lazy, logger: logger)
        }
        return LazyOpenedExport(lazy: lazy, slots: slots, settings: self, logger: logger)
    }
}

/// An open lazy export and its background work.
public final class LazyOpenedExport: OpenedExport {
    let lazy: LazyBackend
    /// A swap export's slot table (nil: a plain lazy copy).
    let slots: SwapSlots?
    let swapBackend: SwapSlotsBackend?
    let settings: LazyExport
    let logger: Logger
    private let state = NIOLockedValueBox(State())

    struct State {
        var prefetcher: Prefetcher?
        var progressLine: RepeatedTask?
        var latePages: UInt64 = 0
    }

    init(lazy: LazyBackend, slots: SwapSlots?, settings: LazyExport, logger: Logger) {
        self.lazy = lazy
        self.slots = slots
        self.swapBackend = slots.map { SwapSlotsBackend(lazy: lazy, slots: $0) }
        self.settings = settings
        self.logger = logger
    }

    public var backend: any BlockBackend { swapBackend ?? lazy }
    public var defaultDescription: String {
        slots == nil ? "lazy copy of \(settings.source)" : "swap slots staged from \(settings.source)"
    }

    /// Whether the background pull may run: the gate is open and (swap export) staging is sealed.
    var backgroundMayRun: Bool { !lazy.isGated && (slots == nil || slots?.stagingState == .sealed) }

    func startBackground() {
        if backgroundMayRun { prefetcher?.start() }
    }

    var latePages: UInt64 {
        get { state.withLockedValue { $0.latePages } }
        set { state.withLockedValue { $0.latePages = newValue } }
    }
    private var prefetcher: Prefetcher? { state.withLockedValue { $0.prefetcher } }

    /// Marks the pages the source reports as zero present without transfer; a source that cannot
    /// say costs only a warning (those pages are then pulled like any other).
    static func markSourceZeros(_ lazy: LazyBackend, logger: Logger) async {
        do {
            try await lazy.markSourceZeros()
        } catch {
            logger.warning("could not read the source's allocation map (\(error)); zero pages will be pulled")
        }
    }

    /// Builds the background puller (not started yet): reads the hot list, so a bad one is refused
    /// before any client is served.
    public func prepare(_ runtime: ExportRuntime) throws {
        var config = Prefetcher.Configuration()
        config.mode = Prefetcher.Mode(rawValue: settings.prefetch.rawValue) ?? .adaptive
        config.maxRate = settings.maxRate
        config.recordFaults = settings.recordFaults
        if let hotList = settings.hotList {
            config.hotList = try FaultList.read(path: hotList, size: lazy.size)
            logger.info("hot list \(hotList): \(config.hotList.count) ranges to pull first")
        }
        let p = Prefetcher(target: lazy, config: config, eventLoop: runtime.eventLoopGroup.next(), logger: logger)
        state.withLockedValue { $0.prefetcher = p }
    }

    public func start(_ runtime: ExportRuntime) {
        startBackground()
        // The page state is committed at least once a second (FLUSH/FUA commit at once).
        lazy.startPeriodicCommit(every: .seconds(1))
        let line = startProgressLine(on: runtime.eventLoopGroup.next())
        state.withLockedValue { $0.progressLine = line }
    }

    /// Stops the background work (the periodic commit stops when the storage closes, next).
    public func stop() {
        let s = state.withLockedValue { s -> State in defer { s.progressLine = nil }; return s }
        s.progressLine?.cancel()
        s.prefetcher?.stop()
    }

    /// With `progress` or a terminal on stderr: a progress line, rewritten every second until complete.
    func startProgressLine(on loop: any EventLoop) -> RepeatedTask? {
        guard settings.progress || isatty(2) != 0, let prefetcher, prefetcher.status().mode != .off else { return nil }
        return loop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { task in
            let s = prefetcher.status()
            let eta = s.etaSeconds.map { "\(Int($0.rounded())) s" } ?? "?"
            let complete = s.progress >= 1
            let percent = (s.progress * 1000).rounded(.down) / 10
            let rate = (s.rate / 1e5).rounded() / 10
            let tail = complete ? "  complete\n" : (s.state == .paused ? "  (paused)   " : "             ")
            let bytes = Array("\rpulled \(percent)%  \(rate) MB/s  ETA \(eta)\(tail)".utf8)
            _ = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
            if complete { task.cancel() }
        }
    }

    // MARK: status

    public func histograms() -> [(name: String, help: String, histogram: BucketHistogram)] {
        lazy.histograms()
    }

    public func statusFields() -> JSONValue {
        let s = lazy.status()
        var fields: [(String, JSONValue)] = [
            ("page_size", .unsigned(s.pageSize)),
            ("pages", .object([
                ("total", .unsigned(s.pages.pageCount)),
                ("absent", .unsigned(s.pages.absent)),
                ("present", .unsigned(s.pages.present)),
                ("local", .unsigned(s.pages.local)),
            ])),
            ("bytes_pulled", .unsigned(s.bytesPulled)),
            ("pulls_in_flight", .int(Int64(s.pullsInFlight))),
            ("demand_misses", .unsigned(s.demandMisses)),
            ("miss_latency_p50_us", Self.tenths(s.missLatencyP50Microseconds)),
            ("miss_latency_p99_us", Self.tenths(s.missLatencyP99Microseconds)),
            ("source_connected", .bool(s.sourceConnected)),
            ("complete", .bool(s.complete)),
            ("gate", .string(s.gated ? "closed" : "open")),
            ("pulls_at_gate", .int(Int64(s.pullsAtGate))),
            ("writes", .unsigned(s.writes)),
            ("bytes_written", .unsigned(s.bytesWritten)),
            ("source_outages", .unsigned(s.sourceOutages)),
            ("source_reconnects", .unsigned(s.sourceReconnects)),
            ("commits", .unsigned(s.commits)),
        ]
        fields += swapStatusFields()
        if let p = prefetcher?.status() {
            fields += [
                ("prefetch", .string(p.mode.rawValue)),
                ("prefetch_state", .string(p.state.rawValue)),
                ("background_bytes", .unsigned(p.backgroundBytes)),
                ("background_rate_bps", Self.tenths(p.rate)),
                ("max_rate_bps", Self.tenths(p.maxRate.map { Double($0) })),
                ("progress", .double((p.progress * 10_000).rounded() / 10_000)),
                ("eta_seconds", Self.tenths(p.etaSeconds)),
            ]
        }
        return .object(fields)
    }

    /// A value rounded to a tenth; null when absent or not finite.
    static func tenths(_ value: Double?) -> JSONValue {
        guard let value, value.isFinite else { return .null }
        return .double((value * 10).rounded() / 10)
    }

    // MARK: control commands (registered in `LazyExport.commands`)

    func prefetch(_ action: PrefetchCommand.Action) throws -> PrefetchCommand.Reply {
        guard let prefetcher, prefetcher.status().mode != .off else {
            throw ControlError("no background pull on this export (--prefetch off, or not a lazy export)")
        }
        switch action {
        case .pause: prefetcher.pause()
        case .resume: prefetcher.resume()
        }
        let done = prefetcher.status().state == .done
        return .init(prefetch: done ? "done" : (action == .pause ? "paused" : "running"))
    }

    /// Lets pulls reach the source, starts the background pull, then (in the background, not for a
    /// swap export) marks the source's zero extents. Idempotent. A swap export first copies its late
    /// pages (`LatePages`).
    func openGate() throws -> GateCommand.Reply {
        let wasGated = lazy.isGated
        var late: UInt64? = nil
        if wasGated, slots != nil { late = try copyLatePages() }
        let released = lazy.openGate()
        if wasGated {
            logger.info("gate opened: \(released) waiting pulls sent to the source")
            startBackground()
            // A swap export asked for the source's zero pages when it staged (none of them is
            // mapped); walking the whole map again here would only compete with the source's
            // completion of the migration, which is under way at this moment.
            if slots == nil {
                let lazy = self.lazy, logger = self.logger
                Task { await Self.markSourceZeros(lazy, logger: logger) }
            }
        }
        return .init(gate: "open", wasClosed: wasGated, releasedPulls: released, latePages: late ?? (slots == nil ? nil : latePages))
    }
}
