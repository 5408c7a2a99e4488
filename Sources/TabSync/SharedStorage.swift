import Foundation
import Logging
import Synchronization

/// A change another process (or, on request, this instance) committed: the browser's `storage` event.
public struct StorageEvent: Sendable, Hashable {
    /// The key that changed, or nil when the storage was cleared.
    public var key: String?
    public var oldValue: String?
    public var newValue: String?
    /// The origin name of the storage that made the change ("" when unknown, in a resync).
    public var origin: String
    /// The change's sequence number. Events arrive in strictly increasing sequence order.
    public var sequence: UInt64
    /// True when this event was computed from a snapshot difference, because the history no
    /// longer reached back to the last change this instance had delivered (or the store was
    /// recovered). Each changed key then gets one event with its current value.
    public var isResync: Bool
    /// True when this instance made the change (only seen with `includingOwnChanges`).
    public var isOwn: Bool

    public init(key: String?, oldValue: String?, newValue: String?, origin: String, sequence: UInt64, isResync: Bool = false, isOwn: Bool = false) {
        self.key = key
        self.oldValue = oldValue
        self.newValue = newValue
        self.origin = origin
        self.sequence = sequence
        self.isResync = isResync
        self.isOwn = isOwn
    }
}

/// What ``SharedStorage/observe()`` delivers: the values first, then every change after them.
public enum Observation: Sendable {
    /// The values as of `sequence`; always the first element.
    case snapshot(values: [String: String], sequence: UInt64)
    /// A change after the snapshot (this instance's own included).
    case change(StorageEvent)
    /// A problem outside any call (a corrupt file recovered, an unreadable state).
    case problem(TabSyncError)
}

/// Why a `SharedStorage.transaction(_:)` with a closure of the caller's error type failed.
public enum TransactionError<Failure: Error>: Error, CustomStringConvertible {
    /// The closure threw: nothing was committed.
    case aborted(Failure)
    /// The storage failed (the lock, the file, the disk).
    case storage(TabSyncError)

    public var description: String {
        switch self {
        case let .aborted(failure): "The transaction was abandoned: \(failure)"
        case let .storage(error): error.description
        }
    }
}

/// Everything a storage reports: changes, problems, and how changes are detected.
public enum StorageNotification: Sendable {
    case change(StorageEvent)
    /// Something went wrong outside any call: the stored state was found damaged (and perhaps
    /// recovered), is of a newer version, or could not be read.
    case problem(TabSyncError)
    /// Change detection moved, for example to polling because inotify failed.
    case detectionChanged(ChangeDetection)
}

/// A key/value state shared by every process that opens the same storage, with an event for
/// every change another process commits, like `localStorage` and its `storage` event between
/// browser tabs.
///
/// ```swift
/// let storage = try SharedStorage(directory: "/run/user/1000/myapp", origin: "window-1")
/// try storage.set("theme", "dark")
/// for await event in storage.events() {
///     print(event.key ?? "(clear)", event.newValue ?? "nil", "from", event.origin)
/// }
/// ```
///
/// - Reads see the latest committed state. Every mutation is an atomic read-modify-write under
///   an exclusive lock, so concurrent writers in any processes never lose each other's changes.
/// - Each change gets a sequence number. Every other instance delivers every change exactly once,
///   in sequence order; one that fell behind the history gets a resynchronisation
///   (``StorageEvent/isResync``) instead of silent loss.
/// - No event is delivered to the instance that made a change (unless asked), and a `set` that
///   leaves the value unchanged commits nothing and raises no event.
///
/// ### Errors
/// Calls throw ``TabSyncError``; problems found while watching arrive as
/// ``StorageNotification/problem(_:)``.
public final class SharedStorage: Sendable {
    /// Settings for a storage on a session directory.
    public struct Options: Sendable {
        /// How hard commits work to survive a power loss.
        public var durability: Durability = .file
        /// A log (or a commit that would make it) larger than this is refused.
        public var maximumStateBytes: Int = 16 << 20
        /// How much history the log keeps for readers that fall behind (it is compacted past
        /// twice as much).
        public var journalLimits = JournalLimits()
        /// The polling interval, used only when inotify cannot serve.
        public var pollInterval: Duration = .milliseconds(250)
        /// The longest a commit waits for the commit lock (another process committing, or one that
        /// is stopped or hung while it holds it) before it fails with
        /// ``TabSyncError/Code/lockTimeout`` naming the holder. A commit takes well under a
        /// millisecond, so the default, 10 seconds, only ever passes when something is stuck.
        public var lockTimeout: Duration = .seconds(10)
        /// Where TabSync logs. Values are never logged.
        public var logger = Logger(label: "TabSync", factory: { _ in SwiftLogNoOpLogHandler() })

