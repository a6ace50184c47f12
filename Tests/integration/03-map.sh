#!/bin/bash
# base:allocation through nbdinfo --map: holes of a sparse --file are reported as holes and data as
# data at the right offsets; a fresh --memory export is all hole; after TRIM / WRITE_ZEROES a
# written range is reported as hole/zero again and reads back as zeroes.
. "$(dirname "$0")/lib.sh"

K=1024 M=1048576

# check_map URI WHAT SPEC: SPEC is a python list of (start, end, allowed_types, exact) rules.
# exact=True: the range must be covered by extents whose type is in allowed_types.
# Adjacent extents are compared after merging equal types.
check_map() {
    local u=$1 what=$2 spec=$3
    tmo 60 nbdinfo --map --json "$u" >"$T/map.json" || fail "$what: nbdinfo --map --json failed"
    "$PY" - "$T/map.json" "$what" "$spec" <<'PY'
import json, sys
ext = json.load(open(sys.argv[1]))
what = sys.argv[2]
rules = eval(sys.argv[3])
# Validate contiguity, then merge equal neighbours.
pos = 0
merged = []
for e in ext:
    if e["offset"] != pos:
        sys.exit("%s: extents not contiguous at %d: %r" % (what, pos, ext))
    pos += e["length"]
    if merged and merged[-1][2] == e["type"]:
        merged[-1][1] = pos
    else:
        merged.append([e["offset"], pos, e["type"]])
errs = []
for start, end, types, in rules:
    for a, b, t in merged:
        if b <= start or a >= end:
            continue
        if t not in types:
            errs.append("[%d, %d) should be type %s, but [%d, %d) is type %d" %
                        (start, end, "/".join(map(str, types)), max(a, start), min(b, end), t))
if pos == 0:
    errs.append("empty map")
if errs:
    print("%s: map (merged) = %s" % (what, [(a, b, t) for a, b, t in merged]), file=sys.stderr)
    for e in errs:
        print("  MISMATCH " + e, file=sys.stderr)
    sys.exit(1)
print("ok: %s: %s" % (what, [(a, b, t) for a, b, t in merged]))
PY
}

DATA=0 HOLEZERO=3 ZERO=2

# ---- 1. sparse file ---------------------------------------------------------------------------
truncate -s 16M "$T/sparse.img"
dd if=/dev/urandom of="$T/sparse.img" bs=64K seek=16 count=1 conv=notrunc status=none    # [1M, 1M+64K)
dd if=/dev/urandom of="$T/sparse.img" bs=64K seek=80 count=2 conv=notrunc status=none    # [5M, 5M+128K)
dd if=/dev/urandom of="$T/sparse.img" bs=4K seek=3072 count=1 conv=notrunc status=none   # [12M, 12M+4K)
cp --sparse=always "$T/sparse.img" "$T/expected.img"
serve_unix file --file "$T/sparse.img"
check_map "$(uri file)" "sparse file" "[
  (0, 1*$M, [$HOLEZERO]),
  (1*$M, 1*$M+64*$K, [$DATA]),
  (1*$M+64*$K, 5*$M, [$HOLEZERO]),
  (5*$M, 5*$M+128*$K, [$DATA]),
  (5*$M+128*$K, 12*$M, [$HOLEZERO]),
  (12*$M, 12*$M+4*$K, [$DATA]),
  (12*$M+4*$K, 16*$M, [$HOLEZERO])]"

# Unaligned query windows also describe the right thing (block status with an offset).
nbdsh_py "$(uri file)" <<PY
M = 1 << 20
ext = block_status_list(h, 2 * M, M - 4096)   # starts 4K before the data at 1M
check(len(ext) >= 1, "no extents")
# Spec: all but the final extent must lie within the request (the final one MAY extend past it).
check(sum(l for l, f in ext[:-1]) < 2 * M, "extents before the last exceed the requested length: %r" % ext)
check(ext[0] == (4096, 3), "first extent of [1M-4K, 3M) should be (4096, hole|zero), got %r" % (ext[:3],))
check(len(ext) >= 2 and ext[1][0] == 65536 and ext[1][1] & 1 == 0,
      "second extent should be 64K of data, got %r" % (ext[:3],))
