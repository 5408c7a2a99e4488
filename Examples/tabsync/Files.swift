import ExampleSupport
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A file as `lstat(2)` sees it: symbolic links are not followed, as TabSync follows none.
struct FileInfo: Sendable {
    enum Kind: String, Sendable {
        case regular, directory, symlink, fifo, socket, characterDevice, blockDevice, other

        /// For people: "regular file", "symbolic link", ...
        var phrase: String {
            switch self {
            case .regular: "regular file"
            case .directory: "directory"
            case .symlink: "symbolic link"
            case .fifo: "FIFO"
            case .socket: "socket"
            case .characterDevice: "character device"
            case .blockDevice: "block device"
            case .other: "special file"
            }
        }
    }

    var kind: Kind
    /// The permission bits with set-user-id, set-group-id and sticky (`st_mode & 07777`).
    var permissions: UInt32
    var uid: UInt32
    var gid: UInt32
    var size: Int64
    var device: UInt64
    var inode: UInt64

    /// Returns the file, or the errno of `lstat`.
    static func lstat(_ path: String) -> Result<FileInfo, SystemError> {
        var info = Glibc.stat()
        guard Glibc.lstat(path, &info) == 0 else { return .failure(SystemError(call: "lstat", errno: errno)) }
        return .success(FileInfo(info))
    }

    /// The same through symbolic links (`stat`).
    static func stat(_ path: String) -> Result<FileInfo, SystemError> {
        var info = Glibc.stat()
        guard fstatat(AT_FDCWD, path, &info, 0) == 0 else { return .failure(SystemError(call: "stat", errno: errno)) }
        return .success(FileInfo(info))
    }

    init(_ info: Glibc.stat) {
        let kind: Kind = switch info.st_mode & S_IFMT {
        case S_IFREG: .regular
        case S_IFDIR: .directory
        case S_IFLNK: .symlink
        case S_IFIFO: .fifo
        case S_IFSOCK: .socket
        case S_IFCHR: .characterDevice
        case S_IFBLK: .blockDevice
        default: .other
        }
        self.init(
            kind: kind, permissions: UInt32(info.st_mode & 0o7777), uid: info.st_uid, gid: info.st_gid,
            size: Int64(info.st_size), device: UInt64(info.st_dev), inode: UInt64(info.st_ino))
    }

    init(kind: Kind, permissions: UInt32, uid: UInt32, gid: UInt32, size: Int64, device: UInt64, inode: UInt64) {
        (self.kind, self.permissions, self.uid, self.gid, self.size, self.device, self.inode) = (kind, permissions, uid, gid, size, device, inode)
    }

    /// The mode in octal as it is, four digits: `0700`, `1777`.
    var octalMode: String { Self.octal(permissions) }

    static func octal(_ mode: UInt32) -> String {
        let digits = String(mode, radix: 8)
        return String(repeating: "0", count: max(0, 4 - digits.count)) + digits
    }

    /// The major and minor device numbers of `st_dev`, as the kernel prints them in /proc/locks
    /// (glibc's `gnu_dev_major` and `gnu_dev_minor`).
    var deviceNumbers: (major: UInt64, minor: UInt64) {
        let major = ((device >> 8) & 0xFFF) | ((device >> 32) & ~0xFFF)
        let minor = (device & 0xFF) | ((device >> 12) & ~0xFF)
        return (major, minor)
    }

    /// Why TabSync would refuse this as its session directory (docs/FORMAT.md, section 1):
    /// a symbolic link, not a directory, another owner, writable by group or others.
    func directoryRefusals(euid: UInt32 = geteuid()) -> [String] {
        switch kind {
        case .directory: break
        case .symlink: return ["it is a symbolic link (TabSync opens the directory with O_NOFOLLOW, so it follows none)"]
        default: return ["it is a \(kind.phrase), not a directory"]
        }
        var reasons: [String] = []
        if uid != euid { reasons.append("it is owned by \(User.name(uid)) (uid \(uid)), not by this user (uid \(euid))") }
        if permissions & 0o022 != 0 {
            reasons.append("its mode \(octalMode) lets \(Self.who(permissions, 0o020, 0o002)) write it (no group or other write bit is allowed; chmod 0700)")
        }
        return reasons
    }

