import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Checks a log the way a reader in another language would (docs/FORMAT.md section 2),
/// independently of TabSync's own decoder: the header, then every record's length, CRC and
/// sequence number. Returns the values after the last complete commit, or throws what is wrong.
/// A torn tail (bytes after the last complete commit that are no record) is reported in `tail`.
struct LogReport {
    let sequence: UInt64
    let values: [String: String]
    /// Bytes after the last complete commit.
    let tail: Int
}

func checkLog(_ path: String) throws -> LogReport {
    guard let data = FileManager.default.contents(atPath: path) else { throw TestFailure("\(path): cannot be read") }
    let b = [UInt8](data)
    func u32(_ at: Int) -> UInt32 { UInt32(b[at]) | UInt32(b[at + 1]) << 8 | UInt32(b[at + 2]) << 16 | UInt32(b[at + 3]) << 24 }
    func u64(_ at: Int) -> UInt64 { UInt64(u32(at)) | UInt64(u32(at + 4)) << 32 }
    guard b.count >= 48, Array(b[0..<12]) == Array("TABSYNC-LOG\n".utf8), u32(12) == 2, crc32(Array(b[0..<44])) == u32(44) else {
        throw TestFailure("\(path): no valid format 2 header (\(b.count) bytes)")
    }
    let salt = Array(b[20..<36])
    var offset = 48, committed = 48
    var sequence = u64(36), values: [String: String] = [:], pending: [(String?, String?)] = []
    var first = true
    func string(_ at: inout Int) -> String?? {
        let length = u32(at)
        at += 4
        if length == 0xFFFF_FFFF { return .some(nil) }
        defer { at += Int(length) }
        return String(validating: b[at..<at + Int(length)], as: UTF8.self).map { .some($0) }
    }
    while b.count - offset >= 20 {
        let length = Int(u32(offset))
        guard offset + 20 + length <= b.count, crc32(salt + b[offset..<offset + 16 + length]) == u32(offset + 16 + length) else { break }
        var at = offset + 16
        if first {
            guard u32(offset + 4) & 3 == 3, u64(offset + 8) == sequence else { throw TestFailure("\(path): the first record is not the snapshot") }
            _ = string(&at); _ = string(&at)
            let count = u32(at)
            at += 4
            for _ in 0..<count {
                guard case let .some(.some(key)) = string(&at), case let .some(.some(value)) = string(&at) else { throw TestFailure("\(path): a bad snapshot entry") }
                _ = string(&at)
                values[key] = value
            }
            first = false
            committed = offset + 20 + length
        } else {
            guard u64(offset + 8) == sequence + UInt64(pending.count) + 1, case let .some(key) = string(&at), case let .some(value) = string(&at) else {
                throw TestFailure("\(path): a record out of sequence or malformed at byte \(offset)")
            }
            pending.append((key, value))
            if u32(offset + 4) & 1 == 1 {
                for (key, value) in pending { if let key { values[key] = value } else { values.removeAll() } }
                sequence += UInt64(pending.count)
                pending.removeAll()
                committed = offset + 20 + length
            }
        }
        offset += 20 + length
    }
    if first { throw TestFailure("\(path): no snapshot") }
    return LogReport(sequence: sequence, values: values, tail: b.count - committed)
}

/// The sequence number of a log's snapshot (its header's `base`).
func logBase(_ path: String) throws -> UInt64 {
    guard let data = FileManager.default.contents(atPath: path), data.count >= 48 else { throw TestFailure("\(path): no header") }
    return (0..<8).reduce(UInt64(0)) { $0 | UInt64(data[36 + $1]) << (8 * UInt64($1)) }
}

/// A format 2 log with `values` at `sequence` and no change records, encoded here again (not by
/// the code under test), for lures and planted files.
func logFile(values: [String: String], sequence: UInt64, store: String = "00000000-0000-0000-0000-00000000beef") -> [UInt8] {
    func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(v >> (8 * $0) & 0xFF) } }
    func le64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(v >> (8 * UInt64($0)) & 0xFF) } }
    func string(_ s: String?) -> [UInt8] { s.map { le32(UInt32($0.utf8.count)) + Array($0.utf8) } ?? le32(0xFFFF_FFFF) }
    let salt = [UInt8](repeating: 7, count: 16)
    var header = Array("TABSYNC-LOG\n".utf8) + le32(2) + le32(0) + salt + le64(sequence)
    header += le32(crc32(header))
    var payload = string(store) + string(nil) + le32(UInt32(values.count))
    for key in values.keys.sorted() { payload += string(key) + string(values[key]) + string(nil) }
    let frame = le32(UInt32(payload.count)) + le32(3) + le64(sequence) + payload
    return header + frame + le32(crc32(salt + frame))
}

