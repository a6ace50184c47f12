#!/usr/bin/env python3
"""Writes the seed corpus of each fuzz target into Corpus/<target>/, from the byte sequences the unit
tests use (Tests/NbdPagerTests: StateMachineTests, WireTests, ValidatorTests, PageStateMapTests,
PageStoreTests, SwapSlotsTests). The input layout of each target is described at the top of its source
file.

Usage: FuzzTesting/make-seeds.py   (rewrites the corpus; the files are committed)
"""
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def be(fmt, *v):
    return struct.pack(">" + fmt, *v)


def le(fmt, *v):
    return struct.pack("<" + fmt, *v)


# ---- NBD wire (as Tests/NbdPagerTests/TestSupport.swift's Wire) --------------------------------
IHAVEOPT = 0x49484156454F5054
REQUEST = 0x25609513
OPT = dict(export_name=1, abort=2, list=3, starttls=5, info=6, go=7, structured=8, list_meta=9, set_meta=10)
CMD = dict(read=0, write=1, disc=2, flush=3, trim=4, cache=5, write_zeroes=6, block_status=7)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16


def string(s):
    b = s.encode()
    return be("I", len(b)) + b


def option(code, payload=b""):
    return be("QII", IHAVEOPT, code, len(payload)) + payload


def info(name, requests=()):
    return string(name) + be("H", len(requests)) + b"".join(be("H", r) for r in requests)


def meta(name, queries):
    return string(name) + be("I", len(queries)) + b"".join(string(q) for q in queries)


def request(cmd, cookie, offset, length, flags=0, magic=REQUEST):
    return be("IHHQQI", magic, flags, CMD[cmd] if isinstance(cmd, str) else cmd, cookie, offset, length)


def pattern(n, seed=1):
    return bytes((i * 31 + seed * 7 + 1) & 0xFF for i in range(n))


FLAGS = be("I", 3)  # FIXED_NEWSTYLE | NO_ZEROES
GO_DISK = option(OPT["go"], info("disk"))
STRUCTURED_META_GO = (option(OPT["structured"]) + option(OPT["set_meta"], meta("disk", ["base:allocation"]))
                      + option(OPT["go"], info("disk", [3])))


