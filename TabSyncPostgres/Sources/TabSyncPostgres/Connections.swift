import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import PostgresNIO
import Synchronization
import TabSync

#if canImport(Glibc)
import Glibc
#endif

/// Opens connections to one server and runs statements on them with a bound on every wait.
///
/// Everything here blocks its calling thread on event-loop futures, never on Swift concurrency:
/// the backend's synchronous forms are called from arbitrary threads, and its async forms run
/// them on threads of their own (``Blocking``), so no cooperative thread is ever held.
final class Connector: Sendable {
    let configuration: PostgresConfiguration
    let applicationName: String
    let logger: Logger
    private let group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    private let nextID = Atomic<Int>(1)
    /// The TLS context every connection shares, when TLS is required.
    private let tls: Result<NIOSSLContext, any Error>?

    init(configuration: PostgresConfiguration, origin: String, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
        applicationName = Holder.applicationName(origin: origin)
        tls = configuration.tls == .require ? Result { try NIOSSLContext(configuration: .makeClientConfiguration()) } : nil
    }

    /// A new connection, or ``TabSyncError/Code/unavailable``.
    func connect() throws(TabSyncError) -> PostgresConnection {
        var postgres = PostgresConnection.Configuration(
            host: configuration.host, port: configuration.port, username: configuration.username,
            password: configuration.password, database: configuration.database, tls: .disable)
        switch tls {
        case let .success(context)?: postgres.tls = .require(context)
        case let .failure(error)?:
            throw TabSyncError(code: .unavailable, path: configuration.description, message: "TLS could not be set up: \(error)")
        case nil: break
        }
        postgres.options.connectTimeout = .nanoseconds(Int64(configuration.connectTimeout.nanoseconds))
        let keepalive = configuration.keepalive
        // force_generic_plan: the server would otherwise plan the reader's query again at every
        // execution (its `$2 OR` makes a custom plan look cheaper): the server processes' CPU in
        // a run with 16 readers fell by about a third with it.
        postgres.options.additionalStartupParameters = [
            ("application_name", applicationName),
            ("plan_cache_mode", "force_generic_plan"),
            ("tcp_keepalives_idle", "\(max(1, keepalive.idle.seconds))"),
            ("tcp_keepalives_interval", "\(max(1, keepalive.interval.seconds))"),
            ("tcp_keepalives_count", "\(max(1, keepalive.count))"),
            ("tcp_user_timeout", "\(keepalive.userTimeout.milliseconds)"),
        ]
        let id = nextID.add(1, ordering: .relaxed).oldValue
        let future = PostgresConnection.connect(on: group.next(), configuration: postgres, id: id, logger: logger)
        let connection: PostgresConnection
        do {
            connection = try future.wait()
        } catch {
            throw Self.failure(error, doing: "connecting", at: configuration.description)
        }
        // One close callback per connection, not one per statement (each stays until the
        // connection closes: a pooled connection would gather one per statement it ever ran).
        let watch = CloseWatch(), key = ObjectIdentifier(connection)
        closeWatches.withLock { $0[key] = watch }
        connection.closeFuture.whenComplete { [weak self] _ in
            watch.closed()
            self?.closeWatches.withLock { _ = $0.removeValue(forKey: key) }
            self?.prepared.withLock { _ = $0.removeValue(forKey: key) }
        }
        return connection
    }

    /// The close watch of each open connection that ``connect()`` made.
    private let closeWatches = Mutex<[ObjectIdentifier: CloseWatch]>([:])

    /// Runs `query` and returns its rows; waits at most `timeout` (default: the operation
    /// timeout), after which the connection is closed and the error names the server.
    @discardableResult
    func run(_ query: PostgresQuery, on connection: PostgresConnection, timeout: Duration? = nil, doing: String) throws(TabSyncError) -> [PostgresRow] {
        let logger = self.logger
        return try perform(on: connection, timeout: timeout, doing: doing) { connection.query(query, logger: logger).map(\.rows) }
    }

    /// Runs `sql` as a statement prepared on `connection` (the first use there prepares it, in
    /// the same wait): the server parses and plans it once per connection, not at every run,
    /// which for the reader's query is most of its cost. As ``run(_:on:timeout:doing:)``
    /// otherwise.
    func run(
        prepared sql: String, _ binds: [PostgresData], on connection: PostgresConnection, timeout: Duration? = nil, doing: String
    ) throws(TabSyncError) -> [PostgresRow] {
        try perform(on: connection, timeout: timeout, doing: doing) { [self] in start(prepared: sql, binds, on: connection) }
    }

