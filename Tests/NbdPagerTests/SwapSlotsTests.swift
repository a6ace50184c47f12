import Foundation
import Logging
import NIOCore
import NIOEmbedded
import XCTest
@testable import NbdPager

/// The staging marker on its own.
final class StagingMarkerTests: XCTestCase {
    let key = StagingMarker.Key(k0: 0x0706_0504_0302_0100, k1: 0x0f0e_0d0c_0b0a_0908)

    func testSipHashReferenceVectors() {
        // SipHash-2-4 paper, appendix A: key 00 01 .. 0f; messages of 0 and 15 bytes 00 01 ...
        XCTAssertEqual(SipHash24.hash(key: key, bytes: []), 0x726f_db47_dd0e_0e31)
        XCTAssertEqual(SipHash24.hash(key: key, bytes: Array(0 ..< 15)), 0xa129_ca61_49be_45e5)
        XCTAssertEqual(SipHash24.hash(key: key, 0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908),
                       SipHash24.hash(key: key, bytes: Array(0 ..< 16)))
    }

    func decode(_ bytes: [UInt8], key k: StagingMarker.Key? = nil) -> StagingMarker.Decoded {
        bytes.withUnsafeBytes { StagingMarker.decode($0, key: k ?? key) }
    }

    func testValidMarkerDecodesToItsPage() {
        for page: UInt64 in [0, 1, 4095, 1 << 31] {
            XCTAssertEqual(decode(StagingMarker.bytes(page: page, key: key)), .marker(page: page))
        }
    }

    func testWrongKeyWrongIndexTornAndPartialMarkersDoNotDecode() {
        let good = StagingMarker.bytes(page: 7, key: key)
        XCTAssertEqual(decode(good, key: StagingMarker.Key(k0: 1, k1: 2)), .invalid, "another run's key")
        var index = good
        index[8] = 8
        XCTAssertEqual(decode(index), .invalid, "page index changed")
        var torn = good
        torn[4095] = 1
        XCTAssertEqual(decode(torn), .invalid, "a non-zero byte after the marker")
        XCTAssertEqual(decode(Array(good[0 ..< 2048])), .invalid, "half a page")
        var tag = good
        tag[16] ^= 1
        XCTAssertEqual(decode(tag), .invalid, "authenticator changed")
        XCTAssertEqual(decode([UInt8](repeating: 0, count: 4096)), .data)
        XCTAssertEqual(decode(Wire.pattern(4096)), .data)
    }

    func testMarkerIsNeverAZeroPageAndKeysRoundTripAsHex() {
        XCTAssertFalse(StagingMarker.bytes(page: 0, key: key).allSatisfy { $0 == 0 })
        let k = StagingMarker.Key.random()
        XCTAssertEqual(StagingMarker.Key(hex: k.hex), k)
        XCTAssertNil(StagingMarker.Key(hex: "xyz"))
        XCTAssertNil(StagingMarker.Key(hex: String(repeating: "0", count: 31)))
    }

    func testSubtractRuns() {
        XCTAssertEqual(SourceZeroPages.subtract([0 ..< 10, 20 ..< 30], [2 ..< 4, 8 ..< 22, 25 ..< 26]),
                       [0 ..< 2, 4 ..< 8, 22 ..< 25, 26 ..< 30])
        XCTAssertEqual(SourceZeroPages.subtract([0 ..< 10], []), [0 ..< 10])
        XCTAssertEqual(SourceZeroPages.subtract([5 ..< 6], [0 ..< 100]), [])
    }

    func testPageStateMapResetMovesAnyStateBackToAbsent() {
        var map = PageStateMap(pageCount: 100)
        map.mark(0 ..< 40, .present)
        map.mark(30 ..< 60, .local)
        XCTAssertEqual(map.reset(20 ..< 70), 40)
        XCTAssertEqual(map.runs(of: .absent, in: 0 ..< 100), [20 ..< 100])
        XCTAssertEqual(map.count(of: .present), 20)
        XCTAssertEqual(map.count(of: .local), 0)
        XCTAssertEqual(map.count(of: .absent), 80)
    }
}

