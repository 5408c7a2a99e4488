import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A process's scheduling state, from `/proc/PID/stat`.
public enum ProcessState: String, Sendable, Hashable {
    case running, sleeping, stopped, zombie, gone, unknown

    public init(pid: Int32) {
        guard pid > 0, let stat = Proc.read("/proc/\(pid)/stat") else { self = .gone; return }
        // The state is the field after the command name, which may contain spaces and ')'.
        guard let close = stat.lastIndex(of: ")"), let state = stat[stat.index(after: close)...].split(separator: " ").first else {
            self = .unknown
            return
        }
        switch state {
        case "R": self = .running
        case "S", "D", "I": self = .sleeping
        case "T", "t": self = .stopped
        case "Z", "X": self = .zombie
        default: self = .unknown
        }
    }
}

/// A process that holds or waits for a lock, as `/proc` shows it (and, for a network backend,
/// as its server does).
public struct LockHolder: Sendable, Hashable, CustomStringConvertible {
    public var pid: Int32
    /// The command name (`/proc/PID/comm`), "" when the process is gone or on another host.
    public var command: String
    /// The process's state; ``ProcessState/unknown`` for a process on another host.
    public var state: ProcessState
    /// For a network backend's lock: the holder's connection as the server sees it.
    public var connection: ServerConnection?

    /// A process of this machine, described from `/proc`.
    public init(pid: Int32) {
        self.pid = pid
        command = Proc.read("/proc/\(pid)/comm").map { String($0.prefix { $0 != "\n" }) } ?? ""
        state = ProcessState(pid: pid)
    }

    public init(pid: Int32, command: String, state: ProcessState, connection: ServerConnection?) {
        self.pid = pid
        self.command = command
        self.state = state
        self.connection = connection
    }

    public var description: String {
        let process = "process \(pid) (\(command.isEmpty ? "?" : command), \(state.rawValue))"
        guard let connection else { return process }
        return "\(process) on \(connection)"
    }
}

/// A database session that holds or waits for a lock, as the server reports it (for PostgreSQL,
/// `pg_stat_activity`).
public struct ServerConnection: Sendable, Hashable, CustomStringConvertible {
    /// The host the holder runs on, as it named itself.
    public var host: String
    /// The server process serving the connection (PostgreSQL's backend pid).
    public var serverPID: Int32
    /// The connection's application name.
    public var applicationName: String
    /// The client's address as the server sees it; nil for a Unix socket.
    public var clientAddress: String?
    /// When the lock was taken or the wait began (the server's clock), where known.
    public var since: Date?

    public init(host: String, serverPID: Int32, applicationName: String, clientAddress: String?, since: Date?) {
        self.host = host
        self.serverPID = serverPID
        self.applicationName = applicationName
        self.clientAddress = clientAddress
        self.since = since
    }

    public var description: String {
        var text = "host \(host) (server pid \(serverPID), application \(applicationName)"
        if let clientAddress { text += ", from \(clientAddress)" }
        if let since { text += ", since \(since)" }
        return text + ")"
    }
}

/// Who holds a lock file and who waits for it, like the Web Locks API's `query()`. Read from
/// `/proc/locks` (flock entries) for the lock file's device and inode.
public struct LockReport: Sendable, Hashable {
    /// The lock's name (`app` for the commit lock of storage `app`, `refresh` for a named lock).
    public var name: String
    /// The lock file.
    public var path: String
    /// The holder; normally one. Empty when the lock is free.
    public var holders: [LockHolder]
    /// Processes blocked in `flock` on it. Waiters that poll (TabSync's own, see
    /// ``SessionLock/acquire(timeout:)``) do not show here.
    public var waiters: [LockHolder]

    public init(name: String, path: String, holders: [LockHolder], waiters: [LockHolder]) {
        self.name = name
        self.path = path
        self.holders = holders
        self.waiters = waiters
    }
}

enum Proc {
    static func read(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 16_384)
        while bytes.count < 4 << 20 {
            let count = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count < 0, errno == EINTR { continue }
            if count <= 0 { break }
            bytes += buffer[0..<count]
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// The flock holders and waiters of the file with this device and inode.
    static func locks(device: UInt64, inode: UInt64) -> (holders: [Int32], waiters: [Int32]) {
        guard let table = read("/proc/locks") else { return ([], []) }
        let major = ((device >> 8) & 0xFFF) | ((device >> 32) & ~0xFFF)
        let minor = (device & 0xFF) | ((device >> 12) & ~0xFF)
        var holders: [Int32] = [], waiters: [Int32] = []
        for line in table.split(separator: "\n") {
            // "1: FLOCK  ADVISORY  WRITE 1234 08:01:123456 0 EOF", waiters with "->" after "1:".
            var fields = line.split(separator: " ").dropFirst()
            let waiting = fields.first == "->"
            if waiting { fields = fields.dropFirst() }
            let words = Array(fields)
            guard words.count >= 5, words[0] == "FLOCK", let pid = Int32(words[3]) else { continue }
            let parts = words[4].split(separator: ":")
            guard parts.count == 3, UInt64(parts[0], radix: 16) == major, UInt64(parts[1], radix: 16) == minor,
                  UInt64(parts[2]) == inode else { continue }
            // One entry a pid: /proc/locks can list a lock or a blocked waiter more than once.
            if waiting {
                if !waiters.contains(pid) { waiters.append(pid) }
            } else if !holders.contains(pid) {
                holders.append(pid)
            }
        }
        return (holders, waiters)
    }
}
