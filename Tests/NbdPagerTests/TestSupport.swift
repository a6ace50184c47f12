import Dispatch
import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
import NIOPosix
import XCTest
@testable import NbdPager

// Helpers shared by the test files: building client messages byte for byte as the NBD spec lays them
// out, and taking server replies apart again, so that tests check the wire format rather than reuse
// the library's own encoders.

enum Wire {
    static func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] {
        withUnsafeBytes(of: v.bigEndian) { Array($0) }
    }

    static func string(_ s: String) -> [UInt8] {
        let b = Array(s.utf8)
        return be(UInt32(b.count)) + b
    }

    /// IHAVEOPT, option code, payload length, payload.
    static func option(_ code: UInt32, _ payload: [UInt8] = []) -> [UInt8] {
        be(UInt64(0x4948_4156_454f_5054)) + be(code) + be(UInt32(payload.count)) + payload
    }

    static func infoPayload(name: String, requests: [UInt16]) -> [UInt8] {
        string(name) + be(UInt16(requests.count)) + requests.flatMap { be($0) }
    }

    static func metaPayload(name: String, queries: [String]) -> [UInt8] {
        string(name) + be(UInt32(queries.count)) + queries.flatMap { string($0) }
    }

    static func request(magic: UInt32 = 0x2560_9513, flags: UInt16 = 0, type: UInt16, cookie: UInt64,
                        offset: UInt64, length: UInt32) -> [UInt8] {
        be(magic) + be(flags) + be(type) + be(cookie) + be(offset) + be(length)
    }

    static func request(_ command: NBDCommand, flags: NBDCommandFlags = [], cookie: UInt64,
                        offset: UInt64, length: UInt32) -> [UInt8] {
        request(flags: flags.rawValue, type: command.rawValue, cookie: cookie, offset: offset, length: length)
    }

    static func hex(_ bytes: [UInt8]) -> String {
        bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    }

    static func buffer(_ bytes: [UInt8]) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeBytes(bytes)
        return b
    }

    static func pattern(_ count: Int, seed: UInt8 = 1) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed) &* 7 &+ 1) }
    }
}

extension ByteBuffer {
    var bytes: [UInt8] { Array(readableBytesView) }
}

/// A cursor over bytes the server sent, reading big-endian fields.
struct Reader {
    var bytes: [UInt8]
    var index = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }
    init(_ buffer: ByteBuffer) { self.bytes = buffer.bytes }

    var remaining: Int { bytes.count - index }
    var atEnd: Bool { index == bytes.count }

    mutating func take(_ n: Int) -> [UInt8]? {
        guard n >= 0, remaining >= n else { return nil }
        defer { index += n }
        return Array(bytes[index..<(index + n)])
    }

    mutating func int<T: FixedWidthInteger>(_: T.Type = T.self) -> T? {
        guard let b = take(MemoryLayout<T>.size) else { return nil }
        return b.reduce(T(0)) { ($0 << 8) | T($1) }
    }
}

/// One option reply (fixed newstyle): magic already checked.
struct OptionReply: Equatable, CustomStringConvertible {
    var option: UInt32
    var type: UInt32
    var data: [UInt8]

    var description: String { "OptionReply(option: \(option), type: 0x\(String(type, radix: 16)), data: \(data.count) bytes)" }
}

/// Splits server bytes into option replies; fails the test on a bad magic or a truncated reply.
func parseOptionReplies(_ bytes: [UInt8], file: StaticString = #filePath, line: UInt = #line) -> [OptionReply] {
    var r = Reader(bytes)
    var out: [OptionReply] = []
    while !r.atEnd {
        guard let magic = r.int(UInt64.self), let option = r.int(UInt32.self), let type = r.int(UInt32.self),
              let length = r.int(UInt32.self), let data = r.take(Int(length))
        else {
            XCTFail("truncated option reply after \(out.count) replies", file: file, line: line)
            return out
        }
        XCTAssertEqual(magic, 0x0003_e889_0455_65a9, "option reply magic", file: file, line: line)
        out.append(OptionReply(option: option, type: type, data: data))
    }
    return out
}

