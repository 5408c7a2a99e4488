import ArgumentParser
import ExampleSupport
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// `tabsync doctor DIR`: what TabSync would refuse in a directory and why, and what makes it
/// unreliable there. Exits 0 when TabSync would refuse nothing, 1 otherwise. Reads only: it
/// opens no storage and changes nothing.
struct Doctor: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Permissions, ownership, file system, inotify limits and format versions: what TabSync would refuse, and why.",
        discussion: "Exits 0 when TabSync would refuse nothing, 1 otherwise.")

    @OptionGroup var options: DirectoryOptions

    /// Something to say about a path.
    struct Finding {
        var path: String
        var reason: String
        var json: JSON { .object([("path", .string(path)), ("reason", .string(reason))]) }
        var human: String { "\(Display.name(path)): \(Display.escaped(reason))" }
    }

    func run() async throws {
        let path = options.path
        let euid = geteuid()
        var refused: [Finding] = []
        var warnings: [Finding] = []

        // The directory.
        let directory = FileInfo.lstat(path)
        var isDirectory = false
        switch directory {
        case let .failure(error) where error.errno == ENOENT:
            warnings.append(Finding(path: path, reason: "does not exist: TabSync creates it, and its missing parents, with mode 0700"))
        case let .failure(error):
            refused.append(Finding(path: path, reason: "cannot be examined (\(error)); TabSync could not open it either"))
        case let .success(info):
            isDirectory = info.kind == .directory
            refused += info.directoryRefusals(euid: euid).map { Finding(path: path, reason: $0) }
            if isDirectory, info.permissions & 0o055 != 0, info.permissions & 0o022 == 0 {
                warnings.append(Finding(
                    path: path,
                    reason: "its mode \(info.octalMode) lets others list the file names (TabSync allows it: the files themselves are 0600; 0700 hides the names too)"))
            }
        }

        // The file system (of the nearest existing ancestor when the directory is missing).
        var existing = path
        while case .failure = FileInfo.lstat(existing), existing != "/" {
            existing = (existing as NSString).deletingLastPathComponent
        }
        let fileSystem = try? FileSystemType.of(existing).get()
        if let fileSystem, fileSystem.isRemote {
            warnings.append(Finding(
                path: path,
                reason: "on \(fileSystem.name), inotify sees only this machine's changes (TabSync polls every 250 ms) and flock may not exclude other machines: keep the session directory on a local disk or tmpfs ($XDG_RUNTIME_DIR)"))
        }

        // inotify limits and what this user has in use.
        let limits = (
            instances: Proc.number("/proc/sys/fs/inotify/max_user_instances"),
            watches: Proc.number("/proc/sys/fs/inotify/max_user_watches"),
            queued: Proc.number("/proc/sys/fs/inotify/max_queued_events"))
        let usage = Proc.inotifyUsage(uid: euid)
        if let maximum = limits.instances, Int64(usage.descriptors) >= maximum {
            warnings.append(Finding(
                path: "/proc/sys/fs/inotify/max_user_instances",
                reason: "this user has \(usage.descriptors) inotify descriptors open, the limit is \(maximum): a new TabSync process may find none and poll"))
        }
        if let maximum = limits.watches, Int64(usage.watches) * 10 >= maximum * 9 {
            warnings.append(Finding(
                path: "/proc/sys/fs/inotify/max_user_watches",
                reason: "this user has \(usage.watches) of \(maximum) inotify watches in use: a new TabSync process may find none and poll"))
        }

        // The files.
        var files: [FileReport] = []
        var otherFiles = 0
        if isDirectory {
            switch directoryEntries(path) {
            case let .failure(error):
                refused.append(Finding(path: path, reason: "its entries cannot be listed (\(error))"))
            case let .success(entries):
                let logs = Set(storageNames(in: entries))
                let storages = logs.union(legacyStateNames(in: entries))
                for name in entries {
                    let report = FileReport(directory: path, name: name, euid: euid, storages: storages, logs: logs)
                    guard report.role != .other else {
                        otherFiles += 1
                        continue
                    }
                    refused += report.refusals.map { Finding(path: join(path, name), reason: $0) }
                    warnings += report.warnings.map { Finding(path: join(path, name), reason: $0) }
                    files.append(report)
                }
            }
        }

        let output = LineOutput(json: options.json)
        let info = try? directory.get()
        if options.json {
            output.write(JSON.object([
                ("directory", .object([
                    ("path", .string(path)), ("exists", .bool(info != nil)), ("type", .from(info?.kind.rawValue)),
                    ("mode", .from(info?.octalMode)), ("uid", info.map { .int(Int64($0.uid)) } ?? .null),
                    ("owner", .from(info.map { User.name($0.uid) })), ("gid", info.map { .int(Int64($0.gid)) } ?? .null),
                    ("group", .from(info.map { User.groupName($0.gid) })),
                ])),
                ("checkedUid", .int(Int64(euid))),
                ("fileSystem", fileSystem.map { fs in
                    .object([
                        ("type", .string(fs.name)), ("mountPoint", .string(fs.mountPoint)), ("source", .string(fs.source)), ("remote", .bool(fs.isRemote)),
                        ("inotifyReliable", .bool(!fs.isRemote)), ("flockReliable", .bool(!fs.isRemote)),
                    ])
                } ?? .null),
                ("inotify", .object([
                    ("maxUserInstances", .from(limits.instances)), ("maxUserWatches", .from(limits.watches)),
                    ("maxQueuedEvents", .from(limits.queued)), ("descriptorsInUse", .int(Int64(usage.descriptors))),
                    ("watchesInUse", .int(Int64(usage.watches))), ("processes", .int(Int64(usage.processes))),
                    ("processesNotInspected", .int(Int64(usage.processesNotInspected))),
                ])),
                ("files", .array(files.map(\.json))),
                ("otherFiles", .int(Int64(otherFiles))),
                ("refused", .array(refused.map(\.json))),
                ("warnings", .array(warnings.map(\.json))),
                ("ok", .bool(refused.isEmpty)),
            ]).encoded)
        } else {
            if let info {
                output.write("directory \(Display.name(path)): \(info.kind.phrase), mode \(info.octalMode), owner \(Display.name(User.name(info.uid))) (uid \(info.uid)), group \(Display.name(User.groupName(info.gid))) (gid \(info.gid)); checked for uid \(euid)")
            } else {
                output.write("directory \(Display.name(path)): missing; checked for uid \(euid)")
            }
            if let fs = fileSystem {
                let yes = fs.isRemote ? "no" : "yes"
                output.write("file system: \(Display.name(fs.name)) (\(Display.name(fs.source)) on \(Display.name(fs.mountPoint))), \(fs.isRemote ? "remote or user-space" : "local"): inotify reliable \(yes), flock reliable \(yes)")
            } else {
                output.write("file system: unknown (not found in /proc/self/mountinfo)")
            }
            func number(_ value: Int64?) -> String { value.map(String.init) ?? "?" }
            output.write(
                "inotify: max_user_instances \(number(limits.instances)) (this user has \(Display.plural(usage.descriptors, "inotify descriptor")) open in \(Display.plural(usage.processes, "process", "processes"))"
                    + (usage.processesNotInspected > 0 ? ", \(usage.processesNotInspected) not inspected" : "")
                    + "), max_user_watches \(number(limits.watches)) (\(usage.watches) in use), max_queued_events \(number(limits.queued))")
            if isDirectory {
                output.write("files: \(files.count) of TabSync's" + (otherFiles > 0 ? ", \(otherFiles) others ignored" : ""))
                let width = files.map { Display.name($0.name).count }.max() ?? 0
                for file in files {
                    let name = Display.name(file.name)
                    output.write("  \(name)\(String(repeating: " ", count: width - name.count))  \(file.human)")
                }
            }
            for (title, findings) in [("refused", refused), ("warnings", warnings)] where !findings.isEmpty {
                output.write("\(title) (\(findings.count)):")
                for finding in findings { output.write("  \(finding.human)") }
            }
            output.write(refused.isEmpty ? "ok: TabSync would refuse nothing here" : "TabSync would refuse \(Display.plural(refused.count, "thing")) here")
        }
        if !refused.isEmpty { throw ExitCode(1) }
    }
}

