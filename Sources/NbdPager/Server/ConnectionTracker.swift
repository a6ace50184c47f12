import NIOConcurrencyHelpers
import NIOCore

/// Tells connections that the server is shutting down (they finish in-flight requests, then close).
struct ShutdownEvent: Sendable {}

/// The open connections of a server, so that shutdown can drain them.
final class ConnectionTracker: Sendable {
    private let state = NIOLockedValueBox<(channels: [ObjectIdentifier: any Channel], shuttingDown: Bool)>(([:], false))
    /// Open connections per event loop.
    private let perLoop = NIOLockedValueBox<[ObjectIdentifier: Int]>([:])
    private let refusedCount = NIOLockedValueBox(0)

    enum Admission: Equatable { case added, shuttingDown, full(open: Int) }

    /// Registers a connection, unless the server is shutting down or `limit` connections are open.
    func add(_ channel: any Channel, limit: Int = .max) -> Admission {
        state.withLockedValue { s in
            guard !s.shuttingDown else { return .shuttingDown }
            guard s.channels.count < limit else { return .full(open: s.channels.count) }
            s.channels[ObjectIdentifier(channel)] = channel
            perLoop.withLockedValue { $0[ObjectIdentifier(channel.eventLoop), default: 0] += 1 }
            return .added
        }
    }

    /// Open connections served by `loop`.
    func count(on loop: any EventLoop) -> Int {
        perLoop.withLockedValue { $0[ObjectIdentifier(loop)] ?? 0 }
    }

    /// Counts a connection refused by the policy (address, connection limit).
    func refused() { refusedCount.withLockedValue { $0 += 1 } }

    /// Connections refused so far.
    var refusals: Int { refusedCount.withLockedValue { $0 } }

    func remove(_ channel: any Channel) {
        state.withLockedValue { s in
            guard s.channels.removeValue(forKey: ObjectIdentifier(channel)) != nil else { return }
            perLoop.withLockedValue { counts in
                let key = ObjectIdentifier(channel.eventLoop)
                let left = (counts[key] ?? 1) - 1
                counts[key] = left > 0 ? left : nil
            }
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
