// DEVELOPMENT ONLY: in-memory token state for the demo token server.
import Foundation

/// An RFC 6749 §5.2 error response. `note` goes to the request log only, never to the client.
struct OAuthError: Error, Sendable {
    var status: Int
    var code: String
    var description: String
    var note: String? = nil

    static func invalidRequest(_ description: String) -> OAuthError {
        OAuthError(status: 400, code: "invalid_request", description: description)
    }
    static func invalidClient(_ description: String) -> OAuthError {
        OAuthError(status: 401, code: "invalid_client", description: description)
    }
    static func invalidGrant(_ description: String, note: String? = nil) -> OAuthError {
        OAuthError(status: 400, code: "invalid_grant", description: description, note: note)
    }
    static func invalidScope(_ description: String) -> OAuthError {
        OAuthError(status: 400, code: "invalid_scope", description: description)
    }
    static func unsupportedGrantType(_ description: String) -> OAuthError {
        OAuthError(status: 400, code: "unsupported_grant_type", description: description)
    }
}

/// A successful token response (RFC 6749 §5.1).
struct TokenGrant: Sendable {
    var accessToken: String
    var expiresIn: Int
    var refreshToken: String
    var scope: String
}

/// Request counters served by `GET /stats`.
struct Stats: Sendable, Equatable {
    /// refresh_token grant requests received.
    var refresh = 0
    /// password grant requests received.
    var password = 0
    /// /revoke requests received.
    var revoke = 0
    /// refresh_token grant requests that did not get a 200.
    var refreshFailed = 0
    /// refresh_token grant requests presenting a refresh token that had been presented before.
    var reused = 0

    var json: String {
        #"{"refresh":\#(refresh),"password":\#(password),"revoke":\#(revoke),"#
            + #""refreshFailed":\#(refreshFailed),"reused":\#(reused)}"#
    }
}

/// RFC 7662-style view of a token, for `POST /introspect`.
struct Introspection: Sendable {
    var active: Bool
    var tokenType: String? = nil
    var subject: String? = nil
    var scope: String? = nil
    var clientID: String? = nil
    var issuedAt: Int? = nil
    var expiresAt: Int? = nil
    var jti: String? = nil
}

