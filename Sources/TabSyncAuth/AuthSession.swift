import Foundation
import Logging
import Synchronization
import TabSync

/// Session lifetime limits, independent of the access token's lifetime. The process that
/// signs in stores them in the shared session, so that every process applies the same ones.
public struct SessionPolicy: Sendable, Hashable {
    /// Sliding limit: the session ends after this long without activity in any process.
    public var idleTimeout: Duration?
    /// Absolute limit: the session ends this long after sign-in, whatever the activity.
    public var absoluteTimeout: Duration?
    /// How long before a forced sign-out the `expiring` notice fires; by default a fifth of
    /// the limit, at most 60 seconds.
    public var warningLead: Duration?

    /// With both limits set the policy is hybrid: the earlier deadline wins.
    public init(idleTimeout: Duration? = nil, absoluteTimeout: Duration? = nil, warningLead: Duration? = nil) {
        self.idleTimeout = idleTimeout
        self.absoluteTimeout = absoluteTimeout
        self.warningLead = warningLead
    }
}

/// An access token that was valid for at least the leeway when it was returned.
/// Its description never shows the token.
public struct AccessToken: Sendable, Hashable, CustomStringConvertible {
    public var value: String
    public var expiresAt: Date
    /// True when this process called the token endpoint to get it.
    public var refreshedHere: Bool
    public var description: String { "AccessToken(<redacted>, expiresAt: \(expiresAt), refreshedHere: \(refreshedHere))" }
}

/// What the shared session reports to every process.
public enum SessionEvent: Sendable, Hashable {
    /// Someone signed in (`origin` names the process), or adopted tokens.
    case signedIn(origin: String, sequence: UInt64)
    /// `origin` refreshed the tokens; every process now uses the new ones.
    case refreshed(origin: String, sequence: UInt64)
    /// The session ended everywhere.
    case signedOut(reason: SignOutReason, origin: String, sequence: UInt64)
    /// A forced sign-out comes in `in`, unless there is activity first (idle timeout).
    case expiring(in: Duration, reason: SignOutReason)
    /// A refresh failed without ending the session (network), or the storage had a problem.
    case problem(AuthError)
}

/// The state of the shared session as this process sees it.
public struct SessionStatus: Sendable, Hashable {
    public var isSignedIn: Bool
    /// When the current access token expires.
    public var expiresAt: Date?
    /// Why the last session ended, when signed out.
    public var reason: SignOutReason?
    /// The session storage's sequence number.
    public var sequence: UInt64
    /// The strict check: signed in and the access token valid beyond the leeway. A session can
    /// exist with an expired access token; ``AuthSession/accessToken()`` then refreshes it.
    public var hasValidToken: Bool
    /// The refresh under way, if a process is calling the token endpoint now.
    public var refresh: RefreshInProgress?
}

/// A refresh that a process has started and not finished: who, and since when.
public struct RefreshInProgress: Sendable, Hashable {
    /// The refreshing process's origin (its name in the session) and pid.
    public var origin: String
    public var pid: Int32
    public var since: Date
}

/// One signed-in session shared by every process of an app (docs in README, "Auth session").
///
/// - ``accessToken()`` returns a token valid for at least the leeway. When it must be refreshed,
///   a file lock elects one process to call the token endpoint; the others wait for its outcome
///   through storage events and adopt it. Concurrent callers in one process share one attempt.
/// - Before the HTTP call the refresher records "refresh in progress"; if it dies during the
///   call, the refresh token may already have been rotated at the server. The next process to
///   take the lock then signs the session out (`refreshFailed`) instead of presenting that token
///   again: with rotation, a refresh token is never presented twice.
/// - `invalid_grant` on refresh signs every process out with reason `refreshFailed` and wipes
///   the tokens. Transient failures do not sign out: they set a backoff shared by all processes.
public final class AuthSession: Sendable {
    public struct Options: Sendable {
        /// A token is refreshed when it expires within this long.
        public var leeway: Duration = .seconds(30)
        /// Applied at sign-in, stored in the session for all processes.
        public var policy = SessionPolicy()
        /// When set, ``run()`` refreshes this long before the leeway, so callers rarely wait.
        public var proactiveRefresh: Duration?
        /// For servers that accept a rotated refresh token once more for a while after rotation
        /// (django-oauth-toolkit's `REFRESH_TOKEN_GRACE_PERIOD_SECONDS`, Auth0's reuse interval):
        /// a refresh whose answer never came (timeout, lost connection) is tried once more if the
        /// first try began less than this long ago. Without it (the default) such a refresh token
        /// is never presented again: the session ends with `refreshFailed`.
        public var reuseGracePeriod: Duration?
        /// The clock for deadlines, activity, backoff and token expiry (``SessionClock/system``).
        public var clock: SessionClock = .system
        public var logger = Logger(label: "TabSyncAuth", factory: { _ in SwiftLogNoOpLogHandler() })
        public init() {}
    }

