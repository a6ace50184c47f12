import ArgumentParser
import Logging
import NbdPager
import NbdTLS
#if canImport(Glibc)
import Glibc
#endif

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve an export over NBD.",
        discussion: """
        One of --file, --memory or --source chooses what is served, and each --export SPEC serves one more. \
        Listens on TCP 127.0.0.1:10809 unless --unix or --port say otherwise; started by systemd with \
        socket activation (LISTEN_FDS), it serves on the sockets it is given instead. Runs in the \
        foreground; SIGTERM or SIGINT stops accepting connections, finishes in-flight requests and exits 0.

        Examples:
          nbd-umemd serve --file disk.img --unix /run/umemd.sock
          nbd-umemd serve --file /dev/shm/vm-ram --readonly --port 10809 --bind 0.0.0.0
          nbd-umemd serve --memory 2G --unix /run/swap.sock --export-name swap
          nbd-umemd serve --source nbd://src/ram --store /var/lib/vm1 --swap-size 4200M --swap --gated \
              --control /run/vm1.ctl --unix /run/vm1.sock          (swap-mode post-copy; see stage --help)
          nbd-umemd serve --memory 1G --export-name ram0 --export name=ram1,memory=1G --unix /run/vm.sock
          nbd-umemd serve --file disk.img --port 10809 --bind 0.0.0.0 --allow 10.1.0.0/16 \
              --tls require --tls-psk /etc/nbd-umemd/keys.psk
          nbd-umemd serve --memory 64M --run 'nbdinfo "$uri"'
          nbdinfo 'nbd+unix:///?socket=/run/umemd.sock'
        """
    )

    @Option(name: .long, help: ArgumentHelp("Serve this regular file or block device.", valueName: "path"))
    var file: String?

    @Option(name: .long, help: ArgumentHelp("Serve a zero-filled RAM export of this size (e.g. 512M, 2G).", valueName: "size"))
    var memory: String?

    @Option(name: .long, help: ArgumentHelp("Serve a lazy copy of this NBD source (a libnbd URI such as nbd://host:10809/name, nbd+unix:///?socket=PATH, or nbds://host/name for TLS: see --source-tls-*): pages are pulled on first access into --store.", valueName: "uri"))
    var source: String?

    @Option(name: .long, help: ArgumentHelp("TLS to an nbds:// source: x509 credentials, DIR/ca-cert.pem (and DIR/client-cert.pem, DIR/client-key.pem if the source checks client certificates).", valueName: "dir"))
    var sourceTlsCertificates: String?

    @Option(name: .long, help: ArgumentHelp("TLS to an nbds:// source: pre-shared keys in psktool's format.", valueName: "file"))
    var sourceTlsPsk: String?

    @Option(name: .long, help: ArgumentHelp("TLS to an nbds:// source: the PSK identity (or write it in the URI: nbds://NAME@host/).", valueName: "name"))
    var sourceTlsUsername: String?

    @Flag(name: .long, inversion: .prefixedNo, help: "TLS to an nbds:// source: check its certificate against ca-cert.pem and its host name (default: on).")
    var sourceTlsVerifyPeer = true

    @Option(name: .long, help: ArgumentHelp("Directory holding the lazy export's pulled pages and page-state map (created if missing).", valueName: "dir"))
    var store: String?

    @Flag(name: .long, help: "Discard a --store that belongs to another source (or any store) and start empty.")
    var resetStore = false

    @Option(name: .long, help: ArgumentHelp("Bytes pulled around a missing page, aligned (e.g. 4K, 64K; default 64K).", valueName: "size"))
    var fetchSize: String?

    @Option(name: .long, help: ArgumentHelp("Connections to the source (default 2).", valueName: "n"))
    var sourceConnections: String?

    @Option(name: .long, help: ArgumentHelp("While the source is unreachable or failing, keep client requests waiting and retry (reconnecting with backoff) for this many seconds before answering EIO (default 60).", valueName: "seconds"))
    var sourceTimeout: String?

    @Option(name: .long, help: ArgumentHelp("Background pull of the lazy export's absent pages: off, sequential (sweep from the start) or adaptive (sweep, plus a window around each miss that grows while misses are sequential; the sweep moves to the latest miss). Default: adaptive.", valueName: "mode"))
    var prefetch: String?

    @Option(name: .long, help: ArgumentHelp("Cap background pull traffic at this many bytes per second (e.g. 50M); demand misses are never limited.", valueName: "rate"))
    var maxRate: String?

    @Option(name: .long, help: ArgumentHelp("Source connections used only by background pulls (default 1).", valueName: "n"))
    var prefetchConnections: String?

    @Option(name: .long, help: ArgumentHelp("Pull these byte ranges first (lines \"OFFSET LENGTH\", e.g. written by --record-faults).", valueName: "file"))
    var hotList: String?

    @Option(name: .long, help: ArgumentHelp("Append every demand miss to this file as \"OFFSET LENGTH\" lines (a --hot-list for the next run).", valueName: "file"))
    var recordFaults: String?

    @Flag(name: .long, help: "Show a background-pull progress line (percent, rate, ETA) on stderr; the default when stderr is a terminal.")
    var progress = false

    @Flag(name: .long, help: "Hold every pull from the source (demand misses wait, no background pull, no allocation-map query) until `nbd-umemd gate open --control PATH`: for a live-migration destination, whose source RAM keeps changing until the source VM stops. Needs --control.")
    var gated = false

    @Option(name: .long, help: ArgumentHelp("Swap-mode post-copy: serve a swap device of this size (at least the source's size plus one page; give headroom) whose slots are mapped to source pages by `nbd-umemd stage`, instead of a copy of the source. Needs --control.", valueName: "size"))
    var swapSize: String?

    @Flag(name: .long, help: "Refuse writes, trims and zeroing (EPERM).")
    var readonly = false

    @Option(name: .long, help: ArgumentHelp("Listen on this Unix socket.", valueName: "path"))
    var unix: String?

    @Option(name: .long, help: ArgumentHelp("Listen on this TCP port (default 10809 when no --unix is given).", valueName: "port"))
    var port: Int?

    @Option(name: .long, help: ArgumentHelp("Address to bind the TCP listener to.", valueName: "addr"))
    var bind: String?

    @Option(name: .long, help: ArgumentHelp("TLS for clients (NBD_OPT_STARTTLS): off; on (clients may upgrade); require (every option but STARTTLS and ABORT is refused with NBD_REP_ERR_TLS_REQD until TLS is up). Needs --tls-certificates or --tls-psk.", valueName: "off|on|require"))
    var tls: String = TLSSettings.Mode.off.rawValue

    @Option(name: .long, help: ArgumentHelp("x509 credentials in nbdkit's layout: DIR/server-cert.pem, DIR/server-key.pem, and DIR/ca-cert.pem for --tls-verify-peer.", valueName: "dir"))
    var tlsCertificates: String?

    @Flag(name: .long, help: "With --tls-certificates: clients must present a certificate signed by DIR/ca-cert.pem.")
    var tlsVerifyPeer = false

    @Option(name: .long, help: ArgumentHelp("Pre-shared keys in GnuTLS psktool's format (lines identity:hexkey); clients use an identity and its key (TLS 1.2).", valueName: "file"))
    var tlsPsk: String?

    @Option(name: .long, help: ArgumentHelp("Accept TCP clients only from this address or network (repeatable; IPv4 or IPv6, e.g. 10.1.0.0/16, fd00::/64, 192.0.2.7). Others are closed before the greeting and logged. Default: any address that can reach the listener (which binds to 127.0.0.1 unless --bind says otherwise). Unix-socket clients are not filtered.", valueName: "addr[/prefix]"),
            transform: { try AddressRange(parsing: $0) })
    var allow: [AddressRange] = []

    @Option(name: .long, help: ArgumentHelp("Most client connections open at once; more are closed at once and logged.", valueName: "n"))
    var maxConnections: Int = ConnectionPolicy.defaultMaxConnections

    @Option(name: .long, help: ArgumentHelp("Disconnect a client that has not finished the handshake after this many seconds.", valueName: "seconds"))
    var handshakeTimeout: Int = ConnectionPolicy.defaultHandshakeSeconds

    @Option(name: .long, help: ArgumentHelp("Export name clients ask for (the empty name also selects it).", valueName: "name"))
    var exportName: String = ""

    @Option(name: .long, help: ArgumentHelp("Export description shown by nbdinfo.", valueName: "text"))
    var description: String?

    @Option(name: .long, help: ArgumentHelp("Minimum block size to advertise (1, 512 or 4096); misaligned requests get EINVAL.", valueName: "bytes"))
    var minBlockSize: String?

    @Option(name: .customLong("export"), help: ArgumentHelp("Serve one more export (repeatable): comma-separated key=value pairs, e.g. name=ram1,memory=1G or name=vm,source=nbd://src/ram,store=/var/lib/vm,gated. Keys: name, file|memory|source, readonly, description, min-block-size, and for source: store, reset-store, fetch-size, source-connections, source-timeout, prefetch, max-rate, prefetch-connections, hot-list, record-faults, gated, progress, swap-size, source-tls-certificates, source-tls-psk, source-tls-username, source-tls-verify-peer=no (as the options of the same names; ',,' is a comma inside a value). NBD_OPT_LIST lists every export; the empty name selects the first.", valueName: "spec"))
    var exportSpecs: [String] = []

    @Option(name: .long, help: ArgumentHelp("Threads for blocking storage I/O.", valueName: "n"))
    var threads: Int = 16

    @Option(name: .long, help: ArgumentHelp("Event loops serving the connections (default: one per core).", valueName: "n"))
    var eventLoops: Int?

    @Option(name: .long, help: ArgumentHelp("After a lone small request, keep polling the connection up to this many microseconds before sleeping, while the connection measures that polling shortens its client's request cycle (it re-measures every 4096 cycles); 0 disables. TLS connections never poll.", valueName: "us"))
    var pollUs: Int = 30

    @Option(name: .long, help: ArgumentHelp("Open a control socket here (`nbd-umemd status --control PATH`).", valueName: "path"))
    var control: String?

    @Option(name: .long, help: ArgumentHelp("Write the process id here once listening; removed on exit.", valueName: "path"))
    var pidfile: String?

    @Option(name: .long, help: ArgumentHelp("Serve Prometheus metrics at http://ADDR:PORT/metrics (e.g. 127.0.0.1:9720, [::1]:9720): per export and command requests, bytes, errors and latency histograms; for lazy exports pages, pulls, demand misses and their latency, background bytes, rate and progress, store commits, source outages and reconnects; connections. The values are those of `nbd-umemd status`.", valueName: "addr:port"))
    var metrics: String?

    @Option(name: .customLong("run"), help: ArgumentHelp("Captive mode (as nbdkit's): once serving, run COMMAND with /bin/sh -c, its environment holding $uri, $exportname, $unixsocket or $port, and $tls; stop when it exits and exit with its status. Without --unix, --port or --bind the daemon listens on a private Unix socket.", valueName: "command"))
    var runCommand: String?

    @Flag(name: .long, help: "Print the URI clients connect to on stdout once serving (nbd+unix:///NAME?socket=PATH, nbd://HOST:PORT/NAME, nbds... with TLS).")
    var printUri = false

    @Flag(name: .long, help: "Stop (as on SIGTERM) when the parent process exits.")
    var exitWithParent = false

    @Flag(name: .long, help: "Log every connection and rejected request.")
    var verbose = false

    @Flag(name: .long, help: "Serve a swap device or file-backed RAM safely: lock all memory (mlockall), PR_SET_IO_FLUSHER on every thread, oom_score_adj -1000, a pre-faulted allocator reserve; a --memory export is allocated and locked in RAM up front. Needs root (CAP_IPC_LOCK, CAP_SYS_RESOURCE).")
    var swap = false

    static let defaultPort = 10809

    func validate() throws {
        let exports = try exportConfigurations()
        if let e = exports.first(where: { $0.kind.needsControlSocket }), control == nil {
            let lazy = e.kind as? LazyExport
            throw ValidationError(lazy?.swapSize != nil
                ? "--swap-size needs --control PATH (staging runs through it)"
                : "--gated needs --control PATH (the gate is opened through it)")
        }
        if let port, !(0...65535).contains(port) { throw ValidationError("--port \(port) is out of range 0-65535") }
        if !(0...10_000).contains(pollUs) { throw ValidationError("--poll-us must be between 0 and 10000") }
        if !(1...1024).contains(threads) { throw ValidationError("--threads must be between 1 and 1024") }
        if let eventLoops, !(1...256).contains(eventLoops) { throw ValidationError("--event-loops must be between 1 and 256") }
        guard let tlsMode = TLSSettings.Mode(rawValue: tls) else {
            throw ValidationError("--tls must be off, on or require, got '\(tls)'")
        }
        if tlsCertificates != nil && tlsPsk != nil {
            throw ValidationError("--tls-certificates and --tls-psk cannot be used together")
        }
        if tlsMode == .off && (tlsCertificates != nil || tlsPsk != nil || tlsVerifyPeer) {
            throw ValidationError("--tls-certificates, --tls-psk and --tls-verify-peer need --tls on or --tls require")
        }
        if tlsMode != .off && tlsCertificates == nil && tlsPsk == nil {
            throw ValidationError("--tls \(tls) needs --tls-certificates DIR or --tls-psk FILE")
        }
        if tlsVerifyPeer && tlsCertificates == nil {
            throw ValidationError("--tls-verify-peer needs --tls-certificates DIR (with ca-cert.pem)")
        }
        if !(1...65_536).contains(maxConnections) { throw ValidationError("--max-connections must be between 1 and 65536") }
        if !(1...3600).contains(handshakeTimeout) { throw ValidationError("--handshake-timeout must be between 1 and 3600 seconds") }
        if !allow.isEmpty && unix != nil && port == nil && bind == nil {
            throw ValidationError("--allow filters TCP clients, and this daemon listens only on --unix")
        }
        if let unix, unix.utf8.count >= 108 { throw ValidationError("--unix path is longer than 107 bytes") }
        if let metrics, Self.hostPort(metrics) == nil {
            throw ValidationError("--metrics must be ADDR:PORT (e.g. 127.0.0.1:9720 or [::1]:9720), got '\(metrics)'")
        }
        if activated != nil && (unix != nil || port != nil || bind != nil) {
            throw ValidationError("socket activation (LISTEN_FDS) gives the listening sockets: --unix, --port and --bind cannot be used with it")
        }
    }

    /// `ADDR:PORT` or `[ADDR]:PORT`.
    static func hostPort(_ text: String) -> (host: String, port: Int)? {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]),
              (0...65535).contains(port) else { return nil }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty else { return nil }
        return (host, port)
    }

    /// The sockets systemd passed (socket activation), nil when none.
    var activated: [NBDListener]? { SocketActivation.passedListeners }

    var listeners: [NBDListener] {
        if let activated { return activated }
        var l: [NBDListener] = []
        if let unix { l.append(.unix(path: unix)) }
        if port != nil || bind != nil || unix == nil {
            l.append(.tcp(host: bind ?? "127.0.0.1", port: port ?? Self.defaultPort))
        }
        return l
    }

    /// The export of the single-export options (`--file`, `--memory`, `--source` and theirs), as
    /// `ExportSpec` pairs: only what was given.
    var optionPairs: [(String, String)] {
        var pairs: [(String, String)] = [("name", exportName)]
        func add(_ key: String, _ value: String?) { if let value { pairs.append((key, value)) } }
        func add(_ key: String, _ flag: Bool) { if flag { pairs.append((key, "yes")) } }
        add("file", file); add("memory", memory); add("source", source); add("store", store)
        add("reset-store", resetStore); add("fetch-size", fetchSize)
        add("source-connections", sourceConnections); add("source-timeout", sourceTimeout)
        add("prefetch", prefetch); add("max-rate", maxRate); add("prefetch-connections", prefetchConnections)
        add("hot-list", hotList); add("record-faults", recordFaults); add("progress", progress)
        add("gated", gated); add("swap-size", swapSize); add("readonly", readonly)
        add("description", description); add("min-block-size", minBlockSize)
        add("source-tls-certificates", sourceTlsCertificates); add("source-tls-psk", sourceTlsPsk)
        add("source-tls-username", sourceTlsUsername)
        if !sourceTlsVerifyPeer { pairs.append(("source-tls-verify-peer", "no")) }
        return pairs
    }

    /// Every export: the one of the single-export options (when --file, --memory or --source is
    /// given, or no --export is), then each --export.
    func exportConfigurations() throws -> [ExportConfiguration] {
        var exports: [ExportConfiguration] = []
        do {
            if file != nil || memory != nil || source != nil || exportSpecs.isEmpty {
                if exportSpecs.isEmpty && file == nil && memory == nil && source == nil {
                    throw ValidationError("one of --file, --memory or --source (or --export SPEC) is required")
                }
                exports.append(try ExportSpec.build(optionPairs, origin: .options))
            } else if let (key, _) = optionPairs.first(where: { $0.0 != "name" }) {
                throw ValidationError("--\(key) describes the export of --file, --memory or --source; with only --export, put it in the spec (\(key)=...)")
            } else if !exportName.isEmpty {
                throw ValidationError("--export-name names the export of --file, --memory or --source; with only --export, use name=...")
            }
            for spec in exportSpecs { exports.append(try ExportSpec.parse(spec)) }
        } catch let failure as ExportSpec.Failure {
            throw ValidationError(failure.description)
        }
        var names = Set<String>()
        for e in exports where !names.insert(e.name).inserted {
            throw ValidationError("two exports are named '\(e.name)'")
        }
        return exports
    }

    /// The daemon's configuration.
    func daemonConfiguration() throws -> DaemonConfiguration {
        var c = DaemonConfiguration(exports: try exportConfigurations(), listeners: listeners)
        c.controlPath = control
        c.pidfile = pidfile
        c.swap = swap
        c.threads = threads
        if let eventLoops { c.eventLoops = eventLoops }
        c.pollWindow = .microseconds(Int64(pollUs))
        if let mode = TLSSettings.Mode(rawValue: tls), mode != .off {
            let credentials: TLSSettings.Credentials? = tlsPsk.map { .psk(file: $0) }
                ?? tlsCertificates.map { .x509(directory: $0, verifyPeer: tlsVerifyPeer) }
            do {
                c.tls = try TLSServer(TLSSettings(mode: mode, credentials: credentials))
            } catch {
                throw ValidationError(error.description)
            }
        }
        c.metrics = metrics.flatMap(Self.hostPort)
        c.policy.allow = allow
        c.policy.maxConnections = maxConnections
        c.policy.handshakeTimeout = .seconds(Int64(handshakeTimeout))
        c.logLevel = verbose ? .debug : .info
        return c
    }

    func run() throws {
        if exitWithParent {
            // SIGTERM when the parent exits; a parent already gone (re-parented to init) counts too.
            guard Daemon.exitWithParent() else {
                throw ValidationError("--exit-with-parent: the parent process has already exited")
            }
        }
        var configuration = try daemonConfiguration()
        // (taking the inherited sockets clears LISTEN_PID/LISTEN_FDS: decide once, before)
        let isActivated = activated != nil
        if isActivated {
            configuration.listeners = SocketActivation.inheritedListeners() ?? configuration.listeners
        }
        var privateDir: String? = nil
        if runCommand != nil && !isActivated && unix == nil && port == nil && bind == nil {
            // captive mode without a listener: a private Unix socket, as nbdkit does
            var template = Array("/tmp/nbd-umemd-run.XXXXXX".utf8CString)
            guard let dir = mkdtemp(&template) else { throw ValidationError("--run: cannot create a private socket directory") }
            let path = String(cString: dir)
            privateDir = path
            configuration.listeners = [.unix(path: path + "/socket")]
        }
        defer { if let privateDir { rmdir(privateDir) } }
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = configuration.logLevel
            return h
        }
        signal(SIGPIPE, SIG_IGN)
        let daemon = Daemon(configuration: configuration, logger: Logger(label: "nbd-umemd"))
        if let runCommand {
            let status = try daemon.runCaptive(command: runCommand, printURI: printUri)
            if let privateDir { rmdir(privateDir) }
            throw ExitCode(status)
        }
        try daemon.runBlocking(printURI: printUri)
    }
}
