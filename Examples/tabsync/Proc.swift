import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// What /proc says about processes, file locks and inotify. Every read tolerates a process
/// that ends meanwhile and a file this user may not read.
enum Proc {
    /// A small file of /proc in full (their size reads as 0, so read until the end).
    static func read(_ path: String, limit: Int = 1 << 20) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 16384)
        while bytes.count < limit {
            let got = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, $0.count) }
            if got < 0, errno == EINTR { continue }
            guard got > 0 else { break }
            bytes.append(contentsOf: chunk[..<got])
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    // MARK: Processes

    /// A process: its command name (`/proc/PID/comm`) and scheduling state (`/proc/PID/stat`, field 3).
    struct Process: Sendable {
        var pid: Int32
        /// Nil when the process is gone or not visible from here (another pid namespace).
        var command: String?
        /// `running`, `sleeping`, `disk sleep`, `stopped`, `tracing stop`, `zombie`, `dead`,
        /// `idle`, ..., or `unknown`.
        var state: String
    }

    static func process(_ pid: Int32) -> Process {
        guard pid > 0 else { return Process(pid: pid, command: nil, state: "unknown") }
        let command = read("/proc/\(pid)/comm").map { $0.hasSuffix("\n") ? String($0.dropLast()) : $0 }
        guard let state = stat(pid)?.state else {
            return Process(pid: pid, command: command, state: kill(pid, 0) == 0 || errno == EPERM ? "unknown" : "gone")
        }
        return Process(pid: pid, command: command, state: stateName(state))
    }

    /// Fields 3 and 4 of /proc/PID/stat. The command name (field 2) is in parentheses and may
    /// itself hold spaces and parentheses, so the fields are counted from the last `)`.
    static func stat(_ pid: Int32) -> (state: Character, parent: Int32)? {
        guard let text = read("/proc/\(pid)/stat"), let close = text.lastIndex(of: ")") else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count >= 2, let state = fields[0].first, let parent = Int32(fields[1]) else { return nil }
        return (state, parent)
    }

    static func stateName(_ state: Character) -> String {
        switch state {
        case "R": "running"
        case "S": "sleeping"
        case "D": "disk sleep"
        case "T": "stopped"
        case "t": "tracing stop"
        case "Z": "zombie"
        case "X", "x": "dead"
        case "I": "idle"
        case "P": "parked"
        case "W": "waking"
        case "K": "wakekill"
        default: "unknown (\(state))"
        }
    }

    /// The pids of /proc, ascending.
    static func pids() -> [Int32] {
        guard case let .success(entries) = directoryEntries("/proc") else { return [] }
        return entries.compactMap { Int32($0) }.sorted()
    }

    // MARK: Locks

    /// One line of /proc/locks: a lock held, or (`->`) a process waiting for the lock above it.
    ///
    ///     1: FLOCK  ADVISORY  WRITE 1234 08:01:123456 0 EOF
    ///     1: -> FLOCK  ADVISORY  WRITE 5678 08:01:123456 0 EOF
    struct LockLine: Sendable, Equatable {
        var id: String
        var isWaiter: Bool
        /// FLOCK, POSIX, OFDLCK, LEASE, DELEG.
        var kind: String
        /// ADVISORY, MANDATORY; ACTIVE, BREAKING, BREAKER for leases.
        var mode: String
        /// READ, WRITE, UNLCK.
        var access: String
        /// -1 for open-file-description locks, which belong to no process.
        var pid: Int32
        var major: UInt64
        var minor: UInt64
        var inode: UInt64
    }

    static func locks() -> Result<[LockLine], SystemError> {
        guard let text = read("/proc/locks", limit: 64 << 20) else { return .failure(SystemError(call: "open /proc/locks", errno: errno)) }
        return .success(text.split(separator: "\n").compactMap(parseLock))
    }

    static func parseLock(_ line: Substring) -> LockLine? {
        var fields = line.split(separator: " ", omittingEmptySubsequences: true)
        guard fields.count >= 6, fields[0].hasSuffix(":") else { return nil }
        let id = String(fields.removeFirst().dropLast())
        let waiter = fields.first == "->"
        if waiter { fields.removeFirst() }
        guard fields.count >= 5, let pid = Int32(fields[3]) else { return nil }
        let device = fields[4].split(separator: ":")
        guard device.count == 3, let major = UInt64(device[0], radix: 16), let minor = UInt64(device[1], radix: 16),
              let inode = UInt64(device[2])
        else { return nil }
        return LockLine(
            id: id, isWaiter: waiter, kind: String(fields[0]), mode: String(fields[1]), access: String(fields[2]), pid: pid,
            major: major, minor: minor, inode: inode)
    }

    /// The processes with a descriptor that holds a lock on the file `device:inode` (as /proc/locks
    /// writes it), from the `lock:` lines of /proc/PID/fdinfo. /proc/locks names the process that
    /// took a lock; when it has ended, the lock lives on in the processes it passed the descriptor
    /// to (`flock FILE command` killed while `command` runs).
    static func processesHoldingLock(device: String) -> [Int32] {
        var holders: [Int32] = []
        for pid in pids() {
            guard case let .success(fds) = directoryEntries("/proc/\(pid)/fdinfo") else { continue }
            let holds = fds.contains { fd in
                guard let info = read("/proc/\(pid)/fdinfo/\(fd)") else { return false }
                return info.split(separator: "\n").contains { line in
                    line.hasPrefix("lock:") && !line.contains("->") && line.split(separator: " ").contains { $0 == device }
                }
            }
            if holds { holders.append(pid) }
        }
        return holders
    }

    // MARK: inotify

    /// The inotify descriptors open in the processes of one user, and the watches on them.
    struct InotifyUsage: Sendable {
        /// Descriptors whose link is `anon_inode:inotify`. A descriptor shared by fork or dup
        /// counts once per process that has it, so this is an upper bound of the instances.
        var descriptors = 0
        /// `inotify wd:` lines of those descriptors' fdinfo.
        var watches = 0
        var processes = 0
        /// Processes of the user whose descriptors could not be read.
        var processesNotInspected = 0
    }

    static func inotifyUsage(uid: UInt32) -> InotifyUsage {
        var usage = InotifyUsage()
        for pid in pids() {
            guard case let .success(owner) = FileInfo.lstat("/proc/\(pid)"), owner.uid == uid else { continue }
            guard case let .success(fds) = directoryEntries("/proc/\(pid)/fd") else {
                usage.processesNotInspected += 1
                continue
            }
            var found = false
            for fd in fds {
                guard link("/proc/\(pid)/fd/\(fd)") == "anon_inode:inotify" else { continue }
                found = true
                usage.descriptors += 1
                if let info = read("/proc/\(pid)/fdinfo/\(fd)") {
                    usage.watches += info.split(separator: "\n").filter { $0.hasPrefix("inotify wd:") }.count
                }
            }
            if found { usage.processes += 1 }
        }
        return usage
    }

    static func link(_ path: String) -> String? {
        var buffer = [CChar](repeating: 0, count: 256)
        let count = readlink(path, &buffer, buffer.count - 1)
        guard count >= 0 else { return nil }
        return String(decoding: buffer[..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// A number from /proc/sys.
    static func number(_ path: String) -> Int64? {
        read(path).flatMap { Int64($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }
}
