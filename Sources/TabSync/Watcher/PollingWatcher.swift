import Foundation
import Synchronization

/// The fallback when inotify cannot serve: one thread that ticks every registration at its
/// interval. Each tick costs the storage one `fstat` when nothing changed. The thread exists
/// only while something is polled.
final class PollingWatcher: Sendable {
    private struct Entry {
        var interval: Duration
        var due: ContinuousClock.Instant
        var handler: ChangeWatcher.Handler
    }

    private struct State {
        var entries: [UInt64: Entry] = [:]
        var running = false
    }

    private let state = Mutex(State())

    func register(id: UInt64, interval: Duration, handler: @escaping ChangeWatcher.Handler) {
        let start = state.withLock { state in
            state.entries[id] = Entry(interval: interval, due: .now + interval, handler: handler)
            defer { state.running = true }
            return !state.running
        }
        if start {
            let thread = Thread { [self] in run() }
            thread.name = "TabSync.PollingWatcher"
            thread.start()
        }
    }

    /// Returns true when `id` was polled.
    func unregister(_ id: UInt64) -> Bool {
        state.withLock { $0.entries.removeValue(forKey: id) != nil }
    }

    private func run() {
        while true {
            let now = ContinuousClock.now
            let (due, next): ([ChangeWatcher.Handler], ContinuousClock.Instant?) = state.withLock { state in
                if state.entries.isEmpty {
                    state.running = false
                    return ([], nil)
                }
                var due: [ChangeWatcher.Handler] = []
                for (id, entry) in state.entries where entry.due <= now {
                    due.append(entry.handler)
                    state.entries[id]!.due = now + entry.interval
                }
                return (due, state.entries.values.map(\.due).min())
            }
            guard let next else { return }
            for handler in due { handler(.changed(name: nil)) }
            let wait = next - ContinuousClock.now
            if wait > .zero {
                let (seconds, attoseconds) = wait.components
                Thread.sleep(forTimeInterval: Double(seconds) + Double(attoseconds) / 1e18)
            }
        }
    }
}
