/// The marker the stager writes into every page of a RAM file before pushing it out to a swap export:
/// the daemon reads it back from the swap-out WRITE and learns which source page the slot stands for.
///
/// Layout of one 4 KiB page (little endian):
///
///     0 ..< 8     magic "UMEMSTG1"
///     8 ..< 16    source page index
///     16 ..< 24   SipHash-2-4 of bytes 0 ..< 16 under the run's 128-bit key
///     24 ..< 4096 zero
///
/// A marker is never all zero (the kernel does not write zero pages to swap at all). The key is
/// random per staging run and handed out only while staging is open, so a page a guest happens to
/// fill with this layout (or an old run's marker) does not decode; after sealing nothing decodes.
public struct StagingMarker: Sendable, Equatable {
    public static let size = 4096
    public static let magic: [UInt8] = Array("UMEMSTG1".utf8)

    /// The 128-bit key of a staging run.
    public struct Key: Sendable, Equatable {
        public var k0: UInt64
        public var k1: UInt64

        public init(k0: UInt64, k1: UInt64) {
            self.k0 = k0
            self.k1 = k1
        }

        /// A fresh random key.
        public static func random() -> Key {
            var g = SystemRandomNumberGenerator()
            return Key(k0: g.next(), k1: g.next())
        }

        /// 32 hex digits.
        public var hex: String {
            func h(_ v: UInt64) -> String {
                let s = String(v, radix: 16)
                return String(repeating: "0", count: 16 - s.count) + s
            }
            return h(k0) + h(k1)
        }

        /// Parses 32 hex digits; nil otherwise.
        public init?(hex: String) {
            guard hex.utf8.count == 32, hex.utf8.allSatisfy({ $0 < 128 }),
                  let a = UInt64(hex.prefix(16), radix: 16), let b = UInt64(hex.suffix(16), radix: 16) else { return nil }
            self.init(k0: a, k1: b)
        }
    }

    /// What a 4 KiB slot of a WRITE holds, as far as staging is concerned.
    public enum Decoded: Sendable, Equatable {
        /// A valid marker for this source page.
        case marker(page: UInt64)
        /// Not a marker (guest data).
        case data
        /// Starts with the magic but does not authenticate (another key, a changed index, a torn or
        /// partial page): stored as data, and counted.
        case invalid
    }

    /// Writes the marker of `page` into `buffer` (at least `size` bytes; the rest of the page is zeroed).
    public static func encode(page: UInt64, key: Key, into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count >= size, "a staging marker needs \(size) bytes")
        let page4k = UnsafeMutableRawBufferPointer(rebasing: buffer[0 ..< size])
        page4k.initializeMemory(as: UInt8.self, repeating: 0)
        encodeHeader(page: page, key: key, into: page4k)
    }

    /// Writes only the first 24 bytes of the marker of `page` (into a page known to be zero).
    public static func encodeHeader(page: UInt64, key: Key, into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count >= 24, "a staging marker header needs 24 bytes")
        buffer.storeBytes(of: magicWord.littleEndian, toByteOffset: 0, as: UInt64.self)
        buffer.storeBytes(of: page.littleEndian, toByteOffset: 8, as: UInt64.self)
        buffer.storeBytes(of: SipHash24.hash(key: key, magicWord, page).littleEndian, toByteOffset: 16, as: UInt64.self)
    }

    /// The marker of `page` as bytes.
    public static func bytes(page: UInt64, key: Key) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: size)
        out.withUnsafeMutableBytes { encode(page: page, key: key, into: $0) }
        return out
    }

    /// Decodes one slot (`slot.count` must be `size` for a marker to be recognised at all).
    public static func decode(_ slot: UnsafeRawBufferPointer, key: Key) -> Decoded {
        guard slot.count >= 8, slot.loadUnaligned(fromByteOffset: 0, as: UInt64.self) == magicWord.littleEndian else {
            return .data
        }
        guard slot.count == size else { return .invalid }
        let page = UInt64(littleEndian: slot.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        let tag = UInt64(littleEndian: slot.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
        guard tag == SipHash24.hash(key: key, magicWord, page),
              PageStore.isAllZero(UnsafeRawBufferPointer(rebasing: slot[24...])) else { return .invalid }
        return .marker(page: page)
    }

    static let magicWord: UInt64 = magic.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
}


/// SipHash-2-4 (Aumasson and Bernstein) of a 16-byte message (two little-endian words): a keyed
/// pseudo-random function made for short inputs.
enum SipHash24 {
    /// The hash of the 16 bytes `m0`, `m1` (little endian).
    static func hash(key: StagingMarker.Key, _ m0: UInt64, _ m1: UInt64) -> UInt64 {
        var bytes = [UInt8](repeating: 0, count: 16)
        for j in 0 ..< 8 {
            bytes[j] = UInt8(truncatingIfNeeded: m0 >> (8 * UInt64(j)))
            bytes[8 + j] = UInt8(truncatingIfNeeded: m1 >> (8 * UInt64(j)))
        }
        return hash(key: key, bytes: bytes)
    }

    /// SipHash-2-4 of `bytes`.
    static func hash(key: StagingMarker.Key, bytes: [UInt8]) -> UInt64 {
        var v0: UInt64 = 0x736f_6d65_7073_6575 ^ key.k0
        var v1: UInt64 = 0x646f_7261_6e64_6f6d ^ key.k1
        var v2: UInt64 = 0x6c79_6765_6e65_7261 ^ key.k0
        var v3: UInt64 = 0x7465_6462_7974_6573 ^ key.k1
        func round() {
            v0 &+= v1; v1 = v1.rotl(13); v1 ^= v0; v0 = v0.rotl(32)
            v2 &+= v3; v3 = v3.rotl(16); v3 ^= v2
            v0 &+= v3; v3 = v3.rotl(21); v3 ^= v0
            v2 &+= v1; v1 = v1.rotl(17); v1 ^= v2; v2 = v2.rotl(32)
        }
        func compress(_ m: UInt64) {
            v3 ^= m
            round(); round()
            v0 ^= m
        }
        let whole = bytes.count / 8
        for i in 0 ..< whole {
            var m: UInt64 = 0
            for j in 0 ..< 8 { m |= UInt64(bytes[i * 8 + j]) << (8 * UInt64(j)) }
            compress(m)
        }
        var last = UInt64(bytes.count & 0xff) << 56
        for j in 0 ..< bytes.count % 8 { last |= UInt64(bytes[whole * 8 + j]) << (8 * UInt64(j)) }
        compress(last)
        v2 ^= 0xff
        round(); round(); round(); round()
        return v0 ^ v1 ^ v2 ^ v3
    }
}

extension UInt64 {
    @inline(__always) func rotl(_ n: UInt64) -> UInt64 { (self << n) | (self >> (64 - n)) }
}
