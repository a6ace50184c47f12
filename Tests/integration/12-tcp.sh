#!/bin/bash
# TCP listeners: --port with --bind 127.0.0.1 together with --unix (same export on both),
# --port alone binds 127.0.0.1, and with no listener option the server listens on
# 127.0.0.1:10809 (checked inside a private network namespace so the port is surely free).
. "$(dirname "$0")/lib.sh"

# listening_addrs PORT: local addresses listening on TCP PORT.
listening_addrs() { ss -ltnH "sport = :$1" | awk '{print $4}' | sort -u | tr '\n' ' ' | sed 's/ $//'; }

# 1. --port + --bind 127.0.0.1 + --unix
P=$(free_port)
start_server both --memory 16M --port "$P" --bind 127.0.0.1 --unix "$T/both.sock"
[ -S "$T/both.sock" ] || fail "--unix socket missing when --port is also given"
assert_eq "listening addresses for --bind 127.0.0.1 --port $P" "127.0.0.1:$P" "$(listening_addrs "$P")"
assert_eq "nbdinfo --size over TCP" 16777216 "$(tmo 30 nbdinfo --size "nbd://127.0.0.1:$P/")"
random_file "$T/src.img" 16
tmo 120 nbdcopy "$T/src.img" "nbd://127.0.0.1:$P/" || fail "nbdcopy over TCP failed"
tmo 120 nbdcopy "nbd+unix:///?socket=$T/both.sock" "$T/out.img" || fail "nbdcopy over Unix failed"
assert_same_file "$T/src.img" "$T/out.img" "written over TCP, read over Unix"
rm -f "$T/out.img"
tmo 120 nbdcopy --connections=4 --threads=4 "nbd://127.0.0.1:$P/" "$T/out.img" || fail "nbdcopy 4 connections over TCP failed"
assert_same_file "$T/src.img" "$T/out.img" "read over TCP with 4 connections"
say "ok: TCP + Unix on one server"

# 2. --port alone: default bind address is 127.0.0.1
P2=$(free_port)
start_server tcponly --memory 1M --port "$P2"
assert_eq "listening addresses for --port $P2 without --bind" "127.0.0.1:$P2" "$(listening_addrs "$P2")"
assert_eq "nbdinfo over TCP (default bind)" 1048576 "$(tmo 30 nbdinfo --size "nbd://127.0.0.1:$P2/")"
stop_server_ok tcponly
[ -z "$(listening_addrs "$P2")" ] || fail "port $P2 still listening after SIGTERM"
say "ok: --port alone binds 127.0.0.1"

# 3. No listener option: 127.0.0.1:10809, in a private network namespace.
cat >"$T/default.sh" <<'SH'
set -u
ip link set lo up || { echo "cannot bring up lo in the namespace"; exit 3; }
"$NBD_UMEMD" serve --memory 2M --pidfile "$T/default.pid" 2>"$T/default.log" &
pid=$!
for i in $(seq 1 200); do [ -s "$T/default.pid" ] && break; sleep 0.05; done
[ -s "$T/default.pid" ] || { echo "server did not start"; cat "$T/default.log"; kill $pid; exit 1; }
addrs=$(ss -ltnH | awk '{print $4}' | sort -u | tr '\n' ' ')
rc=0
[ "$addrs" = "127.0.0.1:10809 " ] || { echo "listening on '$addrs', expected only 127.0.0.1:10809"; rc=1; }
size=$(timeout 30 nbdinfo --size nbd://127.0.0.1/ 2>&1) || true
[ "$size" = 2097152 ] || { echo "nbdinfo --size nbd://127.0.0.1/ (default port) gave '$size'"; rc=1; }
kill -TERM $pid; wait $pid || { echo "server exit status $? after SIGTERM"; rc=1; }
exit $rc
SH
if unshare -n true 2>/dev/null; then
    export T
    out=$(tmo 60 unshare -n bash "$T/default.sh" 2>&1) || fail "default listener: $out"
    say "ok: default listener 127.0.0.1:10809 (private network namespace)"
elif [ -z "$(listening_addrs 10809)" ]; then
    start_server dflt --memory 2M
    assert_eq "listening addresses with no listener option" "127.0.0.1:10809" "$(listening_addrs 10809)"
    assert_eq "nbdinfo on the default port" 2097152 "$(tmo 30 nbdinfo --size nbd://127.0.0.1/)"
    stop_server_ok dflt
    say "ok: default listener 127.0.0.1:10809"
else
    fail "cannot check the default listener: unshare -n is unavailable and port 10809 is busy"
fi

assert_alive both
pass
