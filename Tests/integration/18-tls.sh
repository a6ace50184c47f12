#!/bin/bash
# TLS on the server (NBD_OPT_STARTTLS): nbdinfo, nbdcopy and qemu-img against --tls require with x509
# certificates and with pre-shared keys, over TCP and Unix sockets; the refusals (a plain client gets
# NBD_REP_ERR_TLS_REQD and no data, a wrong key, an unknown identity, a client certificate from
# another CA or none under --tls-verify-peer), each logged with its reason; --tls on serves both;
# garbage before, during and after the TLS handshake crashes nothing and the next client is served.
. "$(dirname "$0")/lib.sh"

make_pki "$T/pki"
make_pki "$T/other"                     # another CA, with its own client certificate
cp "$T/pki/ca-cert.pem" "$T/other/ca-cert.pem"   # ... that trusts our server
mkdir -p "$T/nocert" && cp "$T/pki/ca-cert.pem" "$T/nocert/"
make_psk "$T/keys.psk" alice
make_psk "$T/wrong.psk" alice
make_psk "$T/bob.psk" bob
mkdir -p "$T/pskdir" && cp "$T/keys.psk" "$T/pskdir/keys.psk"   # QEMU's tls-creds-psk reads DIR/keys.psk
random_file "$T/data.img" 32

# clients NAME URI-TCP URI-UNIX QEMU-OBJECT QEMU-OPTS-TCP QEMU-OPTS-UNIX: the three clients, both transports.
clients() {
    local name=$1 tcp=$2 unix=$3 object=$4 qtcp=$5 qunix=$6
    assert_eq "$name: nbdinfo --size over TCP" 33554432 "$(tmo 30 nbdinfo --size "$tcp")"
    assert_eq "$name: nbdinfo --size over Unix" 33554432 "$(tmo 30 nbdinfo --size "$unix")"
    tmo 120 nbdcopy "$T/data.img" "$tcp" || fail "$name: nbdcopy to the server over TCP failed"
    rm -f "$T/back.img"
    tmo 120 nbdcopy "$unix" "$T/back.img" || fail "$name: nbdcopy from the server over Unix failed"
    assert_same_file "$T/data.img" "$T/back.img" "$name: written over TCP, read over Unix"
    rm -f "$T/back.img" "$T/back2.img"
    tmo 120 qemu-img convert -O raw --object "$object" --image-opts "$qtcp" "$T/back.img" ||
        fail "$name: qemu-img convert over TCP failed"
    assert_same_file "$T/data.img" "$T/back.img" "$name: qemu-img over TCP"
    tmo 120 qemu-img convert -O raw --object "$object" --image-opts "$qunix" "$T/back2.img" ||
        fail "$name: qemu-img convert over Unix failed"
    assert_same_file "$T/data.img" "$T/back2.img" "$name: qemu-img over Unix"
}

# refused WHAT URI LOG PATTERN: the client must fail, read nothing, and the server log the reason.
refused() {
    local what=$1 u=$2 log=$3 pattern=$4
    rm -f "$T/refused.img"
    if tmo 60 nbdcopy "$u" "$T/refused.img" >"$T/refused.out" 2>&1; then
        fail "$what: the client was served"
    fi
    [ ! -s "$T/refused.img" ] || fail "$what: the client got data"
    if [ -z "$pattern" ]; then say "ok: $what refused: $(tail -1 "$T/refused.out")"; return; fi
    local i
    for ((i = 0; i < 50; i++)); do grep -q -- "$pattern" "$log" && break; sleep 0.1; done
    grep -q -- "$pattern" "$log" || fail "$what: the server did not log '$pattern'"
    say "ok: $what refused: $(grep -- "$pattern" "$log" | tail -1 | sed 's/.*\] //')"
}

# 1. x509, --tls require, client certificates verified
P=$(free_port)
serve_unix x509 --memory 32M --port "$P" --tls require --tls-certificates "$T/pki" --tls-verify-peer
clients x509 "nbds://localhost:$P/?tls-certificates=$T/pki" \
    "nbds+unix:///?socket=$(sock x509)&tls-certificates=$T/pki" \
    "tls-creds-x509,id=tls0,endpoint=client,dir=$T/pki" \
    "driver=nbd,host=localhost,port=$P,tls-creds=tls0" \
    "driver=nbd,path=$(sock x509),tls-creds=tls0,tls-hostname=localhost"
