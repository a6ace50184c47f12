// Fuzzes a swap export's slot table (SwapSlots) and the staging marker (StagingMarker), through their
// public API, in three parts that every input runs:
//   1. Opening a store's `slots` file whose bytes come from the input (64 slots, a 32-page source,
//      4 KiB pages): a damaged or foreign file must be refused with a PageStoreError naming the file
//      and --reset-store, exactly when an independent reading of the layout says so; a file that opens
//      must load what it holds (pages inside the source, counts, the unstaged runs, the RAM file's
//      path) and come back the same after commit() and a reopen. When it does not open, the rest runs
//      on a fresh table.
//   2. StagingMarker.decode of markers built under an input-chosen key and then cut, lengthened,
//      overwritten or flipped: `.marker(page)` only for the exact bytes of StagingMarker.bytes(page:key:),
//      and the same answer as a reference decoder (its own SipHash-2-4) for every length.
//   3. Staging sequences on the table: open (with a RAM file path), slots written as the swap export
//      writes them while staging is open (decode, then map on a marker), direct maps, unmaps, seal,
//      commit and reopen, checked after every step against a model of the table: the mappings, the
//      counts (mapped, markers decoded, duplicates never more than markers decoded, invalid markers),
//      the dropped runs of open, the unstaged runs after seal, sourceRuns and exportPages, `open` and
//      `seal` refused in the wrong state, and what a reopen brings back from the last commit.
//
// Input (every field little-endian; short inputs read as zeros):
//   byte 0  fix-ups of the slots file, so that the layout and checksums need not be guessed:
//           0x01 magic and version      0x02 geometry (slot count, source pages, page size)
//           0x04 table entries taken modulo source pages + 1 (so that most slots map)
//           0x08 RAM file path length taken modulo 4097       0x10 file padded or cut to 4424 bytes
//           0x20 body checksum           0x40 header checksum (applied last)   0x80 no slots file
//           (0x01, 0x02, 0x08 and 0x40 first pad a file shorter than the fixed fields)
//   u16     slots file length, then the file bytes (the file is 72 bytes of fields, a 4096-byte path
//           area, then 4 bytes per slot: 4424 bytes)
//   rest    operations until the input ends (at most 512), each an op byte (low 3 bits the operation,
//           high bits its flags) and its arguments; after the last, sourceRuns and exportPages over the
//           whole table, then a commit and a reopen:
//           0 open staging: u16 path length (mod 4200), u8 n, n bytes repeated to that length
//             (op bit 3: no path)
//           1 write a slot: u8 slot, u8 page (each mod its count + 4), marker edits (below); decoded
//             as the swap export decodes a WRITE's slot: mapped when it is a marker, else (and always
//             when staging is not open) the slot's mapping dropped
//           2 map: u8 slot, u8 page (each mod its count + 4); only while staging is open (its contract)
//           3 unmap: u8, u8 (the slot range between them, up to the slot count + 8)
//           4 seal     5 commit and reopen
//           6 decode: u64 k0, u64 k1, u64 page, marker edits; StagingMarker.decode under that key
//           7 scans: u16, u16 (slots for sourceRuns, mod the slot count + 4), u16, u16 (source byte
//             offsets / 16 for exportPages, mod 34 pages)
//   marker edits: u8 e, then per bit set, in this order, its arguments (offsets modulo the length):
//           bits 0-1 length: 0 4096, 1 u16 mod 4096, 2 4097 + u8, 3 u16 mod 8193
//           0x04 u16 offset, u8 n, n bytes written there      0x08 u16 offset, u8 xored there
//           0x10 u8 bit: the marker is built under another key (k1 with that bit flipped)
//           0x20 u64 page: the marker names this page instead    0x40 all zero bytes instead
// Set NBD_FUZZ_STORE_DIR to choose where the store directory goes (default /dev/shm, else /tmp).
import FuzzSupport
import NbdPager
#if canImport(Glibc)
import Glibc
#endif

let slotCount: UInt64 = 64
let sourcePages: UInt64 = 32
let pageSize: UInt64 = 4096
let markerSize = StagingMarker.size
// The slots file's layout (SwapSlots.encodeLocked): fixed fields, the path area, the table.
let fieldsSize = 72
let maxPathBytes = 4096
let headerSize = fieldsSize + maxPathBytes
let fileSize = headerSize + Int(slotCount) * 4
let magic = Array("UMEMSWPT".utf8)
let markerMagic = Array("UMEMSTG1".utf8)

