import CLinux
import Logging
import NIOCore
import NIOPosix

/// Runs one NBD connection: feeds received bytes to `NBDServerStateMachine`, reports what happens on the
/// channel to `ConnectionLifecycle`, and carries out the actions both return.
///
/// - `NBDServerStateMachine` parses the stream and says what to reply and which request to run;
/// - `ConnectionLifecycle` says when to read, parse and close (back-pressure, DISC, half-close, server
///   shutdown with ESHUTDOWN for requests not started);
/// - `RequestExecutor` runs requests (inline or on the pool, pending reads of lazy exports with direct
///   replies) and writes their replies through `ReplyWriter`;
/// - `BusyPoll` decides when the event loop keeps polling after a lone small request.
final class NBDConnectionHandler: ChannelDuplexHandler, RequestTracking {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// The first room made for a WRITE payload beyond what has arrived.
    static let payloadStep = 128 * 1024
    /// SO_SNDBUF of a Unix-socket connection once it runs TLS.
    static let tlsUnixSendBuffer: SocketOptionValue = 4 << 20

    private var machine: NBDServerStateMachine
    private var lifecycle = ConnectionLifecycle() {
        didSet { quietChanged() }
    }
    /// Requests answered by pool threads, counted without waking this loop while that changes nothing.
    let completions: QuietCompletions? = QuietCompletions()
    private var poll: BusyPoll
    private let exports: [String: Export]
    private let tracker: ConnectionTracker
    private let policy: ConnectionPolicy
    private let tls: (any NBDTLSContext)?
    private var tlsErrorLogged = false
    private var logger: Logger

    /// Received bytes not parsed yet.
    private var cumulation: ByteBuffer?
    private var handshakeTimer: Scheduled<Void>?
    /// Set while the channel is active (dropped when it goes, breaking the reference cycles through
    /// the context).
    private var writer: ReplyWriter?
    /// Set in the transmission phase.
    private var executor: RequestExecutor<NBDConnectionHandler>?

    init(exports: [Export], tracker: ConnectionTracker, logger: Logger, pollWindow: TimeAmount = .zero,
         policy: ConnectionPolicy = ConnectionPolicy(), tls: (any NBDTLSContext)? = nil) {
        self.policy = policy
        self.tls = tls
        self.poll = BusyPoll(window: pollWindow)
        let tlsPolicy: NBDServerStateMachine.TLSPolicy
        switch tls?.mode {
        case .require?: tlsPolicy = .required
        case .on?: tlsPolicy = .optional
        case .off?, nil: tlsPolicy = .off
        }
        self.machine = NBDServerStateMachine(exports: exports.map(\.info), tls: tlsPolicy)
        var byName: [String: Export] = [:]
        for e in exports where byName[e.info.name] == nil { byName[e.info.name] = e }
        self.exports = byName
        self.tracker = tracker
        self.logger = logger
    }

    // MARK: channel events

