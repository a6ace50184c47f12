import Atomics
import Dispatch
import XCTest
@testable import NbdPager

/// The transmission lifecycle, one row per (state, input) pair of the table in ConnectionLifecycle.swift.
final class ConnectionLifecycleTests: XCTestCase {
    typealias L = ConnectionLifecycle
    typealias F = ConnectionLifecycle.Flow

    enum Input {
        case transmissionStarted, parseStarted, parseEnded, mayParse, requestStarted, requestFinished, writable(Bool), parsed
        case disconnect, halfClosed, shutdown, readComplete, unread(Int), readRequested, closeRequested, inactive
    }

    /// Applies `input`; returns the action (`.none` for inputs without one) and, for mayParse, the answer.
    func apply(_ input: Input, to l: inout L) -> (L.Action, Bool?) {
        switch input {
        case .transmissionStarted: l.transmissionStarted(); return (.none, nil)
        case .parseStarted: l.parseStarted(); return (.none, nil)
        case .parseEnded: l.parseEnded(); return (.none, nil)
        case .mayParse: return (.none, l.mayParse())
        case .requestStarted: l.requestStarted(); return (.none, nil)
        case .requestFinished: return (l.requestFinished(), nil)
        case .writable(let w): return (l.writabilityChanged(isWritable: w), nil)
        case .parsed: return (l.parsed(), nil)
        case .disconnect: l.disconnectReceived(); return (.none, nil)
        case .halfClosed: return (l.halfClosed(), nil)
        case .shutdown: return (l.shutdownRequested(), nil)
        case .readComplete: return (l.readComplete(), nil)
        case .unread(let n): return (l.unreadInput(n), nil)
        case .readRequested: return (l.readRequested(), nil)
        case .closeRequested: l.closeRequested(); return (.none, nil)
        case .inactive: l.channelInactive(); return (.none, nil)
        }
    }

    static let full = F(inFlight: L.maxInFlight)
    static let busy = F(inFlight: 3)

