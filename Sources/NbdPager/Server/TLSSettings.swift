import NIOCore

/// TLS on the server side (NBD_OPT_STARTTLS): `serve --tls off|on|require` with x509 certificates in
/// nbdkit's directory layout or GnuTLS `psktool` pre-shared keys.
public struct TLSSettings: Sendable {
    public enum Mode: String, Sendable, CaseIterable {
        /// NBD_OPT_STARTTLS is refused (NBD_REP_ERR_UNSUP).
        case off
        /// Clients may upgrade with NBD_OPT_STARTTLS, or stay in plain text.
        case on
        /// Every option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD until TLS is up.
        case require
    }

    public enum Credentials: Sendable {
        /// `DIR/ca-cert.pem`, `DIR/server-cert.pem`, `DIR/server-key.pem` (nbdkit's layout); with
        /// `verifyPeer` a client must present a certificate signed by the CA.
        case x509(directory: String, verifyPeer: Bool)
        /// `psktool` lines `identity:hexkey`.
        case psk(file: String)
    }

    public var mode: Mode
    public var credentials: Credentials?

    public init(mode: Mode, credentials: Credentials?) {
        self.mode = mode
        self.credentials = credentials
    }
}

/// TLS as the NBD server uses it (NBD_OPT_STARTTLS), whatever library does the TLS: the target
/// `NbdTLS` provides one over swift-nio-ssl (`TLSServer`), so that the rest of the library (and its
/// fuzz targets) do not depend on a TLS library.
public protocol NBDTLSContext: Sendable {
    var mode: TLSSettings.Mode { get }
    /// One line for the log: which credentials.
    var summary: String { get }
    /// The server-side TLS handler for one connection, put in front of the NBD handler after the
    /// STARTTLS ACK.
    func makeServerHandler() -> any ChannelHandler
    /// A TLS error in words for the log; nil when `error` is not a TLS error.
    func describe(_ error: any Error) -> String?
    /// `error` says only that the peer closed the socket without TLS's close_notify, which most NBD
    /// clients do after NBD_CMD_DISC (NBD's own framing shows a cut reply to the client).
    func isCloseWithoutNotify(_ error: any Error) -> Bool
}
