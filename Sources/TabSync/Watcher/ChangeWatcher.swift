import CInotifyTools
import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// How a storage learns that another process committed a change.
public enum ChangeDetection: Sendable, Hashable, CustomStringConvertible {
    /// inotify, through libinotifytools: the process sleeps until a change arrives.
    case inotify
    /// Periodic checks, because inotify could not serve this directory; `reason` says why.
    case polling(interval: Duration, reason: String)
    /// A network backend's server announces changes (PostgreSQL's `LISTEN/NOTIFY` on `channel`).
    case notifications(channel: String)
    /// A network backend lost its connection to the server and is reconnecting; changes made
    /// meanwhile are delivered once it is back (`reason` says what happened).
    case reconnecting(reason: String)

    public var description: String {
        switch self {
        case .inotify: "inotify"
        case let .polling(interval, reason): "polling every \(interval) (\(reason))"
        case let .notifications(channel): "notifications on \(channel)"
        case let .reconnecting(reason): "reconnecting (\(reason))"
        }
    }
}

/// What a watch registration is told.
enum ChangeSignal: Sendable {
    /// A file of interest in the directory changed (its name), or something may have
    /// changed anywhere (nil: queue overflow, watch lost, polling tick).
    case changed(name: String?)
    /// inotify stopped serving this registration; it is now polled.
    case fellBackToPolling(ChangeDetection)
}

/// The one owner of libinotifytools in this process.
///
/// libinotifytools keeps process-global, unsynchronised state, so every call into it happens
/// on one dedicated thread, which blocks in `inotifytools_next_event` while nothing changes
/// (no CPU use, no periodic wake-ups). Other threads hand it commands through a queue and
/// wake it by writing to a private, already unlinked file that it watches.
///
/// The thread starts with the first registration and stops, after `inotifytools_cleanup`,
/// when the last registration is removed. Handlers run on that thread, in the order in which
/// events arrived; they must be short.
///
/// ### Kernel limits
/// Each watched directory costs one watch (`/proc/sys/fs/inotify/max_user_watches`) and the
/// process one inotify instance (`max_user_instances`). When either is exhausted, or the
/// directory is on a file system whose remote changes raise no events (NFS, SMB, FUSE),
/// the registration is polled instead, and says so through ``ChangeDetection``.
final class ChangeWatcher: Sendable {
    static let shared = ChangeWatcher()

    typealias Handler = @Sendable (ChangeSignal) -> Void

    struct Registration: Sendable {
        let id: UInt64
        let directory: SessionDirectory
        let names: Set<String>
        /// The events (inotify mask bits) that signal this registration for one of its names.
        let events: UInt32
        let handler: Handler
        /// The storage's `Options.pollInterval`, used if inotify stops serving it.
        let pollInterval: Duration
        var watch: Int32?
    }

    private enum Command {
        case add(id: UInt64, reply: @Sendable (Result<Int32, TabSyncError>) -> Void)
        case remove(watch: Int32, directory: SessionDirectory)
    }

    struct DirectoryKey: Hashable {
        let device: UInt64
        let inode: UInt64

        init(_ directory: SessionDirectory) {
            device = directory.device
            inode = directory.inode
        }
    }

    private struct State: ~Copyable {
        var nextID: UInt64 = 1
        var registrations: [UInt64: Registration] = [:]
        var commands: [Command] = []
        var running = false
        var wakeDescriptor: Int32 = -1
        /// The owner thread while it runs (for tests that signal it).
        var thread: pthread_t?
        var watchUsers: [Int32: Int] = [:]
        /// The watch of each directory (device, inode): one per directory, however many
        /// registrations and descriptors it has.
        var watchOfDirectory: [DirectoryKey: Int32] = [:]
    }

    private let state = Mutex(State())
    /// Held by the owner thread for its whole life, so that a new owner cannot initialise
    /// libinotifytools before the previous one has cleaned it up.
    private let ownership = Mutex(())
    let poller = PollingWatcher()

    /// The owner thread, while it runs.
    var ownerThread: pthread_t? { state.withLock { $0.thread } }

    /// Overflows seen (IN_Q_OVERFLOW), for tests and diagnostics.
    let overflowCount = Atomic<Int>(0)

    /// What the directory's watch reports about its files, and what a log needs: a log appended
    /// to in place, replaced by rename, moved away or deleted (each append is one write, so one
    /// `IN_MODIFY`).
    ///
    /// Not `IN_CLOSE_WRITE`: every process opens its lock files read-write, and the kernel raises
    /// that event for each close of such a descriptor, written or not, to every process watching
    /// the directory. A storm of N processes, each taking and releasing the refresh lock, then
    /// woke each of the N watcher threads N times (a tenth of a waiting tab's CPU at N = 64). A
    /// child process forked while the log is open (any `posix_spawn` or `Process` of the app)
    /// would raise it too, when it closes its copy at its `exec`.
    static let fileEvents = UInt32(IN_MODIFY | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM)

