import Foundation

/// A successful token response (RFC 6749 §5.1). Its description never shows the tokens.
public struct TokenResponse: Sendable, Hashable, CustomStringConvertible {
    public var accessToken: String
    public var tokenType: String
    public var refreshToken: String?
    public var expiresIn: Int?
    public var scope: String?

    public init(accessToken: String, tokenType: String, refreshToken: String? = nil, expiresIn: Int? = nil, scope: String? = nil) {
        self.accessToken = accessToken
        self.tokenType = tokenType
        self.refreshToken = refreshToken
        self.expiresIn = expiresIn
        self.scope = scope
    }

    public var description: String {
        "TokenResponse(tokenType: \(tokenType), expiresIn: \(expiresIn.map(String.init) ?? "nil"), refreshToken: \(refreshToken == nil ? "none" : "<redacted>"), accessToken: <redacted>)"
    }

    /// Parses the body of a `200` answer of the token endpoint. Every number is range-checked
    /// (``SessionLimits``): an answer that does not fit is ``AuthError/Code/invalidResponse``.
    static func parse(_ body: Data) throws(AuthError) -> TokenResponse {
        guard let members = FlatJSON.members(body),
              case let .string(accessToken)? = members["access_token"], !accessToken.isEmpty,
              case let .string(tokenType)? = members["token_type"]
        else {
            throw AuthError(code: .invalidResponse, message: "The token endpoint's answer is not a valid token response")
        }
        var expiresIn: Int?
        switch members["expires_in"] {
        case nil, .null?:
            break
        case let .number(value)?:
            expiresIn = try SessionLimits.seconds(value, of: "expires_in")
        case let .string(text)?:
            guard let value = Double(text) else {
                throw AuthError(code: .invalidResponse, message: "The token endpoint's expires_in is not a number")
            }
            expiresIn = try SessionLimits.seconds(value, of: "expires_in")
        case .other?:
            throw AuthError(code: .invalidResponse, message: "The token endpoint's expires_in is not a number")
        }
        var refreshToken: String?
        if case let .string(text)? = members["refresh_token"] { refreshToken = text }
        var scope: String?
        if case let .string(text)? = members["scope"] { scope = text }
        return TokenResponse(
            accessToken: accessToken, tokenType: tokenType, refreshToken: refreshToken?.isEmpty == true ? nil : refreshToken,
            expiresIn: expiresIn, scope: scope)
    }
}

/// The ranges that every number from outside must fit: flags, `adopt`, token responses, JWTs and
/// the shared record. Nothing outside them is used, so no arithmetic on them can overflow.
public enum SessionLimits {
    /// The longest duration anywhere: a token lifetime, a session limit, a leeway (ten years).
    public static let maximumDuration: Duration = .seconds(315_360_000)
    /// The latest time anywhere: 9999-12-31T23:59:59.999Z, in milliseconds since 1970.
    static let maximumTime: Int64 = 253_402_300_799_999

    static var maximumDurationMilliseconds: Int64 { maximumDuration.milliseconds }

    /// Whole seconds from a number of seconds that must lie in 0 ... ``maximumDuration``.
    static func seconds(_ value: Double, of what: String) throws(AuthError) -> Int {
        guard value.isFinite, value >= 0, value <= Double(maximumDuration.components.seconds) else {
            throw AuthError(code: .invalidResponse, message: "The token endpoint's \(what) is out of range (0 to 315360000 seconds)")
        }
        return Int(value.rounded(.down))
    }

    /// Checks a duration given by the application (a leeway, a limit, a lifetime).
    public static func check(_ duration: Duration, _ what: String) throws(AuthError) {
        guard duration >= .zero, duration <= maximumDuration else {
            throw AuthError(code: .invalidConfiguration, message: "\(what) must be between 0 and 10 years (315360000 s)")
        }
    }
}

extension Duration {
    /// Whole milliseconds, saturating at about ±292 million years instead of trapping.
    var milliseconds: Int64 {
        let (seconds, attoseconds) = components
        let limit = Int64.max / 1000 - 1
        if seconds > limit { return .max }
        if seconds < -limit { return .min }
        return seconds * 1000 + attoseconds / 1_000_000_000_000_000
    }
}

