import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
import NIOPosix
import XCTest
@testable import NbdPager

/// The background pull on an `EmbeddedEventLoop`: its clock is the loop's virtual time, and its pulls
/// complete when the loop runs.
final class PrefetcherTests: LazyTestCase {
    func makeBackend(pages: Int, zeroRanges: [Range<UInt64>] = []) throws -> (LazyBackend, FakeSource, FakeSource) {
        let bytes = fakeImage(pages: pages, zeroRanges: zeroRanges)
        let demand = FakeSource(data: bytes, zeroRanges: zeroRanges)
        let background = FakeSource(data: bytes, zeroRanges: zeroRanges)
        let store = try PageStore.open(directory: dir, size: demand.size, identity: "fake", reset: false)
        let backend = LazyBackend(store: store, source: demand, fetchSize: 4096, logger: Logger(label: "test"),
                                  eventLoop: loop, threadPool: lazyTestPool, backgroundSource: background)
        return (backend, demand, background)
    }

    func prefetcher(_ backend: LazyBackend, _ configure: (inout Prefetcher.Configuration) -> Void = { _ in }) -> Prefetcher {
        var config = Prefetcher.Configuration()
        config.batchBytes = 16 * 4096
        configure(&config)
        return Prefetcher(target: backend, config: config, eventLoop: loop, logger: Logger(label: "test"))
    }

    /// Runs the loop, advancing virtual time a millisecond at a time, until the export is complete.
    func runUntilComplete(_ backend: LazyBackend, file: StaticString = #filePath, line: UInt = #line) {
        loop.run()
        for _ in 0 ..< 10_000 where !backend.store.isComplete { loop.advanceTime(by: .milliseconds(1)) }
        XCTAssertTrue(backend.store.isComplete, "the export never became complete", file: file, line: line)
    }

    /// Pages covered by the reads, each counted once per read.
    func coverage(_ reads: [(UInt64, Int)]) -> [UInt64: Int] {
        var c: [UInt64: Int] = [:]
        for (offset, length) in reads {
            for p in offset / 4096 ..< (offset + UInt64(length) + 4095) / 4096 { c[p, default: 0] += 1 }
        }
        return c
    }

    func testPullsEveryNonZeroPageOnceThroughTheBackgroundSource() throws {
        let zero: Range<UInt64> = 10 * 4096 ..< 30 * 4096
        let (backend, demand, background) = try makeBackend(pages: 64, zeroRanges: [zero])
        let marked = try blocking { try await backend.markSourceZeros() }
        XCTAssertEqual(marked, 20)
        let p = prefetcher(backend) { $0.mode = .sequential }
        p.start()
        runUntilComplete(backend)
        p.stop()
        XCTAssertTrue(demand.readLog.isEmpty, "background pulls use the background source")
        let c = coverage(background.readLog)
        XCTAssertEqual(Set(c.keys), Set((0 ..< 64).filter { !(10 ..< 30).contains($0) }.map(UInt64.init)))
        XCTAssertTrue(c.values.allSatisfy { $0 == 1 }, "a page was read twice: \(c.filter { $0.value > 1 })")
        XCTAssertEqual(p.status().state, .done)
        XCTAssertEqual(p.status().progress, 1)
        XCTAssertEqual(p.status().backgroundBytes, 44 * 4096)
        var all = [UInt8](repeating: 0, count: 64 * 4096)
        _ = try all.withUnsafeMutableBytes { try backend.read(into: $0, offset: 0, nonBlocking: false) }
        XCTAssertEqual(all, demand.data)
    }

    func testPauseStopsBackgroundReadsAndResumeCompletes() throws {
        let (backend, _, background) = try makeBackend(pages: 32)
        let p = prefetcher(backend)
        p.pause()
        p.start()
        loop.run()
        loop.advanceTime(by: .seconds(5))
        XCTAssertTrue(background.readLog.isEmpty, "paused before it started: nothing is read")
        XCTAssertEqual(p.status().state, .paused)
        p.resume()
        runUntilComplete(backend)
        p.stop()
        XCTAssertEqual(coverage(background.readLog).count, 32)
    }

    func testHotListIsPulledFirst() throws {
        let (backend, _, background) = try makeBackend(pages: 64)
        let p = prefetcher(backend) {
            $0.mode = .sequential
            $0.hotList = [50 * 4096 ..< 52 * 4096, 20 * 4096 + 100 ..< 20 * 4096 + 200]
            $0.maxInFlight = 8192  // one two-page pull at a time, so the order is the log's order
        }
        background.hold()
        p.start()
        loop.run()
        XCTAssertEqual(background.readLog.map { "\($0.0)+\($0.1)" }, ["\(50 * 4096)+8192"], "one pull at a time")
        background.release()
        runUntilComplete(backend)
        p.stop()
        let first = background.readLog.prefix(2).map { "\($0.0)+\($0.1)" }
        XCTAssertEqual(first, ["\(50 * 4096)+8192", "\(20 * 4096)+4096"])
    }

