// DEVELOPMENT ONLY: stdout output of the demo token server.
import Foundation
import Synchronization

/// Serialises whole lines to stdout. Each line is one unbuffered write(2), so it is
/// visible to a reading parent process at once (no stdio buffering to flush).
final class Console: Sendable {
    private let lock = Mutex(())
    let quiet: Bool

    init(quiet: Bool) {
        self.quiet = quiet
    }

    /// Always printed (the `listening on` line).
    func line(_ text: String) {
        lock.withLock { _ in
            try? FileHandle.standardOutput.write(contentsOf: Data((text + "\n").utf8))
        }
    }

    /// A per-request log line; suppressed by --quiet.
    func request(_ text: String) {
        if !quiet { line(text) }
    }
}

enum Log {
    /// Printable ASCII only, truncated: request fields are client-controlled.
    static func clean(_ text: String, max: Int) -> String {
        let scalars = text.unicodeScalars.prefix(max).map { (0x21...0x7E).contains($0.value) ? Character($0) : "?" }
        return String(scalars) + (text.unicodeScalars.count > max ? "..." : "")
    }
}
