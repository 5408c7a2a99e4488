import ExampleSupport
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Writes whole lines to standard output, one `write` each, so that lines from concurrent
/// tasks never interleave and each is visible to a reading process at once.
final class Output: Sendable {
    let json: Bool
    let name: String
    let colour: Bool
    private let writer = LineWriter()

    init(json: Bool, name: String) {
        self.json = json
        self.name = name
        self.colour = !json && isatty(STDOUT_FILENO) == 1
    }

    /// Prints one protocol object: as JSON, or as a readable line.
    func emit(_ fields: [(String, JSON)]) {
        write(json ? JSON.object(fields).encoded : readable(fields))
    }

    /// A reader that went away (a closed pipe) loses the line; the tab goes on.
    func write(_ line: String) {
        writer.write(line)
    }

    private func readable(_ fields: [(String, JSON)]) -> String {
        let type: String = {
            if case let .string(type)? = fields.first(where: { $0.0 == "type" })?.1 { return type }
            return "?"
        }()
        let rest = fields.filter { $0.0 != "type" }.map { key, value -> String in
            let text: String
            switch value {
            case let .string(string): text = key == "accessToken" ? "<token, \(string.count) characters>" : Self.printable(string)
            case let .int(number): text = key == "expiresAt" ? Self.time(number) : String(number)
            case let .unsigned(number): text = String(number)
            case let .bool(flag): text = flag ? "yes" : "no"
            case .null: text = "-"
            case .object, .array: text = Self.printable(value.encoded)
            }
            return "\(key)=\(text)"
        }.joined(separator: " ")
        let label = colour ? "\u{1B}[1m[\(Self.printable(name))]\u{1B}[0m" : "[\(Self.printable(name))]"
        let colourCode: String = switch type {
        case "error": "31"
        case "session": "36"
        case "storage": "33"
        case "sessionExpiring": "35"
        default: "32"
        }
        let kind = colour ? "\u{1B}[\(colourCode)m\(type)\u{1B}[0m" : type
        return "\(label) \(kind) \(rest)"
    }

    /// Text for a terminal: control characters (C0, DEL, C1) and so every escape sequence are
    /// shown escaped (`\e`, `\n`, `\u{9b}`), never sent raw, so that no value, key or origin
    /// written by another process can move the cursor, retitle the terminal or fake a line.
    static func printable(_ text: String) -> String {
        var out = ""
        for scalar in text.unicodeScalars {
            switch scalar.value {
            case 0x1B: out += "\\e"
            case 0x0A: out += "\\n"
            case 0x0D: out += "\\r"
            case 0x09: out += "\\t"
            case 0x5C: out += "\\\\"
            case 0x00..<0x20, 0x7F..<0xA0, 0x2028, 0x2029: out += "\\u{\(String(scalar.value, radix: 16))}"
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out
    }

    private static func time(_ milliseconds: Int64) -> String {
        let formatter = DateFormatter()
        formatter.dateFormat = "HH:mm:ss.SSS"
        return formatter.string(from: Date(timeIntervalSince1970: Double(milliseconds) / 1000))
    }
}
