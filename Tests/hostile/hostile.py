#!/usr/bin/python3
"""Hostile-client fuzzer for an NBD server on a Unix socket (system python3, no libnbd).

Sends random and mutated handshakes and request streams on many short connections: bit flips,
truncations, huge lengths, random option codes, random commands/flags/offsets/lengths, garbage
after the handshake, oversized WRITEs with partial payloads, disconnects mid-payload, read floods
that are never read, idle half-open connections.

Bounded: at most --max-conns connections or --max-seconds seconds, whichever comes first; every
socket has a short timeout.

Reproducible: connection i uses random.Random("SEED-i"); the seed (fixed by default, override with
--seed or HOSTILE_SEED=N, or HOSTILE_SEED=random) is printed; HOSTILE_ONLY=i replays only
connection i.

Data safety: the export's first --protect bytes hold a known pattern that the caller verifies
afterwards. Every byte stream is sanitized before it is sent: any 28-byte window that starts with
the request magic and names a command that could modify data (anything but READ, DISC, FLUSH,
CACHE, BLOCK_STATUS) and overlaps the protected range gets its offset moved into the scratch
range. Whatever framing the server uses, the requests it executes start at such windows, so no
valid request can touch the protected range, and any change there is a server bug.

Exit status: 0 if the server survived, answered the periodic probes correctly and stayed under the
memory limit; 1 otherwise (with the connection indices to replay).
"""

import argparse
import faulthandler
import os
import random
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import nbdraw as R  # noqa: E402

MiB = 1 << 20
MAGIC_BYTES = struct.pack(">I", R.REQUEST_MAGIC)
SAFE_CMDS = {R.CMD_READ, R.CMD_DISC, R.CMD_FLUSH, R.CMD_CACHE, R.CMD_BLOCK_STATUS}
INTERESTING32 = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
                 0xFFFFFFFE, 0xFFFFFFFF, 32 * MiB, 32 * MiB + 1, 64 * MiB, 4096, 511, 512, 513]
INTERESTING64 = [0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, (1 << 64) - 512, 1 << 32, 64 * MiB,
                 64 * MiB - 1, 64 * MiB - 512]


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sock", required=True)
    ap.add_argument("--pid", type=int, required=True, help="server pid (liveness and RSS)")
    ap.add_argument("--size", type=int, default=64 * MiB)
    ap.add_argument("--protect", type=int, default=32 * MiB, help="bytes at the start holding the pattern")
    ap.add_argument("--pattern-file", required=True, help="file whose first --protect bytes are expected")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--max-conns", type=int, default=3000)
    ap.add_argument("--max-seconds", type=float, default=90.0)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--rss-limit-mib", type=int, default=512)
    return ap.parse_args()


args = parse_args()
# Safety net: if anything hangs, dump every thread's stack and exit non-zero.
faulthandler.dump_traceback_later(args.max_seconds + 75, exit=True)
# A fixed default seed keeps CI runs reproducible; HOSTILE_SEED=random picks a fresh one.
DEFAULT_SEED = 20261122
seed = args.seed
if seed is None:
    env = os.environ.get("HOSTILE_SEED", "")
    if env == "random":
        seed = random.SystemRandom().randrange(1 << 31)
    else:
        seed = int(env) if env else DEFAULT_SEED
ONLY = os.environ.get("HOSTILE_ONLY")
SIZE = args.size
PROTECT = args.protect
SCRATCH = PROTECT + 16 * MiB       # 0x03000000 for the default sizes: no magic bytes in it
with open(args.pattern_file, "rb") as f:
    PATTERN = f.read(PROTECT)

print("hostile: seed=%d (replay: HOSTILE_SEED=%d; one connection: HOSTILE_ONLY=i) max_conns=%d "
      "max_seconds=%.0f threads=%d" % (seed, seed, args.max_conns, args.max_seconds, args.threads), flush=True)

