import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A JSON value for one line of output (`tab`'s protocol, `tabsync --json`); objects keep their
/// key order.
public enum JSON: Sendable {
    case string(String)
    case int(Int64)
    /// A sequence number: unsigned, since a planted log may count up to 2^64 - 1.
    case unsigned(UInt64)
    case bool(Bool)
    case null
    case array([JSON])
    case object([(String, JSON)])

    public static func from(_ text: String?) -> JSON { text.map(JSON.string) ?? .null }
    public static func from(_ number: Int64?) -> JSON { number.map(JSON.int) ?? .null }
    public static func from(_ number: Int?) -> JSON { number.map { .int(Int64($0)) } ?? .null }
    public static func from(_ flag: Bool?) -> JSON { flag.map(JSON.bool) ?? .null }
    /// A time as milliseconds since 1970, as `tab` prints them.
    public static func time(_ date: Date?) -> JSON { date.map { .int(Int64(($0.timeIntervalSince1970 * 1000).rounded())) } ?? .null }

    /// Compact JSON on one line.
    public var encoded: String {
        switch self {
        case let .string(text): Self.quote(text)
        case let .int(number): String(number)
        case let .unsigned(number): String(number)
        case let .bool(flag): flag ? "true" : "false"
        case .null: "null"
        case let .array(items): "[" + items.map(\.encoded).joined(separator: ",") + "]"
        case let .object(fields): "{" + fields.map { Self.quote($0.0) + ":" + $0.1.encoded }.joined(separator: ",") + "}"
        }
    }

    /// A JSON string. Besides what JSON requires, DEL, the C1 controls and the characters that
    /// reorder or break lines (U+2028, U+2029, bidirectional controls) are written as `\u` escapes,
    /// so that JSON output read on a terminal cannot drive it either.
    public static func quote(_ text: String) -> String {
        // Most strings (tokens, names, keys) are printable ASCII without a quote or backslash:
        // they are written as they are, without a look at each scalar.
        if text.utf8.allSatisfy({ $0 >= 0x20 && $0 < 0x7F && $0 != UInt8(ascii: "\"") && $0 != UInt8(ascii: "\\") }) {
            return "\"" + text + "\""
        }
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where isTerminalUnsafe(scalar):
                out += String(format: "\\u%04x", scalar.value)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}

/// True for the scalars a terminal may act on or that reorder text: C0 and C1 controls, DEL,
/// the line and paragraph separators and the bidirectional controls.
public func isTerminalUnsafe(_ scalar: Unicode.Scalar) -> Bool {
    switch scalar.value {
    case 0x00..<0x20, 0x7F...0x9F: true
    case 0x061C, 0x200E, 0x200F, 0x2028, 0x2029, 0x202A...0x202E, 0x2066...0x2069: true
    default: false
    }
}

/// Writes whole lines to standard output, one `write(2)` each, so that lines from concurrent
/// tasks never interleave and a reading process sees each at once.
public final class LineWriter: Sendable {
    private let lock = Mutex(())

    public init() {}

    /// Writes `line` and a newline. Returns false when the reader went away (a closed pipe).
    @discardableResult
    public func write(_ line: String) -> Bool {
        let bytes = Array((line + "\n").utf8)
        return lock.withLock { _ in
            var done = 0
            while done < bytes.count {
                let written = bytes.withUnsafeBytes { Glibc.write(STDOUT_FILENO, $0.baseAddress! + done, bytes.count - done) }
                if written < 0 {
                    if errno == EINTR { continue }
                    return false
                }
                done += written
            }
            return true
        }
    }
}
