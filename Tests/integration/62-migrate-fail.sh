#!/bin/bash
# A failure before the switch-over (the destination QEMU cannot start: its RAM path does not exist)
# leaves the source VM running and removes everything set up on the destination: no daemon, no
# attached device, no store, no QEMU.
. "$(dirname "$0")/lib.sh"

migrate_vm mig --mode file --mem 192 --fail-dest
assert_failed_before_switch mig 'the destination QEMU exited'
[ ! -e "$T/mig/store" ] || fail "the destination store is still there"
[ -z "$(ls -A "$T/mig/state/attached" 2>/dev/null)" ] || fail "a device is still attached"
pass
