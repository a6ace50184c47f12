import NIOCore

/// When a connection's event loop keeps spinning after a request instead of sleeping (not part of the
/// connection's lifecycle: it only trades CPU for wake-up latency).
///
/// After a read burst that brought exactly one small request, answered with nothing else in flight
/// (a page fault, a QD1 reader), the loop keeps polling (epoll_wait with a zero timeout, via re-queued
/// tasks) for `window`, so the client's next request is picked up without the thread being woken
/// again. Deep queues and bulk transfers keep the CPU for the client instead. Polling stops by itself
/// once the connection has been quiet for the window. Pure bookkeeping; the handler runs the ticks.
struct BusyPoll {
    /// Requests up to this length count as small (a page, not a bulk copy).
    static let requestLimit: UInt32 = 64 * 1024

    /// Zero disables polling.
    let window: TimeAmount
    private(set) var polling = false
    private var lastRequestAt = NIODeadline.distantPast
    /// Requests started since the last read burst completed, and whether each was small.
    private var batchRequests = 0
    private var batchAllSmall = true

    init(window: TimeAmount) {
        self.window = window
    }

    mutating func requestParsed(length: UInt32) {
        batchRequests += 1
        if length > Self.requestLimit { batchAllSmall = false }
    }

    /// A read burst completed. True when a poll loop should start now (none is running).
    mutating func readComplete(inFlight: Int, now: @autoclosure () -> NIODeadline) -> Bool {
        defer {
            batchRequests = 0
            batchAllSmall = true
        }
        guard window > .zero && batchRequests == 1 && batchAllSmall && inFlight == 0 else { return false }
        lastRequestAt = now()
        guard !polling else { return false }
        polling = true
        return true
    }

    /// One poll tick: whether to keep polling. Stops (and records it) once the window has passed or the
    /// connection is closing.
    mutating func tick(closing: Bool, now: NIODeadline) -> Bool {
        guard !closing, now - lastRequestAt < window else {
            polling = false
            return false
        }
        return true
    }
}
