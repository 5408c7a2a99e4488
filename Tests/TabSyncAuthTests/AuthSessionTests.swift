import Foundation
import Synchronization
import Testing
import TabSync
@testable import TabSyncAuth

/// Two `AuthSession`s on one directory stand for two processes: each has its own storage
/// instance, file descriptors and locks, exactly as separate processes would.
@Suite(.timeLimit(.minutes(1)))
struct AuthSessionTests {
    func session(_ directory: borrowing TemporaryDirectory, _ origin: String, _ server: FakeTokenServer, options: AuthSession.Options = .init()) throws -> AuthSession {
        try AuthSession(directory: directory.path, origin: origin, client: server.client(), options: options)
    }

    /// Signs in with tokens that are already within the leeway, so the next request refreshes.
    func signInExpired(_ session: AuthSession, _ server: FakeTokenServer) throws {
        let (access, refresh) = server.issue()
        try session.adopt(accessToken: access, refreshToken: refresh, expiresIn: 0)
    }

    @Test func aValidTokenIsReturnedWithoutAnyRequest() async throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        let a = try session(directory, "a", server)
        try a.adopt(accessToken: "access-0", refreshToken: "refresh-0", expiresIn: 3600)
        let token = try await a.accessToken()
        #expect(token.value == "access-0")
        #expect(!token.refreshedHere)
        #expect(server.requests.isEmpty)
        #expect(try a.status().hasValidToken)
    }

    @Test func concurrentCallersInOneProcessShareOneRefresh() async throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        server.state.withLock { $0.delay = .milliseconds(200) }
        let a = try session(directory, "a", server)
        try signInExpired(a, server)
        let tokens = try await withThrowingTaskGroup(of: AccessToken.self) { group in
            for _ in 0..<20 { group.addTask { try await a.accessToken() } }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(server.refreshCount == 1)
        #expect(Set(tokens.map(\.value)).count == 1)
        #expect(tokens.allSatisfy { $0.value != "access-1" })
    }

    @Test func twoProcessesElectOneRefresherAndTheOtherAdoptsItsToken() async throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        server.state.withLock { $0.delay = .milliseconds(300) }
        let a = try session(directory, "a", server)
        let b = try session(directory, "b", server)
        let bEvents = b.events()
        try signInExpired(a, server)
        async let tokenA = a.accessToken()
        async let tokenB = b.accessToken()
        let (ta, tb) = try await (tokenA, tokenB)
        #expect(server.refreshCount == 1)
        #expect(ta.value == tb.value)
        #expect([ta.refreshedHere, tb.refreshedHere].filter { $0 }.count == 1)
        let refreshed = await waitFor(bEvents) { if case .refreshed = $0 { true } else { false } }
        let refresher = ta.refreshedHere ? "a" : "b"
        #expect(refreshed == .refreshed(origin: refresher, sequence: try b.status().sequence))
    }

    @Test func withRotationNoRefreshTokenIsPresentedTwice() async throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        let sessions = try (0..<4).map { try session(directory, "p\($0)", server) }
        try signInExpired(sessions[0], server)
        for round in 0..<5 {
            if round > 0 {
                // Let the access token expire, as time would.
                var record = try #require(SessionRecord.decode(try sessions[0].storage.get(SessionRecord.key)))
                record.expiresAt = Date().millisecondsSince1970 - 1000
                try await sessions[0].storage.set(SessionRecord.key, record.encoded())
            }
            let tokens = try await withThrowingTaskGroup(of: AccessToken.self) { group in
                for session in sessions { group.addTask { try await session.accessToken() } }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            #expect(Set(tokens.map(\.value)).count == 1)
        }
        #expect(server.refreshCount == 5)
        #expect(Set(server.presented).count == server.presented.count, "\(server.presented)")
    }

    @Test func invalidGrantSignsEveryProcessOutAndWipesTheTokens() async throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        let a = try session(directory, "a", server)
        let b = try session(directory, "b", server)
        let bEvents = b.events()
        try signInExpired(a, server)
        server.answer(.oauthError(status: 400, error: "invalid_grant"))
        await #expect { try await a.accessToken() } throws: { ($0 as? AuthError)?.code == .refreshFailed }
        await waitFor(bEvents) { $0 == .signedOut(reason: .refreshFailed, origin: "a", sequence: (try? b.status().sequence) ?? 0) }
        #expect(try b.status().reason == .refreshFailed)
        await #expect { try await b.accessToken() } throws: { ($0 as? AuthError)?.code == .signedOut && ($0 as? AuthError)?.reason == .refreshFailed }
        #expect(server.refreshCount == 1)
        for (file, contents) in try filesIn(directory.path) {
            #expect(contents.range(of: Data("refresh-1".utf8)) == nil, "\(file) still holds the refresh token")
            #expect(contents.range(of: Data("access-1".utf8)) == nil, "\(file) still holds the access token")
        }
    }

    /// Issue 11 (secrets): with rotation, a replaced token survives in no file of the session
    /// directory while the session goes on, whichever process refreshed, and after sign-out
    /// neither the last tokens do. Format 1 kept the last five rotated refresh tokens in its
    /// journal; an append-only log would keep them all if a refresh only appended.
    @Test func aReplacedTokenSurvivesInNoFileWhileSignedInNorAfterSignOut() async throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer(expiresIn: 0)  // every request refreshes
        let a = try session(directory, "a", server)
        let b = try session(directory, "b", server)
        try signInExpired(a, server)
        for round in 0..<6 {
            _ = try await (round % 2 == 0 ? a : b).accessToken()
            let issued = server.state.withLock { $0.issued }
            let replaced = (1..<issued).flatMap { ["access-\($0)", "refresh-\($0)"] }
            for (file, contents) in try filesIn(directory.path) {
                let found = replaced.filter { contents.range(of: Data("\($0)\"".utf8)) != nil }
                #expect(found.isEmpty, "after refresh \(round + 1), \(file) still holds \(found)")
            }
        }
        try await a.signOut()
        let issued = server.state.withLock { $0.issued }
        for (file, contents) in try filesIn(directory.path) {
            let found = (1...issued).flatMap { ["access-\($0)\"", "refresh-\($0)\""] }.filter { contents.range(of: Data($0.utf8)) != nil }
            #expect(found.isEmpty, "after sign-out, \(file) still holds \(found)")
        }
    }

    @Test func aRefreshRefusedBecauseOfASignOutMeanwhileKeepsTheSignOutReason() async throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        server.state.withLock { $0.delay = .milliseconds(500) }
        let a = try session(directory, "a", server)
        let b = try session(directory, "b", server)
        try signInExpired(a, server)
        // The sign-out revokes the refresh token that a's request presents.
        server.answer(.oauthError(status: 400, error: "invalid_grant"))
        let refresh = Task { try await a.accessToken() }
        let deadline = ContinuousClock.now + .seconds(10)
        while server.refreshCount == 0, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        try await b.signOut()
        await #expect { try await refresh.value } throws: { ($0 as? AuthError)?.code == .signedOut }
        #expect(try b.status().reason == .userLogout)
    }

    @Test func proactiveRefreshRenewsTheTokenBeforeAnyoneAsks() async throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        var options = AuthSession.Options()
        options.leeway = .seconds(5)
        options.proactiveRefresh = .seconds(60)
        // The token lives an hour; a's clock is 59 minutes ahead, so it has 60 s left there:
        // beyond the leeway, but inside leeway + proactive margin.
        options.clock = SessionClock { Date().addingTimeInterval(3540) }
        let a = try session(directory, "a", server, options: options)
        let b = try session(directory, "b", server)
        let bEvents = b.events()
        let (access, refresh) = server.issue()
        try b.adopt(accessToken: access, refreshToken: refresh, expiresIn: 3600)
        let runner = Task { await a.run() }
        defer { runner.cancel() }
        await waitFor(bEvents) { if case .refreshed(origin: "a", _) = $0 { true } else { false } }
        #expect(server.refreshCount == 1)
        #expect(try b.status().expiresAt.map { $0 > Date().addingTimeInterval(3000 + 3540) } == true, "the new token expires an hour after a's clock")
    }

    @Test func aTransientFailureBacksOffForEveryProcessWithoutSigningOut() async throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        let a = try session(directory, "a", server)
        let b = try session(directory, "b", server)
        try signInExpired(a, server)
        server.answer(.empty(status: 503), .empty(status: 503))
        await #expect { try await a.accessToken() } throws: { ($0 as? AuthError)?.code == .network }
        let record = try #require(SessionRecord.decode(try b.storage.get(SessionRecord.key)))
        let backoffUntil = try #require(record.backoffUntil, "the backoff is in the shared state")
        // The backoff is shared: the other process does not call the server meanwhile.
        await #expect { try await b.accessToken() } throws: { ($0 as? AuthError)?.code == .network }
        if Date().millisecondsSince1970 < backoffUntil {
            #expect(server.refreshCount == 1)
        }
        #expect(try b.status().isSignedIn)
    }

    @Test func anUnreachableServerIsANetworkErrorNotASignOut() async throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        let a = try session(directory, "a", server)
        try signInExpired(a, server)
        server.answer(.unreachable)
        await #expect { try await a.accessToken() } throws: { ($0 as? AuthError)?.code == .network }
        #expect(try a.status().isSignedIn)
    }

    @Test func aRefreshInterruptedByADeadProcessIsNeverRetriedWithTheSameToken() async throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        let a = try session(directory, "a", server)
        try signInExpired(a, server)
        // What a refresher leaves behind when it is killed during the HTTP call.
        var record = try #require(SessionRecord.decode(try a.storage.get(SessionRecord.key)))
        record.refreshing = .init(generation: record.generation, pid: 999_999, origin: "dead", startedAt: 0)
        try await a.storage.set(SessionRecord.key, record.encoded())
        let b = try session(directory, "b", server)
        await #expect { try await b.accessToken() } throws: { ($0 as? AuthError)?.code == .refreshFailed }
        #expect(server.refreshCount == 0)
        #expect(try a.status().reason == .refreshFailed)
    }

    @Test func signOutReachesEveryProcessAndRevokesTheRefreshToken() async throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        let a = try session(directory, "a", server)
        let b = try session(directory, "b", server)
        let bEvents = b.events()
        try a.adopt(accessToken: "access-x", refreshToken: "refresh-x", expiresIn: 3600)
        await waitFor(bEvents) { if case .signedIn(origin: "a", _) = $0 { true } else { false } }
        try await a.signOut()
        await waitFor(bEvents) { if case .signedOut(reason: .userLogout, origin: "a", _) = $0 { true } else { false } }
        let revocation = try #require(server.requests.last)
        #expect(revocation.url.path == "/revoke")
        #expect(FakeTokenServer.form(revocation.body)["token"] == "refresh-x")
        // A process that joins later sees the ended session and its reason.
        let late = try session(directory, "late", server)
        #expect(try late.status() .reason == .userLogout)
        #expect(try !late.status().isSignedIn)
    }

    @Test func theJWTExpiryWinsWhenItIsEarlierThanExpiresIn() throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        let a = try session(directory, "a", server)
        let exp = Date().addingTimeInterval(120).timeIntervalSince1970.rounded(.down)
        try a.adopt(accessToken: jwt(exp: Date(timeIntervalSince1970: exp)), refreshToken: "r", expiresIn: 3600)
        #expect(try a.status().expiresAt == Date(timeIntervalSince1970: exp))
    }

    @Test func theStrictCheckTellsASessionFromAValidToken() throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        var options = AuthSession.Options()
        options.leeway = .seconds(30)
        // A clock the test moves: the token lives 60 s; 45 s later it is within the leeway.
        let offset = Mutex<TimeInterval>(0)
        options.clock = SessionClock { Date().addingTimeInterval(offset.withLock { $0 }) }
        let a = try session(directory, "a", server, options: options)
        try a.adopt(accessToken: "a", refreshToken: "r", expiresIn: 60)
        #expect(try a.status().hasValidToken)
        offset.withLock { $0 = 45 }
        let status = try a.status()
        #expect(status.isSignedIn)
        #expect(!status.hasValidToken, "a token within the leeway is not valid")
    }

    @Test func tokensNeverAppearInDescriptionsOrErrors() async throws {
        let token = AccessToken(value: "secret-access", expiresAt: Date(), refreshedHere: true)
        #expect(!"\(token)".contains("secret-access"))
        let response = TokenResponse(accessToken: "secret-access", tokenType: "Bearer", refreshToken: "secret-refresh", expiresIn: 60, scope: nil)
        #expect(!"\(response)".contains("secret"))
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        let a = try session(directory, "a", server)
        try a.adopt(accessToken: "secret-access", refreshToken: "secret-refresh", expiresIn: 0)
        server.answer(.oauthError(status: 400, error: "invalid_grant"))
        do {
            _ = try await a.accessToken()
            Issue.record("expected a refresh failure")
        } catch {
            #expect(!"\(error)".contains("secret"))
            let message = (error as? AuthError)?.message ?? ""
            #expect(!message.contains("secret"))
        }
    }

    /// An outcome published after a caller looked at the record but before its refresh attempt
    /// subscribed comes with no signal; the attempt looks once before it waits, and so hands over
    /// the stored outcome instead of timing out at the bound (the lock never comes free here).
    /// No clock is read: on a loaded machine the attempt's task may start late, and what tells a
    /// look from none is the answer, `.movedOn` against `.failed(refreshTimeout)`.
    @Test func anOutcomePublishedBeforeTheWaitBeganEndsItAtOnce() async throws {
        let directory = TemporaryDirectory()
        let server = FakeTokenServer()
        var options = AuthSession.Options()
        options.refreshWaitTimeout = .seconds(3)
        let a = try AuthSession(directory: directory.path, origin: "a", client: server.client(), options: options)
        let (access, refresh) = server.issue()
        try a.adopt(accessToken: access, refreshToken: refresh, expiresIn: 3600)
        let stale = try #require(SessionRecord.decode(a.storage.get(SessionRecord.key))).generation
        // Another process refreshed (the new token is stored) and still holds the refresh lock.
        // Its change reaches this storage's subscribers before the attempt subscribes, so that
        // the attempt gets no signal for it.
        let delivered = a.storage.events(includingOwnChanges: true)
        let (newAccess, newRefresh) = server.issue()
        try a.adopt(accessToken: newAccess, refreshToken: newRefresh, expiresIn: 3600)
        try #require(await waitFor(delivered) { SessionRecord.decode($0.newValue)?.accessToken == newAccess } != nil)
        let hold = try #require(try a.storage.lock(named: "refresh").tryAcquire())
        defer { hold.release() }

        let attempt = try await a.refresh(generation: stale, margin: 0)
        guard case let .movedOn(record) = attempt else {
            Issue.record("the attempt did not see the stored outcome: \(attempt)")
            return
        }
        #expect(record?.accessToken == newAccess)
        #expect(server.refreshCount == 0)
    }
}
