import NIOCore

/// A swap export's `BlockBackend`: the lazy export over a `SwapSlots` mapping, plus what swap slots
/// add to writes. While staging is open, each whole 4 KiB slot of a WRITE (the kernel merges them,
/// up to 512 KiB through loop) is decoded on its own: a valid marker maps the slot to its source page
/// and makes it absent (a READ then pulls that page); anything else is stored as data. After sealing
/// every write is data. A write, trim or zeroing drops the mappings of the slots it covers.
public final class SwapSlotsBackend: BlockBackend, @unchecked Sendable {
    public let lazy: LazyBackend
    public let slots: SwapSlots

    public init(lazy: LazyBackend, slots: SwapSlots) {
        self.lazy = lazy
        self.slots = slots
    }

    public var size: UInt64 { lazy.size }
    public var capabilities: BackendCapabilities { lazy.capabilities }
    private var geometry: PageGeometry { lazy.geometry }

    public func read(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64, nonBlocking: Bool) throws -> Int {
        try lazy.read(into: buffer, offset: offset, nonBlocking: nonBlocking)
    }

    public func write(from buffer: UnsafeRawBufferPointer, offset: UInt64, fua: Bool, nonBlocking: Bool) throws -> Int {
        if nonBlocking { return 0 }
        guard slots.stagingState == .open else {
            let n = try lazy.write(from: buffer, offset: offset, fua: fua, nonBlocking: false)
            slots.unmap(geometry.pages(covering: offset, length: UInt64(buffer.count)))
            return n
        }
        try stage(buffer, offset: offset)
        if fua { try lazy.flush() }
        return buffer.count
    }

    /// Splits a WRITE into slots while staging is open: runs of data slots are written as one write
    /// each, marker slots are mapped.
    private func stage(_ buffer: UnsafeRawBufferPointer, offset: UInt64) throws {
        let pageSize = geometry.pageSize
        var pos = 0
        var dataStart = 0
        func flushData(upTo end: Int) throws {
            guard end > dataStart else { return }
            let part = UnsafeRawBufferPointer(rebasing: buffer[dataStart ..< end])
            let at = offset + UInt64(dataStart)
            _ = try lazy.write(from: part, offset: at, fua: false, nonBlocking: false)
            slots.unmap(geometry.pages(covering: at, length: UInt64(part.count)))
        }
        while pos < buffer.count {
            let at = offset + UInt64(pos)
            // Only whole, aligned slots can hold a marker.
            guard at % pageSize == 0, buffer.count - pos >= Int(pageSize) else {
                pos = buffer.count
                break
            }
            let slotBytes = UnsafeRawBufferPointer(rebasing: buffer[pos ..< pos + Int(pageSize)])
            if case .marker(let page)? = slots.decode(slotBytes) {
                try flushData(upTo: pos)
                let slot = at / pageSize
                do {
                    try lazy.lazyStore.restage(slot ..< slot + 1) {
                        guard slots.map(slot: slot, toPage: page) else { throw SealedMeanwhile() }
                    }
                    dataStart = pos + Int(pageSize)
                } catch is SealedMeanwhile {
                    // sealed since the decode: this slot is data, the start of the next data run
                    dataStart = pos
                }
            }
            pos += Int(pageSize)
        }
        try flushData(upTo: buffer.count)
    }

    private struct SealedMeanwhile: Error {}

    public func flush() throws { try lazy.flush() }

    public func trim(offset: UInt64, length: UInt64, fua: Bool) throws {
        try lazy.trim(offset: offset, length: length, fua: fua)
        slots.unmap(geometry.pages(covering: offset, length: length))
    }

    public func zero(offset: UInt64, length: UInt64, mayTrim: Bool, fast: Bool, fua: Bool) throws {
        try lazy.zero(offset: offset, length: length, mayTrim: mayTrim, fast: fast, fua: fua)
        slots.unmap(geometry.pages(covering: offset, length: length))
    }

    public func cache(offset: UInt64, length: UInt64) throws { try lazy.cache(offset: offset, length: length) }

    public func blockStatus(offset: UInt64, length: UInt64, maxExtents: Int) throws -> [NBDExtent] {
        try lazy.blockStatus(offset: offset, length: length, maxExtents: maxExtents)
    }

    public func close() throws { try lazy.close() }

    public func prepare(offset: UInt64, length: UInt64, forWrite: Bool, eventLoop: any EventLoop) -> EventLoopFuture<Void>? {
        lazy.prepare(offset: offset, length: length, forWrite: forWrite, eventLoop: eventLoop)
    }

    public func pendingRead(offset: UInt64, length: UInt64, eventLoop: any EventLoop,
                            early: (@Sendable (ByteBuffer) -> Void)?) -> EventLoopFuture<ByteBuffer>? {
        lazy.pendingRead(offset: offset, length: length, eventLoop: eventLoop, early: early)
    }
}
