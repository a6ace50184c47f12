// Fuzzes NBDServerStateMachine the way NBDConnectionHandler drives it: greeting first, then the client's
// bytes arrive in chunks of sizes chosen by the input; after each chunk `next(from:)` is called until it
// returns nil; once an action ends the connection nothing more is fed; at the end of the input the
// connection closes (markClosed). Every action is checked against what the protocol allows.
//
// Input: byte 0 picks the export's capabilities (bit 0: read-only), byte 1 how the stream is chunked
// (its top two bits also pick the TLS policy: off, optional, required), bytes 2-3 seed the chunk
// sizes; the rest is what the client sends after the greeting.
import FuzzSupport
import NIOCore
import NbdPager

/// An export of 1 GiB whose capabilities the input picks, plus a small read-only one: the unit tests'
/// pair, so their byte sequences are meaningful seeds.
func exports(_ config: UInt8) -> [NBDExportInfo] {
    let blockSizes: [UInt32] = [1, 512, 4096, 1]
    let disk = NBDExportInfo(
        name: "disk", description: "the test disk", size: 1 << 30,
        readOnly: config & 1 != 0,
        canFlush: config & 0x08 == 0, canFUA: config & 0x10 == 0,
        canTrim: config & 0x20 == 0, canZero: config & 0x20 == 0,
        canFastZero: config & 0x80 == 0, canCache: config & 0x40 == 0,
        minimumBlockSize: blockSizes[Int(config >> 1) & 3])
    let other = NBDExportInfo(name: "other", description: "", size: 8192, readOnly: true)
    return [disk, other]
}

// MARK: the machine's interface: the only code that names NBDServerStateMachine and its Action

/// What the checks need to know about one action.
enum Step {
    /// Bytes for the client, the connection goes on.
    case send(bytes: Int)
    /// NBD_OPT_STARTTLS's ACK; the rest of the stream would come through TLS.
    case startTLS(bytes: Int)
    /// Bytes for the client, and the transmission phase starts with this session.
    case enterTransmission(bytes: Int, session: NBDSession)
    /// A request to run; `payload` is the byte count of a WRITE's data.
    case request(NBDRequest, payload: Int?)
    /// An error reply to a request.
    case reject(NBDRejection)
    /// The connection ends (abort, hard close, disconnect).
    case end
}

/// The state machine as the driver sees it.
struct Machine {
    private var machine: NBDServerStateMachine

    /// A machine for `exports` that has sent its greeting; returns the greeting's length.
    init(exports: [NBDExportInfo], tls: NBDServerStateMachine.TLSPolicy, greetingBytes: inout Int) {
        machine = NBDServerStateMachine(exports: exports, tls: tls)
        greetingBytes = machine.greeting().readableBytes
    }

    mutating func next(from buffer: inout ByteBuffer) -> Step? {
        guard let action = machine.next(from: &buffer) else { return nil }
        // Replies are encoded as the connection handler encodes them, so their lengths are checked too.
        let bytes = action.handshakeReply?.readableBytes ?? 0
        switch action {
        case .sendGreeting, .sendOptionReply, .sendExportList, .sendExportInfo, .sendMetaContexts:
            return .send(bytes: bytes)
        case .startTLS: return .startTLS(bytes: bytes)
        case .enterTransmission(let session, _): return .enterTransmission(bytes: bytes, session: session)
        case .request(let request, let payload): return .request(request, payload: payload?.readableBytes)
        case .reject(let rejection): return .reject(rejection)
        case .sendOptionReplyAndClose, .close, .disconnect: return .end
        }
    }

    var pendingPayloadBytes: Int { machine.pendingPayloadBytes }
    var isInTransmission: Bool { machine.isInTransmission }
    var isClosed: Bool { machine.isClosed }
    var isTLSActive: Bool { machine.isTLSActive }
    mutating func markClosed() { machine.markClosed() }
}

/// One connection: the machine, the handler's receive buffer, and what has happened so far.
struct Connection {
    var machine: Machine
    var cumulation = ByteBuffer()
    var session: NBDSession?
    let tls: NBDServerStateMachine.TLSPolicy
    var tlsActive = false
    var ended = false
    var fed = 0
    var steps = 0

    init(exports: [NBDExportInfo], tls: NBDServerStateMachine.TLSPolicy) {
        var greeting = 0
        self.tls = tls
        machine = Machine(exports: exports, tls: tls, greetingBytes: &greeting)
        require(greeting == 18, "greeting is \(greeting) bytes")
    }

