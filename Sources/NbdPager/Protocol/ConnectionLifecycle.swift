/// The life of one connection as a pure value: when to read, when to parse, when requests are refused
/// with ESHUTDOWN and when to close. The channel handler reports what happened (inputs) and carries out
/// the `Action` each input returns; this type does no I/O. `NBDServerStateMachine` parses the bytes;
/// this one decides whether they may be read and parsed now.
///
/// Every live state carries a `Flow`: requests in flight, whether the channel is writable, and whether a
/// read or a parse is held back. Back-pressure: reading and parsing stop while `maxInFlight` requests
/// are in flight or the client is not reading its replies (channel not writable), so memory stays
/// bounded whatever the client sends; they resume when a request finishes or the channel becomes
/// writable again. "Can start" below means `inFlight < maxInFlight && writable`.
///
/// | state      | input                       | next state                | action                          |
/// |------------|-----------------------------|---------------------------|---------------------------------|
/// | handshake  | transmissionStarted         | serving                   | –                               |
/// | handshake  | shutdownRequested           | closing                   | closeAfterReplies               |
/// | handshake, serving | halfClosed          | draining                  | closeAfterReplies if finished   |
/// | serving    | disconnectReceived          | draining                  | – (checked by `parsed`)         |
/// | serving    | shutdownRequested           | quiescing(64 reads)       | drainInput                      |
/// | quiescing  | readComplete                | quiescing                 | probeUnreadInput                |
/// | quiescing  | unreadInput(n > 0), reads left | quiescing(reads - 1)   | read                            |
/// | quiescing  | unreadInput(0) or no reads left | draining(shutdown)    | closeAfterReplies if finished   |
/// | quiescing  | halfClosed / disconnect     | draining(shutdown)        | closeAfterReplies if finished   |
/// | draining   | shutdownRequested           | draining(shutdown)        | parse                           |
/// | draining   | requestFinished, writable.., parsed | closing if finished | closeAfterReplies if finished  |
/// | any live   | readRequested, can start, input open | same             | read                            |
/// | any live   | readRequested otherwise     | same, read held           | –                               |
/// | any live   | mayParse, can start or shutting down | same             | true                            |
/// | any live   | mayParse otherwise          | same, parse held          | false                           |
/// | any live   | requestFinished / writabilityChanged, can start, parse held | same | parse                 |
/// | any live   | requestFinished / writabilityChanged / parsed, can start, read held, input open | same | read |
/// | any live   | parseStarted / parseEnded   | same, parsing on / off    | –                               |
/// | any live   | closeRequested              | closing                   | –                               |
/// | any        | channelInactive             | closed                    | –                               |
/// | closing, closed | anything else          | same                      | none / false                    |
///
/// "Input open" means handshake, serving or quiescing (draining reads nothing more). "Finished" means
/// draining with nothing in flight, no parse held and no parse pass running (`parseStarted` ..
/// `parseEnded` bracket each pass; a close is decided after the pass, by `parsed` or `unreadInput`).
/// "Shutting down" (quiescing, draining(shutdown)): requests parsed from then on are refused with
/// ESHUTDOWN (`requestParsed` returns `.refuse`), and all buffered input is parsed at once, without
/// back-pressure, since nothing new is started.
public struct ConnectionLifecycle: Sendable, Equatable {
    /// Requests in flight (waiting for storage or the source) above which reading and parsing pause.
    public static let maxInFlight = 128
    /// Reads made after a server shutdown to collect requests the client had already sent: closing
    /// with unread input would reset the connection and lose the replies already queued. Bounded, so
    /// a client that keeps sending cannot hold the shutdown up.
    public static let maxShutdownReads = 64

    public struct Flow: Sendable, Equatable {
        public var inFlight = 0
        public var writable = true
        /// The channel asked for a read that back-pressure held back.
        public var readHeld = false
        /// Parsing stopped on back-pressure with complete requests possibly still buffered.
        public var parseHeld = false
        /// A parse pass is running: the connection does not close under it (a reply written while
        /// parsing can change writability, and a request can complete synchronously).
        public var parsing = false

