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
            // The script's server would hold a pipe open: its settings are read from the file it writes.
            runStartingServer(["\(repositoryRoot)/scripts/postgres-cluster", "start", directory])
            let written = (try? String(contentsOfFile: "\(directory)/env", encoding: .utf8)) ?? ""
            for line in written.split(separator: "\n") {
                let parts = line.split(separator: "=", maxSplits: 1).map(String.init)
                if parts.count == 2 { fields[parts[0]] = parts[1] }
            }
            startedDirectory = directory
            atexit { if let directory = PostgresServer.startedDirectory { runCommand(["\(repositoryRoot)/scripts/postgres-cluster", "stop", directory]) } }
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
        // With a log file, where the restarted server writes (not to our descriptors).
        let arguments = [
            "\(shared.binDirectory)/pg_ctl", "-D", shared.dataDirectory, "-l", "\(shared.dataDirectory)/server.log", "-m", "fast", "-w", "-t", "60", "restart",
        ]
        runStartingServer(geteuid() == 0 ? ["/usr/bin/setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"] + arguments : arguments)
    }

    /// Runs SQL as the test server's superuser with psql; returns its output (unaligned, no header).
    @discardableResult
    static func sql(_ statement: String) -> String {
        let port = URLComponents(string: shared.url)?.port ?? 5432
        return runCommand(["env", "PGPASSWORD=\(shared.password)", "psql", "-h", "127.0.0.1", "-p", String(port), "-U", "tabsync", "-d", "postgres", "-Atc", statement]).output
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