/// One store directory per process.
let storeDirectory = scratchDirectory("nbd-umemd-fuzz-slots", removing: ["slots", "slots.tmp"])
let slotsPath = storeDirectory + "/slots"

func openSlots() throws -> SwapSlots {
    try SwapSlots(directory: storeDirectory, slotCount: slotCount, sourceSize: sourcePages * pageSize, pageSize: pageSize)
}

/// Byte arrays compared with memcmp (an element-wise `==` on 4 KiB is slow under coverage tracing).
func same(_ a: [UInt8], _ b: ArraySlice<UInt8>) -> Bool {
    guard a.count == b.count else { return false }
    guard !a.isEmpty else { return true }
    return a.withUnsafeBytes { x in b.withUnsafeBytes { y in memcmp(x.baseAddress!, y.baseAddress!, a.count) == 0 } }
}

func same(_ a: [UInt8], _ b: [UInt8]) -> Bool { same(a, b[...]) }

/// The zero bytes after a marker's 24-byte header.
let zeroTail = [UInt8](repeating: 0, count: markerSize - 24)

// MARK: reference marker

/// SipHash-2-4 of `message` (the reference the marker's tag is checked against).
func sipHash24(k0: UInt64, k1: UInt64, _ message: [UInt8]) -> UInt64 {
    func rotl(_ x: UInt64, _ b: UInt64) -> UInt64 { (x << b) | (x >> (64 - b)) }
    var v0 = k0 ^ 0x736f_6d65_7073_6575, v1 = k1 ^ 0x646f_7261_6e64_6f6d
    var v2 = k0 ^ 0x6c79_6765_6e65_7261, v3 = k1 ^ 0x7465_6462_7974_6573
    func sipRound() {
        v0 = v0 &+ v1; v2 = v2 &+ v3; v1 = rotl(v1, 13); v3 = rotl(v3, 16)
        v1 ^= v0; v3 ^= v2; v0 = rotl(v0, 32)
        v2 = v2 &+ v1; v0 = v0 &+ v3; v1 = rotl(v1, 17); v3 = rotl(v3, 21)
        v1 ^= v2; v3 ^= v0; v2 = rotl(v2, 32)
    }
    var padded = message + [UInt8](repeating: 0, count: 7 - message.count % 8)
    padded.append(UInt8(truncatingIfNeeded: message.count))
    for block in stride(from: 0, to: padded.count, by: 8) {
        let m = le(padded, block, UInt64.self)
        v3 ^= m
        sipRound(); sipRound()
        v0 ^= m
    }
    v2 ^= 0xff
    for _ in 0 ..< 4 { sipRound() }
    return v0 ^ v1 ^ v2 ^ v3
}

/// The published test vector (key 00..0f, message 00..0e): a wrong reference would hide a wrong tag.
let referenceChecked: Bool = {
    let h = sipHash24(k0: 0x0706_0504_0302_0100, k1: 0x0f0e_0d0c_0b0a_0908, (0 ..< 15).map { UInt8($0) })
    require(h == 0xa129_ca61_49be_45e5, "the reference SipHash-2-4 gives \(String(h, radix: 16))")
    return true
}()

func referenceMarker(page: UInt64, key: StagingMarker.Key) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: markerSize)
    out.replaceSubrange(0 ..< 8, with: markerMagic)
    putLE(&out, 8, page)
    putLE(&out, 16, sipHash24(k0: key.k0, k1: key.k1, Array(out[0 ..< 16])))
    return out
}

func referenceDecode(_ bytes: [UInt8], key: StagingMarker.Key) -> StagingMarker.Decoded {
    guard bytes.count >= 8, Array(bytes[0 ..< 8]) == markerMagic else { return .data }
    guard bytes.count == markerSize else { return .invalid }
    let page = le(bytes, 8, UInt64.self)
    guard le(bytes, 16, UInt64.self) == sipHash24(k0: key.k0, k1: key.k1, Array(bytes[0 ..< 16])),
          same(zeroTail, bytes[24...]) else { return .invalid }
    return .marker(page: page)
}

