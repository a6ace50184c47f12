import Atomics
import CLinux
import CNbd
import Logging
import NIOConcurrencyHelpers
#if canImport(Glibc)
import Glibc
#endif

// One libnbd handle with its own event thread.
//
// Threading model (libnbd(3), "Callbacks and locking"):
// - Commands are submitted from any thread with nbd_aio_pread / nbd_aio_block_status while holding
//   `NbdConnection.lock` (which only orders submission against close; libnbd's own handle lock makes
//   the calls thread safe). libnbd writes the request from the submitting thread when the socket
//   takes it; when part of it is left queued (direction includes WRITE), the eventfd is written so
//   that the event thread re-reads the poll direction.
// - The event thread runs the usual loop: poll(nbd_aio_get_fd + eventfd) with the events
//   nbd_aio_get_direction asks for, then nbd_aio_notify_read / _write.
// - libnbd calls our completion, extent and free callbacks with its handle lock held (on the event
//   thread, or on a submitting thread when submission fails, or in nbd_close). They never call back
//   into libnbd: they only record results. Finished requests are handed to their callers after
//   nbd_aio_notify_* has returned (`deliver`), so callers' completions run without the handle lock
//   and other threads can submit meanwhile.
//
// Lock order: NbdConnection.lock → libnbd handle lock → PendingRequest.lock.

final class NbdConnection: @unchecked Sendable {
    enum State {
        case open
        case dead(String)
        case closed
    }

    let index: Int
    private let handle: OpaquePointer
    private let wakeFD: Int32
    private let logger: Logger

    /// Guards `state`, submission and the handle's lifetime (nbd_close happens after `.closed`).
    private let lock = NIOLock()
    private var state: State = .open
    private var thread: pthread_t?

    /// Commands submitted and not yet finished (for least-loaded selection).
    let inFlight = ManagedAtomic<Int>(0)
    private let usable = ManagedAtomic<Bool>(true)
    private let closedLocally = ManagedAtomic<Bool>(false)
    private let stopRequested = ManagedAtomic<Bool>(false)
    /// While the event thread is inside nbd_aio_notify_*, finished requests queue here (see `deliver`).
    private let delivery = NIOLockedValueBox<(inNotify: Bool, pending: [@Sendable () -> Void])>((false, []))

    init(index: Int, handle: OpaquePointer, logger: Logger) throws {
        self.index = index
        self.handle = handle
        self.logger = logger
        let fd = umemd_eventfd_create()
        guard fd >= 0 else {
            let e = errno
            nbd_close(handle)
            throw SourceError.connect("eventfd: \(String(cString: strerror(e)))")
        }
        self.wakeFD = fd
    }

    /// Starts the event thread. Call once, right after init.
    func start() throws {
        var tid = pthread_t()
        let arg = Unmanaged.passRetained(self).toOpaque()
        let rc = pthread_create(&tid, nil, { arg in
            guard let arg else { return nil }
            let connection = Unmanaged<NbdConnection>.fromOpaque(arg).takeRetainedValue()
            connection.runEventLoop()
            return nil
        }, arg)
        guard rc == 0 else {
            Unmanaged<NbdConnection>.fromOpaque(arg).release()
            throw SourceError.connect("cannot start the event thread: \(String(cString: strerror(rc)))")
        }
        lock.withLock { thread = tid }
    }

    deinit {
        // The event thread holds a reference while it runs, so reaching deinit means it has exited
        // or never started; close() releases the handle and the eventfd.
        close()
    }

    var isUsable: Bool { usable.load(ordering: .relaxed) }

    var deathReason: String? {
        lock.withLock {
            if case .dead(let why) = state { return why }
            return nil
        }
    }

    // MARK: submission

    /// Submits one NBD_CMD_READ into `buffer`; the outcome arrives through `request`.
    func submitRead(into buffer: UnsafeMutableRawPointer, count: Int, offset: UInt64, request: PendingRequest) {
        submit(request: request, kind: .read, offset: offset, count: UInt64(count)) { handle, completion in
            nbd_aio_pread(handle, buffer, count, offset, completion, 0)
        }
    }

