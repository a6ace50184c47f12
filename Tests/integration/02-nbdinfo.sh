#!/bin/bash
# nbdinfo --json / --list: size, every can_* flag, block sizes, export name and description for
# --memory, --file, --readonly, --export-name/--description and --min-block-size exports.
. "$(dirname "$0")/lib.sh"

# check_info URI EXPECTED_JSON: every key of EXPECTED must equal the export's nbdinfo --json value.
check_info() {
    local u=$1 expected=$2 out="$T/info.json"
    tmo 30 nbdinfo --json "$u" >"$out" || fail "nbdinfo --json $u failed"
    "$PY" - "$out" "$expected" "$u" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
exp = json.loads(sys.argv[2])
uri = sys.argv[3]
errs = []
if j.get("protocol") != "newstyle-fixed":
    errs.append("protocol: expected newstyle-fixed, got %r" % j.get("protocol"))
if j.get("structured") is not True:
    errs.append("structured replies not negotiated (structured=%r)" % j.get("structured"))
if len(j.get("exports", [])) != 1:
    errs.append("expected exactly 1 export in nbdinfo output, got %d" % len(j.get("exports", [])))
e = j["exports"][0]
for k, v in exp.items():
    if k == "contexts+":
        missing = [c for c in v if c not in e.get("contexts", [])]
        if missing:
            errs.append("contexts %r missing (got %r)" % (missing, e.get("contexts")))
        continue
    if k not in e:
        errs.append("%s: missing from nbdinfo output (expected %r)" % (k, v))
    elif e[k] != v:
        errs.append("%s: expected %r, got %r" % (k, v, e[k]))
if errs:
    print("nbdinfo --json %s:\n%s" % (uri, json.dumps(j, indent=1)), file=sys.stderr)
    for x in errs:
        print("  MISMATCH " + x, file=sys.stderr)
    sys.exit(1)
print("ok: %s: %d fields as expected" % (uri, len(exp)))
PY
}

RW='"is_read_only": false, "can_flush": true, "can_fua": true, "can_trim": true, "can_zero": true,
    "can_fast_zero": true, "can_cache": true, "can_df": true, "can_multi_conn": true,
    "is_rotational": false, "contexts+": ["base:allocation"]'
RO='"is_read_only": true, "can_flush": true, "can_fua": false, "can_trim": false, "can_zero": false,
    "can_fast_zero": false, "can_cache": true, "can_df": true, "can_multi_conn": true,
    "contexts+": ["base:allocation"]'
BS1='"block_size_minimum": 1, "block_size_preferred": 4096, "block_size_maximum": 33554432'

# 1. --memory, default export name.
serve_unix mem --memory 64M
check_info "$(uri mem)" "{\"export-size\": 67108864, \"export-name\": \"\", $RW, $BS1}"

# 2. --file (5 MiB regular file).
truncate -s 5M "$T/disk.img"
serve_unix file --file "$T/disk.img"
check_info "$(uri file)" "{\"export-size\": 5242880, \"export-name\": \"\", $RW, $BS1}"

# 3. --file --readonly.
serve_unix ro --file "$T/disk.img" --readonly
check_info "$(uri ro)" "{\"export-size\": 5242880, $RO, $BS1}"
tmo 30 nbdinfo --is read-only "$(uri ro)" || fail "nbdinfo --is read-only says the --readonly export is writable"
if tmo 30 nbdinfo --is read-only "$(uri file)"; then fail "nbdinfo --is read-only says the rw export is read-only"; fi

# 4. --memory --readonly.
serve_unix memro --memory 1M --readonly
check_info "$(uri memro)" "{\"export-size\": 1048576, $RO, $BS1}"

# 5. Named export with a description.
serve_unix named --memory 8M --export-name disk1 --description "test disk one"
check_info "$(uri named disk1)" "{\"export-size\": 8388608, \"export-name\": \"disk1\",
    \"description\": \"test disk one\", $RW, $BS1}"
# An unknown export name is refused.
if tmo 30 nbdinfo "$(uri named nosuchexport)" >"$T/o" 2>&1; then
    cat "$T/o" >&2; fail "nbdinfo on unknown export 'nosuchexport' succeeded"
fi
say "ok: unknown export name refused"

# 6. --list shows the export names (default and non-empty).
tmo 30 nbdinfo --list --json "$(uri named)" >"$T/list.json" || fail "nbdinfo --list failed"
names=$(json_get "$T/list.json" '[e["export-name"] for e in j["exports"]]')
assert_eq "export names listed by nbdinfo --list (named server)" '["disk1"]' "$names"
desc=$(json_get "$T/list.json" 'j["exports"][0].get("description")')
assert_eq "description in nbdinfo --list" '"test disk one"' "$desc"
tmo 30 nbdinfo --list "$(uri named)" >"$T/list.txt" || fail "nbdinfo --list (text) failed"
grep -q 'export="disk1"' "$T/list.txt" || { cat "$T/list.txt" >&2; fail "nbdinfo --list text does not show export=\"disk1\""; }
tmo 30 nbdinfo --list --json "$(uri mem)" >"$T/list.json" || fail "nbdinfo --list failed"
names=$(json_get "$T/list.json" '[e["export-name"] for e in j["exports"]]')
assert_eq "export names listed by nbdinfo --list (default server)" '[""]' "$names"
say "ok: --list"

# 7. --min-block-size 512 and 4096.
serve_unix b512 --memory 4M --min-block-size 512
check_info "$(uri b512)" "{\"export-size\": 4194304, $RW, \"block_size_minimum\": 512,
    \"block_size_preferred\": 4096, \"block_size_maximum\": 33554432}"
serve_unix b4k --memory 4M --min-block-size 4096
check_info "$(uri b4k)" "{\"export-size\": 4194304, $RW, \"block_size_minimum\": 4096,
    \"block_size_preferred\": 4096, \"block_size_maximum\": 33554432}"

# 8. nbdinfo --can / --size plain forms.
for c in flush fua trim zero fast-zero cache df multi-conn write; do
    tmo 30 nbdinfo --can "$c" "$(uri mem)" || fail "nbdinfo --can $c says no on the rw memory export"
done
for c in fua trim zero fast-zero write; do
    if tmo 30 nbdinfo --can "$c" "$(uri ro)"; then fail "nbdinfo --can $c says yes on the --readonly export"; fi
done
assert_eq "nbdinfo --size" 67108864 "$(tmo 30 nbdinfo --size "$(uri mem)")"
say "ok: --can/--size"

for s in mem file ro memro named b512 b4k; do assert_alive "$s"; done
pass