lock = threading.RLock()
state = {"next": 0, "done": 0, "probes": 0, "failures": [], "peak_rss": 0, "scenarios": {},
         "inflight": {}, "server_dead": False, "bytes_sent": 0}
deadline = time.monotonic() + args.max_seconds
held = []            # idle connections kept open until the end (bounded)
HELD_MAX = 48


def record_failure(msg):
    with lock:
        state["failures"].append(msg)
    print("FAILURE: " + msg, flush=True)


def server_alive():
    try:
        os.kill(args.pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open("/proc/%d/status" % args.pid) as f:
            for line in f:
                if line.startswith("State:") and "Z" in line.split()[1]:
                    return False
    except OSError:
        return False
    return True


def rss_kib():
    try:
        with open("/proc/%d/status" % args.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---- stream building -----------------------------------------------------------------------------
def opt(code, data=b"", length=None):
    return struct.pack(">QII", R.IHAVEOPT, code, len(data) if length is None else length) + data


def info_payload(name=b"", infos=()):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def meta_payload(name=b"", queries=(b"base:allocation",)):
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q
    return out


def req(cmd, offset, length, flags=0, handle=0, payload=None):
    hdr = struct.pack(">IHHQQI", R.REQUEST_MAGIC, flags & 0xFFFF, cmd & 0xFFFF, handle, offset & ((1 << 64) - 1),
                      length & 0xFFFFFFFF)
    return hdr + (payload if payload is not None else b"")


def rand_offset(rng):
    r = rng.random()
    if r < 0.5:
        return SCRATCH + rng.randrange(0, SIZE - SCRATCH)
    if r < 0.7:
        return rng.choice(INTERESTING64)
    if r < 0.85:
        return rng.randrange(0, SIZE)   # may be in the protected range: sanitized for writes
    return rng.getrandbits(64)


def rand_length(rng):
    r = rng.random()
    if r < 0.6:
        return rng.choice([1, 512, 4096, 65536, rng.randrange(1, 200000)])
    if r < 0.9:
        return rng.choice(INTERESTING32)
    return rng.getrandbits(32)


def rand_flags(rng):
    r = rng.random()
    if r < 0.6:
        return 0
    if r < 0.9:
        return 1 << rng.randrange(0, 5)
    return rng.getrandbits(16)


def rand_request(rng, handle):
    r = rng.random()
    if r < 0.75:
        cmd = rng.choice([R.CMD_READ, R.CMD_READ, R.CMD_WRITE, R.CMD_WRITE, R.CMD_FLUSH, R.CMD_TRIM,
                          R.CMD_CACHE, R.CMD_WRITE_ZEROES, R.CMD_BLOCK_STATUS])
    elif r < 0.8:
        cmd = R.CMD_DISC
    else:
        cmd = rng.choice([8, 9, 99, 0x7FFF, 0xFFFF, rng.getrandbits(16)])
    offset, length, flags = rand_offset(rng), rand_length(rng), rand_flags(rng)
    payload = b""
    if cmd == R.CMD_WRITE:
        p = rng.random()
        if length <= 256 * 1024 and p < 0.8:
            payload = rng.randbytes(length)
        elif p < 0.9:
            payload = rng.randbytes(min(length, rng.randrange(0, 70000)))   # short payload
        else:
            payload = rng.randbytes(min(length, 300000))
    return req(cmd, offset, length, flags, handle, payload)


def rand_option(rng):
    r = rng.random()
    if r < 0.15:
        return opt(R.OPT_STRUCTURED_REPLY)
    if r < 0.25:
        return opt(R.OPT_LIST)
    if r < 0.35:
        return opt(R.OPT_INFO, info_payload(b"", [rng.randrange(0, 6) for _ in range(rng.randrange(0, 5))]))
    if r < 0.45:
        return opt(rng.choice([R.OPT_SET_META_CONTEXT, R.OPT_LIST_META_CONTEXT]),
                   meta_payload(b"", [rng.choice([b"base:allocation", b"base:", b"x-a:b", rng.randbytes(8)])
                                      for _ in range(rng.randrange(0, 4))]))
    if r < 0.55:
        return opt(R.OPT_STARTTLS)
    if r < 0.7:
        return opt(rng.choice([0, 4, 11, 12, 13, 100, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, rng.getrandbits(32)]),
                   rng.randbytes(rng.randrange(0, 300)))
    if r < 0.8:   # lying inner lengths
        code = rng.choice([R.OPT_GO, R.OPT_INFO, R.OPT_SET_META_CONTEXT, R.OPT_LIST_META_CONTEXT])
        body = struct.pack(">I", rng.choice(INTERESTING32)) + rng.randbytes(rng.randrange(0, 40))
        return opt(code, body)
    if r < 0.9:   # declared length longer than the data actually sent (rest of stream gets eaten)
        return opt(rng.getrandbits(8), rng.randbytes(rng.randrange(0, 64)), length=rng.choice(INTERESTING32))
    return opt(R.OPT_LIST, rng.randbytes(rng.randrange(1, 50)))   # LIST with a payload


def session_stream(rng):
    """A plausible full client session: flags, options, an ending, requests."""
    out = bytearray()
    cflags = rng.choice([3, 3, 3, 1, 0, 2, rng.getrandbits(32)])
    out += struct.pack(">I", cflags)
    for _ in range(rng.randrange(0, 6)):
        out += rand_option(rng)
    if rng.random() < 0.4:
        out += opt(R.OPT_STRUCTURED_REPLY)
    if rng.random() < 0.3:
        out += opt(R.OPT_SET_META_CONTEXT, meta_payload())
    end = rng.random()
    if end < 0.6:
        out += opt(R.OPT_GO, info_payload(b"", [R.INFO_BLOCK_SIZE] if rng.random() < 0.5 else []))
    elif end < 0.8:
        out += opt(R.OPT_EXPORT_NAME, b"")
    elif end < 0.9:
        out += opt(R.OPT_ABORT)
    else:
        out += opt(R.OPT_GO, info_payload(rng.choice([b"nosuch", rng.randbytes(10)])))
    for h in range(rng.randrange(0, 30)):
        out += rand_request(rng, h)
    return bytes(out)


def mutate(rng, data):
    b = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        if not b:
            b += rng.randbytes(rng.randrange(1, 64))
            continue
        m = rng.randrange(0, 8)
        pos = rng.randrange(0, len(b))
        if m == 0:       # bit flips
            for _ in range(rng.randrange(1, 9)):
                p = rng.randrange(0, len(b))
                b[p] ^= 1 << rng.randrange(0, 8)
        elif m == 1:     # truncate
            del b[pos:]
        elif m == 2:     # insert random bytes
            b[pos:pos] = rng.randbytes(rng.randrange(1, 64))
        elif m == 3:     # delete a range
            del b[pos:pos + rng.randrange(1, 64)]
        elif m == 4:     # duplicate a range
            seg = b[pos:pos + rng.randrange(1, 256)]
            b[pos:pos] = seg
        elif m == 5:     # overwrite a 32-bit field with an interesting value
            if pos + 4 <= len(b):
                b[pos:pos + 4] = struct.pack(">I", rng.choice(INTERESTING32))
        elif m == 6:     # overwrite a 64-bit field
            if pos + 8 <= len(b):
                b[pos:pos + 8] = struct.pack(">Q", rng.choice(INTERESTING64))
        else:            # overwrite a 16-bit field (flags / command type)
            if pos + 2 <= len(b):
                b[pos:pos + 2] = struct.pack(">H", rng.getrandbits(16))
    return bytes(b)


def sanitize(data):
    """Move every potentially data-modifying request window away from the protected range."""
    b = bytearray(data)
    i = b.find(MAGIC_BYTES)
    while i != -1:
        if i + 28 <= len(b):
            _, flags, cmd, handle, offset, length = struct.unpack(">IHHQQI", b[i:i + 28])
        else:
            # a partial header at the very end: pad conservatively (the server cannot execute it)
            cmd, offset, length = None, 0, 0
        if cmd is not None and cmd not in SAFE_CMDS:
            end = offset + max(length, 1)
            if offset < PROTECT or end > (1 << 64):
                b[i + 12:i + 20] = struct.pack(">Q", SCRATCH)
        i = b.find(MAGIC_BYTES, i + 1)
    return bytes(b)


# ---- connection helpers ---------------------------------------------------------------------------
def connect(timeout=0.3):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(args.sock)
    return s


def send_chunks(rng, s, data):
    """Send data in random-sized chunks; stop quietly if the server closes or stops reading."""
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 7, 28, 512, 4096, 65536, len(data)])
        try:
            s.sendall(data[pos:pos + n])
        except (OSError, socket.timeout):
            return False
        with lock:
            state["bytes_sent"] += min(n, len(data) - pos)
        pos += n
        if rng.random() < 0.02:
            time.sleep(0.005)
    return True


