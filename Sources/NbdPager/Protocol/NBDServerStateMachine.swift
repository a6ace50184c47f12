import NIOCore

/// The server side of one NBD connection's byte stream as a value type: it owns the parser, takes the
/// bytes the client sent and returns typed actions (what to reply, which request to run). It does no
/// I/O and no encoding (the connection encodes the actions with the `Wire/` writers), so it can be fed
/// byte by byte in tests and by a fuzzer.
///
/// Each state carries exactly the data it needs: the handshake states carry what has been negotiated so
/// far (`Negotiation`), the transmission states carry the `NBDSession`, so a request can never be parsed
/// without a session.
///
/// | state          | input                         | next state          | action                        |
/// |----------------|-------------------------------|---------------------|-------------------------------|
/// | greeting       | start / greeting()            | clientFlags         | sendGreeting                  |
/// | clientFlags    | known flags                   | options             | (none, keep parsing)          |
/// | clientFlags    | unknown flags                 | closed              | close                         |
/// | options        | bad magic, oversize, >256     | closed              | close                         |
/// | options        | EXPORT_NAME, known export     | transmission        | enterTransmission(.exportName)|
/// | options        | EXPORT_NAME, unknown/invalid  | closed              | close                         |
/// | options        | GO, known export              | transmission        | enterTransmission(.go)        |
/// | options        | INFO                          | options             | sendExportInfo                |
/// | options        | LIST                          | options             | sendExportList                |
/// | options        | (LIST|SET)_META_CONTEXT       | options             | sendMetaContexts              |
/// | options        | ABORT                         | closed              | sendOptionReplyAndClose (ACK) |
/// | options        | STARTTLS (TLS on, not active) | options (TLS, reset)| startTLS (ACK)                |
/// | options        | TLS required, not active: EXPORT_NAME | closed      | close                         |
/// | options        | TLS required, not active: other | options           | sendOptionReply (TLS_REQD)    |
/// | options        | other / invalid option        | options             | sendOptionReply (error)       |
/// | transmission   | bad request magic             | closed              | close                         |
/// | transmission   | valid WRITE header            | payload             | (none, wait for the payload)  |
/// | transmission   | valid DISC                    | closed              | disconnect                    |
/// | transmission   | other valid request           | transmission        | request                       |
/// | transmission   | invalid, WRITE with payload   | discarding          | (none, consume the payload)   |
/// | transmission   | invalid, no payload           | transmission        | reject                        |
/// | payload        | whole payload                 | transmission        | request(payload)              |
/// | discarding     | rest of the payload           | transmission        | reject                        |
/// | closed         | anything                      | closed              | nil                           |
public struct NBDServerStateMachine: Sendable {
    public enum Action: Sendable, Equatable {
        /// Send the newstyle greeting (only from `start()`).
        case sendGreeting
        /// Send one option reply without data (an ACK, or an error with a message).
        case sendOptionReply(NBDOptionReply)
        /// Send this option reply (NBD_OPT_ABORT's ACK), then close.
        case sendOptionReplyAndClose(NBDOptionReply)
        /// Send the export list (NBD_OPT_LIST).
        case sendExportList(NBDExportListReply)
        /// Send export information (NBD_OPT_INFO).
        case sendExportInfo(NBDExportInfoReply)
        /// Send the meta context replies (NBD_OPT_LIST/SET_META_CONTEXT).
        case sendMetaContexts(NBDMetaContextReply)
        /// Send this reply and start the transmission phase with this session.
        case enterTransmission(NBDSession, NBDTransmissionReply)
        /// Run this request; `payload` holds a WRITE's data.
        case request(NBDRequest, payload: ByteBuffer?)
        /// Reply with this error (any WRITE payload has already been consumed).
        case reject(NBDRejection)
        /// Hard disconnect: the client broke a MUST of the protocol.
        case close(reason: String)
        /// NBD_CMD_DISC: finish in-flight requests, then close.
        case disconnect
        /// Send this ACK to NBD_OPT_STARTTLS in plain text, then run the TLS handshake as the server
        /// (nothing the client sent after the option may be parsed: it must wait for the ACK).
        case startTLS(NBDOptionReply)
    }

    /// Whether the server offers TLS (NBD_OPT_STARTTLS) and whether it requires it.
    public enum TLSPolicy: Sendable, Hashable {
        case off, optional, required
    }