    /// Why TabSync would refuse this as one of its files: not a regular file, another owner,
    /// any group or other permission.
    func fileRefusals(euid: UInt32 = geteuid()) -> [String] {
        switch kind {
        case .regular: break
        case .symlink: return ["it is a symbolic link (TabSync opens files with O_NOFOLLOW and refuses links)"]
        default: return ["it is a \(kind.phrase), not a regular file"]
        }
        var reasons: [String] = []
        if uid != euid { reasons.append("it is owned by \(User.name(uid)) (uid \(uid)), not by this user (uid \(euid))") }
        if permissions & 0o077 != 0 {
            reasons.append("its mode \(octalMode) lets \(Self.who(permissions, 0o070, 0o007)) read or write it (TabSync files must be 0600)")
        }
        return reasons
    }

    private static func who(_ mode: UInt32, _ group: UInt32, _ other: UInt32) -> String {
        switch (mode & group != 0, mode & other != 0) {
        case (true, true): "group and others"
        case (true, false): "the group"
        default: "others"
        }
    }
}

/// A failed system call, for messages.
struct SystemError: Error, Sendable, CustomStringConvertible {
    var call: String
    var errno: Int32
    var description: String { "\(call): \(String(cString: strerror(errno)))" }
}

enum User {
    static func name(_ uid: UInt32) -> String {
        var entry = passwd()
        var result: UnsafeMutablePointer<passwd>?
        var buffer = [CChar](repeating: 0, count: 4096)
        guard getpwuid_r(uid, &entry, &buffer, buffer.count, &result) == 0, result != nil, let name = entry.pw_name else { return "uid \(uid)" }
        return String(cString: name)
    }

    static func groupName(_ gid: UInt32) -> String {
        var entry = group()
        var result: UnsafeMutablePointer<group>?
        var buffer = [CChar](repeating: 0, count: 4096)
        guard getgrgid_r(gid, &entry, &buffer, buffer.count, &result) == 0, result != nil, let name = entry.gr_name else { return "gid \(gid)" }
        return String(cString: name)
    }
}

/// The names in a directory, sorted, without `.` and `..`.
func directoryEntries(_ path: String) -> Result<[String], SystemError> {
    guard let stream = opendir(path) else { return .failure(SystemError(call: "opendir", errno: errno)) }
    defer { closedir(stream) }
    var names: [String] = []
    while let entry = readdir(stream) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        if name != "." && name != ".." { names.append(name) }
    }
    return .success(names.sorted())
}

/// `path` made absolute against the current directory (for messages; nothing else changes).
func absolutePath(_ path: String) -> String {
    if path.hasPrefix("/") { return path }
    let current = FileManager.default.currentDirectoryPath
    return path.isEmpty || path == "." ? current : (current.hasSuffix("/") ? current : current + "/") + path
}

func join(_ directory: String, _ name: String) -> String {
    directory.hasSuffix("/") ? directory + name : directory + "/" + name
}

/// The storage and lock names of docs/FORMAT.md, section 1: 1 to 64 bytes of `A-Z a-z 0-9 - _ .`,
/// not starting with `.`.
func isValidName(_ name: String) -> Bool {
    !name.isEmpty && name.utf8.count <= 64 && !name.hasPrefix(".")
        && name.utf8.allSatisfy { byte in
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte)
                || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) || byte == UInt8(ascii: "-") || byte == UInt8(ascii: "_") || byte == UInt8(ascii: ".")
        }
}

/// The storages of a directory: every `NAME.log` with a valid NAME.
func storageNames(in entries: [String]) -> [String] {
    names(in: entries, suffix: ".log")
}

/// Every `NAME.state` with a valid NAME: format 2's markers, and format 1 state files.
func legacyStateNames(in entries: [String]) -> [String] {
    names(in: entries, suffix: ".state")
}

private func names(in entries: [String], suffix: String) -> [String] {
    entries.compactMap { entry in
        guard entry.hasSuffix(suffix) else { return nil }
        let name = String(entry.dropLast(suffix.count))
        return isValidName(name) ? name : nil
    }
}

// MARK: - File systems

/// The file system a path lives on, from /proc/self/mountinfo: the mount with the path's device
/// (`st_dev`) whose mount point is the longest prefix of the path's real path.
///
/// `statfs(2)`, which TabSync asks (`f_type`), is not in Swift's Glibc module; the mount table
/// names the same file systems, with FUSE subtypes (`fuse.sshfs`) besides.
struct FileSystemType: Sendable {
    /// As the mount table names it: `ext4`, `tmpfs`, `xfs`, `btrfs`, `overlay`, `nfs4`, `cifs`, `fuse.sshfs`, `9p`, ...
    var name: String
    var mountPoint: String
    var source: String
    /// Network, user-space (FUSE) or paravirtual (9p, virtiofs) file systems: changes made
    /// elsewhere raise no inotify event here, and `flock` may not exclude other machines.
    var isRemote: Bool

