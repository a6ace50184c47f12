#if canImport(Glibc)
import Glibc
#endif

// Helpers of the targets that fuzz on-disk formats (FuzzPageStore, FuzzSwapSlots): little-endian
// fields in byte arrays, the files they write, the environment.

/// An environment variable, nil when unset.
public func environment(_ name: String) -> String? {
    guard let v = getenv(name) else { return nil }
    return String(cString: v)
}

/// The little-endian `T` at `offset` (bytes past the end read as zero).
public func le<T: FixedWidthInteger>(_ bytes: [UInt8], _ offset: Int, _: T.Type) -> T {
    var v: T = 0
    for i in 0 ..< MemoryLayout<T>.size where offset + i < bytes.count {
        v |= T(bytes[offset + i]) << (i * 8)
    }
    return v
}

/// Stores `value` little-endian at `offset` (bytes past the end are dropped).
public func putLE<T: FixedWidthInteger>(_ bytes: inout [UInt8], _ offset: Int, _ value: T) {
    for i in 0 ..< MemoryLayout<T>.size where offset + i < bytes.count {
        bytes[offset + i] = UInt8(truncatingIfNeeded: value >> (i * 8))
    }
}

/// Writes `bytes` as the whole file at `path` (created or truncated).
public func writeFile(_ path: String, _ bytes: [UInt8]) {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    require(fd >= 0, "cannot create \(path): errno \(errno)")
    let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    require(n == bytes.count, "short write to \(path)")
    close(fd)
}

/// The scratch directory's path and the files in it its removal at exit unlinks.
nonisolated(unsafe) private var scratch: (directory: String, files: [String])?

/// A directory of this process's own (libFuzzer's -fork/-jobs workers run side by side) named
/// `PREFIX.PID` under $NBD_FUZZ_STORE_DIR, else /dev/shm, else /tmp; at exit `files` in it and the
/// directory itself are removed. One per process.
public func scratchDirectory(_ prefix: String, removing files: [String]) -> String {
    var base = environment("NBD_FUZZ_STORE_DIR") ?? "/dev/shm"
    if access(base, W_OK) != 0 { base = "/tmp" }
    let dir = "\(base)/\(prefix).\(getpid())"
    mkdir(dir, 0o700)
    scratch = (dir, files)
    atexit {
        guard let (dir, files) = scratch else { return }
        for name in files { unlink(dir + "/" + name) }
        rmdir(dir)
    }
    return dir
}
