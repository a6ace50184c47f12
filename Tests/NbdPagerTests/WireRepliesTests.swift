import NIOCore
import XCTest
@testable import NbdPager

/// The encoding of every message the server's actions carry, byte for byte.
extension WireTests {
    func encode(_ body: (inout ByteBuffer) -> Int) -> (bytes: [UInt8], count: Int) {
        var b = ByteBuffer()
        let n = body(&b)
        return (b.bytes, n)
    }

    func testOptionReplyValue() {
        let (bytes, n) = encode { $0.writeOptionReply(NBDOptionReply(option: 99, type: .errUnsupported, message: "nope")) }
        XCTAssertEqual(n, 24)
        XCTAssertEqual(Wire.hex(bytes), "0003e889045565a9" + "00000063" + "80000001" + "00000004" + "6e6f7065")
    }

    func testExportListReply() {
        let reply = NBDExportListReply(option: 3, exports: [.init(name: "disk", description: "the test disk"),
                                                            .init(name: "other", description: "")])
        let (bytes, n) = encode { $0.writeExportListReply(reply) }
        XCTAssertEqual(n, bytes.count)
        XCTAssertEqual(parseOptionReplies(bytes), [
            OptionReply(option: 3, type: RT.server, data: Wire.string("disk") + Array("the test disk".utf8)),
            OptionReply(option: 3, type: RT.server, data: Wire.string("other")),
            OptionReply(option: 3, type: RT.ack, data: []),
        ])
        XCTAssertEqual(Wire.hex(Array(bytes.prefix(20 + 4 + 4))),
                       "0003e889045565a9" + "00000003" + "00000002" + "00000015" + "00000004" + "6469736b")
    }

    func testExportListDescriptionIsCappedAt4096Bytes() {
        let reply = NBDExportListReply(option: 3, exports: [.init(name: "d", description: String(repeating: "x", count: 5000))])
        let replies = parseOptionReplies(encode { $0.writeExportListReply(reply) }.bytes)
        XCTAssertEqual(replies.first?.data.count, 4 + 1 + 4096)
    }

    func testExportInfoReplyWithNameAndDescription() {
        let reply = NBDExportInfoReply(option: 7, size: 1 << 30, flags: [.hasFlags, .sendFlush], name: "disk",
                                       description: "the test disk", minimumBlockSize: 512, preferredBlockSize: 4096,
                                       maximumBlockSize: 32 << 20)
        let (bytes, n) = encode { $0.writeExportInfoReply(reply) }
        XCTAssertEqual(n, bytes.count)
        let replies = parseOptionReplies(bytes)
        XCTAssertEqual(replies.map(\.type), [RT.info, RT.info, RT.info, RT.info, RT.ack])
        XCTAssertTrue(replies.allSatisfy { $0.option == 7 })
        guard replies.count == 5 else { return }
        XCTAssertEqual(Wire.hex(replies[0].data), "0000" + "0000000040000000" + "0005")
        XCTAssertEqual(replies[1].data, Wire.be(UInt16(1)) + Array("disk".utf8))
        XCTAssertEqual(replies[2].data, Wire.be(UInt16(2)) + Array("the test disk".utf8))
        XCTAssertEqual(Wire.hex(replies[3].data), "0003" + "00000200" + "00001000" + "02000000")
        XCTAssertEqual(Wire.hex(Array(bytes.prefix(20))), "0003e889045565a9" + "00000007" + "00000003" + "0000000c")
    }

    func testExportInfoReplyWithoutNameAndDescription() {
        let reply = NBDExportInfoReply(option: 6, size: 8192, flags: [.hasFlags, .readOnly], name: nil, description: nil,
                                       minimumBlockSize: 1, preferredBlockSize: 4096, maximumBlockSize: 32 << 20)
        let replies = parseOptionReplies(encode { $0.writeExportInfoReply(reply) }.bytes)
        XCTAssertEqual(replies.map(\.type), [RT.info, RT.info, RT.ack])
        XCTAssertEqual(replies.first.map { Wire.hex($0.data) }, "0000" + "0000000000002000" + "0003")
        XCTAssertEqual(replies.dropFirst().first.map { Wire.hex($0.data) }, "0003" + "00000001" + "00001000" + "02000000")
    }

