import Foundation
import Synchronization
import Testing
@testable import TabSync

#if canImport(Glibc)
import Glibc
#endif

/// Issue 12, point 6: lock files that a file cleaner cannot break, and a session directory that
/// cannot move, vanish or open up unnoticed.
@Suite(.timeLimit(.minutes(2)))
struct DirectoryAndLockFileTests {
    /// What a writer was told: its value for a key, under which sequence number.
    struct Acknowledged: Sendable {
        var key: String
        var value: String
        var sequence: UInt64
    }

    /// Four writers of distinct keys while a loop unlinks and recreates every lock file, as an
    /// age-based temp cleaner does with empty files whose times never change. With `NAME.lock`
    /// as the only commit lock, 833 of 1,379 acknowledged sets were lost this way.
    @Test func replacedLockFilesLoseNoAcknowledgedChange() async throws {
        let directory = TemporaryDirectory()
        var options = SharedStorage.Options()
        options.durability = .none
        let writers = try (0..<4).map { index in
            try SharedStorage(directory: directory.path, origin: "w\(index)", options: options)
        }
        let stop = Atomic<Bool>(false)
        let replacer = Thread {
            while !stop.load(ordering: .relaxed) {
                for name in ["storage.lock", "storage.refresh.lock"] {
                    unlink(directory.file(name))
                    let fd = open(directory.file(name), O_RDWR | O_CREAT | O_EXCL, 0o600)
                    if fd >= 0 { close(fd) }
                }
            }
        }
        replacer.start()
        defer { stop.store(true, ordering: .relaxed) }
        let acknowledged = try await withThrowingTaskGroup(of: [Acknowledged].self) { group in
            for (index, writer) in writers.enumerated() {
                group.addTask {
                    try await offPool {
                        try (0..<300).map { round in
                            let key = "w\(index).k\(round % 5)", value = "\(round)"
                            return Acknowledged(key: key, value: value, sequence: try writer.set(key, value))
                        }
                    }
                }
            }
            return try await group.reduce(into: []) { $0 += $1 }
        }
        stop.store(true, ordering: .relaxed)

        let sequences = acknowledged.map(\.sequence)
        #expect(Set(sequences).count == sequences.count, "a sequence number was acknowledged to two sets")
        let final = try writers[0].snapshot()
        #expect(final.sequence == 1_200, "every set is one change")
        var latest: [String: Acknowledged] = [:]
        for change in acknowledged where change.sequence > latest[change.key]?.sequence ?? 0 { latest[change.key] = change }
        let lost = latest.values.filter { final.values[$0.key] != $0.value }
        #expect(lost.isEmpty, "acknowledged values lost: \(lost.map(\.key).sorted())")
    }

    @Test func aDirectoryMovedAndReplacedIsReportedAndNotWrittenTo() async throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        var notifications = storage.notifications().makeAsyncIterator()
        try await storage.set("k", "1")
        let moved = directory.path + ".moved"
        defer { try? FileManager.default.removeItem(atPath: moved) }
        #expect(rename(directory.path, moved) == 0)
        #expect(mkdir(directory.path, 0o700) == 0)

        let problem = await nextProblem(&notifications)
        #expect(problem?.code == .directoryChanged && problem?.path == directory.path, "\(String(describing: problem))")
        #expect {
            try storage.set("k", "2")
        } throws: { error in
            (error as? TabSyncError)?.code == .directoryChanged && (error as? TabSyncError)?.path == directory.path
        }
        // Nothing went to the moved directory, and a storage opened at the path now is a new one.
        #expect(try SharedStorage(directory: moved, origin: "b").get("k") == "1")
        #expect(try SharedStorage(directory: directory.path, origin: "c").get("k") == nil)
    }

    /// A storage that nobody observes watches nothing, so no signal tells it of the move: its
    /// reads check the directory themselves, and refuse the moved one as its commits do.
    @Test func aStorageNobodyObservesRefusesToReadADirectoryMovedAway() async throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        try await storage.set("k", "1")
        #expect(try storage.get("k") == "1")
        let moved = directory.path + ".moved"
        defer { try? FileManager.default.removeItem(atPath: moved) }
        #expect(rename(directory.path, moved) == 0)
        #expect(mkdir(directory.path, 0o700) == 0)
        #expect {
            try storage.get("k")
        } throws: { error in
            (error as? TabSyncError)?.code == .directoryChanged && (error as? TabSyncError)?.path == directory.path
        }
    }

    /// The kernel raises no event for the deletion of a directory that a process holds open
    /// (only once the last descriptor closes), so the reader learns of it from its log's
    /// deletion, and its next call names the directory.
    @Test func aDirectoryDeletedUnderAReaderIsReported() async throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        var notifications = storage.notifications().makeAsyncIterator()
        try await storage.set("k", "1")
        try FileManager.default.removeItem(atPath: directory.path)
        let problem = await nextProblem(&notifications)
        #expect(problem?.code == .storeVanished || problem?.code == .directoryChanged, "\(String(describing: problem))")
        #expect {
            try storage.get("k")
        } throws: { error in
            (error as? TabSyncError)?.code == .directoryChanged && (error as? TabSyncError)?.message.contains("deleted") == true
        }
    }

    @Test func aDirectoryOpenedUpToOthersIsReportedAndNotWrittenTo() async throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        var notifications = storage.notifications(includingOwnChanges: true).makeAsyncIterator()
        try await storage.set("k", "1")
        // Its own change has come back through the watcher, so no signal is pending to see the
        // chmod for it.
        guard case .change? = await next(&notifications) else {
            Issue.record("no own change")
            return
        }
        #expect(chmod(directory.path, 0o777) == 0)
        // A chmod raises no event: it is noticed at the next commit (or signal), which is
        // refused and reported on the streams as well.
        #expect {
            try storage.set("k", "2")
        } throws: { error in
            (error as? TabSyncError)?.code == .insecurePath
        }
        let problem = await nextProblem(&notifications)
        #expect(problem?.code == .insecurePath && problem?.message.contains("0777") == true, "\(String(describing: problem))")
        #expect(chmod(directory.path, 0o700) == 0)
        #expect(try await storage.set("k", "2") == 2, "writes go on once the directory is private again")
    }

    private func nextProblem(_ iterator: inout AsyncStream<StorageNotification>.Iterator) async -> TabSyncError? {
        while let notification = await next(&iterator) {
            if case let .problem(error) = notification { return error }
        }
        return nil
    }
}
