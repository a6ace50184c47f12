#!/bin/bash
# Pipelining: many libnbd aio requests in flight on one connection (writes, reads, zero, trim,
# cache, flush, block status), replies matched by cookie, all data verified.
. "$(dirname "$0")/lib.sh"

serve_unix mem --memory 256M
PY_TIMEOUT=200 nbdsh_py "$(uri mem)" <<'PY'
import time
N = 64
BS = 64 * KiB
order = []

def wait_all(cookies, what, limit=120):
    deadline = time.monotonic() + limit
    pending = set(cookies)
    errors = []
    while pending:
        if time.monotonic() > deadline:
            fail("%s: %d of %d requests still in flight after %ds" % (what, len(pending), len(cookies), limit))
            return errors
        for c in list(pending):
            try:
                if h.aio_command_completed(c):
                    pending.discard(c)
                    order.append(c)
            except nbd.Error as e:
                pending.discard(c)
                errors.append((c, e))
        if pending:
            h.poll(1000)
    return errors

# 1. 64 writes in flight
bufs = []
cookies = []
for i in range(N):
    b = nbd.Buffer.from_bytearray(bytearray(pattern(BS, 500 + i)))
    bufs.append(b)
    cookies.append(h.aio_pwrite(b, i * BS))
check(h.aio_in_flight() > 1, "only %d request(s) in flight after issuing %d writes" % (h.aio_in_flight(), N))
note("in flight after issuing %d writes: %d" % (N, h.aio_in_flight()))
errs = wait_all(cookies, "64 aio writes")
check(not errs, "aio writes failed: %r" % [(c, e.string) for c, e in errs])

# 2. 64 reads in flight, each checked against its own buffer (catches reply/cookie mix-ups)
rbufs = [nbd.Buffer(BS) for _ in range(N)]
order.clear()
cookies = [h.aio_pread(rbufs[i], i * BS) for i in range(N)]
errs = wait_all(cookies, "64 aio reads")
check(not errs, "aio reads failed: %r" % [(c, e.string) for c, e in errs])
for i in range(N):
    check_data(pattern(BS, 500 + i), rbufs[i].to_bytearray(), "pipelined read %d" % i)
note("completion order %s issue order" % ("==" if order == cookies else "!="))

# 3. mixed batch: reads of region A, writes of region B, zero/trim/cache/flush/block status
base = 32 * MiB
mixed = []
rb = []
for i in range(N):
    r = nbd.Buffer(BS)
    rb.append(r)
    if i % 2:
        mixed.append(h.aio_pread_structured(r, i * BS, lambda *a: 0, flags=nbd.CMD_FLAG_DF))
    else:
        mixed.append(h.aio_pread(r, i * BS))
    w = nbd.Buffer.from_bytearray(bytearray(pattern(BS, 900 + i)))
    bufs.append(w)
    mixed.append(h.aio_pwrite(w, base + i * BS, flags=nbd.CMD_FLAG_FUA if i % 4 == 0 else 0))
    if i % 8 == 0:
        mixed.append(h.aio_zero(BS, 64 * MiB + i * BS))
        mixed.append(h.aio_trim(BS, 96 * MiB + i * BS))
        mixed.append(h.aio_cache(BS, i * BS))
        mixed.append(h.aio_block_status(BS * 4, i * BS, lambda *a: 0))
mixed.append(h.aio_flush())   # flush covers nothing in particular; must just succeed
errs = wait_all(mixed, "mixed batch")
check(not errs, "mixed batch failures: %r" % [(c, e.string) for c, e in errs])
for i in range(N):
    check_data(pattern(BS, 500 + i), rb[i].to_bytearray(), "mixed-batch read %d" % i)
for i in range(N):
    check_data(pattern(BS, 900 + i), h.pread(BS, base + i * BS), "mixed-batch write %d" % i)

# 4. 16 x 4 MiB writes in flight (64 MiB of payload queued), then verified
big = []
cookies = []
for i in range(16):
    b = nbd.Buffer.from_bytearray(bytearray(pattern(4 * MiB, 2000 + i)))
    big.append(b)
    cookies.append(h.aio_pwrite(b, 128 * MiB + i * 4 * MiB))
errs = wait_all(cookies, "16 x 4 MiB writes")
check(not errs, "large aio writes failed: %r" % [(c, e.string) for c, e in errs])
rbig = [nbd.Buffer(4 * MiB) for _ in range(16)]
cookies = [h.aio_pread(rbig[i], 128 * MiB + i * 4 * MiB) for i in range(16)]
errs = wait_all(cookies, "16 x 4 MiB reads")
check(not errs, "large aio reads failed")
for i in range(16):
    check_data(pattern(4 * MiB, 2000 + i), rbig[i].to_bytearray(), "large pipelined read %d" % i)

# 5. errors in the middle of a pipeline do not disturb their neighbours
h.set_strict_mode(0)
size = h.get_size()
good, bad = [], []
gb = []
for i in range(32):
    r = nbd.Buffer(4096)
    gb.append(r)
    good.append(h.aio_pread(r, i * BS))
    bad.append(h.aio_pread(nbd.Buffer(4096), size + i * 4096))
errs = wait_all(good + bad, "pipeline with errors")
failed = {c for c, e in errs}
check(failed == set(bad), "expected exactly the 32 out-of-range reads to fail; %d good failed, %d bad succeeded"
      % (len(failed & set(good)), len(set(bad) - failed)))
for c, e in errs:
    check(e.errnum == errno.EINVAL, "out-of-range pipelined read: %s" % ename(e.errnum))
for i in range(32):
    check_data(pattern(BS, 500 + i)[:4096], gb[i].to_bytearray(), "read next to failing reads %d" % i)
PY
assert_alive mem
pass
