import Atomics
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// Pulls absent pages from the source: the single-flight table, fetch-window coalescing, the demand
/// byte budget, the gate, demand before background, arrival hooks for direct replies, and demand-miss
/// accounting. Knows no files: pages go to a `PullStore`, and every page becomes a source range
/// through the `SourceMapping`.
///
/// Threads that call in:
/// - event loops (NIO connection handlers): `demand`, `ensurePresent`, `pendingRead`; promise callbacks
///   of a pull (data arrived, stored) run on the event loop of the request that created it;
/// - the background pull's event loop: `startBackground`, `setDemandPagesOnly`, `setDemandObserver`;
/// - libnbd source threads: a pull's arrival callback, which runs the `early` hooks (direct replies)
///   and, for pulls up to `inlineStoreLimit`, stores the data right there;
/// - the store-writer thread (one-thread pool): stores larger pulls;
/// - the server's blocking-I/O pool threads (through `LazyBackend.read/write`): `ensurePresent`;
/// - the control socket's event loop: `openGate`, status counters.
///
/// Locks, in the only order they nest: `lock` (this engine's table, queue, budget and gate) →
/// `PageStore.mapLock` (page states read while claiming) → nothing. `Pull`'s arrival lock is a leaf
/// (hooks run after it is released). `WriteExclusion`'s lock also nests only over `mapLock` and never
/// with `lock`. Under `lock` there is no file I/O and no source call: pulls start after it is released.
final class PullEngine: @unchecked Sendable {
    let store: any PullStore
    let mapping: any SourceMapping
    let source: any RemoteSource
    /// Background pulls go through these connections when given, so a demand miss never waits behind
    /// background data on the same connection.
    let backgroundSource: (any RemoteSource)?
    let fetchSize: UInt64
    /// The fetch window demand misses use now: `fetchSize`, or `missWindow` (a page unless the export
    /// sets it) while a background pull brings the neighbours (a miss then moves little more than
    /// what the client waits for over the link).
    private let demandFetchSize: ManagedAtomic<UInt64>
    /// What a demand miss pulls while a background pull runs: its own pages, widened to this aligned
    /// window (a page; a swap export: the kernel's swap read-ahead cluster).
    let missWindow: UInt64
    /// Stores large pulls: one thread, since buffered writes to one file serialize on its inode lock anyway.
    private let storeWriter: NIOThreadPool

    private let lock = NIOLock()
    /// Page → the pull that will make it present.
    private var pulls: [UInt64: Pull] = [:]
    /// Demand pulls waiting for room under `maxBytesInFlight`, oldest first.
    private var queued = CircularBuffer<Pull>()
    /// Bytes of the demand pulls started and not yet stored.
    private var bytesInFlight: UInt64 = 0
    private let maxBytesInFlight: UInt64
    /// The longest single source read (consecutive fetch windows are coalesced up to this).
    private let maxPullPages: UInt64
    /// While true no pull reaches the source: new pulls wait in `gatedPulls` until `openGate()`.
    private var gated: Bool
    private var gatedPulls: [Pull] = []

    // Counters for status.
    let bytesPulled = ManagedAtomic<UInt64>(0)
    let pullsInFlight = ManagedAtomic<Int>(0)
    /// Broadcast when `pullsInFlight` drops to zero (`drain`).
    private let idle = Condition()
    let demandMisses = ManagedAtomic<UInt64>(0)
    let missLatency = LatencyHistogram()
    /// The same samples in fixed buckets, for the metrics endpoint.
    let missLatencyBuckets = BucketHistogram()
    /// Client requests waiting for pulls right now.
    let demandPending = ManagedAtomic<Int>(0)
    private let observer = NIOLockedValueBox<(any DemandObserver)?>(nil)

    /// Pulls up to this size are stored on the thread that receives them; larger ones on the store writer.
    static let inlineStoreLimit: UInt64 = 64 * 1024
    /// Bound on one coalesced source read.
    static let maxPullLength: UInt64 = 4 << 20

    var geometry: PageGeometry { store.geometry }

