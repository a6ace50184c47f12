import XCTest
@testable import NbdPager

/// The control socket's wire format: flat JSON objects, one per line.
final class ControlProtocolTests: XCTestCase {
    func text(_ bytes: [UInt8]) -> String { String(decoding: bytes, as: UTF8.self) }

    func testRequestsAreFlatObjects() throws {
        XCTAssertEqual(text(try ControlCodec.encode(ControlRequest(StatusCommand()))), #"{"command":"status"}"#)
        XCTAssertEqual(text(try ControlCodec.encode(ControlRequest(GateCommand(action: .open), export: "ram0"))),
                       #"{"action":"open","command":"gate","export":"ram0"}"#)
        let line = Array(#"{"command":"prefetch","action":"pause"}"#.utf8)
        let request = try ControlCodec.decode(ControlRequest<PrefetchCommand>.self, from: line)
        XCTAssertEqual(request.command.action, .pause)
        XCTAssertNil(request.export)
        XCTAssertEqual(try ControlCodec.decode(ControlRequestHeader.self, from: line),
                       ControlRequestHeader(command: "prefetch", export: nil))
        XCTAssertThrowsError(try ControlCodec.decode(ControlRequest<GateCommand>.self, from: line),
                             "a request for another command does not decode")
        XCTAssertThrowsError(try ControlCodec.decode(ControlRequest<PrefetchCommand>.self,
                                                     from: Array(#"{"command":"prefetch","action":"stop"}"#.utf8)))
    }

    func testRepliesCarryOkAndTheirFields() throws {
        let open = ControlReply<GateCommand.Reply>.ok(.init(gate: "open", wasClosed: true, releasedPulls: 3))
        XCTAssertEqual(text(try ControlCodec.encode(open)),
                       #"{"gate":"open","ok":true,"released_pulls":3,"was_closed":true}"#)
        let failure = ControlReply<GateCommand.Reply>.failure("not a lazy export")
        XCTAssertEqual(text(try ControlCodec.encode(failure)), #"{"error":"not a lazy export","ok":false}"#)
        let decoded = try ControlCodec.decode(ControlReply<GateCommand.Reply>.self, from: ControlCodec.encode(failure))
        XCTAssertEqual(decoded.errorMessage, "not a lazy export")
        guard case .ok(let body) = try ControlCodec.decode(ControlReply<GateCommand.Reply>.self, from: ControlCodec.encode(open)) else {
            return XCTFail("ok reply decoded as a failure")
        }
        XCTAssertEqual(body.releasedPulls, 3)
    }

    /// With one export, the status keeps the field names `nbd-umemd status` has always printed at
    /// its top level.
    func testSingleExportStatusIsFlat() throws {
        let fields = JSONValue.object([("complete", .bool(false)), ("pages", .object([("total", .unsigned(4))])),
                                       ("eta_seconds", .null), ("progress", .double(0.25))])
        let export = ExportStatus(export: "", kind: "lazy", size: 16384, readOnly: false, fields: fields)
        let swap = SwapStatus(threads: 20, ioFlusher: true, threadsWithoutIOFlusher: 0, memoryLockedBytes: 1 << 20, oomScoreAdj: -1000)
        let status = DaemonStatus(connections: 2, swap: swap, exports: [export])
        let json = try ControlCodec.decode(JSONValue.self, from: ControlCodec.encode(ControlReply.ok(status)))
        for (key, value) in [("ok", JSONValue.bool(true)), ("export", .string("")), ("kind", .string("lazy")),
                             ("size", .int(16384)), ("read_only", .bool(false)), ("connections", .int(2)),
                             ("complete", .bool(false)), ("eta_seconds", .null), ("progress", .double(0.25)),
                             ("swap_mode", .bool(true)), ("io_flusher", .bool(true)),
                             ("threads_without_io_flusher", .int(0)), ("memory_locked_bytes", .int(1 << 20)),
                             ("oom_score_adj", .int(-1000)), ("threads", .int(20))] {
            XCTAssertEqual(json[key], value, key)
        }
        XCTAssertEqual(json["pages"]?["total"], .int(4))
        guard case .ok(let back) = try ControlCodec.decode(ControlReply<DaemonStatus>.self,
                                                           from: ControlCodec.encode(ControlReply.ok(status))) else {
            return XCTFail("status did not decode")
        }
        XCTAssertEqual(back.exports.first?.field("complete"), .bool(false))
        XCTAssertEqual(back.swap, swap)
        XCTAssertEqual(back.connections, 2)
    }

    func testRenderingIsIndentedKeyColonValue() throws {
        let v = JSONValue.object([("complete", .bool(true)), ("list", .array([.int(1)])), ("s", .string("a\"b"))])
        XCTAssertEqual(v.rendered, "{\n  \"complete\": true,\n  \"list\": [\n    1\n  ],\n  \"s\": \"a\\\"b\"\n}")
    }
}
