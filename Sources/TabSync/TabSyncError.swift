#if canImport(Glibc)
import Glibc
#endif

/// An error from TabSync's broker: what went wrong, on which path, and the system error under it.
///
/// Every error names the file or directory it concerns, so that a user can act on it
/// ("chmod 700 ~/.myapp/session"). Errors never contain stored values or tokens.
///
/// ### Matching
/// Compare ``code`` against the static members of ``Code``:
/// ```swift
/// catch let error as TabSyncError where error.code == .corruptState { ... }
/// ```
public struct TabSyncError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What kind of failure this is.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        enum Kind: String, Sendable {
            case insecurePath
            case notRegularFile
            case corruptState
            case unsupportedVersion
            case stateTooLarge
            case storageFull
            case invalidArgument
            case io
            case closed
            case watcherUnavailable
            case lockTimeout
            case directoryChanged
            case storeVanished
            case unavailable
        }

        let kind: Kind

        /// A directory or file has the wrong owner or permissions, or is a symbolic link.
        public static let insecurePath = Code(kind: .insecurePath)
        /// A FIFO, device, socket or directory stands where a regular file belongs.
        public static let notRegularFile = Code(kind: .notRegularFile)
        /// The stored state is damaged: a log that is not a TabSync log, has a record that does not
        /// check before valid ones, or went back in sequence (garbage, truncated, bit flips).
        public static let corruptState = Code(kind: .corruptState)
        /// The log (or a state file) was written by a newer, incompatible format version.
        public static let unsupportedVersion = Code(kind: .unsupportedVersion)
        /// The log is larger than ``SharedStorage/Options/maximumStateBytes``.
        public static let stateTooLarge = Code(kind: .stateTooLarge)
        /// No space left (ENOSPC, EDQUOT) or the file size limit was hit (EFBIG).
        public static let storageFull = Code(kind: .storageFull)
        /// A key, a name or an option the API cannot accept.
        public static let invalidArgument = Code(kind: .invalidArgument)
        /// Any other system call failure.
        public static let io = Code(kind: .io)
        /// The storage was closed.
        public static let closed = Code(kind: .closed)
        /// inotify could not be used; TabSync fell back to polling.
        public static let watcherUnavailable = Code(kind: .watcherUnavailable)
        /// A lock was not free within its timeout (``SharedStorage/Options/lockTimeout``,
        /// ``SessionLock/acquire(timeout:)``); ``TabSyncError/holders`` names who holds it.
        public static let lockTimeout = Code(kind: .lockTimeout)
        /// The session directory was moved, replaced or deleted while in use: this process no
        /// longer shares a session with the processes that open its path. Nothing more is
        /// written; open the storage again to join the directory now at the path.
        public static let directoryChanged = Code(kind: .directoryChanged)
        /// The storage's files were deleted while in use (reported on
        /// ``SharedStorage/notifications(includingOwnChanges:)``). Its values are gone; the next
        /// commit starts a new store, which every reader resynchronises to.
        public static let storeVanished = Code(kind: .storeVanished)
        /// A network backend's server could not be reached, or the connection was lost before
        /// the operation completed. A commit that fails so was not applied.
        public static let unavailable = Code(kind: .unavailable)

        public var description: String { kind.rawValue }
    }

    /// What kind of failure this is.
    public var code: Code
    /// The path concerned, when there is one.
    public var path: String?
    /// A sentence for people. Never contains stored values.
    public var message: String
    /// The system error under this one, when a system call failed.
    public var errno: Errno?
    /// With ``Code/lockTimeout``: the processes that held the lock when the wait gave up.
    public var holders: [LockHolder]

    public init(code: Code, path: String?, message: String, errno: Errno? = nil, holders: [LockHolder] = []) {
        self.code = code
        self.path = path
        self.message = message
        self.errno = errno
        self.holders = holders
    }

    public var description: String {
        var text = message
        if let path { text += " (\(path))" }
        if let errno { text += ": \(errno)" }
        return text
    }
}

/// A system error number, with its text from `strerror`.
public struct Errno: Error, RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }

    static var current: Errno { Errno(rawValue: Glibc.errno) }

    public var description: String {
        guard let text = strerror(rawValue) else { return "errno \(rawValue)" }
        return "\(String(cString: text)) (errno \(rawValue))"
    }

    public static let noSuchFileOrDirectory = Errno(rawValue: ENOENT)
    public static let fileExists = Errno(rawValue: EEXIST)
    public static let interrupted = Errno(rawValue: EINTR)
    public static let wouldBlock = Errno(rawValue: EWOULDBLOCK)
    public static let noSpace = Errno(rawValue: ENOSPC)
    public static let quotaExceeded = Errno(rawValue: EDQUOT)
    public static let fileTooLarge = Errno(rawValue: EFBIG)
    public static let tooManyLinks = Errno(rawValue: ELOOP)
    public static let permissionDenied = Errno(rawValue: EACCES)
    public static let notSupported = Errno(rawValue: EOPNOTSUPP)
}

extension TabSyncError {
    /// Maps a failed system call to an error naming the path: a full disk becomes ``Code/storageFull``,
    /// a symbolic link in place of a file becomes ``Code/insecurePath``.
    static func system(_ call: String, _ errno: Errno, path: String) -> TabSyncError {
        switch errno {
        case .noSpace, .quotaExceeded, .fileTooLarge:
            return TabSyncError(code: .storageFull, path: path, message: "No space to write '\(call)'", errno: errno)
        case .tooManyLinks:
            return TabSyncError(code: .insecurePath, path: path, message: "Refusing to follow a symbolic link", errno: errno)
        default:
            return TabSyncError(code: .io, path: path, message: "'\(call)' failed", errno: errno)
        }
    }
}