enum RT {
    static let ack: UInt32 = 1
    static let server: UInt32 = 2
    static let info: UInt32 = 3
    static let metaContext: UInt32 = 4
    static let errUnsup: UInt32 = 0x8000_0001
    static let errInvalid: UInt32 = 0x8000_0003
    static let errTLSRequired: UInt32 = 0x8000_0005
    static let errUnknown: UInt32 = 0x8000_0006
}

enum Opt {
    static let exportName: UInt32 = 1
    static let abort: UInt32 = 2
    static let list: UInt32 = 3
    static let startTLS: UInt32 = 5
    static let info: UInt32 = 6
    static let go: UInt32 = 7
    static let structuredReply: UInt32 = 8
    static let listMetaContext: UInt32 = 9
    static let setMetaContext: UInt32 = 10
}

/// A simple reply or a structured reply chunk, as read off the wire.
enum ServerReply: Equatable {
    case simple(error: UInt32, cookie: UInt64, data: [UInt8])
    case chunk(flags: UInt16, type: UInt16, cookie: UInt64, payload: [UInt8])
}

/// Parses transmission-phase replies. `readLengths` maps cookies of successful simple READ replies to the
/// number of data bytes that follow (simple replies do not carry their own length).
func parseReplies(_ bytes: [UInt8], readLengths: [UInt64: Int] = [:],
                  file: StaticString = #filePath, line: UInt = #line) -> [ServerReply] {
    var r = Reader(bytes)
    var out: [ServerReply] = []
    while !r.atEnd {
        guard let magic = r.int(UInt32.self) else { XCTFail("truncated reply", file: file, line: line); break }
        switch magic {
        case 0x6744_6698:
            guard let error = r.int(UInt32.self), let cookie = r.int(UInt64.self) else {
                XCTFail("truncated simple reply", file: file, line: line); return out
            }
            let n = error == 0 ? (readLengths[cookie] ?? 0) : 0
            guard let data = r.take(n) else { XCTFail("truncated simple reply data", file: file, line: line); return out }
            out.append(.simple(error: error, cookie: cookie, data: data))
        case 0x668e_33ef:
            guard let flags = r.int(UInt16.self), let type = r.int(UInt16.self), let cookie = r.int(UInt64.self),
                  let length = r.int(UInt32.self), let payload = r.take(Int(length))
            else { XCTFail("truncated structured reply", file: file, line: line); return out }
            out.append(.chunk(flags: flags, type: type, cookie: cookie, payload: payload))
        default:
            XCTFail("bad reply magic 0x\(String(magic, radix: 16))", file: file, line: line)
            return out
        }
    }
    return out
}

// MARK: state machine actions

extension NBDServerStateMachine.Action {
    /// The bytes of a handshake reply action that keeps the connection open (encoded as the handler does).
    var sent: [UInt8]? {
        switch self {
        case .sendGreeting, .sendOptionReply, .sendExportList, .sendExportInfo, .sendMetaContexts:
            return handshakeReply?.bytes
        default: return nil
        }
    }
    var sentAndClosed: [UInt8]? {
        guard case .sendOptionReplyAndClose = self else { return nil }
        return handshakeReply?.bytes
    }
    var closeReason: String? { if case .close(let r) = self { return r } else { return nil } }
    var transmission: (bytes: [UInt8], session: NBDSession)? {
        guard case .enterTransmission(let s, _) = self, let bytes = handshakeReply?.bytes else { return nil }
        return (bytes, s)
    }
    var transmissionReply: NBDTransmissionReply? {
        if case .enterTransmission(_, let r) = self { return r } else { return nil }
    }
    var request: (request: NBDRequest, payload: ByteBuffer?)? {
        if case .request(let r, let p) = self { return (r, p) } else { return nil }
    }
    var rejection: NBDRejection? { if case .reject(let r) = self { return r } else { return nil } }
    var isDisconnect: Bool { if case .disconnect = self { return true } else { return false } }
}