/// A marker of `page` under `key`, then the input's edits. Returns the bytes and the page named.
func editedMarker(_ input: inout FuzzInput, page: UInt64, key: StagingMarker.Key) -> [UInt8] {
    let e = input.byte()
    let length: Int
    switch e & 3 {
    case 0: length = markerSize
    case 1: length = Int(input.integer(UInt16.self)) % markerSize
    case 2: length = markerSize + 1 + Int(input.byte())
    default: length = Int(input.integer(UInt16.self)) % (2 * markerSize + 1)
    }
    var offsetWrite: (Int, [UInt8])?
    var offsetXor: (Int, UInt8)?
    if e & 0x04 != 0 {
        let at = Int(input.integer(UInt16.self))
        offsetWrite = (at, Array(input.bytes(upTo: Int(input.byte()))))
    }
    if e & 0x08 != 0 { offsetXor = (Int(input.integer(UInt16.self)), input.byte()) }
    var markerKey = key
    if e & 0x10 != 0 { markerKey.k1 ^= 1 << (UInt64(input.byte()) % 64) }
    var markerPage = page
    if e & 0x20 != 0 { markerPage = input.integer(UInt64.self) }

    let marker = StagingMarker.bytes(page: markerPage, key: markerKey)
    require(same(marker, referenceMarker(page: markerPage, key: markerKey)), "StagingMarker.bytes(page: \(markerPage)) differs from the reference")
    var bytes = e & 0x40 != 0 ? [UInt8](repeating: 0, count: markerSize) : marker
    if length < bytes.count { bytes.removeLast(bytes.count - length) }
    if length > bytes.count { bytes += [UInt8](repeating: 0, count: length - bytes.count) }
    if let (at, data) = offsetWrite, !bytes.isEmpty {
        let start = at % bytes.count
        for (i, b) in data.enumerated() where start + i < bytes.count { bytes[start + i] = b }
    }
    if let (at, x) = offsetXor, !bytes.isEmpty { bytes[at % bytes.count] ^= x }
    return bytes
}

/// Checks StagingMarker.decode of `bytes` under `key` against the reference; returns its answer.
func checkDecode(_ bytes: [UInt8], key: StagingMarker.Key) -> StagingMarker.Decoded {
    let d = bytes.withUnsafeBytes { StagingMarker.decode($0, key: key) }
    require(d == referenceDecode(bytes, key: key), "decode of \(bytes.count) bytes gave \(d), the reference \(referenceDecode(bytes, key: key))")
    if case .marker(let page) = d {
        require(same(bytes, StagingMarker.bytes(page: page, key: key)), "decoded a marker of page \(page) from other bytes")
    }
    return d
}

// MARK: the model of a table

struct Model {
    /// Per slot, the source page it stands for.
    var slotToPage = [UInt64?](repeating: nil, count: Int(slotCount))
    /// Per source page, the slot of the newest marker naming it (SwapSlots' notion of duplicates and
    /// of exportPages).
    var newest = [UInt64?](repeating: nil, count: Int(sourcePages))
    var staging = SwapSlots.Staging.closed
    var key: StagingMarker.Key?
    var stagedAtSeal: UInt64 = 0
    var markersDecoded: UInt64 = 0
    var duplicates: UInt64 = 0
    /// Markers naming a page any other slot stood for (the definition in SwapSlots.Counts).
    var duplicatesAnySlot: UInt64 = 0
    var invalidMarkers: UInt64 = 0
    /// Pages mapped when staging was sealed.
    var staged = [Bool](repeating: false, count: Int(sourcePages))
    var ramFile: String?
    /// The table as sealed (what the file holds from the seal on).
    var sealTable: [UInt64?]?
    /// Changed since the last commit (SwapSlots writes the file only then).
    var dirty = false
    /// Duplicates counted before the table was loaded (a reopen keeps the count, not the markers).
    var loadedDuplicates = false

    var mapped: UInt64 { UInt64(slotToPage.lazy.filter { $0 != nil }.count) }

    mutating func unmap(_ slot: Int) {
        guard slotToPage[slot] != nil else { return }
        slotToPage[slot] = nil
        if staging != .sealed { dirty = true }
    }

