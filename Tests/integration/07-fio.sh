#!/bin/bash
# fio nbd ioengine: 4 jobs (4 connections) writing disjoint ranges with crc32c verification,
# a verify-only pass on new connections, proof that verification reads real data (a zeroed range
# must fail it), and a randrw variant with mixed block sizes.
. "$(dirname "$0")/lib.sh"

serve_unix mem --memory 64M
U="nbd+unix:///?socket=$(sock mem)"
cd "$T" || fail "cd $T"   # fio may write verify state files into the working directory

FIO_RW=(fio --name=v --ioengine=nbd "--uri=$U" --rw=randwrite --bs=4k --size=16M --offset_increment=16M
        --iodepth=16 --numjobs=4 --verify=crc32c --verify_fatal=1 --group_reporting)


run_fio "randwrite 4 jobs x 16 MiB, iodepth 16, write+verify" "${FIO_RW[@]}" --do_verify=1
run_fio "verify-only pass on new connections" "${FIO_RW[@]}" --verify_only

# Zero 1 MiB inside job 1's range: a verify-only pass must now fail (the check really reads data).
nbdsh_py "$U" <<'PY'
h.zero(1 << 20, 20 << 20)
PY
rc=0
tmo 180 "${FIO_RW[@]}" --verify_only >"$T/fio.out" 2>&1 || rc=$?
[ "$rc" -ne 0 ] || { tail -n 20 "$T/fio.out" >&2; fail "fio --verify_only passed although 1 MiB of verified data was zeroed"; }
grep -q 'verify' "$T/fio.out" || { tail -n 20 "$T/fio.out" >&2; fail "fio failed, but not with a verification error"; }
say "ok: verification detects zeroed data"

# Mixed random read/write with mixed block sizes (unaligned to 4K), verified.
run_fio "randrw bsrange 512-64k, 4 jobs" fio --name=rw --ioengine=nbd "--uri=$U" --rw=randrw --bsrange=512-64k \
    --size=16M --offset_increment=16M --iodepth=8 --numjobs=4 --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --group_reporting
# Sequential readwrite with large blocks (1 MiB requests) and md5 verification.
run_fio "readwrite bs=1M, 2 jobs" fio --name=seq --ioengine=nbd "--uri=$U" --rw=readwrite --bs=1M \
    --size=32M --offset_increment=32M --iodepth=4 --numjobs=2 --verify=md5 --do_verify=1 --verify_fatal=1 \
    --group_reporting

assert_alive mem
pass
