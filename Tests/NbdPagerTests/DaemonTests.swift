import CNbd
import Foundation
import Logging
import XCTest
@testable import NbdPager

/// A blocking libnbd client for one export on a Unix socket.
final class NbdTestClient {
    let handle: OpaquePointer

    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    static func lastError() -> Failure { Failure(description: String(cString: nbd_get_error())) }

    init(socket: String, export: String) throws {
        guard let h = nbd_create() else { throw Self.lastError() }
        handle = h
        guard nbd_set_export_name(h, export) == 0, nbd_connect_unix(h, socket) == 0 else {
            let e = Self.lastError()
            nbd_close(h)
            throw e
        }
    }

    deinit {
        _ = nbd_shutdown(handle, 0)
        nbd_close(handle)
    }

    var size: Int64 { nbd_get_size(handle) }

    func write(_ bytes: [UInt8], at offset: UInt64) throws {
        guard bytes.withUnsafeBytes({ nbd_pwrite(handle, $0.baseAddress, $0.count, offset, 0) }) == 0 else {
            throw Self.lastError()
        }
    }

    func read(_ count: Int, at offset: UInt64) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        guard out.withUnsafeMutableBytes({ nbd_pread(handle, $0.baseAddress, $0.count, offset, 0) }) == 0 else {
            throw Self.lastError()
        }
        return out
    }

    /// NBD_OPT_LIST: the export names the server lists.
    static func list(socket: String) throws -> [String] {
        guard let h = nbd_create() else { throw lastError() }
        defer { nbd_close(h) }
        guard nbd_set_opt_mode(h, true) == 0, nbd_connect_unix(h, socket) == 0 else { throw lastError() }
        final class Names { var names: [String] = [] }
        let names = Names()
        let box = Unmanaged.passRetained(names)
        let callback = nbd_list_callback(
            callback: { data, name, _ in
                guard let data, let name else { return 0 }
                Unmanaged<Names>.fromOpaque(data).takeUnretainedValue().names.append(String(cString: name))
                return 0
            },
            user_data: box.toOpaque(),
            free: { data in if let data { Unmanaged<Names>.fromOpaque(data).release() } })
        guard nbd_opt_list(h, callback) >= 0 else { throw lastError() }
        _ = nbd_opt_abort(h)
        return names.names
    }
}

final class DaemonTests: XCTestCase {
    var directory = ""

    override func setUpWithError() throws {
        directory = NSTemporaryDirectory() + "daemon-tests-\(getpid())-\(UInt32.random(in: 0 ... .max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    override func tearDown() {
        try? FileManager.default.removeItem(atPath: directory)
    }

