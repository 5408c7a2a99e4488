/// The shared session's decisions, as pure functions of the shared record and the time.
///
/// No I/O and no clock of its own: ``AuthSession`` reads the record, asks the machine what to do,
/// carries that out (a commit, an HTTP request, a sleep) and feeds the outcome back. Every time is
/// in milliseconds since 1970, and every record it is given has been through ``ClockGuard``, so
/// the tests drive it through hours of policy in no time at all.
struct SessionMachine: Sendable {
    /// A token is refreshed when it expires within this long.
    var leeway: Int64
    /// ``run()`` refreshes this long before the leeway (nil: not proactively).
    var proactiveRefresh: Int64?

    /// The longest shared backoff after transient refresh failures.
    static let maximumBackoff = AuthSession.maximumBackoff

    // MARK: Tokens

    /// What `accessToken()` does with the record it read.
    enum TokenStep: Equatable {
        /// The token is valid beyond the margin (or has no known expiry: `expiresAt` nil).
        case use(token: String, expiresAt: Int64?)
        /// There is no session.
        case signedOut(reason: SignOutReason?)
        /// A policy deadline has passed: the session is to end first.
        case expire(startedAt: Int64?, reason: SignOutReason)
        /// The token must be refreshed; `generation` names the token set to replace.
        case refresh(generation: Int)
        /// The token has expired and there is no refresh token to renew it with.
        case expiredWithoutRefreshToken
    }

    /// A margin for a token of `lifetime`: at most half of it, so that a leeway (plus proactive
    /// margin) as long as the token lives does not make every call refresh.
    static func margin(_ margin: Int64, lifetime: Int64?) -> Int64 {
        guard let lifetime, margin >= lifetime else { return margin }
        return lifetime / 2
    }

    func tokenStep(_ record: SessionRecord, now: Int64, margin: Int64) -> TokenStep {
        let margin = Self.margin(margin, lifetime: record.lifetime)
        if let (deadline, reason) = Self.deadline(of: record), deadline <= now {
            return .expire(startedAt: record.startedAt, reason: reason)
        }
        guard record.state == .signedIn, let token = record.accessToken else { return .signedOut(reason: record.reason) }
        guard let expiresAt = record.expiresAt else { return .use(token: token, expiresAt: nil) }
        if expiresAt - margin > now { return .use(token: token, expiresAt: expiresAt) }
        // Without a refresh token there is nothing to refresh with: the token serves while it
        // lasts (a refresh attempt would find nothing to present, again and again).
        guard record.refreshToken != nil else {
            return expiresAt > now ? .use(token: token, expiresAt: expiresAt) : .expiredWithoutRefreshToken
        }
        return .refresh(generation: record.generation)
    }

    // MARK: Election

    /// What the process holding the refresh lock does, decided under the commit lock.
    enum RefreshPlan: Equatable {
        /// Nothing: another process refreshed meanwhile, or the session ended or began anew.
        case notNeeded
        /// Present this refresh token; the record now says who is refreshing.
        case present(refreshToken: String)
        /// A refresh by a process that is gone was left unfinished: its token may have been rotated
        /// at the server, so the session is signed out (in the same commit).
        case interrupted(SessionRecord.Refreshing)
        /// A shared backoff runs until then.
        case backingOff(until: Int64)
    }

    func plan(
        _ record: inout SessionRecord, generation: Int, margin: Int64, now: Int64, pid: Int32, origin: String
    ) -> RefreshPlan {
        guard record.state == .signedIn, record.generation == generation else { return .notNeeded }
        if let expiresAt = record.expiresAt, expiresAt - Self.margin(margin, lifetime: record.lifetime) > now { return .notNeeded }
        if let refreshing = record.refreshing {
            record.signOut(reason: .refreshFailed, origin: origin)
            return .interrupted(refreshing)
        }
        if let until = record.backoffUntil, until > now { return .backingOff(until: until) }
        guard let token = record.refreshToken else { return .notNeeded }
        record.refreshing = .init(generation: generation, pid: pid, origin: origin, startedAt: now)
        return .present(refreshToken: token)
    }

    /// What became of a refresh, once its outcome is in the record.
    enum RefreshResult: Equatable {
        /// The new tokens are installed everywhere.
        case installed(expiresAt: Int64?)
        /// The session ended (or began anew) during the refresh; new tokens, if any, are not kept.
        case sessionEnded
        /// A transient failure: the token stays, everyone waits until `until`.
        case backedOff(until: Int64)
        /// The refresh token is finished: the session is signed out with `refreshFailed`.
        case finished(AuthError)
    }

