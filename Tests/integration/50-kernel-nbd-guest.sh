#!/bin/bash
# The real Linux kernel NBD client (nbd.ko + nbd-client), in a QEMU TCG guest, against nbd-umemd:
#  (a) swap: a RAM export (--memory 512M) on TCP is the guest's swap device /dev/nbd0, and a process
#      writes and verifies more anonymous memory than the guest has RAM, so the kernel swaps to it;
#      the guest reports its peak swap use, and afterwards the host finds the swapped-out pages (with
#      the right contents) in the daemon's RAM export;
#  (b) lazy mmap: a lazy export (--source nbdkit, --fetch-size 4K, --prefetch off) of a 64 MiB
#      pattern image is /dev/nbd1; the guest mmaps it MAP_PRIVATE with MADV_RANDOM and checks pages
#      7,1,6,2,0,5,3,4; the source's log must show exactly those 4 KiB pages pulled, in fault order;
#  (c) TLS: a file export under --tls require --tls-verify-peer (x509) is /dev/nbd2 through
#      nbd-client's own TLS proxy (-cacertfile, -certfile, -keyfile; GnuTLS); nbd-client without
#      them must be refused; the guest checks pages 9,0,5 of a pattern image and writes one page,
#      which the host then finds in the file.
# Needs root, qemu-system-x86, busybox-static, cpio, nbd-client (installed if missing) and the
# Debian kernel image (downloaded once into .build/guest), see scripts/lib/guest.sh.
#
# Knobs for checking that the test can fail (defaults are the real test):
#   KGUEST_SEED=N        the seed the guest expects on /dev/nbd1 (the image is written with 7)
#   KGUEST_ANON=SIZE     the anonymous memory the guest writes (default 160M, guest RAM 128M)
#   KGUEST_LAZY_ARGS=... extra `serve` arguments for the lazy daemon (e.g. "--prefetch sequential")
#   KGUEST_MAX_PART=N    nbd.ko max_part in the guest (default 0: no partition scan; see below)
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/lazylib.sh"
# shellcheck source=../../scripts/lib/guest.sh
. "$ROOT/scripts/lib/guest.sh"
require_lazy

# secs_since NS: seconds (one decimal) since NS, a `date +%s%N` value.
secs_since() { local d=$(($(date +%s%N) - $1)); printf '%d.%d' $((d / 1000000000)) $((d / 100000000 % 10)); }
T0=$(date +%s%N)
IMG_SEED=7
EXPECT_SEED=${KGUEST_SEED:-$IMG_SEED}
ANON_SEED=3
ANON=${KGUEST_ANON:-160M}
GUEST_MEM=128           # MiB; the kernel leaves about 80 MiB of it to user space
PAGES=7,1,6,2,0,5,3,4
MAX_PART=${KGUEST_MAX_PART:-0}   # nbd.ko max_part: 0 turns off partition scanning of /dev/nbdN

guest_kit
ensure_packages gnutls-bin   # certtool
build_mmap_tool
say "guest kernel $GUEST_KVER"

# --- host side: the two daemons and the source ----------------------------------------------------
SWAP_PORT=$(free_port)
LAZY_PORT=$(free_port)
while [ "$LAZY_PORT" = "$SWAP_PORT" ]; do LAZY_PORT=$(free_port); done
TLS_PORT=$(free_port)
while [ "$TLS_PORT" = "$SWAP_PORT" ] || [ "$TLS_PORT" = "$LAZY_PORT" ]; do TLS_PORT=$(free_port); done
TLS_SEED=5

start_server swap --memory 512M --port "$SWAP_PORT" --bind 127.0.0.1 --verbose

"$NBD_MMAP" fill "$T/src.img" --size 64M --pattern "$IMG_SEED" >/dev/null || fail "nbd-mmap fill failed"
start_source src "$T/src.img"
mark0=$(log_lines "$T/src.log")
# shellcheck disable=SC2086   # KGUEST_LAZY_ARGS is a word list on purpose
start_server lazy --source "$(uri src)" --store "$T/store" --fetch-size 4K --prefetch off \
    --port "$LAZY_PORT" --bind 127.0.0.1 --control "$T/lazy.ctl" ${KGUEST_LAZY_ARGS:-}

