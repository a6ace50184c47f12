import Logging
import NIOCore
import NIOEmbedded
import NIOPosix
import XCTest
@testable import NbdPager

final class HandlerTests: XCTestCase {
    static let pool: NIOThreadPool = {
        let p = NIOThreadPool(numberOfThreads: 1)
        p.start()
        return p
    }()

    static let size: UInt64 = 1 << 20

    /// A connected EmbeddedChannel running NBDConnectionHandler over a fresh memory export.
    struct Harness {
        let channel: EmbeddedChannel
        let export: Export
        let tracker: ConnectionTracker

        init(readOnly: Bool = false, minimumBlockSize: UInt32 = 1) throws {
            let backend = try FileBackend.memory(size: HandlerTests.size)
            try self.init(export: Export(name: "mem", description: "memory export", backend: backend, readOnly: readOnly,
                                         minimumBlockSize: minimumBlockSize, threadPool: HandlerTests.pool))
        }

        /// The handler over `export`, with `before` added to the pipeline ahead of it.
        init(export: Export, before: [any ChannelHandler] = []) throws {
            self.export = export
            tracker = ConnectionTracker()
            var logger = Logger(label: "test")
            logger.logLevel = .critical
            channel = EmbeddedChannel()
            for handler in before { try channel.pipeline.syncOperations.addHandler(handler) }
            try channel.pipeline.syncOperations.addHandler(
                NBDConnectionHandler(exports: [export], tracker: tracker, logger: logger))
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 10809)).wait()
        }

        /// Delivers bytes as one read and completes the read, as a socket channel would.
        func feed(_ bytes: [UInt8]) throws {
            try channel.writeInbound(Wire.buffer(bytes))
            channel.pipeline.fireChannelReadComplete()
        }

        /// Everything written and flushed so far.
        func output() throws -> [UInt8] {
            var out: [UInt8] = []
            while let b = try channel.readOutbound(as: ByteBuffer.self) { out += b.bytes }
            return out
        }

        /// Greeting, client flags and GO; returns the bytes of the GO reply.
        @discardableResult
        func handshake(structured: Bool = false, metaContext: Bool = false) throws -> [OptionReply] {
            XCTAssertEqual(try output().count, 18, "greeting")
            var bytes = Wire.be(UInt32(3))
            if structured { bytes += Wire.option(Opt.structuredReply) }
            if metaContext {
                bytes += Wire.option(Opt.setMetaContext, Wire.metaPayload(name: "mem", queries: ["base:allocation"]))
            }
            bytes += Wire.option(Opt.go, Wire.infoPayload(name: "mem", requests: [1, 2, 3]))
            try feed(bytes)
            let replies = parseOptionReplies(try output())
            XCTAssertEqual(replies.last?.option, Opt.go)
            XCTAssertEqual(replies.last?.type, RT.ack)
            return replies
        }

        func finish() {
            _ = try? channel.finish()
        }
    }

    func harness(readOnly: Bool = false, minimumBlockSize: UInt32 = 1) throws -> Harness {
        let h = try Harness(readOnly: readOnly, minimumBlockSize: minimumBlockSize)
        addTeardownBlock { h.finish() }
        return h
    }

    // MARK: handshake

    func testGreetingOnActivation() throws {
        let h = try harness()
        XCTAssertEqual(Wire.hex(try h.output()), "4e42444d41474943" + "49484156454f5054" + "0003")
        XCTAssertEqual(h.tracker.count, 1)
        XCTAssertTrue(h.channel.isActive)
    }

    func testFullGoHandshake() throws {
        let h = try harness()
        let replies = try h.handshake()
        XCTAssertEqual(replies.map(\.type), [RT.info, RT.info, RT.info, RT.info, RT.ack])
        guard replies.count == 5 else { return }
        var r = Reader(replies[0].data)
        XCTAssertEqual(r.int(UInt16.self), 0)
        XCTAssertEqual(r.int(UInt64.self), Self.size)
        XCTAssertEqual(r.int(UInt16.self), h.export.info.transmissionFlags(structuredReplies: false).rawValue)
        XCTAssertEqual(replies[1].data, Wire.be(UInt16(1)) + Array("mem".utf8))
        XCTAssertEqual(replies[2].data, Wire.be(UInt16(2)) + Array("memory export".utf8))
        XCTAssertEqual(replies[3].data, Wire.be(UInt16(3)) + Wire.be(UInt32(1)) + Wire.be(UInt32(4096)) + Wire.be(UInt32(32 << 20)))
        XCTAssertTrue(h.channel.isActive)
    }

    func testAbortSendsAckAndCloses() throws {
        let h = try harness()
        _ = try h.output()
        try h.feed(Wire.be(UInt32(3)) + Wire.option(Opt.abort))
        XCTAssertEqual(parseOptionReplies(try h.output()), [OptionReply(option: Opt.abort, type: RT.ack, data: [])])
        XCTAssertFalse(h.channel.isActive)
        XCTAssertEqual(h.tracker.count, 0)
    }

    func testUnknownClientFlagsClose() throws {
        let h = try harness()
        _ = try h.output()
        try h.feed(Wire.be(UInt32(0x80)))
        XCTAssertEqual(try h.output(), [])
        XCTAssertFalse(h.channel.isActive)
    }

    // MARK: transmission

    func testWriteThenReadSimpleReply() throws {
        let h = try harness()
        try h.handshake()
        let data = Wire.pattern(4096, seed: 5)
        try h.feed(Wire.request(.write, cookie: 1, offset: 8192, length: 4096) + data)
        XCTAssertEqual(parseReplies(try h.output()), [.simple(error: 0, cookie: 1, data: [])])
        try h.feed(Wire.request(.read, cookie: 2, offset: 8192 - 16, length: 4096 + 32))
        let out = try h.output()
        XCTAssertEqual(out.count, 16 + 4096 + 32)
        XCTAssertEqual(parseReplies(out, readLengths: [2: 4096 + 32]),
                       [.simple(error: 0, cookie: 2, data: [UInt8](repeating: 0, count: 16) + data + [UInt8](repeating: 0, count: 16))])
    }

    func testStructuredReadReply() throws {
        let h = try harness()
        try h.handshake(structured: true)
        let data = Wire.pattern(1000, seed: 8)
        try h.feed(Wire.request(.write, cookie: 1, offset: 500, length: 1000) + data)
        XCTAssertEqual(parseReplies(try h.output()), [.simple(error: 0, cookie: 1, data: [])])
        try h.feed(Wire.request(.read, flags: [.dontFragment], cookie: 0xfeed, offset: 500, length: 1000))
        let replies = parseReplies(try h.output())
        XCTAssertEqual(replies.count, 1)
        guard case .chunk(let flags, let type, let cookie, let payload)? = replies.first else {
            return XCTFail("expected a structured chunk, got \(replies)")
        }
        XCTAssertEqual(flags, 1, "DONE")
        XCTAssertEqual(type, 1, "OFFSET_DATA")
        XCTAssertEqual(cookie, 0xfeed)
        XCTAssertEqual(payload.count, 8 + 1000)
        XCTAssertEqual(Array(payload.prefix(8)), Wire.be(UInt64(500)))
        XCTAssertEqual(Array(payload.dropFirst(8)), data)
    }

    func testInvalidRequestGetsErrorAndConnectionStaysOpen() throws {
        let h = try harness()
        try h.handshake()
        try h.feed(Wire.request(.read, cookie: 7, offset: Self.size, length: 512))
        XCTAssertEqual(parseReplies(try h.output()), [.simple(error: 22, cookie: 7, data: [])])
        XCTAssertTrue(h.channel.isActive)
        try h.feed(Wire.request(flags: 0, type: 77, cookie: 8, offset: 0, length: 1))
        XCTAssertEqual(parseReplies(try h.output()), [.simple(error: 22, cookie: 8, data: [])])
        try h.feed(Wire.request(.read, cookie: 9, offset: 0, length: 4))
        XCTAssertEqual(parseReplies(try h.output(), readLengths: [9: 4]), [.simple(error: 0, cookie: 9, data: [0, 0, 0, 0])])
        XCTAssertTrue(h.channel.isActive)
    }

    func testInvalidRequestStructuredErrorChunk() throws {
        let h = try harness()
        try h.handshake(structured: true)
        try h.feed(Wire.request(.read, cookie: 7, offset: Self.size - 1, length: 2))
        let replies = parseReplies(try h.output())
        guard case .chunk(let flags, let type, let cookie, let payload)? = replies.first, replies.count == 1 else {
            return XCTFail("expected one error chunk, got \(replies)")
        }
        XCTAssertEqual(flags, 1)
        XCTAssertEqual(type, 0x8001)
        XCTAssertEqual(cookie, 7)
        var r = Reader(payload)
        XCTAssertEqual(r.int(UInt32.self), 22)
        XCTAssertEqual(r.int(UInt16.self).map(Int.init), r.remaining)
        XCTAssertTrue(h.channel.isActive)
    }

    func testInvalidWriteOnReadOnlyExportDiscardsPayload() throws {
        let h = try harness(readOnly: true)
        try h.handshake()
        try h.feed(Wire.request(.write, cookie: 1, offset: 0, length: 64) + [UInt8](repeating: 0x25, count: 64)
                   + Wire.request(.read, cookie: 2, offset: 0, length: 8))
        XCTAssertEqual(parseReplies(try h.output(), readLengths: [2: 8]),
                       [.simple(error: 1, cookie: 1, data: []), .simple(error: 0, cookie: 2, data: [UInt8](repeating: 0, count: 8))])
        XCTAssertTrue(h.channel.isActive)
    }

    func testBadMagicClosesChannel() throws {
        let h = try harness()
        try h.handshake()
        try h.feed(Wire.request(magic: 0x1234_5678, type: 0, cookie: 1, offset: 0, length: 512))
        XCTAssertEqual(try h.output(), [])
        XCTAssertFalse(h.channel.isActive)
        XCTAssertEqual(h.tracker.count, 0)
    }

    func testDisconnectClosesChannel() throws {
        let h = try harness()
        try h.handshake()
        try h.feed(Wire.request(.disconnect, cookie: 1, offset: 0, length: 0))
        XCTAssertEqual(try h.output(), [], "DISC has no reply")
        XCTAssertFalse(h.channel.isActive)
    }

    func testRequestsSplitAcrossManyReads() throws {
        let h = try harness()
        try h.handshake()
        let data = Wire.pattern(5000, seed: 2)
        let bytes = Wire.request(.write, cookie: 11, offset: 100, length: 5000) + data
            + Wire.request(.read, cookie: 12, offset: 100, length: 5000)
        var i = 0
        var replies: [UInt8] = []
        while i < bytes.count {
            let end = min(i + 7, bytes.count)
            try h.feed(Array(bytes[i..<end]))
            let out = try h.output()
            if end < 28 + 5000 { XCTAssertEqual(out, [], "reply before the write payload was complete") }
            replies += out
            i = end
        }
        XCTAssertEqual(parseReplies(replies, readLengths: [12: 5000]),
                       [.simple(error: 0, cookie: 11, data: []), .simple(error: 0, cookie: 12, data: data)])
    }

    func testHandshakeByteByByte() throws {
        let h = try harness()
        _ = try h.output()
        let bytes = Wire.be(UInt32(1)) + Wire.option(Opt.exportName, Array("mem".utf8))
        for b in bytes.dropLast() {
            try h.feed([b])
            XCTAssertEqual(try h.output(), [])
        }
        try h.feed([bytes.last!])
        let out = try h.output()
        XCTAssertEqual(out.count, 134)
        XCTAssertEqual(Array(out.prefix(8)), Wire.be(Self.size))
    }

    func testPipelinedRequestsAllAnswered() throws {
        let h = try harness()
        try h.handshake(structured: true, metaContext: true)
        let a = Wire.pattern(4096, seed: 1)
        var bytes: [UInt8] = []
        bytes += Wire.request(.write, cookie: 1, offset: 0, length: 4096) + a
        bytes += Wire.request(.read, cookie: 2, offset: 0, length: 4096)
        bytes += Wire.request(.flush, cookie: 3, offset: 0, length: 0)
        bytes += Wire.request(.writeZeroes, flags: [.noHole], cookie: 4, offset: 0, length: 1024)
        bytes += Wire.request(.read, cookie: 5, offset: 0, length: 2048)
        bytes += Wire.request(.trim, cookie: 6, offset: 8192, length: 4096)
        bytes += Wire.request(.blockStatus, cookie: 7, offset: 0, length: UInt32(Self.size))
        bytes += Wire.request(.cache, cookie: 8, offset: 0, length: 4096)
        bytes += Wire.request(.read, cookie: 9, offset: Self.size, length: 1)
        try h.feed(bytes)
        let replies = parseReplies(try h.output())
        XCTAssertEqual(replies.count, 9, "\(replies)")
        guard replies.count == 9 else { return }
        XCTAssertEqual(replies[0], .simple(error: 0, cookie: 1, data: []))
        XCTAssertEqual(replies[1], .chunk(flags: 1, type: 1, cookie: 2, payload: Wire.be(UInt64(0)) + a))
        XCTAssertEqual(replies[2], .simple(error: 0, cookie: 3, data: []))
        XCTAssertEqual(replies[3], .simple(error: 0, cookie: 4, data: []))
        XCTAssertEqual(replies[4], .chunk(flags: 1, type: 1, cookie: 5,
                                          payload: Wire.be(UInt64(0)) + [UInt8](repeating: 0, count: 1024) + Array(a[1024..<2048])))
        XCTAssertEqual(replies[5], .simple(error: 0, cookie: 6, data: []))
        // Block status: context 1, data [0, 4 KiB), hole after it to the end.
        let expectedStatus = Wire.be(UInt32(1))
            + Wire.be(UInt32(4096)) + Wire.be(UInt32(0))
            + Wire.be(UInt32(Self.size) - 4096) + Wire.be(UInt32(3))
        XCTAssertEqual(replies[6], .chunk(flags: 1, type: 5, cookie: 7, payload: expectedStatus))
        XCTAssertEqual(replies[7], .simple(error: 0, cookie: 8, data: []))
        guard case .chunk(1, 0x8001, 9, let err) = replies[8] else { return XCTFail("expected error chunk: \(replies[8])") }
        XCTAssertEqual(Array(err.prefix(4)), Wire.be(UInt32(22)))
        XCTAssertTrue(h.channel.isActive)
    }

    func testBlockStatusReqOne() throws {
        let h = try harness()
        try h.handshake(structured: true, metaContext: true)
        try h.feed(Wire.request(.write, cookie: 1, offset: 8192, length: 4096) + Wire.pattern(4096))
        try h.feed(Wire.request(.blockStatus, flags: [.reqOne], cookie: 2, offset: 0, length: UInt32(Self.size)))
        let replies = parseReplies(try h.output())
        XCTAssertEqual(replies.last, .chunk(flags: 1, type: 5, cookie: 2,
                                            payload: Wire.be(UInt32(1)) + Wire.be(UInt32(8192)) + Wire.be(UInt32(3))))
    }

    func testFastZeroOnMemoryExport() throws {
        let h = try harness()
        try h.handshake()
        try h.feed(Wire.request(.write, cookie: 1, offset: 0, length: 8192) + [UInt8](repeating: 0xff, count: 8192))
        try h.feed(Wire.request(.writeZeroes, flags: [.fastZero], cookie: 2, offset: 0, length: 4096))
        try h.feed(Wire.request(.read, cookie: 3, offset: 0, length: 8192))
        XCTAssertEqual(parseReplies(try h.output(), readLengths: [3: 8192]), [
            .simple(error: 0, cookie: 1, data: []),
            .simple(error: 0, cookie: 2, data: []),
            .simple(error: 0, cookie: 3, data: [UInt8](repeating: 0, count: 4096) + [UInt8](repeating: 0xff, count: 4096)),
        ])
    }

    func testMisalignedRequestRejectedOnAlignedExport() throws {
        let h = try harness(minimumBlockSize: 512)
        let replies = try h.handshake()
        guard replies.count >= 4 else { return XCTFail("\(replies)") }
        XCTAssertEqual(Array(replies[3].data.prefix(6)), Wire.be(UInt16(3)) + Wire.be(UInt32(512)))
        try h.feed(Wire.request(.read, cookie: 1, offset: 100, length: 512))
        try h.feed(Wire.request(.read, cookie: 2, offset: 512, length: 512))
        XCTAssertEqual(parseReplies(try h.output(), readLengths: [2: 512]),
                       [.simple(error: 22, cookie: 1, data: []), .simple(error: 0, cookie: 2, data: [UInt8](repeating: 0, count: 512))])
    }
    // MARK: lifecycle

    func testHandshakeTimeoutClosesAndGoCancelsIt() throws {
        let idle = try harness()
        let limit = Int64(ConnectionPolicy.defaultHandshakeSeconds)
        idle.channel.embeddedEventLoop.advanceTime(by: .seconds(limit - 1))
        XCTAssertTrue(idle.channel.isActive)
        idle.channel.embeddedEventLoop.advanceTime(by: .seconds(2))
        XCTAssertFalse(idle.channel.isActive, "a client that never finishes the handshake is dropped")

        let h = try harness()
        try h.handshake()
        h.channel.embeddedEventLoop.advanceTime(by: .seconds(3600))
        XCTAssertTrue(h.channel.isActive, "the handshake timer must not fire in transmission")
    }

    func testShutdownEventClosesIdleConnection() throws {
        let h = try harness()
        try h.handshake()
        h.channel.pipeline.fireUserInboundEventTriggered(ShutdownEvent())
        XCTAssertFalse(h.channel.isActive)
        XCTAssertEqual(h.tracker.count, 0)
    }

    func testConnectionRefusedWhileShuttingDown() throws {
        let tracker = ConnectionTracker()
        _ = tracker.beginShutdown()
        let backend = try FileBackend.memory(size: 4096)
        let export = Export(name: "mem", description: "", backend: backend, readOnly: false, minimumBlockSize: 1,
                            threadPool: Self.pool)
        let channel = EmbeddedChannel()
        defer { _ = try? channel.finish() }
        try channel.pipeline.syncOperations.addHandler(
            NBDConnectionHandler(exports: [export], tracker: tracker, logger: Logger(label: "test")))
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 10809)).wait()
        XCTAssertNil(try channel.readOutbound(as: ByteBuffer.self), "no greeting during shutdown")
        XCTAssertFalse(channel.isActive)
        XCTAssertEqual(tracker.count, 0)
    }
}
