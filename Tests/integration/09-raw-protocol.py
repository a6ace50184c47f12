"""Protocol-level checks with a raw socket client (nbdraw). Usage: 09-raw-protocol.py SOCK NAMED_SOCK

SOCK serves a 64 MiB --memory export with the default name; NAMED_SOCK serves export "disk1"
with description "raw test disk".
"""
import struct
import sys
import traceback

from nbdraw import *
from nbdtest import check, check_data, fail, note, pattern

SOCK, NAMED = sys.argv[1], sys.argv[2]
MiB = 1 << 20
SIZE = 64 * MiB
RW_FLAGS = (TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES |
            TF_SEND_FAST_ZERO | TF_SEND_CACHE | TF_CAN_MULTI_CONN)

tests = []


def test(fn):
    tests.append(fn)
    return fn


def client(path=SOCK, **kw):
    return RawClient(path, **kw)


def ready(path=SOCK, name="", meta=("base:allocation",), structured=True, infos=()):
    c = client(path)
    info = c.connect_default(name, structured=structured, meta=meta if structured else (), infos=infos)
    return c, info


def expect_error(c, what, errno_set, cmd, offset=0, length=0, flags=0, data=b""):
    if isinstance(errno_set, int):
        errno_set = (errno_set,)
    r = c.cmd(cmd, offset, length, flags, data)
    check(r.error in errno_set, "%s: expected %s, got %s (%r)" % (
        what, "/".join(errname(e) for e in errno_set), errname(r.error), r))
    if cmd == CMD_READ and c.structured:
        check(r.structured, "%s: error for READ sent as a simple reply although structured replies "
                            "were negotiated" % what)
    return r


def read_ok(c, offset, length, expected, what):
    r = c.read(offset, length)
    check(r.error == 0, "%s: READ failed with %s" % (what, errname(r.error)))
    if r.error == 0:
        check_data(expected, r.data, what)


# ---------------------------------------------------------------------------------------------
@test
def handshake_flags():
    c = client()
    flags = c.handshake()
    check(flags & FLAG_FIXED_NEWSTYLE, "handshake flags %#x lack FIXED_NEWSTYLE" % flags)
    check(flags & FLAG_NO_ZEROES, "handshake flags %#x lack NO_ZEROES" % flags)
    check(flags & ~3 == 0, "handshake flags %#x have unknown bits" % flags)
    c.close()


@test
def transmission_flags():
    c, info = ready()
    f = info["flags"]
    check(f & RW_FLAGS == RW_FLAGS, "transmission flags %#x lack some of %#x" % (f, RW_FLAGS))
    check(f & TF_SEND_DF, "structured replies negotiated but SEND_DF not set (%#x)" % f)
    check(not f & TF_READ_ONLY, "READ_ONLY set on a writable export (%#x)" % f)
    check(info["size"] == SIZE, "size %r" % info["size"])
    c.close()
    c = client()
    c.handshake()
    info = c.go("")
    check(not info["flags"] & TF_SEND_DF, "SEND_DF set without structured replies (%#x)" % info["flags"])
    c.close()


@test
def unknown_option_then_go():
    c = client()
    c.handshake()
    for opt in (0x12345, 200, 4, 0x7FFFFFFF):
        rep = c.opt_simple(opt, b"some option data")
        check(len(rep) == 1 and rep[0][0] == REP_ERR_UNSUP,
              "unknown option %#x: expected ERR_UNSUP, got %s" % (opt, [repname(r) for r, _ in rep]))
    # STARTTLS without TLS support: an error reply, never ACK
    rep = c.opt_simple(OPT_STARTTLS)
    check(rep[-1][0] & 0x80000000, "STARTTLS: expected an error reply, got %s" % repname(rep[-1][0]))
    c.structured_reply()
    info = c.go("")
    check(info["size"] == SIZE, "GO after unknown options: size %r" % info.get("size"))
    c.write(4096, pattern(4096, 1))
    read_ok(c, 4096, 4096, pattern(4096, 1), "read after unknown options")
    c.close()


