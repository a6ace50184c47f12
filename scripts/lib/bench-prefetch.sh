# shellcheck shell=bash
# The prefetch suite of scripts/bench (sourced by it; uses its helpers: log, die, start_lazy, stop_lazy,
# lazy_check_alive, lazy_log_errors, wait_for_file, fio_lat, report_env, report_status).
#
# Source: `nbdkit --filter=delay --filter=rate file F delay-read=1ms rate=1G` (1 ms per read, 1 Gbit/s
# shared by all connections, nbdkit's default 2 s burst) over a sparse 1 GiB image whose odd MiBs are
# holes (half of it zero). Contenders, each started afresh (empty store / overlay) for every run:
#   off      nbd-umemd serve --source SRC --store DIR --prefetch off
#   on       nbd-umemd serve --source SRC --store DIR                    (background pull, adaptive)
#   scan     nbdkit --filter=scan --filter=cow nbd socket=SRC cow-on-read=true cow-on-cache=true
# 1. demand misses: fio 4K random read QD1 over the whole export for RUNTIME s, started as soon as the
#    contender listens (so the background pull, or the scan, runs during it): fio's p50/p99, and for
#    nbd-umemd its own demand-miss p50/p99 (status: only reads that waited for the source).
# 2. time until fully local, no client: nbd-umemd's status turns "complete"; the scan proxy (which
#    only scans while a client is connected, so an idle client stays connected) until the source
#    has served its last read. Compared with the ideal, non-zero bytes / link rate.

PF_RATE_BITS=$((1 << 30))   # nbdkit rate=1G: bits per second

