import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

/// `--metrics ADDR:PORT`: GET /metrics answers the Prometheus text format (SwiftNIO's HTTP/1.1
/// server pipeline does the parsing); any other path is 404, any other method 405.
final class MetricsServer: Sendable {
    let host: String
    let port: Int
    private let group: any EventLoopGroup
    private let logger: Logger
    private let render: @Sendable () -> String
    private let channel = NIOLockedValueBox<(any Channel)?>(nil)

    init(host: String, port: Int, group: any EventLoopGroup, logger: Logger, render: @escaping @Sendable () -> String) {
        self.host = host
        self.port = port
        self.group = group
        self.logger = logger
        self.render = render
    }

    func start() throws {
        let render = self.render
        let c = try ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 16)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(MetricsHandler(render: render))
                }
            }
            .bind(host: host, port: port).wait()
        channel.withLockedValue { $0 = c }
        logger.info("metrics on http://\(peerDescription(c.localAddress))/metrics")
    }

    var boundPort: Int? { channel.withLockedValue { $0?.localAddress?.port } }

    func stop() {
        if let c = channel.withLockedValue({ c -> (any Channel)? in defer { c = nil }; return c }) {
            try? c.close().wait()
        }
    }
}

private final class MetricsHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let render: @Sendable () -> String
    private var head: HTTPRequestHead?

    init(render: @escaping @Sendable () -> String) { self.render = render }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let head else { return }
            self.head = nil
            let path = head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.uri
            let (status, body): (HTTPResponseStatus, String)
            if head.method != .GET && head.method != .HEAD {
                (status, body) = (.methodNotAllowed, "only GET\n")
            } else if path == "/metrics" {
                (status, body) = (.ok, render())
            } else {
                (status, body) = (.notFound, "see /metrics\n")
            }
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: status == .ok ? "text/plain; version=0.0.4; charset=utf-8" : "text/plain")
            headers.add(name: "Content-Length", value: "\(body.utf8.count)")
            if !head.isKeepAlive { headers.add(name: "Connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
            if head.method != .HEAD {
                context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
            }
            let keepAlive = head.isKeepAlive
            context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
                if !keepAlive { context.close(promise: nil) }
            }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
