import NIOCore
import XCTest
@testable import NbdPager

final class ZeroRunsTests: XCTestCase {
    private func runs(_ bytes: [UInt8], granularity: Int = 4096) -> [(Range<Int>, Bool)] {
        bytes.withUnsafeBytes { ZeroRuns.runs($0, granularity: granularity).map { ($0.range, $0.zero) } }
    }

    func testIsZero() {
        XCTAssertTrue([UInt8](repeating: 0, count: 0).withUnsafeBytes { ZeroRuns.isZero($0) })
        XCTAssertTrue([UInt8](repeating: 0, count: 4099).withUnsafeBytes { ZeroRuns.isZero($0) })
        for at in [0, 63, 64, 4095, 4098] {
            var b = [UInt8](repeating: 0, count: 4099)
            b[at] = 1
            XCTAssertFalse(b.withUnsafeBytes { ZeroRuns.isZero($0) }, "non-zero byte at \(at)")
        }
    }

    func testRunsAlternateAndCoverEverything() {
        var b = [UInt8](repeating: 7, count: 5 * 4096 + 100)
        for i in 4096 ..< 3 * 4096 { b[i] = 0 }       // blocks 1-2 zero
        for i in 5 * 4096 ..< b.count { b[i] = 0 }    // the short tail zero
        let r = runs(b)
        XCTAssertEqual(r.map { $0.0 }, [0 ..< 4096, 4096 ..< 12288, 12288 ..< 20480, 20480 ..< 20580])
        XCTAssertEqual(r.map { $0.1 }, [false, true, false, true])
        // a block with one non-zero byte is data
        b[4096 + 4095] = 1
        XCTAssertEqual(runs(b).map { $0.1 }, [false, true, false, true])
        XCTAssertEqual(runs(b).map { $0.0 }, [0 ..< 8192, 8192 ..< 12288, 12288 ..< 20480, 20480 ..< 20580])
    }

    /// Parses structured read reply chunks: (type, offset, length, flags).
    private func chunks(_ reply: ByteBuffer) -> [(UInt16, UInt64, Int, UInt16)] {
        var b = reply
        var out: [(UInt16, UInt64, Int, UInt16)] = []
        while b.readableBytes > 0 {
            guard let magic: UInt32 = b.readInteger(), let flags: UInt16 = b.readInteger(),
                  let type: UInt16 = b.readInteger(), let _: UInt64 = b.readInteger(),
                  let length: UInt32 = b.readInteger(), let offset: UInt64 = b.readInteger() else {
                XCTFail("truncated chunk"); return out
            }
            XCTAssertEqual(magic, NBDMagic.structuredReply)
            if type == NBDReplyType.offsetHole.rawValue {
                XCTAssertEqual(length, 12)
                guard let size: UInt32 = b.readInteger() else { XCTFail("truncated hole"); return out }
                out.append((type, offset, Int(size), flags))
            } else {
                b.moveReaderIndex(forwardBy: Int(length) - 8)
                out.append((type, offset, Int(length) - 8, flags))
            }
        }
        return out
    }

    private func reply(_ data: [UInt8], offset: UInt64) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeStructuredReplyHeader(flags: .done, type: .offsetData, cookie: 9, length: UInt32(8 + data.count))
        b.writeInteger(offset)
        b.writeBytes(data)
        return b
    }

    func testWithHolesSplitsZeroBlocksIntoHoleChunks() {
        var data = [UInt8](repeating: 5, count: 4 * 4096)
        for i in 4096 ..< 8192 { data[i] = 0 }
        let out = ZeroRuns.withHoles(reply(data, offset: 1 << 20), headerLength: 28, dataLength: data.count,
                                     offset: 1 << 20, cookie: 9, dontFragment: false)
        let c = chunks(out)
        let hole = NBDReplyType.offsetHole.rawValue, dataType = NBDReplyType.offsetData.rawValue
        XCTAssertEqual(c.map { $0.0 }, [dataType, hole, dataType])
        XCTAssertEqual(c.map { $0.1 }, [1 << 20, (1 << 20) + 4096, (1 << 20) + 8192])
        XCTAssertEqual(c.map { $0.2 }, [4096, 4096, 8192])
        XCTAssertEqual(c.map { $0.3 }, [0, 0, NBDReplyFlags.done.rawValue], "only the last chunk is DONE")
    }

    func testWithHolesKeepsReplyWithoutZerosOrWithDF() {
        let data = [UInt8](repeating: 1, count: 8192)
        let plain = reply(data, offset: 0)
        XCTAssertEqual(ZeroRuns.withHoles(plain, headerLength: 28, dataLength: 8192, offset: 0, cookie: 9,
                                          dontFragment: false), plain)
        var mixed = data
        for i in 0 ..< 4096 { mixed[i] = 0 }
        let m = reply(mixed, offset: 0)
        XCTAssertEqual(ZeroRuns.withHoles(m, headerLength: 28, dataLength: 8192, offset: 0, cookie: 9, dontFragment: true), m,
                       "DF: one chunk only")
        let zero = reply([UInt8](repeating: 0, count: 8192), offset: 4096)
        let z = chunks(ZeroRuns.withHoles(zero, headerLength: 28, dataLength: 8192, offset: 4096, cookie: 9, dontFragment: true))
        XCTAssertEqual(z.count, 1)
        XCTAssertEqual(z.first?.0, NBDReplyType.offsetHole.rawValue, "DF: an all-zero read is one hole chunk")
        XCTAssertEqual(z.first?.3, NBDReplyFlags.done.rawValue)
    }
}
