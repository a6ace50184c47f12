import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// The control socket: a client sends one command line (`status`), gets one reply and is disconnected.
public final class ControlServer: Sendable {
    public typealias Command = @Sendable (String) -> String
    private let path: String
    private let group: any EventLoopGroup
    private let logger: Logger
    private let handle: Command
    private let channel = NIOLockedValueBox<(any Channel)?>(nil)

    public init(path: String, group: any EventLoopGroup, logger: Logger, handle: @escaping Command) {
        self.path = path
        self.group = group
        self.logger = logger
        self.handle = handle
    }

    public func start() throws {
        let handle = self.handle
        let c = try ServerBootstrap(group: group)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ControlHandler(handle: handle))
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
    private let handle: ControlServer.Command
    private var line = ByteBuffer()

    init(handle: @escaping ControlServer.Command) {
        self.handle = handle
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        line.writeBuffer(&bytes)
        guard let newline = line.readableBytesView.firstIndex(of: UInt8(ascii: "\n")) else {
            if line.readableBytes > Self.maxLine { reply("{\"error\": \"command too long\"}", context) }
            return
        }
        let text = line.getString(at: line.readerIndex, length: newline - line.readerIndex) ?? ""
        reply(handle(text.trimmingASCIISpaces()), context)
    }

    private func reply(_ text: String, _ context: ChannelHandlerContext) {
        var out = context.channel.allocator.buffer(capacity: text.utf8.count + 1)
        out.writeString(text + "\n")
        context.writeAndFlush(wrapOutboundOut(out)).assumeIsolated().whenComplete { _ in
            context.close(promise: nil)
        }
    }
}
