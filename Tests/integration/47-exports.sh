#!/bin/bash
# Several exports in one daemon: the export of --memory (named by --export-name) plus two --export
# specs, a file and a gated lazy copy of a source. NBD_OPT_LIST (nbdinfo --list) lists all three;
# three clients use them at once, each seeing only its own data; status and the gate are per export
# (`--export NAME`); a bad or duplicate spec is refused with a clear message.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/lazylib.sh"
require_lazy

random_file "$T/a.img" 16
random_file "$T/b.img" 16
random_file "$T/src.img" 16
truncate -s 16M "$T/disk.img"
start_source src "$T/src.img"
serve_unix multi --memory 16M --export-name ram0 \
    --export "name=disk,file=$T/disk.img,description=the disk,,with a comma" \
    --export "name=vm,source=$(uri src),store=$T/store,gated,prefetch=off" \
    --control "$T/multi.ctl"

tmo 30 nbdinfo --list --json "$(uri multi)" >"$T/list.json" || fail "nbdinfo --list failed"
names=$("$PY" -c 'import json,sys; print(" ".join(e["export-name"] for e in json.load(open(sys.argv[1]))["exports"]))' "$T/list.json")
assert_eq "exports listed by NBD_OPT_LIST" "ram0 disk vm" "$names"
desc=$("$PY" -c 'import json,sys; print([e.get("description") for e in json.load(open(sys.argv[1]))["exports"] if e["export-name"] == "disk"][0])' "$T/list.json")
assert_eq "description of disk (a ',,' in the spec)" "the disk,with a comma" "$desc"

# the gate of vm only: status says closed, then `gate open --export vm`
tmo 20 "$NBD_UMEMD" status --control "$T/multi.ctl" --export vm >"$T/vm.json" || fail "status --export vm failed"
assert_eq "vm's kind and gate" "lazy closed" "$(json_get "$T/vm.json" 'j["kind"] + " " + j["gate"]' | tr -d '"')"
tmo 20 "$NBD_UMEMD" gate open --control "$T/multi.ctl" --export vm >/dev/null || fail "gate open --export vm failed"

# three clients at once, each on its own export
tmo 120 nbdcopy "$T/a.img" "$(uri multi ram0)" & c1=$!
tmo 120 nbdcopy "$T/b.img" "$(uri multi disk)" & c2=$!
rm -f "$T/vm.out"
tmo 120 nbdcopy "$(uri multi vm)" "$T/vm.out" & c3=$!
wait $c1 || fail "nbdcopy to ram0 failed"
wait $c2 || fail "nbdcopy to disk failed"
wait $c3 || fail "nbdcopy from vm failed"
rm -f "$T/ram0.out" "$T/disk.out"
tmo 120 nbdcopy "$(uri multi ram0)" "$T/ram0.out" || fail "reading ram0 failed"
tmo 120 nbdcopy "nbd+unix:///disk?socket=$(sock multi)" "$T/disk.out" || fail "reading disk failed"
assert_same_file "$T/a.img" "$T/ram0.out" "ram0 holds what was written to it"
assert_same_file "$T/b.img" "$T/disk.out" "disk holds what was written to it"
assert_same_file "$T/src.img" "$T/vm.out" "vm is the source's copy"
# the empty name selects the first export
assert_eq "size of the default export" 16777216 "$(tmo 30 nbdinfo --size "$(uri multi)")"
rm -f "$T/default.out"
tmo 120 nbdcopy "$(uri multi)" "$T/default.out" || fail "reading the default export failed"
assert_same_file "$T/a.img" "$T/default.out" "the empty name is ram0"

tmo 20 "$NBD_UMEMD" status --control "$T/multi.ctl" --export disk >"$T/disk.json" || fail "status --export disk failed"
assert_eq "disk's kind" '"file"' "$(json_get "$T/disk.json" 'j["kind"]')"
tmo 20 "$NBD_UMEMD" status --control "$T/multi.ctl" --export vm >"$T/vm.json" || fail "status --export vm failed"
assert_eq "vm's bytes pulled" 16777216 "$(json_get "$T/vm.json" 'j["bytes_pulled"]')"
stop_server_ok multi
cmp -s "$T/b.img" "$T/disk.img" || fail "the file behind 'disk' does not hold what was written"
say "ok: three exports, three clients, status and gate per export"

# bad specs
expect_bad_spec() {
    local want=$1; shift
    if "$NBD_UMEMD" serve --unix "$T/bad.sock" "$@" >"$T/bad.out" 2>&1; then fail "accepted: $*"; fi
    grep -q -- "$want" "$T/bad.out" || fail "unclear error for $*: $(cat "$T/bad.out")"
}
expect_bad_spec "two exports are named 'a'" --export name=a,memory=1M --export name=a,memory=2M
expect_bad_spec "unknown key 'bogus'" --export name=a,memory=1M,bogus=1
expect_bad_spec "file=, memory= cannot be used together" --export name=a,file=/x,memory=1M
expect_bad_spec "source= needs store= DIR" --export "name=a,source=$(uri src)"
expect_bad_spec "fetch-size= only applies to source=" --export name=a,memory=1M,fetch-size=4K
expect_bad_spec "put it in the spec" --export name=a,memory=1M --readonly
expect_bad_spec "gated needs --control" --export "name=a,source=$(uri src),store=$T/s2,gated"
say "ok: bad --export specs"
pass