refused "a client certificate from another CA" "nbds://localhost:$P/?tls-certificates=$T/other" "$T/x509.log" \
    "not signed by this server's ca-cert.pem"
refused "a client without a certificate" "nbds://localhost:$P/?tls-certificates=$T/nocert" "$T/x509.log" \
    "sent no certificate"
refused "a plain client" "nbd://localhost:$P/" "$T/x509.log" ""
say "ok: x509 (nbdinfo, nbdcopy, qemu-img; TCP and Unix)"

# 2. raw protocol against --tls require: TLS_REQD for every option but STARTTLS and ABORT, no data,
# EXPORT_NAME drops the connection, data after STARTTLS drops it, and garbage before, during and
# after the TLS handshake harms nothing.
py "$(sock x509)" "$T/pki" <<'PY'
import socket, ssl, struct, sys
from nbdraw import *
from nbdtest import check
path, pki = sys.argv[1], sys.argv[2]

def fresh():
    c = RawClient(path=path)
    c.handshake()
    return c

c = fresh()
for opt, data in ((OPT_GO, RawClient.info_payload("")), (OPT_INFO, RawClient.info_payload("")), (OPT_LIST, b""),
                  (OPT_STRUCTURED_REPLY, b""), (OPT_LIST_META_CONTEXT, RawClient.meta_payload("", ["base:allocation"])),
                  (99, b"x")):
    rep = c.opt_simple(opt, data)
    check(rep[-1][0] == REP_ERR_TLS_REQD, "option %d before STARTTLS: reply %#x, expected NBD_REP_ERR_TLS_REQD" % (opt, rep[-1][0]))
rep = c.opt_simple(OPT_STARTTLS, b"junk")
check(rep[-1][0] == REP_ERR_INVALID, "STARTTLS with data: %#x" % rep[-1][0])
rep = c.opt_simple(OPT_ABORT)
check(rep[-1][0] == REP_ACK, "ABORT before TLS is answered")
c.close()

c = fresh()
c.send_opt(OPT_EXPORT_NAME, b"")
check(c.wait_closed(5), "NBD_OPT_EXPORT_NAME before TLS drops the connection")

# plain text after STARTTLS, sent before the ACK: dropped
c = fresh()
c.send(struct.pack(">QII", IHAVEOPT, OPT_STARTTLS, 0) + struct.pack(">QII", IHAVEOPT, OPT_GO, 6) + b"\0\0\0\0\0\0")
check(c.wait_closed(5), "bytes after NBD_OPT_STARTTLS before the handshake drop the connection")

# garbage instead of an option, before TLS
c = fresh()
c.send(bytes(range(256)) * 4)
check(c.wait_closed(5), "garbage before TLS closes the connection")

# garbage instead of a ClientHello
c = fresh()
rep = c.opt_simple(OPT_STARTTLS)
check(rep[-1][0] == REP_ACK, "STARTTLS is acknowledged")
c.send(b"\x16\x03\x01\x00\x05hello" + bytes(range(200)))
check(c.wait_closed(5), "garbage instead of a ClientHello closes the connection")

# a ClientHello cut short
c = fresh()
c.opt_simple(OPT_STARTTLS)
c.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
c.close()

def tls_client():
    c = fresh()
    rep = c.opt_simple(OPT_STARTTLS)
    check(rep[-1][0] == REP_ACK, "STARTTLS is acknowledged")
    ctx = ssl.create_default_context(cafile=pki + "/ca-cert.pem")
    ctx.load_cert_chain(pki + "/client-cert.pem", pki + "/client-key.pem")
    c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
    return c