/// A swap export: staging through WRITEs, sealing, slot reuse, TRIM, persistence.
final class SwapSlotsTests: LazyTestCase {
    func makeSwap(slots: Int = 16, sourcePages: Int = 8, source existing: FakeSource? = nil,
                  fetchSize: UInt64 = 4096) throws -> (SwapSlotsBackend, FakeSource) {
        let source = existing ?? FakeSource(data: fakeImage(pages: sourcePages))
        let store = try PageStore.open(directory: dir, size: UInt64(slots) * 4096, identity: "fake (swap slots)", reset: false)
        let table = try SwapSlots(directory: dir, slotCount: UInt64(slots), sourceSize: source.size, pageSize: 4096)
        let lazy = LazyBackend(store: store, source: source, fetchSize: fetchSize, logger: Logger(label: "test"),
                               eventLoop: loop, threadPool: lazyTestPool, mapping: table,
                               completionArmed: table.stagingState == .sealed)
        try LazyExport.settleSwapStore(lazy, slots: table, logger: Logger(label: "test"))
        return (SwapSlotsBackend(lazy: lazy, slots: table), source)
    }

    func write(_ b: SwapSlotsBackend, _ bytes: [UInt8], slot: UInt64) throws {
        if let f = b.prepare(offset: slot * 4096, length: UInt64(bytes.count), forWrite: true, eventLoop: loop) {
            try result(f, on: loop)
        }
        let n = try bytes.withUnsafeBytes { try b.write(from: $0, offset: slot * 4096, fua: false, nonBlocking: false) }
        XCTAssertEqual(n, bytes.count)
    }

    func read(_ b: SwapSlotsBackend, slot: UInt64, count: Int = 1) throws -> [UInt8] {
        try readAll(b.lazy, offset: slot * 4096, length: count * 4096)
    }

    func page(_ s: FakeSource, _ p: Int) -> [UInt8] { Array(s.data[p * 4096 ..< (p + 1) * 4096]) }

    func testANewSwapExportIsZeroAndNeverPulls() throws {
        let (b, source) = try makeSwap()
        XCTAssertEqual(b.lazy.store.count(of: .absent, in: 0 ..< 16), 0)
        XCTAssertEqual(try read(b, slot: 3, count: 4), [UInt8](repeating: 0, count: 4 * 4096))
        XCTAssertTrue(source.readLog.isEmpty)
        XCTAssertFalse(b.lazy.status().complete, "completion counts only once staging is sealed")
        try b.close()
    }

    func testMergedWriteIsSplitPerSlotMarkersMapDataIsStored() throws {
        let (b, source) = try makeSwap()
        let key = try b.slots.open(ramFile: nil).key
        let data1 = Wire.pattern(4096, seed: 9), data2 = Wire.pattern(4096, seed: 11)
        let merged = StagingMarker.bytes(page: 5, key: key) + data1 + StagingMarker.bytes(page: 1, key: key)
            + StagingMarker.bytes(page: 2, key: key) + data2 + StagingMarker.bytes(page: 7, key: key)
        try write(b, merged, slot: 2)
        XCTAssertEqual(b.lazy.store.runs(of: .absent, in: 0 ..< 16), [2 ..< 3, 4 ..< 6, 7 ..< 8])
        XCTAssertEqual([2, 3, 4, 5, 6, 7].map { b.slots.page(ofSlot: $0) }, [5, nil, 1, 2, nil, 7])
        let c = b.slots.counts()
        XCTAssertEqual(c.markersDecoded, 4)
        XCTAssertEqual(c.mapped, 4)
        XCTAssertTrue(source.readLog.isEmpty, "staging pulls nothing")
        // Reads: a mapped slot returns its source page, a data slot its data.
        XCTAssertEqual(try read(b, slot: 4), page(source, 1))
        XCTAssertEqual(try read(b, slot: 3), data1)
        XCTAssertEqual(try read(b, slot: 2, count: 6),
                       page(source, 5) + data1 + page(source, 1) + page(source, 2) + data2 + page(source, 7))
        XCTAssertEqual(Set(source.readLog.map(\.0)), Set([1, 5, 2, 7].map { UInt64($0) * 4096 }))
        try b.close()
    }

    func testAnUnalignedOrPartialWriteIsDataEvenWhileStaging() throws {
        let (b, _) = try makeSwap()
        let key = try b.slots.open(ramFile: nil).key
        let marker = StagingMarker.bytes(page: 3, key: key)
        let n = try marker.withUnsafeBytes { try b.write(from: $0, offset: 4096 + 512, fua: false, nonBlocking: false) }
        XCTAssertEqual(n, 4096)
        XCTAssertEqual(b.slots.counts().markersDecoded, 0)
        XCTAssertEqual(Array(try read(b, slot: 1, count: 2)[512 ..< 4608]), marker)
        try b.close()
    }