    mutating func map(slot: UInt64, page: UInt64) {
        guard slot < slotCount, page < sourcePages else { return }
        unmap(Int(slot))
        if let other = newest[Int(page)], other != slot, slotToPage[Int(other)] == page, duplicates < .max { duplicates += 1 }
        if slotToPage.indices.contains(where: { $0 != Int(slot) && slotToPage[$0] == page }) { duplicatesAnySlot += 1 }
        slotToPage[Int(slot)] = page
        newest[Int(page)] = slot
        if markersDecoded < .max { markersDecoded += 1 }
        dirty = true
    }

    /// The table as SwapSlots loads it: mappings of the file (the highest slot newest per page), the
    /// staged set recomputed from them when sealed.
    mutating func reloaded() {
        newest = [UInt64?](repeating: nil, count: Int(sourcePages))
        for (slot, page) in slotToPage.enumerated() { if let page { newest[Int(page)] = UInt64(slot) } }
        if staging == .open { staging = .closed }
        key = nil
        let (markers, overflow) = mapped.addingReportingOverflow(duplicates)   // as SwapSlots.load
        markersDecoded = overflow ? .max : markers
        invalidMarkers = 0
        duplicatesAnySlot = 0
        loadedDuplicates = duplicates > 0
        staged = [Bool](repeating: false, count: Int(sourcePages))
        if staging == .sealed { for case let page? in slotToPage { staged[Int(page)] = true } }
        sealTable = staging == .sealed ? slotToPage : nil
        dirty = false
    }
}

/// The RAM file path a reload gives back for `path` as written (at most 4096 bytes of it; empty is none).
func persistedPath(_ path: String?) -> String? {
    let bytes = Array((path ?? "").utf8.prefix(maxPathBytes))
    return bytes.isEmpty ? nil : String(decoding: bytes, as: UTF8.self)
}

/// A path for a message: its length and start.
func describe(_ path: String?) -> String {
    guard let path else { return "none" }
    return "\(path.utf8.count) bytes \"\(String(path.prefix(40)))\"\(path.count > 40 ? "..." : "")"
}

func unstagedRuns(_ staged: [Bool]) -> [Range<UInt64>] {
    var out: [Range<UInt64>] = []
    for p in 0 ..< sourcePages where !staged[Int(p)] {
        if let last = out.last, last.upperBound == p {
            out[out.count - 1] = last.lowerBound ..< p + 1
        } else {
            out.append(p ..< p + 1)
        }
    }
    return out
}

/// The table agrees with the model.
func check(_ slots: SwapSlots, _ model: Model, _ stepName: @autoclosure () -> String) {
    for slot in 0 ..< slotCount + 2 {
        let page = slots.page(ofSlot: slot)
        if let page { require(page < sourcePages, "\(stepName()): slot \(slot) stands for page \(page) of \(sourcePages)") }
        let expected = slot < slotCount ? model.slotToPage[Int(slot)] : nil
        require(page == expected, "\(stepName()): slot \(slot) stands for \(String(describing: page)), expected \(String(describing: expected))")
    }
    let c = slots.counts()
    require(c.staging == model.staging && slots.stagingState == model.staging, "\(stepName()): staging \(c.staging), expected \(model.staging)")
    require(c.mapped == model.mapped, "\(stepName()): \(c.mapped) slots mapped, \(model.mapped) hold a page")
    require(c.stagedAtSeal == model.stagedAtSeal, "\(stepName()): staged at seal \(c.stagedAtSeal), expected \(model.stagedAtSeal)")
    require(c.markersDecoded == model.markersDecoded, "\(stepName()): \(c.markersDecoded) markers decoded, expected \(model.markersDecoded)")
    require(c.invalidMarkers == model.invalidMarkers, "\(stepName()): \(c.invalidMarkers) invalid markers, expected \(model.invalidMarkers)")
    require(c.duplicates == model.duplicates, "\(stepName()): \(c.duplicates) duplicates, expected \(model.duplicates)")
    if !model.loadedDuplicates {
        require(c.duplicates <= c.markersDecoded, "\(stepName()): \(c.duplicates) duplicates of \(c.markersDecoded) markers")
        require(c.duplicates <= model.duplicatesAnySlot, "\(stepName()): \(c.duplicates) duplicates, only \(model.duplicatesAnySlot) markers named a page another slot stood for")
    }
    require(slots.openKey == (model.staging == .open ? model.key : nil), "\(stepName()): openKey \(String(describing: slots.openKey))")
    require(slots.stagedRAMFile == model.ramFile, "\(stepName()): RAM file \(describe(slots.stagedRAMFile)), expected \(describe(model.ramFile))")

    let unstaged = slots.unstagedPages()
    if model.staging == .sealed {
        var last: UInt64?
        for r in unstaged {
            require(!r.isEmpty && r.upperBound <= sourcePages, "\(stepName()): unstaged run \(r) of \(sourcePages) pages")
            if let last { require(r.lowerBound > last, "\(stepName()): unstaged runs not sorted and apart: \(unstaged)") }
            last = r.upperBound
        }
        require(unstaged == unstagedRuns(model.staged), "\(stepName()): unstaged \(unstaged), expected \(unstagedRuns(model.staged))")
    } else {
        require(unstaged.isEmpty, "\(stepName()): unstaged pages \(unstaged) while \(model.staging)")
    }
}

