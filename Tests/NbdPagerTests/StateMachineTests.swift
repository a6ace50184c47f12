import NIOCore
import XCTest
@testable import NbdPager

final class StateMachineTests: XCTestCase {
    static let disk = NBDExportInfo(name: "disk", description: "the test disk", size: 1 << 30, minimumBlockSize: 512)
    static let other = NBDExportInfo(name: "other", description: "", size: 8192, readOnly: true)

    /// A machine past the greeting and the client flags, in the options phase.
    func optionsMachine(clientFlags: UInt32 = 3, exports: [NBDExportInfo] = [disk, other],
                        file: StaticString = #filePath, line: UInt = #line) -> NBDServerStateMachine {
        var m = NBDServerStateMachine(exports: exports)
        _ = m.greeting()
        var b = Wire.buffer(Wire.be(clientFlags))
        XCTAssertNil(m.next(from: &b), file: file, line: line)
        XCTAssertEqual(b.readableBytes, 0, file: file, line: line)
        return m
    }

    /// Sends an option byte by byte and returns the parsed replies of a `.send` action.
    func sendOption(_ m: inout NBDServerStateMachine, _ code: UInt32, _ payload: [UInt8] = [],
                    file: StaticString = #filePath, line: UInt = #line) -> [OptionReply] {
        guard let action = feedByteByByte(&m, Wire.option(code, payload), file: file, line: line) else { return [] }
        guard let bytes = action.sent else {
            XCTFail("expected .send, got \(action)", file: file, line: line)
            return []
        }
        XCTAssertFalse(m.isClosed, file: file, line: line)
        XCTAssertFalse(m.isInTransmission, file: file, line: line)
        return parseOptionReplies(bytes, file: file, line: line)
    }

    func go(_ m: inout NBDServerStateMachine, name: String = "disk", requests: [UInt16] = [],
            file: StaticString = #filePath, line: UInt = #line) -> NBDSession? {
        let actions = feedAll(&m, Wire.option(Opt.go, Wire.infoPayload(name: name, requests: requests)))
        guard actions.count == 1, let t = actions[0].transmission else {
            XCTFail("GO did not enter transmission: \(actions)", file: file, line: line)
            return nil
        }
        return t.session
    }

    /// A machine in the transmission phase.
    func transmissionMachine(structured: Bool = false, metaContext: Bool = false,
                             export: NBDExportInfo = NBDExportInfo(name: "disk", size: 1 << 30),
                             file: StaticString = #filePath, line: UInt = #line) -> NBDServerStateMachine {
        var m = optionsMachine(exports: [export], file: file, line: line)
        if structured {
            XCTAssertEqual(feedAll(&m, Wire.option(Opt.structuredReply)).count, 1, file: file, line: line)
        }
        if metaContext {
            let a = feedAll(&m, Wire.option(Opt.setMetaContext, Wire.metaPayload(name: export.name, queries: ["base:allocation"])))
            XCTAssertEqual(a.count, 1, file: file, line: line)
        }
        // (asking for the block sizes, so the advertised 32 MiB maximum holds)
        let session = go(&m, name: export.name, requests: [3], file: file, line: line)
        XCTAssertEqual(session?.structuredReplies, structured, file: file, line: line)
        XCTAssertEqual(session?.baseAllocationContext, metaContext ? 1 : nil, file: file, line: line)
        XCTAssertTrue(m.isInTransmission, file: file, line: line)
        return m
    }

    // MARK: greeting and client flags

    func testGreeting() {
        var m = NBDServerStateMachine(exports: [Self.disk])
        var early = Wire.buffer([0, 0, 0, 3])
        XCTAssertNil(m.next(from: &early), "nothing is parsed before the greeting is sent")
        XCTAssertEqual(Wire.hex(m.greeting().bytes), "4e42444d41474943" + "49484156454f5054" + "0003")
    }

    func testClientFlagsByteByByte() {
        for flags: UInt32 in [0, 1, 2, 3] {
            var m = NBDServerStateMachine(exports: [Self.disk])
            _ = m.greeting()
            var b = ByteBuffer()
            for byte in Wire.be(flags) {
                b.writeInteger(byte)
                XCTAssertNil(m.next(from: &b), "flags \(flags)")
            }
            XCTAssertEqual(b.readableBytes, 0)
            XCTAssertFalse(m.isClosed)
        }
    }

