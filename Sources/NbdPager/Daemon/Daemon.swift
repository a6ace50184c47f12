import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import ServiceLifecycle
import UnixSignals

/// The daemon: builds the exports of a `DaemonConfiguration`, the event loops and I/O threads they
/// run on, the NBD listeners, the control socket, each export's background work, swap-mode checks
/// and the pidfile; serves until SIGTERM or SIGINT (or `shutdown()`), then stops accepting, lets
/// connections finish their requests and closes the storage.
///
/// It runs as one service of a `ServiceGroup` that traps SIGTERM and SIGINT as graceful-shutdown
/// signals. The blocking steps (binding, draining) run on a thread of the daemon's own, never on the
/// Swift concurrency pool, which the remote source's reads use.
public final class Daemon: Sendable {
    public let configuration: DaemonConfiguration
    let logger: Logger
    private let state = NIOLockedValueBox(State())

    struct State {
        var group: ServiceGroup?
        var shutdownRequested = false
        var serving = false
        var servingWaiters: [CheckedContinuation<Void, Never>] = []
        var control: ControlDispatcher?
        /// The listeners as bound (set once serving).
        var listeners: [NBDListener] = []
        /// `run()` has returned (or thrown).
        var finished = false
    }

    public init(configuration: DaemonConfiguration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
    }

    /// Runs the daemon until a graceful shutdown (SIGTERM, SIGINT or `shutdown()`) has completed.
    /// Throws `DaemonError` when it cannot start.
    public func run() async throws {
        defer { finished() }
        try configuration.validate()
        let c = configuration
        if c.swap { try SwapMode.prepare(logger: logger) }
        Self.raiseFileLimit(for: c.policy.maxConnections, logger: logger)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: c.eventLoops)
        let pool = NIOThreadPool(numberOfThreads: c.threads)
        pool.start()
        // one thread for the blocking steps of start-up and shutdown
        let lifecycle = NIOThreadPool(numberOfThreads: 1)
        lifecycle.start()
        defer {
            lifecycle.shutdownGracefully { _ in }
            pool.shutdownGracefully { _ in }
            group.shutdownGracefully { _ in }
        }
        let runtime = ExportRuntime(eventLoopGroup: group, threadPool: pool, logger: logger)
        let opened = try await openExports(runtime)
        let exports = zip(c.exports, opened).map { config, export in
            RunningExport(configuration: config, opened: export,
                          export: Export(name: config.name, description: config.description ?? export.defaultDescription,
                                         backend: export.backend, readOnly: config.readOnly,
                                         minimumBlockSize: config.minimumBlockSize, threadPool: pool))
        }
        let server = NBDServer(exports: exports.map(\.export), listeners: c.listeners, group: group, logger: logger,
                               pollWindow: c.pollWindow, policy: c.policy, tls: c.tls)
        let service = DaemonService(daemon: self, exports: exports, server: server, runtime: runtime,
                                    group: group, lifecycle: lifecycle)
        if c.swap {
            do {
                try await lifecycle.runIfActive {
                    try SwapMode.checkThreads(group: group, pool: pool, threads: c.threads, logger: self.logger)
                }
            } catch {
                exports.forEach { try? $0.export.backend.close() }
                throw error
            }
        }
        let serviceGroup = ServiceGroup(configuration: .init(
            services: [.init(service: service)], gracefulShutdownSignals: c.handlesSignals ? [.sigterm, .sigint] : [],
            logger: logger))
        let early = state.withLockedValue { s -> Bool in
            s.group = serviceGroup
            return s.shutdownRequested
        }
        if early { await serviceGroup.triggerGracefulShutdown() }
        defer { state.withLockedValue { $0.group = nil } }
        try await serviceGroup.run()
    }

    /// Runs the daemon on the calling thread (for a synchronous `main`): blocks until it has stopped.
    public func runBlocking(printURI: Bool = false) throws {
        let done = ConditionLock(value: false)
        let result = NIOLockedValueBox<Result<Void, any Error>>(.success(()))
        if printURI {
            Task {
                await self.waitUntilServingOrFinished()
                if self.isServing, let uri = self.uris.first { Self.printLine(uri) }
            }
        }
        Task {
            do { try await run() } catch { result.withLockedValue { $0 = .failure(error) } }
            done.lock()
            done.unlock(withValue: true)
        }
        done.lock(whenValue: true)
        done.unlock()
        try result.withLockedValue { $0 }.get()
    }

    /// Starts a graceful shutdown, as SIGTERM does.
    public func shutdown() async {
        let group = state.withLockedValue { s -> ServiceGroup? in
            s.shutdownRequested = true
            return s.group
        }
        await group?.triggerGracefulShutdown()
    }

    /// Returns once the daemon listens, its control socket is open and its pidfile written.
    public func waitUntilServing() async {
        await waitUntilServingOrFinished()
    }

    /// Returns once the daemon serves, or once `run()` has ended (it could not start): see
    /// `isServing`.
    public func waitUntilServingOrFinished() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = state.withLockedValue { s -> Bool in
                if s.serving || s.finished { return true }
                s.servingWaiters.append(c)
                return false
            }
            if now { c.resume() }
        }
    }

    /// The daemon serves (and has not stopped).
    public var isServing: Bool { state.withLockedValue { $0.serving && !$0.finished } }

    /// The listeners as bound (empty before the daemon serves).
    public var boundListeners: [NBDListener] { state.withLockedValue { $0.listeners } }

    private func finished() {
        let waiters = state.withLockedValue { s -> [CheckedContinuation<Void, Never>] in
            s.finished = true
            defer { s.servingWaiters = [] }
            return s.servingWaiters
        }
        waiters.forEach { $0.resume() }
    }

    /// The status `nbd-umemd status` prints (nil before the daemon serves).
    public func status() -> DaemonStatus? {
        (try? state.withLockedValue { $0.control }?.statusResult(export: nil).get()) ?? nil
    }

    func serving(_ control: ControlDispatcher, listeners: [NBDListener]) {
        let waiters = state.withLockedValue { s -> [CheckedContinuation<Void, Never>] in
            s.serving = true
            s.control = control
            s.listeners = listeners
            defer { s.servingWaiters = [] }
            return s.servingWaiters
        }
        waiters.forEach { $0.resume() }
    }

    /// Each connection is a descriptor: raise the soft limit (up to the hard one) so that
    /// `maxConnections` fit beside the daemon's own descriptors.
    static func raiseFileLimit(for maxConnections: Int, logger: Logger) {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return }
        let wanted = rlim_t(maxConnections + 256)
        guard limit.rlim_cur < wanted else { return }
        limit.rlim_cur = min(wanted, limit.rlim_max)
        if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) != 0 || limit.rlim_cur < wanted {
            logger.warning("open file limit \(limit.rlim_cur) is too low for --max-connections \(maxConnections) (raise ulimit -n)")
        }
    }

    /// Opens every export's storage; on a failure, closes those already open.
    private func openExports(_ runtime: ExportRuntime) async throws -> [any OpenedExport] {
        var opened: [any OpenedExport] = []
        for e in configuration.exports {
            var exportLogger = logger
            if configuration.exports.count > 1 { exportLogger[metadataKey: "export"] = "\(e.name)" }
            let context = ExportContext(name: e.name, readOnly: e.readOnly, swap: configuration.swap,
                                        runtime: runtime, logger: exportLogger)
            do {
                opened.append(try await e.kind.open(context))
            } catch {
                opened.forEach { try? $0.backend.close() }
                throw DaemonError("\(error)")
            }
        }
        return opened
    }
}

