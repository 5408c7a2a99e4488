import Foundation
import NIOCore
import PostgresNIO
import Synchronization
import TabSync

/// A named lock of a store: a session-level advisory lock, held on a connection of its own for
/// as long as it is held. The server releases it when that connection ends, so a holder that
/// dies (or whose host vanishes, after the keepalive bound) lets the next one in.
final class PostgresLock: SessionLock {
    let name: String
    private let key: Int64
    private let backend: PostgresBackend

    init(backend: PostgresBackend, name: String, key: Int64) {
        self.backend = backend
        self.name = name
        self.key = key
    }

    func tryAcquire() throws(TabSyncError) -> (any SessionLockHold)? {
        let connection = try backend.lockPool.checkOut()
        let taken: Bool
        do {
            let rows = try backend.connector.run("SELECT pg_try_advisory_lock(\(key))", on: connection, doing: "taking the lock \(name)")
            taken = (try? rows.first?.decode(Bool.self)) ?? false
        } catch {
            connection.closeNow()
            throw error
        }
        guard taken else {
            backend.lockPool.checkIn(connection)
            return nil
        }
        return PostgresLockHold(connection: connection, key: key, backend: backend)
    }

    func acquire(timeout: Duration?) async throws -> any SessionLockHold {
        let (backend, key, name) = (self.backend, self.key, self.name)
        return try await Blocking.run { interruption in
            let connection = try backend.lockPool.checkOut()
            guard interruption.arm(connection) else {
                backend.lockPool.checkIn(connection)
                throw CancellationError()
            }
            let bound = timeout.map { max($0, .milliseconds(1)) }
            do throws(TabSyncError) {
                try backend.connector.run(
                    "SELECT set_config('lock_timeout', \("\(bound?.milliseconds ?? 0)ms"), false)", on: connection, doing: "waiting for the lock \(name)")
                try backend.connector.run(
                    "SELECT pg_advisory_lock(\(key))", on: connection,
                    timeout: (bound ?? .seconds(365 * 86_400)) + backend.configuration.operationTimeout, doing: "waiting for the lock \(name)")
                try backend.connector.run("SELECT set_config('lock_timeout', '0', false)", on: connection, doing: "taking the lock \(name)")
            } catch {
                connection.closeNow()
                if error.code == .lockTimeout {
                    throw backend.lockTimeoutError("The lock \(name)", name: name, key: key, after: bound ?? .zero)
                }
                throw error
            }
            interruption.disarm()
            return PostgresLockHold(connection: connection, key: key, backend: backend)
        }
    }

    func query() -> LockReport {
        (try? backend.lockReport(name: name, key: key)) ?? LockReport(name: name, path: backend.location, holders: [], waiters: [])
    }
}

/// A held named lock. Released once: explicitly, or when the hold is dropped.
final class PostgresLockHold: SessionLockHold {
    private let connection = Mutex<PostgresConnection?>(nil)
    private let key: Int64
    private let backend: PostgresBackend

    init(connection: PostgresConnection, key: Int64, backend: PostgresBackend) {
        self.connection.withLock { $0 = connection }
        self.key = key
        self.backend = backend
    }

    deinit { release() }

    func release() {
        guard let connection = connection.withLock({ current in defer { current = nil }; return current }) else { return }
        do {
            try backend.connector.run("SELECT pg_advisory_unlock(\(key))", on: connection, doing: "releasing a lock")
            backend.lockPool.checkIn(connection)
        } catch {
            // Closing the connection releases the lock too.
            connection.closeNow()
        }
    }
}
