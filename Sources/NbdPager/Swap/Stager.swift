import CLinux
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// Stages a guest RAM file as "already swapped out" onto a swap export (`serve --swap-size`), the
/// sequence measured in swap-mode.md:
///
///  1. open staging on the daemon (it hands out the run's key) and ask it for the source's zero pages;
///  2. create the RAM file on tmpfs and, from a temporary memory cgroup, write a marker into every
///     page that is not zero in the source (zero pages stay holes), then `MADV_PAGEOUT` the mapping:
///     the kernel writes each page to a swap slot, and the daemon decodes slot → source page;
///  3. wait for writeback, then drain the swap cache the pages stay in (cgroup v1
///     `memory.force_empty`, cgroup v2 `memory.reclaim`), and remove the cgroup (a later swap-in would
///     otherwise be charged to it);
///  4. check, before anything maps the file: no staged page is resident (`mincore`), the daemon
///     decoded exactly one marker per staged page with no duplicates; then seal staging.
public struct Stager {
    public var ramFile: String
    public var control: String
    public var export: String?
    /// The swap export's block device: it must be the active swap area with the highest priority.
    public var device: String?
    /// Where progress lines go.
    public var say: (String) -> Void = { _ in }
    /// Limit for writeback and decoding to finish.
    public var timeout: Double = 120

    public init(ramFile: String, control: String, export: String? = nil) {
        self.ramFile = ramFile
        self.control = control
        self.export = export
    }

    /// What staging did, with its time per phase.
    public struct Report: Codable, Sendable {
        public var pages: UInt64 = 0
        public var staged: UInt64 = 0
        public var zeroPages: UInt64 = 0
        public var cgroup = ""
        public var openMs = 0.0, fillMs = 0.0, pageoutMs = 0.0, writebackMs = 0.0, drainMs = 0.0
        public var verifyMs = 0.0, sealMs = 0.0, totalMs = 0.0

        enum CodingKeys: String, CodingKey {
            case pages, staged, zeroPages = "zero_pages", cgroup, openMs = "open_ms", fillMs = "fill_ms"
            case pageoutMs = "pageout_ms", writebackMs = "writeback_ms", drainMs = "drain_ms", verifyMs = "verify_ms"
            case sealMs = "seal_ms", totalMs = "total_ms"
        }
    }

    public struct Failure: Error, CustomStringConvertible {
        public var description: String
        init(_ d: String) { description = d }
    }

    static let madvPageout: Int32 = 21
    static let tmpfsMagic: Int = 0x0102_1994

    public func run() throws -> Report {
        var report = Report()
        let start = Self.now()
        var phase = start
        func lap(_ name: String) -> Double {
            let t = Self.now()
            let ms = ((t - phase) * 10_000).rounded() / 10
            phase = t
            say("\(name): \(ms) ms")
            return ms
        }

        StagingCgroup.removeStale(say: say)
        try Self.refuseZswap()
        try Self.checkSwapAreas(device: device)

        // 1. staging open, zero pages
        let opened = try send(StagingCommand(action: .open, ramFile: ramFile))
        guard let keyHex = opened.key, let key = StagingMarker.Key(hex: keyHex) else {
            throw Failure("the daemon did not hand out a staging key")
        }
        let zeroRuns = try send(StagingCommand(action: .zeroPages)).zeroPages ?? []
        let pageSize = opened.pageSize, pages = opened.sourceSize / pageSize
        report.pages = pages
        var isZero = [Bool](repeating: false, count: Int(pages))
        for run in zeroRuns where run.count == 2 {
            let first = run[0], end = min(run[0] &+ run[1], pages)
            guard first < end else { continue }
            for p in first ..< end { isZero[Int(p)] = true }
        }
        report.zeroPages = UInt64(isZero.lazy.filter { $0 }.count)
        report.staged = pages - report.zeroPages
        report.openMs = lap("open staging, \(report.zeroPages) of \(pages) source pages are zero")

        // 2. the RAM file, filled and pushed out from a temporary cgroup
        let fd = try Self.createRAMFile(ramFile, size: opened.sourceSize)
        defer { _ = Glibc.close(fd) }
        let cgroup = try StagingCgroup.create()
        report.cgroup = cgroup.description
        var cgroupRemoved = false
        StagingInterrupt.arm(cgroup: cgroup, ramFile: ramFile)
        defer {
            StagingInterrupt.disarm()
            if !cgroupRemoved { cgroup.remove() }
        }
        try cgroup.enter()
        let length = Int(opened.sourceSize)
        guard let base = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), base != MAP_FAILED else {
            try? cgroup.leave()
            throw Failure("mmap \(ramFile): \(String(cString: strerror(errno)))")
        }
        var mapped = true
        defer { if mapped { munmap(base, length) } }
        let affinity = CPUAffinity()
        do {
            // Fill and push out on one CPU: see umemd_affinity_pin.
            affinity.pinToCurrent()
            defer { affinity.restore() }
            let raw = UnsafeMutableRawBufferPointer(start: base, count: length)
            for p in 0 ..< Int(pages) where !isZero[p] {
                StagingMarker.encodeHeader(page: UInt64(p), key: key,
                                           into: UnsafeMutableRawBufferPointer(rebasing: raw[p * Int(pageSize) ..< p * Int(pageSize) + 24]))
            }
            report.fillMs = lap("fill \(report.staged) pages with markers")
            guard madvise(base, length, Self.madvPageout) == 0 else {
                throw Failure("madvise(MADV_PAGEOUT) on \(ramFile): \(String(cString: strerror(errno)))")
            }
            report.pageoutMs = lap("MADV_PAGEOUT")
        } catch {
            try? cgroup.leave()
            throw error
        }
        try cgroup.leave()