/// Feeds `bytes` one byte at a time and checks that no action appears before the last byte, and exactly
/// one action appears at the last byte. Returns that action (nil, after failing the test, if none).
func feedByteByByte(_ machine: inout NBDServerStateMachine, _ bytes: [UInt8],
                    file: StaticString = #filePath, line: UInt = #line) -> NBDServerStateMachine.Action? {
    precondition(!bytes.isEmpty)
    var buffer = ByteBuffer()
    for (i, byte) in bytes.enumerated() {
        buffer.writeInteger(byte)
        let action = machine.next(from: &buffer)
        if i < bytes.count - 1 {
            if let action {
                XCTFail("unexpected action \(action) after byte \(i + 1) of \(bytes.count)", file: file, line: line)
                return action
            }
        } else {
            guard let action else {
                XCTFail("no action after the last of \(bytes.count) bytes", file: file, line: line)
                return nil
            }
            if action.closeReason == nil {
                XCTAssertEqual(buffer.readableBytes, 0, "message not fully consumed", file: file, line: line)
            }
            var empty = ByteBuffer()
            XCTAssertNil(machine.next(from: &empty), "more than one action for one message", file: file, line: line)
            return action
        }
    }
    return nil
}

/// Feeds `bytes` in one go and returns every action produced, in order.
func feedAll(_ machine: inout NBDServerStateMachine, _ bytes: [UInt8]) -> [NBDServerStateMachine.Action] {
    var buffer = Wire.buffer(bytes)
    var out: [NBDServerStateMachine.Action] = []
    while let a = machine.next(from: &buffer) { out.append(a) }
    return out
}

// MARK: lazy export

/// An in-memory source whose event-loop reads complete only when the test says so (while held), or at
/// once (otherwise), on the test's thread: with an `EmbeddedEventLoop` everything a pull does happens
/// in a known order, and "nothing happened" is a fact, not the outcome of a sleep. Counts every read.
final class FakeSource: RemoteSource, @unchecked Sendable {
    let data: [UInt8]
    let zeroRanges: [Range<UInt64>]
    private let lock = NIOLock()
    private var reads: [(UInt64, Int)] = []
    private var held = false
    private var pending: [(offset: UInt64, length: Int, promise: EventLoopPromise<ByteBuffer>,
                           report: (@Sendable (ByteBuffer) -> Void)?)] = []
    private var closed = false

    /// When set, event-loop reads report their data through `onArrival` before the future completes,
    /// as the libnbd source does on its own thread.
    let callsOnArrival: Bool

    init(data: [UInt8], zeroRanges: [Range<UInt64>] = [], callsOnArrival: Bool = false) {
        self.data = data
        self.zeroRanges = zeroRanges
        self.callsOnArrival = callsOnArrival
    }

    var isConnected: Bool { lock.withLock { !closed } }
    var size: UInt64 { UInt64(data.count) }
    var supportsExtents: Bool { true }
    var readLog: [(UInt64, Int)] { lock.withLock { reads } }
    /// Reads sent and not answered yet.
    var pendingCount: Int { lock.withLock { pending.count } }
    var wasClosed: Bool { lock.withLock { closed } }

