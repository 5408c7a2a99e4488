import Foundation
import Synchronization
import Testing
@testable import TabSync

/// Issue 12, in part: lock waits with a bound, waiters that hold no thread, a holder you can
/// see, re-entrant commits refused, and observation without a gap.
@Suite(.timeLimit(.minutes(1)))
struct BoundedLockTests {
    /// The names of this process's threads (`/proc/self/task/*/comm`).
    static func threadNames() -> [String] {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
        return tasks.compactMap { try? String(contentsOfFile: "/proc/self/task/\($0)/comm", encoding: .utf8) }
    }

    @Test func aNamedLockWaitEndsAtItsTimeoutNamingTheHolder() async throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        let lock = try storage.lock(named: "job")
        let hold = try #require(try lock.tryAcquire())
        defer { hold.release() }
        let started = ContinuousClock.now
        await #expect {
            _ = try await lock.acquire(timeout: .milliseconds(300))
        } throws: { error in
            let error = error as? TabSyncError
            return error?.code == .lockTimeout && error?.holders.map(\.pid) == [getpid()]
                && error?.message.contains("job") == true && error?.path?.hasSuffix("storage.job.lock") == true
        }
        // The timeout is 0.3 s; the bound allows for a test run that loads both cores.
        #expect(ContinuousClock.now - started < .seconds(10))
        let report = try #require(storage.queryLocks().first { $0.name == "job" })
        #expect(report.holders.map(\.pid) == [getpid()])
        #expect(report.holders.first?.state == .running || report.holders.first?.state == .sleeping)
    }

    @Test func sixtyFourWaitersUseNoThreadsAndCancelledWaitersReturnAtOnceHoldingNothing() async throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        let lock = try storage.lock(named: "job")
        let hold = try #require(try lock.tryAcquire())
        let before = Self.threadNames().count
        let waiters = (0..<64).map { _ in Task { try await lock.acquire() } }
        try await Task.sleep(for: .milliseconds(200))
        let during = Self.threadNames()
        // A thread per waiter (as a blocking flock needs) would add 64, and each would show in
        // /proc/locks as a waiter on the lock file. (A count of this process's threads cannot
        // tell: the integration suites in the same process start threads of their own, dozens
        // at a time.)
        #expect(during.filter { $0.hasPrefix("TabSync.FileLoc") }.isEmpty, "\(before) → \(during.count) threads")
        #expect(lock.query().waiters.isEmpty, "threads blocked in flock: \(lock.query().waiters)")
        let cancelledAt = ContinuousClock.now
        for waiter in waiters { waiter.cancel() }
        for waiter in waiters {
            await #expect(throws: CancellationError.self) { _ = try await waiter.value }
        }
        // They return while the lock is still held, so it is the cancellation that ends each wait.
        // Each returns within one poll (at most 20 ms); the bound allows for a test run whose
        // other suites keep both cooperative threads busy (seen: 3 s under full load).
        #expect(ContinuousClock.now - cancelledAt < .seconds(5))
        hold.release()
        // Nobody took it meanwhile. (A child that another test forks at that moment shares the
        // descriptor until it execs, which can keep the lock for a few milliseconds: hence a
        // short wait rather than one try.)
        var again = try lock.tryAcquire()
        let deadline = ContinuousClock.now + .seconds(2)
        while again == nil, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(10))
            again = try lock.tryAcquire()
        }
        #expect(again != nil, "a cancelled waiter holds the lock")
        again?.release()
    }

    @Test func aCommitWaitsForTheCommitLockAtMostTheLockTimeout() throws {
        let directory = TemporaryDirectory()
        var options = SharedStorage.Options()
        options.lockTimeout = .milliseconds(300)
        let storage = try SharedStorage(directory: directory.path, origin: "a", options: options)
        let commitLock = try FileLock(directory: SessionDirectory(path: directory.path), name: "storage")
        let hold = try #require(try acquireSoon(commitLock))
        defer { hold.release() }
        let started = ContinuousClock.now
        #expect {
            try storage.set("k", "v")
        } throws: { error in
            let error = error as? TabSyncError
            return error?.code == .lockTimeout && error?.holders.map(\.pid) == [getpid()]
        }
        // The lock timeout (0.3 s), with room for a loaded machine; without one it would never
        // return (the hold is released only after this check).
        #expect(ContinuousClock.now - started < .seconds(3))
        hold.release()
        #expect(try storage.set("k", "v") > 0)
    }

    @Test func aCommitFromInsideUpdateIsAnErrorNotACrash() throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        let inner = Mutex<TabSyncError?>(nil)
        try storage.update { values in
            values["outer"] = "1"
            do throws(TabSyncError) {
                _ = try storage.set("inner", "2")
            } catch {
                inner.withLock { $0 = error }
            }
        }
        #expect(inner.withLock { $0?.code } == .invalidArgument)
        #expect(try storage.get("outer") == "1")
        #expect(try storage.get("inner") == nil)
    }

    /// Both storages lock the same directory: the inner commit would wait for the lock that its
    /// own thread holds, until the lock timeout. It is refused at once instead.
    @Test func aCommitToAnotherStorageOfTheDirectoryFromInsideUpdateIsRefusedAtOnce() throws {
        let directory = TemporaryDirectory()
        let outer = try SharedStorage(directory: directory.path, name: "outer", origin: "a")
        let other = try SharedStorage(directory: directory.path, name: "other", origin: "a")
        let inner = Mutex<TabSyncError?>(nil)
        let started = ContinuousClock.now
        try outer.update { values in
            values["k"] = "1"
            do throws(TabSyncError) {
                _ = try other.set("k", "2")
            } catch {
                inner.withLock { $0 = error }
            }
        }
        #expect(inner.withLock { $0?.code } == .invalidArgument)
        #expect(ContinuousClock.now - started < .seconds(5), "not at the lock timeout (10 s)")
        #expect(try other.set("k", "2") == 1, "and one after the other works")
    }

    @Test func observationStartsWithTheValuesAndMissesNoChangeAfterThem() async throws {
        let directory = TemporaryDirectory()
        let writer = try SharedStorage(directory: directory.path, origin: "writer")
        let reader = try SharedStorage(directory: directory.path, origin: "reader")
        for index in 0..<50 { try await writer.set("k\(index % 7)", "\(index)") }
        let writing = Task.detached {
            for index in 50..<250 { _ = try writer.set("k\(index % 7)", "\(index)") }
        }
        try await Task.sleep(for: .milliseconds(5))
        var iterator = reader.observe().makeAsyncIterator()
        guard case let .snapshot(values, start)? = await iterator.next() else {
            Issue.record("the first element is not a snapshot")
            return
        }
        try await writing.value
        var expected = start + 1
        var state = values
        let deadline = ContinuousClock.now + .seconds(20)
        while expected <= 250, ContinuousClock.now < deadline {
            guard case let .change(event)? = await iterator.next() else { continue }
            #expect(event.sequence == expected, "a gap or a duplicate after \(expected - 1)")
            expected = event.sequence + 1
            if let key = event.key { state[key] = event.newValue }
        }
        #expect(expected == 251)
        #expect(state == (try writer.snapshot().values))
    }
}