        public init() {}
    }

    /// The name this instance signs its changes with.
    public let origin: String
    /// A random identifier of this instance.
    public let instanceID: String
    /// Where the state lives.
    public let backend: any StorageBackend
    private let logger: Logger

    private struct Subscriber {
        var includeOwn: Bool
        var deliver: @Sendable (StorageNotification) -> Void
        var finish: @Sendable () -> Void
    }

    private struct Delivery {
        /// What this instance has delivered up to; nil until the initial position is known.
        var position: StorePosition?
        /// The values as of `position`, kept up to date by the records delivered: what a
        /// resynchronisation is the difference from, and what `observe()` starts with.
        var view: [String: String] = [:]
        var subscribers: [UInt64: Subscriber] = [:]
        var nextSubscriber: UInt64 = 0
        var lastProblem: String?
        var detection: ChangeDetection = .inotify
        var watch: (any WatchRegistration)?
        var closed = false
    }

    private let delivery = Mutex(Delivery())
    /// Serialises catch-ups, so that changes reach subscribers in order while `delivery` is not
    /// held: a subscriber's stream may end (and its termination handler take `delivery`) during a
    /// hand-over, which must not deadlock.
    private let deliveryOrder = Mutex(())
    /// Where the catch-ups that may wait (recovery under the commit lock) run, off the watcher.
    private let slowLane = DispatchQueue(label: "TabSync.SharedStorage.catchUp")
    private let catchUpPending = Atomic<Bool>(false)
    /// Serialises ``follow()``.
    private let startingToFollow = Mutex(())
    /// True once ``follow()`` has watched the backend and caught up (or found the storage
    /// closed): a subscriber added from then on gets the changes after its subscription.
    private let following = Atomic<Bool>(false)

    /// Opens the storage `name` in the session directory at `path`, creating both when missing.
    public convenience init(directory path: String, name: String = "storage", origin: String, options: Options = Options()) throws(TabSyncError) {
        let directory = try SessionDirectory(path: path)
        let backend = try FileBackend(
            directory: directory, name: name, durability: options.durability,
            maximumStateBytes: options.maximumStateBytes, journalLimits: options.journalLimits,
            pollInterval: options.pollInterval, lockTimeout: options.lockTimeout)
        try self.init(backend: backend, origin: origin, options: options)
    }

    /// Opens a storage on any backend.
    public init(backend: any StorageBackend, origin: String, options: Options = Options()) throws(TabSyncError) {
        self.backend = backend
        self.origin = origin
        self.instanceID = StateDocument.newStoreID()
        self.logger = options.logger
        let initial = try backend.snapshot()
        delivery.withLock { delivery in
            delivery.position = initial.position
            delivery.view = initial.values
        }
    }

    /// Starts following the other processes' commits, once: the first subscription does (and
    /// ``changeDetection``). A storage that nobody observes does not watch its backend at all,
    /// so that a process that only reads and writes never wakes for another's commit (with 4
    /// writers on one machine each one woke for every commit of the others; on PostgreSQL each
    /// also kept a listening connection, to which the server sent every notification). What was
    /// committed since the storage last looked is read before the subscriber is added, without
    /// delivering it: a subscriber gets the changes after its subscription, as before (unless
    /// that read fails, the backend unreachable: the changes it missed come later, to the
    /// subscriber too, as they would to one that subscribed before the outage).
    /// Returns true when this call started it (and caught up).
    @discardableResult
    private func follow() -> Bool {
        guard !following.load(ordering: .acquiring) else { return false }
        return startingToFollow.withLock { _ -> Bool in
            guard !following.load(ordering: .acquiring) else { return false }
            defer { following.store(true, ordering: .releasing) }
            guard !delivery.withLock({ $0.closed }) else { return false }
            let watch = backend.watch { [weak self] signal in
                guard let self else { return }
                switch signal {
                case .mayHaveChanged: catchUpFromWatcher()
                case let .detectionChanged(detection): changeDetection(to: detection)
                }
            }
            let open = delivery.withLock { delivery -> Bool in
                guard !delivery.closed else { return false }
                delivery.watch = watch
                delivery.detection = watch.detection
                return true
            }
            guard open else {
                watch.cancel()
                return false
            }
            if case .polling = watch.detection {
                logger.warning("TabSync polls for changes", metadata: ["location": "\(backend.location)", "detection": "\(watch.detection)"])
            }
            catchUp()
            // A problem that catch-up found reached nobody: the first subscriber hears of it when
            // it is found again, not never (`report` tells each problem once).
            delivery.withLock { $0.lastProblem = nil }
            return true
        }
    }

