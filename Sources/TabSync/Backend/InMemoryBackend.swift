import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A backend in this process's memory. Every ``SharedStorage`` opened on one instance shares its
/// store, as the processes of a session share a directory: for tests, previews, and an app whose
/// windows are threads. Nothing survives the process.
///
/// It keeps the last ``historyLimit`` change records (a reader further behind resynchronises),
/// serialises commits with a lock whose waits are bounded by ``lockTimeout`` and cancellable,
/// and announces each commit to its watchers on a queue of its own, never on the committing
/// thread. Its named locks are shared by the storages on the instance.
public final class InMemoryBackend: StorageBackend {
    public let location: String
    /// How many change records are kept for readers that fall behind.
    public let historyLimit: Int
    /// The longest a commit waits for the commit lock.
    public let lockTimeout: Duration

    private struct Store {
        var id = StateDocument.newStoreID()
        var sequence: UInt64 = 0
        var values: [String: String] = [:]
        var records: [ChangeRecord] = []
        var watchers: [UInt64: @Sendable (BackendSignal) -> Void] = [:]
        var nextWatcher: UInt64 = 0
        var locks: [String: MemoryLock] = [:]
    }

    private let store = Mutex(Store())
    private let commitLock: MemoryLock
    private let announcements = DispatchQueue(label: "TabSync.InMemoryBackend")

    /// A new, empty store called `name` (for messages: `memory:NAME`).
    public init(name: String = "storage", historyLimit: Int = 512, lockTimeout: Duration = .seconds(10)) {
        self.location = "memory:\(name)"
        self.historyLimit = max(1, historyLimit)
        self.lockTimeout = lockTimeout
        self.commitLock = MemoryLock(name: name, location: "memory:\(name)")
    }

    public func snapshot() throws(TabSyncError) -> StoreSnapshot {
        store.withLock { store in
            StoreSnapshot(values: store.values, position: StorePosition(store: store.id, sequence: store.sequence))
        }
    }

    public func changes(after position: StorePosition, waiting: Bool) throws(TabSyncError) -> StoreChanges? {
        store.withLock { store in
            if position.store == store.id || position.store.isEmpty {
                if store.sequence <= position.sequence { return .records([], store: store.id) }
                if let first = store.records.first, first.sequence <= position.sequence + 1 {
                    return .records(Array(store.records[Int(position.sequence + 1 - first.sequence)...]), store: store.id)
                }
            }
            var origins: [String: String] = [:]
            for record in store.records { if let key = record.key { origins[key] = record.origin } }
            return .resync(StoreSnapshot(values: store.values, position: StorePosition(store: store.id, sequence: store.sequence)), origins: origins)
        }
    }

    public func commit<Result>(
        as author: ChangeAuthor, _ body: (inout StoreTransaction) throws(TabSyncError) -> Result
    ) throws(TabSyncError) -> Result {
        let started = ContinuousClock.now
        guard commitLock.gate.enter(before: started + lockTimeout) else { throw commitLock.timedOut(after: ContinuousClock.now - started) }
        defer { commitLock.gate.leave() }
        return try apply(body, as: author)
    }

    public func commit<Result: Sendable>(
        as author: ChangeAuthor, _ body: @escaping @Sendable (inout StoreTransaction) throws(TabSyncError) -> Result
    ) async throws -> Result {
        let started = ContinuousClock.now
        switch await commitLock.gate.enter(before: started + lockTimeout) {
        case .entered: break
        case .timedOut: throw commitLock.timedOut(after: ContinuousClock.now - started)
        case .cancelled: throw CancellationError()
        }
        defer { commitLock.gate.leave() }
        // No I/O: the transaction runs on the calling task.
        return try apply(body, as: author)
    }

