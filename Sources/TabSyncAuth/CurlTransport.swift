import CCurl
import Foundation
import Synchronization

/// HTTP through libcurl directly: the default transport of ``OAuthClient``.
///
/// URLSession on Linux runs on libcurl too, but its layers cost a process 4 to 6 ms of CPU for
/// its first request and about 1.2 ms for each one after; libcurl's own interface costs about
/// 0.4 ms and 0.2 ms. In a refresh storm the refresher's request is on every process's critical
/// path, so this is the transport that ``OAuthClient`` uses unless given another.
///
/// Each request runs on a thread of its own (never on a Swift concurrency thread) and:
/// - uses a fresh connection, closed afterwards: libcurl sends a request again, unasked, when a
///   reused connection turns out to have been closed, and a refresh token is never presented twice;
/// - speaks only HTTP and HTTPS, follows no redirect, and uses no proxy for plain HTTP (which
///   ``OAuthConfiguration`` allows only to loopback addresses); HTTPS honours the usual
///   `https_proxy` and `no_proxy` variables;
/// - ends within the request's timeout, and at once when its task is cancelled;
/// - keeps at most ``maximumResponseSize`` bytes of a response.
///
/// It throws ``HTTPRequestNotSent`` when libcurl never got to sending the request (no connection,
/// a name that does not resolve, a failed TLS handshake, cancelled before), and
/// ``CurlTransportError`` for any other failure, after which the server may have acted.
public struct CurlTransport: HTTPTransport {
    /// The longest response body a request accepts (1 MiB); a longer one fails it.
    public static let maximumResponseSize = 1 << 20

    /// libcurl's global set-up (TLS included), once per process: done when the first transport
    /// is made, so that the first request does not pay for it. Thread-safe since libcurl 7.84.
    private static let initialized: Bool = curl_global_init(Int(CURL_GLOBAL_DEFAULT)) == CURLE_OK

    public init() {
        _ = Self.initialized
    }

    public func send(_ request: HTTPExchange) async throws -> (status: Int, body: Data) {
        guard Self.initialized else { throw HTTPRequestNotSent(reason: "libcurl could not be initialised") }
        let transfer = try CurlTransfer(request)
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { continuation in
                let thread = Thread { continuation.resume(with: transfer.run()) }
                thread.name = "TabSync.http"
                thread.start()
            }
        } onCancel: {
            transfer.cancel()
        }
    }
}

/// A request that failed after libcurl may have sent it: the server may have acted on it.
public struct CurlTransportError: Error, Sendable, LocalizedError, CustomStringConvertible {
    /// libcurl's `CURLcode`.
    public var code: Int
    public var message: String

    public var description: String { message }
    public var errorDescription: String? { message }
}

/// One request: its easy handle in a multi handle of its own, so that a cancellation can wake
/// the thread that waits in `curl_multi_poll`.
///
/// The handles are used only by the thread in ``run()``, except for `curl_multi_wakeup`, which
/// libcurl allows from any thread; they are freed in `deinit`, after both are done with them.
private final class CurlTransfer: @unchecked Sendable {
    private let easy: UnsafeMutableRawPointer
    private let multi: UnsafeMutableRawPointer
    private var headers: UnsafeMutablePointer<curl_slist>?
    private let errorText: UnsafeMutablePointer<CChar>
    private let body = ResponseBody()
    private let cancelled = Atomic(false)

    init(_ request: HTTPExchange) throws {
        guard let easy = curl_easy_init() else { throw HTTPRequestNotSent(reason: "libcurl could not create a request") }
        guard let multi = curl_multi_init() else {
            curl_easy_cleanup(easy)
            throw HTTPRequestNotSent(reason: "libcurl could not create a request")
        }
        self.easy = easy
        self.multi = multi
        errorText = .allocate(capacity: Int(CURL_ERROR_SIZE) + 1)
        errorText.initialize(repeating: 0, count: Int(CURL_ERROR_SIZE) + 1)
        // From here on a failure frees the handles in `deinit`.
        try configure(request)
        guard curl_multi_add_handle(multi, easy) == CURLM_OK else {
            throw HTTPRequestNotSent(reason: "libcurl could not start the request")
        }
    }

    deinit {
        curl_multi_remove_handle(multi, easy)
        curl_easy_cleanup(easy)
        curl_multi_cleanup(multi)
        curl_slist_free_all(headers)
        errorText.deallocate()
    }

