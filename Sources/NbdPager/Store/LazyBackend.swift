import Atomics
import Dispatch
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// An export whose pages are pulled on first access from a remote NBD source into a local `PageStore`.
///
/// Invariants (DESIGN §3):
/// - a page's state only moves forward (absent → present when pulled, → local when a client writes,
///   trims or zeroes it);
/// - concurrent misses on one page share one source read (single flight);
/// - a pull that completes after a client wrote a page never overwrites the client's data: under the
///   lock, a pull claims only pages still absent and not being written, and a client write waits until
///   no pull is storing into its pages before it announces itself;
/// - data reaches stable storage before the state that marks it present (`PageStore.commit`).
public final class LazyBackend: BlockBackend, @unchecked Sendable {
    public let store: PageStore
    public let source: any RemoteSource
    /// Background pulls (the prefetcher's) go through these connections when given, so a demand miss
    /// never waits behind background data on the same connection.
    public let backgroundSource: (any RemoteSource)?
    public let fetchSize: UInt64
    /// The fetch window demand misses use now: `fetchSize`, or one page while a background pull
    /// brings the neighbours (a miss then moves only what the client waits for over the link).
    private let demandFetchSize: ManagedAtomic<UInt64>
    public let capabilities: BackendCapabilities
    private let logger: Logger

    /// Guards `pulls`, `queued`, `bytesInFlight`, `writing` and `storing`.
    private let lock = NIOLock()
    /// Page → the pull that will make it present.
    private var pulls: [UInt64: Pull] = [:]
    /// Pulls waiting for room under `maxBytesInFlight`, oldest first.
    private var queued = CircularBuffer<Pull>()
    /// Bytes of the pulls started and not yet stored.
    private var bytesInFlight: UInt64 = 0
    /// The longest single source read a pull makes (consecutive fetch windows are coalesced up to this).
    private let maxPullPages: UInt64
    /// Page ranges clients are writing right now (one entry per writer), which pulls must not touch.
    /// Ranges, not pages, so that a multi-GiB TRIM costs one entry.
    private var writing: [Range<UInt64>] = []
    /// Page ranges whose pulled data is being written to the store right now; client writes wait for them.
    private var storing: [Range<UInt64>] = []

    private var completionLogged = false
    /// While true, no pull reaches the source: new pulls wait in `gatedPulls` until `openGate()`
    /// (a live-migration destination must not read the source's RAM before the source VM stops).
    private var gated: Bool
    private var gatedPulls: [Pull] = []

    private func isBeingWritten(_ page: UInt64) -> Bool { writing.contains { $0.contains(page) } }
    private func isBeingStored(_ page: UInt64) -> Bool { storing.contains { $0.contains(page) } }

    // Counters for status.
    let bytesPulled = ManagedAtomic<UInt64>(0)
    let pullsInFlight = ManagedAtomic<Int>(0)
    let demandMisses = ManagedAtomic<UInt64>(0)
    let missLatency = LatencyHistogram()

    /// Pulls up to this size are stored from the event loop; larger ones from a thread pool.
    static let inlineStoreLimit: UInt64 = 64 * 1024
    /// Default bound on the data of started pulls not yet in the store (memory stays bounded).
    public static let defaultMaxBytesInFlight: UInt64 = 64 << 20
    private let maxBytesInFlight: UInt64
    /// Stores large pulls: one thread, since buffered writes to one file serialize on its inode lock
    /// anyway (several writers only spin on it).
    private let storeWriter = NIOThreadPool(numberOfThreads: 1)
    /// Bound on one coalesced source read.
    static let maxPullLength: UInt64 = 4 << 20

    /// One source read of a run of pages: its data as soon as the source answers, and its completion
    /// once the data is in the store (or the pull failed).
    final class Pull: Sendable {
        let pages: Range<UInt64>
        let bytes: UInt64
        /// Started by the prefetcher: not counted against `maxBytesInFlight` (the prefetcher bounds its
        /// own), and sent through `backgroundSource`.
        let background: Bool
        let data: EventLoopPromise<ByteBuffer>
        let stored: EventLoopPromise<Void>