/// CRC-32 (zlib's), written here again so that the check does not trust the code under test.
func crc32(_ bytes: some Sequence<UInt8>) -> UInt32 {
    var crc: UInt32 = 0xFFFF_FFFF
    for byte in bytes {
        crc ^= UInt32(byte)
        for _ in 0..<8 { crc = crc & 1 == 1 ? 0xEDB8_8320 ^ (crc >> 1) : crc >> 1 }
    }
    return crc ^ 0xFFFF_FFFF
}

extension Dictionary where Key == String, Value == any Sendable {
    var type: String? { self["type"] as? String }
    var seq: Int? { (self["seq"] as? NSNumber)?.intValue }
    var string: (String) -> String? { { self[$0] as? String } }
}

extension ChildProcess {
    /// The `storage` events printed so far.
    var storageEvents: [[String: any Sendable]] { objects.filter { $0.type == "storage" } }
    /// The `error` events printed so far that answer no command.
    var unsolicitedErrors: [[String: any Sendable]] { objects.filter { $0.type == "error" && $0["cmd"] == nil } }
}

/// Runs a shell command as root-capable setup (mount, umount); returns its exit status, or -1
/// when it could not start or did not end within `timeout` (it is then killed).
///
/// posix_spawn and waitpid on the child's own pid, not Foundation's Process: this runs on a
/// thread of the cooperative pool, and a wait that depends on a run loop noticing the child's
/// end is a wait that can hang the whole test run. This one is bounded.
@discardableResult
func shell(_ command: String, timeout: Duration = .seconds(30)) -> Int32 {
    var pid: pid_t = 0
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    for descriptor in [STDIN_FILENO, STDOUT_FILENO, STDERR_FILENO] {
        posix_spawn_file_actions_addopen(&actions, descriptor, "/dev/null", descriptor == STDIN_FILENO ? O_RDONLY : O_WRONLY, 0)
    }
    closeInheritedDescriptors(&actions)
    let words: [String] = ["/bin/sh", "-c", command]
    let arguments: [UnsafeMutablePointer<CChar>?] = words.map { strdup($0) } + [nil]
    defer { arguments.forEach { free($0) } }
    guard posix_spawn(&pid, "/bin/sh", &actions, nil, arguments, environ) == 0 else { return -1 }
    let deadline = ContinuousClock.now + timeout
    var status: Int32 = 0
    while waitpid(pid, &status, WNOHANG) == 0 {
        if ContinuousClock.now >= deadline {
            kill(pid, SIGKILL)
            waitpid(pid, &status, 0)
            return -1
        }
        usleep(5_000)
    }
    // WIFEXITED / WEXITSTATUS, which Glibc does not import as functions.
    return status & 0x7F == 0 ? (status >> 8) & 0xFF : -1
}

/// Whether this machine lets the tests mount a small tmpfs (root outside a restricted container).
let canMountTmpfs: Bool = {
    guard geteuid() == 0 else { return false }
    let probe = temporaryDirectory("mount-probe")
    defer { rmdir(probe) }
    guard mkdir(probe, 0o700) == 0, shell("mount -t tmpfs -o size=64k tmpfs '\(probe)'") == 0 else { return false }
    return shell("umount '\(probe)'") == 0
}()

/// Replaces `path` atomically with what `make` creates at a temporary name next to it, as an
/// attacker or a careless program would (rename over the file).
func replaceAtomically(_ path: String, with make: (String) throws -> Void) throws {
    let staging = path + ".planted"
    try make(staging)
    guard rename(staging, path) == 0 else { throw TestFailure("rename over \(path): errno \(errno)") }
}

func writeFile(_ path: String, _ bytes: [UInt8], mode: mode_t = 0o600) throws {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode)
    guard fd >= 0 else { throw TestFailure("open \(path): errno \(errno)") }
    defer { close(fd) }
    guard bytes.isEmpty || write(fd, bytes, bytes.count) == bytes.count else { throw TestFailure("write \(path): errno \(errno)") }
    fchmod(fd, mode)
}

extension ChildProcess {
    /// Sends a command line (`set k v`) and waits for its reply: the next reply object whose
    /// `cmd` is the command's first word (`value` replies carry no `cmd`).
    func command(_ line: String, timeout: Duration = .seconds(20)) async throws -> [String: any Sendable] {
        let word = String(line.split(separator: " ").first ?? "")
        let isReply: ([String: any Sendable]) -> Bool = { object in
            ["ok", "error", "value", "status", "token"].contains(object.type ?? "") && (object["cmd"] as? String ?? word) == word
                && !(object.type == "error" && object["cmd"] == nil)
        }
        let before = objects.filter(isReply).count
        send(line)
        return try await waitFor("reply to \(line.prefix(40))", count: before + 1, timeout: timeout, where: isReply)[before]
    }
}