def drain(s, limit=1 << 20, wait=0.05):
    got = 0
    s.settimeout(wait)
    try:
        while got < limit:
            d = s.recv(65536)
            if not d:
                break
            got += len(d)
    except (OSError, socket.timeout):
        pass
    return got


def handshake_go(s, structured=True, meta=False):
    c = R.RawClient.__new__(R.RawClient)
    c.sock = s
    c._pushback = b""
    c.pending = {}
    c.next_handle = 1
    c.structured = False
    c.no_zeroes = False
    s.settimeout(5)
    c.handshake()
    if structured:
        c.structured_reply()
    if meta:
        c.meta_context(R.OPT_SET_META_CONTEXT, "", ["base:allocation"])
    c.go("")
    s.settimeout(0.3)
    return c


# ---- scenarios ------------------------------------------------------------------------------------
def sc_random_bytes(rng):
    s = connect()
    send_chunks(rng, s, sanitize(rng.randbytes(rng.randrange(0, 4096))))
    drain(s)
    s.close()


def sc_mutated_session(rng):
    data = session_stream(rng)
    if rng.random() < 0.8:
        data = mutate(rng, data)
    s = connect()
    drain(s, 64, 0.0)
    send_chunks(rng, s, sanitize(data))
    drain(s)
    s.close()