    static func of(_ path: String) -> Result<FileSystemType, SystemError> {
        guard let resolved = realpath(path, nil) else { return .failure(SystemError(call: "realpath", errno: errno)) }
        let real = String(cString: resolved)
        free(resolved)
        guard case let .success(info) = FileInfo.stat(real) else { return .failure(SystemError(call: "stat", errno: errno)) }
        guard let table = Proc.read("/proc/self/mountinfo") else { return .failure(SystemError(call: "open /proc/self/mountinfo", errno: errno)) }
        let (major, minor) = info.deviceNumbers
        var best: (mount: Mount, sameDevice: Bool)?
        for line in table.split(separator: "\n") {
            guard let mount = Mount(line), mount.contains(real) else { continue }
            let sameDevice = mount.major == major && mount.minor == minor
            // The device decides first (bind mounts, stacked mounts), then the longest mount point.
            if let current = best, (current.sameDevice && !sameDevice)
                || (current.sameDevice == sameDevice && current.mount.point.count >= mount.point.count) { continue }
            best = (mount, sameDevice)
        }
        guard let mount = best?.mount else { return .failure(SystemError(call: "find the mount of \(real)", errno: ENOENT)) }
        return .success(FileSystemType(name: mount.type, mountPoint: mount.point, source: mount.source, isRemote: isRemote(mount.type)))
    }

    /// The file systems on which TabSync's change detection and locks are not reliable.
    static func isRemote(_ type: String) -> Bool {
        let remote: Set<String> = [
            "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "virtiofs", "ceph", "afs", "coda", "lustre", "gpfs", "ocfs2", "gfs2",
            "glusterfs", "fuse", "fuseblk",
        ]
        return remote.contains(type) || type.hasPrefix("fuse.")
    }

    /// One line of mountinfo: `36 35 98:0 /root /mnt rw,noatime shared:1 - ext4 /dev/sda1 rw`.
    struct Mount {
        var major: UInt64
        var minor: UInt64
        var point: String
        var type: String
        var source: String

        init?(_ line: Substring) {
            let fields = line.split(separator: " ")
            guard fields.count >= 7, let separator = fields.firstIndex(of: "-"), separator + 2 < fields.count else { return nil }
            let device = fields[2].split(separator: ":")
            guard device.count == 2, let major = UInt64(device[0]), let minor = UInt64(device[1]) else { return nil }
            (self.major, self.minor) = (major, minor)
            point = Self.unescape(fields[4])
            type = String(fields[separator + 1])
            source = Self.unescape(fields[separator + 2])
        }

        func contains(_ path: String) -> Bool {
            point == "/" || path == point || path.hasPrefix(point + "/")
        }

        /// Spaces, tabs, newlines and backslashes are written as octal escapes (`\040`).
        static func unescape(_ field: Substring) -> String {
            var bytes: [UInt8] = []
            var index = field.utf8.startIndex
            let utf8 = field.utf8
            while index < utf8.endIndex {
                let byte = utf8[index]
                if byte == UInt8(ascii: "\\"), let end = utf8.index(index, offsetBy: 4, limitedBy: utf8.endIndex),
                   let value = UInt8(String(decoding: utf8[utf8.index(after: index)..<end], as: UTF8.self), radix: 8) {
                    bytes.append(value)
                    index = end
                } else {
                    bytes.append(byte)
                    index = utf8.index(after: index)
                }
            }
            return String(decoding: bytes, as: UTF8.self)
        }
    }
}

// MARK: - Files of a storage, read without changing them

/// A file of a storage, read the way TabSync opens it (`O_NOFOLLOW | O_NONBLOCK`: a link planted
/// in its place is not followed, a FIFO does not hang the read) and never written.
enum StorageFile {
    /// TabSync's default limit (`maximumStateBytes`) on a log, and on each of its records.
    static let maximumBytes = 16 << 20