make_pki "$T/pki"
mkdir -p "$T/guest-pki"
cp "$T/pki/ca-cert.pem" "$T/pki/client-cert.pem" "$T/pki/client-key.pem" "$T/guest-pki/"
"$NBD_MMAP" fill "$T/tls.img" --size 16M --pattern "$TLS_SEED" >/dev/null || fail "nbd-mmap fill (tls.img) failed"
start_server tls --file "$T/tls.img" --port "$TLS_PORT" --bind 127.0.0.1 \
    --tls require --tls-certificates "$T/pki" --tls-verify-peer

# --- the guest's /init ------------------------------------------------------------------------------
cat >"$T/init" <<'INIT'
#!/bin/sh
# /init of the 50-kernel-nbd-guest VM (busybox). Lines the host checks start with "GUEST" or "VERDICT".
. /lib/guest-init.sh   # PATH, /dev, /proc, /sys, say, bye

# Parameters from the kernel command line: umemd.swap=PORT umemd.lazy=PORT umemd.anon=SIZE ...
for w in $(cat /proc/cmdline); do
    case "$w" in
    umemd.swap=*) SWAP_PORT=${w#*=} ;;
    umemd.lazy=*) LAZY_PORT=${w#*=} ;;
    umemd.anon=*) ANON=${w#*=} ;;
    umemd.anonseed=*) ANON_SEED=${w#*=} ;;
    umemd.seed=*) SEED=${w#*=} ;;
    umemd.pages=*) PAGES=${w#*=} ;;
    umemd.maxpart=*) MAX_PART=${w#*=} ;;
    umemd.tls=*) TLS_PORT=${w#*=} ;;
    umemd.tlsseed=*) TLS_SEED=${w#*=} ;;
    esac
done
[ -n "$SWAP_PORT" ] && [ -n "$LAZY_PORT" ] && [ -n "$TLS_PORT" ] && [ -n "$TLS_SEED" ] && [ -n "$ANON" ] && [ -n "$SEED" ] && [ -n "$PAGES" ] && [ -n "$MAX_PART" ] \
    || bye "missing umemd.* parameters in /proc/cmdline: $(cat /proc/cmdline)"

for m in $(cat /lib/modules/order); do
    args=
    [ "$m" = nbd ] && args="max_part=$MAX_PART"
    insmod "/lib/modules/$m.ko" $args || bye "insmod $m $args"
done
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up && ip route add default via 10.0.2.2 \
    || bye "network setup"
# The kernel sends swapped-out pages over TCP with memory from the reserve vm.min_free_kbytes sizes
# (GFP_NOIO|__GFP_MEMALLOC). This kernel's default at 128 MiB of RAM is about 1 MiB, and with the
# writer below that reserve can run dry: "page allocation failure ... __GFP_MEMALLOC" in
# tcp_sendmsg, kblockd blocked, the guest hung (3 of 28 runs; none of 8 with 8 MiB and the host busy).
# 8 MiB is what README's remote swap rules ask of a small host.
echo 8192 >/proc/sys/vm/min_free_kbytes || bye "vm.min_free_kbytes"
say "up: $(awk '/^MemTotal/ {print "MemTotal", $2, "kB"}' /proc/meminfo)"

# (a) swap on the RAM export
nbd-client 10.0.2.2 "$SWAP_PORT" /dev/nbd0 -b 4096 -swap || bye "nbd-client /dev/nbd0"
mkswap /dev/nbd0 >/dev/null || bye "mkswap /dev/nbd0"
swapon /dev/nbd0 || bye "swapon /dev/nbd0"
say "swap on /dev/nbd0: $(awk '$1 == "/dev/nbd0" {print "size", $3, "kB"}' /proc/swaps)"
swap_used() { awk '$1 == "/dev/nbd0" {print $4}' /proc/swaps; }
# Write ANON of anonymous memory (more than the guest's RAM), then (after READY, when all of it has
# been written and the swap use is at its peak) verify it once.
nbd-mmap anon --size "$ANON" --seed "$ANON_SEED" --passes 0 --wait-file /tmp/verify >/tmp/anon.out 2>&1 &
anon=$!
while ! grep -q READY /tmp/anon.out; do
    kill -0 $anon 2>/dev/null || break
    sleep 0.2
done
peak=$(swap_used)
touch /tmp/verify
wait $anon
status=$?
after=$(swap_used)
[ "${after:-0}" -gt "${peak:-0}" ] && peak=$after
grep -v READY /tmp/anon.out
say "nbd-mmap anon exit status $status"
cat /proc/swaps
say "swap-used-kb=${peak:-0}"
swapoff /dev/nbd0 || bye "swapoff /dev/nbd0"
nbd-client -d /dev/nbd0 >/dev/null 2>&1

# (b) the lazy export, mmapped page by page
nbd-client 10.0.2.2 "$LAZY_PORT" /dev/nbd1 -b 4096 || bye "nbd-client /dev/nbd1"
say "nbd1 size $(blockdev --getsize64 /dev/nbd1)"
nbd-mmap check /dev/nbd1 --pages "$PAGES" --expect-pattern "$SEED" --private
nbd-client -d /dev/nbd1 >/dev/null 2>&1

# (c) TLS through nbd-client's proxy: refused without credentials, then read and write with them
if nbd-client 10.0.2.2 "$TLS_PORT" /dev/nbd2 -b 4096 >/tmp/plain.out 2>&1; then
    say "tls-plain-attached"
    nbd-client -d /dev/nbd2 >/dev/null 2>&1
else
    say "tls-plain-refused: $(tr "\n" " " </tmp/plain.out | tail -c 160)"
fi
nbd-client 10.0.2.2 "$TLS_PORT" /dev/nbd2 -b 4096 -cacertfile /pki/ca-cert.pem -certfile /pki/client-cert.pem \
    -keyfile /pki/client-key.pem -tlshostname localhost || bye "nbd-client /dev/nbd2 over TLS"
nbd-mmap check /dev/nbd2 --pages 9,0,5 --expect-pattern "$TLS_SEED" --private
printf 'GUEST-TLS-WRITE' >/tmp/page
dd if=/tmp/page of=/dev/nbd2 bs=4096 seek=256 conv=sync,notrunc 2>/dev/null || bye "dd to /dev/nbd2"
sync
blockdev --flushbufs /dev/nbd2
nbd-client -d /dev/nbd2 >/dev/null 2>&1
say "tls-done"
echo "GUEST-DONE"
poweroff -f
INIT

guest_initramfs "$T/initrd.gz" "$T/init" "tree:$T/guest-pki:/pki"
say "initramfs ready ($(( $(stat -c %s "$T/initrd.gz") / 1024 )) KiB) after $(secs_since "$T0") s"

# --- boot ------------------------------------------------------------------------------------------
B0=$(date +%s%N)
rc=0
guest_boot "$T/initrd.gz" "$T/console.log" "$GUEST_MEM" \
    "umemd.swap=$SWAP_PORT umemd.lazy=$LAZY_PORT umemd.anon=$ANON umemd.anonseed=$ANON_SEED umemd.seed=$EXPECT_SEED umemd.pages=$PAGES umemd.maxpart=$MAX_PART umemd.tls=$TLS_PORT umemd.tlsseed=$TLS_SEED" \
    100 || rc=$?
say "guest ran $(secs_since "$B0") s, qemu exit status $rc"
# The console without CRs and terminal escapes (SeaBIOS clears the screen).
guest_console_text "$T/console.log" "$T/console.txt"
grep -aE '^(GUEST|VERDICT|anon|page |/dev/nbd|Connected|\[ *[0-9.]+\])' "$T/console.txt" | sed 's/^/  | /'
if [ "$rc" -ne 0 ]; then
    sed 's/^/  qemu: /' "$T/console.log.qemu" >&2
    tail -n 30 "$T/console.txt" >&2
    fail "qemu exit status $rc (124: killed after the time limit)"
fi
! grep -aq '^GUEST FAILED' "$T/console.txt" || fail "the guest's init failed: $(grep -a '^GUEST FAILED' "$T/console.txt")"
grep -aqx 'GUEST-DONE' "$T/console.txt" || { tail -n 30 "$T/console.txt" >&2; fail "the guest did not get to GUEST-DONE"; }
assert_alive swap
assert_alive lazy
assert_alive tls

# --- (a) swap --------------------------------------------------------------------------------------
grep -aq '^VERDICT anon ok' "$T/console.txt" \
    || fail "no 'VERDICT anon ok' on the console: $(grep -a '^VERDICT anon' "$T/console.txt" || echo 'no VERDICT anon line at all')"
used_kb=$(sed -n 's/^GUEST swap-used-kb=\([0-9][0-9]*\)$/\1/p' "$T/console.txt")
[ -n "$used_kb" ] || fail "no 'GUEST swap-used-kb=N' line on the console"
[ "$used_kb" -gt 0 ] || fail "the guest never used its swap on /dev/nbd0 (peak 0 kB): the workload fit in RAM"
say "ok: guest wrote and verified $ANON of anonymous memory in $GUEST_MEM MiB of RAM, peak swap use $used_kb kB"

# The swapped-out pages must really be in the daemon's RAM export: each page of the workload starts
# with the word 0x4e42444d4d415000 + seed and has its page index in word 1 (see nbd-mmap.c). Count
# those pages in the export, and check a sample of them word for word. The swap signature written by
# mkswap must be there too.
py "nbd://127.0.0.1:$SWAP_PORT/" "$ANON_SEED" "$used_kb" <<'PY' || fail "the swap export does not hold the guest's swapped-out pages (see above)"
import struct, sys, nbd
uri, seed, used_kb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
from nbdtest import mmap_magic, mmap_page
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
magic = mmap_magic(seed)
found = []   # (export offset, workload page index)
CH = 4 << 20
for off in range(0, size, CH):
    buf = h.pread(min(CH, size - off), off)
    i = buf.find(magic)
    while i >= 0:
        if i % 4096 == 0:
            found.append((off + i, struct.unpack_from("<Q", buf, i + 8)[0]))
        i = buf.find(magic, i + 1)
sig = h.pread(10, 4086)
if sig != b"SWAPSPACE2":
    sys.exit("the export has no mkswap signature at offset 4086 (found %r): the guest's writes did not land" % sig)
bad = []
step = max(1, len(found) // 200)
for off, p in found[::step]:
    if h.pread(4096, off) != mmap_page(seed, p):
        bad.append((off, p))
h.shutdown()
print("[50-kernel-nbd-guest] swap export: %d workload pages stored (%d kB), %d of them checked word for word"
      % (len(found), len(found) * 4, len(found[::step])))
if bad:
    sys.exit("swapped-out pages in the export differ from the workload's: %r" % bad[:5])
# Every swap slot the guest counted at its peak was allocated for a workload page being written out;
# allow for slots freed or reused before their write reached the export.
if len(found) * 4 < used_kb // 2:
    sys.exit("only %d kB of workload pages in the export, the guest used %d kB of swap" % (len(found) * 4, used_kb))
PY
say "ok: the daemon's RAM export holds the guest's swapped-out pages"

# --- (b) lazy mmap ---------------------------------------------------------------------------------
grep -aq "^VERDICT check ok pages=8 MAP_PRIVATE" "$T/console.txt" \
    || fail "no 'VERDICT check ok pages=8' on the console: $(grep -a '^VERDICT check' "$T/console.txt" || echo 'no VERDICT check line at all')"
# What the source saw after the daemon started. The daemon itself sends one Extents query at start;
# every Read must be one of the 8 pages, 4 KiB each, in the guest's fault order: MADV_RANDOM gives
# one 4 KiB fault per page, and --fetch-size 4K --prefetch off makes each miss one source read.
# Partition scanning is off in the guest (nbd max_part=0): with it on (KGUEST_MAX_PART=16), opening
# /dev/nbd1 makes the kernel read the partition tables first (Debian's 6.1 kernel reads pages 0, 1
# and 3: sectors 0-15 for Amiga RDB, sector 31 for Ultrix), and those reads are accepted only as a
# prefix within the first 16 KiB, with the pages they pulled missing from the fault order after it.
py "$T/src.log" "$mark0" "$PAGES" "$MAX_PART" <<'PY' || fail "the source log does not show the 8 pages pulled lazily (see above)"
import sys
from nbdtest import source_requests
log, mark, order, max_part = sys.argv[1], int(sys.argv[2]), [int(p) for p in sys.argv[3].split(",")], int(sys.argv[4])
P = 4096
reqs = source_requests(log, mark)
others = [r for r in reqs if r[0] not in ("Read", "Extents")]
if others:
    sys.exit("the source got requests other than reads: %r" % others[:10])
reads = [(o, c) for (cmd, o, c) in reqs if cmd == "Read"]
shown = ", ".join("page %d+%d" % (o // P, c) for o, c in reads[:16]) + (", ..." if len(reads) > 16 else "")
print("[50-kernel-nbd-guest] source reads: %s (%d reads, %d bytes of the 64 MiB image)"
      % (shown or "none", len(reads), sum(c for o, c in reads)))
scan = []
if max_part:
    while reads and reads[0][0] + reads[0][1] <= 16384 and reads[0][0] != order[0] * P:
        scan.append(reads.pop(0))
    if scan:
        print("[50-kernel-nbd-guest] partition scan read: %s" % ", ".join("page %d" % (o // P) for o, c in scan))
bad = [(o, c) for o, c in reads if o % P or c != P]
if bad:
    sys.exit("source reads that are not single 4 KiB pages: %r" % bad[:10])
expect = [p for p in order if (p * P, P) not in scan]
got = [o // P for o, c in reads]
if got != expect:
    sys.exit("source read pages %r, expected exactly %r (the guest's fault order)" % (got, expect))
PY
# The daemon's own account must agree: 8 demand misses, 8 pages present, 32 KiB pulled.
lz_status lazy "$T/lazy.json"
"$PY" - "$T/lazy.json" <<'PY' || fail "the lazy daemon's status disagrees with the source log (see above)"
import json, sys
j = json.load(open(sys.argv[1]))
got = (j["demand_misses"], j["pages"]["present"], j["bytes_pulled"])
print("[50-kernel-nbd-guest] lazy daemon: demand_misses=%d pages.present=%d bytes_pulled=%d miss latency p50=%sus p99=%sus"
      % (got + (j.get("miss_latency_p50_us"), j.get("miss_latency_p99_us"))))
if got != (8, 8, 8 * 4096):
    sys.exit("lazy daemon status: (demand_misses, pages.present, bytes_pulled) = %r, expected (8, 8, 32768)" % (got,))
PY
say "ok: the lazy export pulled exactly pages $PAGES from the source, one 4 KiB read each, in fault order"

# --- (c) TLS -----------------------------------------------------------------------------------------
grep -aq '^GUEST tls-plain-refused' "$T/console.txt" \
    || fail "nbd-client without TLS credentials was not refused by --tls require: $(grep -a '^GUEST tls-plain' "$T/console.txt" || echo 'no line')"
grep -aq "^VERDICT check ok pages=3 MAP_PRIVATE" "$T/console.txt" \
    || fail "no 'VERDICT check ok pages=3' for /dev/nbd2 over TLS: $(grep -a '^VERDICT check' "$T/console.txt" | tail -n 1)"
grep -aq '^GUEST tls-done' "$T/console.txt" || fail "the guest did not finish the TLS part"
got=$(dd if="$T/tls.img" bs=4096 skip=256 count=1 2>/dev/null | head -c 15)
[ "$got" = "GUEST-TLS-WRITE" ] || fail "the guest's write over TLS is not in the file at 1 MiB (found '$got')"
grep -q "TLS handshake with .* failed\|TLS error" "$T/tls.log" && fail "the TLS server logged a failure: $(grep 'TLS' "$T/tls.log" | tail -n 3)"
say "ok: the kernel client through nbd-client's TLS proxy (x509, client certificate checked) read 3 pattern pages and wrote one; without credentials it was refused"

say "elapsed $(secs_since "$T0") s"
pass
