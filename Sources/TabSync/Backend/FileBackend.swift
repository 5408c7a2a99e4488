import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// How hard a commit works to survive a power loss. Any setting survives a killed process: a
/// commit is one append of self-checking records, and a torn one is never read.
public enum Durability: String, Sendable, Hashable, CaseIterable {
    /// No sync. A power loss may lose recent commits (a torn tail is cut, never read).
    case none
    /// `fdatasync` of the log after each append, and `fsync` of the directory whenever a new
    /// generation is renamed into place (the default): a commit that returned survives a power loss.
    case file
    /// As `file`, with `fsync` instead of `fdatasync`: the log's metadata (its times) too.
    case full
}

/// The files of one storage `NAME` in a session directory (docs/FORMAT.md):
///
/// | file | role |
/// | --- | --- |
/// | `NAME.log` | the change log (format 2): appended to by each commit, replaced by rename when compacted |
/// | `.compacting/NAME.log.tmp` | the next generation while it is written (a folder of every storage of the directory, 0700) |
/// | `NAME.state` | a marker that TabSync 1 (format 1) refuses, instead of starting a store of its own |
/// | `NAME.lock` | the storage's commit lock (`flock`), never renamed |
/// | the directory | the directory's commit lock (`flock` on the directory itself) |
/// | `NAME.log.corrupt-TIME` | a damaged log moved aside by recovery (never one that holds secrets) |
///
/// ### Reading
/// Each instance keeps a view of the log: the values as of the last complete commit it read, and
/// where that commit ends. A read looks at the log's size (one `fstatat`) and reads only the bytes
/// after its view, up to the first record that is incomplete or does not check. A renamed-in
/// generation (a compaction, a recovery) is read from its start.
///
/// ### Recovery
/// Under the commit lock, a writer cuts a torn tail (bytes after the last complete commit that
/// hold no later valid record) before it appends. A log damaged before its end (a later record
/// still checks), or one whose header is unreadable, is replaced by a new generation with a new
/// store identifier holding the values of every record that can be read, and every reader reports
/// it (``StoreSnapshot/recovery``). A log of a newer format version, or larger than the limit, is
/// refused and left alone.
public final class FileBackend: StorageBackend {
    public let directory: SessionDirectory
    public let name: String
    public let durability: Durability
    public let maximumStateBytes: Int
    public let journalLimits: JournalLimits
    let pollInterval: Duration

    let logName: String
    let temporaryName: String
    /// The format 1 state file: upgraded from, then kept as a marker that format 1 refuses.
    let legacyName: String
    /// `NAME.lock`: taken first, for peers that lock only it; it names the committer in reports.
    private let commitLock: FileLock
    /// The directory itself, taken second: what actually excludes other committers, because a
    /// file cleaner can delete `NAME.lock` under its holder but cannot replace the directory.
    private let directoryLock: FileLock

    /// An open generation of the log.
    private final class Generation: Sendable {
        let descriptor: Int32
        let device: UInt64
        let inode: UInt64

        init(descriptor: Int32, info: stat) {
            self.descriptor = descriptor
            device = UInt64(info.st_dev)
            inode = UInt64(info.st_ino)
        }

        deinit { close(descriptor) }
    }

    private struct Reader {
        var generation: Generation?
        var view: LogView?
        /// The newest values this process has read, kept for recovery.
        var lastGood: (store: String, sequence: UInt64, values: [String: String], origins: [String: String])?
        /// The last generation read holds secrets (its header says so).
        var secret = false
    }

    private let reader = Mutex(Reader())
    /// Set by a signal about the directory itself (or anything: an overflow, a poll): the next
    /// read checks the directory first (``SessionDirectory/verify()``).
    private let verifyDirectory = Atomic<Bool>(true)
    /// Live watch registrations. With none, no signal tells of the directory (a storage that
    /// nobody observes watches nothing), so every read checks it.
    private let watches = Atomic<Int>(0)
    /// Serialises commits of this instance; the flock serialises processes and instances.
    private let commitGate = CommitGate()
    /// The thread inside `commit`, to refuse a commit from inside a commit instead of deadlocking.
    private let committingThread = Atomic<UInt>(0)
    let lockTimeout: Duration

