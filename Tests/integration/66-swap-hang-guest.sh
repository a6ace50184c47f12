#!/bin/bash
# Remote memory as swap, the hang harness: a QEMU TCG guest (256 MiB of RAM, hung_task_panic=1,
# softlockup_panic=1, panic=-1, so a hung or panicking kernel ends the run and says so) attaches the
# host's nbd-umemd over TCP with the real kernel client (`nbd-client -b 4096 -swap`) and swaps to it
# with NO memory cgroup: a memory eater writes RAM + 100 MiB of anonymous memory, verifies it, frees
# it (HANG_ITERS times). Then the swapoff case: a process writes half the RAM and is
# stopped (SIGSTOP), another eater pushes its pages out to the device, and `swapoff` must bring them
# back while their owner is stopped; the owner then verifies every page. Every boot is one run;
# HANG_RUNS boots (default 3; `scripts/bench --suite hang` runs 30). Counted per run: a hang (QEMU
# killed after its time limit, or a hung-task/soft-lockup report), a panic, a data error (a VERDICT
# that is not ok). The last line before PASS is "HANG-HARNESS runs=N ok=N hangs=H panics=P
# data-errors=E ...", which the benchmark reads.
# Knobs: HANG_RUNS, HANG_ITERS (eater rounds per boot, default 1), HANG_EXTRA (MiB over the guest's
# RAM the eater writes, default 100), HANG_TIMEOUT (seconds per boot, default 240).
# HANG_TOPOLOGY=local puts the daemon inside the guest instead (the local topology: `serve --swap
# --memory 256M` on a Unix socket, `nbd-client -unix ... -swap`, a 640 MiB guest; "RAM" is then
# what is available with the daemon running), and HANG_CGROUP=MIB runs the eaters in a memory
# cgroup of that size (default none): `scripts/bench --suite hang --hang-mode local|local-cgroup`.
. "$(dirname "$0")/lib.sh"
# shellcheck source=../../scripts/lib/guest.sh
. "$ROOT/scripts/lib/guest.sh"

secs_since() { local d=$(($(date +%s%N) - $1)); printf '%d.%d' $((d / 1000000000)) $((d / 100000000 % 10)); }
RUNS=${HANG_RUNS:-3}
ITERS=${HANG_ITERS:-1}
EXTRA=${HANG_EXTRA:-100}
LIMIT=${HANG_TIMEOUT:-240}
TOPOLOGY=${HANG_TOPOLOGY:-remote}
CGROUP=${HANG_CGROUP:-0}
case "$TOPOLOGY" in
remote) GUEST_MEM=256 ;;
local) GUEST_MEM=640 ;;
*) fail "HANG_TOPOLOGY must be remote or local, got '$TOPOLOGY'" ;;
esac
[[ "$CGROUP" =~ ^[0-9]+$ ]] || fail "HANG_CGROUP wants MiB, got '$CGROUP'"
guest_kit
build_mmap_tool
say "guest kernel $GUEST_KVER; $TOPOLOGY topology, cgroup ${CGROUP} MiB (0: none); $RUNS runs of $ITERS eater rounds (RAM + $EXTRA MiB) and a swapoff each"

PORT=0
if [ "$TOPOLOGY" = remote ]; then
    PORT=$(free_port)
    start_server swap --memory 2G --port "$PORT" --bind 127.0.0.1
fi

