import Glibc
import NIOCore
import XCTest
@testable import NbdPager

final class WireTests: XCTestCase {
    // MARK: constants against the spec

    func testMagicNumbersMatchSpec() {
        XCTAssertEqual(NBDMagic.initPassword, 0x4e42_444d_4147_4943)  // "NBDMAGIC"
        XCTAssertEqual(NBDMagic.iHaveOpt, 0x4948_4156_454f_5054)      // "IHAVEOPT"
        XCTAssertEqual(NBDMagic.optionReply, 0x0003_e889_0455_65a9)
        XCTAssertEqual(NBDMagic.request, 0x2560_9513)
        XCTAssertEqual(NBDMagic.simpleReply, 0x6744_6698)
        XCTAssertEqual(NBDMagic.structuredReply, 0x668e_33ef)
    }

    func testOptionAndReplyCodesMatchSpec() {
        let options: [(NBDOption, UInt32)] = [
            (.exportName, 1), (.abort, 2), (.list, 3), (.startTLS, 5), (.info, 6), (.go, 7),
            (.structuredReply, 8), (.listMetaContext, 9), (.setMetaContext, 10),
        ]
        for (o, v) in options { XCTAssertEqual(o.rawValue, v, "\(o)") }
        let replies: [(NBDOptionReplyType, UInt32)] = [
            (.ack, 1), (.server, 2), (.info, 3), (.metaContext, 4),
            (.errUnsupported, 0x8000_0001), (.errPolicy, 0x8000_0002), (.errInvalid, 0x8000_0003),
            (.errPlatform, 0x8000_0004), (.errTLSRequired, 0x8000_0005), (.errUnknown, 0x8000_0006),
            (.errShutdown, 0x8000_0007), (.errBlockSizeRequired, 0x8000_0008), (.errTooBig, 0x8000_0009),
        ]
        for (t, v) in replies { XCTAssertEqual(t.rawValue, v, "\(t)") }
        let commands: [(NBDCommand, UInt16)] = [
            (.read, 0), (.write, 1), (.disconnect, 2), (.flush, 3), (.trim, 4), (.cache, 5),
            (.writeZeroes, 6), (.blockStatus, 7),
        ]
        for (c, v) in commands { XCTAssertEqual(c.rawValue, v, "\(c)") }
        XCTAssertEqual(NBDCommandFlags.fua.rawValue, 1)
        XCTAssertEqual(NBDCommandFlags.noHole.rawValue, 2)
        XCTAssertEqual(NBDCommandFlags.dontFragment.rawValue, 4)
        XCTAssertEqual(NBDCommandFlags.reqOne.rawValue, 8)
        XCTAssertEqual(NBDCommandFlags.fastZero.rawValue, 16)
        XCTAssertEqual(NBDReplyType.offsetData.rawValue, 1)
        XCTAssertEqual(NBDReplyType.offsetHole.rawValue, 2)
        XCTAssertEqual(NBDReplyType.blockStatus.rawValue, 5)
        XCTAssertEqual(NBDReplyType.error.rawValue, 0x8001)
        XCTAssertEqual(NBDReplyType.errorOffset.rawValue, 0x8002)
        XCTAssertEqual(NBDInfoType.export.rawValue, 0)
        XCTAssertEqual(NBDInfoType.name.rawValue, 1)
        XCTAssertEqual(NBDInfoType.description.rawValue, 2)
        XCTAssertEqual(NBDInfoType.blockSize.rawValue, 3)
        let errnos: [(NBDErrno, UInt32)] = [
            (.ok, 0), (.eperm, 1), (.eio, 5), (.enomem, 12), (.einval, 22), (.enospc, 28),
            (.eoverflow, 75), (.enotsup, 95), (.eshutdown, 108),
        ]
        for (e, v) in errnos { XCTAssertEqual(e.rawValue, v, "\(e)") }
    }

    // MARK: encoders

    func testGreetingBytes() {
        var b = ByteBuffer()
        let n = b.writeNBDGreeting()
        XCTAssertEqual(n, 18)
        XCTAssertEqual(Wire.hex(b.bytes), "4e42444d41474943" + "49484156454f5054" + "0003")
    }

    func testOptionReplyHeader() {
        var b = ByteBuffer()
        let n = b.writeOptionReplyHeader(option: 7, type: .info, dataLength: 12)
        XCTAssertEqual(n, 20)
        XCTAssertEqual(Wire.hex(b.bytes), "0003e889045565a9" + "00000007" + "00000003" + "0000000c")
    }