def state_machine():
    """config byte (bit 0 read-only, bits 1-2 block size), chunking byte (0 all, 1 byte by byte, else
    random sizes), 2 seed bytes, then the client's bytes."""
    rw, ro, aligned = 0x00, 0x01, 0x02  # aligned: minimum block size 512
    whole, bytewise, random = 0x00, 0x01, 0x1E
    seeds = {
        "whole-handshake": (rw, whole, FLAGS + STRUCTURED_META_GO + request("read", 5, 0, 512)),
        "whole-handshake-bytewise": (aligned, bytewise, FLAGS + STRUCTURED_META_GO + request("read", 5, 0, 512)),
        "export-name-no-zeroes": (rw, random, FLAGS + option(OPT["export_name"], b"disk") + request("read", 1, 0, 4096)),
        "export-name-zeroes": (rw, whole, be("I", 1) + option(OPT["export_name"], b"other")),
        "export-name-default": (rw, whole, FLAGS + option(OPT["export_name"]) + request("flush", 1, 0, 0)),
        "export-name-unknown": (rw, whole, FLAGS + option(OPT["export_name"], b"nope")),
        "unknown-client-flags": (rw, whole, be("I", 4)),
        "list-info-abort": (rw, random, FLAGS + option(OPT["list"]) + option(OPT["info"], info("disk", [0, 1, 2, 3]))
                            + option(OPT["abort"])),
        "list-with-data": (rw, whole, FLAGS + option(OPT["list"], b"x") + GO_DISK),
        "unknown-option-then-go": (rw, random, FLAGS + option(99, b"abc") + option(OPT["starttls"]) + GO_DISK),
        "malformed-go": (rw, whole, FLAGS + option(OPT["go"], b"\x00\x00\x00\x09di") + GO_DISK),
        "go-unknown-export": (rw, whole, FLAGS + option(OPT["go"], info("missing")) + option(OPT["go"], info(""))),
        "meta-context": (rw, random, FLAGS + option(OPT["list_meta"], meta("disk", [])) + option(OPT["structured"])
                         + option(OPT["structured"]) + option(OPT["list_meta"], meta("disk", ["base:"]))
                         + option(OPT["set_meta"], meta("other", ["base:allocation"]))
                         + option(OPT["set_meta"], meta("disk", ["x:y"])) + GO_DISK
                         + request("block_status", 1, 0, 4096, REQ_ONE)),
        "bad-option-magic": (rw, whole, FLAGS + be("QII", 0x1122334455667788, 7, 0)),
        "option-too-long": (rw, whole, FLAGS + be("QII", IHAVEOPT, 7, 65537)),
        "too-many-options": (rw, whole, FLAGS + option(OPT["structured"]) * 257),
        "pipelined": (rw, random, FLAGS + GO_DISK + request("write", 1, 0, 8) + pattern(8) + request("read", 2, 0, 8)
                      + request("flush", 3, 0, 0) + request("read", 4, 2**64 - 1, 8) + request("disc", 5, 0, 0)
                      + request("read", 6, 0, 8)),
        "every-command": (rw, bytewise, FLAGS + STRUCTURED_META_GO + request("read", 1, 0, 4096, DF)
                          + request("write", 2, 4096, 16, FUA) + pattern(16) + request("flush", 3, 0, 0)
                          + request("trim", 4, 0, 4096, FUA) + request("cache", 5, 0, 4096)
                          + request("write_zeroes", 6, 0, 4096, NO_HOLE | FAST_ZERO)
                          + request("block_status", 7, 0, 1 << 20, REQ_ONE) + request("disc", 8, 0, 0)),
        "invalid-write-discarded": (ro, bytewise, FLAGS + GO_DISK + request("write", 9, 4090, 100) + pattern(100)
                                    + request("read", 10, 0, 4096)),
        "invalid-write-pipelined": (ro, random, FLAGS + GO_DISK + request("write", 1, 0, 16) + b"\xee" * 16
                                    + request("read", 2, 0, 16) + request("trim", 3, 0, 16)
                                    + request("write_zeroes", 4, 0, 16)),
        "oversize-write": (rw, random, FLAGS + GO_DISK + request("write", 0x33, 0, 32 * 1024 * 1024 + 1) + b"\x00" * 3000),
        "unaligned": (aligned, random, FLAGS + GO_DISK + request("read", 1, 1, 512) + request("write", 2, 512, 100)
                      + pattern(100) + request("read", 3, 0, 512)),
        "bad-request-magic": (rw, whole, FLAGS + GO_DISK + request("read", 1, 0, 512, magic=0x25609514)),
        "unknown-command": (rw, whole, FLAGS + GO_DISK + request(9, 1, 0, 512) + request("read", 2, 0, 512, 1 << 7)),
    }
    # WireTests' option payloads, valid and malformed, one option each (the session survives them).
    good_info = info("disk", [1, 3])
    infos = [good_info, info(""), info("ünï", [2]), info("a" * 4096, [0]), b"", be("I", 4),
             be("I", 10) + b"disk" + be("H", 0), string("disk"), string("disk") + be("HHH", 3, 1, 3),
             string("disk") + be("HHH", 1, 1, 3), good_info + b"\x00", string("disk") + be("H", 1) + b"\x00\x01\x02",
             info("a" * 4097), be("I", 3) + b"a\x00b" + be("H", 0), be("I", 2) + b"\xff\xfe" + be("H", 0),
             be("I", 0xFFFFFFFF) + be("H", 0)]
    seeds["wire-info-payloads"] = (rw, random, FLAGS + b"".join(option(OPT["info"], p) for p in infos) + GO_DISK)
    good_meta = meta("disk", ["base:allocation"])
    metas = [meta("disk", ["base:allocation", "qemu:dirty-bitmap:x"]), meta("", []), meta("d", ["base:"] * 128),
             b"", string("disk"), string("disk") + be("I", 2) + string("base:allocation"),
             string("disk") + be("I", 0) + string("base:allocation"),
             string("disk") + be("II", 1, 20) + b"base:", good_meta + b"\x01\x02\x03", be("I", 50) + b"disk",
             meta("d", ["q" * 4097]), be("I", 2) + b"d\x00" + be("I", 0),
             string("d") + be("II", 1, 5) + b"ba\x00e:", meta("d", ["base:"] * 129), string("d") + be("I", 0xFFFFFFFF)]
    seeds["wire-meta-payloads"] = (rw, random, FLAGS + option(OPT["structured"])
                                   + b"".join(option(OPT["list_meta"], p) + option(OPT["set_meta"], p) for p in metas)
                                   + GO_DISK + request("block_status", 1, 0, 4096))
    # WireTests' request header: WRITE_ZEROES with FUA|FAST_ZERO at 4 GiB + 512 (past the 1 GiB export).
    seeds["wire-request-header"] = (rw, bytewise, FLAGS + GO_DISK + request(6, 0x1122334455667788, 0x100000200, 0x100000, 0x11)
                                    + request(6, 1, 0x200, 0x100000, 0x11) + request("read", 2, 0, 1, magic=0xDEADBEEF))
    return {k: bytes([c, ch, 0x5A, 0xA5]) + s for k, (c, ch, s) in seeds.items()}


