import NIOCore
import NIOSSL
import NbdPager
#if canImport(Glibc)
import Glibc
#endif

/// The TLS context the connections of a server share (swift-nio-ssl over BoringSSL), built once at
/// start-up from `TLSSettings`: a credential that cannot be loaded is an error before anything
/// listens. The NBD server uses it through `NBDTLSContext`.
public final class TLSServer: NBDTLSContext {
    public let mode: TLSSettings.Mode
    let context: NIOSSLContext
    /// What the log says about the credentials.
    public let summary: String

    public init(_ settings: TLSSettings) throws(DaemonError) {
        mode = settings.mode
        guard let credentials = settings.credentials else {
            throw DaemonError("--tls \(settings.mode.rawValue) needs --tls-certificates DIR or --tls-psk FILE")
        }
        var configuration: TLSConfiguration
        switch credentials {
        case .x509(let dir, let verifyPeer):
            let certFile = dir + "/server-cert.pem", keyFile = dir + "/server-key.pem", caFile = dir + "/ca-cert.pem"
            let chain: [NIOSSLCertificate]
            let key: NIOSSLPrivateKey
            do { chain = try NIOSSLCertificate.fromPEMFile(certFile) } catch {
                throw DaemonError("--tls-certificates: cannot load \(certFile): \(Self.describe(error, certFile))")
            }
            guard !chain.isEmpty else { throw DaemonError("--tls-certificates: \(certFile) holds no certificate") }
            do { key = try NIOSSLPrivateKey(file: keyFile, format: .pem) } catch {
                throw DaemonError("--tls-certificates: cannot load \(keyFile): \(Self.describe(error, keyFile))")
            }
            configuration = TLSConfiguration.makeServerConfiguration(
                certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(key))
            if verifyPeer {
                guard access(caFile, R_OK) == 0 else {
                    throw DaemonError("--tls-verify-peer needs \(caFile) (the CA that signs client certificates)")
                }
                do { _ = try NIOSSLCertificate.fromPEMFile(caFile) } catch {
                    throw DaemonError("--tls-certificates: cannot load \(caFile): \(Self.describe(error, caFile))")
                }
                configuration.certificateVerification = .noHostnameVerification
                configuration.trustRoots = .file(caFile)
                // (no CA name list: a client then sends the certificate it has, and a wrong one is
                // reported as such rather than as none)
                configuration.sendCANameList = false
            }
            configuration.minimumTLSVersion = .tlsv12
            summary = "x509 certificates from \(dir)\(verifyPeer ? ", client certificates verified" : "")"
        case .psk(let file):
            let keys = try PSKFile.load(file)
            configuration = TLSConfiguration.makePreSharedKeyConfiguration()
            // BoringSSL does pre-shared keys in TLS 1.2 only; GnuTLS clients (libnbd, QEMU,
            // nbd-client) negotiate down to it.
            configuration.minimumTLSVersion = .tlsv12
            configuration.maximumTLSVersion = .tlsv12
            configuration.cipherSuites = PSKFile.cipherSuites
            configuration.pskServerProvider = { context in
                guard let key = keys[context.clientIdentity] else { throw PSKFile.UnknownIdentity() }
                return PSKServerIdentityResponse(key: NIOSSLSecureBytes(key))
            }
            summary = "pre-shared keys from \(file) (\(keys.count) identit\(keys.count == 1 ? "y" : "ies"))"
        }
        // A client that closes without close_notify (libnbd, QEMU) must not hold up shutdown for 5 s.
        configuration.shutdownTimeout = .seconds(1)
        do {
            context = try NIOSSLContext(configuration: configuration)
        } catch {
            throw DaemonError("TLS: \(error)")
        }
    }

    public func makeServerHandler() -> any ChannelHandler {
        NIOSSLServerHandler(context: context)
    }

    public func isCloseWithoutNotify(_ error: any Error) -> Bool {
        if let e = error as? NIOSSLError, case .uncleanShutdown = e { return true }
        return false
    }

    public func describe(_ error: any Error) -> String? {
        guard error is NIOSSLError || error is BoringSSLError else { return nil }
        return Self.explain(error)
    }

