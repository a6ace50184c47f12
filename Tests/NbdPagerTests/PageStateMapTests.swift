import XCTest
@testable import NbdPager

final class PageStateMapTests: XCTestCase {
    // MARK: geometry

    func testGeometryExactAndPartialLastPage() throws {
        let exact = try PageGeometry(exportSize: 8192)
        XCTAssertEqual(exact.pageCount, 2)
        XCTAssertFalse(exact.hasPartialLastPage)

        let partial = try PageGeometry(exportSize: 8193)
        XCTAssertEqual(partial.pageCount, 3)
        XCTAssertTrue(partial.hasPartialLastPage)
        XCTAssertEqual(partial.length(ofPage: 2), 1)
        XCTAssertEqual(partial.length(ofPage: 1), 4096)
        XCTAssertEqual(partial.length(ofPage: 3), 0)
        XCTAssertEqual(partial.byteRange(of: 0 ..< 3).offset, 0)
        XCTAssertEqual(partial.byteRange(of: 0 ..< 3).length, 8193)
        XCTAssertEqual(partial.byteRange(of: 2 ..< 10).offset, 8192)
        XCTAssertEqual(partial.byteRange(of: 2 ..< 10).length, 1)
        XCTAssertEqual(partial.byteRange(of: 5 ..< 10).length, 0)
        XCTAssertEqual(partial.byteRange(of: 0 ..< UInt64.max).length, 8193)

        let empty = try PageGeometry(exportSize: 0)
        XCTAssertEqual(empty.pageCount, 0)
        XCTAssertEqual(empty.pages(covering: 0, length: 4096), 0 ..< 0)

        let small = try PageGeometry(exportSize: 100)
        XCTAssertEqual(small.pageCount, 1)
        XCTAssertEqual(small.pages(covering: 99, length: 1), 0 ..< 1)

        let huge = try PageGeometry(exportSize: UInt64.max)
        XCTAssertEqual(huge.pageCount, (UInt64.max >> 12) + 1)
    }

    func testGeometryRejectsNonPowerOfTwo() {
        XCTAssertThrowsError(try PageGeometry(exportSize: 1 << 20, pageSize: 3000))
        XCTAssertThrowsError(try PageGeometry(exportSize: 1 << 20, pageSize: 0))
        XCTAssertNoThrow(try PageGeometry(exportSize: 1 << 20, pageSize: 512))
    }

    func testGeometryPagesCovering() throws {
        let g = try PageGeometry(exportSize: 10 * 4096 + 100)   // 11 pages, the last of 100 bytes
        XCTAssertEqual(g.pages(covering: 0, length: 1), 0 ..< 1)
        XCTAssertEqual(g.pages(covering: 0, length: 4096), 0 ..< 1)
        XCTAssertEqual(g.pages(covering: 0, length: 4097), 0 ..< 2)
        XCTAssertEqual(g.pages(covering: 4095, length: 2), 0 ..< 2)
        XCTAssertEqual(g.pages(covering: 4096, length: 4096), 1 ..< 2)
        // Zero length: empty, at the page of the offset.
        XCTAssertEqual(g.pages(covering: 4096 * 3 + 5, length: 0), 3 ..< 3)
        // End of export: clamped.
        XCTAssertEqual(g.pages(covering: 10 * 4096, length: 100), 10 ..< 11)
        XCTAssertEqual(g.pages(covering: 10 * 4096, length: 1 << 30), 10 ..< 11)
        XCTAssertEqual(g.pages(covering: 10 * 4096 + 100, length: 10), 11 ..< 11)
        XCTAssertEqual(g.pages(covering: 1 << 40, length: 10), 11 ..< 11)
        // Overflowing offset + length does not trap.
        XCTAssertEqual(g.pages(covering: UInt64.max - 1, length: UInt64.max), 11 ..< 11)
        XCTAssertEqual(g.pages(covering: 5000, length: UInt64.max), 1 ..< 11)
    }

