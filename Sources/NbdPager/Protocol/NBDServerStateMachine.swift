import NIOCore

/// The server side of one NBD connection as a value type: it owns the parser, takes the bytes the client
/// sent and returns what to do next. It does no I/O, so it can be fed byte by byte in tests.
public struct NBDServerStateMachine {
    public enum Action {
        /// Send these handshake bytes.
        case send(ByteBuffer)
        /// Send these bytes, then close (NBD_OPT_ABORT).
        case sendAndClose(ByteBuffer)
        /// Hard disconnect: the client broke a MUST of the protocol.
        case close(reason: String)
        /// Send these bytes and start the transmission phase with this session.
        case enterTransmission(ByteBuffer, NBDSession)
        /// Run this request; `payload` holds a WRITE's data.
        case request(NBDRequest, payload: ByteBuffer?)
        /// Reply with this error (any WRITE payload has already been consumed).
        case reject(NBDRejection)
        /// NBD_CMD_DISC: finish in-flight requests, then close.
        case disconnect
    }

    enum State {
        case greeting
        case clientFlags
        case options
        case transmission
        /// A valid WRITE header was read; waiting for its payload.
        case payload(NBDRequest)
        /// An invalid WRITE: discarding its payload before sending the rejection.
        case discarding(remaining: UInt32, NBDRejection)
        case closed
    }

    private(set) var state: State = .greeting
    public let exports: [NBDExportInfo]
    private var noZeroes = false
    private var optionCount = 0
    private var structuredReplies = false
    /// base:allocation selected by SET_META_CONTEXT, with the export name it was selected for.
    private var metaContextExport: String?
    public private(set) var session: NBDSession?

    public init(exports: [NBDExportInfo]) {
        self.exports = exports
    }

    public var isInTransmission: Bool { session != nil }
    public var isClosed: Bool { if case .closed = state { return true } else { return false } }

