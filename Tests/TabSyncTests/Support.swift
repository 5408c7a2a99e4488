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