/// Issue 12, in part: the process-wide watcher thread waits for no lock and recovers no file.
extension WatcherThreadTests {
@Suite(.timeLimit(.minutes(1)))
struct WatcherNeverStallsTests {
    @Test func aCorruptStorageWhoseLockIsHeldDelaysNoOtherStorage() async throws {
        let directory = TemporaryDirectory()
        let stuckReader = try SharedStorage(directory: directory.path, name: "stuck", origin: "reader")
        let otherReader = try SharedStorage(directory: directory.path, name: "other", origin: "reader")
        let otherWriter = try SharedStorage(directory: directory.path, name: "other", origin: "writer")
        let stuckEvents = stuckReader.notifications()
        var otherEvents = otherReader.events().makeAsyncIterator()
        // The stuck storage's commit lock is held, and its file turns corrupt: recovering it
        // would wait for the lock (10 s by default).
        let commitLock = try FileLock(directory: SessionDirectory(path: directory.path), name: "stuck")
        let hold = try #require(try acquireSoon(commitLock))
        defer { hold.release() }
        try Data("TABSYNC garbage\n{".utf8).write(to: URL(fileURLWithPath: directory.file("stuck.log")))
        try await Task.sleep(for: .milliseconds(50))  // the watcher has seen the corrupt file
        let started = ContinuousClock.now
        try await otherWriter.set("k", "v")
        let event = await otherEvents.next()
        #expect(event?.key == "k")
        // Well under the 10 s that the stuck storage's recovery waits for the lock: a bound, not a
        // timing (the machine may be busy with other suites).
        #expect(ContinuousClock.now - started < .seconds(5), "another storage's event waited for the stuck one")
        // Opening a storage in an unrelated directory and subscribing to it (which registers its
        // watch with the watcher thread) does not wait either.
        let unrelated = TemporaryDirectory()
        let opened = ContinuousClock.now
        _ = try SharedStorage(directory: unrelated.path, origin: "x").notifications()
        #expect(ContinuousClock.now - opened < .seconds(5))
        hold.release()
        // Once the lock is free the stuck storage recovers and reports it.
        var iterator = stuckEvents.makeAsyncIterator()
        let deadline = ContinuousClock.now + .seconds(20)
        var reported = false
        while !reported, ContinuousClock.now < deadline {
            stuckReader.catchUp()
            if case .problem(let error)? = await iterator.next() { reported = error.code == .corruptState }
        }
        #expect(reported)
        withExtendedLifetime(stuckReader) {}
    }
}
}
