import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
import XCTest
@testable import NbdPager

/// Storage whose `prepare` (and, when `lazy`, `pendingRead`) waits until the test releases it: requests
/// stay in flight as long as a test needs, so the connection's lifecycle can be driven step by step.
final class GatedBackend: BlockBackend, @unchecked Sendable {
    let inner: FileBackend
    let lazy: Bool
    /// Event loop only (the EmbeddedChannel's, i.e. the test thread).
    var prepared: [EventLoopPromise<Void>] = []
    var reads: [(offset: UInt64, length: UInt64, promise: EventLoopPromise<ByteBuffer>)] = []

    init(size: UInt64, lazy: Bool = false) throws {
        inner = try FileBackend.memory(size: size)
        self.lazy = lazy
    }

    var size: UInt64 { inner.size }
    var capabilities: BackendCapabilities {
        var c = inner.capabilities
        c.pendingReads = lazy
        return c
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64, nonBlocking: Bool) throws -> Int {
        try inner.read(into: buffer, offset: offset, nonBlocking: nonBlocking)
    }
    func write(from buffer: UnsafeRawBufferPointer, offset: UInt64, fua: Bool, nonBlocking: Bool) throws -> Int {
        try inner.write(from: buffer, offset: offset, fua: fua, nonBlocking: nonBlocking)
    }
    func flush() throws { try inner.flush() }
    func trim(offset: UInt64, length: UInt64, fua: Bool) throws { try inner.trim(offset: offset, length: length, fua: fua) }
    func zero(offset: UInt64, length: UInt64, mayTrim: Bool, fast: Bool, fua: Bool) throws {
        try inner.zero(offset: offset, length: length, mayTrim: mayTrim, fast: fast, fua: fua)
    }
    func cache(offset: UInt64, length: UInt64) throws { try inner.cache(offset: offset, length: length) }
    func blockStatus(offset: UInt64, length: UInt64, maxExtents: Int) throws -> [NBDExtent] {
        try inner.blockStatus(offset: offset, length: length, maxExtents: maxExtents)
    }
    func close() throws { try inner.close() }

    func prepare(offset: UInt64, length: UInt64, forWrite: Bool, eventLoop: any EventLoop) -> EventLoopFuture<Void>? {
        let p = eventLoop.makePromise(of: Void.self)
        prepared.append(p)
        return p.futureResult
    }

    func pendingRead(offset: UInt64, length: UInt64, eventLoop: any EventLoop,
                     early: (@Sendable (ByteBuffer) -> Void)?) -> EventLoopFuture<ByteBuffer>? {
        guard lazy else { return nil }
        let p = eventLoop.makePromise(of: ByteBuffer.self)
        reads.append((offset, length, p))
        return p.futureResult
    }

    /// Lets the oldest waiting `prepare` go.
    func releaseOne() { if !prepared.isEmpty { prepared.removeFirst().succeed(()) } }
    func releaseAll() { while !prepared.isEmpty { releaseOne() } }
}

/// Counts the reads that the connection handler lets through to the channel.
final class ReadCounter: ChannelOutboundHandler {
    typealias OutboundIn = Any
    var reads = 0
    func read(context: ChannelHandlerContext) {
        reads += 1
        context.read()
    }
}

/// The connection's lifecycle (back-pressure, DISC, half-close, shutdown) and the request executor's
/// asynchronous paths, through EmbeddedChannel.
final class HandlerLifecycleTests: XCTestCase {
    static let size: UInt64 = 1 << 20

    struct Harness {
        let connection: HandlerTests.Harness
        let backend: GatedBackend
        let reads = ReadCounter()
        var channel: EmbeddedChannel { connection.channel }
        var tracker: ConnectionTracker { connection.tracker }

        init(lazy: Bool = false) throws {
            backend = try GatedBackend(size: HandlerLifecycleTests.size, lazy: lazy)
            let export = Export(name: "mem", description: "", backend: backend, readOnly: false,
                                minimumBlockSize: 1, threadPool: HandlerTests.pool)
            connection = try HandlerTests.Harness(export: export, before: [reads])
        }

        func feed(_ bytes: [UInt8]) throws { try connection.feed(bytes) }
        func output() throws -> [UInt8] { try connection.output() }

