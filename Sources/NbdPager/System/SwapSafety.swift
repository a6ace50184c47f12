import CLinux
#if canImport(Glibc)
import Glibc
#endif

/// What `serve --swap` does so that the daemon can serve a swap device (or file-backed RAM) without
/// ever needing memory reclaim to make progress: the kernel may be reclaiming memory *because* it
/// waits for this daemon to answer a swap-out WRITE or a page-in READ.
///
/// - `PR_SET_IO_FLUSHER` on every thread: allocations made by the daemon do not recurse into
///   filesystem or block I/O, and the daemon is not throttled as a dirtier of its own device. The
///   flag is per thread and inherited by new threads, so it is set on the main thread before any
///   other thread exists (see `enterSwapModeEarly`).
/// - `mlockall(MCL_CURRENT | MCL_FUTURE)`: no page of the daemon (code, heap, stacks, a `--memory`
///   export's RAM) can be swapped out, least of all to the device it serves.
/// - `oom_score_adj = -1000`: the OOM killer never picks the daemon.
/// - An allocator reserve: freed memory is never returned to the kernel and each serving thread
///   pre-faults a reserve, so request buffers come from memory that is already resident and locked.
public enum SwapSafety {
    /// Task flags in /proc/PID/task/TID/stat (field 9) that PR_SET_IO_FLUSHER sets.
    static let pfMemallocNoIO: UInt64 = 0x0008_0000
    static let pfLocalThrottle: UInt64 = 0x0010_0000

    /// Environment variable set on the re-exec'd process, so that it never loops.
    public static let reexecMarker = "NBD_UMEMD_SWAP_REEXEC"

    /// Why PR_SET_IO_FLUSHER could not be set, when `enterSwapModeEarly` failed. Written once on the
    /// main thread before any other thread exists, read-only afterwards.
    public nonisolated(unsafe) static var ioFlusherError: String?

    /// Call first thing in `main`, when the command line asks for swap mode. Sets PR_SET_IO_FLUSHER
    /// on the main thread; if the runtime has already started other threads (which would not inherit
    /// it), re-executes the program so that every thread descends from a flagged main thread.
    /// When the flag cannot be set (it needs CAP_SYS_RESOURCE), records why in `ioFlusherError`.
    public static func enterSwapModeEarly() {
        // Locked thread stacks are resident: 2 MiB each instead of RLIMIT_STACK's usual 8 MiB.
        var attr = pthread_attr_t()
        if pthread_attr_init(&attr) == 0 {
            if pthread_attr_setstacksize(&attr, 2 << 20) == 0 { _ = pthread_setattr_default_np(&attr) }
            pthread_attr_destroy(&attr)
        }
        // Each malloc arena beyond the main one reserves 64 MiB of address space (PROT_NONE until
        // used), and mlockall counts every reservation as locked: with glibc's default of eight
        // arenas per CPU, `serve --memory 1G --swap` showed 2.06 GiB VmLck for 1.17 GiB resident,
        // all of the difference such reservations, and all of it charged to RLIMIT_MEMLOCK. The
        // daemon's threads are few and mostly idle: two arenas are plenty.
        _ = mallopt(Int32(UMEMD_M_ARENA_MAX), 2)
        guard umemd_prctl(Int32(UMEMD_PR_SET_IO_FLUSHER), 1) == 0 else {
            let e = errno
            ioFlusherError = "prctl(PR_SET_IO_FLUSHER) failed: \(String(cString: strerror(e)))"
                + (e == EPERM ? " (needs CAP_SYS_RESOURCE)" : "")
            return
        }
        if threadIDs().count > 1 && getenv(reexecMarker) == nil {
            setenv(reexecMarker, "1", 1)
            var argv: [UnsafeMutablePointer<CChar>?] = CommandLine.arguments.map { strdup($0) }
            argv.append(nil)
            execv("/proc/self/exe", argv)
            // execv only returns on failure; the caller's later check reports the unflagged threads.
        }
        unsetenv(reexecMarker)
    }

    /// Whether PR_GET_IO_FLUSHER reports the flag on the calling thread.
    public static func ioFlusherOnThisThread() -> Bool {
        umemd_prctl(Int32(UMEMD_PR_GET_IO_FLUSHER), 0) == 1
    }