    func testUnknownClientFlagCloses() {
        for flags: UInt32 in [1 << 2, 3 | 1 << 2, 1 << 31, 0xffff_ffff] {
            var m = NBDServerStateMachine(exports: [Self.disk])
            _ = m.greeting()
            guard let a = feedByteByByte(&m, Wire.be(flags)) else { continue }
            XCTAssertNotNil(a.closeReason, "flags 0x\(String(flags, radix: 16)): \(a)")
            XCTAssertTrue(m.isClosed)
            // Nothing more is parsed after a close.
            var more = Wire.buffer(Wire.option(Opt.list))
            XCTAssertNil(m.next(from: &more))
        }
    }

    // MARK: GO / INFO

    func testGoWithInfoRequestsByteByByte() {
        var m = optionsMachine()
        let payload = Wire.infoPayload(name: "disk", requests: [1, 2, 3])
        guard let action = feedByteByByte(&m, Wire.option(Opt.go, payload)) else { return }
        guard let (bytes, session) = action.transmission else { return XCTFail("expected enterTransmission, got \(action)") }
        XCTAssertTrue(m.isInTransmission)
        XCTAssertEqual(session.export, Self.disk)
        XCTAssertFalse(session.structuredReplies)
        XCTAssertNil(session.baseAllocationContext)
        // It asked for the block sizes: the advertised maximum is enforced.
        XCTAssertEqual(session.maximumRequestLength, 32 << 20)

        let replies = parseOptionReplies(bytes)
        XCTAssertTrue(replies.allSatisfy { $0.option == Opt.go }, "\(replies)")
        XCTAssertEqual(replies.map(\.type), [RT.info, RT.info, RT.info, RT.info, RT.ack])
        guard replies.count == 5 else { return }

        // NBD_INFO_EXPORT: type, size, transmission flags.
        var r = Reader(replies[0].data)
        XCTAssertEqual(replies[0].data.count, 12)
        XCTAssertEqual(r.int(UInt16.self), 0)
        XCTAssertEqual(r.int(UInt64.self), 1 << 30)
        XCTAssertEqual(r.int(UInt16.self), Self.disk.transmissionFlags(structuredReplies: false).rawValue)
        // NBD_INFO_NAME
        XCTAssertEqual(replies[1].data, Wire.be(UInt16(1)) + Array("disk".utf8))
        // NBD_INFO_DESCRIPTION
        XCTAssertEqual(replies[2].data, Wire.be(UInt16(2)) + Array("the test disk".utf8))
        // NBD_INFO_BLOCK_SIZE: min, preferred, max.
        XCTAssertEqual(replies[3].data.count, 14)
        var bs = Reader(replies[3].data)
        XCTAssertEqual(bs.int(UInt16.self), 3)
        XCTAssertEqual(bs.int(UInt32.self), 512)
        XCTAssertEqual(bs.int(UInt32.self), 4096)
        XCTAssertEqual(bs.int(UInt32.self), 32 * 1024 * 1024)
        XCTAssertTrue(replies[4].data.isEmpty)
    }

    func testGoWithoutInfoRequestsStillSendsExportInfo() {
        var m = optionsMachine()
        guard let action = feedByteByByte(&m, Wire.option(Opt.go, Wire.infoPayload(name: "other", requests: []))),
              let (bytes, session) = action.transmission
        else { return XCTFail("no transmission") }
        XCTAssertEqual(session.export.name, "other")
        // It never asked for block sizes: up to 64 MiB, as nbdkit accepts.
        XCTAssertEqual(session.maximumRequestLength, 64 << 20)
        let replies = parseOptionReplies(bytes)
        guard !replies.isEmpty else { return XCTFail("no replies") }
        XCTAssertEqual(replies.first?.type, RT.info)
        XCTAssertEqual(replies.last?.type, RT.ack)
        // Neither name nor description when not asked for.
        let infoTypes = replies.filter { $0.type == RT.info }.compactMap { r -> UInt16? in var rd = Reader(r.data); return rd.int() }
        XCTAssertFalse(infoTypes.contains(1))
        XCTAssertFalse(infoTypes.contains(2))
        var r = Reader(replies[0].data)
        _ = r.int(UInt16.self)
        XCTAssertEqual(r.int(UInt64.self), 8192)
        let flags = NBDTransmissionFlags(rawValue: r.int(UInt16.self) ?? 0)
        XCTAssertTrue(flags.contains(.readOnly))
        XCTAssertTrue(flags.contains(.hasFlags))
    }

