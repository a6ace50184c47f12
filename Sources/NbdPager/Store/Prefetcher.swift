import Atomics
import Logging
import NIOConcurrencyHelpers
import NIOCore

/// Pulls a lazy export's absent pages in the background until every page is local, without getting in
/// the way of demand misses.
///
/// - Order: hints first (the hot list, then windows around recent misses in adaptive mode), then a sweep
///   over the absent pages from a cursor; present, local and zero pages are skipped.
/// - Demand first: background pulls go through their own source connection(s) (`LazyBackend.backgroundSource`),
///   at most `maxInFlight` bytes of them at once, and only `demandInFlight` bytes while a client waits for
///   a miss (or did within `demandQuiet`). While the background pull runs, a demand miss pulls only the
///   pages it waits for (no fetch window): its neighbours come through the background, so the miss
///   moves as few bytes as possible over a link it shares.
/// - `maxRate` caps the background traffic (a token bucket); demand misses are never limited.
///
/// All state lives on one event loop; the public methods may be called from any thread.
public final class Prefetcher: LazyBackend.DemandObserver, @unchecked Sendable {
    public enum Mode: String, Sendable, CaseIterable {
        /// No background pulls: pages arrive on demand only.
        case off
        /// Sweep the export from the start.
        case sequential
        /// Sweep, but move the sweep to each miss and pull a window around it that grows while misses
        /// are sequential and shrinks when they scatter.
        case adaptive
    }

    public struct Configuration: Sendable {
        public var mode: Mode = .adaptive
        /// Bytes per second of background traffic, nil for no limit.
        public var maxRate: UInt64?
        /// One background source read.
        public var batchBytes: UInt64 = 1 << 20
        /// Background bytes in flight while no client waits.
        public var maxInFlight: UInt64 = 4 << 20
        /// Background bytes in flight while a client waits for a miss.
        public var demandInFlight: UInt64 = 128 << 10
        /// How long after the last miss the demand limit still applies.
        public var demandQuiet: TimeAmount = .milliseconds(20)
        /// Pre-paging window around a miss, in bytes (adaptive mode).
        public var minWindow: UInt64 = 64 << 10
        public var maxWindow: UInt64 = 4 << 20
        /// Byte ranges to pull before anything else.
        public var hotList: [Range<UInt64>] = []
        /// Append every demand miss ("OFFSET LENGTH" in bytes) to this file (readable as a hot list).
        public var recordFaults: String?

        public init() {}
    }

    public enum State: String, Sendable {
        case off, running, paused, done
    }

    public struct Status: Sendable {
        public var mode: Mode
        public var state: State
        public var backgroundBytes: UInt64
        /// Background bytes per second over the last few seconds.
        public var rate: Double
        /// Fraction of pages present or local.
        public var progress: Double
        /// Seconds until every page is local at the current rate, nil when unknown.
        public var etaSeconds: Double?
        public var maxRate: UInt64?
    }

    private let backend: LazyBackend
    private let config: Configuration
    private let eventLoop: any EventLoop
    private let logger: Logger
    private let pageSize: UInt64
    private let pageCount: UInt64

    // Event-loop state.
    private var started = false
    private var paused = false
    private var finished = false
    private var cursor: UInt64 = 0
    /// Page ranges to pull before the sweep, most urgent first.
    private var hints = CircularBuffer<Range<UInt64>>()
    private var inFlight: UInt64 = 0
    private var tokens: Double = 0
    private var lastRefill = NIODeadline.now()
    private var wakeup: Scheduled<Void>?
    private var ticker: RepeatedTask?
    private var pumpQueued = false
    /// Adaptive pre-paging: the window (pages) and where the last miss ended.
    private var window: UInt64
    private var lastMissEnd: UInt64?
    private var lastMissAt = NIODeadline.distantPast
    /// Rate estimate: bytes and time at the start of the current measuring interval.
    private var rateMark: (at: NIODeadline, bytes: UInt64) = (.now(), 0)
    private let statusBox = NIOLockedValueBox<(state: State, rate: Double)>((.off, 0))

    private let backgroundBytes = ManagedAtomic<UInt64>(0)

    public init(backend: LazyBackend, config: Configuration, eventLoop: any EventLoop, logger: Logger) {
        self.backend = backend
        self.config = config
        self.eventLoop = eventLoop
        self.logger = logger
        self.pageSize = backend.store.pageSize
        self.pageCount = backend.store.pageCount
        self.window = max(1, config.minWindow / backend.store.pageSize)
        for r in config.hotList {
            let pages = backend.geometry.pages(covering: r.lowerBound, length: r.upperBound - r.lowerBound)
            if !pages.isEmpty { hints.append(pages) }
        }
    }