    private func configure(_ request: HTTPExchange) throws {
        func check(_ code: CURLcode, _ what: String) throws {
            guard code == CURLE_OK else {
                throw HTTPRequestNotSent(reason: "libcurl refused the request's \(what): \(String(cString: curl_easy_strerror(code)))")
            }
        }
        let milliseconds = max(1, Int(request.timeout / .milliseconds(1)))
        let url = request.url.absoluteString
        try check(tabsync_curl_set_string(easy, CURLOPT_URL, url), "URL")
        try check(tabsync_curl_allow_http_only(easy), "protocols")
        try check(tabsync_curl_set_long(easy, CURLOPT_NOSIGNAL, 1), "signal handling")
        try check(tabsync_curl_set_long(easy, CURLOPT_FRESH_CONNECT, 1), "connection")
        try check(tabsync_curl_set_long(easy, CURLOPT_FORBID_REUSE, 1), "connection")
        try check(tabsync_curl_set_long(easy, CURLOPT_TIMEOUT_MS, milliseconds), "timeout")
        try check(tabsync_curl_set_long(easy, CURLOPT_CONNECTTIMEOUT_MS, milliseconds), "timeout")
        try check(tabsync_curl_set_pointer(easy, CURLOPT_ERRORBUFFER, errorText), "error buffer")
        try check(tabsync_curl_set_string(easy, CURLOPT_USERAGENT, "TabSync"), "user agent")
        if request.url.scheme?.lowercased() == "http" {
            try check(tabsync_curl_set_string(easy, CURLOPT_PROXY, ""), "proxy")
        }
        switch request.method {
        case "GET" where request.body.isEmpty:
            try check(tabsync_curl_set_long(easy, CURLOPT_HTTPGET, 1), "method")
        default:
            // COPYPOSTFIELDS copies the body, of the size set just before.
            try check(tabsync_curl_set_size(easy, CURLOPT_POSTFIELDSIZE_LARGE, curl_off_t(request.body.count)), "body")
            if request.body.isEmpty {
                try check(tabsync_curl_set_string(easy, CURLOPT_COPYPOSTFIELDS, ""), "body")
            } else {
                try request.body.withUnsafeBytes { bytes throws in
                    try check(tabsync_curl_set_pointer(easy, CURLOPT_COPYPOSTFIELDS, UnsafeMutableRawPointer(mutating: bytes.baseAddress)), "body")
                }
            }
            if request.method != "POST" {
                try check(tabsync_curl_set_string(easy, CURLOPT_CUSTOMREQUEST, request.method), "method")
            }
        }
        // "Expect:" keeps libcurl from waiting for a 100 Continue before a body over 1 KiB.
        for line in request.headers.sorted(by: { $0.key < $1.key }).map({ "\($0.key): \($0.value)" }) + ["Expect:"] {
            // Bytes, not Characters: "\r\n" is one Character, equal to neither "\r" nor "\n".
            guard !line.utf8.contains(where: { $0 == 0x0D || $0 == 0x0A || $0 == 0 }) else {
                throw HTTPRequestNotSent(reason: "a request header contains a line break")
            }
            guard let appended = curl_slist_append(headers, line) else { throw HTTPRequestNotSent(reason: "out of memory") }
            headers = appended
        }
        try check(tabsync_curl_set_headers(easy, headers), "headers")
        try check(tabsync_curl_set_write(easy, receiveBody, Unmanaged.passUnretained(body).toOpaque()), "body handler")
    }

    /// Wakes ``run()`` to end the request.
    func cancel() {
        cancelled.store(true, ordering: .releasing)
        curl_multi_wakeup(multi)
    }

    /// Carries out the request, blocking the calling thread until it ends.
    func run() -> Result<(status: Int, body: Data), any Error> {
        func multiFailure(_ code: CURLMcode) -> Result<(status: Int, body: Data), any Error> {
            .failure(failure(message: String(cString: curl_multi_strerror(code)), code: -Int(code.rawValue)))
        }
        var running: Int32 = 1
        while !cancelled.load(ordering: .acquiring) {
            let code = curl_multi_perform(multi, &running)
            guard code == CURLM_OK else { return multiFailure(code) }
            if running == 0 { break }
            // Returns on activity of the connection, at libcurl's next timeout (the request's
            // timeout included), or when `cancel()` wakes it.
            let polled = curl_multi_poll(multi, nil, 0, 1000, nil)
            guard polled == CURLM_OK else { return multiFailure(polled) }
        }
        if running != 0 {
            return .failure(neverSent ? HTTPRequestNotSent(reason: "cancelled before it was sent") : CancellationError())
        }
        var result = CURLE_OK
        var remaining: Int32 = 0
        while let message = curl_multi_info_read(multi, &remaining) {
            let done = tabsync_curl_done_result(message)
            if done >= 0 { result = CURLcode(UInt32(done)) }
        }
        guard result == CURLE_OK else {
            if body.tooLarge {
                return .failure(CurlTransportError(code: Int(result.rawValue), message: "the response was larger than \(CurlTransport.maximumResponseSize) bytes"))
            }
            let detail = String(cString: errorText)
            return .failure(failure(message: detail.isEmpty ? String(cString: curl_easy_strerror(result)) : detail, code: Int(result.rawValue)))
        }
        let status = tabsync_curl_info_long(easy, CURLINFO_RESPONSE_CODE)
        return .success((Int(status), Data(body.bytes)))
    }

    /// Whether libcurl never got to sending the request: it was not ready to transfer, and
    /// wrote no byte of it.
    private var neverSent: Bool {
        tabsync_curl_info_off(easy, CURLINFO_PRETRANSFER_TIME_T) == 0 && tabsync_curl_info_long(easy, CURLINFO_REQUEST_SIZE) == 0
    }

    private func failure(message: String, code: Int) -> any Error {
        neverSent ? HTTPRequestNotSent(reason: message) : CurlTransportError(code: code, message: message)
    }
}

/// The response body as it arrives, up to ``CurlTransport/maximumResponseSize``.
private final class ResponseBody {
    var bytes: [UInt8] = []
    var tooLarge = false
}

/// libcurl's write callback: appends to the ``ResponseBody`` it was given; returning less than
/// it was handed ends the transfer with `CURLE_WRITE_ERROR`.
private let receiveBody: tabsync_curl_write_callback = { data, size, count, context in
    guard let context else { return 0 }
    let body = Unmanaged<ResponseBody>.fromOpaque(context).takeUnretainedValue()
    let length = size * count
    guard body.bytes.count + length <= CurlTransport.maximumResponseSize else {
        body.tooLarge = true
        return 0
    }
    if let data, length > 0 { body.bytes.append(contentsOf: UnsafeRawBufferPointer(start: data, count: length)) }
    return length
}
