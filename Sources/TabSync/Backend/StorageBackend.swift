import Foundation

/// Where a shared state lives and how its changes are announced.
///
/// ``SharedStorage`` builds events, ordering and catch-up on top of these few operations, which
/// speak in change records (``ChangeRecord``): a commit turns a ``StoreTransaction`` into
/// records with consecutive sequence numbers, and a reader asks for the records after its
/// ``StorePosition``. ``FileBackend`` implements them with a session directory, `flock` and
/// inotify; ``InMemoryBackend`` within one process, for tests; a network backend (PostgreSQL:
/// a row per change, advisory locks, `LISTEN/NOTIFY`) implements the same protocol.
///
/// Every operation comes in a form that may block its calling thread (for the synchronous API
/// of ``SharedStorage``) and an async one that must not block a Swift concurrency thread. The
/// async defaults run the blocking form on a thread of its own per call; a backend that can wait
/// asynchronously (on a network, say) overrides them, as ``FileBackend`` and ``InMemoryBackend`` do.
///
/// Errors are ``TabSyncError``s; their `path` is the backend's ``location`` or a file in it.
public protocol StorageBackend: Sendable {
    /// Where the state lives, for messages (a path, a URL without credentials).
    var location: String { get }

    /// The latest committed values and their position. May block (a recovery under the commit
    /// lock, a network round trip).
    func snapshot() throws(TabSyncError) -> StoreSnapshot

    /// What a reader at `position` has to catch up on. With `waiting` false it must not wait for
    /// a lock or the network: it returns nil where it would have to (the watcher thread asks
    /// this way, and leaves nil to a queue of the storage's own).
    func changes(after position: StorePosition, waiting: Bool) throws(TabSyncError) -> StoreChanges?

    /// Runs a read-modify-write transaction: `body` gets the latest committed values under the
    /// backend's exclusive commit lock; the records it adds are committed atomically, with the
    /// next sequence numbers, before the lock is released. Other processes see all of them or
    /// none. Blocks the calling thread, at most the backend's lock timeout.
    ///
    /// A backend may run `body` first on values it has cached and commit its records only if
    /// they are still the latest, running it again on the latest values otherwise (the
    /// PostgreSQL backend does, to commit in one round trip): `body` must compute from the
    /// transaction alone, with no effect of its own; the run whose records are committed is the
    /// one whose result is returned.
    func commit<Result>(
        as author: ChangeAuthor, _ body: (inout StoreTransaction) throws(TabSyncError) -> Result
    ) throws(TabSyncError) -> Result

    /// The same transaction for async callers: waits for the lock suspend the task and end with
    /// `CancellationError` when it is cancelled (nothing is committed then). Throws
    /// ``TabSyncError`` or `CancellationError`.
    func commit<Result: Sendable>(
        as author: ChangeAuthor, _ body: @escaping @Sendable (inout StoreTransaction) throws(TabSyncError) -> Result
    ) async throws -> Result

    /// Sets `key` to `value` (nil removes it) whatever the store holds: the commit of a body that
    /// does only that, one change or none when the key has that value already. Returns the
    /// sequence number of the change, or the current one. It reads no value first, so a backend
    /// may apply it where the values are (PostgreSQL applies it in the server, at whatever
    /// head it finds: writers of one store that contend then never commit again).
    func write(_ key: String, _ value: String?, as author: ChangeAuthor) throws(TabSyncError) -> UInt64

    /// The same write for async callers: a wait for the lock suspends the task and ends with
    /// `CancellationError` when it is cancelled (nothing is written then).
    func write(_ key: String, _ value: String?, as author: ChangeAuthor) async throws -> UInt64

    /// Calls `handler` whenever the committed state may have changed, until the returned
    /// registration is cancelled. Notifications may be coalesced or spurious; the reader
    /// compares positions. The handler must return quickly.
    func watch(_ handler: @escaping @Sendable (BackendSignal) -> Void) -> any WatchRegistration

    /// A named lock shared by every process of the session (the Web Locks idea).
    func lock(named name: String) throws(TabSyncError) -> any SessionLock

    /// Who holds and who waits for the commit lock and the named locks (the Web Locks API's
    /// `query()`): the commit lock first, named `name` of the storage.
    func queryLocks() -> [LockReport]
}

extension StorageBackend {
    public func queryLocks() -> [LockReport] { [] }

    public func commit<Result: Sendable>(
        as author: ChangeAuthor, _ body: @escaping @Sendable (inout StoreTransaction) throws(TabSyncError) -> Result
    ) async throws -> Result {
        try Task.checkCancellation()
        return try await BlockingPool.runOnOwnThread { () throws(TabSyncError) -> Result in try commit(as: author, body) }
    }

    public func write(_ key: String, _ value: String?, as author: ChangeAuthor) throws(TabSyncError) -> UInt64 {
        try commit(as: author, StoreTransaction.write(key, value))
    }

    public func write(_ key: String, _ value: String?, as author: ChangeAuthor) async throws -> UInt64 {
        try await commit(as: author, StoreTransaction.write(key, value))
    }

    /// ``snapshot()`` for async callers, off the Swift concurrency threads.
    public func snapshot() async throws(TabSyncError) -> StoreSnapshot {
        try await BlockingPool.runOnOwnThread { () throws(TabSyncError) -> StoreSnapshot in try snapshot() }
    }
}

/// One committed change: the unit in which backends store and report history.
public typealias ChangeRecord = JournalEntry

/// Who makes a commit: the names its change records carry.
public struct ChangeAuthor: Sendable, Hashable {
    /// The name of the process (``SharedStorage/origin``).
    public var origin: String
    /// The storage instance (``SharedStorage/instanceID``), which tells a reader its own changes.
    public var instance: String

