import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// The PostgreSQL server of this test run: the one scripts/test started (its URL and password in
/// TABSYNC_TEST_POSTGRES_URL and TABSYNC_TEST_POSTGRES_PASSWORD), or else a throw-away cluster
/// started here with scripts/postgres-cluster and stopped when the test process exits.
enum PostgresServer {
    struct Server: Sendable {
        let url: String
        let password: String
        let dataDirectory: String
        let binDirectory: String
    }

    static let shared: Server = {
        var fields = ProcessInfo.processInfo.environment
        if fields["TABSYNC_TEST_POSTGRES_URL"] == nil {
            let directory = "\(FileManager.default.temporaryDirectory.path)/tabsync-it-pg-\(getpid())"
            fields = [:]
            for line in run(["\(repositoryRoot)/scripts/postgres-cluster", "start", directory]).split(separator: "\n") {
                let parts = line.split(separator: "=", maxSplits: 1).map(String.init)
                if parts.count == 2 { fields[parts[0]] = parts[1] }
            }
            startedDirectory = directory
            atexit { if let directory = PostgresServer.startedDirectory { PostgresServer.run(["\(repositoryRoot)/scripts/postgres-cluster", "stop", directory]) } }
        }
        guard let url = fields["TABSYNC_TEST_POSTGRES_URL"], let password = fields["TABSYNC_TEST_POSTGRES_PASSWORD"],
              let data = fields["TABSYNC_TEST_POSTGRES_DATA"], let bin = fields["TABSYNC_TEST_POSTGRES_BIN"]
        else { fatalError("scripts/postgres-cluster did not start a PostgreSQL server") }
        return Server(url: url, password: password, dataDirectory: data, binDirectory: bin)
    }()

    nonisolated(unsafe) static var startedDirectory: String?

    /// The arguments that put a tab on `store` of the server; its password goes in the environment.
    static func tabArguments(store: String) -> [String] { ["--postgres", shared.url, "--store", store] }
    static var tabEnvironment: [String: String] { ["PGPASSWORD": shared.password] }

    /// Restarts the server (`pg_ctl restart -m fast`): every connection is cut.
    static func restart() {
        // With a log file: the server started by pg_ctl would otherwise keep our pipe open.
        let arguments = [
            "\(shared.binDirectory)/pg_ctl", "-D", shared.dataDirectory, "-l", "\(shared.dataDirectory)/server.log", "-m", "fast", "-w", "-t", "60", "restart",
        ]
        // posix_spawn and waitpid, with /dev/null for its output: the new server inherits the
        // descriptors pg_ctl had, so a pipe read to its end would never end.
        let command = geteuid() == 0 ? ["/usr/bin/setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"] + arguments : arguments
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for fd: Int32 in 0...2 { posix_spawn_file_actions_addopen(&actions, fd, "/dev/null", fd == 0 ? O_RDONLY : O_WRONLY, 0) }
        let argv = command.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var pid: pid_t = 0
        guard posix_spawn(&pid, command[0], &actions, nil, argv, environ) == 0 else { return }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0, errno == EINTR {}
    }

    /// Runs SQL as the test server's superuser with psql; returns its output (unaligned, no header).
    @discardableResult
    static func sql(_ statement: String) -> String {
        let port = URLComponents(string: shared.url)?.port ?? 5432
        return run(["env", "PGPASSWORD=\(shared.password)", "psql", "-h", "127.0.0.1", "-p", String(port), "-U", "tabsync", "-d", "postgres", "-Atc", statement])
    }

    @discardableResult
    static func run(_ arguments: [String]) -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = FileHandle.nullDevice
        do { try process.run() } catch { return "" }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return String(decoding: data, as: UTF8.self)
    }
}

/// A tab on `store` of the test's PostgreSQL server.
func launchPostgresTab(name: String, store: String, extra: [String] = []) async throws -> ChildProcess {
    let tab = try ChildProcess(
        "\(productsDirectory)/tab", PostgresServer.tabArguments(store: store) + ["--name", name, "--json"] + extra, name: name,
        environment: PostgresServer.tabEnvironment)
    try await tab.waitFor("ready") { $0["type"] as? String == "ready" }
    return tab
}
