import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Issue 14: a refresher stopped mid-refresh (Ctrl-Z, a breakpoint) freezes nobody.
@Suite(.serialized, .timeLimit(.minutes(5)))
struct BoundedRefreshWaitTests {
    @Test func aStoppedRefresherGivesEveryWaiterATypedErrorInTimeAndTheSessionConvergesAfterSIGCONT() async throws {
        let server = try await AuthorizationServer()
        let directory = temporaryDirectory("stopped")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        // The wait's bound is the HTTP timeout plus 5 s: 8 s here.
        let arguments = server.tabArguments + ["--http-timeout", "3"]
        let tabs = try await signedInTabs(9, directory: directory, arguments: arguments, prefix: "w")
        defer { tabs.forEach { $0.stop() } }
        try await waitForExpiry(tabs[0])

        // The refresher's request reaches a slow server, then the refresher is stopped.
        _ = try await httpJSON("POST", "\(server.base)/test/slow?seconds=2&count=1")
        let refresher = tabs[0]
        refresher.send("token")
        let deadline = ContinuousClock.now + .seconds(20)
        while try await server.stats().refresh < 1 {
            guard ContinuousClock.now < deadline else { throw TestFailure("the refresh never reached the server") }
            try await Task.sleep(for: .milliseconds(10))
        }
        refresher.kill(SIGSTOP)
        defer { refresher.kill(SIGCONT) }

        let asked = ContinuousClock.now
        for tab in tabs.dropFirst() { tab.send("token") }
        for tab in tabs.dropFirst(2) {
            let reply = try await tab.waitFor("token reply", timeout: .seconds(20)) { ["token", "error"].contains($0["type"] as? String) }[0]
            #expect(reply["code"] as? String == "refreshTimeout", "\(tab.name): \(reply)")
            let named = reply["refresher"] as? [String: any Sendable]
            #expect((named?["pid"] as? NSNumber)?.int32Value == refresher.process.processIdentifier, "\(reply)")
            #expect(named?["state"] as? String == "stopped", "\(reply)")
            #expect((reply["message"] as? String)?.contains("stopped") == true)
        }
        #expect(ContinuousClock.now - asked < .seconds(8) + .seconds(2), "the waits were not bounded by timeout + 1 s")

        // A tab still waiting answers `quit` at once, and a `get` does not queue behind `token`.
        let waiting = tabs[1]
        waiting.send("token")
        let value = try await waiting.ask("get anything", expecting: ["value"], timeout: .seconds(2))
        #expect(value["type"] as? String == "value")
        let quitAt = ContinuousClock.now
        waiting.send("quit")
        try await waiting.waitForExit("its exit after quit", timeout: .seconds(5))
        // Well before the wait's bound (8 s), with room for a loaded machine.
        #expect(ContinuousClock.now - quitAt < .seconds(3))

        // After SIGCONT the refresher completes or discards its result, and everyone converges.
        refresher.kill(SIGCONT)
        try await refresher.waitFor("its token reply", timeout: .seconds(20)) { ["token", "error"].contains($0["type"] as? String) }
        try await server.waitUntilRefreshesAnswered()
        var states: Set<String> = []
        for tab in tabs where tab !== waiting {
            let status = try await tab.ask("status", expecting: ["status"])
            #expect(status["refreshing"] is NSNull, "\(tab.name) still sees a refresh in progress: \(status)")
            states.insert("\(status["state"] ?? "?") \(status["expiresAt"] ?? "-") \(status["seq"] ?? "?")")
        }
        #expect(states.count == 1, "the tabs disagree: \(states)")
        let stats = try await server.stats()
        #expect(stats.refresh == 1, "exactly one refresh request")
        #expect(stats.reused == 0, "a refresh token was presented twice")
    }

    @Test func invalidUTF8OnStandardInputIsABadCommand() async throws {
        let directory = temporaryDirectory("utf8")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let tab = try await launchTab(name: "t", directory: directory)
        defer { tab.stop() }
        tab.sendBytes([0x73, 0x65, 0x74, 0x20, 0x6B, 0x20, 0xFF, 0xFE, 0x0A])  // "set k \xff\xfe\n"
        let reply = try await tab.waitFor("the reply") { $0["type"] as? String == "error" || $0["type"] as? String == "ok" }[0]
        #expect(reply["code"] as? String == "badCommand", "\(reply)")
        #expect(try await tab.ask("get k", expecting: ["value"])["value"] is NSNull, "nothing was stored")
    }
}