    deinit { close() }

    /// How changes made by other processes are detected right now. Asking starts following them,
    /// as a first subscription does (see ``events(includingOwnChanges:)``).
    public var changeDetection: ChangeDetection {
        follow()
        return delivery.withLock { $0.detection }
    }

    // MARK: Reading

    /// The value of `key` in the latest committed state.
    public func get(_ key: String) throws(TabSyncError) -> String? {
        try backend.snapshot().values[key]
    }

    /// The latest committed values and the sequence number of their last change.
    public func snapshot() throws(TabSyncError) -> (values: [String: String], sequence: UInt64) {
        let snapshot = try backend.snapshot()
        return (snapshot.values, snapshot.position.sequence)
    }

    /// The keys in the latest committed state, sorted.
    public func keys() throws(TabSyncError) -> [String] {
        try backend.snapshot().values.keys.sorted()
    }

    // MARK: Writing

    /// Sets `key` to `value`. Returns the sequence number of the change, or the current one
    /// when the value was already `value` (nothing is committed then).
    ///
    /// This and the other synchronous mutations block the calling thread while they wait for the
    /// commit lock (at most ``Options/lockTimeout``) and for fsync. Async code gets
    /// ``set(_:_:)-372bf`` and its siblings, which block no Swift concurrency thread.
    @discardableResult
    public func set(_ key: String, _ value: String) throws(TabSyncError) -> UInt64 {
        try write(key, value)
    }

    /// Removes `key`. Returns the sequence number of the change, or the current one when
    /// there was no such key.
    @discardableResult
    public func remove(_ key: String) throws(TabSyncError) -> UInt64 {
        try write(key, nil)
    }

    /// One key, with the backend's write, which reads no value first.
    private func write(_ key: String, _ value: String?) throws(TabSyncError) -> UInt64 {
        try committing { () throws(TabSyncError) in try backend.write(key, value, as: author) }
    }

    /// Removes every key, as one change with a nil key. Returns its sequence number, or the
    /// current one when the storage was already empty.
    @discardableResult
    public func clear() throws(TabSyncError) -> UInt64 {
        try transaction { (transaction: inout Transaction) throws(TabSyncError) in
            transaction.clear()
            return transaction.sequence
        }
    }

    /// Changes several keys in one atomic commit. Each key whose value changes becomes its own
    /// change with its own sequence number; other processes see all of them or none.
    /// Returns the sequence number of the last change.
    @discardableResult
    public func update(_ body: (inout [String: String]) -> Void) throws(TabSyncError) -> UInt64 {
        try transaction { (transaction: inout Transaction) throws(TabSyncError) in Self.apply(body, to: &transaction) }
    }

    /// Runs `body` on the latest state under the commit lock and commits what it changed.
    /// For layers built on top (the auth session stores its record this way). On a backend that
    /// commits optimistically (PostgreSQL) `body` may run twice, so it must have no effect but
    /// on the transaction (see `StorageBackend.commit(as:_:)`).
    public func transaction<Result>(_ body: (inout Transaction) throws(TabSyncError) -> Result) throws(TabSyncError) -> Result {
        try committing { () throws(TabSyncError) in try backend.commit(as: author, body) }
    }

    /// A commit of this storage's (`work`), once it is known to be open; a refusal that tells
    /// the directory moved or opened up is reported on the streams too.
    private func committing<Result>(_ work: () throws(TabSyncError) -> Result) throws(TabSyncError) -> Result {
        try checkOpen()
        do {
            return try work()
        } catch {
            reportIfMisplaced(error)
            throw error
        }
    }