    /// Watches `directory` for `events` on the files called `names`; whatever the events, the
    /// directory's own deletion or move and a queue overflow signal every registration.
    /// Returns the registration's id and how it is being watched.
    func register(
        directory: SessionDirectory, names: Set<String>, events: UInt32 = fileEvents, pollInterval: Duration,
        handler: @escaping Handler
    ) -> (UInt64, ChangeDetection) {
        if directory.isRemoteFileSystem {
            return poll(directory, names, pollInterval, handler, reason: "the directory is on a network or FUSE file system, which raises no inotify events for other hosts")
        }
        if ProcessInfo.processInfo.environment["TABSYNC_FORCE_POLLING"] == "1" {
            return poll(directory, names, pollInterval, handler, reason: "TABSYNC_FORCE_POLLING=1")
        }
        let done = DispatchSemaphore(value: 0)
        let outcome = Mutex<Result<Int32, TabSyncError>?>(nil)
        let start: (id: UInt64, mustStart: Bool, onOwner: Bool) = state.withLock { state in
            let id = state.nextID
            state.nextID += 1
            state.registrations[id] = Registration(
                id: id, directory: directory, names: names, events: events, handler: handler, pollInterval: pollInterval)
            // From a handler, on the owner thread itself: a command queued for it would wait for
            // this very thread, and every storage of the process with it.
            if let owner = state.thread, pthread_equal(owner, pthread_self()) != 0 { return (id, false, true) }
            state.commands.append(.add(id: id) { result in
                outcome.withLock { $0 = result }
                done.signal()
            })
            let mustStart = !state.running
            if mustStart { state.running = true } else { Self.wake(state.wakeDescriptor) }
            return (id, mustStart, false)
        }
        if start.onOwner {
            let result = addWatch(for: start.id)
            outcome.withLock { $0 = result }
        } else {
            if start.mustStart { startThread() }
            done.wait()
        }
        switch outcome.withLock({ $0 })! {
        case .success:
            return (start.id, .inotify)
        case let .failure(error):
            state.withLock { _ = $0.registrations.removeValue(forKey: start.id) }
            return poll(directory, names, pollInterval, handler, reason: error.description)
        }
    }

    func unregister(_ id: UInt64) {
        if poller.unregister(id) { return }
        state.withLock { state in
            guard let registration = state.registrations.removeValue(forKey: id) else { return }
            if let watch = registration.watch {
                state.commands.append(.remove(watch: watch, directory: registration.directory))
                Self.wake(state.wakeDescriptor)
            }
        }
    }

    private func poll(_ directory: SessionDirectory, _ names: Set<String>, _ interval: Duration, _ handler: @escaping Handler, reason: String) -> (UInt64, ChangeDetection) {
        let id = state.withLock { state in
            defer { state.nextID += 1 }
            return state.nextID
        }
        let detection = ChangeDetection.polling(interval: interval, reason: reason)
        poller.register(id: id, interval: interval, handler: handler)
        return (id, detection)
    }

    private static func wake(_ descriptor: Int32) {
        guard descriptor >= 0 else { return }
        var byte: UInt8 = 1
        _ = pwrite(descriptor, &byte, 1, 0)
    }

    private func startThread() {
        let thread = Thread { [self] in
            ownership.withLock { _ in run() }
        }
        thread.name = "TabSync.ChangeWatcher"
        thread.start()
    }

    // MARK: - The owner thread

    private func run() {
        Self.blockAsynchronousSignals()
        let before = Self.inotifyDescriptors()
        guard inotifytools_init(0, 0, 0) != 0 else {
            fail(reason: "inotify could not be initialised (\(Errno(rawValue: inotifytools_error())); see /proc/sys/fs/inotify/max_user_instances)")
            return
        }
        // libinotifytools waits with select(2), whose descriptor sets end at FD_SETSIZE: with
        // its descriptor at 1024 or above, its first wait would abort the process.
        if let high = Self.inotifyDescriptors().subtracting(before).first(where: { $0 >= Self.selectLimit }) {
            inotifytools_cleanup()
            fail(reason: "the process had \(Self.selectLimit) or more descriptors open when inotify started (its descriptor is \(high)); libinotifytools can wait only on descriptors below \(Self.selectLimit)")
            return
        }
        let wake = makeWakeFile()
        guard let wake else {
            inotifytools_cleanup()
            fail(reason: "inotify could not watch its wake-up file (\(Errno.current))")
            return
        }
        state.withLock { $0.wakeDescriptor = wake.descriptor; $0.thread = pthread_self() }

        while true {
            guard processCommands() else { break }
            guard let event = inotifytools_next_event(-1) else {
                let errno = Errno(rawValue: inotifytools_error())
                // libinotifytools waits in select(2), which a signal handler interrupts whatever
                // its SA_RESTART: any SIGCHLD of an app that starts processes, or any signal it
                // handles. Nothing was read; the wait is simply taken up again.
                if errno == .interrupted { continue }
                dispatchFailure(reason: "reading inotify events failed (\(errno))")
                break
            }
            dispatch(event, wakeWatch: wake.watch)
        }

        state.withLock { $0.wakeDescriptor = -1; $0.thread = nil }
        close(wake.descriptor)
        inotifytools_cleanup()
    }

