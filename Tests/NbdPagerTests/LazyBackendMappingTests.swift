import Logging
import NIOCore
import NIOEmbedded
import XCTest
@testable import NbdPager

/// Export page p ↔ source page p + shift. Defined only here: a new mapping plugs into the lazy export
/// as one type, with no edit to the pull paths.
struct FixedOffsetMapping: SourceMapping {
    let shift: UInt64

    func sourceRuns(of pages: Range<UInt64>, geometry: PageGeometry) -> [SourceRun] {
        pages.isEmpty ? [] : [SourceRun(pages: pages, sourceOffset: (pages.lowerBound + shift) * geometry.pageSize)]
    }

    func exportPages(inside sourceBytes: Range<UInt64>, geometry: PageGeometry) -> [Range<UInt64>] {
        let base = shift * geometry.pageSize
        guard sourceBytes.upperBound > base else { return [] }
        let shifted = max(sourceBytes.lowerBound, base) - base ..< sourceBytes.upperBound - base
        return IdentityMapping().exportPages(inside: shifted, geometry: geometry)
    }

    func sourceSpan(geometry: PageGeometry, sourceSize: UInt64) -> Range<UInt64> {
        let base = shift * geometry.pageSize
        return base ..< min(sourceSize, base + geometry.exportSize)
    }
}

/// A page table (swap mode's shape): each export page maps to any source page, or to nothing.
struct TableMapping: SourceMapping {
    let table: [UInt64: UInt64]

    func sourceRuns(of pages: Range<UInt64>, geometry: PageGeometry) -> [SourceRun] {
        var runs: [SourceRun] = []
        for page in pages {
            let offset = table[page].map { $0 * geometry.pageSize }
            if let last = runs.last, last.pages.upperBound == page,
               last.sourceOffset.map({ $0 + geometry.byteRange(of: last.pages).length }) == offset
                || (last.sourceOffset == nil && offset == nil) {
                runs[runs.count - 1].pages = last.pages.lowerBound ..< page + 1
            } else {
                runs.append(SourceRun(pages: page ..< page + 1, sourceOffset: offset))
            }
        }
        return runs
    }

    func exportPages(inside sourceBytes: Range<UInt64>, geometry: PageGeometry) -> [Range<UInt64>] {
        table.filter { sourceBytes.contains($0.value * geometry.pageSize)
            && sourceBytes.upperBound >= ($0.value + 1) * geometry.pageSize }
            .map { $0.key ..< $0.key + 1 }
    }

    func sourceSpan(geometry: PageGeometry, sourceSize: UInt64) -> Range<UInt64> { 0 ..< sourceSize }
}

extension LazyBackendTests {
    /// An export of `pages` pages over a source of `sourcePages` pages, through `mapping`.
    func makeMapped(pages: Int, sourcePages: Int, mapping: any SourceMapping, fetchSize: UInt64 = 4096,
                    zeroRanges: [Range<UInt64>] = []) throws -> (LazyBackend, FakeSource) {
        let source = FakeSource(data: fakeImage(pages: sourcePages, zeroRanges: zeroRanges), zeroRanges: zeroRanges)
        let store = try PageStore.open(directory: dir, size: UInt64(pages) * 4096, identity: "fake", reset: false)
        return (LazyBackend(store: store, source: source, fetchSize: fetchSize, logger: Logger(label: "test"),
                            eventLoop: loop, threadPool: lazyTestPool, mapping: mapping), source)
    }

    func sourcePage(_ source: FakeSource, _ page: Int) -> [UInt8] { Array(source.data[page * 4096 ..< (page + 1) * 4096]) }

    func testShiftedMappingReadsTheShiftedSourcePages() throws {
        let (backend, source) = try makeMapped(pages: 16, sourcePages: 20, mapping: FixedOffsetMapping(shift: 4))
        XCTAssertEqual(try readAll(backend, offset: 3 * 4096, length: 4096), sourcePage(source, 7))
        XCTAssertEqual(source.readLog.map(\.0), [7 * 4096])
        let direct = try XCTUnwrap(backend.pendingRead(offset: 5 * 4096 + 10, length: 100, eventLoop: loop, early: nil))
        XCTAssertEqual(bytes(try result(direct, on: loop)), Array(sourcePage(source, 9)[10 ..< 110]))
        assertPresent(backend, 5 ..< 6)
        XCTAssertEqual(try readAll(backend, offset: 5 * 4096, length: 4096), sourcePage(source, 9))
        XCTAssertEqual(source.readLog.map(\.0), [7 * 4096, 9 * 4096])
    }

