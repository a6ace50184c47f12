#!/bin/bash
# Lazy export restart: read some pages, write some (then FLUSH), SIGTERM the daemon (exit 0), start
# it again on the same store and source: the pages pulled before read back without any source
# request, the flushed writes are intact, and absent pages are still pulled from the source.
. "$(dirname "$0")/lib.sh"
require_lazy

random_file "$T/src.img" 4
start_source src "$T/src.img"
serve_lazy lazy src "$T/store"      # default fetch size

# pages read before the restart: [(page, count)], and the writes
cat >"$T/plan.py" <<'PY'
P = 4096
READS = [(0, 1), (5, 3), (100, 1), (257, 16), (1023, 1)]
WRITES = [(400 * P, 4096, 1), (401 * P, 8192, 2), (600 * P + 10, 100, 3), (700 * P - 300, 1000, 4)]
TRIMS = [(800 * P, 4 * P)]
ZEROS = [(900 * P, 2 * P)]
PY

nbdsh_py "$(uri lazy)" "$T/src.img" "$T/plan.py" <<'PY'
img = open(sys.argv[1], "rb").read()
exec(open(sys.argv[2]).read())
for p, n in READS:
    check_data(img[p * P:(p + n) * P], h.pread(n * P, p * P), "first read of pages %d+%d" % (p, n))
for off, n, seed in WRITES:
    h.pwrite(pattern(n, seed), off)
for off, n in TRIMS:
    h.trim(n, off)
for off, n in ZEROS:
    h.zero(n, off)
expect_ok("FLUSH", h.flush)
h.shutdown()
PY
say "ok: first run: pages read, data written and flushed"

stop_server lazy
[ "$SRV_RC" -eq 0 ] || fail "lazy export exited with status $SRV_RC after SIGTERM (expected 0)"
say "ok: SIGTERM -> exit 0"

mark=$(log_lines "$T/src.log")
serve_lazy lazy2 src "$T/store"
nbdsh_py "$(uri lazy2)" "$T/src.img" "$T/plan.py" "$T/src.log" "$mark" <<'PY'
img = open(sys.argv[1], "rb").read()
exec(open(sys.argv[2]).read())
log, mark = sys.argv[3], int(sys.argv[4])
check(h.get_size() == len(img), "size after restart %d, expected %d" % (h.get_size(), len(img)))
exp = bytearray(img)
for off, n, seed in WRITES:
    exp[off:off + n] = pattern(n, seed)
for off, n in TRIMS + ZEROS:
    exp[off:off + n] = bytes(n)

def data_requests():
    return [r for r in source_requests(log, mark) if r[0] in ("Read", "Cache")]

start = data_requests()
check(start == [], "the restarted daemon sent data requests to the source before any read: %r" % start[:10])
mark2 = log_mark(log)
for p, n in READS:
    check_data(exp[p * P:(p + n) * P], h.pread(n * P, p * P), "pages %d+%d after restart" % (p, n))
for off, n, seed in WRITES:
    check_data(exp[off:off + n], h.pread(n, off), "write [%d,+%d) after restart" % (off, n))
    # the whole pages the write touched, too (partial writes merged with the source page)
    a, b = off // P * P, (off + n + P - 1) // P * P
    check_data(exp[a:b], h.pread(b - a, a), "pages around write [%d,+%d) after restart" % (off, n))
for off, n in TRIMS + ZEROS:
    check_data(bytes(n), h.pread(n, off), "trimmed/zeroed [%d,+%d) after restart" % (off, n))
new = source_requests(log, mark2)
check(new == [], "after restart, reading pages pulled or written before sent requests to the source: %r" % new[:10])

# an absent page is still pulled from the source after the restart
mark3 = log_mark(log)
check_data(exp[500 * P:501 * P], h.pread(P, 500 * P), "absent page 500 after restart")
reads = overlapping(source_reads(log, mark3), 500 * P, P)
check(len(reads) == 1, "absent page 500 after restart: source reads %r, expected one" % reads)
h.shutdown()
PY
say "ok: after restart: pulled pages served from the store, writes intact"
stop_server_ok lazy2
pass
