import TabSync

/// An error of the auth session or its OAuth 2.0 client. Never contains a token or a secret.
public struct AuthError: Error, Sendable, Hashable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        let name: String
        /// No session: nobody signed in, or the session ended (see ``AuthError/reason``).
        public static let signedOut = Code(name: "signedOut")
        /// The refresh token is finished: the authorization server refused it (any answer that is
        /// not a success and not transient, whatever its body), or its refresh went unanswered.
        /// The session ended everywhere and that token is never presented again.
        public static let refreshFailed = Code(name: "refreshFailed")
        /// The server refused the credentials of a password grant (`invalid_grant`).
        public static let invalidCredentials = Code(name: "invalidCredentials")
        /// The server refused the client (`invalid_client`, `unauthorized_client`).
        public static let invalidClient = Code(name: "invalidClient")
        /// A transient failure: the request certainly never reached the server (connection refused,
        /// no such host), or the server answered 408, 429 or 5xx, or a shared backoff still runs.
        public static let network = Code(name: "network")
        /// The request was sent but its answer never came (timeout, connection lost): the server
        /// may have acted on it. On a refresh, the session ends (``refreshFailed``) unless
        /// ``AuthSession/Options/reuseGracePeriod`` allows one more try.
        public static let unanswered = Code(name: "unanswered")
        /// Another process's refresh took longer than ``AuthSession/Options/refreshWaitTimeout``:
        /// ``AuthError/refresher`` names it (origin, pid, running, stopped or gone). Its refresh
        /// is not taken over; asking again later is safe.
        public static let refreshTimeout = Code(name: "refreshTimeout")
        /// The shared session record is unreadable or holds numbers out of range. It is treated as
        /// signed out; signing in again replaces it.
        public static let invalidRecord = Code(name: "invalidRecord")
        /// Any other OAuth error response from the server (RFC 6749 §5.2).
        public static let server = Code(name: "server")
        /// The server's answer was not a valid token response.
        public static let invalidResponse = Code(name: "invalidResponse")
        /// Bad configuration: a non-HTTPS endpoint that is not loopback, a missing token endpoint.
        public static let invalidConfiguration = Code(name: "invalidConfiguration")
        /// The shared storage failed (see ``AuthError/storage``).
        public static let storage = Code(name: "storage")
        /// The task was cancelled while a change waited for the commit lock; nothing was
        /// committed. (``AuthSession/accessToken()`` throws `CancellationError` instead.)
        public static let cancelled = Code(name: "cancelled")
        public var description: String { name }
    }

    public var code: Code
    public var message: String
    /// The OAuth `error` code from the server, when there was one.
    public var oauthError: String?
    /// Why the session ended, for ``Code/signedOut`` and ``Code/refreshFailed``.
    public var reason: SignOutReason?
    /// The storage error under a ``Code/storage`` error.
    public var storage: TabSyncError?
    /// The HTTP status of the server's answer, when there was one.
    public var httpStatus: Int?
    /// The process whose refresh this process waited for, with ``Code/refreshTimeout``.
    public var refresher: RefreshInProgress?

    public init(
        code: Code, message: String, oauthError: String? = nil, reason: SignOutReason? = nil, storage: TabSyncError? = nil,
        httpStatus: Int? = nil, refresher: RefreshInProgress? = nil
    ) {
        self.code = code
        self.message = message
        self.oauthError = oauthError
        self.reason = reason
        self.storage = storage
        self.httpStatus = httpStatus
        self.refresher = refresher
    }

    public var description: String { message }

    static func storage(_ error: TabSyncError) -> AuthError {
        AuthError(code: .storage, message: error.description, storage: error)
    }
}

/// Why a session ended.
public enum SignOutReason: String, Sendable, Hashable, Codable, CaseIterable, CustomStringConvertible {
    /// The plain name (`userLogout`), as in `tab`'s output.
    public var description: String { rawValue }

    /// A user signed out in some process.
    case userLogout
    /// The refresh token was refused (expired, revoked or reused, or any other final answer), its
    /// refresh went unanswered, or a refresher died mid-refresh.
    case refreshFailed
    /// No activity in any process for the idle timeout.
    case idleTimeout
    /// The session reached its absolute lifetime.
    case absoluteTimeout
    /// The session was revoked by the application (for example after a security event).
    case revoked
}
