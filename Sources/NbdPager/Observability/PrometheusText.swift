/// Prometheus text exposition format (version 0.0.4): metric families, each with one HELP and TYPE
/// line and its samples together, labels escaped as the format says.
public struct PrometheusText {
    public enum Kind: String { case counter, gauge, histogram }

    private var order: [String] = []
    private var families: [String: (kind: Kind, help: String, lines: [String])] = [:]

    public init() {}

    /// One sample of family `name` (for a histogram: use `histogram`).
    public mutating func add(_ name: String, _ kind: Kind, help: String, labels: [(String, String)] = [], value: Double) {
        line(name, kind, help: help, sample: name, labels: labels, value: value)
    }

    public mutating func histogram(_ name: String, help: String, labels: [(String, String)], _ h: BucketHistogram) {
        let (cumulative, sum) = h.snapshot()
        for (i, bound) in BucketHistogram.bounds.enumerated() {
            line(name, .histogram, help: help, sample: name + "_bucket", labels: labels + [("le", Self.number(bound))],
                 value: Double(cumulative[i]))
        }
        let total = Double(cumulative.last ?? 0)
        line(name, .histogram, help: help, sample: name + "_bucket", labels: labels + [("le", "+Inf")], value: total)
        line(name, .histogram, help: help, sample: name + "_sum", labels: labels, value: sum)
        line(name, .histogram, help: help, sample: name + "_count", labels: labels, value: total)
    }

    private mutating func line(_ family: String, _ kind: Kind, help: String, sample: String, labels: [(String, String)], value: Double) {
        if families[family] == nil {
            order.append(family)
            families[family] = (kind, help, [])
        }
        let labelText = labels.isEmpty ? "" : "{" + labels.map { "\($0.0)=\"\(Self.escape($0.1))\"" }.joined(separator: ",") + "}"
        families[family]?.lines.append("\(sample)\(labelText) \(Self.number(value))")
    }

    public var text: String {
        var out = ""
        for name in order {
            guard let f = families[name] else { continue }
            out += "# HELP \(name) \(f.help.replacingBackslashesAndNewlines())\n# TYPE \(name) \(f.kind.rawValue)\n"
            for l in f.lines { out += l + "\n" }
        }
        return out
    }

    static func escape(_ s: String) -> String {
        var out = ""
        for c in s {
            switch c {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "\n": out += "\\n"
            default: out.append(c)
            }
        }
        return out
    }

    static func number(_ v: Double) -> String {
        if v.isNaN { return "NaN" }
        if v.isInfinite { return v > 0 ? "+Inf" : "-Inf" }
        if v == v.rounded() && abs(v) < 1e15 { return String(Int64(v)) }
        return "\(v)"
    }
}

extension String {
    fileprivate func replacingBackslashesAndNewlines() -> String {
        var out = ""
        for c in self {
            switch c {
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            default: out.append(c)
            }
        }
        return out
    }
}
