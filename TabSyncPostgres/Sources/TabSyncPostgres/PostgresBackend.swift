import Foundation
import Logging
import NIOCore
import PostgresNIO
import Synchronization
import TabSync

/// A ``StorageBackend`` on PostgreSQL: the processes of one session may run on several hosts.
///
/// A store is a row of `tabsync_stores`, its values rows of `tabsync_values`, and its recent
/// changes rows of `tabsync_changes` with the same sequence numbers, retention and resync rules
/// as a session directory (docs/POSTGRES.md has the tables). A commit is one transaction under
/// the store's transaction-level advisory lock, so writers on every host take turns and nothing
/// is half-applied; it ends with a `NOTIFY` that wakes the other processes, which then ask for
/// the changes after their position. Named locks are session-level advisory locks, each on a
/// connection of its own, which the server releases when the holding process dies.
///
/// ```swift
/// let configuration = try PostgresConfiguration(url: "postgres://app@db.internal/app",
///                                               password: ProcessInfo.processInfo.environment["PGPASSWORD"])
/// let backend = try PostgresBackend(configuration: configuration, store: "myapp/session", origin: "worker-1")
/// let storage = try SharedStorage(backend: backend, origin: "worker-1")
/// ```
///
/// Synchronous operations block their calling thread for a network round trip or a lock wait,
/// each with a bound (``PostgresConfiguration/operationTimeout``, ``lockTimeout``); the async
/// ones run on threads of their own and never hold a Swift concurrency thread.
public final class PostgresBackend: StorageBackend {
    public let configuration: PostgresConfiguration
    /// The store's name: what every process of the session opens.
    public let store: String
    /// How many change records are kept for readers that fall behind.
    public let historyLimit: Int
    /// The longest a commit waits for another's commit lock.
    public let lockTimeout: Duration

    let connector: Connector
    let pool: ConnectionPool
    let lockPool: ConnectionPool
    private let cache = Mutex<Cached?>(nil)
    private let listener: Listener
    /// Lock names this backend has entered in `tabsync_locks` (once each, not at every use).
    private let registeredLocks = Mutex<Set<String>>([])
    /// The server's clock as measured at connection: its time at a local monotonic instant.
    private let serverClock: Mutex<(milliseconds: Int64, at: ContinuousClock.Instant)>

    private struct Cached {
        var storeID: String
        var sequence: Int64
        var values: [String: String]
    }

    /// Connects, and creates the tables when the database has none.
    public init(
        configuration: PostgresConfiguration, store: String, origin: String = "",
        historyLimit: Int = 512, lockTimeout: Duration = .seconds(10),
        logger: Logger = Logger(label: "TabSyncPostgres", factory: { _ in SwiftLogNoOpLogHandler() })
    ) throws(TabSyncError) {
        guard !store.isEmpty, store.utf8.count <= 200, store.unicodeScalars.allSatisfy({ $0.properties.generalCategory != .control }) else {
            throw TabSyncError(code: .invalidArgument, path: nil, message: "A store name must be 1 to 200 bytes without control characters")
        }
        guard historyLimit >= 1 else {
            throw TabSyncError(code: .invalidArgument, path: nil, message: "The history limit must be at least 1")
        }
        self.configuration = configuration
        self.store = store
        self.historyLimit = historyLimit
        self.lockTimeout = lockTimeout
        connector = Connector(configuration: configuration, origin: origin, logger: logger)
        pool = ConnectionPool(connector: connector)
        lockPool = ConnectionPool(connector: connector, keep: 2)
        listener = Listener(connector: connector, store: store)
        let connector = self.connector
        let clock = try pool.with { connection throws(TabSyncError) in
            try Self.prepareSchema(on: connection, connector)
            return try Self.measureClock(on: connection, connector)
        }
        serverClock = Mutex(clock)
        let readAhead = Listener.ReadAhead { [weak self] notified, connection in self?.readAhead(notified, on: connection) }
        listener.readAhead.withLock { $0 = readAhead }
    }

    /// Now by the database server's clock: the time every host of the session shares. Measured
    /// once at connection (the server's `clock_timestamp()` at the middle of a round trip) and
    /// carried on with this host's monotonic clock, so reading it costs no round trip and a
    /// host whose wall clock is wrong, or jumps, still agrees with the others. Use it as the
    /// session's clock (`AuthSession.Options.clock`), so that deadlines, activity and backoff
    /// are the same on every host.
    public func serverTime() -> Date {
        let (milliseconds, at) = serverClock.withLock { $0 }
        return Date(timeIntervalSince1970: Double(milliseconds + (ContinuousClock.now - at).milliseconds) / 1000)
    }