    public init(origin: String, instance: String) {
        self.origin = origin
        self.instance = instance
    }
}

/// Where a reader stands: a store (an identifier that is new whenever the state was created from
/// nothing or recovered) and the sequence number of the last change it has seen there.
public struct StorePosition: Sendable, Hashable {
    public var store: String
    public var sequence: UInt64

    public init(store: String, sequence: UInt64) {
        self.store = store
        self.sequence = sequence
    }
}

/// The values of a store at a position.
public struct StoreSnapshot: Sendable, Hashable {
    public var values: [String: String]
    public var position: StorePosition
    /// Set when this store was created by recovering from a corrupt state: what was found and
    /// what was recovered. Every reader that moves to this store reports it.
    public var recovery: String?

    public init(values: [String: String], position: StorePosition, recovery: String? = nil) {
        self.values = values
        self.position = position
        self.recovery = recovery
    }
}

/// What a reader has to catch up on, from ``StorageBackend/changes(after:waiting:)``.
public enum StoreChanges: Sendable {
    /// The records after the reader's position in `store`, consecutive and oldest first; empty
    /// when it is up to date. (`store` is the reader's own, except for a reader that began
    /// before any store existed, which adopts it.)
    case records([ChangeRecord], store: String)
    /// The records cannot be replayed: the store is another one (recreated, recovered), or its
    /// history no longer reaches back to the reader's position. The reader resynchronises to
    /// these values by difference. `origins` names the last writer of keys where known.
    case resync(StoreSnapshot, origins: [String: String])
    /// There is no store (its files were deleted); the next commit creates one.
    case missing
}

/// A read-modify-write in progress: the values as committed, and the changes made to them,
/// which become the commit's records.
public struct StoreTransaction: Sendable {
    /// The values, with this transaction's changes applied.
    public private(set) var values: [String: String]
    /// The sequence number of the last change, this transaction's included.
    public private(set) var sequence: UInt64
    /// The records this transaction adds, oldest first.
    public private(set) var records: [ChangeRecord] = []
    /// The keys whose history is to be forgotten (``scrubHistory(of:)``).
    public private(set) var scrubbedKeys: Set<String> = []
    let author: ChangeAuthor

    public init(values: [String: String], sequence: UInt64, author: ChangeAuthor) {
        self.values = values
        self.sequence = sequence
        self.author = author
    }

    /// Sets or removes one key; nothing is recorded when the value does not change.
    public mutating func set(_ key: String, _ value: String?) {
        guard values[key] != value else { return }
        append(key: key, oldValue: values[key], newValue: value)
        values[key] = value
    }

    /// The body of `StorageBackend.write` as a commit: sets `key` and returns the
    /// sequence number of the last change. A backend falls back on it where it cannot write
    /// otherwise.
    public static func write(_ key: String, _ value: String?) -> @Sendable (inout StoreTransaction) throws(TabSyncError) -> UInt64 {
        { transaction throws(TabSyncError) in
            transaction.set(key, value)
            return transaction.sequence
        }
    }

    /// Removes every key, as one change with a nil key; nothing is recorded when it is empty.
    public mutating func clear() {
        guard !values.isEmpty else { return }
        append(key: nil, oldValue: nil, newValue: nil)
        values.removeAll()
    }

    /// Forgets the past values of `key` wherever the backend keeps history (a journal, a previous
    /// generation), but its current one: for values such as tokens that must not outlive their
    /// replacement. Readers far behind then see those changes without values.
    public mutating func scrubHistory(of key: String) {
        scrubbedKeys.insert(key)
    }

    private mutating func append(key: String?, oldValue: String?, newValue: String?) {
        sequence += 1
        records.append(ChangeRecord(
            sequence: sequence, key: key, oldValue: oldValue, newValue: newValue,
            origin: author.origin, instance: author.instance, time: Int64(Date().timeIntervalSince1970 * 1000)))
    }
}

/// What a backend's watch reports.
public enum BackendSignal: Sendable {
    /// The state may have changed.
    case mayHaveChanged
    /// The way changes are detected changed (for example, fell back to polling).
    case detectionChanged(ChangeDetection)
}

/// An active watch. Cancelling is idempotent.
public protocol WatchRegistration: Sendable {
    var detection: ChangeDetection { get }
    func cancel()
}

/// An exclusive lock shared across processes. A holder that dies releases it.
public protocol SessionLock: Sendable {
    /// The lock's name.
    var name: String { get }
    /// Takes the lock if it is free. Returns nil when another holder has it.
    func tryAcquire() throws(TabSyncError) -> (any SessionLockHold)?
    /// Waits until the lock is free and takes it, for at most `timeout` (nil: no bound). Waiting
    /// does not occupy a Swift concurrency thread, nor a thread of its own. Throws
    /// `CancellationError` within milliseconds when the task is cancelled, and a
    /// ``TabSyncError`` with ``TabSyncError/Code/lockTimeout`` naming the holder when the
    /// timeout passes.
    func acquire(timeout: Duration?) async throws -> any SessionLockHold
    /// Who holds the lock and who waits for it.
    func query() -> LockReport
}

extension SessionLock {
    /// Waits until the lock is free and takes it, with no bound; see ``acquire(timeout:)``.
    public func acquire() async throws -> any SessionLockHold {
        try await acquire(timeout: nil)
    }
}

/// A held lock. Releasing is idempotent; a hold that is dropped without release is released.
public protocol SessionLockHold: Sendable {
    func release()
}
