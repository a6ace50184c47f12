import Foundation
import Glibc
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import XCTest
@testable import NbdPager

/// An nbdkit process serving on a Unix socket in a temporary directory. The Process object must
/// stay alive while the server is used (Debian's nbdkit dies with its parent thread).
final class NbdkitServer {
    let process: Process
    let socket: String
    let logPath: String
    var pid: pid_t { process.processIdentifier }
    var uri: String { "nbd+unix:///?socket=\(socket)" }

    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    static func executable() throws -> String {
        for path in ["/usr/sbin/nbdkit", "/usr/bin/nbdkit", "/usr/local/sbin/nbdkit", "/usr/local/bin/nbdkit"]
        where FileManager.default.isExecutableFile(atPath: path) {
            return path
        }
        throw Failure(description: "nbdkit is not installed: the remote source tests need it (scripts/test installs it; or apt-get install nbdkit)")
    }

    /// Starts `nbdkit -f -U SOCK -P PIDFILE ARGS...` and waits until it listens.
    init(directory: String, name: String = "nbdkit", arguments: [String]) throws {
        let nbdkit = try Self.executable()
        socket = "\(directory)/\(name).sock"
        let pidfile = "\(directory)/\(name).pid"
        logPath = "\(directory)/\(name).stderr"
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        process = Process()
        process.executableURL = URL(fileURLWithPath: nbdkit)
        process.arguments = ["-f", "-U", socket, "-P", pidfile] + arguments
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle(forWritingAtPath: logPath)
        try process.run()
        let deadline = Date().addingTimeInterval(15)
        while !FileManager.default.fileExists(atPath: pidfile) {
            guard process.isRunning else {
                throw Failure(description: "nbdkit exited at start (\(process.arguments ?? [])): \(stderrText)")
            }
            guard Date() < deadline else {
                stop()
                throw Failure(description: "nbdkit did not write its pidfile within 15 s: \(stderrText)")
            }
            usleep(10_000)
        }
    }

    var stderrText: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    func kill(_ signal: Int32) {
        if process.isRunning { _ = Glibc.kill(pid, signal) }
    }

    func stop() {
        // SIGKILL: the test runner may start children with SIGTERM ignored (nbdkit then keeps
        // running), and a test server has nothing to clean up.
        if process.isRunning { _ = Glibc.kill(pid, SIGKILL) }
        process.waitUntilExit()
    }
}

struct DeadlineExceeded: Error, CustomStringConvertible {
    var what: String
    var seconds: Double
    var description: String { "\(what) did not finish within \(seconds) s" }
}

/// Resumes exactly once: the first of the operation and the timer wins.
private final class OnceResumer<T: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var continuation: CheckedContinuation<T, any Error>?
    init(_ c: CheckedContinuation<T, any Error>) { continuation = c }
    func resume(_ result: Result<T, any Error>) {
        lock.lock()
        let c = continuation
        continuation = nil
        lock.unlock()
        c?.resume(with: result)
    }
}

/// Runs `operation`, failing with DeadlineExceeded after `seconds` even if the operation hangs
/// (the hung task is abandoned, so a hang fails the test instead of blocking the run).
func withDeadline<T: Sendable>(_ seconds: Double, _ what: String,
                               _ operation: @escaping @Sendable () async throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
        let once = OnceResumer(continuation)
        Task {
            do { once.resume(.success(try await operation())) } catch { once.resume(.failure(error)) }
        }
        Task {
            try? await Task.sleep(nanoseconds: UInt64(seconds * 1_000_000_000))
            once.resume(.failure(DeadlineExceeded(what: what, seconds: seconds)))
        }
    }
}

/// Deterministic generator for offsets and lengths (SplitMix64).
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

final class RemoteSourceTests: XCTestCase {
    static let mib = 1024 * 1024

    var directory = ""
    var servers: [NbdkitServer] = []
    var sources: [LibnbdSource] = []
    let logger = Logger(label: "remote-source-tests")

