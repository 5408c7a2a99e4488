// swift-tools-version:6.2

import PackageDescription

let strictSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("MemberImportVisibility"),
    .treatAllWarnings(as: .error),
]

let package = Package(
    name: "TabSync",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "TabSync", targets: ["TabSync"]),
        .library(name: "TabSyncAuth", targets: ["TabSyncAuth"]),
        // For authors of backends: the checks every StorageBackend must pass (Swift Testing).
        .library(name: "TabSyncConformance", targets: ["TabSyncConformance"]),
    ],
    dependencies: [
        // The libraries' one dependency. The examples, the demo and the dev token server are a
        // package of their own (Examples/Package.swift), the benchmarks another (Benchmarks/).
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: [
        // libinotifytools, wrapped as a system library. Debian ships no .pc file for it.
        .systemLibrary(
            name: "CInotifyTools",
            providers: [.apt(["libinotifytools0-dev"])]
        ),
        // libcurl, for TabSyncAuth's HTTP (CurlTransport). Its header is on the compiler's default
        // path (Debian: /usr/include/<arch>/curl), so no pkg-config is needed.
        .systemLibrary(
            name: "CCurl",
            providers: [.apt(["libcurl4-openssl-dev"])]
        ),
        // The broker: on-disk state, change watcher, file locks, SharedStorage. No auth.
        .target(
            name: "TabSync",
            dependencies: [
                "CInotifyTools",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strictSettings
        ),
        // The machine's one wall clock, read past any LD_PRELOAD view of time (TabSyncAuth).
        .target(name: "CKernelClock"),
        // The shared sign-in session on top of the broker.
        .target(
            name: "TabSyncAuth",
            dependencies: [
                "TabSync",
                "CKernelClock",
                "CCurl",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strictSettings
        ),
        // The backend conformance suite, run by TabSyncTests and by TabSyncPostgres's tests.
        .target(
            name: "TabSyncConformance",
            dependencies: ["TabSync"],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "TabSyncTests",
            dependencies: ["TabSync", "TabSyncConformance"],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "TabSyncAuthTests",
            dependencies: ["TabSync", "TabSyncAuth"],
            swiftSettings: strictSettings
        ),
        // Multi-process tests of the example executables, which scripts/test builds first
        // (`swift build --package-path Examples`); Support/TabProcess.swift finds them.
        .testTarget(
            name: "IntegrationTests",
            swiftSettings: strictSettings
        ),
    ]
)
