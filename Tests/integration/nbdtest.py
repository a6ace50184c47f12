"""Helpers for integration tests written in Python (system python3 + python3-libnbd).

Import with `from nbdtest import *` (lib.sh puts this directory on PYTHONPATH).
"""

import atexit
import errno
import os
import random
import sys
import time

import nbd

MiB = 1 << 20
KiB = 1 << 10

ENAMES = {getattr(errno, n): n for n in ("EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "EOVERFLOW",
                                          "ENOTSUP", "ESHUTDOWN", "ERANGE", "ENOENT", "ENOTCONN")}

_checks = 0
_failures = []
# By default a failed check is reported and the script goes on, so that one run shows every
# mismatch; the process then exits 1 (see _at_exit). NBDTEST_FAIL_FAST=1 stops at the first one.
FAIL_FAST = os.environ.get("NBDTEST_FAIL_FAST", "") not in ("", "0")


def ename(e):
    return ENAMES.get(e, str(e))


class TestFailure(AssertionError):
    pass


def fail(msg):
    if FAIL_FAST:
        raise TestFailure(msg)
    _failures.append(msg)
    print("CHECK FAILED: " + msg, file=sys.stderr, flush=True)


def _at_exit():
    if _failures:
        print("%d check(s) failed:" % len(_failures), file=sys.stderr)
        for f in _failures:
            print("  - " + f, file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)


atexit.register(_at_exit)


def note(msg):
    print(msg, flush=True)


def check(cond, msg):
    global _checks
    _checks += 1
    if not cond:
        fail(msg)


def hexdiff(expected, actual, base=0):
    """Describe the first difference between two byte strings."""
    if len(expected) != len(actual):
        return "length %d != expected %d" % (len(actual), len(expected))
    for i in range(len(expected)):
        if expected[i] != actual[i]:
            return "first difference at offset %d (%#x): got %s expected %s" % (
                base + i, base + i, bytes(actual[i:i + 16]).hex(), bytes(expected[i:i + 16]).hex())
    return "no difference"


def check_data(expected, actual, what):
    global _checks
    _checks += 1
    if bytes(expected) != bytes(actual):
        fail("%s: data mismatch: %s" % (what, hexdiff(bytes(expected), bytes(actual))))