    func testTransitionTable() {
        let rows: [(L.State, Input, L.State, L.Action, Bool?)] = [
            // handshake
            (.handshake(F()), .transmissionStarted, .serving(F()), .none, nil),
            (.handshake(F()), .shutdown, .closing, .closeAfterReplies, nil),
            (.handshake(F()), .halfClosed, .closing, .closeAfterReplies, nil),
            (.handshake(F()), .readRequested, .handshake(F()), .read, nil),
            (.handshake(F(writable: false)), .readRequested, .handshake(F(writable: false, readHeld: true)), .none, nil),
            (.handshake(F()), .closeRequested, .closing, .none, nil),
            // serving: reading and back-pressure
            (.serving(F()), .readRequested, .serving(F()), .read, nil),
            (.serving(Self.full), .readRequested, .serving(F(inFlight: L.maxInFlight, readHeld: true)), .none, nil),
            (.serving(F(writable: false)), .readRequested, .serving(F(writable: false, readHeld: true)), .none, nil),
            (.serving(F()), .mayParse, .serving(F()), .none, true),
            (.serving(Self.full), .mayParse, .serving(F(inFlight: L.maxInFlight, parseHeld: true)), .none, false),
            (.serving(F(writable: false)), .mayParse, .serving(F(writable: false, parseHeld: true)), .none, false),
            (.serving(F(parseHeld: true)), .mayParse, .serving(F()), .none, true),
            (.serving(F()), .requestStarted, .serving(F(inFlight: 1)), .none, nil),
            (.serving(Self.busy), .requestFinished, .serving(F(inFlight: 2)), .none, nil),
            (.serving(F(inFlight: L.maxInFlight, parseHeld: true)), .requestFinished,
             .serving(F(inFlight: L.maxInFlight - 1, parseHeld: true)), .parse, nil),
            (.serving(F(inFlight: L.maxInFlight, readHeld: true)), .requestFinished,
             .serving(F(inFlight: L.maxInFlight - 1)), .read, nil),
            (.serving(F(inFlight: L.maxInFlight, readHeld: true, parseHeld: true)), .requestFinished,
             .serving(F(inFlight: L.maxInFlight - 1, readHeld: true, parseHeld: true)), .parse, nil),
            (.serving(F(readHeld: true)), .parsed, .serving(F()), .read, nil),
            (.serving(F()), .parsed, .serving(F()), .none, nil),
            (.serving(F(writable: false, readHeld: true, parseHeld: true)), .writable(true),
             .serving(F(readHeld: true, parseHeld: true)), .parse, nil),
            (.serving(F(writable: false, readHeld: true)), .writable(true), .serving(F()), .read, nil),
            (.serving(F(readHeld: true)), .writable(false), .serving(F(writable: false, readHeld: true)), .none, nil),
            (.serving(F()), .readComplete, .serving(F()), .none, nil),
            (.serving(F()), .unread(10), .serving(F()), .none, nil),
            // serving: ends of input
            (.serving(Self.busy), .disconnect, .draining(Self.busy, shuttingDown: false), .none, nil),
            (.serving(F()), .disconnect, .draining(F(), shuttingDown: false), .none, nil),
            (.serving(Self.busy), .halfClosed, .draining(Self.busy, shuttingDown: false), .none, nil),
            (.serving(F()), .halfClosed, .closing, .closeAfterReplies, nil),
            (.serving(F(parseHeld: true)), .halfClosed, .draining(F(parseHeld: true), shuttingDown: false), .none, nil),
            (.serving(Self.busy), .shutdown, .quiescing(Self.busy, readsLeft: L.maxShutdownReads), .drainInput, nil),
            (.serving(Self.busy), .closeRequested, .closing, .none, nil),
            // quiescing: read what the client already sent, refuse it, then drain
            (.quiescing(Self.full, readsLeft: 5), .mayParse, .quiescing(Self.full, readsLeft: 5), .none, true),
            (.quiescing(F(), readsLeft: 5), .readComplete, .quiescing(F(), readsLeft: 5), .probeUnreadInput, nil),
            (.quiescing(F(), readsLeft: 5), .unread(100), .quiescing(F(), readsLeft: 4), .read, nil),
            (.quiescing(Self.busy, readsLeft: 0), .unread(100), .draining(Self.busy, shuttingDown: true), .none, nil),
            (.quiescing(F(), readsLeft: 0), .unread(100), .closing, .closeAfterReplies, nil),
            (.quiescing(F(), readsLeft: 5), .unread(0), .closing, .closeAfterReplies, nil),
            (.quiescing(Self.busy, readsLeft: 5), .unread(0), .draining(Self.busy, shuttingDown: true), .none, nil),
            (.quiescing(Self.busy, readsLeft: 5), .halfClosed, .draining(Self.busy, shuttingDown: true), .none, nil),
            (.quiescing(Self.busy, readsLeft: 5), .disconnect, .draining(Self.busy, shuttingDown: true), .none, nil),
            (.quiescing(Self.busy, readsLeft: 5), .shutdown, .quiescing(Self.busy, readsLeft: 5), .none, nil),
            (.quiescing(F(), readsLeft: 5), .readRequested, .quiescing(F(), readsLeft: 5), .read, nil),
            // draining: answer what was received, then close
            (.draining(F(), shuttingDown: false), .readRequested,
             .draining(F(readHeld: true), shuttingDown: false), .none, nil),
            (.draining(F(), shuttingDown: false), .parsed, .closing, .closeAfterReplies, nil),
            (.draining(F(readHeld: true), shuttingDown: false), .parsed, .closing, .closeAfterReplies, nil),
            (.draining(Self.busy, shuttingDown: false), .parsed, .draining(Self.busy, shuttingDown: false), .none, nil),
            (.draining(F(inFlight: 1), shuttingDown: false), .requestFinished, .closing, .closeAfterReplies, nil),
            (.draining(F(inFlight: 1), shuttingDown: true), .requestFinished, .closing, .closeAfterReplies, nil),
            (.draining(F(inFlight: 2), shuttingDown: false), .requestFinished,
             .draining(F(inFlight: 1), shuttingDown: false), .none, nil),
            (.draining(F(inFlight: L.maxInFlight, parseHeld: true), shuttingDown: false), .requestFinished,
             .draining(F(inFlight: L.maxInFlight - 1, parseHeld: true), shuttingDown: false), .parse, nil),
            (.draining(F(writable: false, parseHeld: true), shuttingDown: false), .writable(true),
             .draining(F(parseHeld: true), shuttingDown: false), .parse, nil),
            (.draining(F(writable: false), shuttingDown: false), .writable(true), .closing, .closeAfterReplies, nil),
            (.draining(F(parseHeld: true), shuttingDown: false), .shutdown,
             .draining(F(parseHeld: true), shuttingDown: true), .parse, nil),
            (.draining(Self.full, shuttingDown: true), .mayParse, .draining(Self.full, shuttingDown: true), .none, true),
            (.draining(Self.busy, shuttingDown: true), .shutdown, .draining(Self.busy, shuttingDown: true), .none, nil),
            (.draining(Self.busy, shuttingDown: false), .halfClosed, .draining(Self.busy, shuttingDown: false), .none, nil),
            // no close under a running parse pass: it is decided when the pass is over
            (.draining(F(), shuttingDown: false), .parseStarted, .draining(F(parsing: true), shuttingDown: false), .none, nil),
            (.draining(F(parsing: true), shuttingDown: false), .writable(false),
             .draining(F(writable: false, parsing: true), shuttingDown: false), .none, nil),
            (.draining(F(inFlight: 1, parsing: true), shuttingDown: false), .requestFinished,
             .draining(F(parsing: true), shuttingDown: false), .none, nil),
            (.draining(F(parsing: true), shuttingDown: false), .parseEnded, .draining(F(), shuttingDown: false), .none, nil),
            (.serving(F(parsing: true)), .halfClosed, .draining(F(parsing: true), shuttingDown: false), .none, nil),
            (.quiescing(F(parsing: true), readsLeft: 0), .unread(0), .draining(F(parsing: true), shuttingDown: true), .none, nil),
            // closing and closed ignore everything but the channel going away
            (.closing, .mayParse, .closing, .none, false),
            (.closing, .readRequested, .closing, .none, nil),
            (.closing, .requestFinished, .closing, .none, nil),
            (.closing, .shutdown, .closing, .none, nil),
            (.closing, .halfClosed, .closing, .none, nil),
            (.closing, .writable(true), .closing, .none, nil),
            (.closing, .inactive, .closed, .none, nil),
            (.serving(Self.busy), .inactive, .closed, .none, nil),
            (.closed, .closeRequested, .closed, .none, nil),
            (.closed, .mayParse, .closed, .none, false),
            (.closed, .shutdown, .closed, .none, nil),
        ]
        for (i, (from, input, to, action, answer)) in rows.enumerated() {
            var l = L(state: from)
            let (got, gotAnswer) = apply(input, to: &l)
            let row = "row \(i): \(from) + \(input)"
            XCTAssertEqual(l.state, to, row)
            XCTAssertEqual(got, action, row)
            XCTAssertEqual(gotAnswer, answer, row)
        }
    }

