import Foundation

/// The steps of the demo, told with the tabs' own lines. Every wait is for a specific line
/// with a deadline; the only plain sleeps wait for an access token to expire.
final class Story {
    struct Settings {
        var accessTTL: Int
        var expiries: Int
        var timeout: Double
    }

    /// One expiry: who refreshed, and the token fingerprint each tab got.
    private struct Round {
        var refreshers: [String]
        var fingerprints: [String: String]
        var agreed: Bool { refreshers.count == 1 && Set(fingerprints.values).count == 1 }
    }

    private let tabs: [Child]
    private let server: URL
    private let console: Console
    private let hub: Hub
    private let settings: Settings
    private var checks: [(passed: Bool, text: String)] = []
    private var rounds: [Round] = []
    /// Every access token a tab returned, to check that none shows up anywhere else.
    private var tokens: Set<String> = []
    private let key = "theme", value = "dark"

    init(tabs: [Child], server: URL, console: Console, hub: Hub, settings: Settings) {
        self.tabs = tabs
        self.server = server
        self.console = console
        self.hub = hub
        self.settings = settings
    }

    private var stepCount: Int { 6 }
    private var first: Child { tabs[0] }
    private var setter: Child { tabs[1] }
    private var loggerOut: Child { tabs[min(3, tabs.count) - 1] }
    private var victim: Child { tabs[min(2, tabs.count) - 1] }

    /// Tells the whole story; true when every check agreed.
    func tell() throws(DemoFailure) -> Bool {
        try signIn()
        try setAppKey()
        for round in 1...settings.expiries { try expire(round: round) }
        try signOut()
        try revokeEverything()
        return try summarise()
    }

    // MARK: Steps

    private func signIn() throws(DemoFailure) {
        console.narrate("1/\(stepCount) Sign in at \(first.name)",
                        "`login alice wonderland` at \(first.name): every tab should report a session event, state signedIn.")
        try expectOK(first, "login alice wonderland", shown: "login alice *********")
        let events = try everyTab(tabs, "session signedIn event", where: session("signedIn"))
        check(origins(events) == [first.name], "every tab reported signedIn by \(first.name)")
    }

    private func setAppKey() throws(DemoFailure) {
        console.narrate("2/\(stepCount) An application key",
                        "`set \(key) \(value)` at \(setter.name): every other tab should print a storage event (\(setter.name) itself does not).")
        let reply = try expectOK(setter, "set \(key) \(value)")
        let others = tabs.filter { $0 !== setter }
        let events = try everyTab(others, "storage event for \(key)") {
            $0["type"] as? String == "storage" && $0["key"] as? String == key
        }
        let seq = integer(reply["seq"])
        let agreed = events.allSatisfy {
            $0["newValue"] as? String == value && $0["origin"] as? String == setter.name && integer($0["seq"]) == seq
        }
        check(agreed, "every other tab saw \(key) = \"\(value)\" set by \(setter.name)"
              + (seq.map { " (seq \($0))" } ?? ""))
    }

    private func expire(round: Int) throws(DemoFailure) {
        console.narrate(
            "3/\(stepCount) Access token expiry \(round) of \(settings.expiries)",
            """
            Wait until the access token has expired, then send `token` to every tab at the same moment.
            Exactly one tab should refresh (refreshedHere), every tab should get the same new token,
            and every tab should report a session event, state refreshed.
            """)
        let expiredAt = try waitForExpiry()
        console.line("demo", "» token, to every tab at once", tone: .sent)
        for tab in tabs { try tab.send("token", shown: nil) }
        let deadline = Date(timeIntervalSinceNow: settings.timeout)
        var current = Round(refreshers: [], fingerprints: [:])
        var fresh = true
        for tab in tabs {
            let reply = try self.reply(tab, to: "token", until: deadline)
            guard reply["type"] as? String == "token", let token = reply["accessToken"] as? String else {
                check(false, "\(tab.name) got no token: \(errorText(reply))")
                continue
            }
            tokens.insert(token)
            current.fingerprints[tab.name] = fingerprint(token)
            if reply["refreshedHere"] as? Bool == true { current.refreshers.append(tab.name) }
            if (integer(reply["expiresAt"]) ?? 0) <= expiredAt { fresh = false }
        }
        rounds.append(current)
        check(current.refreshers.count == 1,
              current.refreshers.count == 1
                ? "exactly one tab refreshed: \(current.refreshers[0])"
                : "\(current.refreshers.count) tabs refreshed (\(current.refreshers.joined(separator: ", "))), not exactly one")
        let distinct = Set(current.fingerprints.values).sorted()
        check(distinct.count == 1 && current.fingerprints.count == tabs.count,
              distinct.count == 1
                ? "every tab got the same access token, \(distinct[0])"
                : "the tabs got different access tokens: "
                    + tabs.map { "\($0.name) \(current.fingerprints[$0.name] ?? "none")" }.joined(separator: ", "))
        check(fresh, "the token is a new one: it expires later than the expired one")
        let events = try everyTab(tabs, "session refreshed event", where: session("refreshed"))
        let expected = current.refreshers.count == 1 ? [current.refreshers[0]] : nil
        check(expected.map { origins(events) == Set($0) } ?? false,
              "every tab reported the session refreshed by \(expected?[0] ?? "one tab"); origins seen: "
                + origins(events).sorted().joined(separator: ", "))
    }

