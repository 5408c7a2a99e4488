import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Hosts simulated with network namespaces: each has its own network stack, joined to this one by
/// a veth pair. Inside a host, forwarders on its own 127.0.0.1 carry the PostgreSQL server's and the
/// authorization server's ports across the veth link to this namespace's servers, so a tab in a
/// host uses the same URLs as one here, and its traffic crosses a network. Needs root (CI runs as
/// root); `make` returns nil, with the reason, where the machine does not allow namespaces.
final class SimulatedHosts: Sendable {
    struct Host: Sendable {
        let namespace: String
        let outerInterface: String
        let outerAddress: String
    }

    let hosts: [Host]
    private let forwarders: [ChildProcess]

    private init(hosts: [Host], forwarders: [ChildProcess]) {
        self.hosts = hosts
        self.forwarders = forwarders
    }

    /// `count` hosts through which `ports` (TCP ports of 127.0.0.1 here) are reachable on their 127.0.0.1.
    static func make(count: Int, ports: [Int]) async -> (SimulatedHosts?, String?) {
        guard geteuid() == 0 else { return (nil, "network namespaces need root") }
        let tag = String(getpid() % 10_000)
        let subnet = Int(getpid() % 200) + 20
        var hosts: [Host] = []
        var forwarders: [ChildProcess] = []
        func fail(_ reason: String) -> (SimulatedHosts?, String?) {
            forwarders.forEach { $0.kill() }
            for host in hosts { cleanUp(host) }
            return (nil, reason)
        }
        for index in 0..<count {
            let host = Host(namespace: "tabsync-\(tag)-\(index)", outerInterface: "tsv\(tag)o\(index)", outerAddress: "10.\(subnet).\(index + 1).1")
            let inner = "tsv\(tag)i\(index)", innerAddress = "10.\(subnet).\(index + 1).2"
            hosts.append(host)
            for command in [
                ["ip", "netns", "add", host.namespace],
                ["ip", "link", "add", host.outerInterface, "type", "veth", "peer", "name", inner],
                ["ip", "link", "set", inner, "netns", host.namespace],
                ["ip", "addr", "add", "\(host.outerAddress)/24", "dev", host.outerInterface],
                ["ip", "link", "set", host.outerInterface, "up"],
                ["ip", "netns", "exec", host.namespace, "ip", "addr", "add", "\(innerAddress)/24", "dev", inner],
                ["ip", "netns", "exec", host.namespace, "ip", "link", "set", inner, "up"],
                ["ip", "netns", "exec", host.namespace, "ip", "link", "set", "lo", "up"],
            ] {
                guard runCommand(command).status == 0 else { return fail("`\(command.joined(separator: " "))` failed") }
            }
            let script = "\(repositoryRoot)/Tests/NetworkHosts/forward.py"
            do {
                // Here: the host's side of the link to our servers; there: its 127.0.0.1 to the link.
                let outer = try ChildProcess("/usr/bin/env", ["python3", script] + ports.map { "\(host.outerAddress):\($0)=127.0.0.1:\($0)" }, name: "forward-out-\(index)")
                forwarders.append(outer)
                let innerForwarder = try ChildProcess(
                    "/usr/bin/env", ["ip", "netns", "exec", host.namespace, "python3", script] + ports.map { "127.0.0.1:\($0)=\(host.outerAddress):\($0)" },
                    name: "forward-in-\(index)")
                forwarders.append(innerForwarder)
                for forwarder in [outer, innerForwarder] {
                    try await forwarder.waitForLine("READY")
                }
            } catch {
                return fail("the forwarders did not start: \(error)")
            }
        }
        return (SimulatedHosts(hosts: hosts, forwarders: forwarders), nil)
    }

    /// The command line that runs `executable` on host `index`.
    func command(on index: Int, _ executable: String, _ arguments: [String]) -> (String, [String]) {
        ("/usr/sbin/ip", ["netns", "exec", hosts[index].namespace, executable] + arguments)
    }

    func tearDown() {
        forwarders.forEach { $0.kill() }
        for host in hosts { Self.cleanUp(host) }
    }

    private static func cleanUp(_ host: Host) {
        runCommand(["ip", "link", "del", host.outerInterface])
        runCommand(["ip", "netns", "del", host.namespace])
    }
}

extension ChildProcess {
    /// Waits until a line of output is exactly `line`.
    func waitForLine(_ line: String, timeout: Duration = .seconds(20)) async throws {
        let deadline = ContinuousClock.now + timeout
        while !output.contains(line) {
            guard process.isRunning, ContinuousClock.now < deadline else {
                throw TestFailure("\(name): no line \(line) within \(timeout). stderr: \(standardError)")
            }
            try await Task.sleep(for: .milliseconds(10))
        }
    }
}