def validator():
    """caps, more (bits 0-2 block size, bit 7 size mod 2^32), u64 size, session (bit 0 structured,
    bit 1 meta context), then flags u16, type u16, cookie u64, offset u64, length u32 (little-endian)."""
    mib = 1 << 20
    size = 128 * mib
    rw, ro = 0xFE, 0xFF
    nf = 0x80 | 0x20 | 0x04  # no flush, trim, zero, cache
    simple, structured, meta_ = 0, 1, 3
    big = 32 * mib
    cases = {
        "unknown-command": (rw, 0, size, meta_, 0, 8, 512, 0),
        "unknown-flag": (rw, 0, size, structured, 1 << 5, CMD["read"], 512, 0),
        "df-structured": (rw, 0, size, structured, DF, CMD["read"], 512, 0),
        "df-simple": (rw, 0, size, simple, DF, CMD["read"], 512, 0),
        "read-max": (rw, 0, size, simple, 0, CMD["read"], big, 0),
        "read-over-max-df": (rw, 0, size, structured, DF, CMD["read"], big + 1, 0),
        "write-fua": (rw, 0, size, simple, FUA, CMD["write"], 4096, 4096),
        "write-ro": (ro, 0, size, simple, 0, CMD["write"], 4096, 0),
        "write-past-end": (rw, 0, size, simple, 0, CMD["write"], 4096, size - 1),
        "write-zeroes-fast": (rw, 0, size, simple, NO_HOLE | FAST_ZERO, CMD["write_zeroes"], 4096, 0),
        "trim-unsupported": (nf, 0, size, simple, 0, CMD["trim"], 4096, 0),
        "flush-range": (rw, 0, size, simple, 0, CMD["flush"], 1, 0),
        "flush": (rw, 0, size, simple, 0, CMD["flush"], 0, 0),
        "cache": (rw, 0, size, simple, 0, CMD["cache"], 4096, 0),
        "block-status": (rw, 0, size, meta_, REQ_ONE, CMD["block_status"], 4096, 0),
        "block-status-no-meta": (rw, 0, size, structured, 0, CMD["block_status"], 4096, 0),
        "aligned-misaligned": (rw, 1, size, simple, 0, CMD["read"], 512, 100),
        "offset-overflow": (rw, 0, size, simple, 0, CMD["read"], 8, 2**64 - 1),
        "disconnect": (rw, 0, size, simple, 0, CMD["disc"], 0, 0),
        "zero-length": (rw, 0, size, simple, 0, CMD["read"], 0, 0),
        # WireTests' request header, against an export large enough for it
        "wire-request-header": (rw, 0, 1 << 33, simple, 0x11, CMD["write_zeroes"], 0x100000, 0x100000200),
    }
    out = {}
    for name, (caps, more, sz, sess, flags, typ, length, offset) in cases.items():
        out[name] = bytes([caps, more]) + le("Q", sz) + bytes([sess]) + le("HHQQI", flags, typ, 0x1234, offset, length)
    return out


