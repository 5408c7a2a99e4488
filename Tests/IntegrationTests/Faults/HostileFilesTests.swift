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
        // In place of the state file.
        case stateSymlink, stateFIFO, stateDevice, stateOwnedByNobody, stateWritableByOthers
        case stateGarbage, stateTruncated, stateWrongChecksum, stateFutureVersion, stateOversized
        // In place of the commit lock.
        case lockSymlink, lockDanglingSymlink, lockFIFO, lockDevice, lockOwnedByNobody, lockWritableByOthers

        var file: String { rawValue.hasPrefix("lock") ? "app.lock" : "app.state" }

        /// The `code` the tab reports (it maps notRegularFile to insecurePath).
        var code: String {
            switch self {
            case .stateGarbage, .stateTruncated, .stateWrongChecksum: "corruptState"
            case .stateFutureVersion: "unsupportedVersion"
            case .stateOversized: "stateTooLarge"
            default: "insecurePath"
            }
        }

        /// Corrupt files are moved aside and recovered; everything else is refused and left alone.
        var isRecovered: Bool { code == "corruptState" }

        var needsRoot: Bool { [.stateDevice, .lockDevice, .stateOwnedByNobody, .lockOwnedByNobody].contains(self) }
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
        try await watcher.waitFor("the first change") { $0.type == "storage" && $0.string("newValue") == "v1" }

        let path = "\(directory)/\(plant.file)"
        // A valid state file outside the session with a value of its own: a tab that followed
        // a link to it would print that value.
        #expect(mkdir(outside, 0o700) == 0)
        let lure = "\(outside)/lure"
        try writeFile(lure, Self.stateFile(values: ["k": "lured"], sequence: 9))
        let valid = try [UInt8](Data(contentsOf: URL(fileURLWithPath: "\(directory)/app.state")))
        try Self.plant(plant, at: path, lure: lure, outside: outside, valid: valid)

        if plant.file == "app.state" {
            // The watching tab notices by itself and reports the problem as an event.
            let reported = try await watcher.waitFor("an error event", timeout: .seconds(20)) { $0.type == "error" && $0["cmd"] == nil }
            #expect(reported.first?.string("code") == plant.code)
            #expect(reported.first?.string("message")?.contains(path) == true, "names \(path): \(reported)")
        }
        // A commit is refused with an error naming the file, or goes through after recovery.
        let reply = try await writer.command("set k v2")
        if plant.isRecovered {
            #expect(reply.type == "ok")
            let aside = try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasPrefix("app.state.corrupt-") }
            #expect(aside.count == 1, "the corrupt file was moved aside")
            try await watcher.waitFor("the change after recovery") { $0.type == "storage" && $0.string("newValue") == "v2" }
        } else {
            #expect(reply.type == "error")
            #expect(reply.string("code") == plant.code)
            #expect(reply.string("message")?.contains(path) == true, "names \(path): \(reply)")
            // Nothing planted was touched, followed or replaced.
            var info = stat()
            #expect(lstat(path, &info) == 0)
            #expect(FileManager.default.contents(atPath: lure) == Data(Self.stateFile(values: ["k": "lured"], sequence: 9)))
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

    /// A version-1 state file with these values and an empty journal.
    static func stateFile(values: [String: String], sequence: Int) -> [UInt8] {
        let object: [String: Any] = ["store": "00000000-0000-0000-0000-00000000beef", "seq": sequence, "values": values, "journal": [Any]()]
        let body = [UInt8](try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]))
        let crc = String(crc32(body), radix: 16)
        return Array("tabsync-state 1 \(sequence) \(body.count) \(String(repeating: "0", count: 8 - crc.count))\(crc)\n".utf8) + body
    }

    /// Puts the hostile or broken file in place of `path`.
    private static func plant(_ plant: Plant, at path: String, lure: String, outside: String, valid: [UInt8]) throws {
        switch plant {
        case .stateSymlink, .lockSymlink:
            try replaceAtomically(path) { guard symlink(lure, $0) == 0 else { throw TestFailure("symlink: errno \(errno)") } }
        case .lockDanglingSymlink:
            try replaceAtomically(path) { guard symlink("\(outside)/dangling", $0) == 0 else { throw TestFailure("symlink: errno \(errno)") } }
        case .stateFIFO, .lockFIFO:
            try replaceAtomically(path) { guard mkfifo($0, 0o600) == 0 else { throw TestFailure("mkfifo: errno \(errno)") } }
        case .stateDevice, .lockDevice:
            // The same device as /dev/null.
            var null = stat()
            guard stat("/dev/null", &null) == 0 else { throw TestFailure("stat /dev/null: errno \(errno)") }
            try replaceAtomically(path) { guard mknod($0, S_IFCHR | 0o600, null.st_rdev) == 0 else { throw TestFailure("mknod: errno \(errno)") } }
        case .stateOwnedByNobody, .lockOwnedByNobody:
            try replaceAtomically(path) { staging in
                try writeFile(staging, plant == .stateOwnedByNobody ? valid : [])
                guard chown(staging, 65534, 65534) == 0 else { throw TestFailure("chown: errno \(errno)") }
            }
        case .stateWritableByOthers, .lockWritableByOthers:
            try replaceAtomically(path) { try writeFile($0, plant == .stateWritableByOthers ? valid : [], mode: 0o666) }
        case .stateGarbage:
            try replaceAtomically(path) { try writeFile($0, Array("PK\u{3}\u{4} this is a zip file, not a state file\n".utf8) + [0, 0xFF, 0xFE]) }
        case .stateTruncated:
            try replaceAtomically(path) { try writeFile($0, Array(valid.prefix(valid.count / 2))) }
        case .stateWrongChecksum:
            var flipped = valid
            flipped[flipped.count - 3] ^= 0x20
            try replaceAtomically(path) { try writeFile($0, flipped) }
        case .stateFutureVersion:
            try replaceAtomically(path) { try writeFile($0, Array("tabsync-state 2 9 2 00000000\n{}".utf8)) }
        case .stateOversized:
            // 100 MiB, sparse: ftruncate, no data written.
            try replaceAtomically(path) { staging in
                try writeFile(staging, valid)
                guard truncate(staging, 100 << 20) == 0 else { throw TestFailure("truncate: errno \(errno)") }
            }
        }
    }
}
