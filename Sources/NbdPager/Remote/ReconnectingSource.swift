import Atomics
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// A remote source that survives outages: a request that fails because the connection dropped or the
/// server returned an error is retried, reconnecting with backoff, until `timeout` has passed since the
/// request started; only then does it fail. An outage and its end are logged once each, not per request.
public final class ReconnectingSource: RemoteSource {
    public typealias Connect = @Sendable () throws -> any RemoteSource

    public let size: UInt64
    public let supportsExtents: Bool
    public let timeout: TimeAmount
    private let outages = ManagedAtomic<UInt64>(0)
    private let reconnects = ManagedAtomic<UInt64>(0)
    /// Outages since start (a lost connection or failing source, until it works again).
    public var outageCount: UInt64 { outages.load(ordering: .relaxed) }
    /// Successful reconnects since start.
    public var reconnectCount: UInt64 { reconnects.load(ordering: .relaxed) }
    private let connect: Connect
    /// Runs the blocking reconnects.
    private let threadPool: NIOThreadPool
    private let logger: Logger
    private let state: NIOLockedValueBox<State>

    struct State {
        var current: (any RemoteSource)?
        var closed = false
        /// When the current outage began (nil while the source works).
        var outageSince: NIODeadline?
        /// A reconnect in progress, shared by every request waiting for it.
        var reconnecting: Task<any RemoteSource, any Error>?
    }

    /// Connects once (failing at once if the source cannot be reached at start-up); later reconnects
    /// (blocking) run on `threadPool`.
    public init(timeout: TimeAmount, threadPool: NIOThreadPool, logger: Logger, connect: @escaping Connect) throws {
        let first = try connect()
        self.size = first.size
        self.supportsExtents = first.supportsExtents
        self.timeout = timeout
        self.connect = connect
        self.threadPool = threadPool
        self.logger = logger
        self.state = NIOLockedValueBox(State(current: first))
    }

    public var isConnected: Bool {
        state.withLockedValue { $0.current?.isConnected ?? false }
    }

    public func read(offset: UInt64, length: Int) async throws -> ByteBuffer {
        try await retrying { try await $0.read(offset: offset, length: length) }
    }

    /// Fast path without Swift concurrency while the source works; any failure falls back to the
    /// retrying path (whose timeout starts then).
    public func read(offset: UInt64, length: Int, eventLoop: any EventLoop,
                     onArrival: (@Sendable (ByteBuffer) -> Void)?) -> EventLoopFuture<ByteBuffer> {
        let current = state.withLockedValue { s -> (any RemoteSource)? in
            guard !s.closed, s.outageSince == nil, let c = s.current, c.isConnected else { return nil }
            return c
        }
        guard let current else {
            return eventLoop.makeFutureWithTask { try await self.read(offset: offset, length: length) }
        }
        return current.read(offset: offset, length: length, eventLoop: eventLoop, onArrival: onArrival).flatMapError { error in
            guard Self.isRetryable(error) else { return eventLoop.makeFailedFuture(error) }
            return eventLoop.makeFutureWithTask { try await self.read(offset: offset, length: length) }
        }
    }

    public func extents(offset: UInt64, length: UInt64) async throws -> [NBDExtent] {
        try await retrying { try await $0.extents(offset: offset, length: length) }
    }

    public func close() {
        let (current, reconnecting) = state.withLockedValue { s -> ((any RemoteSource)?, Task<any RemoteSource, any Error>?) in
            s.closed = true
            defer { s.current = nil; s.reconnecting = nil }
            return (s.current, s.reconnecting)
        }
        reconnecting?.cancel()
        current?.close()
    }

    /// Whether an error is worth retrying: anything but a request that can never succeed.
    static func isRetryable(_ error: any Error) -> Bool {
        switch error as? SourceError {
        case .outOfRange, .invalidArgument, .closed: return false
        default: return true
        }
    }

