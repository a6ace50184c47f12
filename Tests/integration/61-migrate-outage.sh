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
grep -q 'source export restarted' "$T/mig.out" || fail "the outage did not happen"
restarted=$(grep -n 'source export restarted' "$T/mig.out" | head -n 1 | cut -d: -f1)
local_line=$(grep -n 'every page local after' "$T/mig.out" | head -n 1 | cut -d: -f1)
[ "$restarted" -lt "$local_line" ] || fail "the export came back only after every page was local: not a post-copy outage"
[ "$(r all_ram_local_ms)" -gt 6000 ] || fail "every page was local after $(r all_ram_local_ms) ms: the outage was not inside the post-copy phase"
gap=$(r max_progress_gap_ms)
[ "$gap" -ge 2000 ] || fail "the guest never stalled (largest gap between progress lines $gap ms)"
[ "$(r ops_after_source_gone)" -gt 0 ] || fail "no progress after the outage"
grep -q 'source outage' "$T/mig/dst-daemon.log" && grep -q 'source recovered after' "$T/mig/dst-daemon.log" \
    || fail "the destination daemon logged no outage and recovery: $(grep -v 'info' "$T/mig/dst-daemon.log" | tail -n 5)"
say "daemon: $(grep -o 'source outage.*\|source recovered.*' "$T/mig/dst-daemon.log" | head -n 2 | tr '\n' ' ')"
say "stalled for up to $gap ms, every page local after $(r all_ram_local_ms) ms, 0 errors"
pass