/// One entry of the directory and what TabSync makes of it.
struct FileReport {
    enum Role: String {
        /// `NAME.log`: the storage's change log.
        case log
        /// `NAME.log.tmp`: the log's next generation while it is written (earlier versions and
        /// peers; TabSync now writes it in `.compacting`).
        case temporary
        /// `NAME.log.corrupt-TIME`: a damaged log moved aside by recovery.
        case corrupt
        /// `NAME.state`: the marker that keeps TabSync 1 out, or a format 1 state file.
        case state
        /// `NAME.state.prev`, `NAME.state.tmp`, `NAME.state.corrupt-TIME`: left by TabSync 1.
        case legacy
        /// `NAME.lock`, `NAME.LOCKNAME.lock`.
        case lock
        /// `.compacting`: the folder in which compactions write a log's next generation.
        case compactionFolder
        /// Not a TabSync file: ignored.
        case other
    }

    var name: String
    var role: Role
    var info: Result<FileInfo, SystemError>
    var log: LogProbe?
    var state: LegacyStateProbe?
    var refusals: [String] = []
    var warnings: [String] = []

    /// `storages`: the storages of the directory (a `NAME.log` or a `NAME.state`), whose lock
    /// files TabSync opens; `logs`: those with a `NAME.log`.
    init(directory: String, name: String, euid: UInt32, storages: Set<String>, logs: Set<String>) {
        self.name = name
        role = Self.role(of: name)
        info = FileInfo.lstat(join(directory, name))
        guard case let .success(file) = info else {
            if role != .other { warnings.append("cannot be examined (\(String(describing: info)))") }
            return
        }
        let problems = file.fileRefusals(euid: euid)
        switch role {
        case .log:
            refusals += problems
            guard problems.isEmpty else { break }
            let probe = LogProbe.read(join(directory, name))
            log = probe
            switch probe.verdict {
            case .valid, .tornTail:
                break
            case .damaged:
                let fate = probe.secret ? "deletes it (it holds secrets)" : "moves it aside as \(name).corrupt-TIME"
                warnings.append("\(probe.summary): the next TabSync process that reads it \(fate) and recovers every record that still checks, in a new store")
            case .corrupt:
                warnings.append("\(probe.summary): the next TabSync process that reads it starts a new store in its place; one that had read this log before moves it aside as \(name).corrupt-TIME (or deletes it, when it holds secrets), and one that had not deletes it, since it cannot tell whether it holds secrets")
            case .unsupportedVersion, .tooLarge, .refused, .unreadable:
                refusals.append(probe.summary)
            }
        case .state:
            refusals += problems
            guard problems.isEmpty else { break }
            let probe = LegacyStateProbe.read(join(directory, name))
            state = probe
            let storage = String(name.dropLast(".state".count))
            let hasLog = logs.contains(storage)
            switch probe.verdict {
            case .marker:
                break
            case .format1 where hasLog:
                warnings.append("a format 1 state file beside \(storage).log: TabSync reads only the log, and a TabSync 1 process would use this file (the marker keeps it out)")
            case .format1:
                warnings.append("format 1: upgraded to \(storage).log by the next TabSync process that opens it")
            case .notUpgradable where hasLog:
                warnings.append("\(probe.summary): TabSync reads only \(storage).log, and only the marker keeps TabSync 1 out of this storage")
            case .notUpgradable:
                warnings.append("\(probe.summary): the next TabSync process that opens the storage starts \(storage).log empty and puts the marker in its place")
            case .refused, .unreadable:
                refusals.append(probe.summary)
            }
        case .lock:
            // The commit lock `S.lock` and the named locks `S.NAME.lock` of a storage S present
            // are opened by TabSync; other lock files only by a process that asks for that lock.
            let base = String(name.dropLast(".lock".count))
            if storages.contains(base) || storages.contains(where: { base.hasPrefix($0 + ".") }) {
                refusals += problems
            } else {
                warnings += problems.map { "\($0) (no storage of this directory uses it; a process that takes this lock would be refused)" }
            }
        case .temporary:
            if file.kind == .directory {
                refusals.append("a directory stands in place of the log's next generation: TabSync cannot create, compact or recover the log")
            } else {
                warnings.append("the log's next generation as written beside the log by an earlier TabSync (now in .compacting), or by a peer, while it compacts; or left by a writer that died writing it: the next one written removes it")
            }
        case .compactionFolder:
            let consequence = "TabSync refuses it, and so every compaction, recovery and commit that replaces a token in this directory"
            switch file.kind {
            case .directory:
                if file.uid != euid {
                    refusals.append("it is owned by \(User.name(file.uid)) (uid \(file.uid)), not by this user (uid \(euid)): \(consequence)")
                }
                if file.permissions & 0o077 != 0 {
                    refusals.append("its mode \(file.octalMode) lets others in (TabSync creates it 0700): \(consequence)")
                }
                if case let .success(inside) = directoryEntries(join(directory, name)), !inside.isEmpty {
                    warnings.append("holds \(inside.joined(separator: ", ")): a log's next generation being written, or left by a writer that died writing it; the next compaction of that storage removes it")
                }
            case .symlink:
                refusals.append("it is a symbolic link: \(consequence)")
            default:
                refusals.append("it is a \(file.kind.phrase), not a directory: \(consequence)")
            }
        case .corrupt:
            warnings.append("a damaged log that recovery moved aside; TabSync never deletes these")
        case .legacy:
            if let range = name.range(of: ".state.", options: .backwards), name.hasSuffix(".prev") || name.hasSuffix(".tmp") {
                warnings.append("left by TabSync 1 (format 1) and read by no later TabSync: the upgrade of \(name[..<range.lowerBound]).state deletes it")
            } else {
                warnings.append("a corrupt format 1 state file that TabSync 1 moved aside; TabSync never deletes these")
            }
        case .other:
            break
        }
    }