    /// Applies the outcome of presenting the refresh token of `generation` to the record.
    func apply(
        _ outcome: Result<TokenResponse, AuthError>, to record: inout SessionRecord, generation: Int, now: Int64, origin: String
    ) -> RefreshResult {
        guard record.state == .signedIn, record.generation == generation else { return .sessionEnded }
        switch outcome {
        case let .success(response):
            do {
                try record.install(response, now: now, origin: origin, kind: .refreshed)
                return .installed(expiresAt: record.expiresAt)
            } catch {
                // The server rotated the token but its answer does not fit: the session ends.
                record.signOut(reason: .refreshFailed, origin: origin)
                return .finished(AuthError(code: .refreshFailed, message: "\(error.message); the session ended", reason: .refreshFailed))
            }
        case let .failure(error) where error.code == .network:
            // Certainly not acted on (not sent, or 408 / 429 / 5xx).
            record.refreshing = nil
            record.failures = min(record.failures + 1, 1000)
            let until = now + Self.backoff(afterFailures: record.failures)
            record.backoffUntil = until
            return .backedOff(until: until)
        case let .failure(error):
            // Refused, unanswered, or an answer that is not a token response: final for this token.
            record.signOut(reason: .refreshFailed, origin: origin)
            let message = switch error.code {
            case .refreshFailed: error.message
            case .unanswered: "\(error.message). The refresh token may have been rotated, so it is not presented again and the session ended"
            default: "\(error.message); the refresh token is not presented again and the session ended"
            }
            return .finished(AuthError(code: .refreshFailed, message: message, oauthError: error.oauthError, reason: .refreshFailed, httpStatus: error.httpStatus))
        }
    }

    /// 1 s after the first failure, doubling, at most ``maximumBackoff``.
    static func backoff(afterFailures failures: Int) -> Int64 {
        min(Int64(1000) << Int64(min(max(failures, 1) - 1, 5)), maximumBackoff)
    }

    // MARK: Policy

    /// The earliest forced sign-out of a signed-in record. Saturating: no stored number can make
    /// it overflow.
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

    /// One turn of ``AuthSession/run()``: what to announce and do now, and when to look again.
    struct Turn: Equatable {
        /// An `expiring` notice to announce (remaining milliseconds, reason), once per deadline.
        var notice: (deadline: Int64, remaining: Int64, reason: SignOutReason)?
        /// Sign the session out now, for this reason (the notice comes first).
        var expire: (startedAt: Int64?, reason: SignOutReason)?
        /// Refresh now, proactively.
        var refresh = false
        /// When to look again if nothing changes; nil: only a change of the session wakes it.
        var wakeAt: Int64?

        static func == (a: Turn, b: Turn) -> Bool {
            a.notice?.deadline == b.notice?.deadline && a.notice?.remaining == b.notice?.remaining && a.notice?.reason == b.notice?.reason
                && a.expire?.startedAt == b.expire?.startedAt && a.expire?.reason == b.expire?.reason
                && a.refresh == b.refresh && a.wakeAt == b.wakeAt
        }
    }

    /// `warned`: the deadlines already announced; `retryAfter`: this process's own delay after a
    /// failed proactive refresh.
    func turn(_ record: SessionRecord, now: Int64, warned: Set<Int64>, retryAfter: Int64?) -> Turn {
        var turn = Turn()
        guard record.state == .signedIn else { return turn }
        func wake(at time: Int64) { turn.wakeAt = min(turn.wakeAt ?? time, time) }
        if let (deadline, reason) = Self.deadline(of: record) {
            let span = reason == .idleTimeout ? record.idleTimeout ?? 0 : record.absoluteTimeout ?? 0
            let lead = record.warningLead ?? min(span / 5, 60_000)
            if deadline <= now {
                // The notice always comes first, even when this process woke up late.
                if !warned.contains(deadline) { turn.notice = (deadline, 0, reason) }
                turn.expire = (record.startedAt, reason)
                return turn
            }
            if now >= deadline - lead {
                if !warned.contains(deadline) { turn.notice = (deadline, deadline - now, reason) }
            } else {
                wake(at: deadline - lead)
            }
            wake(at: deadline)
        }
        if let proactive = proactiveRefresh, let expiresAt = record.expiresAt, record.refreshToken != nil {
            // Not before a shared backoff or this process's own retry delay has passed.
            let due = max(expiresAt - Self.margin(leeway + proactive, lifetime: record.lifetime), record.backoffUntil ?? .min, retryAfter ?? .min)
            if due <= now { turn.refresh = true } else { wake(at: due) }
        }
        return turn
    }
}