    func testMetaContextReply() {
        let set = NBDMetaContextReply(option: 10, context: .init(id: 1, name: "base:allocation"))
        let (bytes, n) = encode { $0.writeMetaContextReply(set) }
        XCTAssertEqual(n, bytes.count)
        XCTAssertEqual(Wire.hex(Array(bytes.prefix(24))),
                       "0003e889045565a9" + "0000000a" + "00000004" + "00000013" + "00000001")
        XCTAssertEqual(parseOptionReplies(bytes), [
            OptionReply(option: 10, type: RT.metaContext, data: Wire.be(UInt32(1)) + Array("base:allocation".utf8)),
            OptionReply(option: 10, type: RT.ack, data: []),
        ])
        let none = NBDMetaContextReply(option: 9, context: nil)
        XCTAssertEqual(Wire.hex(encode { $0.writeMetaContextReply(none) }.bytes),
                       "0003e889045565a9" + "00000009" + "00000001" + "00000000")
    }

    func testTransmissionReplyExportName() {
        let flags: NBDTransmissionFlags = [.hasFlags, .sendFlush, .sendFUA]
        let (short, n) = encode { $0.writeTransmissionReply(.exportName(size: 0x1234, flags: flags, noZeroes: true)) }
        XCTAssertEqual(n, 10)
        XCTAssertEqual(Wire.hex(short), "0000000000001234" + "000d")
        let (long, m) = encode { $0.writeTransmissionReply(.exportName(size: 0x1234, flags: flags, noZeroes: false)) }
        XCTAssertEqual(m, 134)
        XCTAssertEqual(Array(long.prefix(10)), short)
        XCTAssertEqual(Array(long.suffix(124)), [UInt8](repeating: 0, count: 124))
    }

    func testTransmissionReplyGoIsTheInfoReply() {
        let info = NBDExportInfoReply(option: 7, size: 512, flags: [.hasFlags], name: "n", description: nil,
                                      minimumBlockSize: 1, preferredBlockSize: 4096, maximumBlockSize: 32 << 20)
        XCTAssertEqual(encode { $0.writeTransmissionReply(.go(info)) }.bytes, encode { $0.writeExportInfoReply(info) }.bytes)
    }

    func testReadReplyHeader() {
        let (simple, n) = encode { $0.writeReadReplyHeader(cookie: 0x0102, offset: 4096, dataLength: 512, structured: false) }
        XCTAssertEqual(n, ByteBuffer.readReplyHeaderLength(structured: false))
        XCTAssertEqual(Wire.hex(simple), "67446698" + "00000000" + "0000000000000102")
        let (chunk, m) = encode { $0.writeReadReplyHeader(cookie: 0x0102, offset: 4096, dataLength: 512, structured: true) }
        XCTAssertEqual(m, ByteBuffer.readReplyHeaderLength(structured: true))
        XCTAssertEqual(Wire.hex(chunk), "668e33ef" + "0001" + "0001" + "0000000000000102" + "00000208" + "0000000000001000")
    }

    func testErrorReply() {
        XCTAssertEqual(Wire.hex(encode { $0.writeErrorReply(error: .einval, cookie: 7, message: "x", structured: false) }.bytes),
                       "67446698" + "00000016" + "0000000000000007")
        XCTAssertEqual(Wire.hex(encode { $0.writeErrorReply(error: .eio, cookie: 9, message: "bad", structured: true) }.bytes),
                       "668e33ef" + "0001" + "8001" + "0000000000000009" + "00000009" + "00000005" + "0003" + "626164")
        XCTAssertEqual(Wire.hex(encode { $0.writeErrorReply(error: .ok, cookie: 1, message: "", structured: false) }.bytes),
                       "67446698" + "00000005" + "0000000000000001", "success is never sent as an error: EIO")
    }
}