    /// Why a file was not read.
    enum Failure: Error, Sendable, Equatable {
        /// More than ``maximumBytes``.
        case tooLarge(Int64)
        /// Not a file TabSync opens (link, FIFO, owner, mode).
        case refused(String)
        /// This tool could not read it (permissions, vanished).
        case unreadable(String)
    }

    /// The file's bytes (as far as it reached when it was opened), or why not.
    static func read(_ path: String) -> Result<[UInt8], Failure> {
        let fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else {
            let error = errno
            if error == ELOOP { return .failure(.refused("it is a symbolic link")) }
            return .failure(.unreadable(SystemError(call: "open", errno: error).description))
        }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { return .failure(.unreadable(SystemError(call: "fstat", errno: errno).description)) }
        if let reason = FileInfo(info).fileRefusals().first { return .failure(.refused(reason)) }
        guard Int(info.st_size) <= maximumBytes else { return .failure(.tooLarge(Int64(info.st_size))) }
        var bytes = [UInt8](repeating: 0, count: Int(info.st_size))
        var done = 0
        while done < bytes.count {
            let got = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, $0.count - done, off_t(done)) }
            if got < 0, errno == EINTR { continue }
            guard got >= 0 else { return .failure(.unreadable(SystemError(call: "read", errno: errno).description)) }
            if got == 0 { break }
            done += got
        }
        bytes.removeLast(bytes.count - done)
        return .success(bytes)
    }
}

/// What a storage's log (`NAME.log`, format 2) holds, checked the way a TabSync reader walks it:
/// the header's magic, version and checksum, then each record's length (refused above the limit
/// before anything is read or allocated for it), checksum and sequence number. TabSync's read of
/// a log with an invalid tail, damage or an unreadable header repairs it, which is a write; the
/// tool looks first, so that inspecting a directory changes nothing in it. Written here again
/// rather than taken from TabSync, so that the tool does not trust the code it checks. Values are
/// checked as UTF-8 and skipped, never kept.
///
/// All integers are little-endian:
///
///     header:  "TABSYNC-LOG\n" | u32 version (2) | u32 flags | 16-byte salt | u64 base | u32 CRC-32 of bytes 0..<44
///     record:  u32 length | u32 flags | u64 sequence | payload (length bytes) | u32 CRC-32 of the salt, then of the record's bytes before it
///
/// The first record is the snapshot (flag 2) with sequence number `base`, each later one a change
/// with the next number. A commit is one or more records, its last one flagged 1: a reader applies
/// a commit only once it has read that record.
struct LogProbe: Sendable {
    enum Verdict: Sendable, Equatable {
        /// Ends with a complete commit.
        case valid
        /// `bytes` after the last complete commit are not the next valid record, and no valid
        /// record follows them: harmless, TabSync cuts them before its next commit.
        case tornTail(bytes: Int, Tail)
        /// A record that does not check or is out of sequence, with a valid record after it: the
        /// next TabSync process that reads the log recovers every record that still checks, in a
        /// new store.
        case damaged(String)
        /// No valid header or first snapshot (not a TabSync log, truncated, damaged at its start):
        /// the next TabSync process that reads it starts a new store in its place.
        case corrupt(String)
        /// A log of another format version (a newer TabSync): refused, never recovered.
        case unsupportedVersion(UInt32)
        /// More than the default limit: refused.
        case tooLarge(Int64)
        /// Not a file TabSync opens (link, FIFO, owner, mode): refused.
        case refused(String)
        /// Could not be read by this tool (permissions, vanished).
        case unreadable(String)
    }

    /// What a torn tail is, which decides whether a TabSync reader leaves it alone.
    enum Tail: Sendable, Equatable {
        /// The bytes end inside a record, or inside a commit whose last record is not there: a
        /// commit being written, or one a killed writer left. Readers leave it to the next commit.
        case incomplete
        /// A record that does not check or is out of sequence (the problem): a reader that meets it
        /// has it cut at once.
        case invalid(String)
    }

    var verdict: Verdict
    /// The header's format version, when the file starts with the magic.
    var version: UInt32?
    /// The sequence number of the last complete commit (before a torn tail or the damage).
    var sequence: UInt64?
    /// The number of keys as of that commit.
    var keys: Int?
    /// The store identifier, from the snapshot.
    var store: String?
    /// The header's flag 1: the log holds values whose history is scrubbed (tokens), and recovery
    /// deletes it when it is damaged instead of moving it aside.
    var secret = false