    public let storage: SharedStorage
    public let client: OAuthClient?
    let options: Options
    private let inFlight = Mutex<(generation: Int, task: Task<Result<AccessToken, AuthError>, Never>)?>(nil)
    private let notices = Mutex<[UInt64: AsyncStream<SessionEvent>.Continuation]>([:])
    private let noticeIDs = Atomic<UInt64>(0)
    private let clockGuard = ClockGuard()
    /// How often ``run()``'s loop has looked at the session, for tests of its idleness.
    let runTurns = Atomic<Int>(0)

    /// Joins the session in `directory` (storage `session`), creating it when missing.
    public convenience init(directory: String, origin: String, client: OAuthClient?, options: Options = Options()) throws(AuthError) {
        do {
            let storage = try SharedStorage(directory: directory, name: "session", origin: origin)
            self.init(storage: storage, client: client, options: options)
        } catch {
            throw AuthError.storage(error)
        }
    }

    public init(storage: SharedStorage, client: OAuthClient?, options: Options = Options()) {
        self.storage = storage
        self.client = client
        self.options = options
    }

    var origin: String { storage.origin }

    /// Now by the session's clock, in milliseconds since 1970.
    var now: Int64 { options.clock.milliseconds }

    /// The record as this process may act on it (``ClockGuard``).
    func trusted(_ record: SessionRecord, now: Int64) -> SessionRecord { clockGuard.trusted(record, now: now) }

    /// The leeway in milliseconds, within 0 ... ten years.
    var leeway: Int64 { Self.bounded(options.leeway) ?? 0 }

    /// A duration given by the application, in milliseconds within 0 ... ``SessionLimits/maximumDuration``.
    static func bounded(_ duration: Duration?) -> Int64? {
        duration.map { min(max($0, .zero), SessionLimits.maximumDuration).milliseconds }
    }

    // MARK: Reading

    private func record() throws(AuthError) -> (SessionRecord, UInt64) {
        do {
            let snapshot = try storage.snapshot()
            return (SessionRecord.decode(snapshot.values[SessionRecord.key]) ?? SessionRecord(), snapshot.sequence)
        } catch {
            throw AuthError.storage(error)
        }
    }

    /// Commits a change to the record under the commit lock; `body` sees the latest record.
    /// A record that signs out scrubs the tokens from the journal and the previous generation.
    @discardableResult
    private func change<Result>(_ body: (inout SessionRecord) throws(AuthError) -> Result) throws(AuthError) -> Result {
        var failure: AuthError?
        do throws(TabSyncError) {
            return try storage.transaction { transaction throws(TabSyncError) in
                var record = SessionRecord.decode(transaction.values[SessionRecord.key]) ?? SessionRecord()
                let before = record
                let result: Result
                do throws(AuthError) {
                    result = try body(&record)
                } catch {
                    failure = error
                    throw TabSyncError(code: .invalidArgument, path: nil, message: "The change was abandoned")
                }
                if record != before {
                    transaction.set(SessionRecord.key, record.encoded())
                    if record.state == .signedOut, before.refreshToken != nil || before.accessToken != nil {
                        transaction.scrubHistory(of: SessionRecord.key)
                    }
                }
                return result
            }
        } catch {
            throw failure ?? AuthError.storage(error)
        }
    }