        /// Callbacks to run on the receiving thread the moment the data arrives (see `pendingRead`).
        private let arrival = NIOLockedValueBox<(arrived: Bool, hooks: [@Sendable (ByteBuffer) -> Void])>((false, []))

        init(pages: Range<UInt64>, bytes: UInt64, background: Bool, eventLoop: any EventLoop) {
            self.pages = pages
            self.bytes = bytes
            self.background = background
            self.data = eventLoop.makePromise(of: ByteBuffer.self)
            self.stored = eventLoop.makePromise(of: Void.self)
        }

        /// Adds a hook; false when the data has already arrived (the hook will not run).
        func onArrival(_ hook: @escaping @Sendable (ByteBuffer) -> Void) -> Bool {
            arrival.withLockedValue { state in
                if state.arrived { return false }
                state.hooks.append(hook)
                return true
            }
        }

        var hasArrived: Bool { arrival.withLockedValue { $0.arrived } }

        func arrived(_ data: ByteBuffer) {
            let hooks = arrival.withLockedValue { state -> [@Sendable (ByteBuffer) -> Void] in
                state.arrived = true
                defer { state.hooks = [] }
                return state.hooks
            }
            for hook in hooks { hook(data) }
        }
    }

    public var size: UInt64 { store.size }
    var geometry: PageGeometry { store.geometry }

    public init(store: PageStore, source: any RemoteSource, fetchSize: UInt64, logger: Logger,
                maxBytesInFlight: UInt64 = LazyBackend.defaultMaxBytesInFlight,
                backgroundSource: (any RemoteSource)? = nil, gated: Bool = false) {
        self.gated = gated
        self.maxBytesInFlight = maxBytesInFlight
        self.backgroundSource = backgroundSource
        self.store = store
        self.source = source
        self.fetchSize = max(fetchSize, store.pageSize)
        self.demandFetchSize = ManagedAtomic(max(fetchSize, store.pageSize))
        self.maxPullPages = max(Self.maxPullLength, self.fetchSize) / store.pageSize
        storeWriter.start()
        self.logger = logger
        self.capabilities = BackendCapabilities(
            writable: true, canTrim: true, canZero: true, canFastZero: true, canCache: true,
            canMultiConn: true, inlineSafe: false, pendingReads: true)
    }

    // MARK: making ranges readable

    /// Pulls whatever is absent in `offset ..< offset + length` (for a write: only the partial pages at
    /// its edges, since whole pages are simply overwritten). Nil when nothing needs pulling.
    public func prepare(offset: UInt64, length: UInt64, forWrite: Bool, eventLoop: any EventLoop) -> EventLoopFuture<Void>? {
        let pages = geometry.pages(covering: offset, length: length)
        guard !pages.isEmpty else { return nil }
        if forWrite {
            let futures = partialEdgePages(offset: offset, length: length).compactMap { ensurePresent($0, eventLoop: eventLoop) }
            return futures.isEmpty ? nil : EventLoopFuture.andAllSucceed(futures, on: eventLoop)
        }
        let started = NIODeadline.now()
        let claimed = claim(pages, eventLoop: eventLoop)
        guard let pending = waitStored(claimed.covering, eventLoop: eventLoop) else { return nil }
        guard Self.isMiss(claimed) else { return pending }
        demandMisses.wrappingIncrement(ordering: .relaxed)
        demandStarted(pages)
        let histogram = missLatency
        pending.whenComplete { result in
            if case .success = result {
                histogram.record(nanoseconds: UInt64((NIODeadline.now() - started).nanoseconds))
            }
            self.demandFinished()
        }
        return pending
    }

    /// The pages a modification of `offset ..< offset + length` covers only in part (at most two): they
    /// must hold the source's bytes before the modification is merged into them.
    private func partialEdgePages(offset: UInt64, length: UInt64) -> [Range<UInt64>] {
        let pages = geometry.pages(covering: offset, length: length)
        guard !pages.isEmpty else { return [] }
        var edges: [Range<UInt64>] = []
        if !geometry.isPageAligned(offset) { edges.append(pages.lowerBound ..< pages.lowerBound + 1) }
        let end = offset + length
        if end < size && !geometry.isPageAligned(end) && edges.last?.lowerBound != pages.upperBound - 1 {
            edges.append(pages.upperBound - 1 ..< pages.upperBound)
        }
        return edges
    }

