/// Where a page's contents come from.
///
/// The raw values are ordered so that a forward transition is a numeric increase:
/// `absent → present`, `absent → local`, `present → local`; never back.
public enum PageState: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    /// Not in the local store yet: a read must pull it from the source.
    case absent = 0
    /// Pulled from the source; the local copy is the source's.
    case present = 1
    /// Written, trimmed or zeroed by a client: the local copy is authoritative; never pull it again.
    case local = 2

    public var description: String {
        switch self {
        case .absent: "absent"
        case .present: "present"
        case .local: "local"
        }
    }
}

/// A state map that cannot be decoded.
public enum PageStateMapError: Error, Equatable, Sendable, CustomStringConvertible {
    case wrongLength(expected: Int, actual: Int)
    case invalidState(page: UInt64)
    case nonZeroPadding

    public var description: String {
        switch self {
        case let .wrongLength(expected, actual):
            "page state map has \(actual) bytes, expected \(expected)"
        case let .invalidState(page):
            "page state map holds an invalid state for page \(page)"
        case .nonZeroPadding:
            "page state map has bits set past its last page"
        }
    }
}

/// The state of every page of an export, 2 bits a page, packed into 64-bit words (32 pages a word).
///
/// A pure value type: no I/O, no locks. A 4 GiB export of 4 KiB pages (1 Mi pages) takes 256 KiB.
/// Counts per state are kept up to date, so reading them is O(1); scans (`runs`, `firstPage`) go a
/// word at a time. Lanes past `pageCount` in the last word are always 0 and never reported.
///
/// Encoding: page `p` is bits `2*(p % 4) ..< 2*(p % 4) + 2` of byte `p / 4`; the encoded map is
/// `ceil(pageCount / 4)` bytes. (On a little-endian host this is the words' memory image.)
public struct PageStateMap: Sendable, Equatable {
    public let pageCount: UInt64
    private var words: [UInt64]
    private var counts: (absent: UInt64, present: UInt64, local: UInt64)

    static let pagesPerWord: UInt64 = 32
    /// The low bit of every 2-bit lane.
    static let lowBits: UInt64 = 0x5555_5555_5555_5555

    /// A map of `pageCount` pages, all absent.
    public init(pageCount: UInt64) {
        self.pageCount = pageCount
        let wordCount = pageCount / Self.pagesPerWord + (pageCount % Self.pagesPerWord == 0 ? 0 : 1)
        self.words = [UInt64](repeating: 0, count: Int(wordCount))
        self.counts = (pageCount, 0, 0)
    }

    public static func == (a: PageStateMap, b: PageStateMap) -> Bool {
        a.pageCount == b.pageCount && a.words == b.words
    }

    // MARK: reading

    /// Pages in `state`. O(1).
    public func count(of state: PageState) -> UInt64 {
        switch state {
        case .absent: counts.absent
        case .present: counts.present
        case .local: counts.local
        }
    }

    public var absentCount: UInt64 { counts.absent }
    public var presentCount: UInt64 { counts.present }
    public var localCount: UInt64 { counts.local }

    /// True when no page is absent: the source is no longer needed.
    public var isComplete: Bool { counts.absent == 0 }

    /// The state of `page`; pages past the end read as absent.
    public func state(of page: UInt64) -> PageState {
        guard page < pageCount else { return .absent }
        let raw = (words[Int(page / Self.pagesPerWord)] >> ((page % Self.pagesPerWord) * 2)) & 3
        return PageState(rawValue: UInt8(raw)) ?? .absent
    }

    /// Lanes of `word` (as low bits) whose state is `state`.
    @inline(__always)
    static func matching(_ word: UInt64, _ state: PageState) -> UInt64 {
        let lo = word & lowBits
        let hi = (word >> 1) & lowBits
        switch state {
        case .absent: return ~(lo | hi) & lowBits
        case .present: return lo & ~hi
        case .local: return hi & ~lo
        }
    }

    /// Low-bit lane mask for lanes `from ..< to` of a word (0 ≤ from ≤ to ≤ 32).
    @inline(__always)
    static func laneMask(from: UInt64, to: UInt64) -> UInt64 {
        guard to > from else { return 0 }
        let upper: UInt64 = to >= 32 ? ~0 : (1 << (to * 2)) &- 1
        let lower: UInt64 = (1 << (from * 2)) &- 1
        return upper & ~lower & lowBits
    }

    /// `pages` clamped to the map.
    @inline(__always)
    func clamp(_ pages: Range<UInt64>) -> Range<UInt64> {
        let lo = min(pages.lowerBound, pageCount)
        return lo ..< max(lo, min(pages.upperBound, pageCount))
    }

