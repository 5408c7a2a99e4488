import Foundation
import Synchronization
import TabSync
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A backend under test: it makes stores on which ``BackendConformance`` opens storages, as
/// processes open one store.
public protocol BackendUnderTest: Sendable {
    /// A new, empty store. `lockTimeout` bounds its commit-lock waits; `history` is how many
    /// change records it keeps for readers that fall behind.
    func makeStore(lockTimeout: Duration, history: Int) throws -> any ConformanceStore
}

/// One store of a backend under test.
public protocol ConformanceStore: Sendable {
    /// A storage on the store with its own backend instance (connections, descriptors, locks),
    /// exactly as a separate process would have.
    func open(_ origin: String) throws -> SharedStorage
}

/// What every ``StorageBackend`` must do, checked the same way against each: run every case
/// against a backend from a parameterised test.
///
/// ```swift
/// @Test(arguments: BackendConformance.allCases)
/// func conformance(_ check: BackendConformance) async throws {
///     try await check.run(on: MyBackendUnderTest())
/// }
/// ```
public enum BackendConformance: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case everyChangeReachesTheOthersOnceInOrderAndNeverItsAuthor
    case aSetThatChangesNothingCommitsNothingAndRaisesNoEvent
    case aReaderBeyondTheHistoryGetsAResyncAndOneWithinItTheRecords
    case namedLocksExcludeTimeOutNamingTheHolderAndCancel
    case aHeldCommitLockBoundsAndCancelsOtherCommitsAndNothingIsLost
    case observationStartsWithTheValuesAndGoesOnWithoutAGap
    case readModifyWriteTransactionsOfTwoInstancesLoseNoUpdate
    case ownChangesReachTheirOwnSubscribersOnceInOrderWithTheirValues
    case aWriteRecordsTheValueItReplacedHoweverFarBehindItsWriterIs
    case aHandlerNeverRunsInsideTheCallThatMadeTheChange
    case aStorageFollowsTheOthersFromItsFirstSubscriptionOn

    public var testDescription: String { rawValue }

    public func run(on backend: some BackendUnderTest) async throws {
        switch self {
        case .everyChangeReachesTheOthersOnceInOrderAndNeverItsAuthor:
            try await everyChangeReachesTheOthersOnceInOrderAndNeverItsAuthor(backend)
        case .aSetThatChangesNothingCommitsNothingAndRaisesNoEvent:
            try await aSetThatChangesNothingCommitsNothingAndRaisesNoEvent(backend)
        case .aReaderBeyondTheHistoryGetsAResyncAndOneWithinItTheRecords:
            try await aReaderBeyondTheHistoryGetsAResyncAndOneWithinItTheRecords(backend)
        case .namedLocksExcludeTimeOutNamingTheHolderAndCancel:
            try await namedLocksExcludeTimeOutNamingTheHolderAndCancel(backend)
        case .aHeldCommitLockBoundsAndCancelsOtherCommitsAndNothingIsLost:
            try await aHeldCommitLockBoundsAndCancelsOtherCommitsAndNothingIsLost(backend)
        case .observationStartsWithTheValuesAndGoesOnWithoutAGap:
            try await observationStartsWithTheValuesAndGoesOnWithoutAGap(backend)
        case .readModifyWriteTransactionsOfTwoInstancesLoseNoUpdate:
            try await readModifyWriteTransactionsOfTwoInstancesLoseNoUpdate(backend)
        case .ownChangesReachTheirOwnSubscribersOnceInOrderWithTheirValues:
            try await ownChangesReachTheirOwnSubscribersOnceInOrderWithTheirValues(backend)
        case .aWriteRecordsTheValueItReplacedHoweverFarBehindItsWriterIs:
            try await aWriteRecordsTheValueItReplacedHoweverFarBehindItsWriterIs(backend)
        case .aHandlerNeverRunsInsideTheCallThatMadeTheChange:
            try await aHandlerNeverRunsInsideTheCallThatMadeTheChange(backend)
        case .aStorageFollowsTheOthersFromItsFirstSubscriptionOn:
            try await aStorageFollowsTheOthersFromItsFirstSubscriptionOn(backend)
        }
    }

    /// A subscriber that includes its instance's own changes gets each of them once, in order,
    /// with its values, mixed with another instance's in the store's order. (A backend may hand
    /// an instance its own records without reading them back.)
    private func ownChangesReachTheirOwnSubscribersOnceInOrderWithTheirValues(_ backend: some BackendUnderTest) async throws {
        let store = try backend.makeStore(lockTimeout: .seconds(10), history: 512)
        let a = try store.open("a"), b = try store.open("b")
        var seen = a.events(includingOwnChanges: true).makeAsyncIterator()
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { for index in 1...30 { try await a.set("a\(index % 3)", "a\(index)") } }
            group.addTask { for index in 1...30 { try await b.set("b\(index % 3)", "b\(index)") } }
            try await group.waitForAll()
        }
        var view: [String: String] = [:], next: [String: Int] = ["a": 1, "b": 1]
        for expected in 1...UInt64(60) {
            let event = try #require(await StreamWait.next(&seen))
            #expect(event.sequence == expected, "a gap or a duplicate after \(expected - 1)")
            #expect(event.isOwn == (event.origin == "a"))
            // Each writer's values come in the order it wrote them: a1, a2, … and b1, b2, …
            let index = next[event.origin, default: 1]
            #expect(event.newValue == "\(event.origin)\(index)" && event.key == "\(event.origin)\(index % 3)", "\(event)")
            next[event.origin] = index + 1
            view[event.key!] = event.newValue
        }
        #expect(view == (try a.snapshot().values))
        withExtendedLifetime((a, b)) {}
    }

    /// A set or remove records the value it replaced as the store held it, not as its writer last
    /// saw it: two instances write one key in turn, each at once after the other (its view may
    /// not have caught up yet, and a backend may apply a write where the values are), and every
    /// event's old value is the previous write's value; a write of the value already there
    /// raises none. The same for the synchronous forms.
    private func aWriteRecordsTheValueItReplacedHoweverFarBehindItsWriterIs(_ backend: some BackendUnderTest) async throws {
        let store = try backend.makeStore(lockTimeout: .seconds(10), history: 512)
        let a = try store.open("a"), b = try store.open("b"), c = try store.open("c")
        var seen = c.events().makeAsyncIterator()
        for index in 1...20 { try await (index.isMultiple(of: 2) ? a : b).set("k", "\(index)") }
        try await a.set("k", "20")
        let synchronous = { () throws(TabSyncError) in
            for index in 21...40 { try (index.isMultiple(of: 2) ? a : b).set("k", "\(index)") }
            try b.set("k", "40")
            try a.remove("k")
        }
        try synchronous()
        try await b.set("k", "41")
        for expected in 1...UInt64(42) {
            let event = try #require(await StreamWait.next(&seen))
            let value: (UInt64) -> String? = { $0 == 0 || $0 == 41 ? nil : $0 == 42 ? "41" : "\($0)" }
            #expect(event.sequence == expected && event.key == "k", "a gap, a duplicate or an event for an unchanged value: \(event)")
            #expect(event.oldValue == value(expected - 1) && event.newValue == value(expected), "\(event)")
        }
        #expect(try c.get("k") == "41")
        withExtendedLifetime((a, b, c)) {}
    }

    /// An `onNotification` handler runs on the thread that watches for changes, never inside the
    /// `set` that made the change: an application may hold a lock of its own around `set` that
    /// its handler takes. Forty sets from one thread, with own changes delivered: none is handled
    /// on that thread. (A backend may learn of its own commit before the commit returns, and
    /// must not hand it on from the committing thread.)
    private func aHandlerNeverRunsInsideTheCallThatMadeTheChange(_ backend: some BackendUnderTest) async throws {
        let store = try backend.makeStore(lockTimeout: .seconds(10), history: 512)
        let a = try store.open("a")
        let writer = Mutex<pthread_t?>(nil)
        let inside = Atomic<Int>(0)
        let (seen, delivered) = AsyncStream.makeStream(of: UInt64.self)
        let subscription = a.onNotification(includingOwnChanges: true) { notification in
            guard case let .change(event) = notification else { return }
            if let thread = writer.withLock({ $0 }), pthread_equal(thread, pthread_self()) != 0 { inside.add(1, ordering: .relaxed) }
            delivered.yield(event.sequence)
        }
        try await StreamWait.offPool {
            writer.withLock { $0 = pthread_self() }
            for index in 1...40 { try a.set("k", "\(index)") }
        }
        var iterator = seen.makeAsyncIterator()
        for expected in 1...UInt64(40) {
            let sequence = try #require(await StreamWait.next(&iterator))
            #expect(sequence == expected, "a gap or a duplicate after \(expected - 1)")
        }
        #expect(inside.load(ordering: .relaxed) == 0, "handled inside the writer's own set")
        subscription.cancel()
        delivered.finish()
    }

    /// A storage that nobody observes does not watch its backend (a process that only reads and
    /// writes must not wake for every commit of the others), and still reads and writes the
    /// latest values. Its first subscription starts the watch before it reads what it missed (a
    /// read first would miss what came in between), and gets the changes after it, once, not
    /// those committed while nobody watched; so does a second one. The same with `onNotification`
    /// and `observe()` as the first subscription.
    private func aStorageFollowsTheOthersFromItsFirstSubscriptionOn(_ backend: some BackendUnderTest) async throws {
        let store = try backend.makeStore(lockTimeout: .seconds(10), history: 512)
        let b = try store.open("b")
        let watched = try (0..<3).map { _ in WatchCountingBackend(try store.open("a").backend) }
        let storages = try watched.map { try SharedStorage(backend: $0, origin: "a") }
        for index in 1...3 { try await b.set("k", "\(index)") }
        try await storages[0].set("own", "4")
        #expect(try storages[0].get("k") == "3" && storages[1].get("own") == "4")
        #expect(watched.allSatisfy { $0.calls.isEmpty }, "a storage that nobody observes watched or read its backend's changes")

        var first = storages[0].events().makeAsyncIterator()
        var second = storages[0].events(includingOwnChanges: true).makeAsyncIterator()
        let (handled, handler) = AsyncStream.makeStream(of: StorageEvent.self)
        let subscription = storages[1].onNotification { if case let .change(event) = $0 { handler.yield(event) } }
        var observed = storages[2].observe().makeAsyncIterator()
        for counted in watched {
            #expect(counted.calls.first == "watch" && counted.calls.filter { $0 == "watch" }.count == 1, "\(counted.calls)")
        }
        guard case let .snapshot(values, sequence)? = await StreamWait.next(&observed) else {
            Issue.record("the observation did not start with the values")
            return
        }
        #expect(values == ["k": "3", "own": "4"] && sequence == 4)
        var handledEvents = handled.makeAsyncIterator()
        for index in 5...6 {
            try await b.set("k", "\(index)")
            var events = [try #require(await StreamWait.next(&first)), try #require(await StreamWait.next(&second)),
                          try #require(await StreamWait.next(&handledEvents))]
            if case let .change(event)? = await StreamWait.next(&observed) { events.append(event) }
            #expect(events.count == 4)
            for event in events {
                #expect(event.sequence == UInt64(index) && event.newValue == "\(index)", "a change from before the subscription, or twice: \(event)")
            }
        }
        subscription.cancel()
        handler.finish()
        withExtendedLifetime((storages, b)) {}
    }

    /// A transaction computes from the latest values, whichever instance committed last: two
    /// instances that each add one to a counter 60 times at once end at 120. (A backend that
    /// runs the body on values it cached must commit only if they are still the latest.)
    private func readModifyWriteTransactionsOfTwoInstancesLoseNoUpdate(_ backend: some BackendUnderTest) async throws {
        let store = try backend.makeStore(lockTimeout: .seconds(10), history: 512)
        let a = try store.open("a"), b = try store.open("b")
        try await a.set("n", "0")
        try await withThrowingTaskGroup(of: Void.self) { group in
            for storage in [a, b] {
                group.addTask {
                    for _ in 1...60 {
                        try await storage.transaction { transaction throws(TabSyncError) in
                            transaction.set("n", String((transaction.values["n"].flatMap { Int($0) } ?? 0) + 1))
                        }
                    }
                }
            }
            try await group.waitForAll()
        }
        #expect(try a.get("n") == "120")
        #expect(try b.get("n") == "120")
    }

    private func everyChangeReachesTheOthersOnceInOrderAndNeverItsAuthor(_ backend: some BackendUnderTest) async throws {
        let store = try backend.makeStore(lockTimeout: .seconds(10), history: 512)
        let a = try store.open("a"), b = try store.open("b"), c = try store.open("c")
        var seenByA = a.events().makeAsyncIterator()
        var seenByC = c.events().makeAsyncIterator()
        // Two writers at once: one sequence, no gap, no duplicate.
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { for index in 1...40 { try await a.set("a\(index % 5)", "\(index)") } }
            group.addTask { for index in 1...40 { try await b.set("b\(index % 5)", "\(index)") } }
            try await group.waitForAll()
        }
        var view: [String: String] = [:]
        for expected in 1...UInt64(80) {
            let event = try #require(await StreamWait.next(&seenByC))
            #expect(event.sequence == expected, "a gap or a duplicate after \(expected - 1)")
            #expect(event.origin == (event.key?.hasPrefix("a") == true ? "a" : "b"))
            #expect(!event.isResync && !event.isOwn)
            view[event.key!] = event.newValue
        }
        #expect(view == (try c.snapshot().values))
        // A's own 40 changes never came back to it: its first event is B's first.
        let first = try #require(await StreamWait.next(&seenByA))
        #expect(first.origin == "b")
        withExtendedLifetime((a, b, c)) {}
    }

    private func aSetThatChangesNothingCommitsNothingAndRaisesNoEvent(_ backend: some BackendUnderTest) async throws {
        let store = try backend.makeStore(lockTimeout: .seconds(10), history: 512)
        let a = try store.open("a"), b = try store.open("b")
        var events = b.events().makeAsyncIterator()
        #expect(try await a.set("k", "v") == 1)
        #expect(try await a.set("k", "v") == 1, "the current number, nothing committed")
        let synchronous = { () throws(TabSyncError) in try a.set("k", "v") }
        #expect(try synchronous() == 1, "the same for the synchronous set")
        #expect(try await a.remove("absent") == 1)
        #expect(try await a.set("k", "w") == 2)
        #expect(await StreamWait.next(&events)?.sequence == 1)
        let second = await StreamWait.next(&events)
        #expect(second?.sequence == 2 && second?.oldValue == "v" && second?.newValue == "w")
    }

    private func aReaderBeyondTheHistoryGetsAResyncAndOneWithinItTheRecords(_ backend: some BackendUnderTest) async throws {
        // A history of 4 is kept at least; a backend may keep more (the file backend compacts
        // a small history only every 32 changes or so), but not 100.
        let store = try backend.makeStore(lockTimeout: .seconds(10), history: 4)
        let a = try store.open("a")
        for index in 1...100 { try await a.set("k\(index)", "\(index)") }
        let now = try await a.backend.snapshot()
        #expect(now.position.sequence == 100)
        guard case let .records(records, store: recordStore)? = try a.backend.changes(after: StorePosition(store: now.position.store, sequence: 98), waiting: true) else {
            Issue.record("no records after 98")
            return
        }
        #expect(records.map(\.sequence) == [99, 100] && records.map(\.key) == ["k99", "k100"] && recordStore == now.position.store)
        guard case let .resync(snapshot, origins)? = try a.backend.changes(after: StorePosition(store: now.position.store, sequence: 2), waiting: true) else {
            Issue.record("no resync for a reader beyond the history")
            return
        }
        #expect(snapshot.values.count == 100 && snapshot.position == now.position)
        #expect(origins["k100"] == "a")
        guard case .resync? = try a.backend.changes(after: StorePosition(store: "another store", sequence: 10), waiting: true) else {
            Issue.record("no resync for a reader of another store")
            return
        }
    }

    private func namedLocksExcludeTimeOutNamingTheHolderAndCancel(_ backend: some BackendUnderTest) async throws {
        let store = try backend.makeStore(lockTimeout: .seconds(10), history: 512)
        let a = try store.open("a"), b = try store.open("b")
        let hold = try #require(try a.lock(named: "job").tryAcquire())
        let other = try b.lock(named: "job")
        #expect(try other.tryAcquire() == nil, "two holders at once")
        await #expect {
            _ = try await other.acquire(timeout: .milliseconds(200))
        } throws: { error in
            let error = error as? TabSyncError
            return error?.code == .lockTimeout && error?.holders.map(\.pid) == [getpid()] && error?.message.contains("job") == true
        }
        let waiter = Task { try await other.acquire() }
        try await Task.sleep(for: .milliseconds(50))
        let cancelled = ContinuousClock.now
        waiter.cancel()
        await #expect(throws: CancellationError.self) { _ = try await waiter.value }
        #expect(ContinuousClock.now - cancelled < .seconds(2), "the cancelled wait returned promptly")
        #expect(a.queryLocks().contains { $0.name == "job" && $0.holders.map(\.pid) == [getpid()] })
        hold.release()
        let taken = try await other.acquire(timeout: .seconds(5))
        taken.release()
    }

    private func aHeldCommitLockBoundsAndCancelsOtherCommitsAndNothingIsLost(_ backend: some BackendUnderTest) async throws {
        let store = try backend.makeStore(lockTimeout: .milliseconds(300), history: 512)
        let a = try store.open("a"), b = try store.open("b")
        // A commit of A that holds the commit lock until released, on a thread of its own.
        let entered = DispatchSemaphore(value: 0), release = DispatchSemaphore(value: 0)
        let released = Atomic<Bool>(false)
        defer { if !released.exchange(true, ordering: .relaxed) { release.signal() } }
        let holder = Thread {
            _ = try? a.transaction { (transaction: inout SharedStorage.Transaction) throws(TabSyncError) in
                transaction.set("held", "yes")
                entered.signal()
                release.wait()
            }
        }
        holder.start()
        try await StreamWait.offPool { entered.wait() }
        await #expect {
            try await b.set("k", "late")
        } throws: { error in
            (error as? TabSyncError)?.code == .lockTimeout && (error as? TabSyncError)?.holders.map(\.pid) == [getpid()]
        }
        let cancelled = Task { try await b.set("k", "cancelled") }
        try await Task.sleep(for: .milliseconds(50))
        cancelled.cancel()
        await #expect(throws: CancellationError.self) { try await cancelled.value }
        if !released.exchange(true, ordering: .relaxed) { release.signal() }
        #expect(try await b.set("k", "after") == 2, "after the held commit (1), nothing of the failed ones")
        #expect(try b.snapshot().values == ["held": "yes", "k": "after"])
    }

    private func observationStartsWithTheValuesAndGoesOnWithoutAGap(_ backend: some BackendUnderTest) async throws {
        let store = try backend.makeStore(lockTimeout: .seconds(10), history: 512)
        let a = try store.open("a"), b = try store.open("b")
        try await a.set("before", "1")
        var observation = b.observe().makeAsyncIterator()
        guard case let .snapshot(values, sequence)? = await observation.next() else {
            Issue.record("the first element is not the snapshot")
            return
        }
        #expect(values == ["before": "1"] && sequence == 1)
        try await a.set("after", "2")
        guard case let .change(event)? = await observation.next() else {
            Issue.record("no change after the snapshot")
            return
        }
        #expect(event.sequence == 2 && event.key == "after")
    }
}

