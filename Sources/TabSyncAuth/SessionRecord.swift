import Foundation
import TabSync
import Synchronization

/// The shared session as stored under the key `record` of the storage `session`.
/// Times are milliseconds since 1970 (wall clock). Tokens live only here, in a 0600 file.
/// Its JSON text is read and written by hand (SessionRecordCodec.swift).
struct SessionRecord: Sendable, Equatable {
    enum State: String, Sendable { case signedIn, signedOut }
    enum EventKind: String, Sendable { case signedIn, refreshed, signedOut }

    /// A refresh that a process started: if that process died, the refresh token may have been
    /// rotated at the server already, so nobody may present it again.
    struct Refreshing: Sendable, Equatable {
        var generation: Int
        var pid: Int32
        var origin: String
        var startedAt: Int64
    }

    var state: State = .signedOut
    var accessToken: String?
    var refreshToken: String?
    var expiresAt: Int64?
    /// When the current access token was received: with ``expiresAt``, its lifetime.
    var issuedAt: Int64?
    var startedAt: Int64?
    var lastActivity: Int64?
    /// The session policy, in milliseconds, set by the process that signed in.
    var idleTimeout: Int64?
    var absoluteTimeout: Int64?
    var warningLead: Int64?
    /// Incremented by every new token set.
    var generation: Int = 0
    var reason: SignOutReason?
    var refreshing: Refreshing?
    /// Transient refresh failures in a row, and until when nobody retries (shared backoff).
    var failures: Int = 0
    var backoffUntil: Int64?
    /// The last session transition, announced to every process once.
    var event: EventKind?
    var eventOrigin: String?
    var eventSerial: Int = 0

    static let key = "record"

    /// The last two records decoded in this process, with their texts, newest first: every
    /// process reads the record on every change to the session, and a change's old value is the
    /// one before's new value.
    private static let lastDecoded = Mutex<[(text: String, record: SessionRecord)]>([])

    /// The record stored as `text`, or nil when there is none or it is invalid (see ``check(_:)``):
    /// an invalid record counts as signed out, and signing in replaces it.
    static func decode(_ text: String?) -> SessionRecord? {
        guard let text else { return nil }
        if case let .success(record) = decodeChecked(text) { return record }
        return nil
    }

    /// The record stored as `text`, or why it cannot be used.
    static func decodeChecked(_ text: String) -> Result<SessionRecord, AuthError> {
        let remembered = lastDecoded.withLock { entries in
            entries.first { sameBytes($0.text, text) }?.record
        }
        if let remembered { return .success(remembered) }
        guard text.utf8.count <= 1 << 20, let record = parse(text) else {
            return .failure(AuthError(code: .invalidRecord, message: "The shared session record is not readable; the session counts as signed out until someone signs in"))
        }
        if let problem = record.problem {
            return .failure(AuthError(code: .invalidRecord, message: "The shared session record is refused (\(problem)); the session counts as signed out until someone signs in"))
        }
        lastDecoded.withLock { entries in
            entries.insert((text, record), at: 0)
            if entries.count > 2 { entries.removeLast() }
        }
        return .success(record)
    }

    /// Whether `a` and `b` hold the same UTF-8 bytes: not `==`, which would take two canonically
    /// equivalent texts for one (and a record read from either for the other's). One `memcmp`,
    /// where `utf8.elementsEqual` went byte by byte through an iterator on every change.
    static func sameBytes(_ a: String, _ b: String) -> Bool {
        guard a.utf8.count == b.utf8.count else { return false }
        var a = a, b = b
        return a.withUTF8 { x in
            b.withUTF8 { y in x.count == y.count && (x.isEmpty || memcmp(x.baseAddress!, y.baseAddress!, x.count) == 0) }
        }
    }

    /// What is out of range in the record, if anything: every time within 1970 ... 9999, every
    /// duration within 0 ... ten years, counters within 0 ... 2^53.
    var problem: String? {
        let times: [(String, Int64?)] = [
            ("expiresAt", expiresAt), ("issuedAt", issuedAt), ("startedAt", startedAt), ("lastActivity", lastActivity),
            ("backoffUntil", backoffUntil), ("refreshing.startedAt", refreshing?.startedAt),
        ]
        for (name, value) in times {
            if let value, !(0...SessionLimits.maximumTime).contains(value) { return "\(name) \(value) is not a time between 1970 and 9999" }
        }
        let durations: [(String, Int64?)] = [("idleTimeout", idleTimeout), ("absoluteTimeout", absoluteTimeout), ("warningLead", warningLead)]
        for (name, value) in durations {
            if let value, !(0...SessionLimits.maximumDurationMilliseconds).contains(value) { return "\(name) \(value) ms is not between 0 and 10 years" }
        }
        let counters: [(String, Int?)] = [("generation", generation), ("failures", failures), ("eventSerial", eventSerial), ("refreshing.generation", refreshing?.generation)]
        for (name, value) in counters {
            if let value, !(0...(1 << 53)).contains(value) { return "\(name) \(value) is out of range" }
        }
        return nil
    }

