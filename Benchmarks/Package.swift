// swift-tools-version:6.2

// The benchmark's own package, so that building the root package never compiles it.
// Run it with Benchmarks/run (see Benchmarks/README.md).
import Foundation
import PackageDescription

// A path dependency's identity is its folder's name, whatever the clone is called.
let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().lastPathComponent

let package = Package(
    name: "TabSyncBenchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(path: ".."),
        .package(path: "../TabSyncPostgres"),
    ],
    targets: [
        .executableTarget(
            name: "tabsync-bench",
            dependencies: [
                .product(name: "TabSync", package: root),
                .product(name: "TabSyncPostgres", package: "TabSyncPostgres"),
            ],
            swiftSettings: [
                .enableUpcomingFeature("ExistentialAny"),
                .enableUpcomingFeature("MemberImportVisibility"),
                .treatAllWarnings(as: .error),
            ]
        ),
    ]
)
