"""The driver of `scripts/bench --suite sync` (run with the system Python, which has libnbd's module):
small synchronous writes for SECONDS: 4 KiB writes to random pages, each either WRITE with FUA (mode
fua) or WRITE then FLUSH (mode flush), QD of them in flight. Prints one JSON line: ops/s, mean and
p50 latency in microseconds (a write+flush pair is one operation).

Usage: syncwrite.py URI fua|flush QD SECONDS
"""
import json
import os
import random
import sys
import time

import nbd


def main():
    uri, mode, qd, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    h = nbd.NBD()
    h.connect_uri(uri)
    pages = h.get_size() // 4096
    buf = nbd.Buffer.from_bytearray(bytearray(os.urandom(4096)))
    lat, inflight = [], {}

    def issue():
        off = random.randrange(pages) * 4096
        if mode == "fua":
            inflight[h.aio_pwrite(buf, off, flags=nbd.CMD_FLAG_FUA)] = (time.monotonic(), False)
        else:
            inflight[h.aio_pwrite(buf, off)] = (time.monotonic(), True)

    t0 = time.monotonic()
    for _ in range(qd):
        issue()
    while time.monotonic() - t0 < secs:
        h.poll(-1)
        for c in [c for c in inflight if h.aio_command_completed(c)]:
            t, then_flush = inflight.pop(c)
            if then_flush:
                inflight[h.aio_flush()] = (t, False)
            else:
                lat.append(time.monotonic() - t)
                issue()
    elapsed = time.monotonic() - t0
    while inflight:
        h.poll(-1)
        for c in [c for c in inflight if h.aio_command_completed(c)]:
            inflight.pop(c)
    h.shutdown()
    lat.sort()
    print(json.dumps({"ops": len(lat) / elapsed, "mean_us": 1e6 * sum(lat) / max(1, len(lat)),
                      "p50_us": 1e6 * lat[len(lat) // 2] if lat else 0.0}))


if __name__ == "__main__":
    main()
