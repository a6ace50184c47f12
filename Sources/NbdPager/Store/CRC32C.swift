/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table-driven (slicing-by-8), pure Swift.
///
/// `CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283`. Incremental use:
/// `var c = CRC32C(); c.update(a); c.update(b); c.value`.
public struct CRC32C: Sendable, Hashable {
    private var state: UInt32 = 0xFFFF_FFFF

    public init() {}

    /// The checksum of everything passed to `update` so far.
    public var value: UInt32 { ~state }

    public mutating func update(_ buffer: UnsafeRawBufferPointer) {
        state = Self.tables.withUnsafeBufferPointer { Self.update(state, buffer, $0) }
    }

    public mutating func update(_ bytes: some Sequence<UInt8>) {
        let array = Array(bytes)
        array.withUnsafeBytes { update($0) }
    }

    public static func checksum(_ buffer: UnsafeRawBufferPointer) -> UInt32 {
        var c = CRC32C()
        c.update(buffer)
        return c.value
    }

    public static func checksum(_ bytes: some Sequence<UInt8>) -> UInt32 {
        var c = CRC32C()
        c.update(bytes)
        return c.value
    }

    static let polynomial: UInt32 = 0x82F6_3B78

    /// 8 tables of 256 entries: table k maps a byte to its CRC contribution k bytes further back.
    static let tables: [UInt32] = {
        var t = [UInt32](repeating: 0, count: 8 * 256)
        for i in 0 ..< 256 {
            var c = UInt32(i)
            for _ in 0 ..< 8 {
                c = (c & 1) != 0 ? (c >> 1) ^ polynomial : c >> 1
            }
            t[i] = c
        }
        for k in 1 ..< 8 {
            for i in 0 ..< 256 {
                let prev = t[(k - 1) * 256 + i]
                t[k * 256 + i] = (prev >> 8) ^ t[Int(prev & 0xFF)]
            }
        }
        return t
    }()

    private static func update(_ crc: UInt32, _ buffer: UnsafeRawBufferPointer, _ t: UnsafeBufferPointer<UInt32>) -> UInt32 {
        guard let base = buffer.baseAddress else { return crc }
        var c = crc
        var i = 0
        let n = buffer.count
        while n - i >= 8 {
            let word = UInt64(littleEndian: base.loadUnaligned(fromByteOffset: i, as: UInt64.self))
            let lo = UInt32(truncatingIfNeeded: word) ^ c
            let hi = UInt32(truncatingIfNeeded: word >> 32)
            c = t[7 * 256 + Int(lo & 0xFF)]
                ^ t[6 * 256 + Int((lo >> 8) & 0xFF)]
                ^ t[5 * 256 + Int((lo >> 16) & 0xFF)]
                ^ t[4 * 256 + Int(lo >> 24)]
                ^ t[3 * 256 + Int(hi & 0xFF)]
                ^ t[2 * 256 + Int((hi >> 8) & 0xFF)]
                ^ t[1 * 256 + Int((hi >> 16) & 0xFF)]
                ^ t[Int(hi >> 24)]
            i += 8
        }
        while i < n {
            let b = base.load(fromByteOffset: i, as: UInt8.self)
            c = (c >> 8) ^ t[Int((c ^ UInt32(b)) & 0xFF)]
            i += 1
        }
        return c
    }
}