    /// Starts pulls for the absent pages of `pages` that no pull covers yet, and returns a future for
    /// all the pulls the range waits on (nil when every page is already present or local).
    func ensurePresent(_ pages: Range<UInt64>, eventLoop: any EventLoop) -> EventLoopFuture<Void>? {
        waitStored(claim(pages, eventLoop: eventLoop).covering, eventLoop: eventLoop)
    }

    /// Whether a read that claimed these pulls is a demand miss. Pulls whose data is already here (being
    /// stored) are not: nothing waits for the source. A pull the read created is one, even if a fast
    /// source has answered it already.
    private static func isMiss(_ claimed: (covering: [Pull], created: [Pull])) -> Bool {
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
    /// source read, or, for `background`, exactly the uncovered runs inside `pages`.
    private func claim(_ pages: Range<UInt64>, eventLoop: any EventLoop,
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
                    let pull = Pull(pages: lo ..< hi, bytes: geometry.byteRange(of: lo ..< hi).length,
                                    background: background, eventLoop: eventLoop)
                    for p in lo ..< hi { pulls[p] = pull }
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

    /// Whether pulls are held back (see `openGate`).
    public var isGated: Bool { lock.withLock { gated } }

    /// Lets pulls reach the source from now on, and starts the ones that were held back (demand misses
    /// that have been waiting). Returns how many were held; 0 if the gate was already open.
    @discardableResult
    public func openGate() -> Int {
        let held: [Pull] = lock.withLock {
            guard gated else { return [] }
            gated = false
            defer { gatedPulls = [] }
            return gatedPulls
        }
        for pull in held { start(pull) }
        return held.count
    }

    /// Starts background pulls for the absent pages of `pages` no pull covers yet; returns them.
    func startBackground(_ pages: Range<UInt64>, eventLoop: any EventLoop) -> [Pull] {
        claim(pages, eventLoop: eventLoop, background: true).created
    }

    /// The fetch-size-aligned window of pages around `page`.
    private func fetchWindow(around page: UInt64) -> Range<UInt64> {
        let pagesPerFetch = max(1, demandFetchSize.load(ordering: .relaxed) / store.pageSize)
        let lo = page - page % pagesPerFetch
        return lo ..< min(lo + pagesPerFetch, store.pageCount)
    }

    /// Sends the pull's source read. Its data first goes to whoever waits for it (a read is answered from
    /// it directly), then into the store; the pull is finished once the store has it. Small pulls are
    /// stored by the thread that receives them (right after any direct reply), large ones on the
    /// blocking-I/O pool; data that arrives on the event loop only (retried reads) is stored from there.
    private func start(_ pull: Pull) {
        let (offset, length) = geometry.byteRange(of: pull.pages)
        let eventLoop = pull.stored.futureResult.eventLoop
        pullsInFlight.wrappingIncrement(ordering: .relaxed)
        let small = length <= Self.inlineStoreLimit
        let source = pull.background ? (backgroundSource ?? self.source) : self.source
        source.read(offset: offset, length: Int(length), eventLoop: eventLoop, onArrival: { [self] data in
            pull.arrived(data)
            if small {
                bytesPulled.wrappingIncrement(by: length, ordering: .relaxed)
                pull.stored.completeWith(Result { try storePulled(data, pages: pull.pages) })
            }
        }).cascade(to: pull.data)
        pull.data.futureResult.whenComplete { [self] result in
            switch result {
            case .success(let data):
                guard !pull.hasArrived || !small else { return }  // already stored on arrival
                bytesPulled.wrappingIncrement(by: length, ordering: .relaxed)
                // Stored after the callbacks that answer reads from `data` have run.
                if small {
                    eventLoop.execute { pull.stored.completeWith(Result { try self.storePulled(data, pages: pull.pages) }) }
                } else {
                    storeWriter.runIfActive(eventLoop: eventLoop) { try self.storePulled(data, pages: pull.pages) }
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
            pullsInFlight.wrappingDecrement(ordering: .relaxed)
            for p in next { start(p) }
        }
    }

    /// For a read whose pages are all absent: its data straight from the pulls that fetch them, before
    /// they are stored (no store write or read on the way to the client). Nil when some page is already
    /// present or local (the read then goes through `prepare` and the store).
    /// `early`, when given, may be called with the read's data on the thread that receives it from the
    /// source, before the returned future completes (so the reply can go out without waiting for the event
    /// loop); it is only ever called for reads served by a single pull.
    public func pendingRead(offset: UInt64, length: UInt64, eventLoop: any EventLoop,
                            early: (@Sendable (ByteBuffer) -> Void)?) -> EventLoopFuture<ByteBuffer>? {
        let pages = geometry.pages(covering: offset, length: length)
        guard !pages.isEmpty, store.count(of: .absent, in: pages) == UInt64(pages.count) else { return nil }
        let claimed = claim(pages, eventLoop: eventLoop)
        let covering = claimed.covering.sorted { $0.pages.lowerBound < $1.pages.lowerBound }
        // A page may have been stored between the check and the claim: then take the store path.
        var next = pages.lowerBound
        for p in covering where p.pages.lowerBound <= next { next = max(next, p.pages.upperBound) }
        guard next >= pages.upperBound else { return nil }
        let miss = Self.isMiss(claimed)
        if miss {
            demandMisses.wrappingIncrement(ordering: .relaxed)
            demandStarted(pages)
        }
        let started = NIODeadline.now()
        let histogram = missLatency
        let geometry = self.geometry
        let result: EventLoopFuture<ByteBuffer>
        if covering.count == 1, let pull = covering.first {
            let skip = Int(offset - geometry.byteOffset(ofPage: pull.pages.lowerBound))
            if let early {
                _ = pull.onArrival { data in
                    if let slice = data.getSlice(at: data.readerIndex + skip, length: Int(length)) { early(slice) }
                }
            }
            result = pull.data.futureResult.hop(to: eventLoop).flatMapThrowing { data in
                guard let slice = data.getSlice(at: data.readerIndex + skip, length: Int(length)) else {
                    throw BackendError.system(SystemError("short pull at \(offset)", errno: EIO))
                }
                return slice
            }
        } else {
            result = EventLoopFuture.whenAllSucceed(covering.map { $0.data.futureResult }, on: eventLoop)
                .flatMapThrowing { parts in
                    var out = ByteBufferAllocator().buffer(capacity: Int(length))
                    let end = offset + length
                    for (pull, data) in zip(covering, parts) {
                        let pullStart = geometry.byteOffset(ofPage: pull.pages.lowerBound)
                        let from = max(offset, pullStart)
                        let to = min(end, pullStart + UInt64(data.readableBytes))
                        guard from < to else { continue }
                        guard from == offset + UInt64(out.readableBytes),
                              let slice = data.getSlice(at: data.readerIndex + Int(from - pullStart), length: Int(to - from))
                        else { throw BackendError.system(SystemError("short pull at \(from)", errno: EIO)) }
                        out.writeImmutableBuffer(slice)
                    }
                    guard out.readableBytes == Int(length) else {
                        throw BackendError.system(SystemError("short pull at \(offset)", errno: EIO))
                    }
                    return out
                }
        }
        if miss {
            result.whenComplete { outcome in
                if case .success = outcome {
                    histogram.record(nanoseconds: UInt64((NIODeadline.now() - started).nanoseconds))
                }
                self.demandFinished()
            }
        }
        return result
    }

    /// Writes pulled data for the pages that are still absent and not being written, then marks them
    /// present. All-zero pages become holes.
    private func storePulled(_ data: ByteBuffer, pages: Range<UInt64>) throws {
        // Claim the pages that are still absent and not being written; client writes to claimed pages
        // wait until the pulled data is stored (see `modify`), so the store writes can run unlocked and
        // in parallel with other pulls.
        let claimed: [Range<UInt64>] = lock.withLock {
            var runs: [Range<UInt64>] = []
            for run in store.runs(of: .absent, in: pages) {
                var start: UInt64? = nil
                for page in run {
                    if !isBeingWritten(page) && !isBeingStored(page) {
                        if start == nil { start = page }
                    } else if let s = start {
                        runs.append(s ..< page)
                        start = nil
                    }
                }
                if let s = start { runs.append(s ..< run.upperBound) }
            }
            storing.append(contentsOf: runs)
            return runs
        }
        defer {
            lock.withLock {
                for run in claimed {
                    if let i = storing.firstIndex(of: run) { storing.remove(at: i) }
                }
            }
        }
        let base = geometry.byteOffset(ofPage: pages.lowerBound)
        try data.withUnsafeReadableBytes { bytes in
            for run in claimed {
                // Consecutive pages of the same kind (all zero or not) go to the store in one call.
                var groupStart = run.lowerBound
                var groupZero = false
                for page in run {
                    let from = Int(geometry.byteOffset(ofPage: page) - base)
                    let zero = PageStore.isAllZero(
                        UnsafeRawBufferPointer(rebasing: bytes[from ..< from + Int(geometry.length(ofPage: page))]))
                    if page == run.lowerBound {
                        groupZero = zero
                    } else if zero != groupZero {
                        try storeGroup(groupStart ..< page, zero: groupZero, bytes: bytes, base: base)
                        groupStart = page
                        groupZero = zero
                    }
                }
                try storeGroup(groupStart ..< run.upperBound, zero: groupZero, bytes: bytes, base: base)
            }
        }
        noteCompletion()
    }

    private func storeGroup(_ group: Range<UInt64>, zero: Bool, bytes: UnsafeRawBufferPointer, base: UInt64) throws {
        let (offset, length) = geometry.byteRange(of: group)
        if zero {
            try store.punchHole(offset: offset, length: length)
        } else {
            let from = Int(offset - base)
            try store.writeData(from: UnsafeRawBufferPointer(rebasing: bytes[from ..< from + Int(length)]), offset: offset)
        }
        store.markPresent(group)
    }

    private func noteCompletion() {
        guard store.isComplete else { return }
        let first = lock.withLock { () -> Bool in
            defer { completionLogged = true }
            return !completionLogged
        }
        if first {
            logger.info("every page is local; the source is no longer needed")
            // Not from this thread: it may be one of the source's own (a pull stored on arrival).
            let sources: [any RemoteSource] = [source] + (backgroundSource.map { [$0] } ?? [])
            DispatchQueue.global().async { sources.forEach { $0.close() } }
        }
    }

    // MARK: demand misses, for the prefetcher

    /// Told about demand misses (a client waits for these pages) and when none is left waiting.
    public protocol DemandObserver: AnyObject, Sendable {
        func demandMiss(_ pages: Range<UInt64>)
        func demandIdle()
    }

    private let observer = NIOLockedValueBox<(any DemandObserver)?>(nil)
    /// Client requests waiting for pulls right now.
    let demandPending = ManagedAtomic<Int>(0)

    public func setDemandObserver(_ o: (any DemandObserver)?) { observer.withLockedValue { $0 = o } }

    /// Demand misses pull only the pages asked for (`true`, while a background pull brings the rest)
    /// or whole `fetchSize` windows (`false`).
    public func setDemandPagesOnly(_ pagesOnly: Bool) {
        demandFetchSize.store(pagesOnly ? store.pageSize : fetchSize, ordering: .relaxed)
    }

    /// Whether a client is waiting for the source right now.
    public var demandOutstanding: Bool { demandPending.load(ordering: .relaxed) > 0 }

    private func demandStarted(_ pages: Range<UInt64>) {
        demandPending.wrappingIncrement(ordering: .relaxed)
        observer.withLockedValue { $0 }?.demandMiss(pages)
    }

    private func demandFinished() {
        if demandPending.wrappingDecrementThenLoad(ordering: .relaxed) == 0 {
            observer.withLockedValue { $0 }?.demandIdle()
        }
    }

    // MARK: status

    public struct Status: Sendable {
        public var size: UInt64
        public var pageSize: UInt64
        public var pages: PageStoreSnapshot
        public var bytesPulled: UInt64
        public var pullsInFlight: Int
        public var demandMisses: UInt64
        public var missLatencyP50Microseconds: Double?
        public var missLatencyP99Microseconds: Double?
        public var sourceConnected: Bool
        public var complete: Bool
        /// Whether pulls are held back until `openGate()`, and how many demand pulls wait at the gate.
        public var gated: Bool
        public var pullsAtGate: Int
    }

    public func status() -> Status {
        let pages = store.snapshot()
        let (isGated, atGate) = lock.withLock { (gated, gatedPulls.count) }
        return Status(
            size: size, pageSize: store.pageSize, pages: pages,
            bytesPulled: bytesPulled.load(ordering: .relaxed),
            pullsInFlight: pullsInFlight.load(ordering: .relaxed),
            demandMisses: demandMisses.load(ordering: .relaxed),
            missLatencyP50Microseconds: missLatency.percentileMicroseconds(0.5),
            missLatencyP99Microseconds: missLatency.percentileMicroseconds(0.99),
            sourceConnected: source.isConnected,
            complete: pages.isComplete, gated: isGated, pullsAtGate: atGate)
    }

    // MARK: zeros from the source's allocation map

    /// Asks the source for its base:allocation map and turns every whole page it reports as zero into a
    /// local hole marked present, so that a mostly empty image costs almost no transfer. Returns the
    /// number of pages marked.
    @discardableResult
    public func markSourceZeros(chunk: UInt64 = 1 << 30) async throws -> UInt64 {
        guard source.supportsExtents, store.count(of: .absent, in: 0 ..< store.pageCount) > 0 else { return 0 }
        var marked: UInt64 = 0
        var offset: UInt64 = 0
        while offset < size {
            let length = min(chunk, size - offset)
            var pos = offset
            for extent in try await source.extents(offset: offset, length: length) {
                let end = pos + UInt64(extent.length)
                if extent.flags.contains(.zero) {
                    marked += try markZero(from: pos, to: end)
                }
                pos = end
            }
            offset += length
        }
        if marked > 0 { logger.info("source reports \(marked) zero pages: marked present without transfer") }
        noteCompletion()
        return marked
    }

    /// Marks the whole pages inside `start ..< end` that are absent, unclaimed and not being written as
    /// present holes.
    private func markZero(from start: UInt64, to end: UInt64) throws -> UInt64 {
        let first = geometry.alignUp(start, to: store.pageSize) / store.pageSize
        let last = end >= size ? store.pageCount : end / store.pageSize
        guard first < last else { return 0 }
        var marked: UInt64 = 0
        try lock.withLock {
            for run in store.runs(of: .absent, in: first ..< last) {
                for page in run where pulls[page] == nil && !isBeingWritten(page) {
                    try store.punchHole(offset: geometry.byteOffset(ofPage: page), length: geometry.length(ofPage: page))
                    marked += store.markPresent(page ..< page + 1)
                }
            }
        }
        return marked
    }

    // MARK: BlockBackend

    public func read(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64, nonBlocking: Bool) throws -> Int {
        let pages = geometry.pages(covering: offset, length: UInt64(buffer.count))
        if nonBlocking {
            // On an event loop: only what is local and already in the page cache.
            guard store.count(of: .absent, in: pages) == 0 else { return 0 }
            return try store.readCached(into: buffer, offset: offset)
        }
        try waitUntilReadable(pages)
        try store.readData(into: buffer, offset: offset)
        return buffer.count
    }

    /// Called on a pool thread after `prepare`: a pull skips pages a client is writing at that moment,
    /// so such a page may still be absent; wait for the writer (or pull again if it gave up).
    private func waitUntilReadable(_ pages: Range<UInt64>) throws {
        for _ in 0 ..< 100_000 {
            if store.count(of: .absent, in: pages) == 0 { return }
            let beingWritten = lock.withLock {
                store.runs(of: .absent, in: pages).contains { r in writing.contains { $0.overlaps(r) } }
            }
            if beingWritten {
                usleep(100)
            } else if let pending = ensurePresent(pages, eventLoop: MultiThreadedEventLoopGroup.singleton.any()) {
                try pending.wait()
            }
        }
        throw BackendError.system(SystemError("pages \(pages) did not become readable", errno: EIO))
    }

    /// Runs a client modification of `offset ..< offset + length`: pulls never touch these pages while
    /// it runs, and they are marked local afterwards (edge pages must have been prepared first).
    private func modify(offset: UInt64, length: UInt64, _ body: () throws -> Void) throws {
        let pages = geometry.pages(covering: offset, length: length)
        for edge in partialEdgePages(offset: offset, length: length) { try waitUntilReadable(edge) }
        // Announce the write, once no pull is storing data into these pages.
        for attempt in 0... {
            let registered = lock.withLock { () -> Bool in
                if storing.contains(where: { $0.overlaps(pages) }) { return false }
                writing.append(pages)
                return true
            }
            if registered { break }
            if attempt > 1_000_000 { throw BackendError.system(SystemError("pages \(pages) stayed busy", errno: EIO)) }
            usleep(20)
        }
        defer {
            lock.withLock {
                if let i = writing.firstIndex(of: pages) { writing.remove(at: i) }
            }
        }
        try body()
        store.markLocal(pages)
    }

    public func write(from buffer: UnsafeRawBufferPointer, offset: UInt64, fua: Bool, nonBlocking: Bool) throws -> Int {
        if nonBlocking { return 0 }
        try modify(offset: offset, length: UInt64(buffer.count)) {
            try store.writeData(from: buffer, offset: offset)
        }
        if fua { try store.commit() }
        noteCompletion()
        return buffer.count
    }

    public func flush() throws {
        try store.commit()
    }

    public func trim(offset: UInt64, length: UInt64, fua: Bool) throws {
        try zero(offset: offset, length: length, mayTrim: true, fast: false, fua: fua)
    }

    public func zero(offset: UInt64, length: UInt64, mayTrim: Bool, fast: Bool, fua: Bool) throws {
        try modify(offset: offset, length: length) {
            try store.punchHole(offset: offset, length: length)
        }
        if fua { try store.commit() }
        noteCompletion()
    }

    public func cache(offset: UInt64, length: UInt64) throws {
        // The pull happened in `prepare`; nothing else to do.
    }

    public func blockStatus(offset: UInt64, length: UInt64, maxExtents: Int) throws -> [NBDExtent] {
        // Absent pages are not known yet (status 0); pulled and written pages are described by the
        // store's data file, whose holes read as zero.
        let end = offset + length
        var extents: [NBDExtent] = []
        func append(_ length: UInt64, _ flags: NBDAllocationFlags) {
            if let last = extents.last, last.flags == flags, UInt64(last.length) + length <= UInt64(UInt32.max) {
                extents[extents.count - 1].length += UInt32(length)
            } else {
                extents.append(NBDExtent(length: UInt32(length), flags: flags))
            }
        }
        var pos = offset
        for run in store.runs(of: .absent, in: geometry.pages(covering: offset, length: length)) {
            let absentStart = max(geometry.byteOffset(ofPage: run.lowerBound), offset)
            let absentEnd = min(geometry.byteRange(of: run).offset + geometry.byteRange(of: run).length, end)
            if absentStart > pos {
                for e in try localExtents(from: pos, to: absentStart, maxExtents: maxExtents) { append(UInt64(e.length), e.flags) }
            }
            if extents.count >= maxExtents { return extents }
            append(absentEnd - absentStart, [])
            pos = absentEnd
        }
        if pos < end && extents.count < maxExtents {
            for e in try localExtents(from: pos, to: end, maxExtents: maxExtents) { append(UInt64(e.length), e.flags) }
        }
        return Array(extents.prefix(maxExtents))
    }

    /// Extents of a range of pulled or written pages, from the store's holes.
    private func localExtents(from start: UInt64, to end: UInt64, maxExtents: Int) throws -> [NBDExtent] {
        try store.dataExtents(offset: start, length: end - start, maxExtents: maxExtents)
            ?? [NBDExtent(length: UInt32(end - start), flags: [])]
    }

    public func close() throws {
        source.close()
        backgroundSource?.close()
        // Waits for a store write in progress, so none runs after the store is closed.
        try? storeWriter.syncShutdownGracefully()
        try store.close()
    }
}
