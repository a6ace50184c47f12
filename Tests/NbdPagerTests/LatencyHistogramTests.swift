import XCTest
@testable import NbdPager

final class LatencyHistogramTests: XCTestCase {
    func testPercentiles() {
        let h = LatencyHistogram()
        XCTAssertNil(h.percentileMicroseconds(0.5), "no samples, no percentile")
        for us in 1 ... 1000 { h.record(nanoseconds: UInt64(us) * 1000) }
        XCTAssertEqual(h.count, 1000)
        XCTAssertEqual(h.percentileMicroseconds(0.5) ?? 0, 500, accuracy: 1)
        XCTAssertEqual(h.percentileMicroseconds(0.99) ?? 0, 990, accuracy: 1)
        XCTAssertEqual(h.percentileMicroseconds(1) ?? 0, 1000, accuracy: 1)
    }

    func testNeverAboveTheLargestSample() {
        let h = LatencyHistogram()
        h.record(nanoseconds: 1_234_567)
        XCTAssertEqual(h.percentileMicroseconds(0.99) ?? 0, 1234.567, accuracy: 1.3)
        XCTAssertLessThanOrEqual(h.percentileMicroseconds(0.99) ?? .infinity, 1234.567)
    }

    func testOutOfRangeSamplesAreKept() {
        let h = LatencyHistogram()
        h.record(nanoseconds: 0)
        h.record(nanoseconds: .max)
        XCTAssertEqual(h.count, 2)
        XCTAssertEqual(h.percentileMicroseconds(1) ?? 0, 3_600_000_000, accuracy: 3_600_000)
    }

    func testConcurrentRecording() {
        let h = LatencyHistogram()
        DispatchQueue.concurrentPerform(iterations: 8) { i in
            for n in 0 ..< 1000 { h.record(nanoseconds: UInt64(10_000 + i * 1000 + n)) }
        }
        XCTAssertEqual(h.count, 8000)
    }
}
