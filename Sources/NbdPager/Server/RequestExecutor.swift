import Atomics
import NIOCore
import NIOPosix

/// What the executor reports to its connection: a request went asynchronous, or finished after going
/// asynchronous (its reply is written and flushed). Event loop only.
protocol RequestTracking: AnyObject {
    func requestStarted()
    func requestFinished()
    /// The connection is closing: no reply may be written directly from another thread any more.
    var isClosing: Bool { get }
    /// The request about to run may block the event loop (storage that can wait on a disk): nothing
    /// else of this connection is in flight or buffered, and no other connection shares its loop.
    var mayBlockEventLoop: Bool { get }
    /// Where pool threads count the requests they finished and answered themselves; nil when each
    /// finish is to be reported with `requestFinished` on the event loop.
    var completions: QuietCompletions? { get }
    /// Event loop: takes the count of `completions` (it was not quiet when a request finished).
    func collectFinished()
}

extension RequestTracking {
    var mayBlockEventLoop: Bool { false }
    var completions: QuietCompletions? { nil }
    func collectFinished() {}
}

/// Runs the requests of one connection against its export and writes their replies.
///
/// - Requests run inline on the event loop when the storage answers without blocking (memory, tmpfs, or
///   a page-cache hit via RWF_NOWAIT); everything else goes to the export's thread pool and replies out
///   of order. Range operations so large that they would stall the event loop always go to the pool.
/// - A lazy export first makes the range local (`prepare`, pulling absent pages). Its reads of absent
///   pages are answered from the pulled data as soon as it arrives (`pendingRead`); a small one is
///   written by the thread that received the data while the socket has room (`DirectReplyWriter`),
///   saving the event loop's wake-up on a page fault.
/// - With structured replies, the all-zero blocks of a read go as OFFSET_HOLE chunks (`ZeroRuns`).
///
/// Asynchronous requests are reported to `tracker` (`requestStarted`/`requestFinished`) so that the
/// connection's `ConnectionLifecycle` can apply back-pressure and close when all are answered. The
/// connection drops `tracker` when its channel goes away.
final class RequestExecutor<Tracker: RequestTracking> {
    static var maxExtents: Int { 16 * 1024 }
    static var maxInlineRangeLength: UInt32 { 64 << 20 }

    let export: Export
    let writer: ReplyWriter
    var tracker: Tracker?

    init(export: Export, writer: ReplyWriter, tracker: Tracker) {
        self.export = export
        self.writer = writer
        self.tracker = tracker
    }

    private var eventLoop: any EventLoop { writer.context.eventLoop }

    /// Counts a request answered (or failed) now, `start` being when it arrived.
    private func record(_ request: NBDRequest, _ start: NIODeadline, failed: Bool) {
        export.stats.record(request, since: start, failed: failed)
    }

    func run(_ request: NBDRequest, payload: ByteBuffer?) {
        let backend = export.backend
        let start = NIODeadline.now()
        if request.command == .read, backend.capabilities.pendingReads,
           let data = pendingRead(request) {
            tracker?.requestStarted()
            data.future.assumeIsolated().whenComplete { result in
                switch result {
                case .success(let bytes):
                    // Already written from the source's thread when `sent` is set.
                    if !data.sent.load(ordering: .sequentiallyConsistent) {
                        self.writer.sendReadReply(request, data: bytes)
                    }
                    self.record(request, start, failed: false)
                case .failure(let error):
                    self.writer.sendError(NBDErrno(error), cookie: request.cookie, message: "\(error)")
                    self.record(request, start, failed: true)
                }
                self.finished()
            }
            return
        }
        let ready: EventLoopFuture<Void>?
        switch request.command {
        case .read, .cache:
            ready = backend.prepare(offset: request.offset, length: UInt64(request.length), forWrite: false,
                                    eventLoop: eventLoop)
        case .write, .trim, .writeZeroes:
            ready = backend.prepare(offset: request.offset, length: UInt64(request.length), forWrite: true,
                                    eventLoop: eventLoop)
        case .flush, .blockStatus, .disconnect:
            ready = nil
        }
        guard let ready else {
            execute(request, payload: payload, start: start)
            return
        }
        tracker?.requestStarted()
        ready.assumeIsolated().whenComplete { result in
            switch result {
            case .success:
                self.execute(request, payload: payload, start: start)
            case .failure(let error):
                self.writer.sendError(NBDErrno(error), cookie: request.cookie, message: "\(error)")
                self.record(request, start, failed: true)
            }
            self.finished()
        }
    }

    /// An asynchronous request is done: its reply is queued (or it was started again, inline or on the
    /// pool, counted again).
    private func finished() {
        writer.flushIfNeeded()
        tracker?.requestFinished()
    }