/// Users, lifetimes and all issued tokens. An actor, so every grant is checked and
/// rotated atomically: of N concurrent refreshes with one token exactly one wins.
actor TokenStore {
    struct Settings: Sendable {
        var accessTTL: Int
        var refreshTTL: Int
        var users: [String: String]
    }

    enum Counter: Sendable { case password, refresh, revoke }

    /// All refresh tokens descending from one password grant.
    private struct Family {
        let subject: String
        let clientID: String
        let scope: String
        var revoked: String?  // why, once revoked
        var accessTokens: [String: Int] = [:]  // jti -> exp
    }

    private struct RefreshRecord {
        let family: Int
        let issuedAt: Date
        let expiresAt: Date
        var rotated = false  // exchanged for a successor: dead, and presenting it again is reuse
        var presented = false  // seen at the token endpoint before
    }

    private let settings: Settings
    private let signer: JWTSigner
    private var families: [Int: Family] = [:]
    private var nextFamily = 1
    private var refreshTokens: [String: RefreshRecord] = [:]  // keyed by SHA-256 of the token
    private var revokedAccess: [String: Int] = [:]  // jti -> exp
    private var counters = Stats()
    private var issued = 0

    init(settings: Settings, signer: JWTSigner = JWTSigner()) {
        self.settings = settings
        self.signer = signer
    }

    var stats: Stats { counters }

    /// Counts a request and returns its ordinal for the log line.
    func count(_ counter: Counter) -> Int {
        switch counter {
        case .password:
            counters.password += 1
            return counters.password
        case .refresh:
            counters.refresh += 1
            return counters.refresh
        case .revoke:
            counters.revoke += 1
            return counters.revoke
        }
    }

    func countRefreshFailure() {
        counters.refreshFailed += 1
    }

    // MARK: Grants

    /// RFC 6749 §4.3: resource owner password credentials.
    func passwordGrant(clientID: String, username: String, password: String,
                       scope requested: String?, now: Date = Date()) throws(OAuthError) -> TokenGrant {
        let scope = try Scope.parse(requested)
        // Always do one comparison, so unknown users and wrong passwords take the same path.
        let expected = settings.users[username]
        let matches = Secret.equal(expected ?? "\u{0}no-such-user", password)
        guard expected != nil, matches else {
            throw .invalidGrant("invalid resource owner credentials")
        }
        let id = nextFamily
        nextFamily += 1
        families[id] = Family(subject: username, clientID: clientID, scope: scope.joined(separator: " "))
        return try issue(family: id, accessScope: scope.joined(separator: " "), now: now)
    }

    /// RFC 6749 §6 with rotation and reuse detection.
    func refreshGrant(clientID: String, refreshToken: String, scope requested: String?,
                      now: Date = Date()) throws(OAuthError) -> TokenGrant {
        let key = OpaqueToken.digest(refreshToken)
        guard var record = refreshTokens[key], let family = families[record.family] else {
            throw .invalidGrant("unknown refresh token", note: "unknown token")
        }
        if record.presented {
            // Presented before (normally: already rotated). Treat as theft: kill the family.
            counters.reused += 1
            let wasRevoked = family.revoked != nil
            revokeFamily(record.family, reason: "reuse detected")
            throw .invalidGrant("refresh token already used",
                                note: wasRevoked ? "reused" : "reused; family revoked")
        }
        // §6: a narrower scope may be requested; omitted means the original scope.
        // Checked first and without side effects, so the client may retry with a valid scope.
        let granted = Scope.tokens(family.scope)
        var accessScope = granted
        if let requested, !requested.isEmpty {
            accessScope = try Scope.parse(requested)
            guard Set(accessScope).isSubset(of: Set(granted)) else {
                throw .invalidScope("requested scope exceeds the originally granted scope")
            }
        }
        record.presented = true
        refreshTokens[key] = record
        if let reason = family.revoked {
            throw .invalidGrant("refresh token revoked", note: "revoked: \(reason)")
        }
        if now >= record.expiresAt {
            throw .invalidGrant("refresh token expired", note: "expired")
        }
        guard family.clientID == clientID else {
            throw .invalidGrant("refresh token was issued to another client", note: "client mismatch")
        }
        record.rotated = true
        refreshTokens[key] = record
        return try issue(family: record.family, accessScope: accessScope.joined(separator: " "), now: now)
    }

    private func issue(family id: Int, accessScope: String, now: Date) throws(OAuthError) -> TokenGrant {
        guard var family = families[id] else { throw .invalidGrant("unknown grant") }
        let iat = Int(now.timeIntervalSince1970)
        let claims = AccessTokenClaims(
            sub: family.subject,
            iat: iat,
            exp: iat + settings.accessTTL,
            jti: UUID().uuidString.lowercased(),
            scope: accessScope,
            client_id: family.clientID
        )
        let accessToken: String
        do {
            accessToken = try signer.sign(claims)
        } catch {
            throw OAuthError(status: 500, code: "server_error", description: "could not sign the access token")
        }
        family.accessTokens[claims.jti] = claims.exp
        families[id] = family

        let refreshToken = OpaqueToken.make()
        refreshTokens[OpaqueToken.digest(refreshToken)] = RefreshRecord(
            family: id,
            issuedAt: now,
            expiresAt: now.addingTimeInterval(TimeInterval(settings.refreshTTL))
        )
        issued += 1
        if issued % 256 == 0 { prune(now: now) }
        return TokenGrant(accessToken: accessToken, expiresIn: settings.accessTTL,
                          refreshToken: refreshToken, scope: accessScope)
    }

    // MARK: Revocation

    /// RFC 7009. Returns a note for the log; unknown tokens are not an error.
    func revoke(token: String, hint: String?, clientID: String) -> String {
        func asRefresh() -> String? {
            guard let record = refreshTokens[OpaqueToken.digest(token)],
                  let family = families[record.family], family.clientID == clientID
            else { return nil }
            if family.revoked != nil { return "refresh family already revoked" }
            revokeFamily(record.family, reason: "revoked by client")
            return "refresh family revoked"
        }
        func asAccess() -> String? {
            guard let claims = signer.verify(token), claims.client_id == clientID else { return nil }
            revokedAccess[claims.jti] = claims.exp
            return "access token revoked"
        }
        // The hint only picks the lookup order (RFC 7009 §2.1).
        let result = hint == "access_token" ? (asAccess() ?? asRefresh()) : (asRefresh() ?? asAccess())
        return result ?? "unknown token"
    }

    /// Revokes every refresh token family. Returns how many were live.
    func revokeAll() -> Int {
        var count = 0
        for (id, family) in families where family.revoked == nil {
            revokeFamily(id, reason: "admin revoke-all")
            count += 1
        }
        return count
    }

    private func revokeFamily(_ id: Int, reason: String) {
        guard var family = families[id], family.revoked == nil else { return }
        family.revoked = reason
        for (jti, exp) in family.accessTokens {
            revokedAccess[jti] = exp
        }
        families[id] = family
    }

    // MARK: Introspection

    func introspect(token: String, clientID: String, now: Date = Date()) -> Introspection {
        let nowSeconds = Int(now.timeIntervalSince1970)
        if let claims = signer.verify(token) {
            guard claims.client_id == clientID, claims.exp > nowSeconds, revokedAccess[claims.jti] == nil else {
                return Introspection(active: false)
            }
            return Introspection(active: true, tokenType: "Bearer", subject: claims.sub, scope: claims.scope,
                                 clientID: claims.client_id, issuedAt: claims.iat, expiresAt: claims.exp,
                                 jti: claims.jti)
        }
        guard let record = refreshTokens[OpaqueToken.digest(token)], let family = families[record.family],
              family.clientID == clientID, family.revoked == nil, !record.rotated, now < record.expiresAt
        else { return Introspection(active: false) }
        return Introspection(active: true, tokenType: "refresh_token", subject: family.subject, scope: family.scope,
                             clientID: family.clientID, issuedAt: Int(record.issuedAt.timeIntervalSince1970),
                             expiresAt: Int(record.expiresAt.timeIntervalSince1970))
    }

    // MARK: Housekeeping

    /// Forgets refresh tokens long past expiry and revocations of expired access tokens.
    private func prune(now: Date) {
        let horizon = now.addingTimeInterval(-TimeInterval(settings.refreshTTL))
        refreshTokens = refreshTokens.filter { $0.value.expiresAt > horizon }
        let seconds = Int(now.timeIntervalSince1970)
        revokedAccess = revokedAccess.filter { $0.value > seconds }
        let live = Set(refreshTokens.values.map(\.family))
        families = families.filter { live.contains($0.key) }
        for id in families.keys {
            families[id]?.accessTokens = families[id]?.accessTokens.filter { $0.value > seconds } ?? [:]
        }
    }
}

/// RFC 6749 §3.3 scope strings.
enum Scope {
    /// Space-delimited scope tokens, deduplicated in order. nil or "" is the empty scope.
    static func parse(_ text: String?) throws(OAuthError) -> [String] {
        guard let text, !text.isEmpty else { return [] }
        let tokens = text.split(separator: " ").map(String.init)
        for token in tokens {
            // scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
            guard token.unicodeScalars.allSatisfy({ $0.value == 0x21 || (0x23...0x5B).contains($0.value)
                || (0x5D...0x7E).contains($0.value) })
            else { throw .invalidScope("malformed scope") }
        }
        var seen = Set<String>()
        return tokens.filter { seen.insert($0).inserted }
    }

    /// Splits an already validated scope string.
    static func tokens(_ text: String) -> [String] {
        text.split(separator: " ").map(String.init)
    }
}
