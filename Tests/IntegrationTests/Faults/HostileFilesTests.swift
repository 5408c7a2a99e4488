import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Hostile or broken files planted in a live session: two `tab` processes are running when a
/// file is replaced (renamed over, as an attacker or a careless program would). Each tab must
/// refuse or recover with an error naming the path, keep running, never follow a link, and
/// work again once the file is sane.
@Suite(.serialized, .timeLimit(.minutes(3)))
struct HostileFilesTests {
    enum Plant: String, CaseIterable, Sendable {
        // In place of the log.
        case logSymlink, logFIFO, logDevice, logOwnedByNobody, logWritableByOthers
        case logGarbage, logTruncated, logWrongChecksum, logBitFlippedInTheMiddle, logFutureVersion, logOversized
        /// A record claiming 4 GiB appended: a torn tail to readers, cut by the next writer.
        case logHugeRecord
        // In place of the commit lock.
        case lockSymlink, lockDanglingSymlink, lockFIFO, lockDevice, lockOwnedByNobody, lockWritableByOthers

        var file: String { rawValue.hasPrefix("lock") ? "app.lock" : "app.log" }

        /// The `code` the tab reports (it maps notRegularFile to insecurePath); nil: nothing to report.
        var code: String? {
            switch self {
            case .logGarbage, .logTruncated, .logWrongChecksum, .logBitFlippedInTheMiddle: "corruptState"
            case .logFutureVersion: "unsupportedVersion"
            case .logOversized: "stateTooLarge"
            case .logHugeRecord: nil
            default: "insecurePath"
            }
        }

        /// Damaged logs are moved aside and recovered; a torn tail is cut; everything else is
        /// refused and left alone.
        var isRecovered: Bool { code == "corruptState" }

        var needsRoot: Bool { [.logDevice, .lockDevice, .logOwnedByNobody, .lockOwnedByNobody].contains(self) }
    }

