import CInotifyTools
#if canImport(Glibc)
import Glibc
#endif

/// A session directory, opened once and checked: owned by this user, not writable by others,
/// not a symbolic link. Every file inside is opened relative to the directory's descriptor,
/// with `O_NOFOLLOW` and `O_CLOEXEC`, so renaming or replacing the path afterwards cannot
/// redirect TabSync to another place.
///
/// A missing directory is created with mode 0700 (its missing parents too).
///
/// ### Errors
/// ``TabSyncError/Code/insecurePath`` when the directory or a file in it is owned by
/// another user, writable by group or others, or is a symbolic link;
/// ``TabSyncError/Code/notRegularFile`` for a FIFO, device or socket where a file belongs.
public final class SessionDirectory: Sendable {
    /// The absolute path the directory was opened at. A relative path is resolved once, against
    /// the current directory at the time of opening; `~` is not special (it is a folder name).
    public let path: String
    let descriptor: Int32
    let device: UInt64
    let inode: UInt64
    /// True when the file system is known not to deliver inotify events (NFS, CIFS, FUSE...).
    let isRemoteFileSystem: Bool
    /// True on tmpfs and ramfs (`$XDG_RUNTIME_DIR`, /dev/shm): a write is a memory copy and
    /// `fsync` does nothing, so no file operation in the directory waits for a device.
    let isMemoryFileSystem: Bool

