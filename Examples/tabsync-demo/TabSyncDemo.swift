import ArgumentParser
import Dispatch
import Foundation

#if canImport(Glibc)
import Glibc
#endif

struct TabSyncDemo: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tabsync-demo",
        abstract: "Tells the TabSync story with a development token server and several `tab` processes.",
        discussion: """
            Starts devtoken-server (DEVELOPMENT ONLY: plain HTTP on 127.0.0.1, a
            free port) and N `tab` processes sharing a fresh temporary session
            directory, then walks through:

              1. sign-in at tab-1, seen by every tab
              2. an application key set at tab-2, seen by every other tab
              3. access token expiries: every tab asks for a token at the same
                 moment; exactly one refreshes and all get the same new token
              4. sign-out at tab-3, seen by every tab
              5. sign-in again; the server revokes every refresh token, the next
                 refresh is refused and every tab is signed out
              6. a summary, checked against the server's request counters

            Every line a tab prints is shown, labelled; tokens only as a short
            fingerprint (FNV-1a), never in full. Exits 0 when every check
            agreed, 1 otherwise. The session directory is removed at the end.

            The `tab` and `devtoken-server` binaries are looked up next to this
            executable; --tab-binary and --server-binary override that.
            """
    )

    @Option(help: "Number of tabs (2 to 16).")
    var tabs = 4

    @Option(name: .customLong("access-ttl"), help: "Access token lifetime at the token server, in seconds (at least 2).")
    var accessTTL = 4

    @Option(help: "Access token expiries to go through (1 to 10).")
    var expiries = 2

    @Option(help: "Seconds to wait for each line the story expects from a tab or the server.")
    var timeout: Double = 15

    @Option(name: .customLong("tab-binary"), help: ArgumentHelp("The tab executable (default: next to this one).", valueName: "path"))
    var tabBinary: String?

    @Option(name: .customLong("server-binary"),
            help: ArgumentHelp("The devtoken-server executable (default: next to this one).", valueName: "path"))
    var serverBinary: String?

    @Option(help: ArgumentHelp(
        "Put the session on PostgreSQL instead of a directory (postgres://USER@HOST:PORT/DATABASE; the password in PGPASSWORD). scripts/demo --postgres starts a throw-away server.",
        valueName: "url"))
    var postgres: String?

    @Flag(name: .customLong("server-log"), help: "Show the token server's request log (a line per request, never a token).")
    var serverLog = false

    @Flag(name: .customLong("no-color"), help: "No colour, even on a terminal (NO_COLOR is honoured too).")
    var noColor = false

    /// Tabs refresh an access token this long before it expires.
    static let leeway = 1

    func validate() throws {
        guard (2...16).contains(tabs) else { throw ValidationError("--tabs must be from 2 to 16") }
        guard accessTTL >= 2 else { throw ValidationError("--access-ttl must be at least 2 (tabs refresh 1 s before expiry)") }
        guard (1...10).contains(expiries) else { throw ValidationError("--expiries must be from 1 to 10") }
        guard timeout > 0 else { throw ValidationError("--timeout must be more than zero") }
    }

    func run() throws {
        // A child that dies must not take the demo with it through SIGPIPE on its input.
        signal(SIGPIPE, SIG_IGN)
        let noColourRequested = !(ProcessInfo.processInfo.environment["NO_COLOR"] ?? "").isEmpty
        let names = (1...tabs).map { "tab-\($0)" }
        let console = Console(colour: !noColor && !noColourRequested && isatty(STDOUT_FILENO) == 1, labels: names + ["server"])
        let hub = Hub(timeout: timeout)
        let cast = Cast(hub: hub)

        // Ctrl-C or a TERM: stop every child and remove the session directory.
        var interrupts: [any DispatchSourceSignal] = []
        for number in [SIGINT, SIGTERM, SIGHUP] {
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler {
                console.error("interrupted; stopping the tabs and the server")
                cast.abandon()
                Glibc.exit(130)
            }
            source.resume()
            interrupts.append(source)
        }

        var passed = false
        do {
            passed = try perform(names: names, console: console, hub: hub, cast: cast)
        } catch {
            if cast.server != nil { console.write("") }
            console.error(error.description)
            console.error("the demo stopped before the end")
        }
        cast.finish(console: console)
        withExtendedLifetime(interrupts) {}
        if !passed { throw ExitCode.failure }
    }

    private func perform(names: [String], console: Console, hub: Hub, cast: Cast) throws(DemoFailure) -> Bool {
        let tabPath = try Binaries.locate("tab", explicit: tabBinary, option: "--tab-binary")
        let serverPath = try Binaries.locate("devtoken-server", explicit: serverBinary, option: "--server-binary")
        let directory = try makeSessionDirectory()
        cast.directory = directory

        let store = "demo-\(UUID().uuidString.prefix(8).lowercased())"
        if let postgres {
            console.write(console.paint("TabSync demo", "1") + ": \(tabs) tabs sharing the session \(store) on PostgreSQL at \(postgres)")
        } else {
            console.write(console.paint("TabSync demo", "1") + ": \(tabs) tabs sharing the session directory \(directory)")
        }
        console.write("Tokens are never printed, only a fingerprint (#xxxxxxxx, FNV-1a of the token).")
        console.narrate("Starting", "The development token server (access tokens live \(accessTTL) s), then \(tabs) tabs.")

        var serverArguments = [
            "--port", "0", "--access-ttl", String(accessTTL),
            "--client-id", "tabsync-demo", "--client-secret", "demo-secret", "--user", "alice:wonderland",
        ]
        if !serverLog { serverArguments.append("--quiet") }
        let server = try Child(name: "server", kind: .server, executable: serverPath, arguments: serverArguments,
                               hub: hub, console: console)
        cast.server = server
        let listening = try server.waitFor("\"listening on\" line from devtoken-server", until: Date(timeIntervalSinceNow: timeout)) {
            $0.text.hasPrefix("listening on ")
        }
        let address = String(listening.text.dropFirst("listening on ".count))
        guard let base = URL(string: address), base.host != nil else {
            throw DemoFailure("devtoken-server printed an address that is not a URL: \(address)")
        }

        let tabArguments = [
            "--json",
            "--token-endpoint", base.appendingPathComponent("token").absoluteString,
            "--revocation-endpoint", base.appendingPathComponent("revoke").absoluteString,
            "--client-id", "tabsync-demo", "--client-secret", "demo-secret",
            "--leeway", String(Self.leeway),
        ]
        // Where the session lives: the directory, or a store on PostgreSQL that every tab joins
        // as a process on another host would.
        let place = postgres.map { ["--postgres", $0, "--store", store] } ?? ["--dir", directory]
        var children: [Child] = []
        for name in names {
            let tab = try Child(name: name, kind: .tab, executable: tabPath,
                                arguments: place + ["--name", name] + tabArguments, hub: hub, console: console)
            children.append(tab)
            cast.tabs.append(tab)
        }
        let deadline = Date(timeIntervalSinceNow: timeout)
        for tab in children {
            _ = try tab.waitForObject("\"ready\" line", until: deadline) { $0["type"] as? String == "ready" }
        }

        let story = Story(tabs: children, server: base, console: console, hub: hub,
                          settings: .init(accessTTL: accessTTL, expiries: expiries, timeout: timeout))
        return try story.tell()
    }
}

