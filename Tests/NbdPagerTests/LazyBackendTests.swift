import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
import NIOPosix
import XCTest
@testable import NbdPager

/// The lazy export on an `EmbeddedEventLoop` with a hand-released `FakeSource`: every pull, store and
/// completion happens when the test runs the loop or releases the source, never after a sleep.
class LazyTestCase: XCTestCase {
    var dir = ""
    var loop: EmbeddedEventLoop!

    override func setUpWithError() throws {
        dir = "/tmp/lazy-test-\(getpid())-\(UInt32.random(in: 0 ... .max))"
        loop = EmbeddedEventLoop()
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(atPath: dir)
        try loop.syncShutdownGracefully()
    }

    func makeBackend(pages: Int, zeroRanges: [Range<UInt64>] = [], fetchSize: UInt64 = 4096,
                     callsOnArrival: Bool = false, gated: Bool = false,
                     maxBytesInFlight: UInt64 = LazyBackend.defaultMaxBytesInFlight,
                     closeDrainTimeout: Duration = .seconds(2), missWindow: UInt64 = 0) throws -> (LazyBackend, FakeSource) {
        let bytes = fakeImage(pages: pages, zeroRanges: zeroRanges)
        let source = FakeSource(data: bytes, zeroRanges: zeroRanges, callsOnArrival: callsOnArrival)
        let store = try PageStore.open(directory: dir, size: source.size, identity: "fake", reset: false)
        return (LazyBackend(store: store, source: source, fetchSize: fetchSize, logger: Logger(label: "test"),
                            eventLoop: loop, threadPool: lazyTestPool,
                            maxBytesInFlight: maxBytesInFlight, gated: gated, closeDrainTimeout: closeDrainTimeout,
                            missWindow: missWindow), source)
    }

    func readAll(_ backend: LazyBackend, offset: UInt64, length: Int,
                 file: StaticString = #filePath, line: UInt = #line) throws -> [UInt8] {
        if let f = backend.prepare(offset: offset, length: UInt64(length), forWrite: false, eventLoop: loop) {
            try result(f, on: loop, file: file, line: line)
        }
        var out = [UInt8](repeating: 0xee, count: length)
        let n = try out.withUnsafeMutableBytes { try backend.read(into: $0, offset: offset, nonBlocking: false) }
        XCTAssertEqual(n, length, file: file, line: line)
        return out
    }

    /// Runs the loop; then the store holds `pages` and no pull is left in flight.
    func assertPresent(_ backend: LazyBackend, _ pages: Range<UInt64>, file: StaticString = #filePath, line: UInt = #line) {
        loop.run()
        XCTAssertEqual(backend.store.count(of: .absent, in: pages), 0, "pages \(pages) are present", file: file, line: line)
        XCTAssertEqual(backend.status().pullsInFlight, 0, file: file, line: line)
    }

    func bytes(_ b: ByteBuffer) -> [UInt8] { b.getBytes(at: b.readerIndex, length: b.readableBytes) ?? [] }
}

final class LazyBackendTests: LazyTestCase {
    func testWhileTheBackgroundRunsAMissPullsItsMissWindow() throws {
        // 64 KiB fetch windows; while a background pull runs, misses pull only their pages, widened
        // to the aligned 32 KiB miss window (absent pages only).
        let (backend, source) = try makeBackend(pages: 32, fetchSize: 65536, missWindow: 32768)
        backend.setDemandPagesOnly(true)
        XCTAssertEqual(try readAll(backend, offset: 9 * 4096, length: 4096), Array(source.data[9 * 4096 ..< 10 * 4096]))
        XCTAssertEqual(source.readLog.map(\.0), [8 * 4096], "one read of the window of pages 8-15")
        XCTAssertEqual(source.readLog.map(\.1), [32768])
        XCTAssertEqual(try readAll(backend, offset: 17 * 4096, length: 4096), Array(source.data[17 * 4096 ..< 18 * 4096]))
        XCTAssertEqual(source.readLog.map(\.0), [8 * 4096, 16 * 4096])
        backend.setDemandPagesOnly(false)
        XCTAssertEqual(try readAll(backend, offset: 1 * 4096, length: 4096), Array(source.data[4096 ..< 8192]))
        XCTAssertEqual(source.readLog.last.map(\.1), 32768, "the 64 KiB fetch window 0-15, less the 8 present pages")
        try backend.close()
    }

