// Fuzzes opening a page store whose `state` file (header, slot A, slot B) and `data` file come from the
// input, through the public PageStore.open: a damaged or foreign store must be refused with a
// PageStoreError naming what is wrong, never crash. A store that opens must be consistent, and survive
// marks, a commit and a reopen.
//
// Input (every field little-endian; short inputs read as zeros):
//   byte 0  fix-ups, so that checksums and layout need not be guessed:
//           0x01 header magic, version, header size and checksum    0x02 slot A magic, length, checksum
//           0x04 slot B magic, length, checksum                     0x08 header describes the export
//                (page size, size, page count, slot stride, identity)
//           0x10 open with the geometry and identity the header records (when small enough)
//           0x20 no data file      0x40 data file one page too long  0x80 state file not padded
//   byte 1  pages to mark after a successful open
//   u16     header length (the header area is 8 KiB), then the header bytes
//   u16     slot A length, then slot A bytes; the rest is slot B
// Set NBD_FUZZ_STORE_DIR to choose where the store directory goes (default /dev/shm, else /tmp).
import FuzzSupport
import NbdPager
#if canImport(Glibc)
import Glibc
#endif

let headerSize = 8192
let defaultSize: UInt64 = 64 * 4096 + 1000  // a partial last page: 65 pages
let defaultPageSize: UInt64 = 4096
let defaultIdentity = "nbd+unix:///disk?socket=/run/source.sock"

/// One store directory per process.
let storeDirectory = scratchDirectory("nbd-umemd-fuzz-store", removing: ["state", "state.tmp", "data", "lock"])

/// The geometry and identity to open with.
struct Wanted {
    var size = defaultSize
    var pageSize = defaultPageSize
    var identity = defaultIdentity
    var geometry: PageGeometry { try! PageGeometry(exportSize: size, pageSize: pageSize) }
}

func slotLength(_ g: PageGeometry) -> Int { 32 + PageStateMap.encodedByteCount(pageCount: g.pageCount) }
func slotStride(_ g: PageGeometry) -> Int { (slotLength(g) + 4095) / 4096 * 4096 }

