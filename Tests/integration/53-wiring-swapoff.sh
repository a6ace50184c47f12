#!/usr/bin/env bash
# scripts/swap-off while the device is in use: a process in a 64 MiB memory cgroup holds 256 MiB of
# verified data, most of it swapped out to the nbd-umemd device. swap-off must bring every page
# back (the process verifies all of it afterwards), take the device out of /proc/swaps, and
# detach cleanly (loop device gone, nbdfuse unmounted and exited, no state left). Then detach and
# swap-off with nothing attached are clear no-ops. Also: swap-on refuses an export attached as RAM and
# qemu-ram refuses one in use as swap.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/wirelib.sh"

serve_unix swapd --memory 512M --swap
# an export attached for something else (RAM) is not turned into swap, and stays attached
ramdev=$("$ROOT/scripts/attach" --unix "$(sock swapd)")
out=$("$ROOT/scripts/swap-on" --unix "$(sock swapd)" 2>&1) && fail "swap-on took over $ramdev, attached as RAM"
grep -q "already attached as $ramdev, not as swap" <<<"$out" || fail "swap-on refused with: $out"
[ -f "$NBD_UMEMD_STATE_DIR/attached/$(basename "$ramdev")" ] || fail "the refused swap-on detached $ramdev"
"$ROOT/scripts/detach" "$ramdev"

dev=$("$ROOT/scripts/swap-on" --unix "$(sock swapd)" --priority 32000)
# and a swap device is not handed to QEMU as RAM
out=$("$ROOT/scripts/qemu-ram" --unix "$(sock swapd)" --size 32M 2>&1) && fail "qemu-ram used the swap device $dev"
grep -q "in use as swap" <<<"$out" || fail "qemu-ram refused with: $out"
. "$NBD_UMEMD_STATE_DIR/attached/$(basename "$dev")"
fuse_pid=$FUSE_PID fuse_dir=$FUSE_DIR
say "swap on $dev (nbdfuse pid $fuse_pid)"

w_cgroup cg hold $((64 << 20))
w_in_cgroup "$cg" "$NBD_MMAP" anon --size 256M --wait-file "$T/go" >"$T/work.out" 2>&1 &
work=$!
for ((i = 0; i < 600; i++)); do
    grep -q '^READY' "$T/work.out" && break
    kill -0 "$work" 2>/dev/null || { cat "$T/work.out"; fail "the workload died before READY"; }
    sleep 0.1
done
grep -q '^READY' "$T/work.out" || fail "the workload was not READY within 60 s"
used=$(swap_used_kib "$dev")
say "before swap-off: $used KiB in use on $dev"
[ "$used" -ge $((150 * 1024)) ] || fail "only $used KiB swapped out to $dev; the test needs the device in use"

# swapoff charges the pages it brings back to the workload's cgroup: give it room
echo $((1 << 30)) >"$cg/memory.limit_in_bytes"
"$ROOT/scripts/swap-off" "$dev" 2>&1 | tee "$T/swapoff.out"
grep -q "^$dev " /proc/swaps && fail "$dev still in /proc/swaps after swap-off"
grep -q "brought back into RAM" "$T/swapoff.out" || fail "swap-off did not report the pages it brought back"
losetup -nO BACK-FILE "$dev" 2>/dev/null | grep -q . && fail "$dev is still a configured loop device"
mountpoint -q "$fuse_dir" && fail "nbdfuse is still mounted on $fuse_dir"
for ((i = 0; i < 100; i++)); do kill -0 "$fuse_pid" 2>/dev/null || break; sleep 0.05; done
kill -0 "$fuse_pid" 2>/dev/null && fail "nbdfuse (pid $fuse_pid) still running after swap-off"
[ -z "$(ls -A "$NBD_UMEMD_STATE_DIR/attached")" ] || fail "state left behind: $(ls "$NBD_UMEMD_STATE_DIR/attached")"

# the daemon is gone from the path; the process must still have every page
touch "$T/go"
rc=0
wait "$work" || rc=$?
cat "$T/work.out"
[ "$rc" -eq 0 ] || fail "the workload exited $rc after swap-off"
grep -q '^VERDICT anon ok pages=65536 passes=2' "$T/work.out" || fail "the workload did not verify after swap-off"
stop_server_ok swapd

# nothing attached: clear no-ops with exit status 0
for cmd in "detach --all" "detach $dev" "swap-off --all" "swap-off $dev" "detach --unix $(sock swapd)"; do
    out=$("$ROOT/scripts/"$cmd 2>&1) || fail "scripts/$cmd with nothing attached failed: $out"
    grep -q "nothing attached" <<<"$out" || fail "scripts/$cmd with nothing attached said: $out"
done
say "no-op messages: $("$ROOT/scripts/detach" --all 2>&1)"
pass