    /// The state of the session now.
    public func status() throws(AuthError) -> SessionStatus {
        let (record, sequence) = try record()
        let now = now
        let valid = record.state == .signedIn && (record.expiresAt ?? 0) - leeway > now
        return SessionStatus(
            isSignedIn: record.state == .signedIn, expiresAt: record.expiresAt.map(Date.init(milliseconds:)),
            reason: record.state == .signedOut ? record.reason : nil, sequence: sequence, hasValidToken: valid,
            refresh: record.refreshing.map { RefreshInProgress(origin: $0.origin, pid: $0.pid, since: Date(milliseconds: $0.startedAt)) })
    }

    // MARK: Signing in and out

    /// Signs in with the password grant and shares the tokens with every process.
    public func signIn(username: String, password: String) async throws(AuthError) {
        let client = try requireClient()
        let response = try await client.password(username: username, password: password)
        try install(response, kind: .signedIn)
    }

    /// Signs the session in with tokens obtained elsewhere (an authorization-code flow, say).
    public func adopt(accessToken: String, refreshToken: String?, expiresIn: Int?) throws(AuthError) {
        try install(TokenResponse(accessToken: accessToken, tokenType: "Bearer", refreshToken: refreshToken, expiresIn: expiresIn), kind: .signedIn)
    }

    private func install(_ response: TokenResponse, kind: SessionRecord.EventKind) throws(AuthError) {
        let policy = options.policy
        let now = now
        try change { record throws(AuthError) in
            try record.install(response, now: now, origin: origin, kind: kind)
            record.idleTimeout = Self.bounded(policy.idleTimeout)
            record.absoluteTimeout = Self.bounded(policy.absoluteTimeout)
            record.warningLead = Self.bounded(policy.warningLead)
        }
        options.logger.info("Signed in", metadata: ["origin": "\(origin)"])
    }

    /// Signs every process out. With a revocation endpoint, the refresh token is revoked too.
    public func signOut(reason: SignOutReason = .userLogout) async throws(AuthError) {
        let refreshToken: String? = try change { record in
            guard record.state == .signedIn else { return nil }
            let token = record.refreshToken
            record.signOut(reason: reason, origin: origin)
            return token
        }
        if let refreshToken, let client {
            do {
                try await client.revoke(token: refreshToken)
            } catch {
                options.logger.warning("Revoking the refresh token failed", metadata: ["error": "\(error)"])
            }
        }
    }

    /// Counts as user activity for the idle timeout, in every process. Writes are throttled:
    /// at most one every tenth of the idle timeout (between 1 and 30 seconds).
    public func recordActivity() throws(AuthError) {
        let now = now
        let (current, _) = try record()
        let trusted = trusted(current, now: now)
        guard trusted.state == .signedIn, let idle = trusted.idleTimeout else { return }
        let throttle = min(max(idle / 10, 1000), 30000)
        guard now - (trusted.lastActivity ?? 0) >= throttle else { return }
        try change { record in
            guard record.state == .signedIn else { return }
            // A last activity that a wrong clock put in the future is replaced, not kept.
            record.lastActivity = max(self.trusted(record, now: now).lastActivity ?? 0, now)
        }
    }

    // MARK: Tokens

    /// A valid access token, refreshed first when it expires within the leeway.
    ///
    /// Throws ``AuthError/Code/signedOut`` when there is no session, ``AuthError/Code/refreshFailed``
    /// when the refresh token was refused (the session then ended everywhere), and
    /// ``AuthError/Code/network`` for transient failures.
    public func accessToken() async throws(AuthError) -> AccessToken {
        try await accessToken(within: options.leeway)
    }

    func accessToken(within margin: Duration) async throws(AuthError) -> AccessToken {
        let margin = Self.bounded(margin) ?? 0
        while true {
            let (record, _) = try record()
            try await enforcePolicy(record)
            guard record.state == .signedIn, let token = record.accessToken else {
                throw AuthError(code: .signedOut, message: "There is no session\(record.reason.map { " (ended: \($0.rawValue))" } ?? "")", reason: record.reason)
            }
            if let expiresAt = record.expiresAt, expiresAt - margin > now {
                return AccessToken(value: token, expiresAt: Date(milliseconds: expiresAt), refreshedHere: false)
            }
            if record.expiresAt == nil {
                return AccessToken(value: token, expiresAt: .distantFuture, refreshedHere: false)
            }
            if let result = try await refresh(generation: record.generation, margin: margin) { return result }
        }
    }

