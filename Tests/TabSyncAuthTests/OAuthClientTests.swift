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

    @Test(arguments: [
        (FakeTokenServer.Answer.oauthError(status: 400, error: "invalid_grant"), AuthError.Code.refreshFailed),
        (.oauthError(status: 401, error: "invalid_client"), .invalidClient),
        (.oauthError(status: 400, error: "invalid_scope"), .server),
        (.empty(status: 400), .server),
        (.empty(status: 401), .invalidClient),
        (.empty(status: 503), .network),
        (.empty(status: 429), .network),
        (.unreachable, .network),
    ])
    func errorResponsesMapToTypedErrors(answer: FakeTokenServer.Answer, expected: AuthError.Code) async throws {
        let server = FakeTokenServer()
        server.answer(answer)
        await #expect { try await server.client().refresh(refreshToken: "r") } throws: { ($0 as? AuthError)?.code == expected }
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

    @Test func theJWTExpClaimIsRead() {
        let exp = Date(timeIntervalSince1970: 2_000_000_000)
        #expect(JWTExpiry.expiry(of: jwt(exp: exp)) == exp)
        #expect(JWTExpiry.expiry(of: "opaque-token") == nil)
        #expect(JWTExpiry.expiry(of: "a.!!!.c") == nil)
    }
}