/// sourceRuns over `pages` and exportPages over `bytes` agree with the model.
let geometry = try! PageGeometry(exportSize: slotCount * pageSize, pageSize: pageSize)

func checkScans(_ slots: SwapSlots, _ model: Model, pages: Range<UInt64>, bytes: Range<UInt64>, _ stepName: @autoclosure () -> String) {
    let runs = slots.sourceRuns(of: pages, geometry: geometry)
    var next = pages.lowerBound
    for run in runs {
        require(!run.pages.isEmpty && run.pages.lowerBound == next, "\(stepName()): sourceRuns(\(pages)) gave \(runs.map(\.pages))")
        for slot in run.pages {
            let page = slot < slotCount ? model.slotToPage[Int(slot)] : nil
            let offset = run.sourceOffset.map { $0 + (slot - run.pages.lowerBound) * pageSize }
            require(offset == page.map { $0 * pageSize }, "\(stepName()): sourceRuns gives slot \(slot) source offset \(String(describing: offset)), it stands for page \(String(describing: page))")
        }
        next = run.pages.upperBound
    }
    require(next == pages.upperBound, "\(stepName()): sourceRuns(\(pages)) ends at \(next)")

    let span = slots.sourceSpan(geometry: geometry, sourceSize: sourcePages * pageSize + 100)
    require(span == 0 ..< sourcePages * pageSize, "\(stepName()): source span \(span)")
    var got: [UInt64] = []
    for r in slots.exportPages(inside: bytes, geometry: geometry) {
        require(!r.isEmpty, "\(stepName()): exportPages gave an empty run")
        got += Array(r)
    }
    got.sort()
    // Each export page given must stand for a source page wholly inside the bytes (it is marked zero).
    for slot in got {
        let page = slot < slotCount ? model.slotToPage[Int(slot)] : nil
        require(page.map { $0 * pageSize >= bytes.lowerBound && ($0 + 1) * pageSize <= bytes.upperBound } == true,
                "\(stepName()): exportPages(\(bytes)) gave slot \(slot), which stands for \(String(describing: page))")
    }
    var expected: [UInt64] = []
    for p in 0 ..< sourcePages where p * pageSize >= bytes.lowerBound && (p + 1) * pageSize <= bytes.upperBound {
        if let s = model.newest[Int(p)], model.slotToPage[Int(s)] == p { expected.append(s) }
    }
    expected.sort()
    require(got == expected, "\(stepName()): exportPages(\(bytes)) gave \(got), expected \(expected)")
}

// MARK: part 1, the slots file

/// What SwapSlots must make of `file`: nil when it opens, else whether it is a mismatch (not corrupt).
func expectedRefusal(_ file: [UInt8]) -> Bool? {
    var full = Array(file.prefix(fileSize))
    let got = full.count
    full += [UInt8](repeating: 0, count: fileSize - got)
    guard got >= fieldsSize, Array(full[0 ..< 8]) == magic, le(full, 8, UInt32.self) == 1,
          CRC32C.checksum(full[0 ..< 64]) == le(full, 64, UInt32.self) else { return false }
    guard le(full, 16, UInt64.self) == slotCount, le(full, 24, UInt64.self) == sourcePages,
          le(full, 32, UInt64.self) == pageSize else { return true }
    guard got == fileSize, CRC32C.checksum(full[fieldsSize...]) == le(full, 60, UInt32.self),
          le(full, 56, UInt32.self) <= UInt32(maxPathBytes) else { return false }
    return nil
}

