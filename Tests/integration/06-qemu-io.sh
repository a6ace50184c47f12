#!/bin/bash
# qemu-io read/write/zero/discard/flush patterns against the server, verified with read -P.
. "$(dirname "$0")/lib.sh"

serve_unix mem --memory 16M
U="nbd+unix:///?socket=$(sock mem)"

# run_qemu_io WHAT -c CMD ...: qemu-io must exit 0 and print neither a pattern mismatch nor a failure.
run_qemu_io() {
    local what=$1; shift
    local rc=0
    tmo 120 qemu-io -f raw "$U" "$@" >"$T/qio.out" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ] || grep -qiE 'Pattern verification failed|failed|error' "$T/qio.out"; then
        cat "$T/qio.out" >&2
        fail "$what: qemu-io exit $rc, output above (commands: $*)"
    fi
    say "ok: $what ($(grep -c -E '^(read|wrote)' "$T/qio.out") read/write ops verified)"
}

run_qemu_io "write/read/zero/discard/flush" \
    -c 'write -P 0xab 0 64k' \
    -c 'read -P 0xab 0 64k' \
    -c 'write -z 64k 64k' \
    -c 'read -P 0 64k 64k' \
    -c 'read -P 0xab 0 64k' \
    -c 'write -P 0xcd 1M 1M' \
    -c 'discard 1M 512k' \
    -c 'read -P 0xcd 1536k 512k' \
    -c 'write -f -P 0x11 2M 4k' \
    -c 'read -P 0x11 2M 4k' \
    -c 'aio_write -P 0x22 3M 64k' \
    -c 'aio_write -P 0x23 3136k 64k' \
    -c 'aio_flush' \
    -c 'read -P 0x22 3M 64k' \
    -c 'read -P 0x23 3136k 64k' \
    -c 'writev -P 0x33 4M 4k 8k 12k' \
    -c 'readv -P 0x33 4M 4k 8k 12k' \
    -c 'write -P 0x55 5M 1M' \
    -c 'write -z -u 5M 1M' \
    -c 'read -P 0 5M 1M' \
    -c 'write -P 0x44 6291459 1001' \
    -c 'read -P 0x44 6291459 1001' \
    -c 'read -P 0 6291456 3' \
    -c 'read -P 0 6292460 100' \
    -c 'write -P 0x66 16760832 16k' \
    -c 'read -P 0x66 16760832 16k' \
    -c 'flush'

# A new connection sees everything that was written.
run_qemu_io "data persists across connections" \
    -c 'read -P 0xab 0 64k' \
    -c 'read -P 0 64k 64k' \
    -c 'read -P 0xcd 1536k 512k' \
    -c 'read -P 0x11 2M 4k' \
    -c 'read -P 0x22 3M 64k' \
    -c 'read -P 0x23 3136k 64k' \
    -c 'read -P 0x33 4M 24k' \
    -c 'read -P 0 5M 1M' \
    -c 'read -P 0x44 6291459 1001' \
    -c 'read -P 0x66 16760832 16k'

# The check itself works: a wrong pattern must be detected.
rc=0
tmo 60 qemu-io -f raw "$U" -c 'read -P 0x99 0 64k' >"$T/qio.out" 2>&1 || rc=$?
grep -q 'Pattern verification failed' "$T/qio.out" || { cat "$T/qio.out" >&2; fail "qemu-io did not detect a wrong pattern"; }
[ "$rc" -ne 0 ] || fail "qemu-io exited 0 despite a pattern mismatch"
say "ok: mismatch detection works"

# Many small writes in one session (qemu aio, several in flight).
cmds=()
for i in $(seq 0 63); do cmds+=(-c "aio_write -P $((i + 1)) $((8 * 1048576 + i * 4096)) 4k"); done
cmds+=(-c aio_flush)
for i in $(seq 0 63); do cmds+=(-c "read -P $((i + 1)) $((8 * 1048576 + i * 4096)) 4k"); done
run_qemu_io "64 aio writes then reads" "${cmds[@]}"

assert_alive mem
pass
