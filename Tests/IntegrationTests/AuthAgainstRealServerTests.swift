import Foundation
import Synchronization
import Testing

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
#if canImport(Glibc)
import Glibc
#endif

/// django-oauth-toolkit, started by the test on 127.0.0.1 (Tests/AuthServer), with refresh-token
/// rotation and reuse protection on and access tokens of a few seconds.
final class AuthorizationServer: Sendable {
    let process: ChildProcess
    let base: String
    let accessTTL: Int
    /// The client secret, in a 0600 file: tabs read it with --client-secret-file, off the command line.
    let secretFile: String

    init(accessTTL: Int = 3, grace: Int = 0) async throws {
        let data = temporaryDirectory("authserver")
        try FileManager.default.createDirectory(atPath: data, withIntermediateDirectories: true)
        secretFile = "\(data)/client-secret"
        _ = FileManager.default.createFile(atPath: secretFile, contents: Data("tabsync-secret\n".utf8), attributes: [.posixPermissions: 0o600])
        process = try ChildProcess(
            "\(repositoryRoot)/Tests/AuthServer/serve",
            ["--port", "0", "--data", data, "--access-ttl", String(accessTTL), "--grace", String(grace)], name: "authserver")
        self.accessTTL = accessTTL
        let deadline = ContinuousClock.now + .seconds(180)
        var ready: String?
        while ready == nil {
            ready = process.output.first { $0.hasPrefix("READY ") }
            if ready != nil { break }
            guard process.process.isRunning, ContinuousClock.now < deadline else {
                throw TestFailure("the authorization server did not start: \(process.standardError)")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        base = String(ready!.dropFirst("READY ".count))
    }

    var tabArguments: [String] {
        ["--token-endpoint", "\(base)/o/token/", "--revocation-endpoint", "\(base)/o/revoke_token/",
         "--client-id", "tabsync-test", "--client-secret-file", secretFile, "--leeway", "1"]
    }

    func stats() async throws -> (refresh: Int, reused: Int, inFlight: Int) {
        let stats = try await httpJSON("GET", "\(base)/test/stats")
        let reused = try await httpJSON("GET", "\(base)/test/reused")
        return ((stats["refresh"] as? NSNumber)?.intValue ?? -1, (reused["reused"] as? NSNumber)?.intValue ?? -1,
                (stats["refresh_in_flight"] as? NSNumber)?.intValue ?? -1)
    }

    /// Waits until the server has answered every refresh request it received.
    func waitUntilRefreshesAnswered(timeout: Duration = .seconds(30)) async throws {
        let deadline = ContinuousClock.now + timeout
        while try await stats().inFlight != 0 {
            guard ContinuousClock.now < deadline else { throw TestFailure("a refresh request was still in flight after \(timeout)") }
            try await Task.sleep(for: .milliseconds(50))
        }
    }

    deinit { process.stop() }
}

/// `count` tabs (`PREFIX-0`, `PREFIX-1`, …) with `arguments`, signed in at the first with the
/// password grant; returns once every tab has reported the sign-in.
func signedInTabs(_ count: Int, directory: String, arguments: [String], prefix: String = "tab") async throws -> [ChildProcess] {
    var tabs: [ChildProcess] = []
    for index in 0..<count {
        tabs.append(try await launchTab(name: "\(prefix)-\(index)", directory: directory, extra: arguments))
    }
    tabs[0].send("login alice wonderland")
    try await tabs[0].waitFor("login ok") { $0["type"] as? String == "ok" && $0["cmd"] as? String == "login" }
    for tab in tabs {
        try await tab.waitFor("signedIn") { $0["type"] as? String == "session" && $0["state"] as? String == "signedIn" }
    }
    return tabs
}

/// Waits until the access token `tab` reports has expired (plus 0.1 s).
func waitForExpiry(_ tab: ChildProcess) async throws {
    let status = try await tab.ask("status", expecting: ["status"])
    let expiresAt = (status["expiresAt"] as? NSNumber)?.doubleValue ?? 0
    let wait = expiresAt / 1000 - Date().timeIntervalSince1970 + 0.1
    if wait > 0 { try await Task.sleep(for: .milliseconds(Int(wait * 1000))) }
}

@Suite(.serialized, .timeLimit(.minutes(5)))
struct AuthAgainstRealServerTests {
    func signedInTabs(_ count: Int, server: AuthorizationServer, directory: String) async throws -> [ChildProcess] {
        try await IntegrationTests.signedInTabs(count, directory: directory, arguments: server.tabArguments)
    }

    @Test func sixteenProcessesAfterExpiryCauseExactlyOneRefresh() async throws {
        let server = try await AuthorizationServer()
        let directory = temporaryDirectory("storm")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let tabs = try await signedInTabs(16, server: server, directory: directory)
        defer { tabs.forEach { $0.stop() } }
        try await waitForExpiry(tabs[0])
        for tab in tabs { tab.send("token") }
        var replies: [[String: any Sendable]] = []
        for tab in tabs {
            let reply = try await tab.waitFor("token reply") { ["token", "error"].contains($0["type"] as? String) }
            replies.append(reply[0])
        }
        #expect(replies.allSatisfy { $0["type"] as? String == "token" }, "\(replies.filter { $0["type"] as? String == "error" })")
        #expect(replies.filter { $0["refreshedHere"] as? Bool == true }.count == 1)
        #expect(Set(replies.compactMap { $0["accessToken"] as? String }).count == 1)
        for tab in tabs {
            try await tab.waitFor("refreshed") { $0["type"] as? String == "session" && $0["state"] as? String == "refreshed" }
        }
        let stats = try await server.stats()
        #expect(stats.refresh == 1)
        #expect(stats.reused == 0)

        // A second expiry: again one refresh.
        try await waitForExpiry(tabs[0])
        for tab in tabs { tab.send("token") }
        for tab in tabs {
            try await tab.waitFor("second token reply", count: 2) { $0["type"] as? String == "token" }
        }
        #expect(try await server.stats().refresh == 2)
    }

    @Test func aRevokedRefreshTokenSignsEveryProcessOutWithTheReason() async throws {
        let server = try await AuthorizationServer()
        let directory = temporaryDirectory("revoked")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let tabs = try await signedInTabs(4, server: server, directory: directory)
        defer { tabs.forEach { $0.stop() } }
        _ = try await httpJSON("POST", "\(server.base)/test/revoke-all")
        try await waitForExpiry(tabs[0])
        let reply = try await tabs[1].ask("token", expecting: ["token", "error"])
        #expect(reply["code"] as? String == "refreshFailed")
        for tab in tabs {
            try await tab.waitFor("signedOut") {
                $0["type"] as? String == "session" && $0["state"] as? String == "signedOut" && $0["reason"] as? String == "refreshFailed"
            }
        }
        // Visible to a process started later, and the tokens are gone from disk.
        let late = try await launchTab(name: "late", directory: directory, extra: server.tabArguments)
        defer { late.stop() }
        let status = try await late.ask("status", expecting: ["status"])
        #expect(status["state"] as? String == "signedOut" && status["reason"] as? String == "refreshFailed")
        // Every file of the directory, the logs, anything moved aside and the compaction folder included.
        let files = FileManager.default.enumerator(atPath: directory)
        while let file = files?.nextObject() as? String {
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: "\(directory)/\(file)", isDirectory: &isDirectory), !isDirectory.boolValue else { continue }
            let contents = try Data(contentsOf: URL(fileURLWithPath: "\(directory)/\(file)"))
            #expect(contents.range(of: Data(#""refreshToken":""#.utf8)) == nil, "\(file) still holds a refresh token")
        }
    }

    @Test func killingTheRefresherMidRefreshNeverReusesItsRefreshToken() async throws {
        let server = try await AuthorizationServer()
        let directory = temporaryDirectory("killed")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let tabs = try await signedInTabs(3, server: server, directory: directory)
        defer { tabs.forEach { $0.stop() } }
        _ = try await httpJSON("POST", "\(server.base)/test/slow?seconds=4&count=1")
        try await waitForExpiry(tabs[0])
        tabs[0].send("token")
        // Wait until the server has received the refresh, then kill the refresher.
        let deadline = ContinuousClock.now + .seconds(20)
        while try await server.stats().refresh < 1 {
            guard ContinuousClock.now < deadline else { throw TestFailure("the refresh never reached the server") }
            try await Task.sleep(for: .milliseconds(20))
        }
        tabs[0].kill(SIGKILL)
        let reply = try await tabs[1].ask("token", expecting: ["token", "error"])
        // Documented outcome: the interrupted refresh may have rotated the token, so the session ends cleanly.
        #expect(reply["code"] as? String == "refreshFailed")
        for tab in tabs.dropFirst() {
            try await tab.waitFor("signedOut") { $0["type"] as? String == "session" && $0["reason"] as? String == "refreshFailed" }
        }
        try await server.waitUntilRefreshesAnswered() // the slowed request, rotated at the server
        let stats = try await server.stats()
        #expect(stats.reused == 0, "a refresh token was presented twice")
        #expect(stats.refresh == 1)
    }
}
