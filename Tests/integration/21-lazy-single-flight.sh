#!/bin/bash
# Lazy export: 16 concurrent readers (16 connections, requests sent together) of one absent page
# cause exactly one source read of that page (--fetch-size 4K), and every reader gets the image's
# bytes. The source delays reads by 1 s (nbdkit delay filter) so the 16 requests surely overlap.
. "$(dirname "$0")/lib.sh"
require_lazy

random_file "$T/src.img" 4
start_source src "$T/src.img" --filter=delay rdelay=1
serve_lazy lazy src "$T/store" --fetch-size 4K

nbdsh_py "$(uri lazy)" "$T/src.img" "$T/src.log" <<'PY'
img = open(sys.argv[1], "rb").read()
log = sys.argv[2]
P = 4096
N = 16

def one_round(page, what):
    off = page * P
    hs = [connect(URI) for _ in range(N)]          # connect all first: the reads go out together
    mark = log_mark(log)
    t0 = time.monotonic()
    bufs = [nbd.Buffer(P) for _ in range(N)]
    cookies = [hh.aio_pread(b, off) for hh, b in zip(hs, bufs)]
    sent = time.monotonic() - t0
    for hh, c in zip(hs, cookies):
        deadline = time.monotonic() + 60
        while not hh.aio_command_completed(c):
            check(time.monotonic() < deadline, "%s: a reader got no reply within 60 s" % what)
            if time.monotonic() >= deadline:
                break
            hh.poll(1000)
    elapsed = time.monotonic() - t0
    for i, b in enumerate(bufs):
        check_data(img[off:off + P], b.to_bytearray(), "%s: reader %d" % (what, i))
    reads = overlapping(source_reads(log, mark), off, P)
    note("%s: %d requests sent in %.3f s, all answered after %.2f s; source reads of the page: %r"
         % (what, N, sent, elapsed, reads))
    check(sent < 0.9, "%s: sending the %d requests took %.2f s, so they may not have overlapped the "
          "1 s source read (test problem)" % (what, N, sent))
    check(reads == [(off, P)], "%s: %d concurrent reads of absent page %d gave source reads %r, expected "
          "exactly one [(%d, %d)]" % (what, N, page, reads, off, P))
    for hh in hs:
        hh.shutdown()

one_round(300, "page 300")
one_round(777, "page 777")
# a re-read of the page by everyone: no source read at all
mark = log_mark(log)
check_data(img[300 * P:301 * P], h.pread(P, 300 * P), "re-read of page 300")
check(source_reads(log, mark) == [], "re-read of page 300 read the source: %r" % source_reads(log, mark))
h.shutdown()
PY
say "ok: 16 concurrent readers of an absent page -> one source read"
assert_alive lazy
pass
