import XCTest
@testable import NbdPager

final class ValidatorTests: XCTestCase {
    static let mib: UInt64 = 1 << 20
    static let rw = NBDExportInfo(name: "rw", size: 128 * mib)
    static let ro = NBDExportInfo(name: "ro", size: 128 * mib, readOnly: true)
    static let aligned = NBDExportInfo(name: "aligned", size: 128 * mib, minimumBlockSize: 512)
    static let noFlushNoCache = NBDExportInfo(name: "nf", size: 128 * mib, canFlush: false, canTrim: false,
                                              canZero: false, canCache: false)
    static let noFastZero = NBDExportInfo(name: "nfz", size: 128 * mib, canFastZero: false)

    enum S { case simple, structured, meta }

    static func session(_ e: NBDExportInfo, _ s: S) -> NBDSession {
        NBDSession(export: e, structuredReplies: s != .simple, baseAllocationContext: s == .meta ? 1 : nil)
    }

    struct Case {
        var what: String
        var export: NBDExportInfo
        var session: S
        var type: UInt16
        var flags: UInt16
        var offset: UInt64
        var length: UInt32
        /// nil: must succeed.
        var error: NBDErrno?

        init(_ what: String, _ export: NBDExportInfo, _ session: S, _ command: NBDCommand, _ flags: NBDCommandFlags = [],
             offset: UInt64 = 0, length: UInt32, _ error: NBDErrno?) {
            self.init(what, export, session, type: command.rawValue, flags: flags.rawValue,
                      offset: offset, length: length, error)
        }

        init(_ what: String, _ export: NBDExportInfo, _ session: S, type: UInt16, flags: UInt16,
             offset: UInt64 = 0, length: UInt32, _ error: NBDErrno?) {
            self.what = what
            self.export = export
            self.session = session
            self.type = type
            self.flags = flags
            self.offset = offset
            self.length = length
            self.error = error
        }
    }

    static let max = UInt32(32 * 1024 * 1024)

