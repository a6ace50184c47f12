#!/bin/bash
# Lazy export of a sparse source (64 MiB, three 256 KiB data regions, served by nbdkit file with
# base:allocation): nbdcopy of the whole export equals the image, and the source is read only
# around the data: total bytes read <= data + 2 x fetch size per region (holes are never read).
. "$(dirname "$0")/lib.sh"
require_lazy

FETCH=65536                       # the default --fetch-size
REGION=$((256 * 1024))
OFFSETS=($((1048576 + 12288)) $((30 * 1048576)) $((64 * 1048576 - REGION)))
truncate -s 64M "$T/src.img"
for off in "${OFFSETS[@]}"; do
    head -c "$REGION" /dev/urandom | dd of="$T/src.img" bs=4096 seek=$((off / 4096)) conv=notrunc status=none
done
alloc=$(($(stat -c %b "$T/src.img") * $(stat -c %B "$T/src.img")))
say "source: 64 MiB, ${#OFFSETS[@]} data regions of $REGION bytes, $alloc bytes allocated"
[ "$alloc" -le $((4 * REGION)) ] || fail "test setup: the source image is not sparse ($alloc bytes allocated)"

start_source src "$T/src.img"
# the source itself reports the holes (otherwise this test proves nothing)
nbdsh_py "$(uri src)" <<'PY'
ext = block_status_list(h, h.get_size(), 0)
holes = sum(l for l, f in ext if f & nbd.STATE_HOLE)
check(holes >= 60 * MiB, "test setup: the nbdkit source reports only %d bytes of holes: %r" % (holes, ext[:10]))
PY
mark=$(log_lines "$T/src.log")

serve_lazy lazy src "$T/store"
tmo 120 nbdcopy "$(uri lazy)" "$T/out.img" || fail "nbdcopy lazy export -> file failed"
assert_same_file "$T/src.img" "$T/out.img" "nbdcopy of the lazy export of a sparse source"
say "ok: nbdcopy output equals the image"

source_reads "$T/src.log" "$mark" >"$T/reads.txt"
total=$(source_read_bytes "$T/src.log" "$mark")
data=$((${#OFFSETS[@]} * REGION))
limit=$((data + ${#OFFSETS[@]} * 2 * FETCH))
say "source reads: $(wc -l <"$T/reads.txt") requests, $total bytes (data $data, limit $limit)"
if [ "$total" -gt "$limit" ]; then
    awk '{ printf "  read offset=%d count=%d\n", $1, $2 }' "$T/reads.txt" | head -n 40 >&2
    fail "copying the lazy export read $total bytes from the source; expected <= $limit (data $data + 2 x fetch size per region)"
fi
# every source read must touch a data region's fetch-aligned neighbourhood, never a pure hole
while read -r off cnt; do
    ok=0
    for d in "${OFFSETS[@]}"; do
        lo=$((d / FETCH * FETCH)); hi=$(((d + REGION + FETCH - 1) / FETCH * FETCH))
        if [ "$off" -ge "$lo" ] && [ $((off + cnt)) -le "$hi" ]; then ok=1; break; fi
    done
    [ "$ok" -eq 1 ] || fail "source read offset=$off count=$cnt lies (partly) outside every data region's fetch-aligned range"
done <"$T/reads.txt"
say "ok: only the data regions were read from the source"

# copying again reads nothing more
mark2=$(log_lines "$T/src.log")
rm -f "$T/out.img"
tmo 120 nbdcopy "$(uri lazy)" "$T/out.img" || fail "second nbdcopy failed"
assert_same_file "$T/src.img" "$T/out.img" "second nbdcopy of the lazy export"
again=$(source_read_bytes "$T/src.log" "$mark2")
assert_eq "bytes read from the source by a second full copy" 0 "$again"
say "ok: second copy read nothing from the source"
assert_alive lazy
pass
