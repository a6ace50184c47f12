#!/bin/bash
# Lazy export writes (--fetch-size 4K): a whole-page write (plain and FUA) reads nothing from the
# source; a partial-page write pulls exactly that page once and merges; TRIM and WRITE_ZEROES of
# absent pages read nothing and read back as zeros; FLUSH succeeds; neighbours are untouched.
. "$(dirname "$0")/lib.sh"
require_lazy

random_file "$T/src.img" 4
cp "$T/src.img" "$T/pristine.img"
start_source src "$T/src.img"
serve_lazy lazy src "$T/store" --fetch-size 4K

nbdsh_py "$(uri lazy)" "$T/src.img" "$T/src.log" <<'PY'
img = open(sys.argv[1], "rb").read()
log = sys.argv[2]
P = 4096
check(h.can_flush(), "FLUSH not advertised")
check(h.can_trim(), "TRIM not advertised")
check(h.can_zero(), "WRITE_ZEROES not advertised")

def data_reads(mark, off, length):
    return overlapping(source_reads(log, mark), off, length)

def no_source_data(mark, what):
    reqs = [r for r in source_requests(log, mark) if r[0] in ("Read", "Cache")]
    check(reqs == [], "%s: the source got data requests %r, expected none" % (what, reqs[:10]))

# -- whole-page write: no source read, reads back
mark = log_mark(log)
d = pattern(P, 1)
h.pwrite(d, 10 * P)
no_source_data(mark, "whole-page write of page 10")
check_data(d, h.pread(P, 10 * P), "page 10 after a whole-page write")
no_source_data(mark, "whole-page write of page 10 + read-back")
note("ok: whole-page write")

# -- whole-page FUA write of 2 pages
mark = log_mark(log)
d2 = pattern(2 * P, 2)
h.pwrite(d2, 50 * P, nbd.CMD_FLAG_FUA)
check_data(d2, h.pread(2 * P, 50 * P), "pages 50-51 after a FUA write")
no_source_data(mark, "FUA write of pages 50-51 + read-back")
note("ok: FUA write")

# -- partial-page write: exactly one source read of that page, merged content
mark = log_mark(log)
off = 20 * P + 10
d3 = pattern(100, 3)
h.pwrite(d3, off)
reads = source_reads(log, mark)
check(reads == [(20 * P, P)], "partial write of 100 bytes at page 20 + 10: source reads %r, expected exactly "
      "[(%d, 4096)]" % (reads, 20 * P))
exp = bytearray(img[20 * P:21 * P])
exp[10:110] = d3
check_data(exp, h.pread(P, 20 * P), "page 20 after a partial write (image bytes with 100 bytes replaced)")
check(source_reads(log, mark) == reads, "reading page 20 back read the source again: %r" % source_reads(log, mark))
note("ok: partial-page write")

# -- a write straddling two absent pages partially (page 60 tail, page 61 head): those two pages
mark = log_mark(log)
d4 = pattern(1000, 4)
h.pwrite(d4, 61 * P - 500)
reads = sorted(source_reads(log, mark))
check(reads == [(60 * P, P), (61 * P, P)], "unaligned write over pages 60/61: source reads %r, expected "
      "pages 60 and 61 once each" % reads)
exp = bytearray(img[60 * P:62 * P])
exp[P - 500:P + 500] = d4
check_data(exp, h.pread(2 * P, 60 * P), "pages 60-61 after an unaligned write")

# -- TRIM and WRITE_ZEROES of absent pages: no source read, zeros
mark = log_mark(log)
h.trim(4 * P, 30 * P)
h.zero(4 * P, 40 * P)
h.zero(2 * P, 45 * P, nbd.CMD_FLAG_NO_HOLE)
no_source_data(mark, "TRIM of pages 30-33 and WRITE_ZEROES of pages 40-43, 45-46")
check_data(bytes(4 * P), h.pread(4 * P, 30 * P), "pages 30-33 after TRIM")
check_data(bytes(4 * P), h.pread(4 * P, 40 * P), "pages 40-43 after WRITE_ZEROES")
check_data(bytes(2 * P), h.pread(2 * P, 45 * P), "pages 45-46 after WRITE_ZEROES|NO_HOLE")
no_source_data(mark, "TRIM/WRITE_ZEROES + read-back")
note("ok: TRIM and WRITE_ZEROES")

# -- FLUSH
expect_ok("FLUSH", h.flush)

# -- neighbours still carry the image's data (each pulled once on first read)
mark = log_mark(log)
for p in (9, 11, 19, 21, 29, 34, 39, 44, 47, 49, 52):
    check_data(img[p * P:(p + 1) * P], h.pread(P, p * P), "untouched page %d" % p)
reads = sorted(source_reads(log, mark))
check(reads == sorted((p * P, P) for p in (9, 11, 19, 21, 29, 34, 39, 44, 47, 49, 52)),
      "reading 11 untouched pages: source reads %r" % reads)
# and everything written reads back the same after the flush
check_data(d, h.pread(P, 10 * P), "page 10 after FLUSH")
exp = bytearray(img[20 * P:21 * P]); exp[10:110] = d3
check_data(exp, h.pread(P, 20 * P), "page 20 after FLUSH")
check_data(d2, h.pread(2 * P, 50 * P), "pages 50-51 after FLUSH")
# writes land in the store: the source got no write-type request and its image is unchanged
wr = [r for r in source_requests(log) if r[0] not in ("Read", "Cache", "Extents", "Flush")]
check(wr == [], "the lazy export sent write-type requests to the source: %r" % wr[:10])
h.shutdown()
PY
assert_same_file "$T/pristine.img" "$T/src.img" "source image after writes through the lazy export"
say "ok: writes, trim, zero and flush on a lazy export"
assert_alive lazy
pass
