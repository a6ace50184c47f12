import Atomics
import NIOCore

/// Read-only view of per-page state: the page store (locked) or a `PageStateMap` value (pure).
public protocol PageStateView {
    func state(of page: UInt64) -> PageState
    func runs(of state: PageState, in pages: Range<UInt64>) -> [Range<UInt64>]
    func firstPage(with state: PageState, from page: UInt64) -> UInt64?
    func count(of state: PageState, in pages: Range<UInt64>) -> UInt64
}

extension PageStore: PageStateView {}
extension PageStateMap: PageStateView {}

/// What the pull engine needs of the page store: page states, and a place for pulled data.
protocol PullStore: AnyObject, Sendable, PageStateView {
    var geometry: PageGeometry { get }
    /// Stores `data` (the bytes of `pages`) for the pages still absent and not being written, and marks
    /// them present. Called without any engine lock held, on whichever thread the engine chooses.
    func storePulled(_ data: ByteBuffer, pages: Range<UInt64>) throws
}

/// The page store as the lazy export uses it: pulled data goes in (zero pages as holes, then marked
/// present), client modifications are kept off pages being stored and vice versa (`WriteExclusion`),
/// the zero-map import marks holes present, and the first time every page is local `whenComplete` runs.
final class LazyStore: PullStore, @unchecked Sendable {
    let store: PageStore
    let exclusion: WriteExclusion
    private let completed = ManagedAtomic<Bool>(false)
    /// Whether "every page local" counts yet (a swap export's slots are all local until staging
    /// makes some absent: its completion is armed when staging is sealed).
    let completionArmed: ManagedAtomic<Bool>
    /// Called once, on the thread that made the last page local.
    private let completion: @Sendable () -> Void

    init(store: PageStore, exclusion: WriteExclusion = WriteExclusion(), completionArmed: Bool = true,
         whenComplete: @escaping @Sendable () -> Void) {
        self.store = store
        self.completionArmed = ManagedAtomic(completionArmed)
        self.exclusion = exclusion
        self.completion = whenComplete
    }

    var geometry: PageGeometry { store.geometry }
    func state(of page: UInt64) -> PageState { store.state(of: page) }
    func runs(of state: PageState, in pages: Range<UInt64>) -> [Range<UInt64>] { store.runs(of: state, in: pages) }
    func firstPage(with state: PageState, from page: UInt64) -> UInt64? { store.firstPage(with: state, from: page) }
    func count(of state: PageState, in pages: Range<UInt64>) -> UInt64 { store.count(of: state, in: pages) }

    func storePulled(_ data: ByteBuffer, pages: Range<UInt64>) throws {
        let claimed = exclusion.beginStore(pages) { store.runs(of: .absent, in: $0) }
        defer { exclusion.endStore(claimed) }
        let base = geometry.byteOffset(ofPage: pages.lowerBound)
        try data.withUnsafeReadableBytes { bytes in
            for run in claimed {
                // Consecutive pages of the same kind (all zero or not) go to the store in one call.
                var groupStart = run.lowerBound
                var groupZero = false
                for page in run {
                    let from = Int(geometry.byteOffset(ofPage: page) - base)
                    let zero = PageStore.isAllZero(
                        UnsafeRawBufferPointer(rebasing: bytes[from ..< from + Int(geometry.length(ofPage: page))]))
                    if page == run.lowerBound {
                        groupZero = zero
                    } else if zero != groupZero {
                        try storeGroup(groupStart ..< page, zero: groupZero, bytes: bytes, base: base)
                        groupStart = page
                        groupZero = zero
                    }
                }
                try storeGroup(groupStart ..< run.upperBound, zero: groupZero, bytes: bytes, base: base)
            }
        }
        noteChange()
    }

    /// Data first, then the state that says it is present.
    private func storeGroup(_ group: Range<UInt64>, zero: Bool, bytes: UnsafeRawBufferPointer, base: UInt64) throws {
        let (offset, length) = geometry.byteRange(of: group)
        if zero {
            try store.punchHole(offset: offset, length: length)
        } else {
            let from = Int(offset - base)
            try store.writeData(from: UnsafeRawBufferPointer(rebasing: bytes[from ..< from + Int(length)]), offset: offset)
        }
        store.markPresent(group)
    }

    /// Makes the absent pages of `pages` that no writer or store holds present holes (the source says
    /// they are zero). Returns how many pages were marked. No lock is held during the hole punches
    /// beyond the exclusion's claim on these pages.
    func markZero(_ pages: Range<UInt64>) throws -> UInt64 {
        let claimed = exclusion.beginStore(pages) { store.runs(of: .absent, in: $0) }
        defer { exclusion.endStore(claimed) }
        var marked: UInt64 = 0
        for run in claimed {
            let (offset, length) = geometry.byteRange(of: run)
            try store.punchHole(offset: offset, length: length)
            marked += store.markPresent(run)
        }
        return marked
    }

    /// Runs a client modification of `pages` with no store of pulled data in them, then marks them local.
    func modify(_ pages: Range<UInt64>, _ body: () throws -> Void) throws {
        try exclusion.beginWrite(pages)
        defer { exclusion.endWrite(pages) }
        try body()
        store.markLocal(pages)
    }

    /// Runs a staging change of `pages` (a marker mapped a slot to a source page) with no store of
    /// pulled data or client write in them, then moves them back to absent.
    func restage(_ pages: Range<UInt64>, _ body: () throws -> Void) throws {
        try exclusion.beginWrite(pages)
        defer { exclusion.endWrite(pages) }
        try body()
        store.markAbsent(pages)
    }

    /// Whether every page is present or local, counting only once completion is armed.
    var isComplete: Bool { completionArmed.load(ordering: .relaxed) && store.isComplete }

    /// Runs the completion callback the first time every page is present or local (once armed).
    func noteChange() {
        guard isComplete, completed.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged
        else { return }
        completion()
    }
}
