#!/bin/bash
# nbdkit's conventions: --run (captive mode: $uri, $exportname, $unixsocket/$port, $tls; the daemon
# stops when the command exits and exits with its status; without a listener option it uses a
# private Unix socket that is removed afterwards), --print-uri, --exit-with-parent, and systemd
# socket activation (systemd-socket-activate, as the example units in systemd/ do it).
. "$(dirname "$0")/lib.sh"

random_file "$T/data.img" 8

# 1. --run on a private socket: the environment, the exit status, nothing left behind
before=$(find /tmp -maxdepth 1 -name "nbd-umemd-run.*" | wc -l)
rc=0
tmo 60 "$NBD_UMEMD" serve --memory 32M --export-name ram0 --run '
    set -e
    case "$uri" in nbd+unix:///ram0\?socket=*) ;; *) echo "bad uri $uri"; exit 90 ;; esac
    [ -S "$unixsocket" ] || { echo "no socket $unixsocket"; exit 91; }
    [ "$exportname" = ram0 ] && [ "$tls" = 0 ] || { echo "exportname=$exportname tls=$tls"; exit 92; }
    nbdcopy "'"$T"'/data.img" "$uri"
    nbdcopy "$uri" "'"$T"'/back.img"
    exit 7' >"$T/run1.out" 2>"$T/run1.err" </dev/null || rc=$?
cat "$T/run1.out"
assert_eq "exit status of serve --run (the command's 7)" 7 "$rc"
after=$(find /tmp -maxdepth 1 -name "nbd-umemd-run.*" | wc -l)
assert_eq "private socket directories left behind" "$before" "$after"
say "ok: --run on a private socket, exit status 7 passed on"
cmp -s -n $((8 << 20)) "$T/data.img" "$T/back.img" || fail "the --run command did not read back what it wrote"

# 2. --run with a TCP port 0, --print-uri, TLS: $port, $tls, and a command killed by a signal
make_psk "$T/keys.psk" alice
rc=0
tmo 60 "$NBD_UMEMD" serve --memory 1M --port 0 --print-uri --tls require --tls-psk "$T/keys.psk" --run '
    echo "port=$port tls=$tls"
    nbdinfo --size "nbds://alice@127.0.0.1:$port/?tls-psk-file='"$T"'/keys.psk" || exit 93
    kill -TERM $$' >"$T/run2.out" 2>"$T/run2.err" </dev/null || rc=$?
assert_eq "exit status when the command dies of SIGTERM" 143 "$rc"
grep -Eq '^nbds://127\.0\.0\.1:[0-9]+/$' "$T/run2.out" || fail "--print-uri did not print the nbds:// URI: $(cat "$T/run2.out")"
grep -Eq '^port=[0-9]+ tls=2$' "$T/run2.out" || fail "\$port/\$tls wrong: $(cat "$T/run2.out")"
grep -q '^1048576$' "$T/run2.out" || fail "the command could not read the export over TLS: $(cat "$T/run2.out" "$T/run2.err")"
say "ok: --run with --port 0, --print-uri, TLS; a signal becomes 128+15"

# 3. --print-uri without --run
start_server pu --memory 1M --unix "$T/pu.sock" --export-name "a b" --print-uri
for ((i = 0; i < 50; i++)); do grep -q '^nbd+unix' "$T/pu.log" && break; sleep 0.1; done
assert_eq "--print-uri for the export 'a b'" "nbd+unix:///a%20b?socket=$T/pu.sock" "$(grep '^nbd+unix' "$T/pu.log")"
assert_eq "nbdinfo on the printed URI" 1048576 "$(tmo 30 nbdinfo --size "$(grep '^nbd+unix' "$T/pu.log")")"
stop_server_ok pu
say "ok: --print-uri"

# 4. --exit-with-parent: the parent shell exits, the daemon stops (SIGTERM, exit 0, socket removed)
# (the parent prints the daemon's pid: the daemon may be gone, pidfile removed, before it is read)
pid=$(bash -c '"$0" serve --memory 1M --unix "$1" --exit-with-parent --pidfile "$2" >/dev/null 2>"$3" & echo $!; for i in $(seq 100); do [ -s "$2" ] && exit 0; sleep 0.05; done; exit 1' \
    "$NBD_UMEMD" "$T/ewp.sock" "$T/ewp.pid" "$T/ewp.log") || fail "the --exit-with-parent daemon did not start"
[ -n "$pid" ] || fail "no pid for the --exit-with-parent daemon"
for ((i = 0; i < 100; i++)); do pid_running "$pid" || break; sleep 0.1; done
pid_running "$pid" && { kill "$pid"; fail "the daemon still runs 10 s after its parent exited"; }
grep -q "stopped" "$T/ewp.log" || fail "the daemon did not stop gracefully: $(tail -3 "$T/ewp.log")"
[ ! -e "$T/ewp.sock" ] || fail "the socket was left behind"
say "ok: --exit-with-parent"

# 5. socket activation: systemd-socket-activate listens and hands the socket over
systemd-socket-activate -l "$T/sa.sock" "$NBD_UMEMD" serve --memory 16M --pidfile "$T/sa.pid" 2>"$T/sa.log" &
sa=$!
CLEANUP_CMDS+=("kill $sa 2>/dev/null")
for ((i = 0; i < 100; i++)); do [ -S "$T/sa.sock" ] && break; sleep 0.05; done
tmo 60 nbdcopy "$T/data.img" "nbd+unix:///?socket=$T/sa.sock" || fail "nbdcopy to the socket-activated daemon failed"
rm -f "$T/back2.img"
tmo 60 nbdcopy "nbd+unix:///?socket=$T/sa.sock" "$T/back2.img" || fail "nbdcopy from the socket-activated daemon failed"
cmp -s -n $((8 << 20)) "$T/data.img" "$T/back2.img" || fail "wrong data from the socket-activated daemon"
grep -q "listening on unix:$T/sa.sock" "$T/sa.log" || fail "the daemon did not serve the inherited socket: $(cat "$T/sa.log")"
kill -TERM $sa
wait $sa || fail "the socket-activated daemon exited $? after SIGTERM"
if LISTEN_FDS=1 bash -c 'LISTEN_PID=$$ exec "$0" serve --memory 1M --unix "$1"' "$NBD_UMEMD" "$T/x.sock" >"$T/bad.out" 2>&1 </dev/null; then
    fail "socket activation together with --unix was accepted"
fi
grep -q "cannot be used with it" "$T/bad.out" || fail "unclear error for socket activation with --unix: $(cat "$T/bad.out")"
say "ok: socket activation"
pass
