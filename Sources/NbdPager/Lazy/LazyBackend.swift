import Atomics
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// An export whose pages are pulled on first access from a remote NBD source into a local `PageStore`:
/// the `BlockBackend` face of a stack of small pieces, in the spirit of nbdkit's filters:
///
///   `PullEngine` (single flight, coalescing, demand budget, gate, priorities, direct replies)
///     → `SourceMapping` (export page → source range; `IdentityMapping` by default)
///   `LazyStore` (pulled data → store, zero pages → holes, present marking; `WriteExclusion` keeps
///     client writes and pulls off each other's pages)
///   `ZeroMapImport` (the source's zero extents → present holes)
///
/// Invariants (DESIGN §3): page state only moves forward; concurrent misses on one page share one
/// source read; a pull that completes after a client wrote a page never overwrites it; data reaches
/// stable storage before the state that marks it present (`PageStore.commit`, periodically through
/// `startPeriodicCommit`, at once on FLUSH/FUA).
///
/// `eventLoop` is this export's own loop (periodic commit, reads that must wait on a pull from a pool
/// thread) and its clock; `threadPool` runs its blocking chores (commits, closing the source).
public final class LazyBackend: BlockBackend, @unchecked Sendable {
    let store: PageStore
    let lazyStore: LazyStore
    let engine: PullEngine
    public let mapping: any SourceMapping
    public let capabilities: BackendCapabilities
    let eventLoop: any EventLoop
    private let threadPool: NIOThreadPool
    private let storeWriter: NIOThreadPool
    private let ownsStoreWriter: Bool
    private let logger: Logger
    private let commitTask = NIOLockedValueBox<RepeatedTask?>(nil)
    private let commitRunning = ManagedAtomic<Bool>(false)
    private let closed = ManagedAtomic<Bool>(false)
    /// How long `close` waits for pulls in flight to be stored before it closes the source anyway.
    let closeDrainTimeout: Duration
    /// Periodic commits handed to the thread pool so far, and a hook told when each ends (tests).
    let periodicCommits = ManagedAtomic<Int>(0)
    /// Client WRITE requests served, and their bytes.
    let writes = ManagedAtomic<UInt64>(0)
    let bytesWritten = ManagedAtomic<UInt64>(0)
    let commitObserver = NIOLockedValueBox<(@Sendable (Result<Void, any Error>) -> Void)?>(nil)

    /// Default bound on the data of started demand pulls not yet in the store (memory stays bounded).
    public static let defaultMaxBytesInFlight: UInt64 = 64 << 20

    public var size: UInt64 { store.size }
    public var source: any RemoteSource { engine.source }
    public var backgroundSource: (any RemoteSource)? { engine.backgroundSource }
    public var fetchSize: UInt64 { engine.fetchSize }
    var geometry: PageGeometry { store.geometry }

    /// - Parameters:
    ///   - storeWriter: the one thread that stores large pulls; nil: the export starts its own.
    ///   - missWindow: while a background pull runs, a demand miss pulls the absent pages of the
    ///     aligned window of this size around what was asked (0: only the pages asked for).
    public init(store: PageStore, source: any RemoteSource, fetchSize: UInt64, logger: Logger,
                eventLoop: any EventLoop, threadPool: NIOThreadPool,
                mapping: any SourceMapping = IdentityMapping(),
                maxBytesInFlight: UInt64 = LazyBackend.defaultMaxBytesInFlight,
                backgroundSource: (any RemoteSource)? = nil, gated: Bool = false,
                storeWriter: NIOThreadPool? = nil, closeDrainTimeout: Duration = .seconds(2),
                completionArmed: Bool = true, missWindow: UInt64 = 0) {
        self.store = store
        self.closeDrainTimeout = closeDrainTimeout
        self.mapping = mapping
        self.eventLoop = eventLoop
        self.threadPool = threadPool
        self.logger = logger
        if let storeWriter {
            self.storeWriter = storeWriter
            self.ownsStoreWriter = false
        } else {
            self.storeWriter = NIOThreadPool(numberOfThreads: 1)
            self.storeWriter.start()
            self.ownsStoreWriter = true
        }
        let completion = Completion()
        self.lazyStore = LazyStore(store: store, completionArmed: completionArmed) { completion.fire() }
        self.engine = PullEngine(store: lazyStore, mapping: mapping, source: source, backgroundSource: backgroundSource,
                                 fetchSize: fetchSize, maxBytesInFlight: maxBytesInFlight, gated: gated,
                                 storeWriter: self.storeWriter, missWindow: missWindow)
        self.capabilities = BackendCapabilities(
            writable: true, canTrim: true, canZero: true, canFastZero: true, canCache: true,
            canMultiConn: true, inlineSafe: false, pendingReads: true)
        completion.set { [weak self] in self?.everyPageLocal() }
    }

