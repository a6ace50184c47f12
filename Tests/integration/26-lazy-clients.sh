#!/bin/bash
# Real clients through a lazy export (64 MiB random source): qemu-img compare against the image
# while most pages are still absent, nbdcopy out with 4 connections + cmp, fio randwrite + crc32c
# verify (iodepth 16, 4 jobs) and a verify-only pass, and fio randrw with unaligned block sizes on a
# fresh store (partial-page writes over absent pages).
. "$(dirname "$0")/lib.sh"
require_lazy

random_file "$T/src.img" 64
cp "$T/src.img" "$T/pristine.img"
start_source src "$T/src.img"
serve_lazy lazy src "$T/store"
U=$(uri lazy)
cd "$T" || fail "cd $T"   # fio may write verify state files into the working directory

# qemu-img compare first: it pulls the pages through the lazy path
rc=0; tmo 180 qemu-img compare -f raw -F raw "$T/src.img" "$U" >"$T/cmp.txt" 2>&1 || rc=$?
[ "$rc" -eq 0 ] || { cat "$T/cmp.txt" >&2; fail "qemu-img compare image vs lazy export: exit $rc (expected 0 = identical)"; }
say "ok: qemu-img compare: identical"

# nbdcopy out, 4 connections
tmo 180 nbdcopy --connections=4 --threads=4 "$U" "$T/out.img" || fail "nbdcopy lazy export -> file failed"
assert_same_file "$T/src.img" "$T/out.img" "nbdcopy of the lazy export"
rm -f "$T/out.img"
say "ok: nbdcopy out equals the image"

FIO_RW=(fio --name=v --ioengine=nbd "--uri=$U" --rw=randwrite --bs=4k --size=16M --offset_increment=16M
        --iodepth=16 --numjobs=4 --verify=crc32c --verify_fatal=1 --group_reporting)
FIO_TIMEOUT=240   # pulls through the lazy path take longer than a plain export
run_fio "randwrite 4 jobs x 16 MiB, iodepth 16, write+verify" "${FIO_RW[@]}" --do_verify=1
run_fio "verify-only pass on new connections" "${FIO_RW[@]}" --verify_only

# fresh store: mixed random read/write with unaligned block sizes over absent pages
serve_lazy lazy2 src "$T/store2"
U2=$(uri lazy2)
run_fio "randrw bsrange 512-64k, 4 jobs, fresh store" fio --name=rw --ioengine=nbd "--uri=$U2" --rw=randrw \
    --bsrange=512-64k --size=16M --offset_increment=16M --iodepth=8 --numjobs=4 --verify=crc32c --do_verify=1 \
    --verify_fatal=1 --group_reporting

assert_same_file "$T/pristine.img" "$T/src.img" "source image after client writes through lazy exports"
assert_alive lazy
assert_alive lazy2
pass
