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
        /// How long a process waits for another's refresh before it gives up with
        /// ``AuthError/Code/refreshTimeout``. By default the client's HTTP timeout (twice that with
        /// a reuse grace period, which allows a second try) plus 5 seconds: 20 s with the default
        /// 15 s timeout. A waiting process never takes over a refresh that may still be under way.
        public var refreshWaitTimeout: Duration?
        /// The options of the storage that ``AuthSession/init(directory:origin:client:options:)``
        /// opens. Its logger, when left silent, is this session's ``logger``.
        public var storage = SharedStorage.Options()
        public var logger = Logger(label: "TabSyncAuth", factory: { _ in SwiftLogNoOpLogHandler() })
        public init() {}
    }

    public let storage: SharedStorage
    public let client: OAuthClient?
    let options: Options
    private let inFlight = Mutex<(generation: Int, outcome: SharedOutcome<Attempt>)?>(nil)
    private let refreshLockCache = Mutex<(any SessionLock)?>(nil)
    private let notices = Mutex<[UInt64: AsyncStream<SessionEvent>.Continuation]>([:])
    private let noticeIDs = Atomic<UInt64>(0)
    private let clockGuard = ClockGuard()
    /// How often ``run()``'s loop has looked at the session, for tests of its idleness.
    let runTurns = Atomic<Int>(0)

    /// Joins the session in `directory` (storage `session`), creating it when missing.
    public convenience init(directory: String, origin: String, client: OAuthClient?, options: Options = Options()) throws(AuthError) {
        do {
            var storageOptions = options.storage
            if storageOptions.logger.handler is SwiftLogNoOpLogHandler { storageOptions.logger = options.logger }
            let storage = try SharedStorage(directory: directory, name: "session", origin: origin, options: storageOptions)
            self.init(storage: storage, client: client, options: options)
        } catch {
            throw AuthError.storage(error)
        }
    }

    public init(storage: SharedStorage, client: OAuthClient?, options: Options = Options()) {
        self.storage = storage
        self.client = client
        self.options = options
        if client != nil { _ = Self.waitsPrepared }
    }

    /// The refresh wait's machinery, run once in the process at background priority when the
    /// first session with a token endpoint is made.
    ///
    /// The Swift runtime builds a generic type's metadata at its first use, and checking its
    /// generic requirements then scans every protocol conformance in the process (about 8,000 in
    /// `tab`). In a refresh storm every process reaches its first wait at the same moment, and
    /// this was half of a waiting process's CPU in its async code (`perf` of storms of fresh
    /// `tab` processes): the continuations of ``SharedOutcome`` and ``Wakeup``, their states,
    /// the attempt's task. Running the same code once, on values that wait for nothing, builds
    /// them off the critical path, whenever the first storm comes.
    private static let waitsPrepared: Void = {
        Task.detached(priority: .background) {
            let outcome = SharedOutcome<Attempt>()
            Task.immediate { outcome.finish(.movedOn(nil)) }
            _ = try? await outcome.value()
            let wakeup = Wakeup()
            _ = await wakeup.wait(for: .milliseconds(1))
            wakeup.signal()
            _ = await wakeup.wait(for: .zero)
        }
    }()

    var origin: String { storage.origin }

    /// The session's decisions (``SessionMachine``), with this process's options.
    var machine: SessionMachine { SessionMachine(leeway: leeway, proactiveRefresh: Self.bounded(options.proactiveRefresh)) }

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
    /// A change that replaces or removes a token scrubs the record's history (see `apply`).
    @discardableResult
    private func change<Result>(_ body: (inout SessionRecord) throws(AuthError) -> Result) throws(AuthError) -> Result {
        var failure: AuthError?
        do throws(TabSyncError) {
            return try storage.transaction { transaction throws(TabSyncError) in
                do throws(AuthError) {
                    return try Self.apply(body, in: &transaction)
                } catch {
                    failure = error
                    throw Self.abandoned
                }
            }
        } catch {
            throw failure ?? AuthError.storage(error)
        }
    }

    /// ``change(_:)`` for async callers: the commit never blocks a Swift concurrency thread
    /// (SharedStorage's async `transaction`), and `body` runs on one of TabSync's threads (on
    /// tmpfs, where the file work cannot block, on the calling one).
    @discardableResult
    private func change<Result: Sendable>(
        _ body: @escaping @Sendable (inout SessionRecord) throws(AuthError) -> Result
    ) async throws(AuthError) -> Result {
        let failure = Mutex<AuthError?>(nil)
        do {
            return try await storage.transaction { transaction throws(TabSyncError) in
                do throws(AuthError) {
                    return try Self.apply(body, in: &transaction)
                } catch {
                    failure.withLock { $0 = error }
                    throw Self.abandoned
                }
            }
        } catch let error as TabSyncError {
            throw failure.withLock { $0 } ?? AuthError.storage(error)
        } catch {
            throw AuthError(code: .cancelled, message: "The change was cancelled before it was committed")
        }
    }

    /// Runs `body` on the record in `transaction` and writes it back when it changed; a change
    /// that replaces or removes a token (a refresh, a rotation, a sign-out) scrubs the record's
    /// history, so that the token it replaced survives in no file.
    private static func apply<Result>(
        _ body: (inout SessionRecord) throws(AuthError) -> Result, in transaction: inout SharedStorage.Transaction
    ) throws(AuthError) -> Result {
        var record = SessionRecord.decode(transaction.values[SessionRecord.key]) ?? SessionRecord()
        let before = record
        let result = try body(&record)
        guard record != before else { return result }
        transaction.set(SessionRecord.key, record.encoded())
        let replaced = { (old: String?, new: String?) in old != nil && old != new }
        if replaced(before.refreshToken, record.refreshToken) || replaced(before.accessToken, record.accessToken) {
            transaction.scrubHistory(of: SessionRecord.key)
        }
        return result
    }

    /// Runs `operation` to its end whether or not the calling task is cancelled.
    private static func uncancelled<Result: Sendable>(
        _ operation: @escaping @Sendable () async throws(AuthError) -> Result
    ) async throws(AuthError) -> Result {
        let task = Task { () async -> Swift.Result<Result, AuthError> in
            do throws(AuthError) {
                return .success(try await operation())
            } catch {
                return .failure(error)
            }
        }
        return try await task.value.get()
    }

    /// What aborts the storage transaction when the change's body throws.
    private static let abandoned = TabSyncError(code: .invalidArgument, path: nil, message: "The change was abandoned")

    /// The state of the session now.
    public func status() throws(AuthError) -> SessionStatus {
        let (record, sequence) = try record()
        let now = now
        let valid = record.state == .signedIn && (record.expiresAt ?? 0) - SessionMachine.margin(leeway, lifetime: record.lifetime) > now
        return SessionStatus(
            isSignedIn: record.state == .signedIn, expiresAt: record.expiresAt.map(Date.init(milliseconds:)),
            reason: record.state == .signedOut ? record.reason : nil, sequence: sequence, hasValidToken: valid,
            refresh: record.refreshing.map(RefreshInProgress.init))
    }

    // MARK: Signing in and out

    /// Signs in with the password grant and shares the tokens with every process.
    public func signIn(username: String, password: String) async throws(AuthError) {
        let client = try requireClient()
        let response = try await client.password(username: username, password: password)
        try await install(response, kind: .signedIn)
    }

    /// Signs the session in with tokens obtained elsewhere (an authorization-code flow, say).
    public func adopt(accessToken: String, refreshToken: String?, expiresIn: Int?) throws(AuthError) {
        try install(TokenResponse(accessToken: accessToken, tokenType: "Bearer", refreshToken: refreshToken, expiresIn: expiresIn), kind: .signedIn)
    }

    private func install(_ response: TokenResponse, kind: SessionRecord.EventKind) throws(AuthError) {
        try change(installing(response, kind: kind))
        options.logger.info("Signed in", metadata: ["origin": "\(origin)"])
    }

    private func install(_ response: TokenResponse, kind: SessionRecord.EventKind) async throws(AuthError) {
        try await change(installing(response, kind: kind))
        options.logger.info("Signed in", metadata: ["origin": "\(origin)"])
    }

    /// The change that installs `response` with this process's policy.
    private func installing(_ response: TokenResponse, kind: SessionRecord.EventKind) -> @Sendable (inout SessionRecord) throws(AuthError) -> Void {
        let policy = options.policy
        let (now, origin) = (now, origin)
        if let lifetime = response.expiresIn, lifetime >= 0, Int64(lifetime) <= leeway / 1000 {
            options.logger.warning(
                "The leeway is not shorter than the access token's lifetime; tokens are refreshed at half their lifetime instead",
                metadata: ["leewaySeconds": "\(leeway / 1000)", "lifetimeSeconds": "\(lifetime)"])
        }
        return { record throws(AuthError) in
            try record.install(response, now: now, origin: origin, kind: kind)
            record.idleTimeout = Self.bounded(policy.idleTimeout)
            record.absoluteTimeout = Self.bounded(policy.absoluteTimeout)
            record.warningLead = Self.bounded(policy.warningLead)
        }
    }

    /// Signs every process out. With a revocation endpoint, the refresh token is revoked too.
    public func signOut(reason: SignOutReason = .userLogout) async throws(AuthError) {
        let origin = origin
        let refreshToken: String? = try await change { record in
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
    /// Throws an ``AuthError``: ``AuthError/Code/signedOut`` when there is no session,
    /// ``AuthError/Code/refreshFailed`` when the refresh token is finished (the session then ended
    /// everywhere), ``AuthError/Code/network`` for transient failures, and
    /// ``AuthError/Code/refreshTimeout`` when another process's refresh took longer than
    /// ``Options/refreshWaitTimeout``. Throws `CancellationError` within milliseconds when the
    /// calling task is cancelled; a refresh it shared with other callers goes on for them.
    public func accessToken() async throws -> AccessToken {
        try await accessToken(within: leeway)
    }

    /// `margin`: the token is refreshed when it expires within this long (milliseconds).
    func accessToken(within margin: Int64) async throws -> AccessToken {
        // The record a waiter was handed with the outcome it waited for saves it one read.
        var handed: SessionRecord?
        while true {
            try Task.checkCancellation()
            let stored = try handed ?? record().0
            handed = nil
            let now = now
            switch machine.tokenStep(trusted(stored, now: now), now: now, margin: margin) {
            case let .use(token, expiresAt):
                return AccessToken(value: token, expiresAt: expiresAt.map(Date.init(milliseconds:)) ?? .distantFuture, refreshedHere: false)
            case let .signedOut(reason):
                throw AuthError(code: .signedOut, message: "There is no session\(reason.map { " (ended: \($0.rawValue))" } ?? "")", reason: reason)
            case let .expire(_, reason):
                // The stored start, not the clamped one: it names the session to end.
                try await expire(startedAt: stored.startedAt, reason: reason)
            case .expiredWithoutRefreshToken:
                throw AuthError(
                    code: .signedOut,
                    message: "The access token has expired and the session has no refresh token to renew it with; sign in again")
            case let .refresh(generation):
                switch try await refresh(generation: generation, margin: margin) {
                case let .refreshedHere(token): return token
                case let .movedOn(record): handed = record
                case let .failed(error): throw error
                }
            }
        }
    }

    /// How a refresh attempt ended for its callers.
    enum Attempt: Sendable {
        /// This process refreshed: here is the token.
        case refreshedHere(AccessToken)
        /// Someone else refreshed, or the session moved on: look again (at this record, when the
        /// outcome came with one).
        case movedOn(SessionRecord?)
        /// The refresh failed, or the wait for another process's hit its bound.
        case failed(AuthError)
    }

    /// One refresh attempt for `generation`, shared by every caller in this process. A cancelled
    /// caller stops waiting at once; the attempt goes on for the others.
    func refresh(generation: Int, margin: Int64) async throws -> Attempt {
        let (outcome, starts) = inFlight.withLock { current -> (SharedOutcome<Attempt>, Bool) in
            if let current, current.generation == generation { return (current.outcome, false) }
            let outcome = SharedOutcome<Attempt>()
            current = (generation, outcome)
            return (outcome, true)
        }
        if starts {
            // Its own task, so that it goes on when this caller is cancelled; started on this
            // thread up to its first wait (`Task.immediate`), not handed to another: in a storm
            // every process's two cores are busy, and a hop between threads is a context switch.
            Task.immediate {
                let result = await self.electAndRefresh(generation: generation, margin: margin)
                // Done: the next caller starts a new attempt, even when every waiter was cancelled.
                self.inFlight.withLock { current in
                    if current?.outcome === outcome { current = nil }
                }
                outcome.finish(result)
            }
        }
        return try await outcome.value()
    }

    /// The longest a process waits for another's refresh before ``AuthError/Code/refreshTimeout``.
    var refreshWaitLimit: Duration {
        if let limit = options.refreshWaitTimeout { return min(max(limit, .zero), SessionLimits.maximumDuration) }
        let http = client?.configuration.timeout ?? .seconds(15)
        return http * (options.reuseGracePeriod == nil ? 1 : 2) + .seconds(5)
    }

    /// Takes the refresh lock, or waits (bounded) for whoever has it to publish an outcome.
    private func electAndRefresh(generation: Int, margin: Int64) async -> Attempt {
        let lock: any SessionLock
        do { lock = try refreshLock() } catch { return .failed(.storage(error)) }
        // Subscribe before looking, so that an outcome published meanwhile is not missed. The
        // watcher thread looks at each change of the record and wakes this task only for one
        // that moved the session on: the refresher's own marker does not wake the waiters.
        let outcome = Wakeup()
        let subscription = storage.onNotification(includingOwnChanges: true) { notification in
            guard case let .change(event) = notification, Self.concernsRecord(event),
                  self.movedOn(SessionRecord.decode(event.newValue) ?? SessionRecord(), from: generation) else { return }
            outcome.signal()
        }
        defer { subscription.cancel() }
        var hold: (any SessionLockHold)?
        do {
            hold = try lock.tryAcquire()
        } catch {
            return .failed(.storage(error))
        }
        if hold == nil {
            switch await waitForOutcomeOrLock(lock, generation: generation, outcome: outcome) {
            case let .locked(taken): hold = taken
            case let .movedOn(record): return .movedOn(record)
            case .timedOut: return .failed(refreshTimeout())
            }
        }
        defer { hold?.release() }
        // The outcome may have been published just before the lock came free.
        if let (record, _) = try? record(), record.generation != generation || record.state != .signedIn { return .movedOn(record) }
        do {
            return try await refreshHoldingLock(generation: generation, margin: margin)
        } catch {
            return .failed(error)
        }
    }

    private enum Wait: Sendable {
        case locked(any SessionLockHold)
        case movedOn(SessionRecord)
        case timedOut
    }

    /// The lock (its holder is gone, or finished without publishing), the record moving on, or
    /// the bound, whichever comes first. One loop in the attempt's task: the watcher thread's
    /// signal or a tenth of a second ends each turn, so that a storm of waiting processes costs
    /// no task, stream or timer per change.
    private func waitForOutcomeOrLock(_ lock: any SessionLock, generation: Int, outcome: Wakeup) async -> Wait {
        let deadline = ContinuousClock.now + refreshWaitLimit
        // The outcome normally comes as a storage event; the lock matters only when its holder
        // died without one, so it is looked at ten times a second, not raced for.
        var nextLook = ContinuousClock.now + .milliseconds(100)
        // The record is looked at after each signal, and once before the first wait: an outcome
        // published after the caller last looked, but before this attempt subscribed, came with
        // no signal. (The view is updated before the storage's subscribers are called, so a
        // later one signals.)
        var look = true
        while true {
            // This process's view may lag behind the store (a busy watcher, a loaded machine),
            // and then an event is an old change: one of an earlier refresh would hand over an
            // outdated token. The stored record decides.
            if look, let (latest, _) = try? record(), movedOn(latest, from: generation) { return .movedOn(latest) }
            let now = ContinuousClock.now
            if now >= deadline { return .timedOut }
            if now >= nextLook {
                if let hold = try? lock.tryAcquire() { return .locked(hold) }
                nextLook = now + .milliseconds(100)
            }
            look = await outcome.wait(for: min(nextLook, deadline) - now)
        }
    }

    /// The refresh lock, made once: it keeps its descriptor between attempts.
    private func refreshLock() throws(TabSyncError) -> any SessionLock {
        try refreshLockCache.withLock { cached throws(TabSyncError) in
            if let cached { return cached }
            let lock = try storage.lock(named: "refresh")
            cached = lock
            return lock
        }
    }

    /// Whether the session moved on from a refresh of `generation`: a new token, a sign-out, or
    /// a shared backoff that tells this process not to try now.
    private func movedOn(_ record: SessionRecord, from generation: Int) -> Bool {
        record.generation != generation || record.state != .signedIn || (record.backoffUntil ?? .min) > now
    }

    /// The error for a wait that hit its bound, naming the refresher as the record shows it.
    private func refreshTimeout() -> AuthError {
        let refresher = (try? record())?.0.refreshing.map(RefreshInProgress.init)
        let who = refresher.map { "\($0.origin) (pid \($0.pid), \($0.processState.rawValue), refreshing since \($0.since))" }
            ?? "another process (it holds the refresh lock but has not marked a refresh)"
        return AuthError(
            code: .refreshTimeout,
            message: "Waited \(refreshWaitLimit) for the refresh by \(who); it is not taken over while it may still be presenting the refresh token",
            refresher: refresher)
    }

    private func refreshHoldingLock(generation: Int, margin: Int64) async throws(AuthError) -> Attempt {
        let client = try requireClient()
        let now = now
        let pid = getpid()
        let (machine, origin) = (machine, origin)
        let plan: SessionMachine.RefreshPlan = try await change { record in
            var trusted = self.trusted(record, now: now)
            let plan = machine.plan(&trusted, generation: generation, margin: margin, now: now, pid: pid, origin: origin)
            if trusted != self.trusted(record, now: now) { record = trusted }
            return plan
        }
        switch plan {
        case .notNeeded:
            return .movedOn(nil)
        case let .backingOff(until):
            throw AuthError(code: .network, message: "The last refresh failed; retrying after \(Date(milliseconds: until)) (backoff shared by all processes)")
        case let .interrupted(refreshing):
            options.logger.warning("A refresh was interrupted; signing out", metadata: ["pid": "\(refreshing.pid)", "origin": "\(refreshing.origin)"])
            throw AuthError(
                code: .refreshFailed,
                message: "A refresh by \(refreshing.origin) (pid \(refreshing.pid)) was interrupted; its refresh token may have been rotated already and is not presented again, so the session ended",
                reason: .refreshFailed)
        case let .present(refreshToken):
            let outcome = await present(refreshToken, with: client)
            let result: SessionMachine.RefreshResult
            do throws(AuthError) {
                // Committed even if this task is cancelled meanwhile: the server may have rotated
                // the refresh token, and the new one must not be lost.
                result = try await Self.uncancelled { () async throws(AuthError) -> SessionMachine.RefreshResult in
                    try await self.change { record in machine.apply(outcome, to: &record, generation: generation, now: self.now, origin: origin) }
                }
            } catch {
                // The marker `refreshing` stays: whoever comes next ends the session rather than
                // present a refresh token that the server may have rotated.
                throw error
            }
            switch result {
            case let .installed(expiresAt):
                guard case let .success(response) = outcome else { return .movedOn(nil) }
                options.logger.info("Refreshed the access token", metadata: ["origin": "\(origin)"])
                return .refreshedHere(AccessToken(value: response.accessToken, expiresAt: expiresAt.map(Date.init(milliseconds:)) ?? .distantFuture, refreshedHere: true))
            case .sessionEnded:
                // Signed out meanwhile: the new refresh token must not outlive the session.
                if case let .success(response) = outcome, let newRefresh = response.refreshToken {
                    Task { try? await client.revoke(token: newRefresh) }
                }
                throw AuthError(code: .signedOut, message: "The session ended during the refresh", reason: nil)
            case .backedOff:
                guard case let .failure(error) = outcome else { return .movedOn(nil) }
                throw error
            case let .finished(error):
                options.logger.warning("A refresh failed for good; signing out", metadata: ["code": "\(error.code)", "status": "\(error.httpStatus.map(String.init) ?? "none")"])
                throw error
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

    private func requireClient() throws(AuthError) -> OAuthClient {
        guard let client else {
            throw AuthError(code: .invalidConfiguration, message: "No token endpoint is configured")
        }
        return client
    }

    // MARK: Policy

    /// The earliest forced sign-out of a signed-in record (``SessionMachine/deadline(of:)``).
    static func deadline(of record: SessionRecord) -> (at: Int64, reason: SignOutReason)? {
        SessionMachine.deadline(of: record)
    }

    private func expire(startedAt: Int64?, reason: SignOutReason) async throws(AuthError) {
        let (now, origin) = (now, origin)
        let refreshToken: String? = try await change { record in
            guard record.state == .signedIn, record.startedAt == startedAt,
                  let (deadline, _) = Self.deadline(of: self.trusted(record, now: now)), deadline <= now
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
    /// Deadlines are wall-clock times; a wait for one lasts at most `maximumRunSleep` (five
    /// minutes), so that a wall clock set forward meanwhile is noticed within that time.
    public func run() async {
        let (wakes, wake) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        // Woken on the watcher thread, and only by a change of the record that may move a
        // deadline: no task of its own runs for each change of the storage, nor for a
        // refresher's marker (in a storm, every process would wake for it at once).
        let subscription = storage.onNotification(includingOwnChanges: true) { notification in
            if case let .change(event) = notification, Self.concernsRecord(event), !Self.onlyMarksARefresh(event) { wake.yield() }
        }
        defer { subscription.cancel() }
        var warned: Set<Int64> = []
        var failures = 0
        var retryAfter: Int64?
        var iterator = wakes.makeAsyncIterator()
        while !Task.isCancelled {
            runTurns.add(1, ordering: .relaxed)
            let now = now
            var wakeAt: Int64?
            if let (stored, _) = try? record() {
                let turn = machine.turn(trusted(stored, now: now), now: now, warned: warned, retryAfter: retryAfter)
                if let notice = turn.notice {
                    warned.insert(notice.deadline)
                    broadcast(.expiring(in: .milliseconds(notice.remaining), reason: notice.reason))
                }
                if let expiry = turn.expire, retryAfter.map({ $0 <= now }) ?? true {
                    // The stored start, not the clamped one: it names the session to end.
                    do {
                        try await expire(startedAt: stored.startedAt, reason: expiry.reason)
                        continue
                    } catch {
                        // The sign-out could not be committed (a closed storage, a full disk):
                        // try again later, not at once.
                        broadcast(.problem(error))
                        failures += 1
                        retryAfter = self.now + min(Int64(1000) << Int64(min(failures - 1, 9)), Self.maximumRunSleep.milliseconds)
                    }
                }
                if turn.expire != nil {
                    wakeAt = retryAfter
                } else if turn.refresh {
                    do {
                        _ = try await accessToken(within: leeway + (Self.bounded(options.proactiveRefresh) ?? 0))
                        failures = 0
                        // At most one proactive refresh a second, whatever the record says (a token
                        // that lives less than the margin would otherwise be refreshed back to back).
                        retryAfter = self.now + 1000
                    } catch is CancellationError {
                        break
                    } catch {
                        broadcast(.problem(error as? AuthError ?? AuthError(code: .server, message: "\(error)")))
                        // Whatever failed, the next attempt waits: 1 s, doubling up to 5 minutes.
                        failures += 1
                        retryAfter = self.now + min(Int64(1000) << Int64(min(failures - 1, 9)), Self.maximumRunSleep.milliseconds)
                    }
                    continue
                } else {
                    wakeAt = turn.wakeAt
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
        AsyncStream { continuation in
            let id = noticeIDs.add(1, ordering: .relaxed).newValue
            notices.withLock { $0[id] = continuation }
            // Mapped where the storage delivers (its watcher thread: decoding the record is
            // quick, and usually remembered), so that a change costs one hop, to the consumer.
            let subscription = storage.onNotification(includingOwnChanges: true, onClose: { continuation.finish() }) { notification in
                switch notification {
                case let .change(event):
                    if let sessionEvent = Self.sessionEvent(from: event) { continuation.yield(sessionEvent) }
                case let .problem(error):
                    continuation.yield(.problem(.storage(error)))
                case .detectionChanged:
                    break
                }
            }
            continuation.onTermination = { [weak self] _ in
                subscription.cancel()
                _ = self?.notices.withLock { $0.removeValue(forKey: id) }
            }
        }
    }

    /// Whether `event` may change the session: a change of the record, or a clear.
    static func concernsRecord(_ event: StorageEvent) -> Bool {
        event.key == SessionRecord.key || event.key == nil
    }

    /// Whether `event` only marks or unmarks a refresh in progress: the rest of the record, and
    /// so every deadline of ``run()``, is unchanged.
    static func onlyMarksARefresh(_ event: StorageEvent) -> Bool {
        guard event.key == SessionRecord.key, var old = SessionRecord.decode(event.oldValue),
              var new = SessionRecord.decode(event.newValue), old.refreshing != new.refreshing else { return false }
        old.refreshing = nil
        new.refreshing = nil
        return old == new
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
