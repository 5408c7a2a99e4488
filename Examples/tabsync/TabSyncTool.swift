import ArgumentParser
import ExampleSupport
import TabSync

#if canImport(Glibc)
import Glibc
#endif

/// The inspection tool: what a session directory holds, who holds its locks, what is wrong with it.
@main
struct TabSyncTool: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tabsync",
        abstract: "Looks inside a TabSync session directory: its storages, its session, its locks, and what TabSync would refuse.",
        discussion: """
            Never prints a token, nor any value of the `session` storage. Human output shows control \
            characters and escape sequences escaped (\\e, \\a, \\xHH); --json prints one JSON document \
            (one object per line for `watch`).
            """,
        subcommands: [Status.self, Watch.self, Locks.self, Doctor.self])

    static func main() async {
        // A parent may have started us with signals blocked (posix_spawn passes on the mask of
        // the thread that spawned): unblock them, so that SIGTERM and Ctrl-C end `watch`.
        var none = sigset_t()
        sigemptyset(&none)
        sigprocmask(SIG_SETMASK, &none, nil)
        await main(nil)
    }
}

/// The arguments every command takes.
struct DirectoryOptions: ParsableArguments {
    @Argument(help: "The session directory.")
    var directory: String

    @Flag(help: "Print JSON for scripts.")
    var json = false

    /// The directory as an absolute path (a relative one is resolved once, here).
    var path: String { absolutePath(directory) }
}

/// Why a storage was not opened.
struct StorageProblem: Error, Sendable, Equatable {
    /// A TabSyncError code (`insecurePath`, `corruptState`, ...), `unreadable`, or `format1` (a
    /// storage still in a format 1 state file, which opening would upgrade).
    var code: String
    var message: String
}

/// Opens the storages of a session directory for reading.
enum Storages {
    /// The origin the tool's storages carry. The tool never writes, so no change bears it.
    static let origin = "tabsync-\(getpid())"

    /// Opens the session directory without creating it.
    static func directory(_ path: String) throws(TabSyncError) -> SessionDirectory {
        try SessionDirectory(path: path, create: false)
    }

    /// The directory, or the end of the command with the reason (what `status` and `watch` need).
    static func directoryOrFail(_ path: String) -> SessionDirectory {
        do {
            return try directory(path)
        } catch {
            fail("\(error.description); `tabsync doctor` says more")
        }
    }

    /// Opens the storage `name` once its log looked readable without a repair. TabSync's read of
    /// a log with an invalid tail, damage or an unreadable header repairs it (a write); a look
    /// first keeps the tool from changing anything, and a refused log is reported the same way
    /// TabSync would refuse it. A tail that ends inside a commit is left alone by readers (it may
    /// be a commit being written), so such a log is opened.
    static func open(_ name: String, in directory: SessionDirectory) -> Result<SharedStorage, StorageProblem> {
        let probe = LogProbe.read(join(directory.path, name + ".log"))
        let untouched = "not opened, so that it stays as it is"
        switch probe.verdict {
        case .valid, .tornTail(_, .incomplete):
            break
        case let .tornTail(bytes, .invalid(why)):
            return .failure(StorageProblem(
                code: "corruptState",
                message: "The log ends with \(Display.plural(bytes, "byte")) that are not a valid record (\(why)); \(untouched): the next TabSync process that reads it cuts them (harmless)"))
        case let .damaged(why):
            return .failure(StorageProblem(
                code: "corruptState",
                message: "The log is damaged (\(why)); \(untouched): the next TabSync process that reads it recovers every record that still checks, in a new store"))
        case let .corrupt(why):
            return .failure(StorageProblem(
                code: "corruptState",
                message: "The file is not a readable log (\(why)); \(untouched): the next TabSync process that reads it starts a new store in its place"))
        case let .unsupportedVersion(version):
            return .failure(StorageProblem(code: "unsupportedVersion", message: "The log has format version \(version); this TabSync reads version 2"))
        case let .tooLarge(size):
            return .failure(StorageProblem(code: "stateTooLarge", message: "The log has \(size) bytes, more than the default limit of \(StorageFile.maximumBytes)"))
        case let .refused(why):
            return .failure(StorageProblem(code: "insecurePath", message: "TabSync refuses the log: \(why)"))
        case let .unreadable(why):
            return .failure(StorageProblem(code: "unreadable", message: "The log cannot be read: \(why)"))
        }
        do {
            let backend = try FileBackend(directory: directory, name: name)
            return .success(try SharedStorage(backend: backend, origin: origin))
        } catch {
            return .failure(StorageProblem(code: error.code.description, message: error.description))
        }
    }
}