    // MARK: control

    /// Starts the background pulls (nothing happens in mode `.off`).
    public func start() {
        eventLoop.execute { [self] in
            guard !started else { return }
            started = true
            backend.setDemandObserver(self)
            ticker = eventLoop.scheduleRepeatedTask(initialDelay: .milliseconds(500), delay: .milliseconds(500)) { [self] _ in
                if !finished { updateRate(.now()) }
                pump()
                flushRecorded()
            }
            guard config.mode != .off else { return }
            setState(paused ? .paused : .running)
            backend.setDemandPagesOnly(!paused)
            tokens = 0  // a rate-limited pull starts at the rate, not with a burst
            lastRefill = .now()
            rateMark = (.now(), backgroundBytes.load(ordering: .relaxed))
            pump()
        }
    }

    public func pause() {
        eventLoop.execute { [self] in
            paused = true
            if config.mode != .off && !finished && started {
                setState(.paused)
                backend.setDemandPagesOnly(false)
            }
        }
    }

    public func resume() {
        eventLoop.execute { [self] in
            paused = false
            if config.mode != .off && !finished && started {
                setState(.running)
                backend.setDemandPagesOnly(true)
                pump()
            }
        }
    }

    /// Stops issuing pulls (those in flight finish) and writes the recorded faults. For shutdown.
    public func stop() {
        try? eventLoop.submit { [self] in
            finished = true
            wakeup?.cancel()
            ticker?.cancel()
            backend.setDemandObserver(nil)
            backend.setDemandPagesOnly(false)
            takeMisses()
            flushRecorded()
        }.wait()
    }

    public func status() -> Status {
        let snap = backend.store.snapshot()
        let (state, rate) = statusBox.withLockedValue { ($0.state, $0.rate) }
        let done = snap.pageCount - snap.absent
        let progress = snap.pageCount == 0 ? 1 : Double(done) / Double(snap.pageCount)
        var eta: Double? = nil
        if snap.absent == 0 {
            eta = 0
        } else if rate > 0 && state == .running {
            eta = Double(snap.absent * pageSize) / rate
        }
        return Status(mode: config.mode, state: snap.absent == 0 && config.mode != .off ? .done : state,
                      backgroundBytes: backgroundBytes.load(ordering: .relaxed), rate: rate, progress: progress,
                      etaSeconds: eta, maxRate: config.maxRate)
    }

    private func setState(_ state: State) {
        statusBox.withLockedValue { $0.state = state }
    }

    // MARK: DemandObserver (any thread)

    public func demandMiss(_ pages: Range<UInt64>) {
        // No event-loop hop here (this runs on the miss's path): the miss is taken into account when
        // the client's wait ends (`demandIdle`) or at the next pump.
        misses.withLockedValue { $0.append(pages) }
    }

    public func demandIdle() {
        eventLoop.execute { [self] in
            takeMisses()
            schedulePump()
        }
    }

    private let misses = NIOLockedValueBox<[Range<UInt64>]>([])
    /// Faults recorded for `--record-faults`, not yet written.
    private var recorded: [Range<UInt64>] = []

    private func takeMisses() {
        let taken = misses.withLockedValue { m -> [Range<UInt64>] in defer { m = [] }; return m }
        for pages in taken { noteMiss(pages) }
    }

    private func noteMiss(_ pages: Range<UInt64>) {
        lastMissAt = .now()
        if config.recordFaults != nil { recorded.append(pages) }
        guard config.mode == .adaptive, !finished else { return }
        // Sequential misses (this one starts within the window after the last one) grow the window;
        // scattered ones shrink it.
        let minPages = max(1, config.minWindow / pageSize)
        let maxPages = max(minPages, config.maxWindow / pageSize)
        if let end = lastMissEnd, pages.lowerBound >= end, pages.lowerBound < end + window {
            window = min(window * 2, maxPages)
        } else {
            window = max(window / 2, minPages)
        }
        lastMissEnd = pages.upperBound
        let back = min(pages.lowerBound, window / 4)
        let around = pages.lowerBound - back ..< min(pageCount, pages.upperBound + window)
        hints.prepend(around)
        while hints.count > 64 { hints.removeLast() }
        // The sweep goes on after the window: neighbours of hot pages come first.
        cursor = around.upperBound < pageCount ? around.upperBound : 0
    }

