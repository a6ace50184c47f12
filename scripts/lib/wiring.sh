# Shared code of the wiring scripts (attach, detach, swap-on, swap-off, qemu-ram). Source it after
# common.sh; do not run it.
# shellcheck shell=bash
#
# Every attached device has a state file $STATE_DIR/attached/NAME (NAME = nbd0, loop3, ...) holding
# shell assignments: METHOD (nbd|fuse), DEVICE, SERVER (unix:PATH or tcp:HOST:PORT), EXPORT,
# FUSE_DIR and FUSE_PID (fuse only), SWAP (1 when swap-on enabled swap on it), DAEMON_PID and
# DAEMON_SOCK (when swap-on started the daemon itself).

STATE_DIR=${NBD_UMEMD_STATE_DIR:-/run/nbd-umemd}

# ---- server address ----------------------------------------------------------------------------

SERVER=""      # unix:PATH or tcp:HOST:PORT
EXPORT=""

REQUIRE_SOCKET=1   # detach and swap-off name sockets whose daemon may be gone: they set it to 0

# parse_server_option OPTION VALUE: handles --unix/--tcp/--export; returns 1 for other options.
parse_server_option() {
    case "$1" in
        --unix) [ "$REQUIRE_SOCKET" = 0 ] || [ -S "$2" ] || die "--unix $2: no such socket (is nbd-umemd serve --unix $2 running?)"
                SERVER="unix:$(realpath "$2" 2>/dev/null || realpath -m "$2" 2>/dev/null || echo "$2")" ;;
        --tcp) [[ "$2" == *:* ]] || die "--tcp wants HOST:PORT, got '$2'"
               SERVER="tcp:$2" ;;
        --export) EXPORT=$2 ;;
        *) return 1 ;;
    esac
}

require_server() {
    [ -n "$SERVER" ] || die "say which daemon: --unix SOCKET or --tcp HOST:PORT (see --help)"
}

# server_uri: the libnbd URI of SERVER/EXPORT.
server_uri() {
    case "$SERVER" in
        unix:*) echo "nbd+unix:///${EXPORT}?socket=${SERVER#unix:}" ;;
        tcp:*) echo "nbd://${SERVER#tcp:}/${EXPORT}" ;;
    esac
}

# server_pid: the pid of the process listening on SERVER (empty when it cannot be found). A Unix
# socket is looked up in /proc/net/unix and the processes' fd links, so no tool is needed for it.
server_pid() {
    case "$SERVER" in
        unix:*)
            local path=${SERVER#unix:} inode fd
            # listening sockets (state 01 = unconnected, flags 00010000 = __SO_ACCEPTCON)
            inode=$(awk -v p="$path" '$NF == p && $4 == "00010000" { print $7; exit }' /proc/net/unix)
            [ -n "$inode" ] || return 0
            fd=$(find /proc/[0-9]*/fd -lname "socket:\[$inode\]" 2>/dev/null | head -n 1)
            if [ -z "$fd" ]; then   # a find without -lname (busybox): one readlink per descriptor
                for fd in /proc/[0-9]*/fd/*; do
                    [ "$(readlink "$fd" 2>/dev/null)" = "socket:[$inode]" ] && break
                    fd=""
                done
            fi
            [ -n "$fd" ] || return 0
            fd=${fd#/proc/}
            echo "${fd%%/*}"
            ;;
        tcp:*)
            ss -tlpnH "sport = :${SERVER##*:}" 2>/dev/null | sed -nE 's/.*pid=([0-9]+).*/\1/p' | head -n 1
            ;;
    esac
}

# ---- state files ---------------------------------------------------------------------------------

state_file() { echo "$STATE_DIR/attached/$(basename "$1")"; }

# load_state DEVICE: sources the device's state file into METHOD, DEVICE, ...; fails if none.
load_state() {
    local f
    f=$(state_file "$1")
    [ -f "$f" ] || return 1
    METHOD="" DEVICE="" FUSE_DIR="" FUSE_PID="" SWAP=0 DAEMON_PID="" DAEMON_SOCK=""
    # shellcheck disable=SC1090
    . "$f"
}