    static func role(of name: String) -> Role {
        func storage(_ suffix: String) -> Bool { name.hasSuffix(suffix) && isValidName(String(name.dropLast(suffix.count))) }
        func aside(_ infix: String) -> Bool {
            guard let range = name.range(of: infix) else { return false }
            return isValidName(String(name[..<range.lowerBound]))
        }
        // SessionDirectory.compactionFolder (docs/FORMAT.md, section 5).
        if name == ".compacting" { return .compactionFolder }
        if storage(".log") { return .log }
        if storage(".log.tmp") { return .temporary }
        if aside(".log.corrupt-") { return .corrupt }
        if storage(".state") { return .state }
        if storage(".state.prev") || storage(".state.tmp") || aside(".state.corrupt-") { return .legacy }
        if storage(".lock") { return .lock }
        return .other
    }

    /// What the file's probe read: its format version and sequence number, and its verdict.
    private var formatVersion: Int? { log?.version.map(Int.init) ?? state?.version }
    private var sequence: UInt64? { log?.sequence ?? state?.sequence }
    private var check: String? { log?.code ?? state?.code }
    private var summary: String? { log?.summary ?? state?.summary }

    var json: JSON {
        let file = try? info.get()
        return .object([
            ("name", .string(name)), ("role", .string(role.rawValue)), ("type", .from(file?.kind.rawValue)),
            ("mode", .from(file?.octalMode)), ("uid", file.map { .int(Int64($0.uid)) } ?? .null),
            ("owner", .from(file.map { User.name($0.uid) })), ("gid", file.map { .int(Int64($0.gid)) } ?? .null),
            ("size", file.map { .int($0.size) } ?? .null), ("formatVersion", .from(formatVersion)),
            ("seq", sequence.map { .int(Int64($0)) } ?? .null), ("keys", .from(log?.keys)), ("store", .from(log?.store)),
            ("check", .from(check)),
        ])
    }

    var human: String {
        guard case let .success(file) = info else { return "\(role.rawValue), cannot be examined" }
        var text = "\(role.rawValue), \(file.kind.phrase), mode \(file.octalMode), \(Display.name(User.name(file.uid))):\(Display.name(User.groupName(file.gid))), \(Display.plural(Int(file.size), "byte"))"
        // (A state file's summary names its version, as does a log's of another version.)
        if let version = log?.version, version == 2 { text += ", format version \(version)" }
        if let sequence { text += ", seq \(sequence)" }
        if let keys = log?.keys { text += ", \(Display.plural(keys, "key"))" }
        if let store = log?.store { text += ", store \(Display.name(store))" }
        if let summary { text += ", \(Display.escaped(summary))" }
        return text
    }
}