    private func signOut() throws(DemoFailure) {
        console.narrate("4/\(stepCount) Sign out at \(loggerOut.name)",
                        "`logout` at \(loggerOut.name): every tab should report signedOut, reason userLogout.")
        try expectOK(loggerOut, "logout")
        let events = try everyTab(tabs, "session signedOut event", where: session("signedOut", reason: "userLogout"))
        check(origins(events) == [loggerOut.name], "every tab reported signedOut (userLogout) by \(loggerOut.name)")
    }

    private func revokeEverything() throws(DemoFailure) {
        console.narrate(
            "5/\(stepCount) The server revokes every refresh token",
            """
            Sign in again at \(first.name), then POST /admin/revoke-all at the token server. After the access
            token has expired, `token` at \(victim.name) must fail with refreshFailed, and every tab should
            report signedOut, reason refreshFailed.
            """)
        try expectOK(first, "login alice wonderland", shown: "login alice *********")
        let signedIn = try everyTab(tabs, "session signedIn event", where: session("signedIn"))
        check(origins(signedIn) == [first.name], "every tab reported signedIn by \(first.name) again")
        console.line("demo", "» POST /admin/revoke-all", tone: .sent)
        let answer = try HTTP.json("POST", server.appendingPathComponent("admin/revoke-all"), timeout: settings.timeout)
        let revoked = integer(answer["revoked"])
        console.line("demo", "« the server revoked \(revoked.map(String.init) ?? "?") refresh token famil\(revoked == 1 ? "y" : "ies")")
        _ = try waitForExpiry()
        try victim.send("token")
        let reply = try self.reply(victim, to: "token", until: Date(timeIntervalSinceNow: settings.timeout))
        let refused = reply["type"] as? String == "error" && reply["code"] as? String == "refreshFailed"
        check(refused, refused ? "\(victim.name) got error refreshFailed" : "\(victim.name) expected error refreshFailed, got \(errorText(reply))")
        guard refused else { return }
        let events = try everyTab(tabs, "session signedOut event", where: session("signedOut", reason: "refreshFailed"))
        check(origins(events) == [victim.name], "every tab reported signedOut (refreshFailed) by \(victim.name)")
    }

    /// The most CPU a tab may use over the story, as a share of one core. The tabs spend most of
    /// it waiting; start-up and the story's commands take a few percent.
    static let maximumCPUShare = 0.25

