// Fuzzes NBDRequestValidator.validate with any request header against any export and session, and
// checks the result against the rules it implements (README, DESIGN.md §4): an accepted request is in
// range, aligned, allowed on the export and carries only advertised flags; a refused one carries the
// request's cookie and one of the errno values the validator may send.
//
// Input: 2 bytes of export capabilities, 8 bytes export size (only the low bits of byte 1 pick a
// minimum block size), 1 byte session, then the 28-byte request header without its magic.
import FuzzSupport
import NbdPager

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzValidator(_ data: UnsafeRawPointer?, _ size: Int) -> CInt {
    var input = FuzzInput(UnsafeRawBufferPointer(start: data, count: size))
    let caps = input.byte()
    let more = input.byte()
    let blockSizes: [UInt32] = [1, 512, 4096, 1 << 16, 1, 2, 3, 0]
    var exportSize = input.integer(UInt64.self)
    if more & 0x80 != 0 { exportSize = exportSize % (1 << 32) }  // sizes like real exports as often as not
    let export = NBDExportInfo(
        name: "disk", size: exportSize, readOnly: caps & 1 != 0,
        canFlush: caps & 2 != 0, canFUA: caps & 4 != 0, canTrim: caps & 8 != 0, canZero: caps & 0x10 != 0,
        canFastZero: caps & 0x20 != 0, canCache: caps & 0x40 != 0, canMultiConn: caps & 0x80 != 0,
        minimumBlockSize: blockSizes[Int(more & 7)])
    let sessionBits = input.byte()
    let session = NBDSession(export: export, structuredReplies: sessionBits & 1 != 0,
                             baseAllocationContext: sessionBits & 2 != 0 ? 1 : nil)
    let header = NBDRequestHeader(flags: input.integer(UInt16.self), type: input.integer(UInt16.self),
                                  cookie: input.integer(UInt64.self), offset: input.integer(UInt64.self),
                                  length: input.integer(UInt32.self))

    let flags = session.export.transmissionFlags(structuredReplies: session.structuredReplies)
    switch NBDRequestValidator.validate(header, session: session) {
    case .success(let r):
        require(r.cookie == header.cookie, "cookie changed")
        require(r.command.rawValue == header.type && r.flags.rawValue == header.flags, "command or flags changed")
        if r.flags.contains(.fua) { require(flags.contains(.sendFUA), "FUA accepted but not advertised") }
        if r.flags.contains(.dontFragment) {
            require(r.command == .read && flags.contains(.sendDF), "DF accepted but not advertised")
        }
        if r.flags.contains(.fastZero) {
            require(r.command == .writeZeroes && flags.contains(.sendFastZero), "FAST_ZERO accepted but not advertised")
        }
        if r.flags.contains(.noHole) { require(r.command == .writeZeroes, "NO_HOLE on \(r.command)") }
        if r.flags.contains(.reqOne) { require(r.command == .blockStatus, "REQ_ONE on \(r.command)") }
        switch r.command {
        case .disconnect:
            return 0
        case .flush:
            require(flags.contains(.sendFlush), "flush accepted but not advertised")
            require(r.offset == 0 && r.length == 0, "flush with a range")
            return 0
        case .write:
            require(!export.readOnly, "write to a read-only export")
        case .trim:
            require(flags.contains(.sendTrim), "trim accepted but not advertised")
        case .writeZeroes:
            require(flags.contains(.sendWriteZeroes), "write zeroes accepted but not advertised")
        case .cache:
            require(flags.contains(.sendCache), "cache accepted but not advertised")
        case .blockStatus:
            require(session.structuredReplies && session.baseAllocationContext != nil, "block status without a context")
        case .read:
            break
        }
        require(r.length > 0, "\(r.command) of length 0")
        if r.command == .read || r.command == .write {
            require(r.length <= NBDLimits.maxRequestLength, "\(r.command) of \(r.length) bytes")
        }
        let (end, overflow) = r.offset.addingReportingOverflow(UInt64(r.length))
        require(!overflow && end <= export.size, "\(r.command) at \(r.offset)+\(r.length) past \(export.size)")
        let align = UInt64(max(export.minimumBlockSize, 1))
        require(r.offset % align == 0 && UInt64(r.length) % align == 0, "unaligned \(r.command)")
    case .failure(let rejection):
        require(rejection.cookie == header.cookie, "rejection with another cookie")
        require(rejection.type == header.type, "rejection with another type")
        require([.einval, .eperm, .enospc, .eoverflow].contains(rejection.error), "rejection with \(rejection.error)")
        require(!rejection.message.isEmpty, "rejection without a message")
        if rejection.error == .eperm { require(export.readOnly, "EPERM on a writable export") }
        if rejection.error == .eoverflow {
            require(header.type == NBDCommand.read.rawValue, "EOVERFLOW for command \(header.type)")
        }
        if rejection.error == .enospc {
            require(header.type == NBDCommand.write.rawValue || header.type == NBDCommand.writeZeroes.rawValue,
                    "ENOSPC for command \(header.type)")
        }
    }
    return 0
}
