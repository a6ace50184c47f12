import NIOCore
import XCTest
@testable import NbdPager

final class ConnectionPolicyTests: XCTestCase {
    func range(_ s: String) throws -> AddressRange { try AddressRange(parsing: s) }
    func addr(_ s: String) -> [UInt8] { AddressRange.parse(s) ?? [] }

    func testIPv4Ranges() throws {
        let net = try range("10.1.0.0/16")
        XCTAssertTrue(net.contains(addr("10.1.255.7")))
        XCTAssertFalse(net.contains(addr("10.2.0.1")))
        XCTAssertEqual(net.description, "10.1.0.0/16")
        // host bits are cleared, a bare address is a /32
        XCTAssertEqual(try range("192.0.2.77/24").description, "192.0.2.0/24")
        let host = try range("192.0.2.7")
        XCTAssertTrue(host.contains(addr("192.0.2.7")))
        XCTAssertFalse(host.contains(addr("192.0.2.8")))
        XCTAssertTrue(try range("0.0.0.0/0").contains(addr("203.0.113.9")))
        // an IPv4-mapped IPv6 peer (a listener bound to ::) matches IPv4 ranges
        XCTAssertTrue(net.contains(addr("::ffff:10.1.2.3")))
        XCTAssertFalse(net.contains(addr("::1")))
    }

    func testIPv6Ranges() throws {
        let net = try range("fd00:1::/32")
        XCTAssertTrue(net.contains(addr("fd00:1::5")))
        XCTAssertFalse(net.contains(addr("fd00:2::5")))
        XCTAssertFalse(net.contains(addr("10.0.0.1")))
        XCTAssertTrue(try range("[::1]").contains(addr("::1")))
        XCTAssertTrue(try range("fe80::/10").contains(addr("febf::1")))
        XCTAssertFalse(try range("fe80::/10").contains(addr("fec0::1")))
    }

    func testBadRanges() {
        for bad in ["", "10.0.0", "300.1.1.1", "10.0.0.0/33", "10.0.0.0/-1", "::1/129", "host.example", "10.0.0.0/"] {
            XCTAssertThrowsError(try AddressRange(parsing: bad), bad)
        }
    }

    func testPolicyRefusal() throws {
        var p = ConnectionPolicy()
        let v4 = try SocketAddress(ipAddress: "127.0.0.1", port: 1)
        let unix = try SocketAddress(unixDomainSocketPath: "/tmp/x.sock")
        XCTAssertNil(p.refusal(peer: v4), "no --allow: everyone")
        p.allow = [try range("10.0.0.0/8")]
        XCTAssertEqual(p.refusal(peer: v4), "not in --allow")
        XCTAssertNil(p.refusal(peer: unix), "Unix-socket clients are not filtered")
        p.allow.append(try range("127.0.0.0/8"))
        XCTAssertNil(p.refusal(peer: v4))
        XCTAssertNil(p.refusal(peer: try SocketAddress(ipAddress: "::ffff:127.0.0.1", port: 1)))
    }
}
