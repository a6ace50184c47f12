import ArgumentParser
import Dispatch
import Logging
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

    @Option(name: .long, help: ArgumentHelp("Write the process id here once listening; removed on exit.", valueName: "path"))
    var pidfile: String?

    @Flag(name: .long, help: "Log every connection and rejected request.")
    var verbose = false

    static let defaultPort = 10809

    func validate() throws {
        switch (file, memory) {
        case (nil, nil): throw ValidationError("one of --file or --memory is required")
        case (.some, .some): throw ValidationError("--file and --memory cannot be used together")
        default: break
        }
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

        let backend: any BlockBackend
        let text: String
        do {
            if let file {
                backend = try FileBackend.open(path: file, readOnly: readonly)
                text = description ?? "file \(file)"
            } else {
                let size = memory ?? 0
                backend = try FileBackend.memory(size: size)
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

        let group = MultiThreadedEventLoopGroup(numberOfThreads: System.coreCount)
        let pool = NIOThreadPool(numberOfThreads: threads)
        pool.start()
        defer {
            try? pool.syncShutdownGracefully()
            try? group.syncShutdownGracefully()
        }
        let export = Export(name: exportName, description: text, backend: backend, readOnly: readonly,
                            minimumBlockSize: minBlockSize, threadPool: pool)
        let server = NBDServer(exports: [export], listeners: listeners, group: group, logger: logger,
                               pollWindow: .microseconds(Int64(pollUs)))

        do {
            try server.start()
        } catch {
            try? backend.close()
            throw RuntimeFailure("cannot listen: \(error)")
        }
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
        stop.wait()
        logger.info("signal received, shutting down")
        server.shutdown()
        sources.forEach { $0.cancel() }
        if let pidfile { unlink(pidfile) }
        logger.info("stopped")
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

/// A failure after the arguments were accepted (a file that cannot be opened, a port in use...).
struct RuntimeFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
