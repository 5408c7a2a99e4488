// swift-tools-version:6.2

// TabSyncPostgres: the same storage API on PostgreSQL, for processes on several hosts. A package
// of its own, so that a consumer of TabSync or TabSyncAuth never resolves PostgresNIO (and the
// SwiftNIO stack under it). It depends on the root package by path.
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
    name: "TabSyncPostgres",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "TabSyncPostgres", targets: ["TabSyncPostgres"]),
    ],
    dependencies: [
        .package(path: ".."),
        .package(url: "https://github.com/vapor/postgres-nio", from: "1.33.2"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: [
        .target(
            name: "TabSyncPostgres",
            dependencies: [
                .product(name: "TabSync", package: root),
                .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strictSettings
        ),
        // Runs against a throw-away PostgreSQL cluster that the tests start (scripts/postgres).
        .testTarget(
            name: "TabSyncPostgresTests",
            dependencies: [
                "TabSyncPostgres",
                .product(name: "TabSync", package: root),
                .product(name: "TabSyncConformance", package: root),
            ],
            swiftSettings: strictSettings
        ),
    ]
)