    /// One refresh attempt for `generation`, shared by every caller in this process.
    /// Returns nil when another process refreshed (the caller reads the new record).
    /// `margin`: the token is refreshed when it expires within this long (the leeway, or more
    /// for a proactive refresh).
    private func refresh(generation: Int, margin: Int64) async throws(AuthError) -> AccessToken? {
        let task = inFlight.withLock { current in
            if let current, current.generation == generation { return current.task }
            let task = Task { await self.electAndRefresh(generation: generation, margin: margin) }
            current = (generation, task)
            return task
        }
        let result = await task.value
        inFlight.withLock { current in
            if current?.generation == generation { current = nil }
        }
        switch result {
        case let .success(token): return token.value.isEmpty ? nil : token
        case let .failure(error): throw error
        }
    }

    /// Takes the refresh lock, or waits for whoever has it to publish an outcome.
    private func electAndRefresh(generation: Int, margin: Int64) async -> Result<AccessToken, AuthError> {
        let lock: any SessionLock
        do { lock = try storage.lock(named: "refresh") } catch { return .failure(.storage(error)) }
        // Subscribe before looking, so that an outcome published meanwhile is not missed.
        let changes = storage.events(includingOwnChanges: true)
        var hold: (any SessionLockHold)?
        do {
            hold = try lock.tryAcquire()
        } catch {
            return .failure(.storage(error))
        }
        if hold == nil {
            hold = await waitForOutcomeOrLock(lock, generation: generation, changes: changes)
            guard hold != nil else { return .success(AccessToken(value: "", expiresAt: .distantPast, refreshedHere: false)) }
        }
        defer { hold?.release() }
        do throws(AuthError) {
            return .success(try await refreshHoldingLock(generation: generation, margin: margin))
        } catch {
            return .failure(error)
        }
    }

    /// Returns the lock when it was acquired first, or nil when the record moved on.
    private func waitForOutcomeOrLock(_ lock: any SessionLock, generation: Int, changes: AsyncStream<StorageEvent>) async -> (any SessionLockHold)? {
        await withTaskGroup(of: (any SessionLockHold)?.self) { group in
            group.addTask {
                try? await lock.acquire()
            }
            group.addTask {
                for await event in changes where event.key == SessionRecord.key || event.key == nil {
                    let record = SessionRecord.decode(event.newValue) ?? SessionRecord()
                    if record.generation != generation || record.state != .signedIn || record.backoffUntil != nil {
                        return nil
                    }
                }
                return nil
            }
            let first = await group.next() ?? nil
            group.cancelAll()
            // A lock taken after cancellation is released by the lock's waiter.
            for await late in group { late?.release() }
            return first
        }
    }

