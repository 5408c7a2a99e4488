import Foundation
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Writers killed with SIGKILL at random moments while they commit, over and over.
///
/// Each writer slot runs `tab` processes one after the other. Each process gets a long batch of
/// `set` commands for the slot's own keys, with values that only increase, and is killed after
/// a random number of acknowledged commits plus a random delay, so that most kills land inside
/// a commit (while the lock is held, an append half written, a compaction's new generation half
/// written: with a history of 100 the log is compacted every 800 changes or so). Two observers
/// run throughout and are never killed.
@Suite(.serialized, .timeLimit(.minutes(5)))
struct KilledWritersTests {
    static let slots = 4
    static let killsPerSlot = 50
    static let keysPerSlot = 4
    static let batch = 400

    /// An acknowledged change: `tab` printed `{"type":"ok","cmd":"set","seq":N}` for it.
    struct Acknowledged: Sendable {
        let key: String
        let value: Int
        let sequence: Int
    }

    struct SlotResult: Sendable {
        var acknowledged: [Acknowledged] = []
        var kills = 0
        var commandsSent = 0
        var tornTails = 0
    }

    @Test func twoHundredWritersKilledMidCommitLoseNoAcknowledgedChangeAndTearNoCommit() async throws {
        let directory = temporaryDirectory("killed")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let observers = [try await launchTab(name: "observer-0", directory: directory, extra: Self.history),
                         try await launchTab(name: "observer-1", directory: directory, extra: Self.history)]
        defer { observers.forEach { $0.stop() } }
        let logPath = "\(directory)/app.log"

        let results = try await withThrowingTaskGroup(of: SlotResult.self) { group in
            for slot in 0..<Self.slots {
                group.addTask { try await Self.runSlot(slot, directory: directory, logPath: logPath) }
            }
            var results: [SlotResult] = []
            for try await result in group { results.append(result) }
            return results
        }
        let acknowledged = results.flatMap(\.acknowledged)
        let kills = results.map(\.kills).reduce(0, +)
        #expect(kills == Self.slots * Self.killsPerSlot)

        // The final log is valid and holds, for every key, the last acknowledged value or a later
        // one (a change can commit and its writer die before printing the reply).
        let final = try checkLog(logPath)
        var lost: [String] = []
        for (key, changes) in Dictionary(grouping: acknowledged, by: \.key) {
            let last = changes.map(\.value).max()!
            guard let stored = final.values[key].flatMap(Int.init), stored >= last else {
                lost.append("\(key): acknowledged \(last), stored \(final.values[key] ?? "nothing")")
                continue
            }
        }
        #expect(lost.isEmpty, "lost acknowledged changes: \(lost)")
        let corruptAside = try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.contains(".corrupt-") }
        #expect(corruptAside.isEmpty, "no log was ever found damaged")

        // The observers survived every kill and still deliver: a last change reaches both.
        let closer = try await launchTab(name: "closer", directory: directory, extra: Self.history)
        defer { closer.stop() }
        let reply = try await closer.command("set done yes")
        let lastSequence = try #require(reply.seq)
        var missingTotal = 0
        for observer in observers {
            try await observer.waitFor("the closing change", timeout: .seconds(60)) { $0.type == "storage" && $0.string("key") == "done" }
            let events = observer.storageEvents
            // Every change once, in order: nothing was skipped or repeated.
            #expect(events.compactMap(\.seq) == Array(1...lastSequence), "\(observer.name) saw each change once, in order")
            #expect(observer.unsolicitedErrors.isEmpty, "\(observer.name) reported: \(observer.unsolicitedErrors.prefix(3))")
            // Every acknowledged change is among them, with its value.
            let bySequence = Dictionary(events.map { ($0.seq ?? -1, $0) }, uniquingKeysWith: { first, _ in first })
            let missing = acknowledged.filter { change in
                bySequence[change.sequence]?.string("key") != change.key || bySequence[change.sequence]?.string("newValue") != String(change.value)
            }
            missingTotal += missing.count
            #expect(missing.isEmpty, "\(observer.name) missed \(missing.count) acknowledged changes")
        }
        let commands = results.map(\.commandsSent).reduce(0, +)
        let torn = results.map(\.tornTails).reduce(0, +)
        print("killed writers: \(kills) SIGKILLs, \(acknowledged.count) acknowledged commits (\(commands) commands sent), final seq \(lastSequence); torn tails left by a kill (and cut by the next writer): \(torn); keys with a lost acknowledged value: \(lost.count); acknowledged changes an observer missed: \(missingTotal)")
    }

    /// Runs `killsPerSlot` writer processes in turn, each killed at a random moment.
    /// A history of 100 changes: the log is compacted every 800 or so, and kills land in compactions too.
    static let history = ["--history", "100"]

    private static func runSlot(_ slot: Int, directory: String, logPath: String) async throws -> SlotResult {
        var result = SlotResult()
        var nextValue = 1
        for _ in 0..<killsPerSlot {
            let writer = try await launchTab(name: "writer-\(slot)", directory: directory, extra: history)
            let first = nextValue
            let commands = (first..<(first + batch)).map { value in "set w\(slot)-k\(value % keysPerSlot) \(value)" }
            nextValue += batch
            result.commandsSent += commands.count
            writer.send(commands.joined(separator: "\n"))
            // Let a random number of commits finish, then kill after a random delay: the kill
            // lands somewhere inside the next commits.
            let settle = Int.random(in: 1...25)
            try await writer.waitFor("\(settle) acknowledged commits", count: settle, timeout: .seconds(60)) { $0.type == "ok" }
            try await Task.sleep(for: .microseconds(Int.random(in: 0...3000)))
            writer.kill(SIGKILL)
            // SIGKILL takes effect when the process leaves the kernel: a commit's flush to a busy
            // shared disk can hold it there for a while.
            try await writer.waitForExit("its end after SIGKILL", timeout: .seconds(90))
            result.kills += 1
            // Every reply this process printed before it died; a partial last line is not a reply.
            let replies = writer.objects.filter { $0.type == "ok" || ($0.type == "error" && $0["cmd"] != nil) }
            #expect(!replies.contains { $0.type == "error" }, "writer-\(slot) got an error: \(replies.filter { $0.type == "error" })")
            for (index, reply) in replies.enumerated() {
                let value = first + index
                result.acknowledged.append(Acknowledged(key: "w\(slot)-k\(value % keysPerSlot)", value: value, sequence: reply.seq ?? -1))
            }
            // Whatever moment the kill hit, the log is valid up to its last complete commit; a
            // kill mid-append may leave a torn tail after it, which readers ignore.
            if try checkLog(logPath).tail > 0 { result.tornTails += 1 }
        }
        return result
    }
}