    private func execute(_ request: NBDRequest, payload: ByteBuffer?, start: NIODeadline) {
        let backend = export.backend
        // Memory-speed storage runs inline, except range operations so large (multi-GiB zeroing) that
        // they would stall every other connection on this event loop.
        // So does storage that may block, when blocking only delays this connection's own next request:
        // a synchronous write or flush is then answered by the thread that read it, as in nbdkit,
        // without the two thread hops of the pool.
        let mayBlock = !backend.capabilities.inlineSafe && (tracker?.mayBlockEventLoop ?? false)
        let inline = (backend.capabilities.inlineSafe || mayBlock) && request.length <= Self.maxInlineRangeLength
        switch request.command {
        case .read:
            runRead(request, start: start, mayBlock: mayBlock)
        case .write:
            runWrite(request, payload: payload ?? ByteBuffer(), start: start, mayBlock: mayBlock)
        case .blockStatus:
            let maxExtents = request.flags.contains(.reqOne) ? 1 : Self.maxExtents
            let cookie = request.cookie
            perform(inline: inline, request: request, start: start) {
                let extents = try backend.blockStatus(offset: request.offset, length: UInt64(request.length),
                                                      maxExtents: maxExtents)
                var b = ByteBuffer()
                b.writeBlockStatusReply(cookie: cookie, contextID: NBDLimits.baseAllocationContextID, extents: extents)
                return b
            }
        case .flush, .trim, .writeZeroes, .cache:
            let cookie = request.cookie
            perform(inline: inline, request: request, start: start) {
                let offset = request.offset, length = UInt64(request.length), fua = request.flags.contains(.fua)
                switch request.command {
                case .flush: try backend.flush()
                case .trim: try backend.trim(offset: offset, length: length, fua: fua)
                case .writeZeroes:
                    try backend.zero(offset: offset, length: length, mayTrim: !request.flags.contains(.noHole),
                                     fast: request.flags.contains(.fastZero), fua: fua)
                case .cache: try backend.cache(offset: offset, length: length)
                default: break
                }
                var b = ByteBuffer()
                b.writeSimpleReply(error: .ok, cookie: cookie)
                return b
            }
        case .disconnect:
            break  // handled by the state machine
        }
    }

    /// Runs `body` (which builds the reply) inline or on the thread pool, and sends its reply or error.
    private func perform(inline: Bool, request: NBDRequest, start: NIODeadline,
                         _ body: @escaping @Sendable () throws -> ByteBuffer) {
        if inline {
            do {
                writer.send(try body())
                record(request, start, failed: false)
            } catch {
                writer.sendError(NBDErrno(error), cookie: request.cookie, message: "\(error)")
                record(request, start, failed: true)
            }
            return
        }
        offload(request, start: start, body)
    }

    private func offload(_ request: NBDRequest, start: NIODeadline, _ body: @escaping @Sendable () throws -> ByteBuffer) {
        tracker?.requestStarted()
        // The pool thread writes a small reply itself when NIO has nothing queued and the socket has room
        // (`DirectReplyWriter`): a synchronous write or flush then answers without waiting for the event
        // loop to wake up (4 KiB WRITE+FUA at QD1 on ext4: about 35 µs of the 75 by which it trailed
        // nbdkit), at any queue depth. Having answered, it does not wake the event loop either unless
        // the connection needs to hear of it now (`QuietCompletions`).
        let direct = (tracker?.isClosing ?? true) ? nil : writer.direct
        let completions = direct == nil ? nil : tracker?.completions
        let stats = export.stats
        let eventLoop = self.eventLoop
        let bound = NIOLoopBound(self, eventLoop: eventLoop)
        export.threadPool.submit { state in
            let result: Result<ByteBuffer, any Error> = state == .active
                ? Result(catching: body) : .failure(NIOThreadPoolError.ThreadPoolInactive())
            if case .success(let reply) = result, let direct, direct.tryWrite(header: reply, data: ByteBuffer()) {
                stats.record(request, since: start, failed: false)
                if let completions {
                    if !completions.finishedElsewhere() {
                        eventLoop.execute { bound.value.tracker?.collectFinished() }
                    }
                } else {
                    eventLoop.execute { bound.value.finished() }
                }
                return
            }
            // A stopped pool runs this at once on the event loop: answer there and then.
            eventLoop.executeOrRun {
                let executor = bound.value
                switch result {
                case .success(let reply):
                    executor.writer.send(reply)
                    executor.record(request, start, failed: false)
                case .failure(let error):
                    executor.writer.sendError(NBDErrno(error), cookie: request.cookie, message: "\(error)")
                    executor.record(request, start, failed: true)
                }
                executor.finished()
            }
        }
    }

