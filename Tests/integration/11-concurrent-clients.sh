#!/bin/bash
# Many concurrent clients on one server: 20 libnbd writers on disjoint regions (plus nbdinfo
# probes) at the same time, then 20 parallel nbdcopy readers that must all see the full image.
. "$(dirname "$0")/lib.sh"

N=20
REGION_MIB=3
serve_unix mem --memory $((N * REGION_MIB))M
U=$(uri mem)

# Phase 1: 20 writers + 10 nbdinfo probes in parallel.
cat >"$T/writer.py" <<'PY'
import sys, random
from nbdtest import *
i, region = int(sys.argv[2]), int(sys.argv[3]) * MiB
h = connect(sys.argv[1], debug=False)
base = i * region
data = pattern(region, 7000 + i)
rng = random.Random(i)
chunks = list(range(0, region, 64 * KiB))
rng.shuffle(chunks)
for n, off in enumerate(chunks):
    h.pwrite(data[off:off + 64 * KiB], base + off, nbd.CMD_FLAG_FUA if n % 7 == 0 else 0)
    if n % 10 == 0:
        o = rng.choice(chunks[:n + 1])
        check_data(data[o:o + 64 * KiB], h.pread(64 * KiB, base + o), "client %d read-back at %d" % (i, o))
h.flush()
check_data(data, h.pread(region, base), "client %d full region" % i)
h.shutdown()
PY
pids=()
for i in $(seq 0 $((N - 1))); do
    tmo 180 "$PY" "$T/writer.py" "$U" "$i" "$REGION_MIB" >"$T/w$i.log" 2>&1 &
    pids+=($!)
done
ipids=()
for i in $(seq 1 10); do
    tmo 60 nbdinfo --json "$U" >"$T/i$i.json" 2>&1 &
    ipids+=($!)
done
bad=0
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then bad=$((bad + 1)); echo "--- writer $i ---" >&2; tail -n 5 "$T/w$i.log" >&2; fi
done
for i in "${!ipids[@]}"; do
    if ! wait "${ipids[$i]}"; then bad=$((bad + 1)); echo "--- nbdinfo $((i + 1)) ---" >&2; tail -n 5 "$T/i$((i + 1)).json" >&2; fi
done
[ "$bad" -eq 0 ] || fail "$bad of $((N + 10)) concurrent clients failed"
assert_alive mem
say "ok: $N concurrent writers + 10 nbdinfo"

# Phase 2: expected image, then 20 parallel nbdcopy readers.
"$PY" - "$T/expected.img" "$N" "$REGION_MIB" <<'PY'
import sys
from nbdtest import pattern, MiB
n, region = int(sys.argv[2]), int(sys.argv[3]) * MiB
with open(sys.argv[1], "wb") as f:
    for i in range(n):
        f.write(pattern(region, 7000 + i))
PY
pids=()
for i in $(seq 0 $((N - 1))); do
    tmo 180 nbdcopy --connections=2 "$U" "$T/r$i.img" >"$T/r$i.log" 2>&1 &
    pids+=($!)
done
bad=0
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then bad=$((bad + 1)); echo "--- nbdcopy $i ---" >&2; tail -n 5 "$T/r$i.log" >&2; continue; fi
    if ! cmp -s "$T/expected.img" "$T/r$i.img"; then
        bad=$((bad + 1)); echo "--- nbdcopy $i: content differs ---" >&2; cmp "$T/expected.img" "$T/r$i.img" >&2 || true
    fi
    rm -f "$T/r$i.img"
done
[ "$bad" -eq 0 ] || fail "$bad of $N concurrent nbdcopy readers failed or read wrong data"
say "ok: $N concurrent nbdcopy readers got correct data"

# Phase 3: connect/disconnect churn from 8 parallel loops (200 short connections in total).
cat >"$T/churn.py" <<'PY'
import sys
from nbdtest import *
for k in range(25):
    h = connect(sys.argv[1], debug=False)
    check(h.get_size() > 0, "size")
    h.pread(512, (k * 4096) % (h.get_size() - 512))
    h.shutdown()
PY
pids=()
for i in $(seq 1 8); do tmo 120 "$PY" "$T/churn.py" "$U" >"$T/c$i.log" 2>&1 & pids+=($!); done
bad=0
for i in "${!pids[@]}"; do wait "${pids[$i]}" || { bad=$((bad + 1)); tail -n 5 "$T/c$((i + 1)).log" >&2; }; done
[ "$bad" -eq 0 ] || fail "$bad of 8 connection-churn loops failed"
say "ok: 200 short connections"

assert_alive mem
pass