    /// Runs queued commands. Returns false when no registration is left and the thread should end.
    private func processCommands() -> Bool {
        while true {
            let next: Command? = state.withLock { state in
                if state.commands.isEmpty {
                    if state.registrations.isEmpty {
                        state.running = false
                    }
                    return nil
                }
                return state.commands.removeFirst()
            }
            guard let next else {
                return state.withLock { $0.running }
            }
            switch next {
            case let .add(id, reply):
                reply(addWatch(for: id))
            case let .remove(watch, directory):
                let last = state.withLock { state in
                    // Absent: the kernel already dropped it (see forgetWatch).
                    guard state.watchUsers[watch] != nil else { return false }
                    state.watchUsers[watch]! -= 1
                    if state.watchUsers[watch]! <= 0 {
                        state.watchUsers[watch] = nil
                        state.watchOfDirectory = state.watchOfDirectory.filter { $0.value != watch }
                        return true
                    }
                    return false
                }
                guard last else { continue }
                var info = stat()
                // A deleted directory's watch goes with its inode (IN_IGNORED, see forgetWatch);
                // removing it here could only fail.
                if fstat(directory.descriptor, &info) == 0, info.st_nlink > 0 {
                    _ = inotifytools_remove_watch_by_wd(watch)
                }
            }
        }
    }