cat >"$T/init" <<'INIT'
#!/bin/sh
# /init of the 66-swap-hang-guest VM (busybox). Lines the host checks start with "GUEST" or "VERDICT".
. /lib/guest-init.sh
for w in $(cat /proc/cmdline); do
    case "$w" in
    umemd.port=*) PORT=${w#*=} ;;
    umemd.iters=*) ITERS=${w#*=} ;;
    umemd.extra=*) EXTRA=${w#*=} ;;
    umemd.topology=*) TOPOLOGY=${w#*=} ;;
    umemd.cgroup=*) CGROUP=${w#*=} ;;
    esac
done
[ -n "$PORT" ] && [ -n "$ITERS" ] && [ -n "$EXTRA" ] && [ -n "$TOPOLOGY" ] && [ -n "$CGROUP" ] \
    || bye "missing umemd.* parameters: $(cat /proc/cmdline)"
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m.ko" || bye "insmod $m"; done
ip link set lo up
# A task blocked for 60 s (TCG runs about ten times slower than the host) is a hang: panic.
echo 60 >/proc/sys/kernel/hung_task_timeout_secs || bye "no hung-task detector in this kernel"
say "hung_task_panic=$(cat /proc/sys/kernel/hung_task_panic) softlockup_panic=$(cat /proc/sys/kernel/softlockup_panic)"
if [ "$TOPOLOGY" = local ]; then
    # the daemon in this kernel's reclaim path, as the Safety notes prescribe: --swap, a Unix socket
    nbd-umemd serve --memory 256M --swap --threads 4 --unix /run/s.sock --pidfile /run/s.pid 2>/run/d.log &
    daemon=$!
    wait_daemon $daemon /run/s.pid /run/d.log
    nbd-client -unix /run/s.sock /dev/nbd0 -b 4096 -swap || bye "nbd-client -unix"
    field=MemAvailable   # what the daemon (its export locked in RAM) leaves to the workload
else
    ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up && ip route add default via 10.0.2.2 || bye "network"
    nbd-client 10.0.2.2 "$PORT" /dev/nbd0 -b 4096 -swap || bye "nbd-client"
    field=MemTotal
fi
mkswap /dev/nbd0 >/dev/null && swapon /dev/nbd0 || bye "mkswap/swapon /dev/nbd0"
mem=$(awk -v f="$field:" '$1 == f {print int($2 / 1024)}' /proc/meminfo)
say "ram-mib=$mem ($field) swap: $(awk '$1 == "/dev/nbd0" {print $3 " kB"}' /proc/swaps)"
used() { awk '$1 == "/dev/nbd0" {print $4}' /proc/swaps; }
# $EAT CMD: CMD, in the workload's memory cgroup when there is one (the wrapper execs CMD, so a
# background `$EAT CMD &` has CMD's pid)
EAT=
if [ "$CGROUP" -gt 0 ]; then
    mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup || bye "mount cgroup2"
    echo +memory >/sys/fs/cgroup/cgroup.subtree_control || bye "enable the memory controller"
    mkdir /sys/fs/cgroup/work && echo "${CGROUP}M" >/sys/fs/cgroup/work/memory.max || bye "create the workload cgroup"
    say "eaters in a memory cgroup of $CGROUP MiB"
    printf '#!/bin/sh\necho $$ >/sys/fs/cgroup/work/cgroup.procs && exec "$@"\n' >/bin/in-work && chmod +x /bin/in-work
    EAT=in-work
fi
i=0
while [ $i -lt "$ITERS" ]; do
    i=$((i + 1))
    $EAT nbd-mmap anon --size "$((mem + EXTRA))M" --seed "$i" --passes 1 >/tmp/eat.out 2>&1
    rc=$?
    grep VERDICT /tmp/eat.out
    say "eater $i exit $rc"
done
# swapoff with pages on the device whose owner is stopped
# (half the RAM, or of the cgroup: swapoff brings the pages back into their owner's cgroup)
hold=$((mem / 2))
[ "$CGROUP" -gt 0 ] && hold=$((CGROUP / 2))
$EAT nbd-mmap anon --size "${hold}M" --seed 77 --passes 0 --wait-file /tmp/go >/tmp/held.out 2>&1 &
held=$!
while ! grep -q READY /tmp/held.out; do kill -0 $held 2>/dev/null || bye "the held process died: $(cat /tmp/held.out)"; sleep 0.2; done
kill -STOP $held
$EAT nbd-mmap anon --size "$((mem + EXTRA))M" --seed 78 --passes 0 >/tmp/push.out 2>&1
grep VERDICT /tmp/push.out
say "held-kb=$(used)"
t0=$(date +%s)
swapoff /dev/nbd0
say "swapoff exit $? after $(($(date +%s) - t0)) s"
kill -CONT $held
touch /tmp/go
wait $held
grep VERDICT /tmp/held.out
say "held exit $?"
nbd-client -d /dev/nbd0 >/dev/null 2>&1
if [ "$TOPOLOGY" = local ]; then
    kill $daemon
    wait $daemon
    say "daemon exit $?"
fi
echo "GUEST-DONE"
poweroff -f
INIT
if [ "$TOPOLOGY" = local ]; then
    guest_initramfs "$T/initrd.gz" "$T/init" "libs:$NBD_UMEMD"
else
    guest_initramfs "$T/initrd.gz" "$T/init"
fi

ok=0 hangs=0 panics=0 data=0 other=0 swapoffs=""
r=0
while [ $r -lt "$RUNS" ]; do
    r=$((r + 1))
    B0=$(date +%s%N)
    rc=0
    guest_boot "$T/initrd.gz" "$T/console-$r.log" "$GUEST_MEM" \
        "hung_task_panic=1 softlockup_panic=1 umemd.port=$PORT umemd.iters=$ITERS umemd.extra=$EXTRA umemd.topology=$TOPOLOGY umemd.cgroup=$CGROUP" \
        "$LIMIT" || rc=$?
    guest_console_text "$T/console-$r.log" "$T/console-$r.txt"
    c="$T/console-$r.txt"
    verdicts=$(grep -ac '^VERDICT anon ok' "$c" || true)
    bad=$(grep -aE '^VERDICT anon' "$c" | grep -vc 'anon ok' || true)
    so=$(sed -n 's/^GUEST swapoff exit 0 after \([0-9]*\) s$/\1/p' "$c")
    held=$(sed -n 's/^GUEST held-kb=\([0-9]*\)$/\1/p' "$c")
    what=ok
    if [ "$rc" -eq 124 ] || grep -aqE 'blocked for more than|soft lockup' "$c"; then
        what=hang; hangs=$((hangs + 1))
    elif grep -aq 'Kernel panic' "$c"; then
        what=panic; panics=$((panics + 1))
    elif [ "$bad" -gt 0 ]; then
        what="data error"; data=$((data + 1))
    elif [ "$rc" -ne 0 ] || ! grep -aqx 'GUEST-DONE' "$c" || grep -aq '^GUEST FAILED' "$c" \
        || [ "$verdicts" -ne $((ITERS + 2)) ] || [ -z "$so" ] || [ "${held:-0}" -le 0 ] \
        || { [ "$TOPOLOGY" = local ] && ! grep -aqx 'GUEST daemon exit 0' "$c"; }; then
        what="incomplete"; other=$((other + 1))
    else
        ok=$((ok + 1)); swapoffs="$swapoffs $so"
    fi
    say "run $r/$RUNS: $what after $(secs_since "$B0") s (qemu $rc, $verdicts verdicts ok, held ${held:-?} kB, swapoff ${so:-?} s)"
    if [ "$what" != ok ]; then
        grep -aE '^(GUEST|VERDICT)|blocked for more than|soft lockup|Kernel panic|Out of memory|Killed process' "$c" | tail -n 25 | sed 's/^/  | /' >&2
    fi
    [ "$TOPOLOGY" = local ] || assert_alive swap
done
say "HANG-HARNESS topology=$TOPOLOGY cgroup-mib=$CGROUP runs=$RUNS ok=$ok hangs=$hangs panics=$panics data-errors=$data incomplete=$other swapoff-s=[${swapoffs# }]"
[ "$ok" -eq "$RUNS" ] || fail "$((RUNS - ok)) of $RUNS runs failed: $hangs hangs, $panics panics, $data data errors, $other incomplete"
pass
