import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Issue 15, point 6: real `tab` processes sharing one session on PostgreSQL (`tab --postgres`),
/// against the server that scripts/test starts (Support/PostgresServer.swift).
@Suite(.serialized, .timeLimit(.minutes(10)))
struct PostgresSessionTests {
    func store(_ label: String) -> String { "it-\(label)-\(UUID().uuidString.prefix(8).lowercased())" }

    /// Every tab asks for a token once the access token has expired: exactly one refresh at the
    /// server, no refresh token presented twice, one token everywhere.
    func stormAfterExpiry(_ tabs: [ChildProcess], server: AuthorizationServer) async throws {
        try await waitForExpiry(tabs[0])
        for tab in tabs { tab.send("token") }
        var replies: [[String: any Sendable]] = []
        for tab in tabs {
            replies.append(try await tab.waitFor("token reply") { ["token", "error"].contains($0["type"] as? String) }[0])
        }
        #expect(replies.allSatisfy { $0["type"] as? String == "token" }, "\(replies.filter { $0["type"] as? String == "error" })")
        #expect(replies.filter { $0["refreshedHere"] as? Bool == true }.count == 1)
        #expect(Set(replies.compactMap { $0["accessToken"] as? String }).count == 1)
        let stats = try await server.stats()
        #expect(stats.refresh == 1)
        #expect(stats.reused == 0)
    }

    /// `count` tabs on `store`, signed in at the first with the password grant.
    func signedInTabs(_ count: Int, server: AuthorizationServer, store: String) async throws -> [ChildProcess] {
        var tabs: [ChildProcess] = []
        for index in 0..<count {
            tabs.append(try await launchPostgresTab(name: "tab-\(index)", store: store, extra: server.tabArguments))
        }
        tabs[0].send("login alice wonderland")
        try await tabs[0].waitFor("login ok") { $0["type"] as? String == "ok" && $0["cmd"] as? String == "login" }
        for tab in tabs {
            try await tab.waitFor("signedIn") { $0["type"] as? String == "session" && $0["state"] as? String == "signedIn" }
        }
        return tabs
    }

    @Test func fourWriterProcessesAndFourObserversAgreeOnEveryChange() async throws {
        let store = store("storage")
        try await fourWritersAndFourObserversAgree { name in try await launchPostgresTab(name: name, store: store) }
    }

    @Test func sixteenTabsAfterExpiryCauseExactlyOneRefreshAndEndWithOneToken() async throws {
        let server = try await AuthorizationServer()
        let store = store("storm")
        let tabs = try await signedInTabs(16, server: server, store: store)
        defer { tabs.forEach { $0.stop() } }
        try await stormAfterExpiry(tabs, server: server)
    }

    /// Two hosts in network namespaces (where the machine allows it), 8 tabs each, one session.
    @Test func twoHostsOfEightTabsAfterExpiryCauseExactlyOneRefreshAndEndWithOneToken() async throws {
        let server = try await AuthorizationServer()
        let store = store("hosts")
        let postgresPort = URLComponents(string: PostgresServer.shared.url)?.port ?? 5432
        let authPort = URLComponents(string: server.base)?.port ?? 80
        let (hosts, reason) = await SimulatedHosts.make(count: 2, ports: [postgresPort, authPort])
        defer { hosts?.tearDown() }
        if let reason { print("two-host test: every tab on this host, as namespaces are not available here: \(reason)") }
        var tabs: [ChildProcess] = []
        defer { tabs.forEach { $0.stop() } }
        for index in 0..<16 {
            let arguments = PostgresServer.tabArguments(store: store) + ["--name", "host\(index % 2)-tab-\(index / 2)", "--json"] + server.tabArguments
            let (executable, commandLine) = hosts?.command(on: index % 2, "\(productsDirectory)/tab", arguments) ?? ("\(productsDirectory)/tab", arguments)
            let tab = try ChildProcess(executable, commandLine, name: "host\(index % 2)-tab-\(index / 2)", environment: PostgresServer.tabEnvironment)
            tabs.append(tab)
            try await tab.waitFor("ready") { $0["type"] as? String == "ready" }
        }
        if let hosts {
            // Each tab runs in its host's network namespace: its traffic crosses the veth link.
            for (index, tab) in tabs.enumerated() {
                var own = stat(), namespace = stat()
                #expect(stat("/proc/\(tab.process.processIdentifier)/ns/net", &own) == 0 && stat("/run/netns/\(hosts.hosts[index % 2].namespace)", &namespace) == 0)
                #expect(own.st_ino == namespace.st_ino, "\(tab.name) runs in \(hosts.hosts[index % 2].namespace)")
            }
        }
        tabs[0].send("login alice wonderland")
        try await tabs[0].waitFor("login ok") { $0["type"] as? String == "ok" && $0["cmd"] as? String == "login" }
        for tab in tabs {
            try await tab.waitFor("signedIn") { $0["type"] as? String == "session" && $0["state"] as? String == "signedIn" }
        }
        try await stormAfterExpiry(tabs, server: server)
    }

