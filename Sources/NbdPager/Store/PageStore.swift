import Atomics
import CLinux
import NIOConcurrencyHelpers
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

    private init(directory: String, geometry: PageGeometry, identity: String, dataFD: Int32, stateFD: Int32,
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

    static func slotLength(_ g: PageGeometry) -> Int {
        slotHeaderSize + PageStateMap.encodedByteCount(pageCount: g.pageCount)
    }

    static func slotStride(_ g: PageGeometry) -> UInt64 {
        PageGeometry.alignUp(UInt64(slotLength(g)), to: 4096)
    }

    /// Bytes in the state file of a store with geometry `g`.
    static func stateFileSize(_ g: PageGeometry) -> UInt64 {
        UInt64(headerSize) + 2 * slotStride(g)
    }

    // MARK: open

    /// Opens the store in `directory` for an export of `size` bytes from the source named `identity`,
    /// creating the directory and its files if there is no store yet.
    ///
    /// An existing store is reused only if its size, page size and identity match; otherwise this throws
    /// `.mismatch` with a message naming what differs. A damaged store throws `.corrupt`. With `reset`
    /// the existing store (matching or not, damaged or not) is discarded and a fresh one created.
    public static func open(directory: String, size: UInt64, pageSize: UInt64 = PageGeometry.defaultPageSize,
                            identity: String, reset: Bool) throws -> PageStore {
        let geometry: PageGeometry
        do {
            geometry = try PageGeometry(exportSize: size, pageSize: pageSize)
        } catch let e as PageGeometryError {
            throw PageStoreError.invalidArgument("store \(directory): \(e.description)")
        }
        guard identity.utf8.count <= maxIdentityBytes else {
            throw PageStoreError.invalidArgument(
                "store \(directory): source identity is \(identity.utf8.count) bytes, at most \(maxIdentityBytes) allowed")
        }
        guard PageStateMap.encodedByteCount(pageCount: geometry.pageCount) <= maxMapBytes else {
            throw PageStoreError.invalidArgument(
                "store \(directory): \(geometry.pageCount) pages of \(pageSize) bytes need too large a state map; use a larger page size")
        }
        try makeDirectories(directory)
        let lockFD = try Sys.open(directory + "/lock", flags: O_RDWR | O_CREAT, operation: "open \(directory)/lock")
        do {
            guard try Sys.tryLockExclusive(lockFD) else {
                throw PageStoreError.locked("store \(directory) is in use by another process")
            }
            let statePath = directory + "/state"
            if reset {
                try removeIfPresent(statePath)
                try removeIfPresent(directory + "/data")
            } else if try exists(statePath) {
                return try reopen(directory: directory, geometry: geometry, identity: identity, lockFD: lockFD)
            }
            return try create(directory: directory, geometry: geometry, identity: identity, lockFD: lockFD)
        } catch {
            _ = Glibc.close(lockFD)
            throw error
        }
    }

    private static func create(directory: String, geometry: PageGeometry, identity: String, lockFD: Int32) throws -> PageStore {
        let dataPath = directory + "/data"
        let tmpPath = directory + "/state.tmp"
        try removeIfPresent(tmpPath)
        let dataFD = try Sys.open(dataPath, flags: O_RDWR | O_CREAT | O_TRUNC, operation: "create \(dataPath)")
        var stateFD: Int32 = -1
        do {
            try Sys.ftruncate(dataFD, size: geometry.exportSize)
            try Sys.fsync(dataFD)
            stateFD = try Sys.open(tmpPath, flags: O_RDWR | O_CREAT | O_TRUNC, operation: "create \(tmpPath)")
            let header = encodeHeader(geometry: geometry, identity: identity)
            try writeFully(stateFD, header, offset: 0, what: tmpPath)
            let map = PageStateMap(pageCount: geometry.pageCount)
            var slot = [UInt8](repeating: 0, count: slotLength(geometry))
            fillSlot(&slot, generation: 1, map: map)
            try writeFully(stateFD, slot, offset: UInt64(headerSize), what: tmpPath)
            // Slot B stays zero (invalid) until the first commit.
            try Sys.ftruncate(stateFD, size: stateFileSize(geometry))
            try Sys.fsync(stateFD)
            guard Glibc.rename(tmpPath, directory + "/state") == 0 else {
                throw SystemError("rename \(tmpPath)", errno: errno)
            }
            try Sys.syncDirectory(directory)
            return PageStore(directory: directory, geometry: geometry, identity: identity, dataFD: dataFD,
                             stateFD: stateFD, lockFD: lockFD, map: map, generation: 1, newestSlot: 0)
        } catch {
            _ = Glibc.close(dataFD)
            if stateFD >= 0 { _ = Glibc.close(stateFD) }
            throw error
        }
    }

    private static func reopen(directory: String, geometry: PageGeometry, identity: String, lockFD: Int32) throws -> PageStore {
        let statePath = directory + "/state"
        let discard = "; use --reset-store to discard it"
        let stateFD = try Sys.open(statePath, flags: O_RDWR, operation: "open \(statePath)")
        var dataFD: Int32 = -1
        do {
            // Header.
            var header = [UInt8](repeating: 0, count: headerSize)
            let got = try readFully(stateFD, &header, offset: 0)
            guard got >= 16, Array(header[0 ..< 8]) == headerMagic else {
                throw PageStoreError.corrupt("store \(directory): \(statePath) is not an nbd-umemd state file\(discard)")
            }
            let version = header.le(UInt32.self, at: 8)
            guard version == formatVersion else {
                throw PageStoreError.mismatch(
                    "store \(directory) was written in state format version \(version); this build reads version \(formatVersion)\(discard)")
            }
            guard got == headerSize, header.le(UInt32.self, at: 12) == UInt32(headerSize) else {
                throw PageStoreError.corrupt("store \(directory): state file header is truncated\(discard)")
            }
            let crc = header.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0 ..< headerSize - 4])) }
            guard crc == header.le(UInt32.self, at: headerSize - 4) else {
                throw PageStoreError.corrupt("store \(directory): state file header checksum is wrong\(discard)")
            }
            let recordedPageSize = header.le(UInt64.self, at: 16)
            let recordedSize = header.le(UInt64.self, at: 24)
            let identityLength = Int(header.le(UInt32.self, at: 48))
            guard identityLength <= maxIdentityBytes else {
                throw PageStoreError.corrupt("store \(directory): state file header has an invalid identity length\(discard)")
            }
            let recordedIdentityBytes = Array(header[56 ..< 56 + identityLength])
            let recordedIdentity = String(decoding: recordedIdentityBytes, as: UTF8.self)
            // Identities compare byte for byte (String == would equate canonically equivalent spellings).
            if let message = mismatchMessage(directory: directory,
                                             recorded: (recordedIdentity, recordedSize, recordedPageSize),
                                             wanted: (identity, geometry.exportSize, geometry.pageSize),
                                             identityDiffers: recordedIdentityBytes != Array(identity.utf8)) {
                throw PageStoreError.mismatch(message + discard)
            }
            guard header.le(UInt64.self, at: 32) == geometry.pageCount, header.le(UInt64.self, at: 40) == slotStride(geometry) else {
                throw PageStoreError.corrupt("store \(directory): state file header has an inconsistent layout\(discard)")
            }

            // Slots: the valid one with the highest generation.
            var best: (slot: Int, generation: UInt64, map: PageStateMap)?
            var slot = [UInt8](repeating: 0, count: slotLength(geometry))
            for index in 0 ..< 2 {
                let offset = UInt64(headerSize) + UInt64(index) * slotStride(geometry)
                guard try readFully(stateFD, &slot, offset: offset) == slot.count,
                      let (gen, map) = decodeSlot(slot, geometry: geometry) else { continue }
                if let current = best, current.generation >= gen { continue }
                best = (index, gen, map)
            }
            guard let best else {
                throw PageStoreError.corrupt("store \(directory): neither state slot is valid\(discard)")
            }

            // Data file.
            let dataPath = directory + "/data"
            do {
                dataFD = try Sys.open(dataPath, flags: O_RDWR, operation: "open \(dataPath)")
            } catch let e as SystemError where e.errno == ENOENT {
                throw PageStoreError.corrupt("store \(directory): the data file is missing\(discard)")
            }
            var st = stat()
            guard fstat(dataFD, &st) == 0 else { throw SystemError("stat \(dataPath)", errno: errno) }
            guard UInt64(st.st_size) == geometry.exportSize else {
                throw PageStoreError.corrupt(
                    "store \(directory): the data file has \(st.st_size) bytes, expected \(geometry.exportSize)\(discard)")
            }
            return PageStore(directory: directory, geometry: geometry, identity: identity, dataFD: dataFD,
                             stateFD: stateFD, lockFD: lockFD, map: best.map, generation: best.generation,
                             newestSlot: best.slot)
        } catch {
            _ = Glibc.close(stateFD)
            if dataFD >= 0 { _ = Glibc.close(dataFD) }
            throw error
        }
    }

    static func mismatchMessage(directory: String, recorded: (identity: String, size: UInt64, pageSize: UInt64),
                                wanted: (identity: String, size: UInt64, pageSize: UInt64),
                                identityDiffers: Bool) -> String? {
        let pageSizeDiffers = recorded.pageSize != wanted.pageSize
        if identityDiffers || recorded.size != wanted.size {
            let ps = { (p: UInt64) in pageSizeDiffers ? ", page size \(p)" : "" }
            return "store \(directory) belongs to source '\(recorded.identity)' (size \(recorded.size)\(ps(recorded.pageSize))), "
                + "not '\(wanted.identity)' (size \(wanted.size)\(ps(wanted.pageSize)))"
        }
        if pageSizeDiffers {
            return "store \(directory) uses page size \(recorded.pageSize), not \(wanted.pageSize) "
                + "(source '\(recorded.identity)', size \(recorded.size))"
        }
        return nil
    }

    // MARK: format

    static func encodeHeader(geometry: PageGeometry, identity: String) -> [UInt8] {
        var h = [UInt8](repeating: 0, count: headerSize)
        h.replaceSubrange(0 ..< 8, with: headerMagic)
        h.putLE(formatVersion, at: 8)
        h.putLE(UInt32(headerSize), at: 12)
        h.putLE(geometry.pageSize, at: 16)
        h.putLE(geometry.exportSize, at: 24)
        h.putLE(geometry.pageCount, at: 32)
        h.putLE(slotStride(geometry), at: 40)
        let id = Array(identity.utf8)
        h.putLE(UInt32(id.count), at: 48)
        h.replaceSubrange(56 ..< 56 + id.count, with: id)
        let crc = h.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0 ..< headerSize - 4])) }
        h.putLE(crc, at: headerSize - 4)
        return h
    }

    /// Fills `slot` (of `slotLength` bytes) with a slot holding `map` at `generation`.
    static func fillSlot(_ slot: inout [UInt8], generation: UInt64, map: PageStateMap) {
        slot.withUnsafeMutableBytes { map.encode(into: UnsafeMutableRawBufferPointer(rebasing: $0[slotHeaderSize...])) }
        sealSlot(&slot, generation: generation)
    }

    /// Writes the slot header (magic, generation, length, CRC) over a slot whose map bytes are in place.
    static func sealSlot(_ slot: inout [UInt8], generation: UInt64) {
        slot.replaceSubrange(0 ..< 8, with: slotMagic)
        slot.putLE(generation, at: 8)
        slot.putLE(UInt64(slot.count - slotHeaderSize), at: 16)
        slot.putLE(slotChecksum(slot), at: 24)
        slot.putLE(UInt32(0), at: 28)
    }

    static func slotChecksum(_ slot: [UInt8]) -> UInt32 {
        slot.withUnsafeBytes { raw in
            var c = CRC32C()
            c.update(UnsafeRawBufferPointer(rebasing: raw[0 ..< 24]))
            c.update(UnsafeRawBufferPointer(rebasing: raw[slotHeaderSize...]))
            return c.value
        }
    }

    /// The generation and map of a valid slot, or nil. A slot at the largest generation is not valid:
    /// no store commits 2^64 - 1 times, and the next commit could not number its slot.
    static func decodeSlot(_ slot: [UInt8], geometry: PageGeometry) -> (UInt64, PageStateMap)? {
        guard slot.count == slotLength(geometry), Array(slot[0 ..< 8]) == slotMagic,
              slot.le(UInt64.self, at: 16) == UInt64(slot.count - slotHeaderSize),
              slot.le(UInt64.self, at: 8) < UInt64.max,
              slot.le(UInt32.self, at: 24) == slotChecksum(slot) else { return nil }
        let map = slot.withUnsafeBytes { raw in
            try? PageStateMap(decoding: UnsafeRawBufferPointer(rebasing: raw[slotHeaderSize...]), pageCount: geometry.pageCount)
        }
        guard let map else { return nil }
        return (slot.le(UInt64.self, at: 8), map)
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

    // MARK: file helpers

    static func writeFully(_ fd: Int32, _ bytes: [UInt8], offset: UInt64, what: String) throws {
        try bytes.withUnsafeBytes { try Sys.pwriteAll(fd, $0, offset: offset, what: what) }
    }

    /// Reads up to `buffer.count` bytes at `offset`; returns fewer only at end of file.
    static func readFully(_ fd: Int32, _ buffer: inout [UInt8], offset: UInt64) throws -> Int {
        try buffer.withUnsafeMutableBytes { raw in
            var done = 0
            while done < raw.count {
                let part = UnsafeMutableRawBufferPointer(rebasing: raw[done...])
                guard let n = try Sys.pread(fd, part, offset: offset + UInt64(done), nowait: false) else { continue }
                if n == 0 { break }
                done += n
            }
            return done
        }
    }

    static func exists(_ path: String) throws -> Bool {
        var st = stat()
        if stat(path, &st) == 0 { return true }
        if errno == ENOENT { return false }
        throw SystemError("stat \(path)", errno: errno)
    }

    static func removeIfPresent(_ path: String) throws {
        if Glibc.unlink(path) == 0 || errno == ENOENT { return }
        throw SystemError("remove \(path)", errno: errno)
    }

    /// mkdir -p, syncing the parent of each directory created.
    static func makeDirectories(_ path: String) throws {
        guard !path.isEmpty else { throw PageStoreError.invalidArgument("store directory is empty") }
        var st = stat()
        if stat(path, &st) == 0 {
            guard st.st_mode & S_IFMT == S_IFDIR else {
                throw PageStoreError.invalidArgument("store \(path) exists and is not a directory")
            }
            return
        }
        let trimmed = path.hasSuffix("/") && path.count > 1 ? String(path.dropLast()) : path
        var parent = "."
        if let slash = trimmed.lastIndex(of: "/") {
            parent = slash == trimmed.startIndex ? "/" : String(trimmed[..<slash])
            try makeDirectories(parent)
        }
        if Glibc.mkdir(trimmed, 0o755) != 0 && errno != EEXIST {
            throw SystemError("create directory \(trimmed)", errno: errno)
        }
        try Sys.syncDirectory(parent)
    }
}

// Little-endian field access for the state file's header and slots.
fileprivate extension Array where Element == UInt8 {
    func le<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T {
        guard offset >= 0, offset + MemoryLayout<T>.size <= count else { return 0 }
        return withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }

    mutating func putLE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        guard offset >= 0, offset + MemoryLayout<T>.size <= count else { return }
        withUnsafeMutableBytes { $0.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self) }
    }
}
