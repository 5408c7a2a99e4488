import Foundation
import Testing
import TabSync
import TabSyncConformance
import TabSyncPostgres

/// A store on the test server; each storage opened on it has its own backend, connections and
/// advisory locks, as a process on another host would.
struct PostgresStore: ConformanceStore {
    let name: String
    let lockTimeout: Duration
    let history: Int

    func open(_ origin: String) throws -> SharedStorage {
        let backend = try PostgresBackend(
            configuration: TestServer.configuration, store: name, origin: origin, historyLimit: history, lockTimeout: lockTimeout)
        return try SharedStorage(backend: backend, origin: origin)
    }
}

struct PostgresUnderTest: BackendUnderTest {
    func makeStore(lockTimeout: Duration, history: Int) throws -> any ConformanceStore {
        PostgresStore(name: TestServer.uniqueStore("conformance"), lockTimeout: lockTimeout, history: history)
    }
}

/// Issue 15, point 6: the backend conformance suite of the file and in-memory backends, on
/// PostgreSQL.
@Suite(.timeLimit(.minutes(2)))
struct PostgresConformanceTests {
    @Test(arguments: BackendConformance.allCases)
    func conformance(_ check: BackendConformance) async throws {
        try await check.run(on: PostgresUnderTest())
    }
}
