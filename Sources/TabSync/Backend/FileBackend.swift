import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// How hard a commit works to survive a power loss. Any setting survives a killed process:
/// a commit is a rename, which is atomic.
public enum Durability: String, Sendable, Hashable, CaseIterable {
    /// No fsync. A power loss may lose recent commits, or leave an empty file that
    /// recovery then replaces with the previous generation.
    case none
    /// fsync of the new file before the rename (the default). A power loss may lose the last
    /// rename, never the contents.
    case file
    /// fsync of the file and then of the directory: a commit that returned survives a power loss.
    case full
}

/// The files of one storage `NAME` in a session directory (docs/FORMAT.md):
///
/// | file | role |
/// | --- | --- |
/// | `NAME.state` | the committed state, replaced by rename |
/// | `NAME.state.prev` | the previous generation, a hard link kept for recovery |
/// | `NAME.state.tmp` | the next generation while it is written |
/// | `NAME.lock` | the storage's commit lock (`flock`), never renamed |
/// | the directory | the directory's commit lock (`flock` on the directory itself) |
/// | `NAME.state.corrupt-TIME` | a corrupt state file moved aside by recovery |
///
/// ### Recovery
/// When the state file is corrupt (garbage, truncated, wrong checksum), the next reader or
/// writer, under the commit lock, moves it aside as `NAME.state.corrupt-TIME` and writes the
/// newest valid state it can prove: the previous generation or the last state this process
/// read, whichever is newer, with a new store identifier so that every reader resynchronises.
/// The recovered state records what happened (``StateDocument/recovery``), and every reader
/// reports it. A state file of a newer
/// format version, or larger than the limit, is refused and left alone.
public final class FileBackend: StorageBackend {
    public let directory: SessionDirectory
    public let name: String
    public let durability: Durability
    public let maximumStateBytes: Int
    public let journalLimits: JournalLimits
    let pollInterval: Duration

    let stateName: String
    let previousName: String
    let temporaryName: String
    /// `NAME.lock`: taken first, for peers that lock only it (earlier versions, docs/FORMAT.md's
    /// older text); it names the committer in reports.
    private let commitLock: FileLock
    /// The directory itself, taken second: what actually excludes other committers, because a
    /// file cleaner can delete `NAME.lock` under its holder but cannot replace the directory.
    private let directoryLock: FileLock

    private struct FileIdentity: Equatable {
        var device: UInt64, inode: UInt64, size: Int64, changeTime: timespec, modifyTime: timespec

        init(_ info: stat) {
            device = UInt64(info.st_dev)
            inode = UInt64(info.st_ino)
            size = Int64(info.st_size)
            changeTime = info.st_ctim
            modifyTime = info.st_mtim
        }

        static func == (a: Self, b: Self) -> Bool {
            a.device == b.device && a.inode == b.inode && a.size == b.size
                && a.changeTime.tv_sec == b.changeTime.tv_sec && a.changeTime.tv_nsec == b.changeTime.tv_nsec
                && a.modifyTime.tv_sec == b.modifyTime.tv_sec && a.modifyTime.tv_nsec == b.modifyTime.tv_nsec
        }
    }

    private struct Cache {
        var identity: FileIdentity?
        /// The header line of the cached file. Inode numbers are reused and file times are
        /// coarse (a clock tick), so a new file can have the identity of one seen before; the
        /// header (sequence, length, checksum of the body) tells them apart.
        var header: ArraySlice<UInt8> = []
        var document: StateDocument?
        /// The newest valid document this process has seen, kept for recovery.
        var lastGood: StateDocument?
        /// The journal entries of the last file read or written, with their bytes: the next
        /// encode or decode does no work for the entries that did not change.
        var memo = StateBody.Memo()
    }

    private let cache = Mutex(Cache())
    /// Serialises commits of this instance; the flock serialises processes and instances.
    private let commitGate = CommitGate()
    /// The thread inside `commit`, to refuse a commit from inside a commit instead of deadlocking.
    private let committingThread = Atomic<UInt>(0)
    let lockTimeout: Duration

