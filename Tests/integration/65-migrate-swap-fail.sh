#!/bin/bash
# Failures before the switch-over in swap mode, after the swap device was turned on and the RAM staged
# onto it: (1) the destination QEMU cannot start (its RAM path does not exist); (2) the gate open at
# the source's STOP fails, when the source has already sent everything (the destination, started
# with -S, never ran): the source is continued. Either way the source VM keeps running and nothing is
# left on the destination: no swap entry, no device, no daemon, no store, no staged RAM file, no QEMU.
. "$(dirname "$0")/lib.sh"

PRE_STOP_CMDS+=("undo_swap_run mig" "undo_swap_run gate")

# nothing of run NAME (its device DEV) left on the destination
assert_nothing_left() {
    local D=$T/$1 dev=$2 ram
    ! awk 'NR > 1 { print $1 }' /proc/swaps | grep -qxF "$dev" || fail "$1: $dev is still swap"
    [ -z "$(ls -A "$D/state/attached" 2>/dev/null)" ] || fail "$1: a device is still attached"
    ! losetup -a | grep -qF "$D/state" || fail "$1: a loop device of the run is still there: $(losetup -a | grep -F "$D/state")"
    ! pgrep -f "$D/dst.sock" >/dev/null || fail "$1: the destination daemon (or nbdfuse) is still running"
    ! pgrep -f "$D/dst.qmp" >/dev/null || fail "$1: the destination QEMU is still running"
    [ ! -e "$D/store" ] || fail "$1: the destination store is still there"
    ram=$(json_get "$D/report.json" 'j["destination_ram_file"]' | tr -d '"')
    [ -n "$ram" ] && [ ! -e "$ram" ] || fail "$1: the staged RAM file $ram is still there"
}

migrate_vm mig --mode swap --mem 192 --fail-dest
assert_failed_before_switch mig 'the destination QEMU exited'
# the failure must come after the swap device was on and the RAM staged, or the undo path was not tested
dev=$(grep -o 'swap on /dev/[a-z0-9]*' "$T/mig.out" | head -n 1 | cut -d' ' -f3)
[ -n "$dev" ] || fail "swap was never turned on before the failure"
grep -q 'staged: {' "$T/mig.out" || fail "the RAM was never staged before the failure"
assert_nothing_left mig "$dev"
say "failed before the switch-over with swap on $dev and the RAM staged: source VM running, nothing left"

D=$T/gate
migrate_vm gate --mode swap --mem 192 --fail-gate
assert_failed_before_switch gate 'migration failed: .*gate open failed: gate open refused'
dev=$(grep -o 'swap on /dev/[a-z0-9]*' "$T/gate.out" | head -n 1 | cut -d' ' -f3)
[ -n "$dev" ] && grep -q 'staged: {' "$T/gate.out" || fail "gate: swap was not on with the RAM staged before the failure"
r() { json_get "$D/report.json" "$1"; }
# the source had sent everything (its migration completed) and was continued
assert_eq "gate: the source's migration at the failure" '"completed"' "$(r 'j["source_migration"]')"
assert_eq "gate: the source guest progresses within 5 s of the failure" true \
    "$(r 'j["source_progress_after_ms"] is not None and j["source_progress_after_ms"] < 5000')"
! grep -aq '^WORK t=' "$D/dst-console.log" || fail "gate: the destination guest ran"
assert_nothing_left gate "$dev"
say "gate open failed after the source had sent everything: source continued ($(r 'j["source_progress_after_ms"]') ms to its next progress), the destination never ran, nothing left"
pass