    private func addWatch(for id: UInt64) -> Result<Int32, TabSyncError> {
        guard let directory = state.withLock({ $0.registrations[id]?.directory }) else {
            return .failure(TabSyncError(code: .closed, path: nil, message: "The registration was removed"))
        }
        // A directory already watched (another storage on it, or another descriptor of it)
        // shares its watch: the kernel would return the same one anyway.
        let key = DirectoryKey(directory)
        if let shared = state.withLock({ state -> Int32? in
            guard let watch = state.watchOfDirectory[key] else { return nil }
            state.registrations[id]?.watch = watch
            state.watchUsers[watch, default: 0] += 1
            return watch
        }) {
            return .success(shared)
        }
        // Watching the directory through its open descriptor pins the watch to the inode that
        // was checked, whatever happens to the path later. libinotifytools files each watch by
        // the name it was made with, and looks names up in a tree; a name used twice (a
        // descriptor number reused after a close) would find the older watch, and renaming a
        // record in place (inotifytools_set_filename_by_wd) breaks that tree. So each watch is
        // made through a fresh, never reused name: a symbolic link to the descriptor, removed
        // right after.
        let target = "/proc/self/fd/\(directory.descriptor)"
        let path = Self.uniquePath("tabsync-watch")
        guard symlink(target, path) == 0 else {
            return .failure(TabSyncError(
                code: .watcherUnavailable, path: path, message: "Cannot create the link through which inotify watches the directory",
                errno: .current))
        }
        defer { unlink(path) }
        // No IN_ATTRIB: a chmod of the directory is seen at the next commit or signal, and on the
        // files it would wake every reader once more per commit (the link kept for recovery
        // changes the state file's link count), which storms of 64 processes measurably pay.
        let mask = Self.fileEvents | UInt32(IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
        guard inotifytools_watch_file(path, Int32(bitPattern: mask)) != 0 else {
            let errno = Errno(rawValue: inotifytools_error())
            let hint = errno == .noSpace ? "; the inotify watch limit is exhausted, see /proc/sys/fs/inotify/max_user_watches" : ""
            return .failure(TabSyncError(
                code: .watcherUnavailable, path: directory.path,
                message: "inotify cannot watch the directory\(hint)", errno: errno))
        }
        // libinotifytools may have filed a directory with a trailing slash.
        let watch = max(inotifytools_wd_from_filename(path), inotifytools_wd_from_filename(path + "/"))
        guard watch > 0 else {
            return .failure(TabSyncError(
                code: .watcherUnavailable, path: directory.path, message: "libinotifytools lost the watch of the directory"))
        }
        state.withLock { state in
            state.registrations[id]?.watch = watch
            state.watchUsers[watch, default: 0] += 1
            state.watchOfDirectory[key] = watch
        }
        return .success(watch)
    }

    private func dispatch(_ event: UnsafeMutablePointer<inotify_event>, wakeWatch: Int32) {
        let watch = event.pointee.wd
        let mask = event.pointee.mask
        if watch == wakeWatch { return }
        var name: String?
        if event.pointee.len > 0 {
            name = String(cString: UnsafeRawPointer(event).advanced(by: MemoryLayout<inotify_event>.size).assumingMemoryBound(to: CChar.self))
        }
        if mask & UInt32(IN_IGNORED) != 0 {
            forgetWatch(watch)
            return
        }
        let overflow = mask & UInt32(IN_Q_OVERFLOW) != 0
        if overflow { overflowCount.add(1, ordering: .relaxed) }
        // The directory itself was deleted or moved.
        let whole = overflow || mask & UInt32(IN_DELETE_SELF | IN_MOVE_SELF) != 0
        let targets: [Registration] = state.withLock { state in
            state.registrations.values.filter { registration in
                if overflow { return true }
                guard registration.watch == watch else { return false }
                if whole { return true }
                return name.map { registration.names.contains($0) && mask & registration.events != 0 } ?? true
            }
        }
        for registration in targets {
            registration.handler(.changed(name: whole ? nil : name))
        }
    }

    /// The kernel dropped a watch (its directory was deleted or unmounted). libinotifytools
    /// keeps its small record under a name nobody uses again (see addWatch) until cleanup.
    /// The watch's registrations get one last signal.
    private func forgetWatch(_ watch: Int32) {
        let orphans: [Registration] = state.withLock { state in
            guard state.watchUsers.removeValue(forKey: watch) != nil else { return [] }
            state.watchOfDirectory = state.watchOfDirectory.filter { $0.value != watch }
            var orphans: [Registration] = []
            for (id, registration) in state.registrations where registration.watch == watch {
                state.registrations[id]?.watch = nil
                orphans.append(registration)
            }
            return orphans
        }
        for registration in orphans { registration.handler(.changed(name: nil)) }
    }

    /// inotify stopped working: every registration moves to polling.
    private func dispatchFailure(reason: String) {
        fail(reason: reason)
    }

    private func fail(reason: String) {
        let moved: [Registration] = state.withLock { state in
            state.running = false
            let all = Array(state.registrations.values)
            state.registrations.removeAll()
            state.watchUsers.removeAll()
            state.watchOfDirectory.removeAll()
            for command in state.commands {
                if case let .add(_, reply) = command {
                    reply(.failure(TabSyncError(code: .watcherUnavailable, path: nil, message: reason)))
                }
            }
            state.commands.removeAll()
            return all
        }
        for registration in moved {
            let interval = registration.pollInterval
            poller.register(id: registration.id, interval: interval, handler: registration.handler)
            registration.handler(.fellBackToPolling(.polling(interval: interval, reason: reason)))
        }
    }

    /// FD_SETSIZE: select(2) handles descriptors below it.
    static let selectLimit: Int32 = 1024

    /// The process's inotify descriptors (links to `anon_inode:inotify` in /proc/self/fd).
    private static func inotifyDescriptors() -> Set<Int32> {
        var found = Set<Int32>()
        guard let entries = opendir("/proc/self/fd") else { return found }
        defer { closedir(entries) }
        var target = [CChar](repeating: 0, count: 64)
        while let entry = readdir(entries) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard let descriptor = Int32(name) else { continue }
            let length = readlinkat(dirfd(entries), name, &target, target.count - 1)
            if length > 0, String(decoding: target[..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self) == "anon_inode:inotify" {
                found.insert(descriptor)
            }
        }
        return found
    }

    /// The owner thread takes no asynchronous signal: they go to the app's threads. A handled
    /// signal would interrupt libinotifytools' select(2) (SA_RESTART does not restart it).
    private static func blockAsynchronousSignals() {
        var set = sigset_t()
        sigfillset(&set)
        for synchronous in [SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE, SIGSEGV, SIGSYS] { sigdelset(&set, synchronous) }
        pthread_sigmask(SIG_BLOCK, &set, nil)
    }

    /// A fresh name in the runtime or temporary directory, never used before.
    private static func uniquePath(_ prefix: String) -> String {
        let base = ProcessInfo.processInfo.environment["XDG_RUNTIME_DIR"].flatMap { $0.isEmpty ? nil : $0 }
            ?? ProcessInfo.processInfo.environment["TMPDIR"].flatMap { $0.isEmpty ? nil : $0 }
            ?? "/tmp"
        return "\(base)/\(prefix)-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
    }

    private func makeWakeFile() -> (descriptor: Int32, watch: Int32)? {
        let path = Self.uniquePath("tabsync-wake")
        let descriptor = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard descriptor >= 0 else { return nil }
        defer { unlink(path) }
        guard inotifytools_watch_file(path, Int32(IN_MODIFY)) != 0 else {
            close(descriptor)
            return nil
        }
        return (descriptor, inotifytools_wd_from_filename(path))
    }
}
