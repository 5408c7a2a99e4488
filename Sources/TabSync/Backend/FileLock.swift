import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// An exclusive lock on `NAME.lock` in a session directory, or on the directory itself, with
/// `flock(2)`.
///
/// Each acquisition opens its own descriptor, so two holders in one process exclude each other
/// just as two processes do. Waits are bounded, cancellable and hold no thread (they poll). The kernel releases the lock when its holder dies, however it dies.
/// A lock file that was replaced while waiting (unlinked and created again) is detected after
/// locking, and the lock is taken again on the new file. A replacement after that (a temp
/// cleaner deleting an empty file) cannot be detected: two processes then each hold "the" lock
/// on a different inode. The lock on the directory (`init(directoryOf:)`) has no such gap:
/// nobody can replace a directory that a live session holds open, only move it, which the
/// holder checks after locking (``SessionDirectory/verify()``).
public final class FileLock: SessionLock {
    public let name: String
    let directory: SessionDirectory
    /// The lock file's name, or "." for the directory itself.
    let fileName: String

    public init(directory: SessionDirectory, name: String) throws(TabSyncError) {
        try FileBackend.validate(name: name, what: "lock name")
        self.directory = directory
        self.name = name
        self.fileName = name + ".lock"
    }

    /// The lock on the session directory itself, named `name` in reports.
    init(directoryOf directory: SessionDirectory, name: String) {
        self.directory = directory
        self.name = name
        self.fileName = "."
    }

    private var isDirectory: Bool { fileName == "." }

    public func tryAcquire() throws(TabSyncError) -> (any SessionLockHold)? {
        try take(blocking: false)
    }

    /// Polls `flock(LOCK_NB)` between sleeps of 1 ms growing to 20 ms, so that a waiter holds no
    /// thread and any number of waiters cost no more threads than none; cancellation and the
    /// timeout are seen within one sleep.
    public func acquire(timeout: Duration?) async throws -> any SessionLockHold {
        let started = ContinuousClock.now
        var pause = Duration.milliseconds(1)
        while true {
            try Task.checkCancellation()
            if let hold = try take(blocking: false) { return hold }
            let waited = ContinuousClock.now - started
            if let timeout, waited >= timeout { throw timedOut(after: waited) }
            let remaining = timeout.map { $0 - waited } ?? pause
            try await Task.sleep(for: min(pause, remaining))
            pause = min(pause * 2, .milliseconds(20))
        }
    }

    /// The same wait, blocking the calling thread (for the synchronous commit path), bounded by
    /// `timeout`. Free: taken at once. Held: a blocking `flock` on a thread of its own, so that the
    /// kernel wakes it at every release to race on equal terms with the other waiters (a poller
    /// sleeps through the releases of writers that commit back to back, and can lose every time);
    /// the caller waits for it at most `timeout`. At most one
    /// such thread per lock: a later call while one is still blocked (its caller gave up) waits for
    /// that same attempt, and a lock it takes with nobody waiting is released at once.
    func acquireBlocking(timeout: Duration) throws(TabSyncError) -> FileLockHold {
        let started = ContinuousClock.now
        while true {
            if let hold = try take(blocking: false) { return hold }
            let remaining = timeout - (ContinuousClock.now - started)
            // Nothing left of the bound: no blocked attempt to start for it.
            if remaining <= .zero { throw timedOut(after: ContinuousClock.now - started) }
            switch attemptBlocking().wait(timeout: remaining) {
            case let .acquired(hold): return hold
            case let .failed(error): throw error
            case .timedOut: throw timedOut(after: ContinuousClock.now - started)
            case .retry, .cancelled: continue
            }
        }
    }

    /// ``acquireBlocking(timeout:)`` for async callers: the same blocked attempt, awaited by a
    /// suspended task instead of a blocked thread. Throws `CancellationError` at once when the
    /// task is cancelled (the attempt goes on, and releases what it takes with nobody waiting).
    func acquireWaking(timeout: Duration) async throws -> FileLockHold {
        let started = ContinuousClock.now
        while true {
            try Task.checkCancellation()
            if let hold = try take(blocking: false) { return hold }
            let remaining = timeout - (ContinuousClock.now - started)
            if remaining <= .zero { throw timedOut(after: ContinuousClock.now - started) }
            switch await attemptBlocking().wait(timeout: remaining) {
            case let .acquired(hold): return hold
            case let .failed(error): throw error
            case .timedOut: throw timedOut(after: ContinuousClock.now - started)
            case .cancelled: throw CancellationError()
            case .retry: continue
            }
        }
    }

