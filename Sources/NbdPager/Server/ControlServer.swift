import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// The control socket: a client sends one request line, gets one reply line and is disconnected.
/// What the lines mean is up to `handle` (the daemon's `ControlDispatcher`; see `ControlCommand`),
/// which runs on `threadPool`: a command may wait (on the source, on a file), never on an event loop.
public final class ControlServer: Sendable {
    /// Answers one request line (without its newline) with one reply line (without its newline).
    public typealias Handle = @Sendable ([UInt8]) -> [UInt8]
    private let path: String
    private let group: any EventLoopGroup
    private let logger: Logger
    private let handle: Handle
    private let threadPool: NIOThreadPool
    private let channel = NIOLockedValueBox<(any Channel)?>(nil)

    public init(path: String, group: any EventLoopGroup, threadPool: NIOThreadPool, logger: Logger,
                handle: @escaping Handle) {
        self.path = path
        self.group = group
        self.threadPool = threadPool
        self.logger = logger
        self.handle = handle
    }

    public func start() throws {
        let handle = self.handle, pool = threadPool
        let c = try ServerBootstrap(group: group)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ControlHandler(handle: handle, threadPool: pool))
                }
            }
            .bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true)
            .wait()
        channel.withLockedValue { $0 = c }
        logger.info("control socket on \(path)")
    }

    public func stop() {
        if let c = channel.withLockedValue({ c -> (any Channel)? in defer { c = nil }; return c }) {
            try? c.close().wait()
            unlink(path)
        }
    }
}

final class ControlHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    static let maxLine = 4096
    private let handle: ControlServer.Handle
    private let threadPool: NIOThreadPool
    private var line = ByteBuffer()
    private var answered = false

    init(handle: @escaping ControlServer.Handle, threadPool: NIOThreadPool) {
        self.handle = handle
        self.threadPool = threadPool
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !answered else { return }
        var bytes = unwrapInboundIn(data)
        line.writeBuffer(&bytes)
        guard let newline = line.readableBytesView.firstIndex(of: UInt8(ascii: "\n")) else {
            if line.readableBytes > Self.maxLine { reply(ControlCodec.failure("request too long"), context) }
            return
        }
        let request = line.getBytes(at: line.readerIndex, length: newline - line.readerIndex) ?? []
        answered = true
        let handle = self.handle
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        threadPool.runIfActive(eventLoop: context.eventLoop) { handle(request) }.whenComplete { result in
            let (handler, context) = bound.value
            handler.reply((try? result.get()) ?? ControlCodec.failure("the daemon is shutting down"), context)
        }
    }

    private func reply(_ bytes: [UInt8], _ context: ChannelHandlerContext) {
        answered = true
        var out = context.channel.allocator.buffer(capacity: bytes.count + 1)
        out.writeBytes(bytes)
        out.writeInteger(UInt8(ascii: "\n"))
        context.writeAndFlush(wrapOutboundOut(out)).assumeIsolated().whenComplete { _ in
            context.close(promise: nil)
        }
    }
}
