import ArgumentParser
import ExampleSupport
import Foundation
import TabSync
import TabSyncAuth

#if canImport(Glibc)
import Glibc
#endif

/// `tabsync status DIR`: each storage, and the session's state. Never a token or a value of the
/// session storage: the session is read through ``AuthSession/status()``.
struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Each storage with its sequence number, number of keys and change detection, and the session's state.")

    @OptionGroup var options: DirectoryOptions

    func run() async throws {
        let path = options.path
        let directory = Storages.directoryOrFail(path)
        let entries: [String]
        switch directoryEntries(path) {
        case let .success(names): entries = names
        case let .failure(error): fail("cannot list \(path): \(error)")
        }
        var storages: [StorageStatus] = []
        var session: SessionSummary?
        for name in storageNames(in: entries) {
            switch Storages.open(name, in: directory) {
            case let .success(storage):
                storages.append(StorageStatus(name: name, storage: storage))
                if name == "session" { session = SessionSummary(storage: storage) }
                storage.close()
            case let .failure(problem):
                storages.append(StorageStatus(name: name, problem: problem))
                if name == "session" { session = SessionSummary(problem: problem) }
            }
        }
        // A storage still in a format 1 state file: opening it would upgrade it (a write).
        let logs = Set(storageNames(in: entries))
        for name in legacyStateNames(in: entries) where !logs.contains(name) {
            guard LegacyStateProbe.read(join(path, name + ".state")).verdict == .format1 else { continue }
            let problem = StorageProblem(
                code: "format1",
                message: "A format 1 state file (\(name).state), not opened: the next TabSync process that opens it upgrades it to \(name).log")
            storages.append(StorageStatus(name: name, problem: problem))
            if name == "session" { session = SessionSummary(problem: problem) }
        }
        storages.sort { $0.name < $1.name }
        let output = LineOutput(json: options.json)
        if options.json {
            output.write(JSON.object([
                ("directory", .string(path)),
                ("storages", .array(storages.map(\.json))),
                ("session", session?.json ?? .null),
            ]).encoded)
            return
        }
        output.write("directory \(Display.name(path))")
        if storages.isEmpty { output.write("  no storage (no NAME.log file)") }
        let width = storages.map { Display.name($0.name).count }.max() ?? 0
        for storage in storages {
            let name = Display.name(storage.name)
            output.write("  \(name)\(String(repeating: " ", count: width - name.count))  \(storage.human)")
        }
        output.write(session?.human ?? "session: none (no session.log)")
    }
}

struct StorageStatus {
    var name: String
    var sequence: UInt64?
    var keys: Int?
    var detection: ChangeDetection?
    var recovery: String?
    var problem: StorageProblem?

    init(name: String, problem: StorageProblem) {
        self.name = name
        self.problem = problem
    }

    init(name: String, storage: SharedStorage) {
        self.name = name
        do {
            let snapshot = try storage.backend.snapshot()
            sequence = snapshot.position.sequence
            keys = snapshot.values.count
            recovery = snapshot.recovery
            detection = storage.changeDetection
        } catch {
            problem = StorageProblem(code: error.code.description, message: error.description)
        }
    }

    var json: JSON {
        .object([
            ("name", .string(name)),
            ("seq", sequence.map { .int(Int64($0)) } ?? .null),
            ("keys", .from(keys)),
            ("changeDetection", detection.map(Self.json) ?? .null),
            ("recovery", .from(recovery)),
            ("error", problem.map { .object([("code", .string($0.code)), ("message", .string($0.message))]) } ?? .null),
        ])
    }

    static func json(_ detection: ChangeDetection) -> JSON {
        switch detection {
        case .inotify:
            .object([("mode", .string("inotify"))])
        case let .polling(interval, reason):
            .object([("mode", .string("polling")), ("intervalMs", .int(milliseconds(interval))), ("reason", .string(reason))])
        case let .notifications(channel):
            .object([("mode", .string("notifications")), ("channel", .string(channel))])
        case let .reconnecting(reason):
            .object([("mode", .string("reconnecting")), ("reason", .string(reason))])
        }
    }

    static func milliseconds(_ duration: Duration) -> Int64 {
        duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000
    }

    var human: String {
        if let problem { return "not opened: \(Display.escaped(problem.message)) [\(problem.code)]" }
        var text = "seq \(sequence ?? 0), \(Display.plural(keys ?? 0, "key")), "
        switch detection {
        case .inotify?: text += "inotify"
        case let .polling(interval, reason)?: text += "polling every \(Self.milliseconds(interval)) ms (\(Display.escaped(reason)))"
        case let .notifications(channel)?: text += "notifications on \(Display.escaped(channel))"
        case let .reconnecting(reason)?: text += "reconnecting (\(Display.escaped(reason)))"
        case nil: text += "detection unknown"
        }
        if let recovery { text += "; recovered: \(Display.escaped(recovery))" }
        return text
    }
}

/// The session's state as ``AuthSession/status()`` gives it: no token, no record.
struct SessionSummary {
    var status: SessionStatus?
    var problem: StorageProblem?

    init(problem: StorageProblem) {
        self.problem = problem
    }

    init(storage: SharedStorage) {
        do {
            status = try AuthSession(storage: storage, client: nil).status()
        } catch {
            problem = StorageProblem(code: "\(error.code)", message: error.message)
        }
    }

    var json: JSON {
        guard let status else {
            return .object([
                ("state", .null), ("reason", .null), ("expiresAt", .null), ("hasValidToken", .null), ("seq", .null), ("refresh", .null),
                ("error", problem.map { .object([("code", .string($0.code)), ("message", .string($0.message))]) } ?? .null),
            ])
        }
        return .object([
            ("state", .string(status.isSignedIn ? "signedIn" : "signedOut")),
            ("reason", .from(status.reason?.rawValue)),
            ("expiresAt", .time(status.expiresAt)),
            ("hasValidToken", .bool(status.hasValidToken)),
            ("seq", .int(Int64(status.sequence))),
            ("refresh", status.refresh.map { refresh in
                .object([
                    ("origin", .string(refresh.origin)), ("pid", .int(Int64(refresh.pid))), ("since", .time(refresh.since)),
                    ("running", .bool(Self.isRunning(refresh.pid))),
                ])
            } ?? .null),
            ("error", .null),
        ])
    }

    var human: String {
        guard let status else { return "session: unknown: \(Display.escaped(problem?.message ?? "")) [\(problem?.code ?? "")]" }
        var parts: [String] = []
        if status.isSignedIn {
            var signedIn = "signed in"
            if let expiresAt = status.expiresAt {
                signedIn += ", access token expires \(Display.time(expiresAt)) (\(Display.relative(expiresAt)))"
            }
            signedIn += status.hasValidToken ? ", valid" : ", to be refreshed (within the 30 s leeway or expired)"
            parts.append(signedIn)
        } else {
            parts.append("signed out" + (status.reason.map { ", reason \($0.rawValue)" } ?? ""))
        }
        if let refresh = status.refresh {
            parts.append(
                "refresh in progress by \(Display.name(refresh.origin)) (pid \(refresh.pid)\(Self.isRunning(refresh.pid) ? "" : ", no longer running"))"
                    + " since \(Display.time(refresh.since)) (\(Display.relative(refresh.since)))")
        } else {
            parts.append("no refresh in progress")
        }
        return "session: " + parts.joined(separator: "; ") + " (seq \(status.sequence))"
    }

    /// Whether a process of that pid exists (seen from this pid namespace).
    static func isRunning(_ pid: Int32) -> Bool {
        pid > 0 && (kill(pid, 0) == 0 || errno == EPERM)
    }
}
