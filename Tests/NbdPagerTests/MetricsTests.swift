import XCTest
@testable import NbdPager

final class MetricsTests: XCTestCase {
    func testBucketHistogramIsCumulative() {
        let h = BucketHistogram()
        h.record(nanoseconds: 5_000)          // <= 10 µs
        h.record(nanoseconds: 10_000)         // exactly on the first bound
        h.record(nanoseconds: 300_000)        // <= 500 µs
        h.record(nanoseconds: 60_000_000_000) // past 10 s: +Inf only
        let (cumulative, sum) = h.snapshot()
        XCTAssertEqual(cumulative.count, BucketHistogram.bounds.count + 1)
        XCTAssertEqual(cumulative[0], 2)
        XCTAssertEqual(cumulative[BucketHistogram.bounds.firstIndex(of: 0.0005)!], 3)
        XCTAssertEqual(cumulative[BucketHistogram.bounds.count - 1], 3)
        XCTAssertEqual(cumulative.last, 4)
        XCTAssertEqual(sum, 60.000315, accuracy: 1e-9)
        XCTAssertEqual(h.count, 4)
    }

    func testRequestStats() {
        let s = RequestStats()
        s.record(.read, length: 4096, nanoseconds: 1000, failed: false)
        s.record(.read, length: 4096, nanoseconds: 1000, failed: true)
        s.rejected(.write)
        s.record(.disconnect, length: 0, nanoseconds: 1, failed: false)
        XCTAssertEqual(s.counts(.read), .init(requests: 2, bytes: 4096, errors: 1))
        XCTAssertEqual(s.counts(.write), .init(requests: 1, bytes: 0, errors: 1))
        XCTAssertEqual(s.latency(.read)?.count, 2)
        XCTAssertEqual(s.statusValue, .object([
            ("read", .object([("requests", .unsigned(2)), ("bytes", .unsigned(4096)), ("errors", .unsigned(1))])),
            ("write", .object([("requests", .unsigned(1)), ("bytes", .unsigned(0)), ("errors", .unsigned(1))])),
        ]))
    }

    func testTextFormat() {
        var p = PrometheusText()
        p.add("a_total", .counter, help: "A\nB", labels: [("export", "x\"y\\z\n")], value: 3)
        p.add("g", .gauge, help: "G", value: 0.5)
        p.add("a_total", .counter, help: "A\nB", labels: [("export", "")], value: 1e18)
        let h = BucketHistogram()
        h.record(nanoseconds: 2_000_000)
        p.histogram("d_seconds", help: "D", labels: [("export", "")], h)
        let lines = p.text.split(separator: "\n").map(String.init)
        XCTAssertEqual(Array(lines.prefix(7)), [
            "# HELP a_total A\\nB", "# TYPE a_total counter",
            "a_total{export=\"x\\\"y\\\\z\\n\"} 3", "a_total{export=\"\"} 1e+18",
            "# HELP g G", "# TYPE g gauge", "g 0.5",
        ])
        XCTAssertTrue(lines.contains("d_seconds_bucket{export=\"\",le=\"0.001\"} 0"))
        XCTAssertTrue(lines.contains("d_seconds_bucket{export=\"\",le=\"0.0025\"} 1"))
        XCTAssertTrue(lines.contains("d_seconds_bucket{export=\"\",le=\"+Inf\"} 1"))
        XCTAssertTrue(lines.contains("d_seconds_count{export=\"\"} 1"))
        XCTAssertTrue(lines.contains("d_seconds_sum{export=\"\"} 0.002"))
    }
}