        // 3. writeback, swap cache drained, cgroup removed
        let deadline = Self.now() + timeout
        var decoded: UInt64 = 0
        var lastProgress = (count: UInt64(0), at: Self.now())
        var retries = 0
        while true {
            decoded = try markersDecoded()
            let writeback = Self.writebackKB()
            if decoded >= report.staged && writeback == 0 { break }
            let t = Self.now()
            if decoded != lastProgress.count || writeback != 0 { lastProgress = (decoded, t) }
            guard t < deadline else {
                throw Failure("the daemon has decoded \(decoded) of \(report.staged) markers after \(Int(timeout)) s (writeback \(writeback) kB)")
            }
            // Nothing in writeback and no marker arriving for 1 s: pages the first pass could not
            // isolate (busy, or in another CPU's batch) are still mapped; push again from every CPU
            // (pages already out are not mapped any more and cost nothing). After that, the pages
            // went somewhere else.
            if t - lastProgress.at >= 1 {
                guard retries < 3 else {
                    throw Failure("the daemon has decoded \(decoded) of \(report.staged) markers and nothing more is being written (writeback \(writeback) kB): pages went to another swap area, or to zswap")
                }
                retries += 1
                say("\(report.staged - decoded) markers missing: MADV_PAGEOUT again on every CPU (\(retries))")
                affinity.onEveryCPU { _ = madvise(base, length, Self.madvPageout) }
                lastProgress = (decoded, Self.now())
            }
            usleep(2000)
        }
        munmap(base, length)
        mapped = false
        report.writebackMs = lap("writeback done, \(decoded) markers decoded")
        try cgroup.drain()
        cgroup.remove()
        cgroupRemoved = true
        report.drainMs = lap("swap cache drained (\(cgroup.drainMethod)), cgroup removed")

