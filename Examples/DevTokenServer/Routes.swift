// DEVELOPMENT ONLY: HTTP endpoints of the demo token server.
import FlyingFox
import Foundation

/// The one OAuth client the dev server knows.
struct ClientCredentials: Sendable {
    var id: String
    var secret: String
}

/// Dispatches every request and logs one line per request served.
struct Routes: HTTPHandler {
    let store: TokenStore
    let client: ClientCredentials
    let console: Console

    /// Bodies are tiny forms; anything bigger is refused.
    static let maxBodySize = 64 * 1024

    /// What a handler produced: the response plus words for the log line (never secrets).
    private struct Outcome {
        var response: HTTPResponse
        var label: String = ""  // e.g. "grant_type=refresh_token"
        var error: String? = nil  // OAuth error code
        var note: String? = nil  // e.g. "refresh #3"
    }

    func handleRequest(_ request: HTTPRequest) async throws -> HTTPResponse {
        let outcome = await route(request)
        var line = "devtoken: \(Log.clean(request.method.rawValue, max: 16)) \(Log.clean(request.path, max: 80))"
        if !outcome.label.isEmpty { line += " \(outcome.label)" }
        line += " -> \(outcome.response.statusCode.code)"
        if let error = outcome.error { line += " \(error)" }
        if let note = outcome.note { line += " (\(note))" }
        console.request(line)
        return outcome.response
    }

