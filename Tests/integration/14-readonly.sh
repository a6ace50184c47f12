#!/bin/bash
# --readonly: READ_ONLY advertised, write/trim/zero (with any flags) fail with EPERM from the
# server, reads/flush/cache/block status work, the file is never modified.
. "$(dirname "$0")/lib.sh"

random_file "$T/disk.img" 8
sha_before=$(sha256sum <"$T/disk.img")
serve_unix ro --file "$T/disk.img" --readonly
serve_unix memro --memory 4M --readonly

for name in ro memro; do
    nbdsh_py "$(uri "$name")" "$T/disk.img" "$name" <<'PY'
name = sys.argv[2]
expected = open(sys.argv[1], "rb").read() if name == "ro" else bytes(4 * MiB)
size = h.get_size()
check(size == len(expected), "size %d, expected %d" % (size, len(expected)))
check(h.is_read_only(), "READ_ONLY not advertised")
for what, f in (("FUA", h.can_fua), ("TRIM", h.can_trim), ("WRITE_ZEROES", h.can_zero), ("FAST_ZERO", h.can_fast_zero)):
    check(not f(), "%s advertised on a read-only export" % what)
h.set_strict_mode(0)
EPERM = errno.EPERM
def reads_fine(what):
    check_data(expected[:64 * KiB], h.pread(64 * KiB, 0), "read after " + what)
    check_data(expected[-4096:], h.pread(4096, size - 4096), "read of the end after " + what)
# Plain write-type requests: EPERM. With FUA / FAST_ZERO, which a read-only export does not
# advertise, EINVAL (flag not negotiated) is as valid as EPERM.
EINVAL = errno.EINVAL
for what, errs, fn, args in (
        ("WRITE", EPERM, h.pwrite, (b"x" * 4096, 0)),
        ("WRITE of 1 byte at the end", EPERM, h.pwrite, (b"x", size - 1)),
        ("TRIM", EPERM, h.trim, (65536, 0)),
        ("WRITE_ZEROES", EPERM, h.zero, (65536, 0)),
        ("WRITE_ZEROES with NO_HOLE", EPERM, h.zero, (65536, 0, nbd.CMD_FLAG_NO_HOLE)),
        ("WRITE with FUA", (EPERM, EINVAL), h.pwrite, (b"x" * 4096, 8192, nbd.CMD_FLAG_FUA)),
        ("TRIM with FUA", (EPERM, EINVAL), h.trim, (65536, 0, nbd.CMD_FLAG_FUA)),
        ("WRITE_ZEROES with FAST_ZERO", (EPERM, EINVAL), h.zero, (65536, 0, nbd.CMD_FLAG_FAST_ZERO))):
    expect_err(h, errs, "%s on read-only export %s" % (what, name), fn, *args)
    reads_fine(what)
expect_ok("FLUSH on read-only export", h.flush)
expect_ok("CACHE on read-only export", h.cache, 65536, 0)
check(len(block_status_list(h, 65536, 0)) >= 1, "block status on read-only export")
check_data(expected, h.pread(size, 0) if size <= 32 * MiB else b"", "full read")
PY
    say "ok: $name via libnbd"
done

# Raw client, both with structured replies (GO) and simple replies (EXPORT_NAME).
py "$(sock ro)" <<'PY'
import sys
from nbdraw import *
from nbdtest import check, note
for mode in ("go", "export_name"):
    c = RawClient(sys.argv[1])
    if mode == "go":
        info = c.connect_default()
        flags = info["flags"]
    else:
        c.handshake()
        _, flags = c.export_name("")
    check(flags & TF_READ_ONLY, "%s: READ_ONLY flag missing (%#x)" % (mode, flags))
    check(not flags & (TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO),
          "%s: write-type flags advertised on a read-only export (%#x)" % (mode, flags))
    for cmd, name, data in ((CMD_WRITE, "WRITE", b"z" * 512), (CMD_TRIM, "TRIM", b""), (CMD_WRITE_ZEROES, "WRITE_ZEROES", b"")):
        r = c.cmd(cmd, 0, 512, 0, data)
        check(r.error == EPERM, "%s: %s on read-only export: expected EPERM, got %s" % (mode, name, errname(r.error)))
        r = c.read(0, 512)
        check(r.error == 0 and len(r.data) == 512, "%s: read after %s failed" % (mode, name))
    c.close()
    note("ok: raw %s" % mode)
PY

# Tools: nbdcopy and qemu-io writes must fail.
random_file "$T/other.img" 8
if tmo 60 nbdcopy "$T/other.img" "$(uri ro)" >"$T/o" 2>&1; then fail "nbdcopy into a read-only export succeeded"; fi
if tmo 60 qemu-io -f raw "nbd+unix:///?socket=$(sock ro)" -c 'write -P 0x11 0 4k' >"$T/o" 2>&1 && ! grep -qi 'failed\|error\|read-only\|permission' "$T/o"; then
    cat "$T/o" >&2; fail "qemu-io write to a read-only export succeeded"
fi
tmo 60 nbdcopy "$(uri ro)" "$T/out.img" || fail "nbdcopy from a read-only export failed"
assert_same_file "$T/disk.img" "$T/out.img" "read-only export content"

stop_server_ok ro
assert_eq "backing file hash after all write attempts" "$sha_before" "$(sha256sum <"$T/disk.img")"
assert_alive memro
pass
