import Atomics
import CLinux
import NIOConcurrencyHelpers
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// Why a page store could not be opened or used.
public enum PageStoreError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The store on disk belongs to another source (size, page size, identity or format differ).
    case mismatch(String)
    /// The store's files cannot be trusted (bad magic, checksum, length, missing data file).
    case corrupt(String)
    /// Another process (or another open store in this one) holds the store's lock.
    case locked(String)
    /// A bad parameter to `open` (page size, identity length).
    case invalidArgument(String)
    /// A data access outside the export.
    case outOfRange(String)
    /// A sync of the data file failed: data written since the last commit may be lost even if a later
    /// sync succeeds, so the store refuses further commits. Reopening recovers the last commit.
    case syncFailed(String)
    /// The store was closed.
    case closed

    public var description: String {
        switch self {
        case let .mismatch(m), let .corrupt(m), let .locked(m), let .invalidArgument(m), let .outOfRange(m),
             let .syncFailed(m): m
        case .closed: "page store is closed"
        }
    }
}

/// Counts by state at one moment.
public struct PageStoreSnapshot: Sendable, Equatable {
    public var pageCount: UInt64
    public var absent: UInt64
    public var present: UInt64
    public var local: UInt64
    /// Generation of the newest committed state slot.
    public var generation: UInt64
    /// True when marks or data writes are waiting for a commit.
    public var dirty: Bool

    public var isComplete: Bool { absent == 0 }
}

/// The local, crash-safe page store: a directory holding
///
/// - `data`: a sparse file the size of the export, page `p` at offset `p * pageSize`;
/// - `state`: the persistent page-state map, in the format below;
/// - `lock`: held with `flock` while the store is open, so two daemons never share a store.
///
/// **State file.** A fixed header of `headerSize` (8 KiB) bytes, all integers little-endian:
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic `NBDUMEMD` |
/// | 8 | 4 | format version (1) |
/// | 12 | 4 | header size (8192) |
/// | 16 | 8 | page size |
/// | 24 | 8 | export size |
/// | 32 | 8 | page count |
/// | 40 | 8 | slot stride (bytes from one slot to the next) |
/// | 48 | 4 | identity length (≤ 4096) |
/// | 52 | 4 | reserved (0) |
/// | 56 | ≤4096 | identity (UTF-8) |
/// | 8188 | 4 | CRC32C of bytes 0 ..< 8188 |
///
/// then two slots, A at `headerSize` and B at `headerSize + slotStride` (the stride is the slot length
/// rounded up to 4 KiB). A slot: magic `UMEMSLOT` (8), generation (8), map length (8), CRC32C (4) of the
/// slot's bytes 0 ..< 24 followed by the map, reserved (4), then the encoded `PageStateMap`.
/// The header is written once, when the store is created (as `state.tmp`, synced, renamed, directory
/// synced), so a `state` file always has a complete header and one valid slot.
///
/// **Commit.** Marks (`markPresent`, `markLocal`) change the in-memory map only. `commit()` takes a
/// copy of the map, fdatasyncs the data file, writes the copy with the next generation into the slot
/// that does *not* hold the newest valid generation, and fdatasyncs the state file. So page data is on
/// stable storage before any state that says it is there, and a torn slot write leaves the other slot
/// intact: `open` takes the valid slot with the highest generation. Nothing changed since the last
/// commit ⇒ `commit()` returns at once; only data writes ⇒ it only fdatasyncs the data file.
///
/// Dropping a store without `close()` closes its descriptors but does **not** commit (a crash).
///
/// A failed fdatasync of the data file poisons the store: every later commit throws `.syncFailed`
/// (retrying could commit state over lost data); reopening recovers the last commit.
///
/// Thread-safe: the map is behind a lock; data I/O is positional; commits are serialized.
/// `close()` must not race other calls on the same store.
public final class PageStore: @unchecked Sendable {
    public let directory: String
    public let geometry: PageGeometry
    public let identity: String

    public var size: UInt64 { geometry.exportSize }
    public var pageSize: UInt64 { geometry.pageSize }
    public var pageCount: UInt64 { geometry.pageCount }