        // 4. verify, seal
        let resident = try Self.residentPages(fd: fd, length: Int(opened.sourceSize), pageSize: Int(pageSize), skip: isZero)
        guard resident == 0 else {
            throw Failure("\(resident) staged pages are still resident in \(ramFile) after the drain: staging did not take")
        }
        report.verifyMs = lap("mincore: no staged page resident")
        let sealed = try send(StagingCommand(action: .seal))
        report.sealMs = lap("sealed")
        guard sealed.duplicateMarkers == 0 else {
            throw Failure("the daemon saw \(sealed.duplicateMarkers) duplicate markers (a staged page was swapped in and out again)")
        }
        guard sealed.markersDecoded == report.staged, sealed.stagedSlots == report.staged else {
            throw Failure("the daemon decoded \(sealed.markersDecoded) markers into \(sealed.stagedSlots) slots; \(report.staged) pages were staged")
        }
        report.totalMs = ((Self.now() - start) * 10_000).rounded() / 10
        return report
    }

    // MARK: the daemon

    /// Sends a staging command; a refusal becomes a `Failure`.
    private func send(_ command: StagingCommand) throws -> StagingCommand.Reply {
        let (reply, _) = try ControlClient.send(command, export: export, to: control)
        switch reply {
        case .ok(let r): return r
        case .failure(let m): throw Failure("staging \(command.action.rawValue): \(m)")
        }
    }

    /// The markers the daemon has decoded so far (its status).
    private func markersDecoded() throws -> UInt64 {
        let (reply, _) = try ControlClient.send(StatusCommand(), export: export, to: control)
        switch reply {
        case .failure(let m): throw Failure("status: \(m)")
        case .ok(let status):
            let e = export.flatMap({ status.export($0) }) ?? status.exports.first
            switch e?.field("markers_decoded") {
            case .unsigned(let n)?: return n
            case .int(let n)? where n >= 0: return UInt64(n)
            default: throw Failure("the daemon's status has no markers_decoded: not a swap export (serve --swap-size)?")
            }
        }
    }

    // MARK: system

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    static func refuseZswap() throws {
        let value = (try? String(contentsOfFile: "/sys/module/zswap/parameters/enabled", encoding: .utf8))?
            .trimmingLineSpace()
        if value == "Y" || value == "1" {
            throw Failure("zswap is enabled: it would keep the swapped-out pages in compressed RAM and the daemon would never see the markers; turn it off (echo N > /sys/module/zswap/parameters/enabled)")
        }
    }

    /// Active swap areas (/proc/swaps): path and priority.
    static func activeSwaps() -> [(path: String, priority: Int)] {
        guard let text = try? String(contentsOfFile: "/proc/swaps", encoding: .utf8) else { return [] }
        return text.split(separator: "\n").dropFirst().compactMap { line in
            let f = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard f.count >= 5, let prio = Int(f[4]) else { return nil }
            return (String(f[0]), prio)
        }
    }

    /// The kernel sends swap-outs to the area with the highest priority: the swap export's device
    /// must be that one, alone, or markers land elsewhere and staging cannot succeed.
    static func checkSwapAreas(device: String?) throws {
        let swaps = activeSwaps()
        guard !swaps.isEmpty else { throw Failure("no swap area is active: attach the swap export, mkswap and swapon it first") }
        guard let device else {
            guard swaps.count == 1 else {
                throw Failure("\(swaps.count) swap areas are active (\(swaps.map(\.path).joined(separator: ", "))): give --device with the swap export's device (it must have the highest priority)")
            }
            return
        }
        let real = realpath(device, nil).map { p in defer { free(p) }; return String(cString: p) } ?? device
        guard let mine = swaps.first(where: { $0.path == real || $0.path == device }) else {
            throw Failure("\(device) is not an active swap area (swapon it first)")
        }
        let rivals = swaps.filter { $0.path != mine.path && $0.priority >= mine.priority }
        guard rivals.isEmpty else {
            throw Failure("\(rivals.map { "\($0.path) (priority \($0.priority))" }.joined(separator: ", ")) would take swap-outs too: \(mine.path) (priority \(mine.priority)) must have the highest priority (swapon -p 32767)")
        }
    }

    static func writebackKB() -> Int {
        guard let text = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8) else { return 0 }
        for line in text.split(separator: "\n") where line.hasPrefix("Writeback:") {
            return Int(line.split(separator: " ").dropFirst().first ?? "0") ?? 0
        }
        return 0
    }

    static func createRAMFile(_ path: String, size: UInt64) throws -> Int32 {
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw Failure("create \(path): \(String(cString: strerror(errno)))\(errno == EEXIST ? " (staging needs a new file)" : "")")
        }
        do {
            guard umemd_fs_type(fd) == tmpfsMagic else {
                throw Failure("\(path) is not on tmpfs: staging pushes shared memory pages out to swap (use /dev/shm or another tmpfs)")
            }
            guard ftruncate(fd, off_t(size)) == 0 else {
                throw Failure("ftruncate \(path): \(String(cString: strerror(errno)))")
            }
        } catch {
            _ = Glibc.close(fd)
            unlink(path)
            throw error
        }
        return fd
    }

    /// Staged pages of the file that are resident (mapped without touching, then `mincore`).
    static func residentPages(fd: Int32, length: Int, pageSize: Int, skip: [Bool]) throws -> Int {
        guard let base = mmap(nil, length, PROT_READ, MAP_SHARED, fd, 0), base != MAP_FAILED else {
            throw Failure("mmap for mincore: \(String(cString: strerror(errno)))")
        }
        defer { munmap(base, length) }
        var vec = [UInt8](repeating: 0, count: (length + pageSize - 1) / pageSize)
        guard mincore(base, length, &vec) == 0 else { throw Failure("mincore: \(String(cString: strerror(errno)))") }
        var n = 0
        for (i, v) in vec.enumerated() where v & 1 != 0 && !(i < skip.count && skip[i]) { n += 1 }
        return n
    }
}

