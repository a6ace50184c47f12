import ArgumentParser

struct Prefetch: ParsableCommand {
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

    @Option(name: .long, help: ArgumentHelp("The daemon's control socket (serve --control).", valueName: "path"))
    var control: String

    func validate() throws {
        guard action == "pause" || action == "resume" else {
            throw ValidationError("action must be pause or resume, got '\(action)'")
        }
    }

    func run() throws {
        let reply = try ControlClient.send("prefetch \(action)", to: control)
        print(reply, terminator: "")
        if reply.contains("\"error\"") { throw ExitCode(1) }
    }
}
