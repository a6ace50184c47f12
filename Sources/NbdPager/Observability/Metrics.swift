import Atomics

/// A latency histogram with fixed Prometheus buckets, recorded with two atomic adds (the sample's
/// bucket and the sum), so the request path never takes a lock for it. Cumulative counts are
/// computed when it is read.
public final class BucketHistogram: Sendable {
    /// Upper bounds in seconds: 10 µs to 10 s.
    public static let bounds: [Double] = [
        0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
        0.1, 0.25, 0.5, 1, 2.5, 5, 10,
    ]
    static let boundsNanoseconds: [UInt64] = bounds.map { UInt64(($0 * 1e9).rounded()) }

    private let buckets: [ManagedAtomic<UInt64>]   // one per bound, plus +Inf
    private let sumNanoseconds = ManagedAtomic<UInt64>(0)

    public init() {
        buckets = (0 ... Self.bounds.count).map { _ in ManagedAtomic<UInt64>(0) }
    }

    public func record(nanoseconds: UInt64) {
        var i = 0
        let b = Self.boundsNanoseconds
        while i < b.count && nanoseconds > b[i] { i += 1 }
        buckets[i].wrappingIncrement(ordering: .relaxed)
        sumNanoseconds.wrappingIncrement(by: nanoseconds, ordering: .relaxed)
    }

    /// Cumulative counts per bound (the last is +Inf, the total), and the sum in seconds.
    public func snapshot() -> (cumulative: [UInt64], sumSeconds: Double) {
        var running: UInt64 = 0
        let cumulative = buckets.map { b -> UInt64 in
            running &+= b.load(ordering: .relaxed)
            return running
        }
        return (cumulative, Double(sumNanoseconds.load(ordering: .relaxed)) / 1e9)
    }

    public var count: UInt64 { buckets.reduce(0) { $0 &+ $1.load(ordering: .relaxed) } }
}

/// Per-command request counts of one export: requests, bytes, errors and a latency histogram each,
/// from the request's arrival to its reply being queued. What `status` shows under "requests" and
/// the metrics endpoint as `nbd_umemd_requests_total` and friends.
public final class RequestStats: Sendable {
    public static let commands: [NBDCommand] = [.read, .write, .flush, .trim, .writeZeroes, .cache, .blockStatus]

    struct PerCommand: Sendable {
        let requests = ManagedAtomic<UInt64>(0)
        let bytes = ManagedAtomic<UInt64>(0)
        let errors = ManagedAtomic<UInt64>(0)
        let latency = BucketHistogram()
    }

    private let table: [PerCommand]

    public init() { table = Self.commands.map { _ in PerCommand() } }

    static func index(_ command: NBDCommand) -> Int? {
        switch command {
        case .read: return 0
        case .write: return 1
        case .flush: return 2
        case .trim: return 3
        case .writeZeroes: return 4
        case .cache: return 5
        case .blockStatus: return 6
        case .disconnect: return nil
        }
    }

    /// A request answered `nanoseconds` after it arrived (an error reply when `failed`).
    public func record(_ command: NBDCommand, length: UInt32, nanoseconds: Int64, failed: Bool) {
        guard let i = Self.index(command) else { return }
        let c = table[i]
        c.requests.wrappingIncrement(ordering: .relaxed)
        if failed {
            c.errors.wrappingIncrement(ordering: .relaxed)
        } else {
            c.bytes.wrappingIncrement(by: UInt64(length), ordering: .relaxed)
        }
        c.latency.record(nanoseconds: UInt64(max(0, nanoseconds)))
    }

    /// A request refused before it ran (invalid, read-only export, out of range...).
    public func rejected(_ command: NBDCommand?) {
        guard let command, let i = Self.index(command) else { return }
        table[i].requests.wrappingIncrement(ordering: .relaxed)
        table[i].errors.wrappingIncrement(ordering: .relaxed)
    }

    public struct Counts: Sendable, Equatable {
        public var requests: UInt64, bytes: UInt64, errors: UInt64
    }

    public func counts(_ command: NBDCommand) -> Counts {
        guard let i = Self.index(command) else { return Counts(requests: 0, bytes: 0, errors: 0) }
        let c = table[i]
        return Counts(requests: c.requests.load(ordering: .relaxed), bytes: c.bytes.load(ordering: .relaxed),
                      errors: c.errors.load(ordering: .relaxed))
    }

    func latency(_ command: NBDCommand) -> BucketHistogram? { Self.index(command).map { table[$0].latency } }

    /// The status object: {"read": {"requests": N, "bytes": N, "errors": N}, ...} for commands seen.
    public var statusValue: JSONValue {
        .object(Self.commands.compactMap { command -> (String, JSONValue)? in
            let c = counts(command)
            guard c.requests > 0 else { return nil }
            return (Self.name(command), .object([("requests", .unsigned(c.requests)), ("bytes", .unsigned(c.bytes)),
                                                 ("errors", .unsigned(c.errors))]))
        })
    }

    public static func name(_ command: NBDCommand) -> String {
        switch command {
        case .read: return "read"
        case .write: return "write"
        case .flush: return "flush"
        case .trim: return "trim"
        case .writeZeroes: return "write_zeroes"
        case .cache: return "cache"
        case .blockStatus: return "block_status"
        case .disconnect: return "disconnect"
        }
    }
}