    override func setUpWithError() throws {
        let path = "\(NSTemporaryDirectory())/nbd-umemd-remote-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        directory = path
    }

    override func tearDown() {
        for source in sources { source.close() }
        sources = []
        // Every libnbd command got its free callback (nothing retained for libnbd is left over).
        XCTAssertEqual(CommandContext.live, 0, "leaked command contexts")
        for server in servers { server.stop() }
        servers = []
        try? FileManager.default.removeItem(atPath: directory)
    }

    // MARK: helpers

    func startNbdkit(_ arguments: [String], name: String = "nbdkit") throws -> NbdkitServer {
        let server = try NbdkitServer(directory: directory, name: name, arguments: arguments)
        servers.append(server)
        return server
    }

    func connect(_ server: NbdkitServer, connections: Int = 2) throws -> LibnbdSource {
        let source = try LibnbdSource.connect(uri: server.uri, connections: connections, logger: logger)
        sources.append(source)
        return source
    }

    /// A file of `size` random bytes; returns its path and contents.
    func randomImage(size: Int, name: String = "image.raw") throws -> (String, [UInt8]) {
        guard let urandom = FileHandle(forReadingAtPath: "/dev/urandom") else {
            throw NbdkitServer.Failure(description: "cannot open /dev/urandom")
        }
        defer { try? urandom.close() }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(size)
        while bytes.count < size {
            let chunk = urandom.readData(ofLength: min(8 * Self.mib, size - bytes.count))
            guard !chunk.isEmpty else { throw NbdkitServer.Failure(description: "short read from /dev/urandom") }
            bytes.append(contentsOf: chunk)
        }
        let path = "\(directory)/\(name)"
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return (path, bytes)
    }

    func assertEqual(_ buffer: ByteBuffer, _ expected: ArraySlice<UInt8>, _ message: String,
                     file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(buffer.readableBytes, expected.count, "length: \(message)", file: file, line: line)
        guard buffer.readableBytes == expected.count else { return }
        let same = buffer.withUnsafeReadableBytes { got in
            expected.withUnsafeBytes { want in
                got.count == 0 || memcmp(got.baseAddress!, want.baseAddress!, got.count) == 0
            }
        }
        XCTAssertTrue(same, "data differs: \(message)", file: file, line: line)
    }

    /// The SourceError an operation throws (fails the test if it succeeds or throws something else).
    func sourceError<T: Sendable>(_ what: String, file: StaticString = #filePath, line: UInt = #line,
                                  _ body: @escaping @Sendable () async throws -> T) async -> SourceError? {
        do {
            _ = try await withDeadline(20, what, body)
            XCTFail("\(what) succeeded, expected a SourceError", file: file, line: line)
        } catch let error as SourceError {
            return error
        } catch {
            XCTFail("\(what) threw \(error), expected a SourceError", file: file, line: line)
        }
        return nil
    }

    // MARK: tests

    func testNbdkitIsInstalled() throws {
        // Fails (does not skip) when nbdkit is missing, so a broken environment is visible.
        XCTAssertNoThrow(try NbdkitServer.executable())
    }

    func testSizeAndCapabilities() throws {
        let server = try startNbdkit(["memory", "64M"])
        let source = try connect(server, connections: 3)
        XCTAssertEqual(source.size, 64 * 1024 * 1024)
        XCTAssertTrue(source.isConnected)
        XCTAssertEqual(source.liveConnectionCount, 3)
        XCTAssertLessThanOrEqual(source.maxRequestLength, 32 * Self.mib)
        XCTAssertGreaterThan(source.maxRequestLength, 0)
        XCTAssertEqual(source.commandsInFlight, 0)
    }

    func testConnectToMissingServerFails() throws {
        XCTAssertThrowsError(try LibnbdSource.connect(uri: "nbd+unix:///?socket=\(directory)/absent.sock", logger: logger)) { error in
            guard case SourceError.connect(let why)? = error as? SourceError else {
                return XCTFail("expected SourceError.connect, got \(error)")
            }
            XCTAssertFalse(why.isEmpty)
        }
        XCTAssertThrowsError(try LibnbdSource.connect(uri: "nbd+unix:///?socket=/nonexistent", connections: 0, logger: logger))
    }

