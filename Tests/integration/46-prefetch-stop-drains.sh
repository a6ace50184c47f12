#!/bin/bash
# Stopping the daemon in the middle of the background pull: SIGTERM while pulls are in flight (the
# source delays every read by 2 ms). The daemon waits for the reads it has sent, stores their data and
# only then disconnects: the source (nbdkit, whose 1.32 release aborts when a client closes under its
# in-flight replies) is still running, its log shows every read answered (none abandoned with an
# error), and after a restart on the same store exactly the bytes the source sent are present.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/lazylib.sh"
require_lazy

SIZE_MIB=256
random_file "$T/src.img" "$SIZE_MIB"
start_source src "$T/src.img" --filter=delay delay-read=2ms
mark=$(log_lines "$T/src.log")
serve_lazy lazy src "$T/store" --prefetch adaptive --control "$T/lazy.ctl"
lz_wait_status lazy "$T/st.json" 'j["background_bytes"] >= 8 << 20 and j["pulls_in_flight"] > 0' 60 \
    || { cat "$T/st.json" >&2; fail "the background pull did not get going within 60 s"; }
say "stopping with the pull under way: $(json_get "$T/st.json" '[j["pulls_in_flight"], j["background_bytes"], j["pages"]["present"]]') (in flight, background bytes, present pages)"
stop_server_ok lazy
# (a new client connects: an abort of the source comes a few ms after the daemon's close)
{ tmo 20 nbdinfo --size "$(uri src)" >/dev/null && kill -0 "${SRC_PID[src]}" 2>/dev/null; } \
    || { tail -n 5 "$T/src.log" >&2; fail "the nbdkit source died when the daemon stopped"; }
abandoned=$(tail -n +"$((mark + 1))" "$T/src.log" | grep -cE '\.\.\.Read .*return=-1' || true)
[ "$abandoned" -eq 0 ] || { tail -n +"$((mark + 1))" "$T/src.log" | grep -E 'return=-1' | head -n 5 >&2
    fail "$abandoned source read(s) ended with an error: the daemon disconnected under them"; }
if grep -q "still in flight" "$T/lazy.log"; then fail "the daemon closed with pulls in flight: $(grep 'still in flight' "$T/lazy.log")"; fi
sent=$(source_read_bytes "$T/src.log" "$mark")
say "ok: source alive, no read abandoned; the source sent $sent bytes"

serve_lazy again src "$T/store" --control "$T/again.ctl"
lz_status again "$T/again.json"
present=$(json_get "$T/again.json" 'j["pages"]["present"]')
assert_eq "bytes present in the store after the restart (vs bytes the source sent before the stop)" "$sent" "$((present * 4096))"
say "ok: after the restart $present pages are present, exactly the $sent bytes the source sent"
stop_server_ok again
pass
