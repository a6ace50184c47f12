import ArgumentParser
import Dispatch
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NbdPager
#if canImport(Glibc)
import Glibc
#endif

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve an export over NBD.",
        discussion: """
        Exactly one of --file or --memory chooses what is served. Listens on TCP 127.0.0.1:10809 unless \
        --unix or --port say otherwise. Runs in the foreground; SIGTERM or SIGINT stops accepting \
        connections, finishes in-flight requests and exits 0.

        Examples:
          nbd-umemd serve --file disk.img --unix /run/umemd.sock
          nbd-umemd serve --file /dev/shm/vm-ram --readonly --port 10809 --bind 0.0.0.0
          nbd-umemd serve --memory 2G --unix /run/swap.sock --export-name swap
          nbdinfo 'nbd+unix:///?socket=/run/umemd.sock'
        """
    )

    @Option(name: .long, help: ArgumentHelp("Serve this regular file or block device.", valueName: "path"))
    var file: String?

    @Option(name: .long, help: ArgumentHelp("Serve a zero-filled RAM export of this size (e.g. 512M, 2G).", valueName: "size"),
            transform: { try SizeParser.parse($0) })
    var memory: UInt64?

    @Option(name: .long, help: ArgumentHelp("Serve a lazy copy of this NBD source (a libnbd URI such as nbd://host:10809/name or nbd+unix:///?socket=PATH): pages are pulled on first access into --store.", valueName: "uri"))
    var source: String?

    @Option(name: .long, help: ArgumentHelp("Directory holding the lazy export's pulled pages and page-state map (created if missing).", valueName: "dir"))
    var store: String?

    @Flag(name: .long, help: "Discard a --store that belongs to another source (or any store) and start empty.")
    var resetStore = false

    @Option(name: .long, help: ArgumentHelp("Bytes pulled around a missing page, aligned (e.g. 4K, 64K).", valueName: "size"),
            transform: { try SizeParser.parse($0) })
    var fetchSize: UInt64 = 64 * 1024

    @Option(name: .long, help: ArgumentHelp("Connections to the source.", valueName: "n"))
    var sourceConnections: Int = 2

    @Option(name: .long, help: ArgumentHelp("While the source is unreachable or failing, keep client requests waiting and retry (reconnecting with backoff) for this many seconds before answering EIO.", valueName: "seconds"))
    var sourceTimeout: Int = 60

    @Option(name: .long, help: ArgumentHelp("Background pull of the lazy export's absent pages: off, sequential (sweep from the start) or adaptive (sweep, plus a window around each miss that grows while misses are sequential; the sweep moves to the latest miss).", valueName: "mode"))
    var prefetch: String = Prefetcher.Mode.adaptive.rawValue

    @Option(name: .long, help: ArgumentHelp("Cap background pull traffic at this many bytes per second (e.g. 50M); demand misses are never limited.", valueName: "rate"),
            transform: { try SizeParser.parse($0) })
    var maxRate: UInt64?

    @Option(name: .long, help: ArgumentHelp("Source connections used only by background pulls.", valueName: "n"))
    var prefetchConnections: Int = 1

    @Option(name: .long, help: ArgumentHelp("Pull these byte ranges first (lines \"OFFSET LENGTH\", e.g. written by --record-faults).", valueName: "file"))
    var hotList: String?

    @Option(name: .long, help: ArgumentHelp("Append every demand miss to this file as \"OFFSET LENGTH\" lines (a --hot-list for the next run).", valueName: "file"))
    var recordFaults: String?

    @Flag(name: .long, help: "Show a background-pull progress line (percent, rate, ETA) on stderr; the default when stderr is a terminal.")
    var progress = false

    @Flag(name: .long, help: "Hold every pull from the source (demand misses wait, no background pull, no allocation-map query) until `nbd-umemd gate open --control PATH`: for a live-migration destination, whose source RAM keeps changing until the source VM stops. Needs --control.")
    var gated = false

    @Flag(name: .long, help: "Refuse writes, trims and zeroing (EPERM).")
    var readonly = false

    @Option(name: .long, help: ArgumentHelp("Listen on this Unix socket.", valueName: "path"))
    var unix: String?

    @Option(name: .long, help: ArgumentHelp("Listen on this TCP port (default 10809 when no --unix is given).", valueName: "port"))
    var port: Int?

    @Option(name: .long, help: ArgumentHelp("Address to bind the TCP listener to.", valueName: "addr"))
    var bind: String?

    @Option(name: .long, help: ArgumentHelp("Export name clients ask for (the empty name also selects it).", valueName: "name"))
    var exportName: String = ""

    @Option(name: .long, help: ArgumentHelp("Export description shown by nbdinfo.", valueName: "text"))
    var description: String?

    @Option(name: .long, help: ArgumentHelp("Minimum block size to advertise (1, 512 or 4096); misaligned requests get EINVAL.", valueName: "bytes"))
    var minBlockSize: UInt32 = 1

    @Option(name: .long, help: ArgumentHelp("Threads for blocking storage I/O.", valueName: "n"))
    var threads: Int = 16

    @Option(name: .long, help: ArgumentHelp("After each request, keep polling the connection this many microseconds before sleeping (lower latency for page faults and QD1 readers, at the cost of CPU while a client is active); 0 disables.", valueName: "us"))
    var pollUs: Int = 30

    @Option(name: .long, help: ArgumentHelp("Open a control socket here (`nbd-umemd status --control PATH`).", valueName: "path"))
    var control: String?

    @Option(name: .long, help: ArgumentHelp("Write the process id here once listening; removed on exit.", valueName: "path"))
    var pidfile: String?

    @Flag(name: .long, help: "Log every connection and rejected request.")
    var verbose = false

    @Flag(name: .long, help: "Serve a swap device or file-backed RAM safely: lock all memory (mlockall), PR_SET_IO_FLUSHER on every thread, oom_score_adj -1000, a pre-faulted allocator reserve; a --memory export is allocated and locked in RAM up front. Needs root (CAP_IPC_LOCK, CAP_SYS_RESOURCE).")
    var swap = false

    static let defaultPort = 10809

    func validate() throws {
        let chosen = [file != nil, memory != nil, source != nil].filter { $0 }.count
        if chosen == 0 { throw ValidationError("one of --file, --memory or --source is required") }
        if chosen > 1 { throw ValidationError("--file, --memory and --source cannot be used together") }
        if source != nil && store == nil { throw ValidationError("--source needs --store DIR") }
        if source == nil && (store != nil || resetStore) {
            throw ValidationError("--store and --reset-store only apply to --source")
        }
        if Prefetcher.Mode(rawValue: prefetch) == nil {
            throw ValidationError("--prefetch must be off, sequential or adaptive, got '\(prefetch)'")
        }
        if source == nil && (maxRate != nil || hotList != nil || recordFaults != nil || progress || gated) {
            throw ValidationError("--max-rate, --hot-list, --record-faults, --progress and --gated only apply to --source")
        }
        if gated && control == nil { throw ValidationError("--gated needs --control PATH (the gate is opened through it)") }
        if maxRate == 0 { throw ValidationError("--max-rate must be greater than zero") }
        if !(1...16).contains(prefetchConnections) { throw ValidationError("--prefetch-connections must be between 1 and 16") }
        if fetchSize < 4096 || fetchSize > 32 << 20 || fetchSize & (fetchSize - 1) != 0 {
            throw ValidationError("--fetch-size must be a power of two from 4K to 32M")
        }
        if !(1...86_400).contains(sourceTimeout) { throw ValidationError("--source-timeout must be between 1 and 86400 seconds") }
        if !(1...16).contains(sourceConnections) { throw ValidationError("--source-connections must be between 1 and 16") }
        if memory == 0 { throw ValidationError("--memory size must be greater than zero") }
        if let port, !(0...65535).contains(port) { throw ValidationError("--port \(port) is out of range 0-65535") }
        if ![1, 512, 1024, 2048, 4096].contains(minBlockSize) {
            throw ValidationError("--min-block-size must be 1, 512, 1024, 2048 or 4096")
        }
        if !(0...10_000).contains(pollUs) { throw ValidationError("--poll-us must be between 0 and 10000") }
        if !(1...1024).contains(threads) { throw ValidationError("--threads must be between 1 and 1024") }
        if exportName.utf8.count > 4096 { throw ValidationError("--export-name is longer than 4096 bytes") }
        if let unix, unix.utf8.count >= 108 { throw ValidationError("--unix path is longer than 107 bytes") }
    }

    var listeners: [NBDListener] {
        var l: [NBDListener] = []
        if let unix { l.append(.unix(path: unix)) }
        if port != nil || bind != nil || unix == nil {
            l.append(.tcp(host: bind ?? "127.0.0.1", port: port ?? Self.defaultPort))
        }
        return l
    }

    func run() throws {
        let level: Logger.Level = verbose ? .debug : .info
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        let logger = Logger(label: "nbd-umemd")
        signal(SIGPIPE, SIG_IGN)
        if swap {
            SwapSafety.keepAllocatorMemory()
            do {
                try SwapSafety.lockAllMemory()
            } catch {
                throw RuntimeFailure("\(error)")
            }
            // Without CAP_SYS_RESOURCE (some containers) these two cannot be had: say so loudly,
            // but serve, since the memory is locked.
            if let reason = SwapSafety.ioFlusherError {
                logger.warning("--swap: \(reason): this daemon's own memory allocations may wait for I/O to the device it serves; not safe for swap under memory pressure")
            }
            do {
                try SwapSafety.setOOMScoreAdjust(-1000)
            } catch {
                logger.warning("--swap: cannot set oom_score_adj to -1000 (\(error)); the OOM killer may pick this daemon")
            }
            if let warning = SwapSafety.memoryCgroupWarning() { logger.warning("\(warning)") }
        }

        let group = MultiThreadedEventLoopGroup(numberOfThreads: System.coreCount)
        let pool = NIOThreadPool(numberOfThreads: threads)
        pool.start()
        defer {
            try? pool.syncShutdownGracefully()
            try? group.syncShutdownGracefully()
        }

        let backend: any BlockBackend
        let text: String
        do {
            if let file {
                backend = try FileBackend.open(path: file, readOnly: readonly)
                text = description ?? "file \(file)"
            } else if let source, let store {
                backend = try openLazy(source: source, store: store, eventLoop: group.next(), pool: pool, logger: logger)
                text = description ?? "lazy copy of \(source)"
            } else {
                let size = memory ?? 0
                backend = swap ? try FileBackend.residentMemory(size: size) : try FileBackend.memory(size: size)
                text = description ?? "memory, \(size) bytes"
            }
        } catch {
            throw RuntimeFailure("\(error)")
        }

        // SIGTERM/SIGINT start a graceful shutdown: their default action is replaced by a dispatch
        // source the main thread waits on (set up before the server accepts anything).
        signal(SIGTERM, SIG_IGN)
        signal(SIGINT, SIG_IGN)
        let stop = DispatchSemaphore(value: 0)
        let sources = [SIGTERM, SIGINT].map { sig -> any DispatchSourceSignal in
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler { stop.signal() }
            s.resume()
            return s
        }

        if swap {
            do {
                try checkSwapThreads(group: group, pool: pool, logger: logger)
            } catch {
                try? backend.close()
                throw error
            }
        }
        let export = Export(name: exportName, description: text, backend: backend, readOnly: readonly,
                            minimumBlockSize: minBlockSize, threadPool: pool)
        let server = NBDServer(exports: [export], listeners: listeners, group: group, logger: logger,
                               pollWindow: .microseconds(Int64(pollUs)))

        // Before listening, so that a bad --hot-list is refused before any client is served.
        var prefetcher: Prefetcher? = nil
        if let lazy = backend as? LazyBackend {
            do {
                prefetcher = try makePrefetcher(lazy, eventLoop: group.next(), logger: logger)
            } catch {
                try? backend.close()
                throw RuntimeFailure("\(error)")
            }
        }
        do {
            try server.start()
        } catch {
            try? backend.close()
            throw RuntimeFailure("cannot listen: \(error)")
        }
        let control = try startControl(server: server, export: export, prefetcher: prefetcher, group: group, logger: logger)
        if !gated { prefetcher?.start() }
        let progressLine = prefetcher.flatMap { startProgressLine($0) }
        let info = export.info
        logger.info("serving '\(info.name)' (\(info.size) bytes\(info.readOnly ? ", read-only" : ""))")
        if let pidfile {
            do {
                try writePidfile(pidfile)
            } catch {
                server.shutdown(grace: .seconds(1))
                throw RuntimeFailure("cannot write pidfile \(pidfile): \(error)")
            }
        }
        // Lazy exports commit their page state at least once a second (FLUSH/FUA commit at once).
        (backend as? LazyBackend)?.startPeriodicCommit(every: .seconds(1))
        stop.wait()
        progressLine?.cancel()
        prefetcher?.stop()
        logger.info("signal received, shutting down")
        control?.stop()
        server.shutdown()
        sources.forEach { $0.cancel() }
        if let pidfile { unlink(pidfile) }
        logger.info("stopped")
    }

    /// Connects to the source, opens (or creates) the store, and marks the source's zero extents present.
    private func openLazy(source uri: String, store directory: String, eventLoop: any EventLoop, pool: NIOThreadPool,
                          logger: Logger) throws -> LazyBackend {
        let connections = sourceConnections
        let remote = try ReconnectingSource(timeout: .seconds(Int64(sourceTimeout)), threadPool: pool, logger: logger) {
            try LibnbdSource.connect(uri: uri, connections: connections, logger: logger)
        }
        let pages: PageStore
        do {
            pages = try PageStore.open(directory: directory, size: remote.size, identity: uri, reset: resetStore)
        } catch {
            remote.close()
            throw error
        }
        var background: ReconnectingSource? = nil
        if Prefetcher.Mode(rawValue: prefetch) != .off && pages.snapshot().absent > 0 {
            let n = prefetchConnections
            do {
                background = try ReconnectingSource(timeout: .seconds(Int64(sourceTimeout)), threadPool: pool, logger: logger) {
                    try LibnbdSource.connect(uri: uri, connections: n, logger: logger)
                }
            } catch {
                remote.close()
                try? pages.close()
                throw error
            }
        }
        let lazy = LazyBackend(store: pages, source: remote, fetchSize: fetchSize, logger: logger,
                               eventLoop: eventLoop, threadPool: pool, backgroundSource: background, gated: gated)
        let snap = pages.snapshot()
        logger.info("store \(directory): \(snap.present) present, \(snap.local) local, \(snap.absent) absent pages")
        if gated {
            logger.info("gate closed: nothing is pulled from the source until `nbd-umemd gate open`")
        } else {
            _ = try? runBlocking { await Self.markSourceZeros(lazy, logger: logger) }
        }
        return lazy
    }

    /// Marks the pages the source reports as zero present without transfer; a source that cannot
    /// say costs only a warning (those pages are then pulled like any other).
    private static func markSourceZeros(_ lazy: LazyBackend, logger: Logger) async {
        do {
            try await lazy.markSourceZeros()
        } catch {
            logger.warning("could not read the source's allocation map (\(error)); zero pages will be pulled")
        }
    }

    /// The lazy export's background puller, configured from the options (not started yet).
    private func makePrefetcher(_ lazy: LazyBackend, eventLoop: any EventLoop, logger: Logger) throws -> Prefetcher {
        var config = Prefetcher.Configuration()
        config.mode = Prefetcher.Mode(rawValue: prefetch) ?? .adaptive
        config.maxRate = maxRate
        config.recordFaults = recordFaults
        if let hotList {
            config.hotList = try FaultList.read(path: hotList, size: lazy.size)
            logger.info("hot list \(hotList): \(config.hotList.count) ranges to pull first")
        }
        return Prefetcher(target: lazy, config: config, eventLoop: eventLoop, logger: logger)
    }

    /// With --progress or a terminal on stderr: a progress line, rewritten every second until complete.
    private func startProgressLine(_ prefetcher: Prefetcher) -> (any DispatchSourceTimer)? {
        guard progress || isatty(2) != 0, prefetcher.status().mode != .off else { return nil }
        let timer = DispatchSource.makeTimerSource(queue: .global())
        let done = NIOLockedValueBox(false)
        timer.schedule(deadline: .now() + 1, repeating: 1)
        timer.setEventHandler {
            guard !done.withLockedValue({ $0 }) else { return }
            let s = prefetcher.status()
            let eta = s.etaSeconds.map { "\(Int($0.rounded())) s" } ?? "?"
            let complete = s.progress >= 1
            let percent = (s.progress * 1000).rounded(.down) / 10
            let rate = (s.rate / 1e5).rounded() / 10
            let tail = complete ? "  complete\n" : (s.state == .paused ? "  (paused)   " : "             ")
            let line = "\rpulled \(percent)%  \(rate) MB/s  ETA \(eta)\(tail)"
            let bytes = Array(line.utf8)
            _ = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
            if complete { done.withLockedValue { $0 = true } }
        }
        timer.resume()
        return timer
    }

    private func startControl(server: NBDServer, export: Export, prefetcher: Prefetcher?, group: any EventLoopGroup,
                              logger: Logger) throws -> ControlServer? {
        guard let control else { return nil }
        let kind = source != nil ? "lazy" : (file != nil ? "file" : "memory")
        let c = ControlServer(path: control, group: group, logger: logger) { command in
            if command == "prefetch pause" || command == "prefetch resume" {
                var reply = JSONObject()
                guard let prefetcher, prefetcher.status().mode != .off else {
                    reply.add("error", "no background pull on this export (--prefetch off, or not a lazy export)")
                    return reply.rendered
                }
                if command == "prefetch pause" { prefetcher.pause() } else { prefetcher.resume() }
                reply.add("ok", true)
                let done = prefetcher.status().state == .done
                reply.add("prefetch", done ? "done" : (command == "prefetch pause" ? "paused" : "running"))
                return reply.rendered
            }
            if command == "gate open" {
                return openGate(export: export, prefetcher: prefetcher, logger: logger)
            }
            guard command == "status" else {
                var e = JSONObject()
                e.add("error", "unknown command '\(command)' (known: status, prefetch pause, prefetch resume, gate open)")
                return e.rendered
            }
            var json = JSONObject()
            json.add("export", export.info.name)
            json.add("kind", kind)
            json.add("size", export.info.size)
            json.add("read_only", export.info.readOnly)
            json.add("connections", server.connectionCount)
            if swap {
                let (total, missing) = SwapSafety.threadsWithoutIOFlusher()
                json.add("swap_mode", true)
                json.add("threads", total)
                json.add("io_flusher", SwapSafety.ioFlusherError == nil && missing.isEmpty)
                json.add("threads_without_io_flusher", missing.count)
                json.add("memory_locked_bytes", SwapSafety.lockedBytes() ?? 0)
                json.add("oom_score_adj", SwapSafety.oomScoreAdjust() ?? 0)
            }
            (export.backend as? LazyBackend)?.status().addFields(to: &json)
            prefetcher?.status().addFields(to: &json)
            return json.rendered
        }
        do {
            try c.start()
        } catch {
            server.shutdown(grace: .seconds(1))
            throw RuntimeFailure("cannot open control socket \(control): \(error)")
        }
        return c
    }

    /// `gate open`: lets pulls reach the source, starts the background pull, then (in the background)
    /// marks the source's zero extents. Idempotent.
    private func openGate(export: Export, prefetcher: Prefetcher?, logger: Logger) -> String {
        var reply = JSONObject()
        guard let lazy = export.backend as? LazyBackend else {
            reply.add("error", "not a lazy export: there is no gate")
            return reply.rendered
        }
        let wasGated = lazy.isGated
        let released = lazy.openGate()
        if wasGated {
            logger.info("gate opened: \(released) waiting pulls sent to the source")
            prefetcher?.start()
            Task { await Self.markSourceZeros(lazy, logger: logger) }
        }
        reply.add("ok", true)
        reply.add("gate", "open")
        reply.add("was_closed", wasGated)
        reply.add("released_pulls", released)
        return reply.rendered
    }

    /// Swap mode: pre-faults an allocator reserve on every serving thread and checks, with
    /// PR_GET_IO_FLUSHER on those threads and the task flags of all threads, that every thread has
    /// the IO_FLUSHER flag. Each I/O thread is held until all have reported, so each reports once.
    private func checkSwapThreads(group: MultiThreadedEventLoopGroup, pool: NIOThreadPool, logger: Logger) throws {
        var loopsFlagged = 0, loops = 0
        for loop in group.makeIterator() {
            loops += 1
            let flagged = try loop.submit { () -> Bool in
                SwapSafety.prefaultReserve(bytes: 16 << 20)
                return SwapSafety.ioFlusherOnThisThread()
            }.wait()
            if flagged { loopsFlagged += 1 }
        }
        let arrived = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        let poolFlagged = NIOLockedValueBox(0)
        for _ in 0 ..< threads {
            pool.submit { _ in
                SwapSafety.prefaultReserve(bytes: 1 << 20)
                if SwapSafety.ioFlusherOnThisThread() { poolFlagged.withLockedValue { $0 += 1 } }
                arrived.signal()
                release.wait()
            }
        }
        var poolReported = 0
        for _ in 0 ..< threads where arrived.wait(timeout: .now() + 10) == .success { poolReported += 1 }
        for _ in 0 ..< threads { release.signal() }
        let poolOK = poolFlagged.withLockedValue { $0 }
        let (total, missing) = SwapSafety.threadsWithoutIOFlusher()
        let locked = (SwapSafety.lockedBytes() ?? 0) >> 20
        let oom = SwapSafety.oomScoreAdjust() ?? 0
        if SwapSafety.ioFlusherError != nil {
            logger.info("swap mode: \(locked) MiB locked; oom_score_adj \(oom); IO_FLUSHER unavailable (see warning)")
            return
        }
        guard loopsFlagged == loops, poolOK == threads, poolReported == threads, missing.isEmpty else {
            throw RuntimeFailure("--swap: PR_SET_IO_FLUSHER is missing on some threads (event loops \(loopsFlagged)/\(loops), "
                + "I/O threads \(poolOK)/\(threads), threads without the flag: \(missing)); refusing to serve swap")
        }
        logger.info("swap mode: PR_GET_IO_FLUSHER = 1 on \(loops) event-loop and \(threads) I/O threads, IO_FLUSHER on all \(total) threads; \(locked) MiB locked; oom_score_adj \(oom)")
    }

    private func writePidfile(_ path: String) throws {
        let tmp = path + ".tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SystemError("open \(tmp)", errno: errno) }
        let text = Array("\(getpid())\n".utf8)
        let n = text.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        let e = errno
        Glibc.close(fd)
        guard n == text.count else { throw SystemError("write \(tmp)", errno: e) }
        guard rename(tmp, path) == 0 else { throw SystemError("rename \(tmp)", errno: errno) }
    }
}

/// Runs async work from synchronous start-up code and waits for it.
func runBlocking<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) throws -> T {
    let done = DispatchSemaphore(value: 0)
    let result = NIOLockedValueBox<Result<T, any Error>?>(nil)
    Task {
        do {
            let value = try await body()
            result.withLockedValue { $0 = .success(value) }
        } catch {
            result.withLockedValue { $0 = .failure(error) }
        }
        done.signal()
    }
    done.wait()
    guard let outcome = result.withLockedValue({ $0 }) else {
        throw RuntimeFailure("start-up task ended without a result")
    }
    return try outcome.get()
}

/// A failure after the arguments were accepted (a file that cannot be opened, a port in use...).
struct RuntimeFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
