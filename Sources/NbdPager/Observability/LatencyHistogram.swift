import Histogram
import NIOConcurrencyHelpers

/// A thread-safe latency histogram (HdrHistogram): nanoseconds from 1 µs to one hour with three
/// significant digits, so percentiles are exact to 0.1 % over that whole range. Longer samples count
/// as one hour.
public final class LatencyHistogram: Sendable {
    static let lowest: UInt64 = 1_000
    static let highest: UInt64 = 3_600 * 1_000_000_000
    private let state = NIOLockedValueBox(
        Histogram<UInt64>(lowestDiscernibleValue: lowest, highestTrackableValue: highest, numberOfSignificantValueDigits: .three))

    public init() {}

    public func record(nanoseconds: UInt64) {
        let value = min(nanoseconds, Self.highest)
        state.withLockedValue { _ = $0.record(value) }
    }

    public var count: UInt64 { state.withLockedValue { $0.totalCount } }

    /// The latency (µs) that `fraction` of the samples do not exceed (never more than the largest
    /// sample); nil without samples.
    public func percentileMicroseconds(_ fraction: Double) -> Double? {
        state.withLockedValue { h in
            guard h.totalCount > 0 else { return nil }
            return Double(h.valueAtPercentile(min(max(fraction, 0), 1) * 100)) / 1000
        }
    }
}
