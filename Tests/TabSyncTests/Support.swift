import Foundation
import Testing
@testable import TabSync

/// A fresh session directory under the system's temporary directory, removed afterwards.
struct TemporaryDirectory: ~Copyable {
    let path: String

    init() {
        let base = FileManager.default.temporaryDirectory.path
        path = "\(base)/tabsync-test-\(UUID().uuidString.prefix(8))"
    }

    func file(_ name: String) -> String { "\(path)/\(name)" }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Waits for the next element of a stream, failing after `timeout`.
func next<Element: Sendable>(
    _ iterator: inout AsyncStream<Element>.Iterator, timeout: Duration = .seconds(30),
    sourceLocation: SourceLocation = #_sourceLocation
) async -> Element? {
    let box = IteratorBox(iterator)
    let result = await withTaskGroup(of: Element?.self) { group in
        group.addTask { await box.next() }
        group.addTask {
            try? await Task.sleep(for: timeout)
            return nil
        }
        let first = await group.next()!
        group.cancelAll()
        return first
    }
    iterator = box.iterator
    if result == nil {
        Issue.record("Timed out after \(timeout) waiting for an event", sourceLocation: sourceLocation)
    }
    return result
}

private final class IteratorBox<Element: Sendable>: @unchecked Sendable {
    var iterator: AsyncStream<Element>.Iterator
    init(_ iterator: AsyncStream<Element>.Iterator) { self.iterator = iterator }
    func next() async -> Element? { await iterator.next() }
}

/// Runs blocking work on a thread of its own and waits for it, so that a test's long run of
/// synchronous commits does not hold one of the cooperative pool's threads (two on a 2-core
/// machine), which every other test of the process needs to resume.
func offPool<Result: Sendable>(_ work: @escaping @Sendable () throws -> Result) async throws -> Result {
    try await withCheckedThrowingContinuation { continuation in
        Thread { continuation.resume(with: Swift.Result { try work() }) }.start()
    }
}

/// The suites that stall the process-wide watcher thread on purpose, or measure how fast it
/// delivers, run one after another: in one test process, one stalling it would delay the other.
@Suite(.serialized) enum WatcherThreadTests {}