    /// Opens (and creates when missing) a session directory.
    public init(path: String, create: Bool = true) throws(TabSyncError) {
        guard !path.isEmpty else {
            throw TabSyncError(code: .invalidArgument, path: path, message: "The session directory path is empty")
        }
        let path = try Self.absolute(path)
        self.path = path
        if create { try Self.makeDirectories(path) }
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else {
            let errno = Errno.current
            var info = stat()
            if errno == .tooManyLinks || (lstat(path, &info) == 0 && info.st_mode & S_IFMT == S_IFLNK) {
                throw TabSyncError(code: .insecurePath, path: path, message: "The session directory is a symbolic link", errno: errno)
            }
            if errno.rawValue == ENOTDIR {
                throw TabSyncError(code: .notRegularFile, path: path, message: "The session directory path is not a directory", errno: errno)
            }
            throw TabSyncError(code: .io, path: path, message: "Cannot open the session directory", errno: errno)
        }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            let errno = Errno.current
            close(fd)
            throw TabSyncError.system("fstat", errno, path: path)
        }
        do {
            try Self.checkOwnership(info, path: path, what: "session directory", forbidden: S_IWGRP | S_IWOTH)
        } catch {
            close(fd)
            throw error
        }
        var fs = statfs()
        let known = fstatfs(fd, &fs) == 0
        let remote = known && Self.remoteMagics.contains(Int64(fs.f_type))
        self.isMemoryFileSystem = known && Self.memoryMagics.contains(Int64(fs.f_type))
        self.descriptor = fd
        self.device = UInt64(info.st_dev)
        self.inode = UInt64(info.st_ino)
        self.isRemoteFileSystem = remote
    }

    deinit { close(descriptor) }

    /// The conventional place for an app's session: `$XDG_RUNTIME_DIR/APP`, a private per-user
    /// directory on a tmpfs that the system removes at logout. When `XDG_RUNTIME_DIR` is unset
    /// (a service, a container, an SSH session without a login manager), `fallback` is used if
    /// given; without one this throws, naming the variable, rather than guess a shared place.
    public static func conventionalPath(app: String, fallback: String? = nil) throws(TabSyncError) -> String {
        try conventionalPath(app: app, fallback: fallback, runtimeDirectory: getenv("XDG_RUNTIME_DIR").map { String(cString: $0) })
    }

    static func conventionalPath(app: String, fallback: String?, runtimeDirectory: String?) throws(TabSyncError) -> String {
        guard !app.isEmpty, !app.contains("/"), app != ".", app != ".." else {
            throw TabSyncError(code: .invalidArgument, path: nil, message: "The app name \"\(app)\" cannot be a folder name")
        }
        if let runtime = runtimeDirectory, runtime.hasPrefix("/") {
            return runtime.hasSuffix("/") ? runtime + app : runtime + "/" + app
        }
        if let fallback { return try absolute(fallback) }
        throw TabSyncError(
            code: .invalidArgument, path: nil,
            message: "XDG_RUNTIME_DIR is not set (or not an absolute path), so there is no per-user runtime directory for \(app); pass a fallback directory")
    }

    /// A file mode's permission bits as `ls -l` users write them: `0700`, `1777` (sticky).
    static func octal(_ mode: mode_t) -> String {
        let digits = String(mode & 0o7777, radix: 8)
        return String(repeating: "0", count: max(0, 4 - digits.count)) + digits
    }

    /// `path` made absolute against the current directory, once.
    static func absolute(_ path: String) throws(TabSyncError) -> String {
        if path.hasPrefix("/") { return path }
        guard let cwd = getcwd(nil, 0) else {
            throw TabSyncError(code: .io, path: path, message: "Cannot resolve the relative session directory path: the current directory is unreadable", errno: .current)
        }
        defer { free(cwd) }
        let base = String(cString: cwd)
        var relative = Substring(path)
        while relative.hasPrefix("./") { relative = relative.dropFirst(2) }
        if relative == "." { return base }
        return base.hasSuffix("/") ? base + relative : base + "/" + relative
    }

    /// A new descriptor of the directory this instance opened (a new open file description, so
    /// that its `flock` excludes every other one, in this process too).
    func reopen() throws(TabSyncError) -> Int32 {
        try retrying("openat", path: path) { openat(descriptor, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
    }

    /// Checks that the directory this instance opened is still the one at its path, still
    /// there, and still private: a directory that was moved, replaced or deleted throws
    /// ``TabSyncError/Code/directoryChanged``, one opened up to others (`chmod 0777`) or given
    /// away throws ``TabSyncError/Code/insecurePath``. Costs an `fstat` and an `lstat`.
    public func verify() throws(TabSyncError) {
        var opened = stat()
        guard fstat(descriptor, &opened) == 0 else { throw TabSyncError.system("fstat", .current, path: path) }
        if opened.st_nlink == 0 {
            throw TabSyncError(
                code: .directoryChanged, path: path,
                message: "The session directory was deleted while in use; nothing more is written to it")
        }
        try Self.checkOwnership(opened, path: path, what: "session directory", forbidden: S_IWGRP | S_IWOTH)
        var current = stat()
        guard lstat(path, &current) == 0 else {
            let errno = Errno.current
            throw TabSyncError(
                code: .directoryChanged, path: path,
                message: "The session directory was moved away from its path while in use; nothing more is written to it", errno: errno)
        }
        if UInt64(current.st_dev) != device || UInt64(current.st_ino) != inode {
            throw TabSyncError(
                code: .directoryChanged, path: path,
                message: "The session directory was replaced by another \(current.st_mode & S_IFMT == S_IFLNK ? "symbolic link" : "directory") at its path while in use; nothing more is written to the one this process opened")
        }
    }

    /// Whether the directory this instance opened is still there (it was not deleted).
    var isDeleted: Bool {
        var info = stat()
        return fstat(descriptor, &info) == 0 && info.st_nlink == 0
    }

    /// The error for a file operation that failed because the directory itself is gone.
    func vanished(_ call: String, _ errno: Errno, file: String) -> TabSyncError {
        TabSyncError(
            code: .directoryChanged, path: path,
            message: "The session directory no longer exists (it was deleted while in use; \(call) of \(file) failed)", errno: errno)
    }

    /// The path of a file inside the directory, for messages.
    func path(of name: String) -> String {
        path.hasSuffix("/") ? path + name : path + "/" + name
    }

    // NFS, SMB/CIFS, SMB2, FUSE, 9p, Ceph, AFS, Coda: file systems where other hosts' changes
    // produce no inotify event.
    static let remoteMagics: Set<Int64> = [0x6969, 0xFF53_4D42, 0x5346_4D42, 0x6573_5546, 0x0102_1997, 0x00C3_6400, 0x5346_414F, 0x7375_7245]

    // tmpfs, ramfs.
    static let memoryMagics: Set<Int64> = [0x0102_1994, 0x8584_58F6]

    private static func makeDirectories(_ path: String) throws(TabSyncError) {
        var prefix = path.hasPrefix("/") ? "/" : ""
        for component in path.split(separator: "/", omittingEmptySubsequences: true) {
            prefix += component
            if mkdir(prefix, 0o700) != 0 {
                let errno = Errno.current
                if errno != .fileExists {
                    throw TabSyncError(code: .io, path: prefix, message: "Cannot create the session directory", errno: errno)
                }
            }
            prefix += "/"
        }
    }

    static func checkOwnership(_ info: stat, path: String, what: String, forbidden: mode_t) throws(TabSyncError) {
        if info.st_uid != geteuid() {
            throw TabSyncError(
                code: .insecurePath, path: path,
                message: "The \(what) is owned by uid \(info.st_uid), not by this user (uid \(geteuid()))")
        }
        if info.st_mode & forbidden != 0 {
            let mode = Self.octal(info.st_mode)
            throw TabSyncError(
                code: .insecurePath, path: path,
                message: "The \(what) has mode \(mode), which lets other users \(forbidden & (S_IRGRP | S_IROTH) != 0 ? "read or write" : "write") it")
        }
    }
}

// MARK: - Files inside the directory

extension SessionDirectory {
    /// Checks a file before it is opened: no symbolic link, FIFO or device; owned by this user,
    /// no access for group or others. Returns nil when the file does not exist.
    func inspect(_ name: String) throws(TabSyncError) -> stat? {
        var info = stat()
        guard fstatat(descriptor, name, &info, AT_SYMLINK_NOFOLLOW) == 0 else {
            let errno = Errno.current
            if errno == .noSuchFileOrDirectory { return nil }
            throw TabSyncError.system("fstatat", errno, path: path(of: name))
        }
        try Self.checkRegular(info, path: path(of: name))
        return info
    }

    static func checkRegular(_ info: stat, path: String) throws(TabSyncError) {
        switch info.st_mode & S_IFMT {
        case S_IFREG:
            break
        case S_IFLNK:
            throw TabSyncError(code: .insecurePath, path: path, message: "Refusing a symbolic link in place of a TabSync file")
        case S_IFIFO:
            throw TabSyncError(code: .notRegularFile, path: path, message: "A FIFO stands in place of a TabSync file")
        case S_IFCHR, S_IFBLK:
            throw TabSyncError(code: .notRegularFile, path: path, message: "A device stands in place of a TabSync file")
        case S_IFDIR:
            throw TabSyncError(code: .notRegularFile, path: path, message: "A directory stands in place of a TabSync file")
        default:
            throw TabSyncError(code: .notRegularFile, path: path, message: "A socket or other special file stands in place of a TabSync file")
        }
        try checkOwnership(info, path: path, what: "file", forbidden: 0o077)
    }

    /// Opens a file in the directory with `O_NOFOLLOW | O_CLOEXEC` (and `O_NONBLOCK`, so a FIFO
    /// planted in its place cannot hang the open), then checks what was opened.
    func openFile(_ name: String, flags: Int32, create: Bool) throws(TabSyncError) -> Int32 {
        var flags = flags | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK
        if create { flags |= O_CREAT }
        let fd: Int32
        do {
            fd = try retrying("openat", path: path(of: name)) { openat(descriptor, name, flags, 0o600) }
        } catch let error where error.errno == .noSuchFileOrDirectory && create && isDeleted {
            throw vanished("openat", .noSuchFileOrDirectory, file: name)
        }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            let errno = Errno.current
            close(fd)
            throw TabSyncError.system("fstat", errno, path: path(of: name))
        }
        do {
            try Self.checkRegular(info, path: path(of: name))
        } catch {
            close(fd)
            throw error
        }
        return fd
    }

    /// The folder in which a compaction writes a log's next generation, `.compacting`, before it
    /// renames it over the log. A file written there raises no event in the watchers of the
    /// session directory (an inotify watch sees one level), so that a compaction wakes each
    /// reader once, at the rename, not also in the middle of the writer's commit.
    static let compactionFolder = ".compacting"

    /// Opens ``compactionFolder``, creating it (mode 0700) when missing, with the session
    /// directory's checks and stricter ones: owned by this user, no access for group or others,
    /// not a symbolic link.
    func openCompactionFolder() throws(TabSyncError) -> Int32 {
        let name = Self.compactionFolder
        if mkdirat(descriptor, name, 0o700) != 0 {
            let errno = Errno.current
            if errno != .fileExists {
                throw TabSyncError(code: .io, path: path(of: name), message: "Cannot create the folder for compactions", errno: errno)
            }
        }
        let fd = openat(descriptor, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else {
            let errno = Errno.current
            var info = stat()
            let link = fstatat(descriptor, name, &info, AT_SYMLINK_NOFOLLOW) == 0 && info.st_mode & S_IFMT == S_IFLNK
            if link || errno.rawValue == ELOOP {
                throw TabSyncError(code: .insecurePath, path: path(of: name), message: "Refusing a symbolic link in place of the folder for compactions", errno: errno)
            }
            switch errno.rawValue {
            case ENOTDIR:
                throw TabSyncError(code: .notRegularFile, path: path(of: name), message: "A file stands in place of the folder for compactions", errno: errno)
            default:
                throw TabSyncError.system("openat", errno, path: path(of: name))
            }
        }
        var info = stat()
        do throws(TabSyncError) {
            guard fstat(fd, &info) == 0 else { throw TabSyncError.system("fstat", .current, path: path(of: name)) }
            try Self.checkOwnership(info, path: path(of: name), what: "folder for compactions", forbidden: 0o077)
        } catch {
            close(fd)
            throw error
        }
        return fd
    }

    /// Returns nil when the file does not exist.
    func openExisting(_ name: String, flags: Int32) throws(TabSyncError) -> Int32? {
        do {
            return try openFile(name, flags: flags, create: false)
        } catch let error where error.errno == .noSuchFileOrDirectory {
            return nil
        }
    }
}

/// Runs a system call, retrying on EINTR, and turns a failure into an error naming the path.
@inline(__always)
func retrying<T: BinaryInteger>(_ call: String, path: String, _ body: () -> T) throws(TabSyncError) -> T {
    while true {
        let result = body()
        if result >= 0 { return result }
        let errno = Errno.current
        if errno == .interrupted { continue }
        throw TabSyncError.system(call, errno, path: path)
    }
}