@test
def opt_info_and_go_details():
    c = client(NAMED)
    c.handshake()
    info = c.info("disk1", [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE])
    check(info.get("size") == 8 * MiB, "INFO size %r" % info.get("size"))
    check(info.get("block_size") == (1, 4096, 32 * MiB), "INFO block size %r" % (info.get("block_size"),))
    check(info.get("name") == "disk1", "INFO name %r" % info.get("name"))
    check(info.get("description") == "raw test disk", "INFO description %r" % info.get("description"))
    # after INFO the session is still in negotiation: GO works
    info = c.go("disk1", [INFO_BLOCK_SIZE])
    check(info.get("size") == 8 * MiB, "GO size %r" % info.get("size"))
    check(INFO_EXPORT in info.get("types", []), "GO did not send INFO_EXPORT")
    check(info.get("block_size") == (1, 4096, 32 * MiB), "GO block size %r" % (info.get("block_size"),))
    read_ok(c, 0, 512, bytes(512), "read on named export")
    c.close()


@test
def opt_list():
    for path, names in ((SOCK, [""]), (NAMED, ["disk1"])):
        c = client(path)
        c.handshake()
        rep = c.opt_simple(OPT_LIST)
        check(rep[-1][0] == REP_ACK, "LIST final reply %s" % repname(rep[-1][0]))
        got = []
        for rtype, data in rep[:-1]:
            check(rtype == REP_SERVER, "LIST reply type %s" % repname(rtype))
            (n,) = struct.unpack(">I", data[:4])
            check(n <= len(data) - 4, "LIST name length %d > payload" % n)
            got.append(data[4:4 + n].decode())
        check(got == names, "LIST returned %r, expected %r" % (got, names))
        # LIST with data is invalid; an error reply, and the session goes on
        rep = c.opt_simple(OPT_LIST, b"xx")
        check(rep[-1][0] & 0x80000000, "LIST with payload: expected an error reply, got %s" % repname(rep[-1][0]))
        c.go(names[0])
        r = c.read(0, 512)
        check(r.error == 0 and len(r.data) == 512, "read after LIST: %r" % r)
        c.close()


@test
def meta_contexts():
    c = client()
    c.handshake()
    c.structured_reply()
    ctx = c.meta_context(OPT_LIST_META_CONTEXT, "", [])
    check("base:allocation" in [n for _, n in ctx], "LIST_META_CONTEXT (all) returned %r" % ctx)
    ctx = c.meta_context(OPT_LIST_META_CONTEXT, "", ["base:allocation"])
    check([n for _, n in ctx] == ["base:allocation"], "LIST_META_CONTEXT base:allocation returned %r" % ctx)
    ctx = c.meta_context(OPT_LIST_META_CONTEXT, "", ["x-nosuch:thing"])
    check(ctx == [], "LIST_META_CONTEXT of an unknown context returned %r" % ctx)
    ctx = c.meta_context(OPT_SET_META_CONTEXT, "", ["base:allocation"])
    check(len(ctx) == 1 and ctx[0][1] == "base:allocation", "SET_META_CONTEXT returned %r" % ctx)
    cid = ctx[0][0] if ctx else None
    c.go("")
    c.write(1 * MiB, pattern(65536, 2))
    r = c.cmd(CMD_BLOCK_STATUS, 1 * MiB - 65536, 4 * 65536)
    check(r.error == 0 and r.structured, "BLOCK_STATUS: %r" % r)
    check(list(r.extents) == [cid], "BLOCK_STATUS context ids %r, expected [%r]" % (list(r.extents), cid))
    ext = r.extents.get(cid, [])
    check(len(ext) >= 2, "BLOCK_STATUS extents %r" % ext)
    if len(ext) >= 2:
        check(ext[0] == (65536, 3), "first extent %r, expected (65536, hole|zero)" % (ext[0],))
        check(ext[1][1] & 1 == 0, "written range reported as hole: %r" % (ext[1],))
    check(sum(l for l, _ in ext[:-1]) < 4 * 65536, "extents exceed request: %r" % ext)
    check(all(l > 0 for l, _ in ext), "zero-length extent: %r" % ext)
    r = c.cmd(CMD_BLOCK_STATUS, 1 * MiB - 65536, 4 * 65536, CMD_FLAG_REQ_ONE)
    ext = r.extents.get(cid, [])
    check(r.error == 0 and len(ext) == 1, "BLOCK_STATUS REQ_ONE returned %r" % ext)
    if ext:
        check(ext[0] == (65536, 3), "REQ_ONE extent %r, expected (65536, 3)" % (ext[0],))
    c.close()


