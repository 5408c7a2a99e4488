import Foundation
import Synchronization
import Testing
import TabSync
@testable import TabSyncAuth

/// `run()` at rest: it looks at the session when something happens and sleeps otherwise.
/// (Issue 10: a cancelled timer used to wake the loop again at once, forever.)
@Suite(.timeLimit(.minutes(1)))
struct RunLoopIdleTests {
    /// Starts `run()`, makes the change `trigger` once the loop is running (the bug showed only
    /// after a change had woken the loop), then counts the loop's turns over `period`.
    func turnsAtRest(
        _ session: AuthSession, over period: Duration, after trigger: () async throws -> Void
    ) async throws -> Int {
        let runner = Task { await session.run() }
        defer { runner.cancel() }
        try await waitForTurn(of: session, after: 0)
        let first = session.runTurns.load(ordering: .relaxed)
        try await trigger()
        try await waitForTurn(of: session, after: first)
        // The change's own wake-ups (one per commit) settle first.
        try await Task.sleep(for: .milliseconds(100))
        let before = session.runTurns.load(ordering: .relaxed)
        try await Task.sleep(for: period)
        return session.runTurns.load(ordering: .relaxed) - before
    }

    /// Waits (bounded) until the loop has turned more than `count` times.
    func waitForTurn(of session: AuthSession, after count: Int) async throws {
        try #require(try await turns(of: session, after: count, within: .seconds(10)), "run() did not look at the session")
    }

    @Test func aSignedInSessionWithNoDeadlinesDoesNotTurn() async throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        let session = try AuthSession(directory: directory.path, origin: "a", client: server.client())
        let turns = try await turnsAtRest(session, over: .seconds(1)) {
            let (access, refresh) = server.issue()
            try session.adopt(accessToken: access, refreshToken: refresh, expiresIn: 3600)
        }
        #expect(turns <= 2)
        #expect(server.refreshCount == 0)
    }

    @Test func aSignedOutSessionDoesNotTurn() async throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        let session = try AuthSession(directory: directory.path, origin: "a", client: server.client())
        let turns = try await turnsAtRest(session, over: .seconds(1)) {
            let (access, refresh) = server.issue()
            try session.adopt(accessToken: access, refreshToken: refresh, expiresIn: 3600)
            try await session.signOut()
        }
        #expect(turns <= 2)
    }

    @Test func farDeadlinesAndProactiveRefreshDoNotTurn() async throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        var options = AuthSession.Options()
        options.policy = SessionPolicy(idleTimeout: .seconds(3600), absoluteTimeout: .seconds(7200))
        options.proactiveRefresh = .seconds(60)
        let session = try AuthSession(directory: directory.path, origin: "a", client: server.client(), options: options)
        let turns = try await turnsAtRest(session, over: .seconds(1)) {
            let (access, refresh) = server.issue()
            try session.adopt(accessToken: access, refreshToken: refresh, expiresIn: 3600)
        }
        #expect(turns <= 2)
        #expect(server.refreshCount == 0)
    }

    @Test func aChangeInAnotherProcessWakesTheLoop() async throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        let a = try AuthSession(directory: directory.path, origin: "a", client: server.client())
        let b = try AuthSession(directory: directory.path, origin: "b", client: server.client())
        let runner = Task { await a.run() }
        defer { runner.cancel() }
        try await waitForTurn(of: a, after: 0)
        let before = a.runTurns.load(ordering: .relaxed)
        let (access, refresh) = server.issue()
        try b.adopt(accessToken: access, refreshToken: refresh, expiresIn: 3600)
        try await waitForTurn(of: a, after: before)
    }

    /// Whether the loop turns more than `count` times within `bound`.
    func turns(of session: AuthSession, after count: Int, within bound: Duration) async throws -> Bool {
        let started = ContinuousClock.now
        while session.runTurns.load(ordering: .relaxed) <= count, ContinuousClock.now - started < bound {
            try await Task.sleep(for: .milliseconds(5))
        }
        return session.runTurns.load(ordering: .relaxed) > count
    }

    /// A refresher's marker changes no deadline, so the loop sleeps through it (in a storm every
    /// process would wake for it at once); the new token that ends the refresh wakes it.
    @Test func aRefreshersMarkerDoesNotWakeTheLoopButItsNewTokenDoes() async throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        let a = try AuthSession(directory: directory.path, origin: "a", client: server.client())
        let b = try AuthSession(directory: directory.path, origin: "b", client: server.client())
        let (access, refresh) = server.issue()
        try b.adopt(accessToken: access, refreshToken: refresh, expiresIn: 3600)
        let runner = Task { await a.run() }
        defer { runner.cancel() }
        try await waitForTurn(of: a, after: 0)
        let before = a.runTurns.load(ordering: .relaxed)
        // Subscribed after run(): its handler sees each change after run()'s has.
        let delivered = Atomic<UInt64>(0)
        let subscription = a.storage.onNotification(includingOwnChanges: true) { notification in
            if case let .change(event) = notification { delivered.store(event.sequence, ordering: .relaxed) }
        }
        defer { subscription.cancel() }

        // b marks a refresh, as a refresher does before it presents the refresh token.
        var record = try #require(SessionRecord.decode(b.storage.get(SessionRecord.key)))
        record.refreshing = .init(generation: record.generation, pid: getpid(), origin: "b", startedAt: record.issuedAt ?? 0)
        let marked = try await b.storage.set(SessionRecord.key, record.encoded())
        // A turn for the marker would come within milliseconds of its delivery to run()'s
        // handler; none comes within half a second.
        let seen = ContinuousClock.now
        while delivered.load(ordering: .relaxed) < marked, ContinuousClock.now - seen < .seconds(10) {
            try await Task.sleep(for: .milliseconds(5))
        }
        try #require(delivered.load(ordering: .relaxed) >= marked, "a never saw the marker")
        #expect(try await !turns(of: a, after: before, within: .milliseconds(500)))

        let (newAccess, newRefresh) = server.issue()
        try b.adopt(accessToken: newAccess, refreshToken: newRefresh, expiresIn: 3600)
        try await waitForTurn(of: a, after: before)
    }
}
