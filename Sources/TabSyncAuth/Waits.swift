import Dispatch
import Synchronization

/// The result of work that several callers await, each of whom may stop waiting without ending
/// it: the work hands its value to every caller still waiting, straight from where it finishes
/// (no task per caller to relay it), and a cancelled caller gets `CancellationError` at once.
final class SharedOutcome<Value: Sendable>: Sendable {
    private struct State {
        var value: Value?
        var waiters: [UInt64: CheckedContinuation<Value, any Error>] = [:]
        var lastWaiter: UInt64 = 0
    }

    private let state = Mutex(State())

    /// Hands `value` to every caller waiting and to every later one. Only the first call counts.
    func finish(_ value: Value) {
        let waiters: [CheckedContinuation<Value, any Error>] = state.withLock { current in
            guard current.value == nil else { return [] }
            current.value = value
            defer { current.waiters = [:] }
            return Array(current.waiters.values)
        }
        for waiter in waiters { waiter.resume(returning: value) }
    }

    /// The value once the work finishes, or `CancellationError` as soon as the calling task is
    /// cancelled (the work goes on).
    func value() async throws -> Value {
        let id: UInt64 = state.withLock { current in
            current.lastWaiter += 1
            return current.lastWaiter
        }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Value, any Error>) in
                let ready: Result<Value, any Error>? = state.withLock { current in
                    if let value = current.value { return .success(value) }
                    if Task.isCancelled { return .failure(CancellationError()) }
                    current.waiters[id] = continuation
                    return nil
                }
                if let ready { continuation.resume(with: ready) }
            }
        } onCancel: {
            state.withLock { $0.waiters.removeValue(forKey: id) }?.resume(throwing: CancellationError())
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
