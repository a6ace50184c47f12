import NIOCore
import XCTest
@testable import NbdPager

final class BusyPollTests: XCTestCase {
    let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)

    func testPollsAfterALoneSmallRequestWithNothingInFlight() {
        var p = BusyPoll(window: .microseconds(30))
        p.requestParsed(length: 4096)
        XCTAssertTrue(p.readComplete(inFlight: 0, now: t0))
        XCTAssertTrue(p.polling)
        XCTAssertTrue(p.tick(closing: false, now: t0 + .microseconds(29)))
        XCTAssertFalse(p.tick(closing: false, now: t0 + .microseconds(30)), "the window has passed")
        XCTAssertFalse(p.polling)
    }

    func testANewRequestExtendsARunningPollWithoutStartingAnother() {
        var p = BusyPoll(window: .microseconds(30))
        p.requestParsed(length: 512)
        XCTAssertTrue(p.readComplete(inFlight: 0, now: t0))
        p.requestParsed(length: 512)
        XCTAssertFalse(p.readComplete(inFlight: 0, now: t0 + .microseconds(20)), "already polling")
        XCTAssertTrue(p.tick(closing: false, now: t0 + .microseconds(40)), "the window restarts at the last request")
        XCTAssertFalse(p.tick(closing: true, now: t0 + .microseconds(41)), "a closing connection stops polling")
    }

    func testNoPollForDeepQueuesBulkRequestsOrWhenDisabled() {
        let cases: [(TimeAmount, [UInt32], Int, String)] = [
            (.microseconds(30), [4096, 4096], 0, "two requests in one burst"),
            (.microseconds(30), [BusyPoll.requestLimit + 1], 0, "a bulk request"),
            (.microseconds(30), [4096], 1, "a request still in flight"),
            (.microseconds(30), [], 0, "no request"),
            (.zero, [4096], 0, "polling disabled"),
        ]
        for (window, lengths, inFlight, what) in cases {
            var p = BusyPoll(window: window)
            for l in lengths { p.requestParsed(length: l) }
            XCTAssertFalse(p.readComplete(inFlight: inFlight, now: t0), what)
            XCTAssertFalse(p.polling, what)
            // The burst's counts are reset: a lone small request afterwards polls (when enabled).
            p.requestParsed(length: 4096)
            XCTAssertEqual(p.readComplete(inFlight: 0, now: t0), window > .zero, what)
        }
    }

    /// One lone 4 KiB request at `t`; the poll it starts (if any) runs out its window before the next.
    private func lone(_ p: inout BusyPoll, at t: NIODeadline) -> Bool {
        p.requestParsed(length: 4096)
        let started = p.readComplete(inFlight: 0, now: t)
        _ = p.tick(closing: false, now: t + p.window)
        return started
    }

    /// Runs `count` cycles of `cycle` from `start`; returns the end time and how many polls started.
    private func cycles(_ p: inout BusyPoll, from start: NIODeadline, count: Int, cycle: TimeAmount) -> (NIODeadline, Int) {
        var t = start, polls = 0
        for _ in 0..<count {
            t = t + cycle
            if lone(&p, at: t) { polls += 1 }
        }
        return (t, polls)
    }

    /// Lone requests until a verdict: each cycle lasts `on` when polling was decided at its start,
    /// `off` when not. Returns the time of the last request and how many polls started.
    private func measure(_ p: inout BusyPoll, from start: NIODeadline, on: TimeAmount, off: TimeAmount) -> (NIODeadline, Int) {
        var t = start, polls = 0
        if lone(&p, at: t) { polls += 1 }
        var n = 0
        while case .measuring = p.phase, n < 10 * BusyPoll.probeCycles {
            t = t + (p.pollsNow ? on : off)
            if lone(&p, at: t) { polls += 1 }
            n += 1
        }
        return (t, polls)
    }

    func testPollingStopsWhenItDoesNotShortenTheClientsCycle() {
        // A swap-in through nbdfuse and a loop device: one request every 120 us whether or not the
        // server spins; the spinning only takes a CPU.
        var p = BusyPoll(window: .microseconds(30))
        XCTAssertTrue(lone(&p, at: t0), "a new connection polls")
        var (t, polls) = cycles(&p, from: t0, count: 2 * BusyPoll.blockCycles - 1, cycle: .microseconds(120))
        XCTAssertEqual(polls, BusyPoll.blockCycles - 1, "a block of requests polled for, then a block not")
        XCTAssertEqual(p.phase, .measuring(polling: false))
        (t, polls) = measure(&p, from: t + .microseconds(120), on: .microseconds(120), off: .microseconds(118))
        XCTAssertEqual(p.phase, .holding(polling: false, cycles: 0))
        XCTAssertEqual(p.lastMedians?.on, 120_000)
        XCTAssertEqual(p.lastMedians?.off, 118_000)
        (t, polls) = cycles(&p, from: t, count: 100, cycle: .microseconds(120))
        XCTAssertEqual(polls, 0, "no poll once it does not pay")
        XCTAssertEqual(p.phase, .holding(polling: false, cycles: 100))
        XCTAssertFalse(p.polling)
        _ = t
    }

    func testPollingIsKeptWhenItShortensTheCycleAndARunningPollStopsOnAVerdictAgainstIt() {
        var p = BusyPoll(window: .microseconds(30))
        var (t, _) = measure(&p, from: t0, on: .microseconds(20), off: .microseconds(40))
        XCTAssertEqual(p.phase, .holding(polling: true, cycles: 0), "20 against 40 us")
        var polls = 0
        (t, polls) = cycles(&p, from: t, count: 10, cycle: .microseconds(20))
        XCTAssertEqual(polls, 10)

        // A gain under the required 5 % is not worth a CPU.
        var q = BusyPoll(window: .microseconds(300))
        var u = t0
        q.requestParsed(length: 4096)
        XCTAssertTrue(q.readComplete(inFlight: 0, now: u))
        // The polls of a block run on into the next request (the window is longer than a cycle)...
        for _ in 1 ..< BusyPoll.blockCycles {
            u = u + .microseconds(97)
            q.requestParsed(length: 4096)
            XCTAssertFalse(q.readComplete(inFlight: 0, now: u), "a running poll catches it")
            XCTAssertTrue(q.polling)
        }
        // ... and the first request of a block without polling stops the running poll at its next tick.
        u = u + .microseconds(97)
        q.requestParsed(length: 4096)
        XCTAssertFalse(q.readComplete(inFlight: 0, now: u))
        XCTAssertEqual(q.phase, .measuring(polling: false))
        XCTAssertFalse(q.tick(closing: false, now: u + .microseconds(1)))
        XCTAssertFalse(q.polling)
        (u, _) = measure(&q, from: u + .microseconds(100), on: .microseconds(97), off: .microseconds(100))
        XCTAssertEqual(q.phase, .holding(polling: false, cycles: 0), "97 against 100 us")
        q.requestParsed(length: 4096)
        XCTAssertFalse(q.readComplete(inFlight: 0, now: u + .microseconds(100)))
        _ = t
    }

    func testBlocksWithAndWithoutPollingAlternateSoThatAChangeOfLoadWeighsOnBoth() {
        // The client slows down halfway through the measurement (a swapping workload moving to its
        // next phase). Measured one side after the other, polling would look 40 % faster; in
        // alternating blocks both sides see both loads, and polling, which changes nothing, stops.
        var p = BusyPoll(window: .microseconds(30))
        var t = t0
        _ = lone(&p, at: t)
        var n = 0
        var onCount = 0, offCount = 0
        while case .measuring = p.phase {
            if p.pollsNow { onCount += 1 } else { offCount += 1 }
            t = t + (n < BusyPoll.probeCycles ? .microseconds(300) : .microseconds(500))
            _ = lone(&p, at: t)
            n += 1
        }
        XCTAssertEqual(onCount, BusyPoll.probeCycles)
        XCTAssertEqual(offCount, BusyPoll.probeCycles)
        XCTAssertEqual(p.phase, .holding(polling: false, cycles: 0))
        XCTAssertEqual(p.lastMedians?.on, p.lastMedians?.off)
    }

    func testTheVerdictIsMeasuredAgainAfterItsHold() {
        var p = BusyPoll(window: .microseconds(30))
        var (t, _) = cycles(&p, from: t0, count: 2 * BusyPoll.probeCycles + 1, cycle: .microseconds(120))
        XCTAssertEqual(p.phase, .holding(polling: false, cycles: 0))
        var polls = 0
        (t, polls) = cycles(&p, from: t, count: BusyPoll.holdCycles - 1, cycle: .microseconds(120))
        XCTAssertEqual(polls, 0)
        XCTAssertEqual(p.phase, .holding(polling: false, cycles: BusyPoll.holdCycles - 1))
        XCTAssertTrue(lone(&p, at: t + .microseconds(120)), "the hold is over: measuring again, polling on first")
        XCTAssertEqual(p.phase, .measuring(polling: true))
    }

    func testDeepQueuesBreakTheChainAndLongGapsCountAsFullCycles() {
        var p = BusyPoll(window: .microseconds(30))
        var t = t0
        _ = lone(&p, at: t)
        for i in 0..<BusyPoll.probeCycles {
            // Every other lone request follows a deep queue: the gap before it is not a cycle.
            t = t + .microseconds(50)
            if i % 2 == 0 {
                p.requestParsed(length: 4096)
                p.requestParsed(length: 4096)
                XCTAssertFalse(p.readComplete(inFlight: 0, now: t))
                t = t + .microseconds(10)
            }
            _ = lone(&p, at: t)
        }
        XCTAssertEqual(p.phase, .measuring(polling: true), "32 cycles of the 64 needed")

        // A client whose requests come 1.6 ms apart per connection (nbdfuse's four connections behind
        // a 0.4 ms round trip): the gaps count as 1 ms, polling cannot shorten them, it stops.
        var q = BusyPoll(window: .microseconds(30))
        let (_, polls) = cycles(&q, from: t0, count: 2 * BusyPoll.probeCycles + 1 + 10, cycle: .microseconds(1600))
        XCTAssertEqual(q.lastMedians?.on, 1_000_000)
        XCTAssertEqual(q.lastMedians?.off, 1_000_000)
        XCTAssertEqual(q.phase, .holding(polling: false, cycles: 10))
        XCTAssertEqual(polls, BusyPoll.probeCycles)
    }
}
