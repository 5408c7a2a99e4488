// swift-tools-version:6.2

// The examples' own package: `tab`, the `tabsync` inspection tool, the demo launcher and the
// development token server. A consumer of TabSync or TabSyncAuth depends on the root package
// and never resolves what only these use (argument parsing, an HTTP server, cryptography).
// scripts/test, scripts/demo and Benchmarks/run build it. `tab --postgres` uses TabSyncPostgres.
import Foundation
import PackageDescription

// A path dependency's identity is its folder's name, whatever the clone is called.
let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().lastPathComponent

let strictSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("MemberImportVisibility"),
    .treatAllWarnings(as: .error),
]

let package = Package(
    name: "TabSyncExamples",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "tab", targets: ["tab"]),
        .executable(name: "tabsync", targets: ["TabSyncTool"]),
        .executable(name: "tabsync-demo", targets: ["tabsync-demo"]),
        .executable(name: "devtoken-server", targets: ["DevTokenServer"]),
    ],
    dependencies: [
        .package(path: ".."),
        .package(path: "../TabSyncPostgres"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/swhitty/FlyingFox", from: "0.27.1"),
    ],
    targets: [
        // What tab and tabsync share: JSON lines and whole-line writes to standard output.
        .target(name: "ExampleSupport", path: "Support", swiftSettings: strictSettings),
        // One tab of a shared session (docs/tab-protocol.md).
        .executableTarget(
            name: "tab",
            dependencies: [
                "ExampleSupport",
                .product(name: "TabSync", package: root),
                .product(name: "TabSyncAuth", package: root),
                .product(name: "TabSyncPostgres", package: "TabSyncPostgres"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "tab",
            swiftSettings: strictSettings
        ),
        // The inspection tool: what a session directory holds, who holds its locks, what is wrong.
        // (Its target is not called `tabsync`, which a case-insensitive file system would mix up
        // with the TabSync module.)
        .executableTarget(
            name: "TabSyncTool",
            dependencies: [
                "ExampleSupport",
                .product(name: "TabSync", package: root),
                .product(name: "TabSyncAuth", package: root),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "tabsync",
            swiftSettings: strictSettings
        ),
        .executableTarget(
            name: "tabsync-demo",
            dependencies: [
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "tabsync-demo",
            swiftSettings: strictSettings
        ),
        .executableTarget(
            name: "DevTokenServer",
            dependencies: [
                .product(name: "FlyingFox", package: "FlyingFox"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "DevTokenServer",
            swiftSettings: strictSettings
        ),
    ]
)