@test
def set_unknown_meta_context():
    c = client()
    c.handshake()
    c.structured_reply()
    ctx = c.meta_context(OPT_SET_META_CONTEXT, "", ["x-nosuch:thing"])
    check(ctx == [], "SET_META_CONTEXT of an unknown context selected %r" % ctx)
    c.go("")
    expect_error(c, "BLOCK_STATUS after selecting no context", EINVAL, CMD_BLOCK_STATUS, 0, 4096)
    c.write(8192, pattern(512, 3))
    read_ok(c, 8192, 512, pattern(512, 3), "read after BLOCK_STATUS error")
    c.close()


@test
def export_name_unknown_closes():
    for path, bad in ((SOCK, "nosuch"), (NAMED, "disk2")):
        c = client(path)
        c.handshake()
        c.send_opt(OPT_EXPORT_NAME, bad.encode())
        check(c.wait_closed(5), "EXPORT_NAME %r: connection not closed" % bad)
        c.close()


@test
def export_name_known():
    # with NO_ZEROES
    c = client(NAMED)
    c.handshake()
    size, flags = c.export_name("disk1")
    check(size == 8 * MiB, "EXPORT_NAME size %d" % size)
    check(flags & RW_FLAGS == RW_FLAGS and not flags & TF_SEND_DF, "EXPORT_NAME flags %#x" % flags)
    c.write(0, pattern(1000, 4))
    read_ok(c, 0, 1000, pattern(1000, 4), "simple-reply read after EXPORT_NAME")
    c.close()
    # without NO_ZEROES: 124 zero bytes follow
    c = client(NAMED)
    c.handshake(client_flags=FLAG_FIXED_NEWSTYLE)
    c.send_opt(OPT_EXPORT_NAME, b"disk1")
    raw = c.recvall(10 + 124)
    check(raw[10:] == bytes(124), "EXPORT_NAME without NO_ZEROES: 124 zero bytes expected")
    c.no_zeroes = True
    read_ok(c, 0, 1000, pattern(1000, 4), "read after EXPORT_NAME with zeroes")
    c.close()


@test
def go_unknown_export():
    c = client(NAMED)
    c.handshake()
    c.send_opt(OPT_GO, c.info_payload("nosuch"))
    rep = c.opt_replies(OPT_GO)
    check(rep[-1][0] == REP_ERR_UNKNOWN, "GO of unknown export: expected ERR_UNKNOWN, got %s" %
          [repname(r) for r, _ in rep])
    c.send_opt(OPT_INFO, c.info_payload("nosuch"))
    rep = c.opt_replies(OPT_INFO)
    check(rep[-1][0] == REP_ERR_UNKNOWN, "INFO of unknown export: expected ERR_UNKNOWN, got %s" %
          [repname(r) for r, _ in rep])
    info = c.go("disk1")
    check(info.get("size") == 8 * MiB, "GO after ERR_UNKNOWN: %r" % info)
    c.close()


@test
def abort():
    c = client()
    c.handshake()
    rep = c.opt_simple(OPT_ABORT)
    check(rep == [(REP_ACK, b"")], "ABORT: expected a bare ACK, got %r" % rep)
    check(c.wait_closed(5), "ABORT: connection not closed after the ACK")
    c.close()


@test
def bad_client_flags():
    c = client()
    c.sock.recv(18)
    c.send(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES | (1 << 7)))
    check(c.wait_closed(5), "unknown client flag bit 7: server must close the connection")
    c.close()


@test
def unknown_command_and_flags():
    c, _ = ready()
    ref = pattern(4096, 5)
    c.write(2 * MiB, ref)
    for cmd in (99, 8, 0xFFFF):
        expect_error(c, "unknown command %d" % cmd, EINVAL, cmd, 0, 4096)
        read_ok(c, 2 * MiB, 4096, ref, "read after unknown command %d" % cmd)
    for bit in (5, 6, 7, 8, 15):
        expect_error(c, "READ with unknown flag bit %d" % bit, EINVAL, CMD_READ, 0, 4096, 1 << bit)
        read_ok(c, 2 * MiB, 4096, ref, "read after unknown flag bit %d" % bit)
    # unknown flag on a WRITE: payload consumed, nothing written
    expect_error(c, "WRITE with unknown flag bit 9", EINVAL, CMD_WRITE, 2 * MiB, 4096, 1 << 9, pattern(4096, 6))
    read_ok(c, 2 * MiB, 4096, ref, "read after rejected WRITE with unknown flag")
    c.close()