    func testReadsMatchImage() async throws {
        let size = 9 * Self.mib + 12_345
        let (path, image) = try randomImage(size: size)
        let server = try startNbdkit(["file", path])
        let source = try connect(server)
        XCTAssertEqual(source.size, UInt64(size))
        let cases: [(Int, Int)] = [
            (0, 1), (0, 4096), (1, 4095), (12_345, 100_000), (4096 * 7, 65_536),
            (5 * Self.mib + 7, Self.mib + 3), (size - 1, 1), (size - 4096, 4096), (0, size),
        ]
        for (offset, length) in cases {
            let buffer = try await withDeadline(20, "read \(offset)+\(length)") {
                try await source.read(offset: UInt64(offset), length: length)
            }
            assertEqual(buffer, image[offset..<(offset + length)], "read \(offset)+\(length)")
        }
        let empty = try await source.read(offset: UInt64(size), length: 0)
        XCTAssertEqual(empty.readableBytes, 0)

        // Straight into caller memory.
        var raw = [UInt8](repeating: 0, count: 70_000)
        let target = UnsafeMutableRawBufferPointer.allocate(byteCount: raw.count, alignment: 4096)
        defer { target.deallocate() }
        try await source.read(into: target, offset: 3_000_001)
        raw = Array(target)
        XCTAssertEqual(raw[...], image[3_000_001..<3_070_001])
    }

    func testManyConcurrentReads() async throws {
        let size = 24 * Self.mib
        let (path, image) = try randomImage(size: size)
        let server = try startNbdkit(["file", path])
        let source = try connect(server, connections: 2)
        var rng = SplitMix(state: 42)
        let requests: [(Int, Int)] = (0..<200).map { _ in
            let length = Int.random(in: 1...(256 * 1024), using: &rng)
            let offset = Int.random(in: 0...(size - length), using: &rng)
            return (offset, length)
        }
        let results = try await withDeadline(60, "200 concurrent reads") {
            try await withThrowingTaskGroup(of: (Int, ByteBuffer).self) { group in
                for (i, (offset, length)) in requests.enumerated() {
                    group.addTask { (i, try await source.read(offset: UInt64(offset), length: length)) }
                }
                var out: [(Int, ByteBuffer)] = []
                for try await r in group { out.append(r) }
                return out
            }
        }
        XCTAssertEqual(results.count, 200)
        for (i, buffer) in results {
            let (offset, length) = requests[i]
            assertEqual(buffer, image[offset..<(offset + length)], "concurrent read #\(i) \(offset)+\(length)")
        }
        XCTAssertEqual(source.commandsInFlight, 0)
    }

    func testLargeReadIsSplit() async throws {
        let size = 72 * Self.mib
        let (path, image) = try randomImage(size: size)
        let log = "\(directory)/requests.log"
        let server = try startNbdkit(["--filter=log", "file", path, "logfile=\(log)"])
        let source = try connect(server)
        let offset = 4096 + 17
        let length = 40 * Self.mib + 12_345
        let buffer = try await withDeadline(60, "40 MiB read") {
            try await source.read(offset: UInt64(offset), length: length)
        }
        assertEqual(buffer, image[offset..<(offset + length)], "40 MiB read")
        let whole = try await withDeadline(60, "whole image read") {
            try await source.read(offset: 0, length: size)
        }
        assertEqual(whole, image[...], "whole image")

        // The server saw no request above 32 MiB, and the reads were indeed split.
        let text = try String(contentsOfFile: log, encoding: .utf8)
        var counts: [Int] = []
        for line in text.split(separator: "\n") where line.contains(" Read id=") && !line.contains("...Read") {
            guard let r = line.range(of: "count=0x") else { continue }
            let hex = line[r.upperBound...].prefix { $0.isHexDigit }
            if let n = Int(hex, radix: 16) { counts.append(n) }
        }
        XCTAssertGreaterThanOrEqual(counts.count, 5, "expected the two reads as 2 + 3 requests, log:\n\(text.prefix(2000))")
        XCTAssertLessThanOrEqual(counts.max() ?? 0, 32 * Self.mib)
        XCTAssertEqual(counts.reduce(0, +), length + size)
    }