    static let magic = Array("TABSYNC-LOG\n".utf8)
    static let headerSize = 48
    /// A record's length, flags and sequence number.
    static let frameSize = 16
    /// A record's checksum, after its payload.
    static let trailerSize = 4
    /// How far past an invalid record TabSync looks for a valid one, which makes the log damaged
    /// rather than torn.
    static let damageWindow = 4 << 20

    static func read(_ path: String) -> LogProbe {
        switch StorageFile.read(path) {
        case let .success(bytes): bytes.withUnsafeBytes { check($0) }
        case let .failure(.tooLarge(size)): LogProbe(verdict: .tooLarge(size))
        case let .failure(.refused(why)): LogProbe(verdict: .refused(why))
        case let .failure(.unreadable(why)): LogProbe(verdict: .unreadable(why))
        }
    }

    /// The checks of a reader, in its order: the header, then the records up to the first that is
    /// incomplete, does not check or is out of sequence.
    static func check(_ bytes: UnsafeRawBufferPointer) -> LogProbe {
        guard bytes.count >= headerSize else {
            return LogProbe(verdict: .corrupt(bytes.isEmpty ? "the file is empty" : "it is shorter than a log's header (\(bytes.count) bytes)"))
        }
        guard bytes.prefix(magic.count).elementsEqual(magic) else {
            return LogProbe(verdict: .corrupt("it does not start with \"TABSYNC-LOG\" (not a TabSync log)"))
        }
        let version = integer(UInt32.self, bytes, at: 12)
        guard version == 2 else { return LogProbe(verdict: .unsupportedVersion(version), version: version) }
        guard CRC32.checksum(UnsafeRawBufferPointer(rebasing: bytes[0..<44])) == integer(UInt32.self, bytes, at: 44) else {
            return LogProbe(verdict: .corrupt("its header's checksum does not match"), version: version)
        }
        let secret = integer(UInt32.self, bytes, at: 16) & 1 != 0
        let seed = CRC32.checksum(UnsafeRawBufferPointer(rebasing: bytes[20..<36]))
        let base = integer(UInt64.self, bytes, at: 36)

        // The state as of the last complete commit (nil before the snapshot's), and where it ends.
        var committed: (sequence: UInt64, keys: Set<String>, store: String)?
        var end = headerSize
        var pending: [Record] = []
        var offset = headerSize
        var stop: Tail?
        walk: while offset < bytes.count {
            let record: Record
            switch Record.read(bytes, at: offset, seed: seed) {
            case .incomplete:
                stop = .incomplete
                break walk
            case let .invalid(problem):
                stop = .invalid("at byte \(offset), \(problem)")
                break walk
            case let .record(found):
                record = found
            }
            if let problem = sequenceProblem(record, base: base, last: committed?.sequence, pending: pending.count) {
                stop = .invalid("at byte \(offset), \(problem)")
                break walk
            }
            pending.append(record)
            offset = record.end
            guard record.endsCommit else { continue }
            for record in pending {
                switch record.body {
                case let .snapshot(store, keys):
                    committed = (record.sequence, keys, store)
                case let .change(key, removed):
                    committed?.sequence = record.sequence
                    if let key {
                        if removed { committed?.keys.remove(key) } else { committed?.keys.insert(key) }
                    } else {
                        committed?.keys.removeAll()
                    }
                }
            }
            pending.removeAll()
            end = offset
        }
        if stop == nil, !pending.isEmpty { stop = .incomplete }
        guard let committed else {
            return LogProbe(verdict: .corrupt("its first record is not a valid snapshot"), version: version, secret: secret)
        }
        var probe = LogProbe(verdict: .valid, version: version, sequence: committed.sequence, keys: committed.keys.count, store: committed.store, secret: secret)
        switch stop {
        case nil:
            break
        case .incomplete:
            probe.verdict = .tornTail(bytes: bytes.count - end, .incomplete)
        case let .invalid(problem):
            if let later = nextRecord(in: bytes, after: end, seed: seed) {
                probe.verdict = .damaged("\(problem), and a valid record follows at byte \(later)")
            } else {
                probe.verdict = .tornTail(bytes: bytes.count - end, .invalid(problem))
            }
        }
        return probe
    }