    /// A read of absent pages of a lazy export: its data future, and whether the reply has already been
    /// written directly by the thread that received the data (small replies, when the socket has room).
    private func pendingRead(_ request: NBDRequest) -> (future: EventLoopFuture<ByteBuffer>, sent: ManagedAtomic<Bool>)? {
        let sent = ManagedAtomic<Bool>(false)
        var early: (@Sendable (ByteBuffer) -> Void)? = nil
        if let direct = writer.direct, !(tracker?.isClosing ?? true),
           Int(request.length) + 32 <= DirectReplyWriter.maxDirectReply {
            let structured = writer.structured
            early = { data in
                let header = ReplyWriter.readReplyHeader(request, dataLength: data.readableBytes, structured: structured)
                if direct.tryWrite(header: header, data: data) { sent.store(true, ordering: .sequentiallyConsistent) }
            }
        }
        guard let future = export.backend.pendingRead(offset: request.offset, length: UInt64(request.length),
                                                      eventLoop: eventLoop, early: early) else { return nil }
        return (future, sent)
    }

    private func runRead(_ request: NBDRequest, start: NIODeadline, mayBlock: Bool) {
        let length = Int(request.length)
        let structured = writer.structured
        let backend = export.backend
        let headerLength = ByteBuffer.readReplyHeaderLength(structured: structured)
        @Sendable func header(_ b: inout ByteBuffer) {
            b.writeReadReplyHeader(cookie: request.cookie, offset: request.offset, dataLength: length,
                                   structured: structured)
        }
        var reply = writer.allocator.buffer(capacity: 28 + length)
        header(&reply)
        do {
            let done = try reply.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { ptr in
                try backend.read(into: UnsafeMutableRawBufferPointer(rebasing: ptr[0..<length]),
                                 offset: request.offset, nonBlocking: !mayBlock)
            }
            if done == length {
                writer.send(Self.zeroHoles(reply, request, headerLength: headerLength, structured: structured))
                record(request, start, failed: false)
                return
            }
        } catch {
            writer.sendError(NBDErrno(error), cookie: request.cookie, message: "\(error)")
            record(request, start, failed: true)
            return
        }
        // Would block: read it all on the pool into a fresh buffer (the partial bytes are cheap to re-read).
        let allocator = writer.allocator
        offload(request, start: start) {
            var b = allocator.buffer(capacity: 28 + length)
            header(&b)
            _ = try b.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { ptr in
                try backend.read(into: UnsafeMutableRawBufferPointer(rebasing: ptr[0..<length]),
                                 offset: request.offset, nonBlocking: false)
            }
            return Self.zeroHoles(b, request, headerLength: headerLength, structured: structured)
        }
    }

    /// A complete read reply with its zero blocks sent as holes (structured replies only).
    private static func zeroHoles(_ reply: ByteBuffer, _ request: NBDRequest, headerLength: Int,
                                  structured: Bool) -> ByteBuffer {
        guard structured else { return reply }
        return ZeroRuns.withHoles(reply, headerLength: headerLength, dataLength: Int(request.length),
                                  offset: request.offset, cookie: request.cookie,
                                  dontFragment: request.flags.contains(.dontFragment))
    }

    private func runWrite(_ request: NBDRequest, payload: ByteBuffer, start: NIODeadline, mayBlock: Bool) {
        let backend = export.backend
        let fua = request.flags.contains(.fua)
        let cookie = request.cookie
        let done: Int
        do {
            done = try payload.withUnsafeReadableBytes { ptr in
                try backend.write(from: ptr, offset: request.offset, fua: fua, nonBlocking: !mayBlock)
            }
        } catch {
            writer.sendError(NBDErrno(error), cookie: cookie, message: "\(error)")
            record(request, start, failed: true)
            return
        }
        if done == payload.readableBytes {
            var b = writer.allocator.buffer(capacity: 16)
            b.writeSimpleReply(error: .ok, cookie: cookie)
            writer.send(b)
            record(request, start, failed: false)
            return
        }
        offload(request, start: start) {
            _ = try payload.withUnsafeReadableBytes { ptr in
                try backend.write(from: UnsafeRawBufferPointer(rebasing: ptr[done...]),
                                  offset: request.offset + UInt64(done), fua: fua, nonBlocking: false)
            }
            var b = ByteBuffer()
            b.writeSimpleReply(error: .ok, cookie: cookie)
            return b
        }
    }
}

extension RequestStats {
    /// Counts `request`, answered (or failed) now, `start` being when it arrived. Any thread.
    fileprivate func record(_ request: NBDRequest, since start: NIODeadline, failed: Bool) {
        record(request.command, length: request.length, nanoseconds: (NIODeadline.now() - start).nanoseconds,
               failed: failed)
    }
}

extension EventLoop {
    /// Runs `body` now when called on this loop, else queues it there.
    fileprivate func executeOrRun(_ body: @escaping @Sendable () -> Void) {
        if inEventLoop { body() } else { execute(body) }
    }
}