    /// A TLS failure as the operator needs it: what went wrong in words, with BoringSSL's reason.
    static func explain(_ error: any Error) -> String {
        let text = "\(error)"
        var reasons: [String] = []
        var rest = text[...]
        while let r = rest.firstRange(of: "OPENSSL_internal:") {
            let tail = rest[r.upperBound...]
            let reason = tail.prefix { $0.isUppercase || $0.isNumber || $0 == "_" }
            if !reason.isEmpty && !reasons.contains(String(reason)) { reasons.append(String(reason)) }
            rest = tail
        }
        let words: [String: String] = [
            "CERTIFICATE_VERIFY_FAILED": "the client's certificate is not signed by this server's ca-cert.pem",
            "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate (--tls-verify-peer requires one)",
            "DECRYPTION_FAILED_OR_BAD_RECORD_MAC": "the client's key is not the key of its identity in the PSK file",
            "BAD_DECRYPT": "the client's key is not the key of its identity in the PSK file",
            "PSK_IDENTITY_NOT_FOUND": "the client's identity is not in the PSK file",
            "NO_SHARED_CIPHER": "the client offers no cipher this server accepts (pre-shared keys need TLS 1.2 with an ECDHE-PSK or PSK cipher)",
            "WRONG_VERSION_NUMBER": "not a TLS handshake",
            "HTTP_REQUEST": "not a TLS handshake",
            "UNSUPPORTED_PROTOCOL": "the client's TLS version is not accepted (TLS 1.2 or later)",
        ]
        guard !reasons.isEmpty else { return text }
        let said = reasons.compactMap { words[$0] }.first
        return (said.map { "\($0) " } ?? "") + "(\(reasons.joined(separator: ", ")))"
    }

    static func describe(_ error: any Error, _ path: String) -> String {
        if access(path, F_OK) != 0 { return "no such file" }
        if access(path, R_OK) != 0 { return "not readable" }
        return "not a PEM file this server can use (\(error))"
    }
}

/// GnuTLS `psktool` key files: one `identity:hexkey` per line.
enum PSKFile {
    struct UnknownIdentity: Error {}

    static let cipherSuites = [
        "ECDHE-PSK-CHACHA20-POLY1305", "ECDHE-PSK-AES128-CBC-SHA", "ECDHE-PSK-AES256-CBC-SHA",
        "PSK-AES128-CBC-SHA", "PSK-AES256-CBC-SHA",
    ].joined(separator: ":")

    static func load(_ file: String) throws(DaemonError) -> [String: [UInt8]] {
        guard let text = try? String(contentsOfFile: file, encoding: .utf8) else {
            throw DaemonError("--tls-psk: cannot read \(file)")
        }
        return try parse(text, file: file)
    }

    static func parse(_ text: String, file: String) throws(DaemonError) -> [String: [UInt8]] {
        var keys: [String: [UInt8]] = [:]
        // (split as bytes: "\r\n" is one Character)
        for (i, rawBytes) in text.utf8.split(separator: 10, omittingEmptySubsequences: false).enumerated() {
            let bytes = rawBytes.last == 13 ? rawBytes.dropLast() : rawBytes[...]
            let line = Substring(String(decoding: bytes, as: UTF8.self))
            if line.allSatisfy({ $0 == " " || $0 == "\t" }) { continue }
            guard let colon = line.lastIndex(of: ":") else {
                throw DaemonError("--tls-psk \(file) line \(i + 1): expected identity:hexkey")
            }
            let identity = String(line[..<colon]), hex = line[line.index(after: colon)...]
            guard !identity.isEmpty else { throw DaemonError("--tls-psk \(file) line \(i + 1): empty identity") }
            guard let key = decodeHex(hex), !key.isEmpty else {
                throw DaemonError("--tls-psk \(file) line \(i + 1): the key of '\(identity)' is not hexadecimal bytes")
            }
            keys[identity] = key
        }
        guard !keys.isEmpty else { throw DaemonError("--tls-psk: \(file) holds no key") }
        return keys
    }

    static func decodeHex(_ s: Substring) -> [UInt8]? {
        let digits = Array(s.utf8)
        guard digits.count % 2 == 0 else { return nil }
        func value(_ c: UInt8) -> UInt8? {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
            default: return nil
            }
        }
        var out: [UInt8] = []
        out.reserveCapacity(digits.count / 2)
        var i = 0
        while i < digits.count {
            guard let hi = value(digits[i]), let lo = value(digits[i + 1]) else { return nil }
            out.append(hi << 4 | lo)
            i += 2
        }
        return out
    }
}
