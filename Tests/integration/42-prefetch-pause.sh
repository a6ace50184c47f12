#!/bin/bash
# `nbd-umemd prefetch pause|resume` on a running background pull (--prefetch adaptive, --max-rate 10M
# over a 128 MiB random image, so it takes > 10 s). About 1 s in: pause replies {"ok": true}; once the
# reads already in flight are done (up to 1 s) the source gets no background Read for 3 s, status says
# prefetch_state "paused" and background_bytes does not move; a client read of an absent page while
# paused is still served (exactly one demand Read, correct data, no background reads around it).
# Resume replies {"ok": true}, the pull carries on to "complete" (within 60 s) and the source log shows
# every page read exactly once (it resumed where it stopped, nothing pulled twice). On a daemon with
# --prefetch off, `prefetch pause` and `prefetch resume` exit 1 with an "error" in their reply.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/lazylib.sh"
require_lazy

SIZE_MIB=128
MiB=1048576
random_file "$T/src.img" "$SIZE_MIB"
start_source src "$T/src.img"
mark=$(log_lines "$T/src.log")
serve_lazy lazy src "$T/store" --prefetch adaptive --max-rate 10M --control "$T/lazy.ctl"

# jcheck FILE WHAT PYEXPR: PYEXPR (j = the parsed JSON of FILE) must be true.
jcheck() {
    local file=$1 what=$2 expr=$3
    "$PY" -c 'import json,sys; j=json.load(open(sys.argv[1])); sys.exit(0 if eval(sys.argv[2]) else 1)' "$file" "$expr" \
        || { printf '[%s] JSON was: %s\n' "$TEST_NAME" "$(cat "$file")" >&2; fail "$what: expected $expr"; }
}
# prefetch_cmd ACTION NAME OUT: `nbd-umemd prefetch ACTION --control $T/NAME.ctl`, stdout in OUT,
# stderr in OUT.err; prints the exit status.
prefetch_cmd() {
    local rc=0
    tmo 20 "$NBD_UMEMD" prefetch "$1" --control "$T/$2.ctl" >"$3" 2>"$3.err" || rc=$?
    echo "$rc"
}

lz_wait_status lazy "$T/s0.json" 'j["background_bytes"] > 0' 10 \
    || fail "no background pull within 10 s of the start: $(cat "$T/s0.json")"
sleep 1
jcheck "$T/s0.json" "state before the pause" 'j["prefetch_state"] == "running"'

# ---- pause ------------------------------------------------------------------------------------------
rc=$(prefetch_cmd pause lazy "$T/pause.json")
say "prefetch pause: exit $rc: $(tr -d '\n' <"$T/pause.json")"
assert_eq "exit status of prefetch pause" 0 "$rc"
jcheck "$T/pause.json" "prefetch pause reply" 'j.get("ok") is True'
# reads the daemon had already sent may still be logged: wait (up to 1 s) until the log stops growing
prev=$(log_lines "$T/src.log")
for ((i = 0; i < 5; i++)); do
    sleep 0.2
    now=$(log_lines "$T/src.log")
    [ "$now" -eq "$prev" ] && break
    prev=$now
done
lz_status lazy "$T/p1.json"
say "paused: $(tr -d '\n ' <"$T/p1.json")"
jcheck "$T/p1.json" "status while paused" 'j["prefetch_state"] == "paused"'
jcheck "$T/p1.json" "complete while paused" 'j["complete"] is False and j["pages"]["absent"] > 0 and j["progress"] < 1.0'
pmark=$(log_lines "$T/src.log")