    func testOptionReplyWithMessageAndErrorType() {
        var b = ByteBuffer()
        let n = b.writeOptionReply(option: 99, type: .errUnsupported, message: "nope")
        XCTAssertEqual(n, 24)
        XCTAssertEqual(Wire.hex(b.bytes), "0003e889045565a9" + "00000063" + "80000001" + "00000004" + "6e6f7065")

        var ack = ByteBuffer()
        ack.writeOptionReply(option: 2, type: .ack)
        XCTAssertEqual(Wire.hex(ack.bytes), "0003e889045565a9" + "00000002" + "00000001" + "00000000")
    }

    func testOptionReplyMessageIsCappedAt4096Bytes() {
        var b = ByteBuffer()
        b.writeOptionReply(option: 1, type: .errInvalid, message: String(repeating: "x", count: 5000))
        let replies = parseOptionReplies(b.bytes)
        XCTAssertEqual(replies.count, 1)
        XCTAssertEqual(replies.first?.data.count, 4096)
    }

    func testSimpleReply() {
        let cases: [(NBDErrno, UInt64, String)] = [
            (.ok, 0x0102_0304_0506_0708, "67446698" + "00000000" + "0102030405060708"),
            (.einval, 1, "67446698" + "00000016" + "0000000000000001"),
            (.enospc, UInt64.max, "67446698" + "0000001c" + "ffffffffffffffff"),
        ]
        for (error, cookie, expected) in cases {
            var b = ByteBuffer()
            XCTAssertEqual(b.writeSimpleReply(error: error, cookie: cookie), 16)
            XCTAssertEqual(Wire.hex(b.bytes), expected, "\(error)")
        }
    }

    func testStructuredReplyHeader() {
        var b = ByteBuffer()
        let n = b.writeStructuredReplyHeader(flags: .done, type: .offsetData, cookie: 0xabcd, length: 0x1008)
        XCTAssertEqual(n, 20)
        XCTAssertEqual(Wire.hex(b.bytes), "668e33ef" + "0001" + "0001" + "000000000000abcd" + "00001008")

        var c = ByteBuffer()
        c.writeStructuredReplyHeader(flags: [], type: .none, cookie: 7, length: 0)
        XCTAssertEqual(Wire.hex(c.bytes), "668e33ef" + "0000" + "0000" + "0000000000000007" + "00000000")
    }

    func testStructuredErrorChunk() {
        var b = ByteBuffer()
        let n = b.writeStructuredError(error: .eio, cookie: 9, message: "bad")
        XCTAssertEqual(n, 20 + 6 + 3)
        XCTAssertEqual(Wire.hex(b.bytes),
                       "668e33ef" + "0001" + "8001" + "0000000000000009" + "00000009"
                           + "00000005" + "0003" + "626164")
    }

    func testStructuredErrorChunkWithEmptyMessageAndLongMessage() {
        var e = ByteBuffer()
        e.writeStructuredError(error: .einval, cookie: 1, message: "")
        XCTAssertEqual(Wire.hex(e.bytes), "668e33ef" + "0001" + "8001" + "0000000000000001" + "00000006" + "00000016" + "0000")

        var long = ByteBuffer()
        long.writeStructuredError(error: .einval, cookie: 1, message: String(repeating: "m", count: 3000))
        guard case .chunk(let flags, let type, _, let payload)? = parseReplies(long.bytes).first else {
            return XCTFail("no chunk")
        }
        XCTAssertEqual(flags, 1)
        XCTAssertEqual(type, 0x8001)
        var r = Reader(payload)
        XCTAssertEqual(r.int(UInt32.self), 22)
        let len = r.int(UInt16.self)
        XCTAssertEqual(Int(len ?? 0), r.remaining, "message length field must match the chunk length")
    }

    func testBlockStatusChunk() {
        var b = ByteBuffer()
        let extents = [
            NBDExtent(length: 4096, flags: []),
            NBDExtent(length: 8192, flags: [.hole, .zero]),
            NBDExtent(length: 512, flags: [.zero]),
        ]
        let n = b.writeBlockStatusReply(cookie: 0x42, contextID: 1, extents: extents)
        XCTAssertEqual(n, 20 + 4 + 3 * 8)
        XCTAssertEqual(Wire.hex(b.bytes),
                       "668e33ef" + "0001" + "0005" + "0000000000000042" + "0000001c"
                           + "00000001"
                           + "00001000" + "00000000"
                           + "00002000" + "00000003"
                           + "00000200" + "00000002")
    }

