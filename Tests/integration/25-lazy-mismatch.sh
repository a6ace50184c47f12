#!/bin/bash
# A lazy export's store belongs to one source (size + URI). Reopening it for a different source is
# refused quickly (non-zero exit, one-line error mentioning --reset-store) - for a different size at
# the same URI and for the same size at a different URI; with --reset-store the daemon starts fresh
# and serves the new source's data; the reset store then reopens without --reset-store.
. "$(dirname "$0")/lib.sh"
require_lazy

random_file "$T/a.img" 4
random_file "$T/b.img" 6
start_source src "$T/a.img"
serve_lazy lazy src "$T/store"
nbdsh_py "$(uri lazy)" "$T/a.img" <<'PY'
img = open(sys.argv[1], "rb").read()
check(h.get_size() == 4 * MiB, "size of the export of source A: %d" % h.get_size())
check_data(img[:256 * KiB], h.pread(256 * KiB, 0), "source A data")
h.pwrite(pattern(4096, 1), 8192)
h.flush()
PY
stop_server_ok lazy
say "ok: store created for source A (4 MiB)"

# expect_refused WHAT ARGS...: nbd-umemd serve ARGS must exit non-zero within 10 s, without
# listening, with an error that mentions --reset-store.
expect_refused() {
    local what=$1; shift
    local rc=0 t0 secs
    rm -f "$T/refused.sock" "$T/refused.pid" "$T/refused.err"
    t0=$(date +%s%N)
    timeout -k 2 10 "$NBD_UMEMD" serve "$@" --unix "$T/refused.sock" --pidfile "$T/refused.pid" \
        >"$T/refused.out" 2>"$T/refused.err" </dev/null || rc=$?
    secs=$(( ($(date +%s%N) - t0) / 1000000 ))
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        fail "$what: nbd-umemd serve $* was still running after 10 s (expected it to refuse the store)"
    fi
    [ "$rc" -ne 0 ] || fail "$what: nbd-umemd serve $* exited 0 (expected a non-zero exit)"
    grep -q -- '--reset-store' "$T/refused.err" || {
        sed 's/^/    stderr: /' "$T/refused.err" >&2
        fail "$what: the error output does not mention --reset-store"
    }
    [ "$secs" -le 5000 ] || fail "$what: it took $secs ms to refuse the store (expected a few seconds at most)"
    # the error itself is one line (info log lines around it are fine): exactly one line says
    # "error", and it is the one that mentions --reset-store
    local lines
    lines=$(grep -ci 'error' "$T/refused.err" || true)
    if [ "$lines" -ne 1 ] || ! grep -i 'error' "$T/refused.err" | grep -q -- '--reset-store'; then
        sed 's/^/    stderr: /' "$T/refused.err" >&2
        fail "$what: expected one error line that mentions --reset-store, got $lines error line(s)"
    fi
    say "ok: $what: exit $rc after $secs ms: $(grep -i 'error' "$T/refused.err")"
}

# source B (6 MiB) at the same URI as A
start_source src "$T/b.img"
expect_refused "different size, same URI" --source "$(uri src)" --store "$T/store"
# source A's size at a different URI
start_source other "$T/a.img"
expect_refused "same size, different URI" --source "$(uri other)" --store "$T/store"
# a different size at a different URI
start_source otherb "$T/b.img"
expect_refused "different size and URI" --source "$(uri otherb)" --store "$T/store"

# --reset-store: starts fresh, serves B
mark=$(log_lines "$T/src.log")
serve_lazy lazyb src "$T/store" --reset-store
tmo 60 nbdcopy "$(uri lazyb)" "$T/out.img" || fail "nbdcopy of the reset lazy export failed"
assert_same_file "$T/b.img" "$T/out.img" "lazy export after --reset-store (source B)"
reads=$(source_read_bytes "$T/src.log" "$mark")
[ "$reads" -ge $((6 * 1048576)) ] \
    || fail "after --reset-store only $reads bytes were read from source B for a full copy: the old store's pages were served"
say "ok: --reset-store starts fresh and serves source B"
stop_server_ok lazyb

# the reset store now belongs to B: it reopens without --reset-store, from the store
mark=$(log_lines "$T/src.log")
serve_lazy lazyb2 src "$T/store"
rm -f "$T/out.img"
tmo 60 nbdcopy "$(uri lazyb2)" "$T/out.img" || fail "nbdcopy after reopening the reset store failed"
assert_same_file "$T/b.img" "$T/out.img" "reopened store of source B"
assert_eq "bytes read from source B after reopening its store" 0 "$(source_read_bytes "$T/src.log" "$mark")"
say "ok: the reset store reopens for source B"
stop_server_ok lazyb2
pass
