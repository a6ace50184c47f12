import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import XCTest
@testable import NbdPager

/// An in-memory source whose reads can be held back, counting every read per offset.
final class FakeSource: RemoteSource, @unchecked Sendable {
    let data: [UInt8]
    let zeroRanges: [Range<UInt64>]
    private let lock = NIOLock()
    private var reads: [(UInt64, Int)] = []
    private var held = false
    private var waiters: [CheckedContinuation<Void, Never>] = []

    /// When set, event-loop reads report their data through `onArrival` (on a thread of their own,
    /// before the future completes), as the libnbd source does.
    let callsOnArrival: Bool

    init(data: [UInt8], zeroRanges: [Range<UInt64>] = [], callsOnArrival: Bool = false) {
        self.data = data
        self.zeroRanges = zeroRanges
        self.callsOnArrival = callsOnArrival
    }

    func read(offset: UInt64, length: Int, eventLoop: any EventLoop,
              onArrival: (@Sendable (ByteBuffer) -> Void)?) -> EventLoopFuture<ByteBuffer> {
        let promise = eventLoop.makePromise(of: ByteBuffer.self)
        let report = callsOnArrival ? onArrival : nil
        Task.detached {
            do {
                let data = try await self.read(offset: offset, length: length)
                report?(data)
                promise.succeed(data)
            } catch {
                promise.fail(error)
            }
        }
        return promise.futureResult
    }

    var isConnected: Bool { true }
    var size: UInt64 { UInt64(data.count) }
    var supportsExtents: Bool { true }
    var readLog: [(UInt64, Int)] { lock.withLock { reads } }

    func hold() { lock.withLock { held = true } }
    func release() {
        let w = lock.withLock { () -> [CheckedContinuation<Void, Never>] in
            held = false
            defer { waiters = [] }
            return waiters
        }
        w.forEach { $0.resume() }
    }

    func read(offset: UInt64, length: Int) async throws -> ByteBuffer {
        lock.withLock { reads.append((offset, length)) }
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let wait = lock.withLock { () -> Bool in
                if held { waiters.append(c); return true }
                return false
            }
            if !wait { c.resume() }
        }
        var b = ByteBuffer()
        b.writeBytes(data[Int(offset) ..< Int(offset) + length])
        return b
    }

    func extents(offset: UInt64, length: UInt64) async throws -> [NBDExtent] {
        var out: [NBDExtent] = []
        var pos = offset
        let end = offset + length
        for z in zeroRanges where z.upperBound > pos && z.lowerBound < end {
            if z.lowerBound > pos { out.append(NBDExtent(length: UInt32(z.lowerBound - pos), flags: [])) }
            let stop = min(z.upperBound, end)
            out.append(NBDExtent(length: UInt32(stop - max(pos, z.lowerBound)), flags: [.hole, .zero]))
            pos = stop
        }
        if pos < end { out.append(NBDExtent(length: UInt32(end - pos), flags: [])) }
        return out
    }

    func close() {}
}

/// A test image of `pages` 4 KiB pages, every byte depending on its offset and page, with the
/// `zeroRanges` (byte ranges) zeroed.
func fakeImage(pages: Int, zeroRanges: [Range<UInt64>] = []) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: pages * 4096)
    for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: i &* 31 &+ i / 4096 &+ 7) }
    for z in zeroRanges { for i in z { bytes[Int(i)] = 0 } }
    return bytes
}