/// The model of the table `file` holds (one that opens).
func loadedModel(_ file: [UInt8]) -> Model {
    var m = Model()
    m.staging = le(file, 12, UInt32.self) == 2 ? .sealed : .closed
    m.stagedAtSeal = le(file, 40, UInt64.self)
    m.duplicates = le(file, 48, UInt64.self)
    let pathLength = Int(le(file, 56, UInt32.self))
    m.ramFile = pathLength == 0 ? nil : String(decoding: file[fieldsSize ..< fieldsSize + pathLength], as: UTF8.self)
    for slot in 0 ..< Int(slotCount) {
        let e = le(file, headerSize + slot * 4, UInt32.self)
        if e != 0, UInt64(e) <= sourcePages { m.slotToPage[slot] = UInt64(e) - 1 }
    }
    m.reloaded()
    return m
}

func slotsFile(_ input: inout FuzzInput, fix: UInt8) -> [UInt8] {
    var file = Array(input.bytes(upTo: Int(input.integer(UInt16.self))))
    if fix & 0x10 != 0 {
        if file.count > fileSize { file.removeLast(file.count - fileSize) }
        file += [UInt8](repeating: 0, count: fileSize - file.count)
    }
    if fix & 0x4B != 0, file.count < fieldsSize { file += [UInt8](repeating: 0, count: fieldsSize - file.count) }
    if fix & 0x01 != 0 {
        file.replaceSubrange(0 ..< 8, with: magic)
        putLE(&file, 8, UInt32(1))
    }
    if fix & 0x02 != 0 {
        putLE(&file, 16, slotCount)
        putLE(&file, 24, sourcePages)
        putLE(&file, 32, pageSize)
    }
    if fix & 0x08 != 0 { putLE(&file, 56, le(file, 56, UInt32.self) % UInt32(maxPathBytes + 1)) }
    if fix & 0x04 != 0 {
        for at in stride(from: headerSize, to: file.count - 3, by: 4) {
            putLE(&file, at, le(file, at, UInt32.self) % UInt32(sourcePages + 1))
        }
    }
    if fix & 0x20 != 0, file.count >= fieldsSize { putLE(&file, 60, CRC32C.checksum(file[fieldsSize...])) }
    if fix & 0x40 != 0 { putLE(&file, 64, CRC32C.checksum(file[0 ..< 64])) }
    return file
}

/// Opens the table `file` holds (or none); returns it with its model, or nil when it was refused.
func openFile(_ file: [UInt8]?) -> (SwapSlots, Model)? {
    unlink(slotsPath)
    unlink(slotsPath + ".tmp")
    if let file { writeFile(slotsPath, file) }
    let refusal = file.flatMap(expectedRefusal)
    do {
        let slots = try openSlots()
        require(refusal == nil, "a slots file was opened that should be refused (\(refusal == true ? "mismatch" : "corrupt"))")
        return (slots, file.map(loadedModel) ?? Model())
    } catch let error as PageStoreError {
        switch error {
        case .corrupt(let m), .mismatch(let m):
            require(m.contains(slotsPath) && m.contains("--reset-store"), "unclear message: \(m)")
            if case .mismatch = error {
                require(refusal == true, "refused as a mismatch: \(m)")
            } else {
                require(refusal == false, "refused as corrupt: \(m)")
            }
        default:
            require(false, "a slots file gave \(error)")
        }
    } catch {
        require(false, "a slots file gave a \(type(of: error)): \(error)")
    }
    return nil
}

// MARK: parts 2 and 3, markers and staging