    /// Appends the recorded faults to the `recordFaults` file, one "OFFSET LENGTH" line (bytes) each.
    private func flushRecorded() {
        guard let path = config.recordFaults, !recorded.isEmpty else { return }
        var text = ""
        for pages in recorded {
            let (offset, length) = backend.geometry.byteRange(of: pages)
            text += "\(offset) \(length)\n"
        }
        recorded = []
        do {
            try FaultList.append(text, to: path)
        } catch {
            if !recordFailed { logger.error("cannot record faults: \(error)") }
            recordFailed = true
        }
    }

    private var recordFailed = false

    // MARK: pulling

    private func schedulePump() {
        guard !pumpQueued else { return }
        pumpQueued = true
        eventLoop.execute { [self] in
            pumpQueued = false
            pump()
        }
    }

    /// Starts background pulls while the limits allow.
    private func pump() {
        takeMisses()
        guard started, !paused, !finished, config.mode != .off else { return }
        if backend.store.isComplete {
            finish()
            return
        }
        let now = NIODeadline.now()
        let demandActive = backend.demandOutstanding || now - lastMissAt < config.demandQuiet
        let limit = demandActive ? config.demandInFlight : config.maxInFlight
        let batch = min(config.batchBytes, limit)
        var scanned: UInt64 = 0
        while inFlight == 0 || inFlight + batch <= limit {
            if let maxRate = config.maxRate {
                refill(now, rate: maxRate)
                if tokens <= 0 {
                    scheduleWakeup(in: .nanoseconds(Int64((-tokens / Double(maxRate) + 0.001) * 1e9)))
                    break
                }
            }
            guard let range = nextRange(batchBytes: batch, scanned: &scanned) else { break }
            for pull in backend.startBackground(range, eventLoop: eventLoop) {
                inFlight += pull.bytes
                tokens -= Double(pull.bytes)
                pull.stored.futureResult.hop(to: eventLoop).whenComplete { [self] result in
                    inFlight -= pull.bytes
                    if case .success = result {
                        backgroundBytes.wrappingIncrement(by: pull.bytes, ordering: .relaxed)
                    }
                    schedulePump()
                }
            }
        }
        if demandActive {
            // Back to the full window once the quiet period after the last miss is over.
            scheduleWakeup(in: config.demandQuiet)
        }
    }

    /// The next page range to pull: a hint, or the next absent run of the sweep (at most one batch).
    /// Nil when the whole export was scanned without finding an unclaimed absent page.
    private func nextRange(batchBytes: UInt64, scanned: inout UInt64) -> Range<UInt64>? {
        let batchPages = max(1, batchBytes / pageSize)
        while let hint = hints.first {
            if let run = backend.store.runs(of: .absent, in: hint).first {
                let take = run.lowerBound ..< min(run.upperBound, run.lowerBound + batchPages)
                hints[hints.startIndex] = take.upperBound ..< hint.upperBound
                if hints.first?.isEmpty == true { hints.removeFirst() }
                return take
            }
            hints.removeFirst()
        }
        while scanned < pageCount {
            guard let first = backend.store.firstPage(with: .absent, from: cursor) else {
                if cursor == 0 { return nil }
                scanned += pageCount - cursor
                cursor = 0
                continue
            }
            let end = min(pageCount, first + batchPages)
            guard let run = backend.store.runs(of: .absent, in: first ..< end).first else { return nil }
            scanned += run.upperBound - cursor
            cursor = run.upperBound < pageCount ? run.upperBound : 0
            return run
        }
        return nil
    }

    /// Token bucket: pulls may start while it is positive and take their size out of it; it starts
    /// empty and holds at most one batch, so neither the start nor a pause turns into a burst.
    private func refill(_ now: NIODeadline, rate: UInt64) {
        let elapsed = Double((now - lastRefill).nanoseconds) / 1e9
        lastRefill = now
        tokens = min(Double(config.batchBytes), tokens + elapsed * Double(rate))
    }

    private func scheduleWakeup(in delay: TimeAmount) {
        if wakeup != nil { return }
        wakeup = eventLoop.scheduleTask(in: delay) { [self] in
            wakeup = nil
            pump()
        }
    }

    private func updateRate(_ now: NIODeadline) {
        let span = now - rateMark.at
        guard span >= .milliseconds(400) else { return }
        let bytes = backgroundBytes.load(ordering: .relaxed)
        let rate = Double(bytes - rateMark.bytes) / (Double(span.nanoseconds) / 1e9)
        statusBox.withLockedValue { $0.rate = $0.rate == 0 ? rate : 0.5 * $0.rate + 0.5 * rate }
        rateMark = (now, bytes)
    }

    private func finish() {
        guard !finished else { return }
        finished = true
        setState(.done)
        statusBox.withLockedValue { $0.rate = 0 }
        logger.info("background pull complete: \(backgroundBytes.load(ordering: .relaxed)) bytes pulled in the background")
    }
}
