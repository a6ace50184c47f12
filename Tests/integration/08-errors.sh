#!/bin/bash
# Error replies through libnbd with client-side checks disabled (strict mode 0). Every error must
# come from the server (the request is proven to have been sent), carry the right errno, and be
# followed by a correct request on the same connection.
. "$(dirname "$0")/lib.sh"

serve_unix mem --memory 64M
serve_unix a512 --memory 4M --min-block-size 512
serve_unix a4k --memory 4M --min-block-size 4096

# ---- the nbdsh tool itself ----------------------------------------------------------------------
out=$(tmo 30 nbdsh -u "$(uri mem)" -c 'print(h.get_size(), h.can_multi_conn(), h.get_structured_replies_negotiated())') \
    || fail "nbdsh -u $(uri mem) failed"
assert_eq "nbdsh: size, multi-conn, structured replies" "67108864 True True" "$out"
tmo 30 nbdsh -u "$(uri mem)" -c 'import errno' -c 'h.set_strict_mode(0)' -c '
try:
    h.pread(512, h.get_size())
    raise SystemExit("nbdsh: out-of-range read succeeded")
except nbd.Error as e:
    if e.errnum != errno.EINVAL:
        raise SystemExit("nbdsh: out-of-range read gave %s, expected EINVAL" % e.errnum)
h.pwrite(b"nbdsh" * 100, 0, nbd.CMD_FLAG_FUA)
assert h.pread(500, 0) == b"nbdsh" * 100, "nbdsh read-back mismatch"
h.zero(500, 0)
' || fail "nbdsh error/read-back check failed"
say "ok: nbdsh"

# ---- 64 MiB memory export ---------------------------------------------------------------------
nbdsh_py "$(uri mem)" <<'PY'
h.set_strict_mode(0)
size = h.get_size()
check(size == 64 * MiB, "size %d" % size)
EINVAL, ENOSPC, EOVERFLOW, ENOTSUP = errno.EINVAL, errno.ENOSPC, errno.EOVERFLOW, errno.ENOTSUP
good = pattern(64 * KiB, 7)
h.pwrite(good, 1 * MiB)
gen = [0]

def still_works(what):
    # same connection: the reference data reads back, and a fresh write/read round-trips
    check_data(good, h.pread(len(good), 1 * MiB), "read after " + what)
    gen[0] += 1
    d = pattern(4096, 1000 + gen[0])
    h.pwrite(d, 8 * MiB)
    check_data(d, h.pread(4096, 8 * MiB), "write+read after " + what)

def bs(count, offset, flags=0):
    return block_status_list(h, count, offset, flags)

def err(what, errnos, fn, *args):
    expect_err(h, errnos, what, fn, *args)
    still_works(what)

# out of range
err("READ beyond the end", EINVAL, h.pread, 4096, size)
err("READ straddling the end", EINVAL, h.pread, 8192, size - 4096)
err("READ at offset 2^62", EINVAL, h.pread, 512, 1 << 62)
err("READ whose offset+length wraps 2^64", EINVAL, h.pread, 4096, (1 << 64) - 2048)
err("WRITE beyond the end", ENOSPC, h.pwrite, pattern(4096, 1), size)
err("WRITE straddling the end", ENOSPC, h.pwrite, pattern(4096, 2), size - 2048)
err("WRITE whose offset+length wraps 2^64", (ENOSPC, EINVAL), h.pwrite, pattern(4096, 3), (1 << 64) - 2048)
err("WRITE_ZEROES beyond the end", ENOSPC, h.zero, 4096, size)
err("WRITE_ZEROES straddling the end", ENOSPC, h.zero, 8192, size - 4096)
err("TRIM beyond the end", EINVAL, h.trim, 4096, size)
err("TRIM straddling the end", EINVAL, h.trim, 8192, size - 4096)
err("CACHE beyond the end", EINVAL, h.cache, 4096, size)
err("BLOCK_STATUS beyond the end", EINVAL, bs, 4096, size)
# the last byte is fine
check_data(bytes(1), h.pread(1, size - 1), "read of the last byte")
h.pwrite(b"\x5a", size - 1)
check_data(b"\x5a", h.pread(1, size - 1), "write of the last byte")

