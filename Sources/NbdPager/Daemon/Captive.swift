import CLinux
import NIOConcurrencyHelpers
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// `serve --run COMMAND` (nbdkit's captive mode): the daemon starts, COMMAND runs under `/bin/sh -c`
/// with the daemon's URI in its environment, and when it exits the daemon stops and its exit status
/// becomes the daemon's.
///
/// COMMAND's environment: `uri` (the first listener's URI for the first export), `exportname`,
/// `unixsocket` (a Unix listener's path) or `port` (a TCP listener's port), `tls` (0 off, 1 on,
/// 2 require), as nbdkit sets them.
extension Daemon {
    /// Runs the daemon and COMMAND; returns COMMAND's exit status (128 + the signal if a signal
    /// ended it, as a shell reports it). Throws when the daemon cannot start.
    public func runCaptive(command: String, printURI: Bool = false) throws -> Int32 {
        let outcome = NIOLockedValueBox<Result<Int32, any Error>>(.success(0))
        let done = ConditionLock(value: false)
        Task {
            let running = Task { try await self.run() }
            await self.waitUntilServingOrFinished()
            var status: Int32 = 0
            if self.isServing {
                if printURI, let uri = self.uris.first { Self.printLine(uri) }
                let waiter = NIOThreadPool(numberOfThreads: 1)
                waiter.start()
                do {
                    let environment = self.captiveEnvironment()
                    status = try await waiter.runIfActive { try Self.spawnAndWait(command, environment: environment) }
                } catch {
                    outcome.withLockedValue { $0 = .failure(error) }
                }
                try? await waiter.shutdownGracefully()
                await self.shutdown()
            }
            switch await running.result {
            case .failure(let error): outcome.withLockedValue { $0 = .failure(error) }
            case .success: outcome.withLockedValue { if case .success = $0 { $0 = .success(status) } }
            }
            done.lock()
            done.unlock(withValue: true)
        }
        done.lock(whenValue: true)
        done.unlock()
        return try outcome.withLockedValue { $0 }.get()
    }

    /// Asks the kernel for SIGTERM when the parent process exits (`--exit-with-parent`); false when
    /// the parent is already gone.
    public static func exitWithParent() -> Bool {
        _ = umemd_prctl(1 /* PR_SET_PDEATHSIG */, UInt(SIGTERM))
        return getppid() != 1
    }

    /// The URIs of the first export on every listener, in listener order.
    public var uris: [String] {
        let tls = configuration.tls.map { $0.mode != .off } ?? false
        let export = configuration.exports.first?.name ?? ""
        return boundListeners.map { $0.uri(export: export, tls: tls) }
    }

    func captiveEnvironment() -> [String: String] {
        var env: [String: String] = [:]
        if let uri = uris.first { env["uri"] = uri }
        env["exportname"] = configuration.exports.first?.name ?? ""
        for listener in boundListeners {
            switch listener {
            case .unix(let path): if env["unixsocket"] == nil { env["unixsocket"] = path }
            case .tcp(_, let port): if env["port"] == nil { env["port"] = "\(port)" }
            case .inherited: break
            }
        }
        switch configuration.tls?.mode {
        case .require?: env["tls"] = "2"
        case .on?: env["tls"] = "1"
        default: env["tls"] = "0"
        }
        return env
    }

    static func printLine(_ text: String) {
        let bytes = Array((text + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
    }

    /// `/bin/sh -c COMMAND` with `extra` added to this process's environment; waits for it.
    static func spawnAndWait(_ command: String, environment extra: [String: String]) throws -> Int32 {
        var entries: [String] = []
        var p = environ
        while let entry = p.pointee {
            let s = String(cString: entry)
            let key = s.split(separator: "=", maxSplits: 1).first.map(String.init) ?? s
            if extra[key] == nil { entries.append(s) }
            p += 1
        }
        for (k, v) in extra.sorted(by: { $0.key < $1.key }) { entries.append("\(k)=\(v)") }
        let argv: [UnsafeMutablePointer<CChar>?] = ["/bin/sh", "-c", command].map { s in s.withCString { strdup($0) } } + [nil]
        let envp: [UnsafeMutablePointer<CChar>?] = entries.map { s in s.withCString { strdup($0) } } + [nil]
        defer {
            argv.forEach { free($0) }
            envp.forEach { free($0) }
        }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, "/bin/sh", nil, nil, argv, envp)
        guard rc == 0 else { throw DaemonError("--run: cannot start /bin/sh: \(String(cString: strerror(rc)))") }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            guard errno == EINTR else { throw DaemonError("--run: waitpid: \(String(cString: strerror(errno)))") }
        }
        let low = status & 0x7f
        if low == 0 { return (status >> 8) & 0xff }      // exited
        return 128 + low                                  // killed by a signal
    }
}
