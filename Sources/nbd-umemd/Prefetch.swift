import ArgumentParser
import NbdPager

struct Prefetch: ControlActionVerb {
    static let configuration = CommandConfiguration(
        abstract: "Pause or resume a running lazy export's background pull.",
        discussion: """
        Paused, the daemon sends the source no background reads (demand misses are still pulled); \
        resumed, it carries on where it stopped. Prints the daemon's JSON reply.

        Example:
          nbd-umemd prefetch pause --control /run/umemd.ctl
          nbd-umemd prefetch resume --control /run/umemd.ctl
        """
    )

    @Argument(help: ArgumentHelp("pause or resume", valueName: "action"))
    var action: String

    @OptionGroup var socket: ControlSocket

    typealias Command = PrefetchCommand
    typealias Action = PrefetchCommand.Action
    static func command(_ action: Action) -> Command { Command(action: action) }
}
