#!/bin/bash
# `nbd-umemd status` of a lazy export, through its life: fresh (nothing pulled), after reading N
# pages with --fetch-size 4K (present=N, demand_misses=N, bytes_pulled=N*4096, p50 <= p99), after a
# whole-page write (local=1), after nbdcopy of the whole export (complete, no absent page, "every page
# is local" logged, source closed). `status` on a missing control socket fails with one error line.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/lazylib.sh"
require_lazy

SIZE_MIB=8
P=4096
TOTAL=$((SIZE_MIB * 1048576 / P))
N=5
random_file "$T/src.img" "$SIZE_MIB"
start_source src "$T/src.img"
serve_lazy lazy src "$T/store" --fetch-size 4K --control "$T/lazy.ctl"
[ -S "$T/lazy.ctl" ] || fail "no control socket $T/lazy.ctl after the daemon started"

# jcheck FILE WHAT PYEXPR: PYEXPR (j = parsed status) must be true.
jcheck() {
    local file=$1 what=$2 expr=$3
    "$PY" -c 'import json,sys; j=json.load(open(sys.argv[1])); sys.exit(0 if eval(sys.argv[2]) else 1)' "$file" "$expr" \
        || { printf '[%s] status was: %s\n' "$TEST_NAME" "$(cat "$file")" >&2; fail "$what: expected $expr"; }
}

# ---- fresh daemon ----------------------------------------------------------------------------------
lz_status lazy "$T/s0.json"
say "fresh: $(cat "$T/s0.json")"
jcheck "$T/s0.json" "fresh kind" 'j["kind"] == "lazy"'
jcheck "$T/s0.json" "fresh size" "j['size'] == $((SIZE_MIB * 1048576))"
jcheck "$T/s0.json" "fresh page_size" "j['page_size'] == $P"
jcheck "$T/s0.json" "fresh read_only" 'j["read_only"] is False'
jcheck "$T/s0.json" "fresh complete" 'j["complete"] is False'
jcheck "$T/s0.json" "fresh pages.total" "j['pages']['total'] == $TOTAL"
jcheck "$T/s0.json" "fresh pages.absent" "j['pages']['absent'] == $TOTAL"
jcheck "$T/s0.json" "fresh pages.present/local" 'j["pages"]["present"] == 0 and j["pages"]["local"] == 0'
jcheck "$T/s0.json" "fresh bytes_pulled" 'j["bytes_pulled"] == 0'
jcheck "$T/s0.json" "fresh demand_misses" 'j["demand_misses"] == 0'
jcheck "$T/s0.json" "fresh pulls_in_flight" 'j["pulls_in_flight"] == 0'
jcheck "$T/s0.json" "fresh source_connected" 'j["source_connected"] is True'
jcheck "$T/s0.json" "fresh connections" 'j["connections"] == 0'
jcheck "$T/s0.json" "fresh: every documented key" \
    'all(k in j for k in ("export","kind","size","read_only","connections","page_size","pages","bytes_pulled","pulls_in_flight","demand_misses","miss_latency_p50_us","miss_latency_p99_us","source_connected","complete"))'
say "ok: fresh daemon status"

# ---- N separate absent pages read (fetch size 4K: one miss and one 4 KiB pull each) -------------------
nbdsh_py "$(uri lazy)" "$T/src.img" "$N" <<'PY'
img = open(sys.argv[1], "rb").read()
n = int(sys.argv[2])
P = 4096
for i in range(n):
    p = 10 + 37 * i          # separate, non-adjacent pages
    check_data(img[p * P:(p + 1) * P], h.pread(P, p * P), "read of absent page %d" % p)
    # re-read: local, no new miss
    check_data(img[p * P:(p + 1) * P], h.pread(P, p * P), "re-read of page %d" % p)
PY
lz_status lazy "$T/s1.json"
say "after $N page reads: $(cat "$T/s1.json")"
jcheck "$T/s1.json" "after $N reads: pages.present" "j['pages']['present'] == $N"
jcheck "$T/s1.json" "after $N reads: pages.absent" "j['pages']['absent'] == $((TOTAL - N))"
jcheck "$T/s1.json" "after $N reads: pages.local" "j['pages']['local'] == 0"
jcheck "$T/s1.json" "after $N reads: demand_misses" "j['demand_misses'] == $N"
jcheck "$T/s1.json" "after $N reads: bytes_pulled" "j['bytes_pulled'] == $((N * P))"
jcheck "$T/s1.json" "after $N reads: pulls_in_flight" 'j["pulls_in_flight"] == 0'
jcheck "$T/s1.json" "after $N reads: miss latency numbers" \
    'all(isinstance(j[k], (int, float)) and not isinstance(j[k], bool) and j[k] > 0 for k in ("miss_latency_p50_us", "miss_latency_p99_us"))'