# while paused, a demand miss is still pulled (exactly that, no background window around it)
MISS=$((100 * MiB + 12345))
jcheck "$T/p1.json" "background progress before the demand miss (the miss is beyond it)" "j['background_bytes'] < 90 * $MiB"
nbdsh_py "$(uri lazy)" "$T/src.img" "$MISS" <<'PY'
img = open(sys.argv[1], "rb").read()
off = int(sys.argv[2])
check_data(img[off:off + 4096], h.pread(4096, off), "read of 4096 bytes at %d while the background pull is paused" % off)
h.shutdown()
PY
sleep 3
source_reads "$T/src.log" "$pmark" >"$T/paused-reads.txt"
say "source reads in 3 s of pause (with one client read at $MISS): $(tr '\n' ';' <"$T/paused-reads.txt")"
assert_eq "source reads while paused (only the client's demand miss)" 1 "$(grep -c . "$T/paused-reads.txt" || true)"
read -r roff rcnt <"$T/paused-reads.txt"
[ "$roff" -le "$MISS" ] && [ $((roff + rcnt)) -ge $((MISS + 4096)) ] && [ "$rcnt" -le 65536 ] \
    || fail "the one source read while paused (offset=$roff count=$rcnt) is not the demand miss at $MISS (<= 64 KiB around it)"
lz_status lazy "$T/p2.json"
jcheck "$T/p2.json" "status after 3 s of pause" 'j["prefetch_state"] == "paused"'
p1=$(json_get "$T/p1.json" 'j["background_bytes"]')
jcheck "$T/p2.json" "background_bytes after 3 s of pause (was $p1)" "j['background_bytes'] == $p1"
jcheck "$T/p2.json" "demand_misses after the read while paused" 'j["demand_misses"] == 1'
say "ok: paused for 3 s: no background read from the source, the demand miss served"

# ---- resume ----------------------------------------------------------------------------------------
rc=$(prefetch_cmd resume lazy "$T/resume.json")
say "prefetch resume: exit $rc: $(tr -d '\n' <"$T/resume.json")"
assert_eq "exit status of prefetch resume" 0 "$rc"
jcheck "$T/resume.json" "prefetch resume reply" 'j.get("ok") is True'
lz_status lazy "$T/r1.json"
jcheck "$T/r1.json" "state after resume" 'j["prefetch_state"] in ("running", "done")'
lz_wait_status lazy "$T/done.json" 'j["complete"] is True' 60 \
    || fail "the export did not become complete within 60 s of prefetch resume: $(cat "$T/done.json")"
jcheck "$T/done.json" "state once complete" 'j["prefetch_state"] == "done" and j["progress"] == 1.0'
py "$T/src.log" "$mark" "$SIZE_MIB" <<'PY'
import sys
from nbdtest import *
reads = source_reads(sys.argv[1], int(sys.argv[2]))
size = int(sys.argv[3]) * MiB
P = 4096
cover = page_coverage(reads, size, P)
twice = [p for p in range(len(cover)) if len(cover[p]) > 1]
check(not twice, "%d page(s) read from the source more than once after pause/resume, e.g. %r" % (len(twice), twice[:10]))
missing = [p for p in range(len(cover)) if not cover[p]]
check(not missing, "%d page(s) never read from the source, e.g. %r" % (len(missing), missing[:10]))
check(sum(c for _, c in reads) == size, "source reads add up to %d bytes, expected %d" % (sum(c for _, c in reads), size))
PY
say "ok: resumed and completed; every page read from the source exactly once"
assert_alive lazy

# ---- pause / resume without a background pull ------------------------------------------------------
serve_lazy off src "$T/store-off" --control "$T/off.ctl"
lz_status off "$T/off.json"
jcheck "$T/off.json" "status of a --prefetch off daemon" 'j["prefetch"] == "off" and j["prefetch_state"] == "off"'
for action in pause resume; do
    rc=$(prefetch_cmd "$action" off "$T/off-$action.json")
    say "prefetch $action on a --prefetch off daemon: exit $rc, stdout: $(tr -d '\n' <"$T/off-$action.json"), stderr: $(tr -d '\n' <"$T/off-$action.json.err")"
    assert_eq "exit status of prefetch $action on a --prefetch off daemon" 1 "$rc"
    jcheck "$T/off-$action.json" "reply of prefetch $action on a --prefetch off daemon" \
        'isinstance(j.get("error"), str) and "prefetch" in j["error"] and not j.get("ok")'
done
lz_status off "$T/off2.json"
jcheck "$T/off2.json" "status after the refused pause/resume" 'j["prefetch_state"] == "off" and j["background_bytes"] == 0'
say "ok: prefetch pause/resume refused (exit 1, error) with --prefetch off"
assert_alive off
pass
