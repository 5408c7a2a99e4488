import Foundation
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The storage soak: PROCESSES `tab` processes (16) doing random operations for SECONDS, with
/// the invariants checked on every line they print. CI runs it for a minute; `scripts/soak
/// --minutes 10` runs it for longer (TABSYNC_SOAK_SECONDS, TABSYNC_SOAK_PROCESSES).
///
/// Invariants:
/// - in every process, `storage` events have strictly increasing sequence numbers, and the
///   sequence numbers of its own commits never decrease;
/// - no command fails and no process reports an error;
/// - at the end every process reads the same value for every key, equal to the log.
///
/// ### Adding operations
/// Append an ``Operation`` to ``operations``: a name, a weight, the command line it sends, and
/// the reply types that count as success (auth operations would add `token`, and accept the
/// `session` events they cause in ``SoakTab/check(_:)``).
@Suite(.serialized, .timeLimit(.minutes(20)))
struct StorageSoakTests {
    struct Operation: Sendable {
        let name: String
        let weight: Int
        let command: @Sendable () -> String
        var success: Set<String> = ["ok"]
    }

    static let keys = 24

    static let operations: [Operation] = [
        Operation(name: "set", weight: 60) { "set k\(Int.random(in: 0..<keys)) \(UInt32.random(in: 0...UInt32.max))" },
        Operation(name: "remove", weight: 25) { "remove k\(Int.random(in: 0..<keys))" },
        Operation(name: "get", weight: 12, command: { "get k\(Int.random(in: 0..<keys))" }, success: ["value"]),
        Operation(name: "clear", weight: 3) { "clear" },
    ]

    static var seconds: Int {
        min(15 * 60, ProcessInfo.processInfo.environment["TABSYNC_SOAK_SECONDS"].flatMap(Int.init) ?? 60)
    }

    static var processCount: Int {
        ProcessInfo.processInfo.environment["TABSYNC_SOAK_PROCESSES"].flatMap(Int.init) ?? 16
    }

    static func pick() -> Operation {
        var roll = Int.random(in: 0..<operations.map(\.weight).reduce(0, +))
        for operation in operations {
            if roll < operation.weight { return operation }
            roll -= operation.weight
        }
        return operations[0]
    }

    @Test func sixteenProcessesDoingRandomOperationsAgreeAndKeepTheirInvariants() async throws {
        let directory = temporaryDirectory("soak")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var tabs: [SoakTab] = []
        for index in 0..<Self.processCount { tabs.append(try await SoakTab.launch(name: "soak-\(index)", directory: directory)) }
        defer { tabs.forEach { $0.stop() } }

        let deadline = ContinuousClock.now + .seconds(Self.seconds)
        let counts = try await withThrowingTaskGroup(of: [String: Int].self) { group in
            for tab in tabs {
                group.addTask {
                    var counts: [String: Int] = [:]
                    while ContinuousClock.now < deadline {
                        let operation = Self.pick()
                        let reply = try await tab.command(operation.command())
                        if !operation.success.contains(reply.type) { tab.violation("\(operation.name) got \(reply.type) \(reply.code ?? "")") }
                        counts[operation.name, default: 0] += 1
                    }
                    return counts
                }
            }
            var total: [String: Int] = [:]
            for try await counts in group { total.merge(counts, uniquingKeysWith: +) }
            return total
        }

        // Quiesce: a last change that every process must see.
        let last = try await tabs[0].command("set done yes")
        let finalSequence = try #require(last.sequence)
        for tab in tabs.dropFirst() {
            try await tab.waitForEvent(sequence: finalSequence, timeout: .seconds(60))
        }
        // Every process reads the same state, which is the log's.
        let file = try checkLog("\(directory)/app.log")
        #expect(file.sequence == UInt64(finalSequence))
        for tab in tabs {
            for key in (0..<Self.keys).map({ "k\($0)" }) + ["done"] {
                let reply = try await tab.command("get \(key)")
                #expect(reply.value == file.values[key], "\(tab.name) reads \(key) as in the log")
            }
        }
        for tab in tabs {
            #expect(tab.violations.isEmpty, "\(tab.name): \(tab.violations.prefix(5))")
        }
        let events = tabs.map(\.eventCount).reduce(0, +)
        print("soak: \(Self.processCount) processes, \(Self.seconds)s, operations \(counts.sorted { $0.key < $1.key }), final seq \(finalSequence), \(events) events delivered, violations \(tabs.map(\.violations.count).reduce(0, +))")
    }
}

