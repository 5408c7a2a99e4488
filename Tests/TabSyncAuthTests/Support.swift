import Foundation
import Synchronization
import Testing
@testable import TabSyncAuth

/// A fresh session directory under the system's temporary directory, removed afterwards.
struct TemporaryDirectory: ~Copyable {
    let path: String

    init() {
        path = "\(FileManager.default.temporaryDirectory.path)/tabsync-auth-test-\(UUID().uuidString.prefix(8))"
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// An in-memory token endpoint with refresh-token rotation, for unit tests. The real-server
/// tests (IntegrationTests) run against django-oauth-toolkit; this one lets a test script
/// failures and count exactly what was presented.
final class FakeTokenServer: HTTPTransport {
    enum Answer: Sendable {
        /// Issue new tokens (rotation: a new refresh token each time).
        case tokens
        /// An RFC 6749 §5.2 error body with this status.
        case oauthError(status: Int, error: String)
        /// A status with an empty body.
        case empty(status: Int)
        /// The connection failed before the request was sent.
        case unreachable
        /// The request arrived and was acted on (a rotation), but its answer was lost.
        case lost

        var status: Int? {
            switch self {
            case let .oauthError(status, _), let .empty(status): status
            case .tokens, .unreachable, .lost: nil
            }
        }
    }

    struct State {
        var answers: [Answer] = []
        var presentedRefreshTokens: [String] = []
        var requests: [HTTPExchange] = []
        var issued = 0
        var valid: Set<String> = []
        var delay: Duration = .zero
        /// A reuse grace period: a refresh token presented before is accepted again.
        var acceptReuse = false
    }

    let state = Mutex(State())
    let expiresIn: Int

    init(expiresIn: Int = 3600) {
        self.expiresIn = expiresIn
    }

    /// Queues answers for the next requests; without one queued, tokens are issued.
    func answer(_ answers: Answer...) {
        state.withLock { $0.answers += answers }
    }

    var refreshCount: Int { state.withLock { $0.presentedRefreshTokens.count } }
    var presented: [String] { state.withLock { $0.presentedRefreshTokens } }
    var requests: [HTTPExchange] { state.withLock { $0.requests } }

    /// Issues a first token pair, as a sign-in elsewhere would.
    func issue() -> (access: String, refresh: String) {
        state.withLock { state in
            state.issued += 1
            let pair = ("access-\(state.issued)", "refresh-\(state.issued)")
            state.valid.insert(pair.1)
            return pair
        }
    }

    func send(_ request: HTTPExchange) async throws -> (status: Int, body: Data) {
        let form = Self.form(request.body)
        let (answer, delay): (Answer, Duration) = state.withLock { state in
            state.requests.append(request)
            if form["grant_type"] == "refresh_token", let token = form["refresh_token"] {
                state.presentedRefreshTokens.append(token)
            }
            return (state.answers.isEmpty ? .tokens : state.answers.removeFirst(), state.delay)
        }
        if delay > .zero { try await Task.sleep(for: delay) }
        switch answer {
        case .unreachable:
            throw URLError(.cannotConnectToHost)
        case .lost:
            // The server rotates the token, then the connection drops before the answer.
            state.withLock { state in
                if let token = form["refresh_token"] { state.valid.remove(token) }
            }
            throw URLError(.networkConnectionLost)
        case let .empty(status):
            return (status, Data())
        case let .oauthError(status, error):
            return (status, Data(#"{"error":"\#(error)","error_description":"scripted"}"#.utf8))
        case .tokens:
            if request.url.path.hasSuffix("revoke") { return (200, Data()) }
            let refused: Bool = state.withLock { state in
                guard form["grant_type"] == "refresh_token" else { return false }
                // Rotation with reuse detection: a refresh token works once.
                let token = form["refresh_token"] ?? ""
                if state.acceptReuse, state.presentedRefreshTokens.dropLast().contains(token) { return false }
                return state.valid.remove(token) == nil
            }
            if refused { return (400, Data(#"{"error":"invalid_grant"}"#.utf8)) }
            let (access, refresh) = issue()
            let body = #"{"access_token":"\#(access)","token_type":"Bearer","expires_in":\#(expiresIn),"refresh_token":"\#(refresh)"}"#
            return (200, Data(body.utf8))
        }
    }

    static func form(_ body: Data) -> [String: String] {
        var fields: [String: String] = [:]
        for pair in String(decoding: body, as: UTF8.self).split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1).map { String($0).removingPercentEncoding ?? String($0) }
            if parts.count == 2 { fields[parts[0]] = parts[1] }
        }
        return fields
    }

    func client(authentication: OAuthConfiguration.ClientAuthentication = .basic) throws -> OAuthClient {
        try OAuthClient(
            configuration: OAuthConfiguration(
                tokenEndpoint: URL(string: "http://127.0.0.1:9/token")!, revocationEndpoint: URL(string: "http://127.0.0.1:9/revoke")!,
                clientID: "app", clientSecret: "s3cret", clientAuthentication: authentication),
            transport: self)
    }
}

/// Waits for the first event (of a session, or a storage) that matches, failing after `timeout`.
@discardableResult
func waitFor<Event: Sendable>(
    _ events: AsyncStream<Event>, timeout: Duration = .seconds(30),
    sourceLocation: SourceLocation = #_sourceLocation, where matches: @escaping @Sendable (Event) -> Bool
) async -> Event? {
    let found = await withTaskGroup(of: Event?.self) { group in
        group.addTask {
            for await event in events where matches(event) { return event }
            return nil
        }
        group.addTask {
            try? await Task.sleep(for: timeout)
            return nil
        }
        let first = await group.next() ?? nil
        group.cancelAll()
        return first
    }
    if found == nil {
        Issue.record("Timed out after \(timeout) waiting for an event", sourceLocation: sourceLocation)
    }
    return found
}

/// A JWT with the given `exp` claim (unsigned; the client reads it only to schedule refreshes).
func jwt(exp: Date) -> String { jwt(rawExp: String(Int(exp.timeIntervalSince1970))) }

/// A JWT whose `exp` claim is the JSON number text `rawExp`.
func jwt(rawExp: String) -> String {
    func encode(_ text: String) -> String {
        Data(text.utf8).base64EncodedString().replacingOccurrences(of: "+", with: "-")
            .replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
    }
    return "\(encode(#"{"alg":"none"}"#)).\(encode(#"{"sub":"alice","exp":\#(rawExp)}"#))."
}

/// Every file under `directory` (its folders too: compactions write in `.compacting`), with its
/// contents, by its path relative to `directory`.
func filesIn(_ directory: String) throws -> [(name: String, contents: Data)] {
    let enumerator = FileManager.default.enumerator(atPath: directory)
    var files: [(name: String, contents: Data)] = []
    while let name = enumerator?.nextObject() as? String {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: "\(directory)/\(name)", isDirectory: &isDirectory), !isDirectory.boolValue else { continue }
        files.append((name, try Data(contentsOf: URL(fileURLWithPath: "\(directory)/\(name)"))))
    }
    return files
}
