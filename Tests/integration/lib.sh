# Shared helpers for the integration test scripts. Source it; do not run it.
# shellcheck shell=bash
#
# Each test script:
#   . "$(dirname "$0")/lib.sh"
#   serve_unix srv --memory 64M          # socket $T/srv.sock, log $T/srv.log, pid ${SRV_PID[srv]}
#   ... assertions ...
#   pass
# Servers are children of the test shell (so `wait` gives their exit status) and are stopped by the
# EXIT trap. On failure the trap prints the tail of every server log.

set -Eeuo pipefail

IT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../../scripts/lib/common.sh
. "$IT_DIR/../../scripts/lib/common.sh"

: "${NBD_UMEMD:=$ROOT/.build/release/nbd-umemd}"
export NBD_UMEMD
# nbdsh and python3-libnbd need the system python, not a pyenv one earlier in PATH.
export PATH="/usr/bin:$PATH"
PY=/usr/bin/python3
export PYTHONPATH="$IT_DIR${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1   # no __pycache__ in the source tree
export LIBNBD_DEBUG=0

TEST_NAME=$(basename "$0" .sh)
# Unix socket paths must stay short (108 bytes): always under /tmp.
T=$(mktemp -d "/tmp/it-${TEST_NAME:0:20}.XXXXXX")
declare -A SRV_PID=()
declare -A SRV_STOPPED=()
CLEANUP_CMDS=()   # extra commands (strings) the EXIT trap runs after stopping the servers
PRE_STOP_CMDS=()  # commands the EXIT trap runs before stopping the servers (swapoff, detach)
SRV_RC=
_PASSED=0

say() { printf '[%s] %s\n' "$TEST_NAME" "$*"; }

fail() {
    printf '[%s] FAIL: %s\n' "$TEST_NAME" "$*" >&2
    exit 1
}

