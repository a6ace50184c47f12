import XCTest
@testable import NbdPager

final class ExportSpecTests: XCTestCase {
    func testSplitEscapesAndBareKeys() throws {
        let pairs = try ExportSpec.split("name=a,,b,readonly,description=x=y")
        XCTAssertEqual(pairs.map(\.0), ["name", "readonly", "description"])
        XCTAssertEqual(pairs.map(\.1), ["a,b", "yes", "x=y"])
        XCTAssertThrowsError(try ExportSpec.split("name=a,"))
    }

    func testKinds() throws {
        let m = try ExportSpec.parse("name=ram,memory=2M,readonly,min-block-size=512")
        XCTAssertEqual(m.name, "ram")
        XCTAssertEqual((m.kind as? MemoryExport)?.size, 2 << 20)
        XCTAssertTrue(m.readOnly)
        XCTAssertEqual(m.minimumBlockSize, 512)
        let f = try ExportSpec.parse("file=/tmp/x.img")
        XCTAssertEqual(f.name, "")
        XCTAssertEqual((f.kind as? FileExport)?.path, "/tmp/x.img")
        let l = try ExportSpec.parse("name=vm,source=nbds://h/ram,store=/s,gated,fetch-size=128K,prefetch=sequential,max-rate=10M,source-tls-psk=/k,source-tls-verify-peer=no")
        guard let lazy = l.kind as? LazyExport else { return XCTFail("not lazy") }
        XCTAssertEqual(lazy.store, "/s")
        XCTAssertTrue(lazy.gated)
        XCTAssertEqual(lazy.fetchSize, 128 << 10)
        XCTAssertEqual(lazy.prefetch, .sequential)
        XCTAssertEqual(lazy.maxRate, 10 << 20)
        XCTAssertEqual(lazy.sourceTLS, SourceTLS(pskFile: "/k", verifyPeer: false))
        XCTAssertTrue(lazy.needsControlSocket)
    }

    func testRefusals() {
        for (spec, message) in [
            ("name=a", "one of file=, memory= or source= is required"),
            ("memory=0", "memory= size must be greater than zero"),
            ("memory=1M,memory=2M", "memory= is given twice"),
            ("memory=1M,readonly=maybe", "readonly= must be yes or no"),
            ("source=nbd://h/x", "source= needs store= DIR"),
            ("source=nbd://h/x,store=/s,fetch-size=3K", "power of two"),
            ("source=nbd://h/x,store=/s,source-tls-psk=/k", "need a TLS source URI"),
            ("source=nbd://h/x,store=/s,source-connections=99", "source-connections= must be between 1 and 16"),
            ("memory=1M,store=/s", "store= only applies to source="),
            ("memory=1M,min-block-size=3", "min-block-size= must be 1, 512"),
        ] {
            XCTAssertThrowsError(try ExportSpec.parse(spec), spec) { error in
                XCTAssertTrue("\(error)".contains(message), "\(spec): \(error)")
            }
        }
    }

    func testOptionsOriginNamesFlags() {
        XCTAssertThrowsError(try ExportSpec.build([("memory", "1M"), ("fetch-size", "4K")], origin: .options)) { error in
            XCTAssertEqual("\(error)", "--fetch-size only applies to --source")
        }
    }
}
