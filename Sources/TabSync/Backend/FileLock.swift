import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// An exclusive lock on `NAME.lock` in a session directory, with `flock(2)`.
///
/// Each acquisition opens its own descriptor, so two holders in one process exclude each other
/// just as two processes do. The kernel releases the lock when its holder dies, however it dies.
/// A lock file that was replaced while waiting (unlinked and created again) is detected after
/// locking, and the lock is taken again on the new file.
public final class FileLock: SessionLock {
    public let name: String
    let directory: SessionDirectory
    let fileName: String

    public init(directory: SessionDirectory, name: String) throws(TabSyncError) {
        try FileBackend.validate(name: name, what: "lock name")
        self.directory = directory
        self.name = name
        self.fileName = name + ".lock"
    }

    public func tryAcquire() throws(TabSyncError) -> (any SessionLockHold)? {
        try take(blocking: false)
    }

    public func acquire() async throws -> any SessionLockHold {
        if let hold = try take(blocking: false) { return hold }
        let waiter = Waiter()
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<any SessionLockHold, any Error>) in
                guard waiter.start(continuation) else { return }
                let thread = Thread { [self] in
                    let result: Result<any SessionLockHold, any Error>
                    do throws(TabSyncError) {
                        result = .success(try take(blocking: true)!)
                    } catch {
                        result = .failure(error)
                    }
                    waiter.finish(result)
                }
                thread.name = "TabSync.FileLock(\(name))"
                thread.start()
            }
        } onCancel: {
            waiter.cancel()
        }
    }

    /// Opens the lock file and flocks it. Returns nil when not blocking and it is held elsewhere.
    func take(blocking: Bool) throws(TabSyncError) -> FileLockHold? {
        let path = directory.path(of: fileName)
        while true {
            let fd = try directory.openFile(fileName, flags: O_RDWR, create: true)
            while flock(fd, blocking ? LOCK_EX : LOCK_EX | LOCK_NB) != 0 {
                let errno = Errno.current
                if errno == .interrupted { continue }
                close(fd)
                if errno == .wouldBlock { return nil }
                throw TabSyncError.system("flock", errno, path: path)
            }
            // The file we locked must still be the one at the name.
            var held = stat()
            var current = stat()
            if fstat(fd, &held) == 0, fstatat(directory.descriptor, fileName, &current, AT_SYMLINK_NOFOLLOW) == 0,
               held.st_ino == current.st_ino, held.st_dev == current.st_dev {
                return FileLockHold(descriptor: fd)
            }
            close(fd)
        }
    }

    /// Hands the outcome of a blocking acquisition to the awaiting task, or releases the lock
    /// at once when that task was cancelled meanwhile.
    private final class Waiter: Sendable {
        private enum State {
            case idle
            case waiting(CheckedContinuation<any SessionLockHold, any Error>)
            case cancelled
            case done
        }

        private let state = Mutex(State.idle)

        /// Returns false when the task was cancelled before waiting began.
        func start(_ continuation: CheckedContinuation<any SessionLockHold, any Error>) -> Bool {
            let proceed = state.withLock { state in
                if case .cancelled = state { return false }
                state = .waiting(continuation)
                return true
            }
            if !proceed { continuation.resume(throwing: CancellationError()) }
            return proceed
        }

        func cancel() {
            let continuation = state.withLock { state -> CheckedContinuation<any SessionLockHold, any Error>? in
                defer { state = .cancelled }
                if case let .waiting(continuation) = state { return continuation }
                return nil
            }
            continuation?.resume(throwing: CancellationError())
        }

        func finish(_ result: Result<any SessionLockHold, any Error>) {
            let continuation = state.withLock { state -> CheckedContinuation<any SessionLockHold, any Error>? in
                defer { state = .done }
                if case let .waiting(continuation) = state { return continuation }
                return nil
            }
            if let continuation {
                continuation.resume(with: result)
            } else if case let .success(hold) = result {
                hold.release()
            }
        }
    }
}

/// A held `flock`. Closing the descriptor releases it.
final class FileLockHold: SessionLockHold {
    private let descriptor: Mutex<Int32>

    init(descriptor: Int32) {
        self.descriptor = Mutex(descriptor)
    }

    func release() {
        descriptor.withLock { fd in
            if fd >= 0 { close(fd) }
            fd = -1
        }
    }

    deinit { release() }
}
