import Foundation
import TabSync

/// Where a store lives on PostgreSQL and how to reach it.
///
/// The password is kept apart from the URL and never appears in ``location``, messages, logs or
/// descriptions. Connections to any host but loopback require TLS unless `sslmode=disable` says
/// otherwise, as HTTPS is required for token endpoints.
public struct PostgresConfiguration: Sendable, CustomStringConvertible {
    public enum TLSMode: String, Sendable {
        /// No TLS: the default on loopback (127.0.0.0/8, ::1, localhost).
        case disable
        /// TLS with certificate and host name verification: the default everywhere else.
        case require
    }

    public var host: String
    public var port: Int
    public var username: String
    public var database: String
    /// Never shown: ``description`` and ``location`` leave it out.
    public var password: String?
    public var tls: TLSMode
    /// The longest wait for a connection to be established.
    public var connectTimeout: Duration = .seconds(10)
    /// The longest wait for any answer from the server (lock waits get their own bound on top).
    public var operationTimeout: Duration = .seconds(10)
    /// Server-side TCP keepalives (`tcp_keepalives_idle`, `_interval`, `_count`) and
    /// `tcp_user_timeout`: how soon the server notices a host that vanished without closing its
    /// connections, and so releases its locks. See docs/POSTGRES.md for the worst case.
    public var keepalive = Keepalive()

    public struct Keepalive: Sendable, Hashable {
        public var idle: Duration = .seconds(5)
        public var interval: Duration = .seconds(2)
        public var count: Int = 3
        /// How long sent data may stay unacknowledged before the connection is dropped.
        public var userTimeout: Duration = .seconds(15)

        public init() {}

        /// The longest a vanished host's connection lives on the server: the idle time plus
        /// the probes when the connection was idle, or the user timeout when data was in flight.
        public var worstCase: Duration {
            max(idle + interval * count, userTimeout)
        }
    }

    public init(host: String, port: Int = 5432, username: String, database: String, password: String? = nil, tls: TLSMode? = nil) {
        self.host = host
        self.port = port
        self.username = username
        self.database = database
        self.password = password
        self.tls = tls ?? (Self.isLoopback(host) ? .disable : .require)
    }

    /// Parses `postgres://USER@HOST:PORT/DATABASE?sslmode=disable|require`. A password in the URL
    /// is refused unless `allowPasswordInURL` (command lines and logs show URLs): pass it as
    /// `password`, from an environment variable or a file.
    public init(url text: String, password: String? = nil, allowPasswordInURL: Bool = false) throws(TabSyncError) {
        guard let components = URLComponents(string: text), let scheme = components.scheme,
              scheme == "postgres" || scheme == "postgresql", let host = components.host, !host.isEmpty
        else {
            throw TabSyncError(
                code: .invalidArgument, path: nil,
                message: "Not a PostgreSQL URL of the form postgres://USER@HOST:PORT/DATABASE: \(Self.withoutPassword(text))")
        }
        if components.password != nil, !allowPasswordInURL {
            throw TabSyncError(
                code: .invalidArgument, path: nil,
                message: "The URL \(Self.withoutPassword(text)) contains a password; give it through PGPASSWORD or a password file instead, where other users cannot read it")
        }
        let database = String(components.path.drop { $0 == "/" })
        let username = components.user ?? ProcessInfo.processInfo.environment["USER"] ?? "postgres"
        var tls: TLSMode?
        for item in components.queryItems ?? [] where item.name == "sslmode" {
            switch item.value {
            case "disable": tls = .disable
            case "require", "verify-full": tls = .require
            default:
                throw TabSyncError(code: .invalidArgument, path: nil, message: "sslmode must be disable or require, not \(item.value ?? "empty")")
            }
        }
        self.init(
            host: host, port: components.port ?? 5432, username: username, database: database.isEmpty ? username : database,
            password: components.password ?? password, tls: tls)
    }

    /// The server, without the password: `postgres://USER@HOST:PORT/DATABASE`.
    public var description: String {
        let host = self.host.contains(":") ? "[\(self.host)]" : self.host
        return "postgres://\(username)@\(host):\(port)/\(database)"
    }

    static func isLoopback(_ host: String) -> Bool {
        host == "localhost" || host == "::1" || host == "[::1]" || host.hasPrefix("127.")
    }

    /// `text` with any password in it replaced, for messages about a URL that did not parse.
    static func withoutPassword(_ text: String) -> String {
        guard let at = text.lastIndex(of: "@"), let schemeEnd = text.range(of: "://")?.upperBound, schemeEnd < at else { return text }
        let credentials = text[schemeEnd..<at]
        guard let colon = credentials.firstIndex(of: ":") else { return text }
        return String(text[..<colon]) + ":***" + String(text[at...])
    }
}