def encode_map(states):
    b = bytearray((len(states) + 3) // 4)
    for p, s in enumerate(states):
        b[p // 4] |= s << (2 * (p % 4))
    return bytes(b)


def state_map():
    """u16 page count, mode (bit 0 fix the length, bit 1 mark local), then the map bytes."""
    out = {
        "wrong-length": le("H", 16) + b"\x00" + bytes(3),
        "invalid-state": le("H", 16) + b"\x00" + bytes([0, 0b00001100, 0, 0]),
        "padding": le("H", 5) + b"\x00" + bytes([0, 0b00000100]),
        "valid-5": le("H", 5) + b"\x00" + bytes([0, 0b00000010]),
        "layout-6": le("H", 6) + b"\x02" + bytes([0b00100100, 0b00000010]),
    }
    for n in (1, 3, 31, 32, 33, 65, 1000):
        states = [1 if p < n // 3 else 2 if p >= n // 2 else 0 for p in range(n)]
        out[f"round-trip-{n}"] = le("H", n) + b"\x00" + encode_map(states)
    return out


# ---- page store (as Sources/NbdPager/Store/PageStore.swift documents the state file) ------------
def crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


SIZE, PAGE, IDENTITY = 64 * 4096 + 1000, 4096, b"nbd+unix:///disk?socket=/run/source.sock"
PAGES = (SIZE + PAGE - 1) // PAGE
SLOT_LEN = 32 + (PAGES + 3) // 4
STRIDE = (SLOT_LEN + 4095) // 4096 * 4096


def header(size=SIZE, page=PAGE, identity=IDENTITY, version=1):
    pages = (size + page - 1) // page
    stride = (32 + (pages + 3) // 4 + 4095) // 4096 * 4096
    h = bytearray(8192)
    h[0:56] = b"NBDUMEMD" + le("IIQQQQII", version, 8192, page, size, pages, stride, len(identity), 0)
    h[56:56 + len(identity)] = identity
    h[8188:] = le("I", crc32c(h[:8188]))
    return bytes(h)


def slot(generation, states):
    m = encode_map(states)
    head = b"UMEMSLOT" + le("QQ", generation, len(m))
    return head + le("II", crc32c(head + m), 0) + m


def store(fix, marks, hdr, slot_a, slot_b=b""):
    return bytes([fix, marks]) + le("H", len(hdr)) + hdr + le("H", len(slot_a)) + slot_a + slot_b


def page_store():
    """fix-up byte, marks byte, u16 header length + header, u16 slot A length + slot A, slot B."""
    fresh = [0] * PAGES
    mixed = [1 if p < 20 else 2 if p > 40 else 0 for p in range(PAGES)]
    h = header()
    return {
        "fixups-only": bytes([0x0F, 0x00]),
        "fixups-from-header": bytes([0x1F, 0x31]) + le("H", 56) + header(size=3 * 512 + 7, page=512)[:56],
        "valid-fresh": store(0x00, 0x00, h, slot(1, fresh)),
        "valid-two-slots": store(0x00, 0x25, h, slot(7, mixed), slot(8, fresh)),
        "torn-newest-slot": store(0x00, 0x00, h, slot(7, mixed), slot(8, mixed)[:-3] + b"\xff\xff\xff"),
        "both-slots-bad": store(0x00, 0x00, h, slot(1, fresh)[:-1] + b"\x01"),
        "header-checksum": store(0x00, 0x00, h[:100] + b"\x01" + h[101:], slot(1, fresh)),
        "version-2": store(0x00, 0x00, header(version=2), slot(1, fresh)),
        "other-identity": store(0x00, 0x00, header(identity=b"nbd://elsewhere/"), slot(1, fresh)),
        "other-size": store(0x00, 0x00, header(size=SIZE + 4096), slot(1, fresh)),
        "other-page-size": store(0x00, 0x00, header(page=512), slot(1, fresh)),
        "missing-data": store(0x20, 0x00, h, slot(1, fresh)),
        "data-too-long": store(0x40, 0x00, h, slot(1, fresh)),
        "truncated": store(0x80, 0x00, h[:4000], b""),
        "max-generation": store(0x00, 0x01, h, slot(2**64 - 1, mixed)),
        "last-valid-generation": store(0x00, 0x31, h, slot(2**64 - 2, mixed)),
    }


# ---- swap slot table (as Sources/NbdPager/Swap/SwapSlots.swift writes DIR/slots) ---------------------
SWAP_SLOTS, SWAP_SOURCE_PAGES, SWAP_FIELDS, SWAP_MAX_PATH = 64, 32, 72, 4096


def slots_file(staging=0, table=(), path=b"", staged=0, duplicates=0, slots=SWAP_SLOTS,
               source_pages=SWAP_SOURCE_PAGES, page=PAGE, version=1, raw_entries=(), path_length=None):
    """A slots file: 72 bytes of fields, the RAM file path area, then per slot (source page + 1) or 0.
    `table` maps slot -> source page; `raw_entries` maps slot -> the stored word as is."""
    header_size = SWAP_FIELDS + SWAP_MAX_PATH
    f = bytearray(header_size + slots * 4)
    f[0:56] = b"UMEMSWPT" + le("IIQQQQQ", version, staging, slots, source_pages, page, staged, duplicates)
    f[56:60] = le("I", len(path) if path_length is None else path_length)
    f[SWAP_FIELDS:SWAP_FIELDS + len(path)] = path
    for s, p in dict(table).items():
        f[header_size + 4 * s:header_size + 4 * s + 4] = le("I", p + 1)
    for s, e in dict(raw_entries).items():
        f[header_size + 4 * s:header_size + 4 * s + 4] = le("I", e)
    f[60:64] = le("I", crc32c(f[SWAP_FIELDS:]))
    f[64:68] = le("I", crc32c(f[:64]))
    return bytes(f)


def swap_input(fix, file, ops=b""):
    return bytes([fix]) + le("H", len(file)) + file + ops


# Operations (see FuzzSwapSlots.swift), and edits of a marker (a lone 0 byte: the exact marker).
def op_open(path=b"/dev/shm/ram", length=None):
    return bytes([0]) + le("H", len(path) if length is None else length) + bytes([len(path)]) + path


OP_OPEN_NO_PATH = bytes([0x08]) + le("H", 0) + b"\x00"
OP_SEAL, OP_COMMIT = b"\x04", b"\x05"


def op_write(slot, page, edits=b"\x00"):
    return bytes([1, slot, page]) + edits


def op_map(slot, page):
    return bytes([2, slot, page])


def op_unmap(a, b):
    return bytes([3, a, b])


def op_decode(k0, k1, page, edits=b"\x00"):
    return bytes([6]) + le("QQQ", k0, k1, page) + edits


def op_scan(a, b, x, y):
    return bytes([7]) + le("HHHH", a, b, x, y)


EDIT_SHORT = b"\x01" + le("H", 100)             # 100 bytes: starts with the magic, not a marker
EDIT_LONG = b"\x02\x00"                        # 4097 bytes
EDIT_TAG = b"\x08" + le("H", 16) + b"\x01"       # authenticator changed
EDIT_TAIL = b"\x04" + le("H", 4095) + b"\x01\x01"  # a non-zero byte after the marker
EDIT_KEY = b"\x10\x05"                          # another key
EDIT_FAR_PAGE = b"\x20" + le("Q", 2**32 + 3)     # a page beyond the source
EDIT_ZERO = b"\x40"                             # an all-zero slot (data)


def swap_slots():
    """fix-up byte, u16 file length + slots file, then operations."""
    staged = {2: 5, 3: 6, 4: 7, 10: 0, 11: 31, 20: 5}    # slot 20 repeats page 5
    sealed = slots_file(staging=2, table=staged, path=b"/dev/shm/ram-of-this-run", staged=6, duplicates=1,
                        raw_entries={30: SWAP_SOURCE_PAGES + 1, 31: 0xFFFFFFFF})
    interrupted = slots_file(staging=0, table={1: 2, 2: 3, 5: 9}, path=b"/dev/shm/ram")
    fresh = slots_file()
    staging = (op_open() + op_write(8, 3) + op_write(9, 4) + op_write(10, 5) + op_write(11, 3)
               + op_write(12, 6, EDIT_TAG) + op_write(13, 7, EDIT_KEY) + op_write(14, 8, EDIT_SHORT)
               + op_write(15, 33) + op_write(16, 1, EDIT_FAR_PAGE) + op_write(17, 2, EDIT_ZERO)
               + op_write(63, 31) + op_map(40, 20) + op_map(41, 20) + op_unmap(9, 10) + op_write(8, 9, EDIT_TAIL)
               + op_scan(0, 64, 0, 32 * 256) + OP_COMMIT + op_open(b"/dev/shm/ram2") + op_write(0, 0)
               + op_write(1, 1) + op_write(2, 2) + OP_SEAL + op_write(1, 1) + op_unmap(0, 1) + OP_SEAL
               + op_open() + OP_COMMIT + op_scan(0, 70, 5, 40 * 256))
    return {
        "fixups-only": swap_input(0x7F, b""),
        "fixups-from-garbage": swap_input(0x7F, bytes((i * 37 + 11) & 0xFF for i in range(4500))),
        "valid-fresh": swap_input(0x00, fresh),
        "valid-sealed": swap_input(0x00, sealed, op_scan(0, 66, 0, 32 * 256) + op_unmap(2, 4) + OP_COMMIT
                                   + op_open() + OP_SEAL),
        "valid-interrupted": swap_input(0x00, interrupted, op_unmap(1, 2) + OP_COMMIT + op_open(b"", 0)
                                        + op_write(3, 3) + OP_COMMIT),
        "longer-file": swap_input(0x00, sealed + b"\x00" * 16),
        "truncated": swap_input(0x00, fresh[:-1]),
        "short-fields": swap_input(0x00, fresh[:60]),
        "header-checksum": swap_input(0x00, fresh[:64] + b"\x01" + fresh[65:]),
        "body-checksum": swap_input(0x00, fresh[:-1] + b"\x01"),
        "version-2": swap_input(0x00, slots_file(version=2)),
        "other-slot-count": swap_input(0x00, slots_file(slots=65)),
        "other-source": swap_input(0x00, slots_file(source_pages=33)),
        "other-page-size": swap_input(0x00, slots_file(page=512)),
        "path-too-long": swap_input(0x00, slots_file(path=b"/" * 4096, path_length=4097)),
        "staging": swap_input(0x80, b"", staging),
        "staging-long-path": swap_input(0x80, b"", op_open(b"/dev/shm/\xc3\xa9", 4150) + op_write(0, 0) + OP_COMMIT
                                        + OP_OPEN_NO_PATH + op_write(1, 1) + OP_SEAL + OP_COMMIT),
        "markers": swap_input(0x80, b"", op_decode(0x0706050403020100, 0x0f0e0d0c0b0a0908, 7)
                              + op_decode(1, 2, 0) + op_decode(1, 2, 2**64 - 1, EDIT_TAG)
                              + op_decode(1, 2, 3, EDIT_SHORT) + op_decode(1, 2, 3, EDIT_LONG)
                              + op_decode(1, 2, 3, EDIT_TAIL) + op_decode(1, 2, 3, EDIT_KEY)
                              + op_decode(1, 2, 3, EDIT_ZERO) + op_decode(1, 2, 3, b"\x03" + le("H", 8))),
    }


def main():
    corpus = os.path.join(HERE, "Corpus")
    for target, seeds in [("FuzzStateMachine", state_machine()), ("FuzzValidator", validator()),
                          ("FuzzStateMap", state_map()), ("FuzzPageStore", page_store()),
                          ("FuzzSwapSlots", swap_slots())]:
        d = os.path.join(corpus, target)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for name, data in seeds.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        print(f"{target}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
