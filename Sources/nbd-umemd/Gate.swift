import ArgumentParser
import NbdPager

struct Gate: ControlActionVerb {
    static let configuration = CommandConfiguration(
        abstract: "Open the pull gate of a lazy export started with serve --gated.",
        discussion: """
        Until the gate opens, the daemon sends its source nothing: demand misses wait, the background \
        pull has not started. `gate open` releases the waiting misses at once, starts the background \
        pull and reads the source's allocation map. Opening an open gate does nothing. Prints the \
        daemon's JSON reply (released_pulls: the misses that were waiting).

        Example (live migration: open it when the source VM has stopped):
          nbd-umemd gate open --control /run/vm1.ctl
        """
    )

    @Argument(help: ArgumentHelp("open", valueName: "action"))
    var action: String

    @OptionGroup var socket: ControlSocket

    typealias Command = GateCommand
    typealias Action = GateCommand.Action
    static func command(_ action: Action) -> Command { Command(action: action) }
}