PY

# TRIM the 128K data range and WRITE_ZEROES the 64K one, then they read as zero and map as hole/zero.
nbdsh_py "$(uri file)" <<PY
M = 1 << 20
h.trim(128 * 1024, 5 * M)
h.zero(64 * 1024, 1 * M)
h.flush()
check_data(bytes(128 * 1024), h.pread(128 * 1024, 5 * M), "read after trim")
check_data(bytes(64 * 1024), h.pread(64 * 1024, 1 * M), "read after write_zeroes")
PY
check_map "$(uri file)" "sparse file after trim/zero" "[
  (0, 12*$M, [$HOLEZERO]),
  (12*$M, 12*$M+4*$K, [$DATA]),
  (12*$M+4*$K, 16*$M, [$HOLEZERO])]"
stop_server_ok file
# The file itself: the 4K block at 12M kept its data, the rest is zero.
dd if=/dev/zero of="$T/expected.img" bs=64K seek=16 count=1 conv=notrunc status=none
dd if=/dev/zero of="$T/expected.img" bs=64K seek=80 count=2 conv=notrunc status=none
assert_same_file "$T/expected.img" "$T/sparse.img" "backing file after trim/zero"

# ---- 2. memory export -------------------------------------------------------------------------
serve_unix mem --memory 64M
check_map "$(uri mem)" "fresh memory export" "[(0, 64*$M, [$HOLEZERO])]"
nbdsh_py "$(uri mem)" <<PY
M = 1 << 20
h.pwrite(pattern(1 * M, 1), 4 * M)
h.pwrite(pattern(2 * M, 2), 10 * M)
h.pwrite(pattern(64 * 1024, 3), 40 * M)
PY
# Written ranges are data; ranges at least 1 MiB away from written data are still holes.
check_map "$(uri mem)" "memory export after writes" "[
  (0, 3*$M, [$HOLEZERO]),
  (4*$M, 5*$M, [$DATA]),
  (6*$M, 9*$M, [$HOLEZERO]),
  (10*$M, 12*$M, [$DATA]),
  (13*$M, 39*$M, [$HOLEZERO]),
  (40*$M, 40*$M+64*$K, [$DATA]),
  (42*$M, 64*$M, [$HOLEZERO])]"
nbdsh_py "$(uri mem)" <<PY
M = 1 << 20
h.trim(1 * M, 4 * M)
h.zero(2 * M, 10 * M)
check_data(bytes(1 * M), h.pread(1 * M, 4 * M), "memory read after trim")
check_data(bytes(2 * M), h.pread(2 * M, 10 * M), "memory read after write_zeroes")
check_data(pattern(64 * 1024, 3), h.pread(64 * 1024, 40 * M), "untouched data")
PY
check_map "$(uri mem)" "memory export after trim/zero" "[
  (0, 4*$M, [$HOLEZERO]),
  (4*$M, 5*$M, [$HOLEZERO]),
  (10*$M, 12*$M, [$HOLEZERO, $ZERO]),
  (12*$M, 39*$M, [$HOLEZERO]),
  (40*$M, 40*$M+64*$K, [$DATA]),
  (42*$M, 64*$M, [$HOLEZERO])]"

# WRITE_ZEROES with NO_HOLE must still read back as zero (may be reported as data or zero).
nbdsh_py "$(uri mem)" <<PY
M = 1 << 20
h.pwrite(pattern(1 * M, 9), 20 * M)
h.zero(1 * M, 20 * M, nbd.CMD_FLAG_NO_HOLE)
check_data(bytes(1 * M), h.pread(1 * M, 20 * M), "read after write_zeroes NO_HOLE")
for l, f in block_status_list(h, 1 * M, 20 * M):
    check(f & 1 == 0 or f & 2, "NO_HOLE zeroed range reported as hole without zero flag: %r" % f)
PY

assert_alive mem
pass