    static let formatVersion: UInt32 = 1
    static let headerSize = 8192
    static let maxIdentityBytes = 4096
    static let headerMagic = Array("NBDUMEMD".utf8)
    static let slotMagic = Array("UMEMSLOT".utf8)
    static let slotHeaderSize = 32
    /// Largest encoded map accepted (1 GiB: a 16 TiB export of 4 KiB pages).
    static let maxMapBytes = 1 << 30

    private let dataFD: Int32
    /// Cleared the first time the kernel refuses RWF_NOWAIT on the data file.
    private let nowaitReads = ManagedAtomic<Bool>(true)
    private let stateFD: Int32
    private let lockFD: Int32
    private let slotLength: Int
    private let slotStride: UInt64

    /// Guards `map` and `mapDirty`.
    private let mapLock = NIOLock()
    private var map: PageStateMap
    private var mapDirty = false

    /// Serializes commits and close; guards `generation`, `newestSlot`, `slotBuffer`.
    private let commitLock = NIOLock()
    private var generation: UInt64
    private var newestSlot: Int
    private var slotBuffer: [UInt8]

    private let dataDirty = ManagedAtomic<Bool>(false)
    private let closed = ManagedAtomic<Bool>(false)
    /// The error of a failed data file sync; set once, never cleared (see `PageStoreError.syncFailed`).
    private var dataSyncFailure: String?
    /// Cleared the first time the file system says it cannot punch holes.
    private let canPunchHole = ManagedAtomic<Bool>(true)
    /// Mirrors `generation` for lock-free snapshots.
    private let committedGeneration = ManagedAtomic<UInt64>(0)

    init(directory: String, geometry: PageGeometry, identity: String, dataFD: Int32, stateFD: Int32,
                 lockFD: Int32, map: PageStateMap, generation: UInt64, newestSlot: Int) {
        self.directory = directory
        self.geometry = geometry
        self.identity = identity
        self.dataFD = dataFD
        self.stateFD = stateFD
        self.lockFD = lockFD
        self.map = map
        self.generation = generation
        self.newestSlot = newestSlot
        self.slotLength = Self.slotLength(geometry)
        self.slotStride = Self.slotStride(geometry)
        self.slotBuffer = [UInt8](repeating: 0, count: slotLength)
        committedGeneration.store(generation, ordering: .relaxed)
    }

    deinit {
        // A store dropped without close() behaves like a crash: no commit.
        if !closed.load(ordering: .relaxed) {
            _ = Glibc.close(dataFD)
            _ = Glibc.close(stateFD)
            _ = Glibc.close(lockFD)
        }
    }

    // MARK: state

    /// Marks `pages` present (pulled from the source); forward-only. Call after their data is written.
    /// Returns how many pages changed.
    @discardableResult
    public func markPresent(_ pages: Range<UInt64>) -> UInt64 {
        mark(pages, .present)
    }

    /// Marks `pages` local (written, trimmed or zeroed by a client); forward-only. Call after their
    /// data is written. Returns how many pages changed.
    @discardableResult
    public func markLocal(_ pages: Range<UInt64>) -> UInt64 {
        mark(pages, .local)
    }

    @discardableResult
    public func mark(_ pages: Range<UInt64>, _ state: PageState) -> UInt64 {
        mapLock.withLock {
            let changed = map.mark(pages, state)
            if changed > 0 { mapDirty = true }
            return changed
        }
    }

    /// Moves `pages` back to absent (`PageStateMap.reset`): staging of a swap export only.
    @discardableResult
    public func markAbsent(_ pages: Range<UInt64>) -> UInt64 {
        mapLock.withLock {
            let changed = map.reset(pages)
            if changed > 0 { mapDirty = true }
            return changed
        }
    }

    public func state(of page: UInt64) -> PageState {
        mapLock.withLock { map.state(of: page) }
    }

    public func runs(of state: PageState, in pages: Range<UInt64>) -> [Range<UInt64>] {
        mapLock.withLock { map.runs(of: state, in: pages) }
    }

    public func firstPage(with state: PageState, from page: UInt64) -> UInt64? {
        mapLock.withLock { map.firstPage(with: state, from: page) }
    }

