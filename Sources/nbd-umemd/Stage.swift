import ArgumentParser
import NbdPager
#if canImport(Glibc)
import Glibc
#endif

struct Stage: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Stage a guest RAM file as swapped out to a swap export (swap-mode post-copy).",
        discussion: """
        The daemon serves a swap export (serve --source URI --store DIR --swap-size SIZE --control CTL), \
        attached as a block device and active as swap (mkswap, swapon; zswap off). `stage` creates \
        RAMFILE on tmpfs with the source's size, writes a keyed marker into every page the source does \
        not report as zero (zero pages stay holes, never transferred), pushes the pages to swap from a \
        temporary memory cgroup (MADV_PAGEOUT), waits for writeback, drains the swap cache \
        (cgroup v1 memory.force_empty or v2 memory.reclaim), removes the cgroup, checks that no staged \
        page is resident (mincore) and that the daemon decoded exactly one marker per staged page, and \
        seals staging. Then the file can back the VM's RAM (QEMU memory-backend-file,share=on): each \
        first touch is a swap-in the daemon serves with the real page; `swapoff` at the end brings \
        the rest in, and the RAM is plain memory with no device, daemon or store behind it.

        Prints one line per phase on stderr and `STAGED {json}` on stdout. On failure RAMFILE is removed.

        Example:
          nbd-umemd stage --ram /dev/shm/vm1.ram --control /run/vm1.ctl --device /dev/nbd0
        """
    )

    @Option(name: .long, help: ArgumentHelp("The RAM file to create on tmpfs (must not exist).", valueName: "path"))
    var ram: String

    @OptionGroup var socket: ControlSocket

    @Option(name: .long, help: ArgumentHelp("The swap export's block device; it must be the active swap area with the highest priority (without it, exactly one swap area may be active).", valueName: "path"))
    var device: String?

    @Option(name: .long, help: ArgumentHelp("Give up when writeback and decoding take longer than this.", valueName: "seconds"))
    var timeout: Double = 120

    func run() throws {
        var stager = Stager(ramFile: ram, control: socket.control, export: socket.export)
        stager.timeout = timeout
        stager.device = device
        stager.say = { line in
            let bytes = Array("stage: \(line)\n".utf8)
            _ = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
        }
        do {
            let report = try stager.run()
            print("STAGED " + String(decoding: try ControlCodec.encode(report), as: UTF8.self))
        } catch {
            unlink(ram)
            throw error
        }
    }
}

struct Staging: ControlActionVerb {
    static let configuration = CommandConfiguration(
        abstract: "Open, query or seal a swap export's staging by hand (`stage` does all of it).",
        discussion: """
        open: starts staging and prints the run's key (markers made with it decode while staging is \
        open); zero-pages: the source's zero pages as [first, count] runs; seal: ends marker decoding \
        for good and prints the counts.
        """
    )

    @Argument(help: ArgumentHelp("open, zero-pages or seal", valueName: "action"))
    var action: String

    @Option(name: .long, help: ArgumentHelp("open: the RAM file being staged (late pages are copied into it at gate open).", valueName: "path"))
    var ramFile: String?

    @OptionGroup var socket: ControlSocket

    typealias Command = StagingCommand
    typealias Action = StagingCommand.Action
    static func command(_ action: Action) -> Command { Command(action: action) }
    var command: StagingCommand? { Action(rawValue: action).map { StagingCommand(action: $0, ramFile: ramFile) } }
}

struct Marker: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write the 4096-byte staging marker of a source page to stdout (for tests).",
        discussion: "Example: nbd-umemd marker --key 00112233445566778899aabbccddeeff --page 7 > m.bin"
    )

    @Option(name: .long, help: ArgumentHelp("The staging key (32 hex digits, from `staging open`).", valueName: "hex"))
    var key: String

    @Option(name: .long, help: ArgumentHelp("The source page index.", valueName: "n"))
    var page: UInt64

    @Option(name: .long, help: ArgumentHelp("Write the markers of this many pages, from --page on.", valueName: "n"))
    var count: UInt64 = 1

    func validate() throws {
        if StagingMarker.Key(hex: key) == nil { throw ValidationError("--key must be 32 hex digits") }
        if count == 0 || count > 1 << 20 { throw ValidationError("--count must be between 1 and 1048576") }
    }

    func run() throws {
        guard let k = StagingMarker.Key(hex: key) else { throw ValidationError("--key must be 32 hex digits") }
        for p in page ..< page + count {
            let bytes = StagingMarker.bytes(page: p, key: k)
            var done = 0
            while done < bytes.count {
                let n = bytes.withUnsafeBytes { raw in raw.baseAddress.map { write(1, $0 + done, raw.count - done) } ?? -1 }
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { throw ValidationError("writing the marker to stdout: \(String(cString: strerror(errno)))") }
                done += n
            }
        }
    }
}
