#!/bin/bash
# A swap export's slot table is crash-safe with its store. Staging by hand through NBD (what the
# kernel does when the stager pushes pages out): `staging open` hands out the key, one merged 512 KiB
# WRITE per 128 slots carries markers (source pages in a scrambled order, with data slots mixed in),
# `staging seal`. Then post-copy: some slots are read (pulled), some reused for data (unflushed and
# flushed), the daemon is SIGKILLed with a background pull running and restarted on the same store:
#  - no page pulled before the kill is pulled again, no slot is served wrong (every mapped slot still
#    equals its source page, every flushed data slot its data), staging stays sealed (a valid marker
#    written now is plain data);
#  - a marker with a wrong key, a torn marker and a marker written after sealing were never decoded.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/lazylib.sh"
require_lazy

PAGES=2048            # 8 MiB source
SLOTS=2304            # 9 MiB swap export
random_file "$T/src.img" 8
# a few zero pages (never staged)
dd if=/dev/zero of="$T/src.img" bs=4096 seek=100 count=20 conv=notrunc status=none
start_source src "$T/src.img"
serve_lazy swap src "$T/store" --swap-size $((SLOTS * 4096)) --control "$T/swap.ctl" \
    --fetch-size 4K --prefetch sequential --max-rate 2M

key=$(tmo 20 "$NBD_UMEMD" staging open --control "$T/swap.ctl" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["key"])')
[ ${#key} -eq 32 ] || fail "staging open gave no key"
"$NBD_UMEMD" marker --key "$key" --page 0 --count $PAGES >"$T/markers.bin" || fail "nbd-umemd marker failed"
"$NBD_UMEMD" marker --key 0123456789abcdef0123456789abcdef --page 5 >"$T/wrongkey.bin"

# Stage: slot s (1..) holds source page perm[s]; every 16th slot gets data instead; the zero pages
# 100-119 are left out. Returns the plan in $T/plan.json.
nbdsh_py "$(uri swap)" "$T/src.img" "$T/markers.bin" "$T/wrongkey.bin" "$T/plan.json" $PAGES $SLOTS <<'PYEOF'
import json, random
src = open(sys.argv[1], "rb").read(); markers = open(sys.argv[2], "rb").read()
wrong = open(sys.argv[3], "rb").read(); pages, slots = int(sys.argv[5]), int(sys.argv[6])
rnd = random.Random(5)
order = [p for p in range(pages) if not 100 <= p < 120]
rnd.shuffle(order)
plan = {}          # slot -> ["page", p] or ["data", seed]
slot = 1; i = 0
while i < len(order):
    if slot % 16 == 0:
        plan[slot] = ["data", slot]
    else:
        plan[slot] = ["page", order[i]]; i += 1
    slot += 1
# special slots after the staged range
s_wrong, s_torn = slot, slot + 1
plan[s_wrong] = ["raw", "wrongkey"]; plan[s_torn] = ["raw", "torn"]
torn = bytearray(markers[7 * 4096:8 * 4096]); torn[4000] = 1
def content(s):
    kind, v = plan[s]
    if kind == "page": return markers[v * 4096:(v + 1) * 4096]
    if kind == "data": return pattern(4096, v)
    return wrong if v == "wrongkey" else bytes(torn)
last = s_torn
s = 1
while s <= last:
    n = min(128, last + 1 - s)
    h.pwrite(b"".join(content(x) for x in range(s, s + n)), s * 4096)
    s += n
h.flush()
json.dump({"plan": plan, "staged": len(order)}, open(sys.argv[4], "w"))
print("staged", len(order), "slots up to", last)
PYEOF
[ $? -eq 0 ] || fail "staging through NBD failed"
staged=$(json_get "$T/plan.json" 'j["staged"]')
tmo 20 "$NBD_UMEMD" staging seal --control "$T/swap.ctl" >"$T/seal.json" || fail "staging seal failed: $(cat "$T/seal.json")"
assert_eq "markers decoded" "$staged" "$(json_get "$T/seal.json" 'j["markers_decoded"]')"
assert_eq "staged slots" "$staged" "$(json_get "$T/seal.json" 'j["staged_slots"]')"
assert_eq "duplicate markers" 0 "$(json_get "$T/seal.json" 'j["duplicate_markers"]')"
assert_eq "invalid markers (wrong key, torn)" 2 "$(json_get "$T/seal.json" 'j["invalid_markers"]')"
mark=$(log_lines "$T/src.log")

# Post-copy: read 300 mapped slots, reuse 100 others (50 flushed, 50 unflushed), write a valid marker
# to a free slot (data now); the background pull runs at 2 MB/s meanwhile.
nbdsh_py "$(uri swap)" "$T/src.img" "$T/plan.json" "$T/markers.bin" "$T/after.json" <<'PYEOF'
import json, random
src = open(sys.argv[1], "rb").read(); plan = json.load(open(sys.argv[2]))["plan"]
markers = open(sys.argv[3], "rb").read()
mapped = sorted(int(s) for s, (k, v) in plan.items() if k == "page")
rnd = random.Random(9); rnd.shuffle(mapped)
for s in mapped[:300]:
    p = plan[str(s)][1]
    check_data(src[p * 4096:(p + 1) * 4096], h.pread(4096, s * 4096), "slot %d (source page %d)" % (s, p))
reused = {}
for s in mapped[300:350]:
    reused[s] = ["flushed", s + 7000]; h.pwrite(pattern(4096, s + 7000), s * 4096)
h.flush()
for s in mapped[350:400]:
    reused[s] = ["unflushed", s + 9000]; h.pwrite(pattern(4096, s + 9000), s * 4096)
free = max(int(s) for s in plan) + 10
h.pwrite(markers[9 * 4096:10 * 4096], free * 4096)
h.flush()
check_data(markers[9 * 4096:10 * 4096], h.pread(4096, free * 4096), "a marker written after sealing is data")
json.dump({"reused": reused, "free": free}, open(sys.argv[4], "w"))
PYEOF
[ $? -eq 0 ] || fail "post-copy reads and writes failed"
# A commit point: background pull paused and drained, then FLUSH; every page pulled before it is
# durable. Then the pull runs on and the daemon is killed in the middle of it.
tmo 20 "$NBD_UMEMD" prefetch pause --control "$T/swap.ctl" >/dev/null || fail "prefetch pause failed"
lz_wait_status swap "$T/paused.json" 'j["pulls_in_flight"] == 0' 20 || fail "pulls still in flight after pausing"
nbdsh_py "$(uri swap)" <<<'h.flush()' || fail "flush failed"
committed=$(log_lines "$T/src.log")
tmo 20 "$NBD_UMEMD" prefetch resume --control "$T/swap.ctl" >/dev/null || fail "prefetch resume failed"
sleep 1.5
lz_status swap "$T/before.json"
say "before the kill: $(source_reads "$T/src.log" "$mark" | wc -l) source reads ($(source_reads "$T/src.log" "$committed" | wc -l) after the commit point), pages $(json_get "$T/before.json" 'j["pages"]')"
[ "$(source_reads "$T/src.log" "$committed" | wc -l)" -gt 0 ] || fail "the background pull did not run after the commit point: the kill would not be mid-pull"
lz_kill9_server swap
mark2=$(log_lines "$T/src.log")

serve_lazy swap src "$T/store" --swap-size $((SLOTS * 4096)) --control "$T/swap.ctl" --fetch-size 4K
lz_status swap "$T/restart.json"
assert_eq "staging after the restart" '"sealed"' "$(json_get "$T/restart.json" 'j["staging"]')"
assert_eq "staged slots after the restart" "$staged" "$(json_get "$T/restart.json" 'j["staged_slots"]')"
nbdsh_py "$(uri swap)" "$T/src.img" "$T/plan.json" "$T/after.json" "$T/src.log" "$mark" "$mark2" "$committed" <<'PYEOF'
import json
src = open(sys.argv[1], "rb").read(); plan = json.load(open(sys.argv[2]))["plan"]
after = json.load(open(sys.argv[3])); reused = after["reused"]
mark, skip2, committed = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
def pages(reads):
    return set(p for o, n in reads for p in range(o // 4096, (o + n + 4095) // 4096))
# source pages read before the commit point
all_reads = source_reads(sys.argv[4], mark)
before = pages(all_reads[:len(all_reads) - len(source_reads(sys.argv[4], committed))])
for s_str, (kind, v) in sorted(plan.items(), key=lambda x: int(x[0])):
    s = int(s_str); got = h.pread(4096, s * 4096)
    if s_str in reused:
        how, seed = reused[s_str]
        if how == "flushed":
            check_data(pattern(4096, seed), got, "flushed data in reused slot %d" % s)
        else:
            p = v
            check(got == pattern(4096, seed) or got == src[p * 4096:(p + 1) * 4096],
                  "unflushed reused slot %d holds its data or its source page" % s)
    elif kind == "page":
        check_data(src[v * 4096:(v + 1) * 4096], got, "slot %d (source page %d)" % (s, v))
    elif kind == "data":
        check_data(pattern(4096, v), got, "data slot %d" % s)
    else:
        check(got != bytes(4096), "raw slot %d kept its bytes" % s)
again = sorted(pages(source_reads(sys.argv[4], skip2)) & before)
check(not again, "%d source pages pulled before the commit point were pulled again: %s" % (len(again), again[:5]))
check(len(before) > 300, "only %d pages were pulled before the commit point" % len(before))
print("after the restart: %d source reads, none repeated" % len(source_reads(sys.argv[4], skip2)))
free = after["free"]
PYEOF
[ $? -eq 0 ] || fail "the store served a slot wrong or pulled a page twice after kill -9"
stop_server_ok swap
pass
