import Foundation
import Synchronization

/// The shared session as stored under the key `record` of the storage `session`.
/// Times are milliseconds since 1970 (wall clock). Tokens live only here, in a 0600 file.
struct SessionRecord: Codable, Sendable, Equatable {
    enum State: String, Codable, Sendable { case signedIn, signedOut }
    enum EventKind: String, Codable, Sendable { case signedIn, refreshed, signedOut }

    /// A refresh that a process started: if that process died, the refresh token may have been
    /// rotated at the server already, so nobody may present it again.
    struct Refreshing: Codable, Sendable, Equatable {
        var generation: Int
        var pid: Int32
        var origin: String
        var startedAt: Int64
    }

    var state: State = .signedOut
    var accessToken: String?
    var refreshToken: String?
    var expiresAt: Int64?
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

    /// The last record decoded in this process, with its text: every process reads the record on
    /// every change to the session, and between changes it is the same text.
    private static let lastDecoded = Mutex<(text: String, record: SessionRecord)?>(nil)

    static func decode(_ text: String?) -> SessionRecord? {
        guard let text else { return nil }
        if let last = lastDecoded.withLock({ $0 }), last.text.utf8.elementsEqual(text.utf8) { return last.record }
        guard let record = try? JSONDecoder().decode(SessionRecord.self, from: Data(text.utf8)) else { return nil }
        lastDecoded.withLock { $0 = (text, record) }
        return record
    }

    func encoded() -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        return String(decoding: (try? encoder.encode(self)) ?? Data("{}".utf8), as: UTF8.self)
    }

    mutating func announce(_ kind: EventKind, origin: String) {
        event = kind
        eventOrigin = origin
        eventSerial += 1
    }

    mutating func signOut(reason: SignOutReason, origin: String) {
        state = .signedOut
        accessToken = nil
        refreshToken = nil
        expiresAt = nil
        refreshing = nil
        backoffUntil = nil
        failures = 0
        self.reason = reason
        announce(.signedOut, origin: origin)
    }

    mutating func install(_ response: TokenResponse, now: Date, origin: String, kind: EventKind) {
        state = .signedIn
        accessToken = response.accessToken
        if let refresh = response.refreshToken { refreshToken = refresh }
        expiresAt = Self.expiry(of: response, receivedAt: now)
        generation += 1
        reason = nil
        refreshing = nil
        failures = 0
        backoffUntil = nil
        if kind == .signedIn {
            startedAt = now.millisecondsSince1970
            lastActivity = now.millisecondsSince1970
        }
        announce(kind, origin: origin)
    }

    /// `expires_in` counted from receipt, or the JWT's `exp`, whichever comes first.
    static func expiry(of response: TokenResponse, receivedAt now: Date) -> Int64? {
        let fromExpiresIn = response.expiresIn.map { now.addingTimeInterval(Double($0)).millisecondsSince1970 }
        let fromJWT = JWTExpiry.expiry(of: response.accessToken)?.millisecondsSince1970
        switch (fromExpiresIn, fromJWT) {
        case let (a?, b?): return min(a, b)
        case let (a, b): return a ?? b
        }
    }
}

extension Date {
    var millisecondsSince1970: Int64 { Int64((timeIntervalSince1970 * 1000).rounded()) }
    init(milliseconds: Int64) { self.init(timeIntervalSince1970: Double(milliseconds) / 1000) }
}
