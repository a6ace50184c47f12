import NIOConcurrencyHelpers
#if canImport(Glibc)
import Glibc
#endif

/// The slot table of a swap export: which source page each swap slot stands for. It is the
/// `SourceMapping` of swap mode (export page = swap slot → source page), filled while staging is
/// open from the markers the kernel writes out, and only emptied after sealing:
///
///   closed ──open(key)──► open ──seal──► sealed (for good: no marker decodes again)
///
/// While open, a slot written with a valid marker maps to its source page (the export then marks it
/// absent: a READ pulls the page); a slot written with anything else holds data and maps to nothing.
/// After sealing, every write is data and drops the slot's mapping (the kernel reuses freed slots).
///
/// Durability: the table is written to `DIR/slots` (whole file, then rename) whenever it changed,
/// before the page state commits (`commit()`, called by the lazy export). After sealing the table in
/// the file is the one sealed, for good: a slot the kernel overwrote is only marked overwritten in
/// memory, and after a restart it is `local` in the page state, which wins over its mapping in the
/// file (the export unmaps it again), so it is served from the store, never from the source.
public final class SwapSlots: SourceMapping, @unchecked Sendable {
    public enum Staging: String, Sendable, Codable { case closed, open, sealed }

    /// Counts for status and the stager's checks.
    public struct Counts: Sendable, Equatable {
        public var staging: Staging
        /// Slots mapped to a source page now.
        public var mapped: UInt64
        /// Slots mapped when staging was sealed (0 before).
        public var stagedAtSeal: UInt64
        /// Markers decoded while staging was open (a slot written twice counts twice). After a restart:
        /// the mapped slots plus the duplicates (the markers themselves are not kept).
        public var markersDecoded: UInt64
        /// Markers naming a source page whose newest earlier marker's slot still stood for it (a
        /// staged page pushed out twice). After a restart, the count of the sealed table.
        public var duplicates: UInt64
        /// Slots that began with the marker magic but did not authenticate (stored as data).
        public var invalidMarkers: UInt64
    }

    public let slotCount: UInt64
    public let sourcePages: UInt64
    public let pageSize: UInt64
    let path: String

    private let lock = NIOLock()
    /// Per slot: source page + 1, 0 = unmapped.
    private var slotToPage: [UInt32]
    /// Per source page: slot + 1 of the newest marker naming it, 0 = none.
    private var pageToSlot: [UInt32]
    private var staging: Staging
    /// After sealing: slots the kernel overwrote (their mapping is gone, the sealed table keeps it).
    private var overwritten: [UInt64] = []
    private var key: StagingMarker.Key?
    private var mapped: UInt64 = 0
    private var stagedAtSeal: UInt64 = 0
    private var markersDecoded: UInt64 = 0
    private var duplicates: UInt64 = 0
    private var invalidMarkers: UInt64 = 0
    private var dirty = false
    /// The RAM file staging filled (for the late-page copy at gate open); not persisted.
    private var ramFile: String?
    /// Serializes writes of the table file.
    private let fileLock = NIOLock()

    static let magic = Array("UMEMSWPT".utf8)
    static let version: UInt32 = 1
    /// Fixed fields, then the RAM file's path (at most `maxPathBytes`), then the table.
    static let fieldsSize = 72
    static let maxPathBytes = 4096
    static let headerSize = fieldsSize + maxPathBytes

    /// Opens (or starts) the slot table of the store in `directory`.
    public init(directory: String, slotCount: UInt64, sourceSize: UInt64, pageSize: UInt64) throws {
        guard sourceSize % pageSize == 0 else {
            throw PageStoreError.invalidArgument("a swap export needs a source whose size is a multiple of \(pageSize) bytes; it has \(sourceSize)")
        }
        guard slotCount < UInt64(UInt32.max), sourceSize / pageSize < UInt64(UInt32.max) else {
            throw PageStoreError.invalidArgument("a swap export holds at most \(UInt32.max - 1) slots and source pages")
        }
        self.slotCount = slotCount
        self.sourcePages = sourceSize / pageSize
        self.pageSize = pageSize
        self.path = directory + "/slots"
        slotToPage = [UInt32](repeating: 0, count: Int(slotCount))
        pageToSlot = [UInt32](repeating: 0, count: Int(sourcePages))
        staging = .closed
        try load()
    }

    // MARK: staging

    public var stagingState: Staging { lock.withLock { staging } }