_on_err() {
    local rc=$? line=$1 cmd=${2%%$'\n'*} where="" i
    # report the script line that called into lib.sh, if the failure happened inside a helper
    for ((i = 0; i < ${#BASH_SOURCE[@]}; i++)); do
        if [ "${BASH_SOURCE[$i]}" = "$0" ] && [ "$i" -gt 0 ]; then where=" (called from $0 line ${BASH_LINENO[$((i - 1))]})"; break; fi
    done
    printf '[%s] FAIL: command exited %d at %s line %s%s: %s\n' "$TEST_NAME" "$rc" "${BASH_SOURCE[1]:-$0}" "$line" "$where" "$cmd" >&2
}
trap '_on_err "$LINENO" "$BASH_COMMAND"' ERR

_cleanup() {
    local rc=$? name i
    trap - ERR
    set +e
    for ((i = ${#PRE_STOP_CMDS[@]} - 1; i >= 0; i--)); do eval "${PRE_STOP_CMDS[$i]}" >/dev/null 2>&1; done
    for name in "${!SRV_PID[@]}"; do
        [ -n "${SRV_STOPPED[$name]:-}" ] && continue
        stop_child "${SRV_PID[$name]}" 5
    done
    for ((i = ${#CLEANUP_CMDS[@]} - 1; i >= 0; i--)); do eval "${CLEANUP_CMDS[$i]}" >/dev/null 2>&1; done
    if [ "$rc" -ne 0 ] || [ "$_PASSED" -ne 1 ]; then
        [ "$rc" -ne 0 ] || rc=1
        [ "$_PASSED" -eq 1 ] || [ "$rc" -ne 0 ] || printf '[%s] FAIL: script ended without pass\n' "$TEST_NAME" >&2
        for name in "${!SRV_PID[@]}"; do
            if [ -s "$T/$name.log" ]; then
                printf -- '--- server %s log (tail) ---\n' "$name" >&2
                tail -n 30 "$T/$name.log" >&2
            fi
        done
    fi
    if [ -n "${KEEP_TMP:-}" ]; then
        printf '[%s] kept %s\n' "$TEST_NAME" "$T" >&2
    else
        rm -rf "$T"
    fi
    exit "$rc"
}
trap _cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

[ -x "$NBD_UMEMD" ] || fail "server binary not found: $NBD_UMEMD (build it or set NBD_UMEMD)"

SOFT_FAILURES=0
# soft CMD...: run CMD; on failure record it and go on (pass then fails the test). For independent
# sections of a script, so that one run reports every failing section.
soft() {
    local rc=0
    "$@" || rc=$?
    if [ "$rc" -ne 0 ]; then
        SOFT_FAILURES=$((SOFT_FAILURES + 1))
        printf '[%s] FAILED (exit %d, continuing): %s\n' "$TEST_NAME" "$rc" "$*" >&2
    fi
    return 0
}

# pass: mark the test as passed (must be the last thing a script does).
pass() {
    [ "$SOFT_FAILURES" -eq 0 ] || fail "$SOFT_FAILURES section(s) failed (see above)"
    _PASSED=1
    say "PASS"
    exit 0
}

# tmo SECONDS CMD...: run a client command with a time limit.
tmo() { timeout -k 5 "$@"; }

# start_server NAME ARGS...: starts `nbd-umemd serve ARGS --pidfile $T/NAME.pid` as a child of this
# shell with stderr in $T/NAME.log (common.sh's spawn_server), waits for the pidfile (written once
# it listens).
start_server() {
    local name=$1; shift
    local pidfile="$T/$name.pid" pid rc=0
    unset "SRV_STOPPED[$name]"
    spawn_server "$pidfile" "$T/$name.log" "$NBD_UMEMD" serve "$@" --pidfile "$pidfile" || rc=$?
    pid=$SPAWNED_PID
    SRV_PID[$name]=$pid
    if [ "$rc" -ne 0 ]; then
        SRV_STOPPED[$name]=1
        [ "$rc" -eq 2 ] || fail "server $name exited during startup: nbd-umemd serve $*"
        fail "server $name did not write its pidfile within 20 s: nbd-umemd serve $*"
    fi
    local content
    content=$(tr -d ' \n' <"$pidfile" 2>/dev/null || true)
    [ "$content" = "$pid" ] || fail "pidfile $pidfile contains '$content', expected server pid $pid"
    kill -0 "$pid" 2>/dev/null || fail "server $name died right after startup"
}

# serve_unix NAME ARGS...: start_server on Unix socket $T/NAME.sock.
serve_unix() {
    local name=$1; shift
    start_server "$name" --unix "$T/$name.sock" "$@"
    [ -S "$T/$name.sock" ] || fail "server $name: $T/$name.sock is not a socket after the pidfile appeared"
}

sock() { printf '%s' "$T/$1.sock"; }
# uri NAME [EXPORT]: nbd+unix URI of server NAME.
uri() { printf 'nbd+unix:///%s?socket=%s' "${2:-}" "$T/$1.sock"; }

assert_alive() {
    local name=$1
    kill -0 "${SRV_PID[$name]}" 2>/dev/null || fail "server $name (pid ${SRV_PID[$name]}) is no longer running"
}

# stop_server NAME [SECONDS]: SIGTERM, wait up to SECONDS (default 15); sets SRV_RC to the exit status.
stop_server() {
    local name=$1 limit=${2:-15}
    SRV_STOPPED[$name]=1
    stop_child "${SRV_PID[$name]}" "$limit" || fail "server $name did not exit within ${limit}s of SIGTERM"
    SRV_RC=$STOP_RC
}

# wait_server_exit NAME SECONDS: wait (without signalling) for server NAME to exit; sets SRV_RC.
# Fails if it is still running after SECONDS.
wait_server_exit() {
    local name=$1 limit=$2 pid i
    pid=${SRV_PID[$name]}
    for ((i = 0; i < limit * 20; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -0 "$pid" 2>/dev/null && fail "server $name still running ${limit}s after it was told to stop"
    SRV_RC=0
    wait "$pid" || SRV_RC=$?
    SRV_STOPPED[$name]=1
}

# stop_server_ok NAME: stop and require exit status 0.
stop_server_ok() {
    stop_server "$1"
    [ "$SRV_RC" -eq 0 ] || fail "server $1 exited with status $SRV_RC after SIGTERM (expected 0)"
}

# py [ARGS...] < script: run system python3 (with nbdtest/nbdraw importable); killed by SIGALRM
# after PY_TIMEOUT seconds (default 240).
py() {
    local f
    f=$(mktemp "$T/py.XXXXXX")
    { printf 'import signal\nsignal.alarm(%d)\n' "${PY_TIMEOUT:-240}"; cat; } >"$f"
    "$PY" "$f" "$@"
}

# nbdsh_py URI [ARGS...] < script: like `nbdsh -u URI`: the script runs with `h` (an nbdtest.Conn,
# strict mode untouched, base:allocation requested) already connected, and `from nbdtest import *`.
nbdsh_py() {
    local u=$1; shift
    local f
    f=$(mktemp "$T/py.XXXXXX")
    {
        printf 'import sys, os, errno, signal, nbd\nsignal.alarm(%d)\nfrom nbdtest import *\nURI = %s\nh = connect(URI)\n' \
            "${PY_TIMEOUT:-240}" "'$u'"
        cat
        printf '\ndone()\n'
    } >"$f"
    "$PY" "$f" "$@"
}

assert_eq() {
    local what=$1 expected=$2 actual=$3
    [ "$expected" = "$actual" ] || fail "$what: expected '$expected', got '$actual'"
}

# assert_same_file EXPECTED ACTUAL WHAT: byte comparison with the first differing bytes shown.
assert_same_file() {
    local a=$1 b=$2 what=$3
    if ! cmp -s "$a" "$b"; then
        local sa sb
        sa=$(stat -c %s "$a"); sb=$(stat -c %s "$b")
        printf '[%s] %s: files differ (sizes %s vs %s); first differing bytes (offset, octal expected, octal actual):\n' \
            "$TEST_NAME" "$what" "$sa" "$sb" >&2
        cmp -l "$a" "$b" 2>&1 | head -n 5 >&2 || true
        fail "$what: content differs"
    fi
}

# random_file PATH MIB: MIB MiB of random data.
random_file() { head -c "$(($2 * 1048576))" /dev/urandom >"$1"; }

# json_get FILE EXPR: evaluate python expression EXPR with `j` bound to the parsed JSON of FILE;
# prints the result as JSON (so strings come out quoted, booleans as true/false).
json_get() { "$PY" -c 'import json,sys; j=json.load(open(sys.argv[1])); print(json.dumps(eval(sys.argv[2])))' "$1" "$2"; }

# migrate_vm NAME ARGS...: scripts/migrate-vm ARGS with its working directory kept in $T/NAME and
# its output in $T/NAME.out (its own progress lines are echoed); sets MIG_RC to its exit status.
migrate_vm() {
    local name=$1; shift
    MIG_RC=0
    "$ROOT/scripts/migrate-vm" --dir "$T/$name" --keep-dir "$@" >"$T/$name.out" 2>&1 || MIG_RC=$?
    grep '^\[migrate-vm\]' "$T/$name.out" | sed "s/^/  $name | /"
}

# migration NAME ARGS...: migrate_vm that must succeed; its REPORT (JSON) goes to $T/NAME.json.
migration() {
    local name=$1
    migrate_vm "$@"
    [ "$MIG_RC" -eq 0 ] || { tail -n 20 "$T/$name.out" >&2; fail "$name: scripts/migrate-vm exited $MIG_RC"; }
    sed -n 's/^REPORT //p' "$T/$name.out" >"$T/$name.json"
    [ -s "$T/$name.json" ] || fail "$name: no REPORT line"
}

# assert_tls_migration REPORT-JSON DIR: a `migrate-vm --tls` run: the source export required TLS with
# the run's key, the destination pulled over nbds://, and a client with another key and a plain client
# were both refused without reading a byte.
assert_tls_migration() {
    local json=$1 dir=$2 what
    for what in wrong_key plain; do
        [ "$(json_get "$json" "j['tls']['probes_without_key']['$what']['refused']")" = true ] ||
            fail "--tls: the $what client was not refused: $(json_get "$json" "j['tls']['probes_without_key']['$what']")"
        [ "$(json_get "$json" "j['tls']['probes_without_key']['$what']['bytes_read']")" = 0 ] ||
            fail "--tls: the $what client read data"
    done
    grep -q -- "--source nbds://umemd@" "$dir/dst-daemon.cmd" || fail "--tls: the destination did not pull over nbds://"
    grep -q -- "--source-tls-psk" "$dir/dst-daemon.cmd" || fail "--tls: the destination had no key"
    grep -q "TLS require: pre-shared keys" "$dir/src-export.log" || fail "--tls: the source export did not require TLS"
    say "TLS: the source export refused a wrong key and a plain client; the destination pulled over nbds://"
}

# assert_postcopy_outage NAME: `migration NAME ... --source-outage 5@1` had its source export down
# inside the post-copy phase (restarted before every page was local, more than 6 s to all-local),
# the guest stalled (a progress gap of 2 s or more) and progressed after the source was gone, and
# the destination daemon logged the outage and the recovery.
assert_postcopy_outage() {
    local name=$1 restarted local_line all_local gap
    all_local=$(json_get "$T/$name.json" 'j["all_ram_local_ms"]')
    gap=$(json_get "$T/$name.json" 'j["max_progress_gap_ms"]')
    grep -q 'source export restarted' "$T/$name.out" || fail "the outage did not happen"
    restarted=$(grep -n 'source export restarted' "$T/$name.out" | head -n 1 | cut -d: -f1)
    local_line=$(grep -n 'every page local after' "$T/$name.out" | head -n 1 | cut -d: -f1)
    [ "$restarted" -lt "$local_line" ] || fail "the export came back only after every page was local: not a post-copy outage"
    [ "$all_local" -gt 6000 ] || fail "every page was local after $all_local ms: the outage was not inside the post-copy phase"
    [ "$gap" -ge 2000 ] || fail "the guest never stalled (largest gap between progress lines $gap ms)"
    [ "$(json_get "$T/$name.json" 'j["ops_after_source_gone"]')" -gt 0 ] || fail "no progress after the outage"
    grep -q 'source outage' "$T/$name/dst-daemon.log" && grep -q 'source recovered after' "$T/$name/dst-daemon.log" \
        || fail "the destination daemon logged no outage and recovery: $(grep -v 'info' "$T/$name/dst-daemon.log" | tail -n 5)"
    say "daemon: $(grep -o 'source outage.*\|source recovered.*' "$T/$name/dst-daemon.log" | head -n 2 | tr '\n' ' ')"
}

# assert_failed_before_switch NAME PATTERN: `migrate_vm NAME ...` failed before the switch-over with
# an error line matching PATTERN (grep) after "error before the switch-over: ", its report says so,
# the source VM ran and is running, and migrate-vm counted nothing left on the destination.
assert_failed_before_switch() {
    local name=$1 pattern=$2
    [ "$MIG_RC" -ne 0 ] || fail "$name: scripts/migrate-vm exited 0"
    grep -q "error before the switch-over: $pattern" "$T/$name.out" || fail "$name: no clear error ($pattern)"
    [ -s "$T/$name/report.json" ] || fail "$name: no report.json"
    assert_eq "$name: status" '"failed-before-switchover"' "$(json_get "$T/$name/report.json" 'j["status"]')"
    assert_eq "$name: source VM status at the failure" '"running"' "$(json_get "$T/$name/report.json" 'j["source_vm"]["status"]')"
    assert_eq "$name: destination leftovers at the failure" 0 "$(json_get "$T/$name/report.json" 'j["destination_leftovers"]')"
    grep -aq '^WORK t=' "$T/$name/src-console.log" || fail "$name: the source VM never ran"
}

# undo_swap_run NAME: what `migrate_vm NAME --mode swap` may have left if it was killed before its
# own cleanup ran (scripts/migrate-vm turns swap off on every exit path it gets to run): its
# destination QEMU stopped, its staged RAM file removed (so that swapoff need not read those pages
# back), swap on its devices off, the devices detached, its destination daemon stopped. Register it
# with PRE_STOP_CMDS+=("undo_swap_run NAME").
undo_swap_run() {
    local dir="$T/$1" f dev pid devs=() DST_RAM=""
    for f in "$dir"/state/attached/*; do
        [ -f "$f" ] && devs+=("$(. "$f" && echo "$DEVICE")")
    done
    for pid in $(pgrep -f "$dir/dst.qmp"); do stop_pid "$pid"; done
    if [ ${#devs[@]} -gt 0 ]; then
        # shellcheck disable=SC1091
        [ -f "$dir/run.env" ] && . "$dir/run.env"
        [ -z "$DST_RAM" ] || rm -f "$DST_RAM"
        for dev in "${devs[@]}"; do
            if awk 'NR > 1 { print $1 }' /proc/swaps | grep -qxF "$dev"; then
                printf '[%s] cleanup: swap still on %s (run %s): swapoff\n' "$TEST_NAME" "$dev" "$1" >&2
                swapoff "$dev" || true
            fi
            NBD_UMEMD_STATE_DIR="$dir/state" "$ROOT/scripts/detach" "$dev" || true
        done
    fi
    pid=$(cat "$dir/dst.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$dir/dst.sock"; then
        stop_pid "$pid"
    fi
}

# free_port: a currently unused TCP port on 127.0.0.1.
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

# rss_kib PID: resident set size in KiB.
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# ---- lazy exports (--source / --store) ------------------------------------------------------------
# A lazy export pulls pages from a source NBD server. The tests run that source with nbdkit and its
# log filter, so the requests the daemon sent to the source can be counted afterwards.

# start_source NAME IMG [ARG...]: serve IMG with `nbdkit file` (as a daemon) on $T/NAME.sock with the
# log filter writing every request to $T/NAME.log (so `uri NAME` is its URI). ARGs that start with
# '-' (e.g. --filter=delay, -r) go before the plugin name, key=value ARGs (rdelay=1) after it. The
# nbdkit pid is in SRC_PID[NAME]; the EXIT trap stops it. Calling it again with the same NAME
# replaces the running source (same socket path, the log is appended to).
declare -A SRC_PID=()
start_source() {
    local name=$1 img=$2; shift 2
    local pre=() post=() a pid
    for a in "$@"; do
        if [[ "$a" == -* ]]; then pre+=("$a"); else post+=("$a"); fi
    done
    [ -z "${SRC_PID[$name]:-}" ] || stop_source "$name"
    rm -f "$T/$name.sock"
    pid=$(start_nbdkit "$T/$name.src.pid" -U "$T/$name.sock" --filter=log "${pre[@]}" \
        file "$img" "logfile=$T/$name.log" logappend=true "${post[@]}") || fail "nbdkit source $name did not start"
    [ -n "$pid" ] || fail "nbdkit source $name: empty pidfile"
    SRC_PID[$name]=$pid
    CLEANUP_CMDS+=("stop_pid $pid")
    local i
    for ((i = 0; i < 100; i++)); do [ -S "$T/$name.sock" ] && break; sleep 0.05; done
    [ -S "$T/$name.sock" ] || fail "nbdkit source $name: no socket $T/$name.sock"
}

# stop_source NAME: stop the nbdkit source NAME (SIGTERM, SIGKILL after 10 s).
stop_source() {
    [ -n "${SRC_PID[$1]:-}" ] || return 0
    stop_pid "${SRC_PID[$1]}"
    unset "SRC_PID[$1]"
}

# log_lines LOG: number of lines in an nbdkit log (0 if it does not exist yet); use it as a mark for
# the SKIP argument of the functions below.
log_lines() { if [ -e "$1" ]; then wc -l <"$1" | tr -d ' '; else echo 0; fi; }

# source_requests LOG [SKIP]: every request the nbdkit log filter logged after the first SKIP lines,
# one per line as "COMMAND OFFSET COUNT" (decimal; OFFSET/COUNT are - for requests without them,
# e.g. Flush). Only request lines: not Connect/Disconnect/Preconnect nor the "...X return=" lines.
source_requests() {
    local log=$1 skip=${2:-0}
    [ -e "$log" ] || return 0
    # (mawk has no strtonum: hex is converted by hand)
    awk -v skip="$skip" '
        function hex(s,    i, c, v) {
            v = 0; s = tolower(s)
            for (i = 3; i <= length(s); i++) { c = index("0123456789abcdef", substr(s, i, 1)) - 1; v = v * 16 + c }
            return v
        }
        NR <= skip { next }
        {
            cmd = ""; off = "-"; cnt = "-"
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^id=/ && i > 1 && $(i - 1) !~ /^\.\.\./ && $(i - 1) !~ /^(Preconnect|Connect|Disconnect)$/ && $(i - 1) !~ /^connection=/) cmd = $(i - 1)
                else if ($i ~ /^offset=0x/) off = sprintf("%.0f", hex(substr($i, 8)))
                else if ($i ~ /^count=0x/) cnt = sprintf("%.0f", hex(substr($i, 7)))
            }
            if (cmd != "") print cmd, off, cnt
        }' "$log"
}

# source_reads LOG [SKIP]: "OFFSET COUNT" (decimal) of each Read the source received after the first
# SKIP lines of LOG, in log order.
source_reads() { source_requests "$@" | awk '$1 == "Read" { print $2, $3 }'; }

# source_read_bytes LOG [SKIP]: total bytes read from the source after the first SKIP lines.
source_read_bytes() { source_reads "$@" | awk '{ s += $2 } END { printf "%d\n", s }'; }

# serve_lazy NAME SOURCE-NAME STORE-DIR [ARG...]: nbd-umemd lazy export of source SOURCE-NAME (see
# start_source) on $T/NAME.sock with its store in STORE-DIR. Without a --prefetch ARG the background
# pull is off (--prefetch off), so that the source log shows demand misses only.
serve_lazy() {
    local name=$1 src=$2 store=$3; shift 3
    local a prefetch=(--prefetch off)
    for a in "$@"; do [[ "$a" == --prefetch || "$a" == --prefetch=* ]] && prefetch=(); done
    serve_unix "$name" --source "$(uri "$src")" --store "$store" "${prefetch[@]}" "$@"
}

# require_lazy: fail early, with a clear message, if the binary has no lazy-export support.
require_lazy() {
    # (not `serve --help | grep -q`: grep may exit before the help is written, and the daemon's
    # SIGPIPE would fail the pipeline)
    local help
    help=$("$NBD_UMEMD" serve --help 2>&1) || true
    grep -q -- '--source' <<<"$help" || fail "$NBD_UMEMD has no 'serve --source' (lazy export) support"
}

# run_fio WHAT CMD...: the fio command must exit 0 with no error or verification failure in its
# output (time limit FIO_TIMEOUT seconds, default 180).
run_fio() {
    local what=$1; shift
    local rc=0
    tmo "${FIO_TIMEOUT:-180}" "$@" >"$T/fio.out" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ] || grep -qE 'err= *[1-9]|verify: bad|crc32c: verify failed|md5: verify failed' "$T/fio.out"; then
        tail -n 40 "$T/fio.out" >&2
        fail "$what: fio exit $rc"
    fi
    say "ok: $what: $(grep -E '^ +(READ|WRITE):' "$T/fio.out" | sed 's/ (.*//' | tr -s ' ' | tr '\n' ';')"
}

# ---- TLS credentials -------------------------------------------------------------------------------

# make_pki DIR [CN]: a fresh CA and, signed by it, a server certificate for CN (default localhost, also
# 127.0.0.1 and ::1) and a client certificate, in nbdkit's and libnbd's layout: DIR/ca-cert.pem,
# DIR/server-cert.pem, DIR/server-key.pem, DIR/client-cert.pem, DIR/client-key.pem (and the CA's key).
make_pki() {
    local d=$1 cn=${2:-localhost}
    mkdir -p "$d"
    (
        cd "$d" || exit 1
        certtool --generate-privkey --outfile ca-key.pem 2>/dev/null
        printf 'cn = test CA %s\nca\ncert_signing_key\nexpiration_days = 30\n' "$d" >ca.info
        certtool --generate-self-signed --load-privkey ca-key.pem --template ca.info --outfile ca-cert.pem 2>/dev/null
        certtool --generate-privkey --outfile server-key.pem 2>/dev/null
        printf 'cn = %s\ndns_name = %s\nip_address = 127.0.0.1\nip_address = ::1\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 30\n' \
            "$cn" "$cn" >server.info
        certtool --generate-certificate --load-ca-certificate ca-cert.pem --load-ca-privkey ca-key.pem \
            --load-privkey server-key.pem --template server.info --outfile server-cert.pem 2>/dev/null
        certtool --generate-privkey --outfile client-key.pem 2>/dev/null
        printf 'cn = client\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 30\n' >client.info
        certtool --generate-certificate --load-ca-certificate ca-cert.pem --load-ca-privkey ca-key.pem \
            --load-privkey client-key.pem --template client.info --outfile client-cert.pem 2>/dev/null
        chmod 600 ./*-key.pem
    ) || fail "make_pki $d: certtool failed"
    [ -s "$d/server-cert.pem" ] && [ -s "$d/client-cert.pem" ] || fail "make_pki $d: no certificates"
}

# make_psk FILE IDENTITY: a fresh pre-shared key file (psktool's format).
make_psk() {
    rm -f "$1"
    psktool -u "$2" -p "$1" >/dev/null 2>&1 || fail "psktool -u $2 -p $1 failed"
}
