import NIOCore

extension LazyBackend {
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
        /// Whether pulls are held back until `openGate()`, and how many pulls wait at the gate.
        public var gated: Bool
        public var pullsAtGate: Int
        /// Client WRITE requests served since start, and their bytes.
        public var writes: UInt64
        public var bytesWritten: UInt64
        /// Source outages and successful reconnects since start.
        public var sourceOutages: UInt64
        public var sourceReconnects: UInt64
        /// Store commits that made something durable.
        public var commits: UInt64
    }

    /// Demand-miss latency and store commit duration, in fixed buckets (metrics).
    public func histograms() -> [(name: String, help: String, histogram: BucketHistogram)] {
        [("demand_miss_duration_seconds", "Demand misses: from the miss to the data from the source.", engine.missLatencyBuckets),
         ("store_commit_duration_seconds", "Store commits that made something durable (data sync, map write and sync).", store.commitDuration)]
    }

    public func status() -> Status {
        let pages = store.snapshot()
        return Status(
            size: size, pageSize: store.pageSize, pages: pages,
            bytesPulled: engine.bytesPulled.load(ordering: .relaxed),
            pullsInFlight: engine.pullsInFlight.load(ordering: .relaxed),
            demandMisses: engine.demandMisses.load(ordering: .relaxed),
            missLatencyP50Microseconds: engine.missLatency.percentileMicroseconds(0.5),
            missLatencyP99Microseconds: engine.missLatency.percentileMicroseconds(0.99),
            sourceConnected: engine.source.isConnected,
            complete: lazyStore.completionArmed.load(ordering: .relaxed) && pages.isComplete,
            gated: engine.isGated, pullsAtGate: engine.pullsAtGate,
            writes: writes.load(ordering: .relaxed), bytesWritten: bytesWritten.load(ordering: .relaxed),
            sourceOutages: (engine.source as? ReconnectingSource)?.outageCount ?? 0,
            sourceReconnects: (engine.source as? ReconnectingSource)?.reconnectCount ?? 0,
            commits: store.commitDuration.count)
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
}

// The background pull drives the lazy export through this interface only.
extension LazyBackend: BackgroundPullTarget {
    public func state(of page: UInt64) -> PageState { store.state(of: page) }
    public func runs(of state: PageState, in pages: Range<UInt64>) -> [Range<UInt64>] { store.runs(of: state, in: pages) }
    public func firstPage(with state: PageState, from page: UInt64) -> UInt64? { store.firstPage(with: state, from: page) }
    public func count(of state: PageState, in pages: Range<UInt64>) -> UInt64 { store.count(of: state, in: pages) }
    public var pageGeometry: PageGeometry { store.geometry }
    public func pageCounts() -> PageStoreSnapshot { store.snapshot() }

    public func startBackground(_ pages: Range<UInt64>, eventLoop: any EventLoop) -> [BackgroundPull] {
        engine.startBackground(pages, eventLoop: eventLoop)
    }

    public var demandOutstanding: Bool { engine.demandOutstanding }
    public func setDemandObserver(_ o: (any DemandObserver)?) { engine.setDemandObserver(o) }
    public func setDemandPagesOnly(_ pagesOnly: Bool) { engine.setDemandPagesOnly(pagesOnly) }
}
