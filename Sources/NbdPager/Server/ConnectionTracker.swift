import NIOConcurrencyHelpers
import NIOCore

/// Tells connections that the server is shutting down (they finish in-flight requests, then close).
struct ShutdownEvent: Sendable {}

/// The open connections of a server, so that shutdown can drain them.
final class ConnectionTracker: Sendable {
    private let state = NIOLockedValueBox<(channels: [ObjectIdentifier: any Channel], shuttingDown: Bool)>(([:], false))

    /// Registers a connection; false when the server is already shutting down.
    func add(_ channel: any Channel) -> Bool {
        state.withLockedValue { s in
            guard !s.shuttingDown else { return false }
            s.channels[ObjectIdentifier(channel)] = channel
            return true
        }
    }

    func remove(_ channel: any Channel) {
        _ = state.withLockedValue { $0.channels.removeValue(forKey: ObjectIdentifier(channel)) }
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
