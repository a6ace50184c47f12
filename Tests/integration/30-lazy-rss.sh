#!/bin/bash
# Memory of a lazy daemon over a big sparse source: a 4 GiB image (truncate) with 4 regions of random
# data (5 MiB in all, some unaligned to the fetch window) served by `nbdkit file`. nbdcopy reads the
# whole export to null: (with extents, then --no-extents: every byte), samples are compared with the image, then:
#  - the daemon's peak RSS (VmHWM) is < 64 MiB;
#  - status says complete (no absent page), the log says "every page is local";
#  - the source was read for about the allocated data only: <= data + 2 fetch windows per region.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/lazylib.sh"
require_lazy

FETCH=$((64 * 1024))
IMG="$T/big.img"
truncate -s 4G "$IMG"
# offset:MiB of random data (offsets in bytes; two of them not 64 KiB aligned)
REGIONS=("0:1" "$((1024 * 1048576 + 12 * 4096)):1" "$((2560 * 1048576 + 5 * 4096)):2" "$((4096 * 1048576 - 1048576)):1")
DATA=0
for r in "${REGIONS[@]}"; do
    off=${r%%:*} mib=${r##*:}
    head -c "$((mib * 1048576))" /dev/urandom | dd of="$IMG" bs=4096 seek="$((off / 4096))" conv=notrunc status=none
    DATA=$((DATA + mib * 1048576))
done
alloc=$(( $(stat -c %b "$IMG") * $(stat -c %B "$IMG") ))
say "source image: $(stat -c %s "$IMG") bytes, $alloc allocated, $DATA bytes of data in ${#REGIONS[@]} regions"

start_source src "$IMG"
mark=$(log_lines "$T/src.log")
serve_lazy lazy src "$T/store" --fetch-size 64K --control "$T/lazy.ctl"
pid=${SRV_PID[lazy]}

start=$(date +%s)
tmo 240 nbdcopy "$(uri lazy)" null: || fail "nbdcopy $(uri lazy) null: failed"
say "nbdcopy of 4 GiB to null: took $(($(date +%s) - start)) s"

# compare the data regions, their edges and a few hole pages with the image
nbdsh_py "$(uri lazy)" "$IMG" "${REGIONS[@]}" <<'PY'
import random
f = open(sys.argv[1], "rb")
P = 4096
def img(off, n):
    f.seek(off)
    return f.read(n)
size = h.get_size()
check(size == 4 << 30, "export size %d, expected 4 GiB" % size)
for a in sys.argv[2:]:
    off, mib = (int(x) for x in a.split(":"))
    lo, hi = max(0, off - 16 * P), min(size, off + mib * 1048576 + 16 * P)
    check_data(img(lo, hi - lo), h.pread(hi - lo, lo), "data region at %#x (+- 64 KiB)" % off)
rnd = random.Random(30)
for _ in range(64):
    p = rnd.randrange(size // P)
    check_data(img(p * P, P), h.pread(P, p * P), "sample page %d" % p)
PY

# check_mem WHAT: print VmHWM/VmRSS of the daemon; VmHWM must be < 64 MiB.
check_mem() {
    local hwm rss
    hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
    say "daemon VmHWM ${hwm} KiB ($((hwm / 1024)) MiB), VmRSS ${rss} KiB ($((rss / 1024)) MiB) after $1"
    [ "$hwm" -lt $((64 * 1024)) ] || fail "daemon peak RSS (VmHWM) is $((hwm / 1024)) MiB after $1, expected < 64 MiB"
}
check_mem "nbdcopy of the 4 GiB lazy export"

# once more reading every byte (--no-extents: the holes are read too, 4 GiB through the daemon),
# with at most 2 x 8 requests of 256 KiB in flight
start=$(date +%s)
tmo 240 nbdcopy --no-extents --connections=2 --requests=8 "$(uri lazy)" null: \
    || fail "nbdcopy --no-extents $(uri lazy) null: failed"
say "nbdcopy --no-extents of 4 GiB to null: took $(($(date +%s) - start)) s"
check_mem "nbdcopy --no-extents (every byte) of the 4 GiB lazy export"

lz_wait_grep 'every page is local' "$T/lazy.log" 10 \
    || { lz_status lazy "$T/s.json"; cat "$T/s.json" >&2; fail "no 'every page is local' in the daemon log within 10 s of reading the whole export"; }
lz_wait_status lazy "$T/s.json" 'j["complete"] is True' 5 || true
say "status: $(tr -d ' \n' <"$T/s.json")"
assert_eq "status complete after reading the whole export" true "$(json_get "$T/s.json" 'j["complete"]')"
assert_eq "status pages.absent after reading the whole export" 0 "$(json_get "$T/s.json" 'j["pages"]["absent"]')"

readb=$(source_read_bytes "$T/src.log" "$mark")
nreads=$(source_reads "$T/src.log" "$mark" | wc -l)
limit=$((DATA + 2 * FETCH * ${#REGIONS[@]}))
say "source: $nreads reads, $readb bytes (data $DATA, limit $limit); status bytes_pulled $(json_get "$T/s.json" 'j["bytes_pulled"]')"
[ "$readb" -ge "$DATA" ] || fail "the source was read for $readb bytes, less than the $DATA bytes of data"
[ "$readb" -le "$limit" ] || fail "the source was read for $readb bytes for $DATA bytes of data (limit data + 2 fetch windows per region = $limit)"
assert_alive lazy

# the store must not have become a 4 GiB dense file
store_kib=$(du -sk "$T/store" | awk '{print $1}')
say "store directory uses $store_kib KiB on disk"
stop_server_ok lazy
pass
