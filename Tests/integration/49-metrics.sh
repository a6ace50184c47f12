#!/bin/bash
# --metrics: Prometheus text format over HTTP, scraped while clients load two exports (a lazy copy
# and a RAM export); every scrape passes `promtool check metrics`; once idle the values agree with
# `nbd-umemd status` (requests, bytes, pulls, misses, pages, connections, histogram counts); a
# source outage shows in source_outages_total / source_reconnects_total. Also runs the example
# systemd units' ExecStart line under systemd-socket-activate (paths and sizes made local).
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/lazylib.sh"
require_lazy
command -v promtool >/dev/null || fail "promtool (Debian package prometheus) is not installed"

random_file "$T/src.img" 32
start_source src "$T/src.img"
MP=$(free_port)
serve_lazy lazy src "$T/store" --control "$T/lazy.ctl" --metrics "127.0.0.1:$MP" --export name=ram,memory=32M
URL="http://127.0.0.1:$MP/metrics"

scrape() { curl -sf --max-time 10 "$URL" >"$1" || fail "GET $URL failed"; }
# value FILE SAMPLE: the value of one sample line (exact name and labels)
value() { awk -v s="$2" '$1 == s { print $2; found = 1 } END { if (!found) print "missing" }' "$1"; }

# load on both exports, scraping (and checking) every 0.2 s meanwhile
random_file "$T/ram.img" 32
( for i in 1 2 3 4 5 6; do rm -f "$T/out.img"; tmo 120 nbdcopy "$(uri lazy)" "$T/out.img" || exit 1; done ) & l1=$!
( for i in 1 2 3 4 5 6; do tmo 120 nbdcopy "$T/ram.img" "$(uri lazy ram)" || exit 1; done ) & l2=$!
n=0
while kill -0 $l1 2>/dev/null || kill -0 $l2 2>/dev/null; do
    scrape "$T/during.txt"
    promtool check metrics <"$T/during.txt" >"$T/promtool.out" 2>&1 || { cat "$T/promtool.out"; fail "promtool rejects the metrics scraped under load"; }
    n=$((n + 1))
    sleep 0.2
done
wait $l1 || fail "nbdcopy from the lazy export failed"
wait $l2 || fail "nbdcopy to the RAM export failed"
assert_same_file "$T/src.img" "$T/out.img" "the lazy export's data"
say "ok: $n scrapes under load, each accepted by promtool"

# idle: metrics agree with status
tmo 20 "$NBD_UMEMD" status --control "$T/lazy.ctl" --export "" >"$T/status.json" || fail "status --export '' failed"
tmo 20 "$NBD_UMEMD" status --control "$T/lazy.ctl" --export ram >"$T/ram.json" || fail "status --export ram failed"
scrape "$T/idle.txt"
promtool check metrics <"$T/idle.txt" || fail "promtool rejects the idle metrics"
check_eq() {  # check_eq WHAT STATUS-VALUE SAMPLE
    local got
    got=$(value "$T/idle.txt" "$3")
    [ "$got" = "$2" ] || fail "$1: metrics say $got ($3), status says $2"
}
S="$T/status.json"
check_eq "lazy read requests" "$(json_get "$S" 'j["requests"]["read"]["requests"]')" 'nbd_umemd_requests_total{export="",command="read"}'
check_eq "lazy read bytes" "$(json_get "$S" 'j["requests"]["read"]["bytes"]')" 'nbd_umemd_request_bytes_total{export="",command="read"}'
check_eq "lazy read histogram count" "$(json_get "$S" 'j["requests"]["read"]["requests"]')" 'nbd_umemd_request_duration_seconds_count{export="",command="read"}'
check_eq "bytes pulled" "$(json_get "$S" 'j["bytes_pulled"]')" 'nbd_umemd_bytes_pulled_total{export=""}'
check_eq "demand misses" "$(json_get "$S" 'j["demand_misses"]')" 'nbd_umemd_demand_misses_total{export=""}'
check_eq "local pages" "$(json_get "$S" 'j["pages"]["local"]')" 'nbd_umemd_pages{export="",state="local"}'
check_eq "absent pages" "$(json_get "$S" 'j["pages"]["absent"]')" 'nbd_umemd_pages{export="",state="absent"}'
check_eq "background bytes" "$(json_get "$S" 'j["background_bytes"]')" 'nbd_umemd_background_bytes_total{export=""}'
check_eq "ram write requests" "$(json_get "$T/ram.json" 'j["requests"]["write"]["requests"]')" 'nbd_umemd_requests_total{export="ram",command="write"}'
check_eq "ram write bytes" "$(json_get "$T/ram.json" 'j["requests"]["write"]["bytes"]')" 'nbd_umemd_request_bytes_total{export="ram",command="write"}'
check_eq "connections" "$(json_get "$S" 'j["connections"]')" 'nbd_umemd_connections'
[ "$(value "$T/idle.txt" 'nbd_umemd_request_bytes_total{export="ram",command="write"}')" = $((6 * 33554432)) ] ||
    fail "the RAM export's written bytes are not 6 x 32 MiB"
