import Foundation
import Synchronization
import Testing
@testable import TabSync

#if canImport(Glibc)
import Glibc
#endif

extension WatcherThreadTests {
    /// Issue 11, point 2 (one wake per change): each commit signals each reader once, also in
    /// an app that starts child processes meanwhile. A commit is one write to the log, so one
    /// IN_MODIFY (a commit written in two writes counts twice: this test then fails). Readers of
    /// the log ignore IN_CLOSE_WRITE: format 1's temporary files raised one under the state
    /// file's name when a child forked meanwhile closed its copy at its exec.
    @Suite(.timeLimit(.minutes(1)))
    struct OneWakePerCommitTests {
        @Test func eachCommitSignalsAReaderOnce() async throws {
            let directory = TemporaryDirectory()
            var options = SharedStorage.Options()
            options.durability = .none
            let writer = try SharedStorage(directory: directory.path, origin: "writer", options: options)
            let reader = try FileBackend(directory: SessionDirectory(path: directory.path), name: "storage")
            let signals = Atomic<Int>(0)
            let detections = Mutex<[ChangeDetection]>([])
            let watch = reader.watch { signal in
                switch signal {
                case .mayHaveChanged: signals.add(1, ordering: .relaxed)
                case let .detectionChanged(detection): detections.withLock { $0.append(detection) }
                }
            }
            defer { watch.cancel() }
            try #require(watch.detection == .inotify, "this test needs inotify")
            // A fence after each commit: the watcher thread dispatches events in the order they
            // came, so once the fence file's event is handled, every event of the commit before it
            // has been too. It also keeps the kernel from merging two commits' IN_MODIFY into one
            // (it merges identical events that are not read yet), so each commit is counted alone.
            let fences = Atomic<Int>(0)
            let (fence, _) = ChangeWatcher.shared.register(
                directory: try SessionDirectory(path: directory.path), names: ["fence"], pollInterval: .seconds(1)
            ) { _ in fences.add(1, ordering: .releasing) }
            defer { ChangeWatcher.shared.unregister(fence) }

            // The process has one inotify queue for every directory it watches: a flood in
            // another suite's directory can overflow it, and an overflow signals every reader
            // once instead of per event. Such a round tells nothing and is run again.
            let commits = 100
            var counted: Int?
            for round in 0..<5 where counted == nil {
                let overflows = ChangeWatcher.shared.overflowCount.load(ordering: .relaxed)
                signals.store(0, ordering: .relaxed)
                // The app starts child processes meanwhile, as apps do: a child forked while the
                // log is open holds it until its exec.
                let spawning = Atomic<Bool>(true)
                let spawner = Thread {
                    while spawning.load(ordering: .relaxed) {
                        var pid: pid_t = 0
                        let argv: [UnsafeMutablePointer<CChar>?] = [strdup("/bin/true"), nil]
                        defer { free(argv[0]) }
                        if posix_spawn(&pid, "/bin/true", nil, nil, argv, environ) == 0 { waitpid(pid, nil, 0) }
                    }
                }
                spawner.start()
                defer { spawning.store(false, ordering: .relaxed) }
                for index in 1...commits {
                    let seen = fences.load(ordering: .acquiring)
                    try await writer.set("k", "\(round).\(index)")
                    Self.touch(directory.file("fence"))
                    let deadline = ContinuousClock.now + .seconds(20)
                    while fences.load(ordering: .acquiring) == seen, ContinuousClock.now < deadline {
                        try await Task.sleep(for: .milliseconds(1))
                    }
                    try #require(fences.load(ordering: .acquiring) > seen, "the fence after commit \(index) came through")
                }
                spawning.store(false, ordering: .relaxed)
                if ChangeWatcher.shared.overflowCount.load(ordering: .relaxed) == overflows {
                    counted = signals.load(ordering: .relaxed)
                }
            }
            #expect(counted == commits, "\(String(describing: counted)) signals for \(commits) commits")
            // A move to polling (whose ticks are signals too) would make the count meaningless.
            #expect(detections.withLock { $0 }.isEmpty, "still on inotify: \(detections.withLock { $0 })")
        }