    func testMissPullsOnceAndRereadIsLocal() throws {
        let (backend, source) = try makeBackend(pages: 16)
        let page3 = Array(source.data[3 * 4096 ..< 4 * 4096])
        XCTAssertEqual(try readAll(backend, offset: 3 * 4096, length: 4096), page3)
        XCTAssertEqual(try readAll(backend, offset: 3 * 4096, length: 4096), page3)
        XCTAssertEqual(source.readLog.map(\.0), [3 * 4096])
        XCTAssertEqual(backend.store.state(of: 3), .present)
        XCTAssertEqual(backend.status().demandMisses, 1)
        XCTAssertEqual(backend.status().bytesPulled, 4096)
    }

    func testMissLatencyIsMeasuredOnTheLoopsClock() throws {
        let (backend, source) = try makeBackend(pages: 4)
        source.hold()
        let f = try XCTUnwrap(backend.prepare(offset: 0, length: 4096, forWrite: false, eventLoop: loop))
        loop.advanceTime(by: .milliseconds(3))
        source.release()
        try result(f, on: loop)
        let p50 = try XCTUnwrap(backend.status().missLatencyP50Microseconds)
        XCTAssertGreaterThanOrEqual(p50, 2700, "3 ms of virtual time, within one histogram bucket")
        XCTAssertLessThanOrEqual(p50, 3400)
    }

    func testADirectlyAnsweredMissIsTimedAtTheDatasArrival() throws {
        // What follows the arrival (the reply's write, the inline store write, the hop to the loop)
        // is not the client's wait for the source: 3 ms to the arrival, 5 ms more in the hook.
        let (backend, source) = try makeBackend(pages: 4, callsOnArrival: true)
        source.hold()
        let pending = try XCTUnwrap(backend.pendingRead(offset: 0, length: 4096, eventLoop: loop) { [loop] _ in
            loop.advanceTime(by: .milliseconds(5))
        })
        loop.advanceTime(by: .milliseconds(3))
        source.release()
        _ = try result(pending, on: loop)
        let p50 = try XCTUnwrap(backend.status().missLatencyP50Microseconds)
        XCTAssertGreaterThanOrEqual(p50, 2700)
        XCTAssertLessThanOrEqual(p50, 3400, "timed at the arrival, not when the read's future completed")
        XCTAssertEqual(backend.status().demandMisses, 1)
    }

