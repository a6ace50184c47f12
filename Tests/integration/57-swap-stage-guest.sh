#!/bin/bash
# Swap-mode staging on the real kernel NBD client: Debian's kernel in a QEMU TCG guest, /dev/nbd0
# connected with nbd-client -swap. A 64 MiB pattern image with zero pages (every 7th page and two
# zero MiBs, all holes) is served by nbdkit with the log filter on the host; inside the guest,
# `nbd-umemd serve --swap-size --swap` pulls from it over TCP (10.0.2.2), `nbd-umemd stage` stages a
# RAM file on the guest's tmpfs, new processes read pages of it in a scrambled order, and swapoff
# brings the rest back. Checks: the STAGED counts; every page read equals the image; the source saw
# exactly the touched non-zero pages during the reads and every non-zero page exactly once over the
# run (none of the zero pages); after swapoff every page of the RAM file is resident or a hole, its
# SHA-256 equals the image's, the guest's /proc/swaps is empty, and the daemon exits 0.
#
# Where the daemon runs: inside the guest, next to the kernel it serves. The stager talks to the
# daemon's control socket (a Unix socket) and must run where the RAM file and the swap device are, so
# a daemon on the host would need its control socket forwarded into the guest; with the daemon in
# the guest, only the source crosses the VM boundary, over plain NBD/TCP, which is also the layout
# of a real destination host (daemon and swap device local, source remote). Its store is on a ramfs,
# whose pages cannot be swapped out to the device the daemon itself serves.
#
# Knobs: KGUEST_STAGE_MIB (RAM file size, default 64), KGUEST_SWAPOFF_CLUSTER (vm.page-cluster for
# swapoff, default 3; the reads run with 0), KGUEST_STAGE_SEED (the pattern the guest expects; the
# image is written with 13: any other value must fail the page check).
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/lazylib.sh"
# shellcheck source=../../scripts/lib/guest.sh
. "$ROOT/scripts/lib/guest.sh"
require_lazy

T0=$(date +%s%N)
P=4096
MIB=${KGUEST_STAGE_MIB:-64}
NPAGES=$((MIB * 256))
SWAPMB=$((MIB + 16))
IMG_SEED=13
EXPECT_SEED=${KGUEST_STAGE_SEED:-$IMG_SEED}
CLUSTER=${KGUEST_SWAPOFF_CLUSTER:-3}
# MiB: the initramfs (the daemon and its Swift libraries unpack to more than the 50% of RAM the
# kernel's rootfs may take at 256 MiB: "Initramfs unpacking failed: write error"), the daemon's ramfs
# store and the RAM file all live in it
GUEST_MEM=512
TOUCH=300         # pages the scrambled readers touch, ZTOUCH of them zero pages
ZTOUCH=30

help=$("$NBD_UMEMD" --help 2>&1) || true
grep -qw stage <<<"$help" || fail "$NBD_UMEMD has no 'stage' command"
guest_kit
build_mmap_tool
say "guest kernel $GUEST_KVER"

