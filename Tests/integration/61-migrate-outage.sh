#!/bin/bash
# Live migration through nbd-umemd with the source export killed for 5 s in the middle of the
# post-copy phase (1 s after the switch-over, on a 100 Mbit/s link, so 192 MiB take ~16 s): the
# guest stalls on pages it does not have, then continues when the export is back, with zero
# verification errors; the destination daemon reports the outage and the recovery.
. "$(dirname "$0")/lib.sh"

migration mig --mode file --mem 192 --link-rate 100mbit --source-outage 5@1 --keep 3
r() { json_get "$T/mig.json" "j[\"$1\"]"; }
assert_eq "status" '"completed"' "$(r status)"
assert_eq "data errors" 0 "$(r data_errors)"
assert_postcopy_outage mig
say "stalled for up to $(r max_progress_gap_ms) ms, every page local after $(r all_ram_local_ms) ms, 0 errors"
pass
