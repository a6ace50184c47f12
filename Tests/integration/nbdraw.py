"""Minimal raw NBD client for protocol-level tests (no libnbd needed).

Speaks fixed-newstyle NBD over a Unix (or TCP 127.0.0.1) socket and lets a test
send arbitrary option and request headers, then parse the server's replies.
Everything is explicit so that a test can send things a well-behaved client
(libnbd) refuses to send.
"""

import socket
import struct
import time

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option reply types
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_PLATFORM = 0x80000004
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_SHUTDOWN = 0x80000007
REP_ERR_BLOCK_SIZE_REQD = 0x80000008
REP_ERR_TOO_BIG = 0x80000009

# info types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply chunk types
REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 0x8001
REPLY_TYPE_ERROR_OFFSET = 0x8002

# NBD error values
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

ERRNAMES = {0: "OK", 1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC",
            75: "EOVERFLOW", 95: "ENOTSUP", 108: "ESHUTDOWN"}
REPNAMES = {REP_ACK: "ACK", REP_SERVER: "SERVER", REP_INFO: "INFO", REP_META_CONTEXT: "META_CONTEXT",
            REP_ERR_UNSUP: "ERR_UNSUP", REP_ERR_POLICY: "ERR_POLICY", REP_ERR_INVALID: "ERR_INVALID",
            REP_ERR_PLATFORM: "ERR_PLATFORM", REP_ERR_TLS_REQD: "ERR_TLS_REQD",
            REP_ERR_UNKNOWN: "ERR_UNKNOWN", REP_ERR_SHUTDOWN: "ERR_SHUTDOWN",
            REP_ERR_BLOCK_SIZE_REQD: "ERR_BLOCK_SIZE_REQD", REP_ERR_TOO_BIG: "ERR_TOO_BIG"}


def errname(e):
    return ERRNAMES.get(e, str(e))


def repname(r):
    return REPNAMES.get(r, hex(r))


class ProtocolError(Exception):
    pass


class Closed(Exception):
    """The server closed the connection (EOF or reset)."""


class OptError(Exception):
    def __init__(self, opt, rtype, data):
        super().__init__("option %d got reply %s (%r)" % (opt, repname(rtype), data[:200]))
        self.opt = opt
        self.rtype = rtype
        self.data = data


class Reply:
    """A (possibly multi-chunk) reply to one request."""

    def __init__(self, handle):
        self.handle = handle
        self.structured = False
        self.error = 0            # first error seen (0 = success)
        self.errors = []          # (errno, message, offset or None)
        self.chunks = []          # (flags, type, payload)
        self.data = None          # reassembled read data (bytearray) for READ
        self.extents = {}         # context id -> [(length, flags)]

    def __repr__(self):
        return "Reply(handle=%d, error=%s, structured=%s, chunks=%s)" % (
            self.handle, errname(self.error), self.structured,
            [(f, t, len(p)) for f, t, p in self.chunks])