    /// The handler's channelRead: append, then parse until the machine needs more bytes.
    mutating func receive(_ chunk: UnsafeRawBufferPointer) {
        guard !ended else { return }
        cumulation.writeBytes(chunk)
        fed += chunk.count
        while !ended, let step = machine.next(from: &cumulation) {
            steps += 1
            require(steps <= fed, "\(steps) actions from \(fed) bytes")
            check(step)
        }
        require(machine.pendingPayloadBytes <= Int(NBDLimits.maxRequestLengthUnadvertised),
                "pending payload of \(machine.pendingPayloadBytes) bytes")
        if cumulation.readerIndex > 1 << 16 { cumulation.discardReadBytes() }
    }

    /// The handler's channelInactive, or what follows an action that ended the connection.
    mutating func close() {
        if !ended { machine.markClosed() }
        require(machine.isClosed, "machine not closed at the end")
        var more = ByteBuffer(bytes: [0x25, 0x60, 0x95, 0x13] + [UInt8](repeating: 0, count: 24))
        require(machine.next(from: &more) == nil, "a closed machine returned an action")
    }

    mutating func check(_ s: Step) {
        switch s {
        case .send(let n):
            require(session == nil, "option reply in the transmission phase")
            require(n >= 20, "option reply of \(n) bytes")
        case .startTLS(let n):
            require(session == nil, "STARTTLS in the transmission phase")
            require(tls != .off, "STARTTLS accepted with TLS off")
            require(!tlsActive, "STARTTLS accepted twice")
            require(n == 20, "STARTTLS ACK of \(n) bytes")
            tlsActive = true
            require(machine.isTLSActive, "machine not in TLS after STARTTLS")
        case .enterTransmission(let n, let s):
            require(tls != .required || tlsActive, "transmission without TLS, which is required")
            require(s.tls == tlsActive, "session TLS \(s.tls), connection \(tlsActive)")
            require(session == nil, "second transmission phase")
            require(n >= 10, "export reply of \(n) bytes")
            require(machine.isInTransmission, "machine not in transmission after entering it")
            session = s
        case .request(let r, let payload):
            guard let session else { return require(false, "request \(r.command) before transmission") }
            require(r.length <= session.maximumRequestLength || ![.read, .write].contains(r.command),
                    "\(r.command) of \(r.length) bytes over the session's maximum")
            let export = session.export
            require(r.command != .disconnect, "disconnect dispatched as a request")
            if export.readOnly {
                require(![.write, .trim, .writeZeroes].contains(r.command), "\(r.command) on a read-only export")
            }
            if r.command == .flush {
                require(r.offset == 0 && r.length == 0, "flush with a range")
            } else {
                require(r.length > 0, "\(r.command) of length 0")
                let (end, overflow) = r.offset.addingReportingOverflow(UInt64(r.length))
                require(!overflow && end <= export.size, "\(r.command) at \(r.offset)+\(r.length) past \(export.size)")
                let align = UInt64(export.minimumBlockSize)
                require(r.offset % align == 0 && UInt64(r.length) % align == 0, "unaligned \(r.command)")
            }
            if r.command == .write {
                require(payload == Int(r.length), "write of \(r.length) bytes with a payload of \(payload ?? -1)")
            } else {
                require(payload == nil, "\(r.command) with a payload")
            }
            if r.command == .blockStatus {
                require(session.structuredReplies && session.baseAllocationContext != nil, "block status without a context")
            }
        case .reject(let rejection):
            require(session != nil, "rejection before transmission")
            require([.einval, .eperm, .enospc, .eoverflow].contains(rejection.error),
                    "rejection with \(rejection.error)")
        case .end:
            require(machine.isClosed, "machine not closed after an ending action")
            ended = true
        }
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzStateMachine(_ data: UnsafeRawPointer?, _ size: Int) -> CInt {
    var input = FuzzInput(UnsafeRawBufferPointer(start: data, count: size))
    let config = input.byte()
    let chunking = input.byte()
    var sizes = SplitMix64(seed: UInt64(input.integer(UInt16.self)) | UInt64(chunking) << 16)
    let stream = input.rest()

    let policies: [NBDServerStateMachine.TLSPolicy] = [.off, .optional, .required, .off]
    var connection = Connection(exports: exports(config), tls: policies[Int(chunking >> 6)])
    var offset = 0
    while offset < stream.count && !connection.ended {
        let n: Int
        switch chunking & 3 {
        case 0: n = stream.count                                     // all at once
        case 1: n = 1                                                // byte by byte
        default: n = sizes.next(in: 1 ... 1 << (Int(chunking >> 2) % 12 + 1))  // up to 2...4096 bytes
        }
        let end = min(stream.count, offset + n)
        connection.receive(UnsafeRawBufferPointer(rebasing: stream[offset ..< end]))
        offset = end
    }
    connection.close()
    return 0
}
