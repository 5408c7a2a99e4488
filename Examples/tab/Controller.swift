import ExampleSupport
import Foundation
import TabSync
import TabSyncAuth
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Runs one tab: prints storage and session events, and carries out commands in two lanes,
/// each in the order of its commands: the session's commands (`login`, `adopt`, `token`,
/// `logout`, `activity`, `status`), which may wait for the network or another process, and the
/// storage's (`set`, `get`, `remove`, `clear`), which never wait behind them. `quit` and the end
/// of input end the tab at once, whatever is pending.
struct Controller: Sendable {
    let app: SharedStorage
    let session: AuthSession
    let output: Output
    let name: String

    func run() async {
        // Subscribe before announcing readiness: a change after `ready` is always observed.
        let storageNotifications = app.notifications()
        let sessionEvents = session.events()
        let (sessionLane, sessionCommands) = AsyncStream.makeStream(of: String.self)
        // Each session command runs in a task of its own, started on the lane's thread: `quit`
        // cancels the one running and every one after it, while the lane itself is not
        // cancelled and so still takes every command given before `quit` (a cancelled task's
        // `for await` over a stream ends at once, dropping what is buffered).
        let lane = Mutex<(running: Task<Void, Never>?, quitting: Bool)>((nil, false))
        let sessionTask = Task {
            for await line in sessionLane {
                let command = Task.immediate { await execute(line) }
                if lane.withLock({ state in state.running = command; return state.quitting }) { command.cancel() }
                await command.value
            }
        }
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await printStorage(storageNotifications) }
            group.addTask { await printSession(sessionEvents) }
            group.addTask { await session.run() }
            output.emit([("type", .string("ready")), ("tab", .string(name)), ("pid", .int(Int64(getpid())))])
            // Polling from the start (inotify unavailable) is reported like a later fallback.
            if case .polling = app.changeDetection { reportDetection(app.changeDetection) }
            // Input is read from here on, so that `ready` is the first line, before any reply.
            let commands = Self.standardInputLines(sessionCommands: sessionCommands)
            for await line in commands {
                if line == "quit" { break }
                await execute(line)
            }
            // At once, and without dropping what was typed before: the session lane's waits
            // (a pending `token` or `login`) are cancelled and end within milliseconds, the
            // commands queued behind them still run (`adopt`, `status`…), then the tab exits.
            // A refresh cut short this way leaves its marker, and the next refresher ends the
            // session rather than present a token that may have been rotated. `_exit`: other
            // threads are still running, and output is written unbuffered.
            sessionCommands.finish()
            lane.withLock { state in
                state.quitting = true
                return state.running
            }?.cancel()
            await sessionTask.value
            _exit(0)
        }
    }

    /// Whether `word` is a command of the session lane. A switch, not a `Set<Substring>`: the
    /// set's generic type was built at the first command, a storm's `token`, and that cost a
    /// tab 0.2 ms of run-time type lookups just when every tab asks at once.
    static func isSessionCommand(_ word: Substring) -> Bool {
        switch word {
        case "login", "adopt", "token", "logout", "activity", "status": true
        default: false
        }
    }

    // MARK: Events

    private func printStorage(_ notifications: AsyncStream<StorageNotification>) async {
        for await notification in notifications {
            switch notification {
            case let .change(event):
                // A tab that fell further behind than the journal reaches gets one event per key
                // that differs, all at the newest `seq`: marked, so that a reader of the protocol
                // can tell them from the replay of single changes.
                output.emit([
                    ("type", .string("storage")), ("key", .from(event.key)), ("oldValue", .from(event.oldValue)),
                    ("newValue", .from(event.newValue)), ("origin", .string(event.origin)), ("seq", .unsigned(event.sequence)),
                ] + (event.isResync ? [("resync", .bool(true))] : []))
            case let .problem(error):
                output.emit([("type", .string("error")), ("code", .string(Self.code(error))), ("message", .string(error.description))])
            case let .detectionChanged(detection):
                reportDetection(detection)
            }
        }
    }

    private func reportDetection(_ detection: ChangeDetection) {
        switch detection {
        case .notifications:
            output.emit([("type", .string("detection")), ("mode", .string("notifications"))])
        case .reconnecting:
            output.emit([("type", .string("error")), ("code", .string("unavailable")), ("message", .string("change detection: \(detection)"))])
        case .inotify, .polling:
            output.emit([("type", .string("error")), ("code", .string("watcherUnavailable")), ("message", .string("change detection: \(detection)"))])
        }
    }

    private func printSession(_ events: AsyncStream<SessionEvent>) async {
        for await event in events {
            switch event {
            case let .signedIn(origin, sequence):
                output.emit(sessionLine("signedIn", origin: origin, reason: nil, sequence: sequence))
            case let .refreshed(origin, sequence):
                output.emit(sessionLine("refreshed", origin: origin, reason: nil, sequence: sequence))
            case let .signedOut(reason, origin, sequence):
                output.emit(sessionLine("signedOut", origin: origin, reason: reason.rawValue, sequence: sequence))
            case let .expiring(duration, reason):
                let seconds = max(0, Int64((Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18).rounded()))
                output.emit([("type", .string("sessionExpiring")), ("in", .int(seconds)), ("reason", .string(reason.rawValue))])
            case let .problem(error):
                output.emit([("type", .string("error")), ("code", .string(Self.code(error))), ("message", .string(error.message))])
            }
        }
    }

    private func sessionLine(_ state: String, origin: String, reason: String?, sequence: UInt64) -> [(String, JSON)] {
        [("type", .string("session")), ("state", .string(state)), ("origin", .string(origin)), ("reason", .from(reason)), ("seq", .unsigned(sequence))]
    }

    // MARK: Commands

    private func execute(_ line: String) async {
        // Bytes, not `String.contains(_:)`: with Foundation imported that is NSString's search,
        // a good part of a `token` command's time in a storm.
        if line == Self.invalidLine || line.utf8.contains(0) {
            failure("", code: "badCommand", message: "the line is not valid UTF-8 text")
            return
        }
        let words = line.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
        let command = words.first ?? ""
        let argument = words.count > 1 ? words[1] : ""
        do {
            switch command {
            case "set":
                let parts = argument.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
                guard parts.count == 2, !parts[0].isEmpty else { throw BadCommand("usage: set KEY VALUE") }
                let sequence = try await app.set(parts[0], parts[1])
                ok(command, sequence: sequence)
            case "get":
                guard !argument.isEmpty, !argument.utf8.contains(UInt8(ascii: " ")) else { throw BadCommand("usage: get KEY") }
                output.emit([("type", .string("value")), ("key", .string(argument)), ("value", .from(try app.get(argument)))])
            case "remove":
                guard !argument.isEmpty, !argument.utf8.contains(UInt8(ascii: " ")) else { throw BadCommand("usage: remove KEY") }
                ok(command, sequence: try await app.remove(argument))
            case "clear":
                guard argument.isEmpty else { throw BadCommand("usage: clear") }
                ok(command, sequence: try await app.clear())
            case "locks":
                guard argument.isEmpty else { throw BadCommand("usage: locks") }
                let reports = [("app", app.queryLocks()), ("session", session.storage.queryLocks())]
                output.emit([("type", .string("locks")), ("locks", .array(reports.flatMap { storage, locks in
                    locks.map { Self.describe($0, storage: storage) }
                }))])
            case "login":
                let parts = argument.split(separator: " ", maxSplits: 1).map(String.init)
                guard parts.count == 2 else { throw BadCommand("usage: login USER PASSWORD") }
                try await session.signIn(username: parts[0], password: parts[1])
                ok(command)
            case "adopt":
                let parts = argument.split(separator: " ").map(String.init)
                guard parts.count == 3, let expiresIn = Int(parts[2]) else { throw BadCommand("usage: adopt ACCESS REFRESH EXPIRES_IN") }
                try session.adopt(accessToken: parts[0], refreshToken: parts[1], expiresIn: expiresIn)
                ok(command)
            case "token":
                guard argument.isEmpty else { throw BadCommand("usage: token") }
                let token = try await session.accessToken()
                output.emit([
                    ("type", .string("token")), ("accessToken", .string(token.value)),
                    ("expiresAt", .int(Int64(token.expiresAt.timeIntervalSince1970 * 1000))), ("refreshedHere", .bool(token.refreshedHere)),
                ])
            case "logout":
                guard argument.isEmpty else { throw BadCommand("usage: logout") }
                try await session.signOut(reason: .userLogout)
                ok(command)
            case "activity":
                guard argument.isEmpty else { throw BadCommand("usage: activity") }
                try session.recordActivity()
                ok(command)
            case "status":
                guard argument.isEmpty else { throw BadCommand("usage: status") }
                let status = try session.status()
                output.emit([
                    ("type", .string("status")), ("state", .string(status.isSignedIn ? "signedIn" : "signedOut")),
                    ("expiresAt", .from(status.expiresAt.map { Int64($0.timeIntervalSince1970 * 1000) })),
                    ("reason", .from(status.reason?.rawValue)), ("seq", .unsigned(status.sequence)),
                    ("refreshing", status.refresh.map(Self.describe) ?? .null),
                ])
            default:
                throw BadCommand("unknown command '\(command)'; commands: set get remove clear locks login adopt token logout activity status quit")
            }
        } catch let error as BadCommand {
            failure(command, code: "badCommand", message: error.message)
        } catch let error as TabSyncError {
            failure(command, code: Self.code(error), message: error.description, holders: error.holders)
        } catch let error as AuthError {
            failure(command, code: Self.code(error), message: error.message, refresher: error.refresher)
        } catch is CancellationError {
            return
        } catch {
            failure(command, code: "internal", message: "\(error)")
        }
    }

    /// One lock's holders and waiters, for `locks` and `lockTimeout` errors.
    static func describe(_ report: LockReport, storage: String) -> JSON {
        .object([
            ("storage", .string(storage)), ("name", .string(report.name)), ("path", .string(report.path)),
            ("holders", .array(report.holders.map(describe))), ("waiters", .int(Int64(report.waiters.count))),
        ])
    }

    static func describe(_ holder: LockHolder) -> JSON {
        .object([("pid", .int(Int64(holder.pid))), ("command", .string(holder.command)), ("state", .string(holder.state.rawValue))])
    }

    /// A refresh in progress, for `status` and `refreshTimeout` errors: never a token.
    static func describe(_ refresh: RefreshInProgress) -> JSON {
        .object([
            ("origin", .string(refresh.origin)), ("pid", .int(Int64(refresh.pid))), ("state", .string(refresh.processState.rawValue)),
            ("since", .int(Int64(refresh.since.timeIntervalSince1970 * 1000))),
        ])
    }

    private func ok(_ command: String, sequence: UInt64? = nil) {
        var fields: [(String, JSON)] = [("type", .string("ok")), ("cmd", .string(command))]
        if let sequence { fields.append(("seq", .unsigned(sequence))) }
        output.emit(fields)
    }

    private func failure(_ command: String, code: String, message: String, refresher: RefreshInProgress? = nil, holders: [LockHolder] = []) {
        output.emit([("type", .string("error")), ("cmd", .string(command)), ("code", .string(code)), ("message", .string(message))]
            + (refresher.map { [("refresher", Self.describe($0))] } ?? [])
            + (holders.isEmpty ? [] : [("holders", .array(holders.map(Self.describe)))]))
    }

    static func code(_ error: TabSyncError) -> String {
        switch error.code {
        case .corruptState: "corruptState"
        case .storageFull: "storageFull"
        case .unsupportedVersion: "unsupportedVersion"
        case .stateTooLarge: "stateTooLarge"
        case .insecurePath, .notRegularFile: "insecurePath"
        case .lockTimeout: "lockTimeout"
        case .directoryChanged: "directoryChanged"
        case .storeVanished: "storeVanished"
        case .unavailable: "unavailable"
        default: "storage"
        }
    }

    static func code(_ error: AuthError) -> String {
        if let storage = error.storage { return code(storage) }
        switch error.code {
        case .signedOut: return "signedOut"
        case .refreshFailed: return "refreshFailed"
        case .network: return "network"
        case .invalidCredentials: return "invalidCredentials"
        case .invalidClient: return "invalidClient"
        case .invalidConfiguration: return "notConfigured"
        case .unanswered: return "unanswered"
        case .invalidRecord: return "invalidRecord"
        case .invalidResponse: return "invalidResponse"
        case .refreshTimeout: return "refreshTimeout"
        case .cancelled: return "cancelled"
        default: return "server"
        }
    }

    /// Standard input, a line at a time, read on a thread of its own. A line that is not valid
    /// UTF-8 comes as ``invalidLine`` (answered `badCommand`), never silently repaired.
    static func standardInputLines(sessionCommands: AsyncStream<String>.Continuation) -> AsyncStream<String> {
        AsyncStream { continuation in
            let thread = Thread {
                var pending: [UInt8] = []
                var buffer = [UInt8](repeating: 0, count: 65_536)
                var quit = false
                func deliver(_ bytes: ArraySlice<UInt8>) {
                    guard !quit else { return }
                    var line = bytes
                    if line.last == UInt8(ascii: "\r") { line = line.dropLast() }
                    let text = String(validating: line, as: UTF8.self) ?? invalidLine
                    // Straight to the session lane, not through the storage lane's task: one
                    // hop between threads fewer for a storm's `token`. Nothing after `quit`.
                    if isSessionCommand(text.prefix { $0 != " " }) {
                        sessionCommands.yield(text)
                    } else {
                        quit = text == "quit"
                        continuation.yield(text)
                    }
                }
                while !quit {
                    let count = buffer.withUnsafeMutableBytes { Glibc.read(STDIN_FILENO, $0.baseAddress, $0.count) }
                    if count < 0, errno == EINTR { continue }
                    if count <= 0 { break }
                    pending += buffer[0..<count]
                    var start = pending.startIndex
                    while let newline = pending[start...].firstIndex(of: UInt8(ascii: "\n")) {
                        deliver(pending[start..<newline])
                        start = newline + 1
                    }
                    pending.removeSubrange(pending.startIndex..<start)
                }
                if !pending.isEmpty { deliver(pending[...]) }
                continuation.finish()
            }
            thread.name = "tab.stdin"
            thread.start()
        }
    }

    /// Stands for a line of input that is not valid UTF-8. It starts with a NUL, which no
    /// command has (a line that contains one is refused as well).
    static let invalidLine = "\u{0}invalid"
}

struct BadCommand: Error {
    let message: String
    init(_ message: String) { self.message = message }
}
