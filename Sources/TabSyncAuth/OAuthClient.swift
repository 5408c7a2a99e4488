import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// Where and how to reach the authorization server.
public struct OAuthConfiguration: Sendable {
    public enum ClientAuthentication: String, Sendable {
        /// `Authorization: Basic` with the URL-encoded client id and secret (RFC 6749 §2.3.1).
        case basic
        /// `client_id` and `client_secret` in the form body.
        case form
    }

    public var tokenEndpoint: URL
    /// The RFC 7009 revocation endpoint; sign-out revokes the refresh token there when set.
    public var revocationEndpoint: URL?
    public var clientID: String
    public var clientSecret: String?
    public var clientAuthentication: ClientAuthentication
    public var scope: String?
    /// The timeout of one request.
    public var timeout: Duration

    public init(
        tokenEndpoint: URL, revocationEndpoint: URL? = nil, clientID: String, clientSecret: String? = nil,
        clientAuthentication: ClientAuthentication = .basic, scope: String? = nil, timeout: Duration = .seconds(15)
    ) {
        self.tokenEndpoint = tokenEndpoint
        self.revocationEndpoint = revocationEndpoint
        self.clientID = clientID
        self.clientSecret = clientSecret
        self.clientAuthentication = clientAuthentication
        self.scope = scope
        self.timeout = timeout
    }

    /// Checks that every endpoint is HTTPS, or HTTP on a loopback address.
    public func validate() throws(AuthError) {
        for endpoint in [tokenEndpoint, revocationEndpoint].compactMap({ $0 }) {
            try Self.checkSecure(endpoint)
        }
    }

    static func checkSecure(_ url: URL) throws(AuthError) {
        guard let scheme = url.scheme?.lowercased(), let host = url.host?.lowercased(), !host.isEmpty else {
            throw AuthError(code: .invalidConfiguration, message: "The endpoint \(url.absoluteString) is not an absolute http(s) URL")
        }
        if scheme == "https" { return }
        let loopback = host == "localhost" || host.hasPrefix("127.") || host == "::1" || host == "[::1]"
        guard scheme == "http", loopback else {
            throw AuthError(
                code: .invalidConfiguration,
                message: "The endpoint \(url.absoluteString) must use HTTPS (plain HTTP is allowed only for loopback addresses)")
        }
    }
}

/// One HTTP exchange, for ``HTTPTransport``.
public struct HTTPExchange: Sendable {
    public var url: URL
    public var method: String
    public var headers: [String: String]
    public var body: Data
    public var timeout: Duration
}

/// Sends HTTP requests. ``CurlTransport`` is the default, ``URLSessionTransport`` the
/// alternative; tests may inject another.
public protocol HTTPTransport: Sendable {
    /// Returns the status code and body, or throws for a transport failure (no connection, timeout).
    /// Throw ``HTTPRequestNotSent`` (or a `URLError` that says so, such as `cannotConnectToHost`)
    /// only when the request certainly never reached the server: any other failure counts as
    /// "sent, answer unknown" (``AuthError/Code/unanswered``).
    func send(_ request: HTTPExchange) async throws -> (status: Int, body: Data)
}

/// A transport failure that certainly happened before the request reached the server.
public struct HTTPRequestNotSent: Error, Sendable {
    public var reason: String
    public init(reason: String) { self.reason = reason }
}

/// HTTP through URLSession (FoundationNetworking, libcurl underneath). One URLSession per
/// transport, reused for every request: setting one up costs milliseconds, which a refresh storm
/// would otherwise pay on its critical path. Slower than ``CurlTransport``, and it reuses
/// connections: libcurl under it may send a request again on a fresh connection when a reused
/// one turns out to be closed.
public struct URLSessionTransport: HTTPTransport {
    private let session: URLSession

    public init() {
        let configuration = URLSessionConfiguration.ephemeral
        configuration.urlCache = nil
        configuration.httpCookieStorage = nil
        session = URLSession(configuration: configuration)
    }

    public func send(_ request: HTTPExchange) async throws -> (status: Int, body: Data) {
        var urlRequest = URLRequest(url: request.url)
        urlRequest.httpMethod = request.method
        urlRequest.httpBody = request.body
        let (seconds, attoseconds) = request.timeout.components
        urlRequest.timeoutInterval = Double(seconds) + Double(attoseconds) / 1e18
        for (name, value) in request.headers { urlRequest.setValue(value, forHTTPHeaderField: name) }
        let (data, response) = try await session.data(for: urlRequest)
        return ((response as? HTTPURLResponse)?.statusCode ?? 0, data)
    }
}

/// An OAuth 2.0 client for the token endpoint: the password grant, the refresh-token grant
/// (RFC 6749 §6) and token revocation (RFC 7009). Error responses are parsed per §5.2;
/// an empty or non-JSON error body is handled by its status code.
public struct OAuthClient: Sendable {
    public let configuration: OAuthConfiguration
    let transport: any HTTPTransport