/// Who is running, so that the end (normal or interrupted) stops them all and removes the
/// session directory exactly once.
final class Cast: @unchecked Sendable {
    private let hub: Hub
    private let lock = NSLock()
    private var finished = false
    private var _tabs: [Child] = []
    private var _server: Child?
    private var _directory: String?

    init(hub: Hub) { self.hub = hub }

    var tabs: [Child] {
        get { lock.withLock { _tabs } }
        set { lock.withLock { _tabs = newValue } }
    }

    var server: Child? {
        get { lock.withLock { _server } }
        set { lock.withLock { _server = newValue } }
    }

    var directory: String? {
        get { lock.withLock { _directory } }
        set { lock.withLock { _directory = newValue } }
    }

    /// Takes the right to clean up; false when someone already did.
    private func claim() -> Bool {
        lock.withLock {
            defer { finished = true }
            return !finished
        }
    }

    /// The normal end: `quit` to every tab, then the server, then the directory.
    func finish(console: Console) {
        guard claim() else { return }
        hub.beginStopping()
        let (tabs, server, directory) = lock.withLock { (_tabs, _server, _directory) }
        if let directory, tabs.isEmpty, server == nil {
            _ = remove(directory, console: console)
        }
        guard !tabs.isEmpty || server != nil else { return }
        console.narrate("Stopping", "`quit` to every tab, then the token server; the session directory is removed.")
        let started = Date()
        // Every tab gets `quit` at once, then 5 s to exit.
        let quitting = tabs.filter { $0.requestStop(sending: "quit") }
        let deadline = Date(timeIntervalSinceNow: 5)
        for tab in quitting {
            switch tab.awaitStop(until: deadline) {
            case .exited(0), .alreadyGone: break
            case let .exited(status): console.line(tab.name, "exited with status \(status) after `quit`", tone: .warning)
            case let .killed(signal): console.line(tab.name, "killed by signal \(signal) after `quit`", tone: .warning)
            case .terminated: console.line(tab.name, "did not exit within 5 s of `quit`; stopped with SIGTERM", tone: .warning)
            case .forced: console.line(tab.name, "did not exit after `quit` nor SIGTERM; killed", tone: .warning)
            }
        }
        if let server, server.stop(sending: nil, grace: 3) == .forced {
            console.line(server.name, "did not exit on SIGTERM; killed", tone: .warning)
        }
        var ending = "stopped \(tabs.count) tabs" + (server == nil ? "" : " and the server") + " in \(seconds(Date().timeIntervalSince(started))) s"
        if let directory, remove(directory, console: console) { ending += "; removed \(directory)" }
        console.line("demo", ending)
    }

    /// Interrupted: SIGTERM to everyone at once, then remove the directory. Also when the
    /// normal end is under way (a tab slow to quit, say): the process exits right after this.
    func abandon() {
        _ = claim()
        hub.beginStopping()
        let (tabs, server, directory) = lock.withLock { (_tabs, _server, _directory) }
        for child in tabs + [server].compactMap({ $0 }) { child.signal(SIGTERM) }
        if let directory { try? FileManager.default.removeItem(atPath: directory) }
    }

    private func remove(_ directory: String, console: Console) -> Bool {
        do {
            try FileManager.default.removeItem(atPath: directory)
            return true
        } catch {
            console.error("could not remove the session directory \(directory): \(error.localizedDescription)")
            return false
        }
    }
}
