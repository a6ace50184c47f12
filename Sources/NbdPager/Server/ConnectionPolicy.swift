import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// Who may connect and how long a handshake may take: `serve --allow`, `--max-connections`,
/// `--handshake-timeout`.
public struct ConnectionPolicy: Sendable {
    /// TCP clients must come from one of these; empty allows every address. Unix-socket clients are
    /// not filtered (the socket file's permissions say who may connect).
    public var allow: [AddressRange] = []
    /// Connections open at once; more are closed at once, before the greeting.
    public var maxConnections = ConnectionPolicy.defaultMaxConnections
    /// A client that has not finished the handshake (TLS included) by then is disconnected.
    public var handshakeTimeout: TimeAmount = .seconds(Int64(ConnectionPolicy.defaultHandshakeSeconds))

    public static let defaultMaxConnections = 512
    public static let defaultHandshakeSeconds = 30

    public init() {}

    /// Why a connection from `peer` is refused, or nil when it may proceed.
    func refusal(peer: SocketAddress?) -> String? {
        guard !allow.isEmpty, let peer else { return nil }
        guard let bytes = AddressRange.bytes(of: peer) else { return nil }  // Unix socket
        return allow.contains(where: { $0.contains(bytes) }) ? nil : "not in --allow"
    }
}

/// A peer as logs show it: `192.0.2.7:41234`, `[fd00::5]:41234`, or `unix`.
func peerDescription(_ peer: SocketAddress?) -> String {
    guard let peer else { return "?" }
    switch peer {
    case .v4: return "\(peer.ipAddress ?? "?"):\(peer.port ?? 0)"
    case .v6: return "[\(peer.ipAddress ?? "?")]:\(peer.port ?? 0)"
    case .unixDomainSocket: return "unix"
    }
}

/// An IPv4 or IPv6 address with a prefix length (`10.0.0.0/8`, `fd00::/64`, `192.0.2.7`).
public struct AddressRange: Sendable, Hashable, CustomStringConvertible {
    /// 4 or 16 bytes, network order, with the bits past the prefix cleared.
    public let network: [UInt8]
    public let prefix: Int

    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    public init(parsing text: String) throws {
        let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        var address = String(parts[0])
        if address.hasPrefix("[") && address.hasSuffix("]") { address = String(address.dropFirst().dropLast()) }
        guard let bytes = Self.parse(address) else {
            throw Failure(description: "'\(text)' is not an IPv4 or IPv6 address (ADDR or ADDR/PREFIX)")
        }
        let bits = bytes.count * 8
        var prefix = bits
        if parts.count == 2 {
            guard let p = Int(parts[1]), (0...bits).contains(p) else {
                throw Failure(description: "'\(text)': the prefix must be a number from 0 to \(bits)")
            }
            prefix = p
        }
        self.prefix = prefix
        self.network = Self.masked(bytes, prefix)
    }

    public var description: String {
        var copy = network
        let text: String = copy.withUnsafeMutableBytes { raw -> String in
            var out = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
            let family = network.count == 4 ? AF_INET : AF_INET6
            guard inet_ntop(family, raw.baseAddress, &out, socklen_t(out.count)) != nil else { return "?" }
            return String(decoding: out.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
        return prefix == network.count * 8 ? text : "\(text)/\(prefix)"
    }

    /// Whether this range holds the address (4 or 16 bytes; an IPv4-mapped IPv6 address also
    /// matches IPv4 ranges).
    func contains(_ address: [UInt8]) -> Bool {
        var a = address
        if network.count == 4 && a.count == 16 {
            guard a[0..<10].allSatisfy({ $0 == 0 }) && a[10] == 0xff && a[11] == 0xff else { return false }
            a = Array(a[12..<16])
        }
        guard a.count == network.count else { return false }
        return Self.masked(a, prefix) == network
    }

    static func masked(_ bytes: [UInt8], _ prefix: Int) -> [UInt8] {
        var out = bytes
        for i in 0 ..< out.count {
            let keep = max(0, min(8, prefix - i * 8))
            out[i] &= keep == 0 ? 0 : UInt8(truncatingIfNeeded: 0xff << (8 - keep))
        }
        return out
    }

    static func parse(_ address: String) -> [UInt8]? {
        var v4 = in_addr()
        if inet_pton(AF_INET, address, &v4) == 1 { return withUnsafeBytes(of: &v4) { Array($0) } }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, address, &v6) == 1 { return withUnsafeBytes(of: &v6) { Array($0) } }
        return nil
    }

    /// The address bytes of a TCP peer (nil for a Unix socket).
    static func bytes(of peer: SocketAddress) -> [UInt8]? {
        switch peer {
        case .v4(let a): return withUnsafeBytes(of: a.address.sin_addr) { Array($0) }
        case .v6(let a): return withUnsafeBytes(of: a.address.sin6_addr) { Array($0) }
        case .unixDomainSocket: return nil
        }
    }
}
