import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// What the daemon does in swap-safe mode (see `SwapSafety`, DESIGN §5) besides setting
/// PR_SET_IO_FLUSHER, which `SwapSafety.enterSwapModeEarly()` does before any thread exists.
enum SwapMode {
    /// Before the storage is opened: keep allocator memory, lock all memory, OOM score -1000.
    static func prepare(logger: Logger) throws(DaemonError) {
        SwapSafety.keepAllocatorMemory()
        do {
            try SwapSafety.lockAllMemory()
        } catch {
            throw DaemonError("\(error)")
        }
        // Without CAP_SYS_RESOURCE (some containers) these two cannot be had: say so loudly, but
        // serve, since the memory is locked.
        if let reason = SwapSafety.ioFlusherError {
            logger.warning("--swap: \(reason): this daemon's own memory allocations may wait for I/O to the device it serves; not safe for swap under memory pressure")
        }
        do {
            try SwapSafety.setOOMScoreAdjust(-1000)
        } catch {
            logger.warning("--swap: cannot set oom_score_adj to -1000 (\(error)); the OOM killer may pick this daemon")
        }
        if let warning = SwapSafety.memoryCgroupWarning() { logger.warning("\(warning)") }
    }

    /// Pre-faults an allocator reserve on every serving thread and checks, with PR_GET_IO_FLUSHER on
    /// those threads and the task flags of all threads, that every thread has the IO_FLUSHER flag.
    /// Each I/O thread is held until all have reported, so each reports once. Blocks: call it off
    /// the event loops and the concurrency pool.
    static func checkThreads(group: MultiThreadedEventLoopGroup, pool: NIOThreadPool, threads: Int,
                             logger: Logger) throws(DaemonError) {
        var loopsFlagged = 0, loops = 0
        for loop in group.makeIterator() {
            loops += 1
            let flagged = (try? loop.submit { () -> Bool in
                SwapSafety.prefaultReserve(bytes: 16 << 20)
                return SwapSafety.ioFlusherOnThisThread()
            }.wait()) ?? false
            if flagged { loopsFlagged += 1 }
        }
        let arrived = NIOLockedValueBox(0)
        // 1 once every I/O thread has arrived
        let allArrived = ConditionLock(value: 0)
        let poolFlagged = NIOLockedValueBox(0)
        let release = ConditionLock(value: 0)
        for _ in 0 ..< threads {
            pool.submit { _ in
                SwapSafety.prefaultReserve(bytes: 1 << 20)
                if SwapSafety.ioFlusherOnThisThread() { poolFlagged.withLockedValue { $0 += 1 } }
                if arrived.withLockedValue({ $0 += 1; return $0 }) == threads {
                    allArrived.lock()
                    allArrived.unlock(withValue: 1)
                }
                // held until every I/O thread has arrived (or the check gave up), so each reports once
                release.lock(whenValue: 1)
                release.unlock()
            }
        }
        // Wait (at most 10 s) until every I/O thread has arrived.
        if allArrived.lock(whenValue: 1, timeoutSeconds: 10) { allArrived.unlock() }
        let poolReported = arrived.withLockedValue { $0 }
        release.lock()
        release.unlock(withValue: 1)
        let poolOK = poolFlagged.withLockedValue { $0 }
        let (total, missing) = SwapSafety.threadsWithoutIOFlusher()
        let locked = (SwapSafety.lockedBytes() ?? 0) >> 20
        let oom = SwapSafety.oomScoreAdjust() ?? 0
        if SwapSafety.ioFlusherError != nil {
            logger.info("swap mode: \(locked) MiB locked; oom_score_adj \(oom); IO_FLUSHER unavailable (see warning)")
            return
        }
        guard loopsFlagged == loops, poolOK == threads, poolReported == threads, missing.isEmpty else {
            throw DaemonError("--swap: PR_SET_IO_FLUSHER is missing on some threads (event loops \(loopsFlagged)/\(loops), "
                + "I/O threads \(poolOK)/\(threads), threads without the flag: \(missing)); refusing to serve swap")
        }
        logger.info("swap mode: PR_GET_IO_FLUSHER = 1 on \(loops) event-loop and \(threads) I/O threads, IO_FLUSHER on all \(total) threads; \(locked) MiB locked; oom_score_adj \(oom)")
    }

    /// The `--swap` fields of the status.
    static func status() -> SwapStatus {
        let (total, missing) = SwapSafety.threadsWithoutIOFlusher()
        return SwapStatus(threads: total, ioFlusher: SwapSafety.ioFlusherError == nil && missing.isEmpty,
                          threadsWithoutIOFlusher: missing.count,
                          memoryLockedBytes: SwapSafety.lockedBytes() ?? 0,
                          oomScoreAdj: SwapSafety.oomScoreAdjust() ?? 0)
    }
}