final class LazyBackendTests: XCTestCase {
    static let pageSize = 4096
    var dir = ""
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)

    override func setUpWithError() throws {
        dir = "/tmp/lazy-test-\(getpid())-\(UInt32.random(in: 0 ... .max))"
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(atPath: dir)
        try group.syncShutdownGracefully()
    }

    func makeBackend(pages: Int, zeroRanges: [Range<UInt64>] = [], fetchSize: UInt64 = 4096,
                     callsOnArrival: Bool = false, gated: Bool = false,
                     maxBytesInFlight: UInt64 = LazyBackend.defaultMaxBytesInFlight) throws -> (LazyBackend, FakeSource) {
        let bytes = fakeImage(pages: pages, zeroRanges: zeroRanges)
        let source = FakeSource(data: bytes, zeroRanges: zeroRanges, callsOnArrival: callsOnArrival)
        let store = try PageStore.open(directory: dir, size: source.size, identity: "fake", reset: false)
        return (LazyBackend(store: store, source: source, fetchSize: fetchSize, logger: Logger(label: "test"),
                            maxBytesInFlight: maxBytesInFlight, gated: gated), source)
    }

    func readAll(_ backend: LazyBackend, offset: UInt64, length: Int) throws -> [UInt8] {
        if let f = backend.prepare(offset: offset, length: UInt64(length), forWrite: false, eventLoop: group.next()) {
            try f.wait()
        }
        var out = [UInt8](repeating: 0xee, count: length)
        let n = try out.withUnsafeMutableBytes { try backend.read(into: $0, offset: offset, nonBlocking: false) }
        XCTAssertEqual(n, length)
        return out
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

    func testGateHoldsEveryPullUntilOpened() throws {
        let (backend, source) = try makeBackend(pages: 16, gated: true)
        XCTAssertTrue(backend.isGated)
        let a = backend.prepare(offset: 3 * 4096, length: 10, forWrite: false, eventLoop: group.next())
        let b = backend.prepare(offset: 3 * 4096 + 100, length: 10, forWrite: false, eventLoop: group.next())
        let c = backend.prepare(offset: 9 * 4096, length: 4096, forWrite: false, eventLoop: group.next())
        let background = backend.startBackground(12 ..< 14, eventLoop: group.next())
        XCTAssertNotNil(a)
        XCTAssertNotNil(b)
        XCTAssertNotNil(c)
        XCTAssertEqual(background.count, 1)
        usleep(100_000)
        XCTAssertTrue(source.readLog.isEmpty, "nothing reaches the source while the gate is closed")
        XCTAssertEqual(backend.status().pullsAtGate, 3, "two demand pulls (a and b share one) and one background")
        XCTAssertTrue(backend.status().gated)
        // a whole-page write needs no pull and is not held
        XCTAssertNil(backend.prepare(offset: 5 * 4096, length: 4096, forWrite: true, eventLoop: group.next()))

        XCTAssertEqual(backend.openGate(), 3)
        XCTAssertFalse(backend.isGated)
        for f in [a, b, c].compactMap({ $0 }) { try f.wait() }
        for pull in background { try pull.stored.futureResult.wait() }
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
            backend.prepare(offset: 5 * 4096 + 100, length: 10, forWrite: false, eventLoop: group.next())
        }
        XCTAssertEqual(futures.count, 8, "every reader waits while the page is absent")
        source.release()
        for f in futures { try f.wait() }
        XCTAssertEqual(source.readLog.count, 1)
        XCTAssertEqual(try readAll(backend, offset: 5 * 4096, length: 4096), Array(source.data[5 * 4096 ..< 6 * 4096]))
    }

    func testPullFinishingAfterAClientWriteDoesNotOverwriteIt() throws {
        let (backend, source) = try makeBackend(pages: 4)
        source.hold()
        let pending = backend.prepare(offset: 0, length: 4096, forWrite: false, eventLoop: group.next())
        XCTAssertNotNil(pending)
        let mine = [UInt8](repeating: 0x5a, count: 4096)
        _ = try mine.withUnsafeBytes { try backend.write(from: $0, offset: 0, fua: false, nonBlocking: false) }
        source.release()
        try pending?.wait()
        XCTAssertEqual(try readAll(backend, offset: 0, length: 4096), mine)
        XCTAssertEqual(backend.store.state(of: 0), .local)
    }

    func testWholePageWriteDoesNotPullAndPartialWriteMerges() throws {
        let (backend, source) = try makeBackend(pages: 8)
        XCTAssertNil(backend.prepare(offset: 4096, length: 8192, forWrite: true, eventLoop: group.next()),
                     "page-aligned writes need no pull")
        if let f = backend.prepare(offset: 5 * 4096 + 10, length: 100, forWrite: true, eventLoop: group.next()) {
            try f.wait()
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

    func testSourceZeroExtentsBecomePresentWithoutTransfer() async throws {
        let (backend, source) = try makeBackend(pages: 16, zeroRanges: [4096 ..< 5 * 4096 + 100])
        let marked = try await backend.markSourceZeros()
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

    func testCompletionIsReported() throws {
        let (backend, _) = try makeBackend(pages: 4, fetchSize: 16384)
        XCTAssertFalse(backend.status().complete)
        _ = try readAll(backend, offset: 0, length: 10)
        XCTAssertTrue(backend.status().complete, "one 16K fetch window covers the 4 pages")
    }

    // MARK: reads answered from the pull

    /// Waits until the store holds `pages` (their pulls have been stored).
    func waitPresent(_ backend: LazyBackend, _ pages: Range<UInt64>) throws {
        for _ in 0 ..< 2000 {
            if backend.store.count(of: .absent, in: pages) == 0 && backend.status().pullsInFlight == 0 { return }
            usleep(1000)
        }
        XCTFail("pages \(pages) never became present")
    }

    func bytes(_ b: ByteBuffer) -> [UInt8] { b.getBytes(at: b.readerIndex, length: b.readableBytes) ?? [] }

    func testPendingReadAnswersFromThePullThenStoresIt() throws {
        let (backend, source) = try makeBackend(pages: 16)
        let pending = backend.pendingRead(offset: 3 * 4096 + 100, length: 5000, eventLoop: group.next(), early: nil)
        XCTAssertNotNil(pending)
        XCTAssertEqual(bytes(try XCTUnwrap(pending).wait()), Array(source.data[3 * 4096 + 100 ..< 3 * 4096 + 5100]))
        try waitPresent(backend, 3 ..< 5)
        XCTAssertEqual(backend.store.state(of: 3), .present)
        XCTAssertEqual(backend.store.state(of: 4), .present)
        XCTAssertNil(backend.pendingRead(offset: 3 * 4096, length: 4096, eventLoop: group.next(), early: nil),
                     "present pages are read from the store")
        XCTAssertEqual(try readAll(backend, offset: 3 * 4096, length: 8192), Array(source.data[3 * 4096 ..< 5 * 4096]))
        XCTAssertEqual(source.readLog.count, 1)
        XCTAssertEqual(backend.status().demandMisses, 1)
    }

    func testConsecutiveFetchWindowsAreCoalescedIntoOneSourceRead() throws {
        let (backend, source) = try makeBackend(pages: 64, fetchSize: 16384)
        // Pages 1 ..< 9 lie in the 16K windows 0 ..< 4, 4 ..< 8 and 8 ..< 12: one read of 0 ..< 12.
        let pending = try XCTUnwrap(backend.pendingRead(offset: 4096, length: 8 * 4096, eventLoop: group.next(), early: nil))
        XCTAssertEqual(bytes(try pending.wait()), Array(source.data[4096 ..< 9 * 4096]))
        try waitPresent(backend, 0 ..< 12)
        XCTAssertEqual(source.readLog.map { "\($0.0)+\($0.1)" }, ["0+49152"])
        XCTAssertEqual(backend.store.state(of: 12), .absent)
    }

    func testPendingReadJoinsPullsInFlightAndAssemblesTheData() throws {
        let (backend, source) = try makeBackend(pages: 16)
        source.hold()
        let middle = try XCTUnwrap(backend.prepare(offset: 2 * 4096, length: 8192, forWrite: false, eventLoop: group.next()))
        let pending = try XCTUnwrap(backend.pendingRead(offset: 4096 + 7, length: 4 * 4096, eventLoop: group.next(), early: nil))
        source.release()
        XCTAssertEqual(bytes(try pending.wait()), Array(source.data[4096 + 7 ..< 5 * 4096 + 7]))
        try middle.wait()
        try waitPresent(backend, 1 ..< 6)
        let reads: [String] = source.readLog.sorted { $0.0 < $1.0 }.map { "\($0.0)+\($0.1)" }
        XCTAssertEqual(reads, ["4096+4096", "8192+8192", "16384+8192"],
                       "pages 2-3 come from the pull already in flight, not a second read")
    }

    func testPendingReadIsNilWhenAPageIsAlreadyHere() throws {
        let (backend, _) = try makeBackend(pages: 8)
        _ = try readAll(backend, offset: 4096, length: 4096)
        XCTAssertNil(backend.pendingRead(offset: 0, length: 8192, eventLoop: group.next(), early: nil))
        XCTAssertNil(backend.pendingRead(offset: 0, length: 0, eventLoop: group.next(), early: nil))
    }

    func testEarlyHookGetsTheDataAndTheSmallPullIsStoredOnArrival() throws {
        let (backend, source) = try makeBackend(pages: 8, callsOnArrival: true)
        let early = NIOLockedValueBox<[UInt8]?>(nil)
        let pending = try XCTUnwrap(backend.pendingRead(offset: 2 * 4096 + 1, length: 100, eventLoop: group.next()) { data in
            early.withLockedValue { $0 = data.getBytes(at: data.readerIndex, length: data.readableBytes) }
        })
        let expected = Array(source.data[2 * 4096 + 1 ..< 2 * 4096 + 101])
        XCTAssertEqual(bytes(try pending.wait()), expected)
        XCTAssertEqual(early.withLockedValue { $0 }, expected, "the hook ran before the future completed")
        try waitPresent(backend, 2 ..< 3)
        XCTAssertEqual(try readAll(backend, offset: 2 * 4096, length: 4096), Array(source.data[2 * 4096 ..< 3 * 4096]))
        XCTAssertEqual(backend.status().bytesPulled, 4096, "stored once, on arrival")
    }

    func testPullsInFlightAreBoundedAndQueuedOnesStartLater() throws {
        let (backend, source) = try makeBackend(pages: 16, maxBytesInFlight: 2 * 4096)
        source.hold()
        let waits = stride(from: 0, to: 16, by: 2).compactMap {
            backend.prepare(offset: UInt64($0) * 4096, length: 4096, forWrite: false, eventLoop: group.next())
        }
        XCTAssertEqual(waits.count, 8)
        for _ in 0 ..< 200 where source.readLog.count < 2 { usleep(1000) }
        usleep(20_000)
        XCTAssertEqual(source.readLog.count, 2, "only two 4K pulls fit the 8K budget")
        source.release()
        for w in waits { try w.wait() }
        XCTAssertEqual(source.readLog.count, 8)
        for p in stride(from: 0, to: 16, by: 2) { XCTAssertEqual(backend.store.state(of: UInt64(p)), .present) }
    }
}
