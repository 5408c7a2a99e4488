import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Tests/AuthServer/proxy.py between the tabs and the real authorization server: it drops,
/// delays or refuses the answers to refresh requests.
final class FaultProxy: Sendable {
    let process: ChildProcess
    let base: String

    init(upstream: String) async throws {
        process = try ChildProcess("/usr/bin/env", ["python3", "\(repositoryRoot)/Tests/AuthServer/proxy.py", "--upstream", upstream, "--port", "0"], name: "proxy")
        let deadline = ContinuousClock.now + .seconds(20)
        while process.output.first(where: { $0.hasPrefix("READY ") }) == nil {
            guard process.process.isRunning, ContinuousClock.now < deadline else {
                throw TestFailure("the fault proxy did not start: \(process.standardError)")
            }
            try await Task.sleep(for: .milliseconds(10))
        }
        base = String(process.output.first { $0.hasPrefix("READY ") }!.dropFirst("READY ".count))
    }

    /// Sets the fault for the next refresh requests (proxy.py's `mode` endpoint).
    func fault(_ query: String) async throws { _ = try await httpJSON("POST", "\(base)/proxy/mode?\(query)") }

    func stats() async throws -> (forwarded: Int, answered: Int, faulted: Int) {
        let stats = try await httpJSON("GET", "\(base)/proxy/stats")
        func number(_ key: String) -> Int { (stats[key] as? NSNumber)?.intValue ?? -1 }
        return (number("refresh_forwarded"), number("refresh_answered"), number("refresh_faulted"))
    }

    deinit { process.stop() }
}

extension AuthorizationServer {
    /// `tab` flags that reach this server through `proxy`.
    func tabArguments(via proxy: FaultProxy) -> [String] {
        tabArguments.map { $0.replacingOccurrences(of: base, with: proxy.base) }
    }
}

/// Issue 13: a refresh token that the server refused, or whose answer never came, is never
/// presented again; out-of-range numbers never crash a tab.
@Suite(.serialized, .timeLimit(.minutes(10)))
struct RefreshOnceTests {
    static func isSignedOut(_ reason: String) -> ([String: any Sendable]) -> Bool {
        { $0["type"] as? String == "session" && $0["state"] as? String == "signedOut" && $0["reason"] as? String == reason }
    }

    static func tokenReply(_ object: [String: any Sendable]) -> Bool {
        object["type"] as? String == "token" || (object["type"] as? String == "error" && object["cmd"] as? String == "token")
    }

    @Test func anEmptyBodied400IsPresentedOnceAndSignsAllSixteenOut() async throws {
        let server = try await AuthorizationServer()
        let proxy = try await FaultProxy(upstream: server.base)
        let directory = temporaryDirectory("refused")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let tabs = try await signedInTabs(16, directory: directory, arguments: server.tabArguments(via: proxy))
        defer { tabs.forEach { $0.stop() } }
        // Every refresh request from now on is refused with an empty 400.
        try await proxy.fault("mode=refuse-empty&count=1000")
        try await waitForExpiry(tabs[0])
        for tab in tabs { tab.send("token") }
        for tab in tabs {
            let reply = try await tab.waitFor("token reply", where: Self.tokenReply)[0]
            #expect(["refreshFailed", "signedOut"].contains(reply["code"] as? String), "\(tab.name): \(reply)")
            try await tab.waitFor("signedOut (refreshFailed)", where: Self.isSignedOut("refreshFailed"))
        }
        let refused = tabs.flatMap(\.objects).filter { $0["code"] as? String == "refreshFailed" }
        #expect(refused.contains { ($0["message"] as? String)?.contains("400") == true }, "the message names the status")
        // Later requests do not present it either.
        _ = try await tabs[5].ask("token", expecting: ["token", "error"])
        let stats = try await proxy.stats()
        #expect(stats.faulted == 1, "the refused refresh token was presented \(stats.faulted) times")
        #expect(stats.forwarded == 0)
    }

    @Test func anAnswerDroppedAfterTheServerRotatedEndsTheSessionWithoutReuse() async throws {
        let server = try await AuthorizationServer()
        let proxy = try await FaultProxy(upstream: server.base)
        let directory = temporaryDirectory("dropped")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let tabs = try await signedInTabs(3, directory: directory, arguments: server.tabArguments(via: proxy))
        defer { tabs.forEach { $0.stop() } }
        try await proxy.fault("mode=drop")
        try await waitForExpiry(tabs[0])
        let reply = try await tabs[0].ask("token", expecting: ["token", "error"])
        #expect(reply["code"] as? String == "refreshFailed", "\(reply)")
        for tab in tabs { try await tab.waitFor("signedOut (refreshFailed)", where: Self.isSignedOut("refreshFailed")) }
        _ = try await tabs[1].ask("token", expecting: ["token", "error"])
        let stats = try await server.stats()
        #expect(stats.refresh == 1, "the server rotated once")
        #expect(stats.reused == 0, "a refresh token was presented twice")
    }