    /// The same for async code.
    private func committing<Result>(_ work: () async throws -> Result) async throws -> Result {
        try checkOpen()
        do {
            return try await work()
        } catch {
            reportIfMisplaced(error)
            throw error
        }
    }

    /// A directory moved, deleted or opened up is reported on the streams too, not only to the
    /// caller whose commit it refused.
    private func reportIfMisplaced(_ error: any Error) {
        guard let error = error as? TabSyncError, error.code == .directoryChanged || error.code == .insecurePath else { return }
        report(error)
    }

    /// Like `transaction(_:)` (closure throwing `TabSyncError`), for a closure that throws the caller's own error type: when
    /// `body` throws, nothing is committed (the state stays as it was) and its error comes back
    /// as ``TransactionError/aborted(_:)``; a failure of the storage comes as
    /// ``TransactionError/storage(_:)``.
    ///
    /// ```swift
    /// enum BookingError: Error { case soldOut }
    /// do {
    ///     try storage.transaction { (t: inout SharedStorage.Transaction) throws(BookingError) in
    ///         guard let seats = t.values["seats"].flatMap(Int.init), seats > 0 else { throw .soldOut }
    ///         t.set("seats", String(seats - 1))
    ///     }
    /// } catch .aborted(.soldOut) { … } catch { … }
    /// ```
    public func transaction<Result, Failure: Error>(
        _ body: (inout Transaction) throws(Failure) -> Result
    ) throws(TransactionError<Failure>) -> Result {
        var failure: Failure?
        do {
            return try transaction { (transaction: inout Transaction) throws(TabSyncError) -> Result in
                do throws(Failure) {
                    return try body(&transaction)
                } catch {
                    failure = error
                    throw TabSyncError(code: .invalidArgument, path: nil, message: "The transaction was abandoned by its closure")
                }
            }
        } catch {
            if let failure { throw .aborted(failure) }
            throw .storage(error)
        }
    }

    // MARK: Writing from async code

    /// ``set(_:_:)-5k8tb`` for async code. It never blocks a Swift concurrency thread:
    /// its turn among this instance's commits and its wait for the commit locks suspend the task,
    /// and the file work and fsync run on a few threads of TabSync's own (at most
    /// four per process, however many commits wait), except on a memory file system (tmpfs,
    /// ramfs: `$XDG_RUNTIME_DIR`), where they cannot block and run on the calling thread.
    /// Bounded by ``Options/lockTimeout`` like the synchronous version; a cancelled task gets
    /// `CancellationError` at once, with nothing committed. Throws ``TabSyncError`` or
    /// `CancellationError`.
    @discardableResult
    public func set(_ key: String, _ value: String) async throws -> UInt64 {
        try await write(key, value)
    }

    /// ``remove(_:)-5cxat`` for async code; see ``set(_:_:)-372bf``.
    @discardableResult
    public func remove(_ key: String) async throws -> UInt64 {
        try await write(key, nil)
    }

    private func write(_ key: String, _ value: String?) async throws -> UInt64 {
        try await committing { try await backend.write(key, value, as: author) }
    }

    /// ``clear()-9ar17`` for async code; see ``set(_:_:)-372bf``.
    @discardableResult
    public func clear() async throws -> UInt64 {
        try await transaction { transaction throws(TabSyncError) in
            transaction.clear()
            return transaction.sequence
        }
    }

    /// ``update(_:)-2yak0`` for async code; `body` runs under the commit locks, on one of
    /// TabSync's threads (on tmpfs, on the calling one). See ``set(_:_:)-372bf``.
    @discardableResult
    public func update(_ body: @escaping @Sendable (inout [String: String]) -> Void) async throws -> UInt64 {
        try await transaction { transaction throws(TabSyncError) in Self.apply(body, to: &transaction) }
    }

    /// ``transaction(_:)`` for async code; `body` runs under the commit locks, on one of
    /// TabSync's threads (on tmpfs, on the calling one). See ``set(_:_:)-372bf``.
    public func transaction<Result: Sendable>(
        _ body: @escaping @Sendable (inout Transaction) throws(TabSyncError) -> Result
    ) async throws -> Result {
        try await committing { try await backend.commit(as: author, body) }
    }