    func testInfoDoesNotEnterTransmission() {
        var m = optionsMachine()
        let replies = sendOption(&m, Opt.info, Wire.infoPayload(name: "disk", requests: [3]))
        XCTAssertEqual(replies.map(\.type).last, RT.ack)
        XCTAssertTrue(replies.dropLast().allSatisfy { $0.type == RT.info && $0.option == Opt.info })
        XCTAssertNil(m.session)
        // The session continues: GO afterwards works.
        XCTAssertNotNil(go(&m))
    }

    func testMalformedGoIsInvalidAndSessionContinues() {
        var m = optionsMachine()
        let replies = sendOption(&m, Opt.go, Wire.infoPayload(name: "disk", requests: [1]) + [0])
        XCTAssertEqual(replies, [OptionReply(option: Opt.go, type: RT.errInvalid, data: replies.first?.data ?? [])])
        XCTAssertNotNil(go(&m))
    }

    func testGoUnknownExportIsErrUnknownAndSessionContinues() {
        var m = optionsMachine()
        let replies = sendOption(&m, Opt.go, Wire.infoPayload(name: "nope", requests: []))
        XCTAssertEqual(replies.count, 1)
        XCTAssertEqual(replies.first?.type, RT.errUnknown)
        XCTAssertEqual(replies.first?.option, Opt.go)
        let info = sendOption(&m, Opt.info, Wire.infoPayload(name: "nope", requests: []))
        XCTAssertEqual(info.map(\.type), [RT.errUnknown])
        XCTAssertEqual(go(&m, name: "other")?.export.name, "other")
    }

    func testEmptyExportNameSelectsDefaultExport() {
        var m = optionsMachine()
        XCTAssertEqual(go(&m, name: "")?.export, Self.disk)

        var e = optionsMachine()
        guard let a = feedByteByByte(&e, Wire.option(Opt.exportName, [])), let t = a.transmission else {
            return XCTFail("EXPORT_NAME '' did not enter transmission")
        }
        XCTAssertEqual(t.session.export, Self.disk)
    }

    // MARK: EXPORT_NAME

    func testExportNameWithNoZeroes() {
        var m = optionsMachine(clientFlags: 3)
        guard let a = feedByteByByte(&m, Wire.option(Opt.exportName, Array("disk".utf8))),
              let (bytes, session) = a.transmission
        else { return XCTFail("no transmission") }
        XCTAssertEqual(session.export, Self.disk)
        XCTAssertEqual(bytes, Wire.be(UInt64(1 << 30)) + Wire.be(Self.disk.transmissionFlags(structuredReplies: false).rawValue))
    }

    func testExportNameWithoutNoZeroes() {
        var m = optionsMachine(clientFlags: 1)
        guard let a = feedByteByByte(&m, Wire.option(Opt.exportName, Array("other".utf8))),
              let (bytes, session) = a.transmission
        else { return XCTFail("no transmission") }
        XCTAssertEqual(session.export, Self.other)
        XCTAssertEqual(bytes.count, 8 + 2 + 124)
        XCTAssertEqual(Array(bytes.prefix(10)),
                       Wire.be(UInt64(8192)) + Wire.be(Self.other.transmissionFlags(structuredReplies: false).rawValue))
        XCTAssertEqual(Array(bytes.suffix(124)), [UInt8](repeating: 0, count: 124))
    }

    func testExportNameUnknownCloses() {
        var m = optionsMachine()
        guard let a = feedByteByByte(&m, Wire.option(Opt.exportName, Array("missing".utf8))) else { return }
        XCTAssertNotNil(a.closeReason, "\(a)")
        XCTAssertTrue(m.isClosed)
        XCTAssertFalse(m.isInTransmission)
    }

    func testExportNameLongerThan4096Closes() {
        var m = optionsMachine(exports: [Self.disk, NBDExportInfo(name: String(repeating: "a", count: 4097), size: 512)])
        let a = feedAll(&m, Wire.option(Opt.exportName, [UInt8](repeating: 0x61, count: 4097)))
        XCTAssertEqual(a.count, 1)
        XCTAssertNotNil(a.first?.closeReason, "\(a)")
    }

