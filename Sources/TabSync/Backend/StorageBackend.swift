/// Where a shared state lives and how its changes are announced.
///
/// ``SharedStorage`` builds events, ordering and catch-up on top of these few operations.
/// ``FileBackend`` implements them with a session directory, `flock` and inotify; a multi-host
/// backend (PostgreSQL: a row per storage, `SELECT ... FOR UPDATE`, `LISTEN/NOTIFY`, advisory
/// locks) implements the same protocol.
public protocol StorageBackend: Sendable {
    /// Where the state lives, for messages (a path, a URL without credentials).
    var location: String { get }

    /// Reads the latest committed state, without taking the commit lock.
    func load() throws(TabSyncError) -> StateDocument

    /// Like ``load()``, but nil where reading it would mean a recovery that waits for the
    /// commit lock (a corrupt file): the watcher thread reads this way and never waits.
    func loadWithoutRecovery() throws(TabSyncError) -> StateDocument?

    /// Runs a read-modify-write transaction: `body` gets the latest committed state under
    /// the exclusive commit lock; a change to its sequence number or store is committed
    /// atomically before the lock is released. Other processes never see a partial commit.
    func commit<Result>(_ body: (inout StateDocument) throws(TabSyncError) -> Result) throws(TabSyncError) -> Result

    /// Calls `handler` whenever the committed state may have changed, until the returned
    /// registration is cancelled. Notifications may be coalesced or spurious; the reader
    /// compares sequence numbers.
    func watch(_ handler: @escaping @Sendable (BackendSignal) -> Void) -> any WatchRegistration

    /// A named lock shared by every process of the session (the Web Locks idea).
    func lock(named name: String) throws(TabSyncError) -> any SessionLock

    /// Who holds and who waits for the commit lock and the named locks (the Web Locks API's
    /// `query()`): the commit lock first, named `name` of the storage.
    func queryLocks() -> [LockReport]
}

extension StorageBackend {
    public func queryLocks() -> [LockReport] { [] }

    /// A backend with no recovery under a lock reads as ``load()`` does.
    public func loadWithoutRecovery() throws(TabSyncError) -> StateDocument? { try load() }
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
