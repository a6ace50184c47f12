import ArgumentParser

struct NbdUmemd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nbd-umemd",
        abstract: "An NBD server for memory: serves files, RAM, and guest RAM pulled lazily from a remote source.",
        version: "0.1.0",
        subcommands: [Serve.self, Status.self, Prefetch.self, Gate.self, Stage.self, Staging.self, Marker.self]
    )
}
