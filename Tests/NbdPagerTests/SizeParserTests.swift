import XCTest
@testable import NbdPager

final class SizeParserTests: XCTestCase {
    func testValidSizes() {
        let cases: [(String, UInt64)] = [
            ("0", 0),
            ("4096", 4096),
            ("64K", 64 << 10),
            ("64k", 64 << 10),
            ("512M", 512 << 20),
            ("512m", 512 << 20),
            ("2G", 2 << 30),
            ("1T", 1 << 40),
            ("1P", 1 << 50),
            ("2GiB", 2 << 30),
            ("2gib", 2 << 30),
            ("64KB", 64 << 10),
            ("4096B", 4096),
            ("  1G\t", 1 << 30),
            ("007", 7),
            ("16777215T", 16_777_215 << 40),
            ("18446744073709551615", UInt64.max),
        ]
        for (text, expected) in cases {
            XCTAssertEqual(try SizeParser.parse(text), expected, "'\(text)'")
        }
    }

    func testInvalidSizes() {
        let cases: [(String, SizeParser.Failure)] = [
            ("", .empty),
            ("   ", .empty),
            ("12Q", .invalid("12Q")),
            ("-1", .invalid("-1")),
            ("+1", .invalid("+1")),
            ("1.5G", .invalid("1.5G")),
            ("K", .invalid("K")),
            ("G1", .invalid("G1")),
            ("1 G", .invalid("1 G")),
            ("1KK", .invalid("1KK")),
            ("0x10", .invalid("0x10")),
            ("١٢", .invalid("١٢")),  // Arabic-Indic digits are numbers, but not ASCII
            ("1²", .invalid("1²")),
            ("1iB", .invalid("1iB")),
            ("1KIIB", .invalid("1KIIB")),
            ("1BB", .invalid("1BB")),
        ]
        for (text, expected) in cases {
            XCTAssertThrowsError(try SizeParser.parse(text), "'\(text)'") { error in
                XCTAssertEqual(error as? SizeParser.Failure, expected, "'\(text)'")
            }
        }
    }

    func testOverflow() {
        let tooLarge = ["16777216T", "16384P", "17179869184G", "18446744073709551615K"]
        for text in tooLarge {
            XCTAssertThrowsError(try SizeParser.parse(text), text) { error in
                XCTAssertEqual(error as? SizeParser.Failure, .tooLarge(text), text)
            }
        }
        // More digits than fit in 64 bits: too large, never wrapped.
        for text in ["18446744073709551616", "99999999999999999999999M"] {
            XCTAssertThrowsError(try SizeParser.parse(text), text) { error in
                XCTAssertEqual(error as? SizeParser.Failure, .tooLarge(text), text)
            }
        }
    }

    func testFailureDescriptions() {
        XCTAssertEqual(SizeParser.Failure.empty.description, "empty size")
        XCTAssertTrue(SizeParser.Failure.invalid("x").description.contains("'x'"))
        XCTAssertTrue(SizeParser.Failure.tooLarge("9T").description.contains("too large"))
    }
}
