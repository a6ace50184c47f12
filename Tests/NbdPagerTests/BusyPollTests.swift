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
}
