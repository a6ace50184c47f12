import Foundation
import XCTest
@testable import NbdPager
#if canImport(Glibc)
import Glibc
#endif

final class PageStoreTests: XCTestCase {
    private var root = ""

    override func setUpWithError() throws {
        root = "/tmp/nbd-umemd-store-test-\(UUID().uuidString)"
    }

    override func tearDownWithError() throws {
        if !root.isEmpty { try? FileManager.default.removeItem(atPath: root) }
    }

    /// The store directory (created by the store itself, one level below the temp dir).
    private var dir: String { root + "/store" }

    private func open(size: UInt64 = 64 * 4096, pageSize: UInt64 = 4096, identity: String = "nbd://src/ram",
                      reset: Bool = false) throws -> PageStore {
        try PageStore.open(directory: dir, size: size, pageSize: pageSize, identity: identity, reset: reset)
    }

    private func patch(_ path: String, offset: Int, bytes: [UInt8]) throws {
        let h = try XCTUnwrap(FileHandle(forUpdatingAtPath: path))
        defer { try? h.close() }
        try h.seek(toOffset: UInt64(offset))
        try h.write(contentsOf: Data(bytes))
    }

    private func readBytes(_ store: PageStore, offset: UInt64, count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0xEE, count: count)
        try out.withUnsafeMutableBytes { try store.readData(into: $0, offset: offset) }
        return out
    }

    private func write(_ store: PageStore, _ bytes: [UInt8], offset: UInt64) throws {
        try bytes.withUnsafeBytes { try store.writeData(from: $0, offset: offset) }
    }

    // MARK: create / commit / reopen

    func testCreateMarkCommitReopen() throws {
        let store = try open()
        XCTAssertEqual(store.pageCount, 64)
        XCTAssertEqual(store.snapshot(), PageStoreSnapshot(pageCount: 64, absent: 64, present: 0, local: 0, generation: 1, dirty: false))
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir + "/data"))
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir + "/state"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/state.tmp"))
        let attrs = try FileManager.default.attributesOfItem(atPath: dir + "/data")
        XCTAssertEqual((attrs[.size] as? NSNumber)?.uint64Value, 64 * 4096)

        XCTAssertEqual(store.markPresent(0 ..< 10), 10)
        XCTAssertEqual(store.markLocal(5 ..< 20), 15)
        XCTAssertTrue(store.snapshot().dirty)
        try store.commit()
        XCTAssertEqual(store.snapshot().generation, 2)
        XCTAssertFalse(store.snapshot().dirty)
        try store.close()
        XCTAssertThrowsError(try store.commit()) { XCTAssertEqual($0 as? PageStoreError, .closed) }

        let again = try open()
        XCTAssertEqual(again.snapshot(), PageStoreSnapshot(pageCount: 64, absent: 44, present: 5, local: 15, generation: 2, dirty: false))
        XCTAssertEqual(again.runs(of: .present, in: 0 ..< 64), [0 ..< 5])
        XCTAssertEqual(again.runs(of: .local, in: 0 ..< 64), [5 ..< 20])
        XCTAssertEqual(again.state(of: 19), .local)
        XCTAssertEqual(again.firstPage(with: .absent, from: 0), 20)
        XCTAssertFalse(again.isComplete)
        again.markPresent(0 ..< 64)
        XCTAssertTrue(again.isComplete)
        try again.close()
        let third = try open()
        XCTAssertTrue(third.isComplete)
        XCTAssertEqual(third.snapshot().local, 15)
        try third.close()
    }

    func testCloseCommitsPendingMarks() throws {
        let store = try open()
        store.markLocal(3 ..< 4)
        try store.close()
        let again = try open()
        XCTAssertEqual(again.state(of: 3), .local)
        try again.close()
    }

    func testUncommittedMarksAreLostOnCrash() throws {
        do {
            let store = try open()
            store.markPresent(0 ..< 8)
            try store.commit()
            store.markLocal(8 ..< 16)     // never committed
            store.markLocal(0 ..< 2)
            // Dropped without close(): deinit must not commit.
        }
        let again = try open()
        XCTAssertEqual(again.runs(of: .present, in: 0 ..< 64), [0 ..< 8])
        XCTAssertEqual(again.runs(of: .local, in: 0 ..< 64), [])
        XCTAssertEqual(again.snapshot().generation, 2)
        try again.close()
    }

    func testCommitIsCheapWhenNothingChanged() throws {
        let store = try open()
        try store.commit()
        XCTAssertEqual(store.snapshot().generation, 1, "nothing changed: no slot written")
        try write(store, [1, 2, 3], offset: 0)
        XCTAssertTrue(store.snapshot().dirty)
        try store.commit()
        XCTAssertFalse(store.snapshot().dirty)
        XCTAssertEqual(store.snapshot().generation, 1, "only data changed: data synced, no slot written")
        store.markPresent(0 ..< 1)
        store.markPresent(0 ..< 1)
        try store.commit()
        XCTAssertEqual(store.snapshot().generation, 2)
        XCTAssertEqual(store.markPresent(0 ..< 1), 0, "a no-op mark does not dirty the map")
        XCTAssertFalse(store.snapshot().dirty)
        try store.commit()
        XCTAssertEqual(store.snapshot().generation, 2)
        try store.close()
    }

    // MARK: torn slots

    func testTornSlotFallsBackToPreviousGeneration() throws {
        let geometry = try PageGeometry(exportSize: 64 * 4096)
        let slotA = PageStore.headerSize
        let slotB = PageStore.headerSize + Int(PageStore.slotStride(geometry))
        do {
            let store = try open()                 // generation 1 in slot A
            store.markPresent(0 ..< 10)
            try store.commit()                     // generation 2 in slot B
            store.markLocal(10 ..< 20)
            try store.commit()                     // generation 3 in slot A
            XCTAssertEqual(store.snapshot().generation, 3)
            try store.close()
        }
        // Tear the newest slot (A): damage its map bytes.
        try patch(dir + "/state", offset: slotA + PageStore.slotHeaderSize + 1, bytes: [0x55, 0x55])
        do {
            let store = try open()
            XCTAssertEqual(store.snapshot().generation, 2)
            XCTAssertEqual(store.runs(of: .present, in: 0 ..< 64), [0 ..< 10])
            XCTAssertEqual(store.runs(of: .local, in: 0 ..< 64), [])
            // The next commit goes into the torn slot, never over the surviving one.
            store.markLocal(30 ..< 31)
            try store.commit()
            XCTAssertEqual(store.snapshot().generation, 3)
            try store.close()
        }
        // Tear slot B (generation 2) now: slot A (rewritten, generation 3) must be the one used.
        try patch(dir + "/state", offset: slotB + 8, bytes: [0xFF])
        do {
            let store = try open()
            XCTAssertEqual(store.snapshot().generation, 3)
            XCTAssertEqual(store.state(of: 30), .local)
            XCTAssertEqual(store.runs(of: .present, in: 0 ..< 64), [0 ..< 10])
            try store.close()
        }
    }

    func testBothSlotsBadIsCorruptAndResetRecreates() throws {
        let geometry = try PageGeometry(exportSize: 64 * 4096)
        do {
            let store = try open()
            store.markPresent(0 ..< 4)
            try store.commit()
            try store.close()
        }
        try patch(dir + "/state", offset: PageStore.headerSize, bytes: [0])
        try patch(dir + "/state", offset: PageStore.headerSize + Int(PageStore.slotStride(geometry)), bytes: [0])
        XCTAssertThrowsError(try open()) { error in
            guard case let .corrupt(message)? = error as? PageStoreError else { return XCTFail("\(error)") }
            XCTAssertTrue(message.contains("neither state slot is valid"), message)
            XCTAssertTrue(message.contains("--reset-store"), message)
        }
        let fresh = try open(reset: true)
        XCTAssertEqual(fresh.snapshot().absent, 64)
        try fresh.close()
    }

    /// Found by FuzzPageStore: a slot with a valid checksum at generation 2^64 - 1 was taken as the
    /// newest, and the first commit then trapped on `generation + 1`. Such a slot is not valid.
    func testSlotAtLargestGenerationIsNotUsed() throws {
        let geometry = try PageGeometry(exportSize: 64 * 4096)
        do {
            let store = try open()                 // generation 1 in slot A
            store.markPresent(0 ..< 4)
            try store.commit()                     // generation 2 in slot B
            try store.close()
        }
        var slot = [UInt8](repeating: 0, count: PageStore.slotLength(geometry))
        PageStore.fillSlot(&slot, generation: .max, map: PageStateMap(pageCount: 64))
        try patch(dir + "/state", offset: PageStore.headerSize, bytes: slot)
        do {
            let store = try open()
            XCTAssertEqual(store.snapshot().generation, 2)
            XCTAssertEqual(store.runs(of: .present, in: 0 ..< 64), [0 ..< 4])
            store.markLocal(10 ..< 11)
            try store.commit()                     // generation 3, over the bad slot A
            XCTAssertEqual(store.snapshot().generation, 3)
            try store.close()
        }
        // With the other slot bad too, the store is corrupt: an error, not a crash at the next commit.
        try patch(dir + "/state", offset: PageStore.headerSize, bytes: slot)
        try patch(dir + "/state", offset: PageStore.headerSize + Int(PageStore.slotStride(geometry)), bytes: [0])
        XCTAssertThrowsError(try open()) { error in
            guard case let .corrupt(message)? = error as? PageStoreError else { return XCTFail("\(error)") }
            XCTAssertTrue(message.contains("neither state slot is valid"), message)
        }
    }

    /// Found by FuzzPageStore: from generation 2^64-2 a commit wrote a slot at 2^64-1, which reopening
    /// ignores, so the commit was silently lost. Such a commit now fails with an error.
    func testCommitPastTheLastValidGenerationFails() throws {
        let geometry = try PageGeometry(exportSize: 64 * 4096)
        try open().close()                         // generation 1 in slot A
        var slot = [UInt8](repeating: 0, count: PageStore.slotLength(geometry))
        var map = PageStateMap(pageCount: 64)
        map.mark(0 ..< 2, .present)
        PageStore.fillSlot(&slot, generation: .max - 1, map: map)
        try patch(dir + "/state", offset: PageStore.headerSize, bytes: slot)
        do {
            let store = try open()
            XCTAssertEqual(store.snapshot().generation, .max - 1)
            store.markLocal(5 ..< 6)
            XCTAssertThrowsError(try store.commit()) { error in
                guard case let .corrupt(message)? = error as? PageStoreError else { return XCTFail("\(error)") }
                XCTAssertTrue(message.contains("generation is exhausted"), message)
            }
            XCTAssertThrowsError(try store.close())
        }
        let store = try open()
        XCTAssertEqual(store.snapshot().generation, .max - 1)
        XCTAssertEqual(store.runs(of: .present, in: 0 ..< 64), [0 ..< 2])
        XCTAssertEqual(store.state(of: 5), .absent)
        try store.close()
    }

    func testCorruptHeaderAndMissingData() throws {
        try open().close()
        try patch(dir + "/state", offset: 100, bytes: [1])   // inside the checksummed header
        XCTAssertThrowsError(try open()) { error in
            guard case let .corrupt(message)? = error as? PageStoreError else { return XCTFail("\(error)") }
            XCTAssertTrue(message.contains("checksum"), message)
        }
        try open(reset: true).close()
        try patch(dir + "/state", offset: 0, bytes: Array("garbage!".utf8))
        XCTAssertThrowsError(try open()) { error in
            guard case let .corrupt(message)? = error as? PageStoreError else { return XCTFail("\(error)") }
            XCTAssertTrue(message.contains("not an nbd-umemd state file"), message)
        }
        try open(reset: true).close()
        try FileManager.default.removeItem(atPath: dir + "/data")
        XCTAssertThrowsError(try open()) { error in
            guard case let .corrupt(message)? = error as? PageStoreError else { return XCTFail("\(error)") }
            XCTAssertTrue(message.contains("data file is missing"), message)
        }
        try open(reset: true).close()
        XCTAssertNoThrow(try open().close())
        // A truncated state file.
        try FileManager.default.removeItem(atPath: dir + "/state")
        _ = FileManager.default.createFile(atPath: dir + "/state", contents: Data("NBDUMEMD".utf8 + [1, 0, 0, 0]))
        XCTAssertThrowsError(try open()) { error in
            guard case .corrupt? = error as? PageStoreError else { return XCTFail("\(error)") }
        }
    }

    // MARK: mismatch

    func testMismatchOnIdentitySizeAndPageSize() throws {
        do {
            let store = try open(size: 1 << 20, identity: "nbd://a")
            store.markLocal(0 ..< 1)
            try store.close()
        }
        XCTAssertThrowsError(try open(size: 2 << 20, identity: "nbd://b")) { error in
            XCTAssertEqual(error as? PageStoreError, .mismatch(
                "store \(dir) belongs to source 'nbd://a' (size 1048576), not 'nbd://b' (size 2097152); use --reset-store to discard it"))
        }
        XCTAssertThrowsError(try open(size: 2 << 20, identity: "nbd://a")) { error in
            guard case let .mismatch(m)? = error as? PageStoreError else { return XCTFail("\(error)") }
            XCTAssertTrue(m.contains("(size 1048576)") && m.contains("(size 2097152)"), m)
        }
        XCTAssertThrowsError(try open(size: 1 << 20, identity: "nbd://b")) { error in
            guard case let .mismatch(m)? = error as? PageStoreError else { return XCTFail("\(error)") }
            XCTAssertTrue(m.contains("'nbd://a'") && m.contains("'nbd://b'"), m)
        }
        XCTAssertThrowsError(try open(size: 1 << 20, pageSize: 65536, identity: "nbd://a")) { error in
            XCTAssertEqual(error as? PageStoreError, .mismatch(
                "store \(dir) uses page size 4096, not 65536 (source 'nbd://a', size 1048576); use --reset-store to discard it"))
        }
        // Still intact after the refusals.
        do {
            let store = try open(size: 1 << 20, identity: "nbd://a")
            XCTAssertEqual(store.state(of: 0), .local)
            try store.close()
        }
        // reset: discard and recreate with the new parameters.
        let store = try open(size: 2 << 20, pageSize: 65536, identity: "nbd://b", reset: true)
        XCTAssertEqual(store.pageCount, 32)
        XCTAssertEqual(store.snapshot().absent, 32)
        try store.close()
        let again = try open(size: 2 << 20, pageSize: 65536, identity: "nbd://b")
        XCTAssertEqual(again.state(of: 0), .absent)
        try again.close()
    }

    func testInvalidArguments() {
        XCTAssertThrowsError(try open(pageSize: 1000)) { error in
            guard case .invalidArgument? = error as? PageStoreError else { return XCTFail("\(error)") }
        }
        XCTAssertThrowsError(try open(identity: String(repeating: "x", count: 4097))) { error in
            guard case .invalidArgument? = error as? PageStoreError else { return XCTFail("\(error)") }
        }
        XCTAssertNoThrow(try open(identity: String(repeating: "x", count: 4096)).close())
    }

    func testSecondOpenIsLocked() throws {
        let store = try open()
        XCTAssertThrowsError(try open()) { error in
            guard case .locked? = error as? PageStoreError else { return XCTFail("\(error)") }
        }
        try store.close()
        try open().close()
    }

    // MARK: data

    func testDataSurvivesReopen() throws {
        let payload = (0 ..< 8192).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
        do {
            let store = try open()
            try write(store, payload, offset: 4096 * 3)
            store.markLocal(3 ..< 5)
            try store.commit()
            // Dropped without close: the commit made it durable.
        }
        let store = try open()
        XCTAssertEqual(try readBytes(store, offset: 4096 * 3, count: 8192), payload)
        XCTAssertEqual(try readBytes(store, offset: 0, count: 4096), [UInt8](repeating: 0, count: 4096))
        XCTAssertEqual(store.runs(of: .local, in: 0 ..< 64), [3 ..< 5])
        try store.close()
    }

    func testPartialLastPage() throws {
        let store = try open(size: 10_000)
        XCTAssertEqual(store.pageCount, 3)
        try write(store, [9, 9, 9], offset: 9997)
        XCTAssertEqual(try readBytes(store, offset: 9990, count: 10), [0, 0, 0, 0, 0, 0, 0, 9, 9, 9])
        XCTAssertThrowsError(try write(store, [1], offset: 10_000)) { error in
            guard case .outOfRange? = error as? PageStoreError else { return XCTFail("\(error)") }
        }
        XCTAssertThrowsError(try readBytes(store, offset: 9999, count: 2))
        XCTAssertThrowsError(try readBytes(store, offset: UInt64.max, count: 2))
        XCTAssertThrowsError(try store.punchHole(offset: 8192, length: 4096))
        store.markPresent(0 ..< 3)
        XCTAssertTrue(store.isComplete)
        try store.close()
        XCTAssertTrue(try open(size: 10_000).isComplete)
    }

    func testPunchHoleReadsAsZero() throws {
        let store = try open()
        try write(store, [UInt8](repeating: 0xAB, count: 4 * 4096), offset: 4096)
        try store.punchHole(offset: 2 * 4096, length: 4096)
        let back = try readBytes(store, offset: 4096, count: 4 * 4096)
        XCTAssertEqual(Array(back[0 ..< 4096]), [UInt8](repeating: 0xAB, count: 4096))
        XCTAssertEqual(Array(back[4096 ..< 8192]), [UInt8](repeating: 0, count: 4096))
        XCTAssertEqual(Array(back[8192...]), [UInt8](repeating: 0xAB, count: 8192))
        // Unaligned punches zero exactly their bytes.
        try store.punchHole(offset: 4096 + 10, length: 5)
        let head = try readBytes(store, offset: 4096 + 8, count: 9)
        XCTAssertEqual(head, [0xAB, 0xAB, 0, 0, 0, 0, 0, 0xAB, 0xAB])
        try store.punchHole(offset: 0, length: 0)
        try store.close()
    }

    func testPunchHoleFallsBackToWritingZeroes() throws {
        let store = try open()
        store.disableHolePunching()
        try write(store, [UInt8](repeating: 0xCD, count: 3 * 4096), offset: 0)
        try store.punchHole(offset: 100, length: 2 * 4096)
        let back = try readBytes(store, offset: 0, count: 3 * 4096)
        XCTAssertEqual(Array(back[0 ..< 100]), [UInt8](repeating: 0xCD, count: 100))
        XCTAssertEqual(Array(back[100 ..< 100 + 8192]), [UInt8](repeating: 0, count: 8192))
        XCTAssertEqual(Array(back[(100 + 8192)...]), [UInt8](repeating: 0xCD, count: 4096 - 100))
        try store.close()
    }

    func testIdentityComparesBytes() throws {
        try open(identity: "caf\u{E9}").close()                 // precomposed é
        XCTAssertThrowsError(try open(identity: "cafe\u{301}"))   // e + combining acute: equal as String
        try open(identity: "caf\u{E9}").close()
    }

    func testIsAllZero() {
        for n in [0, 1, 7, 8, 9, 63, 64, 65, 4096, 4099] {
            var buf = [UInt8](repeating: 0, count: n)
            XCTAssertTrue(buf.withUnsafeBytes { PageStore.isAllZero($0) }, "\(n) zero bytes")
            for pos in Set([0, n / 2, n - 1]) where n > 0 {
                buf[pos] = 1
                XCTAssertFalse(buf.withUnsafeBytes { PageStore.isAllZero($0) }, "byte \(pos) of \(n)")
                buf[pos] = 0
            }
        }
        // Unaligned start.
        let buf = [UInt8](repeating: 0, count: 100) + [3]
        XCTAssertTrue(buf.withUnsafeBytes { PageStore.isAllZero(UnsafeRawBufferPointer(rebasing: $0[1 ..< 100])) })
        XCTAssertFalse(buf.withUnsafeBytes { PageStore.isAllZero(UnsafeRawBufferPointer(rebasing: $0[1 ..< 101])) })
    }

    // MARK: scale and concurrency

    func testFourGiBExportMapIs256KiB() throws {
        let size: UInt64 = 4 << 30
        let store = try open(size: size)
        XCTAssertEqual(store.pageCount, 1 << 20)
        store.markPresent(0 ..< 1000)
        store.markLocal(500_000 ..< 600_000)
        try store.commit()
        XCTAssertEqual(store.currentMap().encode().count, 256 * 1024)
        let geometry = try PageGeometry(exportSize: size)
        XCTAssertEqual(PageStore.slotLength(geometry), 32 + 256 * 1024)
        let attrs = try FileManager.default.attributesOfItem(atPath: dir + "/state")
        XCTAssertEqual((attrs[.size] as? NSNumber)?.uint64Value, PageStore.stateFileSize(geometry))
        try store.close()
        let again = try open(size: size)
        XCTAssertEqual(again.snapshot().present, 1000)
        XCTAssertEqual(again.snapshot().local, 100_000)
        try again.close()
    }

    func testConcurrentMarksAndCommits() throws {
        let store = try open(size: 4096 * 4096)
        DispatchQueue.concurrentPerform(iterations: 8) { worker in
            for i in 0 ..< 512 {
                let page = UInt64(i * 8 + worker)
                let bytes = [UInt8](repeating: UInt8(worker + 1), count: 4096)
                do {
                    try bytes.withUnsafeBytes { try store.writeData(from: $0, offset: page * 4096) }
                    store.markPresent(page ..< page + 1)
                    if i % 64 == 0 { try store.commit() }
                } catch {
                    XCTFail("\(error)")
                }
            }
        }
        XCTAssertEqual(store.snapshot().present, 4096)
        try store.close()
        let again = try open(size: 4096 * 4096)
        XCTAssertTrue(again.isComplete)
        XCTAssertEqual(try readBytes(again, offset: 4096 * 4095, count: 1), [8])
        XCTAssertEqual(try readBytes(again, offset: 4096 * 13, count: 1), [6])
        try again.close()
    }
}
