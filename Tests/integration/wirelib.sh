# Helpers for the kernel-wiring tests (5x-wiring-*): the scripts/attach, detach, swap-on, swap-off
# and qemu-ram scripts against real kernel block paths. Source it after lib.sh.
# shellcheck shell=bash

build_mmap_tool
# the wiring scripts keep their state here, not in /run, so a test never sees another's devices
export NBD_UMEMD_STATE_DIR="$T/state"
# shellcheck source=../../scripts/lib/wiring.sh
. "$ROOT/scripts/lib/wiring.sh"   # swap_used_kib, locked_kib
# before the daemons stop: swap off and detach whatever is still attached (swap on a device whose
# daemon is gone would take the swapped pages of every process with it)
PRE_STOP_CMDS+=("'$ROOT/scripts/swap-off' --all; '$ROOT/scripts/detach' --all")

# w_cgroup VAR NAME LIMIT: a cgroup-v1 memory cgroup limited to LIMIT bytes; its directory goes into
# the variable VAR (not printed: a command substitution would run this in a subshell, and the
# cleanup it registers would be lost). The EXIT trap kills its processes and removes it.
w_cgroup() {
    local -n _w_out=$1
    local dir="/sys/fs/cgroup/memory/nbd-umemd-it-$2-$$"
    [ -d /sys/fs/cgroup/memory ] || fail "no cgroup-v1 memory controller at /sys/fs/cgroup/memory"
    mkdir "$dir" || fail "cannot create memory cgroup $dir"
    CLEANUP_CMDS+=("for p in \$(cat '$dir/cgroup.procs'); do kill -9 \$p; done; sleep 0.2; rmdir '$dir'")
    echo "$3" >"$dir/memory.limit_in_bytes" || fail "cannot limit $dir to $3"
    _w_out=$dir
}

# w_in_cgroup DIR CMD...: runs CMD inside memory cgroup DIR.
w_in_cgroup() {
    local dir=$1; shift
    sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' w_in_cgroup "$dir" "$@"
}


# w_has_cap_sys_resource: whether this process has CAP_SYS_RESOURCE (needed for PR_SET_IO_FLUSHER
# and a negative oom_score_adj).
w_has_cap_sys_resource() {
    local eff
    eff=$(awk '/^CapEff:/ { print $2 }' /proc/self/status)
    (( (16#$eff >> 24) & 1 ))
}