    init(store: any PullStore, mapping: any SourceMapping, source: any RemoteSource,
         backgroundSource: (any RemoteSource)?, fetchSize: UInt64, maxBytesInFlight: UInt64,
         gated: Bool, storeWriter: NIOThreadPool, missWindow: UInt64 = 0) {
        let pageSize = store.geometry.pageSize
        self.store = store
        self.mapping = mapping
        self.source = source
        self.backgroundSource = backgroundSource
        self.fetchSize = max(fetchSize, pageSize)
        self.missWindow = max(missWindow, pageSize)
        self.demandFetchSize = ManagedAtomic(max(fetchSize, pageSize))
        self.maxBytesInFlight = maxBytesInFlight
        self.maxPullPages = max(Self.maxPullLength, self.fetchSize) / pageSize
        self.gated = gated
        self.storeWriter = storeWriter
    }

    // MARK: claiming

    /// A demand read of `pages`: a future for when every absent page is in the store (nil when none is
    /// absent), counted as a demand miss when it waits for the source.
    func demand(_ pages: Range<UInt64>, eventLoop: any EventLoop) -> EventLoopFuture<Void>? {
        let started = eventLoop.now
        let claimed = claim(pages, eventLoop: eventLoop)
        guard let pending = waitStored(claimed.covering, eventLoop: eventLoop) else { return nil }
        guard Self.isMiss(claimed) else { return pending }
        demandStarted(pages)
        pending.whenComplete { result in
            if case .success = result { self.recordMissLatency(since: started, on: eventLoop) }
            self.demandFinished()
        }
        return pending
    }

    /// Starts pulls for the absent pages of `pages` no pull covers yet, and returns a future for all the
    /// pulls the range waits on (nil when every page is already present or local). Not a demand miss.
    func ensurePresent(_ pages: Range<UInt64>, eventLoop: any EventLoop) -> EventLoopFuture<Void>? {
        waitStored(claim(pages, eventLoop: eventLoop).covering, eventLoop: eventLoop)
    }

    /// Starts background pulls for the absent pages of `pages` no pull covers yet; returns them.
    func startBackground(_ pages: Range<UInt64>, eventLoop: any EventLoop) -> [BackgroundPull] {
        claim(pages, eventLoop: eventLoop, background: true).created.map {
            BackgroundPull(pages: $0.pages, bytes: $0.bytes, stored: $0.stored.futureResult)
        }
    }

    /// Whether a read that claimed these pulls is a demand miss. Pulls whose data is already here (being
    /// stored) are not: nothing waits for the source. A pull the read created is one, even if a fast
    /// source has answered it already.
    static func isMiss(_ claimed: (covering: [Pull], created: [Pull])) -> Bool {
        !claimed.created.isEmpty || claimed.covering.contains { !$0.hasArrived }
    }

    /// A future for when every pull of `waits` is in the store (nil for none).
    private func waitStored(_ waits: [Pull], eventLoop: any EventLoop) -> EventLoopFuture<Void>? {
        if waits.isEmpty { return nil }
        // A pull started by a connection on another event loop completes there: hop to the caller's.
        let local = waits.map { $0.stored.futureResult.hop(to: eventLoop) }
        return local.count == 1 ? local[0] : EventLoopFuture.andAllSucceed(local, on: eventLoop)
    }