/// The calling thread's CPU affinity, saved so it can be pinned and restored.
struct CPUAffinity {
    private var saved = [UInt64](repeating: 0, count: 16)
    private let known: Bool

    init() {
        known = saved.withUnsafeMutableBufferPointer { umemd_affinity_get($0.baseAddress) } == 0
    }

    /// The CPUs the thread may run on.
    var cpus: [UInt32] {
        guard known else { return [] }
        var list: [UInt32] = []
        for c in 0 ..< 1024 {
            let bit: UInt64 = 1 << UInt64(c % 64)
            if saved[c / 64] & bit != 0 { list.append(UInt32(c)) }
        }
        return list
    }

    /// Pins the thread to the CPU it runs on (nothing when the kernel will not say).
    func pinToCurrent() {
        let cpu = umemd_current_cpu()
        guard known, cpu >= 0 else { return }
        _ = umemd_affinity_pin(UInt32(cpu))
    }

    func restore() {
        guard known else { return }
        _ = saved.withUnsafeBufferPointer { umemd_affinity_set($0.baseAddress) }
    }

    /// Runs `body` once pinned to each allowed CPU, then restores the mask.
    func onEveryCPU(_ body: () -> Void) {
        let list = cpus
        guard !list.isEmpty else { body(); return }
        for cpu in list where umemd_affinity_pin(cpu) == 0 { body() }
        restore()
    }
}

/// The temporary memory cgroup staging fills the file from (v1 or v2).
struct StagingCgroup: CustomStringConvertible {
    enum Version { case v1, v2 }
    let version: Version
    let path: String
    /// The cgroup.procs file of the cgroup the stager came from.
    let home: String

    var description: String { "\(version == .v1 ? "v1" : "v2") \(path)" }
    var drainMethod: String { version == .v1 ? "memory.force_empty" : "memory.reclaim" }

