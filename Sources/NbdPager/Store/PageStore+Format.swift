import CLinux
#if canImport(Glibc)
import Glibc
#endif

// The page store's on-disk format (the state file's header and its two checksummed slots, see
// `PageStore`) and the file helpers that open and commit use; split from PageStore.swift so that each
// file holds one concern.

extension PageStore {
    // MARK: layout

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
extension Array where Element == UInt8 {
    func le<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T {
        guard offset >= 0, offset + MemoryLayout<T>.size <= count else { return 0 }
        return withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }

    mutating func putLE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        guard offset >= 0, offset + MemoryLayout<T>.size <= count else { return }
        withUnsafeMutableBytes { $0.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self) }
    }
}
