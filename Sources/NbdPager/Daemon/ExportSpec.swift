/// One export's settings as `key=value` pairs: what `serve --export SPEC` (repeatable) takes, and what
/// the single-export options (`--file`, `--source`, `--fetch-size`, ...) are turned into, so both are
/// checked by the same code and say the same things.
///
/// A spec is a comma-separated list, `,,` standing for a comma inside a value (QEMU's convention):
///
///     name=ram0,memory=1G
///     name=disk,file=/var/lib/disk.img,readonly
///     name=vm1,source=nbds://src/ram,store=/var/lib/vm1,source-tls-psk=/etc/umemd/keys.psk,gated
///
/// Keys: `name` (default ""), exactly one of `file`, `memory`, `source`; `readonly`, `description`,
/// `min-block-size`; for `source`: `store` (required), `reset-store`, `fetch-size`,
/// `source-connections`, `source-timeout`, `prefetch`, `max-rate`, `prefetch-connections`,
/// `hot-list`, `record-faults`, `gated`, `progress`, `swap-size`, `source-tls-certificates`,
/// `source-tls-psk`, `source-tls-username`, `source-tls-verify-peer` (yes|no). A key without a
/// value is `yes`.
public enum ExportSpec {
    public struct Failure: Error, CustomStringConvertible, Sendable {
        public var description: String
    }

    /// How a key is named in messages: `--fetch-size` for the single-export options, `fetch-size=`
    /// in an `--export` spec.
    public enum Origin: Sendable {
        case options, spec(String)

        func name(_ key: String) -> String {
            switch self {
            case .options: return "--\(key)"
            case .spec: return "\(key)="
            }
        }

        func wrap(_ message: String) -> String {
            switch self {
            case .options: return message
            case .spec(let text): return "--export '\(text)': \(message)"
            }
        }
    }

    static let plainKeys: Set<String> = ["name", "file", "memory", "source", "readonly", "description", "min-block-size"]
    static let lazyKeys: Set<String> = [
        "store", "reset-store", "fetch-size", "source-connections", "source-timeout", "prefetch", "max-rate",
        "prefetch-connections", "hot-list", "record-faults", "gated", "progress", "swap-size",
        "source-tls-certificates", "source-tls-psk", "source-tls-username", "source-tls-verify-peer",
    ]

    /// Splits `text` into pairs (`,,` is a literal comma; a key without `=` gets the value "yes").
    public static func split(_ text: String) throws(Failure) -> [(String, String)] {
        var items: [String] = []
        var current = ""
        var chars = Array(text)[...]
        while let c = chars.popFirst() {
            if c == "," {
                if chars.first == "," { current.append(","); chars = chars.dropFirst(); continue }
                items.append(current)
                current = ""
            } else {
                current.append(c)
            }
        }
        items.append(current)
        var pairs: [(String, String)] = []
        for item in items {
            if item.isEmpty { throw Failure(description: "--export '\(text)': empty item (two commas in a row stand for a comma inside a value: ',,')") }
            if let eq = item.firstIndex(of: "=") {
                pairs.append((String(item[..<eq]), String(item[item.index(after: eq)...])))
            } else {
                pairs.append((item, "yes"))
            }
        }
        return pairs
    }

    /// An `--export` spec's export.
    public static func parse(_ text: String) throws(Failure) -> ExportConfiguration {
        try build(split(text), origin: .spec(text))
    }

