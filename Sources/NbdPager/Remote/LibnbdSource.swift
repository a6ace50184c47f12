import Atomics
import CNbd
import Logging
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// TLS on the link to the source, through libnbd (GnuTLS): an `nbds://` or `nbds+unix://` URI
/// requires it. Credentials may also be given in the URI (`?tls-certificates=DIR`,
/// `?tls-psk-file=FILE`, `alice@` for the PSK identity).
public struct SourceTLS: Sendable, Hashable {
    /// x509: DIR/ca-cert.pem (and DIR/client-cert.pem, DIR/client-key.pem when the source checks
    /// client certificates).
    public var certificates: String?
    /// psktool keys: FILE with `identity:hexkey` lines.
    public var pskFile: String?
    /// The identity (PSK) or certificate user name; libnbd's default is the local user name.
    public var username: String?
    /// Check the source's certificate against the CA and its host name (on unless turned off).
    public var verifyPeer = true

    public init(certificates: String? = nil, pskFile: String? = nil, username: String? = nil, verifyPeer: Bool = true) {
        self.certificates = certificates
        self.pskFile = pskFile
        self.username = username
        self.verifyPeer = verifyPeer
    }

    /// Whether `uri` asks for TLS (`nbds://`, `nbds+unix://`, `nbds+vsock://`).
    public static func uriRequiresTLS(_ uri: String) -> Bool {
        uri.hasPrefix("nbds://") || uri.hasPrefix("nbds+")
    }
}

/// A remote NBD export (nbdkit, qemu-nbd, nbd-umemd) read through libnbd.
///
/// Holds `connections` libnbd handles, each with a dedicated event thread (see NbdConnection).
/// Requests go to the least-loaded live connection; any number may be in flight. Reads longer than
/// `maxRequestLength` are split into several commands, spread over the connections.
///
/// A request cannot be cancelled once submitted (NBD has no cancel); a cancelled task still waits
/// for its commands. A connection that dies fails its in-flight commands with
/// `SourceError.connectionLost` and is not used again (reconnecting is left to a later layer, which
/// can watch `isConnected` / `liveConnectionCount`).
public final class LibnbdSource: RemoteSource {
    public let uri: String
    public let size: UInt64
    public let supportsExtents: Bool
    /// Largest single NBD_CMD_READ sent: 32 MiB, or less if the server advertises a smaller maximum.
    public let maxRequestLength: Int
    /// The server's minimum block size (1 if it advertises none).
    public let minimumBlockSize: UInt64

    private let connections: [NbdConnection]
    private let nextConnection = ManagedAtomic<UInt>(0)
    private let closed = ManagedAtomic<Bool>(false)
    private let logger: Logger

    /// Longest block status query sent at once (the wire length field is 32 bits).
    static let maxBlockStatusLength: UInt64 = 1 << 30
    static let defaultMaxRequestLength = 32 * 1024 * 1024

    private init(uri: String, size: UInt64, supportsExtents: Bool, maxRequestLength: Int,
                 minimumBlockSize: UInt64, connections: [NbdConnection], logger: Logger) {
        self.uri = uri
        self.size = size
        self.supportsExtents = supportsExtents
        self.maxRequestLength = maxRequestLength
        self.minimumBlockSize = minimumBlockSize
        self.connections = connections
        self.logger = logger
    }

    deinit {
        for connection in connections { connection.close() }
    }