    private func route(_ request: HTTPRequest) async -> Outcome {
        let endpoints: [String: (method: HTTPMethod, handler: (HTTPRequest) async -> Outcome)] = [
            "/token": (.POST, token),
            "/revoke": (.POST, revoke),
            "/introspect": (.POST, introspect),
            "/admin/revoke-all": (.POST, revokeAll),
            "/stats": (.GET, stats),
        ]
        guard let endpoint = endpoints[request.path] else {
            return Outcome(response: Reply.json(404, #"{"error":"not_found"}"#))
        }
        guard request.method == endpoint.method else {
            var response = Reply.json(405, #"{"error":"method_not_allowed"}"#)
            response.headers[HTTPHeader("Allow")] = endpoint.method.rawValue
            return Outcome(response: response)
        }
        return await endpoint.handler(request)
    }

    // MARK: POST /token (RFC 6749 §4.3, §6)

    private func token(_ request: HTTPRequest) async -> Outcome {
        let form: Form
        do throws(OAuthError) {
            form = try await Form.read(request)
        } catch {
            return Outcome(response: Reply.error(error), error: error.code)
        }
        let grantType = form.first("grant_type")
        var outcome = Outcome(response: Reply.json(500, "{}"))
        let counter: TokenStore.Counter? = switch grantType {
        case "password": .password
        case "refresh_token": .refresh
        default: nil
        }
        // Only known grant type names reach the log: the field is client-controlled.
        if let grantType {
            outcome.label = counter == nil ? "grant_type=(unsupported)" : "grant_type=\(grantType)"
        }
        var ordinal = 0
        if let counter {
            ordinal = await store.count(counter)
            outcome.note = counter == .password ? "password #\(ordinal)" : "refresh #\(ordinal)"
        }

        do throws(OAuthError) {
            try form.rejectDuplicates()
            let clientID = try authenticateClient(request, form)
            let grant: TokenGrant
            switch grantType {
            case "password":
                let username = try form.required("username")
                let password = try form.required("password")
                grant = try await store.passwordGrant(clientID: clientID, username: username, password: password,
                                                      scope: form.first("scope"))
                outcome.note = "password #\(ordinal), user \(Log.clean(username, max: 32))"
            case "refresh_token":
                let refreshToken = try form.required("refresh_token")
                grant = try await store.refreshGrant(clientID: clientID, refreshToken: refreshToken,
                                                     scope: form.first("scope"))
            case nil:
                throw .invalidRequest("missing grant_type")
            default:
                throw .unsupportedGrantType("supported grant types: password, refresh_token")
            }
            outcome.response = Reply.token(grant)
        } catch {
            if counter == .refresh { await store.countRefreshFailure() }
            outcome.response = Reply.error(error)
            outcome.error = error.code
            if let note = error.note {
                outcome.note = [outcome.note, note].compactMap { $0 }.joined(separator: ": ")
            }
        }
        return outcome
    }

    // MARK: POST /revoke (RFC 7009)

    private func revoke(_ request: HTTPRequest) async -> Outcome {
        let ordinal = await store.count(.revoke)
        var outcome = Outcome(response: Reply.json(200, "{}"), note: "revoke #\(ordinal)")
        do throws(OAuthError) {
            let form = try await Form.read(request)
            try form.rejectDuplicates()
            let clientID = try authenticateClient(request, form)
            let token = try form.required("token")
            let result = await store.revoke(token: token, hint: form.first("token_type_hint"), clientID: clientID)
            outcome.note = "revoke #\(ordinal): \(result)"
            // RFC 7009 §2.2: 200 with an empty body, also for unknown tokens.
            outcome.response = HTTPResponse(statusCode: .ok, headers: Reply.noStore, body: Data())
        } catch {
            outcome.response = Reply.error(error)
            outcome.error = error.code
        }
        return outcome
    }

    // MARK: POST /introspect (RFC 7662, for the demo)

    private func introspect(_ request: HTTPRequest) async -> Outcome {
        do throws(OAuthError) {
            let form = try await Form.read(request)
            try form.rejectDuplicates()
            let clientID = try authenticateClient(request, form)
            let token = try form.required("token")
            let result = await store.introspect(token: token, clientID: clientID)
            return Outcome(response: Reply.introspection(result), note: result.active ? "active" : "inactive")
        } catch {
            return Outcome(response: Reply.error(error), error: error.code)
        }
    }

    // MARK: Demo admin endpoints (no authentication: development only)

    private func revokeAll(_ request: HTTPRequest) async -> Outcome {
        let count = await store.revokeAll()
        return Outcome(response: Reply.json(200, #"{"revoked":\#(count)}"#), note: "revoked \(count) token families")
    }

    private func stats(_ request: HTTPRequest) async -> Outcome {
        let stats = await store.stats
        return Outcome(response: Reply.json(200, stats.json))
    }

    // MARK: Client authentication (RFC 6749 §2.3.1)

    /// HTTP Basic or client_id/client_secret form fields; never both. Returns the client id.
    private func authenticateClient(_ request: HTTPRequest, _ form: Form) throws(OAuthError) -> String {
        let basic = try BasicCredentials(request.headers[.authorization])
        let id: String
        let secret: String
        if let basic {
            if form.first("client_secret") != nil {
                throw .invalidRequest("use only one client authentication method")
            }
            if let formID = form.first("client_id"), formID != basic.id {
                throw .invalidClient("client_id does not match the authenticated client")
            }
            (id, secret) = (basic.id, basic.secret)
        } else {
            guard let formID = form.first("client_id"), let formSecret = form.first("client_secret") else {
                throw .invalidClient("client authentication required")
            }
            (id, secret) = (formID, formSecret)
        }
        let idMatches = Secret.equal(id, client.id)
        let secretMatches = Secret.equal(secret, client.secret)
        guard idMatches, secretMatches else {
            throw .invalidClient("client authentication failed")
        }
        return id
    }
}

/// `Authorization: Basic` credentials; id and secret are form-urlencoded before base64 (RFC 6749 §2.3.1).
struct BasicCredentials {
    var id: String
    var secret: String

    /// nil when there is no Basic authorization header.
    init?(_ header: String?) throws(OAuthError) {
        guard let header else { return nil }
        let parts = header.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: true)
        guard parts.count == 2, parts[0].lowercased() == "basic" else { return nil }
        guard let data = Data(base64Encoded: parts[1].trimmingCharacters(in: .whitespaces)),
              let decoded = String(data: data, encoding: .utf8),
              let colon = decoded.firstIndex(of: ":"),
              let id = Form.decode(decoded[..<colon]),
              let secret = Form.decode(decoded[decoded.index(after: colon)...])
        else { throw .invalidClient("malformed Basic credentials") }
        self.id = id
        self.secret = secret
    }
}

/// An application/x-www-form-urlencoded request body.
struct Form {
    var fields: [(name: String, value: String)]

    static func read(_ request: HTTPRequest) async throws(OAuthError) -> Form {
        let type = request.headers[.contentType]?
            .split(separator: ";").first?
            .trimmingCharacters(in: .whitespaces)
            .lowercased()
        guard type == "application/x-www-form-urlencoded" else {
            throw .invalidRequest("Content-Type must be application/x-www-form-urlencoded")
        }
        if let count = request.bodySequence.count, count > Routes.maxBodySize {
            throw .invalidRequest("request body too large")
        }
        let data: Data
        do {
            data = try await request.bodyData
        } catch {
            throw .invalidRequest("could not read the request body")
        }
        guard data.count <= Routes.maxBodySize, let body = String(data: data, encoding: .utf8) else {
            throw .invalidRequest("request body must be UTF-8 and small")
        }
        return try parse(body)
    }

    static func parse(_ body: String) throws(OAuthError) -> Form {
        var fields: [(name: String, value: String)] = []
        for pair in body.split(separator: "&", omittingEmptySubsequences: true) {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard let name = decode(parts[0]), let value = decode(parts.count > 1 ? parts[1] : "") else {
                throw .invalidRequest("malformed form encoding")
            }
            fields.append((name, value))
        }
        return Form(fields: fields)
    }

    /// Form decoding: '+' is a space, then percent-decoding.
    static func decode(_ text: some StringProtocol) -> String? {
        String(text).replacingOccurrences(of: "+", with: " ").removingPercentEncoding
    }

    /// RFC 6749 §3.2: parameters sent without a value are treated as omitted.
    func first(_ name: String) -> String? {
        fields.first { $0.name == name && !$0.value.isEmpty }?.value
    }

    func required(_ name: String) throws(OAuthError) -> String {
        guard let value = first(name) else { throw .invalidRequest("missing \(name)") }
        return value
    }

    /// RFC 6749 §3.2: parameters MUST NOT be included more than once.
    func rejectDuplicates() throws(OAuthError) {
        var seen = Set<String>()
        for field in fields where !seen.insert(field.name).inserted {
            throw .invalidRequest("parameter \(field.name) repeated")
        }
    }
}

/// Response builders.
enum Reply {
    /// RFC 6749 §5.1: token responses must not be cached.
    static let noStore: HTTPHeaders = [
        .cacheControl: "no-store",
        HTTPHeader("Pragma"): "no-cache",
    ]

    static func json(_ status: Int, _ body: String, headers: HTTPHeaders = noStore) -> HTTPResponse {
        var headers = headers
        headers[.contentType] = "application/json;charset=UTF-8"
        return HTTPResponse(statusCode: statusCode(status), headers: headers, body: Data(body.utf8))
    }

    static func token(_ grant: TokenGrant) -> HTTPResponse {
        var object: [String: any Sendable] = [
            "access_token": grant.accessToken,
            "token_type": "Bearer",
            "expires_in": grant.expiresIn,
            "refresh_token": grant.refreshToken,
        ]
        if !grant.scope.isEmpty { object["scope"] = grant.scope }
        return json(200, encode(object))
    }

    static func error(_ error: OAuthError) -> HTTPResponse {
        var headers = noStore
        if error.status == 401 {
            headers[HTTPHeader("WWW-Authenticate")] = #"Basic realm="devtoken""#
        }
        let body = encode(["error": error.code, "error_description": error.description])
        return json(error.status, body, headers: headers)
    }

    static func introspection(_ result: Introspection) -> HTTPResponse {
        var object: [String: any Sendable] = ["active": result.active]
        if let value = result.tokenType { object["token_type"] = value }
        if let value = result.subject { object["sub"] = value }
        if let value = result.scope { object["scope"] = value }
        if let value = result.clientID { object["client_id"] = value }
        if let value = result.issuedAt { object["iat"] = value }
        if let value = result.expiresAt { object["exp"] = value }
        if let value = result.jti { object["jti"] = value }
        return json(200, encode(object))
    }

    private static func encode(_ object: [String: any Sendable]) -> String {
        guard let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes]),
              let text = String(data: data, encoding: .utf8)
        else { return "{}" }
        return text
    }

    private static func statusCode(_ code: Int) -> HTTPStatusCode {
        switch code {
        case 200: .ok
        case 400: .badRequest
        case 401: .unauthorized
        case 404: .notFound
        case 405: .methodNotAllowed
        default: .internalServerError
        }
    }
}