    // MARK: request header

    func testRequestHeaderParsing() {
        let bytes = Wire.request(magic: 0x2560_9513, flags: 0x0011, type: 6, cookie: 0x1122_3344_5566_7788,
                                 offset: 0x0000_0001_0000_0200, length: 0x0010_0000)
        XCTAssertEqual(bytes.count, 28)
        var b = Wire.buffer(bytes + [0xaa])
        guard let (magic, h) = b.readNBDRequestHeader() else { return XCTFail("header not parsed") }
        XCTAssertEqual(magic, NBDMagic.request)
        XCTAssertEqual(h, NBDRequestHeader(flags: 0x11, type: 6, cookie: 0x1122_3344_5566_7788,
                                           offset: 0x1_0000_0200, length: 0x10_0000))
        XCTAssertEqual(h.command, .writeZeroes)
        XCTAssertEqual(h.commandFlags, [.fua, .fastZero])
        XCTAssertFalse(h.hasPayload)
        XCTAssertEqual(b.readableBytes, 1, "exactly 28 bytes consumed")
    }

    func testRequestHeaderReturnsBadMagicUnchanged() {
        var b = Wire.buffer(Wire.request(magic: 0xdead_beef, type: 0, cookie: 1, offset: 0, length: 1))
        XCTAssertEqual(b.readNBDRequestHeader()?.magic, 0xdead_beef)
    }

    func testRequestHeaderNeedsAll28Bytes() {
        let bytes = Wire.request(.read, cookie: 1, offset: 0, length: 512)
        for n in 0..<28 {
            var b = Wire.buffer(Array(bytes.prefix(n)))
            XCTAssertNil(b.readNBDRequestHeader(), "\(n) bytes")
            XCTAssertEqual(b.readableBytes, n, "nothing consumed with \(n) bytes")
        }
    }

    func testHasPayloadOnlyForWrite() {
        for c in NBDCommand.allCases {
            let h = NBDRequestHeader(flags: 0, type: c.rawValue, cookie: 0, offset: 0, length: 1)
            XCTAssertEqual(h.hasPayload, c == .write, "\(c)")
        }
        XCTAssertNil(NBDRequestHeader(flags: 0, type: 99, cookie: 0, offset: 0, length: 1).command)
    }

    // MARK: option payloads

    func testParseInfoRequestValid() {
        let cases: [([UInt8], NBDInfoRequest)] = [
            (Wire.infoPayload(name: "disk", requests: [1, 3]), NBDInfoRequest(exportName: "disk", requests: [1, 3])),
            (Wire.infoPayload(name: "", requests: []), NBDInfoRequest(exportName: "", requests: [])),
            (Wire.infoPayload(name: "ünï", requests: [2]), NBDInfoRequest(exportName: "ünï", requests: [2])),
            (Wire.infoPayload(name: String(repeating: "a", count: 4096), requests: [0]),
             NBDInfoRequest(exportName: String(repeating: "a", count: 4096), requests: [0])),
        ]
        for (payload, expected) in cases {
            XCTAssertEqual(ByteBuffer.parseInfoRequest(Wire.buffer(payload)), expected)
        }
    }

    func testParseInfoRequestMalformed() {
        let good = Wire.infoPayload(name: "disk", requests: [1, 3])
        let cases: [(String, [UInt8])] = [
            ("empty", []),
            ("name length only", Wire.be(UInt32(4))),
            ("name longer than payload", Wire.be(UInt32(10)) + Array("disk".utf8) + Wire.be(UInt16(0))),
            ("missing request count", Wire.string("disk")),
            ("count says 3, 2 given", Wire.string("disk") + Wire.be(UInt16(3)) + Wire.be(UInt16(1)) + Wire.be(UInt16(3))),
            ("count says 1, 2 given", Wire.string("disk") + Wire.be(UInt16(1)) + Wire.be(UInt16(1)) + Wire.be(UInt16(3))),
            ("trailing garbage byte", good + [0]),
            ("odd trailing byte in requests", Wire.string("disk") + Wire.be(UInt16(1)) + [0, 1, 2]),
            ("name > 4096", Wire.infoPayload(name: String(repeating: "a", count: 4097), requests: [])),
            ("NUL in name", Wire.be(UInt32(3)) + [0x61, 0x00, 0x62] + Wire.be(UInt16(0))),
            ("invalid UTF-8", Wire.be(UInt32(2)) + [0xff, 0xfe] + Wire.be(UInt16(0))),
            ("huge name length", Wire.be(UInt32.max) + Wire.be(UInt16(0))),
        ]
        for (what, payload) in cases {
            XCTAssertNil(ByteBuffer.parseInfoRequest(Wire.buffer(payload)), what)
        }
    }

