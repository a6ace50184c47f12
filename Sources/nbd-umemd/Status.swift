import ArgumentParser
import NbdPager

struct Status: ControlVerb {
    static let configuration = CommandConfiguration(
        abstract: "Print a running daemon's status as JSON (page counts, bytes pulled, miss latency, ...).",
        discussion: """
        Example:
          nbd-umemd serve --source nbd://src:10809 --store /var/lib/umemd --unix /run/umemd.sock --control /run/umemd.ctl &
          nbd-umemd status --control /run/umemd.ctl
        """
    )

    @OptionGroup var socket: ControlSocket

    var command: StatusCommand? { StatusCommand() }
}

/// The options of the subcommands that talk to a running daemon.
struct ControlSocket: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("The daemon's control socket (serve --control).", valueName: "path"))
    var control: String

    @Option(name: .long, help: ArgumentHelp("The export the command is for (default: the one that answers it).", valueName: "name"))
    var export: String?
}

/// A subcommand that sends one control command to a running daemon and prints its JSON reply;
/// exits 1 when the reply says the command failed.
protocol ControlVerb: ParsableCommand {
    associatedtype Command: ControlCommand
    /// The command the arguments ask for (nil: invalid arguments).
    var command: Command? { get }
    var socket: ControlSocket { get }
}

extension ControlVerb {
    func run() throws {
        guard let command else { throw ValidationError("invalid arguments") }
        let (reply, json) = try ControlClient.send(command, export: socket.export, to: socket.control)
        print(json.rendered)
        if case .failure = reply { throw ExitCode(1) }
    }
}

/// A control verb whose argument is an action (`prefetch pause`, `gate open`).
protocol ControlActionVerb: ControlVerb {
    associatedtype Action: RawRepresentable & CaseIterable where Action.RawValue == String
    var action: String { get }
    static func command(_ action: Action) -> Command
}

extension ControlActionVerb {
    var command: Command? { Action(rawValue: action).map(Self.command) }

    func validate() throws {
        guard Action(rawValue: action) != nil else {
            let all = Action.allCases.map(\.rawValue).joined(separator: " or ")
            throw ValidationError("action must be \(all), got '\(action)'")
        }
    }
}
