import ArgumentParser
import NbdPager
#if canImport(Glibc)
import Glibc
#endif

/// `serve --swap` needs PR_SET_IO_FLUSHER on every thread: set it now, before anything starts a
/// thread (re-executing if the runtime already has), so that every later thread inherits it.
let arguments = CommandLine.arguments
if arguments.count > 1, arguments[1] == "serve", arguments.contains("--swap") {
    SwapSafety.enterSwapModeEarly()
}

/// Entry point: parse, run, and turn every failure into one line on stderr and a non-zero exit.
do {
    var command = try NbdUmemd.parseAsRoot()
    try command.run()
} catch let code as ExitCode {
    exit(code.rawValue)  // the command has already said why
} catch {
    let code = NbdUmemd.exitCode(for: error)
    if code == .success {
        NbdUmemd.exit(withError: error)  // --help, --version
    }
    // ArgumentParser messages may span lines (usage hints); keep the first meaningful one.
    let lines = NbdUmemd.message(for: error).split(separator: "\n").map { String($0).trimmingASCIISpaces() }
    let message = lines.first { !$0.isEmpty } ?? "\(error)"
    let line = message.lowercased().hasPrefix("error") ? message : "error: \(message)"
    let bytes = Array("nbd-umemd: \(line)\n".utf8)
    _ = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    exit(code == .validationFailure ? 2 : max(code.rawValue, 1))
}
