/// Where an export page's data lives in the source. Consulted everywhere an export page turns into a
/// source read (the pull engine) and where source byte ranges turn back into export pages (the
/// zero-map import). File mode uses `IdentityMapping`; swap mode plugs in a slot table (slot → source
/// page, changing while WRITEs stage markers) as one more conforming type.
///
/// Implementations are thread-safe: the engine asks from event loops and pool threads, under its own
/// lock (so a mapping must not call back into the lazy export).
public protocol SourceMapping: Sendable {
    /// `pages` (export pages, inside the export) cut into runs that are contiguous on both sides, in
    /// page order and covering `pages` exactly. A run's source bytes start at `sourceOffset` and are as
    /// long as the run's export bytes (`PageGeometry.byteRange(of:)`); `sourceOffset == nil` means
    /// nothing is to be pulled for those pages (their content is zero, e.g. a swap slot never staged).
    func sourceRuns(of pages: Range<UInt64>, geometry: PageGeometry) -> [SourceRun]

    /// The export pages whose whole source bytes lie inside `sourceBytes` (the inverse, for importing
    /// the source's zero map), as page ranges in any order.
    func exportPages(inside sourceBytes: Range<UInt64>, geometry: PageGeometry) -> [Range<UInt64>]

    /// The source byte range the zero-map import asks about (the part of the source any page maps to).
    func sourceSpan(geometry: PageGeometry, sourceSize: UInt64) -> Range<UInt64>

    /// Makes the mapping durable: called before every commit of the page state (a mapping that
    /// changes must be on disk before the states that depend on it).
    func commit() throws
}

extension SourceMapping {
    public func commit() throws {}
}

/// A run of export pages and where their bytes start in the source (nil: unmapped, nothing to pull).
public struct SourceRun: Sendable, Hashable {
    public var pages: Range<UInt64>
    public var sourceOffset: UInt64?

    public init(pages: Range<UInt64>, sourceOffset: UInt64?) {
        self.pages = pages
        self.sourceOffset = sourceOffset
    }
}

/// Export offset == source offset (file-backed RAM, a plain lazy copy).
public struct IdentityMapping: SourceMapping {
    public init() {}

    public func sourceRuns(of pages: Range<UInt64>, geometry: PageGeometry) -> [SourceRun] {
        guard !pages.isEmpty else { return [] }
        return [SourceRun(pages: pages, sourceOffset: geometry.byteOffset(ofPage: pages.lowerBound))]
    }

    public func exportPages(inside sourceBytes: Range<UInt64>, geometry: PageGeometry) -> [Range<UInt64>] {
        let size = geometry.exportSize
        guard sourceBytes.lowerBound < size else { return [] }
        let first = geometry.alignUp(sourceBytes.lowerBound, to: geometry.pageSize) / geometry.pageSize
        // A partial last page is whole once the range reaches the end of the export.
        let last = sourceBytes.upperBound >= size ? geometry.pageCount : sourceBytes.upperBound / geometry.pageSize
        return first < last ? [first ..< last] : []
    }

    public func sourceSpan(geometry: PageGeometry, sourceSize: UInt64) -> Range<UInt64> {
        0 ..< min(geometry.exportSize, sourceSize)
    }
}