@test
def flush_with_offset_or_length():
    c, _ = ready()
    expect_error(c, "FLUSH with offset 4096", EINVAL, CMD_FLUSH, 4096, 0)
    expect_error(c, "FLUSH with length 4096", EINVAL, CMD_FLUSH, 0, 4096)
    r = c.cmd(CMD_FLUSH)
    check(r.error == 0, "plain FLUSH failed: %s" % errname(r.error))
    c.write(0, pattern(512, 7))
    read_ok(c, 0, 512, pattern(512, 7), "read after FLUSH errors")
    c.close()


@test
def zero_length_and_range_raw():
    c, _ = ready()
    for cmd, name in ((CMD_READ, "READ"), (CMD_WRITE, "WRITE"), (CMD_TRIM, "TRIM"),
                      (CMD_WRITE_ZEROES, "WRITE_ZEROES"), (CMD_CACHE, "CACHE"), (CMD_BLOCK_STATUS, "BLOCK_STATUS")):
        expect_error(c, "zero-length " + name, EINVAL, cmd, 4096, 0)
    expect_error(c, "WRITE beyond end", ENOSPC, CMD_WRITE, SIZE, 512, 0, pattern(512, 8))
    expect_error(c, "READ beyond end", EINVAL, CMD_READ, SIZE - 511, 512)
    c.write(SIZE - 512, pattern(512, 9))
    read_ok(c, SIZE - 512, 512, pattern(512, 9), "read of the last 512 bytes")
    c.close()


@test
def oversized_write_payload_consumed():
    # A client that asked for block sizes is held to the advertised 32 MiB (one that did not may
    # send 64 MiB: 17-limits).
    c, _ = ready(infos=(INFO_BLOCK_SIZE,))
    ref = pattern(65536, 10)
    c.write(40 * MiB, ref)
    big = pattern(32 * MiB + 4097, 11)
    # in range (ends at 52 MiB + 3097 < 64 MiB) and overlapping the reference data
    expect_error(c, "WRITE of 32 MiB + 4097", EINVAL, CMD_WRITE, 20 * MiB - 1000, len(big), 0, big)
    read_ok(c, 40 * MiB, 65536, ref, "read after oversized WRITE (connection in sync, nothing written)")
    expect_error(c, "READ of 32 MiB + 1", EINVAL, CMD_READ, 0, 32 * MiB + 1)
    expect_error(c, "READ of 32 MiB + 1 with DF", (EINVAL, EOVERFLOW), CMD_READ, 0, 32 * MiB + 1, CMD_FLAG_DF)
    read_ok(c, 40 * MiB, 65536, ref, "read after oversized READs")
    c.close()


@test
def structured_read_df():
    c, _ = ready()
    base = 20 * MiB
    c.cmd(CMD_TRIM, base, 1 * MiB)
    c.write(base + 8192, pattern(4096, 12))
    exp = bytearray(65536)
    exp[8192:12288] = pattern(4096, 12)
    r = c.read(base, 65536, CMD_FLAG_DF)
    check(r.error == 0 and r.structured, "DF read: %r" % r)
    content = [(t, p) for f, t, p in r.chunks if t in (REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE)]
    check(len(content) == 1, "DF read: %d content chunks, expected exactly 1 (%r)" % (len(content), r))
    if content:
        check(content[0][0] == REPLY_TYPE_OFFSET_DATA, "DF read over data+hole must use OFFSET_DATA")
        check(struct.unpack(">Q", content[0][1][:8])[0] == base, "DF chunk offset")
    check(r.data is not None and bytes(r.data) == bytes(exp), "DF read data mismatch")
    check(r.chunks[-1][0] & REPLY_FLAG_DONE, "last chunk lacks DONE")
    # all-hole DF read: one content chunk (data of zeroes or a hole), reads as zeroes
    r = c.read(base + 65536, 65536, CMD_FLAG_DF)
    content = [t for f, t, p in r.chunks if t in (REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE)]
    check(r.error == 0 and len(content) == 1, "DF read of a hole: %r" % r)
    check(r.data is not None and bytes(r.data) == bytes(65536), "DF hole read not zero")
    # without DF the reassembled data is the same
    r = c.read(base, 65536)
    check(r.error == 0 and r.data is not None and bytes(r.data) == bytes(exp), "non-DF structured read mismatch")
    # unaligned read
    r = c.read(base + 8190, 10)
    check(r.error == 0 and bytes(r.data) == bytes(exp[8190:8200]), "unaligned structured read mismatch")
    c.close()


