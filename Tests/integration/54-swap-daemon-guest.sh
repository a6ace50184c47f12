#!/bin/bash
# nbd-umemd serve --swap in the reclaim path of a real kernel: inside a QEMU TCG guest (this host
# grants no CAP_SYS_RESOURCE and has no nbd.ko), the daemon serves a --memory export on a Unix
# socket, the guest kernel's own nbd client swaps to it (nbd-client -unix ... -swap), and a process
# writes and verifies 160 MiB from a 64 MiB memory cgroup. The production layout.
# Checks, from inside the guest: PR_GET_IO_FLUSHER = 1 reported by the daemon for its event-loop and
# I/O threads, the IO_FLUSHER task flag (PF_MEMALLOC_NOIO) on every thread in /proc/PID/task/*/stat,
# oom_score_adj -1000, VmLck larger than the export, status JSON agreeing, swap really used, the data
# verified, and a clean exit after swapoff. Swap is set up and taken down with the wiring scripts
# (scripts/swap-on, swap-off: the real nbd-client path of scripts/attach), and swap-on must refuse a
# daemon started without --swap.
# Knob for checking that the test can fail: KGUEST_SWAP_FLAG= (empty: the daemon runs without --swap).
. "$(dirname "$0")/lib.sh"
# shellcheck source=../../scripts/lib/guest.sh
. "$ROOT/scripts/lib/guest.sh"

T0=$(date +%s%N)
SWAP_FLAG=${KGUEST_SWAP_FLAG---swap}
GUEST_MEM=512     # MiB
EXPORT_MB=128
guest_kit
say "guest kernel $GUEST_KVER"

