import ArgumentParser
#if canImport(Glibc)
import Glibc
#endif

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print a running daemon's status as JSON (page counts, bytes pulled, miss latency, ...).",
        discussion: """
        Example:
          nbd-umemd serve --source nbd://src:10809 --store /var/lib/umemd --unix /run/umemd.sock --control /run/umemd.ctl &
          nbd-umemd status --control /run/umemd.ctl
        """
    )

    @OptionGroup var socket: ControlSocket

    func run() throws {
        print(try ControlClient.send("status", to: socket.control), terminator: "")
    }
}

/// The --control option of the subcommands that talk to a running daemon.
struct ControlSocket: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("The daemon's control socket (serve --control).", valueName: "path"))
    var control: String
}

/// A subcommand that sends "VERB ACTION" to a running daemon and prints its JSON reply; exits 1 when
/// the reply is an error.
protocol ControlVerb: ParsableCommand {
    static var verb: String { get }
    static var actions: [String] { get }
    var action: String { get }
    var socket: ControlSocket { get }
}

extension ControlVerb {
    func validate() throws {
        guard Self.actions.contains(action) else {
            throw ValidationError("action must be \(Self.actions.joined(separator: " or ")), got '\(action)'")
        }
    }

    func run() throws {
        let reply = try ControlClient.send("\(Self.verb) \(action)", to: socket.control)
        print(reply, terminator: "")
        if reply.contains("\"error\"") { throw ExitCode(1) }
    }
}

/// Sends one command line to a control socket and returns the reply.
enum ControlClient {
    static func send(_ command: String, to path: String) throws -> String {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw RuntimeFailure("socket: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw RuntimeFailure("control socket path is too long: \(path)")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard connected == 0 else {
            throw RuntimeFailure("cannot connect to control socket \(path): \(String(cString: strerror(errno)))")
        }
        let request = Array((command + "\n").utf8)
        guard request.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == request.count else {
            throw RuntimeFailure("cannot send to control socket \(path): \(String(cString: strerror(errno)))")
        }
        var reply: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw RuntimeFailure("reading control socket \(path): \(String(cString: strerror(errno)))") }
            if n == 0 { break }
            reply.append(contentsOf: chunk[0 ..< n])
        }
        return String(decoding: reply, as: UTF8.self)
    }
}
