#!/bin/bash
# Background pull (--prefetch adaptive) racing a client: the source delays every read by 2 ms and the
# background is capped at 24 MiB/s (so it is still running over a 128 MiB random image while the
# client works), and a client keeps 16 reads in flight over 2000 random ranges of 4-64 KiB (some
# unaligned, some in sequential runs that the adaptive window pulls ahead of), so demand misses land
# on pages the background is pulling at the same moment. Every buffer must hold the image's bytes.
# Afterwards the export completes, and the source log shows no 4 KiB page read twice (a page is pulled
# once, by a demand miss or by the background, never both) and every page read; the whole export then
# reads back equal to the image with the source stopped.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/lazylib.sh"
require_lazy

SIZE_MIB=128
random_file "$T/src.img" "$SIZE_MIB"
start_source src "$T/src.img" --filter=delay delay-read=2ms
mark=$(log_lines "$T/src.log")
serve_lazy lazy src "$T/store" --prefetch adaptive --max-rate 24M --control "$T/lazy.ctl"

nbdsh_py "$(uri lazy)" "$T/src.img" "$T/lazy.ctl" <<'PY'
import json, random, subprocess
img = open(sys.argv[1], "rb").read()
size = len(img)
rng = random.Random(4141)


def status():
    return json.loads(subprocess.run([os.environ["NBD_UMEMD"], "status", "--control", sys.argv[2]],
                                     check=True, capture_output=True, timeout=20).stdout)


TOTAL = 2000
DEPTH = 16
pending = {}
prev_end = 0
issued = checked = 0
deadline = time.monotonic() + 60
while checked < TOTAL:
    if time.monotonic() >= deadline:
        check(False, "reads not answered within 60 s (%d of %d checked)" % (checked, TOTAL))
        break
    while issued < TOTAL and len(pending) < DEPTH:
        n = rng.randrange(4096, 65537)
        if rng.random() < 0.3 and prev_end + n <= size:
            off = prev_end          # sequential runs: the adaptive window pulls ahead of them
        else:
            off = rng.randrange(0, size - n + 1)
            if rng.random() < 0.6:
                off -= off % 4096
                n -= n % 4096
        prev_end = off + n
        buf = nbd.Buffer(n)
        pending[h.aio_pread(buf, off)] = (buf, off, n)
        issued += 1
    h.poll(-1 if len(pending) == DEPTH or issued == TOTAL else 0)
    for cookie in [k for k in pending if h.aio_command_completed(k)]:
        buf, off, n = pending.pop(cookie)
        check_data(img[off:off + n], buf.to_bytearray(), "read of %d bytes at %d" % (n, off))
        checked += 1
st = status()
note("%d reads checked; status then: prefetch_state=%s background_bytes=%d demand_misses=%d" %
     (checked, st["prefetch_state"], st["background_bytes"], st["demand_misses"]))
# the point of this test: the client really ran alongside the background pull
check(st["demand_misses"] > 0, "the client's reads caused no demand miss: %r" % st)
check(st["background_bytes"] > 0, "no background pull happened while the client read: %r" % st)
check(st["complete"] is False and st["prefetch_state"] == "running",
      "the background pull was already over when the client finished (the test raced nothing): %r" % st)
h.shutdown()
PY
say "ok: 2000 reads (16 in flight) during the background pull, every buffer equal to the image"

lz_wait_status lazy "$T/done.json" 'j["complete"] is True' 60 \
    || { cat "$T/done.json" >&2; fail "the export did not become complete within 60 s after the client finished"; }
say "complete: $(tr -d '\n ' <"$T/done.json")"
"$PY" -c 'import json,sys; j=json.load(open(sys.argv[1])); sys.exit(0 if j["prefetch_state"] == "done" and j["pages"]["absent"] == 0 else 1)' "$T/done.json" \
    || fail "complete, but prefetch_state is not done or pages are absent: $(cat "$T/done.json")"

py "$T/src.log" "$mark" "$SIZE_MIB" <<'PY'
import sys
from nbdtest import *
reads = source_reads(sys.argv[1], int(sys.argv[2]))
size = int(sys.argv[3]) * MiB
P = 4096
note("%d source reads, %d bytes" % (len(reads), sum(c for _, c in reads)))
for o, c in reads:
    check(c > 0 and 0 <= o and o + c <= size, "source read offset=%d count=%d outside the export" % (o, c))
cover = page_coverage(reads, size, P)
twice = [(p, cover[p]) for p in range(len(cover)) if len(cover[p]) > 1]
check(not twice, "%d page(s) read from the source more than once, e.g. page %r" % (len(twice), twice[:5]))
missing = [p for p in range(len(cover)) if not cover[p]]
check(not missing, "%d page(s) never read from the source, e.g. %r" % (len(missing), missing[:10]))
PY
say "ok: the source log shows every page read exactly once"

lz_check_local_without_source lazy src "$T/src.img"
assert_alive lazy
pass