    /// Breaks the init-order knot: the store's completion callback needs `self`.
    private final class Completion: Sendable {
        private let action = NIOLockedValueBox<(@Sendable () -> Void)?>(nil)
        func set(_ a: @escaping @Sendable () -> Void) { action.withLockedValue { $0 = a } }
        func fire() { action.withLockedValue { $0 }?() }
    }

    /// Says so once, and closes the source connections (on the thread pool: this may run on one of the
    /// source's own threads, a pull stored on arrival).
    private func everyPageLocal() {
        logger.info("every page is local; the source is no longer needed")
        let sources: [any RemoteSource] = [engine.source] + (engine.backgroundSource.map { [$0] } ?? [])
        threadPool.submit { _ in sources.forEach { $0.close() } }
    }

    // MARK: making ranges readable

    /// Pulls whatever is absent in `offset ..< offset + length` (for a write: only the partial pages at
    /// its edges, since whole pages are simply overwritten). Nil when nothing needs pulling.
    public func prepare(offset: UInt64, length: UInt64, forWrite: Bool, eventLoop: any EventLoop) -> EventLoopFuture<Void>? {
        let pages = geometry.pages(covering: offset, length: length)
        guard !pages.isEmpty else { return nil }
        if forWrite {
            let futures = partialEdgePages(offset: offset, length: length).compactMap {
                engine.ensurePresent($0, eventLoop: eventLoop)
            }
            return futures.isEmpty ? nil : EventLoopFuture.andAllSucceed(futures, on: eventLoop)
        }
        return engine.demand(pages, eventLoop: eventLoop)
    }

