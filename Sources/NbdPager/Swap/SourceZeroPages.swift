import NIOConcurrencyHelpers
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// What staging needs to know of the source's zero pages, from its base:allocation map.
enum SourceZeroPages {
    /// Runs of whole source pages the source reports as zero (empty when it cannot say).
    static func query(_ source: any RemoteSource, pageSize: UInt64, chunk: UInt64 = 1 << 30) async throws -> [Range<UInt64>] {
        guard source.supportsExtents else { return [] }
        let size = source.size - source.size % pageSize
        var runs: [Range<UInt64>] = []
        var offset: UInt64 = 0
        while offset < size {
            let length = min(chunk, size - offset)
            var pos = offset
            for extent in try await source.extents(offset: offset, length: length) {
                let end = min(pos + UInt64(extent.length), offset + length)
                if extent.flags.contains(.zero) {
                    let first = (pos + pageSize - 1) / pageSize, last = end / pageSize
                    if first < last {
                        if let l = runs.last, l.upperBound == first {
                            runs[runs.count - 1] = l.lowerBound ..< last
                        } else {
                            runs.append(first ..< last)
                        }
                    }
                }
                pos = end
                if pos >= offset + length { break }
            }
            offset += length
        }
        return runs
    }

    /// Runs of whole zero pages inside `pages` (sorted page runs), asked about all at once (one query
    /// per run, sent together: one round trip, and the source only looks at these ranges).
    static func query(_ source: any RemoteSource, within pages: [Range<UInt64>], pageSize: UInt64) async throws -> [Range<UInt64>] {
        guard source.supportsExtents else { return [] }
        let limit = source.size / pageSize
        let found = try await withThrowingTaskGroup(of: [Range<UInt64>].self) { group in
            for run in pages where run.lowerBound < limit {
                let run = run.lowerBound ..< min(run.upperBound, limit)
                group.addTask {
                    var out: [Range<UInt64>] = []
                    var pos = run.lowerBound * pageSize
                    let end = run.upperBound * pageSize
                    while pos < end {
                        let extents = try await source.extents(offset: pos, length: min(end - pos, 1 << 30))
                        guard !extents.isEmpty else { break }
                        for extent in extents where pos < end {
                            let stop = min(pos + UInt64(extent.length), end)
                            if extent.flags.contains(.zero) {
                                let first = (pos + pageSize - 1) / pageSize, last = stop / pageSize
                                if first < last { out.append(first ..< last) }
                            }
                            pos = stop
                        }
                    }
                    return out
                }
            }
            var all: [Range<UInt64>] = []
            for try await part in group { all += part }
            return all
        }
        return found.sorted { $0.lowerBound < $1.lowerBound }
    }

    /// `pages` minus `zero` (both sorted runs).
    static func subtract(_ pages: [Range<UInt64>], _ zero: [Range<UInt64>]) -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        var z = 0
        for run in pages {
            var start = run.lowerBound
            while z < zero.count && zero[z].upperBound <= start { z += 1 }
            var k = z
            while start < run.upperBound {
                guard k < zero.count, zero[k].lowerBound < run.upperBound else {
                    out.append(start ..< run.upperBound)
                    break
                }
                if zero[k].lowerBound > start { out.append(start ..< zero[k].lowerBound) }
                start = max(start, zero[k].upperBound)
                k += 1
            }
        }
        return out
    }
}

/// The copy gate opening makes in swap mode: source pages staging left as holes in the RAM file
/// (zero when it asked) that the source VM wrote afterwards, copied into the RAM file while the
/// source is stopped and before the destination runs (the kernel never asks the swap device about a
/// hole, so nothing else would bring them).
enum LatePages {
    /// Returns the number of pages copied.
    static func copy(slots: SwapSlots, source: any RemoteSource, pageSize: UInt64) async throws -> UInt64 {
        guard let ramFile = slots.stagedRAMFile else { return 0 }
        let unstaged = slots.unstagedPages()
        guard !unstaged.isEmpty else { return 0 }
        // A few runs (the usual case: the guest's untouched memory): ask about them only.
        let zero = unstaged.count <= 1024
            ? try await SourceZeroPages.query(source, within: unstaged, pageSize: pageSize)
            : try await SourceZeroPages.query(source, pageSize: pageSize)
        let late = SourceZeroPages.subtract(unstaged, zero)
        guard !late.isEmpty else { return 0 }
        let fd = try Sys.open(ramFile, flags: O_WRONLY, operation: "open the staged RAM file \(ramFile)")
        defer { _ = Glibc.close(fd) }
        let maxPages: UInt64 = (4 << 20) / pageSize
        var copied: UInt64 = 0
        for run in late {
            var p = run.lowerBound
            while p < run.upperBound {
                let n = min(maxPages, run.upperBound - p)
                let data = try await source.read(offset: p * pageSize, length: Int(n * pageSize))
                try data.withUnsafeReadableBytes { try Sys.pwriteAll(fd, $0, offset: p * pageSize, what: ramFile) }
                p += n
                copied += n
            }
        }
        return copied
    }
}

/// Runs `body` on the concurrency pool and waits for it (for control commands, which run on a thread
/// pool thread, never on an event loop or in the concurrency pool).
func waitForAsync<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) throws -> T {
    let done = ConditionLock(value: 0)
    let box = NIOLockedValueBox<Result<T, any Error>?>(nil)
    Task {
        let result: Result<T, any Error>
        do { result = .success(try await body()) } catch { result = .failure(error) }
        box.withLockedValue { $0 = result }
        done.lock()
        done.unlock(withValue: 1)
    }
    done.lock(whenValue: 1)
    done.unlock()
    guard let result = box.withLockedValue({ $0 }) else { throw ControlError("no result") }
    return try result.get()
}
