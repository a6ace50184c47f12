#!/bin/bash
# nbdcopy round trips (file -> server -> file) on --memory and --file exports, with one connection
# and with 4 multi-conn connections, plus a sparse source that exercises zero/trim.
. "$(dirname "$0")/lib.sh"

SIZE_MIB=8
random_file "$T/src.img" "$SIZE_MIB"
random_file "$T/src2.img" "$SIZE_MIB"

# ---- memory export, single connection ---------------------------------------------------------
serve_unix mem --memory "${SIZE_MIB}M"
tmo 120 nbdcopy --connections=1 "$T/src.img" "$(uri mem)" || fail "nbdcopy file -> server failed"
tmo 120 nbdcopy --connections=1 "$(uri mem)" "$T/out.img" || fail "nbdcopy server -> file failed"
assert_same_file "$T/src.img" "$T/out.img" "memory export, 1 connection round trip"
say "ok: 1-connection round trip"

# ---- memory export, 4 connections (multi-conn) -------------------------------------------------
tmo 120 nbdcopy -v --connections=4 --threads=4 --requests=16 "$T/src2.img" "$(uri mem)" 2>"$T/v1.log" \
    || { grep -v 'libnbd: debug' "$T/v1.log" | tail -20 >&2; fail "nbdcopy --connections=4 file -> server failed"; }
grep -q '^nbdcopy: connections=4 ' "$T/v1.log" || {
    grep '^nbdcopy:' "$T/v1.log" >&2
    fail "nbdcopy did not use 4 connections (is CAN_MULTI_CONN advertised?)"
}
rm -f "$T/out.img"
tmo 120 nbdcopy -v --connections=4 --threads=4 --requests=16 "$(uri mem)" "$T/out.img" 2>"$T/v2.log" \
    || { grep -v 'libnbd: debug' "$T/v2.log" | tail -20 >&2; fail "nbdcopy --connections=4 server -> file failed"; }
grep -q '^nbdcopy: connections=4 ' "$T/v2.log" || { grep '^nbdcopy:' "$T/v2.log" >&2; fail "nbdcopy did not use 4 connections when reading"; }
rm -f "$T/v1.log" "$T/v2.log"
assert_same_file "$T/src2.img" "$T/out.img" "memory export, 4-connection round trip"
say "ok: 4-connection round trip"

# ---- sparse source over existing data: zero ranges must really become zero ---------------------
cp "$T/src.img" "$T/sparse.img"
# zero 2 MiB in the middle, 4 KiB near the start, and the last 1 MiB (nbdcopy turns these into
# zero / trim requests or skips them after zeroing)
dd if=/dev/zero of="$T/sparse.img" bs=1M seek=3 count=2 conv=notrunc status=none
dd if=/dev/zero of="$T/sparse.img" bs=4K seek=5 count=1 conv=notrunc status=none
dd if=/dev/zero of="$T/sparse.img" bs=1M seek=$((SIZE_MIB - 1)) count=1 conv=notrunc status=none
fallocate -d "$T/sparse.img" 2>/dev/null || true   # punch the zero ranges so they are real holes
tmo 120 nbdcopy --flush "$T/sparse.img" "$(uri mem)" || fail "nbdcopy sparse file -> server failed"
rm -f "$T/out.img"
tmo 120 nbdcopy "$(uri mem)" "$T/out.img" || fail "nbdcopy server -> file failed"
assert_same_file "$T/sparse.img" "$T/out.img" "sparse source copied over existing data"
say "ok: sparse source"

# ---- file export ------------------------------------------------------------------------------
truncate -s "${SIZE_MIB}M" "$T/disk.img"
serve_unix file --file "$T/disk.img"
tmo 120 nbdcopy --connections=4 --threads=4 --flush "$T/src.img" "$(uri file)" || fail "nbdcopy -> file export failed"
rm -f "$T/out.img"
tmo 120 nbdcopy --connections=4 --threads=4 "$(uri file)" "$T/out.img" || fail "nbdcopy file export -> file failed"
assert_same_file "$T/src.img" "$T/out.img" "file export round trip"
stop_server_ok file
assert_same_file "$T/src.img" "$T/disk.img" "backing file of the file export"
say "ok: file export round trip, backing file updated"

# ---- nbd -> nbd copy between two servers -----------------------------------------------------------
serve_unix mem2 --memory "${SIZE_MIB}M"
tmo 120 nbdcopy --connections=2 "$(uri mem)" "$(uri mem2)" || fail "nbdcopy server -> server failed"
rm -f "$T/out.img"
tmo 120 nbdcopy "$(uri mem2)" "$T/out.img" || fail "nbdcopy server2 -> file failed"
assert_same_file "$T/sparse.img" "$T/out.img" "server to server copy"
say "ok: server to server"

assert_alive mem
assert_alive mem2
pass
