import Glibc
import XCTest
@testable import NbdPager

final class SwapSafetyTests: XCTestCase {
    func testResidentMemoryReadsAndWritesItsMappingWhichIsTheMemfd() throws {
        let size: UInt64 = 1 << 20
        let b = try FileBackend.residentMemory(size: size)
        let data = Wire.pattern(8192, seed: 3)
        XCTAssertEqual(try data.withUnsafeBytes { try b.write(from: $0, offset: size - 8192, fua: true, nonBlocking: true) }, 8192)
        var viaFd = [UInt8](repeating: 0, count: 8192)
        XCTAssertEqual(viaFd.withUnsafeMutableBytes { pread(b.fd, $0.baseAddress, 8192, off_t(size - 8192)) }, 8192)
        XCTAssertEqual(viaFd, data, "a write through the mapping is in the memfd")
        var out = [UInt8](repeating: 0, count: 4097)
        XCTAssertThrowsError(try out.withUnsafeMutableBytes { try b.read(into: $0, offset: size - 4096, nonBlocking: true) },
                             "a range past the end is refused, not copied")
        try b.close()
        XCTAssertThrowsError(try out.withUnsafeMutableBytes { try b.read(into: $0, offset: 0, nonBlocking: true) },
                             "the mapping is gone after close")
    }

    func testResidentMemoryIsLockedAndKeepsItsPagesThroughTrim() throws {
        let size: UInt64 = 8 << 20
        let before = SwapSafety.lockedBytes() ?? 0
        let b = try FileBackend.residentMemory(size: size)
        defer { try? b.close() }
        let locked = SwapSafety.lockedBytes() ?? 0
        XCTAssertGreaterThanOrEqual(locked - before, size, "the whole export is mlock'ed up front")

        let data = Wire.pattern(3 * 4096, seed: 5)
        let w = try data.withUnsafeBytes { try b.write(from: $0, offset: 4096, fua: false, nonBlocking: true) }
        XCTAssertEqual(w, data.count)
        // TRIM is advisory and must not punch holes (a later write would allocate an unlocked page)
        try b.trim(offset: 0, length: size, fua: false)
        var out = [UInt8](repeating: 0, count: data.count)
        _ = try out.withUnsafeMutableBytes { try b.read(into: $0, offset: 4096, nonBlocking: true) }
        XCTAssertEqual(out, data, "trim left the data in place")
        try b.zero(offset: 4096, length: 4096, mayTrim: true, fast: false, fua: false)
        _ = try out.withUnsafeMutableBytes { try b.read(into: $0, offset: 4096, nonBlocking: true) }
        XCTAssertEqual(Array(out[0 ..< 4096]), [UInt8](repeating: 0, count: 4096), "zero wrote zeroes")
        XCTAssertEqual(Array(out[4096...]), Array(data[4096...]))
        XCTAssertEqual(SwapSafety.lockedBytes() ?? 0, locked, "no page left the locked mapping")
        XCTAssertThrowsError(try b.zero(offset: 0, length: 4096, mayTrim: false, fast: true, fua: false),
                             "a fast zero that would have to write is refused")
    }

    func testThreadFlagsAreReadForEveryThread() {
        let ids = SwapSafety.threadIDs()
        XCTAssertTrue(ids.contains(Int32(truncatingIfNeeded: syscall_gettid())))
        for id in ids { XCTAssertNotNil(SwapSafety.taskFlags(id), "thread \(id)") }
        let (total, missing) = SwapSafety.threadsWithoutIOFlusher()
        XCTAssertGreaterThanOrEqual(total, 1)
        // The test process never set IO_FLUSHER: every thread must be reported as missing it.
        if !SwapSafety.ioFlusherOnThisThread() { XCTAssertTrue(missing.contains(Int32(truncatingIfNeeded: syscall_gettid()))) }
    }

    func testCgroupWarning() {
        let files = [
            "/sys/fs/cgroup/memory/limited/memory.limit_in_bytes": "67108864\n",
            "/sys/fs/cgroup/memory/free/memory.limit_in_bytes": "9223372036854771712\n",
            "/sys/fs/cgroup/unified/v2limited/memory.max": "134217728\n",
            "/sys/fs/cgroup/v2free/memory.max": "max\n",
        ]
        let read: (String) -> String? = { files[$0] }
        let v1 = SwapSafety.memoryCgroupWarning(cgroups: "12:pids:/x\n4:memory:/limited\n0::/y\n", readFile: read)
        XCTAssertTrue(v1?.contains("/limited limited to 64 MiB") ?? false, v1 ?? "nil")
        XCTAssertNil(SwapSafety.memoryCgroupWarning(cgroups: "4:memory:/free\n", readFile: read))
        XCTAssertNil(SwapSafety.memoryCgroupWarning(cgroups: "4:memory:/\n0::/\n", readFile: read))
        let v2 = SwapSafety.memoryCgroupWarning(cgroups: "0::/v2limited\n", readFile: read)
        XCTAssertTrue(v2?.contains("limited to 128 MiB") ?? false, v2 ?? "nil")
        XCTAssertNil(SwapSafety.memoryCgroupWarning(cgroups: "0::/v2free\n", readFile: read))
    }
}

/// The calling thread's id, from /proc/thread-self (a link to /proc/PID/task/TID).
private func syscall_gettid() -> Int {
    var buf = [CChar](repeating: 0, count: 256)
    let n = readlink("/proc/thread-self", &buf, buf.count - 1)
    guard n > 0 else { return -1 }
    let text = String(decoding: buf[0 ..< n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return Int(text.split(separator: "/").last ?? "") ?? -1
}
