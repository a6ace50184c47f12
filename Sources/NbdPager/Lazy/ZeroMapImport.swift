/// Turns the source's base:allocation zero extents into local holes marked present, so that a mostly
/// empty image costs almost no transfer. Source byte ranges become export pages through the
/// `SourceMapping`'s inverse; the hole punches run on the caller's thread with no engine lock held
/// (only the write exclusion's claim on the pages being marked).
struct ZeroMapImport {
    let source: any RemoteSource
    let mapping: any SourceMapping
    let store: LazyStore
    /// Bytes of the source asked about per block-status query.
    var chunk: UInt64 = 1 << 30

    /// Returns the number of pages marked present.
    func run() async throws -> UInt64 {
        let geometry = store.geometry
        guard source.supportsExtents, store.count(of: .absent, in: 0 ..< geometry.pageCount) > 0 else { return 0 }
        let span = mapping.sourceSpan(geometry: geometry, sourceSize: source.size)
        var marked: UInt64 = 0
        var offset = span.lowerBound
        while offset < span.upperBound {
            let length = min(chunk, span.upperBound - offset)
            var pos = offset
            for extent in try await source.extents(offset: offset, length: length) {
                let end = pos + UInt64(extent.length)
                if extent.flags.contains(.zero) {
                    for pages in mapping.exportPages(inside: pos ..< end, geometry: geometry) {
                        marked += try store.markZero(pages)
                    }
                }
                pos = end
            }
            offset += length
        }
        store.noteChange()
        return marked
    }
}