[ "$(value "$T/idle.txt" 'nbd_umemd_demand_miss_duration_seconds_count{export=""}')" != missing ] || fail "no demand-miss histogram"
[ "$(value "$T/idle.txt" 'nbd_umemd_store_commit_duration_seconds_count{export=""}')" != missing ] || fail "no store commit histogram"
say "ok: metrics agree with status"

# an outage: counted once, and the reconnect
serve_lazy lazy2 src "$T/store2" --control "$T/lazy2.ctl" --metrics "127.0.0.1:0" --source-timeout 30
URL2=$(grep -o 'http://127.0.0.1:[0-9]*/metrics' "$T/lazy2.log" | head -1)
[ -n "$URL2" ] || fail "the metrics address is not logged: $(grep metrics "$T/lazy2.log")"
lz_kill_source src
nbdsh_py "$(uri lazy2)" "$T/src.img" <<'PY' &
img = open(sys.argv[1], "rb").read()
check_data(img[4096 * 100:4096 * 101], h.pread(4096, 4096 * 100), "a read waiting out the outage")
PY
reader=$!
sleep 1
start_source src "$T/src.img"
wait $reader || fail "the read during the outage failed"
curl -sf "$URL2" >"$T/outage.txt" || fail "GET $URL2 failed"
[ "$(value "$T/outage.txt" 'nbd_umemd_source_outages_total{export=""}')" = 1 ] || fail "source_outages_total is not 1: $(grep outages "$T/outage.txt")"
[ "$(value "$T/outage.txt" 'nbd_umemd_source_reconnects_total{export=""}')" -ge 1 ] || fail "no reconnect counted"
stop_server_ok lazy2
say "ok: outages and reconnects"
stop_server_ok lazy

# the example units: ExecStart of systemd/nbd-umemd.service under systemd-socket-activate
exec_line=$(awk '/^ExecStart=/ { sub(/^ExecStart=/, ""); line = $0; while (line ~ /\\$/) { sub(/\\$/, "", line); getline nxt; line = line nxt } print line; exit }' \
    "$ROOT/systemd/nbd-umemd.service")
[ -n "$exec_line" ] || fail "no ExecStart in systemd/nbd-umemd.service"
listen=$(awk -F= '/^ListenStream=/ { print $2; exit }' "$ROOT/systemd/nbd-umemd.socket")
UP=$(free_port)
local_line=$(sed -e "s|/usr/local/bin/nbd-umemd|$NBD_UMEMD|" -e "s|--memory 4G|--memory 16M|" -e "s|/run/nbd-umemd/|$T/|g" \
    -e "s|127.0.0.1:9720|127.0.0.1:$UP|" <<<"$exec_line")
say "unit: $local_line (socket $listen -> $T/$(basename "$listen"))"
# shellcheck disable=SC2086
systemd-socket-activate -l "$T/$(basename "$listen")" $local_line 2>"$T/unit.log" &
unit=$!
CLEANUP_CMDS+=("kill $unit 2>/dev/null")
for ((i = 0; i < 100; i++)); do [ -S "$T/$(basename "$listen")" ] && break; sleep 0.05; done
assert_eq "size through the example unit's socket" 16777216 \
    "$(tmo 30 nbdinfo --size "nbd+unix:///?socket=$T/$(basename "$listen")")"
for ((i = 0; i < 50; i++)); do curl -sf "http://127.0.0.1:$UP/metrics" >"$T/unit.txt" && break; sleep 0.1; done
promtool check metrics <"$T/unit.txt" || fail "the example unit's metrics are rejected"
tmo 20 "$NBD_UMEMD" status --control "$T/nbd.ctl" >/dev/null || fail "the example unit's control socket does not answer"
kill -TERM $unit
wait $unit || fail "the example unit's daemon exited $? after SIGTERM"
say "ok: the example systemd units"
pass