    /// Starts `sql` as a statement prepared on `connection`, without waiting (the listener's
    /// read-ahead runs it on its event loop); see ``run(prepared:_:on:timeout:doing:)``.
    func start(prepared sql: String, _ binds: [PostgresData], on connection: PostgresConnection) -> EventLoopFuture<[PostgresRow]> {
        let key = ObjectIdentifier(connection)
        let statement: EventLoopFuture<PreparedQuery>
        if let known = prepared.withLock({ $0[key]?[sql] }) {
            statement = connection.eventLoop.makeSucceededFuture(known)
        } else {
            statement = connection.prepare(query: sql).map { [self] query in
                if !connection.isClosed { prepared.withLock { $0[key, default: [:]][sql] = query } }
                return query
            }
        }
        return statement.flatMap { query in
            query.execute(binds).flatMapErrorThrowing { [self] error in
                // A statement the server no longer has, or whose plan no longer fits, is prepared
                // again next time (and freed). Any other failure keeps it: a lock timeout leaves
                // the connection in use, and a lost connection drops its statements.
                if case let PostgresError.server(response) = error, ["26000", "0A000"].contains(response.fields[.sqlState] ?? "") {
                    prepared.withLock { _ = $0[key]?.removeValue(forKey: sql) }
                    query.deallocate().whenComplete { _ in }
                }
                throw error
            }
        }
    }

    /// The statements prepared on each open connection, by their SQL.
    private let prepared = Mutex<[ObjectIdentifier: [String: PreparedQuery]]>([:])

    /// Waits for what `start` begins on the connection's event loop, at most `timeout`.
    private func perform(
        on connection: PostgresConnection, timeout: Duration?, doing: String,
        _ start: @escaping @Sendable () -> EventLoopFuture<[PostgresRow]>
    ) throws(TabSyncError) -> [PostgresRow] {
        let limit = timeout ?? configuration.operationTimeout
        // The wait ends with the answer, at the bound, or when the connection closes (a cancelled
        // wait closes it), whichever comes first: a query on a connection that is closing may
        // never be answered, so the wait does not rest on the query alone. The statement and its
        // timer are set up in one hop to the event loop, and the answer wakes this thread once:
        // a future's `wait()`, `whenComplete` and a timer scheduled or cancelled from here
        // would each hop to the loop on their own.
        let answer = Answer()
        // A connection that is closed already has no watch left: it fails at once.
        let watch = closeWatches.withLock { $0[ObjectIdentifier(connection)] } ?? CloseWatch.closedAlready
        watch.arm { answer.finish(.failure(ConnectionClosed())) }
        defer { watch.disarm() }
        let loop = connection.eventLoop
        loop.execute {
            let timer = loop.scheduleTask(in: .nanoseconds(Int64(limit.nanoseconds))) {
                if answer.finish(.failure(ConnectionClosed()), timedOut: true) { connection.closeNow() }
            }
            start().whenComplete { result in
                timer.cancel()
                answer.finish(result)
            }
        }
        switch answer.wait() {
        case let .success(rows):
            return rows
        case let .failure(error):
            if answer.timedOut {
                throw TabSyncError(
                    code: .unavailable, path: configuration.description,
                    message: "No answer from the server within \(limit) while \(doing); the connection was closed")
            }
            throw Self.failure(error, doing: doing, at: configuration.description)
        }
    }

    /// A TabSyncError for a PostgresNIO error: the SQLSTATE and the server's primary message,
    /// never its detail (which can quote stored values) nor the query's binds.
    static func failure(_ error: any Error, doing: String, at location: String) -> TabSyncError {
        if let error = error as? TabSyncError { return error }
        // A prepared statement's error comes in the older type (``Connector/run(prepared:_:on:timeout:doing:)``).
        let server: (state: String, message: String)?, failure: String
        switch error {
        case is ConnectionClosed, PostgresError.connectionClosed:
            return TabSyncError(code: .unavailable, path: location, message: "The connection to the server was closed while \(doing)")
        case let error as PSQLError:
            server = error.serverInfo?[.sqlState].map { ($0, error.serverInfo?[.message] ?? "") }
            failure = "\(error.code)"
        case let PostgresError.server(response):
            server = response.fields[.sqlState].map { ($0, response.fields[.message] ?? "") }
            failure = "an error without SQLSTATE"
        default:
            return TabSyncError(code: .unavailable, path: location, message: "The server could not be reached while \(doing): \(type(of: error))")
        }
        if let (state, message) = server {
            let code: TabSyncError.Code = switch state {
            case "55P03": .lockTimeout
            case "57P01", "57P02", "57P03", "08000", "08003", "08006": .unavailable
            case "53100": .storageFull
            case "28000", "28P01", "42501": .insecurePath
            default: .io
            }
            return TabSyncError(code: code, path: location, message: "The server refused \(doing) (SQLSTATE \(state)): \(message)")
        }
        return TabSyncError(
            code: .unavailable, path: location,
            message: "The connection to the server failed while \(doing) (\(failure))")
    }
}

