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
        for (name, bytes) in [("storage.state", StateFileCodec.encode(old)), ("storage.state.prev", Array("a replaced token".utf8))] {
            let fd = open(directory.file(name), O_WRONLY | O_CREAT | O_EXCL, 0o600)
            #expect(write(fd, bytes, bytes.count) == bytes.count)
            close(fd)
        }

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
}