run_prefetch_suite() {
local dir=$WORK/prefetch
mkdir -p "$dir"
PF_DIR=$(mktemp -d /var/tmp/nbd-bench-prefetch.XXXXXX)
LAZY_DIR=$PF_DIR
local img=/dev/shm/nbd-bench-half.$$ results=$dir/results.tsv
: >"$results"
log "prefetch suite: building a sparse $SIZE image, odd MiBs zero"
python3 - "$img" "$SIZE_BYTES" <<'PY'
import os, sys
path, size = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    f.truncate(size)
    for mib in range(0, size >> 20, 2):
        f.seek(mib << 20)
        f.write(os.urandom(1 << 20))
PY
PF_IMG=$img
local nonzero=$(( (SIZE_BYTES >> 20) / 2 * 1048576 + ((SIZE_BYTES >> 20) % 2) * 1048576 ))

local src=$dir/src.sock
start_lazy source "$dir/src.pid" "$dir/src.log" \
    nbdkit -f -U "$src" -P "$dir/src.pid" --filter=log --filter=delay --filter=rate file "$img" \
    delay-read=1ms rate=1G "logfile=$dir/src-requests.log"
local src_pid=$SPAWNED_PID
LAZY_LOG[$src_pid]=$dir/src.log
wait_for_file "$src" 10 || die "socket $src did not appear"

local fio_args=(--rw=randread --bs=4k --iodepth=1 --direct=0 --numjobs=1 "--size=$SIZE_BYTES" --norandommap
    --randrepeat=0 --time_based "--runtime=$RUNTIME" --ramp_time=0 --percentile_list=50:99 --output-format=json)
PF_FIO="fio --name=miss --ioengine=nbd --uri=nbd+unix:///?socket=SOCK ${fio_args[*]}"
local round i kind tag sock pid vals st
local kinds=(off on scan)
log "prefetch suite: $ROUNDS rounds x (3 demand-miss runs of ${RUNTIME}s + 2 time-to-local runs)"
for ((round = 1; round <= ROUNDS; round++)); do
    for ((i = 0; i < 3; i++)); do
        kind=${kinds[$(((i + round - 1) % 3))]}
        tag=miss-$kind-$round
        pf_start "$kind" "$src" "$tag"
        sock=$PF_SOCK pid=$PF_PID
        if ! timeout $((RUNTIME + 60)) fio --name=miss --ioengine=nbd "--uri=nbd+unix:///?socket=$sock" "${fio_args[@]}" \
            "--output=$dir/$tag.json" >"$dir/$tag.err" 2>&1; then
            cat "$dir/$tag.err" >&2 || true
            lazy_check_alive "$pid"
            die "fio failed against $kind (prefetch suite, round $round)"
        fi
        vals=$(fio_lat "$dir/$tag.json") || die "fio result unusable for $kind: $vals"
        st="- - - -"
        if [ "$kind" != scan ]; then
            st=$(pf_status "$dir/$tag/ctl" 'j["miss_latency_p50_us"], j["miss_latency_p99_us"], j["demand_misses"], j["progress"]') \
                || die "status of $kind failed"
        fi
        lazy_check_alive "$src_pid"
        pf_finish "$kind" "$tag"
        printf 'miss\t%s\t%s\t%s\t%s\n' "$kind" "$round" "${vals// /$'\t'}" "${st// /$'\t'}" >>"$results"
        log "  miss $kind round $round: fio p50/p99/ios = $vals; daemon miss p50/p99/misses/progress = $st"
    done
    local order
    if ((round % 2)); then order=(on scan); else order=(scan on); fi
    for kind in "${order[@]}"; do
        tag=local-$kind-$round
        local mark t0 secs
        mark=$(wc -l <"$dir/src-requests.log")
        t0=$(date +%s.%N)
        pf_start "$kind" "$src" "$tag"
        if [ "$kind" = on ]; then
            secs=$(pf_wait_complete "$dir/$tag/ctl" "$t0" 300) || die "nbd-umemd did not become complete within 300 s"
        else
            # The scan only runs while a client is connected: keep an idle one connected.
            /usr/bin/python3 -c 'import nbd, sys, time; h = nbd.NBD(); h.connect_uri(sys.argv[1]); time.sleep(600)' \
                "nbd+unix:///?socket=$PF_SOCK" >/dev/null 2>&1 &
            local idle=$!
            secs=$(pf_wait_source_quiet "$dir/src-requests.log" "$mark" "$t0" "$nonzero" 300) || {
                kill "$idle" 2>/dev/null || true
                die "the scan proxy did not finish within 300 s"
            }
            kill "$idle" 2>/dev/null || true
            wait "$idle" 2>/dev/null || true
        fi
        local got
        got=$(pf_read_bytes "$dir/src-requests.log" "$mark")
        pf_finish "$kind" "$tag"
        printf 'local\t%s\t%s\t%s\t%s\n' "$kind" "$round" "$secs" "$got" >>"$results"
        log "  time to local $kind round $round: ${secs}s, source served $got bytes"
    done
done
lazy_log_errors source "$dir/src.log"
stop_lazy "$src_pid"
rm -f "$img"
PF_IMG=""
rm -rf "$PF_DIR"
LAZY_DIR=""

report_env
export BENCH_ENV_PF_PARAMS BENCH_ENV_PF_CMDS BENCH_ENV_PF_FIO BENCH_ENV_LOGPROBLEMS PF_NONZERO PF_RATE_BITS
BENCH_ENV_PF_PARAMS="rounds=$ROUNDS runtime=${RUNTIME}s size=$SIZE (sparse, every other MiB a hole: $nonzero bytes of random data) in /dev/shm; stores/overlays under /var/tmp (ext4), fresh for every run"
BENCH_ENV_PF_CMDS="source: nbdkit -U SRC --filter=log --filter=delay --filter=rate file F delay-read=1ms rate=1G; off: nbd-umemd serve --source nbd+unix:///?socket=SRC --store DIR --prefetch off --unix SOCK --control CTL; on: the same without --prefetch off (adaptive); scan: TMPDIR=DIR nbdkit -U SOCK --filter=scan --filter=cow nbd socket=SRC cow-on-read=true cow-on-cache=true"
BENCH_ENV_PF_FIO=$PF_FIO
BENCH_ENV_LOGPROBLEMS=$LAZY_LOG_PROBLEMS
PF_NONZERO=$nonzero
local report_rc=0
python3 "$ROOT/scripts/lib/bench-prefetch-report.py" "$results" "$MARKDOWN" "$CHECK" || report_rc=$?
report_status "$report_rc"
}

