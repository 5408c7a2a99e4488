import Dispatch
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

#if canImport(Glibc)
import Glibc
#endif

/// Something that stops the story: a child died, or an expected line did not come in time.
struct DemoFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Numbers from JSONSerialization, whichever way the platform boxed them.
func integer(_ value: Any?) -> Int? {
    switch value {
    case let number as Int: number
    case let number as Int64: Int(number)
    case let number as Double: Int(number)
    case let number as NSNumber: number.intValue
    default: nil
    }
}

func nowMilliseconds() -> Int {
    Int(Date().timeIntervalSince1970 * 1000)
}

/// Seconds with one decimal: "4.9".
func seconds(_ value: Double) -> String {
    String(format: "%.1f", value)
}

/// A short fingerprint of a token, so that the demo can show which token a tab got without
/// printing it: FNV-1a (32 bits) of its UTF-8 bytes, as 8 hex digits. Not a security measure,
/// only an identifier; tokens themselves are never printed.
func fingerprint(_ token: String) -> String {
    var hash: UInt32 = 0x811C_9DC5
    for byte in token.utf8 {
        hash ^= UInt32(byte)
        hash = hash &* 0x0100_0193
    }
    let hex = String(hash, radix: 16)
    return "#" + String(repeating: "0", count: 8 - hex.count) + hex
}

/// The sibling binaries: `tab` and `devtoken-server` next to this executable.
enum Binaries {
    static var ownDirectory: String {
        let executable = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
            ?? CommandLine.arguments[0]
        return URL(fileURLWithPath: executable).deletingLastPathComponent().path
    }

    /// `explicit` when given, else `name` next to this executable; it must be executable.
    static func locate(_ name: String, explicit: String?, option: String) throws(DemoFailure) -> String {
        if let explicit {
            guard FileManager.default.isExecutableFile(atPath: explicit) else {
                throw DemoFailure("\(option) \(explicit): not an executable file")
            }
            return explicit
        }
        let path = ownDirectory + "/" + name
        guard FileManager.default.isExecutableFile(atPath: path) else {
            throw DemoFailure(
                "cannot find \(name) next to tabsync-demo (looked for \(path)); build it with "
                    + "`swift build --product \(name)` (scripts/demo builds everything) or pass \(option) PATH")
        }
        return path
    }
}

/// A fresh private directory for the session: mode 0700, under the temporary directory.
func makeSessionDirectory() throws(DemoFailure) -> String {
    let base = URL(fileURLWithPath: NSTemporaryDirectory()).resolvingSymlinksInPath().path
    var template = Array((base + "/tabsync-demo.XXXXXX").utf8CString)
    let made = template.withUnsafeMutableBufferPointer { buffer in mkdtemp(buffer.baseAddress!) != nil }
    guard made else {
        throw DemoFailure("cannot create a session directory in \(base): \(String(cString: strerror(errno)))")
    }
    let path = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    guard chmod(path, 0o700) == 0 else {
        throw DemoFailure("cannot set mode 0700 on \(path): \(String(cString: strerror(errno)))")
    }
    return path
}

/// Blocking HTTP for the token server's demo endpoints (`/stats`, `/admin/revoke-all`).
enum HTTP {
    private final class Box: @unchecked Sendable {
        var result: Result<(Int, Data), any Error>?
    }

    static func request(_ method: String, _ url: URL, timeout: Double) throws(DemoFailure) -> (status: Int, body: Data) {
        var request = URLRequest(url: url, timeoutInterval: timeout)
        request.httpMethod = method
        let box = Box()
        let done = DispatchSemaphore(value: 0)
        let task = URLSession.shared.dataTask(with: request) { data, response, error in
            if let error {
                box.result = .failure(error)
            } else {
                box.result = .success(((response as? HTTPURLResponse)?.statusCode ?? 0, data ?? Data()))
            }
            done.signal()
        }
        task.resume()
        if done.wait(timeout: .now() + timeout + 1) == .timedOut {
            task.cancel()
            throw DemoFailure("\(method) \(url.path): no answer from the token server within \(seconds(timeout)) s")
        }
        switch box.result {
        case let .success(answer)?:
            return answer
        case let .failure(error)?:
            throw DemoFailure("\(method) \(url.path) failed: \(error.localizedDescription)")
        case nil:
            throw DemoFailure("\(method) \(url.path): no answer")
        }
    }

    /// The JSON object a 200 answer carries.
    static func json(_ method: String, _ url: URL, timeout: Double) throws(DemoFailure) -> [String: Any] {
        let (status, body) = try request(method, url, timeout: timeout)
        guard status == 200 else {
            throw DemoFailure("\(method) \(url.path) answered HTTP \(status)")
        }
        guard let object = (try? JSONSerialization.jsonObject(with: body)) as? [String: Any] else {
            throw DemoFailure("\(method) \(url.path) answered something that is not a JSON object")
        }
        return object
    }
}