# --- the source image: the pattern of seed 13, zero pages punched as holes -------------------------
"$NBD_MMAP" fill "$T/src.img" --size "${MIB}M" --pattern "$IMG_SEED" >/dev/null || fail "nbd-mmap fill failed"
mkdir -p "$T/gdata"
py "$T/src.img" "$NPAGES" "$T/zero-pages" "$T/gdata" "$TOUCH" "$ZTOUCH" <<'PY' || fail "cannot punch the zero pages into the image"
import ctypes, os, random, sys
path, n, zlist, gdata, touch, ztouch = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
P = 4096
zero = set(range(0, n, 7))
for mib in (5, n // 512, n // 512 + 1):
    zero.update(range(mib * 256, mib * 256 + 256))
zero = set(z for z in zero if z < n)
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
fd = os.open(path, os.O_RDWR)
for z in sorted(zero):
    if libc.fallocate(fd, 3, z * P, P) != 0:   # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        sys.exit("fallocate(PUNCH_HOLE) failed: errno %d" % ctypes.get_errno())
os.fsync(fd)
for z in sorted(zero):
    try:
        d = os.lseek(fd, z * P, os.SEEK_DATA)
    except OSError:
        d = n * P
    if d == z * P:
        sys.exit("page %d is not a hole after the punch" % z)
open(zlist, "w").write("\n".join(map(str, sorted(zero))) + "\n")
rng = random.Random(57)
data = rng.sample([p for p in range(n) if p not in zero], touch - ztouch)
zeros = rng.sample(sorted(zero), ztouch)
open(os.path.join(gdata, "touch-data"), "w").write(",".join(map(str, data)))
open(os.path.join(gdata, "touch-zero"), "w").write(",".join(map(str, zeros)))
print("[57-swap-stage-guest] image: %d pages, %d zero (holes)" % (n, len(zero)))
PY
NZERO=$(wc -l <"$T/zero-pages")
NDATA=$((NPAGES - NZERO))
IMG_SHA=$(sha256sum "$T/src.img" | cut -d' ' -f1)

PORT=$(free_port)
pid=$(start_nbdkit "$T/src.pid" -i 127.0.0.1 -p "$PORT" --filter=log file "$T/src.img" "logfile=$T/src.log") \
    || fail "nbdkit did not start"
CLEANUP_CMDS+=("stop_pid $pid")

# --- a mincore helper for the guest (static: the guest has busybox only) ---------------------------
cat >"$T/resident.c" <<'C'
/* resident FILE: for every page of FILE, whether it is in memory (mincore of a MAP_SHARED mapping),
 * a hole (SEEK_DATA skips it) or neither (swapped out). Exit status 1 if any page is neither. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: resident FILE\n"); return 2; }
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) { perror(argv[1]); return 2; }
    size_t ps = 4096, n = (size_t)st.st_size / ps, res = 0, holes = 0, other = 0;
    long first = -1;
    unsigned char *v = malloc(n ? n : 1);
    void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    if (!v || m == MAP_FAILED || mincore(m, (size_t)st.st_size, v) < 0) { perror("mmap/mincore"); return 2; }
    for (size_t i = 0; i < n; i++) {
        if (v[i] & 1) { res++; continue; }
        off_t d = lseek(fd, (off_t)(i * ps), SEEK_DATA);
        if (d == (off_t)(i * ps)) { other++; if (first < 0) first = (long)i; } else holes++;
    }
    printf("RESIDENT pages=%zu resident=%zu holes=%zu swapped=%zu first-swapped=%ld\n", n, res, holes, other, first);
    return other ? 1 : 0;
}
C
gcc -O2 -Wall -static -o "$T/resident" "$T/resident.c" || fail "cannot build the mincore helper"

# --- the guest's /init ------------------------------------------------------------------------------
cat >"$T/init" <<'INIT'
#!/bin/sh
# /init of the 57-swap-stage-guest VM (busybox). Lines the host checks start with "GUEST" or "VERDICT".
. /lib/guest-init.sh   # PATH, /dev, /proc, /sys, say
bye() {
    say "FAILED: $*"
    for f in /run/d.log /tmp/stage.err /tmp/stage.out; do [ -f $f ] && sed "s|^|GUEST $f: |" $f; done
    poweroff -f; sleep 60
}
for w in $(cat /proc/cmdline); do
    case "$w" in
    umemd.port=*) PORT=${w#*=} ;;
    umemd.seed=*) SEED=${w#*=} ;;
    umemd.swapmb=*) SWAPMB=${w#*=} ;;
    umemd.cluster=*) CLUSTER=${w#*=} ;;
    esac
done
[ -n "$PORT" ] && [ -n "$SEED" ] && [ -n "$SWAPMB" ] && [ -n "$CLUSTER" ] || bye "missing umemd.* parameters: $(cat /proc/cmdline)"
for m in $(cat /lib/modules/order); do
    args=
    [ "$m" = nbd ] && args="max_part=0"
    insmod "/lib/modules/$m.ko" $args || bye "insmod $m"
done
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up && ip route add default via 10.0.2.2 || bye "network setup"
mkdir -p /dev/shm /store /sys/fs/cgroup
mount -t tmpfs -o size=256m tmpfs /dev/shm || bye "mount tmpfs on /dev/shm"
mount -t ramfs ramfs /store || bye "mount ramfs on /store"
mount -t tmpfs cgroup /sys/fs/cgroup && mkdir /sys/fs/cgroup/memory && mount -t cgroup -o memory memory /sys/fs/cgroup/memory \
    || bye "mount the cgroup-v1 memory controller"
echo 0 >/proc/sys/vm/page-cluster
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
status() { nbd-umemd status --control /run/c.ctl | tr -d ' \n'; }
say "up: MemTotal $(awk '/^MemTotal/ {print $2}' /proc/meminfo) kB zswap=$(cat /sys/module/zswap/parameters/enabled 2>/dev/null)"

t=$(now)
nbd-umemd serve --source "nbd://10.0.2.2:$PORT" --store /store/s --swap-size "${SWAPMB}M" --swap \
    --control /run/c.ctl --unix /run/s.sock --prefetch off --fetch-size 4K --pidfile /run/s.pid 2>/run/d.log &
daemon=$!
wait_daemon $daemon /run/s.pid
say "daemon up after $(since $t) s"
nbd-client -unix /run/s.sock /dev/nbd0 -b 4096 -swap || bye "nbd-client -unix /run/s.sock /dev/nbd0"
mkswap /dev/nbd0 >/dev/null || bye "mkswap /dev/nbd0"
swapon /dev/nbd0 || bye "swapon /dev/nbd0"
say "swap on /dev/nbd0: $(awk '$1 == "/dev/nbd0" {print $3}' /proc/swaps) kB"

t=$(now)
nbd-umemd stage --ram /dev/shm/ram --control /run/c.ctl --device /dev/nbd0 >/tmp/stage.out 2>/tmp/stage.err || bye "nbd-umemd stage exited $?"
say "stage took $(since $t) s"
sed 's/^/GUEST stage: /' /tmp/stage.err
grep '^STAGED ' /tmp/stage.out | sed 's/^/GUEST /'
say "status-staged $(status)"

# scrambled reads of the RAM file, each by a new process: non-zero pages against the pattern, zero
# pages against /dev/zero
t=$(now)
nbd-mmap check /dev/shm/ram --expect-pattern "$SEED" --pages "$(cat /data/touch-data)" --shared >/tmp/c1.out 2>&1
grep -m 5 MISMATCH /tmp/c1.out
grep VERDICT /tmp/c1.out
nbd-mmap check /dev/shm/ram --expect-file /dev/zero --pages "$(cat /data/touch-zero)" --shared >/tmp/c2.out 2>&1
grep -m 5 MISMATCH /tmp/c2.out
grep VERDICT /tmp/c2.out
say "reads took $(since $t) s"
say "status-read $(status)"

echo "$CLUSTER" >/proc/sys/vm/page-cluster
used=$(awk '$1 == "/dev/nbd0" {print $4}' /proc/swaps)
t=$(now)
swapoff /dev/nbd0 || bye "swapoff /dev/nbd0"
say "swapoff used-kb=$used seconds=$(since $t)"
say "swaps-after-swapoff=$(($(wc -l </proc/swaps) - 1))"
resident /dev/shm/ram | sed 's/^/GUEST /'
say "sha256 $(sha256sum /dev/shm/ram | cut -d' ' -f1)"
say "status-end $(status)"
nbd-client -d /dev/nbd0 >/dev/null 2>&1
kill $daemon
wait $daemon
say "daemon-exit=$?"
rm /dev/shm/ram
say "left: swaps=$(($(wc -l </proc/swaps) - 1)) shm-files=$(ls -A /dev/shm | wc -l) nbd0-connected=$([ -e /sys/block/nbd0/pid ] && echo yes || echo no)"
echo "GUEST-DONE"
poweroff -f
INIT

guest_initramfs "$T/initrd.gz" "$T/init" "libs:$NBD_UMEMD" "$T/resident" "tree:$T/gdata:/data"
say "initramfs ready ($(( $(stat -c %s "$T/initrd.gz") >> 20 )) MiB) after $(( ($(date +%s%N) - T0) / 1000000000 )) s"

# --- boot ------------------------------------------------------------------------------------------
B0=$(date +%s%N)
rc=0
guest_boot "$T/initrd.gz" "$T/console.log" "$GUEST_MEM" \
    "zswap.enabled=0 umemd.port=$PORT umemd.seed=$EXPECT_SEED umemd.swapmb=$SWAPMB umemd.cluster=$CLUSTER" 170 || rc=$?
say "guest ran $(( ($(date +%s%N) - B0) / 1000000000 )) s, qemu exit status $rc"
guest_console_text "$T/console.log" "$T/console.txt"
grep -aE '^(GUEST|VERDICT|page .*MISMATCH)' "$T/console.txt" | sed 's/^/  | /'
if [ "$rc" -ne 0 ]; then
    sed 's/^/  qemu: /' "$T/console.log.qemu" >&2
    tail -n 30 "$T/console.txt" >&2
    fail "qemu exit status $rc (124: killed after the time limit)"
fi
! grep -aq '^GUEST FAILED' "$T/console.txt" || fail "the guest's init failed: $(grep -a '^GUEST FAILED' "$T/console.txt")"
grep -aqx 'GUEST-DONE' "$T/console.txt" || { tail -n 30 "$T/console.txt" >&2; fail "the guest did not get to GUEST-DONE"; }

# --- checks ----------------------------------------------------------------------------------------
line() { grep -a "^GUEST $1" "$T/console.txt" | head -n 1 | tr -d '\r'; }
line 'STAGED ' | sed 's/^GUEST STAGED //' >"$T/staged.json"
[ -s "$T/staged.json" ] || fail "no STAGED line from the stager"
assert_eq "STAGED pages" "$NPAGES" "$(json_get "$T/staged.json" 'j["pages"]')"
assert_eq "STAGED staged (non-zero source pages)" "$NDATA" "$(json_get "$T/staged.json" 'j["staged"]')"
assert_eq "STAGED zero_pages" "$NZERO" "$(json_get "$T/staged.json" 'j["zero_pages"]')"
line 'status-staged ' | sed 's/^GUEST status-staged //' >"$T/st-staged.json"
assert_eq "status staging after stage" '"sealed"' "$(json_get "$T/st-staged.json" 'j.get("staging")')"
assert_eq "status staged_slots" "$NDATA" "$(json_get "$T/st-staged.json" 'j.get("staged_slots")')"
say "ok: staged $NDATA non-zero pages, $NZERO zero pages left out"

grep -aq "^VERDICT check ok pages=$((TOUCH - ZTOUCH)) MAP_SHARED" "$T/console.txt" \
    || fail "the scrambled read of non-zero pages did not verify: $(grep -a '^VERDICT check' "$T/console.txt" | head -n 1)"
grep -aq "^VERDICT check ok pages=$ZTOUCH MAP_SHARED" "$T/console.txt" \
    || fail "the scrambled read of zero pages did not verify: $(grep -a '^VERDICT check' "$T/console.txt" | tail -n 1)"
line 'status-read ' | sed 's/^GUEST status-read //' >"$T/st-read.json"
assert_eq "bytes_pulled after the scrambled reads" $(((TOUCH - ZTOUCH) * P)) "$(json_get "$T/st-read.json" 'j.get("bytes_pulled")')"

# The source log in order: the first reads are the scrambled readers' (one 4 KiB read per touched
# non-zero page, page-cluster 0), the rest swapoff's; over the run every non-zero page exactly once.
py "$T/src.log" "$T/zero-pages" "$T/gdata/touch-data" "$NPAGES" <<'PY' || fail "the source reads are wrong (see above)"
import sys
from collections import Counter
from nbdtest import source_requests
log, zl, tl, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
P = 4096
zero = set(int(x) for x in open(zl).read().split())
touched = [int(x) for x in open(tl).read().split(",")]
reqs = source_requests(log, 0)
others = [r for r in reqs if r[0] not in ("Read", "Extents")]
if others:
    sys.exit("the source got requests other than reads and extents: %r" % others[:10])
reads = [(o, c) for cmd, o, c in reqs if cmd == "Read"]
first = reads[:len(touched)]
got = sorted(o // P for o, c in first if c == P)
if len(got) != len(first) or got != sorted(touched):
    sys.exit("the first %d source reads are not the touched pages, 4 KiB each: %r" % (len(touched), first[:10]))
covered = Counter()
for o, c in reads:
    for p in range(o // P, (o + c + P - 1) // P):
        covered[p] += 1
print("[57-swap-stage-guest] source: %d reads, %d bytes; the first %d are the touched pages"
      % (len(reads), sum(c for o, c in reads), len(touched)))
twice = [p for p, k in covered.items() if k > 1]
if twice:
    sys.exit("pages read from the source more than once: %r" % twice[:10])
if set(covered) & zero:
    sys.exit("zero pages read from the source: %r" % sorted(set(covered) & zero)[:10])
missing = set(range(n)) - zero - set(covered)
if missing:
    sys.exit("non-zero pages never read from the source: %r" % sorted(missing)[:10])
PY
say "ok: the source read exactly the touched pages during the scrambled reads, every non-zero page once over the run"

assert_eq "guest swaps after swapoff" 0 "$(sed -n 's/^GUEST swaps-after-swapoff=\([0-9]*\).*/\1/p' "$T/console.txt")"
res=$(line 'RESIDENT ')
[ -n "$res" ] || fail "no RESIDENT line from the guest"
[[ "$res" == *" swapped=0 "* ]] || fail "pages of the RAM file not in memory after swapoff: $res"
resident=$(sed -n 's/.* resident=\([0-9]*\) .*/\1/p' <<<"$res")
[ "${resident:-0}" -ge "$NDATA" ] || fail "only ${resident:-0} pages resident, the image has $NDATA non-zero pages: $res"
assert_eq "SHA-256 of the RAM file after swapoff" "$IMG_SHA" "$(line 'sha256 ' | cut -d' ' -f3)"
line 'status-end ' | sed 's/^GUEST status-end //' >"$T/st-end.json"
assert_eq "status complete after swapoff" true "$(json_get "$T/st-end.json" 'j.get("complete")')"
assert_eq "daemon exit status" 0 "$(sed -n 's/^GUEST daemon-exit=\([0-9]*\).*/\1/p' "$T/console.txt")"
grep -aq '^GUEST left: swaps=0 shm-files=0 nbd0-connected=no' "$T/console.txt" || fail "left behind in the guest: $(line 'left: ')"
say "ok: $(line 'swapoff ' | sed 's/^GUEST //'); $res; SHA-256 equal"
say "elapsed $(( ($(date +%s%N) - T0) / 1000000000 )) s"
pass
