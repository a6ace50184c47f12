#!/bin/bash
# Writes to a --file export reach the file: FUA writes are visible in the file as soon as they are
# acknowledged, flush succeeds, unaligned writes / zero / trim land exactly where asked, and the
# file equals a locally computed image after the server stops. Also a loop block device.
. "$(dirname "$0")/lib.sh"

random_file "$T/disk.img" 16
cp "$T/disk.img" "$T/expected.img"
serve_unix file --file "$T/disk.img"

nbdsh_py "$(uri file)" "$T/disk.img" "$T/expected.img" <<'PY'
path, exp_path = sys.argv[1], sys.argv[2]
exp = bytearray(open(exp_path, "rb").read())
size = h.get_size()
check(size == len(exp), "size %d != file size %d" % (size, len(exp)))
check(h.can_fua() and h.can_flush(), "FUA/FLUSH not advertised on a writable file export")

def file_bytes(off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)

# initial content is the file's content
check_data(exp[:1 * MiB], h.pread(1 * MiB, 0), "initial content")
# FUA writes: visible in the backing file immediately after the reply
ops = [(0, 4096), (5 * MiB + 3, 1001), (size - 1, 1), (7 * MiB, 2 * MiB), (123457, 65537)]
for n, (off, ln) in enumerate(ops):
    d = pattern(ln, 50 + n)
    h.pwrite(d, off, nbd.CMD_FLAG_FUA)
    exp[off:off + ln] = d
    check_data(d, file_bytes(off, ln), "FUA write %d [%d,+%d) in the backing file" % (n, off, ln))
# plain writes, then FLUSH: all visible after the flush
for n in range(20):
    off = (n * 777_777) % (size - 70_000)
    d = pattern(65536 + n, 80 + n)
    h.pwrite(d, off)
    exp[off:off + len(d)] = d
expect_ok("FLUSH", h.flush)
check_data(exp, file_bytes(0, size), "backing file after FLUSH")
# zero and trim
h.zero(300_000, 9 * MiB + 17)
exp[9 * MiB + 17:9 * MiB + 17 + 300_000] = bytes(300_000)
h.zero(4096, 11 * MiB, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
exp[11 * MiB:11 * MiB + 4096] = bytes(4096)
h.trim(1 * MiB, 13 * MiB)
exp[13 * MiB:14 * MiB] = bytes(1 * MiB)      # this server's trim reads back as zero
expect_ok("FLUSH after zero/trim", h.flush)
check_data(exp, h.pread(16 * MiB // 2, 0) + h.pread(16 * MiB // 2, 8 * MiB), "export content")
check_data(exp, file_bytes(0, size), "backing file after zero/trim + FLUSH")
open(exp_path, "wb").write(exp)
PY
stop_server_ok file
assert_same_file "$T/expected.img" "$T/disk.img" "backing file after server stop"
say "ok: regular file"

# A second server on the same file sees the data, and the file size did not change.
assert_eq "file size" 16777216 "$(stat -c %s "$T/disk.img")"
serve_unix file2 --file "$T/disk.img"
tmo 60 nbdcopy "$(uri file2)" "$T/out.img" || fail "nbdcopy from the reopened file failed"
assert_same_file "$T/expected.img" "$T/out.img" "content served after restart"
stop_server_ok file2

# Block device (loop device) if this machine allows creating one.
if loopdev=$(losetup -f --show "$T/disk.img" 2>/dev/null); then
    CLEANUP_CMDS+=("losetup -d $loopdev")
    serve_unix blk --file "$loopdev"
    assert_eq "block device export size" 16777216 "$(tmo 30 nbdinfo --size "$(uri blk)")"
    random_file "$T/src.img" 16
    tmo 60 nbdcopy --flush "$T/src.img" "$(uri blk)" || fail "nbdcopy into the block device export failed"
    stop_server_ok blk
    losetup -d "$loopdev"
    assert_same_file "$T/src.img" "$T/disk.img" "file behind the loop device"
    say "ok: block device $loopdev"
else
    say "NOTE: no loop device available here; block-device part not run"
fi

pass
