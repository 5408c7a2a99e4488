import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `tabsync`, the inspection tool (issue 16), against live `tab` processes.
@Suite(.serialized, .timeLimit(.minutes(3)))
struct InspectionToolTests {
    /// Distinctive tokens, so that finding them anywhere in the tool's output is a leak.
    static let accessToken = "secret-access-xyz"
    static let refreshToken = "secret-refresh-xyz"

    @Test func statusShowsEachStorageAndTheSessionButNeverAToken() async throws {
        let directory = temporaryDirectory("inspect-status")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let tab = try await launchTab(name: "writer", directory: directory)
        defer { tab.stop() }
        for command in ["set theme dark", "set lang en", "adopt \(Self.accessToken) \(Self.refreshToken) 3600"] {
            let reply = try await tab.ask(command, expecting: ["ok", "error"])
            #expect(reply["type"] as? String == "ok", "\(command): \(reply)")
        }
        // The tokens are in the directory, so their absence from the output means something.
        let record = try String(contentsOfFile: "\(directory)/session.state", encoding: .utf8)
        #expect(record.contains(Self.accessToken) && record.contains(Self.refreshToken))

        let json = try await runTabsync(["status", directory, "--json"])
        #expect(json.status == 0, "\(json.errors)")
        let document = try json.document()
        #expect(document["directory"] as? String == directory)
        let storages = document["storages"] as? [[String: Any]] ?? []
        #expect(storages.map { $0["name"] as? String } == ["app", "session"])
        let app = storages.first { $0["name"] as? String == "app" } ?? [:]
        #expect((app["seq"] as? NSNumber)?.intValue == 2)
        #expect((app["keys"] as? NSNumber)?.intValue == 2)
        #expect((app["changeDetection"] as? [String: Any])?["mode"] as? String == "inotify")
        #expect(app["error"] is NSNull)

        let session = document["session"] as? [String: Any] ?? [:]
        #expect(session["state"] as? String == "signedIn")
        #expect(session["reason"] is NSNull)
        #expect(session["hasValidToken"] as? Bool == true)
        #expect(session["refresh"] is NSNull)
        let expiresAt = (session["expiresAt"] as? NSNumber)?.doubleValue ?? 0
        #expect(abs(expiresAt / 1000 - Date().timeIntervalSince1970 - 3600) < 120, "expires about an hour from now")

        let human = try await runTabsync(["status", directory])
        #expect(human.status == 0, "\(human.errors)")
        #expect(human.output.contains("app") && human.output.contains("seq 2, 2 keys, inotify"))
        #expect(human.output.contains("session: signed in"))

        for run in [json, human] {
            for secret in [Self.accessToken, Self.refreshToken] {
                #expect(!run.output.contains(secret) && !run.errors.contains(secret), "status printed a token")
            }
        }
    }

    @Test func watchFollowsStoragesAsTheyAppearAndNeverPrintsSessionValues() async throws {
        let directory = temporaryDirectory("inspect-watch")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        // An empty session directory: the storages appear while `watch` runs.
        #expect(mkdir(directory, 0o700) == 0)
        let watch = try ChildProcess("\(productsDirectory)/tabsync", ["watch", directory, "--json"], name: "watch")
        defer { watch.stop() }
        let ready = try await watch.waitFor("ready") { $0["type"] as? String == "ready" }
        #expect(ready.first?["storages"] as? [String] == [])

        let tab = try await launchTab(name: "writer", directory: directory)
        defer { tab.stop() }
        _ = try await tab.ask("set colour blue", expecting: ["ok"])
        let change = try await watch.waitFor("the set") {
            $0["type"] as? String == "storage" && $0["storage"] as? String == "app" && $0["key"] as? String == "colour"
        }[0]
        #expect(change["newValue"] as? String == "blue")
        #expect(change["oldValue"] is NSNull)
        #expect(change["origin"] as? String == "writer")
        #expect((change["seq"] as? NSNumber)?.intValue == 1)
        try await watch.waitFor("app found") { $0["type"] as? String == "storageFound" && $0["storage"] as? String == "app" }

        _ = try await tab.ask("adopt \(Self.accessToken) \(Self.refreshToken) 3600", expecting: ["ok"])
        let signIn = try await watch.waitFor("the session change") { $0["type"] as? String == "storage" && $0["storage"] as? String == "session" }[0]
        #expect(signIn["origin"] as? String == "writer")
        #expect(signIn["key"] as? String != nil)
        #expect((signIn["seq"] as? NSNumber)?.intValue == 1)
        #expect(signIn["oldValue"] == nil && signIn["newValue"] == nil, "no value of the session storage")

        // Each change exactly once, whether it came from the journal of a storage found late or live.
        _ = try await tab.ask("set colour green", expecting: ["ok"])
        try await watch.waitFor("the second set") { $0["key"] as? String == "colour" && $0["newValue"] as? String == "green" }
        let colours = watch.objects.filter { $0["type"] as? String == "storage" && $0["key"] as? String == "colour" }
        #expect(colours.compactMap { $0["newValue"] as? String } == ["blue", "green"])
        let output = watch.output.joined(separator: "\n") + watch.standardError
        #expect(!output.contains(Self.accessToken) && !output.contains(Self.refreshToken), "watch printed a token")
    }

