import NIOCore
import XCTest
@testable import NbdPager

/// The state machine's typed actions and states, compared as values (the bytes they encode to are
/// checked in StateMachineTests through the Wire/ writers, and in WireTests per message kind).
extension StateMachineTests {
    func testStartSendsTheGreetingOnce() {
        var m = NBDServerStateMachine(exports: [Self.disk])
        XCTAssertEqual(m.state, .greeting)
        XCTAssertEqual(m.start(), .sendGreeting)
        XCTAssertEqual(m.state, .clientFlags)
        XCTAssertNil(m.start())
        XCTAssertEqual(NBDServerStateMachine.Action.sendGreeting.sent.map(Wire.hex),
                       "4e42444d41474943" + "49484156454f5054" + "0003")
    }

    func testClientFlagsStartTheNegotiation() {
        for (flags, noZeroes) in [(UInt32(1), false), (3, true)] {
            let m = optionsMachine(clientFlags: flags)
            var expected = NBDServerStateMachine.Negotiation()
            expected.noZeroes = noZeroes
            XCTAssertEqual(m.state, .options(expected))
        }
    }

    func testNegotiationIsCarriedInTheOptionsState() {
        var m = optionsMachine()
        _ = sendOption(&m, Opt.structuredReply)
        _ = sendOption(&m, Opt.setMetaContext, Wire.metaPayload(name: "disk", queries: ["base:allocation"]))
        XCTAssertEqual(m.state, .options(.init(noZeroes: true, optionCount: 2, structuredReplies: true,
                                               metaContextExport: "disk")))
        XCTAssertNil(m.session)
    }

    func testGoActionIsTyped() {
        var m = optionsMachine()
        let a = feedAll(&m, Wire.option(Opt.go, Wire.infoPayload(name: "disk", requests: [1, 2, 3])))
        let session = NBDSession(export: Self.disk, structuredReplies: false, baseAllocationContext: nil)
        let info = NBDExportInfoReply(option: Opt.go, size: 1 << 30, flags: Self.disk.transmissionFlags(structuredReplies: false),
                                      name: "disk", description: "the test disk", minimumBlockSize: 512,
                                      preferredBlockSize: 4096, maximumBlockSize: 32 << 20)
        XCTAssertEqual(a, [.enterTransmission(session, .go(info))])
        XCTAssertEqual(m.state, .transmission(session))
        XCTAssertEqual(m.session, session)
    }

    func testInfoActionLeavesOutWhatWasNotAskedFor() {
        var m = optionsMachine()
        let a = feedAll(&m, Wire.option(Opt.info, Wire.infoPayload(name: "other", requests: [2])))
        XCTAssertEqual(a, [.sendExportInfo(NBDExportInfoReply(
            option: Opt.info, size: 8192, flags: Self.other.transmissionFlags(structuredReplies: false), name: nil,
            description: nil, minimumBlockSize: 1, preferredBlockSize: 4096, maximumBlockSize: 32 << 20))],
            "an empty description is not sent even when asked for")
    }

    func testExportNameActionIsTyped() {
        for (clientFlags, noZeroes) in [(UInt32(1), false), (3, true)] {
            var m = optionsMachine(clientFlags: clientFlags)
            let a = feedAll(&m, Wire.option(Opt.exportName, Array("other".utf8)))
            // NBD_OPT_EXPORT_NAME never learns the block sizes: 64 MiB requests are accepted.
            let session = NBDSession(export: Self.other, structuredReplies: false, baseAllocationContext: nil,
                                     maximumRequestLength: 64 << 20)
            XCTAssertEqual(a, [.enterTransmission(session, .exportName(
                size: 8192, flags: Self.other.transmissionFlags(structuredReplies: false), noZeroes: noZeroes))])
        }
    }

