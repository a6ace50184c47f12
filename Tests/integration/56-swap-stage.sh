#!/usr/bin/env bash
# Swap-mode staging on the host kernel (nbdfuse + a loop device with direct I/O; no nbd module here).
# A 256 MiB random source image with zero pages (every 7th page, plus whole zero MiBs), all of them
# holes, is served by nbdkit with the log filter. `nbd-umemd serve --swap-size 320M --swap` (no gate,
# --prefetch off, --fetch-size 4K: every source read is a demand pull of one page) is swap at the
# highest priority, and `nbd-umemd stage` stages a tmpfs RAM file onto it. Checks:
#  - the STAGED line: one marker per non-zero source page, the zero pages counted and not staged;
#  - with vm.page-cluster=0, a new process reads 2000 pages (some of them zero) of the RAM file in a
#    scrambled order through MAP_SHARED: every page equals the image, and the source saw exactly one
#    4 KiB read per touched non-zero page and nothing for the zero pages;
#  - after sealing, marker pages are data: a process in a small memory cgroup fills anonymous memory
#    with valid markers of this run's key (the key is read from `status` while the stager has
#    staging open), is swapped out to the device and back in, and reads back its own data; the
#    daemon decoded no new marker and read nothing from the source meanwhile;
#  - swapoff (timed) leaves every page of the RAM file resident or a hole, the file equals the
#    image, every non-zero source page was read exactly once over the whole run, the daemon reports
#    complete; then nothing is left: no swap entry, no loop device on the nbdfuse file, no FUSE
#    mount, no nbdfuse or daemon process, no RAM file.
# Swap is system-wide here: the device takes other processes' pages too while it is on, and staging
# and the marker-filled process wait (at most 90 s each) until no other swap area shares the top
# priority. The EXIT trap removes the RAM file, kills the cgroup's processes, swaps off and detaches
# before the daemon stops, and restores vm.page-cluster.
# Knob for checking that the test can fail: STAGE_SERVE_FETCH=SIZE serves with --fetch-size SIZE
# while the checks still expect one 4 KiB source read per touched page (64K must fail them).
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/lazylib.sh"
. "$(dirname "$0")/wirelib.sh"
require_lazy

P=4096
MIB=256                          # source image (and RAM file) size
NPAGES=$((MIB * 256))
FETCH=4096
TOUCH=2000                       # pages the scrambled reader touches, ZTOUCH of them zero pages
ZTOUCH=100
RAM="/dev/shm/nbd-umemd-it-56-$$"

help=$("$NBD_UMEMD" --help 2>&1) || true
grep -qw stage <<<"$help" || fail "$NBD_UMEMD has no 'stage' command"
help=$("$NBD_UMEMD" serve --help 2>&1) || true
grep -q -- '--swap-size' <<<"$help" || fail "$NBD_UMEMD has no 'serve --swap-size'"
[ "$(cat /sys/module/zswap/parameters/enabled 2>/dev/null || echo N)" = N ] \
    || fail "zswap is on: swap-outs would never reach the device"
[ ! -e "$RAM" ] || fail "$RAM exists already"
PRE_STOP_CMDS+=("rm -f '$RAM'")   # before swap-off: a removed tmpfs file frees its slots without I/O

old_cluster=$(cat /proc/sys/vm/page-cluster)
CLEANUP_CMDS+=("echo $old_cluster >/proc/sys/vm/page-cluster")
echo 0 >/proc/sys/vm/page-cluster

# --- the source: random data, zero pages as holes --------------------------------------------------
py "$T/src.img" "$NPAGES" "$T/zero-pages" <<'PY' || fail "cannot build the source image"
import os, sys
path, n, zlist = sys.argv[1], int(sys.argv[2]), sys.argv[3]
P = 4096
zero = set(range(0, n, 7))
for mib in (3, 100, 101, 200):
    zero.update(range(mib * 256, mib * 256 + 256))
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.ftruncate(fd, n * P)
p = 0
while p < n:
    if p in zero:
        p += 1
        continue
    q = p
    while q < n and q not in zero:
        q += 1
    os.pwrite(fd, os.urandom((q - p) * P), p * P)
    p = q
