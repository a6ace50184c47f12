/// Parses sizes the way nbdkit and qemu-img accept them: `4096`, `64K`, `512M`, `2G`, `1T`
/// (binary multiples; an optional trailing `B` or `iB` is allowed, case does not matter).
public enum SizeParser {
    public enum Failure: Error, CustomStringConvertible, Equatable {
        case empty
        case invalid(String)
        case tooLarge(String)

        public var description: String {
            switch self {
            case .empty: return "empty size"
            case .invalid(let s): return "invalid size '\(s)' (expected a number with an optional K, M, G or T suffix, e.g. 512M)"
            case .tooLarge(let s): return "size '\(s)' is too large"
            }
        }
    }

    public static func parse(_ text: String) throws(Failure) -> UInt64 {
        let s = text.trimmingASCIISpaces()
        guard !s.isEmpty else { throw .empty }
        var digits = Substring(s)
        var suffix = ""
        while let last = digits.last, !last.isNumber {
            suffix = String(last) + suffix
            digits = digits.dropLast()
        }
        guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && $0.isNumber }) else { throw .invalid(text) }
        guard let base = UInt64(digits) else { throw .tooLarge(text) }
        var unit = suffix.uppercased()
        if unit.count == 3 && unit.hasSuffix("IB") {
            unit.removeLast(2)  // KiB, MiB, ...
        } else if unit.hasSuffix("B") && !unit.hasSuffix("IB") {
            unit.removeLast()   // B, KB, MB, ...
        }
        let shift: UInt64
        switch unit {
        case "": shift = 0
        case "K": shift = 10
        case "M": shift = 20
        case "G": shift = 30
        case "T": shift = 40
        case "P": shift = 50
        default: throw .invalid(text)
        }
        guard base <= (UInt64.max >> shift) else { throw .tooLarge(text) }
        return base << shift
    }
}

extension String {
    /// The string without leading and trailing spaces and tabs.
    public func trimmingASCIISpaces() -> String {
        var s = Substring(self)
        while s.first == " " || s.first == "\t" { s.removeFirst() }
        while s.last == " " || s.last == "\t" { s.removeLast() }
        return String(s)
    }
}