    @Test func watchShowsATerminalEscapeSequenceEscapedInHumanOutput() async throws {
        let directory = temporaryDirectory("inspect-escape")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let tab = try await launchTab(name: "writer", directory: directory)
        defer { tab.stop() }
        let watch = try ChildProcess("\(productsDirectory)/tabsync", ["watch", directory], name: "watch")
        defer { watch.stop() }
        try await waitForLine(watch, "ready") { $0.hasPrefix("watching ") }

        // Sets the terminal's title where printed raw.
        _ = try await tab.ask("set title \u{1B}]0;pwned\u{07}", expecting: ["ok"])
        let line = try await waitForLine(watch, "the set") { $0.contains("pwned") }
        #expect(line.contains(#""\e]0;pwned\a""#), "escaped: \(line)")
        #expect(line.contains("by writer (seq 1)"))
        let output = watch.output.joined(separator: "\n")
        #expect(!output.contains("\u{1B}") && !output.contains("\u{07}"), "no raw ESC or BEL")
    }

    @Test func locksShowAHolderAndAWaiter() async throws {
        let directory = temporaryDirectory("inspect-locks")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let tab = try await launchTab(name: "writer", directory: directory)
        defer { tab.stop() }
        let lockFile = "\(directory)/app.lock"
        #expect(FileManager.default.fileExists(atPath: lockFile))

        let holder = try ChildProcess("/usr/bin/flock", [lockFile, "sleep", "30"], name: "holder")
        var waiter: ChildProcess?
        defer {
            // `flock FILE sleep 30` runs sleep as its child, which shares the lock: end it first.
            for child in childProcesses(of: holder.process.processIdentifier) { kill(child, SIGKILL) }
            holder.stop()
            waiter?.stop()
        }
        let held = try await waitForLocks(directory, "app.lock held") { lock(in: $0, "app.lock")?["held"] as? Bool == true }
        #expect((lock(in: held, "app.lock")?["waiters"] as? NSNumber)?.intValue == 0)

        waiter = try ChildProcess("/usr/bin/flock", [lockFile, "true"], name: "waiter")
        let document = try await waitForLocks(directory, "a waiter") { (lock(in: $0, "app.lock")?["waiters"] as? NSNumber)?.intValue == 1 }
        let app = lock(in: document, "app.lock") ?? [:]
        let holders = app["holders"] as? [[String: Any]] ?? []
        #expect(holders.count == 1)
        #expect((holders.first?["pid"] as? NSNumber)?.int32Value == holder.process.processIdentifier)
        #expect(holders.first?["command"] as? String == "flock")
        #expect(holders.first?["state"] as? String == "sleeping")
        #expect(holders.first?["kind"] as? String == "FLOCK" && holders.first?["access"] as? String == "WRITE")
        #expect(holders.first?["since"] is NSNull, "unknown for a lock other than the refresh lock")
        let waiting = app["waiting"] as? [[String: Any]] ?? []
        #expect((waiting.first?["pid"] as? NSNumber)?.int32Value == waiter?.process.processIdentifier)
        #expect(waiting.first?["command"] as? String == "flock")
        #expect(lock(in: document, "session.lock")?["held"] as? Bool == false)

        let human = try await runTabsync(["locks", directory])
        #expect(human.status == 0)
        #expect(human.output.contains("app.lock") && human.output.contains("held by pid \(holder.process.processIdentifier) flock (sleeping)"))
        #expect(human.output.contains("1 waiting: pid \(waiter?.process.processIdentifier ?? 0) flock"))
        #expect(human.output.contains("session.lock  free"))
    }

