import Atomics
import Logging
import NIOConcurrencyHelpers
import NIOCore

/// Runs the background pull of a lazy export's absent pages until every page is local, without getting
/// in the way of demand misses. `PrefetchPolicy` decides which pages come next; this scheduler decides
/// when, and talks to the export only through `BackgroundPullTarget`.
///
/// - Demand first: background pulls go through their own source connection(s), at most `maxInFlight`
///   bytes of them at once, and only `demandInFlight` bytes while a client waits for a miss (or did
///   within `demandQuiet`). While the background pull runs, a demand miss pulls only the pages it waits
///   for (no fetch window): its neighbours come through the background.
/// - `maxRate` caps the background traffic (a token bucket); demand misses are never limited.
///
/// All state lives on `eventLoop`, whose `now` is its clock (an `EmbeddedEventLoop` in tests advances
/// virtual time); the public methods may be called from any thread.
public final class Prefetcher: DemandObserver, @unchecked Sendable {
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
        /// Pre-paging window around a miss, in bytes (adaptive mode). The smallest is the demand
        /// budget: a window is then one source read (64 KiB windows made twice as many, each reply a
        /// full TSO segment plus a small tail: a swap-mode migration at 1 Gbit/s sent 6,179 packets
        /// instead of 4,873, 110 KB more on the link).
        public var minWindow: UInt64 = 128 << 10
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

    private let target: any BackgroundPullTarget
    private let config: Configuration
    private let eventLoop: any EventLoop
    private let logger: Logger
    private let geometry: PageGeometry

    // Event-loop state.
    private var policy: PrefetchPolicy
    private var started = false
    private var paused = false
    private var finished = false
    private var inFlight: UInt64 = 0
    private var bucket: TokenBucket?
    private var wakeup: Scheduled<Void>?
    private var ticker: RepeatedTask?
    private var pumpQueued = false
    /// When the last demand miss was taken (nil: none yet; a clock may start at zero).
    private var lastMissAt: NIODeadline?
    /// Rate estimate: bytes and time at the start of the current measuring interval.
    private var rateMark: (at: NIODeadline, bytes: UInt64)
    private let statusBox = NIOLockedValueBox<(state: State, rate: Double)>((.off, 0))
    private let backgroundBytes = ManagedAtomic<UInt64>(0)
    /// Misses reported from any thread, taken on the event loop.
    private let misses = NIOLockedValueBox<[Range<UInt64>]>([])
    /// Faults recorded for `--record-faults`, not yet written.
    private var recorded: [Range<UInt64>] = []
    private var recordFailed = false

    public init(target: any BackgroundPullTarget, config: Configuration, eventLoop: any EventLoop, logger: Logger) {
        let geometry = target.pageGeometry
        self.target = target
        self.config = config
        self.eventLoop = eventLoop
        self.logger = logger
        self.geometry = geometry
        self.policy = PrefetchPolicy(
            pageCount: geometry.pageCount, adaptive: config.mode == .adaptive,
            minWindow: config.minWindow / geometry.pageSize, maxWindow: config.maxWindow / geometry.pageSize,
            hotList: config.hotList.map { geometry.pages(covering: $0.lowerBound, length: $0.upperBound - $0.lowerBound) })
        self.rateMark = (eventLoop.now, 0)
    }

    /// Runs `body` on the event loop and waits for it (at once when already there).
    private func onLoop(_ body: @escaping @Sendable () -> Void) {
        if eventLoop.inEventLoop { body() } else { try? eventLoop.submit(body).wait() }
    }

    // MARK: control

    /// Starts the background pulls (nothing happens in mode `.off`).
    public func start() {
        eventLoop.execute { [self] in
            guard !started else { return }
            started = true
            target.setDemandObserver(self)
            ticker = eventLoop.scheduleRepeatedTask(initialDelay: .milliseconds(500), delay: .milliseconds(500)) { [self] _ in
                if !finished { updateRate(eventLoop.now) }
                pump()
                flushRecorded()
            }
            guard config.mode != .off else { return }
            setState(paused ? .paused : .running)
            target.setDemandPagesOnly(!paused)
            // A rate-limited pull starts at the rate, not with a burst.
            bucket = config.maxRate.map { TokenBucket(rate: $0, capacity: config.batchBytes, now: eventLoop.now) }
            rateMark = (eventLoop.now, backgroundBytes.load(ordering: .relaxed))
            pump()
        }
    }

    public func pause() {
        eventLoop.execute { [self] in
            paused = true
            if config.mode != .off && !finished && started {
                setState(.paused)
                target.setDemandPagesOnly(false)
            }
        }
    }

    public func resume() {
        eventLoop.execute { [self] in
            paused = false
            if config.mode != .off && !finished && started {
                setState(.running)
                target.setDemandPagesOnly(true)
                pump()
            }
        }
    }

    /// Stops issuing pulls (those in flight finish) and writes the recorded faults. For shutdown.
    public func stop() {
        onLoop { [self] in
            finished = true
            wakeup?.cancel()
            ticker?.cancel()
            target.setDemandObserver(nil)
            target.setDemandPagesOnly(false)
            takeMisses()
            flushRecorded()
        }
    }

    public func status() -> Status {
        let snap = target.pageCounts()
        let (state, rate) = statusBox.withLockedValue { ($0.state, $0.rate) }
        let done = snap.pageCount - snap.absent
        let progress = snap.pageCount == 0 ? 1 : Double(done) / Double(snap.pageCount)
        var eta: Double? = nil
        if snap.absent == 0 {
            eta = 0
        } else if rate > 0 && state == .running {
            eta = Double(snap.absent * geometry.pageSize) / rate
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

    private func takeMisses() {
        let taken = misses.withLockedValue { m -> [Range<UInt64>] in defer { m = [] }; return m }
        for pages in taken {
            lastMissAt = eventLoop.now
            if config.recordFaults != nil { recorded.append(pages) }
            if !finished { policy.noteMiss(pages) }
        }
    }

    /// Appends the recorded faults to the `recordFaults` file, one "OFFSET LENGTH" line (bytes) each.
    private func flushRecorded() {
        guard let path = config.recordFaults, !recorded.isEmpty else { return }
        var text = ""
        for pages in recorded {
            let (offset, length) = geometry.byteRange(of: pages)
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
        if target.pageCounts().isComplete {
            finish()
            return
        }
        let now = eventLoop.now
        let demandActive = target.demandOutstanding || lastMissAt.map { now - $0 < config.demandQuiet } ?? false
        let limit = demandActive ? config.demandInFlight : config.maxInFlight
        let batch = min(config.batchBytes, limit)
        var scanned: UInt64 = 0
        while inFlight == 0 || inFlight + batch <= limit {
            if bucket != nil {
                bucket?.refill(now)
                if let b = bucket, b.tokens <= 0 {
                    scheduleWakeup(in: b.wait)
                    break
                }
            }
            guard let range = policy.nextRange(batchPages: batch / geometry.pageSize, states: target, scanned: &scanned)
            else { break }
            for pull in target.startBackground(range, eventLoop: eventLoop) {
                inFlight += pull.bytes
                bucket?.take(pull.bytes)
                pull.stored.hop(to: eventLoop).whenComplete { [self] result in
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
