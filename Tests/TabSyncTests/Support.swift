import Foundation
import Testing
import TabSyncConformance
@testable import TabSync

/// A fresh session directory under the system's temporary directory, removed afterwards.
struct TemporaryDirectory: ~Copyable {
    let path: String

    init() {
        self.init(under: FileManager.default.temporaryDirectory.path)
    }

    init(under base: String) {
        path = "\(base)/tabsync-test-\(UUID().uuidString.prefix(8))"
    }

    /// Where tests that depend on the file system run: the temporary directory, and a memory
    /// file system (tmpfs, where async commits do their file work on the calling thread).
    static let fileSystems: [String] = [FileManager.default.temporaryDirectory.path]
        + (FileManager.default.fileExists(atPath: "/dev/shm") ? ["/dev/shm"] : [])

    func file(_ name: String) -> String { "\(path)/\(name)" }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Waits for the next element of a stream, failing after `timeout`.
func next<Element: Sendable>(
    _ iterator: inout AsyncStream<Element>.Iterator, timeout: Duration = .seconds(30),
    sourceLocation: SourceLocation = #_sourceLocation
) async -> Element? {
    await StreamWait.next(&iterator, timeout: timeout, sourceLocation: sourceLocation)
}

/// Runs blocking work on a thread of its own (``StreamWait/offPool(_:)``).
func offPool<Result: Sendable>(_ work: @escaping @Sendable () throws -> Result) async throws -> Result {
    try await StreamWait.offPool(work)
}

/// Takes a lock that should be free. A child that another test forks while a storage holds the
/// lock (opening it, committing) shares it until its exec: a few milliseconds, hence tries for up
/// to 2 s rather than one.
func acquireSoon(_ lock: some SessionLock) throws -> (any SessionLockHold)? {
    let deadline = ContinuousClock.now + .seconds(2)
    var taken = try lock.tryAcquire()
    while taken == nil, ContinuousClock.now < deadline {
        Thread.sleep(forTimeInterval: 0.01)
        taken = try lock.tryAcquire()
    }
    return taken
}

/// The suites that stall the process-wide watcher thread on purpose, or measure how fast it
/// delivers, run one after another: in one test process, one stalling it would delay the other.
@Suite(.serialized) enum WatcherThreadTests {}