    func bytes(offset: UInt64, length: Int) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeBytes(data[Int(offset) ..< Int(offset) + length])
        return b
    }

    func read(offset: UInt64, length: Int, eventLoop: any EventLoop,
              onArrival: (@Sendable (ByteBuffer) -> Void)?) -> EventLoopFuture<ByteBuffer> {
        let promise = eventLoop.makePromise(of: ByteBuffer.self)
        let report = callsOnArrival ? onArrival : nil
        let hold = lock.withLock { () -> Bool in
            reads.append((offset, length))
            if held { pending.append((offset, length, promise, report)) }
            return held
        }
        if !hold { answer(offset: offset, length: length, promise: promise, report: report) }
        return promise.futureResult
    }

    private func answer(offset: UInt64, length: Int, promise: EventLoopPromise<ByteBuffer>,
                        report: (@Sendable (ByteBuffer) -> Void)?) {
        let data = bytes(offset: offset, length: length)
        report?(data)
        promise.succeed(data)
    }

    /// From now on reads wait until `release()` or `releaseNext()`.
    func hold() { lock.withLock { held = true } }

    /// Answers every waiting read, oldest first, and stops holding.
    func release() {
        let waiting = lock.withLock { () -> [(UInt64, Int, EventLoopPromise<ByteBuffer>, (@Sendable (ByteBuffer) -> Void)?)] in
            held = false
            defer { pending = [] }
            return pending.map { ($0.offset, $0.length, $0.promise, $0.report) }
        }
        for (offset, length, promise, report) in waiting { answer(offset: offset, length: length, promise: promise, report: report) }
    }

    /// Answers the oldest waiting read only (still holding the others); false when none waits.
    @discardableResult
    func releaseNext() -> Bool {
        let next = lock.withLock { pending.isEmpty ? nil : pending.removeFirst() }
        guard let next else { return false }
        answer(offset: next.offset, length: next.length, promise: next.promise, report: next.report)
        return true
    }

    func read(offset: UInt64, length: Int) async throws -> ByteBuffer {
        lock.withLock { reads.append((offset, length)) }
        return bytes(offset: offset, length: length)
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

    func close() { lock.withLock { closed = true } }
}

/// A test image of `pages` 4 KiB pages, every byte depending on its offset and page, with the
/// `zeroRanges` (byte ranges) zeroed.
func fakeImage(pages: Int, zeroRanges: [Range<UInt64>] = []) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: pages * 4096)
    for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: i &* 31 &+ i / 4096 &+ 7) }
    for z in zeroRanges { for i in z { bytes[Int(i)] = 0 } }
    return bytes
}

/// A thread pool for the lazy export's chores (commits, closing the source), shared by the tests.
let lazyTestPool: NIOThreadPool = {
    let p = NIOThreadPool(numberOfThreads: 1)
    p.start()
    return p
}()

/// The result of a future on an `EmbeddedEventLoop`: runs the loop first; fails if it is still pending.
func result<T: Sendable>(_ future: EventLoopFuture<T>, on loop: EmbeddedEventLoop,
                         file: StaticString = #filePath, line: UInt = #line) throws -> T {
    let box = NIOLockedValueBox<Result<T, any Error>?>(nil)
    future.whenComplete { r in box.withLockedValue { $0 = r } }
    loop.run()
    guard let r = box.withLockedValue({ $0 }) else {
        XCTFail("the future is still pending", file: file, line: line)
        throw PendingFuture()
    }
    return try r.get()
}

/// Whether a future on an `EmbeddedEventLoop` has completed (after running the loop).
func isDone<T: Sendable>(_ future: EventLoopFuture<T>, on loop: EmbeddedEventLoop) -> Bool {
    let box = NIOLockedValueBox(false)
    future.whenComplete { _ in box.withLockedValue { $0 = true } }
    loop.run()
    return box.withLockedValue { $0 }
}

struct PendingFuture: Error {}

/// Runs async work from a synchronous test (whose thread owns an `EmbeddedEventLoop`) and waits for it.
func blocking<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) throws -> T {
    let done = DispatchSemaphore(value: 0)
    let box = NIOLockedValueBox<Result<T, any Error>?>(nil)
    Task.detached {
        let r: Result<T, any Error>
        do { r = .success(try await body()) } catch { r = .failure(error) }
        box.withLockedValue { $0 = r }
        done.signal()
    }
    done.wait()
    guard let r = box.withLockedValue({ $0 }) else { throw PendingFuture() }
    return try r.get()
}
