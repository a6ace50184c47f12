import Atomics
import CLinux
import NIOConcurrencyHelpers
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// Lets the thread that receives a demand miss's data from the source (libnbd's) write the read reply
/// straight to the client's socket, instead of waking the connection's event loop to do it: on a page
/// fault that saves one cross-thread wake-up.
///
/// The socket is shared with NIO, so writes never interleave: the event loop counts the writes it has
/// queued and not yet completed (`willWrite`/`didWrite`) and marks its flushes (`flush`); a direct write
/// runs under the lock, only while NIO has nothing queued and is not flushing and the socket's send
/// queue holds less than a quarter of its buffer (so a small reply never has to wait for room), only
/// for small replies, and always writes the whole reply before releasing the lock. The lock is never
/// held while NIO runs (a flush can re-enter the handler).
///
/// Several replies may be queued in the socket at once: the pool threads finishing the synchronous
/// writes of a deep queue each answer their own instead of handing the reply to the event loop.
final class DirectReplyWriter: @unchecked Sendable {
    /// Replies up to this size (header included) may be written directly.
    static let maxDirectReply = 16 * 1024 + 64

    private let lock = NIOLock()
    /// A duplicate of the channel's socket, valid until `close` even if NIO has closed its own descriptor.
    private var fd: Int32
    private let nioPending = ManagedAtomic<Int>(0)
    /// Flushes in progress on the event loop (guarded by `lock`).
    private var flushing = 0
    /// A direct write needs the socket's send queue below this (bytes, as SIOCOUTQ counts them): a
    /// quarter of its send buffer, or empty when the buffer is too small for that to leave room.
    private let queueLimit: Int

    /// Nil when the channel does not expose a socket.
    init?(context: ChannelHandlerContext) {
        let duplicate = try? context.pipeline.syncOperations.withUnsafeTransportIfAvailable(of: NIOBSDSocket.Handle.self) {
            umemd_dup_cloexec($0)
        }
        guard let fd = duplicate, fd >= 0 else { return nil }
        self.fd = fd
        self.queueLimit = Self.queueLimit(fd)
    }

    /// Over a duplicate of `socket` (tests).
    init?(socket: Int32) {
        let fd = umemd_dup_cloexec(socket)
        guard fd >= 0 else { return nil }
        self.fd = fd
        self.queueLimit = Self.queueLimit(fd)
    }

    private static func queueLimit(_ fd: Int32) -> Int {
        let buffer = Int(umemd_socket_sndbuf(fd))
        return buffer >= 8 * maxDirectReply ? buffer / 4 : 1
    }

    /// Event loop: a write is about to be queued with NIO.
    func willWrite() { nioPending.wrappingIncrement(ordering: .sequentiallyConsistent) }
    /// Event loop: a write queued with NIO has completed (written or failed).
    func didWrite() { nioPending.wrappingDecrement(ordering: .sequentiallyConsistent) }

    /// Event loop: runs NIO's flush; no direct write starts while it runs, and one in progress finishes
    /// first (a write queued before the flush was counted by `willWrite`, so none starts after it either).
    func flush(_ body: () -> Void) {
        lock.withLock { flushing += 1 }
        defer { lock.withLock { flushing -= 1 } }
        body()
    }

    /// Any thread: writes `header` + `data` to the socket if that is safe right now. True when the whole
    /// reply was written; false when nothing was (the caller then replies through NIO).
    func tryWrite(header: ByteBuffer, data: ByteBuffer) -> Bool {
        guard header.readableBytes + data.readableBytes <= Self.maxDirectReply else { return false }
        return lock.withLock {
            guard fd >= 0, flushing == 0, nioPending.load(ordering: .sequentiallyConsistent) == 0 else {
                return false
            }
            let queued = Int(umemd_socket_outq(fd))
            guard queued >= 0, queued < queueLimit else {
                return false
            }
            return header.withUnsafeReadableBytes { h in
                data.withUnsafeReadableBytes { d in writeAll(h, d) }
            }
        }
    }

    /// Writes both buffers completely. A short write (not expected with an empty socket queue and a small
    /// reply) is finished by waiting for the socket, since a reply must never be left half-written; a peer
    /// that does not make room within about a second gets its connection shut down instead.
    private func writeAll(_ h: UnsafeRawBufferPointer, _ d: UnsafeRawBufferPointer) -> Bool {
        var hDone = 0
        var dDone = 0
        var wroteAny = false
        var waits = 0
        while hDone < h.count || dDone < d.count {
            let n: Int
            if hDone < h.count {
                n = umemd_send2(fd, h.baseAddress.map { $0 + hDone }, h.count - hDone, d.baseAddress.map { $0 + dDone }, d.count - dDone)
            } else {
                n = umemd_send2(fd, d.baseAddress.map { $0 + dDone }, d.count - dDone, nil, 0)
            }
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                if e == EAGAIN || e == EWOULDBLOCK {
                    if !wroteAny { return false }
                    waits += 1
                    if waits > 100 {
                        _ = shutdown(fd, Int32(SHUT_RDWR))
                        return true
                    }
                    var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                    _ = poll(&p, 1, 10)
                    continue
                }
                // The connection is broken: NIO will see it too. Claim the reply as sent only if part of
                // it went out (the rest cannot be delivered either way).
                return wroteAny
            }
            wroteAny = wroteAny || n > 0
            var left = n
            let fromHeader = min(left, h.count - hDone)
            hDone += fromHeader
            left -= fromHeader
            dDone += left
        }
        return true
    }

    /// Event loop, when the channel is gone: no direct write happens after this.
    func close() {
        lock.withLock {
            if fd >= 0 { Glibc.close(fd) }
            fd = -1
        }
    }
}
