#if canImport(Glibc)
import Glibc
#endif

/// The client side of the control socket: sends one request line, reads the reply line.
public enum ControlClient {
    /// A failure to reach the daemon (not a reply that says `ok: false`).
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// Sends `command` to the daemon at `path` and returns its typed reply and the reply as it came
    /// (any JSON value, for printing).
    public static func send<Command: ControlCommand>(_ command: Command, export: String? = nil,
                                                     to path: String) throws -> (reply: ControlReply<Command.Reply>, json: JSONValue) {
        let line = try exchange(ControlCodec.encode(ControlRequest(command, export: export)), with: path)
        do {
            return (try ControlCodec.decode(ControlReply<Command.Reply>.self, from: line),
                    try ControlCodec.decode(JSONValue.self, from: line))
        } catch {
            throw Failure(description: "unexpected reply on control socket \(path): \(String(decoding: line.prefix(200), as: UTF8.self))")
        }
    }

    /// One request line out, one reply line back (the newline is added and removed here).
    public static func exchange(_ request: [UInt8], with path: String) throws -> [UInt8] {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw Failure(description: "control socket path is too long: \(path)")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard connected == 0 else {
            throw Failure(description: "cannot connect to control socket \(path): \(String(cString: strerror(errno)))")
        }
        let out = request + [UInt8(ascii: "\n")]
        var sent = 0
        while sent < out.count {
            let n = out.withUnsafeBytes { raw in raw.baseAddress.map { write(fd, $0 + sent, raw.count - sent) } ?? -1 }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                throw Failure(description: "cannot send to control socket \(path): \(String(cString: strerror(errno)))")
            }
            sent += n
        }
        var reply: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else {
                throw Failure(description: "reading control socket \(path): \(String(cString: strerror(errno)))")
            }
            if n == 0 { break }
            reply.append(contentsOf: chunk[0 ..< n])
        }
        while reply.last == UInt8(ascii: "\n") { reply.removeLast() }
        return reply
    }
}
