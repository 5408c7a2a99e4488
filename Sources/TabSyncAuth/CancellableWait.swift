import Dispatch
import Synchronization

/// Awaiting a task's value in a way that its own cancellation ends at once.
enum CancellableWait {
    /// The value of `task`, or `CancellationError` as soon as the calling task is cancelled.
    /// `task` itself goes on (other callers may be awaiting it too).
    static func value<Success: Sendable>(of task: Task<Success, Never>) async throws -> Success {
        let state = Shared<Success>()
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Success, any Error>) in
                let cancelled = state.value.withLock { current -> Bool in
                    if case .cancelled = current { return true }
                    current = .waiting(continuation)
                    return false
                }
                if cancelled { continuation.resume(throwing: CancellationError()); return }
                Task {
                    let value = await task.value
                    state.value.withLock { $0.take() }?.resume(returning: value)
                }
            }
        } onCancel: {
            state.value.withLock { current -> CheckedContinuation<Success, any Error>? in
                defer { current = .cancelled }
                return current.take()
            }?.resume(throwing: CancellationError())
        }
    }

    private final class Shared<Success: Sendable>: Sendable {
        let value = Mutex<State<Success>>(.idle)
    }

    private enum State<Success: Sendable> {
        case idle
        case waiting(CheckedContinuation<Success, any Error>)
        case cancelled
        case done

        mutating func take() -> CheckedContinuation<Success, any Error>? {
            guard case let .waiting(continuation) = self else { return nil }
            self = .done
            return continuation
        }
    }
}

/// Wake-ups of one waiting task, from any thread (``signal()``) or at a deadline: a wait that
/// costs no task of its own and no stream, for a waiter that the storage's watcher thread wakes
/// directly. A signal given while nobody waits is kept for the next wait.
final class Wakeup: Sendable {
    private enum State {
        case idle
        case signalled
        case waiting(CheckedContinuation<Bool, Never>, turn: UInt64)
    }

    private let state = Mutex<(state: State, turn: UInt64)>((.idle, 0))

    func signal() {
        finish(turn: nil, signalled: true)
    }

    /// True when signalled (now or since the last wait), false when `duration` passed or the task
    /// was cancelled first.
    func wait(for duration: Duration) async -> Bool {
        let turn: UInt64 = state.withLock { current in
            current.turn += 1
            return current.turn
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
                let ready: Bool? = state.withLock { current in
                    if case .signalled = current.state {
                        current.state = .idle
                        return true
                    }
                    if Task.isCancelled { return false }
                    current.state = .waiting(continuation, turn: turn)
                    return nil
                }
                if let ready { return continuation.resume(returning: ready) }
                let seconds = max(0, Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18)
                DispatchQueue.global().asyncAfter(deadline: .now() + seconds) { [weak self] in
                    self?.finish(turn: turn, signalled: false)
                }
            }
        } onCancel: {
            finish(turn: turn, signalled: false)
        }
    }

    /// Resumes the wait of `turn` (any wait, for a signal), or keeps a signal for the next one.
    private func finish(turn: UInt64?, signalled: Bool) {
        let continuation: CheckedContinuation<Bool, Never>? = state.withLock { current in
            switch current.state {
            case let .waiting(continuation, waiting) where turn == nil || turn == waiting:
                current.state = .idle
                return continuation
            case .idle where signalled:
                current.state = .signalled
                return nil
            default:
                return nil
            }
        }
        continuation?.resume(returning: signalled)
    }
}