# zero length
err("zero-length READ", EINVAL, h.pread, 0, 4096)
err("zero-length WRITE", EINVAL, h.pwrite, b"", 4096)
err("zero-length TRIM", EINVAL, h.trim, 0, 4096)
err("zero-length WRITE_ZEROES", EINVAL, h.zero, 0, 4096)
err("zero-length CACHE", EINVAL, h.cache, 0, 4096)
err("zero-length BLOCK_STATUS", EINVAL, bs, 0, 4096)

# flags not valid for the command
F = nbd
err("READ with NO_HOLE", EINVAL, h.pread, 512, 0, F.CMD_FLAG_NO_HOLE)
err("READ with REQ_ONE", EINVAL, h.pread, 512, 0, F.CMD_FLAG_REQ_ONE)
err("READ with FAST_ZERO", EINVAL, h.pread, 512, 0, F.CMD_FLAG_FAST_ZERO)
err("READ with unknown flag bit 5", EINVAL, h.pread, 512, 0, 1 << 5)
err("READ with unknown flag bit 15", EINVAL, h.pread, 512, 0, 1 << 15)
err("WRITE with DF", EINVAL, h.pwrite, pattern(512, 4), 0, F.CMD_FLAG_DF)
err("WRITE with NO_HOLE", EINVAL, h.pwrite, pattern(512, 5), 0, F.CMD_FLAG_NO_HOLE)
err("WRITE with REQ_ONE", EINVAL, h.pwrite, pattern(512, 6), 0, F.CMD_FLAG_REQ_ONE)
err("WRITE with FAST_ZERO", EINVAL, h.pwrite, pattern(512, 7), 0, F.CMD_FLAG_FAST_ZERO)
err("WRITE with unknown flag bit 7", EINVAL, h.pwrite, pattern(512, 8), 0, 1 << 7)
err("TRIM with NO_HOLE", EINVAL, h.trim, 4096, 0, F.CMD_FLAG_NO_HOLE)
err("TRIM with DF", EINVAL, h.trim, 4096, 0, F.CMD_FLAG_DF)
err("TRIM with FAST_ZERO", EINVAL, h.trim, 4096, 0, F.CMD_FLAG_FAST_ZERO)
err("WRITE_ZEROES with DF", EINVAL, h.zero, 4096, 0, F.CMD_FLAG_DF)
err("WRITE_ZEROES with REQ_ONE", EINVAL, h.zero, 4096, 0, F.CMD_FLAG_REQ_ONE)
err("CACHE with DF", EINVAL, h.cache, 4096, 0, F.CMD_FLAG_DF)
err("CACHE with NO_HOLE", EINVAL, h.cache, 4096, 0, F.CMD_FLAG_NO_HOLE)
err("BLOCK_STATUS with DF", EINVAL, bs, 4096, 0, F.CMD_FLAG_DF)
err("BLOCK_STATUS with FAST_ZERO", EINVAL, bs, 4096, 0, F.CMD_FLAG_FAST_ZERO)
err("FLUSH with NO_HOLE", EINVAL, h.flush, F.CMD_FLAG_NO_HOLE)

# FUA is valid on every command once SEND_FUA is advertised (spec: the server MUST accept it)
expect_ok("READ with FUA", h.pread, 512, 1 * MiB, F.CMD_FLAG_FUA)
expect_ok("WRITE with FUA", h.pwrite, pattern(4096, 9), 2 * MiB, F.CMD_FLAG_FUA)
check_data(pattern(4096, 9), h.pread(4096, 2 * MiB), "read after WRITE+FUA")
expect_ok("TRIM with FUA", h.trim, 4096, 3 * MiB, F.CMD_FLAG_FUA)
expect_ok("WRITE_ZEROES with FUA", h.zero, 4096, 2 * MiB, F.CMD_FLAG_FUA)
check_data(bytes(4096), h.pread(4096, 2 * MiB), "read after WRITE_ZEROES+FUA")
expect_ok("WRITE_ZEROES with FUA|NO_HOLE", h.zero, 4096, 2 * MiB, F.CMD_FLAG_FUA | F.CMD_FLAG_NO_HOLE)
expect_ok("CACHE with FUA", h.cache, 4096, 1 * MiB, F.CMD_FLAG_FUA)
expect_ok("FLUSH with FUA", h.flush, F.CMD_FLAG_FUA)
expect_ok("FLUSH", h.flush)
expect_ok("CACHE", h.cache, 1 * MiB, 0)
still_works("valid flags")

