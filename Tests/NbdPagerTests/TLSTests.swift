import NIOCore
import XCTest
@testable import NbdPager
@testable import NbdTLS

/// NBD_OPT_STARTTLS in the state machine, and the PSK key file format.
final class TLSTests: XCTestCase {
    static let disk = NBDExportInfo(name: "disk", size: 1 << 20)

    func machine(_ tls: NBDServerStateMachine.TLSPolicy, clientFlags: UInt32 = 3) -> NBDServerStateMachine {
        var m = NBDServerStateMachine(exports: [Self.disk], tls: tls)
        _ = m.greeting()
        var b = Wire.buffer(Wire.be(clientFlags))
        XCTAssertNil(m.next(from: &b))
        return m
    }

    func replyType(_ actions: [NBDServerStateMachine.Action]) -> NBDOptionReplyType? {
        guard actions.count == 1, case .sendOptionReply(let r) = actions[0] else { return nil }
        return r.type
    }

    func testRequiredRefusesEveryOptionButStartTLSAndAbort() {
        var m = machine(.required)
        for (code, payload) in [(Opt.go, Wire.infoPayload(name: "disk", requests: [])),
                                (Opt.info, Wire.infoPayload(name: "disk", requests: [3])), (Opt.list, []),
                                (Opt.structuredReply, []), (Opt.listMetaContext, Wire.metaPayload(name: "disk", queries: [])),
                                (Opt.setMetaContext, Wire.metaPayload(name: "disk", queries: ["base:allocation"])),
                                (UInt32(99), [1])] {
            XCTAssertEqual(replyType(feedAll(&m, Wire.option(code, payload))), .errTLSRequired, "option \(code)")
            XCTAssertFalse(m.isInTransmission)
        }
        XCTAssertFalse(m.isTLSActive)
        // STARTTLS is acknowledged; from then on the options work.
        XCTAssertEqual(feedAll(&m, Wire.option(Opt.startTLS)), [.startTLS(NBDOptionReply(option: Opt.startTLS, type: .ack))])
        XCTAssertTrue(m.isTLSActive)
        XCTAssertEqual(replyType(feedAll(&m, Wire.option(Opt.startTLS))), .errInvalid, "a second STARTTLS")
        let a = feedAll(&m, Wire.option(Opt.go, Wire.infoPayload(name: "disk", requests: [3])))
        guard a.count == 1, case .enterTransmission(let session, _) = a[0] else { return XCTFail("\(a)") }
        XCTAssertTrue(session.tls)
        XCTAssertTrue(m.isTLSActive)
    }

    func testRequiredDropsExportNameBeforeTLS() {
        var m = machine(.required)
        let a = feedAll(&m, Wire.option(Opt.exportName, Array("disk".utf8)))
        guard a.count == 1, case .close = a[0] else { return XCTFail("\(a)") }
        XCTAssertTrue(m.isClosed)
    }

    func testRequiredAnswersAbort() {
        var m = machine(.required)
        XCTAssertEqual(feedAll(&m, Wire.option(Opt.abort)),
                       [.sendOptionReplyAndClose(NBDOptionReply(option: Opt.abort, type: .ack))])
    }

    func testStartTLSWithDataIsInvalid() {
        var m = machine(.optional)
        XCTAssertEqual(replyType(feedAll(&m, Wire.option(Opt.startTLS, [0]))), .errInvalid)
        XCTAssertFalse(m.isTLSActive)
    }

    func testStartTLSForgetsWhatWasNegotiatedInPlainText() {
        var m = machine(.optional)
        _ = feedAll(&m, Wire.option(Opt.structuredReply))
        _ = feedAll(&m, Wire.option(Opt.setMetaContext, Wire.metaPayload(name: "disk", queries: ["base:allocation"])))
        XCTAssertEqual(feedAll(&m, Wire.option(Opt.startTLS)).count, 1)
        guard case .options(let n) = m.state else { return XCTFail("\(m.state)") }
        XCTAssertTrue(n.tlsActive)
        XCTAssertFalse(n.structuredReplies)
        XCTAssertNil(n.metaContextExport)
        XCTAssertTrue(n.noZeroes, "the client flags stay")
        XCTAssertEqual(n.optionCount, 3, "the options count toward the limit across STARTTLS")
    }

    func testOptionalServesPlainClients() {
        var m = machine(.optional)
        let a = feedAll(&m, Wire.option(Opt.go, Wire.infoPayload(name: "disk", requests: [])))
        guard a.count == 1, case .enterTransmission(let session, _) = a[0] else { return XCTFail("\(a)") }
        XCTAssertFalse(session.tls)
    }

    func testOffRefusesStartTLS() {
        var m = machine(.off)
        XCTAssertEqual(replyType(feedAll(&m, Wire.option(Opt.startTLS))), .errUnsupported)
    }

    // MARK: psktool files

    func testPSKFileParsing() throws {
        let keys = try PSKFile.parse("alice:0a0B\r\n\nbob:ffee00\n  \n", file: "k")
        XCTAssertEqual(keys["alice"], [0x0a, 0x0b])
        XCTAssertEqual(keys["bob"], [0xff, 0xee, 0x00])
        XCTAssertEqual(keys.count, 2)
    }

    func testBadPSKFiles() {
        for (text, message) in [("alice", "line 1: expected identity:hexkey"), ("alice:abc", "not hexadecimal"),
                                ("alice:zz", "not hexadecimal"), (":00", "empty identity"), ("alice:", "not hexadecimal"),
                                ("\n\n", "holds no key")] {
            XCTAssertThrowsError(try PSKFile.parse(text, file: "k"), text) { error in
                XCTAssertTrue("\(error)".contains(message), "\(text): \(error)")
            }
        }
    }

    func testExplainNamesTheReason() {
        struct Fake: Error, CustomStringConvertible {
            var description = "handshakeFailed(sslError([Error: 1 error:1:SSL routines:OPENSSL_internal:PSK_IDENTITY_NOT_FOUND at x.cc:1]))"
        }
        XCTAssertEqual(TLSServer.explain(Fake()), "the client's identity is not in the PSK file (PSK_IDENTITY_NOT_FOUND)")
    }
}