    @Test func locksAndStatusShowARefreshInProgressWithItsStart() async throws {
        let directory = temporaryDirectory("inspect-refresh")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        // A token endpoint that takes connections and never answers: the refresh stays in progress.
        let server = try SilentServer()
        defer { server.close() }
        let tab = try await launchTab(
            name: "refresher", directory: directory,
            extra: ["--token-endpoint", "http://127.0.0.1:\(server.port)/token", "--http-timeout", "120", "--leeway", "0"])
        defer { tab.stop() }
        _ = try await tab.ask("adopt \(Self.accessToken) \(Self.refreshToken) 1", expecting: ["ok"])
        // A wait on the clock, not on an event: the access token lives 1 s.
        try await Task.sleep(for: .milliseconds(1200))
        let asked = Date()
        tab.send("token")  // expired: refreshes, and hangs on the silent server

        let document = try await waitForLocks(directory, "the refresh lock with its start") {
            (lock(in: $0, "session.refresh.lock")?["holders"] as? [[String: Any]])?.first?["since"] is NSNumber
        }
        let holder = (lock(in: document, "session.refresh.lock")?["holders"] as? [[String: Any]])?.first ?? [:]
        #expect((holder["pid"] as? NSNumber)?.int32Value == tab.process.processIdentifier)
        #expect(holder["command"] as? String == "tab")
        #expect(holder["origin"] as? String == "refresher")
        let since = (holder["since"] as? NSNumber)?.doubleValue ?? 0
        #expect(abs(since / 1000 - asked.timeIntervalSince1970) < 10)

        let status = try await runTabsync(["status", directory, "--json"])
        let refresh = (try status.document()["session"] as? [String: Any])?["refresh"] as? [String: Any] ?? [:]
        #expect(refresh["origin"] as? String == "refresher")
        #expect((refresh["pid"] as? NSNumber)?.int32Value == tab.process.processIdentifier)
        #expect((refresh["since"] as? NSNumber)?.doubleValue == since)
        #expect(refresh["running"] as? Bool == true)
        let human = try await runTabsync(["status", directory])
        #expect(human.output.contains("refresh in progress by refresher (pid \(tab.process.processIdentifier)) since"))
        for output in [status.output, human.output] {
            #expect(!output.contains(Self.accessToken) && !output.contains(Self.refreshToken), "status printed a token")
        }
    }

    @Test func doctorAcceptsAGoodDirectoryAndRefusesAGroupWritableOne() async throws {
        let good = temporaryDirectory("inspect-doctor")
        let bad = temporaryDirectory("inspect-doctor-bad")
        defer {
            try? FileManager.default.removeItem(atPath: good)
            try? FileManager.default.removeItem(atPath: bad)
        }
        let tab = try await launchTab(name: "writer", directory: good)
        defer { tab.stop() }
        _ = try await tab.ask("set theme dark", expecting: ["ok"])
        let other = try await launchTab(name: "other", directory: bad)
        _ = try await other.ask("set theme dark", expecting: ["ok"])
        other.stop()

        let accepted = try await runTabsync(["doctor", good, "--json"])
        #expect(accepted.status == 0, "\(accepted.output)")
        let report = try accepted.document()
        #expect(report["ok"] as? Bool == true)
        #expect((report["refused"] as? [Any])?.isEmpty == true)
        #expect((report["directory"] as? [String: Any])?["mode"] as? String == "0700")
        let fileSystem = report["fileSystem"] as? [String: Any] ?? [:]
        #expect(!(fileSystem["type"] as? String ?? "").isEmpty)
        #expect(fileSystem["inotifyReliable"] is Bool && fileSystem["flockReliable"] is Bool)
        let inotify = report["inotify"] as? [String: Any] ?? [:]
        #expect((inotify["maxUserInstances"] as? NSNumber)?.intValue ?? 0 > 0)
        #expect((inotify["descriptorsInUse"] as? NSNumber)?.intValue ?? 0 >= 1, "the running tab has an inotify instance")
        let files = report["files"] as? [[String: Any]] ?? []
        let state = files.first { $0["name"] as? String == "app.state" } ?? [:]
        #expect((state["formatVersion"] as? NSNumber)?.intValue == 1)
        #expect(state["check"] as? String == "valid" && state["mode"] as? String == "0600")

        let human = try await runTabsync(["doctor", good])
        #expect(human.status == 0)
        #expect(human.output.contains("mode 0700") && human.output.contains("file system: \(fileSystem["type"] as? String ?? "?")"))

        #expect(chmod(bad, 0o770) == 0)
        #expect(chmod("\(bad)/app.state", 0o640) == 0)
        let refused = try await runTabsync(["doctor", bad, "--json"])
        #expect(refused.status == 1)
        let problems = try refused.document()["refused"] as? [[String: Any]] ?? []
        #expect(problems.contains { $0["path"] as? String == bad && ($0["reason"] as? String)?.contains("0770") == true }, "\(problems)")
        #expect(problems.contains { $0["path"] as? String == "\(bad)/app.state" && ($0["reason"] as? String)?.contains("0640") == true }, "\(problems)")
        let refusedHuman = try await runTabsync(["doctor", bad])
        #expect(refusedHuman.status == 1)
        #expect(refusedHuman.output.contains("mode 0770") && refusedHuman.output.contains("TabSync would refuse 2 things here"))
    }
}