# requests larger than the 32 MiB maximum block size
big = 32 * MiB + 1
err("READ of 32 MiB + 1", EINVAL, h.pread, big, 0)
err("READ of 32 MiB + 1 with DF", (EINVAL, EOVERFLOW), h.pread, big, 0, F.CMD_FLAG_DF)
# The oversized write covers the reference data at 1 MiB: the payload must be consumed (the
# connection stays in sync) and nothing of it may be written.
err("WRITE of 32 MiB + 1", EINVAL, h.pwrite, pattern(big, 11), 0)
err("WRITE of 33 MiB + 1", EINVAL, h.pwrite, pattern(33 * MiB + 1, 12), 0)
check_data(bytes(4096), h.pread(4096, 0), "start of the export after the rejected oversized writes")
# exactly 32 MiB is allowed
d = pattern(32 * MiB, 13)
expect_ok("WRITE of exactly 32 MiB", h.pwrite, d, 16 * MiB)
check_data(d, h.pread(32 * MiB, 16 * MiB), "READ of exactly 32 MiB")
h.pwrite(good, 1 * MiB)
still_works("32 MiB requests")

# FAST_ZERO: either fast success (range reads zero) or ENOTSUP; nothing else.
h.pwrite(pattern(2 * MiB, 14), 4 * MiB)
try:
    before = h.log_sent
    h.zero(2 * MiB, 4 * MiB, F.CMD_FLAG_FAST_ZERO)
    check_data(bytes(2 * MiB), h.pread(2 * MiB, 4 * MiB), "read after fast zero")
    note("ok: WRITE_ZEROES with FAST_ZERO succeeded and the range reads as zero")
except nbd.Error as e:
    check(h.log_sent > before, "FAST_ZERO refused client-side: %s" % e.string)
    check(e.errnum in (ENOTSUP, errno.EOPNOTSUPP), "WRITE_ZEROES with FAST_ZERO: expected success or ENOTSUP, got %s (%s)" % (ename(e.errnum), e.string))
    note("ok: WRITE_ZEROES with FAST_ZERO -> ENOTSUP")
still_works("FAST_ZERO")
try:
    h.zero(1 * MiB, 6 * MiB, F.CMD_FLAG_FAST_ZERO | F.CMD_FLAG_NO_HOLE)
    check_data(bytes(1 * MiB), h.pread(1 * MiB, 6 * MiB), "read after fast zero with NO_HOLE")
except nbd.Error as e:
    check(e.errnum in (ENOTSUP, errno.EOPNOTSUPP), "WRITE_ZEROES FAST_ZERO|NO_HOLE: got %s" % ename(e.errnum))
still_works("FAST_ZERO|NO_HOLE")

# DF on a read spanning data and hole returns the right bytes
h.trim(1 * MiB, 10 * MiB)
h.pwrite(pattern(4096, 15), 10 * MiB + 8192)
exp = bytearray(64 * KiB)
exp[8192:8192 + 4096] = pattern(4096, 15)
check_data(exp, h.pread(64 * KiB, 10 * MiB, F.CMD_FLAG_DF), "DF read over data+hole")
still_works("DF read")

# BLOCK_STATUS with REQ_ONE returns exactly one extent, within the request
ext = bs(8 * MiB, 9 * MiB, F.CMD_FLAG_REQ_ONE)
check(len(ext) == 1, "REQ_ONE returned %d extents: %r" % (len(ext), ext[:5]))
check(0 < ext[0][0] <= 8 * MiB, "REQ_ONE extent length %d outside (0, 8 MiB]" % ext[0][0])
ext = bs(8 * MiB, 9 * MiB)
check(len(ext) >= 2, "block status over hole+data+hole returned %r" % (ext[:5],))
still_works("block status")
h.shutdown()
PY
say "ok: memory export error cases"