    func testGateHoldsEveryPullUntilOpened() throws {
        let (backend, source) = try makeBackend(pages: 16, gated: true)
        XCTAssertTrue(backend.isGated)
        let a = backend.prepare(offset: 3 * 4096, length: 10, forWrite: false, eventLoop: loop)
        let b = backend.prepare(offset: 3 * 4096 + 100, length: 10, forWrite: false, eventLoop: loop)
        let c = backend.prepare(offset: 9 * 4096, length: 4096, forWrite: false, eventLoop: loop)
        let background = backend.startBackground(12 ..< 14, eventLoop: loop)
        XCTAssertNotNil(a)
        XCTAssertNotNil(b)
        XCTAssertNotNil(c)
        XCTAssertEqual(background.count, 1)
        loop.run()
        loop.advanceTime(by: .seconds(10))
        XCTAssertTrue(source.readLog.isEmpty, "nothing reaches the source while the gate is closed")
        for f in [a, b, c].compactMap({ $0 }) { XCTAssertFalse(isDone(f, on: loop)) }
        XCTAssertEqual(backend.status().pullsAtGate, 3, "two demand pulls (a and b share one) and one background")
        XCTAssertTrue(backend.status().gated)
        // a whole-page write needs no pull and is not held
        XCTAssertNil(backend.prepare(offset: 5 * 4096, length: 4096, forWrite: true, eventLoop: loop))

        XCTAssertEqual(backend.openGate(), 3)
        XCTAssertFalse(backend.isGated)
        for f in [a, b, c].compactMap({ $0 }) { try result(f, on: loop) }
        for pull in background { try result(pull.stored, on: loop) }
        XCTAssertEqual(Set(source.readLog.map(\.0)), [3 * 4096, 9 * 4096, 12 * 4096])
        XCTAssertEqual(try readAll(backend, offset: 3 * 4096, length: 4096), Array(source.data[3 * 4096 ..< 4 * 4096]))
        XCTAssertEqual(backend.openGate(), 0, "opening an open gate does nothing")
        // after opening, misses go straight to the source
        XCTAssertEqual(try readAll(backend, offset: 7 * 4096, length: 4096), Array(source.data[7 * 4096 ..< 8 * 4096]))
        XCTAssertEqual(source.readLog.count, 4)
    }

    func testConcurrentMissesShareOnePull() throws {
        let (backend, source) = try makeBackend(pages: 16)
        source.hold()
        let futures = (0 ..< 8).compactMap { _ in
            backend.prepare(offset: 5 * 4096 + 100, length: 10, forWrite: false, eventLoop: loop)
        }
        XCTAssertEqual(futures.count, 8, "every reader waits while the page is absent")
        loop.run()
        XCTAssertEqual(source.pendingCount, 1)
        source.release()
        for f in futures { try result(f, on: loop) }
        XCTAssertEqual(source.readLog.count, 1)
        XCTAssertEqual(try readAll(backend, offset: 5 * 4096, length: 4096), Array(source.data[5 * 4096 ..< 6 * 4096]))
    }

    func testPullFinishingAfterAClientWriteDoesNotOverwriteIt() throws {
        let (backend, source) = try makeBackend(pages: 4)
        source.hold()
        let pending = backend.prepare(offset: 0, length: 4096, forWrite: false, eventLoop: loop)
        XCTAssertNotNil(pending)
        let mine = [UInt8](repeating: 0x5a, count: 4096)
        _ = try mine.withUnsafeBytes { try backend.write(from: $0, offset: 0, fua: false, nonBlocking: false) }
        source.release()
        if let pending { try result(pending, on: loop) }
        XCTAssertEqual(try readAll(backend, offset: 0, length: 4096), mine)
        XCTAssertEqual(backend.store.state(of: 0), .local)
    }

    func testWholePageWriteDoesNotPullAndPartialWriteMerges() throws {
        let (backend, source) = try makeBackend(pages: 8)
        XCTAssertNil(backend.prepare(offset: 4096, length: 8192, forWrite: true, eventLoop: loop),
                     "page-aligned writes need no pull")
        if let f = backend.prepare(offset: 5 * 4096 + 10, length: 100, forWrite: true, eventLoop: loop) {
            try result(f, on: loop)
        }
        let patch = [UInt8](repeating: 0xab, count: 100)
        _ = try patch.withUnsafeBytes { try backend.write(from: $0, offset: 5 * 4096 + 10, fua: true, nonBlocking: false) }
        var expected = Array(source.data[5 * 4096 ..< 6 * 4096])
        expected.replaceSubrange(10 ..< 110, with: patch)
        XCTAssertEqual(try readAll(backend, offset: 5 * 4096, length: 4096), expected)
        XCTAssertEqual(source.readLog.map(\.0), [5 * 4096])
        XCTAssertEqual(backend.store.state(of: 5), .local)
    }

