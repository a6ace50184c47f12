import NIOCore

/// When a connection's event loop keeps spinning after a request instead of sleeping (not part of the
/// connection's lifecycle: it only trades CPU for wake-up latency).
///
/// After a read burst that brought exactly one small request, answered with nothing else in flight
/// (a page fault, a QD1 reader), the loop can keep polling (epoll_wait with a zero timeout, via
/// re-queued tasks) for `window`, so the client's next request is picked up without the thread being
/// woken again. Deep queues and bulk transfers keep the CPU for the client instead. Polling stops by
/// itself once the connection has been quiet for the window.
///
/// Polling only pays when the client's next request comes soon and a CPU is free to spin on: through
/// nbdfuse and a loop device a swap-in comes every 120 µs or so and the spinning takes a CPU the kernel
/// and FUSE need; on two CPUs even a fast QD1 client can lose by it. So the connection measures: it
/// times the cycle of a latency-bound client (one lone small request to the next) over `probeCycles`
/// cycles with polling on and as many with it off, in alternating blocks of `blockCycles` (so that a
/// change of load during the measurement, such as a swapping workload moving from one phase to the
/// next, weighs on both sides alike), and keeps polling only if the median cycle with it is at least
/// `requiredGain` shorter. The verdict holds for `holdCycles` cycles, then both are measured again, so
/// a change of client or load is followed. Pure bookkeeping; the handler runs the ticks.
struct BusyPoll {
    /// Requests up to this length count as small (a page, not a bulk copy).
    static let requestLimit: UInt32 = 64 * 1024
    /// Cycles timed with polling on, and as many with it off, before a verdict.
    static let probeCycles = 64
    /// Lone requests in a row polled for (or not) while measuring, before the other side's turn.
    static let blockCycles = 8
    /// Cycles a verdict holds before the next measurement.
    static let holdCycles = 4096
    /// Polling is kept when the median cycle with it is at least this much shorter.
    static let requiredGain = 0.05
    /// Gaps between lone requests count up to this long (idleness is not worth timing).
    static let maxCycle: TimeAmount = .milliseconds(1)

    enum Phase: Equatable {
        /// Timing cycles; the current block polls (`true`) or not.
        case measuring(polling: Bool)
        /// A verdict, and the cycles it has held.
        case holding(polling: Bool, cycles: Int)
    }

    /// Zero disables polling.
    let window: TimeAmount
    /// Whether a poll loop is running.
    private(set) var polling = false
    private(set) var phase = Phase.measuring(polling: true)
    /// The median cycle of the last measurement with polling on, then off (nanoseconds).
    private(set) var lastMedians: (on: Int64, off: Int64)?
    private var lastRequestAt = NIODeadline.distantPast
    /// When the previous lone small request arrived (distant past: the chain was broken).
    private var lastLoneAt = NIODeadline.distantPast
    /// The cycles of the current measurement that started with polling on, and with it off.
    private var onCycles: [Int64] = []
    private var offCycles: [Int64] = []
    /// Lone requests seen in the current measurement.
    private var measured = 0
    /// Requests started since the last read burst completed, and whether each was small.
    private var batchRequests = 0
    private var batchAllSmall = true

    init(window: TimeAmount) {
        self.window = window
    }

    /// Whether the current phase polls after a lone small request.
    var pollsNow: Bool {
        switch phase {
        case .measuring(let on), .holding(let on, _): return on
        }
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
        guard window > .zero, batchRequests > 0 else { return false }
        guard batchRequests == 1 && batchAllSmall && inFlight == 0 else {
            lastLoneAt = .distantPast  // a deep queue or a bulk request: not a latency-bound cycle
            return false
        }
        let t = now()
        // A longer gap counts as `maxCycle`: polling could not have shortened it either (so a client
        // whose requests come rarely, or round-robin over several connections, turns polling off).
        if lastLoneAt != .distantPast { record(cycle: min(t - lastLoneAt, Self.maxCycle)) }
        lastLoneAt = t
        if case .measuring = phase {
            phase = .measuring(polling: (measured / Self.blockCycles) % 2 == 0)
            measured += 1
        }
        guard pollsNow else { return false }
        lastRequestAt = t
        guard !polling else { return false }
        polling = true
        return true
    }

    /// One poll tick: whether to keep polling. Stops (and records it) once the window has passed, the
    /// connection is closing or polling no longer pays.
    mutating func tick(closing: Bool, now: NIODeadline) -> Bool {
        guard !closing, pollsNow, now - lastRequestAt < window else {
            polling = false
            return false
        }
        return true
    }

    /// A cycle that ended now counts for the decision, polling or not, taken at its start.
    private mutating func record(cycle: TimeAmount) {
        switch phase {
        case .holding(let on, let held):
            if held + 1 >= Self.holdCycles {
                phase = .measuring(polling: true)
                measured = 0
            } else {
                phase = .holding(polling: on, cycles: held + 1)
            }
        case .measuring(let on):
            if on {
                if onCycles.count < Self.probeCycles { onCycles.append(cycle.nanoseconds) }
            } else if offCycles.count < Self.probeCycles {
                offCycles.append(cycle.nanoseconds)
            }
            guard onCycles.count >= Self.probeCycles, offCycles.count >= Self.probeCycles else { return }
            let medians = (on: Self.median(&onCycles), off: Self.median(&offCycles))
            lastMedians = medians
            let pays = Double(medians.on) <= Double(medians.off) * (1 - Self.requiredGain)
            phase = .holding(polling: pays, cycles: 0)
        }
    }

    /// The median of `cycles`, which it empties (keeping their storage).
    private static func median(_ cycles: inout [Int64]) -> Int64 {
        cycles.sort()
        let m = cycles[cycles.count / 2]
        cycles.removeAll(keepingCapacity: true)
        return m
    }
}