    /// Devices and files of another user need root (mknod, chown); without it those cases are left out.
    @Test(arguments: Plant.allCases.filter { !$0.needsRoot || geteuid() == 0 })
    func aPlantedFileIsRefusedOrRecoveredAndEveryTabKeepsRunning(_ plant: Plant) async throws {
        let directory = temporaryDirectory("hostile")
        let outside = directory + "-outside"
        defer {
            try? FileManager.default.removeItem(atPath: directory)
            try? FileManager.default.removeItem(atPath: outside)
        }
        let watcher = try await launchTab(name: "watcher", directory: directory)
        let writer = try await launchTab(name: "writer", directory: directory)
        defer { watcher.stop(); writer.stop() }
        #expect(try await writer.command("set k v1").type == "ok")
        #expect(try await writer.command("set j w1").type == "ok")
        try await watcher.waitFor("the first changes") { $0.type == "storage" && $0.string("newValue") == "w1" }

        let path = "\(directory)/\(plant.file)"
        // A valid log outside the session with a value of its own: a tab that followed a link
        // to it would print that value.
        #expect(mkdir(outside, 0o700) == 0)
        let lure = "\(outside)/lure"
        try writeFile(lure, logFile(values: ["k": "lured"], sequence: 9))
        let valid = try [UInt8](Data(contentsOf: URL(fileURLWithPath: "\(directory)/app.log")))
        try Self.plant(plant, at: path, lure: lure, outside: outside, valid: valid)

        if plant.file == "app.log", let code = plant.code {
            // The watching tab notices by itself and reports the problem as an event.
            let reported = try await watcher.waitFor("an error event", timeout: .seconds(20)) { $0.type == "error" && $0["cmd"] == nil }
            #expect(reported.first?.string("code") == code)
            #expect(reported.first?.string("message")?.contains(path) == true, "names \(path): \(reported)")
        }
        // A commit is refused with an error naming the file, or goes through after recovery.
        let reply = try await writer.command("set k v2")
        if plant.isRecovered || plant.code == nil {
            #expect(reply.type == "ok")
            let aside = try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasPrefix("app.log.corrupt-") }
            #expect(aside.count == (plant.isRecovered ? 1 : 0), "a damaged log was moved aside, a torn tail only cut")
            try await watcher.waitFor("the change after recovery") { $0.type == "storage" && $0.string("newValue") == "v2" }
            // No committed value was lost: both keys hold their last values, for a late reader too.
            let late = try await launchTab(name: "late", directory: directory)
            defer { late.stop() }
            #expect(try await late.command("get j").string("value") == "w1")
            #expect(try await late.command("get k").string("value") == "v2")
            #expect(try checkLog(path).tail == 0, "the log ends at a complete commit")
        } else {
            #expect(reply.type == "error")
            #expect(reply.string("code") == plant.code)
            #expect(reply.string("message")?.contains(path) == true, "names \(path): \(reply)")
            // Nothing planted was touched, followed or replaced.
            var info = stat()
            #expect(lstat(path, &info) == 0)
            #expect(FileManager.default.contents(atPath: lure) == Data(logFile(values: ["k": "lured"], sequence: 9)))
            #expect(!FileManager.default.fileExists(atPath: "\(outside)/dangling"))
            // The planted file goes away; the tabs work again.
            #expect(unlink(path) == 0)
            #expect(try await writer.command("set k v3").type == "ok")
            try await watcher.waitFor("the change after the cleanup") { $0.type == "storage" && $0.string("newValue") == "v3" }
        }
        for tab in [watcher, writer] {
            #expect(tab.process.isRunning, "\(tab.name) keeps running")
            #expect(!tab.output.contains { $0.contains("lured") }, "\(tab.name) never read through a link")
            let sequences = tab.storageEvents.compactMap(\.seq)
            #expect(sequences == sequences.sorted(), "\(tab.name): events never go back in sequence: \(sequences)")
        }
    }

    /// A session directory given to another user, or opened to others, is refused by a tab
    /// that starts there, with one line naming it and nothing written.
    @Test(.enabled(if: geteuid() == 0, "needs root to give a directory to another user"))
    func aSessionDirectoryOwnedByAnotherUserIsRefused() async throws {
        let directory = temporaryDirectory("owner")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        #expect(mkdir(directory, 0o700) == 0 && chown(directory, 65534, 65534) == 0)
        let tab = try ChildProcess("\(productsDirectory)/tab", ["--dir", directory, "--name", "a", "--json"], name: "a")
        try await tab.waitForExit()
        #expect(tab.process.terminationStatus != 0)
        #expect(tab.standardError.contains(directory) && tab.standardError.contains("owned by uid 65534"), "\(tab.standardError)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory).isEmpty)
    }

    /// The size of a log's last record (its length field, the frame and the CRC).
    static func lastRecordSize(_ log: [UInt8]) -> Int {
        var offset = 48, last = 0
        while offset + 20 <= log.count {
            let length = Int(log[offset]) | Int(log[offset + 1]) << 8 | Int(log[offset + 2]) << 16 | Int(log[offset + 3]) << 24
            last = 20 + length
            offset += last
        }
        return last
    }

    /// Puts the hostile or broken file in place of `path`.
    private static func plant(_ plant: Plant, at path: String, lure: String, outside: String, valid: [UInt8]) throws {
        switch plant {
        case .logSymlink, .lockSymlink:
            try replaceAtomically(path) { guard symlink(lure, $0) == 0 else { throw TestFailure("symlink: errno \(errno)") } }
        case .lockDanglingSymlink:
            try replaceAtomically(path) { guard symlink("\(outside)/dangling", $0) == 0 else { throw TestFailure("symlink: errno \(errno)") } }
        case .logFIFO, .lockFIFO:
            try replaceAtomically(path) { guard mkfifo($0, 0o600) == 0 else { throw TestFailure("mkfifo: errno \(errno)") } }
        case .logDevice, .lockDevice:
            // The same device as /dev/null.
            var null = stat()
            guard stat("/dev/null", &null) == 0 else { throw TestFailure("stat /dev/null: errno \(errno)") }
            try replaceAtomically(path) { guard mknod($0, S_IFCHR | 0o600, null.st_rdev) == 0 else { throw TestFailure("mknod: errno \(errno)") } }
        case .logOwnedByNobody, .lockOwnedByNobody:
            try replaceAtomically(path) { staging in
                try writeFile(staging, plant == .logOwnedByNobody ? valid : [])
                guard chown(staging, 65534, 65534) == 0 else { throw TestFailure("chown: errno \(errno)") }
            }
        case .logWritableByOthers, .lockWritableByOthers:
            try replaceAtomically(path) { try writeFile($0, plant == .logWritableByOthers ? valid : [], mode: 0o666) }
        case .logGarbage:
            try replaceAtomically(path) { try writeFile($0, Array("PK\u{3}\u{4} this is a zip file, not a TabSync log, and long enough for a header\n".utf8) + [0, 0xFF, 0xFE]) }
        case .logTruncated:
            // Cut inside the last commit: an older, shorter copy put in place.
            try replaceAtomically(path) { try writeFile($0, Array(valid.prefix(valid.count - 10))) }
        case .logWrongChecksum:
            var flipped = valid
            flipped[flipped.count - 3] ^= 0x20
            try replaceAtomically(path) { try writeFile($0, flipped) }
        case .logBitFlippedInTheMiddle:
            // Inside the first change record (k = v1): the second one (j = w1) still checks.
            var flipped = valid
            flipped[flipped.count - Self.lastRecordSize(valid) - 12] ^= 0x01
            try replaceAtomically(path) { try writeFile($0, flipped) }
        case .logFutureVersion:
            var future = valid
            future[12] = 3
            try replaceAtomically(path) { try writeFile($0, future) }
        case .logOversized:
            // 100 MiB, sparse: ftruncate, no data written.
            try replaceAtomically(path) { staging in
                try writeFile(staging, valid)
                guard truncate(staging, 100 << 20) == 0 else { throw TestFailure("truncate: errno \(errno)") }
            }
        case .logHugeRecord:
            try replaceAtomically(path) { try writeFile($0, valid + [0xFF, 0xFF, 0xFF, 0xFF, 1, 0, 0, 0] + [UInt8](repeating: 0, count: 24)) }
        }
    }
}