    func testTrimAndZeroNeverReadTheSource() throws {
        let (backend, source) = try makeBackend(pages: 8)
        try backend.trim(offset: 0, length: 8192, fua: false)
        try backend.zero(offset: 8192, length: 8192, mayTrim: false, fast: false, fua: true)
        XCTAssertEqual(try readAll(backend, offset: 0, length: 16384), [UInt8](repeating: 0, count: 16384))
        XCTAssertTrue(source.readLog.isEmpty)
    }

    func testSourceZeroExtentsBecomePresentWithoutTransfer() throws {
        let (backend, source) = try makeBackend(pages: 16, zeroRanges: [4096 ..< 5 * 4096 + 100])
        let marked = try blocking { try await backend.markSourceZeros() }
        XCTAssertEqual(marked, 4, "pages 1-4 are wholly zero; page 5 only partly")
        XCTAssertEqual(backend.store.state(of: 1), .present)
        XCTAssertEqual(backend.store.state(of: 4), .present)
        XCTAssertEqual(backend.store.state(of: 5), .absent)
        XCTAssertTrue(source.readLog.isEmpty)
        let status = try backend.blockStatus(offset: 0, length: 16 * 4096, maxExtents: 100)
        XCTAssertEqual(status.first, NBDExtent(length: 4096, flags: []), "absent page 0 is unknown")
        XCTAssertEqual(status.dropFirst().first, NBDExtent(length: 4 * 4096, flags: [.hole, .zero]))
        XCTAssertEqual(status.reduce(0) { $0 + UInt64($1.length) }, 16 * 4096)
    }

    func testCompletionIsReportedAndClosesTheSource() throws {
        let (backend, source) = try makeBackend(pages: 4, fetchSize: 16384)
        XCTAssertFalse(backend.status().complete)
        _ = try readAll(backend, offset: 0, length: 10)
        XCTAssertTrue(backend.status().complete, "one 16K fetch window covers the 4 pages")
        let closed = expectation(description: "the source is closed on the thread pool")
        lazyTestPool.submit { _ in if source.wasClosed { closed.fulfill() } }
        wait(for: [closed], timeout: 10)
    }

    func testDrainWaitsForPullsInFlightUntilTheyAreStored() throws {
        let (backend, source) = try makeBackend(pages: 8)
        XCTAssertTrue(backend.engine.drain(timeout: .zero), "nothing in flight")
        source.hold()
        let f = try XCTUnwrap(backend.prepare(offset: 2 * 4096, length: 4096, forWrite: false, eventLoop: loop))
        XCTAssertFalse(backend.engine.drain(timeout: .zero), "a pull is in flight")
        source.release()
        try result(f, on: loop)
        loop.run()
        XCTAssertTrue(backend.engine.drain(timeout: .zero), "the pull is stored")
        XCTAssertEqual(backend.store.state(of: 2), .present)
    }

    func testCloseWithAPullThatNeverArrivesIsBoundedAndClosesTheSource() throws {
        let (backend, source) = try makeBackend(pages: 4, closeDrainTimeout: .zero)
        source.hold()
        _ = try XCTUnwrap(backend.prepare(offset: 0, length: 4096, forWrite: false, eventLoop: loop))
        try backend.close()
        XCTAssertTrue(source.wasClosed)
        XCTAssertEqual(source.pendingCount, 1, "closed under the read that never came back")
        source.release()
        loop.run()
    }

    // MARK: reads answered from the pull

    func testPendingReadAnswersFromThePullThenStoresIt() throws {
        let (backend, source) = try makeBackend(pages: 16)
        let pending = backend.pendingRead(offset: 3 * 4096 + 100, length: 5000, eventLoop: loop, early: nil)
        XCTAssertNotNil(pending)
        XCTAssertEqual(bytes(try result(try XCTUnwrap(pending), on: loop)), Array(source.data[3 * 4096 + 100 ..< 3 * 4096 + 5100]))
        assertPresent(backend, 3 ..< 5)
        XCTAssertEqual(backend.store.state(of: 3), .present)
        XCTAssertEqual(backend.store.state(of: 4), .present)
        XCTAssertNil(backend.pendingRead(offset: 3 * 4096, length: 4096, eventLoop: loop, early: nil),
                     "present pages are read from the store")
        XCTAssertEqual(try readAll(backend, offset: 3 * 4096, length: 8192), Array(source.data[3 * 4096 ..< 5 * 4096]))
        XCTAssertEqual(source.readLog.count, 1)
        XCTAssertEqual(backend.status().demandMisses, 1)
    }