os.fsync(fd)
os.close(fd)
# every zero page must be a hole, or the source's allocation map cannot report it as zero
fd = os.open(path, os.O_RDONLY)
for z in sorted(zero):
    try:
        d = os.lseek(fd, z * P, os.SEEK_DATA)
    except OSError:
        d = n * P
    if d == z * P:
        sys.exit("page %d of the image is zero but not a hole" % z)
with open(zlist, "w") as f:
    f.write("\n".join(map(str, sorted(zero))) + "\n")
print("[56-swap-stage] image: %d pages, %d zero (holes), %d non-zero" % (n, len(zero), n - len(zero)))
PY
NZERO=$(wc -l <"$T/zero-pages")
NDATA=$((NPAGES - NZERO))

start_source src "$T/src.img"
serve_lazy swapd src "$T/store" --swap-size 320M --swap --control "$T/swapd.ctl" --fetch-size "${STAGE_SERVE_FETCH:-$FETCH}"
dev=$("$ROOT/scripts/attach" --swap --unix "$(sock swapd)")
. "$NBD_UMEMD_STATE_DIR/attached/$(basename "$dev")"
fuse_pid=$FUSE_PID fuse_dir=$FUSE_DIR
mkswap "$dev" >/dev/null
swapon -p 32767 "$dev"
is_swap_active "$dev" || fail "$dev is not in /proc/swaps after swapon"
say "swap on $dev (nbdfuse pid $fuse_pid), priority 32767"
# top_swap_others: other swap areas with this device's priority (32767 is the highest there is):
# the kernel would spread the staged pages over them, and those pages would never be staged. Swap
# is system-wide, so another test's device can be on; wait for it to go (at most 90 s).
top_swap_others() { awk -v d="$dev" 'NR > 1 && $1 != d && $5 >= 32767 { print $1 }' /proc/swaps; }
wait_sole_top_swap() {
    local i
    for ((i = 0; i < 450; i++)); do [ -z "$(top_swap_others)" ] && return 0; sleep 0.2; done
    fail "other swap areas with priority 32767 stayed active for 90 s ($(top_swap_others | tr '\n' ' ')): $1 needs this device alone at the top"
}
lz_status swapd "$T/st0.json"
assert_eq "status swap_slots" true "$(json_get "$T/st0.json" 'j.get("swap_slots")')"
assert_eq "status staging before stage" '"closed"' "$(json_get "$T/st0.json" 'j.get("staging")')"

# --- staging ---------------------------------------------------------------------------------------
# The run's staging key is in `status` only while staging is open: a poller asks the control socket
# (every few ms) until it sees the staging sealed or the stager has returned; the stager starts once
# the poller has its first answer.
py "$T/swapd.ctl" "$T/key.json" "$T/stage.done" "$T/poller.ready" <<'PY' &
import json, os, socket, sys, time
ctl, out, done, ready = sys.argv[1:5]
key, seen, deadline = None, [], time.time() + 200
while time.time() < deadline:
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(ctl)
        s.sendall(b'{"command":"status"}\n')
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
        s.close()
        j = json.loads(data)
    except (OSError, ValueError):
        time.sleep(0.01)
        continue
    st = j.get("staging")
    if not seen:
        open(ready, "w").close()
    if not seen or seen[-1] != st:
        seen.append(st)
    if st == "open" and j.get("staging_key"):
        key = j["staging_key"]
    if st == "sealed" or os.path.exists(done):
        break
    time.sleep(0.003)