    /// Opens the storage `name` in `directory`, creating its state file when missing.
    public init(
        directory: SessionDirectory, name: String, durability: Durability = .file,
        maximumStateBytes: Int = 16 << 20, journalLimits: JournalLimits = JournalLimits(),
        pollInterval: Duration = .milliseconds(250), lockTimeout: Duration = .seconds(10)
    ) throws(TabSyncError) {
        self.lockTimeout = lockTimeout
        try Self.validate(name: name, what: "storage name")
        self.directory = directory
        self.name = name
        self.durability = durability
        self.maximumStateBytes = maximumStateBytes
        self.journalLimits = journalLimits
        self.pollInterval = pollInterval
        self.stateName = name + ".state"
        self.previousName = name + ".state.prev"
        self.temporaryName = name + ".state.tmp"
        self.commitLock = try FileLock(directory: directory, name: name)
        self.directoryLock = FileLock(directoryOf: directory, name: name)
        if try directory.inspect(stateName) == nil {
            // Creates the file (and its store identifier) so that every reader starts from one store.
            try commitDocument { _ in }
        }
    }

    public var location: String { directory.path(of: stateName) }

    static func validate(name: String, what: String) throws(TabSyncError) {
        let allowed = name.utf8.allSatisfy { byte in
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte)
                || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) || byte == UInt8(ascii: "-") || byte == UInt8(ascii: "_") || byte == UInt8(ascii: ".")
        }
        guard allowed, !name.isEmpty, !name.hasPrefix("."), name.utf8.count <= 64 else {
            throw TabSyncError(code: .invalidArgument, path: nil, message: "The \(what) '\(name)' must be 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'")
        }
    }

    // MARK: Reading

    /// A missing state file is read again under the commit lock: a recovery in progress holds
    /// it while the file is briefly missing, so only a file still missing then was deleted.
    public func load() throws(TabSyncError) -> StateDocument {
        do {
            let document = try read().document
            if document.storeID.isEmpty { return try readAgainAfterRecovery() }
            return document
        } catch where error.code == .corruptState {
            return try commitDocument { document in document }
        }
    }

    /// The state read again once `NAME.lock` is free, for a state file found missing: a recovery
    /// holds that lock while the file is briefly missing. The lock file is not created (a
    /// directory being deleted must not get files back); without one, the store is gone.
    private func readAgainAfterRecovery() throws(TabSyncError) -> StateDocument {
        // Inside this instance's own commit (a read from its closure) the lock is this thread's.
        if committingThread.load(ordering: .acquiring) == Self.currentThread { return StateDocument(storeID: "") }
        guard let hold = try commitLock.acquireIfExists(timeout: lockTimeout) else { return StateDocument(storeID: "") }
        defer { hold.release() }
        return try read().document
    }

    /// Reads the state; nil when it is corrupt and needs a recovery, or missing and needs a look
    /// under the commit lock.
    func loadWithoutRecovery() throws(TabSyncError) -> StateDocument? {
        do {
            let document = try read().document
            return document.storeID.isEmpty ? nil : document
        } catch where error.code == .corruptState {
            return nil
        }
    }

    /// Reads the state file; an unchanged file (same inode, size and times) is not read again.
    /// A missing file reads as an empty state with no store identifier. Also returns the file's
    /// header line (empty for a missing file), which tells the file apart from others.
    private func read() throws(TabSyncError) -> (document: StateDocument, header: ArraySlice<UInt8>) {
        let path = location
        // A directory moved, replaced or opened up is not read from (nor then written to).
        try directory.verify()
        guard let fd = try directory.openExisting(stateName, flags: O_RDONLY) else {
            return (StateDocument(storeID: ""), [])
        }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw TabSyncError.system("fstat", .current, path: path) }
        let identity = FileIdentity(info)
        let hit = cache.withLock { cache -> (StateDocument, ArraySlice<UInt8>)? in
            guard cache.identity == identity, let document = cache.document else { return nil }
            return (document, cache.header)
        }
        if let (cached, header) = hit {
            let start = try readAll(fd, count: min(header.count, Int(info.st_size)), path: path)
            if start.elementsEqual(header) { return (cached, header) }
        }
        guard Int(info.st_size) <= maximumStateBytes else {
            throw TabSyncError(
                code: .stateTooLarge, path: path,
                message: "The state file has \(info.st_size) bytes, more than the limit of \(maximumStateBytes)")
        }
        let bytes = try readAll(fd, count: Int(info.st_size), path: path)
        var memo = cache.withLock { $0.memo }
        let document = try StateFileCodec.decode(bytes, path: path, memo: &memo)
        let header = StateFileCodec.headerLine(bytes)
        cache.withLock { [memo] cache in
            cache.memo = memo
            cache.identity = identity
            cache.document = document
            cache.header = header
            if document.storeID != cache.lastGood?.storeID || document.sequence >= cache.lastGood?.sequence ?? 0 {
                cache.lastGood = document
            }
        }
        return (document, header)
    }

    private func readAll(_ fd: Int32, count: Int, path: String) throws(TabSyncError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let got = try retrying("read", path: path) {
                bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, count - done, off_t(done)) }
            }
            if got == 0 { break }
            done += got
        }
        // A file that shrank under us; no copy in the usual case.
        bytes.removeLast(count - done)
        return bytes
    }

    // MARK: Committing

    /// Runs `body` on the state document under the commit locks and writes what it changed.
    func commitDocument<Result>(_ body: (inout StateDocument) throws(TabSyncError) -> Result) throws(TabSyncError) -> Result {
        try locked { () throws(TabSyncError) in try commitLocked(body) }
    }

    /// The commit's read-modify-write, with the locks held.
    private func commitLocked<Result>(_ body: (inout StateDocument) throws(TabSyncError) -> Result) throws(TabSyncError) -> Result {
        var (document, source, mustWrite) = try readLocked()
        if document.sequence > StateDocument.maximumSequence - (1 << 24) {
            // Sequence numbers run out (only a planted file gets this far): go on in a new
            // store with the same values, which readers resynchronise to.
            document = StateDocument(values: document.values)
            (source, mustWrite) = ([], true)
        }
        let before = (document.storeID, document.sequence)
        let result = try body(&document)
        if mustWrite || document.scrubbed || before != (document.storeID, document.sequence) {
            try write(document, derivedFrom: source)
        }
        return result
    }

    /// Runs `body` holding this instance's gate and both commit locks (`NAME.lock`, then the
    /// directory), in a directory checked to be still in place and private.
    private func locked<Result>(_ body: () throws(TabSyncError) -> Result) throws(TabSyncError) -> Result {
        let thread = Self.currentThread
        if committingThread.load(ordering: .acquiring) == thread {
            throw TabSyncError(
                code: .invalidArgument, path: location,
                message: "A change was made from inside update or transaction on the same storage; make it inside the closure (Transaction.set) instead")
        }
        if Self.directoryCommitter.withLock({ $0[ChangeWatcher.DirectoryKey(directory)] }) == thread {
            throw TabSyncError(
                code: .invalidArgument, path: location,
                message: "A change was made from inside update or transaction on another storage of the same session directory; a commit holds the directory's lock, so make the changes one after the other")
        }
        let started = ContinuousClock.now
        guard commitGate.enter(before: started + lockTimeout) else { throw commitLock.timedOut(after: ContinuousClock.now - started) }
        defer { commitGate.leave() }
        // One bound for the three waits together.
        let hold = try commitLock.acquireBlocking(timeout: lockTimeout - (ContinuousClock.now - started))
        defer { hold.release() }
        let directoryHold = try directoryLock.acquireBlocking(timeout: lockTimeout - (ContinuousClock.now - started))
        defer { directoryHold.release() }
        return try holdingLocks(body)
    }

    /// `body`, marked as the commit in progress on this thread (see ``locked(_:)``).
    private func holdingLocks<Result>(_ body: () throws(TabSyncError) -> Result) throws(TabSyncError) -> Result {
        let thread = Self.currentThread, key = ChangeWatcher.DirectoryKey(directory)
        committingThread.store(thread, ordering: .releasing)
        Self.directoryCommitter.withLock { $0[key] = thread }
        defer {
            committingThread.store(0, ordering: .releasing)
            Self.directoryCommitter.withLock { _ = $0.removeValue(forKey: key) }
        }
        return try body()
    }

    /// The thread inside a commit in each directory (by device and inode) in this process: a
    /// commit of another storage of that directory from inside it would wait for the directory
    /// lock its own thread holds, until the lock timeout; it is refused at once instead.
    private static let directoryCommitter = Mutex<[ChangeWatcher.DirectoryKey: UInt]>([:])

    private static var currentThread: UInt { UInt(bitPattern: Int(bitPattern: UInt(pthread_self()))) }

    /// The async commit: its turn among this instance's commits and its waits for the two locks
    /// suspend the task (cancellable, bounded by the lock timeout together); the read, `body`,
    /// the write and the fsync then run on `BlockingPool`, never on a Swift concurrency thread.
    func commitDocument<Result: Sendable>(
        _ body: @escaping @Sendable (inout StateDocument) throws(TabSyncError) -> Result
    ) async throws -> Result {
        let started = ContinuousClock.now
        switch await commitGate.enter(before: started + lockTimeout) {
        case .entered: break
        case .timedOut: throw commitLock.timedOut(after: ContinuousClock.now - started)
        case .cancelled: throw CancellationError()
        }
        defer { commitGate.leave() }
        let hold = try await commitLock.acquireWaking(timeout: lockTimeout - (ContinuousClock.now - started))
        defer { hold.release() }
        let directoryHold = try await directoryLock.acquireWaking(timeout: lockTimeout - (ContinuousClock.now - started))
        defer { directoryHold.release() }
        return try await BlockingPool.shared.run { () throws(TabSyncError) -> Result in
            try self.holdingLocks { () throws(TabSyncError) -> Result in try self.commitLocked(body) }
        }
    }

    /// Reads the state under the commit lock, recovering a corrupt one. Returns the document,
    /// the header line of the file it was read from (empty for a new one), and whether it must
    /// be written even if unchanged.
    private func readLocked() throws(TabSyncError) -> (StateDocument, ArraySlice<UInt8>, Bool) {
        do {
            let (document, header) = try read()
            if document.storeID.isEmpty {
                // None yet, or deleted: a new store, numbered on from the last one this process
                // saw, so that readers' sequence numbers do not go back.
                var fresh = StateDocument()
                fresh.sequence = cache.withLock { $0.lastGood?.sequence } ?? 0
                return (fresh, [], true)
            }
            return (document, header, false)
        } catch where error.code == .corruptState {
            return (try recover(from: error), [], true)
        }
    }

    private func recover(from problem: TabSyncError) throws(TabSyncError) -> StateDocument {
        var candidates: [(StateDocument, String)] = []
        if let fd = try? directory.openExisting(previousName, flags: O_RDONLY) {
            defer { close(fd) }
            var info = stat()
            if fstat(fd, &info) == 0, Int(info.st_size) <= maximumStateBytes,
               let bytes = try? readAll(fd, count: Int(info.st_size), path: directory.path(of: previousName)),
               let document = try? StateFileCodec.decode(bytes, path: directory.path(of: previousName)) {
                candidates.append((document, "the previous generation"))
            }
        }
        if let remembered = cache.withLock({ $0.lastGood }) {
            candidates.append((remembered, "the last state this process read"))
        }
        let best = candidates.max { $0.0.sequence < $1.0.sequence }
        let asideName = "\(stateName).corrupt-\(Int64(Date().timeIntervalSince1970 * 1000))"
        if renameat(directory.descriptor, stateName, directory.descriptor, asideName) != 0 {
            throw TabSyncError.system("renameat", .current, path: location)
        }
        var recovered = best?.0 ?? StateDocument()
        recovered.storeID = StateDocument.newStoreID()
        // A new store, so readers resynchronise whatever the number; it goes on counting unless
        // it came from a file with a sequence number too large to count on from.
        recovered.sequence = recovered.sequence < StateDocument.maximumSequence ? recovered.sequence + 1 : 1
        recovered.journal = []
        let source = best?.1 ?? "nothing (no valid earlier state; starting empty)"
        recovered.recovery = "\(problem.message); moved it aside as \(asideName) and recovered from \(source)"
        return recovered
    }

    /// Writes `document`, which was read from the file whose header line is `source`.
    private func write(_ document: StateDocument, derivedFrom source: ArraySlice<UInt8>) throws(TabSyncError) {
        // The memo helps only if it describes the file the document was read from (another
        // thread may have read another file since); it is kept only once the new file is in
        // place: after a failed write it would describe entries that were never committed.
        var memo = cache.withLock { $0.memo }
        if !memo.header.elementsEqual(source) { memo = StateBody.Memo() }
        let bytes = StateFileCodec.encode(document, memo: &memo)
        let temporaryPath = directory.path(of: temporaryName)
        guard bytes.count <= maximumStateBytes else {
            throw TabSyncError(
                code: .stateTooLarge, path: location,
                message: "The new state would have \(bytes.count) bytes, more than the limit of \(maximumStateBytes)")
        }
        // A writer killed mid-commit may have left a temporary file; it never became the state.
        _ = unlinkat(directory.descriptor, temporaryName, 0)
        let fd = try directory.openFile(temporaryName, flags: O_WRONLY | O_EXCL | O_TRUNC, create: true)
        do throws(TabSyncError) {
            var done = 0
            while done < bytes.count {
                done += try retrying("write", path: temporaryPath) {
                    bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + done, bytes.count - done) }
                }
            }
            if durability != .none, fsync(fd) != 0 {
                throw TabSyncError.system("fsync", .current, path: temporaryPath)
            }
        } catch {
            close(fd)
            _ = unlinkat(directory.descriptor, temporaryName, 0)
            throw error
        }
        // Closed before the rename, so that readers, who watch the state file's name, get one
        // event per commit (the rename's IN_MOVED_TO), not a second one for the close.
        var temporary = stat()
        let known = fstat(fd, &temporary) == 0
        close(fd)
        // Keep the generation being replaced, for recovery (unless its history was scrubbed).
        _ = unlinkat(directory.descriptor, previousName, 0)
        if !document.scrubbed {
            _ = linkat(directory.descriptor, stateName, directory.descriptor, previousName, 0)
        }
        guard renameat(directory.descriptor, temporaryName, directory.descriptor, stateName) == 0 else {
            let errno = Errno.current
            _ = unlinkat(directory.descriptor, temporaryName, 0)
            throw TabSyncError.system("renameat", errno, path: location)
        }
        // The identity of the file just renamed into place (the rename changed its ctime), so
        // that the next commit and this process's own change notification find the document
        // in the cache instead of decoding what was just encoded. Read by name, which is safe
        // under the commit lock (nobody else renames), and checked to be the file written.
        var info = stat()
        let identity = known && fstatat(directory.descriptor, stateName, &info, AT_SYMLINK_NOFOLLOW) == 0
            && info.st_ino == temporary.st_ino && info.st_dev == temporary.st_dev ? FileIdentity(info) : nil
        var written = document
        written.scrubbed = false  // not stored: a decoded document never has it
        cache.withLock { [memo] cache in
            cache.identity = identity
            cache.document = identity == nil ? nil : written
            cache.header = StateFileCodec.headerLine(bytes)
            cache.lastGood = written
            cache.memo = memo
        }
        if durability == .full, fsync(directory.descriptor) != 0 {
            throw TabSyncError.system("fsync", .current, path: directory.path)
        }
    }

    // MARK: The backend protocol

    public func snapshot() throws(TabSyncError) -> StoreSnapshot {
        let document = try load()
        return StoreSnapshot(
            values: document.values, position: StorePosition(store: document.storeID, sequence: document.sequence),
            recovery: document.recovery)
    }

    public func changes(after position: StorePosition, waiting: Bool) throws(TabSyncError) -> StoreChanges? {
        let document: StateDocument
        if waiting {
            document = try load()
        } else {
            guard let loaded = try loadWithoutRecovery() else { return nil }
            document = loaded
        }
        return Self.changes(after: position, in: document)
    }

    /// The records of `document`'s journal after `position`, or a resync when it does not
    /// reach back that far or is another store.
    static func changes(after position: StorePosition, in document: StateDocument) -> StoreChanges {
        guard !document.storeID.isEmpty else { return .missing }
        // A reader that started before any store existed replays the first store's journal.
        if position.store == document.storeID || position.store.isEmpty {
            if document.sequence <= position.sequence { return .records([], store: document.storeID) }
            if let entries = document.entries(after: position.sequence) { return .records(Array(entries), store: document.storeID) }
        }
        var origins: [String: String] = [:]
        for entry in document.journal { if let key = entry.key { origins[key] = entry.origin } }
        let snapshot = StoreSnapshot(
            values: document.values, position: StorePosition(store: document.storeID, sequence: document.sequence),
            recovery: document.recovery)
        return .resync(snapshot, origins: origins)
    }

    public func commit<Result>(
        as author: ChangeAuthor, _ body: (inout StoreTransaction) throws(TabSyncError) -> Result
    ) throws(TabSyncError) -> Result {
        let limits = journalLimits
        return try commitDocument { document throws(TabSyncError) in
            try Self.run(body, on: &document, as: author, limits: limits)
        }
    }

    public func commit<Result: Sendable>(
        as author: ChangeAuthor, _ body: @escaping @Sendable (inout StoreTransaction) throws(TabSyncError) -> Result
    ) async throws -> Result {
        let limits = journalLimits
        return try await commitDocument { document throws(TabSyncError) in
            try Self.run(body, on: &document, as: author, limits: limits)
        }
    }

    /// Runs a transaction on `document` and records its changes in the journal.
    private static func run<Result>(
        _ body: (inout StoreTransaction) throws(TabSyncError) -> Result, on document: inout StateDocument,
        as author: ChangeAuthor, limits: JournalLimits
    ) throws(TabSyncError) -> Result {
        var transaction = StoreTransaction(values: document.values, sequence: document.sequence, author: author)
        let result = try body(&transaction)
        for record in transaction.records {
            document.record(key: record.key, newValue: record.newValue, origin: record.origin, instance: record.instance, limits: limits)
        }
        for key in transaction.scrubbedKeys.sorted() { document.scrubHistory(of: key) }
        return result
    }

    // MARK: Watching and locks

    public func watch(_ handler: @escaping @Sendable (BackendSignal) -> Void) -> any WatchRegistration {
        let (id, detection) = ChangeWatcher.shared.register(
            directory: directory, names: [stateName], events: ChangeWatcher.replacementEvents, pollInterval: pollInterval
        ) { signal in
            switch signal {
            case .changed: handler(.mayHaveChanged)
            case let .fellBackToPolling(detection): handler(.detectionChanged(detection))
            }
        }
        return FileWatchRegistration(id: id, detection: detection)
    }

    public func lock(named name: String) throws(TabSyncError) -> any SessionLock {
        try FileLock(directory: directory, name: "\(self.name).\(name)")
    }

    /// The commit lock first, then this storage's named locks (`NAME.*.lock`), by name.
    public func queryLocks() -> [LockReport] {
        var reports = [commitLock.query()]
        let prefix = name + ".", suffix = ".lock"
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? [])
            .filter { $0.hasPrefix(prefix) && $0.hasSuffix(suffix) && $0.count > prefix.count + suffix.count }.sorted()
        for file in names {
            if let lock = try? FileLock(directory: directory, name: String(file.dropLast(suffix.count))) {
                var report = lock.query()
                report.name = String(file.dropFirst(prefix.count).dropLast(suffix.count))
                reports.append(report)
            }
        }
        return reports
    }

}

private final class FileWatchRegistration: WatchRegistration {
    let id: UInt64
    let detection: ChangeDetection
    private let cancelled = Atomic<Bool>(false)

    init(id: UInt64, detection: ChangeDetection) {
        self.id = id
        self.detection = detection
    }

    func cancel() {
        if !cancelled.exchange(true, ordering: .relaxed) {
            ChangeWatcher.shared.unregister(id)
        }
    }

    deinit { cancel() }
}
