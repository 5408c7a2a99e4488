import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A `tab` at rest must not use the CPU, signed in or out (issue 10: a signed-in tab's
/// `run()` loop woke itself up forever and took a core).
@Suite(.serialized, .timeLimit(.minutes(3)))
struct IdleTabTests {
    /// utime + stime of a process, in clock ticks (`/proc/PID/stat`, fields 14 and 15).
    static func cpuTicks(_ pid: Int32) throws -> Int {
        let stat = try String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
        // The command name (field 2) may contain spaces; the fields after it start past its ')'.
        guard let close = stat.lastIndex(of: ")") else { throw TestFailure("unreadable /proc/\(pid)/stat") }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        guard fields.count > 12, let user = Int(fields[11]), let system = Int(fields[12]) else {
            throw TestFailure("unreadable /proc/\(pid)/stat: \(stat)")
        }
        return user + system
    }

    /// The CPU ticks `tab` uses over `period` while nothing happens.
    static func ticksAtRest(_ tab: ChildProcess, over period: Duration) async throws -> Int {
        // The last event's work (printing, the loop's own turn) settles first.
        _ = try await tab.ask("status", expecting: ["status"])
        try await Task.sleep(for: .milliseconds(300))
        let before = try cpuTicks(tab.process.processIdentifier)
        try await Task.sleep(for: period)
        return try cpuTicks(tab.process.processIdentifier) - before
    }

    @Test func aSignedInTabWithAPolicyAndProactiveRefreshUsesNoCPUAtRestNorAfterSignOut() async throws {
        let server = try await AuthorizationServer(accessTTL: 3600)
        let directory = temporaryDirectory("idle")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let tab = try await launchTab(
            name: "idle", directory: directory,
            extra: server.tabArguments + ["--idle-timeout", "3600", "--absolute-timeout", "7200", "--proactive-refresh", "5"])
        defer { tab.stop() }
        let hertz = sysconf(Int32(_SC_CLK_TCK))
        // A few ticks allow for the runtime's own start-up leftovers; the bug used ~140 per second.
        let allowed = 5

        let idleSignedOut = try await Self.ticksAtRest(tab, over: .seconds(3))
        #expect(idleSignedOut <= allowed, "signed out, before login: \(idleSignedOut) ticks in 3 s (\(hertz) per second)")

        tab.send("login alice wonderland")
        try await tab.waitFor("login ok") { $0["type"] as? String == "ok" && $0["cmd"] as? String == "login" }
        try await tab.waitFor("signedIn") { $0["type"] as? String == "session" && $0["state"] as? String == "signedIn" }
        let signedIn = try await Self.ticksAtRest(tab, over: .seconds(3))
        #expect(signedIn <= allowed, "signed in: \(signedIn) ticks in 3 s (\(hertz) per second)")

        tab.send("logout")
        try await tab.waitFor("logout ok") { $0["type"] as? String == "ok" && $0["cmd"] as? String == "logout" }
        try await tab.waitFor("signedOut") { $0["type"] as? String == "session" && $0["state"] as? String == "signedOut" }
        let signedOut = try await Self.ticksAtRest(tab, over: .seconds(3))
        #expect(signedOut <= allowed, "after sign-out: \(signedOut) ticks in 3 s (\(hertz) per second)")
        #expect(try await server.stats().refresh == 0, "nothing was due: the proactive refresh must not have run")
    }
}