    private func refreshHoldingLock(generation: Int, margin: Int64) async throws(AuthError) -> AccessToken {
        let client = try requireClient()
        let now = now
        enum Plan { case done, refresh(String), interrupted(SessionRecord.Refreshing), backoff(Int64) }
        let plan: Plan = try change { record in
            guard record.state == .signedIn, record.generation == generation else { return .done }
            if let expiresAt = record.expiresAt, expiresAt - margin > now { return .done }
            if let refreshing = record.refreshing { return .interrupted(refreshing) }
            if let until = trusted(record, now: now).backoffUntil, until > now { return .backoff(until) }
            guard let token = record.refreshToken else { return .done }
            record.refreshing = .init(generation: generation, pid: getpid(), origin: origin, startedAt: now)
            return .refresh(token)
        }
        switch plan {
        case .done:
            return AccessToken(value: "", expiresAt: .distantPast, refreshedHere: false)
        case let .backoff(until):
            throw AuthError(code: .network, message: "The last refresh failed; retrying after \(Date(milliseconds: until)) (backoff shared by all processes)")
        case let .interrupted(refreshing):
            try change { record in
                if record.state == .signedIn, record.generation == generation { record.signOut(reason: .refreshFailed, origin: origin) }
            }
            options.logger.warning("A refresh was interrupted; signing out", metadata: ["pid": "\(refreshing.pid)", "origin": "\(refreshing.origin)"])
            throw AuthError(
                code: .refreshFailed,
                message: "A refresh by \(refreshing.origin) (pid \(refreshing.pid)) was interrupted; its refresh token may have been rotated already and is not presented again, so the session ended",
                reason: .refreshFailed)
        case let .refresh(refreshToken):
            let outcome = await present(refreshToken, with: client)
            switch outcome {
            case let .success(response):
                return try installRefreshed(response, generation: generation, client: client)
            case let .failure(error) where error.code == .network:
                // Certainly not acted on (not sent, or 408 / 429 / 5xx): the token stays, everyone backs off.
                try change { record in
                    guard record.generation == generation else { return }
                    record.refreshing = nil
                    record.failures = min(record.failures + 1, 1000)
                    let delay = min(Int64(1000) << Int64(min(record.failures - 1, 5)), Self.maximumBackoff)
                    record.backoffUntil = self.now + delay
                }
                throw error
            case let .failure(error) where error.code == .storage:
                // The marker `refreshing` stays: whoever comes next ends the session rather than
                // present a refresh token that the server may have rotated.
                throw error
            case let .failure(error):
                // Refused, unanswered, or an answer that is not a token response: final for this token.
                let ended: Bool = try change { record in
                    guard record.state == .signedIn, record.generation == generation else { return false }
                    record.signOut(reason: .refreshFailed, origin: origin)
                    return true
                }
                // Refused because the session ended (or began anew) meanwhile, for example a
                // sign-out elsewhere revoked this refresh token: not a failure of the session.
                guard ended else { throw AuthError(code: .signedOut, message: "The session ended during the refresh", reason: nil) }
                let why = error.code == .unanswered
                    ? "\(error.message). The refresh token may have been rotated, so it is not presented again and the session ended"
                    : error.code == .refreshFailed ? error.message : "\(error.message); the refresh token is not presented again and the session ended"
                options.logger.warning("A refresh failed for good; signing out", metadata: ["code": "\(error.code)", "status": "\(error.httpStatus.map(String.init) ?? "none")"])
                throw AuthError(code: .refreshFailed, message: why, oauthError: error.oauthError, reason: .refreshFailed, httpStatus: error.httpStatus)
            }
        }
    }

    /// Presents `refreshToken` at the token endpoint: once, or, when the answer never came and
    /// ``Options/reuseGracePeriod`` is set, once more if the first try began within it.
    private func present(_ refreshToken: String, with client: OAuthClient) async -> Result<TokenResponse, AuthError> {
        let started = ContinuousClock.now
        var outcome: Result<TokenResponse, AuthError>
        do { outcome = .success(try await client.refresh(refreshToken: refreshToken)) } catch { outcome = .failure(error) }
        if case let .failure(error) = outcome, error.code == .unanswered,
           let grace = options.reuseGracePeriod, ContinuousClock.now - started < grace {
            options.logger.warning("A refresh got no answer; trying once more within the server's reuse grace period")
            do { outcome = .success(try await client.refresh(refreshToken: refreshToken)) } catch { outcome = .failure(error) }
        }
        return outcome
    }

    private func installRefreshed(_ response: TokenResponse, generation: Int, client: OAuthClient) throws(AuthError) -> AccessToken {
        let now = now
        var outOfRange: AuthError?
        let installed: Int64?? = try change { record in
            guard record.state == .signedIn, record.generation == generation else { return nil }
            do throws(AuthError) {
                try record.install(response, now: now, origin: origin, kind: .refreshed)
            } catch {
                // The server rotated the token but its answer does not fit: the session ends.
                outOfRange = error
                record.signOut(reason: .refreshFailed, origin: origin)
                return nil
            }
            return .some(record.expiresAt)
        }
        if let outOfRange {
            throw AuthError(code: .refreshFailed, message: "\(outOfRange.message); the session ended", reason: .refreshFailed)
        }
        guard let installed else {
            // Signed out meanwhile: the new refresh token must not outlive the session.
            if let newRefresh = response.refreshToken { Task { try? await client.revoke(token: newRefresh) } }
            throw AuthError(code: .signedOut, message: "The session ended during the refresh", reason: nil)
        }
        let expiresAt = installed.map(Date.init(milliseconds:)) ?? .distantFuture
        options.logger.info("Refreshed the access token", metadata: ["origin": "\(origin)"])
        return AccessToken(value: response.accessToken, expiresAt: expiresAt, refreshedHere: true)
    }

