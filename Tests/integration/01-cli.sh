#!/bin/bash
# CLI contract: bad arguments give a one-line error on stderr and a non-zero exit without serving;
# --help exits 0 and shows examples; the size suffixes 4096/64K/512M/2G are understood.
. "$(dirname "$0")/lib.sh"

# expect_bad DESC ARGS...: `nbd-umemd ARGS` must exit non-zero quickly with exactly one line on stderr.
expect_bad() {
    local desc=$1; shift
    local rc=0
    rm -f "$T/bad.pid" "$T/bad.out" "$T/bad.err"
    timeout -k 2 10 "$NBD_UMEMD" "$@" >"$T/bad.out" 2>"$T/bad.err" || rc=$?
    [ "$rc" -ne 124 ] || fail "$desc: 'nbd-umemd $*' was still running after 10 s (it accepted the arguments)"
    [ "$rc" -ne 0 ] || fail "$desc: 'nbd-umemd $*' exited 0, expected a non-zero status"
    [ "$rc" -lt 128 ] || fail "$desc: 'nbd-umemd $*' died from signal $((rc - 128))"
    local lines
    lines=$(grep -c . "$T/bad.err" || true)
    if [ "$lines" -ne 1 ]; then
        echo "--- stderr of: nbd-umemd $* ---" >&2; cat "$T/bad.err" >&2
        fail "$desc: expected a one-line error on stderr, got $lines non-empty lines"
    fi
    [ ! -e "$T/bad.pid" ] || fail "$desc: a pidfile was written although the arguments are invalid"
    say "ok: $desc -> exit $rc: $(cat "$T/bad.err")"
}

S="$T/bad.sock"
P="$T/bad.pid"
touch "$T/disk.img" && truncate -s 1M "$T/disk.img"

expect_bad "bad size suffix" serve --memory 12Q --unix "$S" --pidfile "$P"
expect_bad "non-numeric size" serve --memory abc --unix "$S" --pidfile "$P"
expect_bad "negative size" serve --memory -5 --unix "$S" --pidfile "$P"
expect_bad "missing export source" serve --unix "$S" --pidfile "$P"
expect_bad "both --file and --memory" serve --file "$T/disk.img" --memory 1M --unix "$S" --pidfile "$P"
expect_bad "nonexistent file" serve --file "$T/does-not-exist.img" --unix "$S" --pidfile "$P"
expect_bad "unknown option" serve --memory 1M --no-such-option --unix "$S" --pidfile "$P"
expect_bad "port out of range" serve --memory 1M --port 99999 --pidfile "$P"
expect_bad "min block size not a power of two" serve --memory 1M --min-block-size 1000 --unix "$S" --pidfile "$P"
expect_bad "missing option value" serve --memory
expect_bad "no event loop" serve --memory 1M --event-loops 0 --unix "$S" --pidfile "$P"

# --help
rc=0; "$NBD_UMEMD" --help >"$T/help.txt" 2>&1 || rc=$?
[ "$rc" -eq 0 ] || { cat "$T/help.txt" >&2; fail "nbd-umemd --help exited $rc"; }
rc=0; "$NBD_UMEMD" serve --help >"$T/serve-help.txt" 2>&1 || rc=$?
[ "$rc" -eq 0 ] || { cat "$T/serve-help.txt" >&2; fail "nbd-umemd serve --help exited $rc"; }
for opt in --memory --file --unix --port --readonly --export-name --min-block-size --pidfile; do
    grep -q -- "$opt" "$T/serve-help.txt" || { cat "$T/serve-help.txt" >&2; fail "serve --help does not mention $opt"; }
done
grep -qi 'example' "$T/help.txt" "$T/serve-help.txt" || {
    cat "$T/help.txt" "$T/serve-help.txt" >&2
    fail "neither 'nbd-umemd --help' nor 'nbd-umemd serve --help' shows examples"
}
say "ok: --help"

# Size suffixes.
for spec in 4096:4096 64K:65536 512M:536870912 2G:2147483648; do
    arg=${spec%%:*} want=${spec#*:}
    serve_unix "sz$arg" --memory "$arg"
    got=$(tmo 30 nbdinfo --size "$(uri "sz$arg")")
    assert_eq "size of --memory $arg" "$want" "$got"
    stop_server_ok "sz$arg"
    say "ok: --memory $arg = $got bytes"
done

# --event-loops N runs N event-loop threads.
serve_unix loops --memory 1M --event-loops 3
n=$(for t in /proc/"$(cat "$T/loops.pid")"/task/*; do cat "$t/comm"; done | grep -c '^NIO-ELT' || true)
assert_eq "event-loop threads with --event-loops 3" 3 "$n"
assert_eq "size through 3 event loops" 1048576 "$(tmo 30 nbdinfo --size "$(uri loops)")"
stop_server_ok loops
say "ok: --event-loops 3 runs 3 event loops"

# --file size is the file's size.
truncate -s 3M "$T/disk.img"
serve_unix file --file "$T/disk.img"
assert_eq "size of --file (3 MiB file)" 3145728 "$(tmo 30 nbdinfo --size "$(uri file)")"

pass