def sc_option_fuzz(rng):
    s = connect()
    drain(s, 18, 0.2)
    data = struct.pack(">I", 3) + b"".join(rand_option(rng) for _ in range(rng.randrange(1, 40)))
    if rng.random() < 0.3:
        data = mutate(rng, data)
    send_chunks(rng, s, sanitize(data))
    drain(s)
    s.close()


def sc_huge_option(rng):
    s = connect()
    drain(s, 18, 0.2)
    code = rng.choice([R.OPT_GO, R.OPT_EXPORT_NAME, R.OPT_INFO, R.OPT_LIST, R.OPT_SET_META_CONTEXT, 77])
    length = rng.choice([0xFFFFFFFF, 0x80000000, 64 * MiB, 4097, 16 * MiB])
    send_chunks(rng, s, struct.pack(">I", 3) + opt(code, rng.randbytes(rng.randrange(0, 20000)), length=length))
    if rng.random() < 0.3:
        time.sleep(0.1)
    drain(s)
    s.close()


def sc_request_fuzz(rng):
    s = connect()
    c = handshake_go(s, structured=rng.random() < 0.7, meta=rng.random() < 0.5)
    data = b"".join(rand_request(rng, h) for h in range(rng.randrange(1, 60)))
    if rng.random() < 0.5:
        data = mutate(rng, data)
    if rng.random() < 0.2:
        data += rng.randbytes(rng.randrange(1, 2000))     # garbage after valid requests
    send_chunks(rng, s, sanitize(data))
    if rng.random() < 0.7:
        drain(s, 4 * MiB, 0.05)
    c.sock.close()


