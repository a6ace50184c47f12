/// Answers the control socket's requests: the daemon's own commands (`status`) and those of its
/// exports' kinds (`prefetch`, `gate` for lazy exports), each decoded and answered as its type says.
struct ControlDispatcher: Sendable {
    let exports: [RunningExport]
    let server: NBDServer
    let swap: Bool

    /// The daemon's own commands: one `on` line per command.
    static let commands = ControlHandlers<ControlDispatcher>()
        .on(StatusCommand.self) { daemon, request in try daemon.statusResult(export: request.export).get() }

    /// One request line in, one reply line out.
    func handle(_ line: [UInt8]) -> [UInt8] {
        let header: ControlRequestHeader
        do {
            header = try ControlCodec.decode(ControlRequestHeader.self, from: line)
        } catch {
            return ControlCodec.failure("malformed request (expected one JSON object with a \"command\"): \(error)")
        }
        let command = header.command
        if let named = header.export, !exports.contains(where: { $0.name == named }) {
            return ControlCodec.failure("no export named '\(named)' (exports: \(exports.map { "'\($0.name)'" }.joined(separator: ", ")))")
        }
        do {
            if let handler = Self.commands.handler(for: command) {
                return try handler(self, line)
            }
            let candidates = exports.filter { header.export == nil || $0.name == header.export }
            let answering = candidates.filter { $0.kindType.commandNames.contains(command) }
            guard let target = answering.first else {
                let known = Set(Self.commands.names + ExportKinds.commandNames).sorted()
                guard known.contains(command) else {
                    return ControlCodec.failure("unknown command '\(command)' (known: \(known.joined(separator: ", ")))")
                }
                let kinds = ExportKinds.registered.filter { $0.commandNames.contains(command) }.map { $0.kindName }
                let which = candidates.map { "'\($0.name)' (\($0.kindName))" }.joined(separator: ", ")
                return ControlCodec.failure("'\(command)' is answered by \(kinds.joined(separator: ", ")) exports only, not by \(which)")
            }
            guard answering.count == 1 else {
                let names = answering.map { "'\($0.name)'" }.joined(separator: ", ")
                return ControlCodec.failure("several exports answer '\(command)' (\(names)): name one")
            }
            guard let reply = try target.kindType.answer(command, on: target.opened, line: line) else {
                return ControlCodec.failure("export '\(target.name)' does not answer '\(command)'")
            }
            return reply
        } catch {
            return ControlCodec.failure("malformed '\(command)' request: \(error)")
        }
    }

    /// The daemon's status; with `export`, only that export's.
    func statusResult(export name: String?) -> Result<DaemonStatus, ControlError> {
        let chosen = exports.filter { name == nil || $0.name == name }
        guard !chosen.isEmpty else { return .failure(ControlError("no export named '\(name ?? "")'")) }
        let statuses = chosen.map { e in
            var fields = e.opened.statusFields()
            if case .object(var f) = fields {
                f.append(("requests", e.export.stats.statusValue))
                fields = .object(f)
            }
            return ExportStatus(export: e.export.info.name, kind: e.kindName, size: e.export.info.size,
                                readOnly: e.export.info.readOnly, fields: fields)
        }
        return .success(DaemonStatus(connections: server.connectionCount, swap: swap ? SwapMode.status() : nil,
                                     exports: statuses))
    }
}
