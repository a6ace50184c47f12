#!/bin/bash
# qemu-img info / convert (into and out of the server) / compare.
. "$(dirname "$0")/lib.sh"

MIB=16
serve_unix mem --memory "${MIB}M"
U="nbd+unix:///?socket=$(sock mem)"

# info
tmo 60 qemu-img info --output=json "$U" >"$T/info.json" || fail "qemu-img info failed"
vs=$(json_get "$T/info.json" 'j["virtual-size"]')
assert_eq "qemu-img info virtual-size" $((MIB * 1048576)) "$vs"
say "ok: qemu-img info virtual-size=$vs"

# convert into the server (with 8 parallel coroutines and out-of-order writes)
random_file "$T/src.img" "$MIB"
dd if=/dev/zero of="$T/src.img" bs=1M seek=4 count=3 conv=notrunc status=none   # zero range
tmo 120 qemu-img convert -n -W -m 8 -f raw -O raw "$T/src.img" "$U" || fail "qemu-img convert file -> nbd failed"
say "ok: convert into the server"

# compare must report identical
rc=0; tmo 120 qemu-img compare -f raw -F raw "$T/src.img" "$U" >"$T/cmp.txt" 2>&1 || rc=$?
[ "$rc" -eq 0 ] || { cat "$T/cmp.txt" >&2; fail "qemu-img compare file vs server: exit $rc (expected 0 = identical)"; }
say "ok: compare identical"

# convert out of the server
tmo 120 qemu-img convert -f raw -O raw "$U" "$T/out.img" || fail "qemu-img convert nbd -> file failed"
assert_same_file "$T/src.img" "$T/out.img" "qemu-img convert round trip"
say "ok: convert out of the server"

# compare must notice a difference (one byte changed at 9 MiB + 123)
cp "$T/src.img" "$T/diff.img"
printf '\x5a' | dd of="$T/diff.img" bs=1 seek=$((9 * 1048576 + 123)) conv=notrunc status=none
if cmp -s "$T/src.img" "$T/diff.img"; then
    printf '\xa5' | dd of="$T/diff.img" bs=1 seek=$((9 * 1048576 + 123)) conv=notrunc status=none
fi
rc=0; tmo 120 qemu-img compare -f raw -F raw "$T/diff.img" "$U" >"$T/cmp.txt" 2>&1 || rc=$?
[ "$rc" -eq 1 ] || { cat "$T/cmp.txt" >&2; fail "qemu-img compare with a changed byte: exit $rc (expected 1 = differ)"; }
# qemu-img reports the start of the sector/cluster that differs: it must be at or just before the byte.
off=$(sed -n 's/.*mismatch at offset \([0-9]*\).*/\1/p' "$T/cmp.txt" | head -n 1)
[ -n "$off" ] && [ "$off" -le $((9 * 1048576 + 123)) ] && [ "$off" -gt $((9 * 1048576 - 65536)) ] \
    || { cat "$T/cmp.txt" >&2; fail "qemu-img compare reports the wrong offset '$off' (changed byte at $((9 * 1048576 + 123)))"; }
say "ok: compare detects a difference at the right offset"

# convert a second image over the first (qemu-img zeroes/trims the zero ranges of the source)
truncate -s "${MIB}M" "$T/sparse2.img"
dd if=/dev/urandom of="$T/sparse2.img" bs=64K seek=3 count=5 conv=notrunc status=none
tmo 120 qemu-img convert -n -f raw -O raw "$T/sparse2.img" "$U" || fail "qemu-img convert sparse -> nbd failed"
rc=0; tmo 120 qemu-img compare -f raw -F raw "$T/sparse2.img" "$U" >"$T/cmp.txt" 2>&1 || rc=$?
[ "$rc" -eq 0 ] || { cat "$T/cmp.txt" >&2; fail "qemu-img compare after converting a sparse image over data: exit $rc"; }
say "ok: sparse image over data"

# a file export as the target of qemu-img convert, with the backing file checked after stop
truncate -s "${MIB}M" "$T/disk.img"
serve_unix file --file "$T/disk.img"
tmo 120 qemu-img convert -n -f raw -O raw "$T/src.img" "nbd+unix:///?socket=$(sock file)" || fail "qemu-img convert -> file export failed"
stop_server_ok file
assert_same_file "$T/src.img" "$T/disk.img" "file export backing file after qemu-img convert"
say "ok: file export"

assert_alive mem
pass