    /// Opens staging with a fresh key and returns it, with the slots an earlier, unsealed staging run
    /// had mapped (they are dropped: that run's RAM file is gone; the caller makes them zero).
    /// `ramFile` is the file being staged (copied into at gate open when source pages that were zero
    /// no longer are).
    public func open(ramFile: String?) throws -> (key: StagingMarker.Key, dropped: [Range<UInt64>]) {
        try lock.withLock {
            guard staging != .sealed else {
                throw ControlError("staging of this swap export was sealed; it never decodes markers again (start over with --reset-store)")
            }
            var dropped: [Range<UInt64>] = []
            for slot in 0 ..< slotCount where slotToPage[Int(slot)] != 0 {
                if let last = dropped.last, last.upperBound == slot {
                    dropped[dropped.count - 1] = last.lowerBound ..< slot + 1
                } else {
                    dropped.append(slot ..< slot + 1)
                }
                slotToPage[Int(slot)] = 0
            }
            for i in pageToSlot.indices { pageToSlot[i] = 0 }
            mapped = 0
            markersDecoded = 0
            duplicates = 0
            invalidMarkers = 0
            let k = StagingMarker.Key.random()
            key = k
            staging = .open
            self.ramFile = (ramFile?.isEmpty ?? true) ? nil : ramFile
            dirty = true
            return (k, dropped)
        }
    }

    /// The key while staging is open.
    public var openKey: StagingMarker.Key? { lock.withLock { staging == .open ? key : nil } }

    /// Ends staging for good; the table is written at the next commit.
    public func seal() throws -> Counts {
        try lock.withLock {
            guard staging == .open else {
                throw ControlError(staging == .sealed ? "staging is already sealed" : "staging is not open")
            }
            staging = .sealed
            key = nil
            stagedAtSeal = mapped
            recordStagedSetLocked()
            dirty = true
            return countsLocked()
        }
    }

    public var stagedRAMFile: String? { lock.withLock { ramFile } }

    /// Forgets the staged RAM file once its late pages were copied (the switch-over): a gate opened
    /// again after a restart must not copy into a file the running guest owns. Durable at the next
    /// commit.
    public func forgetRAMFile() {
        lock.withLock {
            guard ramFile != nil else { return }
            ramFile = nil
            dirty = true
        }
    }

    /// Decodes one 4 KiB slot of a WRITE while staging is open; nil when staging is not open.
    public func decode(_ slot: UnsafeRawBufferPointer) -> StagingMarker.Decoded? {
        guard let key = openKey else { return nil }
        let d = StagingMarker.decode(slot, key: key)
        if case .marker(let page) = d, page >= sourcePages {
            lock.withLock { invalidMarkers += 1 }
            return .invalid
        }
        if d == .invalid { lock.withLock { invalidMarkers += 1 } }
        return d
    }

    /// Records `slot → page` (staging only). False when staging is not open any more (sealed
    /// between decoding and mapping): the slot is then data.
    @discardableResult
    public func map(slot: UInt64, toPage page: UInt64) -> Bool {
        lock.withLock {
            guard staging == .open, slot < slotCount, page < sourcePages else { return false }
            unmapLocked(slot)
            let other = pageToSlot[Int(page)]
            if other != 0 && UInt64(other) - 1 != slot && slotToPage[Int(other) - 1] == UInt32(page + 1) {
                if duplicates < .max { duplicates += 1 }   // a loaded count may be anything
            }
            slotToPage[Int(slot)] = UInt32(page + 1)
            pageToSlot[Int(page)] = UInt32(slot + 1)
            mapped += 1
            if markersDecoded < .max { markersDecoded += 1 }
            dirty = true
            return true
        }
    }

    /// Drops the mappings of `slots` (they now hold data, or nothing).
    public func unmap(_ slots: Range<UInt64>) {
        lock.withLock {
            let range = slots.clamped(to: 0 ..< slotCount)
            for slot in range { unmapLocked(slot) }
        }
    }

    private func unmapLocked(_ slot: UInt64) {
        let entry = slotToPage[Int(slot)]
        guard entry != 0, !isOverwrittenLocked(slot) else { return }
        mapped -= 1
        if staging == .sealed {
            // The sealed table stays as it was (the file is not rewritten); the slot's `local` state
            // overrides its entry after a restart.
            if overwritten.isEmpty { overwritten = [UInt64](repeating: 0, count: Int((slotCount + 63) / 64)) }
            overwritten[Int(slot / 64)] |= 1 << (slot % 64)
            return
        }
        slotToPage[Int(slot)] = 0
        if pageToSlot[Int(entry) - 1] == UInt32(slot + 1) { pageToSlot[Int(entry) - 1] = 0 }
        dirty = true
    }

    private func isOverwrittenLocked(_ slot: UInt64) -> Bool {
        let w = Int(slot / 64)
        return w < overwritten.count && overwritten[w] & (1 << (slot % 64)) != 0
    }