    private func summarise() throws(DemoFailure) -> Bool {
        console.narrate("6/\(stepCount) Summary", "What every tab saw, and what the token server counted.")

        // The application key, read back everywhere.
        var values: [String] = []
        for tab in tabs {
            let reply = try expectReply(tab, "get \(key)")
            values.append(reply["type"] as? String == "value" ? Describe.quote(reply["value"]) : errorText(reply))
        }
        check(values.allSatisfy { $0 == "\"\(value)\"" },
              Set(values).count == 1 ? "every tab reads \(key) = \(values[0])"
                                     : "the tabs read different values for \(key): \(values.joined(separator: ", "))")

        // Storage events: once in every tab but the one that set it.
        let storageCounts = tabs.map { tab in tab.output.filter { $0.object?["type"] as? String == "storage" }.count }
        let storageAsExpected = zip(tabs, storageCounts).allSatisfy { tab, count in count == (tab === setter ? 0 : 1) }
        check(storageAsExpected,
              "one storage event in every tab but \(setter.name), none there (counts: "
                + zip(tabs, storageCounts).map { "\($0.name) \($1)" }.joined(separator: ", ") + ")")

        // Session states, in order, everywhere.
        let histories = tabs.map(sessionHistory)
        let expected = ["signedIn"] + Array(repeating: "refreshed", count: settings.expiries)
            + ["signedOut(userLogout)", "signedIn", "signedOut(refreshFailed)"]
        let states = histories.map { $0.map(\.state) }
        let sameEverywhere = Set(histories.map { $0.map(\.full) }).count == 1
        console.line("demo", "session states seen by \(first.name): " + states[0].joined(separator: " → "))
        for (tab, history) in zip(tabs, states).dropFirst() where history != states[0] {
            console.line("demo", "session states seen by \(tab.name): " + history.joined(separator: " → "), tone: .warning)
        }
        check(sameEverywhere, "every tab saw the same sequence of session events (states, reasons, origins, seq)")
        check(states[0] == expected, "the sequence is the expected one (\(expected.count) events)")

        // Tokens.
        check(rounds.count == settings.expiries && rounds.allSatisfy { $0.agreed && $0.fingerprints.count == tabs.count },
              (settings.expiries == 1 ? "at the expiry" : "at each of the \(settings.expiries) expiries")
                + " exactly one tab refreshed and all got the same token")
        let leaks = tabs.flatMap { tab in
            tab.output.filter { $0.object?["type"] as? String != "token" && tokens.contains(where: $0.text.contains) }
                .map { _ in tab.name }
        }
        check(leaks.isEmpty, leaks.isEmpty ? "no access token appeared outside a `token` reply"
                                           : "an access token appeared outside a `token` reply in \(Set(leaks).sorted().joined(separator: ", "))")
        let problems = tabs.flatMap { tab in
            tab.output.filter { $0.object == nil || ($0.object?["type"] as? String == "error" && $0.object?["cmd"] == nil) }
                .map { _ in tab.name }
        }
        if !problems.isEmpty {
            console.line("demo", "note: error events or unreadable lines in \(Set(problems).sorted().joined(separator: ", ")) (shown above)",
                         tone: .warning)
        }

        // CPU: a tab at rest sleeps, so over the whole story each uses a small share of a core
        // (a tab whose loop spun would use most of one).
        let usage = tabs.map { tab in (tab, tab.cpuSeconds, Date().timeIntervalSince(tab.startedAt)) }
        console.line("demo", "CPU time over the story: " + usage.map { tab, cpu, wall in
            "\(tab.name) \(cpu.map { String(format: "%.2f s", $0) } ?? "?") of \(String(format: "%.0f s", wall))"
        }.joined(separator: ", "))
        let busiest = usage.compactMap { _, cpu, wall in cpu.map { $0 / max(wall, 1) } }.max() ?? 1
        check(usage.allSatisfy { $0.1 != nil } && busiest < Self.maximumCPUShare,
              String(format: "every tab used under %.0f %% of a core (the busiest %.1f %%)", Self.maximumCPUShare * 100, busiest * 100))

        // The server's side.
        let stats = try HTTP.json("GET", server.appendingPathComponent("stats"), timeout: settings.timeout)
        let count = { (name: String) in integer(stats[name]) ?? -1 }
        console.line("demo", "« GET /stats: " + ["password", "refresh", "refreshFailed", "reused", "revoke"]
            .map { "\($0) \(count($0))" }.joined(separator: ", "))
        let expiries = settings.expiries
        console.line("demo", "access token expiries: \(expiries), plus the one after revoke-all")
        check(count("refresh") == expiries + 1,
              "refresh requests at the server: \(count("refresh")), expected \(expiries + 1) = one per expiry (\(expiries)) "
                + "+ the one refused after revoke-all")
        check(count("refreshFailed") == 1, "refused refresh requests: \(count("refreshFailed")), expected 1 (after revoke-all)")
        check(count("reused") == 0, "refresh tokens presented twice: \(count("reused")), expected 0")
        check(count("password") == 2, "password grants: \(count("password")), expected 2 (two sign-ins)")

        let failed = checks.filter { !$0.passed }
        console.write("")
        if failed.isEmpty {
            console.write(console.paint("All \(checks.count) checks agreed.", "1;32"))
        } else {
            console.write(console.paint("\(failed.count) of \(checks.count) checks failed:", "1;31"))
            for check in failed { console.write("  - " + check.text) }
        }
        return failed.isEmpty
    }