    @Test func aServerRestartDuringWritesLosesNoAcknowledgedChangeAndEveryReaderConverges() async throws {
        let store = store("restart")
        var writers: [ChildProcess] = [], observers: [ChildProcess] = []
        defer { (writers + observers).forEach { $0.stop() } }
        for index in 0..<2 { writers.append(try await launchPostgresTab(name: "writer-\(index)", store: store, extra: ["--lock-timeout", "5"])) }
        for index in 0..<2 { observers.append(try await launchPostgresTab(name: "observer-\(index)", store: store)) }
        let changes = 400
        for (index, writer) in writers.enumerated() {
            writer.send((0..<changes).map { "set w\(index)-k\($0) v\($0)" }.joined(separator: "\n"))
        }
        // Restart in the middle of the writes.
        try await writers[0].waitFor("the first writes", count: 20, timeout: .seconds(60)) { $0["type"] as? String == "ok" }
        PostgresServer.restart()
        var acknowledged: [String: String] = [:]
        var lastSequence = 0
        for (index, writer) in writers.enumerated() {
            let replies = try await writer.waitFor("every reply", count: changes, timeout: .seconds(120)) {
                ["ok", "error"].contains($0["type"] as? String) && $0["cmd"] as? String == "set"
            }
            for (change, reply) in replies.prefix(changes).enumerated() where reply["type"] as? String == "ok" {
                acknowledged["w\(index)-k\(change)"] = "v\(change)"
                lastSequence = max(lastSequence, (reply["seq"] as? NSNumber)?.intValue ?? 0)
            }
            let failures = replies.filter { $0["type"] as? String == "error" }
            #expect(failures.allSatisfy { ["unavailable", "lockTimeout"].contains($0["code"] as? String) }, "\(failures.prefix(3))")
        }
        #expect(acknowledged.count > 20)
        // Every reader converges on the last acknowledged change, with every acknowledged value.
        for observer in observers {
            let events = try await observer.waitFor("the last change", timeout: .seconds(60)) {
                $0["type"] as? String == "storage" && (($0["seq"] as? NSNumber)?.intValue ?? 0) >= lastSequence
            }
            #expect(!events.isEmpty)
            var view: [String: String] = [:]
            for event in observer.objects where event["type"] as? String == "storage" {
                if let key = event["key"] as? String { view[key] = event["newValue"] as? String }
            }
            for (key, value) in acknowledged { #expect(view[key] == value, "\(observer.name) has \(key)") }
        }
        // The restart came during the run: each observer lost its connection and got it back.
        for observer in observers {
            try await observer.waitFor("the reconnection", timeout: .seconds(60)) { $0["type"] as? String == "detection" }
            #expect(observer.objects.contains { $0["type"] as? String == "error" && $0["code"] as? String == "unavailable" })
        }
        let late = try await launchPostgresTab(name: "late", store: store)
        defer { late.stop() }
        late.send(acknowledged.keys.sorted().map { "get \($0)" }.joined(separator: "\n"))
        let values = try await late.waitFor("values", count: acknowledged.count, timeout: .seconds(60)) { $0["type"] as? String == "value" }
        for value in values {
            let key = value["key"] as? String ?? ""
            #expect(value["value"] as? String == acknowledged[key], "no acknowledged change lost: \(key)")
        }
    }

    /// Point 3: hosts' clocks differ, and the session's times come from the database server's.
    /// A tab whose wall clock is a day ahead (libfaketime: what its `Date()` and libc read) sees
    /// the session the others share as they do: not past its idle limit, which by its own clock
    /// it would be.
    @Test func aTabWhoseClockIsADayAheadSeesTheSessionAsTheOthersDo() async throws {
        let library = try #require(RefreshOnceTests.libfaketime, "libfaketime is not installed (scripts/test installs it)")
        let server = try await AuthorizationServer()
        let store = store("skew")
        let arguments = server.tabArguments + ["--idle-timeout", "600"]
        var normal: [ChildProcess] = []
        for index in 0..<2 { normal.append(try await launchPostgresTab(name: "normal-\(index)", store: store, extra: arguments)) }
        defer { normal.forEach { $0.stop() } }
        normal[0].send("login alice wonderland")
        try await normal[0].waitFor("login ok") { $0["type"] as? String == "ok" && $0["cmd"] as? String == "login" }
        let ahead = try ChildProcess(
            "\(productsDirectory)/tab", PostgresServer.tabArguments(store: store) + ["--name", "ahead", "--json"] + arguments, name: "ahead",
            environment: PostgresServer.tabEnvironment.merging(["LD_PRELOAD": library, "FAKETIME": "+1d", "FAKETIME_DONT_RESET": "1"]) { $1 })
        defer { ahead.stop() }
        try await ahead.waitFor("ready") { $0["type"] as? String == "ready" }
        // By its own clock the last activity lies a day back, far past the 600 s idle limit.
        #expect(try await ahead.ask("status", expecting: ["status"])["state"] as? String == "signedIn")
        #expect(try await ahead.ask("activity", expecting: ["ok", "error"])["type"] as? String == "ok")
        #expect(try await normal[1].ask("status", expecting: ["status"])["state"] as? String == "signedIn")
        for tab in normal + [ahead] {
            #expect(!tab.objects.contains(where: RefreshOnceTests.isSignedOut("idleTimeout")), "\(tab.name) was signed out")
        }
    }

    @Test func aRefresherWhoseConnectionIsCutMidRefreshPresentsNoTokenTwice() async throws {
        let server = try await AuthorizationServer()
        let store = store("cut")
        let tabs = try await signedInTabs(3, server: server, store: store)
        defer { tabs.forEach { $0.stop() } }
        try await waitForExpiry(tabs[0])
        // tab-0 refreshes against a slow server; its lock's connection is cut meanwhile.
        _ = try await httpJSON("POST", "\(server.base)/test/slow?seconds=3&count=1")
        tabs[0].send("token")
        let deadline = ContinuousClock.now + .seconds(20)
        var cut = ""
        while cut.isEmpty, ContinuousClock.now < deadline {
            // The refresher's lock connection: the one of tab-0's process that holds an advisory lock.
            cut = PostgresServer.sql("""
                SELECT pg_terminate_backend(l.pid) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                WHERE l.locktype = 'advisory' AND l.granted AND a.application_name LIKE 'tabsync \(tabs[0].process.processIdentifier) %'
                """).trimmingCharacters(in: .whitespacesAndNewlines)
            if cut.isEmpty { try await Task.sleep(for: .milliseconds(20)) }
        }
        #expect(cut == "t", "the refresher's lock connection was cut")
        for tab in tabs.dropFirst() { tab.send("token") }
        var replies: [[String: any Sendable]] = []
        for tab in tabs {
            replies.append(try await tab.waitFor("token reply", timeout: .seconds(60)) { ["token", "error"].contains($0["type"] as? String) && $0["cmd"] as? String ?? "token" == "token" }[0])
        }
        try await server.waitUntilRefreshesAnswered()
        #expect(try await server.stats().reused == 0, "no refresh token was presented twice")
        // However it ended, the tabs agree: one token, or one sign-out.
        let tokens = Set(replies.compactMap { $0["accessToken"] as? String })
        #expect(tokens.count <= 1, "\(replies)")
        for tab in tabs {
            let status = try await tab.ask("status", expecting: ["status"])
            let first = try await tabs[0].ask("status", expecting: ["status"])
            #expect(status["state"] as? String == first["state"] as? String)
        }
    }
}
