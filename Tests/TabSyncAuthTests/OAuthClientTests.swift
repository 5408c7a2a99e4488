import Foundation
import Testing
@testable import TabSyncAuth

struct OAuthClientTests {
    @Test(arguments: [
        ("https://auth.example.com/token", true),
        ("http://127.0.0.1:8080/token", true),
        ("http://localhost/token", true),
        ("http://[::1]:8080/token", true),
        ("http://auth.example.com/token", false),
        ("http://10.0.0.1/token", false),
        ("ftp://auth.example.com/token", false),
    ])
    func onlyHTTPSOrLoopbackEndpointsAreAccepted(endpoint: String, accepted: Bool) {
        let configuration = OAuthConfiguration(tokenEndpoint: URL(string: endpoint)!, clientID: "app")
        #expect(((try? configuration.validate()) != nil) == accepted)
    }

    @Test func refreshSendsTheGrantWithBasicClientAuthentication() async throws {
        let server = FakeTokenServer(expiresIn: 300)
        let (_, refresh) = server.issue()
        let response = try await server.client().refresh(refreshToken: refresh)
        #expect(response.expiresIn == 300 && response.refreshToken != nil && response.refreshToken != refresh)
        let request = try #require(server.requests.first)
        #expect(FakeTokenServer.form(request.body) == ["grant_type": "refresh_token", "refresh_token": refresh])
        #expect(request.headers["Authorization"] == "Basic " + Data("app:s3cret".utf8).base64EncodedString())
        #expect(request.headers["Content-Type"] == "application/x-www-form-urlencoded")
    }

    @Test func formClientAuthenticationPutsTheCredentialsInTheBody() async throws {
        let server = FakeTokenServer()
        _ = try await server.client(authentication: .form).password(username: "alice", password: "p&ss=word")
        let request = try #require(server.requests.first)
        #expect(request.headers["Authorization"] == nil)
        let form = FakeTokenServer.form(request.body)
        #expect(form["client_id"] == "app" && form["client_secret"] == "s3cret")
        #expect(form["password"] == "p&ss=word" && form["grant_type"] == "password")
    }

    /// On the refresh grant every answer that is not a success and not transient is final for
    /// the refresh token (refreshFailed), whatever its body says; README, "Which answers end a
    /// refresh token".
    @Test(arguments: [
        (FakeTokenServer.Answer.oauthError(status: 400, error: "invalid_grant"), AuthError.Code.refreshFailed),
        (.oauthError(status: 401, error: "invalid_client"), .refreshFailed),
        (.oauthError(status: 400, error: "invalid_scope"), .refreshFailed),
        (.empty(status: 400), .refreshFailed),
        (.empty(status: 401), .refreshFailed),
        (.empty(status: 403), .refreshFailed),
        (.empty(status: 404), .refreshFailed),
        (.empty(status: 302), .refreshFailed),
        (.empty(status: 503), .network),
        (.empty(status: 500), .network),
        (.empty(status: 429), .network),
        (.empty(status: 408), .network),
        (.unreachable, .network),
        (.lost, .unanswered),
    ])
    func refreshAnswersMapToTypedErrors(answer: FakeTokenServer.Answer, expected: AuthError.Code) async throws {
        let server = FakeTokenServer()
        server.answer(answer)
        await #expect { try await server.client().refresh(refreshToken: "r") } throws: { ($0 as? AuthError)?.code == expected }
    }

