import CLinux
#if canImport(Glibc)
import Glibc
#endif

/// A failed system call: the operation and the errno it returned.
public struct SystemError: Error, CustomStringConvertible, Sendable {
    public var operation: String
    public var errno: Int32

    public init(_ operation: String, errno: Int32) {
        self.operation = operation
        self.errno = errno
    }

    public var description: String {
        "\(operation): \(String(cString: strerror(errno)))"
    }
}

/// Thin, typed wrappers over the Linux calls the stores use. Each retries EINTR and throws SystemError.
public enum Sys {
    @inline(__always)
    static func retryingEINTR<T: BinaryInteger>(_ op: String, _ body: () -> T) throws -> T {
        while true {
            let r = body()
            if r >= 0 { return r }
            let e = Glibc.errno
            if e == EINTR { continue }
            throw SystemError(op, errno: e)
        }
    }

    /// One preadv2. Returns the bytes read (0 at end of file). With `nowait`, EAGAIN is reported as nil.
    static func pread(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, offset: UInt64, nowait: Bool) throws -> Int? {
        while true {
            let r = umemd_pread_flags(fd, buffer.baseAddress, buffer.count, off_t(offset), nowait ? Int32(UMEMD_RWF_NOWAIT) : 0)
            if r >= 0 { return r }
            let e = Glibc.errno
            if e == EINTR { continue }
            if nowait && e == EAGAIN { return nil }
            throw SystemError("pread", errno: e)
        }
    }

    /// One pwritev2. With `nowait`, EAGAIN is reported as nil; with `dsync` the data is durable on return.
    static func pwrite(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, offset: UInt64, nowait: Bool, dsync: Bool) throws -> Int? {
        var flags: Int32 = 0
        if nowait { flags |= Int32(UMEMD_RWF_NOWAIT) }
        if dsync { flags |= Int32(UMEMD_RWF_DSYNC) }
        while true {
            let r = umemd_pwrite_flags(fd, buffer.baseAddress, buffer.count, off_t(offset), flags)
            if r >= 0 { return r }
            let e = Glibc.errno
            if e == EINTR { continue }
            if nowait && e == EAGAIN { return nil }
            throw SystemError("pwrite", errno: e)
        }
    }

    /// Writes all of `buffer` at `offset` (looping over short writes); `what` names the file in errors.
    static func pwriteAll(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, offset: UInt64, what: String) throws {
        var done = 0
        while done < buffer.count {
            let part = UnsafeRawBufferPointer(rebasing: buffer[done...])
            guard let n = try pwrite(fd, part, offset: offset + UInt64(done), nowait: false, dsync: false) else { continue }
            if n == 0 { throw SystemError("write \(what)", errno: ENOSPC) }
            done += n
        }
    }

    /// Writes all of `bytes` at the file's current position (O_APPEND files: at the end).
    static func writeAll(_ fd: Int32, _ bytes: [UInt8], what: String) throws {
        var done = 0
        while done < bytes.count {
            let n = try retryingEINTR("write \(what)") {
                bytes.withUnsafeBytes { raw in
                    raw.baseAddress.map { Glibc.write(fd, $0 + done, raw.count - done) } ?? 0
                }
            }
            if n == 0 { throw SystemError("write \(what)", errno: ENOSPC) }
            done += n
        }
    }

    static func fdatasync(_ fd: Int32) throws {
        _ = try retryingEINTR("fdatasync") { Glibc.fdatasync(fd) }
    }

    static func fallocate(_ fd: Int32, mode: Int32, offset: UInt64, length: UInt64) throws {
        _ = try retryingEINTR("fallocate") { CLinux.fallocate(fd, mode, off_t(offset), off_t(length)) }
    }

    /// lseek with SEEK_DATA / SEEK_HOLE. Returns nil for ENXIO (no more data past offset).
    static func seek(_ fd: Int32, offset: UInt64, whence: Int32) throws -> UInt64? {
        let r = lseek(fd, off_t(offset), whence)
        if r >= 0 { return UInt64(r) }
        let e = Glibc.errno
        if e == ENXIO { return nil }
        throw SystemError("lseek", errno: e)
    }

    static func memfd(name: String) throws -> Int32 {
        try retryingEINTR("memfd_create") { memfd_create(name, UInt32(UMEMD_MFD_CLOEXEC)) }
    }

    static func blockDeviceSize(_ fd: Int32) throws -> UInt64 {
        var size: UInt64 = 0
        _ = try retryingEINTR("ioctl(BLKGETSIZE64)") { umemd_block_device_size(fd, &size) }
        return size
    }

    /// The file system magic of the file (statfs f_type).
    static func fileSystemType(_ fd: Int32) -> Int {
        Int(umemd_fs_type(fd))
    }

    static let tmpfsMagic = 0x0102_1994
    static let ramfsMagic = 0x8584_58f6
}

// Calls the page store needs: whole-file sync (a directory after creating or renaming in it), size
// changes, and an advisory lock so two daemons never share one store.
extension Sys {
    static func fsync(_ fd: Int32) throws {
        _ = try retryingEINTR("fsync") { Glibc.fsync(fd) }
    }

    static func ftruncate(_ fd: Int32, size: UInt64) throws {
        _ = try retryingEINTR("ftruncate") { Glibc.ftruncate(fd, off_t(size)) }
    }

    /// flock(LOCK_EX | LOCK_NB). Returns false when another open file description holds the lock.
    static func tryLockExclusive(_ fd: Int32) throws -> Bool {
        while true {
            if flock(fd, LOCK_EX | LOCK_NB) == 0 { return true }
            let e = Glibc.errno
            if e == EINTR { continue }
            if e == EWOULDBLOCK { return false }
            throw SystemError("flock", errno: e)
        }
    }

    /// open(2), retrying EINTR. `operation` names the file in the error.
    static func open(_ path: String, flags: Int32, mode: mode_t = 0o644, operation: String) throws -> Int32 {
        try retryingEINTR(operation) { Glibc.open(path, flags | O_CLOEXEC, mode) }
    }

    /// fsync of a directory, so entries created or renamed in it survive a crash.
    static func syncDirectory(_ path: String) throws {
        let fd = try open(path, flags: O_RDONLY | O_DIRECTORY, operation: "open directory \(path)")
        defer { _ = Glibc.close(fd) }
        try fsync(fd)
    }

    /// The whole content of a file of at most `limit` bytes (procfs and sysfs files report size 0,
    /// so this reads until end of file).
    static func readFile(_ path: String, limit: Int) throws -> [UInt8] {
        let fd = try open(path, flags: O_RDONLY, operation: "open \(path)")
        defer { _ = Glibc.close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = try retryingEINTR("read \(path)") { chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) } }
            if n == 0 { return bytes }
            bytes += chunk[0 ..< n]
            if bytes.count > limit { throw SystemError("read \(path) (larger than \(limit) bytes)", errno: EFBIG) }
        }
    }

    /// A small text file (procfs, sysfs), or nil when it cannot be read.
    static func readText(_ path: String) -> String? {
        (try? readFile(path, limit: 1 << 20)).map { String(decoding: $0, as: UTF8.self) }
    }
}
