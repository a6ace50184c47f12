import Glibc
import XCTest
@testable import NbdPager

final class FileBackendTests: XCTestCase {
    static let k4: UInt64 = 4096

    /// A fresh file of `size` bytes under /tmp (removed by the caller via the returned cleanup).
    func makeTempFile(size: UInt64, file: StaticString = #filePath, line: UInt = #line) throws -> String {
        var template = Array("/tmp/nbd-umemd-test-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw SystemError("mkstemp", errno: errno) }
        defer { _ = Glibc.close(fd) }
        guard ftruncate(fd, off_t(size)) == 0 else { throw SystemError("ftruncate", errno: errno) }
        let path = String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
        addTeardownBlock { _ = unlink(path) }
        return path
    }

    func write(_ b: FileBackend, _ bytes: [UInt8], at offset: UInt64, file: StaticString = #filePath, line: UInt = #line) throws {
        let n = try bytes.withUnsafeBytes { try b.write(from: $0, offset: offset, fua: false, nonBlocking: false) }
        XCTAssertEqual(n, bytes.count, file: file, line: line)
    }

    func read(_ b: FileBackend, at offset: UInt64, count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0xcc, count: count)
        let n = try out.withUnsafeMutableBytes { try b.read(into: $0, offset: offset, nonBlocking: false) }
        XCTAssertEqual(n, count)
        return out
    }

    /// Backends to run the layout tests on: a real file on disk and a memfd.
    func backends(size: UInt64) throws -> [(String, FileBackend)] {
        let path = try makeTempFile(size: size)
        let fileBackend = try FileBackend.open(path: path, readOnly: false)
        let memory = try FileBackend.memory(size: size)
        addTeardownBlock {
            try? fileBackend.close()
            try? memory.close()
        }
        return [("file", fileBackend), ("memory", memory)]
    }

    // MARK: read / write

    func testWriteThenReadBack() throws {
        for (kind, b) in try backends(size: 1 << 20) {
            XCTAssertEqual(b.size, 1 << 20, kind)
            XCTAssertTrue(b.capabilities.writable, kind)
            let data = Wire.pattern(10_000, seed: 3)
            try write(b, data, at: 12_345)
            XCTAssertEqual(try read(b, at: 12_345, count: data.count), data, kind)
            // Around it the export is still zero.
            XCTAssertEqual(try read(b, at: 12_345 - 100, count: 100), [UInt8](repeating: 0, count: 100), kind)
            XCTAssertEqual(try read(b, at: 12_345 + 10_000, count: 100), [UInt8](repeating: 0, count: 100), kind)
            // The last byte of the export.
            try write(b, [0x7e], at: (1 << 20) - 1)
            XCTAssertEqual(try read(b, at: (1 << 20) - 2, count: 2), [0, 0x7e], kind)
            // With FUA.
            let fua = Wire.pattern(512, seed: 9)
            let n = try fua.withUnsafeBytes { try b.write(from: $0, offset: 0, fua: true, nonBlocking: false) }
            XCTAssertEqual(n, 512)
            XCTAssertEqual(try read(b, at: 0, count: 512), fua, kind)
            XCTAssertNoThrow(try b.flush(), kind)
            XCTAssertNoThrow(try b.cache(offset: 0, length: 4096), kind)
        }
    }

    func testMemoryExportReadsNonBlockingInFull() throws {
        let b = try FileBackend.memory(size: 1 << 20)
        defer { try? b.close() }
        XCTAssertTrue(b.capabilities.inlineSafe)
        let data = Wire.pattern(65536)
        let w = try data.withUnsafeBytes { try b.write(from: $0, offset: 4096, fua: false, nonBlocking: true) }
        XCTAssertEqual(w, data.count)
        var out = [UInt8](repeating: 0, count: data.count)
        let r = try out.withUnsafeMutableBytes { try b.read(into: $0, offset: 4096, nonBlocking: true) }
        XCTAssertEqual(r, data.count)
        XCTAssertEqual(out, data)
    }

    // MARK: trim / zero / block status

