import Foundation
import Testing
@testable import TabSyncAuth

/// The session's decisions without I/O: every time is a number the test chooses, so hours of
/// policy run in no time (virtual time).
@Suite struct SessionMachineTests {
    let machine = SessionMachine(leeway: 30_000, proactiveRefresh: nil)
    let t0: Int64 = 1_800_000_000_000

    func signedIn(expiresIn: Int64? = 3_600_000, idle: Int64? = nil, absolute: Int64? = nil, lead: Int64? = nil) -> SessionRecord {
        var record = SessionRecord()
        record.state = .signedIn
        record.accessToken = "access"
        record.refreshToken = "refresh"
        record.issuedAt = t0
        record.expiresAt = expiresIn.map { t0 + $0 }
        record.startedAt = t0
        record.lastActivity = t0
        record.idleTimeout = idle
        record.absoluteTimeout = absolute
        record.warningLead = lead
        record.generation = 1
        return record
    }

    // MARK: Tokens

    @Test func aTokenIsUsedUntilTheLeewayThenRefreshed() {
        let record = signedIn()
        #expect(machine.tokenStep(record, now: t0, margin: 30_000) == .use(token: "access", expiresAt: t0 + 3_600_000))
        #expect(machine.tokenStep(record, now: t0 + 3_570_000, margin: 30_000) == .refresh(generation: 1))
        #expect(machine.tokenStep(signedIn(expiresIn: nil), now: t0 + 99_999_999, margin: 30_000) == .use(token: "access", expiresAt: nil))
    }

    @Test func aLeewayAsLongAsTheTokenLivesBecomesHalfItsLifetime() {
        // A 10 s token with a 30 s leeway: refreshed after 5 s, not on every call.
        let record = signedIn(expiresIn: 10_000)
        #expect(machine.tokenStep(record, now: t0 + 4_000, margin: 30_000) == .use(token: "access", expiresAt: t0 + 10_000))
        #expect(machine.tokenStep(record, now: t0 + 5_000, margin: 30_000) == .refresh(generation: 1))
    }

    @Test func withoutARefreshTokenATokenServesUntilItExpiresAndIsNeverRefreshed() {
        var record = signedIn(expiresIn: 60_000)
        record.refreshToken = nil
        // Within the leeway, but there is nothing to refresh with: it is used while it lasts.
        #expect(machine.tokenStep(record, now: t0 + 45_000, margin: 30_000) == .use(token: "access", expiresAt: t0 + 60_000))
        #expect(machine.tokenStep(record, now: t0 + 60_000, margin: 30_000) == .expiredWithoutRefreshToken)
        let proactive = SessionMachine(leeway: 30_000, proactiveRefresh: 60_000)
        #expect(!proactive.turn(record, now: t0 + 45_000, warned: [], retryAfter: nil).refresh)
    }

    @Test func aPassedDeadlineEndsTheSessionBeforeAnyToken() {
        let record = signedIn(idle: 60_000)
        #expect(machine.tokenStep(record, now: t0 + 60_000, margin: 0) == .expire(startedAt: t0, reason: .idleTimeout))
        var out = record
        out.signOut(reason: .userLogout, origin: "x")
        #expect(machine.tokenStep(out, now: t0, margin: 0) == .signedOut(reason: .userLogout))
    }

    // MARK: Election

    @Test func theRefresherMarksItsRefreshAndOthersSeeItInterrupted() {
        var record = signedIn(expiresIn: 0)
        #expect(machine.plan(&record, generation: 1, margin: 30_000, now: t0, pid: 42, origin: "a") == .present(refreshToken: "refresh"))
        #expect(record.refreshing == .init(generation: 1, pid: 42, origin: "a", startedAt: t0))
        // The refresher died: the next holder of the lock ends the session in the same commit.
        var next = record
        #expect(machine.plan(&next, generation: 1, margin: 30_000, now: t0 + 5, pid: 43, origin: "b") == .interrupted(record.refreshing!))
        #expect(next.state == .signedOut && next.reason == .refreshFailed && next.refreshToken == nil)
    }

    @Test func nothingIsPlannedWhenTheRecordMovedOnOrABackoffRuns() {
        var moved = signedIn(expiresIn: 0)
        moved.generation = 2
        #expect(machine.plan(&moved, generation: 1, margin: 0, now: t0, pid: 1, origin: "a") == .notNeeded)
        var backingOff = signedIn(expiresIn: 0)
        backingOff.backoffUntil = t0 + 1_000
        #expect(machine.plan(&backingOff, generation: 1, margin: 0, now: t0, pid: 1, origin: "a") == .backingOff(until: t0 + 1_000))
        #expect(backingOff.refreshing == nil)
    }

    @Test func transientFailuresBackOffDoublingUpToThirtySeconds() {
        var record = signedIn(expiresIn: 0)
        let failure = AuthError(code: .network, message: "503")
        var delays: [Int64] = []
        for attempt in 0..<8 {
            let now = t0 + Int64(attempt) * 100_000
            guard case let .backedOff(until) = machine.apply(.failure(failure), to: &record, generation: 1, now: now, origin: "a") else {
                Issue.record("not backed off")
                return
            }
            delays.append(until - now)
        }
        #expect(delays == [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000])
        #expect(record.state == .signedIn && record.refreshToken == "refresh")
    }