    func testGeometryAlignment() throws {
        let g = try PageGeometry(exportSize: 1_000_000)
        XCTAssertTrue(g.isPageAligned(0))
        XCTAssertTrue(g.isPageAligned(8192))
        XCTAssertFalse(g.isPageAligned(8193))
        XCTAssertTrue(g.isPageAligned(offset: 4096, length: 8192))
        XCTAssertFalse(g.isPageAligned(offset: 4096, length: 100))
        // Ending exactly at a partial last page's end counts as aligned.
        XCTAssertTrue(g.isPageAligned(offset: 999_424, length: 576))
        XCTAssertEqual(PageGeometry.alignDown(70_000, to: 65536), 65536)
        XCTAssertEqual(PageGeometry.alignUp(70_000, to: 65536), 131_072)
        XCTAssertEqual(PageGeometry.alignUp(65536, to: 65536), 65536)
        XCTAssertEqual(PageGeometry.alignUp(UInt64.max - 1, to: 4096), UInt64.max - 4095)
        XCTAssertEqual(PageGeometry.alignUp(5, to: 0), 5)
        XCTAssertEqual(g.alignUp(999_999, to: 65536), 1_000_000, "clamped to the export")
        XCTAssertEqual(g.alignDown(2_000_000, to: 65536), 1_000_000)
        let w = g.fetchWindow(offset: 990_000, length: 10, fetchSize: 65536)
        XCTAssertEqual(w.offset, 983_040)
        XCTAssertEqual(w.length, 1_000_000 - 983_040, "clamped to the export")
        let w2 = g.fetchWindow(offset: 70_000, length: 4096, fetchSize: 65536)
        XCTAssertEqual(w2.offset, 65536)
        XCTAssertEqual(w2.length, 65536)
    }

    // MARK: transitions

    func testTransitionTableIsForwardOnly() {
        // (from, to, expected state afterwards)
        let table: [(PageState, PageState, PageState)] = [
            (.absent, .absent, .absent),
            (.absent, .present, .present),
            (.absent, .local, .local),
            (.present, .absent, .present),
            (.present, .present, .present),
            (.present, .local, .local),
            (.local, .absent, .local),
            (.local, .present, .local),
            (.local, .local, .local),
        ]
        for (from, to, expected) in table {
            var map = PageStateMap(pageCount: 40)
            map.mark(5 ..< 6, from)
            let changed = map.mark(5 ..< 6, to)
            XCTAssertEqual(map.state(of: 5), expected, "\(from) → \(to)")
            XCTAssertEqual(changed, from == expected ? 0 : 1, "\(from) → \(to)")
            XCTAssertEqual(map.state(of: 4), .absent)
            XCTAssertEqual(map.state(of: 6), .absent)
            XCTAssertEqual(map.absentCount + map.presentCount + map.localCount, 40)
        }
    }

    func testCountsAndMixedMarks() {
        var map = PageStateMap(pageCount: 100)
        XCTAssertEqual(map.absentCount, 100)
        XCTAssertFalse(map.isComplete)
        XCTAssertEqual(map.mark(10 ..< 50, .present), 40)
        XCTAssertEqual(map.mark(30 ..< 70, .local), 40)    // 20 present + 20 absent
        XCTAssertEqual(map.mark(0 ..< 100, .present), 40)  // only the absent ones
        XCTAssertEqual(map.count(of: .absent), 0)
        XCTAssertEqual(map.count(of: .present), 60)
        XCTAssertEqual(map.count(of: .local), 40)
        XCTAssertTrue(map.isComplete)
        XCTAssertEqual(map.mark(0 ..< 100, .present), 0)
        XCTAssertEqual(map.mark(90 ..< 500, .local), 10, "clamped to the map")
        XCTAssertEqual(map.localCount, 50)
        XCTAssertEqual(map.count(of: .local, in: 60 ..< 95), 15)
        XCTAssertEqual(map.mark(200 ..< 300, .local), 0)
    }

    func testMarkMatchesReference() {
        // Random marks against a plain array of states.
        var rng = SystemRandomNumberGenerator()
        for _ in 0 ..< 20 {
            let n = UInt64.random(in: 1 ... 300, using: &rng)
            var map = PageStateMap(pageCount: n)
            var ref = [PageState](repeating: .absent, count: Int(n))
            for _ in 0 ..< 30 {
                let a = UInt64.random(in: 0 ... n, using: &rng)
                let b = UInt64.random(in: a ... n, using: &rng)
                let s = PageState.allCases.randomElement(using: &rng) ?? .present
                var expectedChanges: UInt64 = 0
                for p in a ..< b where s.rawValue > ref[Int(p)].rawValue {
                    ref[Int(p)] = s
                    expectedChanges += 1
                }
                XCTAssertEqual(map.mark(a ..< b, s), expectedChanges)
            }
            for p in 0 ..< n { XCTAssertEqual(map.state(of: p), ref[Int(p)]) }
            for s in PageState.allCases {
                XCTAssertEqual(map.count(of: s), UInt64(ref.filter { $0 == s }.count))
                XCTAssertEqual(map.runs(of: s, in: 0 ..< n), referenceRuns(ref, s, 0 ..< n))
                let a = UInt64.random(in: 0 ... n, using: &rng)
                let b = UInt64.random(in: a ... n, using: &rng)
                XCTAssertEqual(map.runs(of: s, in: a ..< b), referenceRuns(ref, s, a ..< b))
                XCTAssertEqual(map.firstPage(with: s, from: a), (a ..< n).first { ref[Int($0)] == s })
            }
        }
    }

