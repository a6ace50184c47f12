import NIOCore

// Transmission-phase replies the connection builds around data it already has: the header of a read
// reply, and an error reply in whichever form the session negotiated. Pure: no I/O.

extension ByteBuffer {
    /// Bytes `writeReadReplyHeader` writes: a simple reply (16), or a chunk header and its offset (28).
    public static func readReplyHeaderLength(structured: Bool) -> Int { structured ? 28 : 16 }

    /// The part of a successful read reply before its `dataLength` bytes of data: a simple reply, or
    /// the header of one final NBD_REPLY_TYPE_OFFSET_DATA chunk followed by its offset.
    @discardableResult
    public mutating func writeReadReplyHeader(cookie: UInt64, offset: UInt64, dataLength: Int, structured: Bool) -> Int {
        if structured {
            return writeStructuredReplyHeader(flags: .done, type: .offsetData, cookie: cookie,
                                              length: UInt32(8 + dataLength))
                + writeInteger(offset)
        }
        return writeSimpleReply(error: .ok, cookie: cookie)
    }

    /// An error reply: a final NBD_REPLY_TYPE_ERROR chunk with `message` when structured replies were
    /// negotiated, else a simple reply. `.ok` is never sent as an error: it becomes EIO.
    @discardableResult
    public mutating func writeErrorReply(error: NBDErrno, cookie: UInt64, message: String, structured: Bool) -> Int {
        let wire: NBDErrno = error == .ok ? .eio : error
        if structured {
            return writeStructuredError(error: wire, cookie: cookie, message: message)
        }
        return writeSimpleReply(error: wire, cookie: cookie)
    }
}