# write_state: writes the state file of $DEVICE from the current variables.
write_state() {
    mkdir -p "$STATE_DIR/attached"
    local f
    f=$(state_file "$DEVICE")
    {
        printf 'METHOD=%q\nDEVICE=%q\nSERVER=%q\nEXPORT=%q\n' "$METHOD" "$DEVICE" "$SERVER" "$EXPORT"
        printf 'FUSE_DIR=%q\nFUSE_PID=%q\nSWAP=%q\n' "${FUSE_DIR:-}" "${FUSE_PID:-}" "${SWAP:-0}"
        printf 'DAEMON_PID=%q\nDAEMON_SOCK=%q\n' "${DAEMON_PID:-}" "${DAEMON_SOCK:-}"
    } >"$f.tmp"
    mv "$f.tmp" "$f"
}

# attached_devices: the devices with a state file, one per line.
attached_devices() {
    local f
    for f in "$STATE_DIR"/attached/*; do
        [ -f "$f" ] || continue
        ( . "$f" && echo "$DEVICE" )
    done
}

# device_for_server: the attached device of SERVER/EXPORT, if any.
device_for_server() {
    local d
    for d in $(attached_devices); do
        ( load_state "$d" && [ "$SERVER" = "$1" ] && [ "$EXPORT" = "$2" ] && echo "$d" ) || true
    done | head -n 1
}

# device_alive DEVICE: whether the state file's device is still connected.
device_alive() {
    ( load_state "$1" || exit 1
      case "$METHOD" in
          nbd) nbd-client -c "$DEVICE" >/dev/null 2>&1 ;;
          fuse) [ -n "$FUSE_PID" ] && pid_running "$FUSE_PID" \
                  && losetup -nO BACK-FILE "$DEVICE" 2>/dev/null | grep -qF "$FUSE_DIR/nbd" ;;
          *) exit 1 ;;
      esac )
}

# locked_kib PID: VmLck of process PID in KiB (0 when it cannot be read).
locked_kib() { awk '/^VmLck:/ { print $2; f = 1 } END { if (!f) print 0 }' "/proc/$1/status" 2>/dev/null || echo 0; }

is_swap_active() { awk 'NR > 1 { print $1 }' /proc/swaps | grep -qxF "$1"; }

# swap_used_kib DEVICE: the Used column of /proc/swaps for DEVICE (0 when not active).
swap_used_kib() { awk -v d="$1" '$1 == d { print $4; found = 1 } END { if (!found) print 0 }' /proc/swaps; }

# ---- attach / detach -----------------------------------------------------------------------------

# kernel_has_nbd: loads the nbd module if needed; fails (with the reason in NBD_MISSING) if none.
NBD_MISSING=""
kernel_has_nbd() {
    [ -e /sys/module/nbd ] && [ -e /dev/nbd0 ] && return 0
    local out
    if ! command -v modprobe >/dev/null; then
        NBD_MISSING="nbd is not loaded and there is no modprobe"
        return 1
    fi
    if out=$(modprobe nbd nbds_max=16 2>&1) && [ -e /dev/nbd0 ]; then return 0; fi
    NBD_MISSING=${out:-"no /dev/nbd0 after modprobe nbd"}
    return 1
}

# free_nbd_device: the first /dev/nbdN that is not connected.
free_nbd_device() {
    local s n
    for s in /sys/block/nbd*; do
        [ -e "$s" ] || continue
        n=$(basename "$s")
        [ -e "$s/pid" ] && continue
        [ "$(cat "$s/size")" = "0" ] || continue
        [ -f "$(state_file "$n")" ] && continue
        echo "/dev/$n"
        return 0
    done
    return 1
}

# attach_nbd SWAP TIMEOUT PERSIST [DEVICE]: connects a /dev/nbdN with nbd-client; sets DEVICE.
attach_nbd() {
    local swap=$1 timeout=$2 persist=$3 dev=${4:-}
    [ -n "$dev" ] || dev=$(free_nbd_device) || die "no free /dev/nbdN (all connected; modprobe nbd nbds_max=N for more)"
    local args=()
    case "$SERVER" in
        unix:*) args=(-unix "${SERVER#unix:}" "$dev") ;;
        tcp:*) local hp=${SERVER#tcp:}; args=("${hp%:*}" "${hp##*:}" "$dev") ;;
    esac
    args+=(-b 4096)
    [ "$persist" = 1 ] && args+=(-persist)
    [ -n "$EXPORT" ] && args+=(-N "$EXPORT")
    [ "$swap" = 1 ] && args+=(-swap)
    [ -n "$timeout" ] && args+=(-timeout "$timeout")
    local out
    out=$(nbd-client "${args[@]}" 2>&1) || die "nbd-client ${args[*]} failed: $out"
    DEVICE=$dev METHOD=nbd FUSE_DIR="" FUSE_PID=""
}

# attach_fuse SWAP: exposes the export as a file with nbdfuse and puts a loop device (4 KiB sectors,
# direct I/O, so no second page cache) on it; sets DEVICE, FUSE_DIR, FUSE_PID. For swap, nbdfuse
# runs with its memory locked (mlock-preload.c), since it is then in the swap path.
attach_fuse() {
    local swap=$1 preload=""
    if [ "$swap" = 1 ]; then
        build_mlock_preload
        preload=$NBD_MLOCK_PRELOAD
    fi
    local id
    id=$(printf '%s' "$SERVER/$EXPORT" | md5sum | cut -c1-12)
    FUSE_DIR="$STATE_DIR/fuse/$id"
    mkdir -p "$FUSE_DIR"
    mountpoint -q "$FUSE_DIR" && fusermount3 -u "$FUSE_DIR" 2>/dev/null
    rm -f "$FUSE_DIR.pid"
    LD_PRELOAD=$preload NBD_UMEMD_MLOCK_REQUIRED=$swap setsid nbdfuse -P "$FUSE_DIR.pid" "$FUSE_DIR/nbd" "$(server_uri)" </dev/null >"$FUSE_DIR.log" 2>&1 &
    local i
    for ((i = 0; i < 200; i++)); do
        [ -s "$FUSE_DIR.pid" ] && break
        sleep 0.05
    done
    [ -s "$FUSE_DIR.pid" ] || { rmdir "$FUSE_DIR" 2>/dev/null; die "nbdfuse did not start: $(tail -n 3 "$FUSE_DIR.log" 2>/dev/null)"; }
    FUSE_PID=$(cat "$FUSE_DIR.pid")
    # nbdfuse sits in the I/O path too: keep the OOM killer away from it (may be refused).
    echo -1000 >"/proc/$FUSE_PID/oom_score_adj" 2>/dev/null || true
    local out
    if ! out=$(losetup --find --show --direct-io=on --sector-size 4096 "$FUSE_DIR/nbd" 2>&1); then
        fusermount3 -u "$FUSE_DIR" 2>/dev/null; rmdir "$FUSE_DIR" 2>/dev/null
        die "losetup on $FUSE_DIR/nbd failed: $out"
    fi
    DEVICE=$out METHOD=fuse
}

# detach_device DEVICE: disconnects one recorded device and removes its state file.
detach_device() {
    load_state "$1" || die "$1 is not attached by these scripts (no $(state_file "$1"))"
    if is_swap_active "$DEVICE"; then die "$DEVICE is in use as swap: run scripts/swap-off $DEVICE"; fi
    if grep -q "^$DEVICE " /proc/mounts; then die "$DEVICE is mounted: unmount it first"; fi
    case "$METHOD" in
        nbd)
            nbd-client -d "$DEVICE" >/dev/null 2>&1 || true
            ;;
        fuse)
            if losetup -nO BACK-FILE "$DEVICE" 2>/dev/null | grep -qF "$FUSE_DIR/nbd"; then
                losetup -d "$DEVICE" || die "losetup -d $DEVICE failed (is it still open?)"
            fi
            # the loop device lets go of the file asynchronously: retry the unmount for a while
            local i
            for ((i = 0; i < 100; i++)); do
                mountpoint -q "$FUSE_DIR" || break
                fusermount3 -u "$FUSE_DIR" 2>/dev/null && break
                sleep 0.1
            done
            mountpoint -q "$FUSE_DIR" && die "cannot unmount $FUSE_DIR (busy)"
            # A process that entered a new mount namespace after the attach (`ip netns exec` makes
            # one) holds a copy of the FUSE mount, which the unmount above leaves in place: nbdfuse
            # keeps running until that copy goes too. Removing the mount point detaches such copies.
            rmdir "$FUSE_DIR" 2>/dev/null || true
            for ((i = 0; i < 100; i++)); do
                [ -n "$FUSE_PID" ] && pid_running "$FUSE_PID" || break
                sleep 0.05
            done
            rm -f "$FUSE_DIR.pid" "$FUSE_DIR.log"
            ;;
    esac
    rm -f "$(state_file "$DEVICE")"
    log "detached $DEVICE ($METHOD)"
}

# swap_safety_problem: why swapping to SERVER could deadlock (the serving process's own memory could
# be swapped out to the device it serves), or nothing when it is safe.
swap_safety_problem() {
    local pid comm locked f target
    case "$SERVER" in
        tcp:*)
            local host=${SERVER#tcp:}; host=${host%:*}
            case "$host" in 127.*|localhost|::1|\[::1\]) ;; *) return 0 ;; esac  # another machine
            ;;
    esac
    pid=$(server_pid)
    if [ -z "$pid" ]; then
        echo "cannot find the process serving $(server_uri), so cannot check that it is safe to swap to"
        return 0
    fi
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || echo "?")
    if [ "$comm" != "nbd-umemd" ]; then
        echo "$(server_uri) is served by $comm (pid $pid), not by nbd-umemd --swap: its memory is not locked and could be swapped out to the device it serves"
        return 0
    fi
    locked=$(locked_kib "$pid")
    if [ "${locked:-0}" -eq 0 ]; then
        echo "nbd-umemd (pid $pid) serving $(server_uri) was not started with --swap: its memory could be swapped out to the device it serves (restart it with --swap)"
        return 0
    fi
    for f in "/proc/$pid"/fd/*; do
        case "${f##*/}" in 0|1|2) continue ;; esac   # stdin/stdout/stderr: a log, not served data
        target=$(readlink "$f" 2>/dev/null) || continue
        [ -f "$target" ] || continue
        if [ "$(stat -f -c %T "$target" 2>/dev/null)" = tmpfs ]; then
            echo "nbd-umemd (pid $pid) serves $target from tmpfs, whose pages can be swapped out to this very device (use --memory SIZE --swap, or a file on disk)"
            return 0
        fi
    done
}