/// Waits that tests of storages need, with a bound.
public enum StreamWait {
    /// The next element of a stream, or nil (recorded as an issue) after `timeout`.
    public static func next<Element: Sendable>(
        _ iterator: inout AsyncStream<Element>.Iterator, timeout: Duration = .seconds(30),
        sourceLocation: SourceLocation = #_sourceLocation
    ) async -> Element? {
        let box = IteratorBox(iterator)
        let result = await withTaskGroup(of: Element?.self) { group in
            group.addTask { await box.next() }
            group.addTask {
                try? await Task.sleep(for: timeout)
                return nil
            }
            let first = await group.next()!
            group.cancelAll()
            return first
        }
        iterator = box.iterator
        if result == nil {
            Issue.record("Timed out after \(timeout) waiting for an event", sourceLocation: sourceLocation)
        }
        return result
    }

    /// Runs blocking work on a thread of its own and waits for it, so that a test's blocking
    /// calls do not hold one of the cooperative pool's threads (two on a 2-core machine), which
    /// every other test of the process needs to resume.
    public static func offPool<Result: Sendable>(_ work: @escaping @Sendable () throws -> Result) async throws -> Result {
        try await withCheckedThrowingContinuation { continuation in
            Thread { continuation.resume(with: Swift.Result { try work() }) }.start()
        }
    }
}