    func testTrimPunchesHoleAndBlockStatusReportsExactExtents() throws {
        let k4 = Self.k4
        for (kind, b) in try backends(size: 16 * k4) {
            // Fill the whole export with data, then punch [4 KiB, 12 KiB).
            try write(b, [UInt8](repeating: 0xa5, count: Int(16 * k4)), at: 0)
            try b.flush()
            XCTAssertEqual(try b.blockStatus(offset: 0, length: 16 * k4, maxExtents: 100),
                           [NBDExtent(length: UInt32(16 * k4), flags: [])], "\(kind): fully written")

            try b.trim(offset: k4, length: 2 * k4, fua: false)
            XCTAssertEqual(try read(b, at: k4, count: Int(2 * k4)), [UInt8](repeating: 0, count: Int(2 * k4)), kind)
            XCTAssertEqual(try read(b, at: 0, count: Int(k4)), [UInt8](repeating: 0xa5, count: Int(k4)), kind)
            XCTAssertEqual(try read(b, at: 3 * k4, count: Int(k4)), [UInt8](repeating: 0xa5, count: Int(k4)), kind)

            let expected = [
                NBDExtent(length: UInt32(k4), flags: []),
                NBDExtent(length: UInt32(2 * k4), flags: [.hole, .zero]),
                NBDExtent(length: UInt32(13 * k4), flags: []),
            ]
            XCTAssertEqual(try b.blockStatus(offset: 0, length: 16 * k4, maxExtents: 100), expected, kind)

            // A window starting inside the hole and ending inside the data.
            XCTAssertEqual(try b.blockStatus(offset: 2 * k4, length: 2 * k4, maxExtents: 100),
                           [NBDExtent(length: UInt32(k4), flags: [.hole, .zero]), NBDExtent(length: UInt32(k4), flags: [])],
                           kind)
            // Extents never go past the requested range.
            XCTAssertEqual(try b.blockStatus(offset: 0, length: 100, maxExtents: 100),
                           [NBDExtent(length: 100, flags: [])], kind)

            // maxExtents = 1 (REQ_ONE): only the first extent.
            XCTAssertEqual(try b.blockStatus(offset: 0, length: 16 * k4, maxExtents: 1),
                           [NBDExtent(length: UInt32(k4), flags: [])], kind)
            XCTAssertEqual(try b.blockStatus(offset: k4, length: 15 * k4, maxExtents: 1),
                           [NBDExtent(length: UInt32(2 * k4), flags: [.hole, .zero])], kind)
        }
    }

    func testSparseLayoutBlockStatus() throws {
        let k4 = Self.k4
        for (kind, b) in try backends(size: 16 * k4) {
            XCTAssertEqual(try b.blockStatus(offset: 0, length: 16 * k4, maxExtents: 100),
                           [NBDExtent(length: UInt32(16 * k4), flags: [.hole, .zero])], "\(kind): empty")
            try write(b, [UInt8](repeating: 1, count: Int(k4)), at: 4 * k4)
            try write(b, [UInt8](repeating: 2, count: Int(k4)), at: 15 * k4)
            try b.flush()
            let expected = [
                NBDExtent(length: UInt32(4 * k4), flags: [.hole, .zero]),
                NBDExtent(length: UInt32(k4), flags: []),
                NBDExtent(length: UInt32(10 * k4), flags: [.hole, .zero]),
                NBDExtent(length: UInt32(k4), flags: []),
            ]
            let got = try b.blockStatus(offset: 0, length: 16 * k4, maxExtents: 100)
            XCTAssertEqual(got, expected, kind)
            XCTAssertEqual(got.reduce(0) { $0 + UInt64($1.length) }, 16 * k4, kind)
        }
    }

    func testZeroWithoutTrimLeavesZeroes() throws {
        let k4 = Self.k4
        for (kind, b) in try backends(size: 8 * k4) {
            try write(b, [UInt8](repeating: 0xff, count: Int(8 * k4)), at: 0)
            try b.zero(offset: 1000, length: 5000, mayTrim: false, fast: false, fua: false)
            let all = try read(b, at: 0, count: Int(8 * k4))
            XCTAssertEqual(Array(all[0..<1000]), [UInt8](repeating: 0xff, count: 1000), kind)
            XCTAssertEqual(Array(all[1000..<6000]), [UInt8](repeating: 0, count: 5000), kind)
            XCTAssertEqual(Array(all[6000...]), [UInt8](repeating: 0xff, count: Int(8 * k4) - 6000), kind)
            // With NO_HOLE the range stays allocated.
            XCTAssertTrue(try b.blockStatus(offset: 0, length: 8 * k4, maxExtents: 100).allSatisfy { !$0.flags.contains(.hole) }
                              || kind == "file", "\(kind): zero without trim must not punch a hole")
        }
    }

    func testZeroWithTrimAndFua() throws {
        let k4 = Self.k4
        for (kind, b) in try backends(size: 8 * k4) {
            try write(b, [UInt8](repeating: 0x11, count: Int(8 * k4)), at: 0)
            try b.zero(offset: 2 * k4, length: 4 * k4, mayTrim: true, fast: false, fua: true)
            XCTAssertEqual(try read(b, at: 2 * k4, count: Int(4 * k4)), [UInt8](repeating: 0, count: Int(4 * k4)), kind)
            XCTAssertEqual(try read(b, at: 6 * k4, count: Int(2 * k4)), [UInt8](repeating: 0x11, count: Int(2 * k4)), kind)
        }
    }

