import NIOConcurrencyHelpers
import NIOCore

/// One source read of a run of export pages: its data as soon as the source answers, and its
/// completion once the data is in the store (or the pull failed).
final class Pull: Sendable {
    let pages: Range<UInt64>
    /// Where the run's bytes start in the source (`SourceMapping`); nil: unmapped, the data is zeros.
    let sourceOffset: UInt64?
    let bytes: UInt64
    /// Started by the background pull: not counted against the demand byte budget (the scheduler bounds
    /// its own), and sent through the background source.
    let background: Bool
    let data: EventLoopPromise<ByteBuffer>
    let stored: EventLoopPromise<Void>

    /// Callbacks to run on the receiving thread the moment the data arrives (see `pendingRead`).
    private let arrival = NIOLockedValueBox<(arrived: Bool, hooks: [@Sendable (ByteBuffer) -> Void])>((false, []))

    init(pages: Range<UInt64>, sourceOffset: UInt64?, bytes: UInt64, background: Bool, eventLoop: any EventLoop) {
        self.pages = pages
        self.sourceOffset = sourceOffset
        self.bytes = bytes
        self.background = background
        self.data = eventLoop.makePromise(of: ByteBuffer.self)
        self.stored = eventLoop.makePromise(of: Void.self)
    }

    var eventLoop: any EventLoop { stored.futureResult.eventLoop }

    /// Adds a hook; false when the data has already arrived (the hook will not run).
    func onArrival(_ hook: @escaping @Sendable (ByteBuffer) -> Void) -> Bool {
        arrival.withLockedValue { state in
            if state.arrived { return false }
            state.hooks.append(hook)
            return true
        }
    }

    var hasArrived: Bool { arrival.withLockedValue { $0.arrived } }

    /// Runs the hooks (outside the lock) on the calling thread.
    func arrived(_ data: ByteBuffer) {
        let hooks = arrival.withLockedValue { state -> [@Sendable (ByteBuffer) -> Void] in
            state.arrived = true
            defer { state.hooks = [] }
            return state.hooks
        }
        for hook in hooks { hook(data) }
    }
}

/// What the background pull sees of a pull it started: its size and when it is in the store.
public struct BackgroundPull: Sendable {
    public let pages: Range<UInt64>
    public let bytes: UInt64
    public let stored: EventLoopFuture<Void>
}
