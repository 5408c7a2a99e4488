import Foundation
import Synchronization
import Testing
import TabSync
@testable import TabSyncAuth

/// A process's view of the storage can lag behind the committed state (its watcher is busy, its
/// machine loaded). Storage events then arrive late and old; a process waiting for another's
/// refresh must not take an old change for the outcome it waits for.
@Suite(.timeLimit(.minutes(1)))
struct LaggingViewTests {
    @Test func aWaiterWhoseViewLagsAdoptsTheNewRefreshNotAnOldOne() async throws {
        let memory = InMemoryBackend(name: "session")
        let lagging = LaggingBackend(memory)
        let server = FakeTokenServer()
        let a = AuthSession(storage: try SharedStorage(backend: memory, origin: "a"), client: try server.client())
        let b = AuthSession(storage: try SharedStorage(backend: lagging, origin: "b"), client: try server.client())

        // b's view follows until a marks its first refresh as in progress, then stops while a
        // finishes it and refreshes once more: the first change b will see is a new token.
        let seen = b.storage.events()
        let (access, refresh) = server.issue()
        try a.adopt(accessToken: access, refreshToken: refresh, expiresIn: 0)
        server.state.withLock { $0.delay = .milliseconds(300) }
        let firstTask = Task { try await a.accessToken() }
        for await event in seen where SessionRecord.decode(event.newValue)?.refreshing != nil { break }
        lagging.hold()
        let first = try await firstTask.value
        server.state.withLock { $0.delay = .zero }
        try await expire(a)
        let second = try await a.accessToken()
        #expect(first.value != second.value)

        // A third, slow one; b asks meanwhile and waits for it.
        try await expire(a)
        server.state.withLock { $0.delay = .milliseconds(300) }
        let third = Task { try await a.accessToken() }
        let deadline = ContinuousClock.now + .seconds(10)
        while server.refreshCount < 3, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        try #require(server.refreshCount == 3, "a's third refresh reached the server")
        let waiting = Task { try await b.accessToken() }
        // b found the refresh lock taken, so it now waits for the outcome; only then does its
        // view catch up, with the changes of the two earlier refreshes first.
        try #require(try await lagging.waitForALockAttempt(), "b tried the refresh lock")
        lagging.deliver()

        let (tokenA, tokenB) = try await (third.value, waiting.value)
        #expect(tokenB.value == tokenA.value, "b adopted \(tokenB.value), an older token than the one a just got")
        #expect(!tokenB.refreshedHere)
        #expect(server.refreshCount == 3)
    }

    /// Lets the access token expire, as time would.
    func expire(_ session: AuthSession) async throws {
        var record = try #require(SessionRecord.decode(try session.storage.get(SessionRecord.key)))
        record.expiresAt = Date().millisecondsSince1970 - 1000
        try await session.storage.set(SessionRecord.key, record.encoded())
    }
}

/// A backend whose change signals can be held back, from ``hold()`` until ``deliver()``: the view of a process
/// whose watcher is busy. Reads and commits go straight through, as they would.
final class LaggingBackend: StorageBackend {
    let base: any StorageBackend
    private let state = Mutex<(held: Bool, handlers: [@Sendable (BackendSignal) -> Void], lockAttempts: Int)>((false, [], 0))

    init(_ base: any StorageBackend) { self.base = base }

    var location: String { base.location }
    func snapshot() throws(TabSyncError) -> StoreSnapshot { try base.snapshot() }
    func changes(after position: StorePosition, waiting: Bool) throws(TabSyncError) -> StoreChanges? {
        try base.changes(after: position, waiting: waiting)
    }
    func commit<Result>(
        as author: ChangeAuthor, _ body: (inout StoreTransaction) throws(TabSyncError) -> Result
    ) throws(TabSyncError) -> Result {
        try base.commit(as: author, body)
    }
    func commit<Result: Sendable>(
        as author: ChangeAuthor, _ body: @escaping @Sendable (inout StoreTransaction) throws(TabSyncError) -> Result
    ) async throws -> Result {
        try await base.commit(as: author, body)
    }
    func watch(_ handler: @escaping @Sendable (BackendSignal) -> Void) -> any WatchRegistration {
        state.withLock { $0.handlers.append(handler) }
        return base.watch { signal in if !self.state.withLock({ $0.held }) { handler(signal) } }
    }
    func lock(named name: String) throws(TabSyncError) -> any SessionLock {
        CountingLock(base: try base.lock(named: name)) { self.state.withLock { $0.lockAttempts += 1 } }
    }
    func queryLocks() -> [LockReport] { base.queryLocks() }

    /// From now on, change signals are held back.
    func hold() { state.withLock { $0.held = true } }

    /// Ends the lag: the view catches up with everything committed so far.
    func deliver() {
        let handlers = state.withLock { state in
            state.held = false
            return state.handlers
        }
        for handler in handlers { handler(.mayHaveChanged) }
    }

    /// Whether a lock was tried within `timeout`.
    func waitForALockAttempt(timeout: Duration = .seconds(10)) async throws -> Bool {
        let deadline = ContinuousClock.now + timeout
        while state.withLock({ $0.lockAttempts }) == 0 {
            guard ContinuousClock.now < deadline else { return false }
            try await Task.sleep(for: .milliseconds(5))
        }
        return true
    }

    private struct CountingLock: SessionLock {
        let base: any SessionLock
        let attempted: @Sendable () -> Void
        var name: String { base.name }
        func tryAcquire() throws(TabSyncError) -> (any SessionLockHold)? {
            defer { attempted() }
            return try base.tryAcquire()
        }
        func acquire(timeout: Duration?) async throws -> any SessionLockHold { try await base.acquire(timeout: timeout) }
        func query() -> LockReport { base.query() }
    }
}