json.dump({"key": key, "seen": seen}, open(out, "w"))
PY
poller=$! poller_running=1
PRE_STOP_CMDS+=('[ -z "$poller_running" ] || kill "$poller"')
for ((i = 0; i < 400; i++)); do [ -e "$T/poller.ready" ] && break; sleep 0.05; done
[ -e "$T/poller.ready" ] || fail "the status poller got no answer from $T/swapd.ctl within 20 s"
mark=$(log_lines "$T/src.log")
wait_sole_top_swap "staging"
t0=${EPOCHREALTIME/[.,]/}
rc=0
tmo 120 "$NBD_UMEMD" stage --ram "$RAM" --control "$T/swapd.ctl" --device "$dev" --timeout 60 >"$T/stage.out" 2>"$T/stage.err" || rc=$?
stage_ms=$(((${EPOCHREALTIME/[.,]/} - t0) / 1000))
touch "$T/stage.done"
wait "$poller" || true
poller_running=
sed 's/^/  stage: /' "$T/stage.err"
[ "$rc" -eq 0 ] || fail "nbd-umemd stage exited $rc"
sed -n 's/^STAGED //p' "$T/stage.out" >"$T/staged.json"
[ -s "$T/staged.json" ] || fail "no STAGED line on the stager's stdout: $(cat "$T/stage.out")"
say "STAGED $(cat "$T/staged.json") (stage command ${stage_ms} ms)"
assert_eq "STAGED pages" "$NPAGES" "$(json_get "$T/staged.json" 'j["pages"]')"
assert_eq "STAGED staged (non-zero source pages)" "$NDATA" "$(json_get "$T/staged.json" 'j["staged"]')"
assert_eq "STAGED zero_pages" "$NZERO" "$(json_get "$T/staged.json" 'j["zero_pages"]')"
assert_eq "RAM file size" $((NPAGES * P)) "$(stat -c %s "$RAM")"
assert_eq "RAM file system" tmpfs "$(stat -f -c %T "$RAM")"
lz_status swapd "$T/st1.json"
assert_eq "status staging after stage" '"sealed"' "$(json_get "$T/st1.json" 'j.get("staging")')"
assert_eq "status staging_key after sealing" null "$(json_get "$T/st1.json" 'j.get("staging_key")')"
assert_eq "status staged_slots" "$NDATA" "$(json_get "$T/st1.json" 'j.get("staged_slots")')"
assert_eq "status duplicate_markers" 0 "$(json_get "$T/st1.json" 'j.get("duplicate_markers")')"
assert_eq "status mapped_slots" "$NDATA" "$(json_get "$T/st1.json" 'j.get("mapped_slots")')"
assert_eq "source reads while staging" "" "$(source_reads "$T/src.log" "$mark")"
stage_cg=$(json_get "$T/staged.json" 'j.get("cgroup", "")' | tr -d '"')
if [ -n "$stage_cg" ]; then
    [ ! -e "${stage_cg#* }" ] || fail "the stager's memory cgroup ${stage_cg#* } is still there"
else
    ! compgen -G '/sys/fs/cgroup/memory/nbd-umemd-stage-*' >/dev/null || fail "a stager's memory cgroup is still there: $(echo /sys/fs/cgroup/memory/nbd-umemd-stage-*)"
fi
KEY=$(json_get "$T/key.json" 'j["key"] or ""' | tr -d '"')
[[ "$KEY" =~ ^[0-9a-fA-F]{32}$ ]] || fail "no staging key seen in status while staging was open (states seen: $(json_get "$T/key.json" 'j["seen"]'))"
say "staging states seen by the status poller: $(json_get "$T/key.json" 'j["seen"]'); daemon after staging: $(json_get "$T/st1.json" '{k: j.get(k) for k in ("markers_decoded", "mapped_slots", "writes", "bytes_written")}')"

# --- scrambled reads from a new process ------------------------------------------------------------
py "$T/zero-pages" "$NPAGES" "$TOUCH" "$ZTOUCH" "$T/touch" <<'PY'
import random, sys
zero = set(int(x) for x in open(sys.argv[1]).read().split())
n, touch, ztouch, out = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rng = random.Random(56)
pages = rng.sample([p for p in range(n) if p not in zero], touch - ztouch) + rng.sample(sorted(zero), ztouch)
rng.shuffle(pages)
open(out, "w").write("\n".join(map(str, pages)) + "\n")
PY
mark=$(log_lines "$T/src.log")
py "$RAM" "$T/src.img" "$T/touch" <<'PY' || fail "the scrambled read of the RAM file found wrong pages (see above)"
import mmap, os, sys, time
ram, img, lst = sys.argv[1:4]
P = 4096
pages = [int(x) for x in open(lst).read().split()]
fd = os.open(ram, os.O_RDONLY)
size = os.fstat(fd).st_size
m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
m.madvise(mmap.MADV_RANDOM)
src = os.open(img, os.O_RDONLY)
bad = []
t0 = time.monotonic()
for p in pages:
    if m[p * P:(p + 1) * P] != os.pread(src, P, p * P):
        bad.append(p)
