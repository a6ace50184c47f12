#!/usr/bin/env bash
# Swap on the host kernel through nbdfuse + a loop device (this kernel has no nbd module):
# scripts/swap-on puts swap on a `serve --memory --swap` export, a process in a memory cgroup
# limited to 64 MiB writes and verifies 256 MiB, so at least 192 MiB must go through the device.
# Checks: the daemon's swap mode (locked memory; IO_FLUSHER and oom_score_adj where the machine
# grants CAP_SYS_RESOURCE, a clear warning where it does not), the workload's verdict, the peak
# use of the device in /proc/swaps, and the bytes the daemon really received; and the warning of a
# --swap daemon that itself runs inside a limited memory cgroup.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/wirelib.sh"

serve_unix swapd --memory 512M --swap --control "$T/swapd.ctl"
pid=${SRV_PID[swapd]}
grep -q 'swap mode:' "$T/swapd.log" || fail "no 'swap mode:' line in the daemon log"
locked=$(locked_kib "$pid")
[ "$locked" -ge $((512 * 1024)) ] || fail "serve --memory 512M --swap locked only $locked KiB"
tmo 20 "$NBD_UMEMD" status --control "$T/swapd.ctl" >"$T/status.json"
assert_eq "status swap_mode" true "$(json_get "$T/status.json" 'j["swap_mode"]')"
if w_has_cap_sys_resource; then
    assert_eq "status io_flusher" true "$(json_get "$T/status.json" 'j["io_flusher"]')"
    assert_eq "threads without IO_FLUSHER" 0 "$(json_get "$T/status.json" 'j["threads_without_io_flusher"]')"
    assert_eq "oom_score_adj" -1000 "$(cat "/proc/$pid/oom_score_adj")"
    grep -q 'PR_GET_IO_FLUSHER = 1 on' "$T/swapd.log" || fail "no PR_GET_IO_FLUSHER report in the log"
else
    say "this machine does not grant CAP_SYS_RESOURCE: expecting the daemon's warnings instead"
    grep -q 'warning.*PR_SET_IO_FLUSHER.*CAP_SYS_RESOURCE' "$T/swapd.log" || fail "no IO_FLUSHER warning in the log"
    grep -q 'warning.*oom_score_adj' "$T/swapd.log" || fail "no oom_score_adj warning in the log"
    assert_eq "status io_flusher" false "$(json_get "$T/status.json" 'j["io_flusher"]')"
fi

dev=$("$ROOT/scripts/swap-on" --unix "$(sock swapd)" --priority 32000)
say "swap on $dev"
grep -q "^$dev " /proc/swaps || fail "$dev is not in /proc/swaps after swap-on"
# running swap-on again is a no-op that prints the same device
assert_eq "second swap-on" "$dev" "$("$ROOT/scripts/swap-on" --unix "$(sock swapd)" --priority 32000)"

wchar0=$(awk '/^wchar:/ { print $2 }' "/proc/$pid/io")
w_cgroup cg swap $((64 << 20))
w_in_cgroup "$cg" "$NBD_MMAP" anon --size 256M --passes 2 >"$T/work.out" 2>&1 &
work=$!
peak=0
while kill -0 "$work" 2>/dev/null; do
    used=$(swap_used_kib "$dev")
    [ "$used" -gt "$peak" ] && peak=$used
    sleep 0.1
done
rc=0
wait "$work" || rc=$?
cat "$T/work.out"
[ "$rc" -eq 0 ] || fail "the workload exited $rc"
grep -q '^VERDICT anon ok pages=65536 passes=2' "$T/work.out" || fail "no 'VERDICT anon ok' from the workload"
maxuse=$(cat "$cg/memory.max_usage_in_bytes")
wchar=$(( $(awk '/^wchar:/ { print $2 }' "/proc/$pid/io") - wchar0 ))
say "peak swap use on $dev: $peak KiB; cgroup peak $((maxuse >> 20)) MiB; daemon received $((wchar >> 20)) MiB of writes"
[ "$maxuse" -le $((64 << 20)) ] || fail "the cgroup used $maxuse bytes, more than its 64 MiB limit"
[ "$peak" -ge $((150 * 1024)) ] || fail "peak swap use on $dev was $peak KiB; 256 MiB in 64 MiB must swap at least 192 MiB"
[ "$wchar" -ge $((150 << 20)) ] || fail "the daemon received only $wchar bytes of writes"
assert_alive swapd

"$ROOT/scripts/swap-off" "$dev"
grep -q "^$dev " /proc/swaps && fail "$dev still in /proc/swaps after swap-off"

# a --swap daemon started inside a limited memory cgroup warns about it; one outside did not
grep -q 'inside memory cgroup' "$T/swapd.log" && fail "the daemon outside any limited cgroup warned about one"
w_cgroup cg2 daemon $((512 << 20))
w_in_cgroup "$cg2" "$NBD_UMEMD" serve --memory 16M --swap --unix "$T/caged.sock" --pidfile "$T/caged.pid" 2>"$T/caged.log" &
caged=$!
wait_for_file "$T/caged.pid" 20 || fail "the daemon in a cgroup did not start: $(cat "$T/caged.log")"
kill "$caged"; wait "$caged" || true
grep -q "warning.*runs inside memory cgroup /nbd-umemd-it-daemon-$$ limited to 512 MiB" "$T/caged.log" \
    || fail "no cgroup warning from a --swap daemon inside a 512 MiB cgroup: $(cat "$T/caged.log")"
stop_server_ok swapd
pass
