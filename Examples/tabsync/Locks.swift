import ArgumentParser
import ExampleSupport
import Foundation
import TabSync
import TabSyncAuth

/// `tabsync locks DIR`: every lock file, who holds it and who waits, from /proc/locks.
///
/// A line of /proc/locks names its file by `MAJOR:MINOR:INODE` (hexadecimal device numbers),
/// matched against `lstat` of each `DIR/*.lock`. Since when a lock is held is known only for the
/// session's refresh lock: the refresher records when it began (``SessionStatus/refresh``).
struct Locks: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Every lock file of the directory, its holder (pid, command, state, since when) and how many processes wait.")

    @OptionGroup var options: DirectoryOptions

    func run() async throws {
        let path = options.path
        let entries: [String]
        switch directoryEntries(path) {
        case let .success(names): entries = names
        case let .failure(error): fail("cannot list \(path): \(error)")
        }
        let lines: [Proc.LockLine]
        switch Proc.locks() {
        case let .success(found): lines = found
        case let .failure(error): fail("cannot read /proc/locks: \(error)")
        }
        let overlay = (try? FileSystemType.of(path).get())?.name == "overlay"
        var refresh: RefreshInProgress?
        var lookedForRefresh = false
        var reports: [LockReport] = []
        for name in entries where name.hasSuffix(".lock") {
            var report = LockReport(file: name)
            switch FileInfo.lstat(join(path, name)) {
            case let .failure(error):
                report.problem = error.description
            case let .success(info):
                report.info = info
                let (major, minor) = info.deviceNumbers
                var matching = lines.filter { $0.inode == info.inode && $0.major == major && $0.minor == minor }
                // On overlayfs, stat gives the overlay's device while the lock is on the upper
                // layer's inode: the inode alone has to do.
                if matching.isEmpty, overlay { matching = lines.filter { $0.inode == info.inode } }
                // /proc/locks can list one lock (or one blocked waiter) more than once: one entry a pid.
                var seen: Set<Int32> = []
                report.holders = matching.filter { !$0.isWaiter && seen.insert($0.pid).inserted }.map { LockReport.Party(line: $0) }
                for index in report.holders.indices where report.holders[index].process.state == "gone" {
                    let device = String(format: "%02llx:%02llx:%llu", major, minor, info.inode)
                    report.holders[index].heldThrough = Proc.processesHoldingLock(device: device).map(Proc.process)
                }
                seen = []
                report.waiting = matching.filter { $0.isWaiter && seen.insert($0.pid).inserted }.map { LockReport.Party(line: $0) }
                if name == "session.refresh.lock", !report.holders.isEmpty {
                    if !lookedForRefresh { (refresh, lookedForRefresh) = (Self.refreshInProgress(path), true) }
                    for index in report.holders.indices {
                        if let current = refresh, current.pid == report.holders[index].process.pid {
                            report.holders[index].since = current.since
                            report.holders[index].origin = current.origin
                        }
                    }
                }
            }
            reports.append(report)
        }
        let output = LineOutput(json: options.json)
        if options.json {
            output.write(JSON.object([("directory", .string(path)), ("locks", .array(reports.map(\.json)))]).encoded)
            return
        }
        output.write("directory \(Display.name(path))")
        if reports.isEmpty { output.write("  no lock file (*.lock)") }
        let width = reports.map { Display.name($0.file).count }.max() ?? 0
        for report in reports {
            let name = Display.name(report.file)
            output.write("  \(name)\(String(repeating: " ", count: width - name.count))  \(report.human)")
        }
    }

    /// The refresh the session records as in progress, read through ``AuthSession/status()``.
    static func refreshInProgress(_ path: String) -> RefreshInProgress? {
        guard let directory = try? Storages.directory(path), case let .success(storage) = Storages.open("session", in: directory) else { return nil }
        defer { storage.close() }
        return (try? AuthSession(storage: storage, client: nil).status())?.refresh
    }
}

struct LockReport {
    /// A holder or a waiter.
    struct Party {
        var process: Proc.Process
        /// FLOCK, POSIX, OFDLCK, ...
        var kind: String
        /// WRITE (exclusive) or READ (shared).
        var access: String
        var since: Date?
        /// The session origin of a refresher.
        var origin: String?
        /// When the process that took the lock has ended: the processes that hold it now, through
        /// the descriptor it passed on.
        var heldThrough: [Proc.Process] = []

        init(line: Proc.LockLine) {
            process = Proc.process(line.pid)
            kind = line.kind
            access = line.access
        }

        var json: JSON {
            .object([
                ("pid", .int(Int64(process.pid))), ("command", .from(process.command)), ("state", .string(process.state)),
                ("kind", .string(kind)), ("access", .string(access)), ("since", .time(since)), ("origin", .from(origin)),
                ("heldThrough", .array(heldThrough.map { process in
                    .object([("pid", .int(Int64(process.pid))), ("command", .from(process.command)), ("state", .string(process.state))])
                })),
            ])
        }

        var human: String {
            var text: String
            if process.pid <= 0 {
                text = "an open file description (no pid)"
            } else if process.state == "gone" {
                text = "pid \(process.pid), which has ended"
                if !heldThrough.isEmpty {
                    text += "; its descriptor lives on in " + heldThrough.map { "pid \($0.pid) \(Display.name($0.command ?? "?")) (\($0.state))" }.joined(separator: ", ")
                }
            } else {
                text = "pid \(process.pid) \(Display.name(process.command ?? "?")) (\(process.state))"
            }
            if access == "READ" { text += " shared" }
            if kind != "FLOCK" { text += " [\(kind)]" }
            return text
        }
    }

    var file: String
    var info: FileInfo?
    var holders: [Party] = []
    var waiting: [Party] = []
    var problem: String?

    var json: JSON {
        // As /proc/locks prints it: hexadecimal, at least two digits each.
        let device = info.map { String(format: "%02llx:%02llx", $0.deviceNumbers.major, $0.deviceNumbers.minor) }
        return .object([
            ("file", .string(file)),
            ("type", .from(info?.kind.rawValue)),
            ("device", .from(device)),
            ("inode", info.map { .int(Int64($0.inode)) } ?? .null),
            ("held", .bool(!holders.isEmpty)),
            ("holders", .array(holders.map(\.json))),
            ("waiters", .int(Int64(waiting.count))),
            ("waiting", .array(waiting.map(\.json))),
            ("error", .from(problem)),
        ])
    }

    var human: String {
        if let problem { return "unreadable: \(problem)" }
        var text: String
        if holders.isEmpty {
            text = "free"
        } else {
            text = "held by " + holders.map { holder in
                var part = holder.human
                if let origin = holder.origin { part += ", refreshing as \(Display.name(origin))" }
                part += holder.since.map { " since \(Display.time($0)) (\(Display.relative($0)))" } ?? ", since unknown"
                return part
            }.joined(separator: "; ")
        }
        if !waiting.isEmpty {
            text += "; \(waiting.count) waiting: " + waiting.map(\.human).joined(separator: ", ")
        }
        if let info, info.kind != .regular { text += " (a \(info.kind.phrase), not a regular file)" }
        return text
    }
}