    /// The pulls covering the absent pages of `pages` (`covering`), starting new ones (`created`) for
    /// absent pages no pull covers yet: fetch-size aligned with consecutive windows coalesced into one
    /// source read (cut where the mapping is not contiguous), or, for `background`, exactly the
    /// uncovered runs inside `pages`.
    func claim(_ pages: Range<UInt64>, eventLoop: any EventLoop,
               background: Bool = false) -> (covering: [Pull], created: [Pull]) {
        let absent = store.runs(of: .absent, in: pages)
        guard !absent.isEmpty else { return ([], []) }
        var waits: [Pull] = []
        var created: [Pull] = []
        var launch: [Pull] = []
        lock.withLock {
            var seen = Set<ObjectIdentifier>()
            for run in absent {
                // New pulls reach to the end of the fetch window holding the run's last page.
                let reach = background ? run.upperBound : fetchWindow(around: run.upperBound - 1).upperBound
                var page = run.lowerBound
                while page < run.upperBound {
                    if let p = pulls[page] {
                        if seen.insert(ObjectIdentifier(p)).inserted { waits.append(p) }
                        page += 1
                        continue
                    }
                    var lo = page
                    let window = background ? page ..< page + 1 : fetchWindow(around: page)
                    while lo > window.lowerBound, pulls[lo - 1] == nil, store.state(of: lo - 1) == .absent { lo -= 1 }
                    var hi = page + 1
                    while hi < reach, hi - lo < maxPullPages, pulls[hi] == nil, store.state(of: hi) == .absent { hi += 1 }
                    for sourceRun in mapping.sourceRuns(of: lo ..< hi, geometry: geometry) {
                        let pull = Pull(pages: sourceRun.pages, sourceOffset: sourceRun.sourceOffset,
                                        bytes: geometry.byteRange(of: sourceRun.pages).length,
                                        background: background, eventLoop: eventLoop)
                        for p in sourceRun.pages { pulls[p] = pull }
                        seen.insert(ObjectIdentifier(pull))
                        waits.append(pull)
                        created.append(pull)
                        // At most `maxBytesInFlight` of demand pulls are in flight (or waiting for the store)
                        // at once; the rest wait their turn, so a huge CACHE cannot buffer the whole export.
                        if background {
                            launch.append(pull)
                        } else if bytesInFlight == 0 || bytesInFlight + pull.bytes <= maxBytesInFlight {
                            bytesInFlight += pull.bytes
                            launch.append(pull)
                        } else {
                            queued.append(pull)
                        }
                    }
                    page = hi
                }
            }
            if gated {
                gatedPulls += launch
                launch = []
            }
        }
        for pull in launch { start(pull) }
        return (waits, created)
    }

    /// The fetch-size-aligned window of pages around `page`.
    private func fetchWindow(around page: UInt64) -> Range<UInt64> {
        let pagesPerFetch = max(1, demandFetchSize.load(ordering: .relaxed) / geometry.pageSize)
        let lo = page - page % pagesPerFetch
        return lo ..< min(lo + pagesPerFetch, geometry.pageCount)
    }

    // MARK: gate

    var isGated: Bool { lock.withLock { gated } }
    var pullsAtGate: Int { lock.withLock { gatedPulls.count } }

    /// Lets pulls reach the source from now on, and starts the ones that were held back. Returns how
    /// many were held; 0 if the gate was already open.
    func openGate() -> Int {
        let held: [Pull] = lock.withLock {
            guard gated else { return [] }
            gated = false
            defer { gatedPulls = [] }
            return gatedPulls
        }
        for pull in held { start(pull) }
        return held.count
    }

    // MARK: running a pull