    /// Why `record` cannot come next, if it cannot: the snapshot first (with the header's
    /// sequence number, ending its commit), then changes numbered on from `last`, the last
    /// complete commit's, counting the `pending` records of the commit in progress.
    private static func sequenceProblem(_ record: Record, base: UInt64, last: UInt64?, pending: Int) -> String? {
        if case .snapshot = record.body {
            if last != nil || pending > 0 { return "a second snapshot" }
            if record.sequence != base { return "the snapshot has sequence \(record.sequence), the header \(base)" }
            if !record.endsCommit { return "the snapshot does not end its commit" }
            return nil
        }
        guard let last else { return "the first record is not a snapshot" }
        let (expected, overflow) = last.addingReportingOverflow(UInt64(pending) + 1)
        if overflow { return "a record follows the largest sequence number" }
        return record.sequence == expected ? nil : "a record has sequence \(record.sequence) where \(expected) comes next"
    }

    /// The offset of the first valid record after `offset`, looked for as TabSync looks for one:
    /// at every byte of the next ``damageWindow`` bytes.
    static func nextRecord(in bytes: UnsafeRawBufferPointer, after offset: Int, seed: UInt32) -> Int? {
        var candidate = offset + 1
        let limit = min(bytes.count, offset + damageWindow)
        while candidate + frameSize + trailerSize <= limit {
            if case .record = Record.read(bytes, at: candidate, seed: seed) { return candidate }
            candidate += 1
        }
        return nil
    }

    /// A record that checks: its frame, and what the probe keeps of its payload (no value).
    private struct Record {
        var flags: UInt32
        var sequence: UInt64
        /// The offset after it.
        var end: Int
        var body: Body

        enum Body {
            /// The snapshot's store and keys.
            case snapshot(store: String, keys: Set<String>)
            /// `key` set, or `removed`; a nil key clears every key.
            case change(key: String?, removed: Bool)
        }

        var endsCommit: Bool { flags & 1 != 0 }

        enum Read {
            case record(Record)
            /// The bytes end inside the record (or before one begins).
            case incomplete
            /// Not a record of this log (the problem).
            case invalid(String)
        }

        /// The record at `offset`, checked with the CRC-32 of the log's salt (`seed`).
        static func read(_ bytes: UnsafeRawBufferPointer, at offset: Int, seed: UInt32) -> Read {
            guard bytes.count - offset >= frameSize else { return .incomplete }
            let length = Int(integer(UInt32.self, bytes, at: offset))
            guard length <= StorageFile.maximumBytes else {
                return .invalid("a record claims \(length) bytes, over the limit of \(StorageFile.maximumBytes)")
            }
            let end = offset + frameSize + length + trailerSize
            guard end <= bytes.count else { return .incomplete }
            let covered = UnsafeRawBufferPointer(rebasing: bytes[offset..<end - trailerSize])
            guard CRC32.checksum(covered, continuing: seed) == integer(UInt32.self, bytes, at: end - trailerSize) else {
                return .invalid("a record's checksum does not match")
            }
            let flags = integer(UInt32.self, bytes, at: offset + 4)
            var fields = Fields(bytes: bytes, offset: offset + frameSize, end: end - trailerSize)
            let body = flags & 2 != 0 ? fields.snapshot() : fields.change()
            guard let body, fields.offset == fields.end else { return .invalid("a record's fields do not fit its length") }
            return .record(Record(flags: flags, sequence: integer(UInt64.self, bytes, at: offset + 8), end: end, body: body))
        }
    }

    /// A payload's fields. A string is a u32 length and that many bytes of UTF-8, or the length
    /// 0xFFFFFFFF alone for none. Each read is nil for anything out of bounds or not UTF-8.
    private struct Fields {
        let bytes: UnsafeRawBufferPointer
        var offset: Int
        let end: Int

        mutating func integer<T: FixedWidthInteger>(_: T.Type) -> T? {
            guard end - offset >= MemoryLayout<T>.size else { return nil }
            defer { offset += MemoryLayout<T>.size }
            return LogProbe.integer(T.self, bytes, at: offset)
        }

        /// `.some(nil)` for none.
        mutating func string() -> String?? {
            guard let length = integer(UInt32.self) else { return nil }
            if length == UInt32.max { return .some(nil) }
            guard Int(length) <= end - offset else { return nil }
            defer { offset += Int(length) }
            return String(validating: bytes[offset..<offset + Int(length)], as: UTF8.self).map { .some($0) }
        }

        mutating func present() -> String? {
            guard case let .some(.some(text)) = string() else { return nil }
            return text
        }

