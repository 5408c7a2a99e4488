import ArgumentParser
import ExampleSupport
import Foundation
import TabSync
import TabSyncAuth
import TabSyncPostgres

#if canImport(Glibc)
import Glibc
#endif

/// The example client: one "tab" of a shared session (docs/tab-protocol.md).
@main
struct Tab: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tab",
        abstract: "One tab of a TabSync session: prints what it observes, takes commands on standard input.")

    @Option(help: "The shared session directory (created with mode 0700 when missing).")
    var dir: String?

    @Option(help: "Join a session on PostgreSQL instead of a directory: postgres://USER@HOST:PORT/DATABASE (the password from PGPASSWORD or --postgres-password-file, never the URL).")
    var postgres: String?

    @Option(help: "A file holding the PostgreSQL password (its first line).")
    var postgresPasswordFile: String?

    @Option(help: "With --postgres: the session's name, shared by its tabs on every host.")
    var store = "tab"

    @Option(help: "This tab's name, shown to the others as the origin of its changes.")
    var name: String

    @Flag(help: "Speak the machine protocol: one JSON object per line.")
    var json = false

    @Option(help: "The OAuth 2.0 token endpoint (HTTPS, or HTTP on loopback).")
    var tokenEndpoint: String?

    @Option(help: "The RFC 7009 revocation endpoint.")
    var revocationEndpoint: String?

    @Option(help: "The OAuth client id.")
    var clientId = "tabsync"

    @Option(help: "The OAuth client secret. Visible to every user of the machine in `ps`: prefer --client-secret-file or TABSYNC_CLIENT_SECRET.")
    var clientSecret: String?

    @Option(help: "A file holding the OAuth client secret (its first line).")
    var clientSecretFile: String?

    @Option(help: "The longest a change waits for the commit lock, in seconds (a stopped or hung process holding it).")
    var lockTimeout: Double = 10

    @Option(help: "How many changes each storage's log keeps for tabs that fall behind (it is compacted past about twice as many).")
    var history: Int = JournalLimits().maximumEntries

    @Option(help: "The timeout of one request to the authorization server, in seconds.")
    var httpTimeout: Double = 15

    @Option(help: "The server's refresh-token reuse grace period, in seconds: a refresh whose answer never came is tried once more within it.")
    var reuseGracePeriod: Double?

    @Option(help: "The scope to ask for at sign-in.")
    var scope: String?

    @Option(help: "Refresh when the access token expires within this many seconds.")
    var leeway: Double = 30

    @Option(help: "Sign out after this many seconds without activity in any tab.")
    var idleTimeout: Double?

    @Option(help: "Sign out this many seconds after sign-in.")
    var absoluteTimeout: Double?

    @Option(help: "Refresh in the background this many seconds before the leeway, so that `token` rarely waits.")
    var proactiveRefresh: Double?

    static func main() async {
        signal(SIGPIPE, SIG_IGN)
        // A file size limit (RLIMIT_FSIZE) then fails the write with EFBIG instead of killing the tab.
        signal(SIGXFSZ, SIG_IGN)
        // A parent may have started us with signals blocked (posix_spawn passes on the mask of
        // the thread that spawned): unblock them, so that SIGTERM and Ctrl-C stop the tab.
        var none = sigset_t()
        sigemptyset(&none)
        sigprocmask(SIG_SETMASK, &none, nil)
        let command: Tab
        do {
            command = try Tab.parse(Array(Self.arguments.dropFirst()))
        } catch {
            let exitCode = Tab.exitCode(for: error)
            if exitCode == .success {
                print(Tab.fullMessage(for: error))
                return
            }
            fail(Tab.message(for: error).split(separator: "\n").first.map(String.init) ?? "invalid arguments")
        }
        await command.start()
    }

    /// A flag's number of seconds as a duration: finite, more than zero (or zero where allowed)
    /// and at most `maximum` (ten years: SessionLimits). Anything else exits before a write.
    static func duration(_ seconds: Double, _ flag: String, allowZero: Bool = false, maximum: Double = 315_360_000) -> Duration {
        guard seconds.isFinite, allowZero ? seconds >= 0 : seconds > 0, seconds <= maximum else {
            fail("\(flag) must be a number of seconds \(allowZero ? "from 0" : "above 0") up to \(Int(maximum)), not \(seconds)")
        }
        return .milliseconds(Int64((seconds * 1000).rounded()))
    }

    /// The client secret: --client-secret-file, else TABSYNC_CLIENT_SECRET, else --client-secret.
    static func clientSecret(flag: String?, file: String?) -> String? {
        if let file {
            guard flag == nil else { fail("give --client-secret or --client-secret-file, not both") }
            guard let text = try? String(contentsOfFile: file, encoding: .utf8) else { fail("cannot read --client-secret-file \(file)") }
            let secret = text.split(separator: "\n", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
            guard !secret.isEmpty else { fail("--client-secret-file \(file) is empty") }
            return secret
        }
        if let flag { return flag }
        if let secret = ProcessInfo.processInfo.environment["TABSYNC_CLIENT_SECRET"], !secret.isEmpty { return secret }
        return nil
    }

    /// The PostgreSQL server of --postgres; the password from --postgres-password-file or PGPASSWORD.
    static func postgresConfiguration(_ url: String, passwordFile: String?) -> PostgresConfiguration {
        var password = ProcessInfo.processInfo.environment["PGPASSWORD"].flatMap { $0.isEmpty ? nil : $0 }
        if let passwordFile {
            guard let text = try? String(contentsOfFile: passwordFile, encoding: .utf8) else { fail("cannot read --postgres-password-file \(passwordFile)") }
            password = text.split(separator: "\n", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init)
        }
        do {
            return try PostgresConfiguration(url: url, password: password)
        } catch {
            fail(error.message)
        }
    }

    /// The command line. Under some LD_PRELOAD libraries (libfaketime) the Swift runtime sees no
    /// arguments at all; the kernel's copy in /proc/self/cmdline is read then.
    static var arguments: [String] {
        if !CommandLine.arguments.isEmpty { return CommandLine.arguments }
        let raw = (try? Data(contentsOf: URL(fileURLWithPath: "/proc/self/cmdline"))) ?? Data()
        return raw.split(separator: 0, omittingEmptySubsequences: false).dropLast().map { String(decoding: $0, as: UTF8.self) }
    }

    static func fail(_ message: String) -> Never {
        FileHandle.standardError.write(Data("tab: \(message)\n".utf8))
        Glibc.exit(2)
    }

    func start() async {
        // Configuration first: nothing is written to the directory when it is bad.
        let leeway = Self.duration(leeway, "--leeway", allowZero: true)
        let idleTimeout = idleTimeout.map { Self.duration($0, "--idle-timeout") }
        let absoluteTimeout = absoluteTimeout.map { Self.duration($0, "--absolute-timeout") }
        let proactiveRefresh = proactiveRefresh.map { Self.duration($0, "--proactive-refresh") }
        let reuseGracePeriod = reuseGracePeriod.map { Self.duration($0, "--reuse-grace-period") }
        let httpTimeout = Self.duration(httpTimeout, "--http-timeout", maximum: 3600)
        let lockTimeout = Self.duration(lockTimeout, "--lock-timeout", maximum: 3600)
        let clientSecret = Self.clientSecret(flag: clientSecret, file: clientSecretFile)
        guard (1...1_000_000).contains(history) else { Self.fail("--history must be 1 to 1000000 changes") }
        guard !name.isEmpty, !name.contains(where: \.isNewline) else { Self.fail("--name must be a non-empty single line") }
        var client: OAuthClient?
        if let tokenEndpoint {
            guard let url = URL(string: tokenEndpoint) else { Self.fail("--token-endpoint is not a URL: \(tokenEndpoint)") }
            let revocation = revocationEndpoint.flatMap(URL.init(string:))
            if revocationEndpoint != nil, revocation == nil { Self.fail("--revocation-endpoint is not a URL") }
            let configuration = OAuthConfiguration(
                tokenEndpoint: url, revocationEndpoint: revocation, clientID: clientId, clientSecret: clientSecret, scope: scope,
                timeout: httpTimeout)
            do {
                client = try OAuthClient(configuration: configuration)
            } catch {
                Self.fail(error.message)
            }
            for endpoint in [url, revocation].compactMap({ $0 }) {
                if let problem = Reachability.problem(endpoint) { Self.fail(problem) }
            }
        } else if revocationEndpoint != nil {
            Self.fail("--revocation-endpoint needs --token-endpoint")
        }

        let postgres = postgres.map { Self.postgresConfiguration($0, passwordFile: postgresPasswordFile) }
        guard (dir == nil) != (postgres == nil) else { Self.fail("give either --dir or --postgres") }

        let output = Output(json: json, name: name)
        let app: SharedStorage
        let session: AuthSession
        do {
            var storageOptions = SharedStorage.Options()
            storageOptions.lockTimeout = lockTimeout
            storageOptions.journalLimits = JournalLimits(maximumEntries: history)
            var options = AuthSession.Options()
            options.storage = storageOptions
            options.leeway = leeway
            options.proactiveRefresh = proactiveRefresh
            options.reuseGracePeriod = reuseGracePeriod
            options.policy = SessionPolicy(idleTimeout: idleTimeout, absoluteTimeout: absoluteTimeout)
            if let postgres {
                let appBackend = try PostgresBackend(configuration: postgres, store: "\(store)/app", origin: name, lockTimeout: lockTimeout)
                app = try SharedStorage(backend: appBackend, origin: name, options: storageOptions)
                let sessionBackend = try PostgresBackend(configuration: postgres, store: "\(store)/session", origin: name, lockTimeout: lockTimeout)
                // Hosts' clocks differ: the session's deadlines, activity and backoff go by the server's.
                options.clock = SessionClock { sessionBackend.serverTime() }
                session = AuthSession(storage: try SharedStorage(backend: sessionBackend, origin: name, options: storageOptions), client: client, options: options)
            } else {
                let dir = dir!
                app = try SharedStorage(directory: dir, name: "app", origin: name, options: storageOptions)
                session = try AuthSession(directory: dir, origin: name, client: client, options: options)
            }
        } catch let error as TabSyncError {
            Self.fail(error.description)
        } catch {
            Self.fail("\(error)")
        }

        let controller = Controller(app: app, session: session, output: output, name: name)
        await controller.run()
        Glibc.exit(0)
    }
}

/// Checks, before anything is written, that an endpoint's host accepts connections.
enum Reachability {
    static func problem(_ url: URL) -> String? {
        guard let host = url.host else { return "\(url.absoluteString) has no host" }
        let port = url.port ?? (url.scheme == "https" ? 443 : 80)
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        let bareHost = host.trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
        guard getaddrinfo(bareHost, String(port), &hints, &list) == 0, let first = list else {
            return "cannot resolve the host of \(url.absoluteString)"
        }
        defer { freeaddrinfo(list) }
        var entry: UnsafeMutablePointer<addrinfo>? = first
        while let current = entry {
            let fd = socket(current.pointee.ai_family, current.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), current.pointee.ai_protocol)
            if fd >= 0 {
                var timeout = timeval(tv_sec: 3, tv_usec: 0)
                setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
                let connected = connect(fd, current.pointee.ai_addr, current.pointee.ai_addrlen) == 0
                close(fd)
                if connected { return nil }
            }
            entry = current.pointee.ai_next
        }
        return "the endpoint \(url.absoluteString) is unreachable (no connection to \(bareHost):\(port))"
    }
}