    /// The entry of `slot` as it stands now (0: unmapped or overwritten).
    private func entryLocked(_ slot: UInt64) -> UInt32 {
        guard slot < slotCount, !isOverwrittenLocked(slot) else { return 0 }
        return slotToPage[Int(slot)]
    }

    public func counts() -> Counts { lock.withLock { countsLocked() } }

    private func countsLocked() -> Counts {
        Counts(staging: staging, mapped: mapped, stagedAtSeal: stagedAtSeal, markersDecoded: markersDecoded,
               duplicates: duplicates, invalidMarkers: invalidMarkers)
    }

    /// The source page `slot` stands for.
    public func page(ofSlot slot: UInt64) -> UInt64? {
        lock.withLock {
            let e = entryLocked(slot)
            return e == 0 ? nil : UInt64(e) - 1
        }
    }

    /// Source pages no slot stood for when staging was sealed, as runs (the pages staging left as
    /// holes in the RAM file: zero then). Empty before sealing.
    public func unstagedPages() -> [Range<UInt64>] {
        lock.withLock {
            guard staging == .sealed else { return [] }
            var out: [Range<UInt64>] = []
            var start: UInt64? = nil
            for p in 0 ..< sourcePages {
                let staged = stagedSetLocked(p)
                if !staged, start == nil { start = p }
                if staged, let s = start { out.append(s ..< p); start = nil }
            }
            if let s = start { out.append(s ..< sourcePages) }
            return out
        }
    }

    /// Source pages mapped at seal time (a page whose slot the kernel reused was still staged).
    private var stagedSet: [UInt64] = []

    private func stagedSetLocked(_ page: UInt64) -> Bool {
        let w = Int(page / 64)
        return w < stagedSet.count && stagedSet[w] & (1 << (page % 64)) != 0
    }

    private func recordStagedSetLocked() {
        stagedSet = [UInt64](repeating: 0, count: Int((sourcePages + 63) / 64))
        for e in slotToPage where e != 0 {
            let p = UInt64(e) - 1
            stagedSet[Int(p / 64)] |= 1 << (p % 64)
        }
    }

    // MARK: SourceMapping

    public func sourceRuns(of pages: Range<UInt64>, geometry: PageGeometry) -> [SourceRun] {
        lock.withLock {
            var runs: [SourceRun] = []
            for slot in pages {
                let e = entryLocked(slot)
                let offset: UInt64? = e == 0 ? nil : (UInt64(e) - 1) * pageSize
                if var last = runs.last, last.pages.upperBound == slot {
                    let contiguous: Bool
                    switch (last.sourceOffset, offset) {
                    case (nil, nil): contiguous = true
                    case let (a?, b?): contiguous = a + UInt64(last.pages.count) * pageSize == b
                    default: contiguous = false
                    }
                    if contiguous {
                        last.pages = last.pages.lowerBound ..< slot + 1
                        runs[runs.count - 1] = last
                        continue
                    }
                }
                runs.append(SourceRun(pages: slot ..< slot + 1, sourceOffset: offset))
            }
            return runs
        }
    }

    public func exportPages(inside sourceBytes: Range<UInt64>, geometry: PageGeometry) -> [Range<UInt64>] {
        lock.withLock {
            let first = (sourceBytes.lowerBound + pageSize - 1) / pageSize
            let last = min(sourceBytes.upperBound / pageSize, sourcePages)
            guard first < last else { return [] }
            var out: [Range<UInt64>] = []
            for p in first ..< last {
                let s = pageToSlot[Int(p)]
                guard s != 0, entryLocked(UInt64(s) - 1) == UInt32(p + 1) else { continue }
                let slot = UInt64(s) - 1
                if let r = out.last, r.upperBound == slot {
                    out[out.count - 1] = r.lowerBound ..< slot + 1
                } else {
                    out.append(slot ..< slot + 1)
                }
            }
            return out
        }
    }

    public func sourceSpan(geometry: PageGeometry, sourceSize: UInt64) -> Range<UInt64> {
        0 ..< min(sourceSize, sourcePages * pageSize)
    }

    // MARK: persistence

