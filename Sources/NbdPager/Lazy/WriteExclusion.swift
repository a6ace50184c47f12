#if canImport(Glibc)
import Glibc
#endif

/// Keeps client modifications and stores of pulled data off each other's pages (DESIGN §3: a pull
/// never overwrites a client's write).
///
/// - A store of pulled data takes, atomically with checking that they are still absent, only pages no
///   client is writing and no other store holds (`beginStore`); it skips the rest.
/// - A client modification waits (on a condition variable, never spinning) until no store holds any of
///   its pages, then registers (`beginWrite`); the pages are marked local before `endWrite`.
/// - A reader that finds a page still absent because a writer held it waits for that writer
///   (`waitForWriters`).
///
/// Ranges, not pages, so that a multi-GiB TRIM costs one entry. Lock order: this lock → the page
/// store's map lock (`absentRuns` is called with it held); never the pull engine's lock.
final class WriteExclusion: @unchecked Sendable {
    private let condition = Condition()
    /// Page ranges clients are writing now (one entry per writer).
    private var writing: [Range<UInt64>] = []
    /// Page ranges being stored from pulled data (or the zero-map import) now.
    private var storing: [Range<UInt64>] = []
    /// Writers waiting for a store to end right now (tests watch it).
    private var blockedWriters = 0
    /// How long a writer or reader waits before failing with EIO (a store or a write that never ends).
    let timeout: Duration

    init(timeout: Duration = .seconds(60)) {
        self.timeout = timeout
    }

    private func isBusy(_ page: UInt64) -> Bool {
        writing.contains { $0.contains(page) } || storing.contains { $0.contains(page) }
    }

    /// Claims, among the pages `absentRuns(pages)` reports (called under the lock), those that no writer
    /// and no other store holds. The caller stores into exactly the returned runs, then calls `endStore`.
    func beginStore(_ pages: Range<UInt64>, absentRuns: (Range<UInt64>) -> [Range<UInt64>]) -> [Range<UInt64>] {
        condition.withLock {
            var runs: [Range<UInt64>] = []
            for run in absentRuns(pages) {
                var start: UInt64? = nil
                for page in run {
                    if !isBusy(page) {
                        if start == nil { start = page }
                    } else if let s = start {
                        runs.append(s ..< page)
                        start = nil
                    }
                }
                if let s = start { runs.append(s ..< run.upperBound) }
            }
            storing.append(contentsOf: runs)
            return runs
        }
    }

    func endStore(_ runs: [Range<UInt64>]) {
        guard !runs.isEmpty else { return }
        condition.withLock {
            for run in runs {
                if let i = storing.firstIndex(of: run) { storing.remove(at: i) }
            }
        }
        condition.broadcast()
    }

    /// Waits until no store holds any page of `pages`, then registers the write.
    func beginWrite(_ pages: Range<UInt64>) throws {
        let deadline = Condition.deadline(after: timeout)
        try condition.withLock {
            while storing.contains(where: { $0.overlaps(pages) }) {
                blockedWriters += 1
                defer { blockedWriters -= 1 }
                guard condition.wait(until: deadline) else {
                    throw BackendError.system(SystemError("pages \(pages) stayed busy", errno: EIO))
                }
            }
            writing.append(pages)
        }
    }

    func endWrite(_ pages: Range<UInt64>) {
        condition.withLock {
            if let i = writing.firstIndex(of: pages) { writing.remove(at: i) }
        }
        condition.broadcast()
    }

    /// Whether a writer holds part of `runs`; if so waits until none does and returns true.
    func waitForWriters(_ runs: [Range<UInt64>]) throws -> Bool {
        let deadline = Condition.deadline(after: timeout)
        return try condition.withLock {
            var waited = false
            while runs.contains(where: { r in writing.contains { $0.overlaps(r) } }) {
                waited = true
                guard condition.wait(until: deadline) else {
                    throw BackendError.system(SystemError("pages \(runs) stayed busy", errno: EIO))
                }
            }
            return waited
        }
    }

    /// Pages in use and writers waiting right now, for tests.
    var busy: (writing: [Range<UInt64>], storing: [Range<UInt64>], blockedWriters: Int) {
        condition.withLock { (writing, storing, blockedWriters) }
    }
}

/// A mutex with one condition variable (pthread, CLOCK_MONOTONIC deadlines).
final class Condition: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let cond: UnsafeMutablePointer<pthread_cond_t>

    init() {
        mutex = .allocate(capacity: 1)
        cond = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        cond.deallocate()
        mutex.deallocate()
    }

    func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// With the lock held: waits for a broadcast or the deadline; false once the deadline has passed.
    func wait(until deadline: timespec) -> Bool {
        var d = deadline
        return pthread_cond_timedwait(cond, mutex, &d) != ETIMEDOUT
    }

    func broadcast() {
        pthread_mutex_lock(mutex)
        pthread_cond_broadcast(cond)
        pthread_mutex_unlock(mutex)
    }

    static func deadline(after duration: Duration) -> timespec {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        let (seconds, attoseconds) = duration.components
        var nanos = Int(now.tv_nsec) + Int(attoseconds / 1_000_000_000)
        var secs = Int(now.tv_sec) + Int(seconds)
        if nanos >= 1_000_000_000 { secs += 1; nanos -= 1_000_000_000 }
        return timespec(tv_sec: secs, tv_nsec: nanos)
    }
}
