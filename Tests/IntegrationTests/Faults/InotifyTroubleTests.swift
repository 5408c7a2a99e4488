import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// inotify that cannot keep up or cannot be had. (The queue overflow itself, IN_Q_OVERFLOW, is
/// forced and counted in TabSyncTests/WatcherOverflowTests, where the watcher thread can be held.)
@Suite(.serialized, .timeLimit(.minutes(3)))
struct InotifyTroubleTests {
    /// One tab sleeps (SIGSTOP) while another commits far more changes than the log keeps (a
    /// history of 20, compacted past 180): every notification of the burst is coalesced into the
    /// reads the tab makes when it wakes up.
    @Test func aTabPausedDuringABurstCatchesUpWithEveryKeyAndThenEveryChange() async throws {
        // tmpfs, so that the burst's fsyncs cost nothing.
        let base = FileManager.default.fileExists(atPath: "/dev/shm") ? "/dev/shm" : FileManager.default.temporaryDirectory.path
        let directory = "\(base)/tabsync-it-burst-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let sleeper = try await launchTab(name: "sleeper", directory: directory, extra: ["--history", "20"])
        let writer = try await launchTab(name: "writer", directory: directory, extra: ["--history", "20"])
        defer { sleeper.kill(SIGCONT); sleeper.stop(); writer.stop() }

        sleeper.kill(SIGSTOP)
        let burst = 700  // more than the 20 to 180 changes the log keeps
        writer.send((1...burst).map { "set k\($0 % 10) \($0)" }.joined(separator: "\n"))
        try await writer.waitFor("the burst's replies", count: burst, timeout: .seconds(90)) { $0.type == "ok" }
        sleeper.kill(SIGCONT)

        // After waking, the sleeper converges on the final values of every key.
        let expected = Dictionary(uniqueKeysWithValues: (0..<10).map { key in ("k\(key)", String(burst - (burst - key) % 10)) })
        // k9 comes last both in a resync (keys in order) and in a replay of the log (value 699).
        try await sleeper.waitFor("k9's final value", timeout: .seconds(30)) { $0.type == "storage" && $0.string("key") == "k9" && $0.string("newValue") == expected["k9"] }
        var view: [String: String] = [:]
        for event in sleeper.storageEvents {
            if let key = event.string("key") { view[key] = event.string("newValue") }
        }
        #expect(view == expected)
        let sequences = sleeper.storageEvents.compactMap(\.seq)
        #expect(sequences == sequences.sorted(), "events never go back in sequence")
        // The log (20 to 180 changes) does not reach back over 700: the catch-up is a resync, and says so.
        let resync = sleeper.storageEvents.filter { $0["resync"] as? Bool == true }
        #expect(!resync.isEmpty && resync.allSatisfy { $0.seq == burst }, "resync events, all at the newest seq: \(resync.prefix(3))")

        // And it follows every single change again afterwards.
        writer.send((1...20).map { "set after \($0)" }.joined(separator: "\n"))
        let after = try await sleeper.waitFor("the changes after the burst", count: 20) { $0.type == "storage" && $0.string("key") == "after" }
        #expect(after.compactMap(\.seq) == Array((burst + 1)...(burst + 20)))
        #expect(after.allSatisfy { $0["resync"] == nil }, "single changes are not marked")
        #expect(sleeper.unsolicitedErrors.isEmpty)
    }

    /// A tab started while its user has no inotify instance left polls, says so, and still
    /// delivers every change. The limit (max_user_instances) is per user, so the test runs the
    /// tabs as `nobody` and exhausts nobody's instances: processes of other users, this test
    /// process included, keep theirs.
    @Test(.enabled(if: geteuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv"),
                   "needs root and setpriv to run the tabs as another user"))
    func aTabStartedWithoutInotifyInstancesPollsReportsItAndDeliversEveryChange() async throws {
        let directory = temporaryDirectory("noinotify")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        #expect(mkdir(directory, 0o700) == 0 && chown(directory, 65534, 65534) == 0)
        let asNobody = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
        // Holds every inotify instance nobody may have until its standard input closes.
        let hog = try ChildProcess("/usr/bin/setpriv", Array(asNobody.dropFirst()) + ["/usr/bin/python3", "-c", Self.instanceHog], name: "hog")
        defer { hog.stop() }
        let held = try await hog.waitFor("the instances held") { $0.type == "held" }
        #expect(held.first?["errno"] as? String == "EMFILE", "inotify_init1 failed with EMFILE: \(held)")

        let polled = try ChildProcess(asNobody[0], Array(asNobody.dropFirst()) + ["\(productsDirectory)/tab", "--dir", directory, "--name", "polled", "--json"], name: "polled")
        defer { polled.stop() }
        try await polled.waitFor("ready") { $0.type == "ready" }
        hog.stop()

        let report = try await polled.waitFor("the polling report") { $0.type == "error" && $0.string("code") == "watcherUnavailable" }
        let message = report.first?.string("message") ?? ""
        #expect(message.contains("polling") && message.contains("max_user_instances"), "the report says why: \(message)")

        let writer = try ChildProcess(asNobody[0], Array(asNobody.dropFirst()) + ["\(productsDirectory)/tab", "--dir", directory, "--name", "writer", "--json"], name: "writer")
        defer { writer.stop() }
        try await writer.waitFor("ready") { $0.type == "ready" }
        let changes = 100
        writer.send((1...changes).map { "set k\($0 % 7) \($0)" }.joined(separator: "\n"))
        let events = try await polled.waitFor("every change", count: changes, timeout: .seconds(60)) { $0.type == "storage" }
        #expect(events.compactMap(\.seq) == Array(1...changes))
        #expect(events.map { $0.string("newValue") } == (1...changes).map { String($0) })
    }

