import NIOCore
import XCTest
@testable import NbdPager
#if canImport(Glibc)
import Glibc
#endif

final class DirectReplyWriterTests: XCTestCase {
    var fds: [Int32] = [-1, -1]

    override func setUpWithError() throws {
        XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds), 0)
        // NIO's sockets are non-blocking; the writer relies on MSG_DONTWAIT anyway.
        _ = fcntl(fds[0], F_SETFL, fcntl(fds[0], F_GETFL) | O_NONBLOCK)
    }

    override func tearDown() {
        for fd in fds where fd >= 0 { close(fd) }
    }

    func buffer(_ bytes: [UInt8]) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeBytes(bytes)
        return b
    }

    /// Everything the peer can read right now.
    func drain() -> [UInt8] {
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { recv(fds[1], $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n <= 0 { return out }
            out += chunk[0 ..< n]
        }
    }

    func testWritesHeaderAndDataInOrder() throws {
        let writer = try XCTUnwrap(DirectReplyWriter(socket: fds[0]))
        let data = (0 ..< 4096).map { UInt8(truncatingIfNeeded: $0 * 7) }
        XCTAssertTrue(writer.tryWrite(header: buffer([1, 2, 3]), data: buffer(data)))
        XCTAssertEqual(drain(), [1, 2, 3] + data)
        writer.close()
    }

    func testRefusesWhileNIOHasWritesQueued() throws {
        let writer = try XCTUnwrap(DirectReplyWriter(socket: fds[0]))
        writer.willWrite()
        XCTAssertFalse(writer.tryWrite(header: buffer([1]), data: buffer([2])))
        writer.didWrite()
        XCTAssertTrue(writer.tryWrite(header: buffer([1]), data: buffer([2])))
        XCTAssertEqual(drain(), [1, 2])
        writer.close()
    }

    func testQueuesBehindUnreadRepliesUntilAQuarterOfTheSendBuffer() throws {
        let writer = try XCTUnwrap(DirectReplyWriter(socket: fds[0]))
        // Replies the peer has not read yet do not stop the next (a deep queue's replies each go directly).
        XCTAssertTrue(writer.tryWrite(header: buffer([9]), data: buffer([8])))
        XCTAssertTrue(writer.tryWrite(header: buffer([7]), data: buffer([6])), "a small queue leaves room")
        // Fill the socket's queue past a quarter of its send buffer: no direct write then.
        var sndbuf: Int32 = 0
        var len = socklen_t(MemoryLayout<Int32>.size)
        XCTAssertEqual(getsockopt(fds[0], SOL_SOCKET, SO_SNDBUF, &sndbuf, &len), 0)
        let filler = [UInt8](repeating: 5, count: Int(sndbuf) / 2)
        var queued = 0
        while queued < filler.count {
            let n = filler.withUnsafeBytes { p in
                p.baseAddress.map { send(fds[0], $0 + queued, filler.count - queued, Int32(MSG_DONTWAIT)) } ?? -1
            }
            if n <= 0 { break }
            queued += n
        }
        XCTAssertFalse(writer.tryWrite(header: buffer([4]), data: buffer([3])), "the queue holds \(queued) bytes")
        let read = drain()
        XCTAssertEqual(Array(read.prefix(4)), [9, 8, 7, 6])
        XCTAssertEqual(read.count, 4 + queued)
        XCTAssertTrue(writer.tryWrite(header: buffer([4]), data: buffer([3])))
        XCTAssertEqual(drain(), [4, 3])
        writer.close()
    }

    func testRefusesLargeRepliesAndAfterClose() throws {
        let writer = try XCTUnwrap(DirectReplyWriter(socket: fds[0]))
        let big = [UInt8](repeating: 1, count: DirectReplyWriter.maxDirectReply)
        XCTAssertFalse(writer.tryWrite(header: buffer([0]), data: buffer(big)))
        writer.close()
        XCTAssertFalse(writer.tryWrite(header: buffer([0]), data: buffer([1])))
        XCTAssertEqual(drain(), [])
    }

    func testFlushMayReenterAndCloseWithoutDeadlock() throws {
        // NIO's flush can re-enter the handler (writability changes, a failed write closing the
        // channel): nested flushes and a close from inside a flush must not deadlock.
        let writer = try XCTUnwrap(DirectReplyWriter(socket: fds[0]))
        var ran = false
        writer.flush {
            XCTAssertFalse(writer.tryWrite(header: buffer([1]), data: buffer([2])), "no direct write during a flush")
            writer.flush { ran = true }
            writer.close()
        }
        XCTAssertTrue(ran)
        XCTAssertFalse(writer.tryWrite(header: buffer([1]), data: buffer([2])))
        XCTAssertEqual(drain(), [])
    }
}
