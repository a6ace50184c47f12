import Glibc
import Logging
import NIOCore
import NIOEmbedded
import NIOPosix
import XCTest
@testable import NbdPager

/// Requests on storage that may block (a file on a disk): inline on the event loop only when that
/// delays nobody else, on the pool otherwise. The pool here is never started, so a request sent to it
/// fails and one run inline succeeds: the replies show where each request ran.
final class BlockingStorageTests: XCTestCase {
    static let size: UInt64 = 1 << 20

    private func harness() throws -> (HandlerTests.Harness, FileBackend) {
        let fd = try Sys.memfd(name: "blocking-test")
        guard ftruncate(fd, off_t(Self.size)) == 0 else { throw SystemError("ftruncate", errno: errno) }
        let backend = FileBackend(fd: fd, size: Self.size, writable: true, isRegularFile: true, inlineSafe: false)
        let export = Export(name: "mem", description: "blocking storage", backend: backend, readOnly: false,
                            minimumBlockSize: 1, threadPool: NIOThreadPool(numberOfThreads: 1))
        let h = try HandlerTests.Harness(export: export)
        addTeardownBlock { h.finish() }
        try h.handshake()
        return (h, backend)
    }

    private func replies(_ h: HandlerTests.Harness) throws -> [UInt64: UInt32] {
        h.channel.embeddedEventLoop.run()
        var out: [UInt64: UInt32] = [:]
        for r in parseReplies(try h.output()) {
            if case .simple(let error, let cookie, _) = r { out[cookie] = error }
        }
        return out
    }

    func testALoneConnectionRunsASynchronousWriteAndFlushInline() throws {
        let (h, backend) = try harness()
        let data = Wire.pattern(4096, seed: 9)
        try h.feed(Wire.request(.write, flags: .fua, cookie: 1, offset: 4096, length: 4096) + data)
        XCTAssertEqual(try replies(h), [1: 0], "WRITE+FUA answered by the event loop")
        try h.feed(Wire.request(.flush, cookie: 2, offset: 0, length: 0))
        XCTAssertEqual(try replies(h), [2: 0], "FLUSH answered by the event loop")
        var back = [UInt8](repeating: 0, count: 4096)
        _ = try back.withUnsafeMutableBytes { try backend.read(into: $0, offset: 4096, nonBlocking: false) }
        XCTAssertEqual(back, data)
    }

    func testRequestsGoToThePoolWhenSomethingElseWaits() throws {
        let (h, _) = try harness()
        // Two flushes in one read: the first would hold up the second, so it goes to the pool; the
        // second is the last thing buffered and runs inline.
        try h.feed(Wire.request(.flush, cookie: 1, offset: 0, length: 0) + Wire.request(.flush, cookie: 2, offset: 0, length: 0))
        let first = try replies(h)
        XCTAssertNotEqual(first[1], 0, "sent to the (stopped) pool")
        XCTAssertEqual(first[2], 0, "run inline")

        // Another connection on the same event loop: nothing may block it.
        let other = EmbeddedChannel(loop: h.channel.embeddedEventLoop)
        XCTAssertEqual(h.tracker.add(other), .added)
        XCTAssertEqual(h.tracker.count(on: h.channel.eventLoop), 2)
        try h.feed(Wire.request(.flush, cookie: 3, offset: 0, length: 0))
        XCTAssertNotEqual(try replies(h)[3], 0, "sent to the pool")
        h.tracker.remove(other)
        h.tracker.remove(other)
        XCTAssertEqual(h.tracker.count(on: h.channel.eventLoop), 1, "a second remove changes nothing")
        try h.feed(Wire.request(.flush, cookie: 4, offset: 0, length: 0))
        XCTAssertEqual(try replies(h), [4: 0], "alone again: inline")
    }
}