# garbage inside TLS, in the options phase and in transmission
c = tls_client()
c.send(b"\xff" * 4096)
check(c.wait_closed(5), "garbage inside TLS closes the connection")
c = tls_client()
rep = c.opt_simple(OPT_STARTTLS)
check(rep[-1][0] == REP_ERR_INVALID, "a second STARTTLS inside TLS: %#x" % rep[-1][0])
c.go("")
r = c.cmd(CMD_READ, 0, 4096)
check(r.error == 0 and len(r.data) == 4096, "a read inside TLS")
c.send(b"\x00" * 100)
check(c.wait_closed(5), "garbage in transmission inside TLS closes the connection")
# TLS records cut in the middle of the handshake, then the raw socket closed
c = fresh()
c.opt_simple(OPT_STARTTLS)
ctx = ssl.create_default_context(cafile=pki + "/ca-cert.pem")
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
try:
    obj.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = outgoing.read()
check(len(hello) > 100, "a ClientHello was generated")
c.send(hello[:len(hello) // 2])
c.close()
# the next client is served
c = tls_client()
c.go("")
r = c.cmd(CMD_READ, 0, 65536)
check(r.error == 0 and len(r.data) == 65536, "a client after the garbage is served")
c.close()
print("raw TLS checks passed")
PY
assert_alive x509
grep -q "TLS handshake with unix failed" "$T/x509.log" || fail "garbage in the TLS handshake is not logged"
stop_server_ok x509
say "ok: NBD_REP_ERR_TLS_REQD, STARTTLS rules, garbage around the handshake"

# 3. pre-shared keys, --tls require
P=$(free_port)
serve_unix psk --memory 32M --port "$P" --tls require --tls-psk "$T/keys.psk"
clients psk "nbds://alice@localhost:$P/?tls-psk-file=$T/keys.psk" \
    "nbds+unix://alice@/?socket=$(sock psk)&tls-psk-file=$T/keys.psk" \
    "tls-creds-psk,id=tls0,endpoint=client,dir=$T/pskdir,username=alice" \
    "driver=nbd,host=localhost,port=$P,tls-creds=tls0" \
    "driver=nbd,path=$(sock psk),tls-creds=tls0"
refused "a wrong pre-shared key" "nbds://alice@localhost:$P/?tls-psk-file=$T/wrong.psk" "$T/psk.log" \
    "key is not the key of its identity"
refused "an unknown identity" "nbds://bob@localhost:$P/?tls-psk-file=$T/bob.psk" "$T/psk.log" \
    "identity is not in the PSK file"
refused "a plain client" "nbd://localhost:$P/" "$T/psk.log" ""
assert_alive psk
stop_server_ok psk
say "ok: pre-shared keys (nbdinfo, nbdcopy, qemu-img; TCP and Unix)"

# 4. --tls on: plain and TLS clients alike
serve_unix opt --memory 32M --tls on --tls-psk "$T/keys.psk"
tmo 120 nbdcopy "$T/data.img" "$(uri opt)" || fail "--tls on: plain nbdcopy failed"
rm -f "$T/back.img"
tmo 120 nbdcopy "nbds+unix://alice@/?socket=$(sock opt)&tls-psk-file=$T/keys.psk" "$T/back.img" ||
    fail "--tls on: nbdcopy over TLS failed"
assert_same_file "$T/data.img" "$T/back.img" "--tls on: written in plain text, read over TLS"
stop_server_ok opt
say "ok: --tls on"

# 5. bad TLS arguments are clear
expect_usage() {
    local want=$1; shift
    if "$NBD_UMEMD" serve --memory 1M --unix "$T/bad.sock" "$@" >"$T/bad.out" 2>&1; then fail "accepted: $*"; fi
    grep -q -- "$want" "$T/bad.out" || fail "unclear error for $*: $(cat "$T/bad.out")"
}
expect_usage "needs --tls-certificates DIR or --tls-psk FILE" --tls require
expect_usage "must be off, on or require" --tls maybe --tls-psk "$T/keys.psk"
expect_usage "need --tls on or --tls require" --tls-psk "$T/keys.psk"
expect_usage "cannot load $T/nocert/server-cert.pem: no such file" --tls require --tls-certificates "$T/nocert"
printf 'alice:xyz\n' >"$T/badkey.psk"
expect_usage "line 1: the key of 'alice' is not hexadecimal" --tls require --tls-psk "$T/badkey.psk"
expect_usage "needs --tls-certificates" --tls require --tls-psk "$T/keys.psk" --tls-verify-peer
say "ok: TLS argument errors"

pass