    func testExtentsOnSparseFile() async throws {
        let mib = UInt64(Self.mib)
        let size = 16 * mib
        let path = "\(directory)/sparse.raw"
        let fd = open(path, O_CREAT | O_RDWR | O_TRUNC, 0o644)
        XCTAssertGreaterThanOrEqual(fd, 0)
        XCTAssertEqual(ftruncate(fd, off_t(size)), 0)
        let regions: [(UInt64, Int)] = [(1 * mib, 64 * 1024), (8 * mib, 128 * 1024), (size - 4096, 4096)]
        for (offset, length) in regions {
            let data = [UInt8](repeating: 0xa5, count: length)
            let n = data.withUnsafeBytes { pwrite(fd, $0.baseAddress, length, off_t(offset)) }
            XCTAssertEqual(n, length)
        }
        XCTAssertEqual(fsync(fd), 0)
        close(fd)

        let server = try startNbdkit(["file", path])
        let source = try connect(server)
        XCTAssertTrue(source.supportsExtents)
        let holeZero: NBDAllocationFlags = [.hole, .zero]
        let all = try await withDeadline(20, "extents") { try await source.extents(offset: 0, length: size) }
        XCTAssertEqual(all, [
            NBDExtent(length: UInt32(1 * mib), flags: holeZero),
            NBDExtent(length: 64 * 1024, flags: []),
            NBDExtent(length: UInt32(7 * mib - 64 * 1024), flags: holeZero),
            NBDExtent(length: 128 * 1024, flags: []),
            NBDExtent(length: UInt32(8 * mib - 128 * 1024 - 4096), flags: holeZero),
            NBDExtent(length: 4096, flags: []),
        ])
        // A sub-range is clamped to exactly what was asked.
        let part = try await withDeadline(20, "extents") {
            try await source.extents(offset: mib + 32 * 1024, length: 7 * mib)
        }
        XCTAssertEqual(part, [
            NBDExtent(length: 32 * 1024, flags: []),
            NBDExtent(length: UInt32(7 * mib - 64 * 1024), flags: holeZero),
            NBDExtent(length: 32 * 1024, flags: []),
        ])
        XCTAssertEqual(part.reduce(UInt64(0)) { $0 + UInt64($1.length) }, 7 * mib)
        let none = try await source.extents(offset: 5, length: 0)
        XCTAssertEqual(none, [])
    }

    func testExtentsWithoutBaseAllocation() async throws {
        // Without structured replies there are no meta contexts, so no base:allocation.
        let server = try startNbdkit(["--no-sr", "memory", "8M"])
        let source = try connect(server)
        XCTAssertFalse(source.supportsExtents)
        let extents = try await source.extents(offset: 4096, length: 8 * 1024 * 1024 - 4096)
        XCTAssertEqual(extents, [NBDExtent(length: 8 * 1024 * 1024 - 4096, flags: [])])
    }

    func testSubmissionRejectedByLibnbdFailsCleanly() async throws {
        // libnbd refuses BLOCK_STATUS synchronously when no meta context was negotiated: the
        // command never goes out, libnbd only calls the free callback, and the request must still
        // fail exactly once with a SourceError while the connection stays usable.
        let server = try startNbdkit(["--no-sr", "memory", "8M"])
        let source = try connect(server, connections: 1)
        for _ in 0..<3 {
            let error = await sourceError("block status without base:allocation") {
                try await source.blockStatus(offset: 0, count: 4096)
            }
            guard case .io? = error else { return XCTFail("expected .io, got \(String(describing: error))") }
        }
        XCTAssertEqual(source.commandsInFlight, 0)
        XCTAssertTrue(source.isConnected)
        let ok = try await source.read(offset: 0, length: 4096)
        XCTAssertEqual(ok.readableBytes, 4096)
    }

