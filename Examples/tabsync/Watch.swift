import ArgumentParser
import ExampleSupport
import Foundation
import TabSync

#if canImport(Glibc)
import Glibc
#endif

/// `tabsync watch DIR`: every change of every storage as it arrives, like `tab` without commands,
/// until killed. Storages created later are found and followed from their first change. For the
/// `session` storage only the key, the origin and the sequence number are printed, never values.
struct Watch: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Follows every change of every storage as it arrives, until killed (one JSON object per line with --json).")

    @OptionGroup var options: DirectoryOptions

    func run() async throws {
        let path = options.path
        let directory = Storages.directoryOrFail(path)
        let printer = EventPrinter(output: LineOutput(json: options.json))
        // Watch the directory before the first scan, so that no storage created meanwhile is missed.
        let arrivals = DirectoryWatch.names(in: path)
        var followers = Followers(directory: directory, printer: printer)
        await withTaskGroup(of: Void.self) { group in
            for followed in followers.scan(replaying: false) {
                group.addTask { await printer.follow(followed) }
            }
            printer.ready(directory: path, storages: followers.followed.sorted())
            for await name in arrivals {
                if let name, !name.hasSuffix(".log") { continue }
                for followed in followers.scan(only: name.map { String($0.dropLast(".log".count)) }, replaying: true) {
                    group.addTask { await printer.follow(followed) }
                }
            }
        }
    }
}

/// A storage being followed: its notifications, and the sequence number up to which its changes
/// were already printed (from its journal, when it was found after the start).
struct Followed: Sendable {
    var name: String
    var storage: SharedStorage
    var notifications: AsyncStream<StorageNotification>
    var printedUpTo: UInt64
}

/// The storages of the directory being followed, and those that could not be opened.
struct Followers {
    let directory: SessionDirectory
    let printer: EventPrinter
    private(set) var followed: Set<String> = []
    private var problems: [String: StorageProblem] = [:]

    init(directory: SessionDirectory, printer: EventPrinter) {
        self.directory = directory
        self.printer = printer
    }

    /// Opens the storages not followed yet (all of them, or the one named). A storage found after
    /// the start has its journal printed first: the changes it had before it was found.
    mutating func scan(only name: String? = nil, replaying: Bool) -> [Followed] {
        let names: [String]
        if let name {
            guard isValidName(name), !followed.contains(name) else { return [] }
            names = [name]
        } else {
            guard case let .success(entries) = directoryEntries(directory.path) else { return [] }
            names = storageNames(in: entries).filter { !followed.contains($0) }
        }
        var started: [Followed] = []
        for name in names {
            guard FileInfo.lstat(join(directory.path, name + ".log")).isSuccess else { continue }
            switch Storages.open(name, in: directory) {
            case let .success(storage):
                followed.insert(name)
                problems[name] = nil
                // Subscribed before the journal is read: a change in between comes both ways,
                // and `printedUpTo` drops the second.
                let notifications = storage.notifications()
                var printedUpTo: UInt64 = 0
                if replaying, let document = try? (storage.backend as? FileBackend)?.load() {
                    printer.found(name, sequence: document.sequence)
                    for entry in document.journal {
                        printer.change(name, StorageEvent(
                            key: entry.key, oldValue: entry.oldValue, newValue: entry.newValue, origin: entry.origin, sequence: entry.sequence))
                    }
                    printedUpTo = document.sequence
                }
                started.append(Followed(name: name, storage: storage, notifications: notifications, printedUpTo: printedUpTo))
            case let .failure(problem):
                // Reported once per distinct problem; tried again when the file changes.
                if problems[name] != problem { printer.problem(name, code: problem.code, message: problem.message) }
                problems[name] = problem
            }
        }
        return started
    }
}

extension Result {
    var isSuccess: Bool {
        if case .success = self { return true }
        return false
    }
}

/// Prints what `watch` sees: `tab`'s `storage` events with the storage's name, and its own lines
/// (`ready`, `storageFound`, `error`, `changeDetection`).
final class EventPrinter: Sendable {
    let output: LineOutput

    init(output: LineOutput) {
        self.output = output
    }

    func follow(_ followed: Followed) async {
        var printedUpTo = followed.printedUpTo
        for await notification in followed.notifications {
            switch notification {
            case let .change(event):
                if !event.isResync, event.sequence <= printedUpTo { continue }
                // A resync starts a new store, whose sequence numbers may start again.
                if event.isResync { printedUpTo = 0 }
                change(followed.name, event)
            case let .problem(error):
                problem(followed.name, code: error.code.description, message: error.description)
            case let .detectionChanged(detection):
                self.detection(followed.name, detection)
            }
        }
    }

    func ready(directory: String, storages: [String]) {
        output.emit(
            [("type", .string("ready")), ("directory", .string(directory)), ("storages", .array(storages.map(JSON.string))), ("pid", .int(Int64(getpid())))],
            human: "watching \(Display.name(directory)): \(storages.isEmpty ? "no storage yet" : storages.map(Display.name).joined(separator: ", ")) (pid \(getpid()); Ctrl-C to stop)")
    }