    /// Opens the storage `name` in `directory`, creating its log when missing (or upgrading a
    /// format 1 state file to it).
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
        self.logName = name + ".log"
        self.temporaryName = name + ".log.tmp"
        self.legacyName = name + ".state"
        self.commitLock = try FileLock(directory: directory, name: name)
        self.directoryLock = FileLock(directoryOf: directory, name: name)
        if try directory.inspect(logName) == nil {
            // Creates the log (and its store identifier) so that every reader starts from one store.
            try commitView { _ in }
        } else {
            // Checked (and created) at once: found refused only at a compaction, it would fail
            // a commit that scrubs, such as a session's new token after the old one was presented.
            close(try directory.openCompactionFolder())
        }
    }

    public var location: String { directory.path(of: logName) }

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

    /// What a look at the log found.
    private enum Look {
        /// The view is up to date with the log's complete commits.
        case current
        /// There is no log.
        case missing
        /// The log needs the commit lock's holder: a tail to cut, or damage to recover from.
        case needsRepair(Damage)
    }

    private enum Damage {
        /// Bytes after the last complete commit that are no record (a torn append), or an
        /// incomplete commit, at `offset`: cut by the next writer.
        case tornTail(offset: Int)
        /// A record that does not check, with a valid one after it: the log is damaged.
        case damaged(String)
        /// The header is unreadable: not a log of ours (garbage, truncated, foreign).
        case unreadable(String)
    }

    /// Brings the view up to date with the log. Without the lock, an incomplete commit is one
    /// being written and is left for later; with it (`locked`), there is no commit in progress,
    /// so anything after the last complete one is reported for repair.
    private func look(_ reader: inout Reader, locked: Bool) throws(TabSyncError) -> Look {
        // A directory moved, replaced or opened up is not written to, nor read from once a signal
        // about the directory itself came (a move, an overflow, a poll) or the log is missing or
        // new. A read for an append costs no check of the directory: the log's own checks (owner,
        // mode, no link) hold for what is read.
        if locked || watches.load(ordering: .acquiring) == 0 || verifyDirectory.exchange(false, ordering: .acquiringAndReleasing) {
            try directory.verify()
        }
        var info = stat()
        guard fstatat(directory.descriptor, logName, &info, AT_SYMLINK_NOFOLLOW) == 0 else {
            let errno = Errno.current
            if errno == .noSuchFileOrDirectory {
                try directory.verify()
                return .missing
            }
            throw TabSyncError.system("fstatat", errno, path: location)
        }
        try SessionDirectory.checkRegular(info, path: location)
        try checkSize(Int(info.st_size), of: "The log has")
        if let generation = reader.generation, var view = reader.view,
           generation.device == UInt64(info.st_dev), generation.inode == UInt64(info.st_ino) {
            let size = Int(info.st_size)
            if size == view.offset { return .current }
            if size < view.offset {
                // Only a writer cutting a torn tail shortens the log, and never below a complete commit.
                return .needsRepair(.damaged("the log is shorter (\(size) bytes) than its commits that were read (\(view.offset))"))
            }
            let bytes = try readAll(generation.descriptor, from: view.offset, count: size - view.offset)
            reader.view = nil  // the only reference while it changes: no copy of its records
            let (_, stop) = bytes.withUnsafeBytes { view.read($0, maximumLength: maximumStateBytes) }
            reader.view = view
            if let regression = regression(reader) { return .needsRepair(regression) }
            remember(&reader)
            if let damage = try damage(stop, in: generation, view: view, locked: locked) { return .needsRepair(damage) }
            return .current
        }
        // Another generation (or the first one this instance reads): read it whole.
        if !locked { try directory.verify() }
        guard let descriptor = try directory.openExisting(logName, flags: O_RDWR) else { return .missing }
        var opened = stat()
        guard fstat(descriptor, &opened) == 0 else {
            let errno = Errno.current
            close(descriptor)
            throw TabSyncError.system("fstat", errno, path: location)
        }
        let generation = Generation(descriptor: descriptor, info: opened)
        try checkSize(Int(opened.st_size), of: "The log has")
        let bytes = try readAll(descriptor, from: 0, count: Int(opened.st_size))
        let decoded: Result<LogFormat.Header, LogFormat.HeaderProblem> = bytes.withUnsafeBytes { LogFormat.decodeHeader($0) }
        let header: LogFormat.Header
        switch decoded {
        case let .success(found): header = found
        case .failure(.short): return .needsRepair(.unreadable(bytes.isEmpty ? "the log is empty" : "the log is shorter than its header (\(bytes.count) bytes)"))
        case let .failure(.foreign(problem)): return .needsRepair(.unreadable("the file is not a TabSync log: \(problem)"))
        case let .failure(.version(version)):
            throw TabSyncError(
                code: .unsupportedVersion, path: location,
                message: "The log has format version \(version); this TabSync reads version \(LogFormat.version) (written by a newer TabSync?)")
        }
        var view = LogView(header: header, retention: Self.memoryWindow)
        let (_, stop) = bytes.withUnsafeBytes { view.read(UnsafeRawBufferPointer(rebasing: $0[LogFormat.headerSize...]), maximumLength: maximumStateBytes) }
        guard view.hasSnapshot else {
            return .needsRepair(.unreadable("the log's first record is not a valid snapshot"))
        }
        // A reader that moves to another generation of the same store goes on from its position
        // (the new window reaches back); one of another store resynchronises.
        reader.generation = generation
        reader.view = view
        reader.secret = header.flags.contains(.secret)
        if let regression = regression(reader) { return .needsRepair(regression) }
        remember(&reader)
        if let damage = try damage(stop, in: generation, view: view, locked: locked) { return .needsRepair(damage) }
        return .current
    }

    /// A log never goes back in its store: one that does is a shorter or older copy put in place
    /// (truncated, restored from a backup), which a reader must not follow back.
    private func regression(_ reader: Reader) -> Damage? {
        guard let view = reader.view, let last = reader.lastGood, last.store == view.store, view.sequence < last.sequence else { return nil }
        return .damaged("it went back from sequence \(last.sequence) to \(view.sequence) of the same store")
    }

    /// What a stop means: nothing, a tail to cut or damage (with the lock), or, without it, a
    /// commit still being written (nothing) or something for the lock's holder to look at.
    private func damage(_ stop: LogView.Stop, in generation: Generation, view: LogView, locked: Bool) throws(TabSyncError) -> Damage? {
        switch stop {
        case .end:
            return nil
        case .incomplete:
            return locked ? .tornTail(offset: view.offset) : nil
        case let .invalid(offset, problem):
            guard locked else { return .tornTail(offset: offset) }
            var info = stat()
            guard fstat(generation.descriptor, &info) == 0 else { throw TabSyncError.system("fstat", .current, path: location) }
            let rest = try readAll(generation.descriptor, from: offset, count: Int(info.st_size) - offset)
            let later = rest.withUnsafeBytes { Self.nextRecord(in: $0, after: 0, salt: view.header.salt, maximumLength: maximumStateBytes) }
            return later == nil ? .tornTail(offset: offset) : .damaged("\(problem) at byte \(offset), and later records are valid")
        }
    }

    /// The offset of the first valid record after `offset`, looked for in at most 4 MiB.
    static func nextRecord(in bytes: UnsafeRawBufferPointer, after offset: Int, salt: [UInt8], maximumLength: Int) -> Int? {
        var candidate = offset + 1
        let limit = min(bytes.count, offset + (4 << 20))
        while candidate + LogFormat.frameSize + LogFormat.trailerSize <= limit {
            if case .record = LogFormat.record(in: bytes, at: candidate, salt: salt, maximumLength: maximumLength) { return candidate }
            candidate += 1
        }
        return nil
    }

    private func remember(_ reader: inout Reader) {
        guard let view = reader.view else { return }
        if view.store != reader.lastGood?.store || view.sequence >= reader.lastGood?.sequence ?? 0 {
            reader.lastGood = (view.store, view.sequence, view.values, view.origins)
        }
    }

    private func readAll(_ fd: Int32, from offset: Int, count: Int) throws(TabSyncError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: max(0, count))
        var done = 0
        while done < count {
            let got = try retrying("pread", path: location) {
                bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, count - done, off_t(offset + done)) }
            }
            if got == 0 { break }
            done += got
        }
        // A file that shrank under us; no copy in the usual case.
        bytes.removeLast(count - done)
        return bytes
    }

    /// What a read found, taken out of the view under its lock (so that no copy of the view
    /// outlives the lock, and the next append does not copy its records).
    private enum Seen {
        case missing
        case changes(StoreChanges)
        case snapshot(StoreSnapshot)
    }

    /// The view brought up to date, repairing the log under the commit lock if it must, and what
    /// `extract` takes from it: `waiting` false returns nil instead of waiting for a lock.
    private func current(waiting: Bool, _ extract: (Reader) -> Seen) throws(TabSyncError) -> Seen? {
        let looked: (Look, Seen)?
        if waiting {
            looked = try reader.withLock { reader throws(TabSyncError) in
                let look = try look(&reader, locked: false)
                return (look, extract(reader))
            }
        } else {
            // The watcher thread does not wait for a commit of this instance in progress either.
            let attempt: Result<(Look, Seen), TabSyncError>? = reader.withLockIfAvailable { reader in
                do throws(TabSyncError) {
                    let look = try look(&reader, locked: false)
                    return .success((look, extract(reader)))
                } catch {
                    return .failure(error)
                }
            }
            switch attempt {
            case nil: return nil
            case let .success(found): looked = found
            case let .failure(error): throw error
            }
        }
        guard let (found, seen) = looked else { return nil }
        switch found {
        case .missing: return .missing
        case .current: return seen
        case .needsRepair:
            guard waiting else { return nil }
            // Inside this instance's own commit, the lock is this thread's: what it sees is it.
            if committingThread.load(ordering: .acquiring) == Self.currentThread { return seen }
            try commitView { _ in }
            return try reader.withLock { reader throws(TabSyncError) in
                guard case .current = try look(&reader, locked: false) else { return nil }
                return extract(reader)
            }
        }
    }

    /// The latest state as a format 1 document (values, sequence, store, the recent records as
    /// its journal), for tools.
    public func load() throws(TabSyncError) -> StateDocument {
        let snapshot = try snapshot()
        let journal = reader.withLock { reader in reader.view.map { Array($0.window.suffix(512)) } ?? [] }
        var document = StateDocument(storeID: snapshot.position.store, sequence: snapshot.position.sequence, values: snapshot.values, journal: journal)
        document.recovery = snapshot.recovery
        return document
    }

    // MARK: Committing

    /// Runs `body` on the values under the commit locks, and appends what it changed.
    func commitView<Result>(_ body: (inout StoreTransaction) throws(TabSyncError) -> Result) throws(TabSyncError) -> Result {
        try locked { () throws(TabSyncError) in try commitLocked(author: ChangeAuthor(origin: "", instance: ""), body) }
    }

    /// The commit's read-modify-write, with the locks held: repairs the log if it must, runs
    /// `body`, appends its records with one write, and compacts when the log has grown past
    /// its bound (or a key's history is to be scrubbed).
    private func commitLocked<Result>(
        author: ChangeAuthor, _ body: (inout StoreTransaction) throws(TabSyncError) -> Result
    ) throws(TabSyncError) -> Result {
        var values: [String: String] = [:], sequence: UInt64 = 0
        var pending: [UInt8]?
        try reader.withLock { reader throws(TabSyncError) in
            pending = try prepareLocked(&reader)
            let view = pending.map { Self.view(of: $0, retention: Self.memoryWindow) } ?? reader.view!
            values = view.values
            sequence = view.sequence
        }
        var transaction = StoreTransaction(values: values, sequence: sequence, author: author)
        let result = try body(&transaction)
        if transaction.records.isEmpty && transaction.scrubbedKeys.isEmpty && pending == nil { return result }
        if pending == nil, transaction.scrubbedKeys.isEmpty {
            try append(transaction.records)
        } else {
            try reader.withLock { reader throws(TabSyncError) in try writeGeneration(transaction, to: &reader, pending: pending) }
        }
        return result
    }

    /// The view of a generation this process encoded.
    static func view(of bytes: [UInt8], retention: Int) -> LogView {
        guard let view = LogView(generation: bytes, retention: retention, maximumLength: Int.max) else {
            preconditionFailure("a generation this process encoded has no valid header")
        }
        return view
    }

    /// Under the commit lock: the view brought up to date, and the log cut as needed. Returns the
    /// new generation that the commit must write instead of appending (the log is missing, to
    /// be created or upgraded; damaged, to be recovered; out of sequence numbers), written
    /// together with the commit's records so that readers see one change.
    private func prepareLocked(_ reader: inout Reader) throws(TabSyncError) -> [UInt8]? {
        switch try look(&reader, locked: true) {
        case .current:
            if let view = reader.view, view.sequence > StateDocument.maximumSequence - (1 << 24) {
                // Sequence numbers run out (only a planted file gets this far): go on in a new
                // store with the same values, which readers resynchronise to.
                return LogView.fresh(
                    salt: Self.salt(), flags: reader.secret ? .secret : [], store: StateDocument.newStoreID(), sequence: 0,
                    values: view.values, origins: view.origins)
            }
            return nil
        case .missing:
            // (The marker that format 1 refuses is written once the generation is in place.)
            // None yet, or deleted: a new store, numbered on from the last one this process saw,
            // so that readers' sequence numbers do not go back.
            return try upgradeLegacy() ?? LogView.fresh(
                salt: Self.salt(), flags: reader.secret ? .secret : [], store: StateDocument.newStoreID(),
                sequence: reader.lastGood?.sequence ?? 0, values: [:])
        case let .needsRepair(.tornTail(offset)):
            let generation = reader.generation!
            guard ftruncate(generation.descriptor, off_t(offset)) == 0 else { throw TabSyncError.system("ftruncate", .current, path: location) }
            return nil
        case let .needsRepair(.damaged(problem)):
            return try recover(&reader, problem: "The log is damaged: \(problem)", salvage: true)
        case let .needsRepair(.unreadable(problem)):
            return try recover(&reader, problem: "The log is unreadable: \(problem)", salvage: false)
        }
    }

    /// A new generation after damage: the values of every record that still checks (`salvage`)
    /// or the newest this process read, in a new store, so that every reader resynchronises. A
    /// log that holds secrets is deleted; any other is moved aside as `NAME.log.corrupt-TIME`.
    private func recover(_ reader: inout Reader, problem: String, salvage: Bool) throws(TabSyncError) -> [UInt8] {
        var values = reader.lastGood?.values ?? [:]
        var origins = reader.lastGood?.origins ?? [:]
        var sequence = reader.lastGood?.sequence ?? 0
        var source = reader.lastGood == nil ? "nothing (no valid earlier state; starting empty)" : "the last state this process read"
        // The damaged log's readable records, when they go further than what this process read.
        if salvage, let generation = reader.generation, let view = reader.view {
            var info = stat()
            if fstat(generation.descriptor, &info) == 0 {
                let bytes = try readAll(generation.descriptor, from: 0, count: Int(info.st_size))
                let salvaged = bytes.withUnsafeBytes { Self.salvage($0, view: view, maximumLength: maximumStateBytes) }
                if reader.lastGood == nil || salvaged.2 > sequence {
                    (values, origins, sequence) = salvaged
                    source = "every record that could still be read"
                }
            }
        }
        let secret = reader.secret
        let stamp = Int64(Date().timeIntervalSince1970 * 1000)
        let asideName = "\(logName).corrupt-\(stamp)"
        let fate: String
        if secret {
            fate = "deleted it (it holds values whose history must not survive)"
        } else if reader.lastGood == nil, !salvage {
            // Unreadable, and never read before by this process: whether it holds secrets
            // cannot be told, so it is not kept.
            fate = "deleted it (whether it held secrets could not be told)"
        } else {
            if linkat(directory.descriptor, logName, directory.descriptor, asideName, 0) != 0 {
                throw TabSyncError.system("linkat", .current, path: directory.path(of: asideName))
            }
            fate = "moved it aside as \(asideName)"
        }
        let recovery = "\(problem); \(fate) and recovered from \(source)"
        return LogView.fresh(
            salt: Self.salt(), flags: secret ? .secret : [], store: StateDocument.newStoreID(),
            sequence: sequence < StateDocument.maximumSequence ? sequence + 1 : 1, values: values, origins: origins, recovery: recovery)
    }

    /// The values of every record of a damaged log that checks: the view's (its complete commits
    /// before the damage), then those of each later valid record, which set keys absolutely.
    static func salvage(_ bytes: UnsafeRawBufferPointer, view: LogView, maximumLength: Int) -> ([String: String], [String: String], UInt64) {
        var values = view.values, origins = view.origins, sequence = view.sequence
        var offset = view.offset
        while let next = nextRecord(in: bytes, after: offset, salt: view.header.salt, maximumLength: maximumLength) {
            guard case let .record(record, end) = LogFormat.record(in: bytes, at: next, salt: view.header.salt, maximumLength: maximumLength) else { break }
            if case let .change(change) = record.body {
                if let key = change.key {
                    values[key] = change.value
                    origins[key] = change.value == nil ? nil : change.origin
                } else {
                    values.removeAll()
                    origins.removeAll()
                }
                sequence = max(sequence, record.sequence)
            }
            offset = end - 1
        }
        return (values, origins, sequence)
    }

    /// Writes the transaction's records with the `pending` generation, or (a scrub) a new
    /// generation with no history: a rename, not an append, so that it fails or succeeds whole.
    private func writeGeneration(_ transaction: StoreTransaction, to reader: inout Reader, pending: [UInt8]?) throws(TabSyncError) {
        if let pending {
            var bytes = pending
            LogFormat.append(commit: transaction.records, salt: Array(pending[20..<36]), to: &bytes)
            if transaction.scrubbedKeys.isEmpty {
                try replace(&reader, with: bytes)
            } else {
                let view = Self.view(of: bytes, retention: Self.memoryWindow)
                try replace(&reader, with: view.compacted(salt: Self.salt(), flags: .secret, retained: 0))
            }
            // A format 1 state file (now upgraded) or none: the marker goes in its place.
            if try !hasLegacyMarker() { try writeLegacyMarker() }
            return
        }
        // No earlier value of a scrubbed key may survive. The commit's records are applied to a
        // copy of the view: the view itself changes only once the new generation is in place.
        guard var view = reader.view else { return }
        var bytes: [UInt8] = []
        LogFormat.append(commit: transaction.records, salt: view.header.salt, to: &bytes)
        try checkSize(view.offset + bytes.count, of: "The log would have")
        _ = bytes.withUnsafeBytes { view.read($0, maximumLength: maximumStateBytes) }
        try replace(&reader, with: view.compacted(salt: Self.salt(), flags: .secret, retained: 0))
    }

    /// Appends a commit's records with one write at the end of the last complete commit, and
    /// syncs. The write and the view's update happen under the view's lock (a write to the page
    /// cache takes microseconds; this instance's readers then find the view up to date instead
    /// of reading the bytes again); the sync does not, so that readers never wait for the disk.
    /// Then compacts the log if it has grown past its bounds.
    private func append(_ records: [ChangeRecord]) throws(TabSyncError) {
        let written: (Generation, Int)? = try reader.withLock { reader throws(TabSyncError) in
            guard let generation = reader.generation, var view = reader.view else { return nil }
            let offset = view.offset
            var bytes: [UInt8] = []
            LogFormat.append(commit: records, salt: view.header.salt, to: &bytes)
            try checkSize(offset + bytes.count, of: "The log would have")
            do throws(TabSyncError) {
                var done = 0
                while done < bytes.count {
                    done += try retrying("pwrite", path: location) {
                        bytes.withUnsafeBytes { pwrite(generation.descriptor, $0.baseAddress! + done, bytes.count - done, off_t(offset + done)) }
                    }
                }
            } catch {
                // Nothing of a failed append stays: the log ends at its last commit again.
                _ = ftruncate(generation.descriptor, off_t(offset))
                throw error
            }
            reader.view = nil  // the only reference while it changes: no copy of its records
            _ = bytes.withUnsafeBytes { view.read($0, maximumLength: maximumStateBytes) }
            reader.view = view
            remember(&reader)
            return (generation, offset)
        }
        guard let (generation, offset) = written else { return }
        let synced: Int32 = switch durability {
        case .none: 0
        case .file: fdatasync(generation.descriptor)
        case .full: fsync(generation.descriptor)
        }
        if synced != 0 {
            let error = TabSyncError.system(durability == .full ? "fsync" : "fdatasync", .current, path: location)
            // The commit is not durable: it is taken back, and the view read again from the log.
            _ = ftruncate(generation.descriptor, off_t(offset))
            reader.withLock { reader in
                reader.generation = nil
                reader.view = nil
            }
            throw error
        }
        reader.withLock { reader in
            guard reader.generation === generation, let view = reader.view else { return }
            // Past twice its bounds, the log is compacted. The commit is in already: a compaction
            // that fails (a full disk) leaves the log as it is, longer, and the next commit tries again.
            guard view.offset > journalLimits.maximumBytes * 2 || view.sequence - view.header.base > UInt64(journalLimits.compactionEntries) else { return }
            do throws(TabSyncError) {
                // The records to keep, read again from the log: memory holds only the last few.
                let full = try fullView(of: generation, through: view.offset, retention: journalLimits.maximumEntries)
                try replace(&reader, with: full.compacted(salt: Self.salt(), flags: reader.secret ? .secret : [], retained: journalLimits.maximumEntries))
            } catch {
                compactionFailures.add(1, ordering: .relaxed)
            }
        }
    }

    /// Compactions that failed (the commit before each went in), for diagnostics and tests.
    let compactionFailures = Atomic<Int>(0)

    /// Refuses a log (or one to be written) of `size` bytes over the limit.
    private func checkSize(_ size: Int, of what: String) throws(TabSyncError) {
        guard size <= maximumStateBytes else {
            throw TabSyncError(
                code: .stateTooLarge, path: location,
                message: "\(what) \(size) bytes, more than the limit of \(maximumStateBytes)")
        }
    }

    /// How many records a view keeps in memory (for readers a little behind); the log keeps
    /// more (``journalLimits``), read again when a reader or a compaction needs them.
    static let memoryWindow = 1024

    /// The generation's first `offset` bytes read again into a view that keeps `retention` records.
    private func fullView(of generation: Generation, through offset: Int, retention: Int) throws(TabSyncError) -> LogView {
        let bytes = try readAll(generation.descriptor, from: 0, count: offset)
        guard let view = LogView(generation: bytes, retention: retention, maximumLength: maximumStateBytes) else {
            throw TabSyncError(code: .corruptState, path: location, message: "The log's header changed under its readers")
        }
        return view
    }

    /// `O_TMPFILE` (`__O_TMPFILE | O_DIRECTORY`), which Swift does not import.
    private static let unnamedFile: Int32 = 0o20_000_000 | O_DIRECTORY

    /// Writes `bytes` as the log's next generation (temporary file, fsync, rename) and makes it
    /// the view.
    ///
    /// The file is written in ``SessionDirectory/compactionFolder``, where its writes raise no
    /// event in the watchers of the session directory, and renamed from there over the log: every
    /// reader wakes once for a compaction (the rename), not once more for the write, in the middle
    /// of the committer's commit. (In a refresh storm the refresher's new token is such a
    /// compaction: it scrubs the replaced tokens.) It is written unnamed (`O_TMPFILE`) and linked
    /// as `NAME.log.tmp` only once complete, so that a writer killed before the link leaves
    /// nothing behind; where the file system has no `O_TMPFILE`, or /proc is not mounted (the
    /// link goes through /proc/self/fd), it is named from the start.
    private func replace(_ reader: inout Reader, with bytes: [UInt8]) throws(TabSyncError) {
        try checkSize(bytes.count, of: "The new log would have")
        // Earlier versions wrote the next generation beside the log; one killed mid-compaction
        // may have left it there, with values it replaced.
        _ = unlinkat(directory.descriptor, temporaryName, 0)
        let folder = try directory.openCompactionFolder()
        defer { close(folder) }
        // A writer killed mid-compaction may have left a temporary file; it never became the log.
        _ = unlinkat(folder, temporaryName, 0)
        var (fd, unnamed) = try writeNextGeneration(bytes, in: folder)
        guard renameat(folder, temporaryName, directory.descriptor, logName) == 0 else {
            let errno = Errno.current
            close(fd)
            _ = unlinkat(folder, temporaryName, 0)
            throw TabSyncError.system("renameat", errno, path: location)
        }
        if unnamed {
            // The appends go through a descriptor opened by the log's name: inotify reports a
            // write to the watchers of the directory the descriptor was opened in, under that
            // name, and an O_TMPFILE descriptor was opened in the compaction folder, with none
            // (every append would go unseen).
            let named: Int32
            do throws(TabSyncError) {
                named = try directory.openFile(logName, flags: O_RDWR, create: false)
            } catch {
                close(fd)
                throw error
            }
            var written = stat(), opened = stat()
            let same = fstat(fd, &written) == 0 && fstat(named, &opened) == 0 && written.st_dev == opened.st_dev && written.st_ino == opened.st_ino
            close(fd)
            fd = named
            guard same else {
                close(fd)
                throw TabSyncError(code: .corruptState, path: location, message: "The log was replaced by another program while it was being compacted")
            }
        }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            let errno = Errno.current
            close(fd)
            throw TabSyncError.system("fstat", errno, path: location)
        }
        let view = Self.view(of: bytes, retention: Self.memoryWindow)
        reader.generation = Generation(descriptor: fd, info: info)
        reader.view = view
        reader.secret = view.header.flags.contains(.secret)
        remember(&reader)
        // The rename too: later commits go to the new file, which must be the log after a power loss.
        if durability != .none, fsync(directory.descriptor) != 0 {
            throw TabSyncError.system("fsync", .current, path: directory.path)
        }
    }

    /// `bytes` written, synced (unless durability is `none`) and named `NAME.log.tmp` in `folder`
    /// (the compaction folder); the file's descriptor, and whether it was opened unnamed (see
    /// ``replace(_:with:)``).
    private func writeNextGeneration(_ bytes: [UInt8], in folder: Int32) throws(TabSyncError) -> (descriptor: Int32, unnamed: Bool) {
        let temporaryPath = directory.path(of: SessionDirectory.compactionFolder + "/" + temporaryName)
        let unnamed = openat(folder, ".", Self.unnamedFile | O_RDWR | O_CLOEXEC, 0o600)
        if unnamed >= 0 {
            do throws(TabSyncError) {
                try write(bytes, to: unnamed, path: temporaryPath)
                if linkat(AT_FDCWD, "/proc/self/fd/\(unnamed)", folder, temporaryName, AT_SYMLINK_FOLLOW) == 0 {
                    return (unnamed, true)
                }
                let errno = Errno.current
                guard errno == .noSuchFileOrDirectory else { throw TabSyncError.system("linkat", errno, path: temporaryPath) }
            } catch {
                close(unnamed)
                throw error
            }
            close(unnamed)  // no /proc: written again, named from the start
        }
        let fd = try retrying("openat", path: temporaryPath) {
            openat(folder, temporaryName, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK, 0o600)
        }
        do throws(TabSyncError) {
            try write(bytes, to: fd, path: temporaryPath)
        } catch {
            close(fd)
            _ = unlinkat(folder, temporaryName, 0)
            throw error
        }
        return (fd, false)
    }

    private func write(_ bytes: [UInt8], to fd: Int32, path: String) throws(TabSyncError) {
        var done = 0
        while done < bytes.count {
            done += try retrying("write", path: path) {
                bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + done, bytes.count - done) }
            }
        }
        if durability != .none, fsync(fd) != 0 {
            throw TabSyncError.system("fsync", .current, path: path)
        }
    }

    /// A random salt for a new generation.
    static func salt() -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        // A word at a time: each draw is a getrandom(2), and a byte at a time made a compaction
        // sixteen system calls.
        var salt: [UInt8] = []
        salt.reserveCapacity(LogFormat.saltSize)
        while salt.count < LogFormat.saltSize {
            withUnsafeBytes(of: generator.next()) { salt += $0.prefix(LogFormat.saltSize - salt.count) }
        }
        return salt
    }

    // MARK: Format 1

    /// The marker left as `NAME.state`: a format 1 header line of version 2, which TabSync 1
    /// refuses with `unsupportedVersion` instead of starting a store of its own beside the log.
    static let legacyMarker = Array("tabsync-state 2 0 0 00000000\n".utf8)

    /// A format 1 state file, read and turned into a first generation with the same store, values
    /// and sequence number; nil when there is none (or only the marker). A state file that cannot
    /// be read is moved aside as `NAME.state.corrupt-TIME`, and its previous generation
    /// (`NAME.state.prev`) is upgraded instead when it can be, as format 1's recovery did. Both
    /// older files are then deleted: they may hold replaced values. The first generation is
    /// marked as holding secrets, since format 1 does not say which storage held tokens.
    private func upgradeLegacy() throws(TabSyncError) -> [UInt8]? {
        guard let bytes = try readLegacy(legacyName) else { return nil }
        if bytes == Self.legacyMarker { return nil }
        var recovery: String?
        var document = try? StateFileCodec.decode(bytes, path: directory.path(of: legacyName))
        if document == nil {
            // Not a state file this version can read: kept aside, not overwritten by the marker.
            let aside = "\(legacyName).corrupt-\(Int64(Date().timeIntervalSince1970 * 1000))"
            if linkat(directory.descriptor, legacyName, directory.descriptor, aside, 0) != 0 {
                throw TabSyncError.system("linkat", .current, path: directory.path(of: aside))
            }
            if let previous = try? readLegacy(legacyName + ".prev"),
               var older = try? StateFileCodec.decode(previous, path: directory.path(of: legacyName + ".prev")) {
                older.storeID = StateDocument.newStoreID()
                document = older
                recovery = "The format 1 state file could not be read; moved it aside as \(aside) and upgraded its previous generation"
            }
        }
        _ = unlinkat(directory.descriptor, legacyName + ".prev", 0)
        _ = unlinkat(directory.descriptor, legacyName + ".tmp", 0)
        guard let document else { return nil }
        var origins: [String: String] = [:]
        for entry in document.journal { if let key = entry.key { origins[key] = entry.newValue == nil ? nil : entry.origin } }
        return LogView.fresh(
            salt: Self.salt(), flags: .secret, store: document.storeID, sequence: document.sequence, values: document.values,
            origins: origins, recovery: recovery ?? document.recovery)
    }

    /// A format 1 file's bytes (nil when missing), refused over the size limit like a log.
    private func readLegacy(_ name: String) throws(TabSyncError) -> [UInt8]? {
        guard let fd = try directory.openExisting(name, flags: O_RDONLY) else { return nil }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw TabSyncError.system("fstat", .current, path: directory.path(of: name)) }
        guard Int(info.st_size) <= maximumStateBytes else {
            throw TabSyncError(
                code: .stateTooLarge, path: directory.path(of: name),
                message: "The format 1 state file has \(info.st_size) bytes, more than the limit of \(maximumStateBytes); it is not upgraded")
        }
        return try readAll(fd, from: 0, count: Int(info.st_size))
    }

    private func hasLegacyMarker() throws(TabSyncError) -> Bool {
        guard let fd = try directory.openExisting(legacyName, flags: O_RDONLY) else { return false }
        defer { close(fd) }
        return try readAll(fd, from: 0, count: Self.legacyMarker.count + 1) == Self.legacyMarker
    }

    /// Puts the format 1 marker in place of `NAME.state` (by rename: a TabSync 1 process that
    /// watches it reads it and stops).
    private func writeLegacyMarker() throws(TabSyncError) {
        let temporary = legacyName + ".tmp"
        _ = unlinkat(directory.descriptor, temporary, 0)
        let fd = try directory.openFile(temporary, flags: O_WRONLY | O_EXCL, create: true)
        let written = Self.legacyMarker.withUnsafeBytes { Glibc.write(fd, $0.baseAddress!, $0.count) }
        close(fd)
        guard written == Self.legacyMarker.count, renameat(directory.descriptor, temporary, directory.descriptor, legacyName) == 0 else {
            let errno = Errno.current
            _ = unlinkat(directory.descriptor, temporary, 0)
            throw TabSyncError.system("renameat", errno, path: directory.path(of: legacyName))
        }
    }

    // MARK: Locks around commits

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

    // MARK: The backend protocol

    public func snapshot() throws(TabSyncError) -> StoreSnapshot {
        let seen = try current(waiting: true) { reader in
            guard let view = reader.view else { return .missing }
            return .snapshot(StoreSnapshot(values: view.values, position: StorePosition(store: view.store, sequence: view.sequence), recovery: view.recovery))
        }
        guard case let .snapshot(snapshot)? = seen else { return StoreSnapshot(values: [:], position: StorePosition(store: "", sequence: 0)) }
        return snapshot
    }

    public func changes(after position: StorePosition, waiting: Bool) throws(TabSyncError) -> StoreChanges? {
        let seen = try current(waiting: waiting) { reader in
            guard let view = reader.view else { return .missing }
            return .changes(changes(after: position, in: view, generation: reader.generation))
        }
        switch seen {
        case nil: return nil
        case .missing?, .snapshot?: return .missing
        case let .changes(changes)?: return changes
        }
    }

    /// The records after `position`, or a resync: what a reader at `position` has to catch up on.
    private func changes(after position: StorePosition, in view: LogView, generation: Generation?) -> StoreChanges {
        // A reader that started before any store existed replays the first store's records.
        if position.store == view.store || position.store.isEmpty {
            if let records = view.records(after: position.sequence) { return .records(Array(records), store: view.store) }
            // Behind the records kept in memory, but maybe not behind the log's: read it again.
            if position.sequence >= view.header.base, let generation,
               let full = try? fullView(of: generation, through: view.offset, retention: Int(view.sequence - position.sequence)),
               let records = full.records(after: position.sequence) {
                return .records(Array(records), store: view.store)
            }
        }
        let snapshot = StoreSnapshot(values: view.values, position: StorePosition(store: view.store, sequence: view.sequence), recovery: view.recovery)
        return .resync(snapshot, origins: view.origins)
    }

    public func commit<Result>(
        as author: ChangeAuthor, _ body: (inout StoreTransaction) throws(TabSyncError) -> Result
    ) throws(TabSyncError) -> Result {
        try locked { () throws(TabSyncError) in try commitLocked(author: author, body) }
    }

    /// The async commit: its turn among this instance's commits and its waits for the two locks
    /// suspend the task (cancellable, bounded by the lock timeout together); the read, `body`,
    /// the write and the fsync then run on `BlockingPool`, never on a Swift concurrency thread.
    /// On a memory file system (tmpfs, ramfs) they run on the calling thread instead: there they
    /// are memory copies and `fsync` is a no-op, so nothing in them can block, and the two hops
    /// between threads that the pool costs are saved (in a refresh storm, where every core is
    /// busy, each hop waited for one, twice per commit in the refresher's critical path).
    public func commit<Result: Sendable>(
        as author: ChangeAuthor, _ body: @escaping @Sendable (inout StoreTransaction) throws(TabSyncError) -> Result
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
        if directory.isMemoryFileSystem {
            return try holdingLocks { () throws(TabSyncError) -> Result in try commitLocked(author: author, body) }
        }
        return try await BlockingPool.shared.run { () throws(TabSyncError) -> Result in
            try self.holdingLocks { () throws(TabSyncError) -> Result in try self.commitLocked(author: author, body) }
        }
    }

    // MARK: Watching and locks

    public func watch(_ handler: @escaping @Sendable (BackendSignal) -> Void) -> any WatchRegistration {
        watches.add(1, ordering: .acquiringAndReleasing)
        let (id, detection) = ChangeWatcher.shared.register(
            directory: directory, names: [logName], pollInterval: pollInterval
        ) { [weak self] signal in
            switch signal {
            case let .changed(name):
                if name == nil { self?.verifyDirectory.store(true, ordering: .releasing) }
                handler(.mayHaveChanged)
            case let .fellBackToPolling(detection): handler(.detectionChanged(detection))
            }
        }
        return FileWatchRegistration(id: id, detection: detection) { [weak self] in
            self?.watches.subtract(1, ordering: .acquiringAndReleasing)
        }
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
    private let ended: @Sendable () -> Void

    init(id: UInt64, detection: ChangeDetection, ended: @escaping @Sendable () -> Void) {
        self.id = id
        self.detection = detection
        self.ended = ended
    }

    func cancel() {
        if !cancelled.exchange(true, ordering: .relaxed) {
            ChangeWatcher.shared.unregister(id)
            ended()
        }
    }

    deinit { cancel() }
}