    func pattern(_ count: Int, seed: UInt8) -> [UInt8] {
        (0 ..< count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed)) }
    }

    /// Starts a daemon (two threads, one event loop, no signal handling) with these exports on a Unix
    /// socket and returns once it serves.
    func startDaemon(_ exports: [ExportConfiguration], socket: String, control: String,
                     pidfile: String? = nil) async -> (Daemon, Task<Void, any Error>) {
        var configuration = DaemonConfiguration(exports: exports, listeners: [.unix(path: socket)])
        configuration.controlPath = control
        configuration.pidfile = pidfile
        configuration.threads = 2
        configuration.eventLoops = 1
        configuration.handlesSignals = false
        var logger = Logger(label: "daemon-test")
        logger.logLevel = .warning
        let daemon = Daemon(configuration: configuration, logger: logger)
        let running = Task { try await daemon.run() }
        await daemon.waitUntilServing()
        return (daemon, running)
    }

    /// A daemon with a file export and a memory export on one Unix socket: each is written and read
    /// through its own connection, holds only its own data, and NBD_OPT_LIST lists both.
    func testTwoExportsServedSideBySide() async throws {
        let file = directory + "/disk.img"
        XCTAssertTrue(FileManager.default.createFile(atPath: file, contents: Data(count: 1 << 20)))
        let socket = directory + "/nbd.sock", control = directory + "/ctl.sock", pidfile = directory + "/pid"
        let (daemon, running) = await startDaemon(
            [
                ExportConfiguration(name: "disk", kind: FileExport(path: file), description: "the disk"),
                ExportConfiguration(name: "ram", kind: MemoryExport(size: 4 << 20)),
            ],
            socket: socket, control: control, pidfile: pidfile)
        XCTAssertTrue(FileManager.default.fileExists(atPath: pidfile))

        let a = pattern(8192, seed: 1), b = pattern(8192, seed: 99)
        do {
            let disk = try NbdTestClient(socket: socket, export: "disk")
            let ram = try NbdTestClient(socket: socket, export: "ram")
            XCTAssertEqual(disk.size, 1 << 20)
            XCTAssertEqual(ram.size, 4 << 20)
            try disk.write(a, at: 4096)
            try ram.write(b, at: 4096)
            XCTAssertEqual(try disk.read(8192, at: 4096), a)
            XCTAssertEqual(try ram.read(8192, at: 4096), b)
        }
        // fresh connections see the same, and each export only its own data
        do {
            let disk = try NbdTestClient(socket: socket, export: "disk")
            let ram = try NbdTestClient(socket: socket, export: "ram")
            XCTAssertEqual(try disk.read(8192, at: 4096), a)
            XCTAssertEqual(try ram.read(8192, at: 4096), b)
            XCTAssertEqual(try ram.read(4096, at: 0), [UInt8](repeating: 0, count: 4096))
        }
        XCTAssertEqual(try NbdTestClient.list(socket: socket).sorted(), ["disk", "ram"])

        // the control socket reports both exports
        let (reply, json) = try ControlClient.send(StatusCommand(), to: control)
        guard case .ok(let status) = reply else { return XCTFail("status failed: \(json.rendered)") }
        XCTAssertEqual(status.exports.map(\.export), ["disk", "ram"])
        XCTAssertEqual(status.exports.map(\.kind), ["file", "memory"])
        XCTAssertEqual(status.export("ram")?.size, 4 << 20)
        XCTAssertNil(json["export"], "with several exports, none is flattened into the top level")
        let (one, _) = try ControlClient.send(StatusCommand(), export: "disk", to: control)
        guard case .ok(let diskStatus) = one else { return XCTFail("status of one export failed") }
        XCTAssertEqual(diskStatus.exports.map(\.export), ["disk"])
        let (gate, _) = try ControlClient.send(GateCommand(action: .open), to: control)
        XCTAssertNotNil(gate.errorMessage, "neither export has a gate")
        let (missing, _) = try ControlClient.send(StatusCommand(), export: "nope", to: control)
        XCTAssertNotNil(missing.errorMessage)
        for raw in ["status", #"{"command":"reboot"}"#, #"{"command":"gate","action":"close"}"#] {
            let reply = try ControlClient.exchange(Array(raw.utf8), with: control)
            let decoded = try ControlCodec.decode(ControlReply<ControlNoFields>.self, from: reply)
            XCTAssertNotNil(decoded.errorMessage, "\(raw) is refused with an error reply")
        }

        await daemon.shutdown()
        try await running.value
        XCTAssertFalse(FileManager.default.fileExists(atPath: pidfile), "the pidfile is removed on exit")
        XCTAssertFalse(FileManager.default.fileExists(atPath: socket), "the socket is removed on exit")
        let onDisk = try XCTUnwrap(FileManager.default.contents(atPath: file))
        XCTAssertEqual([UInt8](onDisk[4096 ..< 4096 + 8192]), a, "the file export's writes reached the file")
    }

    /// A daemon that cannot start says why, and leaves no pidfile.
    func testStartFailureIsAnError() async throws {
        var configuration = DaemonConfiguration(
            exports: [ExportConfiguration(name: "", kind: FileExport(path: directory + "/missing.img"))],
            listeners: [.unix(path: directory + "/nbd.sock")])
        configuration.pidfile = directory + "/pid"
        configuration.handlesSignals = false
        let daemon = Daemon(configuration: configuration, logger: Logger(label: "daemon-test"))
        do {
            try await daemon.run()
            XCTFail("a missing file was served")
        } catch let error as DaemonError {
            XCTAssertTrue(error.description.contains("missing.img"), error.description)
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: directory + "/pid"))
    }

    /// A gated lazy export run by the daemon: the status says the gate is closed, `gate open` opens
    /// it (once), reads return the source's data, the background pull completes and `prefetch
    /// pause` answers.
    func testLazyExportThroughTheControlSocket() async throws {
        let source = try NbdkitServer(directory: directory, arguments: ["pattern", "2M"])
        defer { source.stop() }
        let socket = directory + "/nbd.sock", control = directory + "/ctl.sock"
        var lazy = LazyExport(source: source.uri, store: directory + "/store")
        lazy.gated = true
        let (daemon, running) = await startDaemon([ExportConfiguration(name: "vm", kind: lazy)],
                                                  socket: socket, control: control)

        let (before, json) = try ControlClient.send(StatusCommand(), to: control)
        guard case .ok(let closed) = before else { return XCTFail("status failed: \(json.rendered)") }
        XCTAssertEqual(closed.exports.first?.kind, "lazy")
        XCTAssertEqual(json["gate"], .string("closed"), "one export: its fields are at the top level")
        XCTAssertEqual(json["pages"]?["total"], .int(512))
        XCTAssertEqual(json["bytes_pulled"], .int(0))

        let (open, _) = try ControlClient.send(GateCommand(action: .open), to: control)
        guard case .ok(let opened) = open else { return XCTFail("gate open failed: \(open)") }
        XCTAssertTrue(opened.wasClosed)
        let (again, _) = try ControlClient.send(GateCommand(action: .open), export: "vm", to: control)
        guard case .ok(let second) = again else { return XCTFail("second gate open failed") }
        XCTAssertFalse(second.wasClosed)

        // nbdkit's pattern: each 8-byte word is its own offset, big-endian
        let client = try NbdTestClient(socket: socket, export: "vm")
        let bytes = try client.read(16, at: 1 << 20)
        XCTAssertEqual(bytes, (0 ..< 2).flatMap { i -> [UInt8] in
            let word = UInt64(1 << 20) + UInt64(i * 8)
            return (0 ..< 8).map { UInt8(truncatingIfNeeded: word >> (56 - 8 * $0)) }
        })

        var complete = false
        for _ in 0 ..< 200 where !complete {
            let (reply, _) = try ControlClient.send(StatusCommand(), to: control)
            if case .ok(let s) = reply, s.exports.first?.field("complete") == .bool(true) { complete = true }
            try await Task.sleep(nanoseconds: 50_000_000)
        }
        XCTAssertTrue(complete, "the background pull did not complete in 10 s")
        let (pause, _) = try ControlClient.send(PrefetchCommand(action: .pause), to: control)
        guard case .ok(let paused) = pause else { return XCTFail("prefetch pause failed: \(pause)") }
        XCTAssertEqual(paused.prefetch, "done")

        await daemon.shutdown()
        try await running.value
    }

    func testConfigurationValidation() {
        let ram = ExportConfiguration(name: "a", kind: MemoryExport(size: 4096))
        XCTAssertThrowsError(try DaemonConfiguration(exports: [ram, ram], listeners: [.unix(path: "/x")]).validate())
        XCTAssertThrowsError(try DaemonConfiguration(exports: [], listeners: [.unix(path: "/x")]).validate())
        var lazy = LazyExport(source: "nbd://localhost", store: "/nowhere")
        lazy.gated = true
        XCTAssertThrowsError(try DaemonConfiguration(exports: [.init(name: "", kind: lazy)], listeners: [.unix(path: "/x")]).validate(),
                             "a gated export needs a control socket")
        XCTAssertNoThrow(try DaemonConfiguration(exports: [ram], listeners: [.unix(path: "/x")]).validate())
        var none = DaemonConfiguration(exports: [ram], listeners: [.unix(path: "/x")])
        none.eventLoops = 0
        XCTAssertThrowsError(try none.validate(), "no event loop")
    }
}