    static func create() throws -> StagingCgroup {
        let name = "nbd-umemd-stage-\(getpid())"
        let cgroupLines = (try? String(contentsOfFile: "/proc/self/cgroup", encoding: .utf8))?.split(separator: "\n") ?? []
        let v1Root = "/sys/fs/cgroup/memory"
        if access(v1Root + "/memory.force_empty", F_OK) == 0 || access(v1Root + "/cgroup.procs", F_OK) == 0 {
            let own = cgroupLines.first { $0.split(separator: ":").dropFirst().first?.split(separator: ",").contains("memory") == true }
            let rel = own.map { String($0.split(separator: ":", maxSplits: 2).last ?? "/") } ?? "/"
            let path = v1Root + "/" + name
            try makeDir(path)
            return StagingCgroup(version: .v1, path: path, home: v1Root + (rel == "/" ? "" : rel) + "/cgroup.procs")
        }
        // cgroup v2: the unified hierarchy, at /sys/fs/cgroup or /sys/fs/cgroup/unified.
        for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] where access(root + "/cgroup.controllers", F_OK) == 0 {
            let controllers = (try? String(contentsOfFile: root + "/cgroup.controllers", encoding: .utf8)) ?? ""
            guard controllers.split(whereSeparator: { $0 == " " || $0 == "\n" }).contains("memory") else { continue }
            let own = cgroupLines.first { $0.hasPrefix("0::") }
            let rel = own.map { String($0.dropFirst(3)) } ?? "/"
            // The memory controller must be enabled for children of the root.
            _ = try? write(root + "/cgroup.subtree_control", "+memory")
            let path = root + "/" + name
            try makeDir(path)
            return StagingCgroup(version: .v2, path: path, home: root + (rel == "/" ? "" : rel) + "/cgroup.procs")
        }
        throw Stager.Failure("no memory cgroup controller found (cgroup v1 /sys/fs/cgroup/memory or v2 with the memory controller): staging needs one to drain the swap cache")
    }

    /// Removes the staging cgroups of stagers that are gone (killed before they could clean up).
    static func removeStale(say: (String) -> Void) {
        for root in ["/sys/fs/cgroup/memory", "/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
            guard let dir = opendir(root) else { continue }
            defer { closedir(dir) }
            while let entry = readdir(dir) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                guard name.hasPrefix("nbd-umemd-stage-"), let pid = Int32(name.dropFirst("nbd-umemd-stage-".count)),
                      pid != getpid(), kill(pid, 0) != 0 && errno == ESRCH else { continue }
                if rmdir(root + "/" + name) == 0 { say("removed the staging cgroup \(root)/\(name) of a stager that is gone") }
            }
        }
    }

    static func makeDir(_ path: String) throws {
        guard mkdir(path, 0o755) == 0 || errno == EEXIST else {
            throw Stager.Failure("mkdir \(path): \(String(cString: strerror(errno)))")
        }
    }

    static func write(_ file: String, _ value: String) throws {
        let fd = open(file, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw Stager.Failure("open \(file): \(String(cString: strerror(errno)))") }
        defer { _ = Glibc.close(fd) }
        let bytes = Array(value.utf8)
        let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        guard n == bytes.count else { throw Stager.Failure("write \(value) to \(file): \(String(cString: strerror(errno)))") }
    }

    /// Moves the whole process in (later page allocations are charged here).
    func enter() throws { try Self.write(path + "/cgroup.procs", "\(getpid())") }
    func leave() throws { try Self.write(home, "\(getpid())") }

    /// Drops the swap-cache copies of the pushed-out pages (no I/O: they are clean).
    func drain() throws {
        switch version {
        case .v1:
            try Self.write(path + "/memory.force_empty", "0")
        case .v2:
            // memory.reclaim says EAGAIN when it could not reclaim the whole amount: ask for what is left.
            for _ in 0 ..< 10 {
                let current = (try? String(contentsOfFile: path + "/memory.current", encoding: .utf8))
                    .flatMap { UInt64($0.trimmingLineSpace()) } ?? 0
                if current == 0 { return }
                _ = try? Self.write(path + "/memory.reclaim", "\(current)")
            }
        }
    }

    /// Removes the cgroup (retrying while the kernel still counts it busy).
    func remove() {
        for _ in 0 ..< 100 {
            if rmdir(path) == 0 || errno == ENOENT { return }
            usleep(10_000)
        }
    }
}

/// SIGTERM/SIGINT while staging: leave the cgroup, remove it and the RAM file, then die of the
/// signal (the handler only calls async-signal-safe functions on strings prepared beforehand).
enum StagingInterrupt {
    nonisolated(unsafe) static var home: UnsafeMutablePointer<CChar>?
    nonisolated(unsafe) static var pidLine: UnsafeMutablePointer<CChar>?
    nonisolated(unsafe) static var cgroup: UnsafeMutablePointer<CChar>?
    nonisolated(unsafe) static var ram: UnsafeMutablePointer<CChar>?

    static func arm(cgroup c: StagingCgroup, ramFile: String) {
        home = strdup(c.home)
        pidLine = strdup("\(getpid())")
        cgroup = strdup(c.path)
        ram = strdup(ramFile)
        let handler: @convention(c) (Int32) -> Void = { sig in
            if let home = StagingInterrupt.home, let line = StagingInterrupt.pidLine {
                let fd = open(home, O_WRONLY)
                if fd >= 0 { _ = write(fd, line, strlen(line)); _ = close(fd) }
            }
            if let c = StagingInterrupt.cgroup { for _ in 0 ..< 50 { if rmdir(c) == 0 { break }; usleep(10_000) } }
            if let r = StagingInterrupt.ram { unlink(r) }
            signal(sig, SIG_DFL)
            raise(sig)
        }
        signal(SIGTERM, handler)
        signal(SIGINT, handler)
    }

    static func disarm() {
        signal(SIGTERM, SIG_DFL)
        signal(SIGINT, SIG_DFL)
    }
}

extension String {
    /// Without leading and trailing spaces, tabs and newlines (a sysfs value).
    fileprivate func trimmingLineSpace() -> String {
        var s = Substring(self)
        while let c = s.first, c == " " || c == "\t" || c == "\n" { s.removeFirst() }
        while let c = s.last, c == " " || c == "\t" || c == "\n" { s.removeLast() }
        return String(s)
    }
}