    /// The access token's lifetime, when both ends are known.
    var lifetime: Int64? {
        guard let expiresAt, let issuedAt, expiresAt >= issuedAt else { return nil }
        return expiresAt - issuedAt
    }

    mutating func announce(_ kind: EventKind, origin: String) {
        event = kind
        eventOrigin = origin
        eventSerial = eventSerial >= 1 << 53 ? 1 : eventSerial + 1
    }

    mutating func signOut(reason: SignOutReason, origin: String) {
        state = .signedOut
        accessToken = nil
        refreshToken = nil
        expiresAt = nil
        issuedAt = nil
        refreshing = nil
        backoffUntil = nil
        failures = 0
        self.reason = reason
        announce(.signedOut, origin: origin)
    }

    /// Installs a token response received at `now` (milliseconds since 1970). Throws for a
    /// response whose numbers are out of range; the record is then unchanged.
    mutating func install(_ response: TokenResponse, now: Int64, origin: String, kind: EventKind) throws(AuthError) {
        let expiry = try Self.expiry(of: response, receivedAt: now)
        state = .signedIn
        accessToken = response.accessToken
        if let refresh = response.refreshToken { refreshToken = refresh }
        expiresAt = expiry
        issuedAt = now
        generation = generation >= 1 << 53 ? 1 : generation + 1
        reason = nil
        refreshing = nil
        failures = 0
        backoffUntil = nil
        if kind == .signedIn {
            startedAt = now
            lastActivity = now
        }
        announce(kind, origin: origin)
    }

    /// `expires_in` counted from receipt, or the JWT's `exp`, whichever comes first. Both are
    /// range-checked: an `expires_in` beyond ten years or an `exp` beyond 9999 is refused.
    static func expiry(of response: TokenResponse, receivedAt now: Int64) throws(AuthError) -> Int64? {
        var fromExpiresIn: Int64?
        if let expiresIn = response.expiresIn {
            let seconds = try SessionLimits.seconds(Double(expiresIn), of: "expires_in")
            fromExpiresIn = min(now + Int64(seconds) * 1000, SessionLimits.maximumTime)
        }
        let fromJWT = try JWTExpiry.expiry(of: response.accessToken)?.millisecondsSince1970
        switch (fromExpiresIn, fromJWT) {
        case let (a?, b?): return min(a, b)
        case let (a, b): return a ?? b
        }
    }
}

extension Date {
    /// Milliseconds since 1970, clamped to 1970 ... 9999 (a `Date` can hold far more).
    var millisecondsSince1970: Int64 {
        let milliseconds = (timeIntervalSince1970 * 1000).rounded()
        guard milliseconds.isFinite, milliseconds > 0 else { return 0 }
        return milliseconds >= Double(SessionLimits.maximumTime) ? SessionLimits.maximumTime : Int64(milliseconds)
    }
    init(milliseconds: Int64) { self.init(timeIntervalSince1970: Double(milliseconds) / 1000) }
}

/// A refresh that a process has started and not finished: who, since when, and whether that
/// process is running, stopped or gone (read from `/proc` when asked).
public struct RefreshInProgress: Sendable, Hashable {
    /// The refreshing process's origin (its name in the session) and pid.
    public var origin: String
    public var pid: Int32
    public var since: Date
    public var processState: ProcessState

    init(_ refreshing: SessionRecord.Refreshing) {
        origin = refreshing.origin
        pid = refreshing.pid
        since = Date(milliseconds: refreshing.startedAt)
        processState = ProcessState(pid: refreshing.pid)
    }
}

extension SessionRecord: CustomStringConvertible, CustomDebugStringConvertible {
    /// The record without its tokens: a log line or a test's failure message that shows a record
    /// (`String(describing:)`, `String(reflecting:)`, string interpolation) shows no secret.
    var description: String {
        func value(_ number: Int64?) -> String { number.map(String.init) ?? "nil" }
        let refresh = refreshing.map { "\($0.origin) (pid \($0.pid), generation \($0.generation), since \($0.startedAt))" } ?? "nil"
        return "SessionRecord(state: \(state.rawValue), generation: \(generation), "
            + "accessToken: \(accessToken == nil ? "nil" : "<redacted>"), refreshToken: \(refreshToken == nil ? "nil" : "<redacted>"), "
            + "expiresAt: \(value(expiresAt)), issuedAt: \(value(issuedAt)), startedAt: \(value(startedAt)), "
            + "lastActivity: \(value(lastActivity)), refreshing: \(refresh), failures: \(failures), "
            + "backoffUntil: \(value(backoffUntil)), reason: \(reason?.rawValue ?? "nil"), event: \(event?.rawValue ?? "nil"))"
    }

    var debugDescription: String { description }
}
