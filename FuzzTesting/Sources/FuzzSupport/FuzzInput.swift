/// Reads a fuzz input front to back: fixed-width fields, then the rest as bytes. Reading past the end
/// yields zeros, so every input, however short, decodes to something.
public struct FuzzInput {
    public let bytes: UnsafeRawBufferPointer
    public private(set) var position = 0

    public init(_ bytes: UnsafeRawBufferPointer) {
        self.bytes = bytes
    }

    public var remaining: Int { bytes.count - position }
    public var isEmpty: Bool { remaining == 0 }

    public mutating func byte() -> UInt8 {
        guard position < bytes.count else { return 0 }
        defer { position += 1 }
        return bytes[position]
    }

    public mutating func bool() -> Bool { byte() & 1 == 1 }

    /// A little-endian integer of `T`'s width (zero-filled past the end).
    public mutating func integer<T: FixedWidthInteger & UnsignedInteger>(_: T.Type = T.self) -> T {
        var v: T = 0
        for i in 0 ..< MemoryLayout<T>.size {
            v |= T(byte()) << (i * 8)
        }
        return v
    }

    /// Up to `count` bytes (fewer at the end of the input).
    public mutating func bytes(upTo count: Int) -> UnsafeRawBufferPointer {
        let n = max(0, min(count, remaining))
        defer { position += n }
        return UnsafeRawBufferPointer(rebasing: bytes[position ..< position + n])
    }

    /// Everything not read yet.
    public mutating func rest() -> UnsafeRawBufferPointer {
        bytes(upTo: remaining)
    }
}

/// A small deterministic generator (SplitMix64) for choices derived from the input, such as chunk sizes.
public struct SplitMix64 {
    private var state: UInt64

    public init(seed: UInt64) {
        state = seed
    }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// A value in `range`.
    public mutating func next(in range: ClosedRange<Int>) -> Int {
        range.lowerBound + Int(next() % UInt64(range.count))
    }
}

/// Stops the run with `message` when an invariant does not hold: libFuzzer records it as a crash and
/// saves the input.
@inline(__always)
public func require(_ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String,
                    file: StaticString = #fileID, line: UInt = #line) {
    if !condition() {
        fatalError("fuzz invariant: \(message())", file: file, line: line)
    }
}