        /// Taking and releasing locks wakes no watcher: each release closes a descriptor opened
        /// read-write, and were the directory watched for IN_CLOSE_WRITE, every process of a
        /// refresh storm would wake every other process's watcher thread for each of them.
        @Test func takingAndReleasingLocksWakesNoWatcher() async throws {
            let directory = TemporaryDirectory()
            let storage = try SharedStorage(directory: directory.path, origin: "locker")
            let session = try SessionDirectory(path: directory.path)
            // Whatever the kernel reports for the lock files (any event bit), and a fence.
            let woken = Atomic<Int>(0), fences = Atomic<Int>(0)
            let (locks, detection) = ChangeWatcher.shared.register(
                directory: session, names: ["storage.refresh.lock", "storage.lock"], events: UInt32.max, pollInterval: .seconds(1)
            ) { _ in woken.add(1, ordering: .relaxed) }
            defer { ChangeWatcher.shared.unregister(locks) }
            try #require(detection == .inotify, "this test needs inotify")
            let (fence, _) = ChangeWatcher.shared.register(
                directory: session, names: ["fence"], pollInterval: .seconds(1)
            ) { _ in fences.add(1, ordering: .releasing) }
            defer { ChangeWatcher.shared.unregister(fence) }

            for round in 0..<100 {
                // A new lock object each time, as each refresh attempt takes one: it opens the
                // file, and closes it when released and gone.
                let lock = try storage.lock(named: "refresh")
                let hold = try #require(try lock.tryAcquire(), "round \(round): the lock is free")
                hold.release()
                try await storage.set("k", "\(round)")
            }
            // Events are dispatched in order: once the fence's has come, every event before it has too.
            Self.touch(directory.file("fence"))
            let deadline = ContinuousClock.now + .seconds(20)
            while fences.load(ordering: .acquiring) == 0, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(1)) }
            try #require(fences.load(ordering: .acquiring) > 0, "the fence came through")
            #expect(woken.load(ordering: .relaxed) == 0, "the lock files raised \(woken.load(ordering: .relaxed)) events")
        }

        /// A compaction writes the next generation in the compaction folder and renames it over
        /// the log only when it is complete: in the session directory it raises one IN_MOVED_TO
        /// of the log and nothing else that a reader's watcher wakes for, so readers wake once
        /// for it, not once more in the middle of the committer's commit. (Written unnamed in the
        /// directory itself, O_TMPFILE's writes came as IN_MODIFY of "#INODE".)
        @Test func aCompactionsWritesWakeNoWatcher() async throws {
            let directory = TemporaryDirectory()
            var options = SharedStorage.Options()
            options.durability = .none
            // The smallest history: a compaction every few commits.
            options.journalLimits = JournalLimits(maximumEntries: 1, maximumBytes: 1)
            let storage = try SharedStorage(directory: directory.path, origin: "writer", options: options)
            // What a reader's watcher is woken by, counted in the kernel's own queue.
            let watcher = inotify_init1(Int32(IN_NONBLOCK | IN_CLOEXEC))
            try #require(watcher >= 0, "this test needs inotify")
            defer { close(watcher) }
            try #require(inotify_add_watch(watcher, directory.path, ChangeWatcher.fileEvents) >= 0)

            for index in 0..<40 { try await storage.set("k", "\(index)") }
            var events: [(mask: UInt32, name: String)] = []
            var buffer = [UInt8](repeating: 0, count: 1 << 16)
            while true {
                let count = buffer.withUnsafeMutableBytes { read(watcher, $0.baseAddress, $0.count) }
                guard count > 0 else { break }
                var offset = 0
                while offset < count {
                    let event = buffer.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: offset, as: inotify_event.self) }
                    let start = offset + MemoryLayout<inotify_event>.size
                    let name = String(decoding: buffer[start..<start + Int(event.len)].prefix { $0 != 0 }, as: UTF8.self)
                    events.append((event.mask, name))
                    offset = start + Int(event.len)
                }
            }
            let renames = events.filter { $0.mask & UInt32(IN_MOVED_TO) != 0 && $0.name == "storage.log" }
            try #require(renames.count >= 3, "the log was compacted (\(renames.count) renames)")
            let others = events.filter { $0.name != "storage.log" }
            #expect(others.isEmpty, "the compactions raised \(others.count) more events: \(others.prefix(4).map { "\(String($0.mask, radix: 16)) \($0.name)" })")
        }

        /// One write to `path`: one IN_MODIFY.
        static func touch(_ path: String) {
            let fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0o600)
            _ = write(fd, "x", 1)
            close(fd)
        }
    }
}