    /// A process that could not have inotify polls; once instances are free again, its next
    /// registration gets inotify: a failed `inotify_init` is retried, and does not doom the
    /// process to polling. `tabsync watch` opens a storage as it appears, which is such a
    /// registration; the kernel tells whether the process holds an inotify instance.
    @Test(.enabled(if: geteuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv"),
                   "needs root and setpriv to run the processes as another user"))
    func aFailedInotifyIsRetriedAtTheNextRegistration() async throws {
        let directory = temporaryDirectory("inotify-retry")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        #expect(mkdir(directory, 0o700) == 0 && chown(directory, 65534, 65534) == 0)
        let asNobody = ["--reuid=65534", "--regid=65534", "--clear-groups", "--"]
        // A storage to follow, made while inotify instances are still to be had.
        let maker = try ChildProcess("/usr/bin/setpriv", asNobody + ["\(productsDirectory)/tab", "--dir", directory, "--name", "maker", "--json"], name: "maker")
        try await maker.waitFor("ready") { $0.type == "ready" }
        maker.stop()
        try await maker.waitForExit()  // and its own instance is free again

        let hog = try ChildProcess("/usr/bin/setpriv", asNobody + ["/usr/bin/python3", "-c", Self.instanceHog], name: "hog")
        defer { hog.stop() }
        _ = try await hog.waitFor("the instances held") { $0.type == "held" }
        let watch = try ChildProcess("/usr/bin/setpriv", asNobody + ["\(productsDirectory)/tabsync", "watch", directory, "--json"], name: "watch")
        defer { watch.stop() }
        try await watch.waitFor("ready") { $0.type == "ready" }
        let pid = watch.process.processIdentifier
        #expect(Self.inotifyInstances(of: pid) == 0, "it polls: no instance to be had")

        hog.stop()
        try await hog.waitForExit()
        // A new storage appears (a copy of a valid log, nobody's, 0600).
        let copy = "\(directory)/extra.log"
        try Data(contentsOf: URL(fileURLWithPath: "\(directory)/app.log")).write(to: URL(fileURLWithPath: copy))
        #expect(chmod(copy, 0o600) == 0 && chown(copy, 65534, 65534) == 0)
        try await watch.waitFor("the new storage") { $0.type == "storageFound" && $0.string("storage") == "extra" }
        let deadline = ContinuousClock.now + .seconds(20)
        while Self.inotifyInstances(of: pid) == 0, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(Self.inotifyInstances(of: pid) > 0, "the registration after the failure got inotify")
    }

    /// A tab started with more than 1,024 descriptors open (inherited here, as from a busy
    /// parent) neither crashes nor misses a change: libinotifytools waits with select(2), which
    /// cannot take a descriptor of 1024 or above and aborted the process ("bit out of range 0 -
    /// FD_SETSIZE on fd_set"). It polls, says why, and delivers every change.
    @Test func aTabWithMoreThan1024DescriptorsOpenPollsAndDeliversEveryChange() async throws {
        let directory = temporaryDirectory("manyfds")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let opener = "import os, sys\nfor _ in range(1100): os.set_inheritable(os.open('/dev/null', os.O_RDONLY), True)\nos.execv(sys.argv[1], sys.argv[1:])"
        let crowded = try ChildProcess(
            "/usr/bin/python3", ["-c", opener, "\(productsDirectory)/tab", "--dir", directory, "--name", "crowded", "--json"], name: "crowded")
        defer { crowded.stop() }
        try await crowded.waitFor("ready") { $0.type == "ready" }
        let report = try await crowded.waitFor("the polling report") { $0.type == "error" && $0.string("code") == "watcherUnavailable" }
        let message = report.first?.string("message") ?? ""
        #expect(message.contains("polling") && message.contains("1024"), "the report says why: \(message)")

        let writer = try await launchTab(name: "writer", directory: directory)
        defer { writer.stop() }
        let changes = 20
        writer.send((1...changes).map { "set k \($0)" }.joined(separator: "\n"))
        let events = try await crowded.waitFor("every change", count: changes, timeout: .seconds(30)) { $0.type == "storage" }
        #expect(events.compactMap(\.seq) == Array(1...changes))
        #expect(crowded.process.isRunning)
    }

    /// How many inotify instances process `pid` holds (descriptors that link to `anon_inode:inotify`).
    static func inotifyInstances(of pid: Int32) -> Int {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []
        return fds.filter { (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\($0)")) == "anon_inode:inotify" }.count
    }

    /// Opens inotify instances until the kernel refuses, reports how many and why, then waits.
    static let instanceHog = """
        import ctypes, errno, json, sys
        libc = ctypes.CDLL(None, use_errno=True)
        held = []
        while len(held) < 65536:
            fd = libc.inotify_init1(0o2000000)
            if fd < 0:
                break
            held.append(fd)
        print(json.dumps({"type": "held", "count": len(held), "errno": errno.errorcode.get(ctypes.get_errno(), "?")}), flush=True)
        sys.stdin.read()
        """
}
