import Foundation
import Synchronization
import Testing
@testable import TabSyncAuth

#if canImport(Glibc)
import Glibc
#endif

/// ``CurlTransport`` against a raw TCP server on 127.0.0.1 that this test scripts: what it was
/// sent, and how each failure is classed (never sent, or sent with the answer unknown).
@Suite(.timeLimit(.minutes(1)))
struct CurlTransportTests {
    /// A listening socket on 127.0.0.1 whose one accepted connection is handled by `behaviour`
    /// on a thread of its own, given the descriptor and the request's bytes as read so far.
    final class LoopbackServer: Sendable {
        let port: UInt16
        private let listener: Int32
        private let request = Received()
        /// What the server has read of the request.
        var received: [UInt8] { request.bytes.withLock { $0 } }

        final class Received: Sendable {
            let bytes = Mutex<[UInt8]>([])
            /// Whether the listener's descriptor is still open: only then may `deinit` shut it
            /// down (a closed descriptor's number may already be another test's socket).
            let listening = Mutex(true)
        }

        init(behaviour: @escaping @Sendable (_ connection: Int32, _ request: [UInt8]) -> Void) throws {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            listener = fd
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            let bound = withUnsafeMutablePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer in
                    bind(fd, pointer, length) == 0 && listen(fd, 4) == 0 && getsockname(fd, pointer, &length) == 0
                }
            }
            try #require(bound, "cannot listen on 127.0.0.1")
            port = UInt16(bigEndian: address.sin_port)
            let (listening, received) = (listener, request)
            // The thread closes the listener once accept(2) returns, never `deinit`, which only
            // shuts it down while it is open: a descriptor closed early could be reused by
            // another test's socket, which a stale accept(2) or shutdown(2) would then hit (seen
            // in a CI run as another test's request answered by this server).
            Thread.detachNewThread {
                let connection = accept(listening, nil, nil)
                received.listening.withLock { open in
                    close(listening)
                    open = false
                }
                guard connection >= 0 else { return }
                // The request's head and its body (the tests' bodies are small).
                var request: [UInt8] = []
                var buffer = [UInt8](repeating: 0, count: 4096)
                while !Self.complete(request) {
                    let count = read(connection, &buffer, buffer.count)
                    if count <= 0 { break }
                    request += buffer[..<count]
                }
                received.bytes.withLock { $0 = request }
                behaviour(connection, request)
                close(connection)
            }
        }

        /// Ends a wait in accept(2), or makes the next one fail at once.
        deinit {
            request.listening.withLock { open in
                if open { shutdown(listener, Int32(SHUT_RDWR)) }
            }
        }

        var url: URL { URL(string: "http://127.0.0.1:\(port)/token")! }

        /// Whether `bytes` hold a whole request: its head, and as much body as it announced.
        static func complete(_ bytes: [UInt8]) -> Bool {
            let text = String(decoding: bytes, as: UTF8.self)
            guard let end = text.range(of: "\r\n\r\n") else { return false }
            let head = text[..<end.lowerBound].lowercased()
            let length = head.split(separator: "\r\n").first { $0.hasPrefix("content-length:") }
                .flatMap { Int($0.dropFirst("content-length:".count).trimmingCharacters(in: .whitespaces)) } ?? 0
            return text.utf8.count - text.utf8.distance(from: text.startIndex, to: end.upperBound) >= length
        }

        /// A server that reads the request and answers nothing until `release` is called.
        static func silent() throws -> (server: LoopbackServer, release: @Sendable () -> Void) {
            final class Flag: Sendable { let raised = Mutex(false) }
            let released = Flag()
            let server = try LoopbackServer { _, _ in
                while !released.raised.withLock({ $0 }) { usleep(10_000) }
            }
            return (server, { released.raised.withLock { $0 = true } })
        }

        static func answer(_ connection: Int32, status: String, body: String) {
            let response = "HTTP/1.1 \(status)\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n\(body)"
            _ = response.withCString { write(connection, $0, strlen($0)) }
        }
    }

    func exchange(_ url: URL, body: String = "grant_type=refresh_token&refresh_token=r1", headers: [String: String] = [:], timeout: Duration = .seconds(10)) -> HTTPExchange {
        HTTPExchange(url: url, method: "POST", headers: ["Content-Type": "application/x-www-form-urlencoded"].merging(headers) { $1 }, body: Data(body.utf8), timeout: timeout)
    }

    @Test func aRequestIsSentAsGivenAndItsAnswerReturned() async throws {
        let server = try LoopbackServer { connection, _ in
            LoopbackServer.answer(connection, status: "400 Bad Request", body: #"{"error":"invalid_grant"}"#)
        }
        defer { withExtendedLifetime(server) {} }
        let (status, body) = try await CurlTransport().send(exchange(server.url, headers: ["Authorization": "Basic YXBwOnMzY3JldA=="]))
        #expect(status == 400)
        #expect(String(decoding: body, as: UTF8.self) == #"{"error":"invalid_grant"}"#)
        let request = String(decoding: server.received, as: UTF8.self)
        #expect(request.hasPrefix("POST /token HTTP/1.1\r\n"))
        #expect(request.contains("\r\nAuthorization: Basic YXBwOnMzY3JldA==\r\n"))
        #expect(request.contains("\r\nContent-Type: application/x-www-form-urlencoded\r\n"))
        #expect(!request.lowercased().contains("expect:"))
        #expect(request.hasSuffix("\r\n\r\ngrant_type=refresh_token&refresh_token=r1"))
    }

    /// Nothing listens: the request certainly never reached a server, and may be sent again.
    @Test func aRefusedConnectionIsNotSent() async throws {
        // A port bound but not listening, held for the test: connecting to it is refused, and no
        // other test can take it meanwhile.
        let bound = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(bound) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ready = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(bound, $0, length) == 0 && getsockname(bound, $0, &length) == 0 }
        }
        try #require(ready, "cannot bind on 127.0.0.1")
        let port = UInt16(bigEndian: address.sin_port)
        await #expect(throws: HTTPRequestNotSent.self) {
            _ = try await CurlTransport().send(exchange(URL(string: "http://127.0.0.1:\(port)/token")!))
        }
    }

    /// The server read the request and never answered: a timeout after sending is "sent, answer
    /// unknown", never ``HTTPRequestNotSent`` (that would let the refresh token be presented again).
    @Test func aTimeoutAfterTheRequestWasSentIsNotNotSent() async throws {
        let (server, release) = try LoopbackServer.silent()
        defer { withExtendedLifetime(server) {} }
        defer { release() }
        let started = ContinuousClock.now
        do {
            _ = try await CurlTransport().send(exchange(server.url, timeout: .milliseconds(300)))
            Issue.record("the request did not time out")
        } catch {
            #expect(error is CurlTransportError, "\(error)")
        }
        #expect(ContinuousClock.now - started < .seconds(5))
        #expect(!server.received.isEmpty)
    }

    /// Cancelling the request's task ends it at once, not at its timeout.
    @Test func cancellingTheTaskEndsARequestAtOnce() async throws {
        let (server, release) = try LoopbackServer.silent()
        defer { withExtendedLifetime(server) {} }
        defer { release() }
        let request = exchange(server.url, timeout: .seconds(30))
        let task = Task { try await CurlTransport().send(request) }
        // Cancelled once the server has the request. It ends in milliseconds on a quiet machine;
        // the bound is 3 s, far below the request's timeout (30 s), since this suite shares
        // 2 cores with every other test. (libcurl alone, without the wake-up of its poll, would
        // notice at its next internal timer, about 200 ms here: that is not told apart.)
        let waitStarted = ContinuousClock.now
        while server.received.isEmpty, ContinuousClock.now - waitStarted < .seconds(10) {
            try await Task.sleep(for: .milliseconds(5))
        }
        let cancelled = ContinuousClock.now
        task.cancel()
        await #expect(throws: CancellationError.self) { _ = try await task.value }
        #expect(ContinuousClock.now - cancelled < .seconds(3))
    }

    @Test func aResponseOverTheLimitFailsTheRequest() async throws {
        let server = try LoopbackServer { connection, _ in
            LoopbackServer.answer(connection, status: "200 OK", body: String(repeating: "x", count: CurlTransport.maximumResponseSize + 1))
        }
        defer { withExtendedLifetime(server) {} }
        await #expect(throws: CurlTransportError.self) {
            _ = try await CurlTransport().send(exchange(server.url))
        }
    }

    @Test func aHeaderWithALineBreakIsNotSent() async throws {
        let server = try LoopbackServer { connection, _ in LoopbackServer.answer(connection, status: "200 OK", body: "{}") }
        defer { withExtendedLifetime(server) {} }
        await #expect(throws: HTTPRequestNotSent.self) {
            _ = try await CurlTransport().send(exchange(server.url, headers: ["X-Injected": "a\r\nX-Other: b"]))
        }
    }
}
