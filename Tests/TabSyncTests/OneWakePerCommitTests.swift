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
    /// IN_MODIFY. A child forked while the log is open closes its copy at its exec, which raises
    /// IN_CLOSE_WRITE under the log's name: readers of the log ignore IN_CLOSE_WRITE.
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
            // A fence: the watcher thread dispatches events in the order they came, so once the
            // fence file's event is handled, every event of the commits before it has been too.
            let fenced = Atomic<Bool>(false)
            let (fence, _) = ChangeWatcher.shared.register(
                directory: try SessionDirectory(path: directory.path), names: ["fence"], pollInterval: .seconds(1)
            ) { _ in fenced.store(true, ordering: .releasing) }
            defer { ChangeWatcher.shared.unregister(fence) }

            // The process has one inotify queue for every directory it watches: a flood in
            // another suite's directory can overflow it, and an overflow signals every reader
            // once instead of per event. Such a round tells nothing and is run again.
            let commits = 100
            var counted: Int?
            for round in 0..<5 where counted == nil {
                let overflows = ChangeWatcher.shared.overflowCount.load(ordering: .relaxed)
                signals.store(0, ordering: .relaxed)
                fenced.store(false, ordering: .relaxed)
                // The app starts child processes meanwhile, as apps do: a child forked while a
                // commit's temporary file is open holds it until its exec, and its late close
                // then raises IN_CLOSE_WRITE under the state file's new name.
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
                try await offPool { for index in 1...commits { try writer.set("k", "\(round).\(index)") } }
                spawning.store(false, ordering: .relaxed)
                let fd = open(directory.file("fence"), O_WRONLY | O_CREAT, 0o600)
                close(fd)
                let deadline = ContinuousClock.now + .seconds(20)
                while !fenced.load(ordering: .acquiring), ContinuousClock.now < deadline {
                    try await Task.sleep(for: .milliseconds(5))
                }
                let fenceSeen = fenced.load(ordering: .acquiring)
                #expect(fenceSeen, "the fence came through")
                if ChangeWatcher.shared.overflowCount.load(ordering: .relaxed) == overflows {
                    counted = signals.load(ordering: .relaxed)
                }
            }
            #expect(counted == commits, "\(String(describing: counted)) signals for \(commits) commits")
            // A move to polling (whose ticks are signals too) would make the count meaningless.
            #expect(detections.withLock { $0 }.isEmpty, "still on inotify: \(detections.withLock { $0 })")
        }
    }
}
