import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// 16 `tab` processes doing random storage and session operations against the real
/// authorization server, with the invariants checked at the end of the run:
/// sequence numbers strictly increasing in every process, every process ending with the same
/// state, refresh requests at the server matching the refreshes the tabs saw, and no refresh
/// token presented twice.
///
/// The run lasts `TABSYNC_SOAK_SECONDS` (default 20, the CI version); for the 10-minute soak:
/// `TABSYNC_SOAK_SECONDS=600 scripts/test --filter AuthSoakTests`.
@Suite(.serialized, .timeLimit(.minutes(20)))
struct AuthSoakTests {
    static let seconds = Int(ProcessInfo.processInfo.environment["TABSYNC_SOAK_SECONDS"] ?? "") ?? 20
    static let keys = (0..<8).map { "k\($0)" }

    /// One random command, weighted: mostly storage changes and token requests, now and then
    /// activity or a status; rarely a sign-out, and a sign-in soon after one (a sign-in while
    /// signed in starts a new session, so it is only sent by a tab that saw the session end).
    static func randomCommand(_ generator: inout some RandomNumberGenerator, counter: Int, signedIn: Bool) -> String {
        let key = keys.randomElement(using: &generator)!
        switch Int.random(in: 0..<10_000, using: &generator) {
        case 0..<3_500: return "set \(key) v\(counter)"
        case 3_500..<4_500: return "remove \(key)"
        case 4_500..<4_600: return "clear"
        case 4_600..<8_000: return "token"
        case 8_000..<9_000: return "activity"
        case 9_000..<9_990: return signedIn ? "status" : "login alice wonderland"
        default: return signedIn ? "logout" : "login alice wonderland"
        }
    }

    @Test func sixteenProcessesAgreeThroughRandomOperations() async throws {
        let server = try await AuthorizationServer(accessTTL: 3)
        let directory = temporaryDirectory("soak")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var tabs: [ChildProcess] = []
        for index in 0..<16 {
            tabs.append(try await launchTab(name: "soak-\(index)", directory: directory, extra: server.tabArguments))
        }
        defer { tabs.forEach { $0.stop() } }
        tabs[0].send("login alice wonderland")
        try await tabs[0].waitFor("login") { $0["type"] as? String == "ok" && $0["cmd"] as? String == "login" }

        // Each tab gets a command when its previous one was answered, so every process is busy
        // all the time without an unbounded backlog.
        var generator = SystemRandomNumberGenerator()
        var sent = Array(repeating: 1, count: tabs.count)
        sent[0] += 1
        var answered = Array(repeating: 0, count: tabs.count)
        var read = Array(repeating: 0, count: tabs.count)
        var signedIn = Array(repeating: true, count: tabs.count)
        var counter = 0
        let end = ContinuousClock.now + .seconds(Self.seconds)
        while ContinuousClock.now < end {
            for (index, tab) in tabs.enumerated() {
                // Every command gets exactly one reply; `ready` counted as the first.
                let lines = tab.output
                for line in lines[read[index]...] {
                    guard let object = (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: any Sendable] else { continue }
                    if Self.isReply(object) { answered[index] += 1 }
                    if object["type"] as? String == "session" { signedIn[index] = object["state"] as? String != "signedOut" }
                }
                read[index] = lines.count
                if answered[index] >= sent[index] {
                    counter += 1
                    tab.send(Self.randomCommand(&generator, counter: counter, signedIn: signedIn[index]))
                    sent[index] += 1
                }
                if !tab.process.isRunning { throw TestFailure("\(tab.name) exited: \(tab.standardError)") }
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        for (index, tab) in tabs.enumerated() {
            try await tab.waitFor("the last replies", count: sent[index], timeout: .seconds(60)) { Self.isReply($0) }
        }

        // The same final state everywhere.
        var finals: [String] = []
        for tab in tabs {
            var final: [String] = []
            let status = try await tab.ask("status", expecting: ["status"])
            final.append("\(status["state"] ?? "") \(status["seq"] ?? "")")
            for key in Self.keys {
                let value = try await tab.ask("get \(key)", expecting: ["value"])
                final.append("\(key)=\(value["value"] ?? "")")
            }
            finals.append(final.joined(separator: " "))
        }
        #expect(Set(finals).count == 1, "final states differ:\n\(finals.joined(separator: "\n"))")

        // Sequence numbers strictly increase in every process, for each storage.
        for tab in tabs {
            for type in ["storage", "session"] {
                let sequences = tab.objects.filter { $0["type"] as? String == type }.compactMap { ($0["seq"] as? NSNumber)?.intValue }
                #expect(zip(sequences, sequences.dropFirst()).allSatisfy { $0 < $1 }, "\(tab.name): \(type) seq not increasing")
            }
        }

        // The server saw one refresh request per refresh the tabs announced, plus refreshes whose
        // result was discarded because the session ended (or began anew) meanwhile; none refused.
        let refreshed = Set(tabs.flatMap { tab in
            tab.objects.filter { $0["type"] as? String == "session" && $0["state"] as? String == "refreshed" }
                .compactMap { ($0["seq"] as? NSNumber)?.intValue }
        })
        let discarded = tabs.map { tab in
            tab.objects.count { $0["type"] as? String == "error" && $0["cmd"] as? String == "token" && ($0["message"] as? String)?.contains("during the refresh") == true }
        }.reduce(0, +)
        let refusals = tabs.flatMap { $0.objects }.filter { ($0["code"] as? String) == "refreshFailed" || ($0["reason"] as? String) == "refreshFailed" }
        let stats = try await server.stats()
        #expect(stats.reused == 0, "a refresh token was presented twice")
        #expect(refusals.isEmpty, "\(refusals.prefix(3))")
        #expect(stats.refresh == refreshed.count + discarded, "server \(stats.refresh), announced \(refreshed.count), discarded \(discarded)")
        #expect(!refreshed.isEmpty, "the run was too short to see an expiry")
        let commands = sent.reduce(0, +) - tabs.count
        print("soak: \(Self.seconds) s, \(tabs.count) processes, \(commands) commands, \(refreshed.count) refreshes, server refresh requests \(stats.refresh), reused 0")
    }

    static func isReply(_ object: [String: any Sendable]) -> Bool {
        switch object["type"] as? String {
        case "ready", "ok", "value", "token", "status": true
        case "error": object["cmd"] != nil
        default: false
        }
    }
}