    func testRequestsAreRefusedOnlyWhileShuttingDown() {
        let rows: [(L.State, L.RequestDisposition)] = [
            (.handshake(F()), .run), (.serving(F()), .run), (.draining(F(), shuttingDown: false), .run),
            (.quiescing(F(), readsLeft: 3), .refuse), (.draining(F(), shuttingDown: true), .refuse),
        ]
        for (state, disposition) in rows {
            XCTAssertEqual(L(state: state).requestParsed(), disposition, "\(state)")
        }
    }

    func testBytesAreDroppedOnlyOnceClosing() {
        XCTAssertTrue(L(state: .serving(F())).bytesReceived())
        XCTAssertTrue(L(state: .draining(F(), shuttingDown: false)).bytesReceived())
        XCTAssertFalse(L(state: .closing).bytesReceived())
        XCTAssertFalse(L(state: .closed).bytesReceived())
        XCTAssertTrue(L(state: .closing).isClosing)
        XCTAssertFalse(L(state: .quiescing(F(), readsLeft: 1)).isClosing)
    }

    /// A whole connection: back-pressure at the in-flight limit, then DISC, then the last reply closes.
    func testBackPressureThenDisconnectSequence() {
        var l = L()
        l.transmissionStarted()
        for _ in 0 ..< L.maxInFlight {
            XCTAssertTrue(l.mayParse())
            l.requestStarted()
        }
        XCTAssertFalse(l.mayParse(), "the limit holds parsing")
        XCTAssertEqual(l.parsed(), .none)
        XCTAssertEqual(l.readRequested(), .none, "and reading")
        XCTAssertEqual(l.requestFinished(), .parse, "a finished request resumes the held parse first")
        XCTAssertTrue(l.mayParse())
        l.disconnectReceived()
        XCTAssertEqual(l.parsed(), .none, "DISC: no more reads; requests still in flight")
        for _ in 0 ..< L.maxInFlight - 2 { XCTAssertEqual(l.requestFinished(), .none) }
        XCTAssertEqual(l.inFlight, 1)
        XCTAssertEqual(l.requestFinished(), .closeAfterReplies)
        XCTAssertEqual(l.state, .closing)
        XCTAssertEqual(l.requestFinished(), .none, "a late completion after the close does nothing")
    }