        /// key?, value?, origin, instance, i64 time (milliseconds since 1970).
        mutating func change() -> Record.Body? {
            guard let key = string(), let value = string(), present() != nil, present() != nil, integer(UInt64.self) != nil else { return nil }
            return .change(key: key, removed: value == nil)
        }

        /// store, recovery?, u32 count, then count × (key, value, origin?), each key once.
        mutating func snapshot() -> Record.Body? {
            guard let store = present(), string() != nil, let count = integer(UInt32.self) else { return nil }
            // Each entry takes at least 12 bytes: a count beyond that is refused before it is used.
            guard Int(count) <= (end - offset) / 12 else { return nil }
            var keys = Set<String>(minimumCapacity: Int(count))
            for _ in 0..<count {
                guard let key = present(), present() != nil, string() != nil, keys.insert(key).inserted else { return nil }
            }
            return .snapshot(store: store, keys: keys)
        }
    }

    private static func integer<T: FixedWidthInteger>(_: T.Type, _ bytes: UnsafeRawBufferPointer, at offset: Int) -> T {
        T(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: T.self))
    }

    /// For people.
    var summary: String {
        switch verdict {
        case .valid:
            "valid"
        case let .tornTail(bytes, .incomplete):
            "torn tail: the last \(Display.plural(bytes, "byte")) end inside a record or a commit (one being written, or left by a killed writer); harmless: the next commit cuts them"
        case let .tornTail(bytes, .invalid(problem)):
            "torn tail: the last \(Display.plural(bytes, "byte")) are not a valid record (\(problem)); harmless: TabSync cuts them at its next read or commit"
        case let .damaged(problem): "damaged: \(problem)"
        case let .corrupt(problem): "not a readable log: \(problem)"
        case let .unsupportedVersion(version): "format version \(version), which this TabSync does not read (version 2)"
        case let .tooLarge(size): "\(size) bytes, more than the default limit of \(StorageFile.maximumBytes)"
        case let .refused(why): "refused: \(why)"
        case let .unreadable(why): "unreadable: \(why)"
        }
    }

    /// For JSON: `valid`, `tornTail`, `damaged`, `corrupt`, `unsupportedVersion`, `tooLarge`,
    /// `refused`, `unreadable`.
    var code: String {
        switch verdict {
        case .valid: "valid"
        case .tornTail: "tornTail"
        case .damaged: "damaged"
        case .corrupt: "corrupt"
        case .unsupportedVersion: "unsupportedVersion"
        case .tooLarge: "tooLarge"
        case .refused: "refused"
        case .unreadable: "unreadable"
        }
    }
}

/// What `NAME.state` is. Format 1 kept a storage in it (a header line
/// `tabsync-state 1 <seq> <length> <crc>\n` and a JSON body); format 2 upgrades it to `NAME.log`
/// and leaves a 29-byte marker in its place, `tabsync-state 2 0 0 00000000\n`, which TabSync 1
/// refuses instead of starting a store of its own beside the log. Read like a log, never
/// written; a format 1 body's JSON is not decoded here.
struct LegacyStateProbe: Sendable {
    enum Verdict: Sendable, Equatable {
        /// Format 2's marker.
        case marker
        /// A format 1 state file whose header, length and checksum check: TabSync upgrades it to
        /// `NAME.log` (same store, values and sequence number) when it opens a storage with no log.
        case format1
        /// Neither (why): TabSync does not upgrade it, and TabSync 1 is not kept out by it.
        case notUpgradable(String)
        /// Not a file TabSync opens (link, FIFO, owner, mode): refused.
        case refused(String)
        /// Could not be read by this tool (permissions, vanished).
        case unreadable(String)
    }

    var verdict: Verdict
    /// The format version from the header line, when it has one.
    var version: Int?
    /// The sequence number from the header line of a format 1 file.
    var sequence: UInt64?

    static let marker = Array("tabsync-state 2 0 0 00000000\n".utf8)
    static let maximumHeaderBytes = 96

    static func read(_ path: String) -> LegacyStateProbe {
        switch StorageFile.read(path) {
        case let .success(bytes): check(bytes)
        case let .failure(.tooLarge(size)): LegacyStateProbe(verdict: .notUpgradable("\(size) bytes, more than the limit of \(StorageFile.maximumBytes)"))
        case let .failure(.refused(why)): LegacyStateProbe(verdict: .refused(why))
        case let .failure(.unreadable(why)): LegacyStateProbe(verdict: .unreadable(why))
        }
    }