    /// The first bytes of the connection.
    public mutating func greeting() -> ByteBuffer {
        var b = ByteBuffer()
        b.writeNBDGreeting()
        state = .clientFlags
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
                noZeroes = flags.contains(.noZeroes)
                state = .options

            case .options:
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
                optionCount += 1
                guard optionCount <= NBDLimits.maxOptions else { return close("too many options") }
                return handleOption(option, payload: payload)

            case .transmission:
                guard buffer.readableBytes >= NBDLimits.requestHeaderSize,
                      let (magic, header) = buffer.readNBDRequestHeader()
                else { return nil }
                guard magic == NBDMagic.request else {
                    return close("bad request magic 0x\(String(magic, radix: 16))")
                }
                guard let session else { return close("no session") }
                switch NBDRequestValidator.validate(header, session: session) {
                case .success(let request):
                    switch request.command {
                    case .write:
                        state = .payload(request)
                    case .disconnect:
                        state = .closed
                        return .disconnect
                    default:
                        return .request(request, payload: nil)
                    }
                case .failure(let rejection):
                    if header.hasPayload && header.length > 0 {
                        state = .discarding(remaining: header.length, rejection)
                    } else {
                        return .reject(rejection)
                    }
                }

            case .payload(let request):
                guard buffer.readableBytes >= Int(request.length),
                      let payload = buffer.readSlice(length: Int(request.length))
                else { return nil }
                state = .transmission
                return .request(request, payload: payload)

            case .discarding(let remaining, let rejection):
                let n = min(UInt32(buffer.readableBytes), remaining)
                buffer.moveReaderIndex(forwardBy: Int(n))
                if n < remaining {
                    state = .discarding(remaining: remaining - n, rejection)
                    return nil
                }
                state = .transmission
                return .reject(rejection)
            }
        }
    }

    /// Bytes of a WRITE payload still expected, so the caller can size its receive buffer.
    public var pendingPayloadBytes: Int {
        if case .payload(let r) = state { return Int(r.length) }
        return 0
    }

    // MARK: options

    private mutating func close(_ reason: String) -> Action {
        state = .closed
        return .close(reason: reason)
    }

    private func export(named name: String) -> NBDExportInfo? {
        if let e = exports.first(where: { $0.name == name }) { return e }
        // The empty name asks for the default export: the first one.
        return name.isEmpty ? exports.first : nil
    }

    private func reply(_ option: UInt32, _ type: NBDOptionReplyType, _ message: String = "") -> Action {
        var b = ByteBuffer()
        b.writeOptionReply(option: option, type: type, message: message)
        return .send(b)
    }

    private mutating func handleOption(_ code: UInt32, payload: ByteBuffer) -> Action {
        guard let option = NBDOption(rawValue: code) else {
            return reply(code, .errUnsupported, "option \(code) is not supported")
        }
        switch option {
        case .exportName:
            var p = payload
            guard p.readableBytes <= NBDLimits.maxStringLength,
                  let name = NBDString.decode(p.readBytes(length: p.readableBytes) ?? []),
                  let export = export(named: name)
            else { return close("NBD_OPT_EXPORT_NAME: no such export") }
            let session = makeSession(export)
            var b = ByteBuffer()
            b.writeInteger(export.size)
            b.writeInteger(export.transmissionFlags(structuredReplies: structuredReplies).rawValue)
            if !noZeroes { b.writeRepeatingByte(0, count: 124) }
            return enter(b, session)

        case .abort:
            var b = ByteBuffer()
            b.writeOptionReply(option: code, type: .ack)
            state = .closed
            return .sendAndClose(b)

        case .list:
            guard payload.readableBytes == 0 else { return reply(code, .errInvalid, "NBD_OPT_LIST takes no data") }
            var b = ByteBuffer()
            for e in exports {
                let name = Array(e.name.utf8)
                let description = Array(e.description.utf8.prefix(NBDLimits.maxStringLength))
                b.writeOptionReplyHeader(option: code, type: .server, dataLength: 4 + name.count + description.count)
                b.writeInteger(UInt32(name.count))
                b.writeBytes(name)
                b.writeBytes(description)
            }
            b.writeOptionReply(option: code, type: .ack)
            return .send(b)

        case .startTLS:
            return reply(code, .errUnsupported, "TLS is not supported by this server")

        case .info, .go:
            guard let request = ByteBuffer.parseInfoRequest(payload) else {
                return reply(code, .errInvalid, "malformed \(option == .go ? "NBD_OPT_GO" : "NBD_OPT_INFO")")
            }
            guard let export = export(named: request.exportName) else {
                return reply(code, .errUnknown, "export '\(request.exportName)' not found")
            }
            var b = ByteBuffer()
            b.writeOptionReplyHeader(option: code, type: .info, dataLength: 12)
            b.writeInteger(NBDInfoType.export.rawValue)
            b.writeInteger(export.size)
            b.writeInteger(export.transmissionFlags(structuredReplies: structuredReplies).rawValue)
            let requested = Set(request.requests)
            if requested.contains(NBDInfoType.name.rawValue) {
                let name = Array(export.name.utf8)
                b.writeOptionReplyHeader(option: code, type: .info, dataLength: 2 + name.count)
                b.writeInteger(NBDInfoType.name.rawValue)
                b.writeBytes(name)
            }
            if requested.contains(NBDInfoType.description.rawValue) && !export.description.isEmpty {
                let text = Array(export.description.utf8.prefix(NBDLimits.maxStringLength))
                b.writeOptionReplyHeader(option: code, type: .info, dataLength: 2 + text.count)
                b.writeInteger(NBDInfoType.description.rawValue)
                b.writeBytes(text)
            }
            b.writeOptionReplyHeader(option: code, type: .info, dataLength: 14)
            b.writeInteger(NBDInfoType.blockSize.rawValue)
            b.writeInteger(export.minimumBlockSize)
            b.writeInteger(max(NBDLimits.preferredBlockSize, export.minimumBlockSize))
            b.writeInteger(NBDLimits.maxRequestLength)
            b.writeOptionReply(option: code, type: .ack)
            if option == .info { return .send(b) }
            return enter(b, makeSession(export))

        case .structuredReply:
            guard payload.readableBytes == 0 else {
                return reply(code, .errInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
            }
            guard !structuredReplies else {
                return reply(code, .errInvalid, "structured replies are already negotiated")
            }
            structuredReplies = true
            return reply(code, .ack)

        case .listMetaContext, .setMetaContext:
            let isSet = option == .setMetaContext
            guard structuredReplies else {
                return reply(code, .errInvalid, "negotiate structured replies first")
            }
            guard let request = ByteBuffer.parseMetaContextRequest(payload) else {
                return reply(code, .errInvalid, "malformed meta context request")
            }
            if isSet { metaContextExport = nil }
            guard export(named: request.exportName) != nil else {
                return reply(code, .errUnknown, "export '\(request.exportName)' not found")
            }
            let matches: Bool
            if isSet {
                matches = request.queries.contains(NBDLimits.baseAllocation)
            } else {
                matches = request.queries.isEmpty
                    || request.queries.contains { $0 == "base:" || $0 == NBDLimits.baseAllocation }
            }
            var b = ByteBuffer()
            if matches {
                let name = Array(NBDLimits.baseAllocation.utf8)
                b.writeOptionReplyHeader(option: code, type: .metaContext, dataLength: 4 + name.count)
                b.writeInteger(isSet ? NBDLimits.baseAllocationContextID : 0)
                b.writeBytes(name)
                if isSet { metaContextExport = request.exportName }
            }
            b.writeOptionReply(option: code, type: .ack)
            return .send(b)

        case .peekExport, .extendedHeaders:
            return reply(code, .errUnsupported, "option \(code) is not supported")
        }
    }

    private func makeSession(_ export: NBDExportInfo) -> NBDSession {
        let selected = metaContextExport.flatMap { self.export(named: $0) }?.name == export.name
        return NBDSession(export: export, structuredReplies: structuredReplies,
                          baseAllocationContext: selected ? NBDLimits.baseAllocationContextID : nil)
    }

    private mutating func enter(_ bytes: ByteBuffer, _ session: NBDSession) -> Action {
        self.session = session
        state = .transmission
        return .enterTransmission(bytes, session)
    }
}