    @Test(arguments: [AuthError.Code.refreshFailed, .unanswered, .invalidResponse, .server, .invalidClient])
    func everyOtherFailureFinishesTheRefreshToken(code: AuthError.Code) {
        var record = signedIn(expiresIn: 0)
        let result = machine.apply(.failure(AuthError(code: code, message: "m", httpStatus: 400)), to: &record, generation: 1, now: t0, origin: "a")
        guard case let .finished(error) = result else {
            Issue.record("\(code): \(result)")
            return
        }
        #expect(error.code == .refreshFailed && error.reason == .refreshFailed && error.httpStatus == 400)
        #expect(record.state == .signedOut && record.refreshToken == nil && record.reason == .refreshFailed)
    }

    @Test func aResultForAnEndedSessionIsNotInstalled() {
        var record = signedIn(expiresIn: 0)
        record.signOut(reason: .userLogout, origin: "b")
        let response = TokenResponse(accessToken: "new", tokenType: "Bearer", refreshToken: "r2", expiresIn: 60)
        #expect(machine.apply(.success(response), to: &record, generation: 1, now: t0, origin: "a") == .sessionEnded)
        #expect(record.accessToken == nil)
        var live = signedIn(expiresIn: 0)
        #expect(machine.apply(.success(response), to: &live, generation: 1, now: t0, origin: "a") == .installed(expiresAt: t0 + 60_000))
        #expect(live.accessToken == "new" && live.generation == 2 && live.refreshing == nil)
    }

    // MARK: Policy, in virtual time

    /// Runs the loop's decisions from `start` to `end`, jumping from wake-up to wake-up as the
    /// real loop would, and returns what it announced and did, with the times.
    func walk(_ record: SessionRecord, machine: SessionMachine, from start: Int64, to end: Int64) -> [(Int64, String)] {
        var record = record
        var now = start
        var warned: Set<Int64> = []
        var log: [(Int64, String)] = []
        while now <= end {
            let turn = machine.turn(record, now: now, warned: warned, retryAfter: nil)
            if let notice = turn.notice {
                warned.insert(notice.deadline)
                log.append((now, "expiring in \(notice.remaining / 1000) s (\(notice.reason))"))
            }
            if let expiry = turn.expire {
                record.signOut(reason: expiry.reason, origin: "me")
                log.append((now, "signed out (\(expiry.reason))"))
                continue
            }
            if turn.refresh {
                log.append((now, "refresh"))
                record.expiresAt = now + 3_600_000
                record.issuedAt = now
                continue
            }
            guard let wakeAt = turn.wakeAt else { log.append((now, "sleeps until a change")); break }
            now = wakeAt
        }
        return log
    }

    @Test func anIdleLimitWarnsAheadThenSignsOutAndThenSleeps() {
        let log = walk(signedIn(idle: 30 * 60_000), machine: machine, from: t0, to: t0 + 86_400_000)
        #expect(log.map(\.1) == ["expiring in 60 s (idleTimeout)", "signed out (idleTimeout)", "sleeps until a change"])
        #expect(log.map(\.0) == [t0 + 29 * 60_000, t0 + 30 * 60_000, t0 + 30 * 60_000])
    }

    @Test func aHybridPolicyWarnsForTheEarlierDeadlineWithItsOwnLead() {
        // Idle 1 h, absolute 2 h, activity at 1 h 30: the absolute limit comes first.
        var record = signedIn(idle: 3_600_000, absolute: 7_200_000, lead: 120_000)
        record.lastActivity = t0 + 5_400_000
        let log = walk(record, machine: machine, from: t0 + 5_400_000, to: t0 + 86_400_000)
        #expect(log.map(\.1) == ["expiring in 120 s (absoluteTimeout)", "signed out (absoluteTimeout)", "sleeps until a change"])
        #expect(log.first?.0 == t0 + 7_080_000)
    }

    @Test func proactiveRefreshRunsBeforeTheLeewayEveryTokenLifetime() {
        let proactive = SessionMachine(leeway: 30_000, proactiveRefresh: 60_000)
        let log = walk(signedIn(), machine: proactive, from: t0, to: t0 + 3 * 3_600_000)
        let refreshes = log.filter { $0.1 == "refresh" }.map(\.0)
        #expect(refreshes == [t0 + 3_510_000, t0 + 7_020_000, t0 + 10_530_000])
    }

    @Test func aSignedOutOrUnlimitedSessionNeverWakesOnItsOwn() {
        #expect(machine.turn(signedIn(), now: t0, warned: [], retryAfter: nil).wakeAt == nil)
        var out = signedIn(idle: 1_000)
        out.signOut(reason: .userLogout, origin: "x")
        #expect(machine.turn(out, now: t0, warned: [], retryAfter: nil) == SessionMachine.Turn())
    }

    @Test func aProactiveRefreshWaitsForTheSharedBackoff() {
        let proactive = SessionMachine(leeway: 30_000, proactiveRefresh: 60_000)
        var record = signedIn()
        let now = t0 + 3_550_000  // past the proactive refresh's due time
        #expect(proactive.turn(record, now: now, warned: [], retryAfter: nil).refresh)
        record.backoffUntil = now + 4_000
        let turn = proactive.turn(record, now: now, warned: [], retryAfter: nil)
        #expect(!turn.refresh && turn.wakeAt == now + 4_000)
    }
}