jcheck "$T/s1.json" "after $N reads: p99 >= p50" 'j["miss_latency_p99_us"] >= j["miss_latency_p50_us"]'
jcheck "$T/s1.json" "after $N reads: complete" 'j["complete"] is False'
say "ok: status after $N demand misses"

# ---- a whole-page write makes the page local (no pull) --------------------------------------------------
nbdsh_py "$(uri lazy)" "$T/lazy.ctl" <<'PY'
import json, subprocess
P = 4096
p = 500
h.pwrite(pattern(P, 29), p * P)
h.flush()
check_data(pattern(P, 29), h.pread(P, p * P), "re-read of the written page")
# while this client is connected, status counts it
st = json.loads(subprocess.run([os.environ["NBD_UMEMD"], "status", "--control", sys.argv[1]], check=True,
                               capture_output=True, timeout=20).stdout)
check(st["connections"] == 1, "status connections with one client connected: %r, expected 1" % st["connections"])
PY
lz_status lazy "$T/s2.json"
say "after a page write: $(cat "$T/s2.json")"
jcheck "$T/s2.json" "after a whole-page write: pages.local" 'j["pages"]["local"] == 1'
jcheck "$T/s2.json" "after a whole-page write: pages.present" "j['pages']['present'] == $N"
jcheck "$T/s2.json" "after a whole-page write: pages.absent" "j['pages']['absent'] == $((TOTAL - N - 1))"
jcheck "$T/s2.json" "after a whole-page write: bytes_pulled unchanged" "j['bytes_pulled'] == $((N * P))"
jcheck "$T/s2.json" "after a whole-page write: demand_misses unchanged" "j['demand_misses'] == $N"
say "ok: whole-page write counted as local"

# ---- nbdcopy of the whole export: complete -------------------------------------------------------------
tmo 120 nbdcopy "$(uri lazy)" "$T/out.img" || fail "nbdcopy $(uri lazy) $T/out.img failed"
cp "$T/src.img" "$T/expect.img"
"$PY" - "$T/expect.img" <<'EOF'
import random, sys
P = 4096
with open(sys.argv[1], "r+b") as f:
    f.seek(500 * P)
    f.write(random.Random(29).randbytes(P))
EOF
assert_same_file "$T/expect.img" "$T/out.img" "whole export copied out of the lazy daemon"
lz_wait_grep 'every page is local' "$T/lazy.log" 10 \
    || fail "the daemon log has no 'every page is local' within 10 s of the whole export being read"
lz_wait_status lazy "$T/s3.json" 'j["complete"] is True and j["source_connected"] is False' 10 || true
say "after nbdcopy: $(cat "$T/s3.json")"
jcheck "$T/s3.json" "after nbdcopy: complete" 'j["complete"] is True'
jcheck "$T/s3.json" "after nbdcopy: pages.absent" 'j["pages"]["absent"] == 0'
jcheck "$T/s3.json" "after nbdcopy: present + local == total" "j['pages']['present'] + j['pages']['local'] == $TOTAL"
jcheck "$T/s3.json" "after nbdcopy: pages.local" 'j["pages"]["local"] >= 1'
jcheck "$T/s3.json" "after nbdcopy: source_connected" 'j["source_connected"] is False'
jcheck "$T/s3.json" "after nbdcopy: pulls_in_flight" 'j["pulls_in_flight"] == 0'
jcheck "$T/s3.json" "after nbdcopy: bytes_pulled <= size" "0 < j['bytes_pulled'] <= $((SIZE_MIB * 1048576))"
assert_eq "'every page is local' lines in the daemon log" 1 "$(lz_count 'every page is local' "$T/lazy.log")"
say "ok: complete after a full copy"
assert_alive lazy

# ---- status on a control socket that does not exist ---------------------------------------------------
rc=0
"$NBD_UMEMD" status --control /nonexistent >"$T/bad.out" 2>"$T/bad.err" || rc=$?
say "status --control /nonexistent: exit $rc, stderr: $(cat "$T/bad.err")"
[ "$rc" -ne 0 ] || fail "nbd-umemd status --control /nonexistent exited 0 (stdout: $(cat "$T/bad.out"))"
[ "$rc" -lt 128 ] || fail "nbd-umemd status --control /nonexistent died of a signal (exit $rc)"
[ ! -s "$T/bad.out" ] || fail "nbd-umemd status --control /nonexistent printed on stdout: $(cat "$T/bad.out")"
lines=$(grep -c . "$T/bad.err" || true)
assert_eq "stderr lines of nbd-umemd status --control /nonexistent" 1 "$lines"
grep -q 'nonexistent' "$T/bad.err" || fail "the error does not name the control socket: $(cat "$T/bad.err")"
say "ok: status on a missing control socket"

pass
