import Foundation
import Synchronization
import Testing
@testable import TabSync

#if canImport(Glibc)
import Glibc
#endif

@Suite(.timeLimit(.minutes(1)))
struct SharedStorageTests {
    @Test func setGetRemoveAndClearRoundTrip() throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        #expect(try storage.get("theme") == nil)
        let first = try storage.set("theme", "dark")
        #expect(try storage.get("theme") == "dark")
        try storage.set("lang", "en")
        #expect(try storage.keys() == ["lang", "theme"])
        let removed = try storage.remove("theme")
        #expect(removed == first + 2)
        #expect(try storage.get("theme") == nil)
        try storage.clear()
        #expect(try storage.snapshot().values.isEmpty)
        #expect(try storage.snapshot().sequence == first + 3)
    }

    /// `onNotification` delivers every change of the others once, in order, on the delivering
    /// thread, and nothing after its subscription is cancelled.
    @Test func onNotificationDeliversEveryChangeInOrderUntilCancelled() async throws {
        let directory = TemporaryDirectory()
        let writer = try SharedStorage(directory: directory.path, origin: "writer")
        let reader = try SharedStorage(directory: directory.path, origin: "reader")
        let seen = Mutex<[UInt64]>([])
        let subscription = reader.onNotification { notification in
            if case let .change(event) = notification { seen.withLock { $0.append(event.sequence) } }
        }
        for index in 1...20 { try await writer.set("k", "\(index)") }
        let deadline = ContinuousClock.now + .seconds(20)
        while seen.withLock({ $0.count }) < 20, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        #expect(seen.withLock { $0 } == Array(1...20))
        subscription.cancel()
        // A fence: a stream subscribed now sees the next change; the cancelled handler does not.
        var fence = reader.events().makeAsyncIterator()
        try await writer.set("k", "after")
        #expect(await next(&fence)?.sequence == 21)
        #expect(seen.withLock { $0 } == Array(1...20), "nothing after cancel")
    }

    /// A storage's first subscription registers its watch with the watcher thread. Made from a
    /// handler, which runs on that thread, it must not wait for the thread itself (which froze
    /// every storage of the process): the handler's subscription follows its storage at once.
    @Test func aHandlerCanMakeAnotherStoragesFirstSubscription() async throws {
        let first = TemporaryDirectory(), second = TemporaryDirectory()
        let writer = try SharedStorage(directory: first.path, origin: "writer")
        let reader = try SharedStorage(directory: first.path, origin: "reader")
        let other = try SharedStorage(directory: second.path, origin: "other")
        let otherWriter = try SharedStorage(directory: second.path, origin: "other-writer")
        let (subscribed, subscribing) = AsyncStream.makeStream(of: AsyncStream<StorageEvent>.self)
        let subscription = reader.onNotification { notification in
            guard case .change = notification else { return }
            subscribing.yield(other.events())
            subscribing.finish()
        }
        defer { subscription.cancel() }
        try await writer.set("k", "1")
        var streams = subscribed.makeAsyncIterator()
        let stream = try #require(await next(&streams))
        try await otherWriter.set("o", "1")
        var events = stream.makeAsyncIterator()
        #expect(await next(&events)?.key == "o")
        withExtendedLifetime((writer, reader, other, otherWriter)) {}
    }

    @Test func aSetThatLeavesTheValueUnchangedCommitsNothing() throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        let sequence = try storage.set("k", "v")
        #expect(try storage.set("k", "v") == sequence)
        #expect(try storage.remove("missing") == sequence)
        #expect(try storage.snapshot().sequence == sequence)
    }

    @Test func anotherInstanceSeesEveryChangeInOrderButNotItsOwn() async throws {
        let directory = TemporaryDirectory()
        let writer = try SharedStorage(directory: directory.path, origin: "writer")
        let reader = try SharedStorage(directory: directory.path, origin: "reader")
        var writerEvents = writer.events().makeAsyncIterator()
        var readerEvents = reader.events().makeAsyncIterator()
        try await writer.set("a", "1")
        try await writer.set("a", "2")
        try await writer.remove("a")
        try await reader.set("mine", "x")

        let expected: [(String?, String?, String?)] = [("a", nil, "1"), ("a", "1", "2"), ("a", "2", nil)]
        var lastSequence: UInt64 = 0
        for (key, old, new) in expected {
            let event = try #require(await next(&readerEvents))
            #expect(event.key == key && event.oldValue == old && event.newValue == new)
            #expect(event.origin == "writer")
            #expect(event.sequence > lastSequence)
            lastSequence = event.sequence
        }
        // The writer sees the reader's change, not its own three.
        let seen = try #require(await next(&writerEvents))
        #expect(seen.key == "mine" && seen.origin == "reader" && seen.sequence == lastSequence + 1)
    }

    @Test func ownChangesAreDeliveredWhenAskedFor() async throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "self")
        var events = storage.events(includingOwnChanges: true).makeAsyncIterator()
        try await storage.set("k", "v")
        let event = try #require(await next(&events))
        #expect(event.isOwn && event.key == "k" && event.newValue == "v")
    }

    @Test func concurrentWritersOfDifferentKeysAllSurvive() async throws {
        let directory = TemporaryDirectory()
        let storages = try (0..<4).map { try SharedStorage(directory: directory.path, origin: "w\($0)") }
        await withTaskGroup(of: Void.self) { group in
            for (index, storage) in storages.enumerated() {
                group.addTask {
                    for change in 0..<50 { _ = try? storage.set("w\(index)-\(change)", "\(change)") }
                }
            }
        }
        let values = try storages[0].snapshot().values
        #expect(values.count == 200)
        #expect(try storages[0].snapshot().sequence == 200)
    }

    /// A reader that falls behind further than the log keeps (compaction keeps the last
    /// `maximumEntries` changes once `compactionEntries` have piled up) gets a resynchronisation, with
    /// the current values, never a silent loss; one within the retained records replays them.
    @Test func aReaderBeyondTheRetainedHistoryGetsAResyncNotSilentLoss() async throws {
        let directory = TemporaryDirectory()
        var options = SharedStorage.Options()
        options.journalLimits = JournalLimits(maximumEntries: 4)
        let writer = try SharedStorage(directory: directory.path, origin: "writer", options: options)
        try await writer.set("gone", "soon")
        // A reader that reads nothing meanwhile (as one stopped or busy).
        let backend = try FileBackend(directory: SessionDirectory(path: directory.path), name: "storage", journalLimits: JournalLimits(maximumEntries: 4))
        let position = try await backend.snapshot().position
        try await writer.remove("gone")
        for index in 0..<60 { try await writer.set("k\(index)", "\(index)") }
        guard case let .resync(snapshot, origins)? = try backend.changes(after: position, waiting: true) else {
            Issue.record("no resync for a reader 61 changes behind a history of 4 (compacted every 32)")
            return
        }
        #expect(snapshot.values == Dictionary(uniqueKeysWithValues: (0..<60).map { ("k\($0)", "\($0)") }))
        #expect(snapshot.position.sequence == 62 && origins["k59"] == "writer")
        guard case let .records(records, _)? = try backend.changes(after: StorePosition(store: position.store, sequence: 60), waiting: true) else {
            Issue.record("no records for a reader within the history")
            return
        }
        #expect(records.map(\.key) == ["k58", "k59"])
    }

    @Test func transactionsRecordOnlyRealChanges() throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        let sequence = try storage.transaction { transaction in
            transaction.set("x", "1")
            transaction.set("x", "1")
            transaction.set("y", nil)
            return transaction.sequence
        }
        #expect(sequence == 1)
    }

    @Test func closingEndsTheEventStreams() async throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        var events = storage.events().makeAsyncIterator()
        storage.close()
        #expect(await events.next() == nil)
        #expect(throws: TabSyncError.self) { try storage.set("k", "v") }
    }

    @Test func locksExcludeEachOtherInOneProcess() async throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        let lock = try storage.lock(named: "refresh")
        let hold = try #require(try lock.tryAcquire())
        #expect(try lock.tryAcquire() == nil)
        let waiter = Task { try await lock.acquire() }
        hold.release()
        let second = try await waiter.value
        #expect(try lock.tryAcquire() == nil)
        second.release()
        #expect(try lock.tryAcquire() != nil)
    }

    @Test func waitingForALockCanBeCancelled() async throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        let lock = try storage.lock(named: "job")
        let hold = try #require(try lock.tryAcquire())
        let waiter = Task { try await lock.acquire() }
        waiter.cancel()
        await #expect(throws: CancellationError.self) { try await waiter.value }
        hold.release()
    }

    /// Storages opened and closed one after another reuse descriptor numbers, and two storages on
    /// one directory share its watch: neither may leave a later storage deaf to changes.
    @Test func storagesOpenedAndClosedInTurnKeepHearingChanges() async throws {
        for round in 0..<12 {
            let directory = TemporaryDirectory()
            let writer = try SharedStorage(directory: directory.path, origin: "writer")
            let app = try SharedStorage(directory: directory.path, name: "app", origin: "reader")
            let reader = try SharedStorage(directory: directory.path, origin: "reader")
            var events = reader.events().makeAsyncIterator()
            try await writer.set("round", "\(round)")
            let event = await next(&events)
            #expect(event?.newValue == "\(round)", "round \(round)")
            if round.isMultiple(of: 2) { app.close() }
            writer.close()
            reader.close()
        }
    }

    @Test func watchingUsesInotify() throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        #expect(storage.changeDetection == .inotify)
    }
}