    private func requireClient() throws(AuthError) -> OAuthClient {
        guard let client else {
            throw AuthError(code: .invalidConfiguration, message: "No token endpoint is configured")
        }
        return client
    }

    // MARK: Policy

    /// The earliest forced sign-out of a signed-in record.
    /// Pass a record that ``trusted(_:now:)`` has seen, so that no time of a wrong clock counts.
    /// Saturating: no stored number can make it overflow.
    static func deadline(of record: SessionRecord) -> (at: Int64, reason: SignOutReason)? {
        guard record.state == .signedIn else { return nil }
        func sum(_ a: Int64, _ b: Int64) -> Int64 {
            let (total, overflow) = a.addingReportingOverflow(b)
            return overflow ? (b < 0 ? .min : .max) : total
        }
        var deadlines: [(Int64, SignOutReason)] = []
        if let idle = record.idleTimeout { deadlines.append((sum(record.lastActivity ?? record.startedAt ?? 0, idle), .idleTimeout)) }
        if let absolute = record.absoluteTimeout { deadlines.append((sum(record.startedAt ?? 0, absolute), .absoluteTimeout)) }
        return deadlines.min { $0.0 < $1.0 }
    }

    private func enforcePolicy(_ record: SessionRecord) async throws(AuthError) {
        let now = now
        guard let (deadline, reason) = Self.deadline(of: trusted(record, now: now)), deadline <= now else { return }
        try await expire(startedAt: record.startedAt, reason: reason)
    }

    private func expire(startedAt: Int64?, reason: SignOutReason) async throws(AuthError) {
        let now = now
        let refreshToken: String? = try change { record in
            guard record.state == .signedIn, record.startedAt == startedAt,
                  let (deadline, _) = Self.deadline(of: trusted(record, now: now)), deadline <= now
            else { return nil }
            let token = record.refreshToken
            record.signOut(reason: reason, origin: origin)
            return token
        }
        if let refreshToken, let client { try? await client.revoke(token: refreshToken) }
    }

