import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Where the example executables (`tab`, `tabsync`, `devtoken-server`) are: the examples'
/// package's debug build, which scripts/test makes first (`swift build --package-path Examples`),
/// or `TABSYNC_EXAMPLES_BIN`.
let productsDirectory: String = {
    let directory = ProcessInfo.processInfo.environment["TABSYNC_EXAMPLES_BIN"] ?? "\(repositoryRoot)/Examples/.build/debug"
    if !FileManager.default.isExecutableFile(atPath: "\(directory)/tab") {
        FileHandle.standardError.write(Data(
            "IntegrationTests: no tab executable in \(directory); build the examples first (scripts/test does: swift build --package-path Examples), or set TABSYNC_EXAMPLES_BIN\n".utf8))
    }
    return directory
}()

let repositoryRoot: String = {
    var url = URL(fileURLWithPath: #filePath)
    while !FileManager.default.fileExists(atPath: url.appendingPathComponent("Package.swift").path), url.path != "/" {
        url.deleteLastPathComponent()
    }
    return url.path
}()

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// A child process whose standard output is read line by line on a thread of its own.
/// Waiting is always for a line that matches, with a deadline.
final class ChildProcess: Sendable {
    let name: String
    let process: Process
    private let input: FileHandle
    private let lines = Mutex<[String]>([])
    private let errors = Mutex<String>("")
    /// Output pipes read to their end (two: standard output and standard error).
    private let endedPipes = Atomic<Int>(0)

    init(_ executable: String, _ arguments: [String], name: String, environment: [String: String] = [:]) throws {
        self.name = name
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        var env = ProcessInfo.processInfo.environment
        env.merge(environment) { $1 }
        process.environment = env
        let stdin = Pipe(), stdout = Pipe(), stderr = Pipe()
        process.standardInput = stdin
        process.standardOutput = stdout
        process.standardError = stderr
        try process.run()
        self.process = process
        self.input = stdin.fileHandleForWriting
        Self.readLines(stdout.fileHandleForReading, ended: { [self] in endedPipes.add(1, ordering: .releasing) }) { [self] line in lines.withLock { $0.append(line) } }
        Self.readLines(stderr.fileHandleForReading, ended: { [self] in endedPipes.add(1, ordering: .releasing) }) { [self] line in errors.withLock { $0 += line + "\n" } }
    }

    /// Delivers each line of `handle` (a last one without a newline too) on a thread of its own,
    /// then calls `ended`.
    static func readLines(_ handle: FileHandle, ended: @escaping @Sendable () -> Void = {}, _ deliver: @escaping @Sendable (String) -> Void) {
        let thread = Thread {
            var buffer = Data()
            while true {
                let chunk = handle.availableData
                if chunk.isEmpty { break }
                buffer.append(chunk)
                while let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                    deliver(String(decoding: buffer[buffer.startIndex..<newline], as: UTF8.self))
                    buffer.removeSubrange(buffer.startIndex...newline)
                }
            }
            if !buffer.isEmpty { deliver(String(decoding: buffer, as: UTF8.self)) }
            ended()
        }
        thread.start()
    }

    func send(_ line: String) {
        try? input.write(contentsOf: Data((line + "\n").utf8))
    }

    /// Writes raw bytes (for input that is not valid UTF-8).
    func sendBytes(_ bytes: [UInt8]) {
        try? input.write(contentsOf: Data(bytes))
    }

    func closeInput() { try? input.close() }

    var output: [String] { lines.withLock { $0 } }
    var standardError: String { errors.withLock { $0 } }

    /// Output lines parsed as JSON objects (non-JSON lines skipped).
    var objects: [[String: any Sendable]] {
        output.compactMap { line in
            (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: any Sendable]
        }
    }

    /// Waits until `count` output objects match, then returns them.
    @discardableResult
    func waitFor(
        _ description: String, count: Int = 1, timeout: Duration = .seconds(20),
        where predicate: ([String: any Sendable]) -> Bool
    ) async throws -> [[String: any Sendable]] {
        let deadline = ContinuousClock.now + timeout
        while true {
            let matches = objects.filter(predicate)
            if matches.count >= count { return matches }
            if ContinuousClock.now >= deadline {
                // The errors first: the output's tail may not reach back to them.
                let errors = output.filter { $0.contains(#""type":"error""#) }
                throw TestFailure("\(name): timed out after \(timeout) waiting for \(count) × \(description); got \(matches.count). Errors (\(errors.count)): \(errors.suffix(5).joined(separator: "\n")). Output:\n\(output.suffix(20).joined(separator: "\n"))\nstderr: \(standardError)")
            }
            if !process.isRunning, matches.count < count, await outputRead(by: deadline), objects.filter(predicate).count < count {
                throw TestFailure("\(name): exited (\(process.terminationStatus)) while waiting for \(description). stderr: \(standardError)")
            }
            try await Task.sleep(for: .milliseconds(10))
        }
    }

    /// Sends a command and waits for its reply (the next object of one of `types`).
    func ask(_ command: String, expecting types: Set<String>, timeout: Duration = .seconds(20)) async throws -> [String: any Sendable] {
        // Replies name their command by its first word (`login`, not `login alice secret`).
        let name = command.split(separator: " ").first.map(String.init) ?? command
        let isReply: ([String: any Sendable]) -> Bool = { types.contains($0["type"] as? String ?? "") && $0["cmd"] as? String ?? name == name }
        let before = objects.filter(isReply).count
        send(command)
        return try await waitFor("reply to \(command)", count: before + 1, timeout: timeout, where: isReply)[before]
    }

    func kill(_ signal: Int32 = SIGKILL) { Glibc.kill(process.processIdentifier, signal) }

    /// Waits, without blocking a thread, until the process has ended.
    func waitForExit(_ description: String = "its exit", timeout: Duration = .seconds(20)) async throws {
        let deadline = ContinuousClock.now + timeout
        while process.isRunning {
            if ContinuousClock.now >= deadline {
                // The kernel's view tells a process stuck in the kernel (D: a slow disk flush) from
                // one that is gone but not yet reaped (Z) or gone altogether.
                let pid = process.processIdentifier
                let stat = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)).map { text in
                    text.lastIndex(of: ")").map { String(text[text.index(after: $0)...].prefix(3)) } ?? text
                } ?? "gone from /proc"
                throw TestFailure("\(name): still running after \(timeout) waiting for \(description) (kernel state:\(stat), wchan: \((try? String(contentsOfFile: "/proc/\(pid)/wchan", encoding: .utf8)) ?? "?")). stderr: \(standardError)")
            }
            try await Task.sleep(for: .milliseconds(5))
        }
        // What it wrote last may still be in the pipes.
        _ = await outputRead(by: deadline)
    }

    /// Waits until both output pipes have been read to their end, or `deadline` (a child that
    /// inherited them can hold them open). Returns true.
    private func outputRead(by deadline: ContinuousClock.Instant) async -> Bool {
        while endedPipes.load(ordering: .acquiring) < 2, ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(5))
        }
        return true
    }

    /// Ends the process: end of input, then SIGTERM, then SIGKILL after `grace`. Bounded in time:
    /// a child that inherited a blocked SIGTERM (or ignores it) cannot hang the test run. Returns
    /// at once; the grace and the reaping happen on a thread of their own, because this runs in
    /// `defer` blocks of async tests, and a wait there would hold one of the two cooperative
    /// threads that every test of the process shares (use ``waitForExit(timeout:)`` to wait).
    func stop(grace: Duration = .seconds(5)) {
        guard process.isRunning else { return }
        closeInput()
        kill(SIGTERM)
        let process = process
        Thread {
            let deadline = ContinuousClock.now + grace
            while process.isRunning, ContinuousClock.now < deadline { usleep(10_000) }
            if process.isRunning { Glibc.kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
        }.start()
    }
}