    /// What the client negotiated so far in the handshake.
    public struct Negotiation: Sendable, Hashable {
        public var noZeroes = false
        public var optionCount = 0
        public var structuredReplies = false
        /// base:allocation selected by SET_META_CONTEXT, with the export name it was selected for.
        public var metaContextExport: String?
        /// NBD_OPT_STARTTLS was accepted: the rest of the connection runs over TLS.
        public var tlsActive = false

        public init(noZeroes: Bool = false, optionCount: Int = 0, structuredReplies: Bool = false,
                    metaContextExport: String? = nil, tlsActive: Bool = false) {
            self.noZeroes = noZeroes
            self.optionCount = optionCount
            self.structuredReplies = structuredReplies
            self.metaContextExport = metaContextExport
            self.tlsActive = tlsActive
        }
    }

    public enum State: Sendable, Equatable {
        /// The greeting has not been sent: nothing is parsed.
        case greeting
        case clientFlags
        case options(Negotiation)
        case transmission(NBDSession)
        /// A valid WRITE header was read; waiting for its payload.
        case payload(NBDSession, NBDRequest)
        /// An invalid WRITE: discarding its payload before sending the rejection.
        case discarding(NBDSession, remaining: UInt32, NBDRejection)
        case closed
    }

    public private(set) var state: State = .greeting
    public let exports: [NBDExportInfo]
    public let tls: TLSPolicy

    public init(exports: [NBDExportInfo], tls: TLSPolicy = .off) {
        self.exports = exports
        self.tls = tls
    }

    /// Whether the connection runs over TLS (NBD_OPT_STARTTLS was accepted).
    public var isTLSActive: Bool {
        switch state {
        case .options(let n): return n.tlsActive
        case .transmission(let s), .payload(let s, _), .discarding(let s, _, _): return s.tls
        case .greeting, .clientFlags, .closed: return false
        }
    }

    /// The negotiated session, once in the transmission phase.
    public var session: NBDSession? {
        switch state {
        case .transmission(let s), .payload(let s, _), .discarding(let s, _, _): return s
        case .greeting, .clientFlags, .options, .closed: return nil
        }
    }

    public var isInTransmission: Bool { session != nil }
    public var isClosed: Bool { if case .closed = state { return true } else { return false } }

    /// Starts the connection: the server speaks first. Returns `.sendGreeting` (once; nil afterwards).
    public mutating func start() -> Action? {
        guard case .greeting = state else { return nil }
        state = .clientFlags
        return .sendGreeting
    }

    /// `start()` for callers that want the greeting's bytes (tests, fuzzing).
    @discardableResult
    public mutating func greeting() -> ByteBuffer {
        _ = start()
        var b = ByteBuffer()
        b.writeNBDGreeting()
        return b
    }

    /// Stops parsing (after a close was decided elsewhere, e.g. on shutdown).
    public mutating func markClosed() {
        state = .closed
    }