/// A backend that records its watch registrations and reads of changes, in order, and otherwise
/// is the one it wraps.
private final class WatchCountingBackend: StorageBackend {
    let inner: any StorageBackend
    private let log = Mutex<[String]>([])
    init(_ inner: any StorageBackend) { self.inner = inner }

    /// "watch" and "changes", in the order they came.
    var calls: [String] { log.withLock { $0 } }
    var location: String { inner.location }
    func snapshot() throws(TabSyncError) -> StoreSnapshot { try inner.snapshot() }
    func changes(after position: StorePosition, waiting: Bool) throws(TabSyncError) -> StoreChanges? {
        log.withLock { $0.append("changes") }
        return try inner.changes(after: position, waiting: waiting)
    }
    func commit<Result>(
        as author: ChangeAuthor, _ body: (inout StoreTransaction) throws(TabSyncError) -> Result
    ) throws(TabSyncError) -> Result {
        try inner.commit(as: author, body)
    }
    func commit<Result: Sendable>(
        as author: ChangeAuthor, _ body: @escaping @Sendable (inout StoreTransaction) throws(TabSyncError) -> Result
    ) async throws -> Result {
        try await inner.commit(as: author, body)
    }
    func write(_ key: String, _ value: String?, as author: ChangeAuthor) throws(TabSyncError) -> UInt64 {
        try inner.write(key, value, as: author)
    }
    func write(_ key: String, _ value: String?, as author: ChangeAuthor) async throws -> UInt64 {
        try await inner.write(key, value, as: author)
    }
    func watch(_ handler: @escaping @Sendable (BackendSignal) -> Void) -> any WatchRegistration {
        log.withLock { $0.append("watch") }
        return inner.watch(handler)
    }
    func lock(named name: String) throws(TabSyncError) -> any SessionLock { try inner.lock(named: name) }
    func queryLocks() -> [LockReport] { inner.queryLocks() }
}

private final class IteratorBox<Element: Sendable>: @unchecked Sendable {
    var iterator: AsyncStream<Element>.Iterator
    init(_ iterator: AsyncStream<Element>.Iterator) { self.iterator = iterator }
    func next() async -> Element? { await iterator.next() }
}
