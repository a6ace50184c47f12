#!/bin/bash
# TLS on the source link of a lazy export (libnbd): pulling from `nbdkit --tls=require` with
# pre-shared keys (TCP and Unix) and from nbd-umemd --tls require with x509 certificates, each
# surviving a source restart in the middle; and the refusals, each a clean start-up failure with a
# clear message and no data: a source certificate from a CA the link does not trust, one that names
# another host, a wrong key, a plain source URI against a TLS-only source.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/lazylib.sh"
require_lazy

make_pki "$T/pki"
make_pki "$T/other"
make_pki "$T/elsewhere" nbd.example.com      # signed by its own CA, for another host name
cp "$T/pki/ca-cert.pem" "$T/elsewhere/trusted-ca.pem"
make_psk "$T/keys.psk" alice
make_psk "$T/wrong.psk" alice
random_file "$T/src.img" 16
HALF=$((8 << 20))

# read_half NAME WHICH: reads the first or second half of lazy export NAME and compares it.
read_half() {
    nbdsh_py "$(uri "$1")" "$T/src.img" "$2" <<'PY'
img = open(sys.argv[1], "rb").read()
half = len(img) // 2
start = 0 if sys.argv[2] == "first" else half
for off in range(start, start + half, 1 << 20):
    check_data(img[off:off + (1 << 20)], h.pread(1 << 20, off), "offset %d" % off)
PY
}

# 1. nbdkit --tls=require with pre-shared keys, over TCP, restarted in the middle
P=$(free_port)
nbdkit_psk() {
    rm -f "$T/nbdkit.pid"
    NBDKIT_PID=$(start_nbdkit "$T/nbdkit.pid" --tls=require --tls-psk="$T/keys.psk" -p "$P" -i 127.0.0.1 \
        file "$T/src.img") || fail "nbdkit --tls=require did not start"
    CLEANUP_CMDS+=("stop_pid $NBDKIT_PID")
}
nbdkit_psk
serve_unix lazy1 --source "nbds://alice@localhost:$P/" --source-tls-psk "$T/keys.psk" --store "$T/store1" \
    --prefetch off --source-timeout 30
read_half lazy1 first
stop_pid "$NBDKIT_PID"
nbdkit_psk
read_half lazy1 second
assert_alive lazy1
stop_server_ok lazy1
stop_pid "$NBDKIT_PID"
say "ok: lazy export from nbdkit --tls=require (PSK over TCP), across a source restart"

# 1b. the identity and the key file in the URI, over a Unix socket
UPID=$(start_nbdkit "$T/nbdkitu.pid" --tls=require --tls-psk="$T/keys.psk" -U "$T/src.sock" file "$T/src.img") ||
    fail "nbdkit -U --tls=require did not start"
CLEANUP_CMDS+=("stop_pid $UPID")
serve_unix lazy1u --source "nbds+unix://alice@/?socket=$T/src.sock&tls-psk-file=$T/keys.psk" --store "$T/store1u" \
    --prefetch sequential
read_half lazy1u first
read_half lazy1u second
stop_server_ok lazy1u
say "ok: nbds+unix with the PSK file in the URI"

# 2. nbd-umemd --tls require with x509 as the source, restarted in the middle
SP=$(free_port)
start_server src --file "$T/src.img" --readonly --port "$SP" --tls require --tls-certificates "$T/pki"
serve_unix lazy2 --source "nbds://localhost:$SP/" --source-tls-certificates "$T/pki" --store "$T/store2" \
    --prefetch off --source-timeout 30
read_half lazy2 first
stop_server_ok src
start_server src --file "$T/src.img" --readonly --port "$SP" --tls require --tls-certificates "$T/pki"
read_half lazy2 second
assert_alive lazy2
stop_server_ok lazy2
say "ok: lazy export from nbd-umemd --tls require (x509), across a source restart"

# 3. refusals: the lazy export does not start, says why, and has pulled nothing
refused_source() {
    local what=$1 want=$2; shift 2
    local rc=0
    tmo 60 "$NBD_UMEMD" serve --unix "$T/bad.sock" --store "$T/bad.store" --prefetch off "$@" >"$T/bad.out" 2>&1 || rc=$?
    [ "$rc" -ne 0 ] || fail "$what: the lazy export started"
    grep -qi -- "$want" "$T/bad.out" || fail "$what: unclear error: $(tail -3 "$T/bad.out")"
    [ ! -e "$T/bad.store/pages" ] || [ "$(du -k "$T/bad.store/pages" | cut -f1)" -eq 0 ] || fail "$what: pages were stored"
    rm -rf "$T/bad.store"
    say "ok: $what: $(grep -i -- "$want" "$T/bad.out" | tail -1 | sed 's/.*error: //')"
}
refused_source "a source certificate from an untrusted CA" "certificate verification" \
    --source "nbds://localhost:$SP/" --source-tls-certificates "$T/other"
stop_server_ok src
start_server src --file "$T/src.img" --readonly --port "$SP" --tls require --tls-certificates "$T/elsewhere"
mkdir -p "$T/trust-elsewhere" && cp "$T/elsewhere/ca-cert.pem" "$T/trust-elsewhere/ca-cert.pem"
refused_source "a source certificate for another host name" "certificate verification" \
    --source "nbds://localhost:$SP/" --source-tls-certificates "$T/trust-elsewhere"
stop_server_ok src
nbdkit_psk
refused_source "a wrong pre-shared key" "TLS connect" \
    --source "nbds://alice@localhost:$P/" --source-tls-psk "$T/wrong.psk"
refused_source "a plain source URI against a TLS-only source" "TLS\|connect" \
    --source "nbd://localhost:$P/"
"$NBD_UMEMD" serve --unix "$T/bad.sock" --store "$T/bad.store" --source "nbd://localhost:$P/" \
    --source-tls-psk "$T/keys.psk" >"$T/bad.out" 2>&1 && fail "--source-tls-psk with an nbd:// URI was accepted"
grep -q "need a TLS source URI" "$T/bad.out" || fail "unclear error for --source-tls-psk with nbd://: $(cat "$T/bad.out")"
say "ok: refusals"

pass