    func channelActive(context: ChannelHandlerContext) {
        let peer = context.channel.remoteAddress
        var refusal = policy.refusal(peer: peer)
        if refusal == nil {
            switch tracker.add(context.channel, limit: policy.maxConnections) {
            case .added: break
            case .shuttingDown:
                lifecycle.closeRequested()
                context.close(promise: nil)
                return
            case .full(let open): refusal = "\(open) connections are open (--max-connections \(policy.maxConnections))"
            }
        }
        if let refusal {
            tracker.refused()
            logger.warning("refused connection from \(peerDescription(peer)): \(refusal)")
            lifecycle.closeRequested()
            context.close(promise: nil)
            return
        }
        // A lazy export's replies may be written from a source thread, and those of storage that blocks
        // from a pool thread: count every NIO write from the start.
        let direct = exports.values.contains(where: { $0.backend.capabilities.pendingReads || !$0.backend.capabilities.inlineSafe })
            ? DirectReplyWriter(context: context) : nil
        let writer = ReplyWriter(context: context, direct: direct)
        self.writer = writer
        if machine.start() == .sendGreeting {
            var b = context.channel.allocator.buffer(capacity: 18)
            b.writeNBDGreeting()
            writer.send(b)
        }
        writer.flushIfNeeded()
        let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
        handshakeTimer = context.eventLoop.scheduleTask(in: policy.handshakeTimeout) { [logger, policy] in
            logger.info("closing connection: handshake not finished in \(policy.handshakeTimeout.nanoseconds / 1_000_000_000) s")
            loopBound.value.close(promise: nil)
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        handshakeTimer?.cancel()
        machine.markClosed()
        lifecycle.channelInactive()
        cumulation = nil
        tracker.remove(context.channel)
        writer?.direct?.close()
        executor?.tracker = nil
        executor = nil
        writer = nil
        logger.debug("connection closed")
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if machine.isTLSActive, let tls, let text = tls.describe(error) {
            // NIOSSL can report one failure twice (when the socket closes and when the channel goes
            // inactive): one line per connection is enough.
            guard !tlsErrorLogged else { context.close(promise: nil); return }
            tlsErrorLogged = true
            let peer = peerDescription(context.channel.remoteAddress)
            if machine.isInTransmission && tls.isCloseWithoutNotify(error) {
                logger.debug("\(peer) closed without TLS close_notify")
            } else if machine.isInTransmission {
                logger.info("TLS error from \(peer): \(text)")
            } else {
                logger.warning("TLS handshake with \(peer) failed: \(text)")
            }
        } else {
            logger.debug("connection error: \(error)")
        }
        context.close(promise: nil)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is ShutdownEvent {
            act(lifecycle.shutdownRequested(), context)
        } else if case ChannelEvent.inputClosed = event {
            act(lifecycle.halfClosed(), context)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        guard lifecycle.bytesReceived(), !machine.isClosed else { return }
        collectFinished()
        if var c = cumulation {
            cumulation = nil  // keep the storage uniquely referenced while appending
            c.writeBuffer(&incoming)
            cumulation = c
        } else {
            cumulation = incoming
        }
        processBuffered(context)
        act(lifecycle.parsed(), context)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        writer?.flushIfNeeded()
        collectFinished()
        // No busy poll over TLS: each request costs more CPU there, and spinning takes it from the
        // client and the TLS work (QD1 p50 44 us with the poll, 30 us without; nbdkit 30 us).
        if !machine.isTLSActive, poll.readComplete(inFlight: lifecycle.inFlight, now: .now()) { startPolling(context) }
        act(lifecycle.readComplete(), context)
        context.fireChannelReadComplete()
    }

    func read(context: ChannelHandlerContext) {
        act(lifecycle.readRequested(), context)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        act(lifecycle.writabilityChanged(isWritable: context.channel.isWritable), context)
        context.fireChannelWritabilityChanged()
    }

    // MARK: RequestTracking

    func requestStarted() {
        lifecycle.requestStarted()
    }

    func requestFinished() {
        let action = lifecycle.requestFinished()
        if action != .none, let context = writer?.context { act(action, context) }
    }

    var isClosing: Bool { lifecycle.isClosing }

    func collectFinished() {
        guard let n = completions?.take(), n > 0 else { return }
        let action = lifecycle.requestsFinished(n)
        if action != .none, let context = writer?.context { act(action, context) }
    }

    /// The lifecycle changed: tell pool threads whether a finish may go uncounted for now, and take
    /// the count if it may no longer.
    private func quietChanged() {
        guard let completions, completions.setQuiet(lifecycle.finishIsQuiet), let loop = writer?.context.eventLoop else {
            return
        }
        let bound = NIOLoopBound(self, eventLoop: loop)
        loop.execute { bound.value.collectFinished() }
    }

    var mayBlockEventLoop: Bool {
        guard lifecycle.inFlight == 0, (cumulation?.readableBytes ?? 0) == 0, let loop = writer?.context.eventLoop else {
            return false
        }
        return tracker.count(on: loop) == 1
    }

    // MARK: lifecycle actions

    private func act(_ first: ConnectionLifecycle.Action, _ context: ChannelHandlerContext) {
        var action = first
        while true {
            switch action {
            case .none:
                return
            case .read:
                context.read()
                return
            case .parse:
                processBuffered(context)
                writer?.flushIfNeeded()
                action = lifecycle.parsed()
            case .drainInput:
                processBuffered(context)
                writer?.flushIfNeeded()
                action = lifecycle.unreadInput(unreadBytes(context))
            case .probeUnreadInput:
                action = lifecycle.unreadInput(unreadBytes(context))
            case .closeAfterReplies:
                writer?.closeAfterReplies()
                return
            }
        }
    }

    /// Bytes the client sent that are still in the socket (0 when the channel has no socket).
    private func unreadBytes(_ context: ChannelHandlerContext) -> Int {
        let n = (try? context.pipeline.syncOperations.withUnsafeTransportIfAvailable(of: NIOBSDSocket.Handle.self) {
            umemd_socket_inq($0)
        }) ?? 0
        return Int(n)
    }

    // MARK: parsing

    /// Parses and runs what has been received, as far as the lifecycle allows (back-pressure; during
    /// shutdown nothing new is started, so everything buffered is parsed and answered at once).
    private func processBuffered(_ context: ChannelHandlerContext) {
        lifecycle.parseStarted()
        defer { lifecycle.parseEnded() }
        while var buffer = cumulation, buffer.readableBytes > 0 {
            guard lifecycle.mayParse() else { break }
            cumulation = nil  // keep the storage uniquely referenced while parsing
            let action = machine.next(from: &buffer)
            cumulation = buffer
            guard let action else { break }
            handle(action, context)
        }
        if var c = cumulation {
            cumulation = nil
            if c.readableBytes > 0 {
                if c.readerIndex > 1 << 20 { c.discardReadBytes() }
                cumulation = c
            }
        }
        // Make room for a large WRITE payload in a few allocations rather than many, but never for
        // more than the client has sent: a buffer grows to at most twice the bytes received (plus
        // `payloadStep`), so a bare WRITE header cannot make the daemon hold (under --swap: lock) the
        // memory of the payload it announces.
        let pending = machine.pendingPayloadBytes
        if pending > 0, var c = cumulation {
            let missing = pending - c.readableBytes
            let grant = min(missing, max(c.readableBytes, Self.payloadStep))
            if c.writableBytes < grant {
                cumulation = nil
                c.reserveCapacity(minimumWritableBytes: grant)
                cumulation = c
            }
        }
    }

    private func handle(_ action: NBDServerStateMachine.Action, _ context: ChannelHandlerContext) {
        guard let writer else { return }
        switch action {
        case .request(let request, let payload):
            poll.requestParsed(length: request.length)
            switch lifecycle.requestParsed() {
            case .run:
                if let executor {
                    executor.run(request, payload: payload)
                } else {
                    writer.sendError(.eio, cookie: request.cookie, message: "export is gone")
                }
            case .refuse:
                writer.sendError(.eshutdown, cookie: request.cookie, message: "server is shutting down")
            }
        case .reject(let rejection):
            logger.debug("rejected request: \(rejection.message)")
            if let name = machine.session?.export.name { exports[name]?.stats.rejected(NBDCommand(rawValue: rejection.type)) }
            writer.sendError(rejection.error, cookie: rejection.cookie, message: rejection.message)
        case .disconnect:
            lifecycle.disconnectReceived()
        case .sendGreeting, .sendOptionReply, .sendExportList, .sendExportInfo, .sendMetaContexts:
            if let bytes = action.handshakeReply { writer.send(bytes) }
        case .sendOptionReplyAndClose:
            lifecycle.closeRequested()
            if let bytes = action.handshakeReply { writer.sendAndClose(bytes) }
        case .close(let reason):
            logger.info("closing connection: \(reason)")
            lifecycle.closeRequested()
            writer.flushIfNeeded()
            context.close(promise: nil)
        case .startTLS:
            // Bytes after the option were sent before the client saw the ACK: plain text that would
            // be taken as coming from inside TLS. The spec forbids them; drop the connection.
            if let c = cumulation, c.readableBytes > 0 {
                logger.info("closing connection: \(c.readableBytes) bytes after NBD_OPT_STARTTLS, before the TLS handshake")
                lifecycle.closeRequested()
                context.close(promise: nil)
                return
            }
            guard let tls else { return }
            if let bytes = action.handshakeReply { writer.send(bytes) }
            writer.flushIfNeeded()
            writer.startTLS()
            do {
                try context.pipeline.syncOperations.addHandler(tls.makeServerHandler(), position: .first)
                if context.channel.localAddress?.protocol == .unix {
                    // Encrypted replies are written in bursts of whole replies: with the default
                    // 208 KiB send buffer the encrypting thread waits for the reader at every burst
                    // (1 MiB reads at QD8: 780 MiB/s; with 4 MiB, 1,330). TCP tunes its own buffer.
                    // The kernel caps the value at net.core.wmem_max; a refusal only costs speed.
                    try? context.channel.syncOptions?.setOption(.socketOption(.so_sndbuf), value: Self.tlsUnixSendBuffer)
                }
            } catch {
                logger.error("cannot start TLS: \(error)")
                lifecycle.closeRequested()
                context.close(promise: nil)
            }
        case .enterTransmission(let session, _):
            handshakeTimer?.cancel()
            handshakeTimer = nil
            lifecycle.transmissionStarted()
            writer.structured = session.structuredReplies
            if let export = exports[session.export.name] {
                executor = RequestExecutor(export: export, writer: writer, tracker: self)
            }
            logger[metadataKey: "export"] = "\(session.export.name)"
            logger.debug("transmission phase", metadata: ["structured": "\(session.structuredReplies)"])
            if let bytes = action.handshakeReply { writer.send(bytes) }
        }
    }

    // MARK: busy polling

    /// Keeps the event loop spinning for `poll.window` after a lone small request (see `BusyPoll`).
    private func startPolling(_ context: ChannelHandlerContext) {
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        func tick() {
            let (handler, context) = loopBound.value
            guard handler.poll.tick(closing: handler.lifecycle.isClosing, now: .now()) else { return }
            context.eventLoop.execute { tick() }
        }
        context.eventLoop.execute { tick() }
    }
}