    /// Records each key whose value `body` changes as its own change, in sorted key order.
    private static func apply(_ body: (inout [String: String]) -> Void, to transaction: inout Transaction) -> UInt64 {
        let before = transaction.values
        var values = before
        body(&values)
        let changed = Set(values.keys).union(before.keys).filter { values[$0] != before[$0] }.sorted()
        for key in changed { transaction.set(key, values[key]) }
        return transaction.sequence
    }

    /// The names this instance's change records carry.
    private var author: ChangeAuthor { ChangeAuthor(origin: origin, instance: instanceID) }

    /// A read-modify-write in progress; see `SharedStorage.transaction(_:)`.
    public typealias Transaction = StoreTransaction

    // MARK: Locks

    /// A lock shared by every process of the session, for work that one process at a time
    /// should do (the Web Locks API's idea).
    public func lock(named name: String) throws(TabSyncError) -> any SessionLock {
        try backend.lock(named: name)
    }

    /// Who holds and who waits for this storage's commit lock and its named locks, as the Web
    /// Locks API's `query()`: holder pid, command and state (running, stopped, …).
    public func queryLocks() -> [LockReport] {
        backend.queryLocks()
    }

    // MARK: Events

    /// Changes committed by other instances (and by this one with `includingOwnChanges`), in
    /// sequence order, from now on. The stream buffers without bound; ends when the storage closes.
    ///
    /// A storage follows the others from its first subscription on (this, ``notifications(includingOwnChanges:)``,
    /// ``observe()``, ``onNotification(includingOwnChanges:onClose:_:)``): that first call starts
    /// watching the backend and reads what was committed since the storage last looked, a wait
    /// bounded by the backend's timeouts (on PostgreSQL, a connection and a query). Until then
    /// the process never wakes for another's commit.
    public func events(includingOwnChanges: Bool = false) -> AsyncStream<StorageEvent> {
        AsyncStream { continuation in
            subscribe(includeOwn: includingOwnChanges, continuation: continuation) { notification in
                if case let .change(event) = notification { continuation.yield(event) }
            }
        }
    }

    /// The current values, then every change after them, with no gap and no duplicate (as GRDB's
    /// `ValueObservation` starts with the current value): the first element is a
    /// ``Observation/snapshot(values:sequence:)``, and each ``Observation/change(_:)`` after it
    /// has a higher sequence number than the snapshot. This instance's own changes are included.
    ///
    /// ```swift
    /// for await observation in storage.observe() {
    ///     switch observation {
    ///     case let .snapshot(values, _): render(values)
    ///     case let .change(event): apply(event)
    ///     case let .problem(error): report(error)
    ///     }
    /// }
    /// ```
    public func observe() -> AsyncStream<Observation> {
        if !follow() { catchUp() }
        return AsyncStream { continuation in
            subscribe(includeOwn: true, continuation: continuation, first: { position, view in
                continuation.yield(.snapshot(values: view, sequence: position?.sequence ?? 0))
            }) { notification in
                switch notification {
                case let .change(event): continuation.yield(.change(event))
                case let .problem(error): continuation.yield(.problem(error))
                case .detectionChanged: break
                }
            }
        }
    }

    /// Changes, problems and detection changes, from now on.
    public func notifications(includingOwnChanges: Bool = false) -> AsyncStream<StorageNotification> {
        AsyncStream { continuation in
            subscribe(includeOwn: includingOwnChanges, continuation: continuation) { continuation.yield($0) }
        }
    }

    /// Calls `handler` with every notification (changes, problems, detection changes), in
    /// order, on the thread that delivers them, without the hop to a task that an `AsyncStream`
    /// takes (which costs a thread wake-up per change and reader; see Benchmarks/README.md). For
    /// the lowest latency. `handler` runs on TabSync's watcher thread, which serves every storage
    /// of the process: it must return quickly and must not wait for anything (a lock, the
    /// network, a call into this storage that commits, opening a PostgreSQL storage or its first
    /// subscription, which connect). Delivery stops when the returned
    /// subscription is cancelled or the storage closes; `onClose`, when given, is called once
    /// when the storage closes (at once if it is closed already), and never after a cancel.
    ///
    /// ```swift
    /// let subscription = storage.onNotification { notification in
    ///     if case let .change(event) = notification { cache.update(event.key, event.newValue) }
    /// }
    /// ```
    public func onNotification(
        includingOwnChanges: Bool = false, onClose: (@Sendable () -> Void)? = nil,
        _ handler: @escaping @Sendable (StorageNotification) -> Void
    ) -> NotificationSubscription {
        follow()
        let id: UInt64? = delivery.withLock { delivery in
            guard !delivery.closed else { return nil }
            let id = delivery.nextSubscriber
            delivery.nextSubscriber += 1
            delivery.subscribers[id] = Subscriber(includeOwn: includingOwnChanges, deliver: handler, finish: onClose ?? {})
            return id
        }
        if id == nil { onClose?() }
        return NotificationSubscription { [weak self] in
            guard let id else { return }
            let removed = self?.delivery.withLock { $0.subscribers.removeValue(forKey: id) }
            withExtendedLifetime(removed) {}
        }
    }