    func testOptionReplyActionsAreTyped() {
        var m = optionsMachine()
        XCTAssertEqual(feedAll(&m, Wire.option(99, [1])),
                       [.sendOptionReply(NBDOptionReply(option: 99, type: .errUnsupported, message: "option 99 is not supported"))])
        XCTAssertEqual(feedAll(&m, Wire.option(Opt.startTLS)),
                       [.sendOptionReply(NBDOptionReply(option: Opt.startTLS, type: .errUnsupported,
                                                        message: "TLS is not enabled on this server (serve --tls)"))])
        XCTAssertEqual(feedAll(&m, Wire.option(Opt.list)),
                       [.sendExportList(NBDExportListReply(option: Opt.list, exports: [
                           .init(name: "disk", description: "the test disk"), .init(name: "other", description: ""),
                       ]))])
        XCTAssertEqual(feedAll(&m, Wire.option(Opt.listMetaContext, Wire.metaPayload(name: "disk", queries: []))),
                       [.sendOptionReply(NBDOptionReply(option: Opt.listMetaContext, type: .errInvalid,
                                                        message: "negotiate structured replies first"))])
        XCTAssertEqual(feedAll(&m, Wire.option(Opt.structuredReply)),
                       [.sendOptionReply(NBDOptionReply(option: Opt.structuredReply, type: .ack))])
        XCTAssertEqual(feedAll(&m, Wire.option(Opt.listMetaContext, Wire.metaPayload(name: "disk", queries: []))),
                       [.sendMetaContexts(NBDMetaContextReply(option: Opt.listMetaContext,
                                                              context: .init(id: 0, name: "base:allocation")))])
        XCTAssertEqual(feedAll(&m, Wire.option(Opt.setMetaContext, Wire.metaPayload(name: "disk", queries: ["x:y"]))),
                       [.sendMetaContexts(NBDMetaContextReply(option: Opt.setMetaContext, context: nil))])
        XCTAssertEqual(feedAll(&m, Wire.option(Opt.abort)),
                       [.sendOptionReplyAndClose(NBDOptionReply(option: Opt.abort, type: .ack))])
        XCTAssertEqual(m.state, .closed)
    }

    func testTransmissionStatesCarryTheSession() {
        var m = transmissionMachine(export: NBDExportInfo(name: "disk", size: 4096))
        guard let session = m.session else { return XCTFail("no session") }
        var b = Wire.buffer(Wire.request(.write, cookie: 1, offset: 0, length: 8))
        XCTAssertNil(m.next(from: &b))
        let write = NBDRequest(command: .write, flags: [], cookie: 1, offset: 0, length: 8)
        XCTAssertEqual(m.state, .payload(session, write))
        b.writeBytes(Wire.pattern(8))
        XCTAssertEqual(m.next(from: &b), .request(write, payload: Wire.buffer(Wire.pattern(8))))
        XCTAssertEqual(m.state, .transmission(session))

        var bad = Wire.buffer(Wire.request(.write, cookie: 2, offset: 4092, length: 8) + [0, 0])
        XCTAssertNil(m.next(from: &bad))
        let rejection = NBDRejection(cookie: 2, type: NBDCommand.write.rawValue, error: .enospc,
                                     message: "write at 4092+8 is beyond the end of the export (4096)")
        XCTAssertEqual(m.state, .discarding(session, remaining: 6, rejection))
        var rest = Wire.buffer([0, 0, 0, 0, 0, 0])
        XCTAssertEqual(m.next(from: &rest), .reject(rejection))
        XCTAssertEqual(m.state, .transmission(session))

        var disc = Wire.buffer(Wire.request(.disconnect, cookie: 3, offset: 0, length: 0))
        XCTAssertEqual(m.next(from: &disc), .disconnect)
        XCTAssertEqual(m.state, .closed)
        XCTAssertNil(m.session)
    }

    func testCloseActionsAreTyped() {
        var m = optionsMachine()
        XCTAssertEqual(feedAll(&m, Wire.option(Opt.exportName, Array("missing".utf8))),
                       [.close(reason: "NBD_OPT_EXPORT_NAME: no such export")])
        var t = transmissionMachine()
        XCTAssertEqual(feedAll(&t, Wire.request(magic: 0x2560_9514, type: 0, cookie: 1, offset: 0, length: 512)),
                       [.close(reason: "bad request magic 0x25609514")])
    }

    func testMarkClosedStopsParsing() {
        var m = transmissionMachine()
        m.markClosed()
        XCTAssertTrue(m.isClosed)
        XCTAssertEqual(feedAll(&m, Wire.request(.read, cookie: 1, offset: 0, length: 1)), [])
    }
}