    /// Calls `body(wordIndex, laneMask)` for every word that `pages` (already clamped, non-empty)
    /// touches, with the low-bit mask of the lanes in range.
    @inline(__always)
    static func forEachWord(in pages: Range<UInt64>, _ body: (Int, UInt64) throws -> Bool) rethrows {
        guard !pages.isEmpty else { return }
        let firstWord = pages.lowerBound / pagesPerWord
        let lastWord = (pages.upperBound - 1) / pagesPerWord
        var w = firstWord
        while w <= lastWord {
            let base = w * pagesPerWord
            let from = w == firstWord ? pages.lowerBound - base : 0
            let to = w == lastWord ? pages.upperBound - base : pagesPerWord
            let mask = (from == 0 && to == pagesPerWord) ? lowBits : laneMask(from: from, to: to)
            if try !body(Int(w), mask) { return }
            w += 1
        }
    }

    /// The maximal runs of pages in `state` within `pages` (clamped to the map), in order.
    public func runs(of state: PageState, in pages: Range<UInt64>) -> [Range<UInt64>] {
        let range = clamp(pages)
        var result: [Range<UInt64>] = []
        var runStart: UInt64?
        words.withUnsafeBufferPointer { words in
            Self.forEachWord(in: range) { w, inRange in
                let base = UInt64(w) * Self.pagesPerWord
                let match = Self.matching(words[w], state) & inRange
                // Fast paths: a whole in-range word continuing an open run, or with nothing to start one.
                if runStart != nil && match == inRange { return true }
                if runStart == nil && match == 0 { return true }
                var lane: UInt64 = 0
                while lane < Self.pagesPerWord {
                    let from = Self.laneMask(from: lane, to: Self.pagesPerWord)
                    if let start = runStart {
                        let gap = ~match & inRange & from
                        if gap == 0 { break }
                        let end = UInt64(gap.trailingZeroBitCount) / 2
                        result.append(start ..< base + end)
                        runStart = nil
                        lane = end
                    } else {
                        let hit = match & from
                        if hit == 0 { break }
                        let start = UInt64(hit.trailingZeroBitCount) / 2
                        runStart = base + start
                        lane = start
                    }
                }
                return true
            }
        }
        if let start = runStart { result.append(start ..< range.upperBound) }
        return result
    }

    /// The first page at or after `page` in `state`, or nil.
    public func firstPage(with state: PageState, from page: UInt64) -> UInt64? {
        var found: UInt64?
        words.withUnsafeBufferPointer { words in
            Self.forEachWord(in: clamp(page ..< pageCount)) { w, inRange in
                let match = Self.matching(words[w], state) & inRange
                if match == 0 { return true }
                found = UInt64(w) * Self.pagesPerWord + UInt64(match.trailingZeroBitCount) / 2
                return false
            }
        }
        return found
    }

    /// Pages in `state` within `pages` (clamped).
    public func count(of state: PageState, in pages: Range<UInt64>) -> UInt64 {
        var n: UInt64 = 0
        words.withUnsafeBufferPointer { words in
            Self.forEachWord(in: clamp(pages)) { w, inRange in
                n += UInt64((Self.matching(words[w], state) & inRange).nonzeroBitCount)
                return true
            }
        }
        return n
    }

    // MARK: transitions

    /// Moves `pages` (clamped to the map) forward to `state`: absent pages become present or local,
    /// present pages become local; nothing moves back. Returns how many pages changed.
    @discardableResult
    public mutating func mark(_ pages: Range<UInt64>, _ state: PageState) -> UInt64 {
        let range = clamp(pages)
        guard state != .absent, !range.isEmpty else { return 0 }
        var fromAbsent: UInt64 = 0
        var fromPresent: UInt64 = 0
        words.withUnsafeMutableBufferPointer { words in
            Self.forEachWord(in: range) { w, inRange in
                let word = words[w]
                let absent = Self.matching(word, .absent) & inRange
                switch state {
                case .present:
                    if absent != 0 {
                        words[w] = word | absent
                        fromAbsent += UInt64(absent.nonzeroBitCount)
                    }
                case .local:
                    let present = Self.matching(word, .present) & inRange
                    let moving = absent | present
                    if moving != 0 {
                        // Clear both bits of each moving lane, then set its high bit.
                        words[w] = (word & ~(moving | (moving << 1))) | (moving << 1)
                        fromAbsent += UInt64(absent.nonzeroBitCount)
                        fromPresent += UInt64(present.nonzeroBitCount)
                    }
                case .absent:
                    break
                }
                return true
            }
        }
        counts.absent -= fromAbsent
        switch state {
        case .present:
            counts.present += fromAbsent
        case .local:
            counts.present -= fromPresent
            counts.local += fromAbsent + fromPresent
        case .absent:
            break
        }
        return fromAbsent + fromPresent
    }

