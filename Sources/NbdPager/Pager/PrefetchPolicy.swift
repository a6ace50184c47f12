import NIOCore

/// What a lazy export's background pull needs of it: page states, background pulls, and the demand
/// signals it yields to. `LazyBackend` conforms; tests may plug in anything else.
public protocol BackgroundPullTarget: AnyObject, Sendable, PageStateView {
    var pageGeometry: PageGeometry { get }
    func pageCounts() -> PageStoreSnapshot
    /// Starts pulls for the absent pages of `pages` no pull covers yet (below demand: through the
    /// background source, outside the demand budget); returns them.
    func startBackground(_ pages: Range<UInt64>, eventLoop: any EventLoop) -> [BackgroundPull]
    /// Whether a client waits for the source right now.
    var demandOutstanding: Bool { get }
    func setDemandObserver(_ o: (any DemandObserver)?)
    /// Demand misses pull only their own pages (true, while the background pull brings the rest) or
    /// whole fetch windows (false).
    func setDemandPagesOnly(_ pagesOnly: Bool)
}

/// Which pages the background pull takes next: pure (no I/O, no locks, no clock). Hints first (the hot
/// list, then windows around recent misses in adaptive mode), then a sweep over the absent pages from a
/// cursor; pages not absent are skipped.
public struct PrefetchPolicy: Sendable {
    public let pageCount: UInt64
    /// Adaptive: move the sweep to each miss and pull a window around it that grows while misses are
    /// sequential and shrinks when they scatter.
    public let adaptive: Bool
    public let minWindow: UInt64
    public let maxWindow: UInt64
    /// Page ranges to pull before the sweep, most urgent first.
    public private(set) var hints = CircularBuffer<Range<UInt64>>()
    public private(set) var cursor: UInt64 = 0
    /// The pre-paging window (pages) and where the last miss ended.
    public private(set) var window: UInt64
    private var lastMissEnd: UInt64?

    /// `minWindow` and `maxWindow` in pages; `hotList` as page ranges.
    public init(pageCount: UInt64, adaptive: Bool, minWindow: UInt64, maxWindow: UInt64, hotList: [Range<UInt64>] = []) {
        self.pageCount = pageCount
        self.adaptive = adaptive
        self.minWindow = max(1, minWindow)
        self.maxWindow = max(self.minWindow, maxWindow)
        self.window = self.minWindow
        for pages in hotList where !pages.isEmpty { hints.append(pages) }
    }

    /// A demand miss on `pages` (adaptive mode only moves things).
    public mutating func noteMiss(_ pages: Range<UInt64>) {
        guard adaptive else { return }
        // Sequential misses (this one starts within the window after the last one) grow the window;
        // scattered ones shrink it.
        if let end = lastMissEnd, pages.lowerBound >= end, pages.lowerBound < end + window {
            window = min(window * 2, maxWindow)
        } else {
            window = max(window / 2, minWindow)
        }
        lastMissEnd = pages.upperBound
        let back = min(pages.lowerBound, window / 4)
        let around = pages.lowerBound - back ..< min(pageCount, pages.upperBound + window)
        hints.prepend(around)
        while hints.count > 64 { hints.removeLast() }
        // The sweep goes on after the window: neighbours of hot pages come first.
        cursor = around.upperBound < pageCount ? around.upperBound : 0
    }

    /// The next page range to pull (at most `batchPages`): a hint, or the next absent run of the sweep.
    /// Nil when the whole export was scanned (`scanned` pages, reset by the caller per round) without
    /// finding an absent page.
    public mutating func nextRange(batchPages: UInt64, states: some PageStateView, scanned: inout UInt64) -> Range<UInt64>? {
        let batchPages = max(1, batchPages)
        while let hint = hints.first {
            if let run = states.runs(of: .absent, in: hint).first {
                let take = run.lowerBound ..< min(run.upperBound, run.lowerBound + batchPages)
                hints[hints.startIndex] = take.upperBound ..< hint.upperBound
                if hints.first?.isEmpty == true { hints.removeFirst() }
                return take
            }
            hints.removeFirst()
        }
        while scanned < pageCount {
            guard let first = states.firstPage(with: .absent, from: cursor) else {
                if cursor == 0 { return nil }
                scanned += pageCount - cursor
                cursor = 0
                continue
            }
            let end = min(pageCount, first + batchPages)
            guard let run = states.runs(of: .absent, in: first ..< end).first else { return nil }
            scanned += run.upperBound - cursor
            cursor = run.upperBound < pageCount ? run.upperBound : 0
            return run
        }
        return nil
    }
}

/// Token bucket for `maxRate`: pulls may start while it is positive and take their size out of it; it
/// starts empty and holds at most one batch, so neither the start nor a pause turns into a burst. Pure:
/// the caller passes the time.
public struct TokenBucket: Sendable {
    public let rate: UInt64
    public let capacity: Double
    public private(set) var tokens: Double = 0
    private var last: NIODeadline

    public init(rate: UInt64, capacity: UInt64, now: NIODeadline) {
        self.rate = rate
        self.capacity = Double(capacity)
        self.last = now
    }

    public mutating func refill(_ now: NIODeadline) {
        let elapsed = Double((now - last).nanoseconds) / 1e9
        last = now
        tokens = min(capacity, tokens + elapsed * Double(rate))
    }

    public mutating func take(_ bytes: UInt64) { tokens -= Double(bytes) }

    /// Empties the bucket (a (re)start begins at the rate, not with a burst).
    public mutating func reset(_ now: NIODeadline) {
        tokens = 0
        last = now
    }

    /// How long until the bucket is positive again.
    public var wait: TimeAmount { .nanoseconds(Int64((-tokens / Double(rate) + 0.001) * 1e9)) }
}