    func testExportNameWithNulCloses() {
        var m = optionsMachine()
        let a = feedAll(&m, Wire.option(Opt.exportName, Array("disk".utf8) + [0]))
        XCTAssertEqual(a.count, 1)
        XCTAssertNotNil(a.first?.closeReason)
    }

    // MARK: other options

    func testUnknownOptionIsUnsupportedAndNextOptionWorks() {
        var m = optionsMachine()
        for code: UInt32 in [0, 4, 11, 12, 99, 0xffff_ffff] {
            let replies = sendOption(&m, code, [1, 2, 3])
            XCTAssertEqual(replies.count, 1, "option \(code)")
            XCTAssertEqual(replies.first?.option, code)
            XCTAssertEqual(replies.first?.type, RT.errUnsup, "option \(code)")
        }
        XCTAssertNotNil(go(&m))
    }

    func testStartTLSIsUnsupported() {
        var m = optionsMachine()
        let replies = sendOption(&m, Opt.startTLS)
        XCTAssertEqual(replies.map(\.type), [RT.errUnsup])
    }

    func testList() {
        var m = optionsMachine()
        let replies = sendOption(&m, Opt.list)
        XCTAssertEqual(replies.map(\.type), [RT.server, RT.server, RT.ack])
        XCTAssertTrue(replies.allSatisfy { $0.option == Opt.list })
        guard replies.count == 3 else { return }
        XCTAssertEqual(replies[0].data, Wire.string("disk") + Array("the test disk".utf8))
        XCTAssertEqual(replies[1].data, Wire.string("other"))
        XCTAssertTrue(replies[2].data.isEmpty)
    }

    func testListWithDataIsInvalid() {
        var m = optionsMachine()
        let replies = sendOption(&m, Opt.list, [0, 0, 0, 0])
        XCTAssertEqual(replies.map(\.type), [RT.errInvalid])
        XCTAssertEqual(sendOption(&m, Opt.list).map(\.type), [RT.server, RT.server, RT.ack])
    }

    func testAbort() {
        var m = optionsMachine()
        guard let a = feedByteByByte(&m, Wire.option(Opt.abort)) else { return }
        guard let bytes = a.sentAndClosed else { return XCTFail("expected sendAndClose, got \(a)") }
        XCTAssertEqual(parseOptionReplies(bytes), [OptionReply(option: Opt.abort, type: RT.ack, data: [])])
        XCTAssertTrue(m.isClosed)
    }

    func testStructuredReplyTwice() {
        var m = optionsMachine()
        XCTAssertEqual(sendOption(&m, Opt.structuredReply), [OptionReply(option: Opt.structuredReply, type: RT.ack, data: [])])
        XCTAssertEqual(sendOption(&m, Opt.structuredReply).map(\.type), [RT.errInvalid])
        let session = go(&m)
        XCTAssertEqual(session?.structuredReplies, true)
        XCTAssertTrue(session?.export.transmissionFlags(structuredReplies: true).contains(.sendDF) ?? false)
    }

    func testStructuredReplyWithDataIsInvalid() {
        var m = optionsMachine()
        XCTAssertEqual(sendOption(&m, Opt.structuredReply, [0]).map(\.type), [RT.errInvalid])
        XCTAssertEqual(go(&m)?.structuredReplies, false)
    }

    func testGoAfterStructuredRepliesAdvertisesDF() {
        var m = optionsMachine()
        _ = sendOption(&m, Opt.structuredReply)
        guard let a = feedAll(&m, Wire.option(Opt.go, Wire.infoPayload(name: "disk", requests: []))).first,
              let (bytes, _) = a.transmission
        else { return XCTFail("no transmission") }
        var r = Reader(parseOptionReplies(bytes).first?.data ?? [])
        _ = r.int(UInt16.self)
        _ = r.int(UInt64.self)
        let flags = NBDTransmissionFlags(rawValue: r.int(UInt16.self) ?? 0)
        XCTAssertTrue(flags.contains(.sendDF))
    }