# parse_targets ARGS...: the command line of detach and swap-off (DEVICE... | --unix/--tcp/--export |
# --all); sets TARGETS (devices named) and ALL_TARGETS. Calls the script's `usage` for --help.
parse_targets() {
    TARGETS=() ALL_TARGETS=0
    while [ $# -gt 0 ]; do
        case "$1" in
            -h|--help) usage; exit 0 ;;
            --all) ALL_TARGETS=1; shift ;;
            --unix|--tcp|--export) [ $# -ge 2 ] || die "$1 needs a value"; parse_server_option "$1" "$2"; shift 2 ;;
            -*) die "unknown option $1 (see --help)" ;;
            *) TARGETS+=("$(resolve_device "$1")"); shift ;;
        esac
    done
}

# resolve_targets: adds the devices --all or --unix/--tcp select to TARGETS; with none at all, says
# there is nothing to do and exits 0 (usage and exit 2 when nothing was named).
resolve_targets() {
    local d
    if [ "$ALL_TARGETS" = 1 ]; then
        for d in $(attached_devices); do TARGETS+=("$d"); done
    elif [ -n "$SERVER" ]; then
        d=$(device_for_server "$SERVER" "$EXPORT")
        [ -n "$d" ] && TARGETS+=("$d")
    elif [ ${#TARGETS[@]} -eq 0 ]; then
        usage >&2; exit 2
    fi
    if [ ${#TARGETS[@]} -eq 0 ]; then
        log "nothing attached${SERVER:+ for $(server_uri)}: nothing to do"
        exit 0
    fi
}

# resolve_device ARG: a device given as /dev/X or X, or the device of --unix/--tcp.
resolve_device() {
    case "$1" in
        /dev/*) echo "$1" ;;
        *) echo "/dev/$1" ;;
    esac
}