    func testConsecutiveFetchWindowsAreCoalescedIntoOneSourceRead() throws {
        let (backend, source) = try makeBackend(pages: 64, fetchSize: 16384)
        // Pages 1 ..< 9 lie in the 16K windows 0 ..< 4, 4 ..< 8 and 8 ..< 12: one read of 0 ..< 12.
        let pending = try XCTUnwrap(backend.pendingRead(offset: 4096, length: 8 * 4096, eventLoop: loop, early: nil))
        XCTAssertEqual(bytes(try result(pending, on: loop)), Array(source.data[4096 ..< 9 * 4096]))
        assertPresent(backend, 0 ..< 12)
        XCTAssertEqual(source.readLog.map { "\($0.0)+\($0.1)" }, ["0+49152"])
        XCTAssertEqual(backend.store.state(of: 12), .absent)
    }

    func testPendingReadJoinsPullsInFlightAndAssemblesTheData() throws {
        let (backend, source) = try makeBackend(pages: 16)
        source.hold()
        let middle = try XCTUnwrap(backend.prepare(offset: 2 * 4096, length: 8192, forWrite: false, eventLoop: loop))
        let pending = try XCTUnwrap(backend.pendingRead(offset: 4096 + 7, length: 4 * 4096, eventLoop: loop, early: nil))
        source.release()
        XCTAssertEqual(bytes(try result(pending, on: loop)), Array(source.data[4096 + 7 ..< 5 * 4096 + 7]))
        try result(middle, on: loop)
        assertPresent(backend, 1 ..< 6)
        let reads: [String] = source.readLog.sorted { $0.0 < $1.0 }.map { "\($0.0)+\($0.1)" }
        XCTAssertEqual(reads, ["4096+4096", "8192+8192", "16384+8192"],
                       "pages 2-3 come from the pull already in flight, not a second read")
    }

    func testPendingReadIsNilWhenAPageIsAlreadyHere() throws {
        let (backend, _) = try makeBackend(pages: 8)
        _ = try readAll(backend, offset: 4096, length: 4096)
        XCTAssertNil(backend.pendingRead(offset: 0, length: 8192, eventLoop: loop, early: nil))
        XCTAssertNil(backend.pendingRead(offset: 0, length: 0, eventLoop: loop, early: nil))
    }

    func testEarlyHookGetsTheDataAndTheSmallPullIsStoredOnArrival() throws {
        let (backend, source) = try makeBackend(pages: 8, callsOnArrival: true)
        source.hold()
        let early = NIOLockedValueBox<[UInt8]?>(nil)
        let pending = try XCTUnwrap(backend.pendingRead(offset: 2 * 4096 + 1, length: 100, eventLoop: loop) { data in
            early.withLockedValue { $0 = data.getBytes(at: data.readerIndex, length: data.readableBytes) }
        })
        let seenAtCompletion = NIOLockedValueBox<[UInt8]?>(nil)
        pending.whenComplete { _ in seenAtCompletion.withLockedValue { $0 = early.withLockedValue { $0 } } }
        let expected = Array(source.data[2 * 4096 + 1 ..< 2 * 4096 + 101])
        source.release()
        // Stored on arrival: on the receiving thread, before the loop ran anything.
        XCTAssertEqual(backend.store.state(of: 2), .present)
        XCTAssertEqual(bytes(try result(pending, on: loop)), expected)
        XCTAssertEqual(early.withLockedValue { $0 }, expected)
        XCTAssertEqual(seenAtCompletion.withLockedValue { $0 }, expected, "the hook ran before the future completed")
        assertPresent(backend, 2 ..< 3)
        XCTAssertEqual(try readAll(backend, offset: 2 * 4096, length: 4096), Array(source.data[2 * 4096 ..< 3 * 4096]))
        XCTAssertEqual(backend.status().bytesPulled, 4096, "stored once, on arrival")
    }

