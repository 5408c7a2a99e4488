import Foundation
import Testing
import TabSync
@testable import TabSyncAuth

@Suite(.timeLimit(.minutes(1)))
struct SessionPolicyTests {
    func record(started: Int64, lastActivity: Int64, idle: Int64?, absolute: Int64?) -> SessionRecord {
        var record = SessionRecord()
        record.state = .signedIn
        record.startedAt = started
        record.lastActivity = lastActivity
        record.idleTimeout = idle
        record.absoluteTimeout = absolute
        return record
    }

    @Test func anIdleLimitSlidesWithActivity() {
        let deadline = AuthSession.deadline(of: record(started: 0, lastActivity: 5_000, idle: 10_000, absolute: nil))
        #expect(deadline?.at == 15_000 && deadline?.reason == .idleTimeout)
    }

    @Test func anAbsoluteLimitIgnoresActivity() {
        let deadline = AuthSession.deadline(of: record(started: 0, lastActivity: 50_000, idle: nil, absolute: 60_000))
        #expect(deadline?.at == 60_000 && deadline?.reason == .absoluteTimeout)
    }

    @Test(arguments: [
        (Int64(5_000), Int64(15_000), SignOutReason.idleTimeout),   // idle deadline first
        (Int64(55_000), Int64(60_000), SignOutReason.absoluteTimeout), // activity cannot pass the absolute limit
    ])
    func aHybridPolicyTakesTheEarlierDeadline(lastActivity: Int64, expected: Int64, reason: SignOutReason) {
        let deadline = AuthSession.deadline(of: record(started: 0, lastActivity: lastActivity, idle: 10_000, absolute: 60_000))
        #expect(deadline?.at == expected && deadline?.reason == reason)
    }

    @Test func aSignedOutOrUnlimitedSessionHasNoDeadline() {
        #expect(AuthSession.deadline(of: record(started: 0, lastActivity: 0, idle: nil, absolute: nil)) == nil)
        var ended = record(started: 0, lastActivity: 0, idle: 1, absolute: 1)
        ended.state = .signedOut
        #expect(AuthSession.deadline(of: ended) == nil)
    }

    @Test func theIdleLimitWarnsThenSignsEveryProcessOut() async throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        var options = AuthSession.Options()
        options.policy = SessionPolicy(idleTimeout: .seconds(2), warningLead: .seconds(1))
        let a = try AuthSession(directory: directory.path, origin: "a", client: server.client(), options: options)
        let b = try AuthSession(directory: directory.path, origin: "b", client: server.client())
        let aEvents = a.events()
        let bEvents = b.events()
        let watcher = Task { await b.run() }
        defer { watcher.cancel() }
        try a.adopt(accessToken: "t", refreshToken: "r", expiresIn: 3600)
        // The policy travels with the session: b enforces what a signed in with.
        let expiring = await waitFor(aEvents) { if case .expiring = $0 { false } else { if case .signedOut = $0 { true } else { false } } }
        #expect(expiring.map { if case .signedOut(reason: .idleTimeout, origin: "b", _) = $0 { true } else { false } } == true)
        let notice = await waitFor(bEvents) { if case .expiring = $0 { true } else { false } }
        if case let .expiring(remaining, reason)? = notice {
            #expect(reason == .idleTimeout)
            #expect(remaining <= .seconds(1))
        }
        #expect(try a.status().reason == .idleTimeout)
    }

    @Test func activityInAnotherProcessExtendsTheIdleDeadline() async throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        var options = AuthSession.Options()
        options.policy = SessionPolicy(idleTimeout: .seconds(20))
        let a = try AuthSession(directory: directory.path, origin: "a", client: server.client(), options: options)
        let b = try AuthSession(directory: directory.path, origin: "b", client: server.client())
        try a.adopt(accessToken: "t", refreshToken: "r", expiresIn: 3600)
        let before = try #require(SessionRecord.decode(try a.storage.get(SessionRecord.key)))
        // Writes are throttled to one per tenth of the idle limit (here 2 s): move the last
        // activity back so that this one counts.
        var earlier = before
        earlier.lastActivity = (before.lastActivity ?? 0) - 5_000
        try await a.storage.set(SessionRecord.key, earlier.encoded())
        try b.recordActivity()
        let after = try #require(SessionRecord.decode(try a.storage.get(SessionRecord.key)))
        #expect((after.lastActivity ?? 0) >= (before.lastActivity ?? 0))
        let sequence = try a.status().sequence
        // A second activity right away is throttled: nothing is written.
        try b.recordActivity()
        #expect(try a.status().sequence == sequence)
    }
}