    private static func measureClock(
        on connection: PostgresConnection, _ connector: Connector
    ) throws(TabSyncError) -> (milliseconds: Int64, at: ContinuousClock.Instant) {
        let before = ContinuousClock.now
        let rows = try connector.run(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint", on: connection, doing: "reading the server's clock")
        let after = ContinuousClock.now
        guard let milliseconds = (try? rows.first?.decode(Int64.self)) ?? nil else {
            throw TabSyncError(code: .io, path: connector.configuration.description, message: "The server did not tell its time")
        }
        return (milliseconds, before + (after - before) / 2)
    }

    deinit {
        listener.close()
        pool.closeAll()
        lockPool.closeAll()
    }

    /// The server and the store, never the password.
    public var location: String { "\(configuration)#\(store)" }

    // MARK: Schema

    private static func prepareSchema(on connection: PostgresConnection, _ connector: Connector) throws(TabSyncError) {
        func look() throws(TabSyncError) -> (tables: Bool, commit: Bool, write: Bool) {
            let exists = try connector.run(
                """
                SELECT to_regclass('tabsync_schema')::text, to_regproc(\(Schema.commitFunction))::text, to_regproc(\(Schema.writeFunction))::text
                """, on: connection, doing: "looking for the tables")
            let found = (try? exists.first?.decode((String?, String?, String?).self)) ?? nil
            return (found?.0 != nil, found?.1 != nil, found?.2 != nil)
        }
        let found = try look()
        if found.tables, found.commit, found.write, try version(on: connection, connector) == Schema.version { return }
        try transaction(on: connection, connector) { () throws(TabSyncError) in
            try connector.run("SELECT pg_advisory_xact_lock(\(Schema.lockKey(store: "", name: "schema")))", on: connection, doing: "locking the tables' creation")
            // Under the lock, what another process has not created meanwhile; a function that
            // exists is left alone (replacing it takes its owner's rights).
            let now = try look()
            var statements = Schema.create + [Schema.createLocks]
            if !now.commit { statements.append(Schema.createCommitFunction) }
            if !now.write { statements.append(Schema.createWriteFunction) }
            for statement in statements {
                try connector.run(PostgresQuery(unsafeSQL: statement), on: connection, doing: "creating the tables")
            }
            if try version(on: connection, connector) == nil {
                try connector.run("INSERT INTO tabsync_schema (version) VALUES (\(Schema.version))", on: connection, doing: "creating the tables")
            }
        }
        _ = try version(on: connection, connector)
    }

    /// The tables' layout version; a newer one than this code's is an error.
    private static func version(on connection: PostgresConnection, _ connector: Connector) throws(TabSyncError) -> Int32? {
        let rows = try connector.run("SELECT max(version) FROM tabsync_schema", on: connection, doing: "reading the tables' version")
        let version = (try? rows.first?.decode(Int32?.self)) ?? nil
        if let version, version > Schema.version {
            throw TabSyncError(
                code: .unsupportedVersion, path: connector.configuration.description,
                message: "The TabSync tables have layout version \(version); this version of TabSyncPostgres reads version \(Schema.version) only")
        }
        return version
    }

    private static func transaction<Result>(
        on connection: PostgresConnection, _ connector: Connector, _ body: () throws(TabSyncError) -> Result
    ) throws(TabSyncError) -> Result {
        try connector.run("BEGIN", on: connection, doing: "beginning a transaction")
        do {
            let result = try body()
            try connector.run("COMMIT", on: connection, doing: "committing")
            return result
        } catch {
            _ = try? connector.run("ROLLBACK", on: connection, doing: "rolling back")
            throw error
        }
    }

    // MARK: Reading

    public func snapshot() throws(TabSyncError) -> StoreSnapshot {
        try pool.with { connection throws(TabSyncError) in try snapshot(on: connection) }
    }

    private func snapshot(on connection: PostgresConnection) throws(TabSyncError) -> StoreSnapshot {
        let head = try connector.run(
            "SELECT store_id, sequence FROM tabsync_stores WHERE name = \(store)", on: connection, doing: "reading the store")
        guard let row = head.first else { return StoreSnapshot(values: [:], position: StorePosition(store: "", sequence: 0)) }
        let (storeID, sequence) = try decode(row, as: (String, Int64).self)
        if let cached = cache.withLock({ $0 }), cached.storeID == storeID, cached.sequence == sequence {
            return StoreSnapshot(values: cached.values, position: StorePosition(store: storeID, sequence: UInt64(sequence)))
        }
        let rows = try connector.run(
            """
            SELECT s.store_id, s.sequence, v.key, v.value
            FROM tabsync_stores s LEFT JOIN tabsync_values v ON v.store = s.name WHERE s.name = \(store)
            """, on: connection, doing: "reading the store's values")
        guard let first = rows.first else { return StoreSnapshot(values: [:], position: StorePosition(store: "", sequence: 0)) }
        let (id, at, _, _) = try decode(first, as: (String, Int64, String?, String?).self)
        var values: [String: String] = [:]
        for row in rows {
            let (_, _, key, value) = try decode(row, as: (String, Int64, String?, String?).self)
            if let key, let value { values[key] = value }
        }
        remember(Cached(storeID: id, sequence: at, values: values))
        return StoreSnapshot(values: values, position: StorePosition(store: id, sequence: UInt64(at)))
    }

    public func changes(after position: StorePosition, waiting: Bool) throws(TabSyncError) -> StoreChanges? {
        readAheadState.withLock { $0.lastPosition = position }
        // The listener's quick look, once per notification: the records up to it are known when
        // this instance committed them or the listener's read-ahead has just read them, and
        // follow the reader's position directly. Otherwise the storage's queue queries.
        if !waiting, let notified = listener.notificationInHand {
            if let known = knownRecords(after: position, through: notified.sequence) { return .records(known, store: position.store) }
            // Its notification can come before its commit has returned here: the committing
            // thread hands it on once it knows the records (``endOwnCommit(by:)``).
            if deferOwn(notified) { return .records([], store: position.store) }
        }
        // Every other answer needs the network: the quick look leaves it to the storage's queue.
        guard waiting else { return nil }
        return try pool.with { connection throws(TabSyncError) -> StoreChanges in
            // A reader that began before any store existed replays the first store's changes.
            let anyStore = position.store.isEmpty
            let from = anyStore ? Int64(0) : Int64(clamping: position.sequence)
            let rows = try connector.run(
                prepared: Schema.changesQuery, Schema.changesBinds(after: from, of: anyStore ? nil : position.store, in: store),
                on: connection, doing: "reading the changes")
            guard !rows.isEmpty else { return .missing }
            if let (records, storeID) = try parseChanges(rows, after: from, of: anyStore ? nil : position.store) {
                advanceCache(storeID: storeID, from: from, by: records)
                return .records(records, store: storeID)
            }
            let snapshot = try snapshot(on: connection)
            let origins = try connector.run(
                """
                SELECT DISTINCT ON (key) key, origin FROM tabsync_changes
                WHERE store = \(store) AND key IS NOT NULL ORDER BY key, sequence DESC
                """, on: connection, doing: "reading the last writers")
            var byKey: [String: String] = [:]
            for row in origins {
                let (key, origin) = try decode(row, as: (String, String).self)
                byKey[key] = origin
            }
            return .resync(snapshot, origins: byKey)
        }
    }

    // MARK: Committing

    public func commit<Result>(
        as author: ChangeAuthor, _ body: (inout StoreTransaction) throws(TabSyncError) -> Result
    ) throws(TabSyncError) -> Result {
        beginOwnCommit(by: author.instance)
        defer { endOwnCommit(by: author.instance) }
        return try pool.with { connection throws(TabSyncError) in
            if let result = try commitQuickly(on: connection, as: author, body) { return result }
            return try commit(on: connection, as: author, body)
        }
    }

    public func commit<Result: Sendable>(
        as author: ChangeAuthor, _ body: @escaping @Sendable (inout StoreTransaction) throws(TabSyncError) -> Result
    ) async throws -> Result {
        // A cancelled wait for the lock closes the connection: the server ends the transaction,
        // and nothing of it is committed. Once the lock is held the commit goes through.
        try await Blocking.run { interruption in
            self.beginOwnCommit(by: author.instance)
            defer { self.endOwnCommit(by: author.instance) }
            return try self.pool.with { connection throws(TabSyncError) in
                // Not interruptible: it waits for the lock at most `quickLockWait`.
                if let result = try self.commitQuickly(on: connection, as: author, body) { return result }
                return try self.commit(on: connection, as: author, body, interruption: interruption)
            }
        }
    }

    public func write(_ key: String, _ value: String?, as author: ChangeAuthor) throws(TabSyncError) -> UInt64 {
        try checkText(key, value)
        beginOwnCommit(by: author.instance)
        defer { endOwnCommit(by: author.instance) }
        let written = try pool.with { connection throws(TabSyncError) in try writeInOneRoundTrip(key, value, as: author, on: connection) }
        if let written { return written }
        return try commit(as: author, StoreTransaction.write(key, value))
    }

    public func write(_ key: String, _ value: String?, as author: ChangeAuthor) async throws -> UInt64 {
        try checkText(key, value)
        // Not interruptible, as the one-round-trip commit: it waits for the lock at most
        // `quickLockWait`. The commit it falls back on is.
        let written = try await Blocking.run { _ in
            self.beginOwnCommit(by: author.instance)
            defer { self.endOwnCommit(by: author.instance) }
            return try self.pool.with { connection throws(TabSyncError) in
                try self.writeInOneRoundTrip(key, value, as: author, on: connection)
            }
        }
        if let written { return written }
        return try await commit(as: author, StoreTransaction.write(key, value))
    }

    /// The write in one round trip (``Schema/writeFunction``), at whatever head the server finds:
    /// nil (nothing written) when the commit lock is busy beyond ``quickLockWait``, which leaves
    /// the write to a commit that waits the whole ``lockTimeout``.
    private func writeInOneRoundTrip(
        _ key: String, _ value: String?, as author: ChangeAuthor, on connection: PostgresConnection
    ) throws(TabSyncError) -> UInt64? {
        let rows: [PostgresRow]
        do {
            rows = try connector.run(
                prepared: Schema.writeStatement,
                [
                    PostgresData(string: store), PostgresData(int64: Schema.lockKey(store: store)),
                    PostgresData(string: "\(Self.quickLockWait.milliseconds)ms"), PostgresData(string: key),
                    value.map { PostgresData(string: $0) } ?? PostgresData(type: .text), PostgresData(string: author.origin),
                    PostgresData(string: author.instance), PostgresData(int64: Int64(historyLimit)),
                ],
                on: connection, timeout: Self.quickLockWait + configuration.operationTimeout, doing: "writing a key")
        } catch where error.code == .lockTimeout {
            return nil
        }
        guard let row = rows.first else {
            throw TabSyncError(code: .corruptState, path: location, message: "The server did not answer a write")
        }
        let (storeID, sequenceText, old, timeText) = try decode(row, as: (String, String, String?, String?).self)
        guard let sequence = Int64(sequenceText) else { throw unexpectedShape }
        guard let timeText else { return UInt64(sequence) }
        guard let time = Int64(timeText) else { throw unexpectedShape }
        let record = ChangeRecord(
            sequence: UInt64(sequence), key: key, oldValue: old, newValue: value, origin: author.origin, instance: author.instance, time: time)
        // Where nobody else committed since the cached head, the cache moves on with it.
        advanceCache(storeID: storeID, from: sequence - 1, by: [record])
        rememberKnown([record], storeID: storeID, from: sequence - 1)
        return UInt64(sequence)
    }

    /// Before a connection is taken: a refused argument closes none.
    private func checkText(_ key: String, _ value: String?) throws(TabSyncError) {
        // In bytes: `String.contains(_:)` with a string goes through Foundation's NSString search
        // (5 % of a writer's calling thread in a profile).
        if key.utf8.contains(0) || value?.utf8.contains(0) == true {
            throw TabSyncError(code: .invalidArgument, path: location, message: "PostgreSQL text cannot hold a NUL character (in the key or value of a write)")
        }
    }

    /// How ``commitInOneRoundTrip(on:as:_:)`` ended.
    private enum Quick<Result> {
        case done(Result)
        /// Another process committed since the cached head.
        case stale
        /// No cached head, the lock busy, or the body threw.
        case notDone
    }

    /// The one-round-trip commit, again after reading the latest head and values when another
    /// process committed in between (writers of one store take turns in the server, not across
    /// round trips); nil when it cannot be done so: the caller then commits the long way.
    private func commitQuickly<Result>(
        on connection: PostgresConnection, as author: ChangeAuthor, _ body: (inout StoreTransaction) throws(TabSyncError) -> Result
    ) throws(TabSyncError) -> Result? {
        for attempt in 0..<Self.quickAttempts {
            switch try commitInOneRoundTrip(on: connection, as: author, body) {
            case let .done(result): return result
            case .notDone: return nil
            case .stale:
                if attempt + 1 < Self.quickAttempts { _ = try snapshot(on: connection) }
            }
        }
        return nil
    }

    /// One-round-trip attempts before the commit waits for the lock and reads under it.
    static let quickAttempts = 3

    /// How long the one-round-trip commit waits for the store's commit lock before it leaves the
    /// commit to the transaction that waits the whole ``lockTimeout`` (and that a cancellation
    /// ends): a commit holds the lock for a fraction of a millisecond.
    static let quickLockWait: Duration = .milliseconds(50)

    /// The commit in one round trip (``Schema/commitFunction``), when this process knows the
    /// store's head: `body` runs on the values it has cached, and the server applies the records
    /// only if the store is still at that head: ``Quick/stale`` when another process committed
    /// since, ``Quick/notDone`` when there is no cached head, the lock is busy beyond
    /// ``quickLockWait`` or `body` threw. Either way nothing was written, and `body` runs again.
    private func commitInOneRoundTrip<Result>(
        on connection: PostgresConnection, as author: ChangeAuthor, _ body: (inout StoreTransaction) throws(TabSyncError) -> Result
    ) throws(TabSyncError) -> Quick<Result> {
        guard let cached = cache.withLock({ $0 }) else { return .notDone }
        var transaction = StoreTransaction(values: cached.values, sequence: UInt64(cached.sequence), author: author)
        let result: Result
        do { result = try body(&transaction) } catch { return .notDone }
        guard let written = try? Written(transaction, location: location) else { return .notDone }
        let head: Int64?
        do {
            head = try apply(
                written, of: transaction, by: author, at: (cached.storeID, cached.sequence), waitingAtMost: Self.quickLockWait,
                timeout: Self.quickLockWait + configuration.operationTimeout, on: connection)
        } catch where error.code == .lockTimeout {
            return .notDone
        }
        guard let head else { return .stale }
        remember(Cached(storeID: cached.storeID, sequence: head, values: transaction.values))
        rememberOwn(transaction, storeID: cached.storeID, from: cached.sequence)
        return .done(result)
    }

    /// The commit's transaction. With an `interruption`, a cancellation ends the wait for the lock.
    private func commit<Result>(
        on connection: PostgresConnection, as author: ChangeAuthor, _ body: (inout StoreTransaction) throws(TabSyncError) -> Result,
        interruption: Interruption? = nil
    ) throws(TabSyncError) -> Result {
        var committed: (transaction: StoreTransaction, storeID: String, from: Int64)?
        let result = try Self.transaction(on: connection, connector) { () throws(TabSyncError) -> Result in
            if let interruption, !interruption.arm(connection) {
                throw TabSyncError(code: .closed, path: location, message: "The commit was cancelled")
            }
            try lockForCommit(on: connection)
            interruption?.disarm()
            let head = try connector.run(
                "SELECT store_id, sequence FROM tabsync_stores WHERE name = \(store)", on: connection, doing: "reading the store")
            var storeID: String, sequence: Int64, values: [String: String]
            if let row = head.first {
                (storeID, sequence) = try decode(row, as: (String, Int64).self)
                if let cached = cache.withLock({ $0 }), cached.storeID == storeID, cached.sequence == sequence {
                    values = cached.values
                } else {
                    values = [:]
                    let rows = try connector.run(
                        "SELECT key, value FROM tabsync_values WHERE store = \(store)", on: connection, doing: "reading the store's values")
                    for row in rows {
                        let (key, value) = try decode(row, as: (String, String).self)
                        values[key] = value
                    }
                }
            } else {
                // The first commit creates the store, under the lock.
                (storeID, sequence, values) = (UUID().uuidString.lowercased(), 0, [:])
                try connector.run(
                    "INSERT INTO tabsync_stores (name, store_id, sequence) VALUES (\(store), \(storeID), 0)",
                    on: connection, doing: "creating the store")
            }
            var transaction = StoreTransaction(values: values, sequence: UInt64(sequence), author: author)
            let result = try body(&transaction)
            if !transaction.records.isEmpty || !transaction.scrubbedKeys.isEmpty {
                // The same function as the one-round-trip commit; the commit lock it takes is held
                // already. Its statements' own lock waits keep the lock timeout, as the
                // transaction's, and the statement the operation timeout.
                let written = try Written(transaction, location: location)
                guard try apply(
                    written, of: transaction, by: author, at: (storeID, sequence), waitingAtMost: lockTimeout,
                    timeout: configuration.operationTimeout, on: connection) != nil else {
                    throw TabSyncError(code: .corruptState, path: location, message: "The store moved on under its commit lock")
                }
            }
            remember(Cached(storeID: storeID, sequence: Int64(transaction.sequence), values: transaction.values))
            committed = (transaction, storeID, sequence)
            return result
        }
        // Only once COMMIT has succeeded: a reader of this instance may be handed these records.
        if let committed { rememberOwn(committed.transaction, storeID: committed.storeID, from: committed.from) }
        return result
    }

    /// Records known to be committed, consecutive, from the sequence number they followed: this
    /// instance's commits and what the listener's read-ahead read. A reader of this instance is
    /// handed them without a query (``changes(after:waiting:)``); those handed over are dropped,
    /// so that values (tokens) stay no longer than needed.
    private let known = Mutex<(storeID: String, from: Int64, records: [ChangeRecord])?>(nil)

    /// At most this many records are kept for this instance's readers.
    private static let knownLimit = 256

    private func rememberOwn(_ transaction: StoreTransaction, storeID: String, from: Int64) {
        // A scrubbing commit's records hold values that must not outlive it: none are kept.
        guard transaction.scrubbedKeys.isEmpty else {
            known.withLock { $0 = nil }
            return
        }
        rememberKnown(transaction.records, storeID: storeID, from: from)
    }

    private func rememberKnown(_ records: [ChangeRecord], storeID: String, from: Int64) {
        known.withLock { tail in
            guard !records.isEmpty else { return }
            // Known already, and more (the read-ahead can read a commit of this instance before
            // its thread remembers it): nothing to add.
            if let current = tail, current.storeID == storeID, current.from + Int64(current.records.count) >= from + Int64(records.count) { return }
            if var current = tail, current.storeID == storeID, current.from + Int64(current.records.count) == from {
                current.records += records
                if current.records.count > Self.knownLimit {
                    let dropped = current.records.count - Self.knownLimit
                    current.records.removeFirst(dropped)
                    current.from += Int64(dropped)
                }
                tail = current
            } else {
                tail = (storeID, from, records)
            }
        }
    }

    /// The commits under way, by writing instance, and the latest notification of each such
    /// instance that came before its commit returned: the server notifies as the transaction
    /// commits, and the listener's thread can be quicker than the committing one.
    private let ownCommits = Mutex<(running: [String: Int], early: [String: Int64])>(([:], [:]))

    private func beginOwnCommit(by instance: String) {
        ownCommits.withLock { $0.running[instance, default: 0] += 1 }
    }

    /// Hands on the notification that came early, once one of the instance's commits under way
    /// has returned: the look delivers what is known by then, and leaves the notification for
    /// the next commit to end if its own records are not yet (or, once none is under way,
    /// queries). On the listener's thread, as every notification: a storage's handlers never
    /// run inside its caller's `set`.
    private func endOwnCommit(by instance: String) {
        let early = ownCommits.withLock { commits -> Listener.Notified? in
            let running = commits.running[instance, default: 1] - 1
            commits.running[instance] = running > 0 ? running : nil
            guard let early = commits.early.removeValue(forKey: instance) else { return nil }
            return (early, instance)
        }
        if let early { listener.handOnLater(early) }
    }

    /// True when `notified` is of a commit of this process still under way: it is kept for
    /// ``endOwnCommit(by:)``, the latest of several.
    private func deferOwn(_ notified: Listener.Notified) -> Bool {
        ownCommits.withLock { commits in
            guard commits.running[notified.instance] != nil else { return false }
            commits.early[notified.instance] = max(commits.early[notified.instance] ?? notified.sequence, notified.sequence)
            return true
        }
    }

    /// The known records after `position` through `sequence`, when they follow `position`
    /// directly; they are dropped from what is known, as handed over.
    private func knownRecords(after position: StorePosition, through sequence: Int64) -> [ChangeRecord]? {
        known.withLock { tail -> [ChangeRecord]? in
            guard var current = tail, current.storeID == position.store else { return nil }
            let start = Int64(clamping: position.sequence) - current.from
            let end = sequence - current.from
            guard start >= 0, start < end, end <= Int64(current.records.count) else { return nil }
            let records = Array(current.records[Int(start)..<Int(end)])
            current.records.removeFirst(Int(end))
            current.from += end
            tail = current
            return records
        }
    }

    /// A reader's query's rows: the records after `from`, when they run consecutively to the
    /// store's head and the store is `storeID` (any, when nil); nil otherwise (a resync).
    private func parseChanges(
        _ rows: [PostgresRow], after from: Int64, of storeID: String?
    ) throws(TabSyncError) -> (records: [ChangeRecord], storeID: String)? {
        typealias Row = (String, String, String?, String?, String?, String?, String?, String?, String?)
        guard let first = rows.first else { return nil }
        let (found, headText, _, _, _, _, _, _, _) = try decode(first, as: Row.self)
        guard let head = Int64(headText) else { throw unexpectedShape }
        guard storeID == nil || storeID == found else { return nil }
        if head <= from { return ([], found) }
        var records: [ChangeRecord] = []
        for row in rows {
            let (_, _, sequenceText, key, old, new, origin, instance, time) = try decode(row, as: Row.self)
            guard let sequenceText, let origin, let instance else { continue }
            guard let sequence = UInt64(sequenceText) else { throw unexpectedShape }
            records.append(ChangeRecord(
                sequence: sequence, key: key, oldValue: old, newValue: new, origin: origin, instance: instance,
                time: time.flatMap { Int64($0) } ?? 0))
        }
        guard records.first?.sequence == UInt64(from + 1), records.count == Int(head - from) else { return nil }
        return (records, found)
    }

    // MARK: Read-ahead

    /// The listener's read-ahead: one query at a time on the listener's own connection, the
    /// latest notification that came meanwhile, the reader's last position, and whether a query
    /// outlived its bound (no read-ahead then until it ends).
    private struct ReadAheadState {
        var inFlight = false
        var pending: Listener.Notified?
        var lastPosition: StorePosition?
        var stuck = false
    }

    private let readAheadState = Mutex(ReadAheadState())

    /// A notification of another process's commit, on the listener's event loop: the changes are
    /// read there, on the listener's connection, before the notification is handed on, so that
    /// the reader's look finds them known and delivers them on that thread. Without it the
    /// look hands the work to the storage's queue, which queries on a pooled connection and
    /// wakes three more threads. Any failure just hands the notification on: the queue's
    /// query then does as it did.
    private func readAhead(_ notified: Listener.Notified, on connection: PostgresConnection, coalesced: Bool = false) {
        enum Next { case handOn, wait, query(storeID: String, after: Int64) }
        // A notification that stands for several (some of other processes) is read ahead even
        // while this instance commits.
        let committing = !coalesced && ownCommits.withLock { $0.running[notified.instance] != nil }
        let next = readAheadState.withLock { state -> Next in
            if state.inFlight {
                if state.pending.map({ $0.sequence < notified.sequence }) ?? true { state.pending = notified }
                return .wait
            }
            // This instance's own commit under way: its thread hands it on (``endOwnCommit(by:)``).
            if committing || state.stuck { return .handOn }
            let end = known.withLock { $0.map { ($0.storeID, $0.from + Int64($0.records.count)) } }
            let last = state.lastPosition.flatMap { $0.store.isEmpty ? nil : ($0.store, Int64(clamping: $0.sequence)) }
            guard let (storeID, after) = end ?? last, after < notified.sequence else { return .handOn }
            state.inFlight = true
            return .query(storeID: storeID, after: after)
        }
        guard case let .query(storeID, after) = next else {
            if case .handOn = next { listener.handOn(notified) }
            return
        }
        let ended = Atomic<Bool>(false)
        let finish: @Sendable (Result<[PostgresRow], any Error>?) -> Void = { [weak self] result in
            guard let self else { return }
            guard !ended.exchange(true, ordering: .acquiringAndReleasing) else {
                // The answer of a query that outlived its bound.
                readAheadState.withLock { $0.stuck = false }
                return
            }
            if case let .success(rows)? = result {
                if let (records, found) = try? parseChanges(rows, after: after, of: storeID) {
                    rememberKnown(records, storeID: found, from: after)
                    advanceCache(storeID: found, from: after, by: records)
                } else {
                    // Another store, or history trimmed past it: the next read-ahead starts from
                    // the reader's position, once the queue's query has resynchronised it.
                    known.withLock { if $0?.storeID == storeID { $0 = nil } }
                }
            }
            let pending = readAheadState.withLock { state -> Listener.Notified? in
                state.inFlight = false
                if result == nil { state.stuck = true }
                defer { state.pending = nil }
                return state.pending
            }
            listener.handOn(notified)
            if let pending { readAhead(pending, on: connection, coalesced: true) }
        }
        let loop = connection.eventLoop
        loop.execute { [connector, store] in
            let timer = loop.scheduleTask(in: .nanoseconds(Int64(connector.configuration.operationTimeout.nanoseconds))) { finish(nil) }
            connector.start(
                prepared: Schema.changesQuery, Schema.changesBinds(after: after, of: storeID, in: store), on: connection
            ).whenComplete { result in
                timer.cancel()
                finish(result)
            }
        }
    }

    /// The store's transaction-level advisory lock, for at most ``lockTimeout``.
    private func lockForCommit(on connection: PostgresConnection) throws(TabSyncError) {
        let key = Schema.lockKey(store: store)
        let milliseconds = max(1, lockTimeout.milliseconds)
        do {
            try connector.run(
                "SELECT set_config('lock_timeout', \("\(milliseconds)ms"), true), pg_advisory_xact_lock(\(key))",
                on: connection, timeout: lockTimeout + configuration.operationTimeout, doing: "waiting for the commit lock")
        } catch where error.code == .lockTimeout {
            throw lockTimeoutError("The commit lock of \(store)", name: store, key: key, after: lockTimeout)
        }
    }

    /// ``TabSyncError/Code/lockTimeout`` for `what` (lock `name`, key `key`), naming its holders.
    func lockTimeoutError(_ what: String, name: String, key: Int64, after bound: Duration) -> TabSyncError {
        let holders = (try? lockReport(name: name, key: key).holders) ?? []
        return TabSyncError(
            code: .lockTimeout, path: location,
            message: "\(what) was not free within \(bound); held by \(holders.isEmpty ? "another session" : holders.map(\.description).joined(separator: ", "))",
            holders: holders)
    }

    /// A transaction's writes as the JSON parameters of the statements that apply them.
    private struct Written {
        var records: String, upserts: String, deletes: String, cleared: Bool

        init(_ transaction: StoreTransaction, location: String) throws(TabSyncError) {
            let records = transaction.records
            for record in records where [record.key, record.newValue].contains(where: { $0?.utf8.contains(0) == true }) {
                throw TabSyncError(code: .invalidArgument, path: location, message: "PostgreSQL text cannot hold a NUL character (in key or value of change \(record.sequence))")
            }
            let touched = Set(records.compactMap(\.key))
            cleared = records.contains { $0.key == nil }
            var upserts: [String: String] = [:], deletes: [String] = []
            for key in touched {
                if let value = transaction.values[key] { upserts[key] = value } else { deletes.append(key) }
            }
            self.records = JSONText.array(records.map { record in
                "{\"s\":\(record.sequence),\"k\":\(JSONText.string(record.key)),\"o\":\(JSONText.string(record.oldValue)),\"n\":\(JSONText.string(record.newValue))}"
            })
            self.upserts = JSONText.object(upserts.sorted { $0.key < $1.key }.map { ($0.key, $0.value) })
            self.deletes = JSONText.array(deletes.sorted().map { JSONText.string($0) })
        }
    }

    /// Applies `transaction`'s records and scrub with ``Schema/commitFunction``, under the store's
    /// commit lock (its lock waits at most `wait` each, the statement at most `timeout`), if the
    /// store is still at `head`: the new sequence number, or nil (nothing written) when the store
    /// moved on.
    private func apply(
        _ written: Written, of transaction: StoreTransaction, by author: ChangeAuthor, at head: (storeID: String, sequence: Int64),
        waitingAtMost wait: Duration, timeout: Duration, on connection: PostgresConnection
    ) throws(TabSyncError) -> Int64? {
        let keys = JSONText.array(transaction.scrubbedKeys.sorted().map { JSONText.string($0) })
        let rows = try connector.run(
            """
            SELECT \(unescaped: Schema.commitFunction)(\(store), \(head.storeID), \(head.sequence), \(Schema.lockKey(store: store)),
                \("\(max(1, wait.milliseconds))ms"), \(written.records)::json, \(written.upserts)::json, \(written.deletes)::json,
                \(written.cleared), \(keys)::json, \(author.origin), \(author.instance), \(Int64(historyLimit)))
            """, on: connection, timeout: timeout, doing: "committing")
        return try rows.first.flatMap { row throws(TabSyncError) in try decode(row, as: Int64?.self) }
    }

    /// The cached values moved on by `records` read from the store (other processes' commits),
    /// when they continue from the cached head: this process's next commit can then be made in
    /// one round trip (``commitInOneRoundTrip``) rather than after reading every value.
    private func advanceCache(storeID: String, from: Int64, by records: [ChangeRecord]) {
        cache.withLock { cached in
            guard var current = cached, current.storeID == storeID, current.sequence == from else { return }
            for record in records {
                if let key = record.key { current.values[key] = record.newValue } else { current.values.removeAll() }
            }
            current.sequence = from + Int64(records.count)
            cached = current
        }
    }

    private func remember(_ cached: Cached) {
        cache.withLock { current in
            if current == nil || current!.storeID != cached.storeID || current!.sequence <= cached.sequence { current = cached }
        }
    }

    private var unexpectedShape: TabSyncError {
        TabSyncError(code: .corruptState, path: location, message: "A row of the TabSync tables has an unexpected shape")
    }

    private func decode<each Column: PostgresDecodable>(
        _ row: PostgresRow, as type: (repeat each Column).Type
    ) throws(TabSyncError) -> (repeat each Column) {
        do {
            return try row.decode(type)
        } catch {
            throw TabSyncError(code: .corruptState, path: location, message: "A row of the TabSync tables has an unexpected shape")
        }
    }

    // MARK: Watching and locks

    public func watch(_ handler: @escaping @Sendable (BackendSignal) -> Void) -> any WatchRegistration {
        listener.add(handler)
    }

    public func lock(named name: String) throws(TabSyncError) -> any SessionLock {
        guard !name.isEmpty, name.utf8.count <= 64, name.unicodeScalars.allSatisfy({ $0.properties.generalCategory != .control }) else {
            throw TabSyncError(code: .invalidArgument, path: nil, message: "A lock name must be 1 to 64 bytes without control characters")
        }
        if !registeredLocks.withLock({ $0.contains(name) }) {
            _ = try pool.with { connection throws(TabSyncError) in
                try connector.run(
                    "INSERT INTO tabsync_locks (store, name) VALUES (\(store), \(name)) ON CONFLICT DO NOTHING",
                    on: connection, doing: "registering the lock \(name)")
            }
            registeredLocks.withLock { _ = $0.insert(name) }
        }
        return PostgresLock(backend: self, name: name, key: Schema.lockKey(store: store, name: name))
    }

    /// The commit lock first, then the store's named locks, by name.
    public func queryLocks() -> [LockReport] {
        var reports: [LockReport] = []
        if let commit = try? lockReport(name: store, key: Schema.lockKey(store: store)) { reports.append(commit) }
        let names: [String] = (try? pool.with { connection throws(TabSyncError) in
            try connector.run(
                "SELECT name FROM tabsync_locks WHERE store = \(store) ORDER BY name", on: connection, doing: "listing the locks")
                .compactMap { try? $0.decode(String.self) }
        }) ?? []
        for name in names {
            if let report = try? lockReport(name: name, key: Schema.lockKey(store: store, name: name)) { reports.append(report) }
        }
        return reports
    }

    func lockReport(name: String, key: Int64) throws(TabSyncError) -> LockReport {
        try pool.with { connection throws(TabSyncError) in
            let rows = try connector.run(Schema.lockHoldersQuery(key: key), on: connection, doing: "reading pg_locks")
            var holders: [LockHolder] = [], waiters: [LockHolder] = []
            for row in rows {
                let (granted, serverPID, application, address, since) = try decode(row, as: (Bool, Int32, String, String?, Double?).self)
                let holder = Holder.lockHolder(
                    applicationName: application, serverPID: serverPID, clientAddress: address,
                    since: since.map { Date(timeIntervalSince1970: $0) })
                if granted { holders.append(holder) } else { waiters.append(holder) }
            }
            return LockReport(name: name, path: location, holders: holders, waiters: waiters)
        }
    }
}
