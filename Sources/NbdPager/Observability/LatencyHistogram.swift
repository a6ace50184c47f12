import NIOConcurrencyHelpers
#if canImport(Glibc)
import Glibc
#endif

/// A thread-safe log-scale latency histogram: 8 buckets per power of two of microseconds (each bucket
/// about 9 % wide), so percentiles are exact to within one bucket over any range.
public final class LatencyHistogram: Sendable {
    static let bucketsPerOctave = 8.0
    static let bucketCount = 8 * 40
    private let state = NIOLockedValueBox(State())

    struct State {
        var buckets = [UInt64](repeating: 0, count: LatencyHistogram.bucketCount)
        var count: UInt64 = 0
        var maxNanoseconds: UInt64 = 0
    }

    public init() {}

    static func bucket(forNanoseconds ns: UInt64) -> Int {
        let us = Double(ns) / 1000
        guard us > 1 else { return 0 }
        return min(Int(log2(us) * bucketsPerOctave), bucketCount - 1)
    }

    /// Upper bound of a bucket in microseconds.
    static func upperBoundMicroseconds(of bucket: Int) -> Double {
        exp2(Double(bucket + 1) / bucketsPerOctave)
    }

    public func record(nanoseconds: UInt64) {
        let b = Self.bucket(forNanoseconds: nanoseconds)
        state.withLockedValue {
            $0.buckets[b] += 1
            $0.count += 1
            $0.maxNanoseconds = max($0.maxNanoseconds, nanoseconds)
        }
    }

    public var count: UInt64 { state.withLockedValue { $0.count } }

    /// The latency (µs) that `fraction` of the samples do not exceed (to within one bucket); nil
    /// without samples.
    public func percentileMicroseconds(_ fraction: Double) -> Double? {
        state.withLockedValue { s in
            guard s.count > 0 else { return nil }
            let target = max(UInt64((Double(s.count) * fraction).rounded(.up)), 1)
            var seen: UInt64 = 0
            for (i, n) in s.buckets.enumerated() where n > 0 {
                seen += n
                if seen >= target {
                    return min(Self.upperBoundMicroseconds(of: i), Double(s.maxNanoseconds) / 1000)
                }
            }
            return Double(s.maxNanoseconds) / 1000
        }
    }
}