/// A `tab` process for long runs: each output line is parsed once, checked against the
/// invariants as it arrives, and only the replies are kept (memory stays flat for hours).
final class SoakTab: Sendable {
    struct Reply: Sendable {
        var type: String
        var sequence: Int?
        var value: String?
        var code: String?
    }

    private struct State {
        var replies: [Reply] = []
        var lastEvent = 0
        var lastOwn = 0
        var eventCount = 0
        var violations: [String] = []
        var ready = false
    }

    let name: String
    private let process: Process
    private let input: FileHandle
    private let state = Mutex(State())

    private init(name: String, directory: String) throws {
        self.name = name
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "\(productsDirectory)/tab")
        process.arguments = ["--dir", directory, "--name", name, "--json"]
        let stdin = Pipe(), stdout = Pipe()
        process.standardInput = stdin
        process.standardOutput = stdout
        process.standardError = FileHandle.nullDevice
        try process.run()
        self.process = process
        self.input = stdin.fileHandleForWriting
        ChildProcess.readLines(stdout.fileHandleForReading) { [self] line in check(Data(line.utf8)) }
    }

    static func launch(name: String, directory: String) async throws -> SoakTab {
        let tab = try SoakTab(name: name, directory: directory)
        try await tab.wait("ready", timeout: .seconds(30)) { $0.ready }
        return tab
    }

    /// Checks one output line against the invariants.
    private func check(_ line: Data) {
        guard let object = try? JSONSerialization.jsonObject(with: line) as? [String: Any], let type = object["type"] as? String else {
            state.withLock { $0.violations.append("not a JSON object: \(String(decoding: line, as: UTF8.self).prefix(80))") }
            return
        }
        let sequence = (object["seq"] as? NSNumber)?.intValue
        state.withLock { state in
            switch type {
            case "ready":
                state.ready = true
            case "storage":
                guard let sequence, sequence > state.lastEvent else {
                    state.violations.append("event seq \(sequence ?? -1) after \(state.lastEvent)")
                    return
                }
                state.lastEvent = sequence
                state.eventCount += 1
            case "error" where object["cmd"] == nil:
                state.violations.append("error event: \(object["code"] ?? "") \(object["message"] ?? "")")
            default:
                if type == "ok", let sequence {
                    if sequence < state.lastOwn { state.violations.append("own commit seq \(sequence) after \(state.lastOwn)") }
                    state.lastOwn = max(state.lastOwn, sequence)
                }
                state.replies.append(Reply(type: type, sequence: sequence, value: object["value"] as? String, code: object["code"] as? String))
            }
        }
    }

    /// Sends one command and waits for its reply (commands are sent one at a time).
    func command(_ line: String, timeout: Duration = .seconds(60)) async throws -> Reply {
        let before = state.withLock { $0.replies.count }
        try input.write(contentsOf: Data((line + "\n").utf8))
        try await wait("reply to \(line)", timeout: timeout) { $0.replies.count > before }
        return state.withLock { state in
            defer { state.replies.removeAll(keepingCapacity: true) }
            return state.replies[before]
        }
    }

    func waitForEvent(sequence: Int, timeout: Duration) async throws {
        try await wait("the event with seq \(sequence)", timeout: timeout) { $0.lastEvent >= sequence }
    }

    private func wait(_ what: String, timeout: Duration, until condition: (borrowing State) -> Bool) async throws {
        let deadline = ContinuousClock.now + timeout
        while !state.withLock({ condition($0) }) {
            guard ContinuousClock.now < deadline, process.isRunning else {
                throw TestFailure("\(name): \(process.isRunning ? "timed out after \(timeout)" : "exited") waiting for \(what)")
            }
            try await Task.sleep(for: .milliseconds(2))
        }
    }

    func violation(_ text: String) { state.withLock { $0.violations.append(text) } }
    var violations: [String] { state.withLock { $0.violations } }
    var eventCount: Int { state.withLock { $0.eventCount } }

    func stop() {
        try? input.close()
        if process.isRunning { kill(process.processIdentifier, SIGTERM) }
        // Reaped off the cooperative pool (see ChildProcess.stop).
        let process = process
        Thread { process.waitUntilExit() }.start()
    }
}
