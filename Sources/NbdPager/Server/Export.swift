import NIOPosix

/// An export as the server runs it: what the protocol advertises, plus the storage and the thread pool
/// that runs its blocking operations.
public final class Export: Sendable {
    public let info: NBDExportInfo
    public let backend: any BlockBackend
    let threadPool: NIOThreadPool
    /// Requests, bytes, errors and latency per command.
    public let stats = RequestStats()

    public init(name: String, description: String, backend: any BlockBackend, readOnly: Bool,
                minimumBlockSize: UInt32, threadPool: NIOThreadPool) {
        let caps = backend.capabilities
        let ro = readOnly || !caps.writable
        self.info = NBDExportInfo(
            name: name, description: description, size: backend.size, readOnly: ro,
            canFlush: true, canFUA: !ro, canTrim: caps.canTrim && !ro, canZero: caps.canZero && !ro,
            canFastZero: caps.canFastZero && !ro, canCache: caps.canCache, canMultiConn: caps.canMultiConn,
            minimumBlockSize: minimumBlockSize)
        self.backend = backend
        self.threadPool = threadPool
    }
}
