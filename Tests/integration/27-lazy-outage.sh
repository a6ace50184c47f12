#!/bin/bash
# Source outages of a lazy export.
# (a) The source (nbdkit, 200 ms per read) is SIGKILLed while a loader is pulling pages; 4 more
#     readers of absent pages start while it is down; it comes back after 2 s (--source-timeout 20).
#     Every request completes with the image's bytes, and the daemon logs exactly one outage line
#     and one recovery line.
# (b) The source is killed and never comes back (--source-timeout 3): a read of an absent page fails
#     with EIO after >= 3 s (and < 15 s); a page pulled before the outage is still served, at once,
#     while that read waits; the daemon is still alive afterwards.
# (c) The source is killed while idle (no request in flight) and comes back after 2 s: the reads of
#     absent pages made meanwhile wait and succeed; one outage line and one recovery line are logged.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/lazylib.sh"
require_lazy

SIZE_MIB=8
P=4096
random_file "$T/src.img" "$SIZE_MIB"

# ============================== (a) outage, source back within the timeout ==============================
start_source src "$T/src.img" --filter=delay rdelay=200ms
serve_lazy lazy src "$T/store" --source-timeout 20 --control "$T/lazy.ctl"
mark=$(log_lines "$T/src.log")

# Loader: reads the first 2 MiB page by page (a 64 KiB pull every 16 pages, 200 ms each).
nbdsh_py "$(uri lazy)" "$T/src.img" >"$T/loader.out" 2>&1 <<'PY' &
import time
img = open(sys.argv[1], "rb").read()
P = 4096
t0 = time.time()
for p in range(512):
    try:
        d = h.pread(P, p * P)
    except nbd.Error as e:
        fail("loader: read of page %d failed: %s (%s) after %.1f s" % (p, ename(e.errnum), e.string, time.time() - t0))
        break
    check_data(img[p * P:(p + 1) * P], d, "loader: page %d" % p)
note("loader: done in %.1f s" % (time.time() - t0))
PY
loader=$!

# Kill the source once the loader has got a few pulls through (a pull is then almost surely in flight).
for ((i = 0; i < 200; i++)); do
    [ "$(source_reads "$T/src.log" "$mark" | wc -l)" -ge 4 ] && break
    sleep 0.05
done
[ "$(source_reads "$T/src.log" "$mark" | wc -l)" -ge 4 ] || fail "the loader's pulls did not reach the source within 10 s"
lz_kill_source src
t_kill=$(date +%s.%N)
say "source killed after $(source_reads "$T/src.log" "$mark" | wc -l) source reads"

# 4 readers of absent pages (far from the loader's range), each on its own connection, started while
# the source is down.
readers=()
for r in 0 1 2 3; do
    nbdsh_py "$(uri lazy)" "$T/src.img" "$r" >"$T/reader$r.out" 2>&1 <<'PY' &
import time
img = open(sys.argv[1], "rb").read()
r = int(sys.argv[2])
P = 4096
t0 = time.time()
# each reader: 3 absent pages in separate 64 KiB windows of its own 1 MiB, from 4 MiB on
for k in range(3):
    off = (4 << 20) + r * (1 << 20) + k * (256 << 10) + 3 * P
    try:
        d = h.pread(2 * P, off)
    except nbd.Error as e:
        fail("reader %d: read at %#x failed: %s (%s) after %.1f s" % (r, off, ename(e.errnum), e.string, time.time() - t0))
        continue
    check_data(img[off:off + 2 * P], d, "reader %d: read at %#x" % (r, off))
note("reader %d: done in %.1f s" % (r, time.time() - t0))
PY
    readers+=($!)
done

sleep 2
for r in "${!readers[@]}"; do
    kill -0 "${readers[$r]}" 2>/dev/null || { cat "$T/reader$r.out" >&2; fail "reader $r finished while the source was down (it should wait)"; }
done
assert_alive lazy
start_source src "$T/src.img"
say "source restarted $(awk -v a="$(date +%s.%N)" -v b="$t_kill" 'BEGIN { printf "%.2f", a - b }') s after the kill"

rc_all=0
for r in "${!readers[@]}"; do
    rc=0; wait "${readers[$r]}" || rc=$?
    sed "s/^/    reader $r: /" "$T/reader$r.out"
    [ "$rc" -eq 0 ] || { rc_all=1; say "reader $r exited $rc"; }
done
rc=0; wait "$loader" || rc=$?
sed 's/^/    loader: /' "$T/loader.out"
[ "$rc" -eq 0 ] || { rc_all=1; say "loader exited $rc"; }
[ "$rc_all" -eq 0 ] || fail "requests made during a 2 s source outage (--source-timeout 20) did not all complete correctly"
say "ok: every request made during the outage completed with the right data"

lz_status lazy "$T/sa.json"
json_get "$T/sa.json" 'j["source_connected"]' | grep -qx true || fail "status after recovery: source_connected is not true: $(cat "$T/sa.json")"
# whole export still right (pulls the rest from the restarted source)
tmo 120 nbdcopy "$(uri lazy)" "$T/out.img" || fail "nbdcopy of the lazy export after the outage failed"
assert_same_file "$T/src.img" "$T/out.img" "lazy export after the outage"

