import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// One line a child printed on standard output; `object` when the line is a JSON object.
struct OutputLine {
    let text: String
    let object: [String: Any]?

    init(_ text: String) {
        self.text = text
        object = (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any]
    }
}

/// One lock and condition for every child's output and exit, so that a wait for a line from
/// one child notices at once when any other child dies.
final class Hub: @unchecked Sendable {
    let condition = NSCondition()
    /// The --timeout, for messages.
    let timeout: Double
    // Guarded by `condition`:
    private var children: [Child] = []
    private(set) var stopping = false

    init(timeout: Double) {
        self.timeout = timeout
    }

    func add(_ child: Child) {
        condition.withLock { children.append(child) }
    }

    /// From now on children exiting is expected (the demo is ending).
    func beginStopping() {
        condition.withLock {
            stopping = true
            condition.broadcast()
        }
    }

    /// With `condition` held: a report on the first child that exited when it should not have.
    func casualtyReportLocked() -> String? {
        guard !stopping, let child = children.first(where: \.diedLocked) else { return nil }
        return child.deathReportLocked()
    }

    /// Sleeps for `duration` seconds, unless a child dies meanwhile.
    func pause(_ duration: Double) throws(DemoFailure) {
        let deadline = Date(timeIntervalSinceNow: duration)
        condition.lock()
        defer { condition.unlock() }
        while Date() < deadline {
            if let report = casualtyReportLocked() { throw DemoFailure(report) }
            _ = condition.wait(until: deadline)
        }
        if let report = casualtyReportLocked() { throw DemoFailure(report) }
    }
}

/// A child process (a tab or the token server). Its standard output and standard error are
/// read line by line on threads of their own; every line is printed, labelled, as it comes,
/// and kept so that the story can wait for a specific one.
final class Child: @unchecked Sendable {
    enum Kind { case tab, server }

    let name: String
    let kind: Kind
    private let hub: Hub
    private let console: Console
    private let process: Process
    private let input: FileHandle

    // Guarded by hub.condition:
    private var lines: [OutputLine] = []
    private var claimed: [Bool] = []
    private var standardErrorTail: [String] = []
    private var openStreams = 2
    private var exitStatus: Int32?
    private var exitBySignal = false
    private var exitExpected = false

    init(name: String, kind: Kind, executable: String, arguments: [String], hub: Hub, console: Console) throws(DemoFailure) {
        self.name = name
        self.kind = kind
        self.hub = hub
        self.console = console
        process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let stdin = Pipe(), stdout = Pipe(), stderr = Pipe()
        process.standardInput = stdin
        process.standardOutput = stdout
        process.standardError = stderr
        input = stdin.fileHandleForWriting
        process.terminationHandler = { [self] process in
            exited(status: process.terminationStatus, bySignal: process.terminationReason == .uncaughtSignal)
        }
        hub.add(self)
        do {
            try process.run()
        } catch {
            hub.condition.withLock { exitExpected = true }
            throw DemoFailure("cannot start \(name) (\(executable)): \(error.localizedDescription)")
        }
        pump(stdout.fileHandleForReading, standardError: false)
        pump(stderr.fileHandleForReading, standardError: true)
    }

    var pid: Int32 { process.processIdentifier }
    /// When the process was started, for its CPU share.
    let startedAt = Date()

    /// The CPU time the process has used so far (utime + stime from `/proc/PID/stat`), or nil
    /// once it is gone.
    var cpuSeconds: Double? {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return nil }
        // Fields after the command name, which may contain spaces: utime and stime are 14 and 15.
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        guard fields.count > 12, let user = Double(fields[11]), let system = Double(fields[12]) else { return nil }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    // MARK: Input

    /// Writes one command line; `shown` is what the demo prints for it (nil: print nothing).
    func send(_ command: String, shown: String?) throws(DemoFailure) {
        if let shown { console.line(name, "» " + shown, tone: .sent) }
        do {
            try input.write(contentsOf: Data((command + "\n").utf8))
        } catch {
            throw hub.condition.withLock {
                DemoFailure(exitStatus == nil ? "cannot write to \(name): \(error.localizedDescription)" : deathReportLocked())
            }
        }
    }

    func send(_ command: String) throws(DemoFailure) {
        try send(command, shown: command)
    }

    // MARK: Output

    /// Waits until `deadline` for an output line, not yet claimed by an earlier wait, that
    /// matches; claims and returns it. Throws when the deadline passes or a child dies first.
    func waitFor(_ description: String, until deadline: Date, where predicate: (OutputLine) -> Bool) throws(DemoFailure) -> OutputLine {
        hub.condition.lock()
        defer { hub.condition.unlock() }
        var searched = 0
        while true {
            while searched < lines.count {
                if !claimed[searched], predicate(lines[searched]) {
                    claimed[searched] = true
                    return lines[searched]
                }
                searched += 1
            }
            if let report = hub.casualtyReportLocked() { throw DemoFailure(report) }
            if exitStatus != nil, openStreams == 0 {
                throw DemoFailure("\(name) exited (\(statusTextLocked)) before \(description)" + stderrSuffixLocked)
            }
            if Date() >= deadline {
                throw DemoFailure("\(name): no \(description) within \(seconds(hub.timeout)) s (--timeout)")
            }
            _ = hub.condition.wait(until: deadline)
        }
    }