    func testOutOfRangeRequestsFail() async throws {
        let server = try startNbdkit(["memory", "1M"])
        let source = try connect(server)
        let size = source.size
        var error = await sourceError("read past the end") { try await source.read(offset: size - 10, length: 20) }
        XCTAssertEqual(error, .outOfRange(offset: size - 10, length: 20, size: size))
        error = await sourceError("read beyond the end") { try await source.read(offset: size + 4096, length: 0) }
        XCTAssertEqual(error, .outOfRange(offset: size + 4096, length: 0, size: size))
        error = await sourceError("read at UInt64.max") { try await source.read(offset: .max, length: 2) }
        XCTAssertEqual(error, .outOfRange(offset: .max, length: 2, size: size))
        error = await sourceError("negative length") { try await source.read(offset: 0, length: -1) }
        guard case .invalidArgument? = error else { return XCTFail("expected invalidArgument, got \(String(describing: error))") }
        error = await sourceError("extents past the end") { try await source.extents(offset: 4096, length: size) }
        XCTAssertEqual(error, .outOfRange(offset: 4096, length: size, size: size))
        // The connections are still fine afterwards.
        let ok = try await source.read(offset: size - 10, length: 10)
        XCTAssertEqual(ok.readableBytes, 10)
        XCTAssertTrue(source.isConnected)
    }

    func testServerErrorIsReportedWithErrno() async throws {
        let server = try startNbdkit(["--filter=error", "memory", "1M", "error-pread=EIO", "error-pread-rate=100%"])
        let source = try connect(server)
        let error = await sourceError("read from a failing server") { try await source.read(offset: 0, length: 4096) }
        guard case .io(let errno, _)? = error else { return XCTFail("expected .io, got \(String(describing: error))") }
        XCTAssertEqual(errno, EIO)
        XCTAssertTrue(source.isConnected, "an I/O error does not kill the connection")
        XCTAssertEqual(source.commandsInFlight, 0)
    }

    func testKillingTheServerFailsPendingAndNewReads() async throws {
        let server = try startNbdkit(["--filter=delay", "memory", "64M", "delay-read=5"])
        let source = try connect(server)
        let pending = Task {
            await withTaskGroup(of: (any Error)?.self) { group in
                for i in 0..<16 {
                    group.addTask {
                        do {
                            _ = try await source.read(offset: UInt64(i) * 65_536, length: 65_536)
                            return nil
                        } catch { return error }
                    }
                }
                var errors: [(any Error)?] = []
                for await e in group { errors.append(e) }
                return errors
            }
        }
        // Let the reads reach the server, then kill it.
        var waited = 0
        while source.commandsInFlight < 16 && waited < 200 {
            try await Task.sleep(nanoseconds: 10_000_000)
            waited += 1
        }
        XCTAssertEqual(source.commandsInFlight, 16, "the reads should be waiting in the delay filter")
        try await Task.sleep(nanoseconds: 200_000_000)
        server.kill(SIGKILL)
        let errors = try await withDeadline(15, "pending reads after the server died") { await pending.value }
        XCTAssertEqual(errors.count, 16)
        for error in errors {
            guard let error = error as? SourceError else {
                XCTFail("pending read: expected SourceError, got \(String(describing: error))")
                continue
            }
            XCTAssertTrue(error.isConnectionFailure, "pending read failed with \(error)")
        }
        // New reads fail too, promptly.
        let error = await sourceError("read after the server died") { try await source.read(offset: 0, length: 4096) }
        XCTAssertTrue(error?.isConnectionFailure ?? false, "\(String(describing: error))")
        var deadline = 0
        while source.isConnected && deadline < 200 {
            try await Task.sleep(nanoseconds: 10_000_000)
            deadline += 1
        }
        XCTAssertFalse(source.isConnected)
        XCTAssertEqual(source.liveConnectionCount, 0)
        XCTAssertEqual(source.commandsInFlight, 0)
        let extentsError = await sourceError("extents after the server died") {
            try await source.extents(offset: 0, length: 4096)
        }
        XCTAssertTrue(extentsError?.isConnectionFailure ?? false, "\(String(describing: extentsError))")
        source.close()
    }

