#!/bin/bash
# Background pull (--prefetch adaptive) of a sparse source with no client at all: the daemon must
# make the whole export local by itself. The source (128 MiB, served by nbdkit file with
# base:allocation) has data regions of various sizes and alignments (one of them allocated zeros,
# which the source reports as data) and holes everywhere else. Checked: status reaches "complete"
# (prefetch_state "done", progress 1.0, no absent page, source disconnected, "every page is local"
# logged once); the source log shows every data page read exactly once (no 4 KiB page covered by two
# reads, every data page covered, the read counts add up to the data bytes, each read at most one
# 1 MiB batch) and no read touching a hole (holes are marked from the extent map, never read); the
# background byte counters agree with that. Finally the source is stopped and nbdcopy of the export
# equals the image: everything really is local.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/lazylib.sh"
require_lazy

SIZE_MIB=128
P=4096
MiB=1048576
# data regions "OFFSET LENGTH" (page-aligned: the file system allocates whole pages): batch-aligned,
# inside one batch, across batch boundaries, a single page, the last pages; one of allocated zeros
REGIONS=(
    "0 $MiB"
    "$((5 * MiB + P)) $((300 * 1024))"
    "$((40 * MiB - 2 * P)) $((3 * MiB + 4 * P))"
    "$((64 * MiB + 3 * P)) $P"
    "$((100 * MiB + 5 * P)) $((1536 * 1024 + 7 * P))"
    "$((SIZE_MIB * MiB - 2 * P)) $((2 * P))"
)
ZERO_REGION="$((90 * MiB)) $((512 * 1024))"
truncate -s "${SIZE_MIB}M" "$T/src.img"
for r in "${REGIONS[@]}"; do
    read -r off len <<<"$r"
    head -c "$len" /dev/urandom | dd of="$T/src.img" bs=$P seek=$((off / P)) conv=notrunc status=none
done
read -r zoff zlen <<<"$ZERO_REGION"
dd if=/dev/zero of="$T/src.img" bs=$P seek=$((zoff / P)) count=$((zlen / P)) conv=notrunc status=none
alloc=$(($(stat -c %b "$T/src.img") * $(stat -c %B "$T/src.img")))
say "source: $SIZE_MIB MiB, ${#REGIONS[@]} random regions + 1 allocated-zero region, $alloc bytes allocated"

start_source src "$T/src.img"
# The source's own extent map is the reference: it must show exactly the regions as data (otherwise
# the image is not sparse the way this test needs and it would prove nothing).
printf '%s\n' "${REGIONS[@]}" "$ZERO_REGION" >"$T/regions.txt"
nbdsh_py "$(uri src)" "$T/regions.txt" "$T/data-extents.txt" <<'PY'
size = h.get_size()
want = sorted(tuple(map(int, l.split())) for l in open(sys.argv[1]) if l.strip())
ext, off = [], 0
while off < size:
    for l, f in block_status_list(h, size - off, off):
        ext.append((off, l, f))
        off += l
data = []
for o, l, f in ext:
    if f & nbd.STATE_HOLE:
        continue
    if data and data[-1][0] + data[-1][1] == o:
        data[-1] = (data[-1][0], data[-1][1] + l)
    else:
        data.append((o, l))
check(data == want, "test setup: the source's data extents are %r, expected the regions %r" % (data, want))
with open(sys.argv[2], "w") as f:
    for o, l in data:
        f.write("%d %d\n" % (o, l))
PY
data_bytes=$(awk '{ s += $2 } END { print s }' "$T/data-extents.txt")
[ "$data_bytes" -eq "$alloc" ] || fail "test setup: data extents add up to $data_bytes bytes, but the image has $alloc bytes allocated"
# nbdkit logs the setup client's Disconnect after that client has gone: wait for it, or it lands
# after the mark and is counted against the daemon's connections below
for ((i = 0; i < 100; i++)); do
    [ "$(grep -c ' Connect ' "$T/src.log")" -eq "$(grep -c ' Disconnect ' "$T/src.log")" ] && break
    sleep 0.05
done
mark=$(log_lines "$T/src.log")

serve_lazy lazy src "$T/store" --prefetch adaptive --control "$T/lazy.ctl"
lz_wait_status lazy "$T/done.json" 'j["complete"] is True' 60 \
    || { cat "$T/done.json" >&2; fail "the export did not become complete within 60 s of the background pull starting (no client)"; }
# the source connections are closed just after "complete": give that a moment
lz_wait_status lazy "$T/done.json" 'j["source_connected"] is False' 10 || true
say "complete: $(tr -d '\n ' <"$T/done.json")"