    func found(_ storage: String, sequence: UInt64) {
        output.emit(
            [("type", .string("storageFound")), ("storage", .string(storage)), ("seq", .int(Int64(sequence)))],
            human: "\(Display.name(storage)): found (seq \(sequence))")
    }

    /// A change. The `session` storage holds the tokens: its values are never printed.
    func change(_ storage: String, _ event: StorageEvent) {
        let hidden = storage == "session"
        var fields: [(String, JSON)] = [("type", .string("storage")), ("storage", .string(storage)), ("key", .from(event.key))]
        if !hidden { fields += [("oldValue", .from(event.oldValue)), ("newValue", .from(event.newValue))] }
        fields += [("origin", .string(event.origin)), ("seq", .int(Int64(event.sequence)))]
        if event.isResync { fields.append(("resync", .bool(true))) }
        output.emit(fields, human: {
            var line = "\(Display.name(storage)): "
            if let key = event.key {
                line += Display.name(key) + " "
                line += hidden ? "changed (value not shown)" : "\(Display.value(event.oldValue)) -> \(Display.value(event.newValue))"
            } else {
                line += "(clear)"
            }
            line += " by \(Display.name(event.origin)) (seq \(event.sequence))"
            return event.isResync ? line + " [resync]" : line
        }())
    }

    func problem(_ storage: String, code: String, message: String) {
        output.emit(
            [("type", .string("error")), ("storage", .string(storage)), ("code", .string(code)), ("message", .string(message))],
            human: "\(Display.name(storage)): error \(code): \(Display.escaped(message))")
    }

    func detection(_ storage: String, _ detection: ChangeDetection) {
        var fields: [(String, JSON)] = [("type", .string("changeDetection")), ("storage", .string(storage))]
        switch detection {
        case .inotify:
            fields.append(("mode", .string("inotify")))
        case let .polling(interval, reason):
            fields += [("mode", .string("polling")), ("intervalMs", .int(StorageStatus.milliseconds(interval))), ("reason", .string(reason))]
        case let .notifications(channel):
            fields += [("mode", .string("notifications")), ("channel", .string(channel))]
        case let .reconnecting(reason):
            fields += [("mode", .string("reconnecting")), ("reason", .string(reason))]
        }
        output.emit(fields, human: "\(Display.name(storage)): change detection now \(Display.escaped(detection.description))")
    }
}

/// The names of files that appear or change in a directory (nil: look at everything), from an
/// inotify instance of the tool's own. It does not use libinotifytools, which TabSync's watcher
/// owns in this process (README, rule 1). Without inotify, the directory is looked at every second.
///
/// A log appears by rename (`IN_MOVED_TO`), and changes in place: appended to, or cut back to its
/// last complete commit (`IN_MODIFY`), which is when a log that could not be opened may have been
/// repaired; a mode or owner put right shows as `IN_ATTRIB`.
enum DirectoryWatch {
    static func names(in path: String) -> AsyncStream<String?> {
        AsyncStream { continuation in
            let fd = inotify_init1(Int32(IN_CLOEXEC))
            let mask = UInt32(IN_CREATE) | UInt32(IN_MOVED_TO) | UInt32(IN_MODIFY) | UInt32(IN_ATTRIB) | UInt32(IN_ONLYDIR)
            guard fd >= 0, inotify_add_watch(fd, path, mask) >= 0 else {
                if fd >= 0 { close(fd) }
                let task = Task {
                    while !Task.isCancelled {
                        try? await Task.sleep(for: .seconds(1))
                        continuation.yield(nil)
                    }
                }
                continuation.onTermination = { _ in task.cancel() }
                return
            }
            let thread = Thread {
                var buffer = [UInt8](repeating: 0, count: 64 * 1024)
                while true {
                    let count = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, $0.count) }
                    if count < 0, errno == EINTR { continue }
                    guard count > 0 else { break }
                    for name in parse(buffer[..<count]) { continuation.yield(name) }
                }
                close(fd)
                continuation.finish()
            }
            thread.name = "tabsync.watch-directory"
            thread.start()
        }
    }

    /// `struct inotify_event { int wd; uint32_t mask, cookie, len; char name[len]; }`, one after another.
    static func parse(_ bytes: ArraySlice<UInt8>) -> [String?] {
        var names: [String?] = []
        var offset = bytes.startIndex
        while offset + 16 <= bytes.endIndex {
            let (mask, length) = bytes.withUnsafeBytes { raw in
                (raw.loadUnaligned(fromByteOffset: offset - bytes.startIndex + 4, as: UInt32.self),
                 Int(raw.loadUnaligned(fromByteOffset: offset - bytes.startIndex + 12, as: UInt32.self)))
            }
            let start = offset + 16
            let end = min(start + length, bytes.endIndex)
            if mask & UInt32(IN_Q_OVERFLOW) != 0 {
                names.append(nil)
            } else if length > 0 {
                names.append(String(decoding: bytes[start..<end].prefix { $0 != 0 }, as: UTF8.self))
            }
            offset = end
        }
        return names
    }
}
