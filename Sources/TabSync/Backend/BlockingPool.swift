import Foundation
import Synchronization

/// A fixed set of threads for the blocking part of async commits: reading and writing the state
/// file, and `fsync`, while the commit locks are held. Async callers suspend until their job is
/// done, so none of this ever runs on a Swift concurrency thread.
///
/// There are ``threadCount`` threads at most, started when first needed; idle ones sleep on a
/// semaphore (no periodic wake-ups). Jobs never wait for a lock (their caller took the locks
/// before handing them over), so each ends within the time of its I/O.
final class BlockingPool: Sendable {
    static let shared = BlockingPool()

    /// The most threads the pool starts, whatever the number of waiting commits.
    static let threadCount = 4

    private struct State {
        var jobs: [@Sendable () -> Void] = []
        var started = 0
        var idle = 0
    }

    private let state = Mutex(State())
    private let available = DispatchSemaphore(value: 0)

    /// Runs `work` on one of the pool's threads and returns its result.
    func run<Result: Sendable>(_ work: @escaping @Sendable () throws(TabSyncError) -> Result) async throws(TabSyncError) -> Result {
        let outcome = await withCheckedContinuation { (continuation: CheckedContinuation<Swift.Result<Result, TabSyncError>, Never>) in
            submit {
                do throws(TabSyncError) {
                    continuation.resume(returning: .success(try work()))
                } catch {
                    continuation.resume(returning: .failure(error))
                }
            }
        }
        return try outcome.get()
    }

    private enum Hand { case wakeIdle, startThread, leaveQueued }

    private func submit(_ job: @escaping @Sendable () -> Void) {
        let hand = state.withLock { state -> Hand in
            state.jobs.append(job)
            if state.idle > 0 {
                state.idle -= 1
                return .wakeIdle
            }
            guard state.started < Self.threadCount else { return .leaveQueued }
            state.started += 1
            return .startThread
        }
        switch hand {
        case .wakeIdle:
            available.signal()
        case .startThread:
            let thread = Thread { [self] in work() }
            thread.name = "TabSync.io"
            thread.start()
        case .leaveQueued:
            break  // a busy thread takes it when it is done
        }
    }

    /// Runs `work`, which may wait (for a lock, the network), on a thread of its own: for the
    /// default async forms of ``StorageBackend``, whose blocking operations must not occupy the
    /// pool's few threads (a commit holding its locks could then wait for one).
    static func runOnOwnThread<Result: Sendable>(_ work: @escaping @Sendable () throws(TabSyncError) -> Result) async throws(TabSyncError) -> Result {
        let outcome = await withCheckedContinuation { (continuation: CheckedContinuation<Swift.Result<Result, TabSyncError>, Never>) in
            let thread = Thread {
                do throws(TabSyncError) {
                    continuation.resume(returning: .success(try work()))
                } catch {
                    continuation.resume(returning: .failure(error))
                }
            }
            thread.name = "TabSync.blocking"
            thread.start()
        }
        return try outcome.get()
    }

    private func work() {
        while true {
            let job = state.withLock { state -> (@Sendable () -> Void)? in
                if state.jobs.isEmpty {
                    state.idle += 1
                    return nil
                }
                return state.jobs.removeFirst()
            }
            if let job {
                job()
            } else {
                available.wait()
            }
        }
    }
}