    @Test func anAnswerLaterThanTheTimeoutEndsTheSessionWithoutReuse() async throws {
        let server = try await AuthorizationServer()
        let proxy = try await FaultProxy(upstream: server.base)
        let directory = temporaryDirectory("late")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        // The sign-in (a password grant, which the server hashes slowly on a loaded machine) gets
        // the default HTTP timeout; the tabs that refresh get 1 s.
        let signer = try await signedInTabs(1, directory: directory, arguments: server.tabArguments(via: proxy), prefix: "signer")
        defer { signer.forEach { $0.stop() } }
        var tabs: [ChildProcess] = []
        defer { tabs.forEach { $0.stop() } }
        for index in 0..<3 {
            let tab = try await launchTab(name: "tab-\(index)", directory: directory, extra: server.tabArguments(via: proxy) + ["--http-timeout", "1"])
            tabs.append(tab)
            let status = try await tab.ask("status", expecting: ["status"])
            try #require(status["state"] as? String == "signedIn", "\(status)")
        }
        try await proxy.fault("mode=delay&seconds=3")
        try await waitForExpiry(tabs[0])
        let reply = try await tabs[0].ask("token", expecting: ["token", "error"])
        #expect(reply["code"] as? String == "refreshFailed", "\(reply)")
        for tab in tabs { try await tab.waitFor("signedOut (refreshFailed)", where: Self.isSignedOut("refreshFailed")) }
        try await server.waitUntilRefreshesAnswered()
        _ = try await tabs[2].ask("token", expecting: ["token", "error"])
        let stats = try await server.stats()
        #expect(stats.refresh == 1)
        #expect(stats.reused == 0, "a refresh token was presented twice")
    }

    @Test func withAReuseGracePeriodADroppedAnswerIsTriedOnceAndTheSessionGoesOn() async throws {
        let server = try await AuthorizationServer(grace: 30)
        let proxy = try await FaultProxy(upstream: server.base)
        let directory = temporaryDirectory("grace")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let tabs = try await signedInTabs(3, directory: directory, arguments: server.tabArguments(via: proxy) + ["--reuse-grace-period", "30"])
        defer { tabs.forEach { $0.stop() } }
        try await proxy.fault("mode=drop")
        try await waitForExpiry(tabs[0])
        let reply = try await tabs[0].ask("token", expecting: ["token", "error"])
        #expect(reply["type"] as? String == "token", "\(reply)")
        for tab in tabs {
            try await tab.waitFor("refreshed") { $0["type"] as? String == "session" && $0["state"] as? String == "refreshed" }
        }
        let stats = try await server.stats()
        #expect(stats.refresh == 2, "the dropped refresh and exactly one retry within the grace period")
    }

    // MARK: Numbers from outside

