import Foundation
import Synchronization

/// Turn-taking among one storage instance's commits, synchronous and async alike (and the locks
/// of ``InMemoryBackend``): first come, first served, each wait bounded by a deadline, an async
/// wait also ended by cancellation.
///
/// A synchronous caller blocks its thread (it asked to); an async caller is a suspended
/// continuation, so any number of queued async commits hold no thread at all.
final class CommitGate: Sendable {
    enum Outcome: Sendable {
        case entered
        case timedOut
        case cancelled
    }

    private enum Waiter {
        case thread(DispatchSemaphore)
        case task(CheckedContinuation<Outcome, Never>)
    }

    private struct State {
        var busy = false
        var queue: [(id: UInt64, waiter: Waiter)] = []
        var nextID: UInt64 = 0
    }

    private let state = Mutex(State())

    /// Blocks until it is this caller's turn (true) or `deadline` passes (false).
    func enter(before deadline: ContinuousClock.Instant) -> Bool {
        let queued = state.withLock { state -> (id: UInt64, semaphore: DispatchSemaphore)? in
            if !state.busy {
                state.busy = true
                return nil
            }
            let semaphore = DispatchSemaphore(value: 0)
            let id = state.nextID
            state.nextID += 1
            state.queue.append((id, .thread(semaphore)))
            return (id, semaphore)
        }
        guard let queued else { return true }
        if queued.semaphore.wait(timeout: .after(deadline - .now)) == .success { return true }
        let withdrawn = state.withLock { state in
            guard let index = state.queue.firstIndex(where: { $0.id == queued.id }) else { return false }
            state.queue.remove(at: index)
            return true
        }
        if withdrawn { return false }
        // The turn was handed over just as the wait ended: take it.
        queued.semaphore.wait()
        return true
    }

    /// Whether someone has the turn now.
    var isBusy: Bool { state.withLock { $0.busy } }

    /// Takes the turn if nobody has it.
    func tryEnter() -> Bool {
        state.withLock { state in
            if state.busy { return false }
            state.busy = true
            return true
        }
    }

    /// Suspends until it is this caller's turn, `deadline` passes (nil: no bound), or the task
    /// is cancelled.
    func enter(before deadline: ContinuousClock.Instant?) async -> Outcome {
        let id = state.withLock { state in
            defer { state.nextID += 1 }
            return state.nextID
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let immediate = state.withLock { state -> Outcome? in
                    // Checked under the lock that `withdraw` takes: a cancellation either comes
                    // before this (seen here) or finds the continuation queued.
                    if Task.isCancelled { return .cancelled }
                    if !state.busy {
                        state.busy = true
                        return .entered
                    }
                    state.queue.append((id, .task(continuation)))
                    return nil
                }
                if let immediate {
                    continuation.resume(returning: immediate)
                    return
                }
                if let deadline {
                    DispatchQueue.global().asyncAfter(deadline: .after(deadline - .now)) { [self] in
                        withdraw(id, .timedOut)
                    }
                }
            }
        } onCancel: {
            withdraw(id, .cancelled)
        }
    }

    /// Ends the wait of `id` with `outcome`, unless its turn came first.
    private func withdraw(_ id: UInt64, _ outcome: Outcome) {
        let waiter = state.withLock { state -> Waiter? in
            guard let index = state.queue.firstIndex(where: { $0.id == id }) else { return nil }
            return state.queue.remove(at: index).waiter
        }
        if case let .task(continuation)? = waiter { continuation.resume(returning: outcome) }
    }

    /// Hands the turn to the longest waiting caller, or frees the gate.
    func leave() {
        let next = state.withLock { state -> Waiter? in
            if state.queue.isEmpty {
                state.busy = false
                return nil
            }
            return state.queue.removeFirst().waiter
        }
        switch next {
        case let .thread(semaphore)?: semaphore.signal()
        case let .task(continuation)?: continuation.resume(returning: .entered)
        case nil: break
        }
    }
}

extension DispatchTime {
    /// Now plus `duration` (nothing for a negative one), capped at a day.
    static func after(_ duration: Duration) -> DispatchTime {
        let (seconds, attoseconds) = max(duration, .zero).components
        return .now() + .nanoseconds(Int(min(seconds, 86_400) * 1_000_000_000 + attoseconds / 1_000_000_000))
    }
}