    public init(configuration: OAuthConfiguration, transport: any HTTPTransport = CurlTransport()) throws(AuthError) {
        try configuration.validate()
        self.configuration = configuration
        self.transport = transport
    }

    /// The resource owner password credentials grant (RFC 6749 §4.3).
    public func password(username: String, password: String) async throws(AuthError) -> TokenResponse {
        var form = ["grant_type": "password", "username": username, "password": password]
        if let scope = configuration.scope { form["scope"] = scope }
        return try await tokenRequest(form, grant: "password")
    }

    /// The refresh-token grant (RFC 6749 §6).
    public func refresh(refreshToken: String) async throws(AuthError) -> TokenResponse {
        try await tokenRequest(["grant_type": "refresh_token", "refresh_token": refreshToken], grant: "refresh_token")
    }

    /// Revokes a token (RFC 7009). Does nothing without a revocation endpoint.
    public func revoke(token: String, hint: String = "refresh_token") async throws(AuthError) {
        guard let endpoint = configuration.revocationEndpoint else { return }
        let (status, body) = try await post(endpoint, ["token": token, "token_type_hint": hint])
        guard status == 200 else { throw TokenEndpointError.error(status: status, body: body, grant: "revocation") }
    }

    private func tokenRequest(_ form: [String: String], grant: String) async throws(AuthError) -> TokenResponse {
        let (status, body) = try await post(configuration.tokenEndpoint, form)
        guard status == 200 else { throw TokenEndpointError.error(status: status, body: body, grant: grant) }
        let response = try TokenResponse.parse(body)
        // The JWT's exp, when there is one, must be in range too (SessionRecord.expiry reads it).
        _ = try JWTExpiry.expiry(of: response.accessToken)
        return response
    }

    /// `text`'s UTF-8 bytes, copied at once: `Data(text.utf8)` takes Data's generic path for a
    /// sequence, with dynamic casts, in the refresher's critical path.
    static func bytes(_ text: String) -> Data {
        var text = text
        return text.withUTF8 { Data(buffer: $0) }
    }

    private func post(_ url: URL, _ form: [String: String]) async throws(AuthError) -> (Int, Data) {
        var form = form
        var headers = ["Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"]
        switch configuration.clientAuthentication {
        case .basic:
            let credentials = "\(Self.formEncode(configuration.clientID)):\(Self.formEncode(configuration.clientSecret ?? ""))"
            headers["Authorization"] = "Basic " + Self.bytes(credentials).base64EncodedString()
        case .form:
            form["client_id"] = configuration.clientID
            if let secret = configuration.clientSecret { form["client_secret"] = secret }
        }
        let body = form.sorted { $0.key < $1.key }.map { "\(Self.formEncode($0.key))=\(Self.formEncode($0.value))" }.joined(separator: "&")
        let exchange = HTTPExchange(url: url, method: "POST", headers: headers, body: Self.bytes(body), timeout: configuration.timeout)
        do {
            let (status, data) = try await transport.send(exchange)
            return (status, data)
        } catch let error as HTTPRequestNotSent {
            throw AuthError(code: .network, message: "The request to \(url.absoluteString) was not sent: \(error.reason)")
        } catch let error as URLError where Self.certainlyNotSent(error.code) {
            throw AuthError(code: .network, message: "The request to \(url.absoluteString) was not sent: \(error.localizedDescription)")
        } catch is CancellationError {
            throw AuthError(code: .unanswered, message: "The request to \(url.absoluteString) was cancelled before its answer came; the server may have acted on it")
        } catch {
            throw AuthError(
                code: .unanswered,
                message: "The request to \(url.absoluteString) got no answer (\(error.localizedDescription)); the server may have acted on it")
        }
    }

    /// URL loading failures that happen before any byte of the request reaches the server.
    static func certainlyNotSent(_ code: URLError.Code) -> Bool {
        [.cannotConnectToHost, .cannotFindHost, .dnsLookupFailed, .notConnectedToInternet, .badURL, .unsupportedURL,
         .secureConnectionFailed, .serverCertificateUntrusted, .serverCertificateHasBadDate, .serverCertificateNotYetValid,
         .serverCertificateHasUnknownRoot, .clientCertificateRejected, .clientCertificateRequired, .internationalRoamingOff,
         .dataNotAllowed, .callIsActive].contains(code)
    }

    /// `text` percent-encoded, every byte of its UTF-8 but the unreserved ASCII ones (RFC 3986
    /// §2.3: letters, digits, `-._~`). A loop over the bytes: Foundation's `CharacterSet` and
    /// `addingPercentEncoding` cost a refresher 0.4 ms of CPU at their first use.
    static func formEncode(_ text: String) -> String {
        let hex = Array("0123456789ABCDEF".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(text.utf8.count)
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
                out.append(byte)
            default:
                out += [UInt8(ascii: "%"), hex[Int(byte >> 4)], hex[Int(byte & 0x0F)]]
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}