def pattern(n, seed):
    """Deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


def uri_for(sock, name=""):
    return "nbd+unix:///%s?socket=%s" % (name, sock)


class Conn:
    """A libnbd handle that records, through the debug callback, how many requests were actually sent
    to the server, so that error checks prove the error came from the server and not from libnbd."""

    def __init__(self, uri, meta=True, strict=None, debug=True, structured=True):
        self.log_sent = 0
        self.h = nbd.NBD()
        if debug:
            self.h.set_debug_callback(self._debug)
            self.h.set_debug(True)
        if not structured:
            self.h.set_request_structured_replies(False)
        if meta:
            self.h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        self.h.connect_uri(uri)
        if strict is not None:
            self.h.set_strict_mode(strict)

    def _debug(self, ctx, msg):
        if "-> ISSUE_COMMAND.SEND_REQUEST" in msg:
            self.log_sent += 1

    def __getattr__(self, name):
        return getattr(self.h, name)


def connect(uri, **kw):
    return Conn(uri, **kw)


def expect_err(conn, errnos, what, fn, *args, **kw):
    """Run fn(*args); it must fail with one of errnos *as reported by the server*."""
    global _checks
    _checks += 1
    if isinstance(errnos, int):
        errnos = (errnos,)
    before = conn.log_sent if isinstance(conn, Conn) else None
    try:
        fn(*args, **kw)
    except nbd.Error as e:
        if isinstance(conn, Conn) and conn.log_sent == before:
            fail("%s: libnbd refused the request client-side (%s); it never reached the server" %
                 (what, e.string))
        elif e.errnum not in errnos:
            fail("%s: expected %s, got %s (%s)" % (what, "/".join(ename(x) for x in errnos),
                                                   ename(e.errnum), e.string))
        else:
            note("ok: %s -> %s" % (what, ename(e.errnum)))
        return e.errnum
    fail("%s: expected %s but the request succeeded" % (what, "/".join(ename(x) for x in errnos)))
    return None


def expect_ok(what, fn, *args, **kw):
    global _checks
    _checks += 1
    try:
        r = fn(*args, **kw)
    except nbd.Error as e:
        fail("%s: expected success, got %s (%s)" % (what, ename(e.errnum), e.string))
        return None
    note("ok: %s" % what)
    return r


def block_status_list(h, length, offset, flags=0, context=nbd.CONTEXT_BASE_ALLOCATION):
    """Return [(length, flags), ...] for one BLOCK_STATUS request."""
    out = []

    def cb(metacontext, off, entries, err):
        if metacontext == context:
            for i in range(0, len(entries), 2):
                out.append((entries[i], entries[i + 1]))
        return 0

    h.block_status(length, offset, cb, flags)
    return out


def done():
    if not _failures:
        note("PASS (%d checks)" % _checks)


# ---- nbdkit log filter (sources of lazy exports) -------------------------------------------------

def log_mark(path):
    """Number of lines in an nbdkit log now (0 if it does not exist): a mark for source_requests."""
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def source_requests(path, skip=0):
    """Requests logged by nbdkit's log filter after the first `skip` lines, in log order:
    [(command, offset, count), ...]; offset/count are None for requests without them (Flush).
    Connect/Disconnect/Preconnect lines and the "...X return=" completion lines are left out."""
    out = []
    try:
        f = open(path)
    except FileNotFoundError:
        return out
    with f:
        for n, line in enumerate(f):
            if n < skip:
                continue
            words = line.split()
            cmd = off = cnt = None
            for i, w in enumerate(words):
                if w.startswith("id=") and i > 0:
                    prev = words[i - 1]
                    if not prev.startswith("...") and not prev.startswith("connection=") and \
                            prev not in ("Preconnect", "Connect", "Disconnect"):
                        cmd = prev
                elif w.startswith("offset=0x"):
                    off = int(w[7:], 16)
                elif w.startswith("count=0x"):
                    cnt = int(w[6:], 16)
            if cmd is not None:
                out.append((cmd, off, cnt))
    return out


def source_reads(path, skip=0):
    """[(offset, count), ...] of the Read requests in an nbdkit log after the first `skip` lines."""
    return [(o, c) for (cmd, o, c) in source_requests(path, skip) if cmd == "Read"]


def page_coverage(reads, size, page=4096):
    """For each page of a `size`-byte export, the (offset, count) reads that covered it."""
    cover = [[] for _ in range(size // page)]
    for o, c in reads:
        for p in range(o // page, min((o + c + page - 1) // page, size // page)):
            cover[p].append((o, c))
    return cover


def overlapping(reads, offset, length):
    """The (offset, count) reads that overlap [offset, offset+length)."""
    return [(o, c) for (o, c) in reads if o < offset + length and offset < o + c]


# ---- the page pattern of the nbd-mmap tool (scripts/nbd-mmap.c) -------------------------------------
_M64 = (1 << 64) - 1


def _splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mmap_magic(seed):
    """Word 0 of every page nbd-mmap writes with SEED (8 bytes, little-endian)."""
    return (0x4E42444D4D415000 + (seed & 0xFF)).to_bytes(8, "little")


def mmap_page(seed, p, page_size=4096):
    """The bytes nbd-mmap writes into page P with SEED: the magic, P, then splitmix64 words."""
    words = [0x4E42444D4D415000 + (seed & 0xFF), p]
    words += [_splitmix64(((seed << 40) ^ (p << 12) ^ w) & _M64) for w in range(2, page_size // 8)]
    return b"".join(w.to_bytes(8, "little") for w in words)
