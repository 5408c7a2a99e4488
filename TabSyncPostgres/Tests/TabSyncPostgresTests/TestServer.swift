import Foundation
import Testing
import TabSync
import TabSyncPostgres

/// The PostgreSQL server of this test run: the one scripts/test started (its URL and password in
/// TABSYNC_TEST_POSTGRES_URL and TABSYNC_TEST_POSTGRES_PASSWORD), or else a throw-away cluster
/// started here with scripts/postgres-cluster and stopped when the test process exits.
enum TestServer {
    struct Server: Sendable {
        let url: String
        let password: String
        let dataDirectory: String?
        let binDirectory: String?
    }

    static let shared: Server = {
        let environment = ProcessInfo.processInfo.environment
        if let url = environment["TABSYNC_TEST_POSTGRES_URL"], let password = environment["TABSYNC_TEST_POSTGRES_PASSWORD"] {
            return Server(url: url, password: password, dataDirectory: environment["TABSYNC_TEST_POSTGRES_DATA"], binDirectory: environment["TABSYNC_TEST_POSTGRES_BIN"])
        }
        let directory = "\(FileManager.default.temporaryDirectory.path)/tabsync-pg-\(getpid())"
        let output = run([script, "start", directory])
        var fields: [String: String] = [:]
        for line in output.split(separator: "\n") {
            let parts = line.split(separator: "=", maxSplits: 1).map(String.init)
            if parts.count == 2 { fields[parts[0]] = parts[1] }
        }
        guard let url = fields["TABSYNC_TEST_POSTGRES_URL"], let password = fields["TABSYNC_TEST_POSTGRES_PASSWORD"] else {
            fatalError("scripts/postgres-cluster did not start a server: \(output)")
        }
        startedDirectory = directory
        atexit { if let directory = TestServer.startedDirectory { _ = TestServer.run([TestServer.script, "stop", directory]) } }
        return Server(url: url, password: password, dataDirectory: fields["TABSYNC_TEST_POSTGRES_DATA"], binDirectory: fields["TABSYNC_TEST_POSTGRES_BIN"])
    }()

    nonisolated(unsafe) static var startedDirectory: String?

    static let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("scripts/postgres-cluster").path

    static var configuration: PostgresConfiguration {
        // swiftlint:disable:next force_try
        try! PostgresConfiguration(url: shared.url, password: shared.password)
    }

    /// A store name no other test uses.
    static func uniqueStore(_ prefix: String = "test") -> String {
        "\(prefix)-\(UUID().uuidString.prefix(8).lowercased())"
    }

    @discardableResult
    static func run(_ arguments: [String]) -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        do { try process.run() } catch { return "" }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return String(decoding: data, as: UTF8.self)
    }
}
