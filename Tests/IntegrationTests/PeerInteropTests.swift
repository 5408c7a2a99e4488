import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Issue 11, point 7: the Python peer of docs/FORMAT.md (section 10, taken from the document by
/// Tests/Peer/peer_driver.py) joins sessions of real `tab` processes.
@Suite(.serialized, .timeLimit(.minutes(5)))
struct PeerInteropTests {
    static func launchPeer(_ directory: String, origin: String = "peer") async throws -> ChildProcess {
        let peer = try ChildProcess(
            "/usr/bin/env", ["python3", "\(repositoryRoot)/Tests/Peer/peer_driver.py", "\(repositoryRoot)/docs/FORMAT.md", directory, origin],
            name: origin)
        try await peer.waitFor("ready") { $0.type == "ready" }
        return peer
    }

    /// The peer sees every change of two tabs once, in order; the tabs see each of its changes once.
    @Test func thePeerAndTwoTabsSeeEachOthersChangesOnceInOrder() async throws {
        let directory = temporaryDirectory("peer")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let a = try await launchTab(name: "a", directory: directory)
        let b = try await launchTab(name: "b", directory: directory)
        let peer = try await Self.launchPeer(directory)
        defer { a.stop(); b.stop(); peer.stop() }

        a.send((1...30).map { "set a\($0 % 4) \($0)" }.joined(separator: "\n"))
        b.send((1...30).map { "set b\($0 % 4) \($0)" }.joined(separator: "\n"))
        let seen = try await peer.waitFor("the tabs' 60 changes", count: 60, timeout: .seconds(60)) { $0.type == "storage" }
        #expect(seen.compactMap(\.seq) == Array(1...60), "once each, in order")
        #expect(seen.allSatisfy { $0["resync"] == nil })
        for (tab, prefix) in [("a", "a"), ("b", "b")] {
            let own = seen.filter { $0.string("origin") == tab }
            #expect(own.compactMap { $0.string("key") } == (1...30).map { "\(prefix)\($0 % 4)" })
            #expect(own.compactMap { $0.string("newValue") } == (1...30).map(String.init))
        }

        peer.send((1...20).map { "set p \($0)" }.joined(separator: "\n"))
        for tab in [a, b] {
            let events = try await tab.waitFor("the peer's 20 changes", count: 20, timeout: .seconds(60)) { $0.type == "storage" && $0.string("origin") == "peer" }
            #expect(events.compactMap(\.seq) == Array(61...80))
            #expect(events.compactMap { $0.string("newValue") } == (1...20).map(String.init))
            #expect(events.compactMap { $0.string("oldValue") } == (1..<20).map(String.init), "old values from the tab's own view")
        }
    }

    /// Two tabs and the peer write 200 changes each at the same time: nothing is lost, and every
    /// one of them sees every change of the others once.
    @Test func twoTabsAndThePeerWritingAtOnceLoseNothing() async throws {
        let directory = temporaryDirectory("peer-writers")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let a = try await launchTab(name: "a", directory: directory)
        let b = try await launchTab(name: "b", directory: directory)
        let peer = try await Self.launchPeer(directory)
        defer { a.stop(); b.stop(); peer.stop() }
        let changes = 200
        for (writer, name) in [(a, "a"), (b, "b"), (peer, "peer")] {
            writer.send((0..<changes).map { "set \(name)-\($0) \($0)" }.joined(separator: "\n"))
        }
        for writer in [a, b, peer] {
            let replies = try await writer.waitFor("replies", count: changes, timeout: .seconds(120)) { ["ok", "error"].contains($0.type) }
            #expect(replies.allSatisfy { $0.type == "ok" }, "\(writer.name): \(replies.filter { $0.type == "error" }.prefix(2))")
        }
        for (reader, own) in [(a, "a"), (b, "b"), (peer, "peer")] {
            let events = try await reader.waitFor("the others' changes", count: 2 * changes, timeout: .seconds(120)) { $0.type == "storage" }
            #expect(events.count == 2 * changes && !events.contains { $0.string("origin") == own })
            let sequences = events.compactMap(\.seq)
            #expect(sequences == sequences.sorted() && Set(sequences).count == sequences.count, "\(reader.name): in order, once")
        }
        let log = try checkLog("\(directory)/app.log")
        #expect(log.sequence == UInt64(3 * changes) && log.values.count == 3 * changes)
    }

    /// While the peer holds the commit lock for 2 s, a tab's `set` waits for it, then goes in.
    @Test func whileThePeerHoldsTheCommitLockATabsSetWaits() async throws {
        let directory = temporaryDirectory("peer-lock")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let tab = try await launchTab(name: "tab", directory: directory)
        let peer = try await Self.launchPeer(directory)
        defer { tab.stop(); peer.stop() }
        peer.send("hold 2")
        try await peer.waitFor("the lock held") { $0.type == "held" }
        let asked = ContinuousClock.now
        let reply = try await tab.command("set k v", timeout: .seconds(20))
        let waited = ContinuousClock.now - asked
        #expect(reply.type == "ok")
        #expect(waited >= .milliseconds(1500), "it waited for the lock: \(waited)")
        try await peer.waitFor("the release") { $0.type == "released" }
        try await peer.waitFor("the tab's change") { $0.type == "storage" && $0.string("key") == "k" && $0.string("newValue") == "v" }
    }
}