    private func retrying<T: Sendable>(_ body: @Sendable (any RemoteSource) async throws -> T) async throws -> T {
        let deadline = NIODeadline.now() + timeout
        var lastError: (any Error)?
        while true {
            let source = try await usableSource(deadline: deadline, lastError: lastError)
            do {
                let value = try await body(source)
                recovered()
                return value
            } catch {
                guard Self.isRetryable(error), !state.withLockedValue({ $0.closed }) else { throw error }
                lastError = error
                beginOutage(error, failed: source)
                if NIODeadline.now() >= deadline { throw timedOut(error) }
                try await Task.sleep(nanoseconds: UInt64(backoff().nanoseconds))
            }
        }
    }

    private func timedOut(_ error: any Error) -> SourceError {
        .io(errno: EIO, "the source did not recover within \(timeout.nanoseconds / 1_000_000_000) s: \(error)")
    }

    /// The current source if it is connected, else the result of a (shared) reconnect attempt loop.
    private func usableSource(deadline: NIODeadline, lastError: (any Error)?) async throws -> any RemoteSource {
        while true {
            enum Next { case ready(any RemoteSource), wait(Task<any RemoteSource, any Error>) }
            var startedOutage = false
            let next: Next = try state.withLockedValue { s in
                if s.closed { throw SourceError.closed }
                if let current = s.current, current.isConnected, s.outageSince == nil || lastError == nil {
                    return .ready(current)
                }
                if let pending = s.reconnecting { return .wait(pending) }
                // Reconnecting is itself the start of an outage when nothing failed a request yet (the
                // connection dropped while idle).
                if s.outageSince == nil {
                    s.outageSince = .now()
                    startedOutage = true
                }
                let old = s.current
                let connect = self.connect
                let pool = self.threadPool
                let t = Task<any RemoteSource, any Error> {
                    old?.close()
                    return try await pool.runIfActive { try connect() }
                }
                s.reconnecting = t
                return .wait(t)
            }
            if startedOutage {
                logOutage(lastError.map { "\($0)" } ?? "the connection to the source was lost")
            }
            let task: Task<any RemoteSource, any Error>
            switch next {
            case .ready(let source): return source
            case .wait(let t): task = t
            }
            do {
                let source = try await task.value
                let installed = state.withLockedValue { s -> Bool in
                    guard s.reconnecting == task else { return false }
                    s.reconnecting = nil
                    s.current = source
                    return true
                }
                if installed { reconnects.wrappingIncrement(ordering: .relaxed) }
                return source
            } catch {
                state.withLockedValue { s in if s.reconnecting == task { s.reconnecting = nil } }
                if state.withLockedValue({ $0.closed }) { throw SourceError.closed }
                if NIODeadline.now() >= deadline { throw timedOut(lastError ?? error) }
                try await Task.sleep(nanoseconds: UInt64(backoff().nanoseconds))
            }
        }
    }

    /// Backoff between reconnect attempts: grows with the outage, capped at 2 s.
    private func backoff() -> TimeAmount {
        let since = state.withLockedValue { $0.outageSince } ?? .now()
        let elapsed = NIODeadline.now() - since
        return min(max(.milliseconds(100), .nanoseconds(elapsed.nanoseconds / 4)), .seconds(2))
    }

    private func beginOutage(_ error: any Error, failed source: any RemoteSource) {
        let first = state.withLockedValue { s -> Bool in
            // Drop a connection that failed so the next attempt reconnects.
            if s.current === source && !source.isConnected { s.current = nil }
            if s.outageSince != nil { return false }
            s.outageSince = .now()
            return true
        }
        if first { logOutage("\(error)") }
    }

    private func logOutage(_ why: String) {
        outages.wrappingIncrement(ordering: .relaxed)
        logger.warning("source outage: \(why); retrying for up to \(timeout.nanoseconds / 1_000_000_000) s per request")
    }

    private func recovered() {
        let since = state.withLockedValue { s -> NIODeadline? in
            defer { s.outageSince = nil }
            return s.outageSince
        }
        if let since {
            let ms = (NIODeadline.now() - since).nanoseconds / 1_000_000
            logger.info("source recovered after \(ms) ms")
        }
    }
}
