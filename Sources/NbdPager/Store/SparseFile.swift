#if canImport(Glibc)
import Glibc
#endif
import Atomics
import CLinux

/// Operations on sparse files shared by the plain file export and the page store.
enum SparseFile {
    /// base:allocation extents of `offset ..< offset + length` of a file from SEEK_DATA / SEEK_HOLE:
    /// holes are reported as hole+zero, the rest as data. At most `maxExtents` extents (the last one may
    /// stop short of the range end). Nil when the file system cannot answer SEEK_DATA.
    static func extents(fd: Int32, offset: UInt64, length: UInt64, fileSize: UInt64,
                        maxExtents: Int) throws -> [NBDExtent]? {
        let end = offset + length
        var extents: [NBDExtent] = []
        var pos = offset
        while pos < end && extents.count < maxExtents {
            let dataStart: UInt64
            do {
                dataStart = try Sys.seek(fd, offset: pos, whence: Int32(UMEMD_SEEK_DATA)) ?? fileSize
            } catch let e as SystemError where e.errno == EINVAL || e.errno == EOPNOTSUPP {
                if extents.isEmpty { return nil }
                extents.append(NBDExtent(length: UInt32(end - pos), flags: []))
                return extents
            }
            let next: UInt64
            let flags: NBDAllocationFlags
            if dataStart > pos {
                next = min(dataStart, end)
                flags = [.hole, .zero]
            } else {
                next = min(try Sys.seek(fd, offset: pos, whence: Int32(UMEMD_SEEK_HOLE)) ?? fileSize, end)
                flags = []
            }
            // A file that shrank under us: report the rest as data rather than loop.
            let stop = next > pos ? next : end
            extents.append(NBDExtent(length: UInt32(stop - pos), flags: flags))
            pos = stop
        }
        return extents
    }

    /// Punches a hole (deallocates, reads as zero, size kept). Returns false, and clears `supported` so
    /// later calls do not ask again, when the file system cannot.
    static func punchHole(fd: Int32, offset: UInt64, length: UInt64, supported: ManagedAtomic<Bool>) throws -> Bool {
        guard supported.load(ordering: .relaxed) else { return false }
        do {
            try Sys.fallocate(fd, mode: Int32(UMEMD_FALLOC_FL_PUNCH_HOLE | UMEMD_FALLOC_FL_KEEP_SIZE),
                              offset: offset, length: length)
            return true
        } catch let e as SystemError where e.errno == EOPNOTSUPP || e.errno == ENOSYS || e.errno == EINVAL {
            supported.store(false, ordering: .relaxed)
            return false
        }
    }

    private static let zeroChunk = [UInt8](repeating: 0, count: 1 << 20)

    /// Writes zeroes over `offset ..< offset + length` (for file systems without hole punching).
    static func writeZeroes(fd: Int32, offset: UInt64, length: UInt64) throws {
        var pos = offset
        let end = offset + length
        try zeroChunk.withUnsafeBytes { zeros in
            while pos < end {
                let n = Int(min(UInt64(zeros.count), end - pos))
                try Sys.pwriteAll(fd, UnsafeRawBufferPointer(rebasing: zeros[0 ..< n]), offset: pos, what: "zeroes")
                pos += UInt64(n)
            }
        }
    }
}
