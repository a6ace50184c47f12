#!/bin/bash
# Live migration in swap mode (scripts/migrate-vm --mode swap): the destination's RAM is a tmpfs file
# staged as "swapped out" to an nbd-umemd swap device whose slots map to source pages; the guest's
# first touches are swap-ins the daemon serves from the source. A TCG VM whose workload verifies and
# rewrites 96 MiB of its 192 MiB RAM moves over a 200 Mbit/s link. It must complete with zero
# verification errors; once every slot is local the source, then (swapoff, detach, daemon stop,
# store removed) the destination's daemon, device, store and swap entry must be gone - checked here,
# from outside, while the guest keeps running - and the guest must run on for at least 10 s after
# that, making progress. It runs with --tls: the NBD link is TLS with a key made for the run, and a
# client without it is refused.
. "$(dirname "$0")/lib.sh"

r() { json_get "$T/mig.json" "j[\"$1\"]"; }
D=$T/mig

# migrate-vm runs in the background so that the destination can be inspected while the guest runs.
# If this script fails meanwhile, migrate-vm gets SIGTERM and is waited for (its own cleanup runs)
# before the test's cleanup removes $T.
mig_pid=""
stop_migration() {
    [ -n "$mig_pid" ] || return 0
    kill -TERM "$mig_pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 1200; i++)); do pid_running "$mig_pid" || break; sleep 0.1; done
    wait "$mig_pid" 2>/dev/null || true
    mig_pid=""
}
PRE_STOP_CMDS+=("undo_swap_run mig" "stop_migration")
"$ROOT/scripts/migrate-vm" --dir "$D" --keep-dir --mode swap --mem 192 --link-rate 200mbit --keep 12 --tls >"$T/mig.out" 2>&1 &
mig_pid=$!

# Wait for the moment migrate-vm says the VM depends on nothing, then look for ourselves.
for ((i = 0; i < 3000; i++)); do
    grep -q 'independent of the destination daemon after' "$T/mig.out" 2>/dev/null && break
    pid_running "$mig_pid" || break
    sleep 0.1
done
grep -q 'independent of the destination daemon after' "$T/mig.out" \
    || { stop_migration; tail -n 20 "$T/mig.out" >&2; fail "migrate-vm never reached independence"; }
dev=$(grep -o 'swap on /dev/[a-z0-9]*' "$T/mig.out" | head -n 1 | cut -d' ' -f3)
[ -n "$dev" ] || fail "no 'swap on DEVICE' line: was swap ever turned on?"
pgrep -f "$D/dst.qmp" >/dev/null || fail "the destination QEMU is not running after independence"
left=()
awk 'NR > 1 { print $1 }' /proc/swaps | grep -qxF "$dev" && left+=("swap entry $dev")
pgrep -f "$D/dst.sock" >/dev/null && left+=("daemon or nbdfuse: $(pgrep -af "$D/dst.sock" | tr '\n' ' ')")
[ -z "$(ls -A "$D/state/attached" 2>/dev/null)" ] || left+=("attached device state: $(ls "$D/state/attached")")
losetup -a | grep -qF "$D/state" && left+=("loop device: $(losetup -a | grep -F "$D/state")")
[ ! -e "$D/store" ] || left+=("store $D/store")
[ ${#left[@]} -eq 0 ] || fail "left on the destination after independence: ${left[*]}"
say "at independence: no swap entry ($dev), no daemon, device or store; the destination QEMU runs"
pgrep -f "$D/dst.qmp" >/dev/null || fail "the destination QEMU died after independence"

rc=0
wait "$mig_pid" || rc=$?
mig_pid=""
grep '^\[migrate-vm\]' "$T/mig.out" | sed "s/^/  mig | /"
[ "$rc" -eq 0 ] || { tail -n 20 "$T/mig.out" >&2; fail "the swap-mode migration failed: scripts/migrate-vm exited $rc"; }
sed -n 's/^REPORT //p' "$T/mig.out" >"$T/mig.json"
[ -s "$T/mig.json" ] || fail "no REPORT line"
assert_eq "status" '"completed"' "$(r status)"
assert_eq "mode" '"swap"' "$(r mode)"
assert_tls_migration "$T/mig.json" "$D"
assert_eq "data errors on the destination" 0 "$(r data_errors)"
[ "$(r destination_resume_ms)" != null ] || fail "the destination never resumed"
[ "$(r staging_ms)" != null ] || fail "no staging time"
assert_eq "staged + zero pages" $((192 * 256)) "$(json_get "$T/mig.json" 'j["staged_pages"] + j["staged_zero_pages"]')"
[ "$(r late_pages)" != null ] || fail "the gate-open reply had no late_pages"
[ "$(r swapoff_ms)" != null ] || fail "no swapoff time"
[ "$(r independent_ms)" -ge "$(r all_ram_local_ms)" ] || fail "independent before all RAM was local?"
assert_eq "leftovers at independence (migrate-vm's own check)" 0 "$(r leftovers_after_independent)"
assert_eq "NBD writes to the daemon from completion until it stopped" 0 "$(r writes_after_complete)"
assert_eq "daemon exit status after SIGTERM" 0 "$(r daemon_exit_status)"
awk -v s="$(r seconds_run_after_independent)" 'BEGIN { exit !(s >= 10) }' \
    || fail "the guest ran only $(r seconds_run_after_independent) s after independence"
[ "$(r ops_after_independent)" -gt 0 ] || fail "no workload progress after independence"
# and nothing of the run is left at all now
! awk 'NR > 1 { print $1 }' /proc/swaps | grep -qxF "$dev" || fail "$dev is swap again/still"
[ ! -e "$(json_get "$T/mig.json" 'j["destination_ram_file"]' | tr -d '"')" ] || fail "the destination RAM file is still there"
say "swap: downtime $(r downtime_ms) ms, progress on the destination $(r first_progress_on_destination_ms) ms, all local" \
    "$(r all_ram_local_ms) ms, independent $(r independent_ms) ms (swapoff $(r swapoff_ms) ms), staging $(r staging_ms) ms," \
    "late pages $(r late_pages), $(r link_bytes) link bytes, ran $(r seconds_run_after_independent) s after independence"
pass
