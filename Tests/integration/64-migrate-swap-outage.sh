#!/bin/bash
# Swap-mode live migration with the source export killed for 5 s in the middle of the post-copy
# phase (1 s after the switch-over, on a 100 Mbit/s link, so 192 MiB take ~16 s): the guest stalls
# in swap-ins the daemon cannot serve yet, then continues when the export is back, with zero
# verification errors; the migration completes and the destination is torn down as usual.
. "$(dirname "$0")/lib.sh"

PRE_STOP_CMDS+=("undo_swap_run mig")
migration mig --mode swap --mem 192 --link-rate 100mbit --source-outage 5@1 --keep 3
r() { json_get "$T/mig.json" "j[\"$1\"]"; }
assert_eq "status" '"completed"' "$(r status)"
assert_eq "mode" '"swap"' "$(r mode)"
assert_eq "data errors" 0 "$(r data_errors)"
assert_postcopy_outage mig
assert_eq "leftovers at independence" 0 "$(r leftovers_after_independent)"
dev=$(r swap_device | tr -d '"')
! awk 'NR > 1 { print $1 }' /proc/swaps | grep -qxF "$dev" || fail "$dev is still swap"
say "stalled for up to $(r max_progress_gap_ms) ms, every page local after $(r all_ram_local_ms) ms, independent after $(r independent_ms) ms, 0 errors"
pass