    /// The blocked attempt in progress, or a new one.
    private func attemptBlocking() -> BlockedAttempt {
        blocked.withLock { current in
            if let current, !current.isFinished { return current }
            let attempt = BlockedAttempt()
            current = attempt
            let thread = Thread { [self] in
                do throws(TabSyncError) {
                    attempt.finish(.success(try take(blocking: true)!))
                } catch {
                    attempt.finish(.failure(error))
                }
            }
            thread.name = "TabSync.commitLock"
            thread.start()
            return attempt
        }
    }

    private let blocked = Mutex<BlockedAttempt?>(nil)

    public func query() -> LockReport {
        let path = isDirectory ? directory.path : directory.path(of: fileName)
        var info = stat()
        guard isDirectory ? fstat(directory.descriptor, &info) == 0 : fstatat(directory.descriptor, fileName, &info, AT_SYMLINK_NOFOLLOW) == 0 else {
            return LockReport(name: name, path: path, holders: [], waiters: [])
        }
        let (holders, waiters) = Proc.locks(device: UInt64(info.st_dev), inode: UInt64(info.st_ino))
        return LockReport(name: name, path: path, holders: holders.map(LockHolder.init), waiters: waiters.map(LockHolder.init))
    }

    /// The timeout's error, in the manner of PostgreSQL's lock-timeout report: what was waited
    /// for, how long, and who holds it.
    func timedOut(after waited: Duration) -> TabSyncError {
        let report = query()
        let seconds = Double(waited.components.seconds) + Double(waited.components.attoseconds) / 1e18
        let holder = report.holders.isEmpty
            ? "the holder could not be identified (it may have just released it)"
            : "it is held by " + report.holders.map(\.description).joined(separator: ", ")
        return TabSyncError(
            code: .lockTimeout, path: report.path,
            message: "Gave up waiting for the lock '\(name)' after \(String(format: "%.1f", seconds)) s (lock timeout); \(holder)",
            holders: report.holders)
    }

    /// Waits (polling, on the calling thread) until the lock file is free, without creating it:
    /// nil when there is no lock file. For a look under the lock that must not put a file back
    /// into a directory that is being deleted.
    func acquireIfExists(timeout: Duration) throws(TabSyncError) -> FileLockHold? {
        let started = ContinuousClock.now
        var pause: UInt32 = 1_000
        while true {
            switch try take(blocking: false, create: false) {
            case let .held(hold): return hold
            case .absent: return nil
            case .busy: break
            }
            if ContinuousClock.now - started >= timeout { throw timedOut(after: ContinuousClock.now - started) }
            usleep(pause)
            pause = min(pause * 2, 20_000)
        }
    }

    /// Opens the lock file and flocks it. Returns nil when not blocking and it is held elsewhere.
    func take(blocking: Bool) throws(TabSyncError) -> FileLockHold? {
        switch try take(blocking: blocking, create: true) {
        case let .held(hold): hold
        case .busy, .absent: nil
        }
    }

    private enum Take {
        case held(FileLockHold)
        case busy
        case absent
    }

    /// A descriptor of the lock file (or directory) that no hold uses: the last one released, kept
    /// open for the next acquisition, which then opens nothing. Each hold still has a descriptor
    /// of its own (an open file description of its own), taken from here or opened.
    private let idle = Mutex<Int32>(-1)

    /// Gives a released descriptor back for the next acquisition, or closes it.
    fileprivate func returnIdle(_ fd: Int32) {
        let kept = idle.withLock { idle in
            guard idle < 0 else { return false }
            idle = fd
            return true
        }
        if !kept { close(fd) }
    }

    deinit {
        let fd = idle.withLock { $0 }
        if fd >= 0 { close(fd) }
    }

    private func take(blocking: Bool, create: Bool) throws(TabSyncError) -> Take {
        let path = isDirectory ? directory.path : directory.path(of: fileName)
        while true {
            let fd: Int32
            let kept = idle.withLock { idle in
                defer { idle = -1 }
                return idle
            }
            if kept >= 0 {
                fd = kept
            } else if isDirectory {
                fd = try directory.reopen()
            } else if create {
                fd = try directory.openFile(fileName, flags: O_RDWR, create: true)
            } else {
                guard let existing = try directory.openExisting(fileName, flags: O_RDWR) else { return .absent }
                fd = existing
            }
            while flock(fd, blocking ? LOCK_EX : LOCK_EX | LOCK_NB) != 0 {
                let errno = Errno.current
                if errno == .interrupted { continue }
                if errno == .wouldBlock {
                    returnIdle(fd)
                    return .busy
                }
                close(fd)
                throw TabSyncError.system("flock", errno, path: path)
            }
            // The directory is the one opened (its path is checked by the caller); a file we
            // locked must still be the one at the name.
            if isDirectory { return .held(FileLockHold(descriptor: fd, lock: self)) }
            var held = stat()
            var current = stat()
            if fstat(fd, &held) == 0, fstatat(directory.descriptor, fileName, &current, AT_SYMLINK_NOFOLLOW) == 0,
               held.st_ino == current.st_ino, held.st_dev == current.st_dev {
                return .held(FileLockHold(descriptor: fd, lock: self))
            }
            // The file was replaced (or deleted) since this descriptor was opened: not kept.
            close(fd)
        }
    }
}

