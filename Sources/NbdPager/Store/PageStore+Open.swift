import CLinux
#if canImport(Glibc)
import Glibc
#endif

// Opening a page store: creating a new one, or reopening one and checking that it belongs to this
// source (DESIGN §3). Split from PageStore.swift so that each file holds one concern.

extension PageStore {
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

    fileprivate static func create(directory: String, geometry: PageGeometry, identity: String, lockFD: Int32) throws -> PageStore {
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

    fileprivate static func reopen(directory: String, geometry: PageGeometry, identity: String, lockFD: Int32) throws -> PageStore {
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

}