    public func count(of state: PageState, in pages: Range<UInt64>) -> UInt64 {
        mapLock.withLock { map.count(of: state, in: pages) }
    }

    /// A copy of the in-memory map (committed or not).
    public func currentMap() -> PageStateMap {
        mapLock.withLock { map }
    }

    public var isComplete: Bool {
        mapLock.withLock { map.isComplete }
    }

    public func snapshot() -> PageStoreSnapshot {
        let generation = committedGeneration.load(ordering: .relaxed)
        let dataDirty = dataDirty.load(ordering: .relaxed)
        return mapLock.withLock {
            PageStoreSnapshot(pageCount: map.pageCount, absent: map.absentCount, present: map.presentCount,
                              local: map.localCount, generation: generation, dirty: mapDirty || dataDirty)
        }
    }

    // MARK: commit / close

    /// Makes every data write and mark made before the call durable, data first. Cheap when nothing
    /// changed since the last commit.
    /// How long commits that had something to make durable took (data sync, map write, its sync).
    public let commitDuration = BucketHistogram()

    public func commit() throws {
        try commitLock.withLock {
            guard !closed.load(ordering: .relaxed) else { throw PageStoreError.closed }
            try commitLocked()
        }
    }

    private func commitLocked() throws {
        if let failure = dataSyncFailure { throw PageStoreError.syncFailed(failure) }
        let dataWasDirty = dataDirty.exchange(false, ordering: .acquiring)
        // The copy of the map is taken before the data sync: every page it shows had its data written
        // before it was marked, so the sync below covers it.
        let mapChanged: Bool = slotBuffer.withUnsafeMutableBytes { slot in
            mapLock.withLock {
                guard mapDirty else { return false }
                mapDirty = false
                map.encode(into: UnsafeMutableRawBufferPointer(rebasing: slot[Self.slotHeaderSize...]))
                return true
            }
        }
        guard mapChanged || dataWasDirty else { return }
        let started = NIODeadline.now()
        defer { commitDuration.record(nanoseconds: UInt64(max(0, (NIODeadline.now() - started).nanoseconds))) }
        do {
            do {
                try Sys.fdatasync(dataFD)
            } catch {
                // After a failed fdatasync the kernel may drop the dirty pages and report success next
                // time: never commit state over data that may be gone.
                let failure = "store \(directory): syncing the data file failed (\(error)); "
                    + "restart to recover the last committed state"
                dataSyncFailure = failure
                throw PageStoreError.syncFailed(failure)
            }
            if mapChanged {
                // The largest generation marks no valid slot (see decodeSlot): a store that got there
                // (only a damaged one can) takes no more commits.
                guard generation < UInt64.max - 1 else {
                    throw PageStoreError.corrupt(
                        "store \(directory): the state generation is exhausted; use --reset-store to discard it")
                }
                let target = 1 - newestSlot
                let nextGeneration = generation + 1
                Self.sealSlot(&slotBuffer, generation: nextGeneration)
                try Self.writeFully(stateFD, slotBuffer, offset: UInt64(Self.headerSize) + UInt64(target) * slotStride,
                                    what: directory + "/state")
                try Sys.fdatasync(stateFD)
                newestSlot = target
                generation = nextGeneration
                committedGeneration.store(nextGeneration, ordering: .relaxed)
            }
        } catch {
            // Nothing was promised: the next commit retries (into the same, non-newest slot).
            if dataWasDirty { dataDirty.store(true, ordering: .relaxed) }
            if mapChanged { mapLock.withLock { mapDirty = true } }
            throw error
        }
    }

    /// Commits, then closes the files and releases the store's lock. Later calls throw `.closed`.
    public func close() throws {
        try commitLock.withLock {
            guard !closed.load(ordering: .relaxed) else { return }
            defer {
                closed.store(true, ordering: .relaxed)
                _ = Glibc.close(dataFD)
                _ = Glibc.close(stateFD)
                _ = Glibc.close(lockFD)
            }
            try commitLocked()
        }
    }

    // MARK: data