    func testPullsInFlightAreBoundedAndQueuedOnesStartLater() throws {
        let (backend, source) = try makeBackend(pages: 16, maxBytesInFlight: 2 * 4096)
        source.hold()
        let waits = stride(from: 0, to: 16, by: 2).compactMap {
            backend.prepare(offset: UInt64($0) * 4096, length: 4096, forWrite: false, eventLoop: loop)
        }
        XCTAssertEqual(waits.count, 8)
        loop.run()
        XCTAssertEqual(source.readLog.count, 2, "only two 4K pulls fit the 8K budget")
        // One answer frees room for exactly one more.
        XCTAssertTrue(source.releaseNext())
        loop.run()
        XCTAssertEqual(source.readLog.count, 3)
        XCTAssertEqual(source.pendingCount, 2)
        source.release()
        for w in waits { try result(w, on: loop) }
        XCTAssertEqual(source.readLog.count, 8)
        for p in stride(from: 0, to: 16, by: 2) { XCTAssertEqual(backend.store.state(of: UInt64(p)), .present) }
    }

    /// A blocking read of an absent page without `prepare` (a pull skipped it): it pulls the page
    /// itself through the export's own event loop and waits for it on the calling pool thread.
    func testBlockingReadOfAnAbsentPagePullsItThroughTheInjectedLoop() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let source = FakeSource(data: fakeImage(pages: 8))
        let store = try PageStore.open(directory: dir, size: source.size, identity: "fake", reset: false)
        let backend = LazyBackend(store: store, source: source, fetchSize: 4096, logger: Logger(label: "test"),
                                  eventLoop: group.next(), threadPool: lazyTestPool)
        var out = [UInt8](repeating: 0, count: 4096)
        let n = try out.withUnsafeMutableBytes { try backend.read(into: $0, offset: 6 * 4096, nonBlocking: false) }
        XCTAssertEqual(n, 4096)
        XCTAssertEqual(out, Array(source.data[6 * 4096 ..< 7 * 4096]))
        XCTAssertEqual(source.readLog.map(\.0), [6 * 4096])
        XCTAssertEqual(backend.status().demandMisses, 0, "not a client's demand miss")
        try backend.close()
    }

    // MARK: periodic commit

    func testPeriodicCommitRunsOnTheLoopsScheduleOnThePool() throws {
        let (backend, _) = try makeBackend(pages: 4)
        let committed = NIOLockedValueBox(0)
        let first = expectation(description: "the first periodic commit ends")
        backend.commitObserver.withLockedValue { $0 = { result in
            if case .success = result, committed.withLockedValue({ $0 += 1; return $0 }) == 1 { first.fulfill() }
        } }
        let data = [UInt8](repeating: 7, count: 4096)
        _ = try data.withUnsafeBytes { try backend.write(from: $0, offset: 0, fua: false, nonBlocking: false) }
        XCTAssertTrue(backend.store.snapshot().dirty)
        backend.startPeriodicCommit(every: .seconds(1))
        loop.advanceTime(by: .milliseconds(999))
        XCTAssertEqual(backend.periodicCommits.load(ordering: .relaxed), 0, "not before the interval")
        loop.advanceTime(by: .milliseconds(1))
        XCTAssertEqual(backend.periodicCommits.load(ordering: .relaxed), 1)
        wait(for: [first], timeout: 10)
        XCTAssertFalse(backend.store.snapshot().dirty, "the write and its state are committed")
        try backend.close()
        loop.advanceTime(by: .seconds(5))
        XCTAssertEqual(backend.periodicCommits.load(ordering: .relaxed), 1, "close stops the schedule")
    }
}