    static let cases: [Case] = [
        // command and flags
        Case("unknown command 8", rw, .meta, type: 8, flags: 0, length: 512, .einval),
        Case("unknown command 0xffff", rw, .simple, type: 0xffff, flags: 0, length: 512, .einval),
        Case("unknown flag bit 5", rw, .structured, type: 0, flags: 1 << 5, length: 512, .einval),
        Case("unknown flag bit 15 on write", rw, .structured, type: 1, flags: 1 << 15, length: 512, .einval),
        Case("NO_HOLE on read", rw, .structured, .read, [.noHole], length: 512, .einval),
        Case("NO_HOLE on write", rw, .structured, .write, [.noHole], length: 512, .einval),
        Case("DF without structured replies", rw, .simple, .read, [.dontFragment], length: 512, .einval),
        Case("DF with structured replies", rw, .structured, .read, [.dontFragment], length: 512, nil),
        Case("DF on write", rw, .structured, .write, [.dontFragment], length: 512, .einval),
        Case("DF read > 32 MiB", rw, .structured, .read, [.dontFragment], length: max + 1, .eoverflow),
        Case("read > 32 MiB", rw, .structured, .read, length: max + 1, .einval),
        Case("read of exactly 32 MiB", rw, .simple, .read, length: max, nil),
        Case("write > 32 MiB", rw, .simple, .write, length: max + 1, .einval),
        Case("write of exactly 32 MiB", rw, .simple, .write, length: max, nil),
        Case("FUA on read, read-only export (FUA not advertised)", ro, .simple, .read, [.fua], length: 512, .einval),
        Case("FUA on flush, read-only export", ro, .simple, .flush, [.fua], length: 0, .einval),
        Case("FUA on read, writable export", rw, .simple, .read, [.fua], length: 512, nil),
        Case("FUA on write", rw, .simple, .write, [.fua], length: 512, nil),
        Case("REQ_ONE on read", rw, .meta, .read, [.reqOne], length: 512, .einval),
        Case("REQ_ONE on block status", rw, .meta, .blockStatus, [.reqOne], length: 512, nil),
        Case("FAST_ZERO on write zeroes", rw, .simple, .writeZeroes, [.fastZero], length: 512, nil),
        Case("FAST_ZERO|NO_HOLE|FUA on write zeroes", rw, .simple, .writeZeroes, [.fastZero, .noHole, .fua], length: 512, nil),
        Case("FAST_ZERO not advertised", noFastZero, .simple, .writeZeroes, [.fastZero], length: 512, .einval),
        Case("NO_HOLE without fast zero", noFastZero, .simple, .writeZeroes, [.noHole], length: 512, nil),
        Case("FAST_ZERO on write", rw, .simple, .write, [.fastZero], length: 512, .einval),
        Case("FAST_ZERO on trim", rw, .simple, .trim, [.fastZero], length: 512, .einval),

        // permissions
        Case("write on read-only", ro, .simple, .write, length: 512, .eperm),
        Case("trim on read-only", ro, .simple, .trim, length: 512, .eperm),
        Case("write zeroes on read-only", ro, .simple, .writeZeroes, length: 512, .eperm),
        Case("read on read-only", ro, .simple, .read, length: 512, nil),
        Case("cache on read-only", ro, .simple, .cache, length: 512, nil),
        Case("flush on read-only", ro, .simple, .flush, length: 0, nil),
        Case("block status on read-only", ro, .meta, .blockStatus, length: 512, nil),
        Case("flush not supported", noFlushNoCache, .simple, .flush, length: 0, .einval),
        Case("cache not supported", noFlushNoCache, .simple, .cache, length: 512, .einval),
        Case("trim not supported", noFlushNoCache, .simple, .trim, length: 512, .einval),
        Case("write zeroes not supported", noFlushNoCache, .simple, .writeZeroes, length: 512, .einval),

        // lengths and ranges
        Case("zero-length read", rw, .simple, .read, length: 0, .einval),
        Case("zero-length write", rw, .simple, .write, length: 0, .einval),
        Case("zero-length trim", rw, .simple, .trim, length: 0, .einval),
        Case("zero-length block status", rw, .meta, .blockStatus, length: 0, .einval),
        Case("read ending exactly at the end", rw, .simple, .read, offset: 128 * mib - 512, length: 512, nil),
        Case("read one byte past the end", rw, .simple, .read, offset: 128 * mib - 511, length: 512, .einval),
        Case("read starting at the end", rw, .simple, .read, offset: 128 * mib, length: 1, .einval),
        Case("write past the end", rw, .simple, .write, offset: 128 * mib - 511, length: 512, .enospc),
        Case("write zeroes past the end", rw, .simple, .writeZeroes, offset: 128 * mib, length: 512, .enospc),
        Case("trim past the end", rw, .simple, .trim, offset: 128 * mib, length: 512, .einval),
        Case("cache past the end", rw, .simple, .cache, offset: 128 * mib, length: 512, .einval),
        Case("block status past the end", rw, .meta, .blockStatus, offset: 128 * mib, length: 512, .einval),
        Case("read offset+length overflows", rw, .simple, .read, offset: UInt64.max - 10, length: 100, .einval),
        Case("write offset+length overflows", rw, .simple, .write, offset: UInt64.max, length: 1, .enospc),
        Case("block status offset+length overflows", rw, .meta, .blockStatus, offset: UInt64.max - 1, length: 4, .einval),
        Case("trim larger than max block size", rw, .simple, .trim, length: 64 * 1024 * 1024, nil),
        Case("write zeroes larger than max block size", rw, .simple, .writeZeroes, length: 64 * 1024 * 1024, nil),
        Case("block status larger than max block size", rw, .meta, .blockStatus, length: 64 * 1024 * 1024, nil),

        // flush
        Case("flush with nonzero offset", rw, .simple, .flush, offset: 4096, length: 0, .einval),
        Case("flush with nonzero length", rw, .simple, .flush, length: 4096, .einval),
        Case("flush", rw, .simple, .flush, length: 0, nil),

        // block status
        Case("block status without structured replies", rw, .simple, .blockStatus, length: 512, .einval),
        Case("block status without meta context", rw, .structured, .blockStatus, length: 512, .einval),
        Case("block status with meta context", rw, .meta, .blockStatus, length: 512, nil),

        // alignment
        Case("misaligned offset", aligned, .simple, .read, offset: 100, length: 512, .einval),
        Case("misaligned length", aligned, .simple, .read, offset: 512, length: 100, .einval),
        Case("misaligned write", aligned, .simple, .write, offset: 511, length: 512, .einval),
        Case("misaligned trim", aligned, .simple, .trim, offset: 0, length: 513, .einval),
        Case("aligned read", aligned, .simple, .read, offset: 512, length: 1024, nil),
        Case("aligned write", aligned, .simple, .write, offset: 4096, length: 4096, nil),
        Case("unaligned on byte-granular export", rw, .simple, .write, offset: 3, length: 5, nil),

        // disconnect
        Case("disconnect", rw, .simple, .disconnect, length: 0, nil),
    ]