    func testMetaContextBeforeStructuredRepliesIsInvalid() {
        var m = optionsMachine()
        for code in [Opt.listMetaContext, Opt.setMetaContext] {
            let replies = sendOption(&m, code, Wire.metaPayload(name: "disk", queries: ["base:allocation"]))
            XCTAssertEqual(replies.map(\.type), [RT.errInvalid], "option \(code)")
            XCTAssertEqual(replies.first?.option, code)
        }
        _ = sendOption(&m, Opt.structuredReply)
        XCTAssertNil(go(&m)?.baseAllocationContext, "an invalid SET must not select a context")
    }

    func testListMetaContext() {
        let cases: [([String], Bool)] = [
            ([], true), (["base:"], true), (["base:allocation"], true),
            (["qemu:dirty-bitmap:"], false), (["base:foo"], false), (["x-my:", "base:"], true),
        ]
        for (queries, listed) in cases {
            var m = optionsMachine()
            _ = sendOption(&m, Opt.structuredReply)
            let replies = sendOption(&m, Opt.listMetaContext, Wire.metaPayload(name: "disk", queries: queries))
            if listed {
                XCTAssertEqual(replies.map(\.type), [RT.metaContext, RT.ack], "\(queries)")
                XCTAssertEqual(replies.first?.data, Wire.be(UInt32(0)) + Array("base:allocation".utf8), "\(queries)")
            } else {
                XCTAssertEqual(replies.map(\.type), [RT.ack], "\(queries)")
            }
            // LIST never selects anything.
            XCTAssertNil(go(&m)?.baseAllocationContext, "\(queries)")
        }
    }

    func testSetMetaContextBaseAllocation() {
        var m = optionsMachine()
        _ = sendOption(&m, Opt.structuredReply)
        let replies = sendOption(&m, Opt.setMetaContext, Wire.metaPayload(name: "disk", queries: ["base:allocation"]))
        XCTAssertEqual(replies.map(\.type), [RT.metaContext, RT.ack])
        XCTAssertEqual(replies.first?.data, Wire.be(UInt32(1)) + Array("base:allocation".utf8))
        let session = go(&m)
        XCTAssertEqual(session?.baseAllocationContext, 1)
        XCTAssertEqual(m.session?.baseAllocationContext, 1)
    }

    func testSetMetaContextUnknownSelectsNothing() {
        var m = optionsMachine()
        _ = sendOption(&m, Opt.structuredReply)
        XCTAssertEqual(sendOption(&m, Opt.setMetaContext, Wire.metaPayload(name: "disk", queries: ["base:allocation"])).count, 2)
        // A later SET replaces the selection.
        let replies = sendOption(&m, Opt.setMetaContext, Wire.metaPayload(name: "disk", queries: ["x-foo:bar"]))
        XCTAssertEqual(replies.map(\.type), [RT.ack])
        XCTAssertNil(go(&m)?.baseAllocationContext)
    }

    func testSetMetaContextWithNoQueriesSelectsNothing() {
        var m = optionsMachine()
        _ = sendOption(&m, Opt.structuredReply)
        _ = sendOption(&m, Opt.setMetaContext, Wire.metaPayload(name: "disk", queries: ["base:allocation"]))
        let replies = sendOption(&m, Opt.setMetaContext, Wire.metaPayload(name: "disk", queries: []))
        XCTAssertEqual(replies.map(\.type), [RT.ack])
        XCTAssertNil(go(&m)?.baseAllocationContext)
    }

    func testSetMetaContextForAnotherExportDoesNotApply() {
        var m = optionsMachine()
        _ = sendOption(&m, Opt.structuredReply)
        _ = sendOption(&m, Opt.setMetaContext, Wire.metaPayload(name: "other", queries: ["base:allocation"]))
        XCTAssertNil(go(&m, name: "disk")?.baseAllocationContext)
    }

    func testSetMetaContextUnknownExport() {
        var m = optionsMachine()
        _ = sendOption(&m, Opt.structuredReply)
        let replies = sendOption(&m, Opt.setMetaContext, Wire.metaPayload(name: "nope", queries: ["base:allocation"]))
        XCTAssertEqual(replies.map(\.type), [RT.errUnknown])
    }

    func testMalformedMetaContextIsInvalid() {
        var m = optionsMachine()
        _ = sendOption(&m, Opt.structuredReply)
        let replies = sendOption(&m, Opt.setMetaContext, Wire.metaPayload(name: "disk", queries: ["base:allocation"]) + [9])
        XCTAssertEqual(replies.map(\.type), [RT.errInvalid])
    }

