#!/bin/bash
# Lazy export: reads of absent pages answered while many other requests are in flight on the same
# connections. Two connections each keep up to 64 reads outstanding (random sizes from 1 byte to
# 20 KiB, unaligned offsets, random order, some overlapping each other's pages) over a source that
# delays every read by 1 ms; replies to misses may be written by the thread receiving the source's
# data or by the event loop, so this checks that they never interleave: every buffer must hold the
# image's bytes. Afterwards the whole export reads back equal to the image (nbdcopy + cmp).
. "$(dirname "$0")/lib.sh"
require_lazy

random_file "$T/src.img" 64
start_source src "$T/src.img" --filter=delay delay-read=1ms
serve_lazy lazy src "$T/store"

nbdsh_py "$(uri lazy)" "$T/src.img" <<'PY'
import random
img = open(sys.argv[1], "rb").read()
rng = random.Random(4242)
size = len(img)
conns = [h, connect(URI)]
TOTAL = 1500
DEPTH = 64
pending = [dict() for _ in conns]
issued = 0
checked = 0
deadline = time.monotonic() + 120
while checked < TOTAL:
    check(time.monotonic() < deadline, "reads not answered within 120 s (%d of %d checked)" % (checked, TOTAL))
    if time.monotonic() >= deadline:
        break
    for i, c in enumerate(conns):
        while issued < TOTAL and len(pending[i]) < DEPTH:
            n = rng.choice([1, 100, 4096, 4096, 4096, 5000, 8192, 20480])
            off = rng.randrange(0, size - n)
            if rng.random() < 0.5:
                off -= off % 4096
            buf = nbd.Buffer(n)
            pending[i][c.aio_pread(buf, off)] = (buf, off, n)
            issued += 1
    for i, c in enumerate(conns):
        c.poll(0)
        for cookie in [k for k in pending[i] if c.aio_command_completed(k)]:
            buf, off, n = pending[i].pop(cookie)
            check_data(img[off:off + n], buf.to_bytearray(), "read of %d bytes at %d on connection %d" % (n, off, i))
            checked += 1
    if all(len(p) == DEPTH or issued == TOTAL for p in pending):
        conns[0].poll(10)
note("%d reads checked" % checked)
for c in conns[1:]:
    c.shutdown()
h.shutdown()
PY
nbdcopy "$(uri lazy)" "$T/copy.img"
assert_same_file "$T/src.img" "$T/copy.img" "full copy of the lazy export"
say "ok: 1500 pipelined reads over absent pages on 2 connections, all correct; full copy equal"
assert_alive lazy
pass