    /// Submits one NBD_CMD_BLOCK_STATUS; base:allocation pairs are collected into `request`.
    func submitBlockStatus(offset: UInt64, count: UInt64, request: PendingRequest) {
        submit(request: request, kind: .blockStatus, offset: offset, count: count) { handle, completion in
            let extent = nbd_extent_callback(
                callback: { userData, metacontext, _, entries, count, _ in
                    guard let userData, let metacontext, let entries else { return 0 }
                    guard strcmp(metacontext, "base:allocation") == 0 else { return 0 }
                    let context = Unmanaged<CommandContext>.fromOpaque(userData).takeUnretainedValue()
                    // Pairs of (length, flags); an odd trailing entry would be a libnbd bug: drop it.
                    context.request.addExtents(UnsafeBufferPointer(start: entries, count: count & ~1))
                    return 0
                },
                user_data: completion.user_data,
                free: nil)
            return nbd_aio_block_status(handle, count, offset, extent, completion, 0)
        }
    }

    private func submit(request: PendingRequest, kind: CommandContext.Kind, offset: UInt64, count: UInt64,
                        _ body: (OpaquePointer, nbd_completion_callback) -> Int64) {
        let context = CommandContext(request: request, connection: self, kind: kind, offset: offset, count: count)
        // Counted before submission so that a fast completion never drives the counter negative;
        // CommandContext.finish decrements it exactly once on every path.
        inFlight.wrappingIncrement(ordering: .relaxed)
        var needWake = false
        let failure: SourceError? = lock.withLock {
            switch state {
            case .closed: return .closed
            case .dead(let why): return .connectionLost(why)
            case .open: break
            }
            let userData = Unmanaged.passRetained(context).toOpaque()
            let completion = nbd_completion_callback(
                callback: { userData, error in
                    guard let userData else { return 1 }
                    let context = Unmanaged<CommandContext>.fromOpaque(userData).takeUnretainedValue()
                    context.completed(errno: error?.pointee ?? 0)
                    return 1  // auto-retire
                },
                user_data: userData,
                free: { userData in
                    guard let userData else { return }
                    let context = Unmanaged<CommandContext>.fromOpaque(userData).takeRetainedValue()
                    context.freed()
                })
            let cookie = body(handle, completion)
            guard cookie < 0 else {
                context.submitted()
                // libnbd sends the request from this thread when it can. Only if part of it is
                // still queued does the event thread (which may be polling for POLLIN only) need
                // to re-read the direction and wait for POLLOUT.
                needWake = nbd_aio_get_direction(handle) & UInt32(LIBNBD_AIO_DIRECTION_WRITE) != 0
                return nil
            }
            // libnbd has already called the free callback (it does when the API fails) and will not
            // call back for this command; `context` stays alive through our own reference.
            let e = nbd_get_errno()
            let message = Self.lastError()
            if nbd_aio_is_dead(handle) != 0 || nbd_aio_is_closed(handle) != 0 {
                markDeadLocked(message)
                return .connectionLost("connection \(index): \(message)")
            }
            return mapCommandError(errno: e == 0 ? EIO : e, what: "\(context.what): \(message)")
        }
        if let failure {
            context.finish(failure)
        } else if needWake {
            wake()
        }
    }

    // MARK: errors

    static func lastError() -> String {
        guard let p = nbd_get_error() else { return "unknown libnbd error" }
        return String(cString: p)
    }

    /// Maps the errno libnbd reports for a command. Runs inside libnbd callbacks: no libnbd calls.
    func mapCommandError(errno e: Int32, what: String) -> SourceError {
        if closedLocally.load(ordering: .acquiring) { return .closed }
        switch e {
        case ENOTCONN, ESHUTDOWN, ECONNRESET, EPIPE, ECONNABORTED:
            return .connectionLost("connection \(index): \(what): \(String(cString: strerror(e)))")
        default:
            return .io(errno: e, "\(what) on connection \(index)")
        }
    }

    /// The error for a command libnbd dropped without completing it (nbd_close).
    func errorForAbandonedCommand() -> SourceError {
        closedLocally.load(ordering: .acquiring) ? .closed : .connectionLost("connection \(index): command abandoned")
    }

    // MARK: event loop

    /// Runs `body` (a request's completion) now, or, when the event thread is inside libnbd (with the
    /// handle lock held), right after libnbd returns.
    func deliver(_ body: @escaping @Sendable () -> Void) {
        let deferred = delivery.withLockedValue { state -> Bool in
            guard state.inNotify else { return false }
            state.pending.append(body)
            return true
        }
        if !deferred { body() }
    }

    /// One nbd_aio_notify_* call, then the completions it produced.
    private func notify(_ call: () -> Int32) -> Int32 {
        delivery.withLockedValue { $0.inNotify = true }
        let rc = call()
        let pending = delivery.withLockedValue { state -> [@Sendable () -> Void] in
            state.inNotify = false
            defer { state.pending = [] }
            return state.pending
        }
        for body in pending { body() }
        return rc
    }

