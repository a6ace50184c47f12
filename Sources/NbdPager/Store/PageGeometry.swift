/// An invalid page geometry: the reason, in words.
public struct PageGeometryError: Error, CustomStringConvertible, Sendable, Equatable {
    public var description: String

    public init(_ description: String) {
        self.description = description
    }
}

/// How an export of `exportSize` bytes divides into pages of `pageSize` bytes.
///
/// Pure arithmetic, no I/O. The last page may be partial (an export need not be a multiple of the page
/// size); every byte range this type returns is clamped to the export, and no computation overflows,
/// whatever the offsets a client sends.
public struct PageGeometry: Sendable, Hashable, CustomStringConvertible {
    /// Bytes per page: a power of two.
    public let pageSize: UInt64
    /// Bytes in the export.
    public let exportSize: UInt64
    /// log2(pageSize).
    public let pageShift: UInt64
    /// Pages in the export, counting a partial last page.
    public let pageCount: UInt64

    public static let defaultPageSize: UInt64 = 4096

    /// Throws when `pageSize` is not a power of two.
    public init(exportSize: UInt64, pageSize: UInt64 = PageGeometry.defaultPageSize) throws {
        guard pageSize > 0, pageSize & (pageSize - 1) == 0 else {
            throw PageGeometryError("page size \(pageSize) is not a power of two")
        }
        self.pageSize = pageSize
        self.exportSize = exportSize
        self.pageShift = UInt64(pageSize.trailingZeroBitCount)
        self.pageCount = (exportSize >> pageShift) + (exportSize & (pageSize - 1) == 0 ? 0 : 1)
    }

    public var description: String {
        "\(exportSize) bytes in \(pageCount) pages of \(pageSize)"
    }

    /// True when the last page is shorter than `pageSize`.
    public var hasPartialLastPage: Bool {
        exportSize & (pageSize - 1) != 0
    }

    /// The page holding byte `offset` (may be `pageCount` or beyond for offsets past the end).
    @inlinable
    public func page(containing offset: UInt64) -> UInt64 {
        offset >> pageShift
    }

    /// The pages that bytes `offset ..< offset + length` touch, clamped to the export.
    ///
    /// A zero length gives an empty range at the page of `offset`; an offset at or past the end gives
    /// `pageCount ..< pageCount`.
    public func pages(covering offset: UInt64, length: UInt64) -> Range<UInt64> {
        guard offset < exportSize else { return pageCount ..< pageCount }
        let (sum, overflow) = offset.addingReportingOverflow(length)
        let end = overflow ? exportSize : min(sum, exportSize)
        let first = offset >> pageShift
        guard end > offset else { return first ..< first }
        let last = (end >> pageShift) + (end & (pageSize - 1) == 0 ? 0 : 1)
        return first ..< min(last, pageCount)
    }

    /// The bytes of `pages`, clamped to the export (so the last page of an export with a partial last
    /// page is short, and pages past the end have length 0).
    public func byteRange(of pages: Range<UInt64>) -> (offset: UInt64, length: UInt64) {
        let start = byteOffset(ofPage: pages.lowerBound)
        let end = byteOffset(ofPage: pages.upperBound)
        return (start, end - start)
    }

    /// The byte offset where `page` starts, clamped to the export size.
    public func byteOffset(ofPage page: UInt64) -> UInt64 {
        guard page < pageCount else { return exportSize }
        return page << pageShift
    }

    /// Bytes in `page`: `pageSize`, less for a partial last page, 0 past the end.
    public func length(ofPage page: UInt64) -> UInt64 {
        byteRange(of: page ..< page &+ 1).length
    }

    // MARK: alignment

    /// True when `offset` is a multiple of the page size.
    @inlinable
    public func isPageAligned(_ offset: UInt64) -> Bool {
        offset & (pageSize - 1) == 0
    }

    /// True when both ends of the byte range fall on page boundaries, or the range ends at the end of
    /// the export (whose last page may be partial).
    public func isPageAligned(offset: UInt64, length: UInt64) -> Bool {
        guard isPageAligned(offset) else { return false }
        let (end, overflow) = offset.addingReportingOverflow(length)
        return !overflow && (isPageAligned(end) || end == exportSize)
    }

    /// `offset` rounded down to a multiple of `alignment` (a fetch size; any non-zero value). An
    /// alignment of 0 returns `offset` unchanged.
    public static func alignDown(_ offset: UInt64, to alignment: UInt64) -> UInt64 {
        guard alignment > 0 else { return offset }
        return offset - offset % alignment
    }

    /// `offset` rounded up to a multiple of `alignment`, saturating at `UInt64.max` rounded down.
    /// An alignment of 0 returns `offset` unchanged.
    public static func alignUp(_ offset: UInt64, to alignment: UInt64) -> UInt64 {
        guard alignment > 0 else { return offset }
        let rem = offset % alignment
        guard rem != 0 else { return offset }
        let (up, overflow) = offset.addingReportingOverflow(alignment - rem)
        return overflow ? alignDown(UInt64.max, to: alignment) : up
    }

    /// `offset` rounded down to a multiple of `alignment`, clamped to the export size.
    public func alignDown(_ offset: UInt64, to alignment: UInt64) -> UInt64 {
        min(Self.alignDown(offset, to: alignment), exportSize)
    }

    /// `offset` rounded up to a multiple of `alignment`, clamped to the export size (so a fetch window
    /// rounded up never reaches past the end).
    public func alignUp(_ offset: UInt64, to alignment: UInt64) -> UInt64 {
        min(Self.alignUp(offset, to: alignment), exportSize)
    }

    /// The byte window `offset ..< offset + length` widened to `fetchSize` boundaries and clamped to the
    /// export: what to pull from the source for a miss in that range.
    public func fetchWindow(offset: UInt64, length: UInt64, fetchSize: UInt64) -> (offset: UInt64, length: UInt64) {
        let start = alignDown(offset, to: fetchSize)
        let (sum, overflow) = offset.addingReportingOverflow(length)
        let end = max(alignUp(overflow ? exportSize : min(sum, exportSize), to: fetchSize), start)
        return (start, end - start)
    }
}