    /// Opens `connections` handles to `uri` (blocking: connect and NBD handshake happen here) and
    /// starts their event threads. URIs as libnbd understands them: `nbd+unix:///?socket=PATH`,
    /// `nbd://127.0.0.1:10809/name`, ...
    public static func connect(uri: String, connections count: Int = 2, tls: SourceTLS = SourceTLS(),
                               logger: Logger) throws -> LibnbdSource {
        guard count >= 1 else { throw SourceError.invalidArgument("need at least one connection, got \(count)") }
        var opened: [NbdConnection] = []
        var size: UInt64 = 0
        var extents = true
        var maxRequest = defaultMaxRequestLength
        var minBlock: UInt64 = 1
        do {
            for index in 0..<count {
                let handle = try openHandle(uri: uri, index: index, tls: tls)
                let s = nbd_get_size(handle)
                guard s >= 0 else {
                    let message = NbdConnection.lastError()
                    nbd_close(handle)
                    throw SourceError.connect("\(uri): cannot get the export size: \(message)")
                }
                if index == 0 {
                    size = UInt64(s)
                } else if UInt64(s) != size {
                    nbd_close(handle)
                    throw SourceError.connect("\(uri): connection \(index) sees size \(s), connection 0 saw \(size)")
                }
                if nbd_can_meta_context(handle, "base:allocation") != 1 { extents = false }
                let serverMax = nbd_get_block_size(handle, Int32(LIBNBD_SIZE_MAXIMUM))
                if serverMax > 0 { maxRequest = min(maxRequest, Int(clamping: serverMax)) }
                let serverMin = nbd_get_block_size(handle, Int32(LIBNBD_SIZE_MINIMUM))
                if serverMin > 0 { minBlock = max(minBlock, UInt64(serverMin)) }

                var connLogger = logger
                connLogger[metadataKey: "source"] = "\(uri)"
                let connection = try NbdConnection(index: index, handle: handle, logger: connLogger)
                opened.append(connection)
                try connection.start()
            }
        } catch {
            for connection in opened { connection.close() }
            throw error
        }
        // Keep split points on the server's block boundaries.
        if UInt64(maxRequest) >= minBlock {
            maxRequest = Int(UInt64(maxRequest) / minBlock * minBlock)
        } else {
            maxRequest = Int(clamping: minBlock)
        }
        let source = LibnbdSource(uri: uri, size: size, supportsExtents: extents, maxRequestLength: maxRequest,
                                  minimumBlockSize: minBlock, connections: opened, logger: logger)
        logger.info("connected to remote source", metadata: [
            "source": "\(uri)", "size": "\(size)", "connections": "\(count)",
            "extents": "\(extents)", "max-request": "\(maxRequest)",
        ])
        return source
    }

    private static func openHandle(uri: String, index: Int, tls: SourceTLS) throws -> OpaquePointer {
        guard let handle = nbd_create() else {
            throw SourceError.connect("nbd_create: \(NbdConnection.lastError())")
        }
        func fail(_ what: String) -> SourceError {
            let message = NbdConnection.lastError()
            nbd_close(handle)
            return SourceError.connect("\(uri): \(what): \(message)")
        }
        _ = nbd_set_handle_name(handle, "umemd-source-\(index)")
        guard nbd_supports_uri(handle) == 1 else { throw fail("this libnbd was built without URI support") }
        guard nbd_add_meta_context(handle, "base:allocation") == 0 else { throw fail("nbd_add_meta_context") }
        // Buffers of failed reads are never handed out, so libnbd need not zero them first.
        _ = nbd_set_pread_initialize(handle, false)
        // The URI comes from the operator: it may name credential files (?tls-psk-file=...).
        _ = nbd_set_uri_allow_local_file(handle, true)
        if let dir = tls.certificates, nbd_set_tls_certificates(handle, dir) != 0 { throw fail("TLS certificates \(dir)") }
        if let file = tls.pskFile, nbd_set_tls_psk_file(handle, file) != 0 { throw fail("TLS PSK file \(file)") }
        if let name = tls.username, nbd_set_tls_username(handle, name) != 0 { throw fail("TLS user name") }
        _ = nbd_set_tls_verify_peer(handle, tls.verifyPeer)
        guard nbd_connect_uri(handle, uri) == 0 else {
            if SourceTLS.uriRequiresTLS(uri) { throw fail("TLS connect (check the credentials, and that the source's certificate is signed by the CA in ca-cert.pem and names this host)") }
            throw fail("connect")
        }
        return handle
    }

    // MARK: state

    /// True while at least one connection can take requests.
    public var isConnected: Bool {
        !closed.load(ordering: .relaxed) && connections.contains { $0.isUsable }
    }

    /// How many of the connections can still take requests.
    public var liveConnectionCount: Int {
        closed.load(ordering: .relaxed) ? 0 : connections.reduce(0) { $0 + ($1.isUsable ? 1 : 0) }
    }

