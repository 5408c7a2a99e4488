import Foundation
import Testing
@testable import TabSync

#if canImport(Glibc)
import Glibc
#endif

/// A directory of TabSync 1 (one state file per storage, format 1) is upgraded in place on first
/// open, and TabSync 1 then refuses the directory instead of misreading it.
@Suite(.timeLimit(.minutes(1)))
struct LegacyUpgradeTests {
    @Test func aFormat1StateFileIsUpgradedWithEveryValueAndTheOldVersionRefusesIt() throws {
        let directory = TemporaryDirectory()
        _ = try SessionDirectory(path: directory.path)
        let journal = [
            JournalEntry(sequence: 41, key: "theme", oldValue: nil, newValue: "light", origin: "old-tab", instance: "i", time: 1),
            JournalEntry(sequence: 42, key: "theme", oldValue: "light", newValue: "dark", origin: "old-tab", instance: "i", time: 2),
        ]
        let old = StateDocument(storeID: "0b5d2f8e", sequence: 42, values: ["theme": "dark", "draft": "x"], journal: journal)
        try plant(StateFileCodec.encode(old), at: directory.file("storage.state"))
        try plant(Array("a replaced token".utf8), at: directory.file("storage.state.prev"))

        let storage = try SharedStorage(directory: directory.path, origin: "new")
        #expect(try storage.snapshot() == (["theme": "dark", "draft": "x"], 42))
        #expect(try storage.backend.snapshot().position.store == "0b5d2f8e", "the same store: nothing to resynchronise")
        #expect(try storage.set("after", "1") == 43)

        // What a TabSync 1 process reads now: a version it does not know, refused.
        let marker = try [UInt8](Data(contentsOf: URL(fileURLWithPath: directory.file("storage.state"))))
        #expect(throws: TabSyncError.self) { try StateFileCodec.decode(marker, path: "p") }
        do {
            _ = try StateFileCodec.header(marker, path: directory.file("storage.state"))
            Issue.record("the marker reads as format 1")
        } catch {
            #expect(error.code == .unsupportedVersion)
        }
        // The old previous generation, which may hold replaced values, is gone.
        #expect(!FileManager.default.fileExists(atPath: directory.file("storage.state.prev")))
        // A second process opens the upgraded directory as it is.
        let other = try SharedStorage(directory: directory.path, origin: "other")
        #expect(try other.snapshot() == (["theme": "dark", "draft": "x", "after": "1"], 43))
    }

    /// A format 1 state file that cannot be read is kept aside, and its previous generation is
    /// upgraded instead, as format 1's own recovery would have used it.
    @Test func anUnreadableFormat1FileIsKeptAsideAndItsPreviousGenerationUpgraded() throws {
        let directory = TemporaryDirectory()
        _ = try SessionDirectory(path: directory.path)
        let previous = StateDocument(storeID: "older", sequence: 7, values: ["theme": "light"])
        try plant(Array("tabsync-state 1 9 40 0000".utf8), at: directory.file("storage.state"))
        try plant(StateFileCodec.encode(previous), at: directory.file("storage.state.prev"))

        let storage = try SharedStorage(directory: directory.path, origin: "new")
        #expect(try storage.snapshot() == (["theme": "light"], 7))
        let recovery = try #require(try storage.backend.snapshot().recovery)
        #expect(recovery.contains("could not be read") && recovery.contains("previous generation"), "\(recovery)")
        let files = try FileManager.default.contentsOfDirectory(atPath: directory.path)
        #expect(files.contains { $0.hasPrefix("storage.state.corrupt-") } && !files.contains("storage.state.prev"), "\(files)")
    }

    /// A format 1 state file over the size limit is refused and left alone, never replaced.
    @Test func anOversizedFormat1FileIsRefusedNotReplaced() throws {
        let directory = TemporaryDirectory()
        _ = try SessionDirectory(path: directory.path)
        try plant(StateFileCodec.encode(StateDocument(storeID: "big", sequence: 1, values: ["k": "v"])), at: directory.file("storage.state"))
        #expect(truncate(directory.file("storage.state"), 20 << 20) == 0)
        #expect { try SharedStorage(directory: directory.path, origin: "new") } throws: { error in
            let error = error as! TabSyncError
            return error.code == .stateTooLarge && error.path == directory.file("storage.state")
        }
        var info = stat()
        #expect(stat(directory.file("storage.state"), &info) == 0 && info.st_size == 20 << 20)
    }

    private func plant(_ bytes: [UInt8], at path: String) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0o600)
        try #require(fd >= 0)
        #expect(write(fd, bytes, bytes.count) == bytes.count)
        close(fd)
    }
}