    func testSealEndsMarkerDecodingForGood() throws {
        let (b, source) = try makeSwap()
        let key = try b.slots.open(ramFile: nil).key
        try write(b, StagingMarker.bytes(page: 4, key: key), slot: 1)
        let sealed = try b.slots.seal()
        XCTAssertEqual(sealed.stagedAtSeal, 1)
        // A guest page that happens to be a valid marker for this very key is data now.
        let lookalike = StagingMarker.bytes(page: 6, key: key)
        try write(b, lookalike, slot: 9)
        XCTAssertEqual(try read(b, slot: 9), lookalike)
        XCTAssertNil(b.slots.page(ofSlot: 9))
        XCTAssertEqual(b.slots.counts().markersDecoded, 1)
        XCTAssertTrue(source.readLog.isEmpty)
        XCTAssertThrowsError(try b.slots.open(ramFile: nil), "staging never reopens after sealing")
        XCTAssertThrowsError(try b.slots.seal())
        try b.close()
    }

    func testAReusedSlotStoresDataAndTrimDropsTheMapping() throws {
        let (b, source) = try makeSwap()
        let key = try b.slots.open(ramFile: nil).key
        try write(b, StagingMarker.bytes(page: 0, key: key) + StagingMarker.bytes(page: 1, key: key)
                     + StagingMarker.bytes(page: 2, key: key), slot: 5)
        _ = try b.slots.seal()
        b.lazy.armCompletion()
        // Slot 5 pulled (swap-in), then reused for other data; slot 6 reused without ever being read.
        XCTAssertEqual(try read(b, slot: 5), page(source, 0))
        let other = Wire.pattern(4096, seed: 42)
        try write(b, other, slot: 5)
        try write(b, other, slot: 6)
        XCTAssertEqual(try read(b, slot: 5, count: 2), other + other)
        try b.trim(offset: 7 * 4096, length: 4096, fua: false)
        XCTAssertEqual(try read(b, slot: 7), [UInt8](repeating: 0, count: 4096))
        XCTAssertEqual(source.readLog.map(\.0), [0], "only the slot read before its reuse was pulled")
        XCTAssertEqual(b.slots.counts().mapped, 0)
        XCTAssertTrue(b.lazy.status().complete, "every mapped slot is local")
        try b.close()
    }

    func testDuplicateAndInvalidMarkersAreCounted() throws {
        let (b, _) = try makeSwap()
        let key = try b.slots.open(ramFile: nil).key
        try write(b, StagingMarker.bytes(page: 3, key: key), slot: 1)
        try write(b, StagingMarker.bytes(page: 3, key: key), slot: 2)
        try write(b, StagingMarker.bytes(page: 3, key: StagingMarker.Key(k0: 5, k1: 5)), slot: 3)
        try write(b, StagingMarker.bytes(page: 8, key: key), slot: 4)  // beyond the 8-page source
        let c = b.slots.counts()
        XCTAssertEqual(c.duplicates, 1)
        XCTAssertEqual(c.invalidMarkers, 2)
        XCTAssertEqual(c.markersDecoded, 2)
        XCTAssertNil(b.slots.page(ofSlot: 4))
        try b.close()
    }

    func testReopeningStagingDropsAnUnsealedRunsSlots() throws {
        let (b, source) = try makeSwap()
        let first = try b.slots.open(ramFile: nil).key
        try write(b, StagingMarker.bytes(page: 2, key: first), slot: 1)
        let (second, dropped) = try b.slots.open(ramFile: nil)
        XCTAssertEqual(dropped, [1 ..< 2])
        XCTAssertEqual(b.slots.counts().markersDecoded, 0)
        for run in dropped { _ = try b.lazy.lazyStore.markZero(run) }
        XCTAssertEqual(try read(b, slot: 1), [UInt8](repeating: 0, count: 4096))
        try write(b, StagingMarker.bytes(page: 2, key: first), slot: 3)
        XCTAssertNil(b.slots.page(ofSlot: 3), "the first run's key no longer decodes")
        try write(b, StagingMarker.bytes(page: 2, key: second), slot: 4)
        XCTAssertEqual(b.slots.page(ofSlot: 4), 2)
        XCTAssertEqual(b.slots.counts().duplicates, 0)
        XCTAssertTrue(source.readLog.isEmpty)
        try b.close()
    }

