#!/bin/bash
# Zero blocks of a read go as NBD_REPLY_TYPE_OFFSET_HOLE chunks (structured replies): the chunks a
# client receives, with and without DF, match the data; a client without structured replies gets
# plain data; nbdcopy, qemu-img and a lazy nbd-umemd pulling from this server see the exact file.
. "$(dirname "$0")/lib.sh"

# 2 MiB: random data with written zero pages (1-2, 100-163), a zero half page (page 10) and an
# all-zero second MiB.
"$PY" - "$T/disk.img" <<'PY'
import os, sys
b = bytearray(os.urandom(2 << 20))
b[4096:3 * 4096] = bytes(8192)
b[100 * 4096:164 * 4096] = bytes(64 * 4096)
b[10 * 4096:10 * 4096 + 2048] = bytes(2048)
b[1 << 20:] = bytes(1 << 20)
open(sys.argv[1], "wb").write(b)
PY
serve_unix file --file "$T/disk.img"

nbdsh_py "$(uri file)" "$T/disk.img" <<'PY'
data = open(sys.argv[1], "rb").read()
def read(length, offset, flags=0):
    chunks = []
    def cb(buf, off, status, err):
        chunks.append((status, off, len(buf), bytes(buf)))
        return 0
    got = h.pread_structured(length, offset, cb, flags=flags)
    check_data(data[offset:offset + length], got, "read of %d at %d" % (length, offset))
    # the chunks cover the request exactly once, and each says what it holds
    pos = offset
    for status, off, n, buf in sorted(chunks, key=lambda c: c[1]):
        check(off == pos, "chunks of the read at %d: gap or overlap at %d (%r)" % (offset, pos, [c[:3] for c in chunks]))
        pos += n
        if status == nbd.READ_HOLE:
            check(data[off:off + n] == bytes(n), "hole chunk at %d+%d over non-zero data" % (off, n))
    check(pos == offset + length, "chunks of the read at %d end at %d" % (offset, pos))
    return [(s, o, n) for s, o, n, _ in chunks]

D, H = nbd.READ_DATA, nbd.READ_HOLE
c = read(1 << 20, 0)
check(c == [(D, 0, 4096), (H, 4096, 8192), (D, 12288, 100 * 4096 - 12288), (H, 100 * 4096, 64 * 4096),
            (D, 164 * 4096, (1 << 20) - 164 * 4096)], "chunks of the first MiB: %r" % (c,))
check(read(1 << 20, 1 << 20) == [(H, 1 << 20, 1 << 20)], "an all-zero MiB is one hole chunk")
check(read(8192, 4096) == [(H, 4096, 8192)], "two zero pages: one hole chunk")
check(read(4096, 10 * 4096) == [(D, 10 * 4096, 4096)], "a half-zero page is data")
check(read(2000, 4096) == [(D, 4096, 2000)], "a read shorter than a page is data")
# DF: at most one content chunk, so a mixed read is one data chunk and an all-zero one one hole
check(read(4 * 4096, 0, nbd.CMD_FLAG_DF) == [(D, 0, 4 * 4096)], "DF: a mixed read is one data chunk")
check(read(8192, 4096, nbd.CMD_FLAG_DF) == [(H, 4096, 8192)], "DF: an all-zero read may be one hole chunk")
# many requests in flight, mixed holes and data, all correct
bufs = []
for o in range(0, 2 << 20, 65536):
    b = nbd.Buffer(65536)
    h.aio_pread(b, o)
    bufs.append((b, o))
while h.aio_in_flight() > 0:
    h.poll(-1)
for b, o in bufs:
    check_data(data[o:o + 65536], bytes(b.to_bytearray()), "pipelined read at %d" % o)
PY

# a client without structured replies gets the same bytes as plain data
nbdsh_py "$(uri file)" "$T/disk.img" <<'PY'
data = open(sys.argv[1], "rb").read()
g = connect(URI, meta=False, structured=False)
check(not g.get_structured_replies_negotiated(), "structured replies were negotiated")
check_data(data, g.pread(len(data), 0), "simple-reply read of the whole file")
PY

tmo 60 nbdcopy "$(uri file)" "$T/copy.img" || fail "nbdcopy failed"
assert_same_file "$T/disk.img" "$T/copy.img" "nbdcopy of a file with zero pages"
tmo 60 qemu-img compare -f raw "$T/disk.img" "$(uri file)" >/dev/null || fail "qemu-img compare found a difference"

# a lazy nbd-umemd pulling from it (libnbd fills the holes) serves the exact file
serve_unix lazy --source "$(uri file)" --store "$T/store" --prefetch off
tmo 60 nbdcopy "$(uri lazy)" "$T/lazy.img" || fail "nbdcopy from the lazy export failed"
assert_same_file "$T/disk.img" "$T/lazy.img" "lazy copy of a file with zero pages"
pass
