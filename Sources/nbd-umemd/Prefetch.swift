import ArgumentParser

struct Prefetch: ControlVerb {
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

    static let verb = "prefetch"
    static let actions = ["pause", "resume"]

    @Argument(help: ArgumentHelp("pause or resume", valueName: "action"))
    var action: String

    @OptionGroup var socket: ControlSocket
}