    func testSlotTableAndStatesSurviveARestartNothingPulledTwiceNoSlotServedWrong() throws {
        var (b, source) = try makeSwap()
        let key = try b.slots.open(ramFile: "/dev/shm/ram-of-this-test")
        try write(b, (0 ..< 4).flatMap { StagingMarker.bytes(page: UInt64(3 + $0), key: key.key) }, slot: 8)
        _ = try b.slots.seal()
        try b.flush()
        XCTAssertEqual(try read(b, slot: 8), page(source, 3))   // pulled
        let data = Wire.pattern(4096, seed: 3)
        try write(b, data, slot: 9)                              // reused after sealing
        try b.close()

        (b, source) = try makeSwap(source: FakeSource(data: source.data))
        XCTAssertEqual(b.slots.stagingState, .sealed)
        XCTAssertEqual(b.slots.stagedRAMFile, "/dev/shm/ram-of-this-test")
        XCTAssertEqual(b.slots.counts().stagedAtSeal, 4)
        XCTAssertNil(b.slots.page(ofSlot: 9), "the overwritten slot maps to nothing after the restart")
        XCTAssertEqual(try read(b, slot: 8), page(source, 3))
        XCTAssertEqual(try read(b, slot: 9), data)
        XCTAssertTrue(source.readLog.isEmpty, "nothing pulled again, the reused slot not pulled")
        XCTAssertEqual(try read(b, slot: 10, count: 2), page(source, 5) + page(source, 6))
        XCTAssertEqual(source.readLog.map(\.0), [5 * 4096], "slots 10-11 map to contiguous source pages: one read")
        XCTAssertEqual(b.slots.unstagedPages(), [0 ..< 3, 7 ..< 8])
        XCTAssertTrue(b.lazy.status().complete)
        try b.close()
    }

    func testAnInterruptedStagingRestartsClosedWithItsSlotsKept() throws {
        var (b, source) = try makeSwap()
        let key = try b.slots.open(ramFile: nil).key
        try write(b, StagingMarker.bytes(page: 1, key: key), slot: 2)
        try b.flush()
        try b.close()
        (b, source) = try makeSwap(source: FakeSource(data: source.data))
        XCTAssertEqual(b.slots.stagingState, .closed)
        XCTAssertNil(b.slots.openKey)
        XCTAssertEqual(try read(b, slot: 2), page(source, 1))
        try b.close()
    }