/// A `tab` process, ready when this returns.
func launchTab(name: String, directory: String, extra: [String] = []) async throws -> ChildProcess {
    let tab = try ChildProcess("\(productsDirectory)/tab", ["--dir", directory, "--name", name, "--json"] + extra, name: name)
    try await tab.waitFor("ready") { $0["type"] as? String == "ready" }
    return tab
}

func temporaryDirectory(_ label: String) -> String {
    "\(FileManager.default.temporaryDirectory.path)/tabsync-it-\(label)-\(UUID().uuidString.prefix(8))"
}

/// Runs a command (looked up on PATH) to its end: its exit status (-1 when it could not start)
/// and its standard output. For commands that start no daemon: one would hold the pipe open.
@discardableResult
func runCommand(_ arguments: [String]) -> (status: Int32, output: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = arguments
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = FileHandle.nullDevice
    do { try process.run() } catch { return (-1, "") }
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: data, as: UTF8.self))
}

/// Runs a command that starts a server (pg_ctl) to its end, with /dev/null for its standard
/// streams, and returns its exit status. posix_spawn and waitpid: the server inherits every
/// descriptor its starter had, so a pipe would never reach its end, and Foundation's `Process`
/// was seen not to notice the starter's exit.
@discardableResult
func runStartingServer(_ command: [String]) -> Int32 {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    for fd: Int32 in 0...2 { posix_spawn_file_actions_addopen(&actions, fd, "/dev/null", fd == 0 ? O_RDONLY : O_WRONLY, 0) }
    closeInheritedDescriptors(&actions)
    let argv = command.map { strdup($0) } + [nil]
    defer { argv.forEach { free($0) } }
    var pid: pid_t = 0
    guard posix_spawn(&pid, command[0], &actions, nil, argv, environ) == 0 else { return -1 }
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0, errno == EINTR {}
    return status
}

/// Adds to `actions` the closing of every descriptor above the standard streams in the child
/// (glibc's `posix_spawn_file_actions_addclosefrom_np`, looked up at run time: Swift's Glibc
/// does not import it). A child that outlives this call (a server it starts) would otherwise
/// keep what any thread of the test process had open at that moment, among them the socket by
/// which Foundation's `Process` learns that another child exited: that child's exit then goes
/// unnoticed for as long as the server runs (seen as a `tab` left a zombie for 20 s).
func closeInheritedDescriptors(_ actions: inout posix_spawn_file_actions_t) {
    typealias CloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
    guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addclosefrom_np") else { return }
    _ = unsafeBitCast(symbol, to: CloseFrom.self)(&actions, 3)
}

/// A small HTTP helper for the servers' control endpoints.
func httpJSON(_ method: String, _ url: String) async throws -> [String: any Sendable] {
    var request = URLRequest(url: URL(string: url)!)
    request.httpMethod = method
    let (data, _) = try await URLSession.shared.data(for: request)
    return (try JSONSerialization.jsonObject(with: data) as? [String: any Sendable]) ?? [:]
}
