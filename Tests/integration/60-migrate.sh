#!/bin/bash
# Live migration through nbd-umemd (scripts/migrate-vm): a TCG VM whose workload verifies and rewrites
# 96 MiB of its 192 MiB RAM continuously moves from one network namespace to another over a
# 200 Mbit/s link, with the destination's background pull on. It must complete with zero
# verification errors, the source side must be shut down after every page is local, and the guest
# must keep running and verifying for 10 s after that; then, with the page cache dropped, all guest
# RAM is re-read without any source traffic. Control: the same migration without the pull gate
# (--ungated) must show data errors, i.e. the gate is what keeps stale pages out. The gated run
# uses --tls: the NBD link runs over TLS with a key made for the run, and a client without it is
# refused.
. "$(dirname "$0")/lib.sh"

r() { json_get "$T/$1.json" "j[\"$2\"]"; }

migration gated --mode file --mem 192 --link-rate 200mbit --keep 10 --tls
assert_tls_migration "$T/gated.json" "$T/gated"
assert_eq "status" '"completed"' "$(r gated status)"
assert_eq "data errors on the destination" 0 "$(r gated data_errors)"
[ "$(r gated destination_resume_ms)" != null ] || fail "the destination never resumed"
awk -v s="$(r gated seconds_run_after_source_gone)" 'BEGIN { exit !(s >= 10) }' \
    || fail "the guest ran only $(r gated seconds_run_after_source_gone) s after the source was gone"
[ "$(r gated ops_after_source_gone)" -gt 0 ] || fail "no workload progress after the source was gone"
assert_eq "re-read of all RAM with the source gone and no page cache" true "$(r gated reread_without_source)"
grep -q 'every page local after' "$T/gated.out" || fail "no 'every page local' step"
# the source side is really gone: no QEMU or export of this run left
! pgrep -f "$T/gated/src.qmp" >/dev/null || fail "the source QEMU is still running"
! pgrep -f "umemd-vm-.*\.ram --readonly" >/dev/null || fail "a source export is still running"
say "gated: downtime $(r gated downtime_ms) ms, resume $(r gated destination_resume_ms) ms, all local $(r gated all_ram_local_ms) ms, $(r gated bytes_sent) bytes"

migration ungated --mode file --mem 192 --link-rate 200mbit --keep 3 --ungated
errors=$(r ungated data_errors)
say "ungated control: $errors data errors"
[ "$errors" -gt 0 ] || fail "without the gate the guest saw no stale page: this test could not tell the gate works"
pass