    /// `first` runs under the delivery lock with the position delivered so far, before any change
    /// can reach the new subscriber: what it sees and what follows meet without a gap.
    private func subscribe<Element>(
        includeOwn: Bool, continuation: AsyncStream<Element>.Continuation, first: (StorePosition?, [String: String]) -> Void = { _, _ in },
        deliver: @escaping @Sendable (StorageNotification) -> Void
    ) {
        follow()
        let id: UInt64? = delivery.withLock { delivery in
            guard !delivery.closed else { return nil }
            first(delivery.position, delivery.view)
            let id = delivery.nextSubscriber
            delivery.nextSubscriber += 1
            delivery.subscribers[id] = Subscriber(includeOwn: includeOwn, deliver: deliver, finish: { continuation.finish() })
            return id
        }
        guard let id else {
            continuation.finish()
            return
        }
        continuation.onTermination = { [weak self] _ in
            // The subscriber is released after the lock: releasing it may end other streams.
            let removed = self?.delivery.withLock { $0.subscribers.removeValue(forKey: id) }
            withExtendedLifetime(removed) {}
        }
    }

    /// Reads the state and delivers what changed since the last delivery. Called on every
    /// change notification; safe to call at any time (a spurious call costs one `fstat`).
    public func catchUp() {
        deliveryOrder.withLock { _ in _ = catchUpInOrder(recovering: true) }
    }

    /// The watcher thread's catch-up: it never waits for a lock and never recovers a file, so
    /// that a stuck storage (a corrupt file whose recovery waits for a held lock, a slow disk)
    /// delays no other storage's events nor another directory's registration. Such work goes to
    /// this storage's own queue.
    private func catchUpFromWatcher() {
        let done = deliveryOrder.withLockIfAvailable { _ in catchUpInOrder(recovering: false) }
        if done != true { catchUpLater() }
    }

    /// A catch-up (with recovery) on this storage's own queue; requests that pile up while one
    /// is pending are one.
    private func catchUpLater() {
        guard !catchUpPending.exchange(true, ordering: .acquiringAndReleasing) else { return }
        slowLane.async { [weak self] in
            self?.catchUpPending.store(false, ordering: .releasing)
            self?.catchUp()
        }
    }