    /// Commands submitted and not yet completed, over all connections.
    public var commandsInFlight: Int {
        connections.reduce(0) { $0 + max(0, $1.inFlight.load(ordering: .relaxed)) }
    }

    public func close() {
        guard closed.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged else {
            return
        }
        for connection in connections { connection.close() }
        logger.info("remote source closed", metadata: ["source": "\(uri)"])
    }

    /// The least-loaded usable connection, ties broken round robin.
    private func pickConnection() throws -> NbdConnection {
        if closed.load(ordering: .relaxed) { throw SourceError.closed }
        let n = UInt(connections.count)
        let start = nextConnection.loadThenWrappingIncrement(ordering: .relaxed)
        var best: NbdConnection?
        var bestLoad = Int.max
        for i in 0..<n {
            let connection = connections[Int((start &+ i) % n)]
            guard connection.isUsable else { continue }
            let load = connection.inFlight.load(ordering: .relaxed)
            if load < bestLoad {
                best = connection
                bestLoad = load
            }
        }
        if let best { return best }
        if closed.load(ordering: .relaxed) { throw SourceError.closed }
        let reason = connections.lazy.compactMap { $0.deathReason }.first ?? "no live connection"
        throw SourceError.connectionLost(reason)
    }

    private func checkRange(offset: UInt64, length: UInt64) throws {
        guard offset <= size, length <= size - offset else {
            throw SourceError.outOfRange(offset: offset, length: length, size: size)
        }
    }

    // MARK: reads

    public func read(offset: UInt64, length: Int) async throws -> ByteBuffer {
        guard length >= 0 else { throw SourceError.invalidArgument("negative read length \(length)") }
        guard UInt64(length) < UInt64(UInt32.max) else {
            throw SourceError.invalidArgument("read of \(length) bytes does not fit in one ByteBuffer")
        }
        if closed.load(ordering: .relaxed) { throw SourceError.closed }
        try checkRange(offset: offset, length: UInt64(length))
        var buffer = ByteBufferAllocator().buffer(capacity: length)
        guard length > 0 else { return buffer }
        var base: UnsafeMutableRawPointer?
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { space in
            base = space.baseAddress
            return length
        }
        guard let base else { throw SourceError.invalidArgument("cannot allocate a \(length)-byte buffer") }
        // libnbd writes through `base` until every command has completed or been freed, which is
        // before readRaw returns or throws. `buffer` owns that storage, is not touched in between
        // (so it is neither copied nor reallocated), and must outlive the await on every path.
        defer { withExtendedLifetime(buffer) {} }
        try await readRaw(into: base, length: length, offset: offset)
        return buffer
    }

    /// Reads `buffer.count` bytes at `offset` straight into caller memory (e.g. a mapped store
    /// file), with no intermediate copy. The memory must stay valid until this returns or throws;
    /// libnbd no longer touches it after that, on every path.
    public func read(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64) async throws {
        if closed.load(ordering: .relaxed) { throw SourceError.closed }
        try checkRange(offset: offset, length: UInt64(buffer.count))
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        try await readRaw(into: base, length: buffer.count, offset: offset)
    }

    /// Reads without Swift concurrency: libnbd's completion fulfils an event-loop promise directly, so
    /// a demand miss costs one thread wake-up (libnbd's event thread to the event loop) instead of
    /// going through the cooperative pool twice.
    public func read(offset: UInt64, length: Int, eventLoop: any EventLoop,
                     onArrival: (@Sendable (ByteBuffer) -> Void)?) -> EventLoopFuture<ByteBuffer> {
        guard length > 0, UInt64(length) < UInt64(UInt32.max) else {
            return eventLoop.makeFutureWithTask { try await self.read(offset: offset, length: length) }
        }
        if closed.load(ordering: .relaxed) { return eventLoop.makeFailedFuture(SourceError.closed) }
        do {
            try checkRange(offset: offset, length: UInt64(length))
        } catch {
            return eventLoop.makeFailedFuture(error)
        }
        var buffer = ByteBufferAllocator().buffer(capacity: length)
        var base: UnsafeMutableRawPointer?
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { space in
            base = space.baseAddress
            return length
        }
        guard let base else { return eventLoop.makeFailedFuture(SourceError.invalidArgument("cannot allocate \(length) bytes")) }
        let promise = eventLoop.makePromise(of: ByteBuffer.self)
        // The completion keeps `buffer` (whose storage libnbd writes through `base`) alive and untouched
        // until every part has completed or been freed.
        let filled = buffer
        submitRead(into: base, length: length, offset: offset) { result in
            switch result {
            case .success:
                onArrival?(filled)
                promise.succeed(filled)
            case .failure(let error): promise.fail(error)
            }
        }
        return promise.futureResult
    }