    func testAMissMovesTheSweepAndPullsAWindowAroundIt() throws {
        let (backend, _, background) = try makeBackend(pages: 256)
        let p = prefetcher(backend) {
            $0.mode = .adaptive
            $0.minWindow = 8 * 4096
            $0.maxInFlight = 4096
        }
        p.pause()
        p.start()
        loop.run()
        XCTAssertEqual(p.status().state, .paused, "started (and watching misses), paused")
        // A demand miss at page 200 while paused (the demand source serves it).
        if let f = backend.prepare(offset: 200 * 4096, length: 4096, forWrite: false, eventLoop: loop) {
            try result(f, on: loop)
        }
        loop.advanceTime(by: .seconds(1))
        XCTAssertTrue(background.readLog.isEmpty)
        p.resume()
        runUntilComplete(backend)
        p.stop()
        let firstPage = background.readLog.first.map { $0.0 / 4096 }
        XCTAssertNotNil(firstPage)
        XCTAssertTrue((190 ..< 200).contains(firstPage ?? 0),
                      "the first background pull is just before the miss (window around page 200), got page \(firstPage ?? 0)")
        XCTAssertTrue(coverage(background.readLog).values.allSatisfy { $0 == 1 })
    }

    func testWhileRunningDemandMissesPullOnlyTheirPages() throws {
        let (backend, demand, _) = try makeBackend(pages: 64)
        // A fetch size of 4 pages, but with the background pull running a miss moves one page.
        let store = backend.store
        let quiet = FakeSource(data: demand.data)
        let wide = LazyBackend(store: store, source: demand, fetchSize: 4 * 4096, logger: Logger(label: "test"),
                               eventLoop: loop, threadPool: lazyTestPool, backgroundSource: quiet)
        let p = prefetcher(wide) { $0.maxRate = 1 }  // started, but pulling nothing while virtual time stands still
        p.start()
        loop.run()
        XCTAssertTrue(quiet.readLog.isEmpty)
        if let f = wide.prepare(offset: 41 * 4096, length: 100, forWrite: false, eventLoop: loop) { try result(f, on: loop) }
        XCTAssertEqual(demand.readLog.map { "\($0.0)+\($0.1)" }, ["\(41 * 4096)+4096"])
        p.pause()
        loop.run()
        if let f = wide.prepare(offset: 49 * 4096, length: 100, forWrite: false, eventLoop: loop) { try result(f, on: loop) }
        XCTAssertEqual(demand.readLog.last.map { "\($0.0)+\($0.1)" }, "\(48 * 4096)+16384", "paused: whole fetch windows again")
        p.stop()
    }

    func testRateLimitFollowsVirtualTime() throws {
        let (backend, _, background) = try makeBackend(pages: 256)
        let p = prefetcher(backend) {
            $0.mode = .sequential
            $0.maxRate = 16 * 4096  // one 16-page batch per second
        }
        p.start()
        loop.run()
        XCTAssertTrue(background.readLog.isEmpty, "the bucket starts empty")
        loop.advanceTime(by: .seconds(10))
        XCTAssertTrue((10 ... 11).contains(background.readLog.count),
                      "10 s at one batch per second, got \(background.readLog.count) batches")
        XCTAssertFalse(backend.store.isComplete)
        p.stop()
    }

    func testDemandMissesNeverWaitBehindHeldBackgroundPulls() throws {
        let (backend, demand, background) = try makeBackend(pages: 32)
        background.hold()
        let pulls = backend.startBackground(0 ..< 16, eventLoop: loop)
        XCTAssertEqual(pulls.count, 1)
        loop.run()
        XCTAssertEqual(background.pendingCount, 1)
        let f = try XCTUnwrap(backend.prepare(offset: 20 * 4096, length: 4096, forWrite: false, eventLoop: loop))
        try result(f, on: loop)
        XCTAssertEqual(demand.readLog.map(\.0), [20 * 4096], "the miss went through the demand source")
        XCTAssertFalse(isDone(pulls[0].stored, on: loop), "while the background pull is still held")
        // A miss inside the background pull's pages joins it (single flight) instead of reading again.
        let joined = try XCTUnwrap(backend.prepare(offset: 3 * 4096, length: 4096, forWrite: false, eventLoop: loop))
        XCTAssertFalse(isDone(joined, on: loop))
        background.release()
        try result(pulls[0].stored, on: loop)
        try result(joined, on: loop)
        XCTAssertEqual(demand.readLog.count, 1)
    }

    func testFaultListParsesAndRejects() throws {
        let ranges = try FaultList.parse("# hot pages\n4096 4096\n\n  8K\t1K \n1M 4K\n", size: 2 << 20, source: "t")
        XCTAssertEqual(ranges, [4096 ..< 8192, 8192 ..< 9216, 1048576 ..< 1052672])
        XCTAssertThrowsError(try FaultList.parse("4096\n", size: 1 << 20, source: "t")) {
            XCTAssertTrue("\($0)".contains("t line 1"), "\($0)")
        }
        XCTAssertThrowsError(try FaultList.parse("0 0\n", size: 1 << 20, source: "t"))
        XCTAssertThrowsError(try FaultList.parse("1M 1\n", size: 1 << 20, source: "t"))
        XCTAssertThrowsError(try FaultList.parse("x 1\n", size: 1 << 20, source: "t"))
    }
}