// MARK: - Running the tool

/// One finished run of `tabsync`.
struct ToolRun: Sendable {
    var status: Int32
    var output: String
    var errors: String

    /// The output as one JSON object.
    func document() throws -> [String: Any] {
        guard let object = try JSONSerialization.jsonObject(with: Data(output.utf8)) as? [String: Any] else {
            throw TestFailure("not a JSON object: \(output)")
        }
        return object
    }
}

/// Runs `tabsync` to its end and returns everything it printed. Killed after `timeout`.
func runTabsync(_ arguments: [String], timeout: Duration = .seconds(30)) async throws -> ToolRun {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "\(productsDirectory)/tabsync")
    process.arguments = arguments
    let stdout = Pipe(), stderr = Pipe()
    process.standardOutput = stdout
    process.standardError = stderr
    process.standardInput = FileHandle.nullDevice
    try process.run()
    let killer = Task {
        try await Task.sleep(for: timeout)
        process.terminate()
    }
    defer { killer.cancel() }
    async let output = readToEnd(stdout.fileHandleForReading)
    async let errors = readToEnd(stderr.fileHandleForReading)
    let (out, err) = await (output, errors)
    while process.isRunning { try await Task.sleep(for: .milliseconds(5)) }
    return ToolRun(status: process.terminationStatus, output: String(decoding: out, as: UTF8.self), errors: String(decoding: err, as: UTF8.self))
}

/// All of a pipe, read on a thread of its own.
private func readToEnd(_ handle: FileHandle) async -> Data {
    await withCheckedContinuation { continuation in
        Thread { continuation.resume(returning: handle.readDataToEndOfFile()) }.start()
    }
}

/// Runs `tabsync locks DIR --json` until `predicate` holds (lock changes have no event to wait on).
private func waitForLocks(
    _ directory: String, _ description: String, timeout: Duration = .seconds(20), where predicate: ([String: Any]) -> Bool
) async throws -> [String: Any] {
    let deadline = ContinuousClock.now + timeout
    while true {
        let run = try await runTabsync(["locks", directory, "--json"])
        let document = try run.document()
        if predicate(document) { return document }
        if ContinuousClock.now >= deadline { throw TestFailure("timed out after \(timeout) waiting for \(description); last: \(run.output)") }
        try await Task.sleep(for: .milliseconds(50))
    }
}

private func lock(in document: [String: Any], _ file: String) -> [String: Any]? {
    (document["locks"] as? [[String: Any]])?.first { $0["file"] as? String == file }
}

/// Waits until a line of `child`'s output matches, and returns it.
@discardableResult
private func waitForLine(_ child: ChildProcess, _ description: String, timeout: Duration = .seconds(20), where predicate: (String) -> Bool) async throws -> String {
    let deadline = ContinuousClock.now + timeout
    while true {
        if let line = child.output.first(where: predicate) { return line }
        if ContinuousClock.now >= deadline || !child.process.isRunning {
            throw TestFailure("\(child.name): no line for \(description) after \(timeout). Output:\n\(child.output.suffix(20).joined(separator: "\n"))\nstderr: \(child.standardError)")
        }
        try await Task.sleep(for: .milliseconds(10))
    }
}

/// A TCP listener on 127.0.0.1 that never accepts: connections complete in the kernel's
/// backlog, and requests are never answered.
final class SilentServer: Sendable {
    let descriptor: Int32
    let port: UInt16

    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { address in
                bind(fd, address, length) == 0 && listen(fd, 64) == 0 && getsockname(fd, address, &length) == 0
            }
        }
        guard fd >= 0, bound else {
            if fd >= 0 { _ = Glibc.close(fd) }
            throw TestFailure("cannot listen on 127.0.0.1: errno \(errno)")
        }
        descriptor = fd
        port = UInt16(bigEndian: address.sin_port)
    }

    func close() { _ = Glibc.close(descriptor) }
}

/// The pids whose parent is `pid` (field 4 of /proc/PID/stat, after the command name).
private func childProcesses(of pid: Int32) -> [Int32] {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    return entries.compactMap(Int32.init).filter { candidate in
        guard let stat = try? String(contentsOfFile: "/proc/\(candidate)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")") else { return false }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        return fields.count > 1 && Int32(fields[1]) == pid
    }
}
