import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Real `tab` processes sharing one session directory.
@Suite(.serialized, .timeLimit(.minutes(10)))
struct StorageAcrossProcessesTests {
    @Test func fourWritersAndFourObserversAgreeOnEveryChange() async throws {
        let directory = temporaryDirectory("storage")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        // A lock timeout of a minute: this test is about agreement, and the suites running beside
        // it (200 SIGKILLs, two soaks of 16 processes) can hold two cores for longer than the
        // default 10 s. The bound itself is BoundedLockTests' subject.
        try await fourWritersAndFourObserversAgree { name in
            try await launchTab(name: name, directory: directory, extra: ["--lock-timeout", "60"])
        }
    }

    @Test func aSetThatChangesNothingRaisesNoEventAndClearHasANullKey() async throws {
        let directory = temporaryDirectory("noop")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let a = try await launchTab(name: "a", directory: directory)
        let b = try await launchTab(name: "b", directory: directory)
        defer { a.stop(); b.stop() }
        a.send("set k v")
        a.send("set k v")
        a.send("clear")
        a.send("set end 1")
        try await b.waitFor("the last change") { $0["key"] as? String == "end" }
        let events = b.objects.filter { $0["type"] as? String == "storage" }
        #expect(events.count == 3)
        #expect(events[1]["key"] is NSNull)
        #expect(events.map { ($0["seq"] as? NSNumber)?.intValue } == [1, 2, 3])
    }

    @Test func badCommandsGetAnErrorAndTheTabKeepsRunning() async throws {
        let directory = temporaryDirectory("bad")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let tab = try await launchTab(name: "a", directory: directory)
        defer { tab.stop() }
        tab.send("frobnicate")
        tab.send("token")
        tab.send("get k")
        let errors = try await tab.waitFor("errors", count: 2) { $0["type"] as? String == "error" }
        #expect(errors[0]["code"] as? String == "badCommand")
        #expect(errors[1]["code"] as? String == "signedOut")
        try await tab.waitFor("value") { $0["type"] as? String == "value" }
    }

    @Test func anInsecureEndpointIsRefusedBeforeAnythingIsWritten() async throws {
        let directory = temporaryDirectory("config")
        let tab = try ChildProcess(
            "\(productsDirectory)/tab",
            ["--dir", directory, "--name", "a", "--json", "--token-endpoint", "http://example.com/token"], name: "a")
        try await tab.waitForExit()
        #expect(tab.process.terminationStatus != 0)
        let stderr = tab.standardError.split(separator: "\n")
        #expect(stderr.count == 1 && stderr[0].contains("HTTPS"))
        #expect(!FileManager.default.fileExists(atPath: directory))
    }

    /// Commands given before the tab is ready (all of its input at once, then its end) are
    /// answered after `ready`, which is the first line: a session command too, though it takes
    /// another lane than the storage's.
    @Test func readyIsTheFirstLineWhateverCameBeforeIt() async throws {
        let directory = temporaryDirectory("ready-first")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let tab = try ChildProcess("\(productsDirectory)/tab", ["--dir", directory, "--name", "a", "--json"], name: "a")
        for _ in 0..<200 { tab.send("status") }
        tab.send("get k")
        tab.closeInput()
        try await tab.waitForExit()
        let types = tab.objects.map { $0["type"] as? String ?? "?" }
        #expect(types.first == "ready", "\(types)")
        // Every command given before the end of input is carried out, the session lane's too.
        #expect(types.filter { $0 == "status" }.count == 200 && types.contains("value"), "\(types)")
    }