/// An export as the daemon runs it: its configuration, its kind's open export, and what the NBD
/// server serves.
struct RunningExport: Sendable {
    let configuration: ExportConfiguration
    let opened: any OpenedExport
    let export: Export

    var name: String { configuration.name }
    var kindType: any ExportKind.Type { type(of: configuration.kind) }
    var kindName: String { kindType.kindName }
}

/// The daemon's one service: starts serving once the signal handlers are in place, waits for the
/// graceful shutdown, and stops serving.
struct DaemonService: Service {
    let daemon: Daemon
    let exports: [RunningExport]
    let server: NBDServer
    let runtime: ExportRuntime
    let group: MultiThreadedEventLoopGroup
    let lifecycle: NIOThreadPool

    func run() async throws {
        let control = try await lifecycle.runIfActive { try start() }
        daemon.serving(control.dispatcher, listeners: server.boundListeners)
        try? await gracefulShutdown()
        try await lifecycle.runIfActive { stop(control.server, control.metrics) }
    }

    private var configuration: DaemonConfiguration { daemon.configuration }
    private var logger: Logger { daemon.logger }

    /// Listeners, control socket, background work, pidfile. On a failure, undoes what it did.
    private func start() throws -> (server: ControlServer?, metrics: MetricsServer?, dispatcher: ControlDispatcher) {
        do {
            for e in exports { try e.opened.prepare(runtime) }
        } catch {
            closeStorage()
            throw DaemonError("\(error)")
        }
        do {
            try server.start()
        } catch {
            closeStorage()
            throw DaemonError("cannot listen: \(error)")
        }
        let dispatcher = ControlDispatcher(exports: exports, server: server, swap: configuration.swap)
        var metricsServer: MetricsServer? = nil
        if let m = configuration.metrics {
            let metrics = DaemonMetrics(exports: exports, server: server, dispatcher: dispatcher)
            let s = MetricsServer(host: m.host, port: m.port, group: group, logger: logger) { metrics.render() }
            do {
                try s.start()
            } catch {
                server.shutdown(grace: .seconds(1))
                throw DaemonError("cannot serve metrics on \(m.host):\(m.port): \(error)")
            }
            metricsServer = s
        }
        var controlServer: ControlServer? = nil
        if let path = configuration.controlPath {
            let c = ControlServer(path: path, group: group, threadPool: runtime.threadPool, logger: logger) { dispatcher.handle($0) }
            do {
                try c.start()
            } catch {
                metricsServer?.stop()
                server.shutdown(grace: .seconds(1))
                throw DaemonError("cannot open control socket \(path): \(error)")
            }
            controlServer = c
        }
        for e in exports { e.opened.start(runtime) }
        for e in exports {
            let info = e.export.info
            logger.info("serving '\(info.name)' (\(info.size) bytes\(info.readOnly ? ", read-only" : ""))")
        }
        if let path = configuration.pidfile {
            do {
                try Pidfile(path: path).write()
            } catch {
                for e in exports { e.opened.stop() }
                controlServer?.stop()
                metricsServer?.stop()
                server.shutdown(grace: .seconds(1))
                throw DaemonError("cannot write pidfile \(path): \(error)")
            }
        }
        return (controlServer, metricsServer, dispatcher)
    }

    private func stop(_ controlServer: ControlServer?, _ metricsServer: MetricsServer?) {
        for e in exports { e.opened.stop() }
        logger.info("signal received, shutting down")
        controlServer?.stop()
        metricsServer?.stop()
        server.shutdown(grace: configuration.shutdownGrace)
        if let path = configuration.pidfile { Pidfile(path: path).remove() }
        logger.info("stopped")
    }

    private func closeStorage() {
        for e in exports { try? e.export.backend.close() }
    }
}
