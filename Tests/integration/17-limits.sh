#!/bin/bash
# What a peer can make the daemon hold, and who may connect:
#  1. 200 connections that each send one 32 MiB WRITE header (and 4 KiB of payload, then nothing)
#     leave the daemon's resident memory within a bound far below 200 x 32 MiB, with and without
#     --swap (where every allocation is locked and populated), and another client is still served;
#  2. payloads of 64 MiB from a client that never asked for block sizes (and 32 MiB + 1 refused
#     from one that did);
#  3. --max-connections, --handshake-timeout, --allow (IPv4 and IPv6) refuse and log each refusal.
. "$(dirname "$0")/lib.sh"

MIB=1048576
# Resident memory the 200 stalled connections may add: each may hold twice what it sent plus a
# 128 KiB first step, and NIO's buffers; 200 x 32 MiB would be 6400 MiB.
BOUND_MIB=100

# hold_writes SOCKET N OUT: N raw connections, each GO (no block sizes) + a WRITE header of
# 32 MiB + 4 KiB of its payload; writes "ready" to OUT, then holds them until stdin closes.
hold_writes() {
    py "$@" <<'PY'
import sys, struct
from nbdraw import *
from nbdtest import check, pattern
path, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conns = []
for i in range(n):
    c = RawClient(path=path)
    c.handshake()
    c.go("")
    c.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, i + 1, 0, 32 << 20) + bytes(4096))
    conns.append(c)
open(out, "w").write("ready %d\n" % len(conns))
sys.stdin.read()
for c in conns:
    c.close()
PY
}

# memory_case NAME ARGS...: the 200-connection check against a server started with ARGS.
memory_case() {
    local name=$1; shift
    serve_unix "$name" --memory 64M "$@"
    local pid=${SRV_PID[$name]} before after lck
    nbdsh_py "$(uri "$name")" <<'PY'
h.pwrite(pattern(1 << 20, 3), 0)
PY
    before=$(rss_kib "$pid")
    rm -f "$T/ready"
    mkfifo "$T/hold.$name"
    hold_writes "$(sock "$name")" 200 "$T/ready" <"$T/hold.$name" &
    local holder=$!
    exec 7>"$T/hold.$name"
    local i
    for ((i = 0; i < 600; i++)); do [ -s "$T/ready" ] && break; kill -0 $holder 2>/dev/null || break; sleep 0.1; done
    [ -s "$T/ready" ] || fail "$name: the 200 connections were not all set up"
    sleep 1
    after=$(rss_kib "$pid")
    lck=$(awk '/^VmLck:/ {print $2}' "/proc/$pid/status")
    say "$name: resident $((before / 1024)) MiB before, $((after / 1024)) MiB with 200 stalled 32 MiB WRITEs (VmLck $((lck / 1024)) MiB)"
    [ $(((after - before) / 1024)) -le $BOUND_MIB ] ||
        fail "$name: resident memory grew by $(((after - before) / 1024)) MiB (bound $BOUND_MIB MiB)"
    # Another client is served meanwhile.
    nbdsh_py "$(uri "$name")" <<'PY'
check_data(pattern(1 << 20, 3), h.pread(1 << 20, 0), "data read while 200 connections stall")
h.pwrite(pattern(65536, 4), 1 << 20)
check_data(pattern(65536, 4), h.pread(65536, 1 << 20), "data written while 200 connections stall")
PY
    exec 7>&-
    wait $holder || fail "$name: the holding client failed"
    assert_alive "$name"
    stop_server_ok "$name"
}

# 1. bounded memory
memory_case plain
if [ "$(id -u)" -eq 0 ]; then
    memory_case swap --swap
else
    fail "the --swap case needs root"
fi
say "ok: 200 stalled 32 MiB WRITE headers stay under $BOUND_MIB MiB, with and without --swap"

# 2. 64 MiB payloads for clients that never asked for block sizes
serve_unix big --memory 128M
py "$(sock big)" <<'PY'
import sys
from nbdraw import *
from nbdtest import check, pattern
c = RawClient(path=sys.argv[1])
c.handshake()
c.go("")                                  # no NBD_INFO_BLOCK_SIZE
data = pattern(64 << 20, 21)
r = c.cmd(CMD_WRITE, 0, len(data), 0, data)
check(r.error == 0, "64 MiB WRITE: %s" % errname(r.error))
r = c.cmd(CMD_READ, 0, 64 << 20)
check(r.error == 0 and bytes(r.data) == data, "64 MiB READ gave back what was written")
r = c.cmd(CMD_WRITE, 0, (64 << 20) + 1, 0, bytes((64 << 20) + 1))
check(r.error == EINVAL, "WRITE of 64 MiB + 1: %s" % errname(r.error))
r = c.cmd(CMD_READ, 0, 4096)
check(r.error == 0 and bytes(r.data) == data[:4096], "data intact after the refused 64 MiB + 1 WRITE")
c.close()
c = RawClient(path=sys.argv[1])
c.handshake()
info = c.go("", infos=(INFO_BLOCK_SIZE,))
check(info.get("block_size") == (1, 4096, 32 << 20), "advertised block sizes %r" % (info.get("block_size"),))
r = c.cmd(CMD_WRITE, 0, (32 << 20) + 1, 0, bytes((32 << 20) + 1))
check(r.error == EINVAL, "WRITE of 32 MiB + 1 after asking for block sizes: %s" % errname(r.error))
c.close()
c = RawClient(path=sys.argv[1])
c.handshake()
c.export_name("")
r = c.cmd(CMD_READ, 0, 64 << 20)
check(r.error == 0 and bytes(r.data) == data, "64 MiB READ after NBD_OPT_EXPORT_NAME")
c.close()
PY
stop_server_ok big
# the same through a lazy export (pulled from the source) and a file export
random_file "$T/src.img" 80
start_source src "$T/src.img"
serve_lazy lazy src "$T/store"
cp "$T/src.img" "$T/file.img"
serve_unix file --file "$T/file.img"
for name in lazy file; do
    py "$(sock $name)" "$T/src.img" "$name" <<'PY'