func sealSlot(_ slot: inout [UInt8], length: Int) {
    if slot.count < length { slot += [UInt8](repeating: 0, count: length - slot.count) }
    if slot.count > length { slot.removeLast(slot.count - length) }
    slot.replaceSubrange(0 ..< 8, with: Array("UMEMSLOT".utf8))
    putLE(&slot, 16, UInt64(length - 32))
    var c = CRC32C()
    c.update(slot[0 ..< 24])
    c.update(slot[32...])
    putLE(&slot, 24, c.value)
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzPageStore(_ data: UnsafeRawPointer?, _ size: Int) -> CInt {
    var input = FuzzInput(UnsafeRawBufferPointer(start: data, count: size))
    let fix = input.byte()
    let marks = input.byte()
    var header = Array(input.bytes(upTo: min(Int(input.integer(UInt16.self)), headerSize)))
    var slotA = Array(input.bytes(upTo: Int(input.integer(UInt16.self))))
    var slotB = Array(input.rest())
    let padded = fix & 0x80 == 0
    if padded || fix & 0x09 != 0 { header += [UInt8](repeating: 0, count: headerSize - header.count) }

    // What to open with: the defaults, or what the header records.
    var wanted = Wanted()
    if fix & 0x10 != 0 {
        let pageSize = le(header, 16, UInt64.self), size = le(header, 24, UInt64.self)
        let identityLength = Int(le(header, 48, UInt32.self))
        if pageSize >= 512, pageSize <= 1 << 20, pageSize & (pageSize - 1) == 0, size <= 1 << 30,
           size / pageSize < 1 << 16, identityLength <= 4096, 56 + identityLength <= header.count,
           let identity = String(validating: header[56 ..< 56 + identityLength], as: UTF8.self) {
            wanted = Wanted(size: size, pageSize: pageSize, identity: identity)
        }
    }
    let geometry = wanted.geometry
    if fix & 0x08 != 0 {
        putLE(&header, 16, wanted.pageSize)
        putLE(&header, 24, wanted.size)
        putLE(&header, 32, geometry.pageCount)
        putLE(&header, 40, UInt64(slotStride(geometry)))
        let id = Array(wanted.identity.utf8)
        putLE(&header, 48, UInt32(id.count))
        header.replaceSubrange(56 ..< 56 + id.count, with: id)
    }
    if fix & 0x01 != 0 {
        header.replaceSubrange(0 ..< 8, with: Array("NBDUMEMD".utf8))
        putLE(&header, 8, UInt32(1))
        putLE(&header, 12, UInt32(headerSize))
        putLE(&header, headerSize - 4, CRC32C.checksum(header[0 ..< headerSize - 4]))
    }
    if fix & 0x02 != 0 { sealSlot(&slotA, length: slotLength(geometry)) }
    if fix & 0x04 != 0 { sealSlot(&slotB, length: slotLength(geometry)) }
    var state = header
    if padded { slotA += [UInt8](repeating: 0, count: max(0, slotStride(geometry) - slotA.count)) }
    state += slotA
    state += slotB

    let dir = storeDirectory
    writeFile(dir + "/state", state)
    unlink(dir + "/data")
    if fix & 0x20 == 0 {
        writeFile(dir + "/data", [])
        truncate(dir + "/data", off_t(wanted.size + (fix & 0x40 != 0 ? wanted.pageSize : 0)))
    }
    openAndCheck(wanted, geometry: geometry, marks: marks)
    return 0
}

func openAndCheck(_ wanted: Wanted, geometry: PageGeometry, marks: UInt8) {
    let dir = storeDirectory
    let store: PageStore
    do {
        store = try PageStore.open(directory: dir, size: wanted.size, pageSize: wanted.pageSize,
                                   identity: wanted.identity, reset: false)
    } catch let error as PageStoreError {
        switch error {
        case .corrupt(let m), .mismatch(let m):
            require(m.contains(dir) && m.contains("--reset-store"), "unclear message: \(m)")
        default:
            require(false, "a damaged store gave \(error)")
        }
        return
    } catch {
        require(false, "a damaged store gave a \(type(of: error)): \(error)")
        return
    }

    // The store opened: it must hold together.
    let snapshot = store.snapshot()
    require(snapshot.pageCount == geometry.pageCount, "page count \(snapshot.pageCount), expected \(geometry.pageCount)")
    require(snapshot.absent + snapshot.present + snapshot.local == snapshot.pageCount, "counts do not add up")
    require(!snapshot.dirty, "a freshly opened store is dirty")
    let map = store.currentMap()
    require(map.pageCount == geometry.pageCount, "map of \(map.pageCount) pages")

    // Mark, commit, reopen: the committed map comes back with the next generation.
    if marks != 0, geometry.pageCount > 0 {
        let first = UInt64(marks) % geometry.pageCount
        store.mark(first ..< min(geometry.pageCount, first + UInt64(marks >> 4) + 1), marks & 1 == 0 ? .present : .local)
    }
    let expected = store.currentMap()
    let generation = snapshot.generation
    do {
        try store.close()
    } catch {
        // A store whose generation cannot grow must say so, not crash.
        require(error is PageStoreError, "commit gave a \(type(of: error)): \(error)")
        return
    }
    do {
        let again = try PageStore.open(directory: dir, size: wanted.size, pageSize: wanted.pageSize,
                                       identity: wanted.identity, reset: false)
        require(again.currentMap() == expected, "the committed map did not come back")
        let g = again.snapshot().generation
        require(g == generation || g == generation &+ 1, "generation \(generation) became \(g)")
        try again.close()
    } catch {
        require(false, "reopening a store just closed failed: \(error)")
    }
}
