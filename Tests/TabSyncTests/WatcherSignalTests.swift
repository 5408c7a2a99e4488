import Foundation
import Synchronization
import Testing
@testable import TabSync

#if canImport(Glibc)
import Glibc
#endif

extension WatcherThreadTests {
    /// A signal that the app handles must not cost the watcher inotify. libinotifytools waits in
    /// select(2), which every handled signal interrupts, SA_RESTART or not. The watcher used to
    /// take the EINTR for a broken inotify and moved every registration of the process to
    /// polling. Now its thread blocks asynchronous signals, and an EINTR is waited through.
    @Suite(.timeLimit(.minutes(1)))
    struct WatcherSignalTests {
        @Test func aHandledSignalOnTheWatcherThreadKeepsInotify() async throws {
            let directory = TemporaryDirectory()
            var options = SharedStorage.Options()
            options.durability = .none
            let writer = try SharedStorage(directory: directory.path, origin: "writer", options: options)
            let reader = try FileBackend(directory: SessionDirectory(path: directory.path), name: "storage")
            let changed = Atomic<Int>(0)
            let detections = Mutex<[ChangeDetection]>([])
            let watch = reader.watch { signal in
                switch signal {
                case .mayHaveChanged: changed.add(1, ordering: .relaxed)
                case let .detectionChanged(detection): detections.withLock { $0.append(detection) }
                }
            }
            defer { watch.cancel() }
            try #require(watch.detection == .inotify, "this test needs inotify")

            // A handled signal, as an app installs them (SIGCHLD, SIGWINCH, a profiler's SIGPROF).
            // SIGPROF, because the threads of Swift's executors, from which the watcher thread
            // may have been started, do not block it. The handler stays: a signal still pending
            // on the watcher thread must never meet the default action (termination).
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { _ in }
            action.sa_flags = SA_RESTART
            #expect(sigaction(SIGPROF, &action, nil) == 0)
            let thread = try #require(ChangeWatcher.shared.ownerThread, "the watcher thread is running")
            for _ in 0..<20 {
                #expect(pthread_kill(thread, SIGPROF) == 0)
                usleep(2_000)
            }

            try await writer.set("k", "after the signals")
            let deadline = ContinuousClock.now + .seconds(10)
            while changed.load(ordering: .relaxed) == 0, ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(5))
            }
            #expect(changed.load(ordering: .relaxed) >= 1, "the commit after the signals was seen")
            #expect(detections.withLock { $0 }.isEmpty, "still on inotify: \(detections.withLock { $0 })")
        }

    }
}
