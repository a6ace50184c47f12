import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// Where the server listens.
public enum NBDListener: Sendable, Hashable, CustomStringConvertible {
    case tcp(host: String, port: Int)
    case unix(path: String)
    /// A listening socket handed over by systemd (socket activation: LISTEN_FDS).
    case inherited(fd: Int32)

    public var description: String {
        switch self {
        case .tcp(let host, let port): return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case .unix(let path): return "unix:\(path)"
        case .inherited(let fd): return "fd \(fd) (socket activation)"
        }
    }

    /// The URI a client (libnbd, nbdinfo, qemu) uses for `export` on this listener.
    public func uri(export: String, tls: Bool) -> String {
        let scheme = tls ? "nbds" : "nbd"
        let name = Self.percentEncoded(export)
        switch self {
        case .tcp(let host, let port):
            let h = host.contains(":") ? "[\(host)]" : host
            return "\(scheme)://\(h):\(port)/\(name)"
        case .unix(let path):
            return "\(scheme)+unix:///\(name)?socket=\(Self.percentEncoded(path, keepSlash: true))"
        case .inherited(let fd):
            return "fd \(fd)"
        }
    }

    static func percentEncoded(_ s: String, keepSlash: Bool = false) -> String {
        var out = ""
        for b in s.utf8 {
            let c = Character(UnicodeScalar(b))
            if c.isASCII && (c.isLetter || c.isNumber || "-._~".contains(c) || (keepSlash && c == "/")) {
                out.append(c)
            } else {
                out += "%" + String(b, radix: 16, uppercase: true).leftPadded(2)
            }
        }
        return out
    }
}

extension String {
    fileprivate func leftPadded(_ n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}

/// An NBD server: listeners, connections and graceful shutdown, serving one or more exports.
public final class NBDServer: Sendable {
    public let exports: [Export]
    public let listeners: [NBDListener]
    private let group: any EventLoopGroup
    private let logger: Logger
    private let tracker = ConnectionTracker()
    private let serverChannels = NIOLockedValueBox<[any Channel]>([])
    private let bound = NIOLockedValueBox<[NBDListener]>([])
    /// After each request a connection's event loop keeps polling for this long before it sleeps,
    /// trading CPU for the wake-up latency of a latency-bound client. Zero disables it.
    public let pollWindow: TimeAmount
    public let policy: ConnectionPolicy
    let tls: (any NBDTLSContext)?

    public init(exports: [Export], listeners: [NBDListener], group: any EventLoopGroup, logger: Logger,
                pollWindow: TimeAmount = .zero, policy: ConnectionPolicy = ConnectionPolicy(),
                tls: (any NBDTLSContext)? = nil) {
        self.exports = exports
        self.policy = policy
        if let tls, tls.mode != .off {
            self.tls = tls
            logger.info("TLS \(tls.mode.rawValue): \(tls.summary)")
        } else {
            self.tls = nil
        }
        self.pollWindow = pollWindow
        self.listeners = listeners
        self.group = group
        self.logger = logger
    }

    /// Binds every listener. Throws (after closing what was bound) if any of them fails.
    public func start() throws {
        do {
            for listener in listeners {
                let channel = try bootstrap(for: listener).wait()
                serverChannels.withLockedValue { $0.append(channel) }
                // What was actually bound (with --port 0 the kernel picks the port).
                let actual = Self.boundListener(listener, channel.localAddress)
                self.bound.withLockedValue { $0.append(actual) }
                logger.info("listening on \(actual)")
            }
        } catch {
            for c in serverChannels.withLockedValue({ $0 }) { try? c.close().wait() }
            throw error
        }
    }

    /// The listeners as bound: TCP with the port the kernel picked, inherited sockets as what they are.
    public var boundListeners: [NBDListener] { bound.withLockedValue { $0 } }

    static func boundListener(_ listener: NBDListener, _ address: SocketAddress?) -> NBDListener {
        switch (listener, address) {
        case (.unix, _): return listener
        case (_, .unixDomainSocket?): return .unix(path: address?.pathname ?? "?")
        case (_, let a?) where a.port != nil: return .tcp(host: a.ipAddress ?? "?", port: a.port ?? 0)
        default: return listener
        }
    }

    private func bootstrap(for listener: NBDListener) -> EventLoopFuture<any Channel> {
        let exports = self.exports, tracker = self.tracker, logger = self.logger, pollWindow = self.pollWindow
        let policy = self.policy, tls = self.tls
        let isTCP: Bool
        switch listener {
        case .tcp: isTCP = true
        case .unix: isTCP = false
        case .inherited(let fd): isTCP = SocketActivation.isInternetSocket(fd)
        }
        let connectionCounter = NIOLockedValueBox(0)
        var b = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 4096, initial: 65536, maximum: 1 << 20))
            .childChannelOption(.writeBufferWaterMark, value: .init(low: 4 << 20, high: 16 << 20))
            .childChannelOption(.autoRead, value: true)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
        if isTCP {
            b = b.childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
        }
        b = b.childChannelInitializer { channel in
            let id = connectionCounter.withLockedValue { n -> Int in n += 1; return n }
            var connLogger = logger
            connLogger[metadataKey: "conn"] = "\(listener)#\(id)"
            connLogger.debug("connection accepted", metadata: ["peer": "\(channel.remoteAddress.map { "\($0)" } ?? "?")"])
            return channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(
                    NBDConnectionHandler(exports: exports, tracker: tracker, logger: connLogger, pollWindow: pollWindow,
                                     policy: policy, tls: tls))
            }
        }
        switch listener {
        case .tcp(let host, let port):
            return b.bind(host: host, port: port)
        case .unix(let path):
            return b.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true)
        case .inherited(let fd):
            return b.withBoundSocket(fd)
        }
    }

    /// Connections open now.
    public var connectionCount: Int { tracker.count }
    /// Connections refused (address not allowed, connection limit, shutting down).
    public var refusedConnections: Int { tracker.refusals }

    /// Stops accepting, lets every connection finish its in-flight requests (up to `grace`), closes the
    /// exports' storage, and removes Unix socket files.
    public func shutdown(grace: TimeAmount = .seconds(30)) {
        let listening = serverChannels.withLockedValue { c -> [any Channel] in defer { c = [] }; return c }
        for c in listening { try? c.close().wait() }
        let open = tracker.beginShutdown()
        if !open.isEmpty { logger.info("shutting down: draining \(open.count) connection(s)") }
        for c in open { c.pipeline.fireUserInboundEventTriggered(ShutdownEvent()) }
        let deadline = NIODeadline.now() + grace
        for c in open {
            let closed = c.closeFuture
            let timer = c.eventLoop.scheduleTask(deadline: deadline) { c.close(promise: nil) }
            try? closed.wait()
            timer.cancel()
        }
        for e in exports {
            do { try e.backend.close() } catch { logger.error("closing export '\(e.info.name)': \(error)") }
        }
        for case .unix(let path) in listeners { unlink(path) }
    }
}
