// DEVELOPMENT ONLY: a tiny OAuth 2.0 token server for the TabSync demo.
import ArgumentParser
import FlyingFox
import FlyingSocks
import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

@main
struct DevTokenServer: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "devtoken-server",
        abstract: "DEVELOPMENT-ONLY OAuth 2.0 token server for the TabSync demo. NOT FOR PRODUCTION.",
        discussion: """
            WARNING: for local demos and tests only. Do not use in production: state
            is in memory only, the admin endpoints are unauthenticated, credentials
            come from the command line, and it speaks plain HTTP.

            Endpoints:
              POST /token             grant_type=password or refresh_token
                                      (RFC 6749); client auth by HTTP Basic or
                                      client_id/client_secret form fields
              POST /revoke            RFC 7009; a refresh token revokes its family
              POST /introspect        RFC 7662-style token introspection
              POST /admin/revoke-all  revoke every refresh token (no auth)
              GET  /stats             {"refresh","password","revoke",
                                       "refreshFailed","reused"} counters

            Access tokens are HS256 JWTs (sub, iat, exp, jti, scope, client_id)
            signed with a random per-run key. Refresh tokens rotate on every use;
            presenting one a second time is reuse: invalid_grant, and its whole
            token family is revoked.

            Prints "listening on http://HOST:PORT" once ready, then one line per
            request (never a token or secret; --quiet drops the request lines).
            """
    )

    @Option(help: "TCP port to listen on (0 picks a free port).")
    var port: UInt16

    @Option(help: "IP address to bind (IPv4 or IPv6 literal, or localhost).")
    var host: String = "127.0.0.1"

    @Option(help: "Access token lifetime in seconds.")
    var accessTTL: Int = 5

    @Option(help: "Refresh token lifetime in seconds.")
    var refreshTTL: Int = 3600

    @Option(help: "OAuth client id.")
    var clientID: String = "tabsync-demo"

    @Option(help: "OAuth client secret.")
    var clientSecret: String = "demo-secret"

    @Option(name: .customLong("user"), parsing: .upToNextOption,
            help: ArgumentHelp("Resource owner credentials, repeatable (default alice:wonderland).",
                               valueName: "name:password"))
    var users: [UserCredential] = []

    @Flag(help: "Do not print a line per request.")
    var quiet = false

    func validate() throws {
        guard accessTTL > 0 else { throw ValidationError("--access-ttl must be positive") }
        guard refreshTTL > 0 else { throw ValidationError("--refresh-ttl must be positive") }
        guard !clientID.isEmpty else { throw ValidationError("--client-id must not be empty") }
        _ = try BindAddress(host: host, port: port)
    }

    func run() async throws {
        // A reader that goes away must not kill the server through SIGPIPE on stdout.
        signal(SIGPIPE, SIG_IGN)

        let credentials = users.isEmpty ? [UserCredential(name: "alice", password: "wonderland")] : users
        let store = TokenStore(settings: .init(
            accessTTL: accessTTL,
            refreshTTL: refreshTTL,
            users: Dictionary(credentials.map { ($0.name, $0.password) }, uniquingKeysWith: { _, last in last })
        ))
        let console = Console(quiet: quiet)
        let routes = Routes(store: store, client: ClientCredentials(id: clientID, secret: clientSecret),
                            console: console)
        let bind = try BindAddress(host: host, port: port)
        let server = bind.makeServer(handler: routes)

        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                try await server.run()
            }
            group.addTask {
                try await server.waitUntilListening(timeout: 30)
                guard let address = await server.listeningAddress else {
                    throw ValidationError("server is not listening")
                }
                console.line("listening on \(BindAddress.url(for: address))")
            }
            // run() only returns by throwing; the listening task finishes first.
            while try await group.next() != nil {}
        }
    }
}

/// `--user name:password`
struct UserCredential: ExpressibleByArgument, Sendable {
    var name: String
    var password: String

    init(name: String, password: String) {
        self.name = name
        self.password = password
    }

    init?(argument: String) {
        guard let colon = argument.firstIndex(of: ":"), colon != argument.startIndex else { return nil }
        name = String(argument[..<colon])
        password = String(argument[argument.index(after: colon)...])
    }
}

/// The socket address to bind, from --host and --port.
enum BindAddress {
    case ip4(sockaddr_in)
    case ip6(sockaddr_in6)

    init(host: String, port: UInt16) throws {
        let literal = host == "localhost" ? "127.0.0.1" : host
        do {
            if literal.contains(":") {
                self = .ip6(try .inet6(ip6: literal, port: port))
            } else {
                self = .ip4(try .inet(ip4: literal, port: port))
            }
        } catch {
            throw ValidationError("--host must be an IPv4 or IPv6 address (or localhost), got \(host)")
        }
    }

    /// No FlyingFox logger: its default one prints to stdout, which must carry only our lines.
    func makeServer(handler: some HTTPHandler) -> HTTPServer {
        switch self {
        case .ip4(let address):
            HTTPServer(address: address, timeout: 15, logger: DisabledLogger.disabled, handler: handler)
        case .ip6(let address):
            HTTPServer(address: address, timeout: 15, logger: DisabledLogger.disabled, handler: handler)
        }
    }

    static func url(for address: Socket.Address) -> String {
        switch address {
        case let .ip4(ip, port):
            "http://\(ip):\(port)"
        case let .ip6(ip, port):
            "http://[\(ip)]:\(port)"
        case let .unix(path):
            "unix:\(path)"
        }
    }
}