dt = time.monotonic() - t0
print("[56-swap-stage] scrambled read: %d pages in %.2f s (%.0f us/page), %d wrong" % (len(pages), dt, dt * 1e6 / len(pages), len(bad)))
if bad:
    sys.exit("pages that differ from the image: %r" % bad[:20])
PY
py "$T/src.log" "$mark" "$T/touch" "$T/zero-pages" "$FETCH" <<'PY' || fail "the source reads of the scrambled read are not the touched pages (see above)"
import sys
from collections import Counter
from nbdtest import source_requests
log, mark, lst, zl, fetch = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
P = 4096
zero = set(int(x) for x in open(zl).read().split())
touched = [int(x) for x in open(lst).read().split()]
tdata = set(p for p in touched if p not in zero)
reqs = source_requests(log, mark)
others = [r for r in reqs if r[0] != "Read"]
if others:
    sys.exit("the source got requests other than reads: %r" % others[:10])
covered = Counter()
for _, o, c in reqs:
    for p in range(o // P, (o + c + P - 1) // P):
        covered[p] += 1
nbytes = sum(c for _, o, c in reqs)
print("[56-swap-stage] source during the scrambled read: %d reads, %d bytes, %d pages; touched %d non-zero + %d zero pages"
      % (len(reqs), nbytes, len(covered), len(tdata), len(touched) - len(tdata)))
if [p for p, k in covered.items() if k > 1]:
    sys.exit("pages read from the source more than once: %r" % [p for p, k in covered.items() if k > 1][:10])
if set(covered) & zero:
    sys.exit("zero pages read from the source: %r" % sorted(set(covered) & zero)[:10])
if tdata - set(covered):
    sys.exit("touched pages never read from the source: %r" % sorted(tdata - set(covered))[:10])
if nbytes > len(tdata) * fetch:
    sys.exit("%d bytes read from the source for %d touched non-zero pages (fetch size %d)" % (nbytes, len(tdata), fetch))
if fetch == P and set(covered) != tdata:
    sys.exit("pages read beyond the touched ones: %r" % sorted(set(covered) - tdata)[:10])
PY
say "ok: scrambled read equals the image; the source read exactly the touched non-zero pages once"

# --- after sealing, markers are data ---------------------------------------------------------------
# 64 valid markers of this run's key (48 for non-zero source pages not touched yet, 16 for zero
# pages); a process in a 24 MiB memory cgroup fills 64 MiB of anonymous memory with them, is swapped
# out to the device, and reads every page back.
py "$T/zero-pages" "$NPAGES" "$T/touch" <<'PY' >"$T/marker-pages"
import random, sys
zero = set(int(x) for x in open(sys.argv[1]).read().split())
touched = set(int(x) for x in open(sys.argv[3]).read().split())
rng = random.Random(57)
print(" ".join(map(str, rng.sample([p for p in range(int(sys.argv[2])) if p not in zero and p not in touched], 48)
                   + rng.sample(sorted(zero), 16))))
PY
: >"$T/markers.bin"
for p in $(cat "$T/marker-pages"); do
    "$NBD_UMEMD" marker --key "$KEY" --page "$p" >"$T/marker" || fail "nbd-umemd marker --key $KEY --page $p failed"
    assert_eq "size of the marker of page $p" $P "$(stat -c %s "$T/marker")"
    cat "$T/marker" >>"$T/markers.bin"
done
wait_sole_top_swap "the marker-filled process"
lz_status swapd "$T/st2.json"
mark=$(log_lines "$T/src.log")
cg="/sys/fs/cgroup/memory/nbd-umemd-it-seal-$$"
mkdir "$cg"
PRE_STOP_CMDS+=("for p in \$(cat '$cg/cgroup.procs'); do kill -9 \$p; done; sleep 0.2; rmdir '$cg'")
echo $((24 << 20)) >"$cg/memory.limit_in_bytes"
rc=0
w_in_cgroup "$cg" "$PY" - "$T/markers.bin" 64 <<'PY' >"$T/seal.out" 2>&1 || rc=$?
import mmap, random, re, sys
markers = open(sys.argv[1], "rb").read()
P, M = 4096, len(markers) // 4096
n = int(sys.argv[2]) * 256
if len(set(markers[i * P:(i + 1) * P] for i in range(M))) != M or b"\0" * P in [markers[i * P:(i + 1) * P] for i in range(M)]:
    sys.exit("the markers are not %d distinct non-zero pages" % M)
m = mmap.mmap(-1, n * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(n):
    m[i * P:(i + 1) * P] = markers[(i % M) * P:(i % M + 1) * P]
swap_kb = int(re.search(r"VmSwap:\s+(\d+)", open("/proc/self/status").read()).group(1))
order = list(range(n))
random.Random(58).shuffle(order)
bad = [i for i in order if m[i * P:(i + 1) * P] != markers[(i % M) * P:(i % M + 1) * P]]
print("SEAL pages=%d swapped_kb=%d wrong=%d" % (n, swap_kb, len(bad)))
if bad:
    sys.exit("pages that differ from what this process wrote: %r" % bad[:20])
PY
cat "$T/seal.out"
[ "$rc" -eq 0 ] || fail "the marker-filled process did not read back its own data (exit $rc)"
swapped_kb=$(sed -n 's/^SEAL .*swapped_kb=\([0-9]*\).*/\1/p' "$T/seal.out")
[ "${swapped_kb:-0}" -ge $((32 * 1024)) ] || fail "only ${swapped_kb:-0} KiB of the marker-filled process were swapped out (64 MiB in 24 MiB)"
lz_status swapd "$T/st3.json"
written=$(( $(json_get "$T/st3.json" 'j["bytes_written"]') - $(json_get "$T/st2.json" 'j["bytes_written"]') ))
say "marker-filled process: ${swapped_kb} KiB swapped out, the daemon received $((written >> 20)) MiB of writes meanwhile"
[ "$written" -ge $((32 << 20)) ] || fail "the daemon received only $written bytes of writes while the marker-filled process swapped"
assert_eq "staged_slots after marker writes" "$NDATA" "$(json_get "$T/st3.json" 'j.get("staged_slots")')"
assert_eq "duplicate_markers after marker writes" 0 "$(json_get "$T/st3.json" 'j.get("duplicate_markers")')"
assert_eq "markers_decoded after marker writes" "$(json_get "$T/st2.json" 'j.get("markers_decoded")')" \
    "$(json_get "$T/st3.json" 'j.get("markers_decoded")')"
m2=$(json_get "$T/st2.json" 'j["mapped_slots"]') m3=$(json_get "$T/st3.json" 'j["mapped_slots"]')
[ "$m3" -le "$m2" ] || fail "mapped_slots grew from $m2 to $m3 while markers were written after sealing"
assert_eq "source reads while the marker-filled process ran" "" "$(source_reads "$T/src.log" "$mark")"
for p in $(cat "$cg/cgroup.procs"); do kill -9 "$p"; done
rmdir "$cg"
say "ok: after sealing, valid markers were stored and read back as data (mapped_slots $m2 -> $m3)"

# --- swapoff ---------------------------------------------------------------------------------------
used=$(swap_used_kib "$dev")
lz_status swapd "$T/st4.json"
assert_eq "complete before swapoff" false "$(json_get "$T/st4.json" 'j["complete"]')"
t0=${EPOCHREALTIME/[.,]/}
swapoff "$dev"
swapoff_ms=$(((${EPOCHREALTIME/[.,]/} - t0) / 1000))
say "swapoff $dev: $used KiB in use before, took $swapoff_ms ms"
is_swap_active "$dev" && fail "$dev still in /proc/swaps after swapoff"
lz_wait_status swapd "$T/st5.json" 'j["complete"] is True' 20 || fail "status is not complete after swapoff: $(cat "$T/st5.json")"
py "$RAM" "$NPAGES" "$T/zero-pages" <<'PY' || fail "the RAM file is not fully in memory after swapoff (see above)"
import ctypes, mmap, os, sys
ram, n = sys.argv[1], int(sys.argv[2])
zero = set(int(x) for x in open(sys.argv[3]).read().split())
P = 4096
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
fd = os.open(ram, os.O_RDONLY)
addr = libc.mmap(None, n * P, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
if addr in (None, ctypes.c_void_p(-1).value):
    sys.exit("mmap failed: errno %d" % ctypes.get_errno())
vec = ctypes.create_string_buffer(n)
if libc.mincore(ctypes.c_void_p(addr), n * P, vec) != 0:
    sys.exit("mincore failed: errno %d" % ctypes.get_errno())
resident = holes = 0
elsewhere = []
for p in range(n):
    if vec.raw[p] & 1:
        resident += 1
        continue
    try:
        d = os.lseek(fd, p * P, os.SEEK_DATA)
    except OSError:
        d = n * P
    if d != p * P:
        holes += 1        # never written: reads as zeros without any I/O
    else:
        elsewhere.append(p)
print("[56-swap-stage] RAM file after swapoff: %d pages resident, %d holes, %d neither" % (resident, holes, len(elsewhere)))
if elsewhere:
    sys.exit("pages neither resident nor holes (still swapped?): %r" % elsewhere[:10])
if resident < n - len(zero):
    sys.exit("only %d pages resident, the image has %d non-zero pages" % (resident, n - len(zero)))
PY
command -v fincore >/dev/null && say "fincore: $(fincore -n -o PAGES,SIZE "$RAM" | tr -s ' ')"
assert_same_file "$T/src.img" "$RAM" "RAM file after swapoff"
say "ok: after swapoff the RAM file is in memory and equals the image"
py "$T/src.log" "$T/zero-pages" "$NPAGES" <<'PY' || fail "the source reads over the whole run are wrong (see above)"
import sys
from collections import Counter
from nbdtest import source_requests
log, zl, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
P = 4096
zero = set(int(x) for x in open(zl).read().split())
covered = Counter()
reads = [(o, c) for cmd, o, c in source_requests(log, 0) if cmd == "Read"]
for o, c in reads:
    for p in range(o // P, (o + c + P - 1) // P):
        covered[p] += 1
print("[56-swap-stage] source over the whole run: %d reads, %d bytes" % (len(reads), sum(c for o, c in reads)))
twice = [p for p, k in covered.items() if k > 1]
if twice:
    sys.exit("pages read from the source more than once: %r" % twice[:10])
if set(covered) & zero:
    sys.exit("zero pages read from the source: %r" % sorted(set(covered) & zero)[:10])
missing = set(range(n)) - zero - set(covered)
if missing:
    sys.exit("non-zero pages never read from the source: %r" % sorted(missing)[:10])
PY
say "ok: every non-zero source page was read exactly once, no zero page at all"

# --- nothing left -----------------------------------------------------------------------------------
# (other tests may take the same loop device number as soon as it is free: look for this run's
# nbdfuse file, not for the device name)
"$ROOT/scripts/detach" "$dev"
stop_server_ok swapd
daemon_pid=${SRV_PID[swapd]}
rm "$RAM"
[ -z "$(losetup -j "$fuse_dir/nbd" 2>/dev/null)" ] || fail "a loop device is still on $fuse_dir/nbd: $(losetup -j "$fuse_dir/nbd")"
losetup -a | grep -qF "$fuse_dir/nbd" && fail "a loop device still refers to $fuse_dir/nbd: $(losetup -a | grep -F "$fuse_dir/nbd")"
mountpoint -q "$fuse_dir" && fail "nbdfuse is still mounted on $fuse_dir"
grep -qF " $fuse_dir " /proc/mounts && fail "$fuse_dir is still in /proc/mounts"
for ((i = 0; i < 100; i++)); do kill -0 "$fuse_pid" 2>/dev/null || break; sleep 0.05; done
kill -0 "$fuse_pid" 2>/dev/null && fail "nbdfuse (pid $fuse_pid) still running"
kill -0 "$daemon_pid" 2>/dev/null && fail "the daemon (pid $daemon_pid) still running"
[ -z "$(ls -A "$NBD_UMEMD_STATE_DIR/attached")" ] || fail "state left behind: $(ls "$NBD_UMEMD_STATE_DIR/attached")"
[ ! -e "$RAM" ] || fail "$RAM still exists"
say "ok: swapoff ${swapoff_ms} ms; no swap entry, loop device, FUSE mount, nbdfuse or daemon left"
pass
