import Atomics
import CLinux
import Logging
import NIOCore
import NIOPosix

/// Runs one NBD connection: feeds received bytes to `NBDServerStateMachine` and carries out its actions.
///
/// Requests run inline on the event loop when the storage answers without blocking (memory, tmpfs, or a
/// page-cache hit via RWF_NOWAIT); everything else goes to the export's thread pool and replies out of order.
/// Reading from the socket pauses while too many requests are in flight or the client is not reading
/// replies, so memory stays bounded whatever the client sends.
///
/// Reads of a lazy export's absent pages are answered from the pulled data as soon as it arrives; a
/// small one on a quiet connection is written by the thread that received the data
/// (`DirectReplyWriter`), saving the event loop's wake-up on a page fault.
final class NBDConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    static let maxInFlight = 128
    static let maxExtents = 16 * 1024
    static let maxInlineRangeLength: UInt32 = 64 << 20
    static let handshakeTimeout: TimeAmount = .seconds(60)

    private var machine: NBDServerStateMachine
    private let exports: [String: Export]
    private let tracker: ConnectionTracker
    private var logger: Logger

    private var export: Export?
    private var structured = false
    private var cumulation: ByteBuffer?
    private var inFlight = 0
    private var readHeld = false
    /// No more bytes will be read: DISC received, the client half-closed, or the server is shutting down.
    /// Requests already received are still answered; the connection closes once they are.
    private var inputDone = false
    /// Server shutdown: requests not yet started are answered with ESHUTDOWN instead of being run.
    private var shuttingDown = false
    /// The close has been initiated (or the channel is gone): nothing more is parsed or sent.
    private var closing = false
    /// Parsing stopped on back-pressure with complete requests possibly still buffered.
    private var parsingBlocked = false
    private var needsFlush = false
    private var handshakeTimer: Scheduled<Void>?
    /// Reads made after shutdown to collect requests sent before it (see `drainAfterShutdown`).
    private var shutdownReads = 0
    static let maxShutdownReads = 64
    /// Writes read replies from the thread that receives a demand miss's data. Created before anything is
    /// written on a connection to a lazy export, so that every NIO write is counted (`send`).
    private var direct: DirectReplyWriter?

    /// Busy-poll window (see `NBDServer.pollWindow`); zero disables polling.
    private let pollWindow: TimeAmount
    private var lastRequestAt = NIODeadline.distantPast
    private var polling = false
    /// Requests started since the last read completed, and whether each was small (a page, not a bulk copy).
    private var batchRequests = 0
    private var batchAllSmall = true
    static let pollRequestLimit: UInt32 = 64 * 1024

    init(exports: [Export], tracker: ConnectionTracker, logger: Logger, pollWindow: TimeAmount = .zero) {
        self.pollWindow = pollWindow
        self.machine = NBDServerStateMachine(exports: exports.map(\.info))
        var byName: [String: Export] = [:]
        for e in exports where byName[e.info.name] == nil { byName[e.info.name] = e }
        self.exports = byName
        self.tracker = tracker
        self.logger = logger
    }

    // MARK: lifecycle

    func channelActive(context: ChannelHandlerContext) {
        guard tracker.add(context.channel) else {
            context.close(promise: nil)
            return
        }
        if exports.values.contains(where: { $0.backend.capabilities.pendingReads }) {
            direct = DirectReplyWriter(context: context)
        }
        send(machine.greeting(), context)
        flushIfNeeded(context)
        let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
        handshakeTimer = context.eventLoop.scheduleTask(in: Self.handshakeTimeout) { [logger] in
            logger.info("closing connection: handshake not finished in time")
            loopBound.value.close(promise: nil)
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        handshakeTimer?.cancel()
        machine.markClosed()
        closing = true
        cumulation = nil
        tracker.remove(context.channel)
        direct?.close()
        logger.debug("connection closed")
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        logger.debug("connection error: \(error)")
        context.close(promise: nil)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is ShutdownEvent {
            // Server shutdown (NBD spec: serve in-flight requests, answer the rest with ESHUTDOWN).
            shuttingDown = true
            if !machine.isInTransmission {
                inputDone = true
                closeAfterReplies(context)
            } else {
                processBuffered(context: context)
                flushIfNeeded(context)
                drainAfterShutdown(context)
            }
        } else if case ChannelEvent.inputClosed = event {
            // The client shut down its sending side: answer what it sent, then close.
            inputDone = true
            finishIfDone(context)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    /// During shutdown: requests the client sent before it may still sit in the socket (reading pauses
    /// under back-pressure). They are read and answered (ESHUTDOWN) before the connection closes; closing
    /// with unread input would reset the connection and lose the replies already sent. Bounded, so a
    /// client that keeps sending cannot hold the shutdown up.
    private func drainAfterShutdown(_ context: ChannelHandlerContext) {
        guard shuttingDown, !inputDone, !closing else { return }
        let unread = (try? context.pipeline.syncOperations.withUnsafeTransportIfAvailable(of: NIOBSDSocket.Handle.self) {
            umemd_socket_inq($0)
        }) ?? 0
        if unread > 0 && shutdownReads < Self.maxShutdownReads {
            shutdownReads += 1
            context.read()
        } else {
            inputDone = true
            finishIfDone(context)
        }
    }

    /// Once no more input will come, closes when every received request has been answered.
    private func finishIfDone(_ context: ChannelHandlerContext) {
        if inputDone && inFlight == 0 && !parsingBlocked { closeAfterReplies(context) }
    }

    /// Closes once every reply queued so far has been handed to the kernel (a plain close would drop
    /// replies still waiting for a slow client to read).
    private func closeAfterReplies(_ context: ChannelHandlerContext) {
        guard !closing else { return }
        closing = true
        guard context.channel.isActive else { return }
        let written = context.eventLoop.makePromise(of: Void.self)
        needsFlush = false
        let direct = self.direct
        direct?.willWrite()
        context.writeAndFlush(wrapOutboundOut(ByteBuffer()), promise: written)
        written.futureResult.assumeIsolated().whenComplete { _ in
            direct?.didWrite()
            context.close(promise: nil)
        }
    }

    // MARK: inbound bytes

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        guard !closing, !machine.isClosed else { return }
        if cumulation == nil {
            cumulation = incoming
        } else {
            cumulation!.writeBuffer(&incoming)
        }
        processBuffered(context: context)
        finishIfDone(context)
    }

    /// Whether more requests may be started now: not too many in flight and the client is reading replies.
    /// Parsing stops while this is false, so a client that floods requests without reading replies
    /// cannot make the server buffer unbounded amounts of reply data.
    private func mayStartRequests(_ context: ChannelHandlerContext) -> Bool {
        inFlight < Self.maxInFlight && context.channel.isWritable
    }

    /// Parses and runs what has been received, as far as back-pressure allows.
    /// During shutdown nothing new is started, so everything buffered is parsed and answered at once.
    private func processBuffered(context: ChannelHandlerContext) {
        parsingBlocked = false
        while !closing, var buffer = cumulation {
            guard shuttingDown || mayStartRequests(context) else {
                parsingBlocked = true
                break
            }
            cumulation = nil  // keep the storage uniquely referenced while parsing
            let action = machine.next(from: &buffer)
            cumulation = buffer
            guard let action else { break }
            handle(action, context: context)
        }
        if let c = cumulation {
            if c.readableBytes == 0 {
                cumulation = nil
            } else if c.readerIndex > 1 << 20 {
                cumulation!.discardReadBytes()
            }
        }
        // Make room for a large WRITE payload in one allocation instead of growing step by step.
        let pending = machine.pendingPayloadBytes
        if pending > 0, var c = cumulation, c.writableBytes < pending - c.readableBytes {
            cumulation = nil
            c.reserveCapacity(minimumWritableBytes: pending - c.readableBytes)
            cumulation = c
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        flushIfNeeded(context)
        // Poll only for latency-bound traffic: one small request answered with nothing else in flight.
        // Deep queues and bulk transfers keep the CPU for the client instead.
        if pollWindow > .zero && batchRequests == 1 && batchAllSmall && inFlight == 0 {
            lastRequestAt = .now()
            startPolling(context)
        }
        batchRequests = 0
        batchAllSmall = true
        if shuttingDown { drainAfterShutdown(context) }
        context.fireChannelReadComplete()
    }

    /// Keeps the event loop spinning (epoll_wait with a zero timeout, via re-queued tasks) for a short
    /// window after a lone small request, so the next request of a latency-bound client (a page fault, a QD1
    /// reader) is picked up without the thread sleeping and being woken again. Stops by itself once the
    /// connection has been quiet for the window.
    private func startPolling(_ context: ChannelHandlerContext) {
        guard !polling else { return }
        polling = true
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        func tick() {
            let (handler, context) = loopBound.value
            guard !handler.closing, NIODeadline.now() - handler.lastRequestAt < handler.pollWindow else {
                handler.polling = false
                return
            }
            context.eventLoop.execute { tick() }
        }
        context.eventLoop.execute { tick() }
    }

    private func handle(_ action: NBDServerStateMachine.Action, context: ChannelHandlerContext) {
        switch action {
        case .send(let bytes):
            send(bytes, context)
        case .sendAndClose(let bytes):
            closing = true
            context.writeAndFlush(wrapOutboundOut(bytes)).assumeIsolated().whenComplete { _ in
                context.close(promise: nil)
            }
        case .close(let reason):
            logger.info("closing connection: \(reason)")
            closing = true
            flushIfNeeded(context)
            context.close(promise: nil)
        case .enterTransmission(let bytes, let session):
            handshakeTimer?.cancel()
            handshakeTimer = nil
            export = exports[session.export.name]
            structured = session.structuredReplies
            logger[metadataKey: "export"] = "\(session.export.name)"
            logger.debug("transmission phase", metadata: ["structured": "\(structured)"])
            send(bytes, context)
        case .request(let request, let payload):
            batchRequests += 1
            if request.length > Self.pollRequestLimit { batchAllSmall = false }
            if shuttingDown {
                sendError(.eshutdown, cookie: request.cookie, message: "server is shutting down", context)
            } else {
                run(request, payload: payload, context: context)
            }
        case .reject(let rejection):
            logger.debug("rejected request: \(rejection.message)")
            sendError(rejection.error, cookie: rejection.cookie, message: rejection.message, context)
        case .disconnect:
            inputDone = true
        }
    }

    // MARK: requests

    private func run(_ request: NBDRequest, payload: ByteBuffer?, context: ChannelHandlerContext) {
        guard let export else {
            sendError(.eio, cookie: request.cookie, message: "export is gone", context)
            return
        }
        // A lazy export first makes the range local (pulling absent pages); plain exports are ready.
        if request.command == .read, export.backend.capabilities.pendingReads,
           let data = pendingRead(request, export: export, context: context) {
            inFlight += 1
            data.future.assumeIsolated().whenComplete { result in
                self.inFlight -= 1
                switch result {
                case .success(let bytes):
                    // Already written from the source's thread when `sent` is set.
                    if !data.sent.load(ordering: .sequentiallyConsistent) {
                        self.sendReadReply(request, data: bytes, context)
                    }
                case .failure(let error):
                    self.sendError(NBDErrno(error), cookie: request.cookie, message: "\(error)", context)
                }
                self.flushIfNeeded(context)
                self.afterCompletion(context)
            }
            return
        }
        let ready: EventLoopFuture<Void>?
        switch request.command {
        case .read, .cache:
            ready = export.backend.prepare(offset: request.offset, length: UInt64(request.length), forWrite: false,
                                           eventLoop: context.eventLoop)
        case .write, .trim, .writeZeroes:
            ready = export.backend.prepare(offset: request.offset, length: UInt64(request.length), forWrite: true,
                                           eventLoop: context.eventLoop)
        case .flush, .blockStatus, .disconnect:
            ready = nil
        }
        guard let ready else {
            execute(request, payload: payload, export: export, context: context)
            return
        }
        inFlight += 1
        ready.assumeIsolated().whenComplete { result in
            self.inFlight -= 1
            switch result {
            case .success:
                self.execute(request, payload: payload, export: export, context: context)
            case .failure(let error):
                self.sendError(NBDErrno(error), cookie: request.cookie, message: "\(error)", context)
            }
            self.flushIfNeeded(context)
            self.afterCompletion(context)
        }
    }

    private func execute(_ request: NBDRequest, payload: ByteBuffer?, export: Export, context: ChannelHandlerContext) {
        let backend = export.backend
        // Memory-speed storage runs inline, except range operations so large (multi-GiB zeroing) that
        // they would stall every other connection on this event loop.
        let inline = backend.capabilities.inlineSafe && request.length <= Self.maxInlineRangeLength
        switch request.command {
        case .read:
            runRead(request, export: export, context: context)
        case .write:
            runWrite(request, payload: payload ?? ByteBuffer(), export: export, context: context)
        case .blockStatus:
            let maxExtents = request.flags.contains(.reqOne) ? 1 : Self.maxExtents
            let cookie = request.cookie
            perform(inline: inline, export: export, context: context, cookie: cookie) {
                let extents = try backend.blockStatus(offset: request.offset, length: UInt64(request.length),
                                                      maxExtents: maxExtents)
                var b = ByteBuffer()
                b.writeBlockStatusReply(cookie: cookie, contextID: NBDLimits.baseAllocationContextID, extents: extents)
                return b
            }
        case .flush, .trim, .writeZeroes, .cache:
            let cookie = request.cookie
            perform(inline: inline, export: export, context: context, cookie: cookie) {
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
    private func perform(inline: Bool, export: Export, context: ChannelHandlerContext, cookie: UInt64,
                         _ body: @escaping @Sendable () throws -> ByteBuffer) {
        if inline {
            do {
                send(try body(), context)
            } catch {
                sendError(NBDErrno(error), cookie: cookie, message: "\(error)", context)
            }
            return
        }
        offload(export: export, context: context, cookie: cookie, body)
    }

    private func offload(export: Export, context: ChannelHandlerContext, cookie: UInt64,
                         _ body: @escaping @Sendable () throws -> ByteBuffer) {
        inFlight += 1
        export.threadPool.runIfActive(eventLoop: context.eventLoop, body).assumeIsolated().whenComplete { result in
            self.inFlight -= 1
            switch result {
            case .success(let reply):
                self.send(reply, context)
            case .failure(let error):
                self.sendError(NBDErrno(error), cookie: cookie, message: "\(error)", context)
            }
            self.flushIfNeeded(context)
            self.afterCompletion(context)
        }
    }

    /// A read of absent pages of a lazy export: its data future, and whether the reply has already been
    /// written directly by the thread that received the data (small replies on a quiet connection).
    private func pendingRead(_ request: NBDRequest, export: Export,
                             context: ChannelHandlerContext) -> (future: EventLoopFuture<ByteBuffer>, sent: ManagedAtomic<Bool>)? {
        let sent = ManagedAtomic<Bool>(false)
        var early: (@Sendable (ByteBuffer) -> Void)? = nil
        if let direct, !closing, Int(request.length) + 32 <= DirectReplyWriter.maxDirectReply {
            let structured = self.structured
            early = { data in
                let header = Self.readReplyHeader(request, dataLength: data.readableBytes, structured: structured)
                if direct.tryWrite(header: header, data: data) { sent.store(true, ordering: .sequentiallyConsistent) }
            }
        }
        guard let future = export.backend.pendingRead(offset: request.offset, length: UInt64(request.length),
                                                      eventLoop: context.eventLoop, early: early) else { return nil }
        return (future, sent)
    }

    private static func readReplyHeader(_ request: NBDRequest, dataLength: Int, structured: Bool) -> ByteBuffer {
        var header = ByteBuffer()
        header.reserveCapacity(32)
        writeReadReplyHeader(into: &header, request, dataLength: dataLength, structured: structured)
        return header
    }

    /// The part of a successful read reply before its data (simple reply, or one OFFSET_DATA chunk).
    private static func writeReadReplyHeader(into b: inout ByteBuffer, _ request: NBDRequest, dataLength: Int,
                                             structured: Bool) {
        if structured {
            b.writeStructuredReplyHeader(flags: .done, type: .offsetData, cookie: request.cookie,
                                         length: UInt32(8 + dataLength))
            b.writeInteger(request.offset)
        } else {
            b.writeSimpleReply(error: .ok, cookie: request.cookie)
        }
    }

    /// A read reply whose data is already in a buffer: the header, then the data as it is (no copy).
    private func sendReadReply(_ request: NBDRequest, data: ByteBuffer, _ context: ChannelHandlerContext) {
        send(Self.readReplyHeader(request, dataLength: data.readableBytes, structured: structured), context)
        send(data, context)
    }

    private func runRead(_ request: NBDRequest, export: Export, context: ChannelHandlerContext) {
        let length = Int(request.length)
        let structured = self.structured
        let backend = export.backend
        @Sendable func header(_ b: inout ByteBuffer) {
            Self.writeReadReplyHeader(into: &b, request, dataLength: length, structured: structured)
        }
        var reply = context.channel.allocator.buffer(capacity: 28 + length)
        header(&reply)
        do {
            let done = try reply.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { ptr in
                try backend.read(into: UnsafeMutableRawBufferPointer(rebasing: ptr[0..<length]),
                                 offset: request.offset, nonBlocking: true)
            }
            if done == length {
                send(Self.zeroHoles(reply, request, structured: structured), context)
                return
            }
        } catch {
            sendError(NBDErrno(error), cookie: request.cookie, message: "\(error)", context)
            return
        }
        // Would block: read it all on the pool into a fresh buffer (the partial bytes are cheap to re-read).
        let allocator = context.channel.allocator
        offload(export: export, context: context, cookie: request.cookie) {
            var b = allocator.buffer(capacity: 28 + length)
            header(&b)
            _ = try b.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { ptr in
                try backend.read(into: UnsafeMutableRawBufferPointer(rebasing: ptr[0..<length]),
                                 offset: request.offset, nonBlocking: false)
            }
            return Self.zeroHoles(b, request, structured: structured)
        }
    }

    /// A complete read reply with its zero blocks sent as holes (structured replies only).
    private static func zeroHoles(_ reply: ByteBuffer, _ request: NBDRequest, structured: Bool) -> ByteBuffer {
        guard structured else { return reply }
        return ZeroRuns.withHoles(reply, headerLength: 28, dataLength: Int(request.length), offset: request.offset,
                                  cookie: request.cookie, dontFragment: request.flags.contains(.dontFragment))
    }

    private func runWrite(_ request: NBDRequest, payload: ByteBuffer, export: Export, context: ChannelHandlerContext) {
        let backend = export.backend
        let fua = request.flags.contains(.fua)
        let cookie = request.cookie
        let done: Int
        do {
            done = try payload.withUnsafeReadableBytes { ptr in
                try backend.write(from: ptr, offset: request.offset, fua: fua, nonBlocking: true)
            }
        } catch {
            sendError(NBDErrno(error), cookie: cookie, message: "\(error)", context)
            return
        }
        if done == payload.readableBytes {
            var b = context.channel.allocator.buffer(capacity: 16)
            b.writeSimpleReply(error: .ok, cookie: cookie)
            send(b, context)
            return
        }
        offload(export: export, context: context, cookie: cookie) {
            _ = try payload.withUnsafeReadableBytes { ptr in
                try backend.write(from: UnsafeRawBufferPointer(rebasing: ptr[done...]),
                                  offset: request.offset + UInt64(done), fua: fua, nonBlocking: false)
            }
            var b = ByteBuffer()
            b.writeSimpleReply(error: .ok, cookie: cookie)
            return b
        }
    }

    // MARK: replies

    private func send(_ bytes: ByteBuffer, _ context: ChannelHandlerContext) {
        if let direct {
            // Count the write until NIO has completed it: no direct write may happen meanwhile.
            direct.willWrite()
            let written = context.eventLoop.makePromise(of: Void.self)
            written.futureResult.whenComplete { _ in direct.didWrite() }
            context.write(wrapOutboundOut(bytes), promise: written)
        } else {
            context.write(wrapOutboundOut(bytes), promise: nil)
        }
        needsFlush = true
    }

    private func sendError(_ error: NBDErrno, cookie: UInt64, message: String, _ context: ChannelHandlerContext) {
        let wire: NBDErrno = error == .ok ? .eio : error
        var b = context.channel.allocator.buffer(capacity: 32 + message.utf8.count)
        if structured {
            b.writeStructuredError(error: wire, cookie: cookie, message: message)
        } else {
            b.writeSimpleReply(error: wire, cookie: cookie)
        }
        send(b, context)
    }

    private func flushIfNeeded(_ context: ChannelHandlerContext) {
        if needsFlush {
            needsFlush = false
            if let direct {
                direct.flush { context.flush() }
            } else {
                context.flush()
            }
        }
    }

    private func afterCompletion(_ context: ChannelHandlerContext) {
        resumeReadingIfPossible(context)
        finishIfDone(context)
    }

    // MARK: back-pressure

    func read(context: ChannelHandlerContext) {
        if inputDone || closing || !mayStartRequests(context) {
            readHeld = true
            return
        }
        context.read()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        resumeReadingIfPossible(context)
        finishIfDone(context)
        context.fireChannelWritabilityChanged()
    }

    private func resumeReadingIfPossible(_ context: ChannelHandlerContext) {
        guard !closing, mayStartRequests(context) else { return }
        if cumulation != nil {
            processBuffered(context: context)
            flushIfNeeded(context)
        }
        guard readHeld, !inputDone, !closing, mayStartRequests(context) else { return }
        readHeld = false
        context.read()
    }
}
