import Dispatch
import Foundation
import NIOCore
import PostgresNIO
import Synchronization
import TabSync

/// One connection that `LISTEN`s on ``Schema/channel`` and tells the watchers of a store when a
/// notification names it. A lost connection is reported (``ChangeDetection/reconnecting(reason:)``)
/// and reopened with backoff; once it is back, the watchers hear
/// ``ChangeDetection/notifications(channel:)`` and catch up on whatever they missed.
final class Listener: Sendable {
    typealias Handler = @Sendable (BackendSignal) -> Void

    private struct State {
        var handlers: [UInt64: Handler] = [:]
        var nextID: UInt64 = 1
        var connection: PostgresConnection?
        var connecting = false
        var failures = 0
        var detection: ChangeDetection = .reconnecting(reason: "not connected yet")
        var generation = 0
    }

    private let connector: Connector
    private let store: String
    private let state = Mutex(State())
    /// A notification's sequence number and writing instance.
    typealias Notified = (sequence: Int64, instance: String)

    /// The notification each thread is handling while the handlers run for it: a listening
    /// connection's event loop, or the listener's queue (``handOnLater(_:)``), which may run at
    /// the same time (``handOn(_:)``).
    private let handling = Mutex<[(thread: pthread_t, notified: Notified)]>([])
    private let queue = DispatchQueue(label: "TabSyncPostgres.listener")
    /// What a notification of the store starts, on the connection's event loop, in place of
    /// ``handOn(_:)``: the backend's read-ahead, which hands it on once it has read the changes.
    /// In a class: a closure read out of a `Mutex` as `withLock { $0 }` is written back wrapped
    /// in two more reabstraction thunks each time, and the chain grew by two per notification.
    let readAhead = Mutex<ReadAhead?>(nil)

    final class ReadAhead: Sendable {
        let start: @Sendable (Notified, PostgresConnection) -> Void
        init(_ start: @escaping @Sendable (Notified, PostgresConnection) -> Void) { self.start = start }
    }

    init(connector: Connector, store: String) {
        self.connector = connector
        self.store = store
    }

    func add(_ handler: @escaping Handler) -> any WatchRegistration {
        let (id, mustConnect) = state.withLock { state in
            defer { state.nextID += 1 }
            state.handlers[state.nextID] = handler
            let mustConnect = state.connection == nil && !state.connecting
            if mustConnect { state.connecting = true }
            return (state.nextID, mustConnect)
        }
        // The first watcher connects right away, so that its registration tells how it is served.
        if mustConnect { connect() }
        return Registration(detection: state.withLock { $0.detection }) { [weak self] in self?.remove(id) }
    }

    private func remove(_ id: UInt64) {
        let idle: PostgresConnection? = state.withLock { state in
            state.handlers[id] = nil
            guard state.handlers.isEmpty else { return nil }
            state.generation += 1
            defer { state.connection = nil }
            return state.connection
        }
        idle?.closeNow()
    }

    func close() {
        let connection: PostgresConnection? = state.withLock { state in
            state.handlers.removeAll()
            state.generation += 1
            defer { state.connection = nil }
            return state.connection
        }
        connection?.closeNow()
    }

    private func connect() {
        let generation = state.withLock { $0.generation }
        do {
            let connection = try connector.connect()
            let store = self.store
            connection.addListener(channel: Schema.channel) { [weak self, weak connection] _, notification in
                // "SEQUENCE INSTANCE STORE": the store is the rest of the payload.
                let fields = notification.payload.split(separator: " ", maxSplits: 2, omittingEmptySubsequences: false)
                guard fields.count == 3, fields[2] == store[...] else { return }
                guard let sequence = Int64(fields[0]) else {
                    self?.signal(.mayHaveChanged)
                    return
                }
                let notified = (sequence, String(fields[1]))
                if let connection, let readAhead = self?.readAhead.withLock({ $0 }) {
                    readAhead.start(notified, connection)
                } else {
                    self?.handOn(notified)
                }
            }
            try connector.run("LISTEN \(unescaped: Schema.channel)", on: connection, doing: "listening for changes")
            let (current, wasDown) = state.withLock { state -> (Bool, Bool) in
                state.connecting = false
                guard state.generation == generation, !state.handlers.isEmpty else { return (false, false) }
                state.connection = connection
                let wasDown = state.failures > 0 || state.detection != .notifications(channel: Schema.channel)
                state.failures = 0
                state.detection = .notifications(channel: Schema.channel)
                return (true, wasDown)
            }
            guard current else {
                connection.closeNow()
                return
            }
            connection.closeFuture.whenComplete { [weak self] _ in self?.lost(connection, generation: generation) }
            if wasDown {
                signal(.detectionChanged(.notifications(channel: Schema.channel)))
            }
            // Whatever was committed while nobody listened.
            signal(.mayHaveChanged)
        } catch {
            failed(error, generation: generation)
        }
    }

    private func lost(_ connection: PostgresConnection, generation: Int) {
        let current = state.withLock { state -> Bool in
            guard state.generation == generation, state.connection === connection else { return false }
            state.connection = nil
            return true
        }
        guard current else { return }
        failed(TabSyncError(code: .unavailable, path: connector.configuration.description, message: "The connection that listens for changes was lost"), generation: generation)
    }

    private func failed(_ error: TabSyncError, generation: Int) {
        let delay: Duration? = state.withLock { state in
            guard state.generation == generation, !state.handlers.isEmpty else {
                state.connecting = false
                return nil
            }
            state.failures += 1
            state.connecting = true
            state.detection = .reconnecting(reason: error.message)
            // 100 ms, doubling, at most 5 s, with jitter so that hosts do not reconnect in step.
            let base = min(5_000, 100 << min(state.failures - 1, 6))
            return .milliseconds(base / 2 + Int.random(in: 0...(base / 2)))
        }
        guard let delay else { return }
        signal(.detectionChanged(.reconnecting(reason: error.message)))
        queue.asyncAfter(deadline: .now() + .milliseconds(Int(delay.milliseconds))) { [weak self] in self?.connect() }
    }

    /// The notification this thread is handling; nil in a signal that no notification gave (a
    /// reconnection), or on another thread.
    var notificationInHand: Notified? {
        let me = pthread_self()
        return handling.withLock { $0.last { pthread_equal($0.thread, me) != 0 }?.notified }
    }

    /// Signals the watchers for `notified`, which they can read with ``notificationInHand``.
    func handOn(_ notified: Notified) {
        let me = pthread_self()
        handling.withLock { $0.append((me, notified)) }
        defer {
            handling.withLock { entries in
                if let index = entries.lastIndex(where: { pthread_equal($0.thread, me) != 0 }) { entries.remove(at: index) }
            }
        }
        signal(.mayHaveChanged)
    }

    /// ``handOn(_:)`` on the listening connection's event loop (on the listener's queue while it
    /// is not connected), from a thread that must not run the watchers' handlers itself.
    func handOnLater(_ notified: Notified) {
        if let connection = state.withLock({ $0.connection }) {
            connection.eventLoop.execute { [self] in handOn(notified) }
        } else {
            queue.async { [self] in handOn(notified) }
        }
    }

    private func signal(_ signal: BackendSignal) {
        for handler in state.withLock({ Array($0.handlers.values) }) { handler(signal) }
    }

    private struct Registration: WatchRegistration {
        let detection: ChangeDetection
        let cancelHandler: @Sendable () -> Void
        init(detection: ChangeDetection, cancel: @escaping @Sendable () -> Void) {
            self.detection = detection
            cancelHandler = cancel
        }

        func cancel() { cancelHandler() }
    }
}
