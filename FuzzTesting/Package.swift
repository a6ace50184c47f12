// swift-tools-version:5.4
// libFuzzer targets for nbd-umemd's parsers of untrusted bytes. A package of its own, depending on the
// root package by path: a fuzz target has no `main` (libFuzzer supplies it), so it can only link with
// `-sanitize=fuzzer`, and keeping the targets out of the root package leaves its `swift build` and
// `swift test` untouched. Build and run them with scripts/fuzz; the recipe is
//
//   swift build --package-path FuzzTesting --scratch-path .build-fuzz -c release \
//       -Xswiftc -sanitize=fuzzer,address -Xswiftc -parse-as-library
//
// Each target is an executable whose only entry point is `LLVMFuzzerTestOneInput`. The manifest stays at
// tools version 5.4: from 5.5 on, SwiftPM links executables with `--defsym main=<module>_main` (so that
// tests can import them), which a module without a main cannot satisfy; here libFuzzer's main is used.
import Foundation
import PackageDescription

// SwiftPM names a package found by path after its directory (a clone may be called anything).
let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().lastPathComponent
let nbdPager = Target.Dependency.product(name: "NbdPager", package: root.lowercased())

let package = Package(
    name: "nbd-umemd-fuzz",
    dependencies: [
        .package(path: ".."),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
    ],
    targets: [
        .target(name: "FuzzSupport"),
        .executableTarget(
            name: "FuzzStateMachine",
            dependencies: [
                "FuzzSupport",
                nbdPager,
                .product(name: "NIOCore", package: "swift-nio"),
            ]
        ),
        .executableTarget(
            name: "FuzzValidator",
            dependencies: ["FuzzSupport", nbdPager]
        ),
        .executableTarget(
            name: "FuzzStateMap",
            dependencies: ["FuzzSupport", nbdPager]
        ),
        .executableTarget(
            name: "FuzzPageStore",
            dependencies: ["FuzzSupport", nbdPager]
        ),
        .executableTarget(
            name: "FuzzSwapSlots",
            dependencies: ["FuzzSupport", nbdPager]
        ),
    ]
)
