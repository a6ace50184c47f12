import NIOCore

extension NBDServerStateMachine.Action {
    /// The handshake bytes this action sends, encoded by its Wire/ writer; nil for the actions that send
    /// no handshake reply (requests, rejections, closes, DISC).
    public var handshakeReply: ByteBuffer? {
        var b = ByteBuffer()
        switch self {
        case .sendGreeting: b.writeNBDGreeting()
        case .sendOptionReply(let reply), .sendOptionReplyAndClose(let reply), .startTLS(let reply): b.writeOptionReply(reply)
        case .sendExportList(let reply): b.writeExportListReply(reply)
        case .sendExportInfo(let reply): b.writeExportInfoReply(reply)
        case .sendMetaContexts(let reply): b.writeMetaContextReply(reply)
        case .enterTransmission(_, let reply): b.writeTransmissionReply(reply)
        case .request, .reject, .close, .disconnect: return nil
        }
        return b
    }
}
