import Logging
#if canImport(Glibc)
import Glibc
#endif

// A lazy export served as a swap device whose slots map to source pages (`LazyExport.swapSize`):
// opening its store and slot table, the `staging` command, the late-page copy at gate open and its
// status fields. The pieces themselves live in Swap/ (`SwapSlots`, `SwapSlotsBackend`,
// `StagingMarker`, `LatePages`).

extension LazyExport {
    /// A swap export's demand-miss window while the background pull runs: 32 KiB, the kernel's
    /// default swap read-ahead cluster (vm.page-cluster 3). A swap-in asks for one slot; the slots
    /// around it, staged in a row, stand for neighbouring source pages. Measured in swap-mode
    /// migrations at 200 Mbit/s: 1,367 demand misses instead of 2,093 (a page each), 3,943 packets on
    /// the link instead of 6,764, guest page-ops/s during post-copy 10.1k instead of 5.1k.
    static let swapMissWindow: UInt64 = 32 << 10

    /// Opens (or creates) the page store of a swap export (one page per slot) and its slot table.
    func openSwapStore(size: UInt64, source: any RemoteSource) throws -> (PageStore, SwapSlots) {
        let pageSize = PageGeometry.defaultPageSize
        guard size % pageSize == 0 else {
            throw PageStoreError.invalidArgument("--swap-size must be a multiple of \(pageSize) bytes, got \(size)")
        }
        guard size >= source.size + pageSize else {
            throw PageStoreError.invalidArgument(
                "--swap-size \(size) is too small for the source's \(source.size) bytes: it needs at least one more page (the swap header), and headroom")
        }
        let pages = try PageStore.open(directory: store, size: size, pageSize: pageSize,
                                       identity: self.source + " (swap slots)", reset: resetStore)
        do {
            // (after the store's lock is held: a store in use by another daemon is left alone)
            if resetStore, unlink(store + "/slots") != 0, errno != ENOENT {
                throw SystemError("remove \(store)/slots", errno: errno)
            }
            let slots = try SwapSlots(directory: store, slotCount: pages.pageCount, sourceSize: source.size, pageSize: pageSize)
            return (pages, slots)
        } catch {
            try? pages.close()
            throw error
        }
    }

    /// Brings a swap store's page states and slot table into agreement: a slot the kernel wrote after
    /// sealing (local) maps to nothing; a slot no marker maps is zero (a present hole), never pulled.
    static func settleSwapStore(_ lazy: LazyBackend, slots: SwapSlots, logger: Logger) throws {
        let store = lazy.store
        for run in store.runs(of: .local, in: 0 ..< store.pageCount) { slots.unmap(run) }
        var unmapped: [Range<UInt64>] = []
        for run in store.runs(of: .absent, in: 0 ..< store.pageCount) {
            var start: UInt64? = nil
            for slot in run {
                let free = slots.page(ofSlot: slot) == nil
                if free, start == nil { start = slot }
                if !free, let s = start { unmapped.append(s ..< slot); start = nil }
            }
            if let s = start { unmapped.append(s ..< run.upperBound) }
        }
        for run in unmapped { _ = try lazy.lazyStore.markZero(run) }
        let c = slots.counts()
        logger.info("swap export: \(store.pageCount) slots, staging \(c.staging.rawValue), \(c.mapped) mapped to source pages")
    }
}

extension LazyOpenedExport {
    /// The `staging` command of a swap export.
    func staging(_ command: StagingCommand) throws -> StagingCommand.Reply {
        guard let slots else { throw ControlError("not a swap export (serve --swap-size): there is no staging") }
        let sourceSize = lazy.source.size, pageSize = lazy.geometry.pageSize
        func reply(key: String? = nil, zero: [[UInt64]]? = nil) -> StagingCommand.Reply {
            .init(staging: slots.stagingState.rawValue, key: key, sourceSize: sourceSize, pageSize: pageSize,
                  slots: slots.slotCount, zeroPages: zero, counts: slots.counts())
        }
        switch command.action {
        case .open:
            if let path = command.ramFile, path.utf8.count > SwapSlots.maxPathBytes {
                throw ControlError("ram_file is longer than \(SwapSlots.maxPathBytes) bytes")
            }
            let (key, dropped) = try slots.open(ramFile: command.ramFile)
            for run in dropped { _ = try lazy.lazyStore.markZero(run) }
            let droppedCount = dropped.reduce(0) { $0 + $1.count }
            logger.info("staging open\(command.ramFile.map { " for \($0)" } ?? "")\(droppedCount > 0 ? "; \(droppedCount) slots of an earlier unsealed run dropped" : "")")
            return reply(key: key.hex)
        case .zeroPages:
            let source = lazy.source
            let runs = try waitForAsync { try await SourceZeroPages.query(source, pageSize: pageSize) }
            return reply(zero: runs.map { [$0.lowerBound, UInt64($0.count)] })
        case .seal:
            let c = try slots.seal()
            try lazy.commit()
            logger.info("staging sealed: \(c.mapped) slots map to source pages (\(c.markersDecoded) markers decoded, \(c.duplicates) duplicates, \(c.invalidMarkers) invalid)")
            lazy.armCompletion()
            startBackground()
            return reply()
        }
    }

    /// Copies the late pages into the staged RAM file (gate open of a swap export).
    func copyLatePages() throws -> UInt64 {
        guard let slots, slots.stagingState == .sealed else { return 0 }
        let source = lazy.source, pageSize = lazy.geometry.pageSize
        let started = ContinuousClock.now
        let copied = try waitForAsync { try await LatePages.copy(slots: slots, source: source, pageSize: pageSize) }
        latePages = copied
        // Once only: the destination runs on the file after this switch-over. Pages copied make the
        // forgetting durable before the reply (a gate opened again after a restart must not copy
        // source pages over what the running guest wrote since). With none copied the check is
        // idempotent (the stopped source still reports the same pages zero, so a second check
        // writes nothing) and the commit happens after the reply, out of the switch-over.
        slots.forgetRAMFile()
        if copied > 0 { try lazy.commit() } else { lazy.commitInBackground() }
        logger.info("late-page check: \(copied) source pages that were zero at staging no longer are (copied into the RAM file); \(ContinuousClock.now - started)")
        return copied
    }

    func swapStatusFields() -> [(String, JSONValue)] {
        guard let slots else { return [] }
        let c = slots.counts()
        return [
            ("swap_slots", .bool(true)),
            ("staging", .string(c.staging.rawValue)),
            ("staging_key", slots.openKey.map { .string($0.hex) } ?? .null),
            ("staged_slots", .unsigned(c.stagedAtSeal)),
            ("markers_decoded", .unsigned(c.markersDecoded)),
            ("duplicate_markers", .unsigned(c.duplicates)),
            ("invalid_markers", .unsigned(c.invalidMarkers)),
            ("mapped_slots", .unsigned(c.mapped)),
            ("late_pages", .unsigned(latePages)),
        ]
    }
}
