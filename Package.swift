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
        .executable(name: "tab", targets: ["tab"]),
        .executable(name: "tabsync", targets: ["tabsync"]),
        .executable(name: "tabsync-demo", targets: ["tabsync-demo"]),
        .executable(name: "devtoken-server", targets: ["DevTokenServer"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/swhitty/FlyingFox", from: "0.27.1"),
    ],
    targets: [
        // libinotifytools, wrapped as a system library. Debian ships no .pc file for it.
        .systemLibrary(
            name: "CInotifyTools",
            providers: [.apt(["libinotifytools0-dev"])]
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
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strictSettings
        ),
        .executableTarget(
            name: "tab",
            dependencies: [
                "TabSync",
                "TabSyncAuth",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "Examples/tab",
            swiftSettings: strictSettings
        ),
        // The inspection tool: what a session directory holds, who holds its locks, what is wrong.
        .executableTarget(
            name: "tabsync",
            dependencies: [
                "TabSync",
                "TabSyncAuth",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "Examples/tabsync",
            swiftSettings: strictSettings
        ),
        .executableTarget(
            name: "tabsync-demo",
            dependencies: [
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "Examples/tabsync-demo",
            swiftSettings: strictSettings
        ),
        .executableTarget(
            name: "DevTokenServer",
            dependencies: [
                .product(name: "FlyingFox", package: "FlyingFox"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "Examples/DevTokenServer",
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "TabSyncTests",
            dependencies: ["TabSync"],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "TabSyncAuthTests",
            dependencies: ["TabSync", "TabSyncAuth"],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "IntegrationTests",
            dependencies: ["tab", "tabsync", "DevTokenServer"],
            swiftSettings: strictSettings
        ),
    ]
)