        public init(inFlight: Int = 0, writable: Bool = true, readHeld: Bool = false, parseHeld: Bool = false,
                    parsing: Bool = false) {
            self.inFlight = inFlight
            self.writable = writable
            self.readHeld = readHeld
            self.parseHeld = parseHeld
            self.parsing = parsing
        }

        var canStart: Bool { inFlight < ConnectionLifecycle.maxInFlight && writable }
    }

    public enum State: Sendable, Equatable {
        /// Negotiating options.
        case handshake(Flow)
        /// Transmission: reading, parsing and running requests.
        case serving(Flow)
        /// Server shutdown: reading only what the client had already sent, answering it with ESHUTDOWN.
        case quiescing(Flow, readsLeft: Int)
        /// No more input (DISC, half-close, or the shutdown's reads are done): answering what was
        /// received, then closing.
        case draining(Flow, shuttingDown: Bool)
        /// The close has been initiated: nothing more is read, parsed or started.
        case closing
        /// The channel is gone.
        case closed
    }

    public enum Action: Sendable, Equatable {
        case none
        /// Ask the channel for more bytes.
        case read
        /// Parse (and run) the buffered input, then report `parsed()`.
        case parse
        /// Parse the buffered input, then report the socket's unread bytes with `unreadInput(_:)`.
        case drainInput
        /// Report the socket's unread bytes with `unreadInput(_:)`.
        case probeUnreadInput
        /// Flush what is queued and close once it has been written.
        case closeAfterReplies
    }

    /// What to do with a request the parser produced.
    public enum RequestDisposition: Sendable, Equatable {
        case run
        /// Answer ESHUTDOWN: the server is shutting down.
        case refuse
    }

    public private(set) var state: State

    public init(state: State = .handshake(Flow())) {
        self.state = state
    }

    // MARK: queries

    /// Closing or closed: nothing more is sent through NIO on this connection's behalf.
    public var isClosing: Bool {
        switch state {
        case .closing, .closed: return true
        default: return false
        }
    }

    public var inFlight: Int { flow?.inFlight ?? 0 }

    /// A request finishing now would change nothing but the count: the connection is handshaking or
    /// serving with no read or parse held back. While this holds, a request answered by another thread
    /// need not wake the event loop to say so (`QuietCompletions`): a count that lags only holds
    /// reading back sooner, which makes it stop holding.
    public var finishIsQuiet: Bool {
        switch state {
        case .handshake(let f), .serving(let f): return !f.readHeld && !f.parseHeld
        case .quiescing, .draining, .closing, .closed: return false
        }
    }

    var flow: Flow? {
        switch state {
        case .handshake(let f), .serving(let f), .quiescing(let f, _), .draining(let f, _): return f
        case .closing, .closed: return nil
        }
    }

    /// Applies `body` to the flow of a live state.
    private mutating func updateFlow(_ body: (inout Flow) -> Void) {
        switch state {
        case .handshake(var f): body(&f); state = .handshake(f)
        case .serving(var f): body(&f); state = .serving(f)
        case .quiescing(var f, let left): body(&f); state = .quiescing(f, readsLeft: left)
        case .draining(var f, let s): body(&f); state = .draining(f, shuttingDown: s)
        case .closing, .closed: break
        }
    }

    private var isShuttingDown: Bool {
        switch state {
        case .quiescing, .draining(_, shuttingDown: true): return true
        default: return false
        }
    }

    private var inputOpen: Bool {
        switch state {
        case .handshake, .serving, .quiescing: return true
        case .draining, .closing, .closed: return false
        }
    }

    // MARK: inputs

    public mutating func transmissionStarted() {
        if case .handshake(let f) = state { state = .serving(f) }
    }

    /// Bytes arrived; false when they are to be dropped (the connection is closing).
    public func bytesReceived() -> Bool { !isClosing }

    /// Whether the next request may be parsed now; records a held parse when not.
    public mutating func mayParse() -> Bool {
        guard let f = flow else { return false }
        let allowed = isShuttingDown || f.canStart
        if f.parseHeld == allowed { updateFlow { $0.parseHeld = !allowed } }
        return allowed
    }

