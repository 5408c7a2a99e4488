import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Checks a state file the way a reader in another language would (docs/FORMAT.md section 2),
/// independently of TabSync's own decoder. Returns the decoded body, or throws what is wrong.
struct StateFileReport {
    let sequence: UInt64
    let values: [String: String]
}

func checkStateFile(_ path: String) throws -> StateFileReport {
    guard let data = FileManager.default.contents(atPath: path) else { throw TestFailure("\(path): cannot be read") }
    let bytes = [UInt8](data)
    guard let newline = bytes.prefix(96).firstIndex(of: UInt8(ascii: "\n")) else { throw TestFailure("\(path): no header line (\(bytes.count) bytes)") }
    let fields = String(decoding: bytes[..<newline], as: UTF8.self).split(separator: " ", omittingEmptySubsequences: false)
    guard fields.count == 5, fields[0] == "tabsync-state", fields[1] == "1",
          let sequence = UInt64(fields[2]), let length = Int(fields[3]), let crc = UInt32(fields[4], radix: 16)
    else { throw TestFailure("\(path): malformed header \(fields)") }
    let body = Array(bytes[(newline + 1)...])
    guard body.count == length else { throw TestFailure("\(path): torn, body has \(body.count) of \(length) bytes") }
    guard crc32(body) == crc else { throw TestFailure("\(path): checksum mismatch") }
    guard let object = try JSONSerialization.jsonObject(with: Data(body)) as? [String: Any],
          (object["seq"] as? NSNumber)?.uint64Value == sequence,
          let values = object["values"] as? [String: String]
    else { throw TestFailure("\(path): the body is not a state document with seq \(sequence)") }
    return StateFileReport(sequence: sequence, values: values)
}

/// CRC-32 (zlib's), written here again so that the check does not trust the code under test.
func crc32(_ bytes: [UInt8]) -> UInt32 {
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
