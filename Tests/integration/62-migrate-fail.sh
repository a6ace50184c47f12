#!/bin/bash
# A failure before the switch-over (the destination QEMU cannot start: its RAM path does not exist)
# leaves the source VM running and removes everything set up on the destination: no daemon, no
# attached device, no store, no QEMU.
. "$(dirname "$0")/lib.sh"

migrate_vm mig --mode file --mem 192 --fail-dest
[ "$MIG_RC" -ne 0 ] || fail "migrate-vm --mode file --fail-dest exited 0"
grep -q 'error before the switch-over: the destination QEMU exited' "$T/mig.out" || fail "no clear error about the destination QEMU"
[ -s "$T/mig/report.json" ] || fail "no report.json"
r() { json_get "$T/mig/report.json" "$1"; }
assert_eq "status" '"failed-before-switchover"' "$(r 'j["status"]')"
assert_eq "source VM status at the failure" '"running"' "$(r 'j["source_vm"]["status"]')"
assert_eq "destination leftovers at the failure" 0 "$(r 'j["destination_leftovers"]')"
[ ! -e "$T/mig/store" ] || fail "the destination store is still there"
[ -z "$(ls -A "$T/mig/state/attached" 2>/dev/null)" ] || fail "a device is still attached"
grep -aq '^WORK t=' "$T/mig/src-console.log" || fail "the source VM never ran"
pass