    /// The export the pairs describe, every value checked.
    public static func build(_ pairs: [(String, String)], origin: Origin) throws(Failure) -> ExportConfiguration {
        func fail(_ message: String) -> Failure { Failure(description: origin.wrap(message)) }
        var values: [String: String] = [:]
        for (key, value) in pairs {
            guard plainKeys.contains(key) || lazyKeys.contains(key) else {
                throw fail("unknown key '\(key)' (keys: \((plainKeys.union(lazyKeys)).sorted().joined(separator: ", ")))")
            }
            guard values[key] == nil else { throw fail("\(origin.name(key)) is given twice") }
            values[key] = value
        }
        func n(_ key: String) -> String { origin.name(key) }
        func flag(_ key: String) throws(Failure) -> Bool {
            switch values[key] {
            case nil, "no"?, "false"?, "off"?: return false
            case "yes"?, "true"?, "on"?: return true
            case let v?: throw fail("\(n(key)) must be yes or no, got '\(v)'")
            }
        }
        func size(_ key: String) throws(Failure) -> UInt64? {
            guard let v = values[key] else { return nil }
            do { return try SizeParser.parse(v) } catch { throw fail("\(n(key)): \(error)") }
        }
        func int(_ key: String, _ range: ClosedRange<Int>, unit: String = "") throws(Failure) -> Int? {
            guard let v = values[key] else { return nil }
            guard let i = Int(v), range.contains(i) else {
                throw fail("\(n(key)) must be between \(range.lowerBound) and \(range.upperBound)\(unit), got '\(v)'")
            }
            return i
        }

        let chosen = ["file", "memory", "source"].filter { values[$0] != nil }
        if chosen.isEmpty { throw fail("one of \(n("file")), \(n("memory")) or \(n("source")) is required") }
        if chosen.count > 1 { throw fail("\(chosen.map(n).joined(separator: ", ")) cannot be used together") }
        let name = values["name"] ?? ""
        if name.utf8.count > 4096 { throw fail("\(n("name")) is longer than 4096 bytes") }
        let readOnly = try flag("readonly")
        let minBlock = try int("min-block-size", 1 ... 4096) ?? 1
        if ![1, 512, 1024, 2048, 4096].contains(minBlock) {
            throw fail("\(n("min-block-size")) must be 1, 512, 1024, 2048 or 4096")
        }

        let kind: any ExportKind
        if let path = values["file"] {
            kind = FileExport(path: path)
        } else if values["memory"] != nil {
            let bytes = try size("memory") ?? 0
            if bytes == 0 { throw fail("\(n("memory")) size must be greater than zero") }
            kind = MemoryExport(size: bytes)
        } else {
            kind = try lazy(values, n, fail: fail, flag: flag, size: size, int: int, readOnly: readOnly)
        }
        if values["source"] == nil, let extra = values.keys.filter({ lazyKeys.contains($0) }).sorted().first {
            throw fail("\(n(extra)) only applies to \(n("source"))")
        }
        return ExportConfiguration(name: name, kind: kind, description: values["description"], readOnly: readOnly,
                                   minimumBlockSize: UInt32(minBlock))
    }

    private static func lazy(
        _ values: [String: String], _ n: (String) -> String, fail: (String) -> Failure,
        flag: (String) throws(Failure) -> Bool, size: (String) throws(Failure) -> UInt64?,
        int: (String, ClosedRange<Int>, String) throws(Failure) -> Int?, readOnly: Bool
    ) throws(Failure) -> LazyExport {
        guard let source = values["source"] else { throw fail("no source") }
        guard let store = values["store"] else { throw fail("\(n("source")) needs \(n("store")) DIR") }
        var lazy = LazyExport(source: source, store: store)
        lazy.resetStore = try flag("reset-store")
        if let f = try size("fetch-size") {
            if f < 4096 || f > 32 << 20 || f & (f - 1) != 0 { throw fail("\(n("fetch-size")) must be a power of two from 4K to 32M") }
            lazy.fetchSize = f
        }
        lazy.sourceConnections = try int("source-connections", 1 ... 16, "") ?? lazy.sourceConnections
        lazy.sourceTimeout = try int("source-timeout", 1 ... 86_400, " seconds") ?? lazy.sourceTimeout
        if let p = values["prefetch"] {
            guard let mode = LazyExport.PrefetchMode(rawValue: p) else {
                throw fail("\(n("prefetch")) must be off, sequential or adaptive, got '\(p)'")
            }
            lazy.prefetch = mode
        }
        if let rate = try size("max-rate") {
            if rate == 0 { throw fail("\(n("max-rate")) must be greater than zero") }
            lazy.maxRate = rate
        }
        lazy.prefetchConnections = try int("prefetch-connections", 1 ... 16, "") ?? lazy.prefetchConnections
        lazy.hotList = values["hot-list"]
        lazy.recordFaults = values["record-faults"]
        lazy.gated = try flag("gated")
        lazy.progress = try flag("progress")
        if let swapSize = try size("swap-size") {
            if swapSize % 4096 != 0 { throw fail("\(n("swap-size")) must be a multiple of 4096 bytes") }
            if readOnly { throw fail("\(n("swap-size")) and \(n("readonly")) cannot be used together (a swap device is written)") }
            lazy.swapSize = swapSize
        }
        let tlsKeys = ["source-tls-certificates", "source-tls-psk", "source-tls-username", "source-tls-verify-peer"]
        if tlsKeys.contains(where: { values[$0] != nil }) {
            guard SourceTLS.uriRequiresTLS(source) else {
                throw fail("\(n("source-tls-*")) need a TLS source URI (nbds://HOST/NAME or nbds+unix:///NAME?socket=PATH)")
            }
            if values["source-tls-certificates"] != nil && values["source-tls-psk"] != nil {
                throw fail("\(n("source-tls-certificates")) and \(n("source-tls-psk")) cannot be used together")
            }
        }
        let verify = values["source-tls-verify-peer"] == nil ? true : try flag("source-tls-verify-peer")
        lazy.sourceTLS = SourceTLS(certificates: values["source-tls-certificates"], pskFile: values["source-tls-psk"],
                                   username: values["source-tls-username"], verifyPeer: verify)
        return lazy
    }
}