    @Test(arguments: [
        ["--idle-timeout", "9223371000000000"], ["--absolute-timeout", "1e300"], ["--leeway", "1e300"], ["--leeway", "nan"],
        ["--proactive-refresh", "-1"], ["--http-timeout", "0"], ["--reuse-grace-period", "inf"],
    ])
    func anOutOfRangeFlagExitsBeforeAnythingIsWritten(flags: [String]) async throws {
        let directory = temporaryDirectory("flags")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let tab = try ChildProcess("\(productsDirectory)/tab", ["--dir", directory, "--name", "t", "--json"] + flags, name: "tab")
        try await tab.waitForExit()
        #expect(tab.process.terminationStatus != 0)
        // Its standard error is read on a thread of its own: wait (bounded) for the line to arrive.
        let deadline = ContinuousClock.now + .seconds(10)
        while !tab.standardError.contains("\n"), ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(10)) }
        #expect(tab.standardError.contains(flags[0]), "the error names the flag: \(tab.standardError)")
        #expect(!FileManager.default.fileExists(atPath: directory), "nothing was written")
    }

    @Test func outOfRangeAdoptionsAreErrorsAndTheSessionStaysUsable() async throws {
        let directory = temporaryDirectory("adopt")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let tab = try await launchTab(name: "t", directory: directory)
        defer { tab.stop() }
        let bigJWT = "eyJhbGciOiJub25lIn0.\(Data(#"{"exp":1e300}"#.utf8).base64EncodedString().replacingOccurrences(of: "=", with: "")).x"
        for command in ["adopt A R 9223372036854775807", "adopt \(bigJWT) R 60", "adopt A R -5"] {
            let reply = try await tab.ask(command, expecting: ["ok", "error"])
            #expect(reply["type"] as? String == "error", "\(command): \(reply)")
        }
        #expect(try await tab.ask("status", expecting: ["status"])["state"] as? String == "signedOut")
        #expect(try await tab.ask("adopt A R 60", expecting: ["ok", "error"])["type"] as? String == "ok")
        #expect(try await tab.ask("status", expecting: ["status"])["state"] as? String == "signedIn")
    }

    // MARK: Clocks

    /// libfaketime's preload library (Debian's libfaketime, installed by scripts/test).
    static let libfaketime = ["/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1", "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"]
        .first { FileManager.default.fileExists(atPath: $0) }

    func skewedTab(_ name: String, _ directory: String, offset: String, _ arguments: [String]) async throws -> ChildProcess {
        let library = try #require(Self.libfaketime, "libfaketime is not installed (scripts/test installs it)")
        let tab = try ChildProcess(
            "\(productsDirectory)/tab", ["--dir", directory, "--name", name, "--json"] + arguments, name: name,
            environment: ["LD_PRELOAD": library, "FAKETIME": offset, "FAKETIME_DONT_RESET": "1"])
        try await tab.waitFor("ready") { $0["type"] as? String == "ready" }
        return tab
    }

    @Test func aTabWhoseClockIsADayAheadNeitherSignsTheOthersOutNorBlocksTheirRefresh() async throws {
        let server = try await AuthorizationServer()
        let proxy = try await FaultProxy(upstream: server.base)
        let directory = temporaryDirectory("skew-day")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let arguments = server.tabArguments(via: proxy) + ["--idle-timeout", "600"]
        let normal = try await signedInTabs(2, directory: directory, arguments: arguments)
        defer { normal.forEach { $0.stop() } }
        let ahead = try await skewedTab("ahead", directory, offset: "+1d", arguments)
        defer { ahead.stop() }
        // Its own view of time is a day ahead: it would see the idle limit long past.
        #expect(try await ahead.ask("status", expecting: ["status"])["state"] as? String == "signedIn")
        _ = try await ahead.ask("activity", expecting: ["ok", "error"])
        // One transient failure of its refresh sets the shared backoff.
        try await waitForExpiry(normal[0])
        try await proxy.fault("mode=status&status=503")
        let failed = try await ahead.ask("token", expecting: ["token", "error"])
        #expect(failed["code"] as? String == "network", "\(failed)")
        // The others refresh within the backoff's maximum, not a day later.
        let deadline = ContinuousClock.now + .seconds(35)
        var token: [String: any Sendable] = [:]
        repeat {
            token = try await normal[0].ask("token", expecting: ["token", "error"])
            if token["type"] as? String == "token" { break }
            try await Task.sleep(for: .milliseconds(250))
        } while ContinuousClock.now < deadline
        #expect(token["type"] as? String == "token", "the normal tab was still blocked: \(token)")
        for tab in normal + [ahead] {
            #expect(!tab.objects.contains(where: Self.isSignedOut("idleTimeout")), "\(tab.name) was signed out")
        }
    }

    @Test func aSessionSignedInByATabTenYearsAheadStillEndsOnTime() async throws {
        let server = try await AuthorizationServer()
        let directory = temporaryDirectory("skew-years")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let normal = try await launchTab(name: "normal", directory: directory, extra: server.tabArguments)
        defer { normal.stop() }
        let ahead = try await skewedTab("ahead", directory, offset: "+3650d", server.tabArguments + ["--absolute-timeout", "3"])
        defer { ahead.stop() }
        ahead.send("login alice wonderland")
        try await normal.waitFor("signedIn") { $0["type"] as? String == "session" && $0["state"] as? String == "signedIn" }
        let started = ContinuousClock.now
        try await normal.waitFor("signedOut (absoluteTimeout)", timeout: .seconds(20), where: Self.isSignedOut("absoluteTimeout"))
        #expect(ContinuousClock.now - started < .seconds(10))
    }

    // MARK: Killed refreshers

    /// The pids among `tabs` with a TCP connection open to `port` (the refresher, mid-request).
    static func connected(_ tabs: [ChildProcess], toPort port: Int) -> [ChildProcess] {
        var inodes: Set<String> = []
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            guard let text = try? String(contentsOfFile: table, encoding: .utf8) else { continue }
            for line in text.split(separator: "\n").dropFirst() {
                let fields = line.split(separator: " ")
                guard fields.count > 9, let remotePort = fields[2].split(separator: ":").last.flatMap({ Int($0, radix: 16) }) else { continue }
                if remotePort == port { inodes.insert(String(fields[9])) }
            }
        }
        return tabs.filter { tab in
            let fds = "/proc/\(tab.process.processIdentifier)/fd"
            let entries = (try? FileManager.default.contentsOfDirectory(atPath: fds)) ?? []
            return entries.contains { entry in
                guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "\(fds)/\(entry)") else { return false }
                return target.hasPrefix("socket:[") && inodes.contains(String(target.dropFirst(8).dropLast()))
            }
        }
    }

    @Test func fiftyStormsOfEightWithTheRefresherKilledAtRandomNeverReuseAToken() async throws {
        let storms = Int(ProcessInfo.processInfo.environment["TABSYNC_KILL_STORMS"] ?? "") ?? 50
        let server = try await AuthorizationServer(accessTTL: 2)
        let directory = temporaryDirectory("storms")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var tabs: [ChildProcess] = []
        for index in 0..<8 { tabs.append(try await launchTab(name: "s\(index)", directory: directory, extra: server.tabArguments)) }
        defer { tabs.forEach { $0.stop() } }
        let port = try #require(URL(string: server.base)?.port)
        var generator = SystemRandomNumberGenerator()
        var killed = 0
        for storm in 0..<storms {
            if try await tabs[0].ask("status", expecting: ["status"])["state"] as? String != "signedIn" {
                let login = try await tabs[0].ask("login alice wonderland", expecting: ["ok", "error"])
                guard login["type"] as? String == "ok" else { throw TestFailure("storm \(storm): login failed: \(login)") }
            }
            try await waitForExpiry(tabs[0])
            // Each refresh takes the server a random 0 to 300 ms, so the kill lands before, during
            // or after it.
            let slow = Double(Int.random(in: 0...300, using: &generator)) / 1000
            _ = try await httpJSON("POST", "\(server.base)/test/slow?seconds=\(slow)&count=1")
            let before = tabs.map { $0.objects.filter(Self.tokenReply).count }
            for tab in tabs { tab.send("token") }
            let watchUntil = ContinuousClock.now + .milliseconds(Int.random(in: 0...400, using: &generator))
            var victim: ChildProcess?
            while victim == nil, ContinuousClock.now < watchUntil {
                victim = Self.connected(tabs, toPort: port).first
                if victim == nil { try await Task.sleep(for: .milliseconds(1)) }
            }
            if let victim {
                try await Task.sleep(for: .milliseconds(Int.random(in: 0...Int(slow * 1000) + 5, using: &generator)))
                victim.kill(SIGKILL)
                try await victim.waitForExit()
                killed += 1
            }
            // Every survivor answers its token request, one way or another.
            for (index, tab) in tabs.enumerated() where tab !== victim {
                try await tab.waitFor("storm \(storm) token reply", count: before[index] + 1, timeout: .seconds(30), where: Self.tokenReply)
            }
            tabs = try await tabs.asyncMap { tab in
                tab === victim ? try await launchTab(name: "\(tab.name)'", directory: directory, extra: server.tabArguments) : tab
            }
            try await server.waitUntilRefreshesAnswered()
            // They converge on one state.
            var states: Set<String> = []
            for tab in tabs {
                let status = try await tab.ask("status", expecting: ["status"])
                states.insert("\(status["state"] ?? "?") \(status["expiresAt"] ?? "-") \(status["seq"] ?? "?")")
            }
            #expect(states.count == 1, "storm \(storm): the tabs disagree: \(states)")
            let stats = try await server.stats()
            #expect(stats.reused == 0, "storm \(storm): a refresh token was presented twice")
            if stats.reused != 0 || states.count != 1 { break }
        }
        print("killed refreshers: \(storms) storms of 8 tabs, \(killed) refreshers killed mid-storm, server refreshes \(try await server.stats().refresh), reused \(try await server.stats().reused)")
    }
}

extension Array {
    func asyncMap<T>(_ transform: (Element) async throws -> T) async rethrows -> [T] {
        var result: [T] = []
        for element in self { result.append(try await transform(element)) }
        return result
    }
}
