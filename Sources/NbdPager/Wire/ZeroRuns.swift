import NIOCore

/// Read replies that carry zero blocks as NBD_REPLY_TYPE_OFFSET_HOLE chunks instead of data.
///
/// A structured read reply may describe a range as a hole: the client fills it with zeros and nothing
/// but a 32-byte chunk crosses the wire. Guest RAM is full of zero pages that were written once (so the
/// file's allocation map calls them data), and a lazy destination pulling them would otherwise move
/// every zero byte over the link.
public enum ZeroRuns {
    /// Zero runs are found in blocks of this many bytes (relative to the start of the read).
    public static let granularity = 4096

    /// Whether every byte of `bytes` is zero.
    public static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        guard let base = bytes.baseAddress else { return true }
        let count = bytes.count
        var i = 0
        // 64 bytes per step, OR-ed together: one branch per cache line.
        while i + 64 <= count {
            var acc: UInt64 = 0
            for w in 0 ..< 8 { acc |= base.loadUnaligned(fromByteOffset: i + w * 8, as: UInt64.self) }
            if acc != 0 { return false }
            i += 64
        }
        while i < count {
            if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
            i += 1
        }
        return true
    }

    /// `bytes` cut into alternating runs of non-zero and all-zero blocks (`granularity` bytes, the last
    /// one may be shorter) that cover it from start to end.
    public static func runs(_ bytes: UnsafeRawBufferPointer, granularity: Int = granularity) -> [(range: Range<Int>, zero: Bool)] {
        var out: [(range: Range<Int>, zero: Bool)] = []
        var start = 0
        while start < bytes.count {
            let end = min(bytes.count, start + max(1, granularity))
            let zero = isZero(UnsafeRawBufferPointer(rebasing: bytes[start ..< end]))
            if let last = out.last, last.zero == zero {
                out[out.count - 1].range = last.range.lowerBound ..< end
            } else {
                out.append((start ..< end, zero))
            }
            start = end
        }
        return out
    }

    /// The structured reply to a read of `dataLength` bytes at `offset`, given as one OFFSET_DATA chunk
    /// in `reply` (its header of `headerLength` bytes, then the data): the same reply with the zero
    /// blocks as OFFSET_HOLE chunks, or `reply` itself when it has none, when it is shorter than one
    /// block, or when `dontFragment` forbids more than one chunk and the data is not all zero.
    public static func withHoles(_ reply: ByteBuffer, headerLength: Int, dataLength: Int, offset: UInt64,
                                 cookie: UInt64, dontFragment: Bool) -> ByteBuffer {
        guard dataLength >= granularity, reply.readableBytes == headerLength + dataLength else { return reply }
        let runs = reply.withUnsafeReadableBytes { all in
            Self.runs(UnsafeRawBufferPointer(rebasing: all[headerLength ..< headerLength + dataLength]))
        }
        if !runs.contains(where: { $0.zero }) { return reply }
        if runs.count > 1 && dontFragment { return reply }
        let dataBytes = runs.reduce(0) { $0 + ($1.zero ? 0 : $1.range.count) }
        var out = ByteBuffer()
        out.reserveCapacity(runs.count * 32 + dataBytes)
        for (i, run) in runs.enumerated() {
            let flags: NBDReplyFlags = i == runs.count - 1 ? .done : []
            let at = offset + UInt64(run.range.lowerBound)
            if run.zero {
                out.writeStructuredReplyHeader(flags: flags, type: .offsetHole, cookie: cookie, length: 12)
                out.writeInteger(at)
                out.writeInteger(UInt32(run.range.count))
            } else {
                out.writeStructuredReplyHeader(flags: flags, type: .offsetData, cookie: cookie,
                                               length: UInt32(8 + run.range.count))
                out.writeInteger(at)
                reply.withUnsafeReadableBytes { all in
                    _ = out.writeBytes(UnsafeRawBufferPointer(
                        rebasing: all[headerLength + run.range.lowerBound ..< headerLength + run.range.upperBound]))
                }
            }
        }
        return out
    }
}
