#!/bin/bash
# serve --gated: nothing reaches the source until `nbd-umemd gate open`, so a source that is still
# changing (a live-migration source VM that has not stopped) is never read early. The source image
# is rewritten while the gate is closed; a client read of an absent page waits at the gate (status:
# gate "closed", pulls_at_gate 1, no Read or Extents in the source log). After `gate open` the read
# returns the *new* data, the background pull completes, and the whole export equals the final
# source image (no stale page). `gate open` again is a no-op; --gated needs --control.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/lazylib.sh"
require_lazy

build_mmap_tool
"$NBD_MMAP" fill "$T/src.img" --size 16M --pattern 1 >/dev/null
start_source src "$T/src.img"
mark=$(log_lines "$T/src.log")
serve_lazy lazy src "$T/store" --gated --prefetch adaptive --fetch-size 64K --control "$T/lazy.ctl"

# a client reads page 100 (absent): it must wait at the gate
py "$(uri lazy)" "$T/read.out" <<'PY' &
import sys, time, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
t = time.time()
data = h.pread(4096, 100 * 4096)
open(sys.argv[2], "wb").write(data)
print("[45-gate] the read of page 100 returned after %.2f s" % (time.time() - t))
PY
reader=$!
sleep 1.5
kill -0 "$reader" 2>/dev/null || fail "the read of an absent page returned while the gate was closed"
lz_status lazy "$T/s1.json"
"$PY" - "$T/s1.json" <<'PY' || fail "status with the gate closed is wrong (see above)"
import json, sys
j = json.load(open(sys.argv[1]))
print("[45-gate] gate=%s pulls_at_gate=%d bytes_pulled=%d prefetch_state=%s" % (j["gate"], j["pulls_at_gate"], j["bytes_pulled"], j["prefetch_state"]))
assert j["gate"] == "closed" and j["pulls_at_gate"] == 1 and j["bytes_pulled"] == 0, j
assert j["prefetch_state"] != "running", j
PY

# the source keeps changing while the gate is closed: pages 100 and 3000 get pattern 2
"$NBD_MMAP" fill "$T/p2.img" --size 16M --pattern 2 >/dev/null
for p in 100 3000; do dd if="$T/p2.img" of="$T/src.img" bs=4096 skip=$p seek=$p count=1 conv=notrunc status=none; done
sync
[ -z "$(source_requests "$T/src.log" "$mark" | awk '$1 == "Read" || $1 == "Extents"')" ] \
    || fail "the source was read while the gate was closed: $(source_requests "$T/src.log" "$mark" | head -n 5)"

tmo 20 "$NBD_UMEMD" gate open --control "$T/lazy.ctl" >"$T/open.json"
assert_eq "gate open: released_pulls" 1 "$(json_get "$T/open.json" 'j["released_pulls"]')"
wait "$reader" || fail "the waiting read failed after the gate opened"
cmp -s "$T/read.out" <(dd if="$T/p2.img" bs=4096 skip=100 count=1 status=none) \
    || fail "the read of page 100 returned stale data (pattern 1), not what the source held at gate open"
tmo 20 "$NBD_UMEMD" gate open --control "$T/lazy.ctl" >"$T/open2.json"
assert_eq "second gate open: was_closed" false "$(json_get "$T/open2.json" 'j["was_closed"]')"

lz_wait_status lazy "$T/s2.json" 'j["complete"] is True' 60 || fail "not complete 60 s after the gate opened: $(cat "$T/s2.json")"
tmo 60 nbdcopy "$(uri lazy)" "$T/copy.img"
assert_same_file "$T/src.img" "$T/copy.img" "the export after the gate opened vs the final source image"

# --gated without --control cannot ever open: refused
out=$("$NBD_UMEMD" serve --source "$(uri src)" --store "$T/store2" --gated --unix "$T/x.sock" 2>&1) \
    && fail "serve --gated without --control started"
grep -q -- '--gated needs --control' <<<"$out" || fail "unexpected error for --gated without --control: $out"
stop_server_ok lazy
pass