cat >"$T/init" <<'INIT'
#!/bin/sh
# /init of the 54-swap-daemon-guest VM (busybox). Lines the host checks start with "GUEST" or "VERDICT".
. /lib/guest-init.sh   # PATH, /dev, /proc, /sys, say
bye() { say "FAILED: $*"; for f in /run/d.log /tmp/refuse.out; do [ -f $f ] && sed "s|^|GUEST $f: |" $f; done; poweroff -f; sleep 60; }
for w in $(cat /proc/cmdline); do
    case "$w" in
    umemd.flag=*) FLAG=${w#*=} ;;
    umemd.export=*) EXPORT=${w#*=} ;;
    esac
done
insmod /lib/modules/nbd.ko max_part=0 || bye "insmod nbd"
ip link set lo up

nbd-umemd serve --memory "${EXPORT}M" $FLAG --threads 4 --unix /run/s.sock --control /run/s.ctl \
    --pidfile /run/s.pid 2>/run/d.log &
daemon=$!
wait_daemon $daemon /run/s.pid
sed 's/^/GUEST daemon: /' /run/d.log
say "status $(nbd-umemd status --control /run/s.ctl | tr -d ' \n')"
n=0; bad=0
for t in /proc/$daemon/task/*; do
    rest=$(sed 's/.*) //' $t/stat)
    set -- $rest
    n=$((n + 1))
    # field 9 (flags) is the 7th after the command name; IO_FLUSHER sets PF_MEMALLOC_NOIO (0x80000)
    # and PF_LOCAL_THROTTLE (0x100000)
    [ $(( $7 & 0x180000 )) -eq $((0x180000)) ] || bad=$((bad + 1))
done
say "threads=$n without-io-flusher=$bad"
say "oom_score_adj=$(cat /proc/$daemon/oom_score_adj)"
say "vmlck-kb=$(awk '/^VmLck:/ {print $2}' /proc/$daemon/status)"

# swap-on must refuse a daemon that was not started with --swap (its memory is not locked)
nbd-umemd serve --memory 16M --unix /run/plain.sock --pidfile /run/plain.pid 2>/dev/null &
plain=$!
while [ ! -s /run/plain.pid ]; do sleep 0.1; done
if /scripts/swap-on --unix /run/plain.sock >/tmp/refuse.out 2>&1; then bye "swap-on accepted a daemon without --swap"; fi
say "swap-on refused: $(grep -o 'refusing: .*' /tmp/refuse.out | head -n 1)"
[ -z "$(ls /run/nbd-umemd/attached 2>/dev/null)" ] || bye "the refused swap-on left a device attached"
kill $plain

# the wiring scripts, on the kernel's own nbd driver: attach (nbd-client -b 4096 -persist -swap),
# mkswap, swapon
dev=$(/scripts/swap-on --unix /run/s.sock --priority 5) || bye "scripts/swap-on"
. /run/nbd-umemd/attached/$(basename "$dev")
say "swap-on: $dev method=$METHOD block-size=$(cat /sys/block/$(basename "$dev")/queue/logical_block_size) $(awk -v d="$dev" '$1 == d {print "priority=" $5}' /proc/swaps)"
# The workload runs in a memory cgroup limited to 64 MiB, as it should in production: its reclaim
# swaps its own pages out while the daemon (outside the cgroup) still finds free memory for the
# socket buffers of its replies. (Without a cgroup, a workload that exhausts the whole machine can
# deadlock any user-space swap server: the kernel waits for the reply, the reply needs a socket
# buffer, the buffer needs free memory. Seen here in 6 of 24 runs.)
mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup || bye "mount cgroup2"
echo +memory >/sys/fs/cgroup/cgroup.subtree_control || bye "enable the memory controller"
mkdir /sys/fs/cgroup/work && echo 64M >/sys/fs/cgroup/work/memory.max || bye "create the workload cgroup"
say "MemAvailable $(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo) MiB with the daemon running; the workload writes 160 MiB in a 64 MiB cgroup"
sh -c 'echo $$ >/sys/fs/cgroup/work/cgroup.procs && exec nbd-mmap anon --size 160M --seed 5 --passes 0 --wait-file /tmp/verify' >/tmp/anon.out 2>&1 &
w=$!
while ! grep -q READY /tmp/anon.out; do kill -0 $w 2>/dev/null || break; sleep 0.2; done
peak=$(awk -v d="$dev" '$1 == d {print $4}' /proc/swaps)
touch /tmp/verify
wait $w
grep -v READY /tmp/anon.out
say "swap-used-kb=${peak:-0} cgroup-peak-kb=$(( $(cat /sys/fs/cgroup/work/memory.peak 2>/dev/null || echo 0) / 1024 ))"
/scripts/swap-off "$dev" || bye "scripts/swap-off $dev"
grep -q "^$dev " /proc/swaps && bye "$dev still active swap after swap-off"
[ -e /sys/block/$(basename "$dev")/pid ] && bye "$dev still connected after swap-off"
say "swap-off: $dev detached; detach --all says: $(/scripts/detach --all 2>&1)"
kill $daemon
wait $daemon
say "daemon-exit=$?"
echo "GUEST-DONE"
poweroff -f
INIT

guest_initramfs "$T/initrd.gz" "$T/init" "libs:$NBD_UMEMD" "libs:$(command -v bash)" "libs:$(command -v nbdinfo)" "libs:$(command -v swapon)" \
    "tree:$ROOT/scripts:/scripts"
say "initramfs ready ($(( $(stat -c %s "$T/initrd.gz") >> 20 )) MiB)"
rc=0
guest_boot "$T/initrd.gz" "$T/console.log" "$GUEST_MEM" "umemd.flag=$SWAP_FLAG umemd.export=$EXPORT_MB" 240 || rc=$?
guest_console_text "$T/console.log" "$T/console.txt"
grep -aE '^(GUEST|VERDICT|anon)' "$T/console.txt" | sed 's/^/  | /'
[ "$rc" -eq 0 ] || { tail -n 30 "$T/console.txt" >&2; fail "qemu exit status $rc (124: killed after the time limit)"; }
! grep -aq '^GUEST FAILED' "$T/console.txt" || fail "the guest's init failed: $(grep -a '^GUEST FAILED' "$T/console.txt")"
grep -aqx 'GUEST-DONE' "$T/console.txt" || fail "the guest did not get to GUEST-DONE"

val() { sed -n "s/^GUEST $1=\\([-0-9]*\\).*/\\1/p" "$T/console.txt" | head -n 1; }
grep -aq 'GUEST daemon: .*swap mode: PR_GET_IO_FLUSHER = 1 on 1 event-loop and 4 I/O threads, IO_FLUSHER on all' "$T/console.txt" \
    || fail "the daemon did not report PR_GET_IO_FLUSHER = 1 on its serving threads"
! grep -aq 'GUEST daemon: .*warning' "$T/console.txt" || fail "the daemon warned: $(grep -a 'GUEST daemon: .*warning' "$T/console.txt")"
threads=$(sed -n 's/^GUEST threads=\([0-9]*\) .*/\1/p' "$T/console.txt")
without=$(sed -n 's/^GUEST threads=[0-9]* without-io-flusher=\([0-9]*\)/\1/p' "$T/console.txt")
[ "${threads:-0}" -ge 6 ] || fail "only ${threads:-0} daemon threads seen"
assert_eq "daemon threads without the IO_FLUSHER flags" 0 "$without"
assert_eq "daemon oom_score_adj" -1000 "$(val oom_score_adj)"
[ "$(val vmlck-kb)" -ge $((EXPORT_MB * 1024)) ] || fail "VmLck $(val vmlck-kb) kB is smaller than the export"
# the status line is the JSON object with spaces and newlines removed (its keys come in any order)
grep -a '^GUEST status ' "$T/console.txt" | head -n 1 | tr -d '\r' >"$T/status-line.txt"
"$PY" -c 'import json,sys; j=json.loads(open(sys.argv[1]).read().split(" ", 2)[2])
sys.exit(0 if j.get("swap_mode") is True and j.get("io_flusher") is True and j.get("threads_without_io_flusher") == 0 else 1)' \
    "$T/status-line.txt" || fail "status JSON does not report swap mode with IO_FLUSHER on every thread: $(cat "$T/status-line.txt")"
grep -aq '^VERDICT anon ok' "$T/console.txt" || fail "no 'VERDICT anon ok'"
[ "$(val swap-used-kb)" -gt $((80 * 1024)) ] || fail "the guest swapped only $(val swap-used-kb) kB to the daemon (160 MiB in a 64 MiB cgroup)"
assert_eq "daemon exit status after SIGTERM" 0 "$(val daemon-exit)"
grep -aq '^GUEST swap-on refused: refusing: nbd-umemd (pid [0-9]*) serving .* was not started with --swap' "$T/console.txt" \
    || fail "scripts/swap-on did not refuse the daemon without --swap"
grep -aq '^GUEST swap-on: /dev/nbd0 method=nbd block-size=4096 priority=5' "$T/console.txt" \
    || fail "scripts/swap-on did not attach /dev/nbd0 with nbd-client -b 4096 and swap priority 5"
grep -aq '^GUEST swap-off: /dev/nbd0 detached; detach --all says: .*nothing attached' "$T/console.txt" \
    || fail "scripts/swap-off did not detach cleanly"
d=$(($(date +%s%N) - T0))
say "threads $threads all with IO_FLUSHER; swap used $(val swap-used-kb) kB; elapsed $((d / 1000000000)) s"
pass
