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
