import Logging
import NIOCore

/// Everything a daemon runs with: its exports, where it listens, its control socket and pidfile, and
/// how it runs (swap safety, threads, polling, logging). `nbd-umemd serve` builds one from its
/// arguments.
public struct DaemonConfiguration: Sendable {
    /// The exports, each with its own storage; clients select one by name (the empty name selects
    /// the first).
    public var exports: [ExportConfiguration]
    public var listeners: [NBDListener]
    /// The control socket (`nbd-umemd status|prefetch|gate --control PATH`).
    public var controlPath: String?
    /// Written once the listeners are up, removed on exit.
    public var pidfile: String?
    /// Swap-safe mode: mlockall, PR_SET_IO_FLUSHER checked on every thread, oom_score_adj -1000.
    /// (The flag itself must be set before any thread exists: `SwapSafety.enterSwapModeEarly()`.)
    public var swap = false
    /// Threads for blocking storage I/O.
    public var threads = 16
    /// Event loops (default: one per core).
    public var eventLoops = System.coreCount
    /// After a lone small request, keep polling the connection this long before sleeping.
    public var pollWindow: TimeAmount = .microseconds(30)
    /// The log level of the daemon's logger (`--verbose`: debug).
    public var logLevel: Logger.Level = .info
    /// SIGTERM and SIGINT start a graceful shutdown (off for a daemon inside another program, such
    /// as a test, which calls `Daemon.shutdown()`).
    public var handlesSignals = true
    /// Who may connect, how many at once, how long a handshake may take.
    public var policy = ConnectionPolicy()
    /// `--metrics`: serve Prometheus metrics over HTTP here (host, port).
    public var metrics: (host: String, port: Int)?
    /// TLS for clients (NBD_OPT_STARTTLS), e.g. `NbdTLS.TLSServer(settings)`; nil or mode off: none.
    public var tls: (any NBDTLSContext)?
    /// Longest wait for open connections to finish their requests on shutdown.
    public var shutdownGrace: TimeAmount = .seconds(30)

    public init(exports: [ExportConfiguration], listeners: [NBDListener]) {
        self.exports = exports
        self.listeners = listeners
    }

    /// Checks what the types cannot say; the message is the user's to read.
    public func validate() throws(DaemonError) {
        if exports.isEmpty { throw DaemonError("no export to serve") }
        if listeners.isEmpty { throw DaemonError("nowhere to listen") }
        var names = Set<String>()
        for e in exports where !names.insert(e.name).inserted {
            throw DaemonError("two exports are named '\(e.name)'")
        }
        if !(1...1024).contains(threads) { throw DaemonError("threads must be between 1 and 1024") }
        if eventLoops < 1 { throw DaemonError("at least one event loop is needed") }
        if policy.maxConnections < 1 { throw DaemonError("at least one connection must be allowed") }
        if let e = exports.first(where: { $0.kind.needsControlSocket }), controlPath == nil {
            throw DaemonError("export '\(e.name)' needs a control socket (its gate is opened through it)")
        }
    }
}

/// One export: its name and what the protocol advertises, and its kind (which says what is served).
public struct ExportConfiguration: Sendable {
    public var name: String
    /// Shown by nbdinfo; the kind's default when nil.
    public var description: String?
    public var readOnly = false
    /// Advertised minimum block size (1, 512 ... 4096).
    public var minimumBlockSize: UInt32 = 1
    public var kind: any ExportKind

    public init(name: String, kind: any ExportKind, description: String? = nil, readOnly: Bool = false,
                minimumBlockSize: UInt32 = 1) {
        self.name = name
        self.kind = kind
        self.description = description
        self.readOnly = readOnly
        self.minimumBlockSize = minimumBlockSize
    }
}

/// A failure of the daemon after its arguments were accepted (a file that cannot be opened, a port
/// in use, ...): one message for the user.
public struct DaemonError: Error, Sendable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