    private func readRaw(into base: UnsafeMutableRawPointer, length: Int, offset: UInt64) async throws {
        _ = try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<[UInt32], any Error>) in
            submitRead(into: base, length: length, offset: offset) { continuation.resume(with: $0) }
        }
    }

    /// Submits a read, split at the server's maximum request length, across the connections.
    private func submitRead(into base: UnsafeMutableRawPointer, length: Int, offset: UInt64,
                            completion: @escaping PendingRequest.Completion) {
        let chunk = maxRequestLength
        let parts = (length + chunk - 1) / chunk
        let address = UInt(bitPattern: base)
        let request = PendingRequest(parts: parts, completion: completion)
        var done = 0
        var part = 0
        while done < length {
            if let error = request.failure {
                // An earlier part failed: do not send the rest.
                request.finishParts(parts - part, error: error)
                break
            }
            let n = min(chunk, length - done)
            guard let pointer = UnsafeMutableRawPointer(bitPattern: address &+ UInt(done)) else {
                request.finishParts(parts - part, error: .invalidArgument("bad buffer address"))
                break
            }
            do {
                let connection = try pickConnection()
                connection.submitRead(into: pointer, count: n, offset: offset + UInt64(done), request: request)
            } catch {
                request.finishParts(1, error: error as? SourceError ?? .io(errno: EIO, "\(error)"))
            }
            done += n
            part += 1
        }
    }

    // MARK: extents

    public func extents(offset: UInt64, length: UInt64) async throws -> [NBDExtent] {
        if closed.load(ordering: .relaxed) { throw SourceError.closed }
        try checkRange(offset: offset, length: length)
        var result: [NBDExtent] = []
        guard length > 0 else { return result }
        let end = offset + length
        var position = offset
        guard supportsExtents else {
            // No base:allocation: everything is (possibly) allocated data.
            while position < end {
                let n = min(end - position, Self.maxBlockStatusLength)
                NBDExtent.append(NBDExtent(length: UInt32(n), flags: []), to: &result)
                position += n
            }
            return result
        }
        while position < end {
            let want = min(end - position, Self.maxBlockStatusLength)
            let pairs = try await blockStatus(offset: position, count: want)
            var covered: UInt64 = 0
            var i = 0
            while i + 1 < pairs.count && covered < want {
                let n = min(UInt64(pairs[i]), want - covered)
                let flags = NBDAllocationFlags(rawValue: pairs[i + 1] & (NBDAllocationFlags.hole.rawValue | NBDAllocationFlags.zero.rawValue))
                NBDExtent.append(NBDExtent(length: UInt32(n), flags: flags), to: &result)
                covered += n
                i += 2
            }
            guard covered > 0 else {
                throw SourceError.protocolViolation("block status at \(position) returned no base:allocation extent")
            }
            position += covered
        }
        return result
    }

    /// One NBD_CMD_BLOCK_STATUS: the flattened base:allocation (length, flags) pairs as sent by the
    /// server. Internal (not private) so tests can drive it against servers without the context.
    func blockStatus(offset: UInt64, count: UInt64) async throws -> [UInt32] {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<[UInt32], any Error>) in
            let request = PendingRequest(parts: 1, continuation: continuation)
            do {
                let connection = try pickConnection()
                connection.submitBlockStatus(offset: offset, count: count, request: request)
            } catch {
                request.finishParts(1, error: error as? SourceError ?? .io(errno: EIO, "\(error)"))
            }
        }
    }
}
