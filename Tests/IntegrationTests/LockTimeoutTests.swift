import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Issue 12, in part: a process stopped (Ctrl-Z, a breakpoint) while it holds the commit lock
/// freezes nobody: a change gives up after the lock timeout, naming it.
@Suite(.serialized, .timeLimit(.minutes(3)))
struct LockTimeoutTests {
    @Test func aStoppedHolderOfTheCommitLockGetsNamedAndEverythingConvergesAfterwards() async throws {
        let directory = temporaryDirectory("stopped-holder")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let a = try await launchTab(name: "a", directory: directory, extra: ["--lock-timeout", "1"])
        let b = try await launchTab(name: "b", directory: directory, extra: ["--lock-timeout", "3"])
        defer { a.stop(); b.stop() }
        #expect(try await a.ask("set x 1", expecting: ["ok", "error"])["type"] as? String == "ok")

        // Another program holds the commit lock, then is stopped. (`-o`: the lock stays with
        // flock itself, not with the `sleep` it runs, so that killing flock releases it.)
        let holder = try ChildProcess("/usr/bin/flock", ["-o", "\(directory)/app.lock", "sleep", "60"], name: "flock")
        defer {
            holder.kill(SIGCONT)
            holder.kill(SIGKILL)
            _ = try? ChildProcess("/usr/bin/pkill", ["-f", "^sleep 60$"], name: "pkill")
        }
        let deadline = ContinuousClock.now + .seconds(10)
        var locks: [String: any Sendable] = [:]
        repeat {
            locks = try await a.ask("locks", expecting: ["locks"])
            if Self.holders(of: "app", in: locks).contains(holder.process.processIdentifier) { break }
            try await Task.sleep(for: .milliseconds(20))
        } while ContinuousClock.now < deadline
        #expect(Self.holders(of: "app", in: locks) == [holder.process.processIdentifier], "\(locks)")
        holder.kill(SIGSTOP)

        let asked = ContinuousClock.now
        let isSetReply: ([String: any Sendable]) -> Bool = {
            ["ok", "error"].contains($0["type"] as? String ?? "") && $0["cmd"] as? String ?? "set" == "set"
        }
        b.send("set y 2")
        // Meanwhile the session lane answers: it does not wait behind the storage lane.
        _ = try await b.ask("status", expecting: ["status"], timeout: .seconds(10))
        #expect(!b.objects.contains(where: isSetReply), "status was answered only after the set gave up")
        let refused = try await b.waitFor("the reply to set y 2", timeout: .seconds(10), where: isSetReply)[0]
        // Bounded by the lock timeout (3 s), with room for a loaded machine: the holder is stopped
        // and would otherwise hold it for its 60 s.
        #expect(ContinuousClock.now - asked < .seconds(6), "not within the lock timeout plus 3 s")
        #expect(refused["code"] as? String == "lockTimeout", "\(refused)")
        let named = (refused["holders"] as? [[String: any Sendable]])?.first
        #expect((named?["pid"] as? NSNumber)?.int32Value == holder.process.processIdentifier)
        #expect(named?["state"] as? String == "stopped")
        #expect((refused["message"] as? String)?.contains("stopped") == true)

        // The rest goes on: the session storage has its own lock, and b hears a's changes there.
        #expect(try await a.ask("adopt A R 600", expecting: ["ok", "error"])["type"] as? String == "ok")
        try await b.waitFor("signedIn") { $0["type"] as? String == "session" && $0["state"] as? String == "signedIn" }
        #expect(try await b.ask("get x", expecting: ["value"])["value"] as? String == "1")

        // Once the holder is gone, changes go through and every tab converges; nothing was lost.
        holder.kill(SIGCONT)
        holder.kill(SIGKILL)
        let freed = ContinuousClock.now + .seconds(10)
        while !Self.holders(of: "app", in: try await a.ask("locks", expecting: ["locks"])).isEmpty, ContinuousClock.now < freed {
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(try await b.ask("set y 2", expecting: ["ok", "error"])["type"] as? String == "ok")
        try await a.waitFor("y from b") { $0["type"] as? String == "storage" && $0["key"] as? String == "y" }
        #expect(try await a.ask("get y", expecting: ["value"])["value"] as? String == "2")
        #expect(try await b.ask("get x", expecting: ["value"])["value"] as? String == "1")
    }

    static func holders(of name: String, in reply: [String: any Sendable]) -> [Int32] {
        let locks = reply["locks"] as? [[String: any Sendable]] ?? []
        let lock = locks.first { $0["storage"] as? String == "app" && $0["name"] as? String == name }
        return (lock?["holders"] as? [[String: any Sendable]] ?? []).compactMap { ($0["pid"] as? NSNumber)?.int32Value }
    }
}