/// Reads the `exp` claim of a JWT without checking its signature (the client only needs to
/// know when to refresh; the resource server checks the token).
enum JWTExpiry {
    /// nil for a token that is not a JWT or has no numeric `exp`; an error for an `exp` outside
    /// 1970 ... 9999.
    static func expiry(of token: String) throws(AuthError) -> Date? {
        // Bytes throughout (base64url to base64, then padding): `replacingOccurrences` went
        // through NSString, a good part of the refresher's own time before it stores the token.
        let parts = token.utf8.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false)
        guard parts.count == 3, parts[1].count <= 65_536 else { return nil }
        var base64 = parts[1].map { byte in
            switch byte {
            case UInt8(ascii: "-"): UInt8(ascii: "+")
            case UInt8(ascii: "_"): UInt8(ascii: "/")
            default: byte
            }
        }
        base64 += repeatElement(UInt8(ascii: "="), count: (4 - base64.count % 4) % 4)
        guard let data = Data(base64Encoded: Data(base64)),
              case let .number(exp)? = FlatJSON.members(data)?["exp"]
        else { return nil }
        guard exp.isFinite, exp >= 0, exp * 1000 <= Double(SessionLimits.maximumTime) else {
            throw AuthError(code: .invalidResponse, message: "The access token's exp claim is out of range (1970 to 9999)")
        }
        return Date(timeIntervalSince1970: exp)
    }
}

/// How an answer of the token endpoint that is not a success maps to an ``AuthError``
/// (README, "Which answers end a refresh token").
enum TokenEndpointError {
    /// Transient statuses: the server says it did not (or could not) act on the request.
    static func isTransient(_ status: Int) -> Bool { status == 408 || status == 429 || (500...599).contains(status) }

    static func error(status: Int, body: Data, grant: String) -> AuthError {
        let members = FlatJSON.members(body)
        var code: String?
        if case let .string(text)? = members?["error"] { code = Self.printable(text) }
        var description = ""
        if case let .string(text)? = members?["error_description"] { description = ": " + Self.printable(text) }
        let answer = "\(status)" + (code.map { " \($0)" } ?? (body.isEmpty ? " with an empty body" : " with no OAuth error body")) + description
        if isTransient(status) {
            return AuthError(code: .network, message: "The authorization server answered \(answer) to the \(grant) request; trying again later is safe", oauthError: code, httpStatus: status)
        }
        if grant == "refresh_token" {
            // Final for the refresh token, whatever the body says: it is never presented again.
            let what = code == "invalid_client" || code == "unauthorized_client" || (code == nil && status == 401)
                ? "refused the client while refreshing" : "refused the refresh token"
            return AuthError(code: .refreshFailed, message: "The authorization server \(what) (\(answer))", oauthError: code, reason: .refreshFailed, httpStatus: status)
        }
        switch (code, status) {
        case ("invalid_grant", _):
            return AuthError(code: .invalidCredentials, message: "The authorization server refused the credentials (\(answer))", oauthError: code, httpStatus: status)
        case ("invalid_client", _), ("unauthorized_client", _), (nil, 401):
            return AuthError(code: .invalidClient, message: "The authorization server refused the client (\(answer)): check the client id and secret", oauthError: code, httpStatus: status)
        case (nil, 400), (nil, 403):
            return AuthError(
                code: .invalidCredentials,
                message: "The authorization server refused the sign-in (\(answer)): the username or password is wrong, or the server does not accept this client for the grant",
                oauthError: code, httpStatus: status)
        default:
            return AuthError(code: .server, message: "The authorization server answered \(answer) to the \(grant) request", oauthError: code, httpStatus: status)
        }
    }

    /// A server's text, cut short and without control characters, for a message.
    static func printable(_ text: String) -> String {
        String(String.UnicodeScalarView(text.unicodeScalars.prefix(200).filter { !$0.properties.generalCategory.isControl }))
    }
}

extension Unicode.GeneralCategory {
    fileprivate var isControl: Bool { self == .control || self == .format }
}

/// The top-level members of one JSON object (RFC 8259), for the small answers of a token
/// endpoint and a JWT's claims: strings and numbers are read, any other value (`true`, `false`,
/// an object, an array) is checked and skipped. The last of two members with one name counts.
///
/// Read with the session record's `JSONReader` (SessionRecordCodec.swift) rather than
/// `JSONSerialization`, which costs a process 0.4 ms of CPU at its first use (its types,
/// bridging to `NSNumber`): that was on a refresh storm's critical path, in the refresher,
/// between the token endpoint's answer and every other process's new token.
enum FlatJSON {
    enum Value: Equatable {
        case string(String)
        case number(Double)
        case null
        case other
    }

    /// The object's members, or nil when `bytes` are not one JSON object (whitespace around it
    /// allowed) with valid UTF-8 strings.
    static func members(_ bytes: some Collection<UInt8>) -> [String: Value]? {
        Array(bytes).withUnsafeBufferPointer { buffer in
            var reader = JSONReader(buffer)
            var members: [String: Value] = [:]
            do throws(JSONReader.Invalid) {
                try reader.object { (key: String, reader: inout JSONReader) throws(JSONReader.Invalid) in
                    members[key] = try reader.flatValue()
                }
                return reader.atEnd() ? members : nil
            } catch {
                return nil
            }
        }
    }
}
