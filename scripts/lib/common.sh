# Shared helpers for the shell scripts (scripts/*, Tests/integration/lib.sh) and, through
# scripts/umemd_harness/common.py, the Python harness. Source it; do not run it.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export ROOT

# System packages every script of this project may need.
BASE_PACKAGES=(libnbd-dev libnbd-bin python3-libnbd nbdkit qemu-utils fio pkg-config)

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ensure_packages PKG...: install the Debian packages that are missing (runs apt-get update once).
ensure_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    log "installing: ${missing[*]}"
    $sudo apt-get update -qq >/dev/null || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
}

# build_release: builds the daemon in release mode and sets NBD_UMEMD to its path.
build_release() {
    (cd "$ROOT" && swift build -c release --product nbd-umemd >&2) || die "swift build failed"
    NBD_UMEMD="$ROOT/.build/release/nbd-umemd"
    export NBD_UMEMD
}

# wait_for_file PATH [SECONDS]: waits until PATH exists (pidfiles are written once sockets listen).
wait_for_file() {
    local path=$1 limit=${2:-20} i=0
    while [ ! -e "$path" ]; do
        sleep 0.05
        i=$((i + 1))
        [ $i -lt $((limit * 20)) ] || return 1
    done
}

# alive PID: the process exists and is not a zombie.
alive() {
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

# spawn_server PIDFILE LOG CMD...: starts CMD in the background, stdout and stderr appended to LOG,
# and waits up to SPAWN_TIMEOUT (default 20) s until it has written PIDFILE (servers write it once
# they listen). Sets SPAWNED_PID. The server is a child of the calling shell, so that `wait` gives
# its exit status: never call this from a $(...) subshell (Debian's nbdkit in the foreground also
# sets PR_SET_PDEATHSIG). Returns 1 if CMD exited first, 2 if no pidfile came in time (the process
# is then killed); either way it has been reaped.
spawn_server() {
    local pidfile=$1 logf=$2 i=0 limit=$((${SPAWN_TIMEOUT:-20} * 20))
    shift 2
    rm -f "$pidfile"
    "$@" >>"$logf" 2>&1 </dev/null &
    SPAWNED_PID=$!
    while [ ! -s "$pidfile" ]; do
        if ! alive "$SPAWNED_PID"; then
            wait "$SPAWNED_PID" 2>/dev/null || true
            return 1
        fi
        if [ $i -ge $limit ]; then
            kill -KILL "$SPAWNED_PID" 2>/dev/null || true
            wait "$SPAWNED_PID" 2>/dev/null || true
            return 2
        fi
        sleep 0.05
        i=$((i + 1))
    done
}

# stop_child PID [SECONDS]: stops a child of this shell: SIGTERM, wait up to SECONDS (default 10),
# then SIGKILL; reaps it and sets STOP_RC to its exit status. Returns 1 if it needed SIGKILL.
stop_child() {
    local pid=$1 limit=$((${2:-10} * 20)) i=0 killed=0
    kill -TERM "$pid" 2>/dev/null || true
    while alive "$pid" && [ $i -lt $limit ]; do sleep 0.05; i=$((i + 1)); done
    if alive "$pid"; then
        kill -KILL "$pid" 2>/dev/null || true
        killed=1
    fi
    STOP_RC=0
    wait "$pid" 2>/dev/null || STOP_RC=$?
    return "$killed"
}

# start_nbdkit PIDFILE ARGS...: starts nbdkit as a daemon (it forks and detaches, so it survives the
# $(...) subshell of `pid=$(start_nbdkit ...)`), waits for its pidfile, and prints its pid.
start_nbdkit() {
    local pidfile=$1; shift
    rm -f "$pidfile"
    nbdkit -P "$pidfile" "$@" >&2 || die "nbdkit did not start: $*"
    wait_for_file "$pidfile" 20 || die "nbdkit wrote no pidfile: $*"
    local pid
    pid=$(cat "$pidfile")
    [ -n "$pid" ] || { sleep 0.1; pid=$(cat "$pidfile"); }
    echo "$pid"
}

# pid_running PID: the process exists and has not exited. An exited process its parent has not
# reaped yet (a zombie) counts as gone: kill -0 still succeeds on it, and an orphan (nbdfuse after
# attach has exited) waits for PID 1 to reap it, which takes seconds on some machines.
pid_running() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ -n "$stat" ] && [ "${stat%% *}" != Z ]
}

# stop_pid PID: stops a process that is not a child of this shell (it cannot be reaped here):
# SIGTERM, then poll until it is gone (SIGKILL after 10 s).
stop_pid() {
    local pid=$1 i=0
    kill "$pid" 2>/dev/null || return 0
    while pid_running "$pid"; do
        sleep 0.05
        i=$((i + 1))
        if [ $i -gt 200 ]; then kill -9 "$pid" 2>/dev/null; break; fi
    done
}

# _build_c SOURCE OUTPUT GCC-ARGS...: compiles SOURCE (under scripts/) into OUTPUT when OUTPUT is
# missing or older than SOURCE.
_build_c() {
    local src=$1 out=$2; shift 2
    if [ ! -f "$out" ] || [ "$src" -nt "$out" ]; then
        ensure_packages gcc libc6-dev
        mkdir -p "$(dirname "$out")"
        gcc -O2 -Wall "$@" -o "$out.tmp" "$src" && mv "$out.tmp" "$out" || die "cannot build $out (needs gcc and libc6-dev)"
    fi
}

# build_mlock_preload: compiles scripts/mlock-preload.c into .build/libnbd-umemd-mlock.so (an
# LD_PRELOAD library that mlockall()s the process) and sets NBD_MLOCK_PRELOAD to its path.
build_mlock_preload() {
    NBD_MLOCK_PRELOAD="$ROOT/.build/libnbd-umemd-mlock.so"
    _build_c "$ROOT/scripts/mlock-preload.c" "$NBD_MLOCK_PRELOAD" -shared -fPIC
}

# build_mmap_tool: compiles scripts/nbd-mmap.c (static, so it also runs in the test VM's busybox
# initramfs) into .build/nbd-mmap when the source is newer, and sets NBD_MMAP to its path.
build_mmap_tool() {
    NBD_MMAP="$ROOT/.build/nbd-mmap"
    export NBD_MMAP
    _build_c "$ROOT/scripts/nbd-mmap.c" "$NBD_MMAP" -Wextra -static
}

# build_no_hugepage: compiles scripts/no-hugepage.c (runs a command with madvise(MADV_HUGEPAGE)
# failing, see the file) into .build/no-hugepage and sets NBD_NO_HUGEPAGE to its path.
build_no_hugepage() {
    NBD_NO_HUGEPAGE="$ROOT/.build/no-hugepage"
    _build_c "$ROOT/scripts/no-hugepage.c" "$NBD_NO_HUGEPAGE" -Wextra
}
