#!/usr/bin/env bash
# File-backed RAM on the host kernel: a lazy export of a source image (nbdkit + log filter), attached
# with scripts/attach (nbdfuse + loop device here), mapped by the mmap tool. Pages 7,1,6,2,0,5,3,4
# are read with MAP_PRIVATE and then MAP_SHARED and compared with the image; the source log must
# show exactly those pages pulled, in that order, once. Writes through MAP_SHARED must reach the
# store and survive a page-cache drop and a daemon restart.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/wirelib.sh"

PS=4096
ORDER="7,1,6,2,0,5,3,4"
"$NBD_MMAP" fill "$T/img" --size 16M --pattern 7 >/dev/null
start_source src "$T/img"
serve_lazy lazy src "$T/store" --fetch-size 4K

# expected_reads: "OFFSET 4096" lines for the pages of ORDER, in order
expected_reads() { tr ',' '\n' <<<"$1" | awk -v ps=$PS '{ print $1 * ps, ps }'; }

mark=$(log_lines "$T/src.log")
dev=$("$ROOT/scripts/attach" --unix "$(sock lazy)")
say "attached as $dev"
"$NBD_MMAP" check "$dev" --pages "$ORDER" --expect-file "$T/img" --private | tee "$T/private.out"
grep -q "^VERDICT check ok pages=8 MAP_PRIVATE" "$T/private.out" || fail "MAP_PRIVATE check failed"
source_reads "$T/src.log" "$mark" >"$T/reads1"
say "source reads after the MAP_PRIVATE pass: $(tr '\n' ' ' <"$T/reads1")"
expected_reads "$ORDER" >"$T/expect1"
diff -u "$T/expect1" "$T/reads1" || fail "the source did not see exactly pages $ORDER, one 4 KiB read each, in that order"

mark=$(log_lines "$T/src.log")
"$NBD_MMAP" check "$dev" --pages "$ORDER" --expect-file "$T/img" --shared | tee "$T/shared.out"
grep -q "^VERDICT check ok pages=8 MAP_SHARED" "$T/shared.out" || fail "MAP_SHARED check failed"
[ -z "$(source_reads "$T/src.log" "$mark")" ] || fail "pages already pulled were read from the source again: $(source_reads "$T/src.log" "$mark")"

# write pages 2 and 5 through MAP_SHARED (msync'ed); expected image = source image with those pages
# replaced by pattern 9
"$NBD_MMAP" write "$dev" --pages 2,5 --pattern 9 | grep -q '^VERDICT write ok pages=2' || fail "write through MAP_SHARED failed"
"$NBD_MMAP" fill "$T/p9" --size 32K --pattern 9 >/dev/null
cp "$T/img" "$T/expected"
for p in 2 5; do dd if="$T/p9" of="$T/expected" bs=$PS skip=$p seek=$p count=1 conv=notrunc status=none; done
# the daemon has them (read straight from the export, not through the kernel's page cache)
py "$(uri lazy)" "$T/expected" <<'PY'
import sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
exp = open(sys.argv[2], "rb").read()
for p in range(8):
    got = h.pread(4096, p * 4096)
    assert got == exp[p * 4096:(p + 1) * 4096], f"page {p} on the export differs from the expected image"
print("export holds the MAP_SHARED writes")
PY

sync
echo 3 >/proc/sys/vm/drop_caches
"$NBD_MMAP" check "$dev" --pages 0-7 --expect-file "$T/expected" --shared | tail -n 1 | tee "$T/dropped.out"
grep -q "^VERDICT check ok pages=8" "$T/dropped.out" || fail "after drop_caches the pages differ"

# restart the daemon on the same store: the writes and the pulled pages are still there
"$ROOT/scripts/detach" "$dev"
stop_server_ok lazy
serve_lazy lazy src "$T/store" --fetch-size 4K
mark=$(log_lines "$T/src.log")
dev=$("$ROOT/scripts/attach" --unix "$(sock lazy)")
"$NBD_MMAP" check "$dev" --pages 0-8 --expect-file "$T/expected" --private | tail -n 1 | tee "$T/restart.out"
grep -q "^VERDICT check ok pages=9" "$T/restart.out" || fail "after a daemon restart the pages differ"
source_reads "$T/src.log" "$mark" >"$T/reads2"
expected_reads 8 >"$T/expect2"
diff -u "$T/expect2" "$T/reads2" || fail "after the restart only page 8 (never pulled before) may come from the source"
"$ROOT/scripts/detach" "$dev"
stop_server_ok lazy
pass