    private func referenceRuns(_ ref: [PageState], _ s: PageState, _ r: Range<UInt64>) -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        var start: UInt64?
        for p in r {
            if ref[Int(p)] == s {
                if start == nil { start = p }
            } else if let st = start {
                out.append(st ..< p)
                start = nil
            }
        }
        if let st = start { out.append(st ..< r.upperBound) }
        return out
    }

    // MARK: runs

    func testRunsAlternating() {
        var map = PageStateMap(pageCount: 70)
        for p in stride(from: UInt64(0), to: 70, by: 2) { map.mark(p ..< p + 1, .present) }
        let present = map.runs(of: .present, in: 0 ..< 70)
        XCTAssertEqual(present.count, 35)
        XCTAssertEqual(present.first, 0 ..< 1)
        XCTAssertEqual(present.last, 68 ..< 69)
        let absent = map.runs(of: .absent, in: 0 ..< 70)
        XCTAssertEqual(absent.count, 35)
        XCTAssertEqual(absent.last, 69 ..< 70)
        XCTAssertEqual(map.runs(of: .local, in: 0 ..< 70), [])
        XCTAssertEqual(map.runs(of: .present, in: 3 ..< 8), [4 ..< 5, 6 ..< 7])
    }

    func testRunsAcrossWordBoundaries() {
        for (a, b) in [(31, 33), (31, 64), (32, 64), (33, 63), (63, 65), (64, 65), (0, 32), (0, 64), (31, 97), (1, 200)] as [(UInt64, UInt64)] {
            var map = PageStateMap(pageCount: 200)
            map.mark(a ..< b, .local)
            XCTAssertEqual(map.runs(of: .local, in: 0 ..< 200), [a ..< b], "run \(a)..<\(b)")
            var expectedAbsent: [Range<UInt64>] = []
            if a > 0 { expectedAbsent.append(0 ..< a) }
            if b < 200 { expectedAbsent.append(b ..< 200) }
            XCTAssertEqual(map.runs(of: .absent, in: 0 ..< 200), expectedAbsent, "gaps around \(a)..<\(b)")
            XCTAssertEqual(map.firstPage(with: .local, from: 0), a)
            XCTAssertEqual(map.firstPage(with: .absent, from: a), b < 200 ? b : nil)
            // A query window that starts and ends inside the run.
            if b - a >= 2 {
                XCTAssertEqual(map.runs(of: .local, in: a + 1 ..< b - 1), b - a > 2 ? [a + 1 ..< b - 1] : [])
            }
        }
    }

    func testRunsFullMapAndEmpty() {
        var map = PageStateMap(pageCount: 1000)
        XCTAssertEqual(map.runs(of: .absent, in: 0 ..< 1000), [0 ..< 1000])
        XCTAssertEqual(map.runs(of: .absent, in: 0 ..< 5000), [0 ..< 1000], "clamped")
        map.mark(0 ..< 1000, .present)
        XCTAssertEqual(map.runs(of: .present, in: 0 ..< 1000), [0 ..< 1000])
        XCTAssertEqual(map.runs(of: .absent, in: 0 ..< 1000), [])
        XCTAssertEqual(map.runs(of: .present, in: 10 ..< 10), [])
        XCTAssertNil(map.firstPage(with: .absent, from: 0))
        XCTAssertNil(map.firstPage(with: .present, from: 1000))
        let zero = PageStateMap(pageCount: 0)
        XCTAssertEqual(zero.runs(of: .absent, in: 0 ..< 10), [])
        XCTAssertTrue(zero.isComplete)
        XCTAssertEqual(zero.encode(), [])
    }

    func testLargeMapScanIsWordWise() {
        // 1 Mi pages (a 4 GiB export): sparse marks, then scans over the whole map.
        var map = PageStateMap(pageCount: 1 << 20)
        map.mark(100 ..< 200, .present)
        map.mark(500_000 ..< 500_001, .local)
        map.mark((1 << 20) - 3 ..< (1 << 20), .present)
        XCTAssertEqual(map.runs(of: .present, in: 0 ..< (1 << 20)), [100 ..< 200, (1 << 20) - 3 ..< (1 << 20)])
        XCTAssertEqual(map.runs(of: .absent, in: 0 ..< (1 << 20)).count, 3)
        XCTAssertEqual(map.firstPage(with: .local, from: 201), 500_000)
        XCTAssertEqual(map.encode().count, 256 * 1024)
    }

    // MARK: encoding

    func testEncodeDecodeRoundTrip() throws {
        for n: UInt64 in [0, 1, 3, 4, 5, 31, 32, 33, 63, 64, 65, 1000] {
            var map = PageStateMap(pageCount: n)
            map.mark(0 ..< n / 3, .present)
            map.mark(n / 2 ..< n, .local)
            let bytes = map.encode()
            XCTAssertEqual(bytes.count, Int((n + 3) / 4))
            let back = try PageStateMap(decoding: bytes, pageCount: n)
            XCTAssertEqual(back, map)
            XCTAssertEqual(back.presentCount, map.presentCount)
            XCTAssertEqual(back.localCount, map.localCount)
            XCTAssertEqual(back.absentCount, map.absentCount)
        }
    }

    func testEncodingLayout() throws {
        var map = PageStateMap(pageCount: 6)
        map.mark(1 ..< 2, .present)
        map.mark(2 ..< 3, .local)
        map.mark(4 ..< 5, .local)
        // Page p in bits 2*(p%4) of byte p/4.
        XCTAssertEqual(map.encode(), [0b0010_0100, 0b0000_0010])
    }

    func testDecodeRejectsBadInput() {
        XCTAssertThrowsError(try PageStateMap(decoding: [UInt8](repeating: 0, count: 3), pageCount: 16)) {
            XCTAssertEqual($0 as? PageStateMapError, .wrongLength(expected: 4, actual: 3))
        }
        XCTAssertThrowsError(try PageStateMap(decoding: [UInt8](repeating: 0, count: 5), pageCount: 16))
        // State value 3 for page 5 (byte 1, lane 1).
        XCTAssertThrowsError(try PageStateMap(decoding: [0, 0b0000_1100, 0, 0], pageCount: 16)) {
            XCTAssertEqual($0 as? PageStateMapError, .invalidState(page: 5))
        }
        // Bits set past the last page (page count 5: byte 1 holds only page 4).
        XCTAssertThrowsError(try PageStateMap(decoding: [0, 0b0000_0100], pageCount: 5)) {
            XCTAssertEqual($0 as? PageStateMapError, .nonZeroPadding)
        }
        XCTAssertNoThrow(try PageStateMap(decoding: [0, 0b0000_0010], pageCount: 5))
    }

    /// Found by FuzzStateMap: a padding lane holding 3 was reported as an invalid state of page 33 of a
    /// 33-page map (a page that does not exist) instead of as padding.
    func testDecodeReportsThreeInAPaddingLaneAsPadding() {
        var bytes = [UInt8](repeating: 0, count: 9)
        bytes[8] = 0b0000_1100  // page 33's lane: past the last page (32)
        XCTAssertThrowsError(try PageStateMap(decoding: bytes, pageCount: 33)) {
            XCTAssertEqual($0 as? PageStateMapError, .nonZeroPadding)
        }
        // An invalid state in a real page still names that page, even with padding set as well.
        bytes[8] = 0b0000_1111
        XCTAssertThrowsError(try PageStateMap(decoding: bytes, pageCount: 33)) {
            XCTAssertEqual($0 as? PageStateMapError, .invalidState(page: 32))
        }
    }

    // MARK: CRC32C

    func testCRC32CCheckValue() {
        XCTAssertEqual(CRC32C.checksum(Array("123456789".utf8)), 0xE306_9283)
        XCTAssertEqual(CRC32C.checksum([UInt8]()), 0)
        // 32 zero bytes (RFC 3720 B.4).
        XCTAssertEqual(CRC32C.checksum([UInt8](repeating: 0, count: 32)), 0x8A91_36AA)
        XCTAssertEqual(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)), 0x62A8_AB43)
        // Incremental equals one-shot, across the 8-byte fast path.
        let data = (0 ..< 1000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        var c = CRC32C()
        c.update(data[0 ..< 13])
        c.update(data[13 ..< 500])
        c.update(data[500...])
        XCTAssertEqual(c.value, CRC32C.checksum(data))
    }
}