def sc_oversized_write(rng):
    s = connect()
    handshake_go(s, structured=rng.random() < 0.5)
    length = rng.choice([32 * MiB + 1, 33 * MiB, 0xFFFFFFFF, 0x80000000, 64 * MiB])
    hdr = req(R.CMD_WRITE, SCRATCH, length, 0, 1)
    payload_len = rng.choice([0, 1, 4096, 1 * MiB, 3 * MiB])
    if length <= 33 * MiB and rng.random() < 0.15:
        payload_len = length       # the full payload: EINVAL, connection in sync
    send_chunks(rng, s, sanitize(hdr + rng.randbytes(payload_len)))
    if payload_len == length:
        # the connection must still work
        s.settimeout(5)
        try:
            s.sendall(req(R.CMD_READ, 0, 4096, 0, 2))
        except OSError:
            pass
    drain(s, 1 << 20, 0.1)
    s.close()


def sc_disconnect_mid_payload(rng):
    s = connect()
    handshake_go(s, structured=rng.random() < 0.5)
    length = rng.choice([4096, 65536, 1 * MiB, 32 * MiB])
    send_chunks(rng, s, sanitize(req(R.CMD_WRITE, SCRATCH + rng.randrange(0, 8 * MiB), length, 0, 7) +
                                 rng.randbytes(rng.randrange(0, length))))
    if rng.random() < 0.5:
        s.shutdown(socket.SHUT_WR)
        drain(s, 4096, 0.05)
    s.close()


def sc_read_flood(rng):
    """Many big READs whose replies are never read: the server must apply backpressure."""
    s = connect()
    handshake_go(s, structured=rng.random() < 0.5)
    n = rng.randrange(16, 64)
    data = b"".join(req(R.CMD_READ, rng.randrange(0, 2) * 32 * MiB, 32 * MiB, 0, h) for h in range(n))
    send_chunks(rng, s, data)
    time.sleep(rng.choice([0.05, 0.2, 0.5]))
    s.close()


def sc_half_open(rng):
    """Connections that stop mid-handshake and stay open until the end of the run."""
    s = connect()
    stage = rng.randrange(0, 4)
    if stage >= 1:
        drain(s, 18, 0.1)
    if stage >= 2:
        try:
            s.sendall(struct.pack(">I", 3))
        except OSError:
            pass
    if stage >= 3:
        try:
            s.sendall(opt(R.OPT_GO, b"")[:rng.randrange(1, 16)])
        except OSError:
            pass
    with lock:
        if len(held) < HELD_MAX:
            held.append(s)
            return
    s.close()


def sc_handshake_garbage_zeroes(rng):
    """Client that does not ask for NO_ZEROES and uses EXPORT_NAME, then random requests."""
    s = connect()
    drain(s, 18, 0.2)
    data = struct.pack(">I", 1) + opt(R.OPT_EXPORT_NAME, b"") + b"".join(
        rand_request(rng, h) for h in range(rng.randrange(0, 20)))
    send_chunks(rng, s, sanitize(mutate(rng, data) if rng.random() < 0.5 else data))
    drain(s)
    s.close()


SCENARIOS = [
    (sc_random_bytes, 10), (sc_mutated_session, 30), (sc_option_fuzz, 15), (sc_huge_option, 5),
    (sc_request_fuzz, 25), (sc_oversized_write, 4), (sc_disconnect_mid_payload, 5), (sc_read_flood, 1),
    (sc_half_open, 2), (sc_handshake_garbage_zeroes, 5),
]
NAMES = [f.__name__ for f, _ in SCENARIOS]
WEIGHTS = [w for _, w in SCENARIOS]