    public func pendingRead(offset: UInt64, length: UInt64, eventLoop: any EventLoop,
                            early: (@Sendable (ByteBuffer) -> Void)?) -> EventLoopFuture<ByteBuffer>? {
        engine.pendingRead(offset: offset, length: length, eventLoop: eventLoop, early: early)
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

    /// Arms "every page local" (see `LazyStore.completionArmed`) and reports it at once if it holds.
    public func armCompletion() {
        lazyStore.completionArmed.store(true, ordering: .relaxed)
        lazyStore.noteChange()
    }

    /// Whether every page is local (and completion is armed).
    public var isComplete: Bool { lazyStore.isComplete }

    /// Makes the mapping, then every data write and page state made so far, durable.
    func commit() throws {
        try mapping.commit()
        try store.commit()
    }

    // MARK: gate

    /// Whether pulls are held back (see `openGate`).
    public var isGated: Bool { engine.isGated }

    /// Lets pulls reach the source from now on, and starts the ones that were held back (demand misses
    /// that have been waiting). Returns how many were held; 0 if the gate was already open.
    @discardableResult
    public func openGate() -> Int { engine.openGate() }

    // MARK: zero map

    /// Asks the source for its base:allocation map and turns every whole page it reports as zero into a
    /// local hole marked present. Returns the number of pages marked.
    @discardableResult
    public func markSourceZeros(chunk: UInt64 = 1 << 30) async throws -> UInt64 {
        let marked = try await ZeroMapImport(source: engine.source, mapping: mapping, store: lazyStore, chunk: chunk).run()
        if marked > 0 { logger.info("source reports \(marked) zero pages: marked present without transfer") }
        return marked
    }

    // MARK: periodic commit

    /// Commits the page store every `interval` (FLUSH and FUA commit at once): scheduled on this
    /// export's event loop, run on its thread pool, never two at once. Stopped by `close()`; calling it
    /// again replaces the schedule.
    public func startPeriodicCommit(every interval: TimeAmount = .seconds(1)) {
        let task = eventLoop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { [weak self] _ in
            self?.commitInBackground()
        }
        commitTask.withLockedValue { old in
            old?.cancel()
            old = task
        }
    }

    func commitInBackground() {
        guard !closed.load(ordering: .relaxed),
              commitRunning.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged else { return }
        periodicCommits.wrappingIncrement(ordering: .relaxed)
        threadPool.submit { [self] state in
            defer { commitRunning.store(false, ordering: .relaxed) }
            guard state == .active, !closed.load(ordering: .relaxed) else { return }
            let result = Result { try commit() }
            // A store closed meanwhile (shutdown) committed on closing: nothing to report.
            if case .failure(let error) = result, !closed.load(ordering: .relaxed) {
                logger.error("committing the page store: \(error)")
            }
            commitObserver.withLockedValue { $0 }?(result)
        }
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
        for _ in 0 ..< 10_000 {
            let absent = store.runs(of: .absent, in: pages)
            if absent.isEmpty { return }
            if try lazyStore.exclusion.waitForWriters(absent) { continue }
            guard let pending = engine.ensurePresent(pages, eventLoop: eventLoop) else { continue }
            guard !eventLoop.inEventLoop else {
                throw BackendError.system(SystemError("pages \(pages) are absent on a non-blocking path", errno: EIO))
            }
            try pending.wait()
        }
        throw BackendError.system(SystemError("pages \(pages) did not become readable", errno: EIO))
    }

    /// Runs a client modification of `offset ..< offset + length`: pulls never touch these pages while
    /// it runs, and they are marked local afterwards (edge pages must have been prepared first).
    private func modify(offset: UInt64, length: UInt64, _ body: () throws -> Void) throws {
        let pages = geometry.pages(covering: offset, length: length)
        for edge in partialEdgePages(offset: offset, length: length) { try waitUntilReadable(edge) }
        try lazyStore.modify(pages, body)
    }

    public func write(from buffer: UnsafeRawBufferPointer, offset: UInt64, fua: Bool, nonBlocking: Bool) throws -> Int {
        if nonBlocking { return 0 }
        try modify(offset: offset, length: UInt64(buffer.count)) {
            try store.writeData(from: buffer, offset: offset)
        }
        if fua { try commit() }
        writes.wrappingIncrement(ordering: .relaxed)
        bytesWritten.wrappingIncrement(by: UInt64(buffer.count), ordering: .relaxed)
        lazyStore.noteChange()
        return buffer.count
    }

    public func flush() throws {
        try commit()
    }

    public func trim(offset: UInt64, length: UInt64, fua: Bool) throws {
        try zero(offset: offset, length: length, mayTrim: true, fast: false, fua: fua)
    }

    public func zero(offset: UInt64, length: UInt64, mayTrim: Bool, fast: Bool, fua: Bool) throws {
        try modify(offset: offset, length: length) {
            try store.punchHole(offset: offset, length: length)
        }
        if fua { try commit() }
        lazyStore.noteChange()
    }

    public func cache(offset: UInt64, length: UInt64) throws {
        // The pull happened in `prepare`; nothing else to do.
    }

    /// Waits (at most `closeDrainTimeout`) for the pulls in flight, so their data is stored and the
    /// source connections close with nothing in flight; then closes the source and the store. Call it
    /// after the background pull has stopped and the clients are gone; it blocks.
    public func close() throws {
        closed.store(true, ordering: .relaxed)
        commitTask.withLockedValue { $0?.cancel(); $0 = nil }
        if !engine.drain(timeout: closeDrainTimeout) {
            logger.notice("closing with \(engine.pullsInFlight.load(ordering: .relaxed)) pulls still in flight after \(closeDrainTimeout)")
        }
        engine.source.close()
        engine.backgroundSource?.close()
        // Waits for a store write in progress, so none runs after the store is closed.
        if ownsStoreWriter { try? storeWriter.syncShutdownGracefully() }
        var mappingError: (any Error)?
        do { try mapping.commit() } catch { mappingError = error }
        try store.close()
        if let mappingError { throw mappingError }
    }
}