    /// Sends the pull's source read (or, for unmapped pages, makes zeros). Its data first goes to whoever
    /// waits for it (a read is answered from it directly), then into the store; the pull is finished
    /// once the store has it. Small pulls are stored by the thread that receives them (right after any
    /// direct reply), large ones on the store writer; data that arrives on the event loop only
    /// (retried reads) is stored from there.
    private func start(_ pull: Pull) {
        let length = pull.bytes
        let eventLoop = pull.eventLoop
        pullsInFlight.wrappingIncrement(ordering: .relaxed)
        let small = length <= Self.inlineStoreLimit
        let onArrival: @Sendable (ByteBuffer) -> Void = { [self] data in
            pull.arrived(data)
            if small {
                bytesPulled.wrappingIncrement(by: length, ordering: .relaxed)
                pull.stored.completeWith(Result { try store.storePulled(data, pages: pull.pages) })
            }
        }
        if let offset = pull.sourceOffset {
            let source = pull.background ? (backgroundSource ?? self.source) : self.source
            source.read(offset: offset, length: Int(length), eventLoop: eventLoop, onArrival: onArrival)
                .cascade(to: pull.data)
        } else {
            eventLoop.execute { pull.data.succeed(ByteBuffer(repeating: 0, count: Int(length))) }
        }
        pull.data.futureResult.whenComplete { [self] result in
            switch result {
            case .success(let data):
                guard !pull.hasArrived || !small else { return }  // already stored on arrival
                bytesPulled.wrappingIncrement(by: length, ordering: .relaxed)
                // Stored after the callbacks that answer reads from `data` have run.
                if small {
                    eventLoop.execute { pull.stored.completeWith(Result { try self.store.storePulled(data, pages: pull.pages) }) }
                } else {
                    storeWriter.runIfActive(eventLoop: eventLoop) { try self.store.storePulled(data, pages: pull.pages) }
                        .cascade(to: pull.stored)
                }
            case .failure(let error):
                pull.stored.fail(error)
            }
        }
        pull.stored.futureResult.whenComplete { [self] _ in
            let next: [Pull] = lock.withLock {
                for p in pull.pages where pulls[p] === pull { pulls[p] = nil }
                if !pull.background { bytesInFlight -= pull.bytes }
                var next: [Pull] = []
                while let first = queued.first, bytesInFlight == 0 || bytesInFlight + first.bytes <= maxBytesInFlight {
                    queued.removeFirst()
                    bytesInFlight += first.bytes
                    next.append(first)
                }
                return next
            }
            for p in next { start(p) }  // first, so the count does not touch zero between them
            if pullsInFlight.wrappingDecrementThenLoad(ordering: .relaxed) == 0 {
                idle.withLock {}  // a drain that saw the count above zero is waiting, not about to
                idle.broadcast()
            }
        }
    }

    /// Waits until every started pull has been stored (or has failed), at most `timeout`; pulls held
    /// at a closed gate are not started and do not count. For shutdown, after the background pull
    /// has stopped issuing: data already on its way is kept, and the source connections then close
    /// with nothing in flight (some servers fail on a client that closes under in-flight requests).
    /// Returns whether it drained. Blocks: not for an event loop thread.
    func drain(timeout: Duration) -> Bool {
        let deadline = Condition.deadline(after: timeout)
        return idle.withLock {
            while pullsInFlight.load(ordering: .relaxed) > 0 {
                guard idle.wait(until: deadline) else { return false }
            }
            return true
        }
    }

    // MARK: demand misses

    /// Demand misses pull only the pages asked for, in `missWindow` windows (`true`, while a
    /// background pull brings the rest) or whole `fetchSize` windows (`false`).
    func setDemandPagesOnly(_ pagesOnly: Bool) {
        demandFetchSize.store(pagesOnly ? missWindow : fetchSize, ordering: .relaxed)
    }

    func setDemandObserver(_ o: (any DemandObserver)?) { observer.withLockedValue { $0 = o } }

    /// Whether a client is waiting for the source right now.
    var demandOutstanding: Bool { demandPending.load(ordering: .relaxed) > 0 }

    func demandStarted(_ pages: Range<UInt64>) {
        demandMisses.wrappingIncrement(ordering: .relaxed)
        demandPending.wrappingIncrement(ordering: .relaxed)
        observer.withLockedValue { $0 }?.demandMiss(pages)
    }

    func demandFinished() {
        if demandPending.wrappingDecrementThenLoad(ordering: .relaxed) == 0 {
            observer.withLockedValue { $0 }?.demandIdle()
        }
    }

    func recordMissLatency(since started: NIODeadline, on eventLoop: any EventLoop) {
        let ns = UInt64(max(0, (eventLoop.now - started).nanoseconds))
        missLatency.record(nanoseconds: ns)
        missLatencyBuckets.record(nanoseconds: ns)
    }
}

/// Told about demand misses (a client waits for these pages) and when none is left waiting.
public protocol DemandObserver: AnyObject, Sendable {
    func demandMiss(_ pages: Range<UInt64>)
    func demandIdle()
}