    /// Consumes what it can from `buffer` and returns the next action, or nil when more bytes are needed.
    public mutating func next(from buffer: inout ByteBuffer) -> Action? {
        while true {
            switch state {
            case .greeting, .closed:
                return nil

            case .clientFlags:
                guard let raw = buffer.readInteger(as: UInt32.self) else { return nil }
                let flags = NBDClientFlags(rawValue: raw)
                guard flags.isSubset(of: .known) else {
                    return close("unknown client flags 0x\(String(raw, radix: 16))")
                }
                var negotiation = Negotiation()
                negotiation.noZeroes = flags.contains(.noZeroes)
                state = .options(negotiation)

            case .options(var negotiation):
                guard buffer.readableBytes >= 16 else { return nil }
                let start = buffer.readerIndex
                guard let magic = buffer.getInteger(at: start, as: UInt64.self),
                      let option = buffer.getInteger(at: start + 8, as: UInt32.self),
                      let length = buffer.getInteger(at: start + 12, as: UInt32.self)
                else { return nil }
                guard magic == NBDMagic.iHaveOpt else { return close("bad option magic") }
                guard length <= NBDLimits.maxOptionLength else {
                    return close("option \(option) payload of \(length) bytes is too large")
                }
                guard buffer.readableBytes >= 16 + Int(length) else { return nil }
                buffer.moveReaderIndex(forwardBy: 16)
                let payload = buffer.readSlice(length: Int(length)) ?? ByteBuffer()
                negotiation.optionCount += 1
                guard negotiation.optionCount <= NBDLimits.maxOptions else { return close("too many options") }
                return handleOption(option, payload: payload, &negotiation)

            case .transmission(let session):
                guard buffer.readableBytes >= NBDLimits.requestHeaderSize,
                      let (magic, header) = buffer.readNBDRequestHeader()
                else { return nil }
                guard magic == NBDMagic.request else {
                    return close("bad request magic 0x\(String(magic, radix: 16))")
                }
                switch NBDRequestValidator.validate(header, session: session) {
                case .success(let request):
                    switch request.command {
                    case .write:
                        state = .payload(session, request)
                    case .disconnect:
                        state = .closed
                        return .disconnect
                    default:
                        return .request(request, payload: nil)
                    }
                case .failure(let rejection):
                    if header.hasPayload && header.length > 0 {
                        state = .discarding(session, remaining: header.length, rejection)
                    } else {
                        return .reject(rejection)
                    }
                }

            case .payload(let session, let request):
                guard buffer.readableBytes >= Int(request.length),
                      let payload = buffer.readSlice(length: Int(request.length))
                else { return nil }
                state = .transmission(session)
                return .request(request, payload: payload)

            case .discarding(let session, let remaining, let rejection):
                let n = min(UInt32(buffer.readableBytes), remaining)
                buffer.moveReaderIndex(forwardBy: Int(n))
                if n < remaining {
                    state = .discarding(session, remaining: remaining - n, rejection)
                    return nil
                }
                state = .transmission(session)
                return .reject(rejection)
            }
        }
    }

    /// Bytes of a WRITE payload still expected, so the caller can size its receive buffer.
    public var pendingPayloadBytes: Int {
        if case .payload(_, let r) = state { return Int(r.length) }
        return 0
    }

    private mutating func close(_ reason: String) -> Action {
        state = .closed
        return .close(reason: reason)
    }
}

// MARK: options

extension NBDServerStateMachine {
    private func export(named name: String) -> NBDExportInfo? {
        if let e = exports.first(where: { $0.name == name }) { return e }
        // The empty name asks for the default export: the first one.
        return name.isEmpty ? exports.first : nil
    }