    public func requestParsed() -> RequestDisposition {
        isShuttingDown ? .refuse : .run
    }

    /// A request went asynchronous (storage, thread pool, source): it counts against `maxInFlight`.
    public mutating func requestStarted() {
        updateFlow { $0.inFlight += 1 }
    }

    public mutating func requestFinished() -> Action {
        requestsFinished(1)
    }

    /// `count` requests finished (counted together when their replies were written by other threads).
    public mutating func requestsFinished(_ count: Int) -> Action {
        updateFlow { $0.inFlight -= count }
        return resume()
    }

    public mutating func writabilityChanged(isWritable: Bool) -> Action {
        updateFlow { $0.writable = isWritable }
        return resume()
    }

    /// A parse pass begins (`parseEnded` follows it). No close is decided while it runs.
    public mutating func parseStarted() {
        updateFlow { $0.parsing = true }
    }

    public mutating func parseEnded() {
        updateFlow { $0.parsing = false }
    }

    /// A parse pass (after bytes arrived, or for `.parse`) is over: resume a held read, or close if
    /// finished.
    public mutating func parsed() -> Action {
        if let f = flow, f.canStart, f.readHeld, inputOpen {
            updateFlow { $0.readHeld = false }
            return .read
        }
        return finishIfDone()
    }

    /// NBD_CMD_DISC was parsed: nothing more is read; the close follows `parsed()`.
    public mutating func disconnectReceived() {
        stopInput()
    }

    /// The client shut down its sending side: answer what it sent, then close.
    public mutating func halfClosed() -> Action {
        stopInput()
        return finishIfDone()
    }

    /// Server shutdown (NBD spec: serve in-flight requests, answer the rest with ESHUTDOWN).
    public mutating func shutdownRequested() -> Action {
        switch state {
        case .handshake:
            state = .closing
            return .closeAfterReplies
        case .serving(let f):
            state = .quiescing(f, readsLeft: Self.maxShutdownReads)
            return .drainInput
        case .draining(let f, shuttingDown: false):
            state = .draining(f, shuttingDown: true)
            return .parse
        case .quiescing, .draining, .closing, .closed:
            return .none
        }
    }

    /// A burst of reads completed.
    public func readComplete() -> Action {
        if case .quiescing = state { return .probeUnreadInput }
        return .none
    }

    /// Bytes the client sent that are still in the socket (asked for by `.probeUnreadInput`/`.drainInput`).
    public mutating func unreadInput(_ bytes: Int) -> Action {
        guard case .quiescing(let f, let left) = state else { return .none }
        if bytes > 0 && left > 0 {
            state = .quiescing(f, readsLeft: left - 1)
            return .read
        }
        state = .draining(f, shuttingDown: true)
        return finishIfDone()
    }

    /// The channel wants to read (outbound `read`).
    public mutating func readRequested() -> Action {
        guard let f = flow else { return .none }
        if f.canStart && inputOpen { return .read }
        if !f.readHeld { updateFlow { $0.readHeld = true } }
        return .none
    }

    /// The protocol decided to close (bad input, ABORT) or the connection was refused.
    public mutating func closeRequested() {
        if case .closed = state { return }
        state = .closing
    }

    public mutating func channelInactive() {
        state = .closed
    }

    // MARK: transitions

    private mutating func stopInput() {
        switch state {
        case .handshake(let f), .serving(let f): state = .draining(f, shuttingDown: false)
        case .quiescing(let f, _): state = .draining(f, shuttingDown: true)
        case .draining, .closing, .closed: break
        }
    }

    /// After a request finished or writability changed: parse what back-pressure held, else resume a
    /// held read, else close if finished.
    private mutating func resume() -> Action {
        guard let f = flow else { return .none }
        if f.canStart {
            if f.parseHeld { return .parse }
            if f.readHeld && inputOpen {
                updateFlow { $0.readHeld = false }
                return .read
            }
        }
        return finishIfDone()
    }

    private mutating func finishIfDone() -> Action {
        guard case .draining(let f, _) = state, f.inFlight == 0, !f.parseHeld, !f.parsing else { return .none }
        state = .closing
        return .closeAfterReplies
    }
}
