import Foundation
import Synchronization
import Testing
@testable import TabSync

/// Issue 12, point 8: what every backend must do, checked the same way against each. A store is
/// shared by several `SharedStorage` instances, as processes share one; `FileBackend` instances
/// in one process exclude each other through their own descriptors exactly as processes do.
enum BackendKind: String, CaseIterable, Sendable {
    case file
    case memory
}

/// One store, and storages on it.
final class SharedStore: Sendable {
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
    @Test(arguments: BackendKind.allCases)
    func everyChangeReachesTheOthersOnceInOrderAndNeverItsAuthor(_ kind: BackendKind) async throws {
        let store = SharedStore(kind)
        let a = try store.open("a"), b = try store.open("b"), c = try store.open("c")
        var seenByA = a.events().makeAsyncIterator()
        var seenByC = c.events().makeAsyncIterator()
        // Two writers at once: one sequence, no gap, no duplicate.
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { for index in 1...40 { try await a.set("a\(index % 5)", "\(index)") } }
            group.addTask { for index in 1...40 { try await b.set("b\(index % 5)", "\(index)") } }
            try await group.waitForAll()
        }
        var view: [String: String] = [:]
        for expected in 1...UInt64(80) {
            let event = try #require(await next(&seenByC))
            #expect(event.sequence == expected, "a gap or a duplicate after \(expected - 1)")
            #expect(event.origin == (event.key?.hasPrefix("a") == true ? "a" : "b"))
            #expect(!event.isResync && !event.isOwn)
            view[event.key!] = event.newValue
        }
        #expect(view == (try c.snapshot().values))
        // A's own 40 changes never came back to it: its first event is B's first.
        let first = try #require(await next(&seenByA))
        #expect(first.origin == "b")
        withExtendedLifetime((a, b, c)) {}
    }

    @Test(arguments: BackendKind.allCases)
    func aSetThatChangesNothingCommitsNothingAndRaisesNoEvent(_ kind: BackendKind) async throws {
        let store = SharedStore(kind)
        let a = try store.open("a"), b = try store.open("b")
        var events = b.events().makeAsyncIterator()
        #expect(try await a.set("k", "v") == 1)
        #expect(try await a.set("k", "v") == 1, "the current number, nothing committed")
        let synchronous = { () throws(TabSyncError) in try a.set("k", "v") }
        #expect(try synchronous() == 1, "the same for the synchronous set")
        #expect(try await a.remove("absent") == 1)
        #expect(try await a.set("k", "w") == 2)
        #expect(await next(&events)?.sequence == 1)
        let second = await next(&events)
        #expect(second?.sequence == 2 && second?.oldValue == "v" && second?.newValue == "w")
    }

    @Test(arguments: BackendKind.allCases)
    func aReaderBeyondTheHistoryGetsAResyncAndOneWithinItTheRecords(_ kind: BackendKind) async throws {
        let store = SharedStore(kind, history: 4)
        let a = try store.open("a")
        for index in 1...10 { try await a.set("k\(index)", "\(index)") }
        let now = try await a.backend.snapshot()
        #expect(now.position.sequence == 10)
        guard case let .records(records, store: recordStore)? = try a.backend.changes(after: StorePosition(store: now.position.store, sequence: 8), waiting: true) else {
            Issue.record("no records after 8")
            return
        }
        #expect(records.map(\.sequence) == [9, 10] && records.map(\.key) == ["k9", "k10"] && recordStore == now.position.store)
        guard case let .resync(snapshot, origins)? = try a.backend.changes(after: StorePosition(store: now.position.store, sequence: 2), waiting: true) else {
            Issue.record("no resync for a reader beyond the history")
            return
        }
        #expect(snapshot.values.count == 10 && snapshot.position == now.position)
        #expect(origins["k10"] == "a")
        guard case .resync? = try a.backend.changes(after: StorePosition(store: "another store", sequence: 10), waiting: true) else {
            Issue.record("no resync for a reader of another store")
            return
        }
    }

    @Test(arguments: BackendKind.allCases)
    func namedLocksExcludeTimeOutNamingTheHolderAndCancel(_ kind: BackendKind) async throws {
        let store = SharedStore(kind)
        let a = try store.open("a"), b = try store.open("b")
        let hold = try #require(try a.lock(named: "job").tryAcquire())
        let other = try b.lock(named: "job")
        #expect(try other.tryAcquire() == nil, "two holders at once")
        await #expect {
            _ = try await other.acquire(timeout: .milliseconds(200))
        } throws: { error in
            let error = error as? TabSyncError
            return error?.code == .lockTimeout && error?.holders.map(\.pid) == [getpid()] && error?.message.contains("job") == true
        }
        let waiter = Task { try await other.acquire() }
        try await Task.sleep(for: .milliseconds(50))
        waiter.cancel()
        await #expect(throws: CancellationError.self) { _ = try await waiter.value }
        #expect(a.queryLocks().contains { $0.name == "job" && $0.holders.map(\.pid) == [getpid()] })
        hold.release()
        let taken = try await other.acquire(timeout: .seconds(5))
        taken.release()
    }

    @Test(arguments: BackendKind.allCases)
    func aHeldCommitLockBoundsAndCancelsOtherCommitsAndNothingIsLost(_ kind: BackendKind) async throws {
        let store = SharedStore(kind, lockTimeout: .milliseconds(300))
        let a = try store.open("a"), b = try store.open("b")
        // A commit of A that holds the commit lock until released, on a thread of its own.
        let entered = DispatchSemaphore(value: 0), release = DispatchSemaphore(value: 0)
        var released = false
        defer { if !released { release.signal() } }
        let holder = Thread {
            _ = try? a.transaction { (transaction: inout SharedStorage.Transaction) throws(TabSyncError) in
                transaction.set("held", "yes")
                entered.signal()
                release.wait()
            }
        }
        holder.start()
        try await offPool { entered.wait() }
        await #expect {
            try await b.set("k", "late")
        } throws: { error in
            (error as? TabSyncError)?.code == .lockTimeout && (error as? TabSyncError)?.holders.map(\.pid) == [getpid()]
        }
        let cancelled = Task { try await b.set("k", "cancelled") }
        try await Task.sleep(for: .milliseconds(50))
        cancelled.cancel()
        await #expect(throws: CancellationError.self) { try await cancelled.value }
        release.signal()
        released = true
        #expect(try await b.set("k", "after") == 2, "after the held commit (1), nothing of the failed ones")
        #expect(try b.snapshot().values == ["held": "yes", "k": "after"])
    }

    @Test(arguments: BackendKind.allCases)
    func observationStartsWithTheValuesAndGoesOnWithoutAGap(_ kind: BackendKind) async throws {
        let store = SharedStore(kind)
        let a = try store.open("a"), b = try store.open("b")
        try await a.set("before", "1")
        var observation = b.observe().makeAsyncIterator()
        guard case let .snapshot(values, sequence)? = await observation.next() else {
            Issue.record("the first element is not the snapshot")
            return
        }
        #expect(values == ["before": "1"] && sequence == 1)
        try await a.set("after", "2")
        guard case let .change(event)? = await observation.next() else {
            Issue.record("no change after the snapshot")
            return
        }
        #expect(event.sequence == 2 && event.key == "after")
    }
}
