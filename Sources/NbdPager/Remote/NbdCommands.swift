import Atomics
import CNbd
import Logging
import NIOConcurrencyHelpers
#if canImport(Glibc)
import Glibc
#endif

// The requests an `NbdConnection` has in flight: a request to the source (`PendingRequest`, possibly
// several libnbd commands) and the context libnbd's callbacks receive for each command
// (`CommandContext`). Threading and lock order: see NbdConnection.swift.

/// One request to the source, possibly split into several libnbd commands ("parts"). Resumes its
/// continuation exactly once, after every part has completed or been freed by libnbd, so memory the
/// parts read into stays owned by libnbd until the awaiting task continues.
final class PendingRequest: @unchecked Sendable {
    private let lock = NIOLock()
    private var remaining: Int
    private var firstError: SourceError?
    typealias Completion = @Sendable (Result<[UInt32], any Error>) -> Void
    private var completion: Completion?
    /// base:allocation (length, flags) pairs, flattened, as the server sent them.
    private var extentPairs: [UInt32] = []

    /// `completion` runs exactly once, on the thread that finishes the last part (a libnbd event
    /// thread after libnbd returned, a submitter whose submission failed, or the thread closing the
    /// connection); it must not block for long, and must not close the connection.
    init(parts: Int, completion: @escaping Completion) {
        self.remaining = parts
        self.completion = completion
    }

    convenience init(parts: Int, continuation: CheckedContinuation<[UInt32], any Error>) {
        self.init(parts: parts) { continuation.resume(with: $0) }
    }

    var failure: SourceError? { lock.withLock { firstError } }

    /// Called from the extent callback (handle lock held).
    func addExtents(_ entries: UnsafeBufferPointer<UInt32>) {
        lock.withLock { extentPairs.append(contentsOf: entries) }
    }

    /// Marks `count` parts as done (with `error` if they failed). The last one resumes the caller.
    func finishParts(_ count: Int, error: SourceError?) {
        let resume: (Completion, Result<[UInt32], any Error>)? = lock.withLock {
            if let error, firstError == nil { firstError = error }
            remaining -= count
            guard remaining <= 0, let c = completion else { return nil }
            completion = nil
            if let firstError { return (c, .failure(firstError)) }
            let pairs = extentPairs
            extentPairs = []
            return (c, .success(pairs))
        }
        if let (c, result) = resume { c(result) }
    }
}

/// The user_data of one libnbd command. Retained once for libnbd; the free callback releases it.
final class CommandContext: @unchecked Sendable {
    enum Kind: String {
        case read
        case blockStatus = "block status"
    }

    let request: PendingRequest
    let connection: NbdConnection
    let kind: Kind
    let offset: UInt64
    let count: UInt64

    /// Built only when reporting an error, to keep the hot path free of string formatting.
    var what: String { "\(kind.rawValue) [\(offset), +\(count))" }

    private static let finishedBit = 1
    private static let submittedBit = 2
    private static let freedBit = 4
    private let state = ManagedAtomic<Int>(0)

    /// Contexts alive in the process: tests use it to prove libnbd freed every command.
    static let liveCount = ManagedAtomic<Int>(0)
    static var live: Int { liveCount.load(ordering: .relaxed) }

    init(request: PendingRequest, connection: NbdConnection, kind: Kind, offset: UInt64, count: UInt64) {
        self.request = request
        self.connection = connection
        self.kind = kind
        self.offset = offset
        self.count = count
        Self.liveCount.wrappingIncrement(ordering: .relaxed)
    }

    deinit {
        Self.liveCount.wrappingDecrement(ordering: .relaxed)
    }

    /// Finishes this part once; later calls are ignored.
    func finish(_ error: SourceError?) {
        let old = state.loadThenBitwiseOr(with: Self.finishedBit, ordering: .acquiringAndReleasing)
        guard old & Self.finishedBit == 0 else { return }
        connection.inFlight.wrappingDecrement(ordering: .relaxed)
        let request = self.request
        connection.deliver { request.finishParts(1, error: error) }
    }

    /// Completion callback: libnbd reports the command's errno (0 on success).
    func completed(errno e: Int32) {
        finish(e == 0 ? nil : connection.mapCommandError(errno: e, what: what))
    }

    /// Free callback. Without a prior completion this is either a failed submission (the submitter
    /// reports that error) or nbd_close dropping the command (close() is under way).
    func freed() {
        let old = state.loadThenBitwiseOr(with: Self.freedBit, ordering: .acquiringAndReleasing)
        if old & Self.finishedBit == 0 && old & Self.submittedBit != 0 {
            finish(connection.errorForAbandonedCommand())
        }
    }

    /// The submitting thread saw nbd_aio_* succeed.
    func submitted() {
        let old = state.loadThenBitwiseOr(with: Self.submittedBit, ordering: .acquiringAndReleasing)
        if old & Self.freedBit != 0 && old & Self.finishedBit == 0 {
            finish(connection.errorForAbandonedCommand())
        }
    }
}