# ---- BLOCK_STATUS without a negotiated meta context -------------------------------------------
py "$(uri mem)" <<'PY'
import sys, errno
from nbdtest import *
h = connect(sys.argv[1], meta=False)
h.set_strict_mode(0)
check(h.get_structured_replies_negotiated(), "structured replies not negotiated")
check(not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation negotiated without being requested")
expect_err(h, errno.EINVAL, "BLOCK_STATUS without meta context", block_status_list, h, 4096, 0)
d = pattern(4096, 21)
h.pwrite(d, 12 * MiB)
check_data(d, h.pread(4096, 12 * MiB), "read after BLOCK_STATUS error")
done()
PY
say "ok: block status without meta context"

# ---- without structured replies: errors come as simple replies ------------------------------
py "$(uri mem)" <<'PY'
import sys, errno
from nbdtest import *
h = connect(sys.argv[1], meta=False, structured=False)
h.set_strict_mode(0)
check(not h.get_structured_replies_negotiated(), "structured replies negotiated although not requested")
check(not h.can_df(), "SEND_DF advertised without structured replies")
size = h.get_size()
expect_err(h, errno.EINVAL, "READ beyond the end (simple reply)", h.pread, 4096, size)
expect_err(h, errno.EINVAL, "READ of 32 MiB + 1 (simple reply)", h.pread, 32 * MiB + 1, 0)
expect_err(h, errno.ENOSPC, "WRITE beyond the end (simple reply)", h.pwrite, b"x" * 512, size)
d = pattern(65536, 22)
h.pwrite(d, 13 * MiB)
check_data(d, h.pread(65536, 13 * MiB), "simple-reply read after errors")
done()
PY
say "ok: simple replies"

# ---- alignment: --min-block-size 512 and 4096 -------------------------------------------------
for srv in a512:512 a4k:4096; do
    name=${srv%%:*} B=${srv#*:}
    nbdsh_py "$(uri "$name")" "$B" <<'PY'
B = int(sys.argv[1])
h.set_strict_mode(0)
mn, pref, mx = h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED), h.get_block_size(nbd.SIZE_MAXIMUM)
check((mn, pref, mx) == (B, 4096, 32 * MiB), "block sizes %r, expected %r" % ((mn, pref, mx), (B, 4096, 32 * MiB)))
EINVAL = errno.EINVAL
ref = pattern(2 * B, 31)
h.pwrite(ref, 4 * B)
def still_works(what):
    check_data(ref, h.pread(2 * B, 4 * B), "aligned read after " + what)
def err(what, fn, *args):
    expect_err(h, EINVAL, "%s (min block %d)" % (what, B), fn, *args)
    still_works(what)
half = B // 2
err("READ at misaligned offset", h.pread, B, 4 * B + half)
err("READ of misaligned length", h.pread, B + 1, 0)
err("READ of length 1", h.pread, 1, 0)
err("WRITE at misaligned offset", h.pwrite, pattern(B, 32), 4 * B + half)
err("WRITE of misaligned length", h.pwrite, pattern(B + half, 33), 4 * B)
err("TRIM misaligned", h.trim, B, 4 * B + half)
err("WRITE_ZEROES misaligned", h.zero, half, 4 * B)
err("CACHE misaligned", h.cache, B, half)
err("BLOCK_STATUS misaligned", block_status_list, h, B, half)
# aligned requests work
d = pattern(B, 34)
h.pwrite(d, 8 * B)
check_data(d, h.pread(B, 8 * B), "aligned write/read")
h.zero(B, 8 * B)
check_data(bytes(B), h.pread(B, 8 * B), "aligned zero")
h.trim(B, 9 * B)
h.cache(B, 9 * B)
check(len(block_status_list(h, B, 8 * B)) >= 1, "aligned block status")
PY
    say "ok: alignment $B"
done

for s in mem a512 a4k; do assert_alive "$s"; done
pass