    func testShiftedMappingKeepsSingleFlight() throws {
        let (backend, source) = try makeMapped(pages: 16, sourcePages: 20, mapping: FixedOffsetMapping(shift: 4))
        source.hold()
        let futures = (0 ..< 8).compactMap { _ in
            backend.prepare(offset: 5 * 4096 + 100, length: 10, forWrite: false, eventLoop: loop)
        }
        XCTAssertEqual(futures.count, 8)
        loop.run()
        XCTAssertEqual(source.pendingCount, 1)
        source.release()
        for f in futures { try result(f, on: loop) }
        XCTAssertEqual(source.readLog.map { "\($0.0)+\($0.1)" }, ["\(9 * 4096)+4096"])
        XCTAssertEqual(try readAll(backend, offset: 5 * 4096, length: 4096), sourcePage(source, 9))
    }

    func testShiftedMappingCoalescesFetchWindowsIntoOneShiftedRead() throws {
        let (backend, source) = try makeMapped(pages: 64, sourcePages: 68, mapping: FixedOffsetMapping(shift: 4),
                                               fetchSize: 16384)
        let pending = try XCTUnwrap(backend.pendingRead(offset: 4096, length: 8 * 4096, eventLoop: loop, early: nil))
        XCTAssertEqual(bytes(try result(pending, on: loop)), Array(source.data[5 * 4096 ..< 13 * 4096]))
        assertPresent(backend, 0 ..< 12)
        XCTAssertEqual(source.readLog.map { "\($0.0)+\($0.1)" }, ["\(4 * 4096)+49152"], "export pages 0 ..< 12 are source pages 4 ..< 16")
        XCTAssertEqual(backend.store.state(of: 12), .absent)
    }

    func testShiftedMappingImportsTheShiftedZeroMap() throws {
        // Source pages 0-3 lie outside the export; 5-8 are export pages 1-4; page 9 only partly zero.
        let zeros: [Range<UInt64>] = [0 ..< 4 * 4096, 5 * 4096 ..< 9 * 4096 + 100]
        let (backend, source) = try makeMapped(pages: 16, sourcePages: 20, mapping: FixedOffsetMapping(shift: 4),
                                               zeroRanges: zeros)
        let marked = try blocking { try await backend.markSourceZeros() }
        XCTAssertEqual(marked, 4)
        XCTAssertEqual(backend.store.runs(of: .present, in: 0 ..< 16), [1 ..< 5])
        XCTAssertTrue(source.readLog.isEmpty)
        XCTAssertEqual(try readAll(backend, offset: 0, length: 4096), sourcePage(source, 4))
        XCTAssertEqual(try readAll(backend, offset: 4096, length: 4 * 4096), [UInt8](repeating: 0, count: 4 * 4096))
        XCTAssertEqual(source.readLog.map(\.0), [4 * 4096], "the zero pages are not pulled")
    }

    func testTableMappingCutsPullsWhereTheSourceIsNotContiguousAndNeverPullsUnmappedPages() throws {
        let table: [UInt64: UInt64] = [0: 10, 1: 11, 3: 3, 4: 20, 5: 21, 6: 22, 7: 23]
        let (backend, source) = try makeMapped(pages: 8, sourcePages: 24, mapping: TableMapping(table: table),
                                               fetchSize: 8 * 4096)
        let pending = try XCTUnwrap(backend.pendingRead(offset: 4096, length: 3 * 4096, eventLoop: loop, early: nil))
        let expected = sourcePage(source, 11) + [UInt8](repeating: 0, count: 4096) + sourcePage(source, 3)
        XCTAssertEqual(bytes(try result(pending, on: loop)), expected)
        assertPresent(backend, 0 ..< 8)
        XCTAssertEqual(source.readLog.map { "\($0.0)+\($0.1)" }.sorted(),
                       ["\(10 * 4096)+8192", "\(20 * 4096)+16384", "\(3 * 4096)+4096"].sorted(),
                       "one read per contiguous source run; unmapped page 2 is not read")
        XCTAssertEqual(try readAll(backend, offset: 2 * 4096, length: 4096), [UInt8](repeating: 0, count: 4096))
        XCTAssertEqual(try readAll(backend, offset: 7 * 4096, length: 4096), sourcePage(source, 23))
        XCTAssertEqual(source.readLog.count, 3)
    }
}