    // MARK: framing limits

    func testBadOptionMagicCloses() {
        var m = optionsMachine()
        var bytes = Wire.option(Opt.list)
        bytes[0] ^= 0xff
        guard let a = feedByteByByte(&m, bytes) else { return }
        XCTAssertNotNil(a.closeReason, "\(a)")
        XCTAssertTrue(m.isClosed)
    }

    func testOptionLengthOver64KiBClosesWithoutWaitingForPayload() {
        var m = optionsMachine()
        let header = Wire.be(UInt64(0x4948_4156_454f_5054)) + Wire.be(Opt.go) + Wire.be(UInt32(64 * 1024 + 1))
        guard let a = feedByteByByte(&m, header) else { return }
        XCTAssertNotNil(a.closeReason, "\(a)")
        XCTAssertTrue(m.isClosed)
    }

    func testOptionOfExactly64KiBIsAccepted() {
        var m = optionsMachine()
        let replies = sendOption(&m, 99, [UInt8](repeating: 7, count: 64 * 1024))
        XCTAssertEqual(replies.map(\.type), [RT.errUnsup])
    }

    func testMoreThan256OptionsCloses() {
        var m = optionsMachine()
        for i in 0..<256 {
            let a = feedAll(&m, Wire.option(99))
            guard a.count == 1, a[0].sent != nil else { return XCTFail("option \(i + 1): \(a)") }
        }
        let a = feedAll(&m, Wire.option(Opt.go, Wire.infoPayload(name: "disk", requests: [])))
        XCTAssertEqual(a.count, 1)
        XCTAssertNotNil(a.first?.closeReason, "the 257th option must close: \(a)")
        XCTAssertTrue(m.isClosed)
    }

    func test256thOptionMayBeGo() {
        var m = optionsMachine()
        for _ in 0..<255 { _ = feedAll(&m, Wire.option(99)) }
        XCTAssertNotNil(go(&m))
    }

    func testWholeHandshakeInOneBuffer() {
        var m = NBDServerStateMachine(exports: [Self.disk])
        _ = m.greeting()
        let bytes = Wire.be(UInt32(3)) + Wire.option(Opt.structuredReply)
            + Wire.option(Opt.setMetaContext, Wire.metaPayload(name: "disk", queries: ["base:allocation"]))
            + Wire.option(Opt.go, Wire.infoPayload(name: "disk", requests: [3]))
            + Wire.request(.read, cookie: 5, offset: 0, length: 512)
        let actions = feedAll(&m, bytes)
        XCTAssertEqual(actions.count, 4)
        guard actions.count == 4 else { return }
        XCTAssertNotNil(actions[0].sent)
        XCTAssertNotNil(actions[1].sent)
        XCTAssertEqual(actions[2].transmission?.session.baseAllocationContext, 1)
        XCTAssertEqual(actions[3].request?.request.cookie, 5)
    }

    // MARK: transmission

    func testReadByteByByte() {
        var m = transmissionMachine()
        guard let a = feedByteByByte(&m, Wire.request(.read, flags: [.fua], cookie: 0xc0ffee, offset: 4096, length: 8192)),
              let (req, payload) = a.request
        else { return XCTFail("expected a request") }
        XCTAssertEqual(req.command, .read)
        XCTAssertEqual(req.flags, [.fua])
        XCTAssertEqual(req.cookie, 0xc0ffee)
        XCTAssertEqual(req.offset, 4096)
        XCTAssertEqual(req.length, 8192)
        XCTAssertNil(payload)
    }

