import Foundation
import Synchronization
import Testing
@testable import TabSync

#if canImport(Glibc)
import Glibc
#endif

/// The kernel's inotify queue overflows (IN_Q_OVERFLOW) while the watcher thread is busy:
/// events are dropped by the kernel, and yet no change may be lost.
extension WatcherThreadTests {
@Suite(.timeLimit(.minutes(2)))
struct WatcherOverflowTests {
    @Test func anOverflowedInotifyQueueLosesNoChange() async throws {
        let directory = TemporaryDirectory()
        var options = SharedStorage.Options()
        options.durability = .none
        options.journalLimits = JournalLimits(maximumEntries: 64)
        let writer = try SharedStorage(directory: directory.path, origin: "writer", options: options)
        let observer = try SharedStorage(directory: directory.path, origin: "observer", options: options)
        try #require(observer.changeDetection == .inotify, "this test needs inotify")
        var events = observer.events().makeAsyncIterator()

        // Hold the watcher thread: a registration whose handler blocks until released. Handlers
        // run on that thread, so nothing reads the inotify queue meanwhile.
        let session = try SessionDirectory(path: directory.path)
        let entered = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        // Released however the test ends: a watcher thread left stalled would stall every later
        // registration in the process, and so the whole test run.
        var released = false
        defer { if !released { release.signal() } }
        let holding = Flag()
        let (stall, _) = ChangeWatcher.shared.register(directory: session, names: ["stall"], pollInterval: .seconds(1)) { _ in
            if !holding.value.exchange(true, ordering: .relaxed) {
                entered.signal()
                release.wait()
            }
        }
        defer { ChangeWatcher.shared.unregister(stall) }
        let fd = open(directory.file("stall"), O_WRONLY | O_CREAT, 0o600)
        _ = write(fd, "x", 1)
        close(fd)
        #expect(entered.wait(timeout: .now() + 10) == .success, "the watcher thread ran the stalling handler")

        // Enough events of other files to fill the queue (two names in turn: the kernel merges
        // identical consecutive events), then commits, whose events the full queue drops: only
        // the overflow event can tell the observer about them (with any of their own events
        // left in the queue, the observer's catch-up would read the newest state anyway, and the
        // test could not tell). Cheap events keep the watcher thread, which every storage of this
        // process shares, stalled for a fraction of a second, not the seconds thousands of commits take.
        let queueSize = Int((try? String(contentsOfFile: "/proc/sys/fs/inotify/max_queued_events", encoding: .utf8))?
            .trimmingCharacters(in: .whitespacesAndNewlines) ?? "") ?? 16384
        let overflowsBefore = ChangeWatcher.shared.overflowCount.load(ordering: .relaxed)
        let final = try await offPool {
            // One write each: one IN_MODIFY (TabSync does not watch for closes).
            let junk = [open(directory.file("junk0"), O_WRONLY | O_CREAT, 0o600), open(directory.file("junk1"), O_WRONLY | O_CREAT, 0o600)]
            defer { for fd in junk where fd >= 0 { close(fd) } }
            for index in 0..<(queueSize + 100) { _ = write(junk[index % 2], "x", 1) }
            for index in 1...200 { try writer.set("k\(index % 8)", "\(index)") }
            return try writer.snapshot()
        }
        release.signal()
        released = true

        var view: [String: String] = [:]
        while let event = await next(&events, timeout: .seconds(30)) {
            if let key = event.key { view[key] = event.newValue } else { view.removeAll() }
            if event.sequence == final.sequence, view == final.values { break }
        }
        #expect(view == final.values, "the observer converged on the final state")
        // The overflow event comes last in the queue, after the events that already led the
        // observer to the final state: wait for the watcher thread to get there.
        let deadline = ContinuousClock.now + .seconds(10)
        while ChangeWatcher.shared.overflowCount.load(ordering: .relaxed) == overflowsBefore, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(10))
        }
        #expect(ChangeWatcher.shared.overflowCount.load(ordering: .relaxed) > overflowsBefore, "the queue overflowed (queue \(queueSize))")
        // After the overflow the observer still follows every change.
        try await writer.set("after", "overflow")
        let after = await next(&events)
        #expect(after?.key == "after" && after?.newValue == "overflow" && after?.sequence == final.sequence + 1)
    }
}
}

private final class Flag: Sendable {
    let value = Atomic<Bool>(false)
}
