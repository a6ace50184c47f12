#!/bin/bash
# --max-rate caps the background pull: over a 256 MiB random image with --max-rate 20M and no client,
# the background_bytes of `status` sampled at t~1 s and t~6 s (the rate taken over the real time
# between the two samples, measured here) must be within 10% of 20 MiB/s; the export must not be
# complete by then (at full speed it would be: the cap really held); and the bytes the source log
# shows read over the same interval must agree with the status counter (same rate, within 4 MiB, the
# batches in flight at the two sampling instants). Status reports max_rate_bps = 20 MiB/s. The rate
# check is a product requirement (the cap is the feature), not a speed assertion on the daemon.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/lazylib.sh"
require_lazy

SIZE_MIB=256
MiB=1048576
RATE=$((20 * MiB))
random_file "$T/src.img" "$SIZE_MIB"
start_source src "$T/src.img"
serve_lazy lazy src "$T/store" --prefetch adaptive --max-rate 20M --control "$T/lazy.ctl"
t0=$(date +%s.%N)

# jcheck FILE WHAT PYEXPR: PYEXPR (j = the parsed status) must be true.
jcheck() {
    local file=$1 what=$2 expr=$3
    "$PY" -c 'import json,sys; j=json.load(open(sys.argv[1])); sys.exit(0 if eval(sys.argv[2]) else 1)' "$file" "$expr" \
        || { printf '[%s] status was: %s\n' "$TEST_NAME" "$(cat "$file")" >&2; fail "$what: expected $expr"; }
}
# sample N: status into $T/sN.json; its time (midpoint of the status call, seconds since the start) in
# $T/sN.t and the source log's line count right after it in $T/sN.mark.
sample() {
    local a b
    a=$(date +%s.%N)
    lz_status lazy "$T/s$1.json"
    b=$(date +%s.%N)
    log_lines "$T/src.log" >"$T/s$1.mark"
    "$PY" -c 'import sys; print("%.6f" % ((float(sys.argv[1]) + float(sys.argv[2])) / 2 - float(sys.argv[3])))' "$a" "$b" "$t0" >"$T/s$1.t"
}
# sleep_until SECONDS: sleep until SECONDS after the start.
sleep_until() {
    local d
    d=$("$PY" -c 'import sys,time; print(max(0.0, float(sys.argv[1]) + float(sys.argv[2]) - time.time()))' "$t0" "$1")
    sleep "$d"
}

sleep_until 1
sample 1
sleep_until 6
sample 2
say "t=$(cat "$T/s1.t") s: $(tr -d '\n ' <"$T/s1.json")"
say "t=$(cat "$T/s2.t") s: $(tr -d '\n ' <"$T/s2.json")"
jcheck "$T/s2.json" "max_rate_bps" "j['max_rate_bps'] == $RATE"
jcheck "$T/s2.json" "prefetch_state at t~6 s" 'j["prefetch_state"] == "running"'
jcheck "$T/s2.json" "complete at t~6 s (20 MiB/s cannot have pulled $SIZE_MIB MiB yet)" \
    'j["complete"] is False and j["pages"]["absent"] > 0 and j["progress"] < 1.0'
# with no client every pulled byte is a background byte; bytes_pulled counts a pull when its data
# arrives and background_bytes once it is stored, so the background pulls still in flight (at most
# 4 MiB of them) may be counted in the first only
jcheck "$T/s2.json" "bytes_pulled with no client" \
    'j["demand_misses"] == 0 and 0 <= j["bytes_pulled"] - j["background_bytes"] <= 4 << 20'

b1=$(json_get "$T/s1.json" 'j["background_bytes"]')
b2=$(json_get "$T/s2.json" 'j["background_bytes"]')
# the reads the source logged between the two samples
awk -v from="$(cat "$T/s1.mark")" -v to="$(cat "$T/s2.mark")" 'NR > from && NR <= to' "$T/src.log" >"$T/interval.log"
src_delta=$(source_read_bytes "$T/interval.log")
"$PY" - "$(cat "$T/s1.t")" "$(cat "$T/s2.t")" "$b1" "$b2" "$src_delta" "$RATE" "$TEST_NAME" <<'PY'
import sys
t1, t2 = float(sys.argv[1]), float(sys.argv[2])
b1, b2, src, rate = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
name = sys.argv[7]
MiB = 1 << 20
dt = t2 - t1
bg = (b2 - b1) / dt
print("[%s] background_bytes %d -> %d over %.3f s: %.2f MiB/s; source log: %d bytes = %.2f MiB/s"
      % (name, b1, b2, dt, bg / MiB, src, src / dt / MiB))
bad = []
if not (dt > 3):
    bad.append("the two samples are only %.3f s apart" % dt)
if abs(bg - rate) > 0.1 * rate:
    bad.append("background rate %.2f MiB/s is not within 10%% of the --max-rate %.2f MiB/s" % (bg / MiB, rate / MiB))
if abs(src - (b2 - b1)) > 4 * MiB:
    bad.append("the source log shows %d bytes read between the samples, status background_bytes grew by %d"
               % (src, b2 - b1))
for b in bad:
    print("[%s] FAIL: %s" % (name, b), file=sys.stderr)
sys.exit(1 if bad else 0)
PY
say "ok: background pull held at 20 MiB/s (status and source log agree), not complete at t~6 s"
assert_alive lazy
pass