        func handshake(structured: Bool = false) throws {
            _ = try output()
            try feed(Wire.be(UInt32(3)) + (structured ? Wire.option(Opt.structuredReply) : [])
                     + Wire.option(Opt.go, Wire.infoPayload(name: "mem", requests: [])))
            XCTAssertEqual(parseOptionReplies(try output()).last?.type, RT.ack)
        }
    }

    /// CACHE requests (cookies 0 ...), as many as may be in flight; each waits in the gated backend.
    static func requestsFillingTheInFlightLimit() -> [UInt8] {
        (0 ..< ConnectionLifecycle.maxInFlight).flatMap {
            Wire.request(.cache, cookie: UInt64($0), offset: 0, length: 4096)
        }
    }

    func harness(lazy: Bool = false) throws -> Harness {
        let h = try Harness(lazy: lazy)
        addTeardownBlock {
            h.backend.releaseAll()
            for r in h.backend.reads { r.promise.fail(NBDErrno.eio) }
            _ = try? h.channel.finish()
        }
        return h
    }

    func testAsynchronousRequestsAnswerOutOfOrder() throws {
        let h = try harness()
        try h.handshake()
        try h.feed(Wire.request(.trim, cookie: 1, offset: 0, length: 4096)
                   + Wire.request(.flush, cookie: 2, offset: 0, length: 0))
        XCTAssertEqual(parseReplies(try h.output()), [.simple(error: 0, cookie: 2, data: [])],
                       "FLUSH needs no prepare and overtakes the waiting TRIM")
        XCTAssertEqual(h.backend.prepared.count, 1)
        h.backend.releaseOne()
        XCTAssertEqual(parseReplies(try h.output()), [.simple(error: 0, cookie: 1, data: [])])
        XCTAssertTrue(h.channel.isActive)
    }

    func testPrepareFailureIsAnErrorReply() throws {
        let h = try harness()
        try h.handshake(structured: true)
        try h.feed(Wire.request(.write, cookie: 5, offset: 0, length: 4) + [1, 2, 3, 4])
        h.backend.prepared.removeFirst().fail(NBDErrno.enospc)
        guard case .chunk(1, 0x8001, 5, let payload)? = parseReplies(try h.output()).first else {
            return XCTFail("expected an error chunk")
        }
        XCTAssertEqual(Array(payload.prefix(4)), Wire.be(UInt32(28)))
    }

    func testHalfCloseAnswersInFlightRequestsThenCloses() throws {
        let h = try harness()
        try h.handshake()
        try h.feed(Wire.request(.cache, cookie: 1, offset: 0, length: 4096))
        h.channel.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        XCTAssertTrue(h.channel.isActive, "a request is still in flight")
        h.backend.releaseOne()
        XCTAssertEqual(parseReplies(try h.output()), [.simple(error: 0, cookie: 1, data: [])])
        XCTAssertFalse(h.channel.isActive)
        XCTAssertEqual(h.tracker.count, 0)
    }

    func testDisconnectWaitsForInFlightRequests() throws {
        let h = try harness()
        try h.handshake()
        try h.feed(Wire.request(.cache, cookie: 1, offset: 0, length: 4096)
                   + Wire.request(.disconnect, cookie: 2, offset: 0, length: 0)
                   + Wire.request(.flush, cookie: 3, offset: 0, length: 0))
        XCTAssertEqual(try h.output(), [], "nothing after DISC is parsed")
        XCTAssertTrue(h.channel.isActive)
        h.backend.releaseOne()
        XCTAssertEqual(parseReplies(try h.output()), [.simple(error: 0, cookie: 1, data: [])])
        XCTAssertFalse(h.channel.isActive)
    }