    /// Handles one option in the options phase. `negotiation` is the state's data, already counted; it
    /// is stored back unless the option leaves the options phase.
    private mutating func handleOption(_ code: UInt32, payload: ByteBuffer, _ negotiation: inout Negotiation) -> Action {
        func reply(_ type: NBDOptionReplyType, _ message: String = "") -> Action {
            .sendOptionReply(NBDOptionReply(option: code, type: type, message: message))
        }
        state = .options(negotiation)
        if tls == .required && !negotiation.tlsActive && code != NBDOption.startTLS.rawValue
            && code != NBDOption.abort.rawValue {
            // NBD_OPT_EXPORT_NAME has no error reply: the spec says to drop the connection.
            if code == NBDOption.exportName.rawValue { return close("NBD_OPT_EXPORT_NAME before TLS, which this server requires") }
            return reply(.errTLSRequired, "this server requires TLS: send NBD_OPT_STARTTLS first")
        }
        guard let option = NBDOption(rawValue: code) else {
            return reply(.errUnsupported, "option \(code) is not supported")
        }
        switch option {
        case .exportName:
            var p = payload
            guard p.readableBytes <= NBDLimits.maxStringLength,
                  let name = NBDString.decode(p.readBytes(length: p.readableBytes) ?? []),
                  let export = export(named: name)
            else { return close("NBD_OPT_EXPORT_NAME: no such export") }
            let flags = export.transmissionFlags(structuredReplies: negotiation.structuredReplies)
            return enter(makeSession(export, negotiation, blockSizesKnown: false),
                         .exportName(size: export.size, flags: flags, noZeroes: negotiation.noZeroes))

        case .abort:
            state = .closed
            return .sendOptionReplyAndClose(NBDOptionReply(option: code, type: .ack))

        case .list:
            guard payload.readableBytes == 0 else { return reply(.errInvalid, "NBD_OPT_LIST takes no data") }
            return .sendExportList(NBDExportListReply(
                option: code, exports: exports.map { .init(name: $0.name, description: $0.description) }))

        case .startTLS:
            guard tls != .off else { return reply(.errUnsupported, "TLS is not enabled on this server (serve --tls)") }
            guard !negotiation.tlsActive else { return reply(.errInvalid, "TLS is already active") }
            guard payload.readableBytes == 0 else { return reply(.errInvalid, "NBD_OPT_STARTTLS takes no data") }
            // What was negotiated in plain text does not carry over into TLS.
            state = .options(Negotiation(noZeroes: negotiation.noZeroes, optionCount: negotiation.optionCount,
                                         tlsActive: true))
            return .startTLS(NBDOptionReply(option: code, type: .ack))

        case .info, .go:
            guard let request = ByteBuffer.parseInfoRequest(payload) else {
                return reply(.errInvalid, "malformed \(option == .go ? "NBD_OPT_GO" : "NBD_OPT_INFO")")
            }
            guard let export = export(named: request.exportName) else {
                return reply(.errUnknown, "export '\(request.exportName)' not found")
            }
            let requested = Set(request.requests)
            let info = NBDExportInfoReply(
                option: code, size: export.size,
                flags: export.transmissionFlags(structuredReplies: negotiation.structuredReplies),
                name: requested.contains(NBDInfoType.name.rawValue) ? export.name : nil,
                description: requested.contains(NBDInfoType.description.rawValue) && !export.description.isEmpty
                    ? export.description : nil,
                minimumBlockSize: export.minimumBlockSize,
                preferredBlockSize: max(NBDLimits.preferredBlockSize, export.minimumBlockSize),
                maximumBlockSize: NBDLimits.maxRequestLength)
            if option == .info { return .sendExportInfo(info) }
            let knows = requested.contains(NBDInfoType.blockSize.rawValue)
            return enter(makeSession(export, negotiation, blockSizesKnown: knows), .go(info))

        case .structuredReply:
            guard payload.readableBytes == 0 else {
                return reply(.errInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
            }
            guard !negotiation.structuredReplies else {
                return reply(.errInvalid, "structured replies are already negotiated")
            }
            negotiation.structuredReplies = true
            state = .options(negotiation)
            return reply(.ack)

        case .listMetaContext, .setMetaContext:
            let isSet = option == .setMetaContext
            guard negotiation.structuredReplies else {
                return reply(.errInvalid, "negotiate structured replies first")
            }
            guard let request = ByteBuffer.parseMetaContextRequest(payload) else {
                return reply(.errInvalid, "malformed meta context request")
            }
            if isSet {
                negotiation.metaContextExport = nil
                state = .options(negotiation)
            }
            guard export(named: request.exportName) != nil else {
                return reply(.errUnknown, "export '\(request.exportName)' not found")
            }
            let matches: Bool
            if isSet {
                matches = request.queries.contains(NBDLimits.baseAllocation)
            } else {
                matches = request.queries.isEmpty
                    || request.queries.contains { $0 == "base:" || $0 == NBDLimits.baseAllocation }
            }
            var context: NBDMetaContextReply.Context?
            if matches {
                context = .init(id: isSet ? NBDLimits.baseAllocationContextID : 0, name: NBDLimits.baseAllocation)
                if isSet {
                    negotiation.metaContextExport = request.exportName
                    state = .options(negotiation)
                }
            }
            return .sendMetaContexts(NBDMetaContextReply(option: code, context: context))

        case .peekExport, .extendedHeaders:
            return reply(.errUnsupported, "option \(code) is not supported")
        }
    }

    private func makeSession(_ export: NBDExportInfo, _ negotiation: Negotiation, blockSizesKnown: Bool) -> NBDSession {
        let selected = negotiation.metaContextExport.flatMap { self.export(named: $0) }?.name == export.name
        var session = NBDSession(export: export, structuredReplies: negotiation.structuredReplies,
                                 baseAllocationContext: selected ? NBDLimits.baseAllocationContextID : nil,
                                 maximumRequestLength: blockSizesKnown ? NBDLimits.maxRequestLength
                                     : NBDLimits.maxRequestLengthUnadvertised)
        session.tls = negotiation.tlsActive
        return session
    }

    private mutating func enter(_ session: NBDSession, _ reply: NBDTransmissionReply) -> Action {
        state = .transmission(session)
        return .enterTransmission(session, reply)
    }
}
