import Foundation
import Testing
import TabSync
import TabSyncPostgres

#if canImport(Glibc)
import Glibc
#endif

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
        // The script's server would hold a pipe open: its settings are read from the file it writes.
        run([script, "start", directory])
        let output = (try? String(contentsOfFile: "\(directory)/env", encoding: .utf8)) ?? ""
        var fields: [String: String] = [:]
        for line in output.split(separator: "\n") {
            let parts = line.split(separator: "=", maxSplits: 1).map(String.init)
            if parts.count == 2 { fields[parts[0]] = parts[1] }
        }
        guard let url = fields["TABSYNC_TEST_POSTGRES_URL"], let password = fields["TABSYNC_TEST_POSTGRES_PASSWORD"] else {
            fatalError("scripts/postgres-cluster did not start a server: \(output)")
        }
        startedDirectory = directory
        atexit { if let directory = TestServer.startedDirectory { TestServer.run([TestServer.script, "stop", directory]) } }
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

    /// Runs a command to its end with /dev/null for its standard streams (posix_spawn and
    /// waitpid: a server it starts inherits every descriptor, so a pipe would never end).
    static func run(_ command: [String]) {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for fd: Int32 in 0...2 { posix_spawn_file_actions_addopen(&actions, fd, "/dev/null", fd == 0 ? O_RDONLY : O_WRONLY, 0) }
        // Nothing of the test process beyond the standard streams: the server outlives this call
        // (glibc's addclosefrom, looked up at run time; Swift's Glibc does not import it).
        typealias CloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
        if let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addclosefrom_np") {
            _ = unsafeBitCast(symbol, to: CloseFrom.self)(&actions, 3)
        }
        let argv = command.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var pid: pid_t = 0
        guard posix_spawn(&pid, command[0], &actions, nil, argv, environ) == 0 else { return }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0, errno == EINTR {}
    }
}