    func testShutdownFinishesStartedRequestsAndRefusesTheRest() throws {
        let h = try harness()
        try h.handshake()
        // Fill the in-flight limit, so that the next requests stay buffered (parse held).
        var bytes = Self.requestsFillingTheInFlightLimit()
        bytes += Wire.request(.flush, cookie: 1000, offset: 0, length: 0)
        bytes += Wire.request(.read, cookie: 1001, offset: 0, length: 8)
        try h.feed(bytes)
        XCTAssertEqual(try h.output(), [], "the FLUSH and READ wait behind the in-flight limit")
        XCTAssertEqual(h.backend.prepared.count, ConnectionLifecycle.maxInFlight)
        h.channel.pipeline.fireUserInboundEventTriggered(ShutdownEvent())
        XCTAssertEqual(parseReplies(try h.output()), [.simple(error: 108, cookie: 1000, data: []),
                                                      .simple(error: 108, cookie: 1001, data: [])],
                       "requests not started are refused with ESHUTDOWN at once")
        XCTAssertTrue(h.channel.isActive, "started requests are still answered")
        h.backend.releaseAll()
        let replies = parseReplies(try h.output())
        XCTAssertEqual(replies.count, ConnectionLifecycle.maxInFlight)
        XCTAssertTrue(replies.allSatisfy { if case .simple(0, _, _) = $0 { return true } else { return false } })
        XCTAssertFalse(h.channel.isActive)
    }

    func testBackPressureHoldsParsingAndReadingUntilARequestFinishes() throws {
        let h = try harness()
        try h.handshake()
        var bytes = Self.requestsFillingTheInFlightLimit()
        bytes += Wire.request(.flush, cookie: 1000, offset: 0, length: 0)
        try h.feed(bytes)
        let readsBefore = h.reads.reads
        h.channel.read()
        XCTAssertEqual(h.reads.reads, readsBefore, "the read is held at the in-flight limit")
        XCTAssertEqual(try h.output(), [])
        h.backend.releaseOne()
        XCTAssertEqual(parseReplies(try h.output()), [.simple(error: 0, cookie: 0, data: []),
                                                      .simple(error: 0, cookie: 1000, data: [])],
                       "a finished request lets the held FLUSH be parsed")
        XCTAssertEqual(h.reads.reads, readsBefore + 1, "then the held read resumes (the FLUSH ran inline)")
        h.channel.read()
        XCTAssertEqual(h.reads.reads, readsBefore + 2, "reads pass while below the limit")
        XCTAssertTrue(h.channel.isActive)
    }

    func testShutdownOrHalfCloseDuringTheHandshakeCloses() throws {
        let h = try harness()
        _ = try h.output()
        try h.feed(Wire.be(UInt32(3)))
        h.channel.pipeline.fireUserInboundEventTriggered(ShutdownEvent())
        XCTAssertFalse(h.channel.isActive)
        XCTAssertEqual(h.tracker.count, 0)

        let g = try harness()
        _ = try g.output()
        g.channel.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        XCTAssertFalse(g.channel.isActive)
    }

    func testNothingIsParsedOrAnsweredAfterABadMagic() throws {
        let h = try harness()
        try h.handshake()
        try h.feed(Wire.request(magic: 1, type: 0, cookie: 1, offset: 0, length: 1)
                   + Wire.request(.flush, cookie: 2, offset: 0, length: 0))
        XCTAssertEqual(try h.output(), [])
        XCTAssertFalse(h.channel.isActive)
        XCTAssertTrue(h.backend.prepared.isEmpty)
    }

    func testPendingReadOfALazyExportIsAnsweredFromItsData() throws {
        let h = try harness(lazy: true)
        try h.handshake(structured: true)
        try h.feed(Wire.request(.read, cookie: 0x77, offset: 4096, length: 8))
        XCTAssertEqual(try h.output(), [])
        XCTAssertEqual(h.backend.reads.count, 1)
        XCTAssertEqual(h.backend.reads.first?.offset, 4096)
        h.backend.reads.removeFirst().promise.succeed(Wire.buffer(Wire.pattern(8)))
        XCTAssertEqual(parseReplies(try h.output()),
                       [.chunk(flags: 1, type: 1, cookie: 0x77, payload: Wire.be(UInt64(4096)) + Wire.pattern(8))])
    }

    func testPendingReadFailureIsAnErrorReply() throws {
        let h = try harness(lazy: true)
        try h.handshake()
        try h.feed(Wire.request(.read, cookie: 3, offset: 0, length: 8))
        h.backend.reads.removeFirst().promise.fail(NBDErrno.eio)
        XCTAssertEqual(parseReplies(try h.output()), [.simple(error: 5, cookie: 3, data: [])])
        XCTAssertTrue(h.channel.isActive)
    }
}
