import Atomics
import CLinux
#if canImport(Glibc)
import Glibc
#endif

/// A regular file, block device or anonymous RAM file (memfd) served as an export.
///
/// Reads and writes are positional, so one descriptor serves every connection and thread, and a flush
/// (fdatasync) covers writes made through any connection: the export can advertise multi-conn.
public final class FileBackend: BlockBackend {
    public let size: UInt64
    public let capabilities: BackendCapabilities
    let fd: Int32
    let isRegularFile: Bool
    /// Feature probes: cleared the first time the kernel says EOPNOTSUPP, so we stop asking.
    private let nowaitReads = ManagedAtomic<Bool>(true)
    private let nowaitWrites = ManagedAtomic<Bool>(true)
    private let canPunchHole = ManagedAtomic<Bool>(true)
    private let canZeroRange = ManagedAtomic<Bool>(true)
    private let canSeekData = ManagedAtomic<Bool>(true)
    private let closed = ManagedAtomic<Bool>(false)
    /// A resident memory export's locked mapping of the whole memfd (unmapped on close).
    private let residentMapping: UInt?  // address (a raw pointer is not Sendable)

    init(fd: Int32, size: UInt64, writable: Bool, isRegularFile: Bool, inlineSafe: Bool,
         residentMapping: UnsafeMutableRawPointer? = nil) {
        self.fd = fd
        self.residentMapping = residentMapping.map { UInt(bitPattern: $0) }
        self.size = size
        self.isRegularFile = isRegularFile
        self.capabilities = BackendCapabilities(
            writable: writable, canTrim: writable, canZero: writable, canFastZero: writable,
            canCache: true, canMultiConn: true, inlineSafe: inlineSafe)
    }

    /// Opens a regular file or block device.
    public static func open(path: String, readOnly: Bool) throws -> FileBackend {
        let fd = try Sys.open(path, flags: readOnly ? O_RDONLY : O_RDWR, operation: "open \(path)")
        do {
            var st = stat()
            guard fstat(fd, &st) == 0 else { throw SystemError("stat \(path)", errno: errno) }
            let kind = st.st_mode & S_IFMT
            let size: UInt64
            if kind == S_IFREG {
                size = UInt64(st.st_size)
            } else if kind == S_IFBLK {
                size = try Sys.blockDeviceSize(fd)
            } else {
                throw SystemError("\(path) is neither a regular file nor a block device", errno: EINVAL)
            }
            let fsType = Sys.fileSystemType(fd)
            let inMemory = kind == S_IFREG && (fsType == Sys.tmpfsMagic || fsType == Sys.ramfsMagic)
            return FileBackend(fd: fd, size: size, writable: !readOnly, isRegularFile: kind == S_IFREG,
                               inlineSafe: inMemory)
        } catch {
            _ = Glibc.close(fd)
            throw error
        }
    }

    /// A zero-filled RAM export of `size` bytes: a sparse memfd, so untouched pages cost nothing.
    public static func memory(size: UInt64, name: String = "nbd-umemd") throws -> FileBackend {
        let fd = try sizedMemfd(size: size, name: name)
        return FileBackend(fd: fd, size: size, writable: true, isRegularFile: true, inlineSafe: true)
    }