    /// Writes the table if it changed since the last write (tmp file, fdatasync, rename, directory sync).
    public func commit() throws {
        try fileLock.withLock {
            let bytes: [UInt8]? = lock.withLock {
                guard dirty else { return nil }
                dirty = false
                return encodeLocked()
            }
            guard let bytes else { return }
            do {
                let tmp = path + ".tmp"
                let fd = try Sys.open(tmp, flags: O_RDWR | O_CREAT | O_TRUNC, operation: "create \(tmp)")
                defer { _ = Glibc.close(fd) }
                try PageStore.writeFully(fd, bytes, offset: 0, what: tmp)
                try Sys.fdatasync(fd)
                guard Glibc.rename(tmp, path) == 0 else { throw SystemError("rename \(tmp)", errno: errno) }
                let dir = String(path[..<(path.lastIndex(of: "/") ?? path.endIndex)])
                try Sys.syncDirectory(dir.isEmpty ? "." : dir)
            } catch {
                lock.withLock { dirty = true }
                throw error
            }
        }
    }

    private func encodeLocked() -> [UInt8] {
        var out = [UInt8](repeating: 0, count: Self.headerSize + Int(slotCount) * 4)
        out.replaceSubrange(0 ..< 8, with: Self.magic)
        out.putLE(Self.version, at: 8)
        // An interrupted staging restarts closed: its key is gone.
        out.putLE(UInt32(staging == .sealed ? 2 : 0), at: 12)
        out.putLE(slotCount, at: 16)
        out.putLE(sourcePages, at: 24)
        out.putLE(pageSize, at: 32)
        out.putLE(stagedAtSeal, at: 40)
        out.putLE(duplicates, at: 48)
        let pathBytes = Array((ramFile ?? "").utf8.prefix(Self.maxPathBytes))
        out.putLE(UInt32(pathBytes.count), at: 56)
        out.replaceSubrange(Self.fieldsSize ..< Self.fieldsSize + pathBytes.count, with: pathBytes)
        out.withUnsafeMutableBytes { raw in
            for (i, e) in slotToPage.enumerated() {
                raw.storeBytes(of: e.littleEndian, toByteOffset: Self.headerSize + i * 4, as: UInt32.self)
            }
        }
        let crc = out.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[Self.fieldsSize...])) }
        out.putLE(crc, at: 60)
        let headerCRC = out.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0 ..< 64])) }
        out.putLE(headerCRC, at: 64)
        return out
    }

    private func load() throws {
        let fd = Glibc.open(path, O_RDONLY)
        if fd < 0 {
            if errno == ENOENT { return }
            throw SystemError("open \(path)", errno: errno)
        }
        defer { _ = Glibc.close(fd) }
        let discard = "; use --reset-store to discard it"
        var bytes = [UInt8](repeating: 0, count: Self.headerSize + Int(slotCount) * 4)
        let got = try PageStore.readFully(fd, &bytes, offset: 0)
        guard got >= Self.fieldsSize, Array(bytes[0 ..< 8]) == Self.magic,
              bytes.le(UInt32.self, at: 8) == Self.version,
              bytes.withUnsafeBytes({ CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0 ..< 64])) }) == bytes.le(UInt32.self, at: 64)
        else { throw PageStoreError.corrupt("\(path) is not a valid slot table\(discard)") }
        guard bytes.le(UInt64.self, at: 16) == slotCount, bytes.le(UInt64.self, at: 24) == sourcePages,
              bytes.le(UInt64.self, at: 32) == pageSize else {
            throw PageStoreError.mismatch("\(path) was written for another swap size or source\(discard)")
        }
        guard got == bytes.count,
              bytes.withUnsafeBytes({ CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[Self.fieldsSize...])) }) == bytes.le(UInt32.self, at: 60),
              Int(bytes.le(UInt32.self, at: 56)) <= Self.maxPathBytes
        else { throw PageStoreError.corrupt("\(path): the slot table is damaged\(discard)") }
        let pathLength = Int(bytes.le(UInt32.self, at: 56))
        ramFile = pathLength == 0 ? nil : String(decoding: bytes[Self.fieldsSize ..< Self.fieldsSize + pathLength], as: UTF8.self)
        staging = bytes.le(UInt32.self, at: 12) == 2 ? .sealed : .closed
        stagedAtSeal = bytes.le(UInt64.self, at: 40)
        duplicates = bytes.le(UInt64.self, at: 48)
        bytes.withUnsafeBytes { raw in
            for i in 0 ..< Int(slotCount) {
                let e = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: Self.headerSize + i * 4, as: UInt32.self))
                guard e != 0, UInt64(e) <= sourcePages else { continue }
                slotToPage[i] = e
                pageToSlot[Int(e) - 1] = UInt32(i + 1)
                mapped += 1
            }
        }
        // The duplicate count comes from the file: a sum past UInt64.max stays at the maximum rather
        // than trapping.
        let (markers, overflow) = mapped.addingReportingOverflow(duplicates)
        markersDecoded = overflow ? .max : markers
        if staging == .sealed { recordStagedSetLocked() }
    }

}