    /// On the password grant, an empty-bodied refusal still says what a user can act on.
    @Test(arguments: [
        (FakeTokenServer.Answer.oauthError(status: 400, error: "invalid_grant"), AuthError.Code.invalidCredentials),
        (.oauthError(status: 400, error: "invalid_client"), .invalidClient),
        (.oauthError(status: 401, error: "unauthorized_client"), .invalidClient),
        (.empty(status: 400), .invalidCredentials),
        (.empty(status: 401), .invalidClient),
        (.empty(status: 403), .invalidCredentials),
        (.oauthError(status: 400, error: "invalid_scope"), .server),
        (.empty(status: 502), .network),
        (.lost, .unanswered),
    ])
    func passwordAnswersMapToTypedErrors(answer: FakeTokenServer.Answer, expected: AuthError.Code) async throws {
        let server = FakeTokenServer()
        server.answer(answer)
        await #expect { try await server.client().password(username: "alice", password: "pw") } throws: { error in
            let error = error as? AuthError
            return error?.code == expected && error?.httpStatus == answer.status
        }
    }

    @Test(arguments: [
        #"{"access_token":"a","token_type":"Bearer","expires_in":9223372036854775807}"#,
        #"{"access_token":"a","token_type":"Bearer","expires_in":1e300}"#,
        #"{"access_token":"a","token_type":"Bearer","expires_in":-1}"#,
        #"{"access_token":"a","token_type":"Bearer","expires_in":"9999999999999999999999"}"#,
        #"{"access_token":"a","token_type":"Bearer","expires_in":"NaN"}"#,
        #"{"access_token":"a","token_type":"Bearer","expires_in":[1]}"#,
    ])
    func aTokenResponseWithANumberOutOfRangeIsATypedError(body: String) {
        #expect(throws: AuthError.self) { try TokenResponse.parse(Data(body.utf8)) }
        #expect((try? TokenResponse.parse(Data(body.utf8))) == nil)
    }

    @Test func aTokenResponseWithLowercaseBearerAndAStringExpiresInIsAccepted() throws {
        let response = try TokenResponse.parse(Data(#"{"access_token":"a","token_type":"bearer","expires_in":"3600"}"#.utf8))
        #expect(response.expiresIn == 3600 && response.tokenType == "bearer")
    }

    @Test func aPasswordGrantRefusalIsInvalidCredentialsNotASessionFailure() async throws {
        let server = FakeTokenServer()
        server.answer(.oauthError(status: 400, error: "invalid_grant"))
        await #expect { try await server.client().password(username: "a", password: "b") } throws: {
            ($0 as? AuthError)?.code == .invalidCredentials && ($0 as? AuthError)?.oauthError == "invalid_grant"
        }
    }

    @Test func aTokenResponseWithoutAnAccessTokenIsRefused() async throws {
        struct Garbage: HTTPTransport {
            func send(_ request: HTTPExchange) async throws -> (status: Int, body: Data) { (200, Data(#"{"token_type":"Bearer"}"#.utf8)) }
        }
        let client = try OAuthClient(
            configuration: OAuthConfiguration(tokenEndpoint: URL(string: "https://auth.example.com/token")!, clientID: "app"),
            transport: Garbage())
        await #expect { try await client.refresh(refreshToken: "r") } throws: { ($0 as? AuthError)?.code == .invalidResponse }
    }

    @Test func theJWTExpClaimIsRead() throws {
        let exp = Date(timeIntervalSince1970: 2_000_000_000)
        #expect(try JWTExpiry.expiry(of: jwt(exp: exp)) == exp)
        #expect(try JWTExpiry.expiry(of: "opaque-token") == nil)
        #expect(try JWTExpiry.expiry(of: "a.!!!.c") == nil)
        // base64url's own letters (- and _ for + and /), without its padding: ">>>" and "???"
        // are "Pj4-" and "Pz8_".
        let payload = Data(#"{"exp":2000000000,"x":">>>???"}"#.utf8).base64EncodedString()
        try #require(payload.contains("+") && payload.contains("/") && payload.hasSuffix("="), "\(payload)")
        let url = payload.replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
        #expect(try JWTExpiry.expiry(of: "e30.\(url).sig") == exp)
        // An exp of 1e300 is refused with a clear error instead of trapping.
        #expect(throws: AuthError.self) { try JWTExpiry.expiry(of: jwt(rawExp: "1e300")) }
    }
}