    private func checkRange(_ what: String, offset: UInt64, length: Int) throws {
        guard !closed.load(ordering: .relaxed) else { throw PageStoreError.closed }
        let (end, overflow) = offset.addingReportingOverflow(UInt64(length))
        guard !overflow, end <= geometry.exportSize else {
            throw PageStoreError.outOfRange(
                "\(what) of \(length) bytes at offset \(offset) is past the end of store \(directory) (size \(geometry.exportSize))")
        }
    }

    /// Reads `buffer.count` bytes of the data file at `offset`.
    public func readData(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64) throws {
        try checkRange("read", offset: offset, length: buffer.count)
        var done = 0
        while done < buffer.count {
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[done...])
            guard let n = try Sys.pread(dataFD, part, offset: offset + UInt64(done), nowait: false) else { continue }
            if n == 0 {
                throw PageStoreError.corrupt("store \(directory): the data file ends before offset \(offset + UInt64(done))")
            }
            done += n
        }
    }

    /// Reads what the page cache holds without blocking (RWF_NOWAIT): the number of bytes read, which is
    /// less than asked (possibly 0) when the rest would wait for the disk.
    public func readCached(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64) throws -> Int {
        try checkRange("read", offset: offset, length: buffer.count)
        guard nowaitReads.load(ordering: .relaxed) else { return 0 }
        var done = 0
        while done < buffer.count {
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[done...])
            do {
                guard let n = try Sys.pread(dataFD, part, offset: offset + UInt64(done), nowait: true), n > 0 else {
                    return done
                }
                done += n
            } catch let e as SystemError where e.errno == EOPNOTSUPP {
                nowaitReads.store(false, ordering: .relaxed)
                return done
            }
        }
        return done
    }

    /// Writes `buffer` to the data file at `offset` (not durable until the next `commit()`).
    public func writeData(from buffer: UnsafeRawBufferPointer, offset: UInt64) throws {
        try checkRange("write", offset: offset, length: buffer.count)
        try Sys.pwriteAll(dataFD, buffer, offset: offset, what: directory + "/data")
        dataDirty.store(true, ordering: .releasing)
    }

    /// Makes `offset ..< offset + length` read as zeroes, freeing its blocks where the file system can
    /// punch holes and writing zeroes where it cannot.
    public func punchHole(offset: UInt64, length: UInt64) throws {
        guard length <= UInt64(Int.max) else {
            throw PageStoreError.outOfRange("punch of \(length) bytes is too long")
        }
        try checkRange("punch", offset: offset, length: Int(length))
        guard length > 0 else { return }
        defer { dataDirty.store(true, ordering: .releasing) }
        if try SparseFile.punchHole(fd: dataFD, offset: offset, length: length, supported: canPunchHole) { return }
        try writeZeroes(offset: offset, length: length)
    }

    /// Makes `punchHole` write zeroes, as on a file system without hole punching (for tests).
    func disableHolePunching() {
        canPunchHole.store(false, ordering: .relaxed)
    }

    private func writeZeroes(offset: UInt64, length: UInt64) throws {
        try SparseFile.writeZeroes(fd: dataFD, offset: offset, length: length)
    }

    /// base:allocation extents of the data file (holes read as zero); nil if the file system cannot tell.
    func dataExtents(offset: UInt64, length: UInt64, maxExtents: Int) throws -> [NBDExtent]? {
        try SparseFile.extents(fd: dataFD, offset: offset, length: length, fileSize: geometry.exportSize,
                               maxExtents: maxExtents)
    }

    /// True when every byte of `buffer` is zero (word-wise), so a pulled page can be stored as a hole.
    public static func isAllZero(_ buffer: UnsafeRawBufferPointer) -> Bool {
        guard let base = buffer.baseAddress else { return true }
        let n = buffer.count
        var i = 0
        while n - i >= 64 {
            var acc: UInt64 = 0
            for k in stride(from: 0, to: 64, by: 8) {
                acc |= base.loadUnaligned(fromByteOffset: i + k, as: UInt64.self)
            }
            if acc != 0 { return false }
            i += 64
        }
        while n - i >= 8 {
            if base.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
            i += 8
        }
        while i < n {
            if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
            i += 1
        }
        return true
    }

}
