import Foundation
import Testing
@testable import TabSync

#if canImport(Glibc)
import Glibc
#endif

/// The log file on disk (format 2): refused when it is not ours to read, recovered when it is
/// damaged, and never the cause of a lost committed value.
@Suite(.timeLimit(.minutes(1)))
struct LogFileTests {
    @Test func crc32MatchesZlib() {
        #expect(CRC32.checksum(Array("123456789".utf8)) == 0xCBF4_3926)
        #expect(CRC32.checksum(Array("6789".utf8), continuing: CRC32.checksum(Array("12345".utf8))) == 0xCBF4_3926)
    }

    @Test func aFutureVersionIsRefusedNotRecovered() throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        try storage.set("k", "v")
        var future = try Data(contentsOf: URL(fileURLWithPath: directory.file("storage.log")))
        future[12] = 3
        try replace(directory.file("storage.log"), with: future)
        #expect { try storage.get("k") } throws: { ($0 as! TabSyncError).code == .unsupportedVersion }
        #expect { try storage.set("k", "w") } throws: { error in
            let error = error as! TabSyncError
            return error.code == .unsupportedVersion && error.path == directory.file("storage.log") && error.message.contains("version 3")
        }
        #expect(try Data(contentsOf: URL(fileURLWithPath: directory.file("storage.log"))) == future, "left as it was")
    }

    @Test func anOversizedFileIsRefusedWithoutReadingIt() throws {
        let directory = TemporaryDirectory()
        var options = SharedStorage.Options()
        options.maximumStateBytes = 1 << 20
        let storage = try SharedStorage(directory: directory.path, origin: "a", options: options)
        let fd = open(directory.file("storage.log"), O_WRONLY)
        #expect(ftruncate(fd, 100 << 20) == 0)
        close(fd)
        #expect { try storage.get("k") } throws: { error in
            let error = error as! TabSyncError
            return error.code == .stateTooLarge && error.path == directory.file("storage.log")
        }
    }

    /// A foreign program replaces the log with garbage: the next reader recovers, under the
    /// lock, the newest values it had read, moves the garbage aside and reports it.
    @Test func anUnreadableLogIsMovedAsideAndTheLastStateReadRecovered() async throws {
        let directory = TemporaryDirectory()
        let writer = try SharedStorage(directory: directory.path, origin: "writer")
        try await writer.set("a", "1")
        try await writer.set("b", "2")
        let observer = try SharedStorage(directory: directory.path, origin: "observer")
        var notifications = observer.notifications().makeAsyncIterator()
        try replace(directory.file("storage.log"), with: Data(String(repeating: "not a log, garbage; ", count: 4).utf8))

        let error = try #require(await firstProblem(&notifications))
        #expect(error.code == .corruptState)
        #expect(error.path == directory.file("storage.log"))
        #expect(error.message.contains("not a TabSync log") && error.message.contains("recovered from"), "\(error.message)")
        #expect(try writer.snapshot().values == ["a": "1", "b": "2"])
        let aside = try FileManager.default.contentsOfDirectory(atPath: directory.path).filter { $0.hasPrefix("storage.log.corrupt-") }
        #expect(aside.count == 1)
        try await writer.set("c", "3")
        #expect(try observer.get("c") == "3")
    }

    /// A bit flipped in the middle of the log (a later record still checks) is damage, not a
    /// torn tail: a process that opens it recovers every record that can still be read.
    @Test func aLogDamagedInTheMiddleKeepsEveryReadableRecord() async throws {
        let directory = TemporaryDirectory()
        let writer = try SharedStorage(directory: directory.path, origin: "writer")
        let before = try Data(contentsOf: URL(fileURLWithPath: directory.file("storage.log"))).count
        try await writer.set("a", "1")
        try await writer.set("b", "2")
        try await writer.set("c", "3")
        // Closed, so that it does not recover the damage itself from what it had read.
        writer.close()
        var damaged = try Data(contentsOf: URL(fileURLWithPath: directory.file("storage.log")))
        damaged[before + 20] ^= 0x01  // inside the first change record (a = 1)
        try replace(directory.file("storage.log"), with: damaged)

        let late = try SharedStorage(directory: directory.path, origin: "late")
        #expect(try late.snapshot().values == ["b": "2", "c": "3"], "every record after the damage")
        let recovery = try #require(try Self.recovery(of: late))
        #expect(recovery.contains("damaged") && recovery.contains("every record that could still be read"), "\(recovery)")
    }

    /// A writer killed in the middle of an append leaves a torn tail: readers ignore it, and the
    /// next commit cuts it before it appends. Nothing is reported: nothing was lost.
    @Test func aTornTailIsIgnoredByReadersAndCutByTheNextWriter() async throws {
        let directory = TemporaryDirectory()
        let writer = try SharedStorage(directory: directory.path, origin: "writer")
        try await writer.set("a", "1")
        let complete = try Data(contentsOf: URL(fileURLWithPath: directory.file("storage.log")))
        // Half of a commit's record, as a killed writer leaves it.
        var record: [UInt8] = []
        let change = LogFormat.Change(key: "torn", value: "x", origin: "o", instance: "i", time: 0)
        let salt = Array(complete[20..<36])
        LogFormat.append(LogFormat.Record(sequence: 2, flags: .commitEnd, body: .change(change)), salt: salt, to: &record)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: directory.file("storage.log")))
        try handle.seekToEnd()
        try handle.write(contentsOf: Data(record.prefix(record.count / 2)))
        try handle.close()

        let reader = try SharedStorage(directory: directory.path, origin: "reader")
        #expect(try reader.snapshot().values == ["a": "1"] && Self.recovery(of: reader) == nil)
        try await reader.set("b", "2")
        #expect(try writer.snapshot() == (["a": "1", "b": "2"], 2))
        let after = try Data(contentsOf: URL(fileURLWithPath: directory.file("storage.log")))
        #expect(after.prefix(complete.count) == complete && !after.contains(Data("torn".utf8)))
    }

    /// A commit that scrubs is a new generation, written whole or not at all: one that cannot be
    /// written (here: over the size limit) leaves the log, and this process's view of it, as
    /// they were. The view used to take the commit's records before the write, so the next read
    /// found the log shorter than the view and "recovered" it into a new store.
    @Test func aScrubbingCommitThatCannotBeWrittenLeavesTheLogAsItWas() throws {
        let directory = TemporaryDirectory()
        var options = SharedStorage.Options()
        options.maximumStateBytes = 4096
        let storage = try SharedStorage(directory: directory.path, origin: "a", options: options)
        try storage.set("token", "one")
        let before = try storage.backend.snapshot()
        var refused: TabSyncError?
        do {
            try storage.transaction { (transaction: inout SharedStorage.Transaction) throws(TabSyncError) in
                transaction.set("token", String(repeating: "x", count: 8192))
                transaction.scrubHistory(of: "token")
            }
        } catch {
            refused = error
        }
        #expect(refused?.code == .stateTooLarge, "\(String(describing: refused))")
        let after = try storage.backend.snapshot()
        #expect(after.values == ["token": "one"] && after.position == before.position && after.recovery == nil, "\(after)")
        #expect(!(try FileManager.default.contentsOfDirectory(atPath: directory.path)).contains { $0.contains("corrupt") })
        #expect(try storage.set("token", "two") == 2)
    }

    /// A planted log at the largest valid sequence number (2^53), or at the last number there is
    /// (2^64 - 1: its snapshot is read, though no change can follow it; the log fuzzer found that
    /// it was not), takes commits without a crash or a loss: the storage goes on in a new store.
    @Test(arguments: [StateDocument.maximumSequence, UInt64.max])
    func aSequenceNumberAtTheLimitNeitherCrashesNorLosesAValue(sequence: UInt64) throws {
        let directory = TemporaryDirectory()
        _ = try SharedStorage(directory: directory.path, origin: "setup")
        let planted = LogView.fresh(salt: FileBackend.salt(), flags: [], store: "planted", sequence: sequence, values: ["a": "1"])
        try replace(directory.file("storage.log"), with: Data(planted))
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        #expect(try storage.set("b", "2") == 1)
        #expect(try storage.set("c", "3") == 2)
        let other = try SharedStorage(directory: directory.path, origin: "b")
        #expect(try other.snapshot().values == ["a": "1", "b": "2", "c": "3"])
    }

    @Test func filesAreCreatedPrivate() throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        try storage.set("k", "v")
        #expect(mode(of: directory.path) == 0o700)
        for file in ["storage.log", "storage.lock", "storage.state"] { #expect(mode(of: directory.file(file)) == 0o600, "\(file)") }
    }

    @Test func aSymbolicLinkInPlaceOfTheLogIsRefused() throws {
        let directory = TemporaryDirectory()
        _ = try SessionDirectory(path: directory.path)
        let target = directory.path + "-target"
        defer { unlink(target) }
        try Data("secret".utf8).write(to: URL(fileURLWithPath: target))
        #expect(symlink(target, directory.file("storage.log")) == 0)
        #expect {
            try SharedStorage(directory: directory.path, origin: "a")
        } throws: { error in
            let error = error as! TabSyncError
            return error.code == .insecurePath && error.path == directory.file("storage.log")
        }
        #expect(try String(contentsOfFile: target, encoding: .utf8) == "secret")
    }

    @Test func aFIFOInPlaceOfTheLogIsRefusedWithoutHanging() throws {
        let directory = TemporaryDirectory()
        _ = try SessionDirectory(path: directory.path)
        #expect(mkfifo(directory.file("storage.log"), 0o600) == 0)
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
    func aLogOwnedByAnotherUserIsRefused() throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        try storage.set("k", "v")
        #expect(chown(directory.file("storage.log"), 65534, 65534) == 0)
        #expect { try storage.get("k") } throws: { error in
            let error = error as! TabSyncError
            return error.code == .insecurePath && error.message.contains("owned by uid 65534")
        }
    }

    @Test func aLogReadableByOthersIsRefused() throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        #expect(chmod(directory.file("storage.log"), 0o644) == 0)
        #expect { try storage.get("k") } throws: { error in
            let error = error as! TabSyncError
            return error.code == .insecurePath && error.path == directory.file("storage.log")
        }
    }

    /// The folder in which compactions write (`.compacting`) is checked as the files are: a
    /// symbolic link in its place, or a folder open to others, refuses the commit that needs it
    /// with an error naming it, nothing is written through it, and the log stays as it was.
    @Test(arguments: [true, false])
    func anInsecureCompactionFolderIsRefused(link: Bool) throws {
        let directory = TemporaryDirectory()
        let elsewhere = TemporaryDirectory()
        #expect(mkdir(elsewhere.path, 0o700) == 0)
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        try storage.set("token", "one")
        let folder = directory.file(".compacting")
        _ = rmdir(folder)
        if link {
            #expect(symlink(elsewhere.path, folder) == 0)
        } else {
            #expect(mkdir(folder, 0o700) == 0 && chmod(folder, 0o755) == 0)
        }
        var refused: TabSyncError?
        do {
            try storage.transaction { (transaction: inout SharedStorage.Transaction) throws(TabSyncError) in
                transaction.set("token", "two")
                transaction.scrubHistory(of: "token")
            }
        } catch {
            refused = error
        }
        #expect(refused?.code == .insecurePath && refused?.path == folder, "\(String(describing: refused))")
        #expect(try storage.get("token") == "one")
        #expect(try FileManager.default.contentsOfDirectory(atPath: elsewhere.path).isEmpty)
        // A process that opens the storage now is refused at once, not at its first compaction.
        #expect { try SharedStorage(directory: directory.path, origin: "b") } throws: { error in
            (error as? TabSyncError)?.code == .insecurePath && (error as? TabSyncError)?.path == folder
        }
    }

    /// What the storage's store says about its recovery (nil for none).
    private static func recovery(of storage: SharedStorage) throws -> String? {
        try storage.backend.snapshot().recovery
    }

    private func firstProblem(_ notifications: inout AsyncStream<StorageNotification>.Iterator) async -> TabSyncError? {
        while let notification = await next(&notifications) {
            if case let .problem(error) = notification { return error }
        }
        return nil
    }

    /// Replaces a file atomically, as another program following the lock protocol would.
    private func replace(_ path: String, with data: Data) throws {
        let fd = open(path + ".other", O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        #expect(fd >= 0)
        #expect(data.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, data.count) } == data.count)
        close(fd)
        #expect(rename(path + ".other", path) == 0)
    }

    private func mode(of path: String) -> mode_t {
        var info = stat()
        _ = stat(path, &info)
        return info.st_mode & 0o777
    }
}
