import NIOCore

/// Writes one connection's replies through NIO, on its event loop: every write is counted with the
/// `DirectReplyWriter` (when the connection has one) so that no direct write from a source thread can
/// interleave with it, and flushes are batched (`send` marks, `flushIfNeeded` flushes once).
///
/// Used by the connection handler (handshake replies, rejections) and the `RequestExecutor` (request
/// replies). Event loop only.
final class ReplyWriter {
    let context: ChannelHandlerContext
    /// Writes small read replies from the thread that receives a demand miss's data (lazy exports);
    /// dropped when the connection upgrades to TLS (its bytes must go through the TLS handler).
    private(set) var direct: DirectReplyWriter?
    /// Structured replies were negotiated: errors go as error chunks, reads as OFFSET_DATA chunks.
    var structured = false
    /// Something was written since the last flush.
    private var needsFlush = false
    /// Replies go through TLS, which encrypts everything a flush hands it before any of it reaches
    /// the socket: a reply longer than this is flushed piece by piece, so that the client decrypts
    /// one piece while the next is encrypted.
    private var tlsPiece: Int? = nil
    static let tlsPieceSize = 128 * 1024

    init(context: ChannelHandlerContext, direct: DirectReplyWriter?) {
        self.context = context
        self.direct = direct
    }

    var allocator: ByteBufferAllocator { context.channel.allocator }

    func send(_ bytes: ByteBuffer) {
        if let piece = tlsPiece, bytes.readableBytes > piece {
            var rest = bytes
            while rest.readableBytes > 0, let slice = rest.readSlice(length: min(piece, rest.readableBytes)) {
                context.write(NIOAny(slice), promise: nil)
                if rest.readableBytes > 0 { context.flush() }
            }
            needsFlush = true
            return
        }
        if let direct {
            // Count the write until NIO has completed it: no direct write may happen meanwhile.
            direct.willWrite()
            let written = context.eventLoop.makePromise(of: Void.self)
            written.futureResult.whenComplete { _ in direct.didWrite() }
            context.write(NIOAny(bytes), promise: written)
        } else {
            context.write(NIOAny(bytes), promise: nil)
        }
        needsFlush = true
    }

    func sendError(_ error: NBDErrno, cookie: UInt64, message: String) {
        var b = allocator.buffer(capacity: 32 + message.utf8.count)
        b.writeErrorReply(error: error, cookie: cookie, message: message, structured: structured)
        send(b)
    }

    /// A read reply whose data is already in a buffer: the header, then the data as it is (no copy).
    func sendReadReply(_ request: NBDRequest, data: ByteBuffer) {
        send(Self.readReplyHeader(request, dataLength: data.readableBytes, structured: structured))
        send(data)
    }

    static func readReplyHeader(_ request: NBDRequest, dataLength: Int, structured: Bool) -> ByteBuffer {
        var header = ByteBuffer()
        header.reserveCapacity(32)
        header.writeReadReplyHeader(cookie: request.cookie, offset: request.offset, dataLength: dataLength,
                                    structured: structured)
        return header
    }

    /// From now on every reply goes through the pipeline and its TLS handler (NBD_OPT_STARTTLS).
    func startTLS() {
        direct?.close()
        direct = nil
        tlsPiece = Self.tlsPieceSize
    }

    func flushIfNeeded() {
        if needsFlush {
            needsFlush = false
            if let direct {
                let context = self.context
                direct.flush { context.flush() }
            } else {
                context.flush()
            }
        }
    }

    /// Writes `bytes` (NBD_OPT_ABORT's ACK), then closes.
    func sendAndClose(_ bytes: ByteBuffer) {
        let context = self.context
        context.writeAndFlush(NIOAny(bytes)).assumeIsolated().whenComplete { _ in
            context.close(promise: nil)
        }
    }

    /// Closes once every reply queued so far has been handed to the kernel (a plain close would drop
    /// replies still waiting for a slow client to read).
    func closeAfterReplies() {
        let context = self.context
        guard context.channel.isActive else { return }
        let written = context.eventLoop.makePromise(of: Void.self)
        needsFlush = false
        let direct = self.direct
        direct?.willWrite()
        context.writeAndFlush(NIOAny(ByteBuffer()), promise: written)
        written.futureResult.assumeIsolated().whenComplete { _ in
            direct?.didWrite()
            context.close(promise: nil)
        }
    }
}