    /// The ids of the process's threads.
    public static func threadIDs() -> [Int32] {
        guard let dir = opendir("/proc/self/task") else { return [] }
        defer { closedir(dir) }
        var ids: [Int32] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if let id = Int32(name) { ids.append(id) }
        }
        return ids
    }

    /// Every thread of the process, and those whose task flags lack the IO_FLUSHER bits.
    public static func threadsWithoutIOFlusher() -> (total: Int, missing: [Int32]) {
        let ids = threadIDs()
        let missing = ids.filter { tid in
            guard let flags = taskFlags(tid) else { return false }  // the thread has exited
            return flags & (pfMemallocNoIO | pfLocalThrottle) != (pfMemallocNoIO | pfLocalThrottle)
        }
        return (ids.count, missing)
    }

    /// Field 9 (flags) of /proc/self/task/TID/stat; the command name (field 2) may hold spaces and
    /// parentheses, so fields are counted after its closing parenthesis.
    static func taskFlags(_ tid: Int32) -> UInt64? {
        guard let stat = Sys.readText("/proc/self/task/\(tid)/stat"),
              let close = stat.lastIndex(of: ")") else { return nil }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        // fields[0] is field 3 (state), so field 9 is fields[6]
        guard fields.count > 6 else { return nil }
        return UInt64(fields[6])
    }

    /// mlockall(MCL_CURRENT | MCL_FUTURE).
    public static func lockAllMemory() throws {
        guard mlockall(Int32(UMEMD_MCL_CURRENT | UMEMD_MCL_FUTURE)) == 0 else {
            let e = errno
            throw SystemError("--swap: mlockall" + (e == ENOMEM || e == EPERM
                ? " (RLIMIT_MEMLOCK is too low: run as root or raise `ulimit -l`)" : ""), errno: e)
        }
    }

    /// Writes /proc/self/oom_score_adj.
    public static func setOOMScoreAdjust(_ value: Int) throws {
        let fd = try Sys.open("/proc/self/oom_score_adj", flags: O_WRONLY, operation: "--swap: open /proc/self/oom_score_adj")
        defer { _ = Glibc.close(fd) }
        try Sys.writeAll(fd, Array("\(value)\n".utf8), what: "--swap: /proc/self/oom_score_adj")
    }

    /// Current /proc/self/oom_score_adj, or nil.
    public static func oomScoreAdjust() -> Int? {
        Sys.readText("/proc/self/oom_score_adj").flatMap { Int($0.split(separator: "\n").first ?? "") }
    }

    /// VmLck of /proc/self/status in bytes, or nil.
    public static func lockedBytes() -> UInt64? {
        guard let status = Sys.readText("/proc/self/status") else { return nil }
        for line in status.split(separator: "\n") where line.hasPrefix("VmLck:") {
            let kb = line.dropFirst(6).split(whereSeparator: { $0 == " " || $0 == "\t" }).first.flatMap { UInt64($0) }
            return kb.map { $0 * 1024 }
        }
        return nil
    }

    /// Makes the allocator keep what it has: buffers up to 32 MiB come from the heap (not fresh
    /// mmaps) and freed memory is never trimmed back to the kernel.
    public static func keepAllocatorMemory() {
        _ = mallopt(Int32(UMEMD_M_MMAP_THRESHOLD), 32 << 20)
        _ = mallopt(Int32(UMEMD_M_TRIM_THRESHOLD), Int32.max)
    }

    /// Allocates, touches and frees `bytes` in request-sized pieces on the calling thread, so the
    /// thread's malloc arena holds that much resident (and, after mlockall, locked) free memory.
    public static func prefaultReserve(bytes: Int, piece: Int = 1 << 20) {
        var pieces: [UnsafeMutableRawPointer] = []
        var left = bytes
        while left > 0 {
            guard let p = malloc(piece) else { break }
            memset(p, 0, piece)
            pieces.append(p)
            left -= piece
        }
        pieces.forEach { free($0) }
    }

    /// A warning when the daemon runs inside a memory cgroup with a limit: a workload that swaps to
    /// this daemon from the same cgroup would wait, in its reclaim, for a daemon that is itself
    /// short of memory. nil when the daemon's memory cgroup has no limit.
    public static func memoryCgroupWarning() -> String? {
        guard let text = Sys.readText("/proc/self/cgroup") else { return nil }
        return memoryCgroupWarning(cgroups: text, readFile: Sys.readText)
    }

    /// `memoryCgroupWarning` for a /proc/PID/cgroup text, reading cgroup files through `readFile`.
    static func memoryCgroupWarning(cgroups text: String, readFile: (String) -> String?) -> String? {
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard parts.count == 3 else { continue }
            let path = String(parts[2])
            guard path != "/" else { continue }
            var limit: UInt64? = nil
            if parts[1].split(separator: ",").contains("memory") {  // cgroup v1
                let raw = readFile("/sys/fs/cgroup/memory\(path)/memory.limit_in_bytes")
                limit = raw.flatMap { UInt64($0.split(separator: "\n").first ?? "") }
                if let l = limit, l >= 1 << 62 { limit = nil }  // "unlimited" is a page-rounded 2^63-1
            } else if parts[1].isEmpty {  // cgroup v2 (mounted at /sys/fs/cgroup or .../unified)
                for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
                    if let raw = readFile("\(root)\(path)/memory.max") {
                        limit = UInt64(raw.split(separator: "\n").first ?? "")  // "max" gives nil
                        break
                    }
                }
            }
            if let limit {
                return "--swap: this daemon runs inside memory cgroup \(path) limited to \(limit >> 20) MiB; "
                    + "if the workload that swaps to this export runs in the same cgroup, its reclaim waits on "
                    + "a daemon that is short of memory itself. Run the daemon outside that cgroup."
            }
        }
        return nil
    }
}
