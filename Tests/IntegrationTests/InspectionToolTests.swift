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
        let log = try Data(contentsOf: URL(fileURLWithPath: "\(directory)/session.log"))
        #expect(log.range(of: Data(Self.accessToken.utf8)) != nil && log.range(of: Data(Self.refreshToken.utf8)) != nil)

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

    /// A log `watch` could not open (its tail needs a cut, which the tool leaves to TabSync) is
    /// followed once a TabSync process cuts the tail and commits: both change the log in place,
    /// with no rename to announce it.
    @Test func watchFollowsALogOnceItIsRepairedInPlace() async throws {
        let directory = temporaryDirectory("inspect-repair")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let first = try await launchTab(name: "first", directory: directory)
        _ = try await first.ask("set a 1", expecting: ["ok"])
        first.stop()
        try await first.waitForExit()
        let torn = try [UInt8](Data(contentsOf: URL(fileURLWithPath: "\(directory)/app.log"))) + [UInt8](repeating: 0xFF, count: 40)
        try writeFile("\(directory)/app.log", torn)

        let watch = try ChildProcess("\(productsDirectory)/tabsync", ["watch", directory, "--json"], name: "watch")
        defer { watch.stop() }
        let ready = try await watch.waitFor("ready") { $0["type"] as? String == "ready" }
        #expect(ready.first?["storages"] as? [String] == ["session"])
        try await watch.waitFor("app not opened") { $0["type"] as? String == "error" && $0["storage"] as? String == "app" && $0["code"] as? String == "corruptState" }

        let second = try await launchTab(name: "second", directory: directory)
        defer { second.stop() }
        _ = try await second.ask("set b 2", expecting: ["ok"])
        try await watch.waitFor("app found") { $0["type"] as? String == "storageFound" && $0["storage"] as? String == "app" }
        let change = try await watch.waitFor("the set") { $0["type"] as? String == "storage" && $0["storage"] as? String == "app" && $0["key"] as? String == "b" }[0]
        #expect(change["newValue"] as? String == "2" && change["origin"] as? String == "second" && (change["seq"] as? NSNumber)?.intValue == 2)
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
        let log = files.first { $0["name"] as? String == "app.log" } ?? [:]
        #expect(log["role"] as? String == "log" && (log["formatVersion"] as? NSNumber)?.intValue == 2)
        #expect(log["check"] as? String == "valid" && log["mode"] as? String == "0600")
        #expect((log["seq"] as? NSNumber)?.intValue == 1 && (log["keys"] as? NSNumber)?.intValue == 1)
        #expect(!(log["store"] as? String ?? "").isEmpty)
        let marker = files.first { $0["name"] as? String == "app.state" } ?? [:]
        #expect(marker["role"] as? String == "state" && marker["check"] as? String == "marker")
        let folder = files.first { $0["name"] as? String == ".compacting" } ?? [:]
        #expect(folder["role"] as? String == "compactionFolder" && folder["mode"] as? String == "0700", "\(files.map { $0["name"] })")

        let human = try await runTabsync(["doctor", good])
        #expect(human.status == 0)
        #expect(human.output.contains("mode 0700") && human.output.contains("file system: \(fileSystem["type"] as? String ?? "?")"))

        #expect(chmod(bad, 0o770) == 0)
        #expect(chmod("\(bad)/app.log", 0o640) == 0)
        #expect(chmod("\(bad)/.compacting", 0o755) == 0)
        let refused = try await runTabsync(["doctor", bad, "--json"])
        #expect(refused.status == 1)
        let problems = try refused.document()["refused"] as? [[String: Any]] ?? []
        #expect(problems.contains { $0["path"] as? String == bad && ($0["reason"] as? String)?.contains("0770") == true }, "\(problems)")
        #expect(problems.contains { $0["path"] as? String == "\(bad)/app.log" && ($0["reason"] as? String)?.contains("0640") == true }, "\(problems)")
        #expect(problems.contains { $0["path"] as? String == "\(bad)/.compacting" && ($0["reason"] as? String)?.contains("0755") == true }, "\(problems)")
        let refusedHuman = try await runTabsync(["doctor", bad])
        #expect(refusedHuman.status == 1)
        #expect(refusedHuman.output.contains("mode 0770") && refusedHuman.output.contains("TabSync would refuse 3 things here"))
    }

    /// A log with a torn tail, a damaged one, one of a newer version, and a format 1 state file
    /// not upgraded yet: `doctor` and `status` say what TabSync will do with each, and neither
    /// changes a byte of the directory (TabSync's own read would repair or upgrade).
    @Test func doctorAndStatusReportTornDamagedNewerAndFormat1StoragesAndChangeNothing() async throws {
        let directory = temporaryDirectory("inspect-damage")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let tab = try await launchTab(name: "writer", directory: directory)
        for command in ["set a 1", "set b 2", "set c 3"] {
            _ = try await tab.ask(command, expecting: ["ok"])
        }
        tab.stop()
        try await tab.waitForExit()
        let path = "\(directory)/app.log"
        let good = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        let records = recordOffsets(inLog: good)
        #expect(records.count == 4, "the snapshot and the three sets: \(records)")
        guard records.count == 4 else { return }

        /// `doctor --json` and `status --json` on the directory with `bytes` as `name`: the entry
        /// of that file and of the storage `app`, and the doctor's warnings and refusals about it.
        func inspect(_ name: String, _ bytes: [UInt8]) async throws -> (file: [String: Any], storage: [String: Any], findings: [String]) {
            try writeFile("\(directory)/\(name)", bytes)
            let listing = try FileManager.default.contentsOfDirectory(atPath: directory).sorted()
            let doctor = try await runTabsync(["doctor", directory, "--json"])
            let status = try await runTabsync(["status", directory, "--json"])
            #expect(try [UInt8](Data(contentsOf: URL(fileURLWithPath: "\(directory)/\(name)"))) == bytes, "\(name) changed")
            #expect(try FileManager.default.contentsOfDirectory(atPath: directory).sorted() == listing, "files came or went")
            let report = try doctor.document()
            let file = (report["files"] as? [[String: Any]])?.first { $0["name"] as? String == name } ?? [:]
            let findings = ((report["warnings"] as? [[String: Any]] ?? []) + (report["refused"] as? [[String: Any]] ?? []))
                .filter { $0["path"] as? String == "\(directory)/\(name)" }.compactMap { $0["reason"] as? String }
            let storage = (try status.document()["storages"] as? [[String: Any]])?.first { $0["name"] as? String == "app" } ?? [:]
            return (file, storage, findings)
        }
        func number(_ value: Any?) -> Int? { (value as? NSNumber)?.intValue }
        func code(_ storage: [String: Any]) -> String? { (storage["error"] as? [String: Any])?["code"] as? String }

        // A commit cut short (the last record's first 20 bytes again): readers leave it alone, so `status` opens the log.
        let short = try await inspect("app.log", good + good[records[3]..<records[3] + 20])
        #expect(short.file["check"] as? String == "tornTail" && number(short.file["seq"]) == 3 && number(short.file["keys"]) == 3)
        #expect(short.findings.isEmpty, "harmless: \(short.findings)")
        #expect(number(short.storage["seq"]) == 3 && short.storage["error"] is NSNull, "\(short.storage)")

        // Bytes that are no record, and nothing valid after them: a reader would cut them, so `status` does not open the log.
        let torn = try await inspect("app.log", good + [UInt8](repeating: 0xFF, count: 40))
        #expect(torn.file["check"] as? String == "tornTail" && number(torn.file["seq"]) == 3)
        #expect(torn.findings.isEmpty, "harmless: \(torn.findings)")
        #expect(code(torn.storage) == "corruptState", "\(torn.storage)")

        // The second set's record damaged, the third one intact: the state as of the first set, and recovery ahead.
        var damaged = good
        damaged[records[2] + 20] ^= 0x01
        let broken = try await inspect("app.log", damaged)
        #expect(broken.file["check"] as? String == "damaged" && number(broken.file["seq"]) == 1 && number(broken.file["keys"]) == 1)
        #expect(broken.findings.contains { $0.contains("moves it aside as app.log.corrupt-TIME") }, "\(broken.findings)")
        #expect(code(broken.storage) == "corruptState", "\(broken.storage)")

        // The third set's record renumbered 5, its checksum made again (over the header's salt and
        // the record): it checks, but 3 comes next, and nothing valid follows it.
        var renumbered = good
        renumbered[records[3] + 8] = 5
        let crc = crc32(Array(good[20..<36]) + Array(renumbered[records[3]..<good.count - 4]))
        renumbered.replaceSubrange(good.count - 4..<good.count, with: (0..<4).map { UInt8(truncatingIfNeeded: crc >> (8 * $0)) })
        let skipped = try await inspect("app.log", renumbered)
        #expect(skipped.file["check"] as? String == "tornTail" && number(skipped.file["seq"]) == 2 && number(skipped.file["keys"]) == 2)
        #expect(code(skipped.storage) == "corruptState", "\(skipped.storage)")
        let why = (skipped.storage["error"] as? [String: Any])?["message"] as? String ?? ""
        #expect(why.contains("a record has sequence 5 where 3 comes next"), "\(why)")

        // A newer format version: refused.
        var newer = good
        newer[12] = 3
        let future = try await inspect("app.log", newer)
        #expect(future.file["check"] as? String == "unsupportedVersion" && number(future.file["formatVersion"]) == 3)
        #expect(future.findings.contains { $0.contains("format version 3") }, "\(future.findings)")
        #expect(code(future.storage) == "unsupportedVersion", "\(future.storage)")

        // A format 1 directory: `app.state` a state file of its own, and no log yet.
        #expect(unlink(path) == 0)
        let body = Array(#"{"journal":[],"seq":7,"store":"0b5d2f8e","values":{"theme":"dark"}}"#.utf8)
        let hex = String(crc32(body), radix: 16)
        let old = try await inspect("app.state", Array("tabsync-state 1 7 \(body.count) \(String(repeating: "0", count: 8 - hex.count))\(hex)\n".utf8) + body)
        #expect(old.file["check"] as? String == "format1" && number(old.file["formatVersion"]) == 1 && number(old.file["seq"]) == 7)
        #expect(old.findings == ["format 1: upgraded to app.log by the next TabSync process that opens it"], "\(old.findings)")
        #expect(code(old.storage) == "format1", "\(old.storage)")
        #expect(!FileManager.default.fileExists(atPath: path), "not upgraded by the tool")

        // The upgrade, by a TabSync process: the log goes on from the state file, which becomes the marker.
        let upgrader = try await launchTab(name: "upgrader", directory: directory)
        _ = try await upgrader.ask("set d 4", expecting: ["ok"])
        upgrader.stop()
        try await upgrader.waitForExit()
        let upgraded = try await runTabsync(["doctor", directory, "--json"])
        let files = try upgraded.document()["files"] as? [[String: Any]] ?? []
        let log = files.first { $0["name"] as? String == "app.log" } ?? [:]
        #expect(log["check"] as? String == "valid" && number(log["seq"]) == 8 && number(log["keys"]) == 2 && log["store"] as? String == "0b5d2f8e")
        #expect(files.first { $0["name"] as? String == "app.state" }?["check"] as? String == "marker")
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

/// The offsets of a log's records, read here without TabSync: after the 48-byte header, each is
/// a u32 length (little-endian), 12 more bytes of frame, the payload and a 4-byte checksum.
private func recordOffsets(inLog bytes: [UInt8]) -> [Int] {
    var offsets: [Int] = []
    var offset = 48
    while offset + 16 <= bytes.count {
        offsets.append(offset)
        let length = (0..<4).reduce(0) { $0 | Int(bytes[offset + $1]) << (8 * $1) }
        offset += 16 + length + 4
    }
    return offsets
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