    /// A RAM export whose every page is allocated and locked in memory now (for `serve --swap`):
    /// the memfd is mapped shared, populated and mlock'ed, and trims never punch holes (a page
    /// allocated later, by a write into a hole, would not be locked and could itself be swapped out,
    /// possibly to the device this export backs).
    public static func residentMemory(size: UInt64, name: String = "nbd-umemd") throws -> FileBackend {
        guard size <= UInt64(Int.max) else { throw SystemError("map memory export of \(size) bytes", errno: EFBIG) }
        let fd = try sizedMemfd(size: size, name: name)
        guard let p = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0), p != MAP_FAILED else {
            let e = errno
            _ = Glibc.close(fd)
            throw SystemError("map memory export of \(size) bytes", errno: e)
        }
        guard mlock(p, Int(size)) == 0 else {
            let e = errno
            munmap(p, Int(size))
            _ = Glibc.close(fd)
            throw SystemError("lock memory export of \(size) bytes in RAM (mlock; RLIMIT_MEMLOCK?)", errno: e)
        }
        let backend = FileBackend(fd: fd, size: size, writable: true, isRegularFile: true, inlineSafe: true,
                                  residentMapping: p)
        backend.canPunchHole.store(false, ordering: .relaxed)
        return backend
    }

    private static func sizedMemfd(size: UInt64, name: String) throws -> Int32 {
        let fd = try Sys.memfd(name: name)
        guard ftruncate(fd, off_t(size)) == 0 else {
            let e = errno
            _ = Glibc.close(fd)
            throw SystemError("ftruncate memory export to \(size) bytes", errno: e)
        }
        return fd
    }

    // MARK: read / write

    public func read(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64, nonBlocking: Bool) throws -> Int {
        if let base = try resident(offset: offset, count: buffer.count) {
            buffer.baseAddress.map { _ = memcpy($0, base, buffer.count) }
            return buffer.count
        }
        let useNowait = nonBlocking && !capabilities.inlineSafe
        if useNowait && !nowaitReads.load(ordering: .relaxed) { return 0 }
        var done = 0
        while done < buffer.count {
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[done...])
            let n: Int?
            do {
                n = try Sys.pread(fd, part, offset: offset + UInt64(done), nowait: useNowait)
            } catch let e as SystemError where useNowait && e.errno == EOPNOTSUPP {
                nowaitReads.store(false, ordering: .relaxed)
                return done
            }
            guard let n else { return done }
            if n == 0 { throw BackendError.shortRead(offset: offset + UInt64(done)) }
            done += n
        }
        return done
    }

    public func write(from buffer: UnsafeRawBufferPointer, offset: UInt64, fua: Bool, nonBlocking: Bool) throws -> Int {
        if let base = try resident(offset: offset, count: buffer.count) {
            // FUA needs nothing more: the memfd is the storage, and memory is as durable as it gets.
            buffer.baseAddress.map { _ = memcpy(base, $0, buffer.count) }
            return buffer.count
        }
        let useNowait = nonBlocking && !capabilities.inlineSafe
        if useNowait && (fua || !nowaitWrites.load(ordering: .relaxed)) { return 0 }
        var done = 0
        while done < buffer.count {
            let part = UnsafeRawBufferPointer(rebasing: buffer[done...])
            let n: Int?
            do {
                n = try Sys.pwrite(fd, part, offset: offset + UInt64(done), nowait: useNowait, dsync: fua)
            } catch let e as SystemError where useNowait && e.errno == EOPNOTSUPP {
                nowaitWrites.store(false, ordering: .relaxed)
                return done
            }
            guard let n else { return done }
            if n == 0 { throw BackendError.system(SystemError("pwrite", errno: ENOSPC)) }
            done += n
        }
        return done
    }

    /// Where a resident memory export keeps `count` bytes at `offset`: its reads and writes are
    /// copies, with no system call (4 KiB swap-ins through nbdfuse and a loop device: the preadv2
    /// of each cost more than nbdkit's memory plugin takes for the whole request). Nil for other
    /// exports. The request validator has checked the range against the size already.
    private func resident(offset: UInt64, count: Int) throws -> UnsafeMutableRawPointer? {
        guard let residentMapping else { return nil }
        guard offset <= size, UInt64(count) <= size - offset else {
            throw BackendError.system(SystemError("memory export access beyond its size", errno: EINVAL))
        }
        guard !closed.load(ordering: .relaxed), let base = UnsafeMutableRawPointer(bitPattern: residentMapping) else {
            throw BackendError.system(SystemError("memory export is closed", errno: EBADF))
        }
        return base + Int(offset)
    }

    public func flush() throws {
        try Sys.fdatasync(fd)
    }

    // MARK: trim / zero / cache

    /// Punches a hole; false when the file system cannot (the range is left as it was).
    private func punchHole(offset: UInt64, length: UInt64) throws -> Bool {
        try SparseFile.punchHole(fd: fd, offset: offset, length: length, supported: canPunchHole)
    }

    public func trim(offset: UInt64, length: UInt64, fua: Bool) throws {
        // TRIM is advisory: where holes cannot be punched the data simply stays.
        if try punchHole(offset: offset, length: length), fua {
            try Sys.fdatasync(fd)
        }
    }

    public func zero(offset: UInt64, length: UInt64, mayTrim: Bool, fast: Bool, fua: Bool) throws {
        try zeroRange(offset: offset, length: length, mayTrim: mayTrim, fast: fast)
        if fua { try Sys.fdatasync(fd) }
    }

    private func zeroRange(offset: UInt64, length: UInt64, mayTrim: Bool, fast: Bool) throws {
        if mayTrim, try punchHole(offset: offset, length: length) {
            return
        }
        if canZeroRange.load(ordering: .relaxed) {
            do {
                try Sys.fallocate(fd, mode: Int32(UMEMD_FALLOC_FL_ZERO_RANGE | UMEMD_FALLOC_FL_KEEP_SIZE),
                                  offset: offset, length: length)
                return
            } catch let e as SystemError where e.errno == EOPNOTSUPP || e.errno == ENOSYS || e.errno == EINVAL {
                canZeroRange.store(false, ordering: .relaxed)
            }
        }
        if fast { throw BackendError.notFast }
        try writeZeroes(offset: offset, length: length)
    }

    private func writeZeroes(offset: UInt64, length: UInt64) throws {
        try SparseFile.writeZeroes(fd: fd, offset: offset, length: length)
    }

    public func cache(offset: UInt64, length: UInt64) throws {
        let r = posix_fadvise(fd, off_t(offset), off_t(length), POSIX_FADV_WILLNEED)
        if r != 0 && r != ESPIPE && r != EINVAL { throw SystemError("posix_fadvise", errno: r) }
    }

    // MARK: block status

    public func blockStatus(offset: UInt64, length: UInt64, maxExtents: Int) throws -> [NBDExtent] {
        if isRegularFile, canSeekData.load(ordering: .relaxed),
           let extents = try SparseFile.extents(fd: fd, offset: offset, length: length, fileSize: size,
                                                maxExtents: maxExtents) {
            return extents
        }
        canSeekData.store(false, ordering: .relaxed)
        return [NBDExtent(length: UInt32(length), flags: [])]
    }

    public func close() throws {
        guard closed.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged else { return }
        defer {
            unmapResident()
            _ = Glibc.close(fd)
        }
        if capabilities.writable { try Sys.fdatasync(fd) }
    }

    private func unmapResident() {
        if let residentMapping { munmap(UnsafeMutableRawPointer(bitPattern: residentMapping), Int(size)) }
    }

    deinit {
        if !closed.load(ordering: .relaxed) {
            unmapResident()
            _ = Glibc.close(fd)
        }
    }
}
