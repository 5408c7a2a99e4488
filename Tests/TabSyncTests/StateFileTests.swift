import Foundation
import Testing
@testable import TabSync

#if canImport(Glibc)
import Glibc
#endif

@Suite(.timeLimit(.minutes(1)))
struct StateFileTests {
    @Test func crc32MatchesZlib() {
        #expect(CRC32.checksum(Array("123456789".utf8)) == 0xCBF4_3926)
    }

    @Test func encodingRoundTrips() throws {
        var document = StateDocument()
        document.record(key: "k", newValue: "v", origin: "o", instance: "i", limits: JournalLimits())
        document.record(key: nil, newValue: nil, origin: "o", instance: "i", limits: JournalLimits())
        let bytes = StateFileCodec.encode(document)
        #expect(try StateFileCodec.decode(bytes, path: "x") == document)
        let header = String(decoding: bytes.prefix { $0 != UInt8(ascii: "\n") }, as: UTF8.self)
        #expect(header.hasPrefix("tabsync-state 1 2 "))
    }

    @Test(arguments: [
        ("", "empty"),
        ("hello world\n{}", "not a TabSync state file"),
        ("tabsync-state 1 0 999 00000000\n{}", "truncated"),
        ("tabsync-state 1 0 2 00000000\n{}", "checksum"),
        ("tabsync-state 1 0 2\n{}", "malformed"),
        // Signs are not digits (Swift's integer parsing would take them).
        ("tabsync-state +1 0 2 00000000\n{}", "version is not a number"),
        ("tabsync-state -1 0 2 00000000\n{}", "version is not a number"),
        ("tabsync-state 1 +0 2 00000000\n{}", "malformed"),
        ("tabsync-state 1 0 +2 00000000\n{}", "malformed"),
        ("tabsync-state 1 0 2 +0000000\n{}", "malformed"),
    ])
    func corruptFilesAreNamedPrecisely(contents: String, problem: String) {
        #expect {
            try StateFileCodec.decode(Array(contents.utf8), path: "/s/app.state")
        } throws: { error in
            let error = error as! TabSyncError
            return error.code == .corruptState && error.path == "/s/app.state" && error.message.contains(problem)
        }
    }

    @Test func aFutureVersionIsRefusedNotRecovered() throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        try storage.set("k", "v")
        try write("tabsync-state 2 9 2 00000000\n{}", to: directory.file("storage.state"))
        #expect { try storage.get("k") } throws: { ($0 as! TabSyncError).code == .unsupportedVersion }
        #expect { try storage.set("k", "w") } throws: { ($0 as! TabSyncError).code == .unsupportedVersion }
        #expect(try String(contentsOfFile: directory.file("storage.state"), encoding: .utf8).hasPrefix("tabsync-state 2"))
    }

    @Test func anOversizedFileIsRefusedWithoutReadingIt() throws {
        let directory = TemporaryDirectory()
        var options = SharedStorage.Options()
        options.maximumStateBytes = 1 << 20
        let storage = try SharedStorage(directory: directory.path, origin: "a", options: options)
        let fd = open(directory.file("storage.state"), O_WRONLY)
        #expect(ftruncate(fd, 100 << 20) == 0)
        close(fd)
        #expect { try storage.get("k") } throws: { error in
            let error = error as! TabSyncError
            return error.code == .stateTooLarge && error.path == directory.file("storage.state")
        }
    }

    @Test func aCorruptFileIsMovedAsideAndTheLastProvableStateRecovered() async throws {
        let directory = TemporaryDirectory()
        let writer = try SharedStorage(directory: directory.path, origin: "writer")
        try await writer.set("a", "1")
        try await writer.set("b", "2")
        let observer = try SharedStorage(directory: directory.path, origin: "observer")
        var notifications = observer.notifications().makeAsyncIterator()
        // A foreign program truncates the file in place.
        try write("tabsync-state 1 2 40 0", to: directory.file("storage.state"))

        var problem: TabSyncError?
        while problem == nil, let notification = await next(&notifications) {
            if case let .problem(error) = notification { problem = error }
        }
        let error = try #require(problem)
        #expect(error.code == .corruptState)
        #expect(error.path == directory.file("storage.state"))
        #expect(error.message.contains("recovered from"))
        // Both committed changes survive: the observer had read them.
        #expect(try writer.snapshot().values == ["a": "1", "b": "2"])
        let aside = try FileManager.default.contentsOfDirectory(atPath: directory.path).filter { $0.hasPrefix("storage.state.corrupt-") }
        #expect(aside.count == 1)
        try await writer.set("c", "3")
        #expect(try observer.get("c") == "3")
    }

    /// A planted file at the largest valid sequence number (2^53) takes commits without a crash
    /// or a loss: the storage goes on in a new store, and a file beyond 2^53 is corrupt.
    @Test func aSequenceNumberAtTheLimitNeitherCrashesNorLosesAValue() throws {
        let directory = TemporaryDirectory()
        _ = try SharedStorage(directory: directory.path, origin: "setup")
        let top = StateDocument.maximumSequence
        let planted = StateDocument(storeID: "planted", sequence: top, values: ["a": "1"])
        try write(String(decoding: StateFileCodec.encode(planted), as: UTF8.self), to: directory.file("storage.state"))
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        #expect(try storage.set("b", "2") == 1)
        #expect(try storage.set("c", "3") == 2)
        let other = try SharedStorage(directory: directory.path, origin: "b")
        #expect(try other.snapshot().values == ["a": "1", "b": "2", "c": "3"])

        let beyond = StateDocument(storeID: "planted", sequence: top + 1)
        #expect(throws: TabSyncError.self) { try StateFileCodec.decode(StateFileCodec.encode(beyond), path: "p") }
    }

    @Test func filesAreCreatedPrivate() throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        try storage.set("k", "v")
        #expect(mode(of: directory.path) == 0o700)
        #expect(mode(of: directory.file("storage.state")) == 0o600)
        #expect(mode(of: directory.file("storage.lock")) == 0o600)
    }

    @Test func aSymbolicLinkInPlaceOfTheStateFileIsRefused() throws {
        let directory = TemporaryDirectory()
        _ = try SessionDirectory(path: directory.path)
        let target = directory.path + "-target"
        defer { unlink(target) }
        try write("secret", to: target)
        #expect(symlink(target, directory.file("storage.state")) == 0)
        #expect {
            try SharedStorage(directory: directory.path, origin: "a")
        } throws: { error in
            let error = error as! TabSyncError
            return error.code == .insecurePath && error.path == directory.file("storage.state")
        }
        #expect(try String(contentsOfFile: target, encoding: .utf8) == "secret")
    }

    @Test func aFIFOInPlaceOfTheStateFileIsRefusedWithoutHanging() throws {
        let directory = TemporaryDirectory()
        _ = try SessionDirectory(path: directory.path)
        #expect(mkfifo(directory.file("storage.state"), 0o600) == 0)
        #expect { try SharedStorage(directory: directory.path, origin: "a") } throws: { error in
            (error as! TabSyncError).code == .notRegularFile
        }
    }

    @Test func aDirectoryWritableByOthersIsRefused() throws {
        let directory = TemporaryDirectory()
        #expect(mkdir(directory.path, 0o700) == 0)
        #expect(chmod(directory.path, 0o777) == 0)
        #expect { try SharedStorage(directory: directory.path, origin: "a") } throws: { error in
            let error = error as! TabSyncError
            return error.code == .insecurePath && error.path == directory.path && error.message.contains("777")
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory.path).isEmpty)
    }

    @Test func aDirectoryThatIsASymbolicLinkIsRefused() throws {
        let directory = TemporaryDirectory()
        let real = directory.path + "-real"
        defer { rmdir(real) }
        #expect(mkdir(real, 0o700) == 0)
        #expect(symlink(real, directory.path) == 0)
        defer { unlink(directory.path) }
        #expect { try SharedStorage(directory: directory.path, origin: "a") } throws: { error in
            (error as! TabSyncError).code == .insecurePath
        }
    }

    @Test(.enabled(if: geteuid() == 0, "needs root to give a file to another user"))
    func aStateFileOwnedByAnotherUserIsRefused() throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        try storage.set("k", "v")
        #expect(chown(directory.file("storage.state"), 65534, 65534) == 0)
        #expect { try storage.get("k") } throws: { error in
            let error = error as! TabSyncError
            return error.code == .insecurePath && error.message.contains("owned by uid 65534")
        }
    }

    @Test func aStateFileReadableByOthersIsRefused() throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        #expect(chmod(directory.file("storage.state"), 0o644) == 0)
        #expect { try storage.get("k") } throws: { error in
            let error = error as! TabSyncError
            return error.code == .insecurePath && error.path == directory.file("storage.state")
        }
    }

    /// Replaces a file atomically, as another program following the lock protocol would.
    private func write(_ text: String, to path: String) throws {
        let fd = open(path + ".other", O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        #expect(fd >= 0)
        let bytes = Array(text.utf8)
        #expect(Glibc.write(fd, bytes, bytes.count) == bytes.count)
        close(fd)
        #expect(rename(path + ".other", path) == 0)
    }

    private func mode(of path: String) -> mode_t {
        var info = stat()
        _ = stat(path, &info)
        return info.st_mode & 0o777
    }
}
