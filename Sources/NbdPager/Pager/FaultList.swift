#if canImport(Glibc)
import Glibc
#endif

/// The text format of `--hot-list` and `--record-faults`: one byte range per line, "OFFSET LENGTH"
/// (decimal bytes, or sizes such as 4K, 2M); '#' starts a comment, blank lines are ignored.
public enum FaultList {
    public struct ParseError: Error, CustomStringConvertible {
        public var description: String
    }

    /// Parses `text`; every range must lie within `size` bytes.
    public static func parse(_ text: String, size: UInt64, source: String) throws -> [Range<UInt64>] {
        var ranges: [Range<UInt64>] = []
        for (index, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = (raw.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first ?? "")
                .trimmingCharacters(in: " \t\r")
            if line.isEmpty { continue }
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            func bad(_ why: String) -> ParseError {
                ParseError(description: "\(source) line \(index + 1): \(why): '\(line)'")
            }
            guard fields.count == 2 else { throw bad("expected OFFSET LENGTH") }
            let offset: UInt64, length: UInt64
            do {
                offset = try SizeParser.parse(String(fields[0]))
                length = try SizeParser.parse(String(fields[1]))
            } catch {
                throw bad("\(error)")
            }
            guard length > 0 else { throw bad("length is zero") }
            guard offset < size, length <= size - offset else { throw bad("range is outside the export of \(size) bytes") }
            ranges.append(offset ..< offset + length)
        }
        return ranges
    }

    /// Reads and parses a file.
    public static func read(path: String, size: UInt64) throws -> [Range<UInt64>] {
        let bytes: [UInt8]
        do {
            bytes = try Sys.readFile(path, limit: 256 << 20)
        } catch let e as SystemError where e.errno == EFBIG {
            throw ParseError(description: "\(path) is larger than 256 MiB")
        }
        return try parse(String(decoding: bytes, as: UTF8.self), size: size, source: path)
    }

    /// Appends `text` to the file at `path` (created if missing).
    public static func append(_ text: String, to path: String) throws {
        let fd = try Sys.open(path, flags: O_WRONLY | O_APPEND | O_CREAT, operation: "open \(path)")
        defer { close(fd) }
        try Sys.writeAll(fd, Array(text.utf8), what: path)
    }
}

extension Substring {
    fileprivate func trimmingCharacters(in set: String) -> String {
        var s = self[...]
        while let c = s.first, set.contains(c) { s = s.dropFirst() }
        while let c = s.last, set.contains(c) { s = s.dropLast() }
        return String(s)
    }
}