    /// Returns true when it delivered (or there was nothing to deliver), false when the state
    /// needs a recovery that `recovering: false` leaves to ``catchUpLater()``.
    @discardableResult
    private func catchUpInOrder(recovering: Bool) -> Bool {
        guard let position = delivery.withLock({ $0.closed ? nil : $0.position }) else { return true }
        let changes: StoreChanges
        do {
            guard let found = try backend.changes(after: position, waiting: recovering) else { return false }
            changes = found
        } catch {
            report(error)
            return true
        }
        var recovered: TabSyncError?
        // The view, the position and the subscribers that get the events change under one lock:
        // a subscriber that `observe()` adds is given the view either before these events (and
        // gets them) or after (and does not).
        let delivered: (events: [StorageEvent], subscribers: [Subscriber])
        switch changes {
        case .missing:
            // Deleted by someone (a log is never missing while it is replaced: a new generation
            // is renamed over it). No change to deliver: the next commit creates a new
            // store, and this instance resynchronises to it then. Delivering it as "every key
            // removed" would send the sequence number back to 0.
            if !position.store.isEmpty {
                report(TabSyncError(
                    code: .storeVanished, path: backend.location,
                    message: "The storage's state was deleted while in use; its values are gone, and the next commit starts a new store"))
            }
            return true
        case let .records(records, store):
            let events = records.map { record in
                StorageEvent(
                    key: record.key, oldValue: record.oldValue, newValue: record.newValue, origin: record.origin,
                    sequence: record.sequence, isOwn: record.instance == instanceID)
            }
            delivered = delivery.withLock { delivery in
                delivery.lastProblem = nil
                guard !delivery.closed, delivery.position == position, let last = records.last else {
                    // Nothing new; a reader that began before any store existed adopts it.
                    if position.store.isEmpty, delivery.position == position {
                        delivery.position = StorePosition(store: store, sequence: position.sequence)
                    }
                    return ([], [])
                }
                for record in records {
                    if let key = record.key { delivery.view[key] = record.newValue } else { delivery.view.removeAll() }
                }
                delivery.position = StorePosition(store: store, sequence: last.sequence)
                return (events, Array(delivery.subscribers.values))
            }
        case let .resync(snapshot, origins):
            delivered = delivery.withLock { delivery in
                delivery.lastProblem = nil
                guard !delivery.closed, delivery.position == position else { return ([], []) }
                let old = delivery.view
                let events = Set(old.keys).union(snapshot.values.keys).sorted().compactMap { key -> StorageEvent? in
                    guard old[key] != snapshot.values[key] else { return nil }
                    return StorageEvent(
                        key: key, oldValue: old[key], newValue: snapshot.values[key], origin: origins[key] ?? "",
                        sequence: snapshot.position.sequence, isResync: true)
                }
                delivery.position = snapshot.position
                delivery.view = snapshot.values
                return (events, Array(delivery.subscribers.values))
            }
            if snapshot.position.store != position.store, !position.store.isEmpty, let note = snapshot.recovery {
                recovered = TabSyncError(code: .corruptState, path: backend.location, message: note)
            }
        }
        defer { if let recovered { report(recovered) } }
        // Handed over outside `delivery` (see deliveryOrder), in sequence order.
        for event in delivered.events {
            for subscriber in delivered.subscribers where !event.isOwn || subscriber.includeOwn {
                subscriber.deliver(.change(event))
            }
        }
        return true
    }

    private func report(_ problem: TabSyncError) {
        let subscribers: [Subscriber] = delivery.withLock { delivery in
            guard delivery.lastProblem != problem.description else { return [] }
            delivery.lastProblem = problem.description
            return Array(delivery.subscribers.values)
        }
        logger.error("TabSync storage problem", metadata: ["code": "\(problem.code)", "problem": "\(problem)"])
        for subscriber in subscribers { subscriber.deliver(.problem(problem)) }
    }

    private func changeDetection(to detection: ChangeDetection) {
        let subscribers = delivery.withLock { delivery in
            delivery.detection = detection
            return Array(delivery.subscribers.values)
        }
        logger.warning("TabSync change detection changed", metadata: ["detection": "\(detection)"])
        for subscriber in subscribers { subscriber.deliver(.detectionChanged(detection)) }
    }

    private func checkOpen() throws(TabSyncError) {
        if delivery.withLock({ $0.closed }) {
            throw TabSyncError(code: .closed, path: backend.location, message: "The storage is closed")
        }
    }

    /// Stops watching and ends every event stream. Idempotent.
    public func close() {
        let (watch, subscribers) = delivery.withLock { delivery -> ((any WatchRegistration)?, [Subscriber]) in
            guard !delivery.closed else { return (nil, []) }
            delivery.closed = true
            defer {
                delivery.subscribers.removeAll()
                delivery.watch = nil
            }
            return (delivery.watch, Array(delivery.subscribers.values))
        }
        watch?.cancel()
        for subscriber in subscribers { subscriber.finish() }
    }
}

/// A handler registered with ``SharedStorage/onNotification(includingOwnChanges:onClose:_:)``. Cancelling
/// is idempotent; a handler that is being called when it is cancelled finishes that call.
public final class NotificationSubscription: Sendable {
    private let onCancel: Mutex<(@Sendable () -> Void)?>

    init(_ onCancel: @escaping @Sendable () -> Void) {
        self.onCancel = Mutex(onCancel)
    }

    public func cancel() {
        onCancel.withLock { $0.take() }?()
    }

    deinit { cancel() }
}