    func testParseMetaContextRequestValid() {
        let cases: [([UInt8], NBDMetaContextRequest)] = [
            (Wire.metaPayload(name: "disk", queries: ["base:allocation", "qemu:dirty-bitmap:x"]),
             NBDMetaContextRequest(exportName: "disk", queries: ["base:allocation", "qemu:dirty-bitmap:x"])),
            (Wire.metaPayload(name: "", queries: []), NBDMetaContextRequest(exportName: "", queries: [])),
            (Wire.metaPayload(name: "d", queries: Array(repeating: "base:", count: 128)),
             NBDMetaContextRequest(exportName: "d", queries: Array(repeating: "base:", count: 128))),
        ]
        for (payload, expected) in cases {
            XCTAssertEqual(ByteBuffer.parseMetaContextRequest(Wire.buffer(payload)), expected)
        }
    }

    func testParseMetaContextRequestMalformed() {
        let good = Wire.metaPayload(name: "disk", queries: ["base:allocation"])
        let cases: [(String, [UInt8])] = [
            ("empty", []),
            ("missing count", Wire.string("disk")),
            ("count 2, one query", Wire.string("disk") + Wire.be(UInt32(2)) + Wire.string("base:allocation")),
            ("count 0 with a query", Wire.string("disk") + Wire.be(UInt32(0)) + Wire.string("base:allocation")),
            ("query length past end", Wire.string("disk") + Wire.be(UInt32(1)) + Wire.be(UInt32(20)) + Array("base:".utf8)),
            ("trailing garbage", good + [1, 2, 3]),
            ("name length past end", Wire.be(UInt32(50)) + Array("disk".utf8)),
            ("name > 4096", Wire.metaPayload(name: String(repeating: "n", count: 4097), queries: [])),
            ("query > 4096", Wire.metaPayload(name: "d", queries: [String(repeating: "q", count: 4097)])),
            ("NUL in name", Wire.be(UInt32(2)) + [0x64, 0] + Wire.be(UInt32(0))),
            ("NUL in query", Wire.string("d") + Wire.be(UInt32(1)) + Wire.be(UInt32(5)) + [0x62, 0x61, 0, 0x65, 0x3a]),
            ("too many queries", Wire.metaPayload(name: "d", queries: Array(repeating: "base:", count: 129))),
            ("count 2^32-1", Wire.string("d") + Wire.be(UInt32.max)),
        ]
        for (what, payload) in cases {
            XCTAssertNil(ByteBuffer.parseMetaContextRequest(Wire.buffer(payload)), what)
        }
    }

    // MARK: errno mapping

    func testHostErrnoMapping() {
        let table: [(Int32, NBDErrno)] = [
            (0, .ok),
            (EPERM, .eperm), (EACCES, .eperm), (EROFS, .eperm),
            (ENOMEM, .enomem),
            (EINVAL, .einval),
            (ENOSPC, .enospc), (EDQUOT, .enospc), (EFBIG, .enospc),
            (EOVERFLOW, .eoverflow),
            (EOPNOTSUPP, .enotsup), (ENOTSUP, .enotsup),
            (ESHUTDOWN, .eshutdown),
            (EIO, .eio), (ENOENT, .eio), (EBADF, .eio), (EAGAIN, .eio), (ENXIO, .eio), (9999, .eio), (-1, .eio),
        ]
        for (host, wire) in table {
            XCTAssertEqual(NBDErrno(hostErrno: host), wire, "errno \(host)")
        }
    }

    func testErrorToWireErrno() {
        XCTAssertEqual(NBDErrno(BackendError.notFast), .enotsup)
        XCTAssertEqual(NBDErrno(BackendError.shortRead(offset: 4)), .eio)
        XCTAssertEqual(NBDErrno(BackendError.system(SystemError("pwrite", errno: EDQUOT))), .enospc)
        XCTAssertEqual(NBDErrno(SystemError("pwrite", errno: EROFS)), .eperm)
        XCTAssertEqual(NBDErrno(NBDErrno.eoverflow), .eoverflow)
        struct Other: Error {}
        XCTAssertEqual(NBDErrno(Other()), .eio)
    }
}
