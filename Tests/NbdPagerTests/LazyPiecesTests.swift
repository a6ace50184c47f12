import Dispatch
import NIOConcurrencyHelpers
import NIOCore
import XCTest
@testable import NbdPager

final class WriteExclusionTests: XCTestCase {
    func testStoreSkipsPagesAWriterHoldsAndPagesNoLongerAbsent() throws {
        let exclusion = WriteExclusion()
        try exclusion.beginWrite(2 ..< 4)
        let claimed = exclusion.beginStore(0 ..< 8) { pages in [pages.lowerBound ..< 6] }  // 6, 7 not absent
        XCTAssertEqual(claimed, [0 ..< 2, 4 ..< 6])
        XCTAssertEqual(exclusion.beginStore(0 ..< 8) { [$0] }, [6 ..< 8], "a second store skips the first one's pages")
        exclusion.endWrite(2 ..< 4)
        exclusion.endStore(claimed)
        XCTAssertEqual(exclusion.busy.storing, [6 ..< 8])
        XCTAssertEqual(exclusion.busy.writing, [])
    }

    func testWriterWaitsForTheStoreOnItsPagesWithoutSpinning() throws {
        let exclusion = WriteExclusion()
        let claimed = exclusion.beginStore(0 ..< 4) { [$0] }
        let events = NIOLockedValueBox<[String]>([])
        let done = DispatchSemaphore(value: 0)
        DispatchQueue(label: "writer").async {
            do {
                try exclusion.beginWrite(2 ..< 3)
                events.withLockedValue { $0.append("write began") }
                exclusion.endWrite(2 ..< 3)
            } catch {
                events.withLockedValue { $0.append("\(error)") }
            }
            done.signal()
        }
        // The writer is parked on the condition variable (a state, not a timing).
        for _ in 0 ..< 100_000 where exclusion.busy.blockedWriters == 0 { usleep(100) }
        XCTAssertEqual(exclusion.busy.blockedWriters, 1)
        XCTAssertEqual(events.withLockedValue { $0 }, [])
        events.withLockedValue { $0.append("store ended") }
        exclusion.endStore(claimed)
        done.wait()
        XCTAssertEqual(events.withLockedValue { $0 }, ["store ended", "write began"])
    }

    func testAWriterBlockedTooLongFailsWithEIO() throws {
        let exclusion = WriteExclusion(timeout: .milliseconds(20))
        _ = exclusion.beginStore(0 ..< 4) { [$0] }
        XCTAssertThrowsError(try exclusion.beginWrite(1 ..< 2)) { error in
            XCTAssertEqual(NBDErrno(error), .eio)
        }
        XCTAssertEqual(exclusion.busy.writing, [], "a failed writer is not registered")
    }

    func testReaderWaitsForWritersOnlyWhenOneHoldsItsPages() throws {
        let exclusion = WriteExclusion()
        XCTAssertFalse(try exclusion.waitForWriters([0 ..< 4]))
        try exclusion.beginWrite(8 ..< 9)
        XCTAssertFalse(try exclusion.waitForWriters([0 ..< 4]), "another page's writer does not matter")
        exclusion.endWrite(8 ..< 9)
    }
}

final class PrefetchPolicyTests: XCTestCase {
    func map(pages: UInt64, present: [Range<UInt64>] = []) -> PageStateMap {
        var m = PageStateMap(pageCount: pages)
        for r in present { m.mark(r, .present) }
        return m
    }

    func testHintsFirstThenTheSweepSkippingPagesNotAbsent() {
        var policy = PrefetchPolicy(pageCount: 64, adaptive: false, minWindow: 16, maxWindow: 1024,
                                    hotList: [50 ..< 52, 20 ..< 21])
        let states = map(pages: 64, present: [0 ..< 4, 51 ..< 52])
        var scanned: UInt64 = 0
        XCTAssertEqual(policy.nextRange(batchPages: 16, states: states, scanned: &scanned), 50 ..< 51)
        XCTAssertEqual(policy.nextRange(batchPages: 16, states: states, scanned: &scanned), 20 ..< 21)
        XCTAssertEqual(policy.nextRange(batchPages: 16, states: states, scanned: &scanned), 4 ..< 20)
        XCTAssertEqual(policy.cursor, 20)
    }

    func testNothingLeftWhenEveryPageIsHere() {
        var policy = PrefetchPolicy(pageCount: 32, adaptive: true, minWindow: 4, maxWindow: 64)
        var scanned: UInt64 = 0
        XCTAssertNil(policy.nextRange(batchPages: 8, states: map(pages: 32, present: [0 ..< 32]), scanned: &scanned))
    }

    func testSequentialMissesGrowTheWindowAndScatteredOnesShrinkIt() {
        var policy = PrefetchPolicy(pageCount: 1024, adaptive: true, minWindow: 8, maxWindow: 64)
        XCTAssertEqual(policy.window, 8)
        policy.noteMiss(100 ..< 101)
        XCTAssertEqual(policy.window, 8, "a first miss cannot be sequential")
        XCTAssertEqual(policy.hints.first, 98 ..< 109, "a window around the miss, a quarter of it before")
        XCTAssertEqual(policy.cursor, 109, "the sweep goes on after the window")
        policy.noteMiss(101 ..< 102)
        XCTAssertEqual(policy.window, 16)
        policy.noteMiss(102 ..< 103)
        policy.noteMiss(103 ..< 104)
        policy.noteMiss(104 ..< 105)
        XCTAssertEqual(policy.window, 64, "capped at maxWindow")
        policy.noteMiss(900 ..< 901)
        XCTAssertEqual(policy.window, 32, "a scattered miss halves it")
        var scanned: UInt64 = 0
        XCTAssertEqual(policy.nextRange(batchPages: 4, states: map(pages: 1024), scanned: &scanned), 892 ..< 896,
                       "the newest miss's window comes first")
    }

    func testSequentialModeIgnoresMisses() {
        var policy = PrefetchPolicy(pageCount: 64, adaptive: false, minWindow: 8, maxWindow: 64)
        policy.noteMiss(40 ..< 41)
        XCTAssertTrue(policy.hints.isEmpty)
        XCTAssertEqual(policy.cursor, 0)
    }

    func testTokenBucketStartsEmptyAndHoldsAtMostOneBatch() {
        let t0 = NIODeadline.uptimeNanoseconds(0)
        var bucket = TokenBucket(rate: 1000, capacity: 500, now: t0)
        XCTAssertEqual(bucket.tokens, 0)
        bucket.refill(t0 + .seconds(10))
        XCTAssertEqual(bucket.tokens, 500)
        bucket.take(1500)
        XCTAssertEqual(bucket.tokens, -1000)
        XCTAssertEqual(Double(bucket.wait.nanoseconds), 1.001e9, accuracy: 1000, "until positive again, plus a millisecond")
    }
}
