// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "nbd-umemd",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "nbd-umemd", targets: ["nbd-umemd"]),
        .library(name: "NbdPager", targets: ["NbdPager"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-atomics.git", from: "1.2.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift.git", from: "0.2.0"),
    ],
    targets: [
        .systemLibrary(
            name: "CNbd",
            pkgConfig: "libnbd",
            providers: [.apt(["libnbd-dev"])]
        ),
        // The Linux calls Swift's Glibc module hides (preadv2, fallocate, prctl, ioctl wrappers).
        .systemLibrary(name: "CLinux"),
        .target(
            name: "NbdPager",
            dependencies: [
                "CNbd",
                "CLinux",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ]
        ),
        // TLS (swift-nio-ssl) for the NBD server, kept out of NbdPager so that the library and its
        // fuzz targets build without a TLS library.
        .target(
            name: "NbdTLS",
            dependencies: [
                "NbdPager",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]
        ),
        .executableTarget(
            name: "nbd-umemd",
            dependencies: [
                "NbdPager",
                "NbdTLS",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "NbdPagerTests",
            dependencies: [
                "NbdPager",
                "NbdTLS",
                "CNbd",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Atomics", package: "swift-atomics"),
            ]
        ),
    ]
)