# pf_start KIND SRC TAG: a fresh contender in $WORK/prefetch/TAG; sets PF_SOCK and PF_PID.
pf_start() {
    local kind=$1 src=$2 tag=$3
    local d=$PF_DIR/$tag
    rm -rf "$d"
    mkdir -p "$d/tmp"
    ln -sfn "$d" "$WORK/prefetch/$tag"
    PF_SOCK=$d/sock
    case $kind in
        off|on)
            local mode=()
            [ "$kind" = off ] && mode=(--prefetch off)
            start_lazy "umemd-$kind" "$d/pid" "$d/log" \
                "$NBD_UMEMD" serve --source "nbd+unix:///?socket=$src" --store "$d/store" "${mode[@]}" \
                --unix "$PF_SOCK" --control "$d/ctl" --pidfile "$d/pid"
            ;;
        scan)
            start_lazy scan "$d/pid" "$d/log" \
                env TMPDIR="$d/tmp" nbdkit -f -U "$PF_SOCK" -P "$d/pid" --filter=scan --filter=cow \
                nbd "socket=$src" cow-on-read=true cow-on-cache=true
            ;;
        *) die "unknown prefetch contender $kind" ;;
    esac
    PF_PID=$SPAWNED_PID
    LAZY_LOG[$PF_PID]=$d/log
    wait_for_file "$PF_SOCK" 20 || die "socket $PF_SOCK did not appear"
}

# pf_finish KIND TAG: stops the contender, checks its log, deletes its store.
pf_finish() {
    local kind=$1 tag=$2
    stop_lazy "$PF_PID"
    lazy_log_errors "$kind" "$PF_DIR/$tag/log"
    rm -rf "${PF_DIR:?}/$tag" "$WORK/prefetch/$tag"
}

# pf_status CTL PYEXPR: evaluates PYEXPR over the daemon's status JSON `j`; prints the values.
pf_status() {
    "$NBD_UMEMD" status --control "$1" | python3 -c '
import json, sys
j = json.load(sys.stdin)
vals = eval(sys.argv[1])
print(" ".join("-" if v is None else str(v) for v in vals))' "$2"
}

# pf_wait_complete CTL T0 LIMIT: polls status until complete; prints the seconds since T0.
pf_wait_complete() {
    local ctl=$1 t0=$2 limit=$3 i
    for ((i = 0; i < limit * 50; i++)); do
        if "$NBD_UMEMD" status --control "$ctl" 2>/dev/null | grep -q '"complete": true'; then
            python3 -c 'import sys, time; print("%.3f" % (time.time() - float(sys.argv[1])))' "$t0"
            return 0
        fi
        sleep 0.02
    done
    return 1
}

# pf_read_bytes LOG MARK: bytes of the Reads the source logged after line MARK.
pf_read_bytes() {
    tail -n +"$(($2 + 1))" "$1" | awk '
        function hex(s,    i, c, v) { v = 0; s = tolower(s); for (i = 3; i <= length(s); i++) { c = index("0123456789abcdef", substr(s, i, 1)) - 1; v = v * 16 + c }; return v }
        / Read / && !/return=/ { for (i = 1; i <= NF; i++) if ($i ~ /^count=0x/) s += hex(substr($i, 7)) }
        END { printf "%d\n", s }'
}

# pf_wait_source_quiet LOG MARK T0 BYTES LIMIT: waits until the source has served at least BYTES of
# reads since line MARK and then logged nothing for 2 s; prints the seconds from T0 to its last
# logged reply.
pf_wait_source_quiet() {
    local log=$1 mark=$2 t0=$3 bytes=$4 limit=$5 i last=-1 n quiet=0
    for ((i = 0; i < limit * 10; i++)); do
        n=$(wc -l <"$log")
        if [ "$n" -eq "$last" ]; then quiet=$((quiet + 1)); else quiet=0; last=$n; fi
        if [ "$quiet" -ge 20 ] && [ "$(pf_read_bytes "$log" "$mark")" -ge "$bytes" ]; then
            # Log lines start with "YYYY-MM-DD HH:MM:SS.ffffff" (local time).
            tail -n 1 "$log" | python3 -c '
import sys, time, datetime
line = sys.stdin.readline()
stamp = datetime.datetime.strptime(" ".join(line.split()[:2]), "%Y-%m-%d %H:%M:%S.%f")
print("%.3f" % (stamp.timestamp() - float(sys.argv[1])))' "$t0"
            return 0
        fi
        sleep 0.1
    done
    return 1
}