/// The outcome of one statement, handed from the event loop to the thread that waits for it:
/// the first of the answer, the timeout and the connection's close wins.
final class Answer: Sendable {
    private let state = Mutex<(result: Result<[PostgresRow], any Error>?, timedOut: Bool)>((nil, false))
    private let ready = DispatchSemaphore(value: 0)

    /// True when this was the first outcome (and so the one the waiter gets).
    @discardableResult
    func finish(_ result: Result<[PostgresRow], any Error>, timedOut: Bool = false) -> Bool {
        let first = state.withLock { state -> Bool in
            guard state.result == nil else { return false }
            state = (result, timedOut)
            return true
        }
        if first { ready.signal() }
        return first
    }

    func wait() -> Result<[PostgresRow], any Error> {
        ready.wait()
        return state.withLock { $0.result! }
    }

    var timedOut: Bool { state.withLock { $0.timedOut } }
}

/// A wait ended because its connection closed.
struct ConnectionClosed: Error {}

/// Whom to tell when a connection closes: the statement waiting on it, if any.
final class CloseWatch: Sendable {
    private let state = Mutex<(closed: Bool, waiting: (@Sendable () -> Void)?)>((false, nil))

    /// The watch of a connection that has closed.
    static var closedAlready: CloseWatch {
        let watch = CloseWatch()
        watch.closed()
        return watch
    }

    /// Calls `onClose` when the connection closes before ``disarm()`` (at once if it has).
    func arm(_ onClose: @escaping @Sendable () -> Void) {
        let closed = state.withLock { state -> Bool in
            if !state.closed { state.waiting = onClose }
            return state.closed
        }
        if closed { onClose() }
    }

    func disarm() {
        state.withLock { $0.waiting = nil }
    }

    func closed() {
        state.withLock { state -> (@Sendable () -> Void)? in
            state.closed = true
            defer { state.waiting = nil }
            return state.waiting
        }?()
    }
}

/// A few idle connections for short statements; a connection that failed is dropped.
final class ConnectionPool: Sendable {
    let connector: Connector
    private let idle = Mutex<[PostgresConnection]>([])
    private let keep: Int

    init(connector: Connector, keep: Int = 4) {
        self.connector = connector
        self.keep = keep
    }

    func checkOut() throws(TabSyncError) -> PostgresConnection {
        while let connection = idle.withLock({ $0.popLast() }) {
            if !connection.isClosed { return connection }
        }
        return try connector.connect()
    }

    func checkIn(_ connection: PostgresConnection) {
        guard !connection.isClosed else { return }
        let surplus: PostgresConnection? = idle.withLock { idle in
            guard idle.count < keep else { return connection }
            idle.append(connection)
            return nil
        }
        surplus?.closeNow()
    }

    /// Runs `work` on a connection; one that failed is closed rather than reused.
    func with<Result>(_ work: (PostgresConnection) throws(TabSyncError) -> Result) throws(TabSyncError) -> Result {
        let connection = try checkOut()
        do {
            let result = try work(connection)
            checkIn(connection)
            return result
        } catch {
            connection.closeNow()
            throw error
        }
    }

    func closeAll() {
        for connection in idle.withLock({ idle in defer { idle.removeAll() }; return idle }) { connection.closeNow() }
    }
}

/// Runs blocking work on a thread of its own, so that an async caller never holds a Swift
/// concurrency thread while it waits for the network. Cancelling the task interrupts the wait
/// the work has armed (see ``Interruption``), which then ends with `CancellationError`.
enum Blocking {
    private static let threads = ThreadReuse()

    static func run<Result: Sendable>(_ work: @escaping @Sendable (Interruption) throws -> Result) async throws -> Result {
        try Task.checkCancellation()
        let interruption = Interruption()
        do {
            return try await withTaskCancellationHandler {
                try await withCheckedThrowingContinuation { continuation in
                    threads.run { continuation.resume(with: Swift.Result { try work(interruption) }) }
                }
            } onCancel: {
                interruption.cancel()
            }
        } catch {
            if interruption.isCancelled { throw CancellationError() }
            throw error
        }
    }
}

/// Threads for ``Blocking``: a job goes to an idle thread, or to a new one when none is idle, so
/// that a job never waits behind another's network wait; up to ``keep`` threads stay for later
/// jobs (a commit started a thread of its own each time before), asleep on a semaphore, which
/// wakes nothing while idle.
final class ThreadReuse: Sendable {
    static let keep = 8

