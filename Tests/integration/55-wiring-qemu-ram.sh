#!/bin/bash
# QEMU guest RAM on an nbd-umemd device: scripts/qemu-ram attaches a --memory export (nbdfuse + loop
# on this kernel) and runs QEMU (TCG) with -object memory-backend-file,mem-path=DEVICE. The guest
# writes and verifies 64 MiB with nbd-mmap. With share=on its RAM pages must land in the export
# (found there by their pattern, word for word); with share=off the export must stay untouched.
# Either way scripts/qemu-ram detaches the device after QEMU exits.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/wirelib.sh"
# shellcheck source=../../scripts/lib/guest.sh
. "$ROOT/scripts/lib/guest.sh"

SEED=11
guest_kit
cat >"$T/init" <<'INIT'
#!/bin/sh
. /lib/guest-init.sh
echo "GUEST up: $(awk '/^MemTotal/ {print $2, "kB"}' /proc/meminfo)"
nbd-mmap anon --size 64M --seed 11 --passes 2
echo "GUEST-DONE"
poweroff -f
INIT
guest_initramfs "$T/initrd.gz" "$T/init"

# count_pattern_pages URI: pages of the export that hold the guest workload's pattern (checked word
# for word), printed as a number.
count_pattern_pages() {
    py "$1" "$SEED" <<'PY'
import struct, sys, nbd
uri, seed = sys.argv[1], int(sys.argv[2])
from nbdtest import mmap_magic, mmap_page
h = nbd.NBD(); h.connect_uri(uri)
size, magic, good, bad = h.get_size(), mmap_magic(seed), 0, 0
for off in range(0, size, 4 << 20):
    buf = h.pread(min(4 << 20, size - off), off)
    for i in range(0, len(buf), 4096):
        if buf[i:i + 8] == magic:
            p = struct.unpack_from("<Q", buf, i + 8)[0]
            if buf[i:i + 4096] == mmap_page(seed, p): good += 1
            else: bad += 1
if bad: sys.exit(f"{bad} pages carry the pattern's first word but not its content")
print(good)
PY
}

for share in on off; do
    serve_unix "ram-$share" --memory 256M
    guest_qemu_args "$T/initrd.gz" "$T/console-$share.log" ""
    rc=0
    "$ROOT/scripts/qemu-ram" --unix "$(sock "ram-$share")" --size 192M --share "$share" \
        --exec timeout -k 5 120 qemu-system-x86_64 "${GUEST_QEMU_ARGS[@]}" >"$T/qemu-$share.out" 2>&1 || rc=$?
    cat "$T/qemu-$share.out"
    guest_console_text "$T/console-$share.log" "$T/console-$share.txt"
    grep -aE '^(GUEST|VERDICT|anon)' "$T/console-$share.txt" | sed "s/^/  share=$share | /"
    [ "$rc" -eq 0 ] || fail "share=$share: qemu-ram --exec exited $rc"
    grep -aq '^VERDICT anon ok pages=16384 passes=2' "$T/console-$share.txt" || fail "share=$share: the guest did not verify its memory"
    grep -aqx 'GUEST-DONE' "$T/console-$share.txt" || fail "share=$share: the guest did not finish"
    [ -z "$(ls -A "$NBD_UMEMD_STATE_DIR/attached" 2>/dev/null)" ] || fail "share=$share: qemu-ram left a device attached"
    pages=$(count_pattern_pages "$(uri "ram-$share")")
    say "share=$share: $pages guest workload pages in the export"
    if [ "$share" = on ]; then
        [ "$pages" -ge $((16384 * 9 / 10)) ] || fail "share=on: only $pages of the guest's 16384 pages reached the export"
    else
        assert_eq "share=off: guest pages in the export" 0 "$pages"
    fi
    stop_server_ok "ram-$share"
done
pass
