import NIOCore

/// Storage behind an export. Implementations are thread-safe: the server calls them from event loops
/// (only with `nonBlocking` I/O) and from its I/O thread pool.
public protocol BlockBackend: AnyObject, Sendable {
    var size: UInt64 { get }
    var capabilities: BackendCapabilities { get }

    /// Reads into `buffer` from `offset`. Returns how many bytes were read: with `nonBlocking` this may be
    /// fewer than asked (the rest would block, e.g. not in the page cache); otherwise it is all of them.
    func read(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64, nonBlocking: Bool) throws -> Int
    /// Writes `buffer` at `offset`, with the same partial-progress contract as `read`. With `fua` the data is
    /// durable before it returns (a FUA write is never attempted non-blocking unless `inlineSafe`).
    func write(from buffer: UnsafeRawBufferPointer, offset: UInt64, fua: Bool, nonBlocking: Bool) throws -> Int
    /// Makes every completed write durable.
    func flush() throws
    /// Discards a range (reads as zero afterwards where the backend can guarantee it).
    func trim(offset: UInt64, length: UInt64, fua: Bool) throws
    /// Zeroes a range. `mayTrim`: deallocating is allowed (no NO_HOLE). `fast`: fail with
    /// `BackendError.notFast` instead of falling back to writing zeroes.
    func zero(offset: UInt64, length: UInt64, mayTrim: Bool, fast: Bool, fua: Bool) throws
    /// Prefetch hint.
    func cache(offset: UInt64, length: UInt64) throws
    /// base:allocation extents covering at most `length` bytes from `offset`, at most `maxExtents` of them.
    func blockStatus(offset: UInt64, length: UInt64, maxExtents: Int) throws -> [NBDExtent]
    /// Called once when the server shuts down.
    func close() throws
    /// Makes `offset ..< offset + length` usable by the calls above without waiting on anything but local
    /// storage (a lazy export pulls absent pages from its source; for a write, only partial edge pages).
    /// Nil when the range is ready now.
    func prepare(offset: UInt64, length: UInt64, forWrite: Bool, eventLoop: any EventLoop) -> EventLoopFuture<Void>?
    /// For a read that has to wait for remote data (a lazy export's absent pages): a future of exactly
    /// `length` bytes, answered from that data as soon as it arrives. Nil when the read goes through
    /// `prepare` and `read`. `early`, when given, may be called once with the same data on the thread that
    /// receives it, before the future completes; it may also never be called.
    func pendingRead(offset: UInt64, length: UInt64, eventLoop: any EventLoop,
                     early: (@Sendable (ByteBuffer) -> Void)?) -> EventLoopFuture<ByteBuffer>?
}

extension BlockBackend {
    public func prepare(offset: UInt64, length: UInt64, forWrite: Bool, eventLoop: any EventLoop) -> EventLoopFuture<Void>? {
        nil
    }

    public func pendingRead(offset: UInt64, length: UInt64, eventLoop: any EventLoop,
                            early: (@Sendable (ByteBuffer) -> Void)?) -> EventLoopFuture<ByteBuffer>? {
        nil
    }
}

public struct BackendCapabilities: Sendable, Hashable {
    public var writable: Bool
    public var canTrim: Bool
    public var canZero: Bool
    public var canFastZero: Bool
    public var canCache: Bool
    /// Flushes on one connection cover writes made through all of them (shared storage, no private cache).
    public var canMultiConn: Bool
    /// Every operation finishes in memory-speed time, so the event loop may run them all inline.
    public var inlineSafe: Bool
    /// Some reads wait for remote data (`pendingRead` may return a future).
    public var pendingReads: Bool

    public init(writable: Bool, canTrim: Bool, canZero: Bool, canFastZero: Bool, canCache: Bool,
                canMultiConn: Bool, inlineSafe: Bool, pendingReads: Bool = false) {
        self.writable = writable
        self.canTrim = canTrim
        self.canZero = canZero
        self.canFastZero = canFastZero
        self.canCache = canCache
        self.canMultiConn = canMultiConn
        self.inlineSafe = inlineSafe
        self.pendingReads = pendingReads
    }
}

public enum BackendError: Error, Sendable, CustomStringConvertible {
    /// FAST_ZERO was asked and zeroing would have to write data.
    case notFast
    /// The file ended before the export did (it was truncated under us).
    case shortRead(offset: UInt64)
    case system(SystemError)

    public var wireError: NBDErrno {
        switch self {
        case .notFast: return .enotsup
        case .shortRead: return .eio
        case .system(let e): return NBDErrno(hostErrno: e.errno)
        }
    }

    public var description: String {
        switch self {
        case .notFast: return "zeroing this range cannot be done fast"
        case .shortRead(let offset): return "backing file ended early at offset \(offset)"
        case .system(let e): return e.description
        }
    }
}

extension NBDErrno {
    /// The wire error for anything a backend throws.
    public init(_ error: any Error) {
        switch error {
        case let e as BackendError: self = e.wireError
        case let e as SystemError: self = NBDErrno(hostErrno: e.errno)
        case let e as NBDErrno: self = e
        default: self = .eio
        }
    }
}