    @Test func aDirectoryWritableByOthersIsRefusedWithOneLine() async throws {
        let directory = temporaryDirectory("perm")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        #expect(mkdir(directory, 0o777) == 0 && chmod(directory, 0o777) == 0)
        let tab = try ChildProcess("\(productsDirectory)/tab", ["--dir", directory, "--name", "a", "--json"], name: "a")
        try await tab.waitForExit()
        #expect(tab.process.terminationStatus != 0)
        #expect(tab.standardError.contains(directory) && tab.standardError.contains("777"))
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory).isEmpty)
    }

    @Test func aFullDiskFailsTheCommitCleanlyAndOthersKeepWorking() async throws {
        let directory = temporaryDirectory("full")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let healthy = try await launchTab(name: "healthy", directory: directory)
        defer { healthy.stop() }
        healthy.send("set small 1")
        try await healthy.waitFor("ok") { $0["type"] as? String == "ok" }
        // A tab whose file size limit (RLIMIT_FSIZE, 1 KiB) stands in for a full disk.
        let limited = try ChildProcess(
            "/bin/sh", ["-c", "ulimit -f 2; exec \"$0\" \"$@\"", "\(productsDirectory)/tab", "--dir", directory, "--name", "limited", "--json"],
            name: "limited")
        defer { limited.stop() }
        try await limited.waitFor("ready") { $0["type"] as? String == "ready" }
        limited.send("set big \(String(repeating: "x", count: 4096))")
        let error = try await limited.waitFor("error") { $0["type"] as? String == "error" }
        #expect(error.first?["code"] as? String == "storageFull")
        #expect((error.first?["message"] as? String)?.contains(directory) == true)
        // The failed change left nothing behind: the log is valid and without it, with no tail.
        let log = try checkLog("\(directory)/app.log")
        #expect(log.values == ["small": "1"] && log.tail == 0)
        #expect(try await limited.command("get big").string("value") == nil)
        // The committed state is intact, and both can still write small changes.
        limited.send("set after 2")
        try await limited.waitFor("ok") { $0["type"] as? String == "ok" }
        healthy.send("get small")
        let value = try await healthy.waitFor("value") { $0["type"] as? String == "value" }
        #expect(value.first?["value"] as? String == "1")
        try await healthy.waitFor("the limited tab's change") { $0["key"] as? String == "after" }
    }
}

/// Four writers with 200 changes each at once and four observers, all processes: every change
/// reaches every observer once, in order; writers see the others' changes, never their own; a
/// late process reads the final state. `launch` starts a tab of one session by name.
func fourWritersAndFourObserversAgree(launch: (String) async throws -> ChildProcess) async throws {
    var writers: [ChildProcess] = []
    var observers: [ChildProcess] = []
    for index in 0..<4 { writers.append(try await launch("writer-\(index)")) }
    for index in 0..<4 { observers.append(try await launch("observer-\(index)")) }
    defer { (writers + observers).forEach { $0.stop() } }

    let changes = 200
    // All writers write at the same time, each on keys of its own.
    for (index, writer) in writers.enumerated() {
        writer.send((0..<changes).map { "set w\(index)-k\($0) value \($0) of writer \(index)" }.joined(separator: "\n"))
    }
    // Every command gets its reply, ok or error: an error fails the test at once, with itself.
    for writer in writers {
        let replies = try await writer.waitFor("replies", count: changes, timeout: .seconds(300)) { ["ok", "error"].contains($0["type"] as? String) }
        let errors = replies.filter { $0["type"] as? String == "error" }
        try #require(errors.isEmpty, "\(writer.name): \(errors.count) of its \(changes) changes failed, the first: \(errors.first.map { "\($0)" } ?? "")")
    }
    let total = changes * writers.count
    for observer in observers {
        let events = try await observer.waitFor("storage events", count: total, timeout: .seconds(300)) { $0["type"] as? String == "storage" }
        let sequences = events.compactMap { ($0["seq"] as? NSNumber)?.intValue }
        #expect(sequences == Array(1...total), "\(observer.name) saw every change once, in order")
        let keys = Set(events.compactMap { $0["key"] as? String })
        #expect(keys.count == total)
        // Per writer, the changes arrive in the order they were made.
        for index in 0..<writers.count {
            let own = events.filter { $0["origin"] as? String == "writer-\(index)" }.compactMap { $0["key"] as? String }
            #expect(own == (0..<changes).map { "w\(index)-k\($0)" })
        }
    }
    // Each writer sees the others' changes, never its own.
    for (index, writer) in writers.enumerated() {
        let events = try await writer.waitFor("storage events", count: total - changes, timeout: .seconds(300)) { $0["type"] as? String == "storage" }
        #expect(events.count == total - changes)
        #expect(!events.contains { $0["origin"] as? String == "writer-\(index)" })
    }
    // The final state holds all 800 keys, as read by a late process.
    let late = try await launch("late")
    defer { late.stop() }
    late.send("get w3-k199")
    let value = try await late.waitFor("value") { $0["type"] as? String == "value" }
    #expect(value.first?["value"] as? String == "value 199 of writer 3")
    late.send("status")
    let status = try await late.waitFor("status") { $0["type"] as? String == "status" }
    #expect(status.first?["state"] as? String == "signedOut")
}