    /// A client that never asked for block sizes may send up to 64 MiB.
    func testUnadvertisedLimitIs64MiB() {
        var s = Self.session(Self.rw, .structured)
        s.maximumRequestLength = NBDLimits.maxRequestLengthUnadvertised
        func check(_ type: NBDCommand, _ length: UInt32, _ flags: NBDCommandFlags = []) -> NBDErrno? {
            let h = NBDRequestHeader(flags: flags.rawValue, type: type.rawValue, cookie: 1, offset: 0, length: length)
            if case .failure(let r) = NBDRequestValidator.validate(h, session: s) { return r.error }
            return nil
        }
        XCTAssertNil(check(.write, 64 << 20))
        XCTAssertNil(check(.read, 64 << 20))
        XCTAssertNil(check(.read, 32 << 20 + 1))
        XCTAssertEqual(check(.write, 64 << 20 + 1), .einval)
        XCTAssertEqual(check(.read, 64 << 20 + 1), .einval)
        XCTAssertEqual(check(.read, 64 << 20 + 1, [.dontFragment]), .eoverflow)
    }

    func testTable() {
        for (i, c) in Self.cases.enumerated() {
            let cookie = UInt64(0x1000 + i)
            let h = NBDRequestHeader(flags: c.flags, type: c.type, cookie: cookie, offset: c.offset, length: c.length)
            let result = NBDRequestValidator.validate(h, session: Self.session(c.export, c.session))
            switch (result, c.error) {
            case (.success(let r), nil):
                XCTAssertEqual(r.command.rawValue, c.type, c.what)
                XCTAssertEqual(r.flags.rawValue, c.flags, c.what)
                XCTAssertEqual(r.cookie, cookie, c.what)
                XCTAssertEqual(r.offset, c.offset, c.what)
                XCTAssertEqual(r.length, c.length, c.what)
            case (.success, let expected?):
                XCTFail("\(c.what): accepted, expected \(expected)")
            case (.failure(let rej), nil):
                XCTFail("\(c.what): rejected with \(rej.error) (\(rej.message)), expected success")
            case (.failure(let rej), let expected?):
                XCTAssertEqual(rej.error, expected, "\(c.what): \(rej.message)")
                XCTAssertEqual(rej.cookie, cookie, c.what)
                XCTAssertEqual(rej.type, c.type, c.what)
                XCTAssertFalse(rej.message.isEmpty, c.what)
            }
        }
    }

    // MARK: transmission flags

    func testTransmissionFlags() {
        typealias F = NBDTransmissionFlags
        let rwFlags: F = [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .sendFastZero, .sendCache, .canMultiConn]
        let roFlags: F = [.hasFlags, .readOnly, .sendFlush, .sendCache, .canMultiConn]
        let cases: [(NBDExportInfo, Bool, F)] = [
            (Self.rw, false, rwFlags),
            (Self.rw, true, rwFlags.union(.sendDF)),
            (Self.ro, false, roFlags),
            (Self.ro, true, roFlags.union(.sendDF)),
            (NBDExportInfo(name: "x", size: 1, canFlush: false, canFUA: false, canTrim: false, canZero: false,
                           canFastZero: false, canCache: false, canMultiConn: false), false, [.hasFlags]),
            (NBDExportInfo(name: "x", size: 1, canZero: false), false,
             [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendCache, .canMultiConn]),
        ]
        for (i, (export, structured, expected)) in cases.enumerated() {
            let f = export.transmissionFlags(structuredReplies: structured)
            XCTAssertEqual(f, expected, "case \(i): got 0x\(String(f.rawValue, radix: 16)), expected 0x\(String(expected.rawValue, radix: 16))")
        }
        XCTAssertEqual(Self.rw.transmissionFlags(structuredReplies: false).rawValue, 0x0d6d)
        XCTAssertEqual(Self.ro.transmissionFlags(structuredReplies: true).rawValue, 0x0587)
    }

    func testExportInfoFromReadOnlyExport() throws {
        let pool = HandlerTests.pool
        let backend = try FileBackend.memory(size: 1 << 20)
        let ro = Export(name: "m", description: "d", backend: backend, readOnly: true, minimumBlockSize: 1, threadPool: pool)
        XCTAssertTrue(ro.info.readOnly)
        XCTAssertEqual(ro.info.transmissionFlags(structuredReplies: false), [.hasFlags, .readOnly, .sendFlush, .sendCache, .canMultiConn])
        let rw = Export(name: "m", description: "d", backend: backend, readOnly: false, minimumBlockSize: 512, threadPool: pool)
        XCTAssertFalse(rw.info.readOnly)
        XCTAssertEqual(rw.info.size, 1 << 20)
        XCTAssertEqual(rw.info.minimumBlockSize, 512)
        XCTAssertEqual(rw.info.transmissionFlags(structuredReplies: false).rawValue, 0x0d6d)
    }
}