    private func wake() {
        var one: UInt64 = 1
        _ = withUnsafeBytes(of: &one) { Glibc.write(wakeFD, $0.baseAddress, 8) }
    }

    private func drainWake() {
        var value: UInt64 = 0
        _ = withUnsafeMutableBytes(of: &value) { Glibc.read(wakeFD, $0.baseAddress, 8) }
    }

    private func markDeadLocked(_ reason: String) {
        if case .open = state {
            state = .dead(reason)
            usable.store(false, ordering: .releasing)
            logger.warning("remote source connection died", metadata: ["connection": "\(index)", "reason": "\(reason)"])
        }
    }

    private func markDead(_ reason: String) {
        lock.withLock { markDeadLocked(reason) }
    }

    private func runEventLoop() {
        let h = handle
        var fds = [pollfd](repeating: pollfd(), count: 2)
        var lastError = "server closed the connection"
        var consecutiveFailures = 0
        while !stopRequested.load(ordering: .acquiring) {
            if nbd_aio_is_dead(h) != 0 || nbd_aio_is_closed(h) != 0 {
                markDead(lastError)
                break
            }
            let dir = nbd_aio_get_direction(h)
            var events: Int16 = 0
            if dir & UInt32(LIBNBD_AIO_DIRECTION_READ) != 0 { events |= Int16(POLLIN) }
            if dir & UInt32(LIBNBD_AIO_DIRECTION_WRITE) != 0 { events |= Int16(POLLOUT) }
            fds[0] = pollfd(fd: events != 0 ? nbd_aio_get_fd(h) : -1, events: events, revents: 0)
            fds[1] = pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0)
            let r = fds.withUnsafeMutableBufferPointer { poll($0.baseAddress, 2, -1) }
            if r < 0 {
                let e = errno
                if e == EINTR { continue }
                markDead("poll: \(String(cString: strerror(e)))")
                break
            }
            if fds[1].revents != 0 { drainWake() }
            let revents = fds[0].revents
            if revents == 0 { continue }
            if revents & Int16(POLLNVAL) != 0 {
                markDead("the libnbd socket was closed under the event loop")
                break
            }
            let readable = revents & Int16(POLLIN | POLLHUP | POLLERR) != 0
            var rc: Int32 = 0
            if readable && dir & UInt32(LIBNBD_AIO_DIRECTION_READ) != 0 {
                rc = notify { nbd_aio_notify_read(h) }
            } else if revents & Int16(POLLOUT | POLLHUP | POLLERR) != 0 && dir & UInt32(LIBNBD_AIO_DIRECTION_WRITE) != 0 {
                rc = notify { nbd_aio_notify_write(h) }
            }
            if rc < 0 {
                lastError = Self.lastError()
                consecutiveFailures += 1
                // A failed notify normally moves the handle to DEAD (checked at the top of the
                // loop). Guard against a non-dead handle that keeps failing: give up on it.
                if consecutiveFailures > 1000 {
                    markDead(lastError)
                    break
                }
            } else {
                consecutiveFailures = 0
            }
        }
        logger.debug("remote source event thread exiting", metadata: ["connection": "\(index)"])
    }

    // MARK: close

    /// Stops the event thread, disconnects and closes the handle. Commands still pending fail with
    /// `SourceError.closed`. Idempotent.
    func close() {
        let tid: pthread_t? = lock.withLock {
            if case .closed = state { return nil }
            state = .closed
            usable.store(false, ordering: .releasing)
            closedLocally.store(true, ordering: .releasing)
            let t = thread
            thread = nil
            return t ?? pthread_t()
        }
        guard let tid else { return }
        stopRequested.store(true, ordering: .releasing)
        wake()
        if tid != pthread_t() {
            if pthread_equal(tid, pthread_self()) != 0 {
                pthread_detach(tid)
            } else {
                pthread_join(tid, nil)
            }
        }
        // Nothing else touches the handle now: no submissions (state is .closed), no event thread.
        if nbd_aio_is_ready(handle) != 0 && nbd_aio_in_flight(handle) == 0 {
            // Polite NBD_CMD_DISC, bounded so a stuck server cannot hold close() up.
            if nbd_aio_disconnect(handle, 0) == 0 {
                var waited = 0
                while waited < 1000 && nbd_aio_is_closed(handle) == 0 && nbd_aio_is_dead(handle) == 0 {
                    if nbd_poll(handle, 50) < 0 { break }
                    waited += 50
                }
            }
        }
        nbd_close(handle)  // frees anything still pending: the free callbacks fail it with .closed
        Glibc.close(wakeFD)
    }
}