    func testFastZeroOnMemoryExportSucceeds() throws {
        let k4 = Self.k4
        let b = try FileBackend.memory(size: 8 * k4)
        defer { try? b.close() }
        try write(b, [UInt8](repeating: 0x42, count: Int(8 * k4)), at: 0)
        XCTAssertNoThrow(try b.zero(offset: k4, length: 2 * k4, mayTrim: true, fast: true, fua: false))
        XCTAssertEqual(try read(b, at: k4, count: Int(2 * k4)), [UInt8](repeating: 0, count: Int(2 * k4)))
        XCTAssertEqual(try b.blockStatus(offset: 0, length: 8 * k4, maxExtents: 10), [
            NBDExtent(length: UInt32(k4), flags: []),
            NBDExtent(length: UInt32(2 * k4), flags: [.hole, .zero]),
            NBDExtent(length: UInt32(5 * k4), flags: []),
        ])
    }

    func testFastZeroWithoutTrimEitherZeroesOrRefusesWithoutWriting() throws {
        // memfd cannot FALLOC_FL_ZERO_RANGE on every kernel; FAST_ZERO must then fail with notFast
        // (ENOTSUP on the wire) and leave the data alone, never silently write zeroes slowly.
        let b = try FileBackend.memory(size: 4 * Self.k4)
        defer { try? b.close() }
        try write(b, [UInt8](repeating: 0x42, count: Int(4 * Self.k4)), at: 0)
        do {
            try b.zero(offset: 0, length: Self.k4, mayTrim: false, fast: true, fua: false)
            XCTAssertEqual(try read(b, at: 0, count: Int(Self.k4)), [UInt8](repeating: 0, count: Int(Self.k4)))
        } catch BackendError.notFast {
            XCTAssertEqual(NBDErrno(BackendError.notFast), .enotsup)
            XCTAssertEqual(try read(b, at: 0, count: Int(Self.k4)), [UInt8](repeating: 0x42, count: Int(Self.k4)))
        }
    }

    // MARK: errors

    func testReadPastTruncatedFileThrows() throws {
        let path = try makeTempFile(size: 64 * 1024)
        let b = try FileBackend.open(path: path, readOnly: false)
        defer { try? b.close() }
        XCTAssertEqual(b.size, 64 * 1024)
        XCTAssertEqual(truncate(path, 16 * 1024), 0)
        var buf = [UInt8](repeating: 0, count: 4096)
        XCTAssertThrowsError(try buf.withUnsafeMutableBytes { try b.read(into: $0, offset: 32 * 1024, nonBlocking: false) }) { e in
            guard case BackendError.shortRead = e else { return XCTFail("expected shortRead, got \(e)") }
            XCTAssertEqual(NBDErrno(e), .eio)
        }
        // Straddling the new end of file.
        XCTAssertThrowsError(try buf.withUnsafeMutableBytes { try b.read(into: $0, offset: 14 * 1024, nonBlocking: false) })
        // Inside what is left, reads still work.
        XCTAssertEqual(try read(b, at: 0, count: 4096), [UInt8](repeating: 0, count: 4096))
        // Block status on the truncated file terminates and covers the range.
        let extents = try b.blockStatus(offset: 0, length: 64 * 1024, maxExtents: 100)
        XCTAssertEqual(extents.reduce(0) { $0 + UInt64($1.length) }, 64 * 1024)
    }

    func testReadOnlyOpenRefusesWrite() throws {
        let path = try makeTempFile(size: 8192)
        let b = try FileBackend.open(path: path, readOnly: true)
        defer { try? b.close() }
        XCTAssertFalse(b.capabilities.writable)
        XCTAssertFalse(b.capabilities.canTrim)
        XCTAssertFalse(b.capabilities.canZero)
        XCTAssertThrowsError(try [UInt8](repeating: 1, count: 512).withUnsafeBytes {
            try b.write(from: $0, offset: 0, fua: false, nonBlocking: false)
        })
        XCTAssertEqual(try read(b, at: 0, count: 512), [UInt8](repeating: 0, count: 512))
    }

    func testOpenFailures() throws {
        XCTAssertThrowsError(try FileBackend.open(path: "/nonexistent/nbd-umemd-test", readOnly: true)) { e in
            XCTAssertEqual((e as? SystemError)?.errno, ENOENT)
        }
        XCTAssertThrowsError(try FileBackend.open(path: "/tmp", readOnly: true), "a directory is not an export")
    }

    func testCloseIsIdempotent() throws {
        let b = try FileBackend.memory(size: 4096)
        XCTAssertNoThrow(try b.close())
        XCTAssertNoThrow(try b.close())
    }
}