    /// Moves `pages` (clamped) back to absent, whatever their state: the one backward transition, for
    /// a swap export's staging only (a slot re-staged with a marker stands for a source page again).
    /// Returns how many pages changed.
    @discardableResult
    public mutating func reset(_ pages: Range<UInt64>) -> UInt64 {
        let range = clamp(pages)
        guard !range.isEmpty else { return 0 }
        var fromPresent: UInt64 = 0
        var fromLocal: UInt64 = 0
        words.withUnsafeMutableBufferPointer { words in
            Self.forEachWord(in: range) { w, inRange in
                let word = words[w]
                let present = Self.matching(word, .present) & inRange
                let local = Self.matching(word, .local) & inRange
                let moving = present | local
                if moving != 0 {
                    words[w] = word & ~(moving | (moving << 1))
                    fromPresent += UInt64(present.nonzeroBitCount)
                    fromLocal += UInt64(local.nonzeroBitCount)
                }
                return true
            }
        }
        counts.present -= fromPresent
        counts.local -= fromLocal
        counts.absent += fromPresent + fromLocal
        return fromPresent + fromLocal
    }

    // MARK: encoding

    /// Bytes in the encoded map of `pageCount` pages.
    public static func encodedByteCount(pageCount: UInt64) -> Int {
        Int(pageCount / 4 + (pageCount % 4 == 0 ? 0 : 1))
    }

    public var encodedByteCount: Int { Self.encodedByteCount(pageCount: pageCount) }

    /// The map as `encodedByteCount` bytes (see the type's comment for the layout).
    public func encode() -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: encodedByteCount) { buffer, initialized in
            encode(into: UnsafeMutableRawBufferPointer(buffer))
            initialized = encodedByteCount
        }
    }

    /// Writes the encoded map into the first `encodedByteCount` bytes of `buffer`, which must be at least
    /// that long.
    public func encode(into buffer: UnsafeMutableRawBufferPointer) {
        let n = min(encodedByteCount, buffer.count)
        guard n > 0, let dest = buffer.baseAddress else { return }
        words.withUnsafeBufferPointer { words in
            #if _endian(little)
            guard let src = words.baseAddress else { return }
            dest.copyMemory(from: UnsafeRawPointer(src), byteCount: n)
            #else
            for i in 0 ..< n {
                dest.storeBytes(of: UInt8(truncatingIfNeeded: words[i / 8] >> (UInt64(i % 8) * 8)),
                                toByteOffset: i, as: UInt8.self)
            }
            #endif
        }
    }

    /// Decodes a map of `pageCount` pages; throws on a wrong length, a state value of 3, or bits set past
    /// the last page.
    public init(decoding bytes: some Collection<UInt8>, pageCount: UInt64) throws {
        let array = Array(bytes)
        self = try array.withUnsafeBytes { try Self.decode($0, pageCount: pageCount) }
    }

    /// Decodes from raw memory, as `init(decoding:pageCount:)`.
    public init(decoding buffer: UnsafeRawBufferPointer, pageCount: UInt64) throws {
        self = try Self.decode(buffer, pageCount: pageCount)
    }

    private static func decode(_ buffer: UnsafeRawBufferPointer, pageCount: UInt64) throws -> PageStateMap {
        let expected = encodedByteCount(pageCount: pageCount)
        guard buffer.count == expected else {
            throw PageStateMapError.wrongLength(expected: expected, actual: buffer.count)
        }
        var map = PageStateMap(pageCount: pageCount)
        var present: UInt64 = 0
        var local: UInt64 = 0
        var padding = false
        var invalidWord: Int?
        map.words.withUnsafeMutableBufferPointer { words in
            guard let base = buffer.baseAddress else { return }
            for w in 0 ..< words.count {
                let start = w * 8
                let n = min(8, buffer.count - start)
                var word: UInt64 = 0
                if n == 8 {
                    word = UInt64(littleEndian: base.loadUnaligned(fromByteOffset: start, as: UInt64.self))
                } else {
                    for i in 0 ..< n {
                        word |= UInt64(base.load(fromByteOffset: start + i, as: UInt8.self)) << (UInt64(i) * 8)
                    }
                }
                // Lanes of pages in the map: past the last page a lane is padding, never a page's state.
                var inMap = ~UInt64(0)
                if w == words.count - 1 {
                    let used = pageCount - UInt64(w) * pagesPerWord
                    if used < pagesPerWord {
                        inMap = (1 << (used * 2)) - 1
                        if word & ~inMap != 0 { padding = true }
                    }
                }
                if word & (word >> 1) & lowBits & inMap != 0, invalidWord == nil { invalidWord = w }
                words[w] = word
                present += UInt64(matching(word, .present).nonzeroBitCount)
                local += UInt64(matching(word, .local).nonzeroBitCount)
            }
        }
        if let w = invalidWord {
            let word = map.words[w]
            let lane = UInt64((word & (word >> 1) & lowBits).trailingZeroBitCount) / 2
            throw PageStateMapError.invalidState(page: UInt64(w) * pagesPerWord + lane)
        }
        if padding { throw PageStateMapError.nonZeroPadding }
        map.counts = (pageCount - present - local, present, local)
        return map
    }
}