    /// Server shutdown in transmission: the unread input is read a bounded number of times.
    func testShutdownReadsAreBounded() {
        var l = L(state: .serving(F()))
        XCTAssertEqual(l.shutdownRequested(), .drainInput)
        var reads = 0
        while l.unreadInput(4096) == .read { reads += 1 }
        XCTAssertEqual(reads, L.maxShutdownReads)
        XCTAssertEqual(l.state, .closing)
    }

    /// A finish needs the event loop only when it would do more than lower the count: a held read or
    /// parse to resume, or a drain to end.
    func testAFinishIsQuietOnlyWhenItChangesNothingButTheCount() {
        let rows: [(L.State, Bool)] = [
            (.handshake(F()), true), (.serving(Self.busy), true), (.serving(F(writable: false)), true),
            (.serving(F(readHeld: true)), false), (.serving(F(parseHeld: true)), false),
            (.quiescing(F(), readsLeft: 3), false), (.draining(Self.busy, shuttingDown: false), false),
            (.closing, false), (.closed, false),
        ]
        for (state, quiet) in rows {
            XCTAssertEqual(L(state: state).finishIsQuiet, quiet, "\(state)")
        }
        // Wherever it is quiet, one finish changes the count only.
        for state in [L.State.handshake(Self.busy), .serving(Self.busy), .serving(F(inFlight: 3, writable: false))] {
            var l = L(state: state)
            XCTAssertEqual(l.requestFinished(), .none, "\(state)")
            XCTAssertEqual(l.inFlight, 2)
        }
    }

    /// Finishes counted together act as many single ones: they resume a held parse, or end a drain.
    func testSeveralFinishesAtOnce() {
        var l = L(state: .serving(F(inFlight: L.maxInFlight, parseHeld: true)))
        XCTAssertEqual(l.requestsFinished(5), .parse)
        XCTAssertEqual(l.inFlight, L.maxInFlight - 5)
        var d = L(state: .draining(F(inFlight: 4), shuttingDown: false))
        XCTAssertEqual(d.requestsFinished(3), .none)
        XCTAssertEqual(d.requestsFinished(1), .closeAfterReplies)
        XCTAssertEqual(d.state, .closing)
    }
}

/// The count of requests answered by pool threads: the event loop is woken only when it is not quiet,
/// and a count made while it stops being quiet is never lost.
final class QuietCompletionsTests: XCTestCase {
    func testALoudConnectionIsWokenAndAQuietOneCountsLater() {
        let c = QuietCompletions()
        XCTAssertFalse(c.finishedElsewhere(), "not quiet at first: wake the loop")
        XCTAssertEqual(c.take(), 1)
        XCTAssertFalse(c.setQuiet(true))
        XCTAssertTrue(c.finishedElsewhere())
        XCTAssertTrue(c.finishedElsewhere())
        XCTAssertEqual(c.take(), 2)
        XCTAssertEqual(c.take(), 0)
        XCTAssertTrue(c.finishedElsewhere())
        XCTAssertTrue(c.setQuiet(false), "stops being quiet with a count waiting: take it")
        XCTAssertFalse(c.setQuiet(false), "no change")
        XCTAssertEqual(c.take(), 1)
        XCTAssertFalse(c.setQuiet(true))
        XCTAssertFalse(c.setQuiet(false), "nothing waiting")
    }

    /// Threads finishing while the loop flips between quiet and not: every finish is taken exactly
    /// once, whether it was made while the loop was quiet or asked for a wake-up.
    func testNoFinishIsLostAcrossThreads() {
        let c = QuietCompletions()
        let perThread = 20_000, threads = 4
        let done = DispatchGroup()
        let woken = ManagedAtomic<Int>(0)
        for _ in 0 ..< threads {
            DispatchQueue.global().async(group: done) {
                for _ in 0 ..< perThread where !c.finishedElsewhere() { woken.wrappingIncrement(ordering: .relaxed) }
            }
        }
        var taken = 0
        var quiet = false
        while done.wait(timeout: .now()) == .timedOut {
            quiet.toggle()
            _ = c.setQuiet(quiet)
            taken += c.take()
        }
        _ = c.setQuiet(false)
        taken += c.take()
        XCTAssertEqual(taken, perThread * threads)
        XCTAssertGreaterThan(woken.load(ordering: .relaxed), 0)
    }
}