    func testCloseFailsPendingAndLaterRequests() async throws {
        let server = try startNbdkit(["--filter=delay", "memory", "16M", "delay-read=5"])
        let source = try connect(server)
        let pending = Task {
            await withTaskGroup(of: (any Error)?.self) { group in
                for i in 0..<8 {
                    group.addTask {
                        do {
                            _ = try await source.read(offset: UInt64(i) * 4096, length: 4096)
                            return nil
                        } catch { return error }
                    }
                }
                var errors: [(any Error)?] = []
                for await e in group { errors.append(e) }
                return errors
            }
        }
        try await Task.sleep(nanoseconds: 300_000_000)
        let start = Date()
        source.close()
        let errors = try await withDeadline(10, "pending reads after close") { await pending.value }
        XCTAssertLessThan(Date().timeIntervalSince(start), 4, "close waited for the delayed reads")
        for error in errors {
            XCTAssertEqual(error as? SourceError, .closed, "pending read: \(String(describing: error))")
        }
        var error = await sourceError("read after close") { try await source.read(offset: 0, length: 4096) }
        XCTAssertEqual(error, .closed)
        error = await sourceError("extents after close") { try await source.extents(offset: 0, length: 4096) }
        XCTAssertEqual(error, .closed)
        XCTAssertFalse(source.isConnected)
        source.close()  // idempotent
    }

    func testCloseThenReadFailsWithClosed() async throws {
        let server = try startNbdkit(["memory", "1M"])
        let source = try connect(server)
        _ = try await source.read(offset: 0, length: 512)
        source.close()
        let error = await sourceError("read after close") { try await source.read(offset: 0, length: 512) }
        XCTAssertEqual(error, .closed)
        XCTAssertEqual(SourceError.closed.description, "the remote source is closed")
    }

    func testDroppingSourcesDoesNotLeakThreads() throws {
        let server = try startNbdkit(["memory", "1M"])
        func threadCount() -> Int {
            (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task").count) ?? 0
        }
        func connectAndDrop() throws {
            let source = try LibnbdSource.connect(uri: server.uri, connections: 2, logger: logger)
            XCTAssertTrue(source.isConnected)
        }
        try connectAndDrop()  // warm up whatever the runtime starts lazily
        let before = threadCount()
        for _ in 0..<5 { try connectAndDrop() }
        let after = threadCount()
        XCTAssertLessThan(after, before + 3, "threads before \(before), after \(after)")
    }
}

final class ReconnectingSourceTests: XCTestCase {
    /// The connection drops while idle: the next read reconnects, and the (blocking) connect runs on
    /// the thread pool the source was given, not on a process-wide one.
    func testReconnectsRunOnTheInjectedThreadPool() async throws {
        let pool = NIOThreadPool(numberOfThreads: 1)
        pool.start()
        let poolThread = try await pool.runIfActive { UInt(bitPattern: Int(bitPattern: pthread_self())) }
        let connects = NIOLockedValueBox<[UInt]>([])
        let data = fakeImage(pages: 4)
        let first = FakeSource(data: data)
        let source = try ReconnectingSource(timeout: .seconds(30), threadPool: pool, logger: Logger(label: "test")) {
            let isFirst = connects.withLockedValue {
                $0.append(UInt(bitPattern: Int(bitPattern: pthread_self())))
                return $0.count == 1
            }
            return isFirst ? first : FakeSource(data: data)
        }
        first.close()
        let got = try await source.read(offset: 4096, length: 4096)
        XCTAssertEqual(got.bytes, Array(data[4096 ..< 8192]))
        let threads = connects.withLockedValue { $0 }
        XCTAssertEqual(threads.count, 2)
        XCTAssertEqual(threads.last, poolThread, "the reconnect ran on the injected pool")
        source.close()
        try await pool.shutdownGracefully()
    }
}