/// One blocking `flock` on a thread of its own, and the caller that waits for it (or none): a
/// blocked thread or a suspended task. Callers come one at a time (each storage instance's
/// commits take turns before they lock).
private final class BlockedAttempt: Sendable {
    private struct State {
        var waiting = false
        var finished = false
        var result: Result<FileLockHold, TabSyncError>?
        /// The suspended task waiting, and its wait's number.
        var continuation: CheckedContinuation<Outcome, Never>?
        var waitID: UInt64 = 0
    }

    private let state = Mutex(State())
    private let signal = DispatchSemaphore(value: 0)

    var isFinished: Bool { state.withLock { $0.finished } }

    func finish(_ result: Result<FileLockHold, TabSyncError>) {
        let (handedOver, task) = state.withLock { state -> (Bool, CheckedContinuation<Outcome, Never>?) in
            state.finished = true
            guard state.waiting else { return (false, nil) }
            if let task = state.continuation.take() {
                state.waiting = false
                return (true, task)
            }
            state.result = result
            return (true, nil)
        }
        if let task {
            switch result {
            case let .success(hold): task.resume(returning: .acquired(hold))
            case let .failure(error): task.resume(returning: .failed(error))
            }
        } else if handedOver {
            signal.signal()
        } else if case let .success(hold) = result {
            hold.release()
        }
    }

    enum Outcome: Sendable {
        case acquired(FileLockHold)
        case failed(TabSyncError)
        /// `timeout` passed first; the attempt goes on for a later caller.
        case timedOut
        /// The waiting task was cancelled; the attempt goes on for a later caller.
        case cancelled
        /// It had finished with nobody waiting (its lock was released): try again.
        case retry
    }

    func wait(timeout: Duration) -> Outcome {
        let finishedAlone = state.withLock { state -> Bool in
            if state.finished { return true }
            state.waiting = true
            return false
        }
        if finishedAlone { return .retry }
        _ = signal.wait(timeout: .after(timeout))
        return state.withLock { state -> Outcome in
            switch state.result.take() {
            case let .success(hold)?: return .acquired(hold)
            case let .failure(error)?: return .failed(error)
            case nil:
                state.waiting = false
                return .timedOut
            }
        }
    }

    func wait(timeout: Duration) async -> Outcome {
        let id = state.withLock { state in
            state.waitID += 1
            return state.waitID
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let immediate = state.withLock { state -> Outcome? in
                    if state.finished { return .retry }
                    if Task.isCancelled { return .cancelled }
                    state.waiting = true
                    state.continuation = continuation
                    return nil
                }
                if let immediate {
                    continuation.resume(returning: immediate)
                    return
                }
                DispatchQueue.global().asyncAfter(deadline: .after(timeout)) { [self] in abandon(id, .timedOut) }
            }
        } onCancel: {
            abandon(id, .cancelled)
        }
    }

    /// Ends the task wait `id` with `outcome`, unless the attempt finished first.
    private func abandon(_ id: UInt64, _ outcome: Outcome) {
        let task = state.withLock { state -> CheckedContinuation<Outcome, Never>? in
            guard state.waitID == id, let task = state.continuation.take() else { return nil }
            state.waiting = false
            return task
        }
        task?.resume(returning: outcome)
    }
}

/// A held `flock`. Closing the descriptor releases it.
final class FileLockHold: SessionLockHold {
    private let descriptor: Mutex<Int32>
    /// Where the descriptor goes back when released, for the next acquisition.
    private let lock: FileLock

    init(descriptor: Int32, lock: FileLock) {
        self.descriptor = Mutex(descriptor)
        self.lock = lock
    }

    /// Unlocks with `LOCK_UN`, which releases the lock even when a child process forked
    /// meanwhile shares the descriptor until its `exec` (a close would leave it held until the
    /// child's copy closes too), and keeps the descriptor for the lock's next acquisition.
    func release() {
        let fd = descriptor.withLock { fd in
            defer { fd = -1 }
            return fd
        }
        guard fd >= 0 else { return }
        _ = flock(fd, LOCK_UN)
        lock.returnIdle(fd)
    }

    deinit { release() }
}
