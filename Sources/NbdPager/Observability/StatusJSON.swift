/// A minimal JSON object writer for the control socket's status (flat keys, numbers, strings, booleans).
public struct JSONObject: Sendable {
    private var fields: [(String, String)] = []

    public init() {}

    public mutating func add(_ key: String, _ value: UInt64) { fields.append((key, String(value))) }
    public mutating func add(_ key: String, _ value: Int) { fields.append((key, String(value))) }
    /// A value between 0 and 1, with four decimals.
    public mutating func add(_ key: String, fraction value: Double) {
        fields.append((key, String((value * 10_000).rounded() / 10_000)))
    }
    public mutating func add(_ key: String, _ value: Bool) { fields.append((key, value ? "true" : "false")) }
    public mutating func add(_ key: String, _ value: String) { fields.append((key, Self.quote(value))) }
    public mutating func add(_ key: String, _ value: Double?) {
        guard let value, value.isFinite else { fields.append((key, "null")); return }
        fields.append((key, String((value * 10).rounded() / 10)))
    }
    public mutating func add(_ key: String, _ value: JSONObject) { fields.append((key, value.rendered(indent: 1))) }

    public var rendered: String { rendered(indent: 0) }

    func rendered(indent: Int) -> String {
        let pad = String(repeating: "  ", count: indent + 1)
        let body = fields.map { "\(pad)\(Self.quote($0.0)): \($0.1)" }.joined(separator: ",\n")
        return "{\n\(body)\n\(String(repeating: "  ", count: indent))}"
    }

    static func quote(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where u.value < 0x20:
                let hex = String(u.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(u)
            }
        }
        return out + "\""
    }
}

extension LazyBackend.Status {
    /// The lazy export's fields of the status object.
    public func addFields(to json: inout JSONObject) {
        var pagesObject = JSONObject()
        pagesObject.add("total", pages.pageCount)
        pagesObject.add("absent", pages.absent)
        pagesObject.add("present", pages.present)
        pagesObject.add("local", pages.local)
        json.add("page_size", pageSize)
        json.add("pages", pagesObject)
        json.add("bytes_pulled", bytesPulled)
        json.add("pulls_in_flight", pullsInFlight)
        json.add("demand_misses", demandMisses)
        json.add("miss_latency_p50_us", missLatencyP50Microseconds)
        json.add("miss_latency_p99_us", missLatencyP99Microseconds)
        json.add("source_connected", sourceConnected)
        json.add("complete", complete)
        json.add("gate", gated ? "closed" : "open")
        json.add("pulls_at_gate", pullsAtGate)
    }
}

extension Prefetcher.Status {
    /// The background-pull fields of `nbd-umemd status`.
    public func addFields(to json: inout JSONObject) {
        json.add("prefetch", mode.rawValue)
        json.add("prefetch_state", state.rawValue)
        json.add("background_bytes", backgroundBytes)
        json.add("background_rate_bps", rate)
        json.add("max_rate_bps", maxRate.map { Double($0) })
        json.add("progress", fraction: progress)
        json.add("eta_seconds", etaSeconds)
    }
}
