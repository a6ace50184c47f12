import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// Where pages the local store does not hold yet come from: a remote NBD export (libnbd) or, in
/// tests, anything that can answer reads and base:allocation queries.
///
/// Implementations are thread-safe and allow many reads in flight at once. A read either returns
/// exactly `length` bytes or throws a `SourceError`; it never returns a short buffer.
public protocol RemoteSource: AnyObject, Sendable {
    /// Whether at least one connection to the source is up.
    var isConnected: Bool { get }
    /// Size of the export in bytes, fixed for the lifetime of the source.
    var size: UInt64 { get }

    /// Whether the source answers base:allocation block status queries. When false, `extents`
    /// still works and reports the whole range as allocated data.
    var supportsExtents: Bool { get }

    /// Reads `length` bytes at `offset`. `offset + length` must not exceed `size`.
    /// The returned buffer holds exactly `length` readable bytes.
    func read(offset: UInt64, length: Int) async throws -> ByteBuffer

    /// base:allocation extents covering exactly `[offset, offset + length)`, in order, adjacent
    /// extents with equal flags merged. Empty for `length == 0`.
    func extents(offset: UInt64, length: UInt64) async throws -> [NBDExtent]

    /// The same read, completed as an event-loop future (implementations may avoid Swift concurrency).
    /// `onArrival`, when given, may be called once with the data on whichever thread receives it, before
    /// the future completes (a caller can answer a client without waiting for the event loop); it may
    /// also never be called, e.g. when the read had to be retried.
    func read(offset: UInt64, length: Int, eventLoop: any EventLoop,
              onArrival: (@Sendable (ByteBuffer) -> Void)?) -> EventLoopFuture<ByteBuffer>

    /// Stops the source: pending and later requests fail with `SourceError.closed`. Idempotent.
    func close()
}

extension RemoteSource {
    public func read(offset: UInt64, length: Int, eventLoop: any EventLoop,
                     onArrival: (@Sendable (ByteBuffer) -> Void)?) -> EventLoopFuture<ByteBuffer> {
        eventLoop.makeFutureWithTask { try await self.read(offset: offset, length: length) }
    }

    public func read(offset: UInt64, length: Int, eventLoop: any EventLoop) -> EventLoopFuture<ByteBuffer> {
        read(offset: offset, length: length, eventLoop: eventLoop, onArrival: nil)
    }
}

/// Why a remote source request failed.
public enum SourceError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The source could not be reached or the NBD handshake failed.
    case connect(String)
    /// The server (or libnbd) failed the request with this errno.
    case io(errno: Int32, String)
    /// The connection to the source died (server gone, socket error); the request did not complete.
    case connectionLost(String)
    /// The source was closed locally before or while the request ran.
    case closed
    /// The request reaches past the end of the export.
    case outOfRange(offset: UInt64, length: UInt64, size: UInt64)
    /// The request itself is unusable (negative length, too large for one buffer, ...).
    case invalidArgument(String)
    /// The server answered in a way the protocol does not allow.
    case protocolViolation(String)

    public var description: String {
        switch self {
        case .connect(let why):
            return "cannot connect to the remote source: \(why)"
        case .io(let errno, let why):
            let name = String(cString: strerror(errno))
            return why.isEmpty ? "remote source I/O error: \(name) (errno \(errno))"
                               : "remote source I/O error: \(why) (\(name), errno \(errno))"
        case .connectionLost(let why):
            return "connection to the remote source lost: \(why)"
        case .closed:
            return "the remote source is closed"
        case .outOfRange(let offset, let length, let size):
            return "request [\(offset), +\(length)) is outside the remote export of \(size) bytes"
        case .invalidArgument(let why):
            return "invalid remote source request: \(why)"
        case .protocolViolation(let why):
            return "remote source protocol violation: \(why)"
        }
    }

    /// True when the request may succeed if retried on a new connection (reconnect logic).
    public var isConnectionFailure: Bool {
        switch self {
        case .connectionLost, .connect: return true
        default: return false
        }
    }
}

extension NBDExtent {
    /// Longest extent a merge produces: 4 GiB - 4 KiB, so merged extents stay page aligned.
    static let maxMergedLength: UInt64 = 0xFFFF_F000

    /// Appends `extent` to `list`, merging it into the last element when the flags are equal and the
    /// merged length stays within `maxMergedLength`.
    static func append(_ extent: NBDExtent, to list: inout [NBDExtent]) {
        guard extent.length > 0 else { return }
        if let last = list.last, last.flags == extent.flags,
           UInt64(last.length) + UInt64(extent.length) <= NBDExtent.maxMergedLength {
            list[list.count - 1].length = last.length + extent.length
        } else {
            list.append(extent)
        }
    }
}
