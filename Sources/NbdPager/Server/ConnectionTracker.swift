import NIOConcurrencyHelpers
import NIOCore

/// Tells connections that the server is shutting down (they finish in-flight requests, then close).
struct ShutdownEvent: Sendable {}

/// The open connections of a server, so that shutdown can drain them.
final class ConnectionTracker: Sendable {
    /// The open connections, how many of them each event loop serves, and whether shutdown has begun.
    private let state = NIOLockedValueBox<(channels: [ObjectIdentifier: any Channel], perLoop: [ObjectIdentifier: Int],
                                           shuttingDown: Bool)>(([:], [:], false))
    private let refusedCount = NIOLockedValueBox(0)

    enum Admission: Equatable { case added, shuttingDown, full(open: Int) }

    /// Registers a connection, unless the server is shutting down or `limit` connections are open.
    func add(_ channel: any Channel, limit: Int = .max) -> Admission {
        state.withLockedValue { s in
            guard !s.shuttingDown else { return .shuttingDown }
            guard s.channels.count < limit else { return .full(open: s.channels.count) }
            s.channels[ObjectIdentifier(channel)] = channel
            s.perLoop[ObjectIdentifier(channel.eventLoop), default: 0] += 1
            return .added
        }
    }

    /// Open connections served by `loop`.
    func count(on loop: any EventLoop) -> Int {
        state.withLockedValue { $0.perLoop[ObjectIdentifier(loop)] ?? 0 }
    }

    /// Counts a connection refused by the policy (address, connection limit).
    func refused() { refusedCount.withLockedValue { $0 += 1 } }

    /// Connections refused so far.
    var refusals: Int { refusedCount.withLockedValue { $0 } }

    func remove(_ channel: any Channel) {
        state.withLockedValue { s in
            guard s.channels.removeValue(forKey: ObjectIdentifier(channel)) != nil else { return }
            let key = ObjectIdentifier(channel.eventLoop)
            let left = (s.perLoop[key] ?? 1) - 1
            s.perLoop[key] = left > 0 ? left : nil
        }
    }

    /// Open connections (status reporting, tests).
    var count: Int { state.withLockedValue { $0.channels.count } }

    /// Marks the server as shutting down and returns the connections open at that moment.
    func beginShutdown() -> [any Channel] {
        state.withLockedValue { s in
            s.shuttingDown = true
            return Array(s.channels.values)
        }
    }
}
