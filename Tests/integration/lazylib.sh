# Helpers for the lazy-export tests 27-30 (outage, kill -9, status, RSS). Source it after lib.sh:
#   . "$(dirname "$0")/lib.sh"
#   . "$(dirname "$0")/lazylib.sh"
# It relies on lib.sh's start_source / serve_lazy / source_reads (nbdkit source with the log filter).
# shellcheck shell=bash

for _f in start_source stop_source serve_lazy source_reads log_lines require_lazy; do
    declare -F "$_f" >/dev/null || fail "lazylib.sh: lib.sh has no function $_f"
done
unset _f

# lz_status NAME OUT: `nbd-umemd status --control $T/NAME.ctl` into OUT (must succeed and be a JSON
# object with a "pages" member).
lz_status() {
    local name=$1 out=$2
    tmo 20 "$NBD_UMEMD" status --control "$T/$name.ctl" >"$out" 2>"$out.err" \
        || { cat "$out.err" >&2; fail "nbd-umemd status --control $T/$name.ctl failed"; }
    "$PY" -c 'import json,sys; j=json.load(open(sys.argv[1])); assert isinstance(j, dict) and "pages" in j' "$out" \
        || { cat "$out" >&2; fail "nbd-umemd status --control $T/$name.ctl: output is not the status JSON object"; }
}

# lz_kill_source NAME: SIGKILL the nbdkit source NAME (no goodbye to its clients), wait for it to be
# gone and remove its socket file (nbdkit leaves it behind).
lz_kill_source() {
    local name=$1 pid i
    pid=${SRC_PID[$name]:-}
    [ -n "$pid" ] || fail "lz_kill_source: no source $name"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 200; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -0 "$pid" 2>/dev/null && fail "nbdkit source $name (pid $pid) survived SIGKILL for 10 s"
    unset "SRC_PID[$name]"
    rm -f "$T/$name.sock"
}

# lz_kill9_server NAME: SIGKILL nbd-umemd server NAME (started with serve_unix/serve_lazy) and reap it.
lz_kill9_server() {
    local name=$1 pid
    pid=${SRV_PID[$name]}
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    SRV_STOPPED[$name]=1
    kill -0 "$pid" 2>/dev/null && fail "server $name (pid $pid) survived SIGKILL"
    return 0
}

# lz_count PATTERN FILE: number of lines of FILE matching the extended regexp PATTERN (0 if none).
lz_count() { grep -cE -- "$1" "$2" 2>/dev/null || true; }

# lz_wait_grep PATTERN FILE SECONDS: wait until FILE has a line matching PATTERN; 1 on time-out.
lz_wait_grep() {
    local pat=$1 file=$2 limit=$3 i
    for ((i = 0; i < limit * 20; i++)); do
        grep -qE -- "$pat" "$file" 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}

# lz_wait_status NAME OUT PYEXPR SECONDS: poll status until PYEXPR (with `j` the parsed JSON) is true;
# the last status is left in OUT. 1 on time-out.
lz_wait_status() {
    local name=$1 out=$2 expr=$3 limit=$4 i
    for ((i = 0; i < limit * 5; i++)); do
        lz_status "$name" "$out"
        if "$PY" -c 'import json,sys; j=json.load(open(sys.argv[1])); sys.exit(0 if eval(sys.argv[2]) else 1)' "$out" "$expr"; then
            return 0
        fi
        sleep 0.2
    done
    return 1
}

# lz_check_local_without_source NAME SRC IMG: stops source SRC and checks that nbdcopy of the lazy
# export NAME still equals IMG, i.e. every page really is local.
lz_check_local_without_source() {
    local name=$1 src=$2 img=$3
    stop_source "$src"
    tmo 120 nbdcopy "$(uri "$name")" "$T/$name.out.img" || fail "nbdcopy of the complete export with the source stopped failed"
    assert_same_file "$img" "$T/$name.out.img" "nbdcopy of the complete export with the source stopped"
    rm -f "$T/$name.out.img"
    say "ok: source stopped, nbdcopy of the export equals the image"
}
