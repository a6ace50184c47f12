#!/bin/bash
# kill -9 of a lazy daemon in the middle of an unflushed load, then a restart on the same store:
#  - phase 1 (one nbdsh connection): reads of absent pages (32 windows pulled), writes followed by
#    FLUSH (whole, partial and unaligned multi-page), then FUA writes (whole and partial pages);
#  - phase 2 (background): a writer (unflushed writes and some FUA writes, each page at most once) and
#    a reader of absent pages; the daemon is SIGKILLed while both are running (after >= 150 writes and
#    60 reads, > 1 s: past a periodic commit).
# After the restart: every flushed or FUA write is intact; every page present at the last flush is
# served with no source read; every page equals the model (image + durable writes), or for a page
# with an unflushed/unfinished write, that write's version; nothing else (no garbage).
# The Python side is 28-lazy-kill9.py.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/lazylib.sh"
require_lazy

HELPER="$IT_DIR/28-lazy-kill9.py"
SIZE_MIB=8
random_file "$T/src.img" "$SIZE_MIB"
mkdir -p "$T/state"
start_source src "$T/src.img"
serve_lazy lazy src "$T/store" --fetch-size 64K --control "$T/lazy.ctl"

tmo 120 "$PY" "$HELPER" phase1 "$(uri lazy)" "$T/src.img" "$T/src.log" "$T/state" \
    || fail "phase 1 (reads, flushed writes, FUA writes) failed before any kill"
lz_status lazy "$T/s1.json"
say "status after phase 1: pages $(json_get "$T/s1.json" 'j["pages"]')"

# ---- phase 2: unflushed load, killed in the middle ---------------------------------------------------
timeout -k 5 60 "$PY" "$HELPER" writer "$(uri lazy)" "$T/state" >"$T/writer.out" 2>&1 &
wpid=$!
timeout -k 5 60 "$PY" "$HELPER" reader "$(uri lazy)" "$T/src.img" "$T/state" >"$T/reader.out" 2>&1 &
rpid=$!
for ((i = 0; i < 200; i++)); do
    w=$(grep -c '^done' "$T/state/writer.log" 2>/dev/null || true)
    r=$(grep -c '^ok' "$T/state/reader.log" 2>/dev/null || true)
    [ "${w:-0}" -ge 150 ] && [ "${r:-0}" -ge 60 ] && break
    sleep 0.05
done
kill -0 "$wpid" 2>/dev/null || { cat "$T/writer.out" >&2; fail "the writer finished (or died) before the kill: the load was too short"; }
kill -0 "$rpid" 2>/dev/null || { cat "$T/reader.out" >&2; fail "the reader finished (or died) before the kill: the load was too short"; }
lz_kill9_server lazy
say "daemon SIGKILLed after $(grep -c '^done' "$T/state/writer.log") writes done and $(grep -c '^ok' "$T/state/reader.log") pages read"
rc=0; wait "$rpid" || rc=$?
if grep -q '^bad' "$T/state/reader.log"; then
    cat "$T/reader.out" >&2
    fail "the reader got wrong data BEFORE the kill: pages $(grep '^bad' "$T/state/reader.log" | head -5 | tr '\n' ' ')"
fi
wait "$wpid" || true

# ---- restart on the same store ------------------------------------------------------------------------
rm -f "$T/lazy.sock"
mark=$(log_lines "$T/src.log")
serve_lazy lazy src "$T/store" --fetch-size 64K --control "$T/lazy.ctl"
lz_status lazy "$T/s2.json"
say "status after the restart: pages $(json_get "$T/s2.json" 'j["pages"]')"
tmo 120 "$PY" "$HELPER" check "$(uri lazy)" "$T/src.img" "$T/src.log" "$T/state" "$mark" \
    || fail "the store after kill -9 + restart is not consistent (see the checks above)"
assert_alive lazy
stop_server_ok lazy
pass
