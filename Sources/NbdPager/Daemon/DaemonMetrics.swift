/// What `--metrics` serves: the daemon's status as Prometheus metrics, built at each scrape from the
/// same snapshot `nbd-umemd status` prints (so the two agree), plus the latency histograms.
///
/// - `nbd_umemd_connections`, `nbd_umemd_connections_refused_total`;
/// - per export and command: `nbd_umemd_requests_total`, `nbd_umemd_request_bytes_total`,
///   `nbd_umemd_request_errors_total`, `nbd_umemd_request_duration_seconds` (histogram);
/// - per export, the kind's numeric status fields as `nbd_umemd_<field>` (counters end in `_total`:
///   bytes pulled, demand misses, background bytes, source outages and reconnects, store commits...;
///   `pages` by state), and its histograms (lazy: demand-miss latency, store commit duration).
struct DaemonMetrics {
    let exports: [RunningExport]
    let server: NBDServer
    let dispatcher: ControlDispatcher

    /// Status fields that only grow: exposed as counters (`_total`).
    static let counterFields: Set<String> = [
        "bytes_pulled", "demand_misses", "writes", "bytes_written", "background_bytes", "source_outages",
        "source_reconnects", "commits", "markers_decoded", "duplicate_markers",
    ]

    func render() -> String {
        var p = PrometheusText()
        p.add("nbd_umemd_connections", .gauge, help: "Client connections open.", value: Double(server.connectionCount))
        p.add("nbd_umemd_connections_refused_total", .counter,
              help: "Client connections refused (--allow, --max-connections).", value: Double(server.refusedConnections))
        let status = (try? dispatcher.statusResult(export: nil).get())
        for e in exports {
            let export = e.export.info.name
            let base = [("export", export)]
            p.add("nbd_umemd_export_size_bytes", .gauge, help: "Export size.", labels: base + [("kind", e.kindName)],
                  value: Double(e.export.info.size))
            for command in RequestStats.commands {
                let c = e.export.stats.counts(command)
                let labels = base + [("command", RequestStats.name(command))]
                p.add("nbd_umemd_requests_total", .counter, help: "NBD requests answered (errors included).",
                      labels: labels, value: Double(c.requests))
                p.add("nbd_umemd_request_bytes_total", .counter, help: "Bytes of the NBD requests answered without error.",
                      labels: labels, value: Double(c.bytes))
                p.add("nbd_umemd_request_errors_total", .counter, help: "NBD requests answered with an error (or refused).",
                      labels: labels, value: Double(c.errors))
                if let h = e.export.stats.latency(command) {
                    p.histogram("nbd_umemd_request_duration_seconds", help: "From a request's arrival to its reply.",
                                labels: labels, h)
                }
            }
            if let fields = status?.exports.first(where: { $0.export == export })?.fields, case .object(let list) = fields {
                for (key, value) in list where key != "requests" {
                    add(&p, key: key, value: value, labels: base)
                }
            }
            for (name, help, h) in e.opened.histograms() {
                p.histogram("nbd_umemd_" + name, help: help, labels: base, h)
            }
        }
        return p.text
    }

    /// A status field as a metric: numbers and booleans (1/0); `pages` as one gauge by state.
    private func add(_ p: inout PrometheusText, key: String, value: JSONValue, labels: [(String, String)]) {
        let number: Double?
        switch value {
        case .int(let v): number = Double(v)
        case .unsigned(let v): number = Double(v)
        case .double(let v): number = v
        case .bool(let v): number = v ? 1 : 0
        case .object(let inner) where key == "pages":
            for (state, v) in inner {
                if case .unsigned(let n) = v {
                    p.add("nbd_umemd_pages", .gauge, help: "Pages of the export by state (status: pages).",
                          labels: labels + [("state", state)], value: Double(n))
                }
            }
            return
        case .string(let s) where key == "gate":
            number = s == "closed" ? 1 : 0
            p.add("nbd_umemd_gate_closed", .gauge, help: "The pull gate is closed (status: gate).", labels: labels, value: number ?? 0)
            return
        default: number = nil
        }
        // (percentiles in µs are the histograms' job; rates get their unit spelled out)
        guard let number, !key.hasSuffix("_us") else { return }
        let key = key.hasSuffix("_bps") ? String(key.dropLast(4)) + "_bytes_per_second" : key
        if Self.counterFields.contains(key) {
            p.add("nbd_umemd_\(key)_total", .counter, help: "status: \(key)", labels: labels, value: number)
        } else {
            p.add("nbd_umemd_\(key)", .gauge, help: "status: \(key)", labels: labels, value: number)
        }
    }
}