def probe(i):
    """A well-behaved client: the protected data must read back correctly."""
    rng = random.Random("%d-probe-%d" % (seed, i))
    try:
        s = connect(5)
        c = handshake_go(s, structured=True)
        s.settimeout(10)
        off = rng.randrange(0, PROTECT - 65536) & ~511
        r = c.read(off, 65536)
        if r.error or bytes(r.data) != PATTERN[off:off + 65536]:
            record_failure("probe after connection %d: wrong data or error %s at offset %d" %
                           (i, R.errname(r.error), off))
        d = rng.randbytes(4096)
        w = c.write(SCRATCH + rng.randrange(0, 1024) * 4096, d)
        if w.error:
            record_failure("probe after connection %d: write failed with %s" % (i, R.errname(w.error)))
        s.close()
    except Exception as e:  # noqa: BLE001
        record_failure("probe after connection %d failed: %s: %s" % (i, type(e).__name__, e))
    with lock:
        state["probes"] += 1


def worker(wid):
    while True:
        with lock:
            i = state["next"]
            if i >= args.max_conns or time.monotonic() > deadline or state["server_dead"]:
                return
            state["next"] += 1
        if ONLY is not None and str(i) != ONLY:
            continue
        rng = random.Random("%d-%d" % (seed, i))
        f = rng.choices([f for f, _ in SCENARIOS], WEIGHTS)[0]
        with lock:
            state["inflight"][wid] = (i, f.__name__)
            state["scenarios"][f.__name__] = state["scenarios"].get(f.__name__, 0) + 1
        try:
            f(rng)
        except (OSError, socket.timeout, R.Closed, R.ProtocolError, R.OptError, struct.error):
            pass   # the server may refuse or drop a hostile client at any point
        with lock:
            state["done"] += 1
            state["inflight"].pop(wid, None)
        if i % 250 == 249:
            probe(i)
        if not server_alive():
            with lock:
                if not state["server_dead"]:
                    state["server_dead"] = True
                    suspects = sorted([i] + [x for x, _ in state["inflight"].values()])
                    record_failure("server process died during connection %d (%s); connections in flight: %s; "
                                   "replay each with HOSTILE_SEED=%d HOSTILE_ONLY=<i>" %
                                   (i, f.__name__, suspects, seed))
            return


def sampler():
    while not stop_sampler.is_set():
        r = rss_kib()
        with lock:
            state["peak_rss"] = max(state["peak_rss"], r)
        if r > args.rss_limit_mib * 1024:
            record_failure("server RSS %d MiB exceeds the %d MiB limit (connections done: %d)" %
                           (r // 1024, args.rss_limit_mib, state["done"]))
            stop_sampler.wait(2)
        stop_sampler.wait(0.1)


rss_start = rss_kib()
stop_sampler = threading.Event()
samp = threading.Thread(target=sampler, daemon=True)
samp.start()
t0 = time.monotonic()
threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(args.threads)]
for t in threads:
    t.start()
for t in threads:
    t.join(args.max_seconds + 60)
    if t.is_alive():
        record_failure("a fuzzer thread is stuck (a connection did not time out)")
for s in held:
    try:
        s.close()
    except OSError:
        pass
elapsed = time.monotonic() - t0
time.sleep(0.5)
if server_alive():
    probe(-1)
else:
    if not state["server_dead"]:
        record_failure("server process died (seed %d)" % seed)
stop_sampler.set()
samp.join(2)
print("hostile: %d connections in %.1fs, %.1f MiB sent, %d probes, RSS start %d MiB peak %d MiB" %
      (state["done"], elapsed, state["bytes_sent"] / MiB, state["probes"], rss_start // 1024,
       state["peak_rss"] // 1024), flush=True)
print("hostile: scenarios: %s" % ", ".join("%s=%d" % (k, v) for k, v in sorted(state["scenarios"].items())),
      flush=True)
if state["failures"]:
    print("hostile: %d failure(s); seed %d" % (len(state["failures"]), seed), flush=True)
    for f in state["failures"][:20]:
        print("  - " + f, flush=True)
    sys.exit(1)
print("hostile: server survived (seed %d)" % seed, flush=True)