@test
def pipelined_raw():
    c, _ = ready()
    base = 30 * MiB
    handles = {}
    for i in range(32):
        d = pattern(4096, 100 + i)
        handles[c.request(CMD_WRITE, base + i * 4096, 4096, 0, d, handle=0xDEAD0000_00000000 + i)] = ("w", i)
    for i in range(32):
        handles[c.request(CMD_READ, base + i * 4096, 4096, handle=0xBEEF0000_00000000 + i)] = ("r", i)
    stash = {}
    seen = {}
    for _ in range(64):
        r = c.reply(stash)
        check(r.handle in handles, "reply for unknown handle %#x" % r.handle)
        check(r.handle not in seen, "two replies for handle %#x" % r.handle)
        seen[r.handle] = r
    check(len(seen) == 64, "got %d replies for 64 pipelined requests" % len(seen))
    for h, (kind, i) in handles.items():
        r = seen.get(h)
        if r is None:
            continue
        check(r.error == 0, "pipelined %s %d failed: %s" % (kind, i, errname(r.error)))
    # reads were issued after the writes on the same connection, but the server may reorder:
    # re-read now that all writes are acknowledged
    for i in range(32):
        read_ok(c, base + i * 4096, 4096, pattern(4096, 100 + i), "pipelined write %d" % i)
    c.close()


@test
def disc_closes():
    c, _ = ready()
    c.write(0, b"x" * 512)
    c.disconnect()
    check(c.wait_closed(5), "NBD_CMD_DISC: server did not close the connection")
    c.close()


@test
def bad_magic_closes_others_fine():
    other, _ = ready()
    c, _ = ready()
    c.send(struct.pack(">IHHQQI", 0x12345678, 0, CMD_READ, 1, 0, 512))
    check(c.wait_closed(5), "bad request magic: connection not closed")
    c.close()
    other.write(4096, pattern(512, 13))
    read_ok(other, 4096, 512, pattern(512, 13), "other client after bad magic")
    other.close()
    c, _ = ready()
    read_ok(c, 4096, 512, pattern(512, 13), "new client after bad magic")
    c.close()


@test
def truncated_handshakes():
    # half an option header, half an option payload, only part of the client flags, nothing at all
    for partial in (struct.pack(">I", 3)[:2],
                    struct.pack(">I", 3) + struct.pack(">Q", IHAVEOPT)[:5],
                    struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT_GO, 100) + b"\x00" * 10,
                    b""):
        c = client()
        c.sock.recv(18)
        if partial:
            c.send(partial)
        c.close()
    # half a request header and half a write payload after a successful GO
    c, _ = ready()
    c.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 1, 0, 512)[:13])
    c.close()
    c, _ = ready()
    c.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 1, 0, 65536) + b"y" * 1000)
    c.close()
    c, _ = ready()
    c.write(8192, pattern(512, 14))
    read_ok(c, 8192, 512, pattern(512, 14), "client after truncated handshakes")
    c.close()


failed = 0
for t in tests:
    import nbdtest
    before = len(nbdtest._failures)
    try:
        t()
    except Exception as e:  # a protocol violation or a closed connection
        nbdtest._failures.append("%s: %s: %s" % (t.__name__, type(e).__name__, e))
        traceback.print_exc()
    if len(nbdtest._failures) > before:
        note("FAIL: %s" % t.__name__)
    else:
        note("ok: %s" % t.__name__)