    /// Watches the session: signs out at the policy's deadlines (in whichever process gets
    /// there first), announces `expiring` ahead of them in every process, and refreshes
    /// proactively when configured. Returns when the task is cancelled.
    ///
    /// Between deadlines it sleeps: it wakes for a change of the session (in any process), for
    /// the next deadline of its own (a notice, a sign-out, a proactive refresh, the end of a
    /// shared backoff), or for cancellation, and for nothing else. Without a deadline (signed
    /// out, or signed in with no policy and no proactive refresh) it never wakes on its own.
    /// Deadlines are wall-clock times; a wait for one lasts at most ``maximumRunSleep`` (five
    /// minutes), so that a wall clock set forward meanwhile is noticed within that time.
    public func run() async {
        let (wakes, wake) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        let changes = storage.events(includingOwnChanges: true)
        let forwarder = Task {
            for await _ in changes { wake.yield() }
        }
        defer { forwarder.cancel() }
        var warned: Set<Int64> = []
        var failures = 0
        var retryAfter: Int64?
        var iterator = wakes.makeAsyncIterator()
        while !Task.isCancelled {
            runTurns.add(1, ordering: .relaxed)
            var wakeAt: Int64?
            func wakeUp(at time: Int64) { wakeAt = min(wakeAt ?? time, time) }
            let now = now
            if let (stored, _) = try? record(), stored.state == .signedIn {
                let record = trusted(stored, now: now)
                if let (deadline, reason) = Self.deadline(of: record) {
                    if deadline <= now {
                        // The notice always comes first, even when this process woke up late.
                        if warned.insert(deadline).inserted { broadcast(.expiring(in: .zero, reason: reason)) }
                        try? await expire(startedAt: stored.startedAt, reason: reason)
                        continue
                    }
                    let span = reason == .idleTimeout ? record.idleTimeout ?? 0 : record.absoluteTimeout ?? 0
                    let lead = record.warningLead ?? min(span / 5, 60000)
                    if now >= deadline - lead {
                        if warned.insert(deadline).inserted {
                            broadcast(.expiring(in: .milliseconds(deadline - now), reason: reason))
                        }
                    } else {
                        wakeUp(at: deadline - lead)
                    }
                    wakeUp(at: deadline)
                }
                if let proactive = options.proactiveRefresh, let expiresAt = record.expiresAt {
                    // Not before a shared backoff or this process's own retry delay has passed.
                    let due = max(expiresAt - leeway - (Self.bounded(proactive) ?? 0), record.backoffUntil ?? .min, retryAfter ?? .min)
                    if due <= now {
                        do {
                            _ = try await accessToken(within: .milliseconds(leeway + (Self.bounded(proactive) ?? 0)))
                            failures = 0
                            retryAfter = nil
                        } catch {
                            broadcast(.problem(error))
                            // Whatever failed, the next attempt waits: 1 s, doubling up to 5 minutes.
                            failures += 1
                            retryAfter = self.now + min(Int64(1000) << Int64(min(failures - 1, 9)), Self.maximumRunSleep.milliseconds)
                        }
                        continue
                    }
                    wakeUp(at: due)
                }
            }
            var timer: Task<Void, Never>?
            if let wakeAt {
                let delay = min(max(wakeAt - self.now, 1), Self.maximumRunSleep.milliseconds)
                timer = Task {
                    // A cancelled timer must not wake the loop: only a sleep that ran out does.
                    do { try await Task.sleep(for: .milliseconds(delay)) } catch { return }
                    wake.yield()
                }
            }
            // The stream ends only when this task is cancelled.
            let woken = await iterator.next() != nil
            timer?.cancel()
            if !woken { break }
        }
    }

    /// The longest ``run()`` sleeps while a deadline lies ahead.
    static let maximumRunSleep: Duration = .seconds(300)

    // MARK: Events

    /// Session events, from now on: sign-in, refresh, sign-out (with reason) whichever process
    /// caused them, this one included; `expiring` notices while ``run()`` runs in this process.
    public func events() -> AsyncStream<SessionEvent> {
        let notifications = storage.notifications(includingOwnChanges: true)
        return AsyncStream { continuation in
            let id = noticeIDs.add(1, ordering: .relaxed).newValue
            notices.withLock { $0[id] = continuation }
            let task = Task {
                for await notification in notifications {
                    switch notification {
                    case let .change(event):
                        if let sessionEvent = Self.sessionEvent(from: event) { continuation.yield(sessionEvent) }
                    case let .problem(error):
                        continuation.yield(.problem(.storage(error)))
                    case .detectionChanged:
                        break
                    }
                }
                continuation.finish()
            }
            continuation.onTermination = { [weak self] _ in
                task.cancel()
                _ = self?.notices.withLock { $0.removeValue(forKey: id) }
            }
        }
    }

    private func broadcast(_ event: SessionEvent) {
        for continuation in notices.withLock({ Array($0.values) }) { continuation.yield(event) }
    }

    static func sessionEvent(from event: StorageEvent) -> SessionEvent? {
        guard event.key == SessionRecord.key, let text = event.newValue else { return nil }
        let record: SessionRecord
        switch SessionRecord.decodeChecked(text) {
        case let .success(decoded): record = decoded
        case let .failure(error): return .problem(error)
        }
        let old = SessionRecord.decode(event.oldValue)
        guard record.eventSerial != old?.eventSerial, let kind = record.event else { return nil }
        let origin = record.eventOrigin ?? event.origin
        switch kind {
        case .signedIn: return .signedIn(origin: origin, sequence: event.sequence)
        case .refreshed: return .refreshed(origin: origin, sequence: event.sequence)
        case .signedOut: return .signedOut(reason: record.reason ?? .userLogout, origin: origin, sequence: event.sequence)
        }
    }
}