class RawClient:
    def __init__(self, path=None, host=None, port=None, timeout=10.0):
        if path is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            addr = path
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            addr = (host or "127.0.0.1", port)
        self.sock.settimeout(timeout)
        self.sock.connect(addr)
        self.next_handle = 1
        self.pending = {}      # handle -> (cmd, offset, length, flags)
        self.structured = False
        self.no_zeroes = False
        self.hs_flags = None
        self.size = None
        self.tflags = None
        self._pushback = b""

    # ---- low level -------------------------------------------------------
    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data):
        self.sock.sendall(data)

    def unread(self, data):
        """Push bytes back so that the next recvall returns them first."""
        self._pushback = bytes(data) + self._pushback

    def recvall(self, n):
        buf = bytearray(self._pushback[:n])
        self._pushback = self._pushback[n:]
        while len(buf) < n:
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            except (ConnectionResetError, BrokenPipeError) as e:
                raise Closed("connection reset after %d/%d bytes: %s" % (len(buf), n, e))
            if not chunk:
                raise Closed("EOF after %d/%d bytes" % (len(buf), n))
            buf += chunk
        return bytes(buf)

    def wait_closed(self, timeout=5.0):
        """True if the peer closes the connection within timeout (data received meanwhile is discarded)."""
        deadline = time.monotonic() + timeout
        old = self.sock.gettimeout()
        try:
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    chunk = self.sock.recv(65536)
                except socket.timeout:
                    return False
                except (ConnectionResetError, BrokenPipeError):
                    return True
                if not chunk:
                    return True
            return False
        finally:
            self.sock.settimeout(old)

    # ---- handshake -------------------------------------------------------
    def handshake(self, client_flags=None):
        magic, opt_magic, flags = struct.unpack(">QQH", self.recvall(18))
        if magic != NBDMAGIC:
            raise ProtocolError("bad NBDMAGIC %#x" % magic)
        if opt_magic != IHAVEOPT:
            raise ProtocolError("not newstyle: %#x" % opt_magic)
        self.hs_flags = flags
        if client_flags is None:
            client_flags = FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if flags & FLAG_NO_ZEROES else 0)
        self.no_zeroes = bool(client_flags & FLAG_NO_ZEROES)
        self.send(struct.pack(">I", client_flags))
        return flags

    def send_opt(self, opt, data=b"", length=None):
        if length is None:
            length = len(data)
        self.send(struct.pack(">QII", IHAVEOPT, opt, length) + data)

    def read_opt_reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recvall(20))
        if magic != OPT_REPLY_MAGIC:
            raise ProtocolError("bad option reply magic %#x" % magic)
        if length > 64 << 20:
            raise ProtocolError("absurd option reply length %d" % length)
        data = self.recvall(length) if length else b""
        return opt, rtype, data

    def opt_replies(self, opt, limit=10000):
        """Read replies to opt until a final one (ACK or error). Returns the list (final included)."""
        out = []
        for _ in range(limit):
            ropt, rtype, data = self.read_opt_reply()
            if ropt != opt:
                raise ProtocolError("reply for option %d, expected %d" % (ropt, opt))
            out.append((rtype, data))
            if rtype == REP_ACK or rtype & 0x80000000:
                return out
        raise ProtocolError("too many option replies")

    def opt_simple(self, opt, data=b""):
        self.send_opt(opt, data)
        return self.opt_replies(opt)

    def structured_reply(self):
        rep = self.opt_simple(OPT_STRUCTURED_REPLY)
        if rep[-1][0] != REP_ACK:
            raise OptError(OPT_STRUCTURED_REPLY, rep[-1][0], rep[-1][1])
        self.structured = True
        return rep

    @staticmethod
    def info_payload(name, infos=()):
        nb = name.encode()
        return struct.pack(">I", len(nb)) + nb + struct.pack(">H", len(infos)) + b"".join(
            struct.pack(">H", i) for i in infos)

    def _parse_info_replies(self, opt, reps):
        info = {"replies": reps}
        for rtype, data in reps:
            if rtype == REP_INFO:
                (itype,) = struct.unpack(">H", data[:2])
                if itype == INFO_EXPORT:
                    info["size"], info["flags"] = struct.unpack(">QH", data[2:12])
                elif itype == INFO_NAME:
                    info["name"] = data[2:].decode(errors="replace")
                elif itype == INFO_DESCRIPTION:
                    info["description"] = data[2:].decode(errors="replace")
                elif itype == INFO_BLOCK_SIZE:
                    info["block_size"] = struct.unpack(">III", data[2:14])
                info.setdefault("types", []).append(itype)
        final = reps[-1]
        if final[0] != REP_ACK:
            raise OptError(opt, final[0], final[1])
        return info

    def info(self, name="", infos=()):
        self.send_opt(OPT_INFO, self.info_payload(name, infos))
        return self._parse_info_replies(OPT_INFO, self.opt_replies(OPT_INFO))

    def go(self, name="", infos=()):
        self.send_opt(OPT_GO, self.info_payload(name, infos))
        info = self._parse_info_replies(OPT_GO, self.opt_replies(OPT_GO))
        self.size = info.get("size")
        self.tflags = info.get("flags")
        return info

    def export_name(self, name=""):
        self.send_opt(OPT_EXPORT_NAME, name.encode())
        size, flags = struct.unpack(">QH", self.recvall(10))
        if not self.no_zeroes:
            self.recvall(124)
        self.size, self.tflags = size, flags
        return size, flags

    @staticmethod
    def meta_payload(name, queries):
        nb = name.encode()
        out = struct.pack(">I", len(nb)) + nb + struct.pack(">I", len(queries))
        for q in queries:
            qb = q.encode()
            out += struct.pack(">I", len(qb)) + qb
        return out

    def meta_context(self, opt, name="", queries=()):
        """LIST or SET meta context. Returns [(id, name)]; raises OptError on an error reply."""
        self.send_opt(opt, self.meta_payload(name, list(queries)))
        reps = self.opt_replies(opt)
        if reps[-1][0] != REP_ACK:
            raise OptError(opt, reps[-1][0], reps[-1][1])
        out = []
        for rtype, data in reps[:-1]:
            if rtype != REP_META_CONTEXT:
                raise ProtocolError("unexpected reply %s to meta context option" % repname(rtype))
            (cid,) = struct.unpack(">I", data[:4])
            out.append((cid, data[4:].decode(errors="replace")))
        return out

    def connect_default(self, name="", structured=True, meta=(), infos=()):
        """Handshake + optional STRUCTURED_REPLY + SET_META_CONTEXT + GO (asking for infos)."""
        self.handshake()
        ctx = []
        if structured:
            self.structured_reply()
        if meta:
            ctx = self.meta_context(OPT_SET_META_CONTEXT, name, meta)
        info = self.go(name, infos)
        info["contexts"] = ctx
        return info

    # ---- transmission ----------------------------------------------------
    def request(self, cmd, offset=0, length=0, flags=0, data=b"", handle=None, magic=REQUEST_MAGIC,
                send_data=True):
        if handle is None:
            handle = self.next_handle
            self.next_handle += 1
        hdr = struct.pack(">IHHQQI", magic, flags, cmd, handle, offset, length)
        self.pending[handle] = (cmd, offset, length, flags)
        self.send(hdr + (data if send_data else b""))
        return handle

    def _read_structured_chunk(self):
        flags, ctype, handle, length = struct.unpack(">HHQI", self.recvall(16))
        if length > (64 << 20) + 64:
            raise ProtocolError("absurd structured chunk length %d" % length)
        payload = self.recvall(length) if length else b""
        return flags, ctype, handle, payload

    def reply(self, replies=None):
        """Read one complete reply (all chunks). Chunks of other handles are stashed in `replies`
        (dict handle -> Reply) if given, otherwise interleaving raises."""
        partial = {} if replies is None else replies
        for _ in range(1 << 20):
            (magic,) = struct.unpack(">I", self.recvall(4))
            if magic == SIMPLE_REPLY_MAGIC:
                err, handle = struct.unpack(">IQ", self.recvall(12))
                if handle not in self.pending:
                    raise ProtocolError("simple reply for unknown handle %#x" % handle)
                cmd, off, length, fl = self.pending.pop(handle)
                r = partial.pop(handle, None) or Reply(handle)
                r.error = err
                if err:
                    r.errors.append((err, "", None))
                if cmd == CMD_READ and err == 0:
                    r.data = bytearray(self.recvall(length))
                return r
            elif magic == STRUCTURED_REPLY_MAGIC:
                flags, ctype, handle, payload = self._read_structured_chunk()
                if handle not in self.pending:
                    raise ProtocolError("structured chunk for unknown handle %#x" % handle)
                cmd, off, length, fl = self.pending[handle]
                r = partial.get(handle)
                if r is None:
                    r = partial[handle] = Reply(handle)
                r.structured = True
                r.chunks.append((flags, ctype, payload))
                if ctype == REPLY_TYPE_OFFSET_DATA:
                    (coff,) = struct.unpack(">Q", payload[:8])
                    if r.data is None:
                        r.data = bytearray(length)
                    d = payload[8:]
                    if coff < off or coff + len(d) > off + length:
                        raise ProtocolError("data chunk [%d,+%d) outside request [%d,+%d)" %
                                            (coff, len(d), off, length))
                    r.data[coff - off:coff - off + len(d)] = d
                elif ctype == REPLY_TYPE_OFFSET_HOLE:
                    coff, hlen = struct.unpack(">QI", payload[:12])
                    if r.data is None:
                        r.data = bytearray(length)
                    if coff < off or coff + hlen > off + length:
                        raise ProtocolError("hole chunk outside request")
                    r.data[coff - off:coff - off + hlen] = bytes(hlen)
                elif ctype == REPLY_TYPE_BLOCK_STATUS:
                    (cid,) = struct.unpack(">I", payload[:4])
                    ext = []
                    for i in range(4, len(payload) - 7, 8):
                        ext.append(struct.unpack(">II", payload[i:i + 8]))
                    r.extents[cid] = ext
                elif ctype & 0x8000:
                    err, mlen = struct.unpack(">IH", payload[:6])
                    msg = payload[6:6 + mlen].decode(errors="replace")
                    eoff = None
                    if ctype == REPLY_TYPE_ERROR_OFFSET:
                        (eoff,) = struct.unpack(">Q", payload[6 + mlen:14 + mlen])
                    r.errors.append((err, msg, eoff))
                    if not r.error:
                        r.error = err
                if flags & REPLY_FLAG_DONE:
                    del self.pending[handle]
                    partial.pop(handle, None)
                    if cmd == CMD_READ and r.data is None and not r.error:
                        r.data = bytearray()
                    return r
            else:
                raise ProtocolError("bad reply magic %#x" % magic)
        raise ProtocolError("reply loop limit")

    def reply_for(self, handle):
        """Read replies until the one for handle (others are returned in a dict)."""
        stash = {}
        done = {}
        for _ in range(100000):
            r = self.reply(stash)
            if r.handle == handle:
                return r
            done[r.handle] = r
        raise ProtocolError("no reply for handle %d" % handle)

    def cmd(self, cmd, offset=0, length=0, flags=0, data=b""):
        """Send one request and wait for its reply."""
        h = self.request(cmd, offset, length, flags, data)
        return self.reply_for(h)

    def read(self, offset, length, flags=0):
        return self.cmd(CMD_READ, offset, length, flags)

    def write(self, offset, data, flags=0):
        return self.cmd(CMD_WRITE, offset, len(data), flags, data)

    def disconnect(self):
        self.request(CMD_DISC)
        self.pending.clear()
