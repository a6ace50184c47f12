#!/bin/bash
# A failure before the switch-over in swap mode (the destination QEMU cannot start: its RAM path does
# not exist), after the swap device was turned on and the RAM staged onto it: the source VM keeps
# running and nothing is left on the destination: no swap entry, no device, no daemon, no store, no
# staged RAM file, no QEMU.
. "$(dirname "$0")/lib.sh"

PRE_STOP_CMDS+=("undo_swap_run mig")
D=$T/mig
migrate_vm mig --mode swap --mem 192 --fail-dest
[ "$MIG_RC" -ne 0 ] || fail "migrate-vm --mode swap --fail-dest exited 0"
grep -q 'error before the switch-over: the destination QEMU exited' "$T/mig.out" || fail "no clear error about the destination QEMU"
# the failure must come after the swap device was on and the RAM staged, or the undo path was not tested
dev=$(grep -o 'swap on /dev/[a-z0-9]*' "$T/mig.out" | head -n 1 | cut -d' ' -f3)
[ -n "$dev" ] || fail "swap was never turned on before the failure"
grep -q 'staged: {' "$T/mig.out" || fail "the RAM was never staged before the failure"
[ -s "$D/report.json" ] || fail "no report.json"
r() { json_get "$D/report.json" "$1"; }
assert_eq "status" '"failed-before-switchover"' "$(r 'j["status"]')"
assert_eq "source VM status at the failure" '"running"' "$(r 'j["source_vm"]["status"]')"
assert_eq "destination leftovers at the failure" 0 "$(r 'j["destination_leftovers"]')"
grep -aq '^WORK t=' "$D/src-console.log" || fail "the source VM never ran"
! awk 'NR > 1 { print $1 }' /proc/swaps | grep -qxF "$dev" || fail "$dev is still swap"
[ -z "$(ls -A "$D/state/attached" 2>/dev/null)" ] || fail "a device is still attached"
! losetup -a | grep -qF "$D/state" || fail "a loop device of the run is still there: $(losetup -a | grep -F "$D/state")"
! pgrep -f "$D/dst.sock" >/dev/null || fail "the destination daemon (or nbdfuse) is still running"
! pgrep -f "$D/dst.qmp" >/dev/null || fail "the destination QEMU is still running"
[ ! -e "$D/store" ] || fail "the destination store is still there"
ram=$(r 'j["destination_ram_file"]' | tr -d '"')
[ -n "$ram" ] && [ ! -e "$ram" ] || fail "the staged RAM file $ram is still there"
say "failed before the switch-over with swap on $dev and the RAM staged: source VM running, nothing left"
pass