    // MARK: Helpers

    private func check(_ passed: Bool, _ text: String) {
        checks.append((passed, text))
        console.check(passed, text)
    }

    /// The first reply to `command` (its first word) at `tab` not yet claimed.
    private func reply(_ tab: Child, to command: String, until deadline: Date) throws(DemoFailure) -> [String: Any] {
        try tab.waitForObject("reply to `\(command)`", until: deadline) { object in
            let type = object["type"] as? String
            if type == "error", object["cmd"] as? String == command { return true }
            return switch command {
            case "token": type == "token"
            case "get": type == "value"
            case "status": type == "status"
            default: type == "ok" && object["cmd"] as? String == command
            }
        }
    }

    /// Sends a command and waits for its reply (which may be an error).
    private func expectReply(_ tab: Child, _ command: String, shown: String? = nil) throws(DemoFailure) -> [String: Any] {
        try tab.send(command, shown: shown ?? command)
        let verb = String(command.prefix { $0 != " " })
        return try reply(tab, to: verb, until: Date(timeIntervalSinceNow: settings.timeout))
    }

    /// Sends a command that must succeed; an error reply stops the story.
    @discardableResult
    private func expectOK(_ tab: Child, _ command: String, shown: String? = nil) throws(DemoFailure) -> [String: Any] {
        let reply = try expectReply(tab, command, shown: shown)
        let verb = String(command.prefix { $0 != " " })
        guard reply["type"] as? String == "ok" else {
            throw DemoFailure("\(tab.name) could not carry out `\(verb)`: \(errorText(reply))")
        }
        return reply
    }

    /// Waits, in every tab of `group`, for one unclaimed line matching; one deadline for all.
    private func everyTab(_ group: [Child], _ description: String, where predicate: ([String: Any]) -> Bool) throws(DemoFailure) -> [[String: Any]] {
        let deadline = Date(timeIntervalSinceNow: settings.timeout)
        var found: [[String: Any]] = []
        for tab in group { found.append(try tab.waitForObject(description, until: deadline, where: predicate)) }
        return found
    }

    private func session(_ state: String, reason: String? = nil) -> ([String: Any]) -> Bool {
        { object in
            object["type"] as? String == "session" && object["state"] as? String == state
                && (reason == nil || object["reason"] as? String == reason)
        }
    }

    private func origins(_ events: [[String: Any]]) -> Set<String> {
        Set(events.map { $0["origin"] as? String ?? "?" })
    }

    private func errorText(_ reply: [String: Any]) -> String {
        guard reply["type"] as? String == "error" else { return "a \(reply["type"] as? String ?? "?") line" }
        return "error \(reply["code"] as? String ?? "?"): \(reply["message"] as? String ?? "")"
    }

    /// The session events a tab printed, in order.
    private func sessionHistory(_ tab: Child) -> [(state: String, full: String)] {
        tab.output.compactMap(\.object).filter { $0["type"] as? String == "session" }.map { event in
            let state = event["state"] as? String ?? "?"
            let shown = (event["reason"] as? String).map { "\(state)(\($0))" } ?? state
            let full = "\(shown) by \(event["origin"] as? String ?? "?") seq \(integer(event["seq"]).map(String.init) ?? "?")"
            return (shown, full)
        }
    }

    /// Asks the first tab when the access token expires, then sleeps until a second after that.
    /// Returns the expiry (UNIX milliseconds).
    private func waitForExpiry() throws(DemoFailure) -> Int {
        let status = try expectReply(first, "status")
        guard status["type"] as? String == "status", status["state"] as? String == "signedIn",
              let expiresAt = integer(status["expiresAt"])
        else {
            throw DemoFailure("\(first.name) reports no signed-in session with an access token expiry: \(Describe.tabLine(OutputLine(serialised(status))).text)")
        }
        let wait = max(0, Double(expiresAt - nowMilliseconds()) / 1000 + 1)
        console.line("demo", "waiting \(seconds(wait)) s, until 1 s after the access token expires (the only plain sleep)")
        try hub.pause(wait)
        return expiresAt
    }

    private func serialised(_ object: [String: Any]) -> String {
        (try? JSONSerialization.data(withJSONObject: object)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
    }
}