# jcheck FILE WHAT PYEXPR: PYEXPR (j = parsed status) must be true.
jcheck() {
    local file=$1 what=$2 expr=$3
    "$PY" -c 'import json,sys; j=json.load(open(sys.argv[1])); sys.exit(0 if eval(sys.argv[2]) else 1)' "$file" "$expr" \
        || { printf '[%s] status was: %s\n' "$TEST_NAME" "$(cat "$file")" >&2; fail "$what: expected $expr"; }
}
TOTAL=$((SIZE_MIB * MiB / P))
jcheck "$T/done.json" "prefetch mode" 'j["prefetch"] == "adaptive"'
jcheck "$T/done.json" "prefetch_state once complete" 'j["prefetch_state"] == "done"'
jcheck "$T/done.json" "progress once complete" 'j["progress"] == 1.0'
jcheck "$T/done.json" "pages.absent once complete" 'j["pages"]["absent"] == 0'
jcheck "$T/done.json" "present + local once complete" "j['pages']['present'] + j['pages']['local'] == $TOTAL"
jcheck "$T/done.json" "background_bytes (the data bytes, holes never transferred)" "j['background_bytes'] == $data_bytes"
jcheck "$T/done.json" "bytes_pulled (no client: all of it in the background)" "j['bytes_pulled'] == $data_bytes"
jcheck "$T/done.json" "demand_misses with no client" 'j["demand_misses"] == 0'
jcheck "$T/done.json" "source_connected once complete" 'j["source_connected"] is False'
lz_wait_grep 'every page is local; the source is no longer needed' "$T/lazy.log" 10 \
    || fail "the daemon log has no 'every page is local; the source is no longer needed' once complete"
assert_eq "'every page is local' lines in the daemon log" 1 "$(lz_count 'every page is local' "$T/lazy.log")"
say "ok: status complete, prefetch done, progress 1.0, $data_bytes bytes pulled in the background"

# Every source connection the daemon opened is closed again.
for ((i = 0; i < 100; i++)); do
    conns=$(tail -n +$((mark + 1)) "$T/src.log" | grep -c ' Connect ' || true)
    discs=$(tail -n +$((mark + 1)) "$T/src.log" | grep -c ' Disconnect ' || true)
    [ "$conns" -gt 0 ] && [ "$conns" -eq "$discs" ] && break
    sleep 0.1
done
[ "$conns" -gt 0 ] && [ "$conns" -eq "$discs" ] \
    || fail "once complete the daemon still holds source connections: $conns connects, $discs disconnects in the source log"
say "ok: all $conns source connections closed"

# What the source saw: each data page exactly once, never a hole.
py "$T/src.log" "$mark" "$T/data-extents.txt" "$SIZE_MIB" <<'PY'
import sys
from nbdtest import *
reads = source_reads(sys.argv[1], int(sys.argv[2]))
data = [tuple(map(int, l.split())) for l in open(sys.argv[3]) if l.strip()]
size = int(sys.argv[4]) * MiB
P = 4096
note("%d source reads, %d bytes" % (len(reads), sum(c for _, c in reads)))
check(reads, "the source log shows no Read at all")
is_data = bytearray(size // P)
for o, l in data:
    for p in range(o // P, (o + l) // P):
        is_data[p] = 1
for o, c in reads:
    check(o % P == 0 and c % P == 0 and c > 0, "source read offset=%d count=%d is not whole pages" % (o, c))
    check(c <= MiB, "source read offset=%d count=%d is larger than a 1 MiB batch" % (o, c))
    check(0 <= o and o + c <= size, "source read offset=%d count=%d outside the export" % (o, c))
cover = page_coverage(reads, size, P)
twice = [(p, cover[p]) for p in range(len(cover)) if len(cover[p]) > 1]
check(not twice, "%d page(s) read more than once, e.g. %r" % (len(twice), twice[:5]))
holes_read = [(p, cover[p]) for p in range(len(cover)) if cover[p] and not is_data[p]]
check(not holes_read, "%d hole page(s) read from the source, e.g. page %r" % (len(holes_read), holes_read[:5]))
missing = [p for p in range(len(cover)) if is_data[p] and not cover[p]]
check(not missing, "%d data page(s) never read from the source, e.g. pages %r" % (len(missing), missing[:10]))
total = sum(c for _, c in reads)
want = sum(l for _, l in data)
check(total == want, "the source reads add up to %d bytes, expected the %d data bytes" % (total, want))
PY
say "ok: the source log shows every data page read exactly once and no hole read"

# Everything is local: with the source gone the whole export still reads back equal to the image.
lz_check_local_without_source lazy src "$T/src.img"
assert_alive lazy
pass