    func testWriteByteByBytePayloadIsOneSlice() {
        var m = transmissionMachine()
        let data = Wire.pattern(300)
        let bytes = Wire.request(.write, cookie: 77, offset: 1000, length: 300) + data
        var buffer = ByteBuffer()
        var action: NBDServerStateMachine.Action?
        for (i, byte) in bytes.enumerated() {
            buffer.writeInteger(byte)
            action = m.next(from: &buffer)
            if i < bytes.count - 1 {
                XCTAssertNil(action, "action before the whole payload arrived (byte \(i + 1))")
                if i >= 27 { XCTAssertEqual(m.pendingPayloadBytes, 300) }
            }
        }
        guard let (req, payload) = action?.request else { return XCTFail("no request: \(String(describing: action))") }
        XCTAssertEqual(req.command, .write)
        XCTAssertEqual(req.cookie, 77)
        XCTAssertEqual(req.offset, 1000)
        XCTAssertEqual(payload?.readableBytes, 300)
        XCTAssertEqual(payload?.bytes, data)
        XCTAssertEqual(m.pendingPayloadBytes, 0)
        // The next request parses normally.
        let next = feedByteByByte(&m, Wire.request(.flush, cookie: 78, offset: 0, length: 0))
        XCTAssertEqual(next?.request?.request.command, .flush)
    }

    func testEveryValidCommandParses() {
        var m = transmissionMachine(structured: true, metaContext: true)
        let cases: [(NBDCommand, NBDCommandFlags, UInt64, UInt32)] = [
            (.read, [.dontFragment], 0, 512), (.flush, [], 0, 0), (.trim, [.fua], 512, 512), (.cache, [], 0, 4096),
            (.writeZeroes, [.noHole, .fastZero], 0, 1 << 20), (.blockStatus, [.reqOne], 0, 1 << 20),
        ]
        for (i, (cmd, flags, offset, length)) in cases.enumerated() {
            guard let a = feedByteByByte(&m, Wire.request(cmd, flags: flags, cookie: UInt64(i), offset: offset, length: length)),
                  let (req, payload) = a.request
            else { XCTFail("\(cmd)"); continue }
            XCTAssertEqual(req.command, cmd)
            XCTAssertEqual(req.flags, flags)
            XCTAssertEqual(req.cookie, UInt64(i))
            XCTAssertNil(payload)
        }
    }

    func testBadRequestMagicCloses() {
        var m = transmissionMachine()
        guard let a = feedByteByByte(&m, Wire.request(magic: 0x2560_9514, type: 0, cookie: 1, offset: 0, length: 512)) else { return }
        XCTAssertNotNil(a.closeReason, "\(a)")
        XCTAssertTrue(m.isClosed)
    }

    func testDisconnect() {
        var m = transmissionMachine()
        guard let a = feedByteByByte(&m, Wire.request(.disconnect, cookie: 1, offset: 0, length: 0)) else { return }
        XCTAssertTrue(a.isDisconnect, "\(a)")
        XCTAssertTrue(m.isClosed)
        var more = Wire.buffer(Wire.request(.read, cookie: 2, offset: 0, length: 1))
        XCTAssertNil(m.next(from: &more), "nothing is parsed after DISC")
    }

    func testInvalidRequestWithoutPayloadIsRejectedAtOnce() {
        var m = transmissionMachine()
        guard let a = feedByteByByte(&m, Wire.request(flags: 0, type: 42, cookie: 3, offset: 0, length: 100)) else { return }
        XCTAssertEqual(a.rejection, NBDRejection(cookie: 3, type: 42, error: .einval, message: a.rejection?.message ?? ""))
        XCTAssertFalse(m.isClosed)
    }

    func testInvalidWritePayloadIsDiscardedByteByByteAndStreamStaysInSync() {
        var m = transmissionMachine(export: NBDExportInfo(name: "disk", size: 4096))
        // Out of range: ENOSPC, but its 100 payload bytes are still on the wire.
        let payload = [UInt8](repeating: 0x25, count: 100)  // 0x25 0x60... would look like a request magic
        guard let a = feedByteByByte(&m, Wire.request(.write, cookie: 9, offset: 4090, length: 100) + payload) else { return }
        guard let rejection = a.rejection else { return XCTFail("expected reject, got \(a)") }
        XCTAssertEqual(rejection.cookie, 9)
        XCTAssertEqual(rejection.type, NBDCommand.write.rawValue)
        XCTAssertEqual(rejection.error, .enospc)
        XCTAssertFalse(m.isClosed)
        // Stream is in sync: the next header parses.
        guard let next = feedByteByByte(&m, Wire.request(.read, cookie: 10, offset: 0, length: 4096)) else { return }
        XCTAssertEqual(next.request?.request.cookie, 10)
        XCTAssertEqual(next.request?.request.command, .read)
    }

