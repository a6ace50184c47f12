// Fuzzes PageStateMap decoding (the map inside each state slot of a page store) and, when the bytes
// decode, checks the map: encoding gives back the same bytes, the counts add up and agree with
// state(of:), runs(of:in:) and firstPage(with:from:), and marking moves pages forward only.
//
// Input: 2 bytes of page count (little-endian, taken modulo 4096: enough words and partial words to
// cover every path, few enough pages for the page-by-page reference checks), 1 byte choosing a length
// fix-up, then the map bytes.
import FuzzSupport
import NbdPager

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzStateMap(_ data: UnsafeRawPointer?, _ size: Int) -> CInt {
    var input = FuzzInput(UnsafeRawBufferPointer(start: data, count: size))
    let pageCount = UInt64(input.integer(UInt16.self) % 4096)
    let mode = input.byte()
    var bytes = Array(input.rest())
    let expected = PageStateMap.encodedByteCount(pageCount: pageCount)
    if mode & 1 != 0 {
        // Most inputs have the wrong length; make this one fit so the state bits get exercised.
        if bytes.count > expected { bytes.removeLast(bytes.count - expected) }
        bytes += [UInt8](repeating: 0, count: expected - bytes.count)
    }

    let map: PageStateMap
    do {
        map = try PageStateMap(decoding: bytes, pageCount: pageCount)
    } catch let error as PageStateMapError {
        require(!error.description.isEmpty, "error without a message")
        switch error {
        case .wrongLength(let e, let actual):
            require(e == expected && actual == bytes.count && actual != expected, "wrong length error \(error)")
        case .invalidState(let page):
            require(page < pageCount, "invalid state reported for page \(page) of \(pageCount)")
            let lane = (bytes[Int(page / 4)] >> ((page % 4) * 2)) & 3
            require(lane == 3, "page \(page) reported invalid but holds \(lane)")
        case .nonZeroPadding:
            break
        }
        return 0
    } catch {
        require(false, "unexpected error \(error)")
        return 0
    }

    require(bytes.count == expected, "decoded \(bytes.count) bytes for \(pageCount) pages")
    require(map.pageCount == pageCount, "page count changed")
    require(map.encode() == bytes, "encode(decode(x)) != x")
    require(map.absentCount + map.presentCount + map.localCount == pageCount, "counts do not add up")
    var counts: [UInt64] = [0, 0, 0]
    for p in 0 ..< pageCount { counts[Int(map.state(of: p).rawValue)] += 1 }
    for state in PageState.allCases {
        let n = counts[Int(state.rawValue)]
        require(map.count(of: state) == n, "count(of: \(state)) is \(map.count(of: state)), \(n) pages")
        require(map.count(of: state, in: 0 ..< pageCount) == n, "count(of: \(state), in:) disagrees")
        let runs = map.runs(of: state, in: 0 ..< pageCount)
        require(runs.reduce(0) { $0 + UInt64($1.count) } == n, "runs of \(state) do not cover its pages")
        var last: UInt64?
        for r in runs {
            require(!r.isEmpty, "an empty run of \(state)")
            // Ordered, and with a gap between two runs (else they would be one).
            if let last { require(r.lowerBound > last, "runs of \(state) overlap or touch") }
            require(map.state(of: r.lowerBound) == state && map.state(of: r.upperBound - 1) == state,
                    "run \(r) is not \(state)")
            last = r.upperBound
        }
        let first = map.firstPage(with: state, from: 0)
        require(first == runs.first?.lowerBound, "firstPage(with: \(state)) disagrees with runs")
    }

    // Marks from the input's first bytes only move pages forward.
    var marked = map
    if pageCount > 0, bytes.count >= 2 {
        let from = UInt64(bytes[0]) % pageCount
        let to = from + UInt64(bytes[1]) % (pageCount - from + 1)
        let target: PageState = mode & 2 != 0 ? .local : .present
        let changed = marked.mark(from ..< to, target)
        var n: UInt64 = 0
        for p in 0 ..< pageCount {
            let before = map.state(of: p), after = marked.state(of: p)
            require(after.rawValue >= before.rawValue, "page \(p) moved back")
            if before != after {
                n += 1
                require(p >= from && p < to && after == target, "page \(p) changed outside the marked range")
            }
        }
        require(n == changed, "mark reported \(changed) changes, \(n) pages changed")
        let again = try? PageStateMap(decoding: marked.encode(), pageCount: pageCount)
        require(again == marked, "a marked map does not round-trip")
    }
    return 0
}