    /// `waitFor` for a JSON object line.
    func waitForObject(_ description: String, until deadline: Date, where predicate: ([String: Any]) -> Bool) throws(DemoFailure) -> [String: Any] {
        try waitFor(description, until: deadline) { line in line.object.map(predicate) ?? false }.object!
    }

    /// Every line printed so far.
    var output: [OutputLine] {
        hub.condition.withLock { lines }
    }

    private func pump(_ handle: FileHandle, standardError: Bool) {
        let descriptor = handle.fileDescriptor
        let thread = Thread { [self] in
            var pending: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 64 * 1024)
            while true {
                let count = chunk.withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
                if count < 0, errno == EINTR { continue }
                if count <= 0 { break }
                pending.append(contentsOf: chunk[0..<count])
                while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                    deliver(String(decoding: pending[..<newline], as: UTF8.self), standardError: standardError)
                    pending.removeSubrange(...newline)
                }
            }
            if !pending.isEmpty { deliver(String(decoding: pending, as: UTF8.self), standardError: standardError) }
            hub.condition.withLock {
                openStreams -= 1
                hub.condition.broadcast()
            }
            withExtendedLifetime(handle) {}
        }
        thread.name = "\(name).\(standardError ? "stderr" : "stdout")"
        thread.start()
    }

    /// Prints the line and stores it, in one critical section: the story never reacts to a
    /// line before it has been printed.
    private func deliver(_ text: String, standardError: Bool) {
        hub.condition.lock()
        defer { hub.condition.unlock() }
        if standardError {
            console.line(name, "(stderr) " + text, tone: .error)
            standardErrorTail.append(text)
            if standardErrorTail.count > 10 { standardErrorTail.removeFirst() }
        } else {
            let line = OutputLine(text)
            switch kind {
            case .tab:
                let (description, tone) = Describe.tabLine(line)
                console.line(name, description, tone: tone)
            case .server:
                console.line(name, text)
            }
            lines.append(line)
            claimed.append(false)
        }
        hub.condition.broadcast()
    }

    // MARK: Exit

    private func exited(status: Int32, bySignal: Bool) {
        hub.condition.lock()
        defer { hub.condition.unlock() }
        exitStatus = status
        exitBySignal = bySignal
        if !exitExpected, !hub.stopping {
            console.line(name, "exited unexpectedly (\(statusTextLocked))", tone: .error)
        }
        hub.condition.broadcast()
    }

    var diedLocked: Bool { exitStatus != nil && !exitExpected }

    private var statusTextLocked: String {
        guard let exitStatus else { return "running" }
        return exitBySignal ? "killed by signal \(exitStatus)" : "status \(exitStatus)"
    }

    private var stderrSuffixLocked: String {
        standardErrorTail.isEmpty ? "" : "; its last standard error lines:\n    " + standardErrorTail.joined(separator: "\n    ")
    }

    /// With hub.condition held. Gives the reader threads a moment to collect the last lines.
    func deathReportLocked() -> String {
        let deadline = Date(timeIntervalSinceNow: 0.5)
        while openStreams > 0, Date() < deadline { _ = hub.condition.wait(until: deadline) }
        return "\(name) (pid \(pid)) exited unexpectedly (\(statusTextLocked))" + stderrSuffixLocked
    }

    enum Ending: Equatable {
        case exited(Int32), killed(Int32), alreadyGone, terminated, forced
    }

    /// Asks the child to end: `command` on its standard input (nil: SIGTERM), then end of
    /// input. False when it had exited already.
    func requestStop(sending command: String?) -> Bool {
        let running = hub.condition.withLock {
            exitExpected = true
            return exitStatus == nil
        }
        guard running else { return false }
        if let command { try? input.write(contentsOf: Data((command + "\n").utf8)) }
        try? input.close()
        if command == nil { kill(pid, SIGTERM) }
        return true
    }

    /// After `requestStop`: waits until `deadline` for the child to exit, then SIGTERM
    /// (`terminated`), then SIGKILL (`forced`).
    func awaitStop(until deadline: Date) -> Ending {
        if waitForExit(deadline.timeIntervalSinceNow) {
            return hub.condition.withLock { exitBySignal ? .killed(exitStatus ?? 0) : .exited(exitStatus ?? 0) }
        }
        kill(pid, SIGTERM)
        if waitForExit(2) { return .terminated }
        kill(pid, SIGKILL)
        _ = waitForExit(2)
        return .forced
    }

    /// `requestStop` and `awaitStop` in one.
    func stop(sending command: String?, grace: Double) -> Ending {
        guard requestStop(sending: command) else { return .alreadyGone }
        return awaitStop(until: Date(timeIntervalSinceNow: grace))
    }

    /// Sends `signal` right away, for an interrupted demo.
    func signal(_ signal: Int32) {
        let running = hub.condition.withLock {
            exitExpected = true
            return exitStatus == nil
        }
        if running { kill(pid, signal) }
    }

    private func waitForExit(_ seconds: Double) -> Bool {
        let deadline = Date(timeIntervalSinceNow: seconds)
        hub.condition.lock()
        defer { hub.condition.unlock() }
        while exitStatus == nil, Date() < deadline { _ = hub.condition.wait(until: deadline) }
        return exitStatus != nil
    }
}
