import Foundation
import Testing
@testable import TabSync

#if canImport(Glibc)
import Glibc
#endif

@Suite(.timeLimit(.minutes(1)))
struct MissingLogTests {
    /// Someone deletes the log under running instances. Readers must not report every key
    /// removed at sequence 0 (events go back in sequence); they report the loss, and resynchronise
    /// when the next commit creates a new store, numbered on from the old one.
    @Test func aDeletedLogIsNoChangeUntilTheNextCommit() async throws {
        let directory = TemporaryDirectory()
        let writer = try SharedStorage(directory: directory.path, origin: "writer")
        let observer = try SharedStorage(directory: directory.path, origin: "observer")
        var events = observer.events().makeAsyncIterator()
        var problems = observer.notifications().makeAsyncIterator()
        try await writer.set("a", "1")
        #expect(await next(&events)?.sequence == 1)

        #expect(unlink(directory.file("storage.log")) == 0)
        observer.catchUp()  // reads the missing file now, whatever inotify has delivered yet
        var vanished = false
        while !vanished, let notification = await next(&problems) {
            if case let .problem(error) = notification { vanished = error.code == .storeVanished && error.path == directory.file("storage.log") }
        }
        #expect(vanished, "the deletion is reported")
        try await writer.set("b", "2")

        var seen: [StorageEvent] = []
        while !seen.contains(where: { $0.key == "b" }), let event = await next(&events) { seen.append(event) }
        #expect(seen.allSatisfy { $0.sequence == 2 && $0.isResync }, "only the new store's resync, after 1: \(seen)")
        #expect(seen.contains { $0.key == "b" && $0.newValue == "2" })
        #expect(seen.contains { $0.key == "a" && $0.oldValue == "1" && $0.newValue == nil })
    }
}