import sys
from nbdraw import *
from nbdtest import check, pattern
c = RawClient(path=sys.argv[1])
c.handshake()
c.export_name("")
ref = open(sys.argv[2], "rb").read()
r = c.cmd(CMD_READ, 8 << 20, 64 << 20)
check(r.error == 0 and bytes(r.data) == ref[8 << 20:72 << 20], "%s: 64 MiB READ" % sys.argv[3])
data = pattern(64 << 20, 22)
r = c.cmd(CMD_WRITE, 16 << 20, len(data), 0, data)
check(r.error == 0, "%s: 64 MiB WRITE: %s" % (sys.argv[3], errname(r.error)))
r = c.cmd(CMD_READ, 16 << 20, 64 << 20)
check(r.error == 0 and bytes(r.data) == data, "%s: 64 MiB READ of the 64 MiB WRITE" % sys.argv[3])
c.close()
PY
done
stop_server_ok lazy
stop_server_ok file
say "ok: 64 MiB payloads without block sizes (memory, lazy, file), 32 MiB + 1 refused after NBD_INFO_BLOCK_SIZE"

# 3a. --max-connections 3
serve_unix few --memory 1M --max-connections 3
py "$(sock few)" <<'PY'
import sys
from nbdraw import *
from nbdtest import check, pattern
held = []
for i in range(3):
    c = RawClient(path=sys.argv[1]); c.handshake(); c.go(""); held.append(c)
extra = RawClient(path=sys.argv[1])
check(extra.wait_closed(5), "a 4th connection is closed at once")
held.pop().close()
import time
for attempt in range(50):
    c = RawClient(path=sys.argv[1])
    try:
        c.handshake(); c.go(""); break
    except Exception:
        time.sleep(0.1)
r = c.cmd(CMD_READ, 0, 4096)
check(r.error == 0, "a connection after one closed is served")
PY
grep -q "refused connection from .*3 connections are open (--max-connections 3)" "$T/few.log" ||
    fail "the refused 4th connection is not logged"
stop_server_ok few
say "ok: --max-connections"

# 3b. --handshake-timeout 1: a client that never finishes its handshake is dropped
serve_unix slow --memory 1M --handshake-timeout 1
py "$(sock slow)" <<'PY'
import sys
from nbdraw import *
from nbdtest import check, pattern
c = RawClient(path=sys.argv[1])
check(c.wait_closed(8), "a silent client is disconnected after --handshake-timeout")
PY
grep -q "handshake not finished in 1 s" "$T/slow.log" || fail "the handshake timeout is not logged"
stop_server_ok slow
say "ok: --handshake-timeout"

# 3c. --allow over IPv4 and IPv6
P=$(free_port)
start_server deny4 --memory 1M --port "$P" --allow 10.9.0.0/16 --allow fd00::/8
if tmo 30 nbdinfo --size "nbd://127.0.0.1:$P/" >"$T/deny4.out" 2>&1; then
    fail "127.0.0.1 was served although --allow lists only 10.9.0.0/16 and fd00::/8"
fi
grep -q "refused connection from .*127.0.0.1.*not in --allow" "$T/deny4.log" || fail "the refused 127.0.0.1 is not logged"
stop_server_ok deny4
P=$(free_port)
start_server allow4 --memory 1M --port "$P" --allow 10.9.0.0/16 --allow 127.0.0.0/8
assert_eq "nbdinfo from 127.0.0.1 with --allow 127.0.0.0/8" 1048576 "$(tmo 30 nbdinfo --size "nbd://127.0.0.1:$P/")"
stop_server_ok allow4
if ip -6 addr show dev lo 2>/dev/null | grep -q '::1'; then
    P=$(free_port)
    start_server allow6 --memory 1M --port "$P" --bind ::1 --allow ::1
    assert_eq "nbdinfo from ::1 with --allow ::1" 1048576 "$(tmo 30 nbdinfo --size "nbd://[::1]:$P/")"
    stop_server_ok allow6
    P=$(free_port)
    start_server deny6 --memory 1M --port "$P" --bind ::1 --allow fd00::/8 --allow 127.0.0.1
    if tmo 30 nbdinfo --size "nbd://[::1]:$P/" >/dev/null 2>&1; then fail "::1 was served outside --allow"; fi
    grep -q "refused connection from .*::1.*not in --allow" "$T/deny6.log" || fail "the refused ::1 is not logged"
    stop_server_ok deny6
else
    fail "no IPv6 loopback address: cannot check --allow for IPv6"
fi
"$NBD_UMEMD" serve --memory 1M --allow 300.1.1.1 >"$T/bad.out" 2>&1 && fail "--allow 300.1.1.1 was accepted"
grep -q "not an IPv4 or IPv6 address" "$T/bad.out" || fail "unclear error for --allow 300.1.1.1: $(cat "$T/bad.out")"
"$NBD_UMEMD" serve --memory 1M --allow 10.0.0.0/33 >"$T/bad.out" 2>&1 && fail "--allow 10.0.0.0/33 was accepted"
grep -q "prefix must be a number from 0 to 32" "$T/bad.out" || fail "unclear error for --allow 10.0.0.0/33: $(cat "$T/bad.out")"
say "ok: --allow (IPv4, IPv6, bad ranges)"

pass
