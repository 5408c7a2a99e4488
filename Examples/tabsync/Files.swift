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

/// The storages of a directory: every `NAME.state` with a valid NAME.
func storageNames(in entries: [String]) -> [String] {
    entries.compactMap { entry in
        guard entry.hasSuffix(".state") else { return nil }
        let name = String(entry.dropLast(".state".count))
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

// MARK: - State files, read without changing them

/// What a state file's header, length and checksum say (docs/FORMAT.md, section 2), read with
/// `O_NOFOLLOW | O_NONBLOCK` and never written. TabSync's first read of a corrupt file recovers it
/// (moves it aside and writes a new one); the tool looks first, so that inspecting a directory
/// changes nothing in it. The JSON body is not decoded here.
struct StateFileProbe: Sendable {
    enum Verdict: Sendable, Equatable {
        case valid
        /// TabSync would recover it at its next read or commit.
        case corrupt(String)
        /// Written by a newer TabSync: refused, never recovered.
        case unsupportedVersion(Int)
        /// More than the default limit: refused.
        case tooLarge(Int64)
        /// Not a file TabSync opens (link, FIFO, owner, mode): refused.
        case refused(String)
        /// Could not be read by this tool (permissions, vanished).
        case unreadable(String)
    }

    var verdict: Verdict
    /// The format version from the header line, when it has one.
    var version: Int?
    /// The sequence number from the header line of a valid file.
    var sequence: UInt64?

    static let maximumBytes = 16 << 20
    static let maximumHeaderBytes = 96

    static func read(_ path: String) -> StateFileProbe {
        let fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else {
            let error = errno
            if error == ELOOP { return StateFileProbe(verdict: .refused("it is a symbolic link")) }
            return StateFileProbe(verdict: .unreadable(SystemError(call: "open", errno: error).description))
        }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { return StateFileProbe(verdict: .unreadable(SystemError(call: "fstat", errno: errno).description)) }
        if let reason = FileInfo(info).fileRefusals().first { return StateFileProbe(verdict: .refused(reason)) }
        guard Int(info.st_size) <= maximumBytes else { return StateFileProbe(verdict: .tooLarge(Int64(info.st_size))) }
        var bytes = [UInt8](repeating: 0, count: Int(info.st_size))
        var done = 0
        while done < bytes.count {
            let got = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, $0.count - done, off_t(done)) }
            if got < 0, errno == EINTR { continue }
            guard got >= 0 else { return StateFileProbe(verdict: .unreadable(SystemError(call: "read", errno: errno).description)) }
            if got == 0 { break }
            done += got
        }
        bytes.removeLast(bytes.count - done)
        return check(bytes)
    }

    /// Checks 2 to 7 of docs/FORMAT.md, section 2.
    static func check(_ bytes: [UInt8]) -> StateFileProbe {
        guard let newline = bytes.prefix(maximumHeaderBytes).firstIndex(of: UInt8(ascii: "\n")) else {
            return StateFileProbe(verdict: .corrupt(bytes.isEmpty ? "the file is empty" : "no header line (not a TabSync state file)"))
        }
        let fields = String(decoding: bytes[..<newline], as: UTF8.self).split(separator: " ", omittingEmptySubsequences: false)
        guard fields.count >= 2, fields[0] == "tabsync-state" else {
            return StateFileProbe(verdict: .corrupt("no header line (not a TabSync state file)"))
        }
        guard isDecimal(fields[1]), let version = Int(fields[1]) else {
            return StateFileProbe(verdict: .corrupt("the header's version is not a number"))
        }
        guard version == 1 else { return StateFileProbe(verdict: .unsupportedVersion(version), version: version) }
        guard fields.count == 5, isDecimal(fields[2]), isDecimal(fields[3]), fields[4].utf8.count == 8,
              let sequence = UInt64(fields[2]), let length = Int(fields[3]), let checksum = UInt32(fields[4], radix: 16)
        else {
            return StateFileProbe(verdict: .corrupt("the header line is malformed"), version: version)
        }
        let body = bytes[(newline + 1)...]
        guard body.count == length else {
            let why = body.count < length ? "the file is truncated (\(body.count) of \(length) body bytes)" : "\(body.count - length) bytes follow the body"
            return StateFileProbe(verdict: .corrupt(why), version: version)
        }
        guard CRC32.checksum(body) == checksum else {
            return StateFileProbe(verdict: .corrupt("the checksum does not match the contents"), version: version)
        }
        return StateFileProbe(verdict: .valid, version: version, sequence: sequence)
    }

    private static func isDecimal(_ field: Substring) -> Bool {
        !field.isEmpty && field.utf8.allSatisfy { (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) }
    }

    /// For people.
    var summary: String {
        switch verdict {
        case .valid: "valid"
        case let .corrupt(why): "corrupt: \(why)"
        case let .unsupportedVersion(version): "format version \(version), which this TabSync does not read (version 1)"
        case let .tooLarge(size): "\(size) bytes, more than the default limit of \(Self.maximumBytes)"
        case let .refused(why): "refused: \(why)"
        case let .unreadable(why): "unreadable: \(why)"
        }
    }

    /// For JSON: `valid`, `corrupt`, `unsupportedVersion`, `tooLarge`, `refused`, `unreadable`.
    var code: String {
        switch verdict {
        case .valid: "valid"
        case .corrupt: "corrupt"
        case .unsupportedVersion: "unsupportedVersion"
        case .tooLarge: "tooLarge"
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

    static func checksum(_ bytes: some Sequence<UInt8>) -> UInt32 {
        var crc: UInt32 = 0xFFFF_FFFF
        for byte in bytes { crc = table[Int((crc ^ UInt32(byte)) & 0xFF)] ^ (crc >> 8) }
        return crc ^ 0xFFFF_FFFF
    }
}
