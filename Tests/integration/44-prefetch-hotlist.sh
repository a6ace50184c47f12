#!/bin/bash
# --hot-list and --record-faults (64 MiB random image).
# 1. A hot list with 3 ranges spread over the export (near the end, 1.5 MiB across a batch boundary;
#    the middle, unaligned length; a small unaligned range over 4 pages), with '#' comment and blank
#    lines and size suffixes: with --prefetch adaptive and no client, the first source Reads after
#    start-up are exactly those ranges, in the file's order, rounded out to whole pages, before any
#    other read; then the pull completes with no page read twice (the hot pages are not pulled again).
# 2. A daemon with --prefetch off --fetch-size 4K --record-faults FILE on a fresh store, a client reads
#    pages 7, 1, 6 (and page 7 again, a hit): after SIGTERM the file holds exactly "28672 4096",
#    "4096 4096", "24576 4096" in that order; given back as --hot-list to a third daemon (prefetch on,
#    fresh store) those are its first three source reads.
# The source runs nbdkit with one thread per connection, so that its log lists a connection's reads in
# the order the daemon sent them (the daemon keeps several background reads in flight; with parallel
# nbdkit threads they are logged in whatever order the threads get to them).
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/lazylib.sh"
require_lazy

SIZE_MIB=64
MiB=1048576
random_file "$T/src.img" "$SIZE_MIB"
start_source src "$T/src.img" --threads=1

# check_first_reads LOG MARK EXPECTED SIZE_MIB: the first source reads after MARK tile the ranges of
# EXPECTED ("OFFSET LENGTH" lines, already page-aligned) exactly and in order (a range may come in
# several reads, in ascending order), before any other read; and over all reads after MARK no page is
# read twice and every page is read (the pull has completed).
check_first_reads() {
    py "$@" <<'PY'
import sys
from nbdtest import *
reads = source_reads(sys.argv[1], int(sys.argv[2]))
want = [tuple(map(int, l.split())) for l in open(sys.argv[3]) if l.strip()]
size = int(sys.argv[4]) * MiB
P = 4096
note("first source reads: %s" % " ".join("%d+%d" % r for r in reads[:12]))
i = 0
for o, l in want:
    pos = o
    while pos < o + l:
        if i >= len(reads):
            check(False, "hot range %d+%d: the source reads end at %d, before it is covered" % (o, l, pos))
            break
        ro, rc = reads[i]
        if ro != pos or ro + rc > o + l:
            check(False, "hot range %d+%d: source read #%d is %d+%d, expected a read starting at %d within the range "
                  "(first reads must be the hot ranges, in order, before anything else: %r)" % (o, l, i, ro, rc, pos, reads[:12]))
            break
        pos += rc
        i += 1
    else:
        continue
    break
cover = page_coverage(reads, size, P)
twice = [p for p in range(len(cover)) if len(cover[p]) > 1]
check(not twice, "%d page(s) read from the source more than once, e.g. %r" % (len(twice), twice[:10]))
missing = [p for p in range(len(cover)) if not cover[p]]
check(not missing, "%d page(s) never read from the source, e.g. %r" % (len(missing), missing[:10]))
PY
}

# ---- 1. a hand-written hot list ----------------------------------------------------------------------
cat >"$T/hot.txt" <<EOF
# pulled first, in this order
$((62 * MiB + 4096)) 1536K

$((32 * MiB)) 300000
   # small and unaligned: bytes 1052000..1061000 (pages 256-259)
1052000 9000
EOF
cat >"$T/hot-expect.txt" <<EOF
$((62 * MiB + 4096)) $((1536 * 1024))
$((32 * MiB)) $(((300000 + 4095) / 4096 * 4096))
$((1052000 / 4096 * 4096)) $(((1061000 + 4095) / 4096 * 4096 - 1052000 / 4096 * 4096))
EOF
mark=$(log_lines "$T/src.log")
serve_lazy hot src "$T/store-hot" --prefetch adaptive --hot-list "$T/hot.txt" --control "$T/hot.ctl"
lz_wait_status hot "$T/hot.json" 'j["complete"] is True' 60 \
    || fail "the export with a hot list did not become complete within 60 s: $(cat "$T/hot.json")"
grep -q 'hot list .*3 ranges' "$T/hot.log" || fail "the daemon did not log a hot list of 3 ranges"
check_first_reads "$T/src.log" "$mark" "$T/hot-expect.txt" "$SIZE_MIB"
say "ok: the 3 hot ranges were the first source reads, in order; then every other page once"
assert_alive hot
stop_server_ok hot

# ---- 2. --record-faults, fed back as --hot-list -------------------------------------------------------------
serve_lazy rec src "$T/store-rec" --prefetch off --fetch-size 4K --record-faults "$T/faults.txt"
nbdsh_py "$(uri rec)" "$T/src.img" <<'PY'
img = open(sys.argv[1], "rb").read()
P = 4096
for p in (7, 1, 6, 7):
    check_data(img[p * P:(p + 1) * P], h.pread(P, p * P), "read of page %d" % p)
h.shutdown()
PY
stop_server_ok rec
[ -e "$T/faults.txt" ] || fail "--record-faults $T/faults.txt: no file written"
say "recorded faults: $(tr '\n' ';' <"$T/faults.txt")"
grep -vE '^[[:space:]]*(#|$)' "$T/faults.txt" >"$T/faults-ranges.txt" || true
printf '%s\n' "28672 4096" "4096 4096" "24576 4096" >"$T/faults-expect.txt"
cmp -s "$T/faults-expect.txt" "$T/faults-ranges.txt" \
    || fail "--record-faults file holds '$(tr '\n' ';' <"$T/faults-ranges.txt")', expected the misses of pages 7, 1, 6 in order: '$(tr '\n' ';' <"$T/faults-expect.txt")'"
say "ok: --record-faults wrote the 3 misses in order (the repeated read of page 7 was a hit)"

mark=$(log_lines "$T/src.log")
serve_lazy replay src "$T/store-replay" --prefetch adaptive --hot-list "$T/faults.txt" --control "$T/replay.ctl"
lz_wait_status replay "$T/replay.json" 'j["complete"] is True' 60 \
    || fail "the export with the recorded hot list did not become complete within 60 s: $(cat "$T/replay.json")"
check_first_reads "$T/src.log" "$mark" "$T/faults-expect.txt" "$SIZE_MIB"
say "ok: the recorded faults, as --hot-list, were the first source reads of a fresh daemon"
assert_alive replay
pass