    /// Runs `body` on the store (the commit lock held) and announces what it changed.
    private func apply<Result>(
        _ body: (inout StoreTransaction) throws(TabSyncError) -> Result, as author: ChangeAuthor
    ) throws(TabSyncError) -> Result {
        let current = store.withLock { ($0.values, $0.sequence) }
        var transaction = StoreTransaction(values: current.0, sequence: current.1, author: author)
        let result = try body(&transaction)
        let scrubbed = transaction.scrubbedKeys
        let watchers = store.withLock { store -> [@Sendable (BackendSignal) -> Void] in
            guard !transaction.records.isEmpty || !scrubbed.isEmpty else { return [] }
            store.values = transaction.values
            store.sequence = transaction.sequence
            store.records.append(contentsOf: transaction.records)
            if store.records.count > historyLimit { store.records.removeFirst(store.records.count - historyLimit) }
            // As with the file backend's scrub (which writes a generation without history), past
            // values of each key survive nowhere; here they are cleared from the records, and its
            // current one (its newest record's new value) stays.
            for key in scrubbed {
                let newest = store.records.lastIndex { $0.key == key }
                for index in store.records.indices where store.records[index].key == key || store.records[index].key == nil {
                    store.records[index].oldValue = nil
                    if index != newest { store.records[index].newValue = nil }
                }
            }
            return Array(store.watchers.values)
        }
        if !watchers.isEmpty {
            announcements.async { for watcher in watchers { watcher(.mayHaveChanged) } }
        }
        return result
    }

    public func watch(_ handler: @escaping @Sendable (BackendSignal) -> Void) -> any WatchRegistration {
        let id = store.withLock { store in
            defer { store.nextWatcher += 1 }
            store.watchers[store.nextWatcher] = handler
            return store.nextWatcher
        }
        return MemoryWatch { [weak self] in _ = self?.store.withLock { $0.watchers.removeValue(forKey: id) } }
    }

    public func lock(named name: String) throws(TabSyncError) -> any SessionLock {
        try FileBackend.validate(name: name, what: "lock name")
        return store.withLock { store in
            if let lock = store.locks[name] { return lock }
            let lock = MemoryLock(name: name, location: "\(location).\(name)")
            store.locks[name] = lock
            return lock
        }
    }

    public func queryLocks() -> [LockReport] {
        let named = store.withLock { $0.locks.sorted { $0.key < $1.key }.map(\.value) }
        return [commitLock.query()] + named.map { $0.query() }
    }
}

/// A lock within this process: FIFO, bounded, cancellable waits; the holder is this process.
private final class MemoryLock: SessionLock {
    let name: String
    let location: String
    let gate = CommitGate()
    private let held = Atomic<Int>(0)

    init(name: String, location: String) {
        self.name = name
        self.location = location
    }

    func tryAcquire() throws(TabSyncError) -> (any SessionLockHold)? {
        gate.tryEnter() ? MemoryLockHold(gate) : nil
    }

    func acquire(timeout: Duration?) async throws -> any SessionLockHold {
        let started = ContinuousClock.now
        switch await gate.enter(before: timeout.map { started + $0 }) {
        case .entered: return MemoryLockHold(gate)
        case .timedOut: throw timedOut(after: ContinuousClock.now - started)
        case .cancelled: throw CancellationError()
        }
    }

    func query() -> LockReport {
        LockReport(name: name, path: location, holders: gate.isBusy ? [LockHolder(pid: getpid())] : [], waiters: [])
    }

    func timedOut(after waited: Duration) -> TabSyncError {
        let seconds = Double(waited.components.seconds) + Double(waited.components.attoseconds) / 1e18
        return TabSyncError(
            code: .lockTimeout, path: location,
            message: "Gave up waiting for the lock '\(name)' after \(String(format: "%.1f", seconds)) s (lock timeout); it is held by this process",
            holders: [LockHolder(pid: getpid())])
    }
}

private final class MemoryLockHold: SessionLockHold {
    private let gate: CommitGate
    private let released = Atomic<Bool>(false)

    init(_ gate: CommitGate) { self.gate = gate }

    func release() {
        if !released.exchange(true, ordering: .acquiringAndReleasing) { gate.leave() }
    }

    deinit { release() }
}

private final class MemoryWatch: WatchRegistration {
    let detection = ChangeDetection.inotify
    private let onCancel: @Sendable () -> Void
    private let cancelled = Atomic<Bool>(false)

    init(onCancel: @escaping @Sendable () -> Void) { self.onCancel = onCancel }

    func cancel() {
        if !cancelled.exchange(true, ordering: .relaxed) { onCancel() }
    }

    deinit { cancel() }
}
