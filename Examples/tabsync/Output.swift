import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A JSON value for the tool's output; objects keep their key order.
enum JSON: Sendable {
    case string(String)
    case int(Int64)
    case bool(Bool)
    case null
    case array([JSON])
    case object([(String, JSON)])

    static func from(_ text: String?) -> JSON { text.map(JSON.string) ?? .null }
    static func from(_ number: Int64?) -> JSON { number.map(JSON.int) ?? .null }
    static func from(_ number: Int?) -> JSON { number.map { .int(Int64($0)) } ?? .null }
    static func from(_ flag: Bool?) -> JSON { flag.map(JSON.bool) ?? .null }
    /// A time as milliseconds since 1970, as `tab` prints them.
    static func time(_ date: Date?) -> JSON { date.map { .int(Int64(($0.timeIntervalSince1970 * 1000).rounded())) } ?? .null }

    /// Compact JSON on one line.
    var encoded: String {
        switch self {
        case let .string(text): Self.quote(text)
        case let .int(number): String(number)
        case let .bool(flag): flag ? "true" : "false"
        case .null: "null"
        case let .array(items): "[" + items.map(\.encoded).joined(separator: ",") + "]"
        case let .object(fields): "{" + fields.map { Self.quote($0.0) + ":" + $0.1.encoded }.joined(separator: ",") + "}"
        }
    }

    /// A JSON string. Besides what JSON requires, DEL, the C1 controls and the characters that
    /// reorder or break lines (U+2028, U+2029, bidirectional controls) are written as `\u` escapes,
    /// so that JSON output read on a terminal cannot drive it either.
    static func quote(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where Display.isUnsafe(scalar):
                out += String(format: "\\u%04x", scalar.value)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}

/// Writes whole lines to standard output, one `write(2)` each, so that lines from concurrent
/// tasks never interleave and a reading process sees each at once.
final class LineOutput: Sendable {
    let json: Bool
    private let lock = Mutex(())

    init(json: Bool) {
        self.json = json
    }

    /// One JSON object per line in JSON mode, the human line otherwise.
    func emit(_ fields: [(String, JSON)], human: @autoclosure () -> String) {
        write(json ? JSON.object(fields).encoded : human())
    }

    func write(_ line: String) {
        let bytes = Array((line + "\n").utf8)
        lock.withLock { _ in
            var done = 0
            while done < bytes.count {
                let written = bytes.withUnsafeBytes { Glibc.write(STDOUT_FILENO, $0.baseAddress! + done, bytes.count - done) }
                if written < 0 {
                    if errno == EINTR { continue }
                    // The reader went away (a closed pipe): nothing more can be said.
                    Glibc.exit(0)
                }
                done += written
            }
        }
    }
}

/// Text for people: whatever came from another process (keys, values, origins, file names,
/// command names) is shown with its control characters and escape sequences escaped, never raw,
/// so that no process can change the terminal's title, move its cursor or print a fake line.
enum Display {
    /// True for the scalars a terminal may act on or that reorder text: C0 and C1 controls, DEL,
    /// the line and paragraph separators and the bidirectional controls.
    static func isUnsafe(_ scalar: Unicode.Scalar) -> Bool {
        switch scalar.value {
        case 0x00..<0x20, 0x7F...0x9F: true
        case 0x061C, 0x200E, 0x200F, 0x2028, 0x2029, 0x202A...0x202E, 0x2066...0x2069: true
        default: false
        }
    }

    /// `text` with every unsafe scalar and the backslash escaped: `\e` for ESC, `\a` for BEL,
    /// `\n`, `\r`, `\t`, `\xHH` for other controls, `\u{HHHH}` for the others, `\\` for `\`.
    /// With `quote`, a `"` is escaped too.
    static func escaped(_ text: String, quote: Bool = false) -> String {
        var out = ""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\\": out += "\\\\"
            case "\"" where quote: out += "\\\""
            case "\u{1B}": out += "\\e"
            case "\u{07}": out += "\\a"
            case "\u{08}": out += "\\b"
            case "\u{0C}": out += "\\f"
            case "\u{0B}": out += "\\v"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "\0": out += "\\0"
            case _ where isUnsafe(scalar):
                out += scalar.value < 0x100 ? String(format: "\\x%02x", scalar.value) : String(format: "\\u{%04x}", scalar.value)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out
    }

    /// A value in double quotes, escaped; `null` for none.
    static func value(_ text: String?) -> String {
        guard let text else { return "null" }
        return "\"" + escaped(text, quote: true) + "\""
    }

    /// A name (key, origin, file name, command): bare when it is plain, quoted and escaped
    /// otherwise (empty, spaces, quotes, `=`, anything escaped).
    static func name(_ text: String?) -> String {
        guard let text else { return "null" }
        let plain = !text.isEmpty && text.unicodeScalars.allSatisfy { scalar in
            !isUnsafe(scalar) && !" \"'\\=".unicodeScalars.contains(scalar) && !scalar.properties.isWhitespace
        }
        return plain ? text : value(text)
    }

    /// A wall-clock time, local time with its offset.
    static func time(_ date: Date) -> String {
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.dateFormat = "yyyy-MM-dd HH:mm:ss.SSS xxx"
        return formatter.string(from: date)
    }

    /// "in 59m 58s" or "3.2 s ago", from now.
    static func relative(_ date: Date, now: Date = Date()) -> String {
        let seconds = date.timeIntervalSince(now)
        return seconds >= 0 ? "in \(span(seconds))" : "\(span(-seconds)) ago"
    }

    static func span(_ seconds: Double) -> String {
        if seconds < 60 { return String(format: "%.1f s", seconds) }
        let whole = Int64(seconds)
        let (days, hours, minutes, rest) = (whole / 86400, whole / 3600 % 24, whole / 60 % 60, whole % 60)
        if days > 0 { return "\(days)d \(hours)h" }
        if hours > 0 { return "\(hours)h \(minutes)m" }
        return "\(minutes)m \(rest)s"
    }

    static func plural(_ count: Int, _ word: String, _ plural: String? = nil) -> String {
        "\(count) \(count == 1 ? word : plural ?? word + "s")"
    }
}

/// Ends the tool with one line on standard error (escaped: it may name a hostile file).
func fail(_ message: String, status: Int32 = 1) -> Never {
    FileHandle.standardError.write(Data("tabsync: \(Display.escaped(message))\n".utf8))
    Glibc.exit(status)
}