    func testInvalidWriteFollowedByPipelinedRequestInOneBuffer() {
        var m = transmissionMachine(export: NBDExportInfo(name: "disk", size: 4096, readOnly: true))
        let bytes = Wire.request(.write, cookie: 1, offset: 0, length: 16) + [UInt8](repeating: 0xee, count: 16)
            + Wire.request(.read, cookie: 2, offset: 0, length: 16)
        let actions = feedAll(&m, bytes)
        XCTAssertEqual(actions.count, 2)
        XCTAssertEqual(actions.first?.rejection?.error, .eperm)
        XCTAssertEqual(actions.first?.rejection?.cookie, 1)
        XCTAssertEqual(actions.last?.request?.request.cookie, 2)
    }

    func testOversizeWriteIsDiscardedStreaming() {
        var m = transmissionMachine()
        let length = UInt32(33 * 1024 * 1024)
        var header = Wire.buffer(Wire.request(.write, cookie: 0x33, offset: 0, length: length))
        XCTAssertNil(m.next(from: &header))
        XCTAssertEqual(m.pendingPayloadBytes, 0, "an invalid WRITE's payload must not be buffered")
        let chunk = [UInt8](repeating: 0xab, count: 1 << 20)
        var sent = 0
        var result: NBDServerStateMachine.Action?
        while sent < Int(length) {
            var b = Wire.buffer(chunk)
            result = m.next(from: &b)
            XCTAssertEqual(b.readableBytes, 0, "every payload byte is consumed as it arrives")
            sent += chunk.count
            if sent < Int(length) {
                XCTAssertNil(result, "rejected before the payload was drained (\(sent) bytes)")
                if result != nil { return }
            }
        }
        guard let rejection = result?.rejection else { return XCTFail("expected reject, got \(String(describing: result))") }
        XCTAssertEqual(rejection.cookie, 0x33)
        XCTAssertEqual(rejection.error, .einval)
        let next = feedByteByByte(&m, Wire.request(.read, cookie: 0x34, offset: 0, length: 1))
        XCTAssertEqual(next?.request?.request.cookie, 0x34)
    }

    func testMaximumSizeWriteIsAccepted() {
        var m = transmissionMachine()
        let length = Int(NBDLimits.maxRequestLength)
        var b = Wire.buffer(Wire.request(.write, cookie: 1, offset: 0, length: UInt32(length)))
        XCTAssertNil(m.next(from: &b))
        XCTAssertEqual(m.pendingPayloadBytes, length)
        b.writeRepeatingByte(0x5a, count: length - 1)
        XCTAssertNil(m.next(from: &b))
        b.writeInteger(UInt8(0x5a))
        guard let (req, payload) = m.next(from: &b)?.request else { return XCTFail("no request") }
        XCTAssertEqual(req.length, UInt32(length))
        XCTAssertEqual(payload?.readableBytes, length)
    }

    func testPipelinedRequestsInOneBuffer() {
        var m = transmissionMachine()
        let data = Wire.pattern(8)
        let bytes = Wire.request(.write, cookie: 1, offset: 0, length: 8) + data
            + Wire.request(.read, cookie: 2, offset: 0, length: 8)
            + Wire.request(.flush, cookie: 3, offset: 0, length: 0)
            + Wire.request(.read, cookie: 4, offset: UInt64.max, length: 8)
            + Wire.request(.disconnect, cookie: 5, offset: 0, length: 0)
            + Wire.request(.read, cookie: 6, offset: 0, length: 8)
        let actions = feedAll(&m, bytes)
        XCTAssertEqual(actions.count, 5)
        guard actions.count == 5 else { return }
        XCTAssertEqual(actions[0].request?.payload?.bytes, data)
        XCTAssertEqual(actions[1].request?.request.cookie, 2)
        XCTAssertEqual(actions[2].request?.request.command, .flush)
        XCTAssertEqual(actions[3].rejection?.cookie, 4)
        XCTAssertTrue(actions[4].isDisconnect)
    }

    func testBlockStatusWithoutMetaContextIsRejected() {
        var m = transmissionMachine(structured: true, metaContext: false)
        let a = feedByteByByte(&m, Wire.request(.blockStatus, cookie: 1, offset: 0, length: 4096))
        XCTAssertEqual(a?.rejection?.error, .einval)
    }
}