    func testLatePagesAreCopiedIntoTheRAMFile() throws {
        // Source pages 0-7; page 2 and 6 were zero at staging; page 6 is written afterwards.
        var image = fakeImage(pages: 8, zeroRanges: [2 * 4096 ..< 3 * 4096])
        let ram = dir + "-ram"
        FileManager.default.createFile(atPath: ram, contents: Data(count: 8 * 4096))
        defer { try? FileManager.default.removeItem(atPath: ram) }
        let (b, _) = try makeSwap(source: FakeSource(data: image, zeroRanges: [2 * 4096 ..< 3 * 4096]))
        let key = try b.slots.open(ramFile: ram).key
        for p in [0, 1, 3, 4, 5, 7] { try write(b, StagingMarker.bytes(page: UInt64(p), key: key), slot: UInt64(p + 1)) }
        _ = try b.slots.seal()
        XCTAssertEqual(b.slots.unstagedPages(), [2 ..< 3, 6 ..< 7])
        image.replaceSubrange(6 * 4096 ..< 7 * 4096, with: Wire.pattern(4096, seed: 77))
        let now = FakeSource(data: image, zeroRanges: [2 * 4096 ..< 3 * 4096])
        let slots = b.slots
        let copied = try blocking { try await LatePages.copy(slots: slots, source: now, pageSize: 4096) }
        XCTAssertEqual(copied, 1)
        let file = try XCTUnwrap(FileManager.default.contents(atPath: ram))
        XCTAssertEqual(Array(file[6 * 4096 ..< 7 * 4096]), Wire.pattern(4096, seed: 77))
        XCTAssertEqual(Array(file[2 * 4096 ..< 3 * 4096]), [UInt8](repeating: 0, count: 4096))
        XCTAssertEqual(now.readLog.map(\.0), [6 * 4096], "only the late page is read")
        b.slots.forgetRAMFile()
        try b.flush()
        try b.close()
        let (again, _) = try makeSwap(source: now)
        XCTAssertNil(again.slots.stagedRAMFile, "after the switch-over a restart never copies into the RAM file again")
        XCTAssertEqual(try blocking { try await LatePages.copy(slots: again.slots, source: now, pageSize: 4096) }, 0)
        try again.close()
    }
    func testACheckThatFoundNoLatePagesWritesNothingWhenRunAgainAfterARestart() throws {
        // The gate-open check found no late page, so its forgetting of the RAM file was not made
        // durable before the reply; a restart brings the path back. The guest has written into a
        // hole since: a second check against the same stopped source must not touch it.
        let zeros: [Range<UInt64>] = [2 * 4096 ..< 3 * 4096, 6 * 4096 ..< 7 * 4096]
        let image = fakeImage(pages: 8, zeroRanges: zeros)
        let ram = dir + "-ram"
        FileManager.default.createFile(atPath: ram, contents: Data(count: 8 * 4096))
        defer { try? FileManager.default.removeItem(atPath: ram) }
        let (b, _) = try makeSwap(source: FakeSource(data: image, zeroRanges: zeros))
        let key = try b.slots.open(ramFile: ram).key
        for p in [0, 1, 3, 4, 5, 7] { try write(b, StagingMarker.bytes(page: UInt64(p), key: key), slot: UInt64(p + 1)) }
        _ = try b.slots.seal()
        try b.flush()
        let source = FakeSource(data: image, zeroRanges: zeros)
        let slots = b.slots
        XCTAssertEqual(try blocking { try await LatePages.copy(slots: slots, source: source, pageSize: 4096) }, 0)
        // the daemon stops before its forgetting of the path is committed: on disk the path stays
        try b.close()
        let fd = open(ram, O_WRONLY)
        XCTAssertGreaterThanOrEqual(fd, 0)
        let guest = Wire.pattern(4096, seed: 9)
        XCTAssertEqual(guest.withUnsafeBytes { pwrite(fd, $0.baseAddress, 4096, 2 * 4096) }, 4096)
        close(fd)
        let (again, _) = try makeSwap(source: source)
        XCTAssertEqual(again.slots.stagedRAMFile, ram, "the forgetting was not durable")
        XCTAssertEqual(try blocking { try await LatePages.copy(slots: again.slots, source: source, pageSize: 4096) }, 0)
        let file = try XCTUnwrap(FileManager.default.contents(atPath: ram))
        XCTAssertEqual(Array(file[2 * 4096 ..< 3 * 4096]), guest, "the guest's page is untouched")
        XCTAssertEqual(source.readLog.count, 0, "no source page is read")
        try again.close()
    }

    func testAnOverwriteBetweenSealAndTheFirstCommitKeepsTheSealedTableOnDisk() throws {
        var (b, source) = try makeSwap()
        let key = try b.slots.open(ramFile: "").key
        XCTAssertNil(b.slots.stagedRAMFile, "an empty RAM file path is none")
        try write(b, StagingMarker.bytes(page: 0, key: key) + StagingMarker.bytes(page: 1, key: key), slot: 1)
        _ = try b.slots.seal()
        try write(b, Wire.pattern(4096, seed: 5), slot: 1)   // before any commit
        XCTAssertEqual(b.slots.unstagedPages(), [2 ..< 8])
        try b.flush()
        try b.close()
        (b, source) = try makeSwap(source: FakeSource(data: source.data))
        XCTAssertEqual(b.slots.unstagedPages(), [2 ..< 8], "page 0 was staged: no late-page copy for it")
        XCTAssertNil(b.slots.page(ofSlot: 1), "the overwritten slot is local: unmapped again")
        XCTAssertEqual(b.slots.page(ofSlot: 2), 1)
        XCTAssertEqual(try read(b, slot: 1), Wire.pattern(4096, seed: 5))
        let c = b.slots.counts()
        XCTAssertLessThanOrEqual(c.duplicates, c.markersDecoded)
        XCTAssertTrue(source.readLog.isEmpty)
        try b.close()
    }
}