n_out=$(lz_count 'source outage' "$T/lazy.log")
n_rec=$(lz_count 'source recovered' "$T/lazy.log")
grep -E 'source (outage|recovered)' "$T/lazy.log" | sed 's/^/    daemon: /' || true
assert_eq "'source outage' lines in the daemon log (one outage)" 1 "$n_out"
assert_eq "'source recovered' lines in the daemon log (one recovery)" 1 "$n_rec"
assert_alive lazy
say "ok: (a) one outage, one recovery"
stop_server_ok lazy
stop_source src

# ============================== (b) the source never comes back ==========================================
start_source src2 "$T/src.img"
serve_lazy lazy2 src2 "$T/store2" --source-timeout 3 --fetch-size 64K
nbdsh_py "$(uri lazy2)" "$T/src.img" <<'PY'
img = open(sys.argv[1], "rb").read()
P = 4096
# pull the first 64 KiB window
check_data(img[0:16 * P], h.pread(16 * P, 0), "pre-outage read of the first 64 KiB")
PY
lz_kill_source src2

nbdsh_py "$(uri lazy2)" "$T/src.img" <<'PY'
import time
img = open(sys.argv[1], "rb").read()
P = 4096
off = 5 << 20                      # never pulled
h2 = connect(URI)
buf = nbd.Buffer(P)
t0 = time.time()
cookie = h.aio_pread(buf, off)
time.sleep(0.5)
# while that read waits for the source: a pulled page is served, fast
t1 = time.time()
try:
    d = h2.pread(P, 5 * P)
    check_data(img[5 * P:6 * P], d, "page 5 (pulled before the outage) read during the outage")
except nbd.Error as e:
    fail("read of page 5 (pulled before the outage) during the outage failed: %s (%s)" % (ename(e.errnum), e.string))
dt1 = time.time() - t1
check(dt1 < 1.0, "read of a present page during the outage took %.2f s (expected < 1 s)" % dt1)
note("present page served in %.3f s during the outage" % dt1)
err = None
while True:
    try:
        if h.aio_command_completed(cookie):
            break
    except nbd.Error as e:
        err = e
        break
    if time.time() - t0 > 30:
        break
    h.poll(200)
dt = time.time() - t0
if err is None:
    if time.time() - t0 > 30:
        fail("read of an absent page with the source gone (--source-timeout 3): no reply within 30 s")
    else:
        fail("read of an absent page with the source gone (--source-timeout 3) succeeded after %.1f s" % dt)
else:
    note("absent-page read failed after %.2f s: %s (%s)" % (dt, ename(err.errnum), err.string))
    check(err.errnum == errno.EIO, "absent-page read failed with %s, expected EIO" % ename(err.errnum))
    check(dt >= 3.0, "absent-page read failed after %.2f s, before --source-timeout 3" % dt)
    check(dt < 15.0, "absent-page read failed only after %.2f s (--source-timeout 3)" % dt)
# the present page is still readable after the failure, on the same connection
check_data(img[0:P], h.pread(P, 0), "page 0 after the failed read")
PY
sleep 0.5
assert_alive lazy2
say "ok: (b) EIO after the timeout, present pages served, daemon alive"
stop_server_ok lazy2

# ============================== (c) the source dies while idle, back within the timeout ====================
# No request is in flight when the source is killed: the next reads of absent pages must wait for it
# and succeed, and this outage too is logged once, with its recovery.
start_source src3 "$T/src.img"
serve_lazy lazy3 src3 "$T/store3" --source-timeout 20
nbdsh_py "$(uri lazy3)" "$T/src.img" <<'PY'
img = open(sys.argv[1], "rb").read()
check_data(img[0:65536], h.pread(65536, 0), "pre-outage read of the first 64 KiB")
PY
lz_kill_source src3
sleep 0.5
nbdsh_py "$(uri lazy3)" "$T/src.img" >"$T/idle.out" 2>&1 <<'PY' &
import time
img = open(sys.argv[1], "rb").read()
t0 = time.time()
for off in (3 << 20, (5 << 20) + 8192, 7 << 20):
    try:
        check_data(img[off:off + 4096], h.pread(4096, off), "read at %#x after the idle outage" % off)
    except nbd.Error as e:
        fail("read at %#x during/after the idle outage failed: %s (%s) after %.1f s" % (off, ename(e.errnum), e.string, time.time() - t0))
note("idle-outage reader done in %.1f s" % (time.time() - t0))
PY
idle=$!
sleep 2
kill -0 "$idle" 2>/dev/null || { cat "$T/idle.out" >&2; fail "(c) the reader finished while the source was down (it should wait)"; }
start_source src3 "$T/src.img"
rc=0; wait "$idle" || rc=$?
sed 's/^/    (c) reader: /' "$T/idle.out"
[ "$rc" -eq 0 ] || fail "(c) reads of absent pages after the source died while idle did not all succeed once it came back"
say "ok: (c) reads waited for the source that died while idle, and succeeded"
grep -E 'source (outage|recovered)|remote source' "$T/lazy3.log" | sed 's/^/    (c) daemon: /' || true
# shellcheck disable=SC2317  # (called through soft)
# c_lines PATTERN: exactly one line of the lazy3 log matches PATTERN (returns 1 otherwise, for soft).
c_lines() {
    local n
    n=$(lz_count "$1" "$T/lazy3.log")
    [ "$n" = 1 ] && return 0
    printf "[%s] (c) '%s' lines in the daemon log after the source died while idle and came back: expected 1, got %s\n" \
        "$TEST_NAME" "$1" "$n" >&2
    return 1
}
soft c_lines 'source outage'
soft c_lines 'source recovered'
assert_alive lazy3
pass