    private let state = Mutex<(jobs: [@Sendable () -> Void], idle: Int)>(([], 0))
    private let wake = DispatchSemaphore(value: 0)

    func run(_ job: @escaping @Sendable () -> Void) {
        let idle = state.withLock { state -> Bool in
            state.jobs.append(job)
            guard state.idle > 0 else { return false }
            state.idle -= 1
            return true
        }
        if idle {
            wake.signal()
        } else {
            let thread = Thread { [self] in work() }
            thread.name = "TabSyncPostgres.io"
            thread.start()
        }
    }

    /// Each idle count taken here is one `wait`, each given back in ``run(_:)`` one `signal`.
    private func work() {
        while true {
            enum Next { case job(@Sendable () -> Void), sleep, exit }
            let next = state.withLock { state -> Next in
                if !state.jobs.isEmpty { return .job(state.jobs.removeFirst()) }
                guard state.idle < Self.keep else { return .exit }
                state.idle += 1
                return .sleep
            }
            switch next {
            case let .job(job): job()
            case .sleep: wake.wait()
            case .exit: return
            }
        }
    }
}

/// A wait on a connection that cancelling its task ends at once: the connection is closed, so
/// the statement waiting on it fails (and the server rolls back what it did on it).
final class Interruption: Sendable {
    private let state = Mutex<(connection: PostgresConnection?, cancelled: Bool)>((nil, false))

    /// From now on, a cancellation closes `connection`. False (and nothing armed) when the task
    /// was cancelled already.
    func arm(_ connection: PostgresConnection) -> Bool {
        state.withLock { state in
            guard !state.cancelled else { return false }
            state.connection = connection
            return true
        }
    }

    /// The wait is over; a cancellation no longer closes the connection.
    func disarm() {
        state.withLock { $0.connection = nil }
    }

    func cancel() {
        let armed = state.withLock { state in
            state.cancelled = true
            defer { state.connection = nil }
            return state.connection
        }
        armed?.closeNow()
    }

    var isCancelled: Bool { state.withLock { $0.cancelled } }
}

/// How a connection names its process to the server (`application_name`), and how a name read
/// back from `pg_stat_activity` names the holder of a lock.
enum Holder {
    /// `tabsync PID COMMAND@HOST ORIGIN`, cut to PostgreSQL's 63 bytes.
    static func applicationName(origin: String) -> String {
        let command = (try? String(contentsOfFile: "/proc/self/comm", encoding: .utf8))?
            .trimmingCharacters(in: .whitespacesAndNewlines) ?? "?"
        var text = "tabsync \(getpid()) \(clean(command))@\(clean(hostName)) \(clean(origin))"
        while text.utf8.count > 63 { text.removeLast() }
        return text
    }

    static let hostName: String = {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, buffer.count) == 0 else { return "?" }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }()

    private static func clean(_ text: String) -> String {
        String(text.unicodeScalars.map { $0 == " " || $0 == "@" || $0.properties.generalCategory == .control ? "_" : Character($0) })
    }

    /// A holder from its connection's row in `pg_stat_activity`.
    static func lockHolder(applicationName: String, serverPID: Int32, clientAddress: String?, since: Date?) -> LockHolder {
        let fields = applicationName.split(separator: " ", maxSplits: 3).map(String.init)
        let connection: (String) -> ServerConnection = { host in
            ServerConnection(host: host, serverPID: serverPID, applicationName: applicationName, clientAddress: clientAddress, since: since)
        }
        guard fields.count >= 3, fields[0] == "tabsync", let pid = Int32(fields[1]), let at = fields[2].lastIndex(of: "@") else {
            // Not one of ours: a psql session, another program.
            return LockHolder(pid: 0, command: "", state: .unknown, connection: connection("?"))
        }
        let command = String(fields[2][..<at]), host = String(fields[2][fields[2].index(after: at)...])
        if host == hostName {
            let local = LockHolder(pid: pid)
            return LockHolder(pid: pid, command: local.command.isEmpty ? command : local.command, state: local.state, connection: connection(host))
        }
        return LockHolder(pid: pid, command: command, state: .unknown, connection: connection(host))
    }
}

extension Duration {
    var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds * 1_000_000_000 + attoseconds / 1_000_000_000
    }

    var milliseconds: Int64 { nanoseconds / 1_000_000 }
    var seconds: Int64 { components.seconds }
}

extension PostgresConnection {
    /// Closes the connection without waiting; what waits on it fails at once. The connection
    /// object lives until the close is done (PostgresNIO requires it).
    func closeNow() {
        let future: EventLoopFuture<Void> = close()
        future.whenComplete { _ in withExtendedLifetime(self) {} }
    }
}
