import Logging
import NIOCore
import NIOPosix

/// A kind of export (a file, RAM, a lazy copy of a remote export): how its storage is opened from its
/// settings, and, once open, its status fields, its control commands and its background work.
///
/// A value of a kind is that kind's settings (`FileExport(path:)`, `MemoryExport(size:)`,
/// `LazyExport(source:store:...)`). Adding a kind: one type conforming to `ExportKind` (and its
/// `OpenedExport`), plus one line in `ExportKinds.registered`. Adding a control command to a kind:
/// the command's type, plus one `on` line in the kind's `commands`.
public protocol ExportKind: Sendable {
    associatedtype Opened: OpenedExport
    /// The `kind` field of the export's status.
    static var kindName: String { get }
    /// The control commands exports of this kind answer.
    static var commands: ControlHandlers<Opened> { get }
    /// Opens the storage. Errors are the user's to read (a file that does not exist, a source that
    /// does not answer...).
    func open(_ context: ExportContext) async throws -> Opened
    /// Whether the export cannot work without the control socket (a gate only it can open).
    var needsControlSocket: Bool { get }
}

extension ExportKind {
    public static var commands: ControlHandlers<Opened> { ControlHandlers() }
    public var needsControlSocket: Bool { false }
    static var commandNames: [String] { commands.names }

    /// Answers the request `line` for command `name` on `export` (one of this kind's); nil when the
    /// kind does not answer that command.
    static func answer(_ name: String, on export: any OpenedExport, line: [UInt8]) throws -> [UInt8]? {
        guard let handler = commands.handler(for: name), let opened = export as? Opened else { return nil }
        return try handler(opened, line)
    }
}

/// Every kind of export the daemon knows.
public enum ExportKinds {
    public static let registered: [any ExportKind.Type] = [
        FileExport.self,
        MemoryExport.self,
        LazyExport.self,
    ]

    /// The names of the control commands some kind of export answers.
    public static var commandNames: [String] { registered.flatMap { $0.commandNames } }
}

/// What opening an export may use: the daemon's settings and the threads it created.
public struct ExportContext: Sendable {
    public var name: String
    public var readOnly: Bool
    /// `--swap`: memory must stay resident (a RAM export is allocated and locked up front).
    public var swap: Bool
    /// The daemon's event loops and blocking-I/O threads.
    public var runtime: ExportRuntime
    public var logger: Logger

    public init(name: String, readOnly: Bool, swap: Bool, runtime: ExportRuntime, logger: Logger) {
        self.name = name
        self.readOnly = readOnly
        self.swap = swap
        self.runtime = runtime
        self.logger = logger
    }
}

/// What an export's background work runs on: the daemon's event loops and blocking-I/O threads.
public struct ExportRuntime: Sendable {
    public var eventLoopGroup: any EventLoopGroup
    public var threadPool: NIOThreadPool
    public var logger: Logger

    public init(eventLoopGroup: any EventLoopGroup, threadPool: NIOThreadPool, logger: Logger) {
        self.eventLoopGroup = eventLoopGroup
        self.threadPool = threadPool
        self.logger = logger
    }
}

/// An export of some kind, open.
public protocol OpenedExport: AnyObject, Sendable {
    /// The storage the NBD server serves.
    var backend: any BlockBackend { get }
    /// The description shown by nbdinfo when the configuration gives none.
    var defaultDescription: String { get }
    /// Checks done before the daemon listens (a bad hot list is refused before any client is served).
    func prepare(_ runtime: ExportRuntime) throws
    /// Starts the background work, once the listeners are up.
    func start(_ runtime: ExportRuntime)
    /// Stops the background work, before connections are drained and the storage closed (called off
    /// the event loops: it may wait for work in progress).
    func stop()
    /// The kind's own status fields (an object; `.object([])` when it has none).
    func statusFields() -> JSONValue
    /// The kind's latency histograms for the metrics endpoint, by metric name (without the
    /// `nbd_umemd_` prefix) and help text.
    func histograms() -> [(name: String, help: String, histogram: BucketHistogram)]
}

extension OpenedExport {
    public func prepare(_ runtime: ExportRuntime) throws {}
    public func start(_ runtime: ExportRuntime) {}
    public func stop() {}
    public func statusFields() -> JSONValue { .object([]) }
    public func histograms() -> [(name: String, help: String, histogram: BucketHistogram)] { [] }
}

/// A regular file or block device.
public struct FileExport: ExportKind {
    public static let kindName = "file"
    public var path: String

    public init(path: String) { self.path = path }

    public func open(_ context: ExportContext) async throws -> PlainExport {
        PlainExport(backend: try FileBackend.open(path: path, readOnly: context.readOnly),
                    defaultDescription: "file \(path)")
    }
}

/// A zero-filled RAM export (a memfd; allocated and locked up front in swap mode).
public struct MemoryExport: ExportKind {
    public static let kindName = "memory"
    public var size: UInt64

    public init(size: UInt64) { self.size = size }

    public func open(_ context: ExportContext) async throws -> PlainExport {
        let backend = context.swap ? try FileBackend.residentMemory(size: size) : try FileBackend.memory(size: size)
        return PlainExport(backend: backend, defaultDescription: "memory, \(size) bytes")
    }
}

/// An export that is only its storage: no background work, no status fields or commands of its own.
public final class PlainExport: OpenedExport {
    public let backend: any BlockBackend
    public let defaultDescription: String

    init(backend: any BlockBackend, defaultDescription: String) {
        self.backend = backend
        self.defaultDescription = defaultDescription
    }
}