func commitAndReopen(_ slots: SwapSlots, _ model: inout Model, persisted: inout Model, _ step: String) -> SwapSlots {
    do {
        try slots.commit()
    } catch {
        require(false, "\(step): commit failed: \(error)")
    }
    // The file changes only when the table did since the last commit.
    if model.dirty {
        persisted = model
        persisted.ramFile = persistedPath(model.ramFile)
        // after sealing the file holds the table as sealed, whatever was overwritten since
        if model.staging == .sealed, let t = model.sealTable { persisted.slotToPage = t }
    }
    let again: SwapSlots
    do {
        again = try openSlots()
    } catch {
        require(false, "\(step): reopening the table just committed failed: \(error)")
        return slots
    }
    persisted.reloaded()
    check(again, persisted, "\(step) (reopened)")
    model = persisted
    return again
}

func runStaging(_ input: inout FuzzInput, _ slots: SwapSlots, _ model: Model) {
    var slots = slots
    var model = model
    var persisted = model
    var step = 0
    while !input.isEmpty, step < 512 {
        step += 1
        let op = input.byte()
        let name = { "step \(step) (op \(op & 7))" }
        switch op & 7 {
        case 0:
            let length = Int(input.integer(UInt16.self)) % 4200
            let seed = Array(input.bytes(upTo: Int(input.byte())))
            var path: String?
            if op & 0x08 == 0 {
                var bytes: [UInt8] = []
                while bytes.count < length, !seed.isEmpty { bytes += seed }
                path = String(decoding: bytes.prefix(length), as: UTF8.self)
            }
            do {
                let (key, dropped) = try slots.open(ramFile: path)
                require(model.staging != .sealed, "\(name()): staging opened after sealing")
                var expectedDropped: [Range<UInt64>] = []
                for slot in 0 ..< slotCount where model.slotToPage[Int(slot)] != nil {
                    if let last = expectedDropped.last, last.upperBound == slot {
                        expectedDropped[expectedDropped.count - 1] = last.lowerBound ..< slot + 1
                    } else {
                        expectedDropped.append(slot ..< slot + 1)
                    }
                }
                require(dropped == expectedDropped, "\(name()): open dropped \(dropped), expected \(expectedDropped)")
                require(StagingMarker.Key(hex: key.hex) == key, "\(name()): key \(key.hex) does not parse back")
                model.slotToPage = [UInt64?](repeating: nil, count: Int(slotCount))
                model.newest = [UInt64?](repeating: nil, count: Int(sourcePages))
                model.staging = .open
                model.key = key
                model.markersDecoded = 0
                model.duplicates = 0
                model.duplicatesAnySlot = 0
                model.loadedDuplicates = false
                model.invalidMarkers = 0
                model.ramFile = (path?.isEmpty ?? true) ? nil : path
                model.dirty = true
            } catch let error as ControlError {
                require(model.staging == .sealed, "\(name()): open refused while \(model.staging): \(error)")
            } catch {
                require(false, "\(name()): open gave a \(type(of: error)): \(error)")
            }
        case 1:
            let slot = UInt64(input.byte()) % (slotCount + 4)
            let page = UInt64(input.byte()) % (sourcePages + 4)
            let key = model.key ?? StagingMarker.Key(k0: 1, k1: 2)
            let bytes = editedMarker(&input, page: page, key: key)
            let d = bytes.withUnsafeBytes { slots.decode($0) }
            if model.staging == .open {
                var expected = checkDecode(bytes, key: key)
                if case .marker(let p) = expected, p >= sourcePages { expected = .invalid }
                require(d == expected, "\(name()): the table decoded \(String(describing: d)), expected \(expected)")
                if expected == .invalid { model.invalidMarkers += 1 }
                if case .marker(let p)? = d, slot < slotCount {
                    // As the swap export does: a marker maps its slot (only whole slots inside the export).
                    slots.map(slot: slot, toPage: p)
                    model.map(slot: slot, page: p)
                } else if slot < slotCount {
                    // Anything else is data: the slot's mapping goes.
                    slots.unmap(slot ..< slot + 1)
                    model.unmap(Int(slot))
                }
            } else {
                require(d == nil, "\(name()): decoded \(String(describing: d)) while staging is \(model.staging)")
                if slot < slotCount {
                    slots.unmap(slot ..< slot + 1)
                    model.unmap(Int(slot))
                }
            }
        case 2:
            let slot = UInt64(input.byte()) % (slotCount + 4)
            let page = UInt64(input.byte()) % (sourcePages + 4)
            if model.staging == .open {
                slots.map(slot: slot, toPage: page)
                model.map(slot: slot, page: page)
            }
        case 3:
            let a = UInt64(input.byte()) % (slotCount + 8), b = UInt64(input.byte()) % (slotCount + 8)
            let range = min(a, b) ..< max(a, b)
            slots.unmap(range)
            for slot in range where slot < slotCount { model.unmap(Int(slot)) }
        case 4:
            do {
                let c = try slots.seal()
                require(model.staging == .open, "\(name()): sealed while \(model.staging)")
                model.staging = .sealed
                model.key = nil
                model.stagedAtSeal = model.mapped
                model.sealTable = model.slotToPage
                model.staged = [Bool](repeating: false, count: Int(sourcePages))
                for case let page? in model.slotToPage { model.staged[Int(page)] = true }
                model.dirty = true
                require(c == slots.counts(), "\(name()): seal returned \(c), counts() \(slots.counts())")
            } catch let error as ControlError {
                require(model.staging != .open, "\(name()): seal refused while open: \(error)")
            } catch {
                require(false, "\(name()): seal gave a \(type(of: error)): \(error)")
            }
        case 5:
            slots = commitAndReopen(slots, &model, persisted: &persisted, name())
        case 6:
            let key = StagingMarker.Key(k0: input.integer(), k1: input.integer())
            let page: UInt64 = input.integer()
            let bytes = editedMarker(&input, page: page, key: key)
            _ = checkDecode(bytes, key: key)
            if same(bytes, StagingMarker.bytes(page: page, key: key)) {
                require(checkDecode(bytes, key: key) == .marker(page: page), "\(name()): the marker of page \(page) did not decode")
            }
            var header = [UInt8](repeating: 0xee, count: 24)
            header.withUnsafeMutableBytes { StagingMarker.encodeHeader(page: page, key: key, into: $0) }
            require(header == Array(StagingMarker.bytes(page: page, key: key)[0 ..< 24]), "\(name()): encodeHeader differs")
        default:
            let a = UInt64(input.integer(UInt16.self)) % (slotCount + 4), b = UInt64(input.integer(UInt16.self)) % (slotCount + 4)
            let x = UInt64(input.integer(UInt16.self)) * 16 % ((sourcePages + 2) * pageSize)
            let y = UInt64(input.integer(UInt16.self)) * 16 % ((sourcePages + 2) * pageSize)
            checkScans(slots, model, pages: min(a, b) ..< max(a, b), bytes: min(x, y) ..< max(x, y), name())
        }
        check(slots, model, name())
    }
    checkScans(slots, model, pages: 0 ..< slotCount, bytes: 0 ..< sourcePages * pageSize, "the end")
    _ = commitAndReopen(slots, &model, persisted: &persisted, "the end")
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzSwapSlots(_ data: UnsafeRawPointer?, _ size: Int) -> CInt {
    _ = referenceChecked
    var input = FuzzInput(UnsafeRawBufferPointer(start: data, count: size))
    let fix = input.byte()
    let file = slotsFile(&input, fix: fix)

    let written = fix & 0x80 != 0 ? nil : file
    var slots: SwapSlots
    var model = Model()
    if let opened = openFile(written) {
        slots = opened.0
        model = opened.1
        check(slots, model, "the opened file")
        let d = [UInt8](repeating: 0, count: markerSize).withUnsafeBytes { slots.decode($0) }
        require(d == nil, "a table just opened decodes markers")
        checkScans(slots, model, pages: 0 ..< slotCount + 2, bytes: 0 ..< (sourcePages + 1) * pageSize, "the opened file")
        // Nothing changed: commit() writes nothing, and a reopen gives the same table.
        var persisted = model
        slots = commitAndReopen(slots, &model, persisted: &persisted, "the opened file")
        if let written {
            var now = [UInt8](repeating: 0, count: written.count + 1)
            let fd = open(slotsPath, O_RDONLY)
            let n = read(fd, &now, now.count)
            close(fd)
            require(n == written.count && same(written, now[0 ..< n]), "a commit with nothing changed rewrote the slots file")
        }
    } else {
        unlink(slotsPath)
        do {
            slots = try openSlots()
        } catch {
            require(false, "a fresh table did not open: \(error)")
            return 0
        }
        check(slots, model, "a fresh table")
    }
    runStaging(&input, slots, model)
    return 0
}
