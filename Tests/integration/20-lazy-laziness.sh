#!/bin/bash
# Lazy export (--source/--store) with --fetch-size 4K pulls exactly the pages asked for, in request
# order: CACHE of page 0, then reads of pages 7,1,6,2,0,5,3,4 give the image's bytes, the source
# sees one 4 KiB Read per page (page 0's, from the CACHE, first), and re-reading the 8 pages sends
# nothing at all to the source.
. "$(dirname "$0")/lib.sh"
require_lazy

random_file "$T/src.img" 4     # 1024 pages
start_source src "$T/src.img"
mark0=$(log_lines "$T/src.log")
serve_lazy lazy src "$T/store" --fetch-size 4K

nbdsh_py "$(uri lazy)" "$T/src.img" "$T/src.log" "$mark0" <<'PY'
img = open(sys.argv[1], "rb").read()
log, mark0 = sys.argv[2], int(sys.argv[3])
P = 4096
check(h.get_size() == len(img), "export size %d, expected the source's %d" % (h.get_size(), len(img)))

def data_requests(skip):
    return [r for r in source_requests(log, skip) if r[0] in ("Read", "Cache")]

# Requests sent while the daemon started (an Extents query is allowed; data reads are not).
start = data_requests(mark0)
check(start == [], "the source got data requests before any client read: %r" % start[:10])
mark1 = log_mark(log)

h.cache(P, 0)
# CACHE pulls the range: page 0's source read is logged by the time the reply came (allow the log
# a moment in case the pull completes just after the reply).
for _ in range(40):
    if source_reads(log, mark1):
        break
    time.sleep(0.05)
after_cache = source_reads(log, mark1)
check(after_cache == [(0, P)], "after CACHE of page 0 the source reads were %r, expected [(0, 4096)]" % after_cache)

order = [7, 1, 6, 2, 0, 5, 3, 4]
for p in order:
    check_data(img[p * P:(p + 1) * P], h.pread(P, p * P), "read of page %d" % p)

reads = source_reads(log, mark1)
note("source reads: %s" % ", ".join("page %d+%d" % (o // P, c) for o, c in reads))
allowed = set(range(8))
for (o, c) in reads:
    check(o % P == 0 and c == P and o // P in allowed,
          "source read offset=%#x count=%#x is not exactly one of pages 0-7 (fetch size 4K)" % (o, c))
pages = [o // P for (o, c) in reads]
for p in range(8):
    check(pages.count(p) == 1, "page %d was read from the source %d times, expected once" % (p, pages.count(p)))
check(pages == [0, 7, 1, 6, 2, 5, 3, 4],
      "source read order %r, expected [0, 7, 1, 6, 2, 5, 3, 4] (CACHE's pull of page 0 first, "
      "then the absent pages in request order)" % pages)
if 0 in pages and 7 in pages:
    check(pages.index(0) < pages.index(7), "the source read of page 0 (CACHE) came after the read of page 7")
others = [r for r in source_requests(log, mark1) if r[0] not in ("Read", "Extents")]
check(others == [], "unexpected source requests during the reads: %r" % others[:10])

# Re-reads (one by one and all 8 pages at once) never touch the source.
mark2 = log_mark(log)
for p in order:
    check_data(img[p * P:(p + 1) * P], h.pread(P, p * P), "re-read of page %d" % p)
check_data(img[:8 * P], h.pread(8 * P, 0), "re-read of pages 0-7 in one request")
h.cache(8 * P, 0)
time.sleep(0.3)
new = source_requests(log, mark2)
check(new == [], "re-reading pages 0-7 sent requests to the source: %r" % new[:10])
h.shutdown()
PY
say "ok: pages pulled on demand, one source read each, none on re-read"
assert_alive lazy
pass