    /// The marker, or checks 2 to 7 of format 1 (docs/FORMAT.md of TabSync 1, section 2).
    static func check(_ bytes: [UInt8]) -> LegacyStateProbe {
        if bytes == marker { return LegacyStateProbe(verdict: .marker, version: 2) }
        guard let newline = bytes.prefix(maximumHeaderBytes).firstIndex(of: UInt8(ascii: "\n")) else {
            return LegacyStateProbe(verdict: .notUpgradable(bytes.isEmpty ? "the file is empty" : "no header line (not a TabSync state file)"))
        }
        let fields = String(decoding: bytes[..<newline], as: UTF8.self).split(separator: " ", omittingEmptySubsequences: false)
        guard fields.count >= 2, fields[0] == "tabsync-state" else {
            return LegacyStateProbe(verdict: .notUpgradable("no header line (not a TabSync state file)"))
        }
        guard isDecimal(fields[1]), let version = Int(fields[1]) else {
            return LegacyStateProbe(verdict: .notUpgradable("the header's version is not a number"))
        }
        guard version == 1 else { return LegacyStateProbe(verdict: .notUpgradable("format version \(version)"), version: version) }
        guard fields.count == 5, isDecimal(fields[2]), isDecimal(fields[3]), isHex(fields[4]),
              let sequence = UInt64(fields[2]), let length = Int(fields[3]), let checksum = UInt32(fields[4], radix: 16)
        else {
            return LegacyStateProbe(verdict: .notUpgradable("a format 1 header line that is malformed"), version: version)
        }
        let body = bytes[(newline + 1)...]
        guard body.count == length else {
            let why = body.count < length ? "a truncated format 1 file (\(body.count) of \(length) body bytes)" : "a format 1 file with \(body.count - length) bytes after its body"
            return LegacyStateProbe(verdict: .notUpgradable(why), version: version)
        }
        guard body.withUnsafeBytes({ CRC32.checksum($0) }) == checksum else {
            return LegacyStateProbe(verdict: .notUpgradable("a format 1 file whose checksum does not match its contents"), version: version)
        }
        return LegacyStateProbe(verdict: .format1, version: version, sequence: sequence)
    }

    private static func isDecimal(_ field: Substring) -> Bool {
        !field.isEmpty && field.utf8.allSatisfy { (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) }
    }

    private static func isHex(_ field: Substring) -> Bool {
        field.utf8.count == 8 && field.utf8.allSatisfy { byte in
            (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) || (UInt8(ascii: "a")...UInt8(ascii: "f")).contains(byte)
                || (UInt8(ascii: "A")...UInt8(ascii: "F")).contains(byte)
        }
    }

    /// For people.
    var summary: String {
        switch verdict {
        case .marker: "the format 2 marker (TabSync 1 refuses this storage)"
        case .format1: "a format 1 state file"
        case let .notUpgradable(why): "neither the format 2 marker nor a format 1 state file that TabSync can upgrade (\(why))"
        case let .refused(why): "refused: \(why)"
        case let .unreadable(why): "unreadable: \(why)"
        }
    }

    /// For JSON: `marker`, `format1`, `notUpgradable`, `refused`, `unreadable`.
    var code: String {
        switch verdict {
        case .marker: "marker"
        case .format1: "format1"
        case .notUpgradable: "notUpgradable"
        case .refused: "refused"
        case .unreadable: "unreadable"
        }
    }
}

/// CRC-32 (reflected polynomial 0xEDB88320), as zlib computes it.
enum CRC32 {
    static let table: [UInt32] = (0..<256).map { index in
        var value = UInt32(index)
        for _ in 0..<8 { value = value & 1 == 1 ? 0xEDB8_8320 ^ (value >> 1) : value >> 1 }
        return value
    }

    /// The CRC of `bytes`; with `continuing`, of the bytes whose CRC it is followed by `bytes`
    /// (zlib's `crc32(previous, bytes)`).
    static func checksum(_ bytes: UnsafeRawBufferPointer, continuing previous: UInt32 = 0) -> UInt32 {
        var crc = previous ^ 0xFFFF_FFFF
        for byte in bytes { crc = table[Int((crc ^ UInt32(byte)) & 0xFF)] ^ (crc >> 8) }
        return crc ^ 0xFFFF_FFFF
    }
}
