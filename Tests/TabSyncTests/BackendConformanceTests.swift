import Foundation
import Synchronization
import Testing
import TabSyncConformance
@testable import TabSync

/// Issue 12, point 8: what every backend must do (``BackendConformance``, which TabSyncPostgres
/// runs too), checked the same way against each. A store is shared by several `SharedStorage`
/// instances, as processes share one; `FileBackend` instances in one process exclude each other
/// through their own descriptors exactly as processes do.
enum BackendKind: String, CaseIterable, Sendable, BackendUnderTest {
    case file
    case memory

    func makeStore(lockTimeout: Duration, history: Int) throws -> any ConformanceStore {
        SharedStore(self, lockTimeout: lockTimeout, history: history)
    }
}

/// One store, and storages on it.
final class SharedStore: ConformanceStore {
    let kind: BackendKind
    let lockTimeout: Duration
    let history: Int
    private let path: String
    private let memory: InMemoryBackend

    init(_ kind: BackendKind, lockTimeout: Duration = .seconds(10), history: Int = 512) {
        self.kind = kind
        self.lockTimeout = lockTimeout
        self.history = history
        path = "\(FileManager.default.temporaryDirectory.path)/tabsync-conformance-\(UUID().uuidString.prefix(8))"
        memory = InMemoryBackend(historyLimit: history, lockTimeout: lockTimeout)
    }

    func open(_ origin: String) throws -> SharedStorage {
        switch kind {
        case .file:
            var options = SharedStorage.Options()
            options.durability = .none
            options.lockTimeout = lockTimeout
            options.journalLimits = JournalLimits(maximumEntries: history)
            return try SharedStorage(directory: path, origin: origin, options: options)
        case .memory:
            return try SharedStorage(backend: memory, origin: origin)
        }
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

@Suite(.timeLimit(.minutes(1)))
struct BackendConformanceTests {
    @Test(arguments: BackendKind.allCases, BackendConformance.allCases)
    func conformance(_ kind: BackendKind, _ check: BackendConformance) async throws {
        try await check.run(on: kind)
    }
}
