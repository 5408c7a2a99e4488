import Foundation
import Synchronization
import Testing
@testable import TabSync

/// Issue 12, point 3: async mutations that never block a Swift concurrency thread, with a fixed
/// number of threads however many wait, bounded by the lock timeout and ended by cancellation.
@Suite(.timeLimit(.minutes(1)))
struct AsyncCommitTests {
    /// The commit lock of `directory`'s storage, held by "another process" (a descriptor of its own).
    static func holdCommitLock(_ directory: borrowing TemporaryDirectory) throws -> any SessionLockHold {
        let lock = try FileLock(directory: SessionDirectory(path: directory.path), name: "storage")
        return try #require(try acquireSoon(lock))
    }

    /// On tmpfs the file work runs on the calling thread; everything above holds there as well.
    @Test(.enabled(if: TemporaryDirectory.fileSystems.count == 2, "this machine has no /dev/shm"))
    func theMemoryFileSystemIsRecognized() throws {
        let memory = TemporaryDirectory(under: TemporaryDirectory.fileSystems[1])
        #expect(try SessionDirectory(path: memory.path).isMemoryFileSystem)
    }

    @Test(arguments: TemporaryDirectory.fileSystems)
    func blockedCommitsLeaveTheCooperativePoolFreeAndUseAFixedNumberOfThreads(on fileSystem: String) async throws {
        let directory = TemporaryDirectory(under: fileSystem)
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        let hold = try Self.holdCommitLock(directory)
        // More waiting commits than the pool has threads (one per core): blocking ones would
        // leave none for anything else.
        let commits = (0..<64).map { index in Task { try await storage.set("k\(index)", "v") } }
        try await Task.sleep(for: .milliseconds(200))
        let asked = ContinuousClock.now
        let started = await Task.detached { ContinuousClock.now }.value
        // Well under the lock timeout (10 s), which is when blocked commits would free a thread.
        #expect(started - asked < .seconds(3), "an unrelated task waited \(started - asked) for a thread")
        let names = BoundedLockTests.threadNames()
        #expect(names.filter { $0.hasPrefix("TabSync.io") }.count <= BlockingPool.threadCount)
        // One blocked flock for the lock, however many commits wait (the kernel lists each
        // thread blocked in flock as a waiter; thread names cannot tell, other suites in this
        // process block flocks of their own).
        #expect(storage.queryLocks().first?.waiters.count ?? 0 <= 1, "one blocked flock per lock")
        hold.release()
        for commit in commits { _ = try await commit.value }
        #expect(try storage.snapshot().values.count == 64)
        #expect(try storage.snapshot().sequence == 64)
    }

    @Test(arguments: TemporaryDirectory.fileSystems)
    func aCancelledCommitReturnsAtOnceAndCommitsNothing(on fileSystem: String) async throws {
        let directory = TemporaryDirectory(under: fileSystem)
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        let hold = try Self.holdCommitLock(directory)
        let waiting = Task { try await storage.set("k", "v") }
        let queued = Task { try await storage.set("other", "v") }  // waits for its turn behind it
        try await Task.sleep(for: .milliseconds(100))
        let cancelledAt = ContinuousClock.now
        waiting.cancel()
        queued.cancel()
        await #expect(throws: CancellationError.self) { try await waiting.value }
        await #expect(throws: CancellationError.self) { try await queued.value }
        // Each returns within one wake-up; the bound allows for a loaded test run.
        #expect(ContinuousClock.now - cancelledAt < .seconds(5))
        hold.release()
        #expect(try storage.snapshot().sequence == 0, "nothing was committed")
        #expect(try await storage.set("k", "v2") == 1, "the storage works on")
    }

    @Test(arguments: TemporaryDirectory.fileSystems)
    func anAsyncCommitWaitsAtMostTheLockTimeoutAndNamesTheHolder(on fileSystem: String) async throws {
        let directory = TemporaryDirectory(under: fileSystem)
        var options = SharedStorage.Options()
        options.lockTimeout = .milliseconds(300)
        let storage = try SharedStorage(directory: directory.path, origin: "a", options: options)
        let hold = try Self.holdCommitLock(directory)
        let started = ContinuousClock.now
        await #expect {
            try await storage.set("k", "v")
        } throws: { error in
            let error = error as? TabSyncError
            return error?.code == .lockTimeout && error?.holders.map(\.pid) == [getpid()]
        }
        #expect(ContinuousClock.now - started < .seconds(5))
        hold.release()
        #expect(try await storage.set("k", "v") == 1)
    }

    @Test(arguments: TemporaryDirectory.fileSystems)
    func asyncAndSynchronousCommitsTakeTurnsAndLoseNothing(on fileSystem: String) async throws {
        let directory = TemporaryDirectory(under: fileSystem)
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        let other = try SharedStorage(directory: directory.path, origin: "b")
        try await withThrowingTaskGroup(of: Void.self) { group in
            for index in 0..<50 {
                group.addTask { try await storage.update { $0["async\(index)"] = "\(index)" } }
            }
            group.addTask {
                try await offPool { for index in 0..<50 { try other.set("sync\(index)", "\(index)") } }
            }
            try await group.waitForAll()
        }
        let snapshot = try storage.snapshot()
        #expect(snapshot.values.count == 100 && snapshot.sequence == 100)
        let result = try await storage.transaction { transaction throws(TabSyncError) in
            transaction.set("async0", nil)
            return transaction.values.count
        }
        #expect(result == 99)
    }
}
