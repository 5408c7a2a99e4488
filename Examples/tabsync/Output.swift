import ExampleSupport
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Writes whole lines to standard output, one `write(2)` each, so that lines from concurrent
/// tasks never interleave and a reading process sees each at once.
final class LineOutput: Sendable {
    let json: Bool
    private let writer = LineWriter()

    init(json: Bool) {
        self.json = json
    }

    /// One JSON object per line in JSON mode, the human line otherwise.
    func emit(_ fields: [(String, JSON)], human: @autoclosure () -> String) {
        write(json ? JSON.object(fields).encoded : human())
    }

    func write(_ line: String) {
        // The reader went away (a closed pipe): nothing more can be said.
        if !writer.write(line) { Glibc.exit(0) }
    }
}

/// Text for people: whatever came from another process (keys, values, origins, file names,
/// command names) is shown with its control characters and escape sequences escaped, never raw,
/// so that no process can change the terminal's title, move its cursor or print a fake line.
enum Display {
    /// See ``isTerminalUnsafe(_:)``.
    static func isUnsafe(_ scalar: Unicode.Scalar) -> Bool { isTerminalUnsafe(scalar) }

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
