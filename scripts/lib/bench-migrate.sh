# shellcheck shell=bash
# The migrate suite of scripts/bench (sourced by it; uses its helpers: log, die, report_env,
# report_status, and MIG_* set from its options).
#
# The same VM (Debian's kernel, a busybox initramfs running `nbd-mmap work`: a working set of half of
# guest RAM that it verifies and rewrites continuously) is live-migrated by scripts/migrate-vm between
# two network namespaces over the same tc tbf-limited veth link, once per round by each of:
#   precopy    QEMU's own precopy (auto-converge on, max-bandwidth 10 GB/s)
#   postcopy   QEMU's postcopy-ram (userfaultfd on the destination), switched to post-copy at once
#   umemd      nbd-umemd: x-ignore-shared, RAM pulled lazily through the destination device
# The order of the three rotates from round to round. Each run's report (migrate-vm's REPORT line) is
# kept; the summary gives the median over the rounds of each figure, umemd/postcopy ratios, and draws
# the guest's workload rate over time (the median round of each mode) into one PNG.

# keep_failed_run DIR NAME: copies a failed run's consoles and logs to /var/tmp (the benchmark's own
# directory is removed at exit) and says where.
keep_failed_run() {
    local keep
    keep=$(mktemp -d "/var/tmp/nbd-bench-migrate-$2.XXXXXX")
    cp -r "$1" "$1.log" "$keep/" 2>/dev/null || true
    log "    the failed run's logs and consoles are kept in $keep"
}

run_migrate_suite() {
    local dir=$WORK/migrate
    mkdir -p "$dir"
    local modes=(precopy postcopy umemd) round i mode out rc
    log "migrate suite: $MIG_ROUNDS rounds x 3 migrations of a ${MIG_MEM} MiB VM over a $MIG_LINK link"
    for ((round = 1; round <= MIG_ROUNDS; round++)); do
        for ((i = 0; i < 3; i++)); do
            mode=${modes[$(((i + round - 1) % 3))]}
            out=$dir/$mode-$round
            log "  round $round: $mode"
            rc=0
            NBD_UMEMD=$NBD_UMEMD timeout 1800 "$ROOT/scripts/migrate-vm" --mode "$mode" --mem "$MIG_MEM" \
                --link-rate "$MIG_LINK" --keep "$MIG_KEEP" --dir "$out" --keep-dir >"$out.log" 2>&1 || rc=$?
            sed -n 's/^REPORT //p' "$out.log" >"$out.json"
            if [ "$rc" -ne 0 ] || [ ! -s "$out.json" ]; then
                tail -n 20 "$out.log" >&2
                # QEMU's own modes may fail (that is a result); nbd-umemd failing ends the benchmark
                [ "$mode" != umemd ] || die "migrate-vm --mode umemd failed (status $rc, round $round)"
                keep_failed_run "$out" "$mode-$round"
                /usr/bin/python3 -c 'import json,sys; print(json.dumps({"status": "failed", "mode": sys.argv[1], "error": sys.argv[2]}))' \
                    "$mode" "$(grep -a 'error' "$out.log" | grep -v 'working directory' | tail -n 1)" >"$out.json"
                log "    FAILED: $(cat "$out.json")"
                continue
            fi
            log "    $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("downtime %s ms, progress on the destination after %s ms, all RAM there after %s ms, %s link bytes, %s errors" % (r["downtime_ms"], r["first_progress_on_destination_ms"], r["all_ram_local_ms"], r["link_bytes"], r["data_errors"]))' "$out.json")"
        done
    done
    report_env
    export BENCH_ENV_PARAMS="rounds=$MIG_ROUNDS mem=${MIG_MEM}MiB work=$((MIG_MEM / 2))MiB link=$MIG_LINK keep=${MIG_KEEP}s"
    export BENCH_ENV_ARGS="scripts/migrate-vm --mode MODE --mem $MIG_MEM --link-rate $MIG_LINK --keep $MIG_KEEP"
    local report_rc=0
    /usr/bin/python3 "$ROOT/scripts/lib/bench-migrate-report.py" "$dir" "$MIG_ROUNDS" "$MARKDOWN" "$CHECK" "$MIG_PLOT" || report_rc=$?
    report_status "$report_rc"
}
