/// Answers the control socket's requests: the daemon's own commands (`status`) and those of its
/// exports' kinds (`prefetch`, `gate` for lazy exports), each decoded and answered as its type says.
struct ControlDispatcher: Sendable {
    let exports: [RunningExport]
    let server: NBDServer
    let swap: Bool
    /// The daemon's own commands. Registration: one `on` line per command.
    private var daemonHandlers = ControlHandlers()
    /// Each export's commands, in export order.
    private let exportHandlers: [ControlHandlers]

    init(exports: [RunningExport], server: NBDServer, swap: Bool) {
        self.exports = exports
        self.server = server
        self.swap = swap
        self.exportHandlers = exports.map { $0.opened.controlHandlers }
        let this = self
        daemonHandlers.on(StatusCommand.self) { request in try this.statusResult(export: request.export).get() }
    }

    /// One request line in, one reply line out.
    func handle(_ line: [UInt8]) -> [UInt8] {
        let header: ControlRequestHeader
        do {
            header = try ControlCodec.decode(ControlRequestHeader.self, from: line)
        } catch {
            return ControlCodec.failure("malformed request (expected one JSON object with a \"command\"): \(error)")
        }
        if let named = header.export, !exports.contains(where: { $0.name == named }) {
            return ControlCodec.failure("no export named '\(named)' (exports: \(exports.map { "'\($0.name)'" }.joined(separator: ", ")))")
        }
        let handler: ControlHandlers.Handler
        if let h = daemonHandlers.handler(for: header.command) {
            handler = h
        } else {
            let candidates = exports.indices.filter { header.export == nil || exports[$0].name == header.export }
            let answering = candidates.compactMap { i in exportHandlers[i].handler(for: header.command).map { (i, $0) } }
            guard let first = answering.first else {
                let known = Set(daemonHandlers.names + ExportKinds.commandNames).sorted()
                guard known.contains(header.command) else {
                    return ControlCodec.failure("unknown command '\(header.command)' (known: \(known.joined(separator: ", ")))")
                }
                let kinds = ExportKinds.registered.filter { $0.commandNames.contains(header.command) }.map { $0.kindName }
                let which = candidates.map { "'\(exports[$0].name)' (\(exports[$0].kindName))" }.joined(separator: ", ")
                return ControlCodec.failure("'\(header.command)' is answered by \(kinds.joined(separator: ", ")) exports only, not by \(which)")
            }
            guard answering.count == 1 else {
                let names = answering.map { "'\(exports[$0.0].name)'" }.joined(separator: ", ")
                return ControlCodec.failure("several exports answer '\(header.command)' (\(names)): name one")
            }
            handler = first.1
        }
        do {
            return try handler(line)
        } catch {
            return ControlCodec.failure("malformed '\(header.command)' request: \(error)")
        }
    }

    /// The daemon's status; with `export`, only that export's.
    func statusResult(export name: String?) -> Result<DaemonStatus, ControlError> {
        let chosen = exports.filter { name == nil || $0.name == name }
        guard !chosen.isEmpty else { return .failure(ControlError("no export named '\(name ?? "")'")) }
        let statuses = chosen.map { e in
            ExportStatus(export: e.export.info.name, kind: e.kindName, size: e.export.info.size,
                         readOnly: e.export.info.readOnly, fields: e.opened.statusFields())
        }
        return .success(DaemonStatus(connections: server.connectionCount, swap: swap ? SwapMode.status() : nil,
                                     exports: statuses))
    }
}
