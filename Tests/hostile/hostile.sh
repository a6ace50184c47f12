#!/bin/bash
# Hostile clients (Tests/hostile/hostile.py) against one --memory 64M server whose first 32 MiB
# hold a known pattern: thousands of random/mutated handshakes and request streams. Afterwards the
# server must still run, serve the pattern unchanged to nbdcopy and nbdinfo, not leak connections,
# and its resident memory must stay under 512 MiB. Then a shorter run against a server with
# --tls on, where every NBD_OPT_STARTTLS the clients send is followed by garbage in place of the
# TLS handshake (HOSTILE_TLS_SECONDS, default 20).
# Environment: HOSTILE_SEED (default: a fixed seed; a number reproduces a run, "random" picks a new
# one), HOSTILE_CONNS (default 3000),
# HOSTILE_SECONDS (default 90), HOSTILE_ONLY (replay one connection index).
. "$(dirname "$0")/../integration/lib.sh"

HOSTILE_DIR=$(cd "$(dirname "$0")" && pwd)
RSS_LIMIT_MIB=512

serve_unix srv --memory 64M
PID=${SRV_PID[srv]}

# Known pattern over the whole export (the fuzzer only ever modifies the upper half).
"$PY" -c 'import random,sys; sys.stdout.buffer.write(random.Random(4242).randbytes(64 << 20))' >"$T/pattern.img"
tmo 120 nbdcopy "$T/pattern.img" "$(uri srv)" || fail "could not write the pattern with nbdcopy"
tmo 120 nbdcopy "$(uri srv)" "$T/check0.img" || fail "could not read the pattern back"
assert_same_file "$T/pattern.img" "$T/check0.img" "pattern before fuzzing"
rm -f "$T/check0.img"

rss0=$(rss_kib "$PID")
fds0=$(ls "/proc/$PID/fd" | wc -l)
say "before: RSS $((rss0 / 1024)) MiB, $fds0 open fds"

rc=0
tmo $(( ${HOSTILE_SECONDS:-90} + 120 )) "$PY" "$HOSTILE_DIR/hostile.py" --sock "$(sock srv)" --pid "$PID" \
    --pattern-file "$T/pattern.img" --max-conns "${HOSTILE_CONNS:-3000}" --max-seconds "${HOSTILE_SECONDS:-90}" \
    --rss-limit-mib "$RSS_LIMIT_MIB" || rc=$?
soft test "$rc" -eq 0

kill -0 "$PID" 2>/dev/null || fail "the server is no longer running after the hostile clients"

# A normal client gets correct data.
size=$(tmo 30 nbdinfo --size "$(uri srv)") || fail "nbdinfo failed after fuzzing"
assert_eq "export size after fuzzing" 67108864 "$size"
tmo 30 nbdinfo --json "$(uri srv)" >"$T/info.json" || fail "nbdinfo --json failed after fuzzing"
tmo 120 nbdcopy "$(uri srv)" "$T/after.img" || fail "nbdcopy failed after fuzzing"
if ! cmp -s -n $((32 << 20)) "$T/pattern.img" "$T/after.img"; then
    cmp -n $((32 << 20)) "$T/pattern.img" "$T/after.img" >&2 || true
    fail "the protected first 32 MiB changed during fuzzing (no valid request could write there)"
fi
say "ok: pattern intact, nbdinfo and nbdcopy work"
# And it still takes writes.
random_file "$T/new.img" 64
tmo 120 nbdcopy "$T/new.img" "$(uri srv)" || fail "nbdcopy write after fuzzing failed"
tmo 120 nbdcopy "$(uri srv)" "$T/after2.img" || fail "nbdcopy read after fuzzing failed"
assert_same_file "$T/new.img" "$T/after2.img" "round trip after fuzzing"

# Resources: memory and connections released.
rss1=$(rss_kib "$PID")
fds1=$fds0
for _ in $(seq 1 50); do
    fds1=$(ls "/proc/$PID/fd" | wc -l)
    [ "$fds1" -le $((fds0 + 4)) ] && break
    sleep 0.2
done
say "after: RSS $((rss1 / 1024)) MiB, $fds1 open fds"
[ "$rss1" -le $((RSS_LIMIT_MIB * 1024)) ] || fail "server RSS $((rss1 / 1024)) MiB > $RSS_LIMIT_MIB MiB after fuzzing"
[ "$fds1" -le $((fds0 + 4)) ] || fail "server holds $fds1 fds after all hostile clients closed (was $fds0): leaked connections?"

stop_server_ok srv

# The same clients against a TLS server: garbage before, in place of and after the TLS handshake.
make_psk "$T/keys.psk" alice
serve_unix tls --memory 64M --tls on --tls-psk "$T/keys.psk"
TLS_URI="nbds+unix://alice@/?socket=$(sock tls)&tls-psk-file=$T/keys.psk"
tmo 120 nbdcopy "$T/pattern.img" "$TLS_URI" || fail "could not write the pattern over TLS"
fds0=$(ls "/proc/${SRV_PID[tls]}/fd" | wc -l)
rc=0
tmo $(( ${HOSTILE_TLS_SECONDS:-20} + 120 )) "$PY" "$HOSTILE_DIR/hostile.py" --sock "$(sock tls)" --pid "${SRV_PID[tls]}" \
    --pattern-file "$T/pattern.img" --max-conns 1000 --max-seconds "${HOSTILE_TLS_SECONDS:-20}" \
    --rss-limit-mib "$RSS_LIMIT_MIB" || rc=$?
soft test "$rc" -eq 0
assert_alive tls
rm -f "$T/after.img"
tmo 120 nbdcopy "$TLS_URI" "$T/after.img" || fail "nbdcopy over TLS failed after the hostile clients"
cmp -s -n $((32 << 20)) "$T/pattern.img" "$T/after.img" || fail "the protected first 32 MiB changed on the TLS server"
tmo 30 nbdinfo --size "$(uri tls)" >/dev/null || fail "a plain client is not served by --tls on after the hostile clients"
for _ in $(seq 1 50); do
    fds1=$(ls "/proc/${SRV_PID[tls]}/fd" | wc -l)
    [ "$fds1" -le $((fds0 + 4)) ] && break
    sleep 0.2
done
[ "$fds1" -le $((fds0 + 4)) ] || fail "the TLS server holds $fds1 fds after all hostile clients closed (was $fds0)"
say "ok: TLS server: alive, pattern intact over TLS, plain clients served, no leaked connections"
stop_server_ok tls
pass
