import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// The demo's standard output: whole lines, one write each, labelled and aligned:
///
///       2.1s  [tab-2]   session signedIn by tab-1 (seq 3)
///
/// Children's lines are printed by their reader threads, the story's by the main thread.
final class Console: @unchecked Sendable {
    enum Tone {
        case plain, sent, event, warning, error
    }

    let colour: Bool
    private let width: Int
    private let labelColours: [String: String]
    private let start = Date()
    private let lock = NSLock()

    /// `labels`: every child name that will appear, for the alignment and the colours.
    init(colour: Bool, labels: [String]) {
        self.colour = colour
        width = (labels + ["demo"]).map { $0.count + 2 }.max() ?? 6
        let palette = ["36", "33", "35", "34", "32", "96", "93", "95", "94", "92"]
        var colours: [String: String] = ["server": "90", "demo": "1"]
        for (index, label) in labels.filter({ $0 != "server" }).enumerated() {
            colours[label] = palette[index % palette.count]
        }
        labelColours = colours
    }

    func paint(_ text: String, _ code: String) -> String {
        colour ? "\u{1B}[\(code)m\(text)\u{1B}[0m" : text
    }

    /// A line from (or to) a child, or from the demo itself with `label` "demo".
    func line(_ label: String, _ text: String, tone: Tone = .plain) {
        let elapsed = String(format: "%6.1fs", Date().timeIntervalSince(start))
        let tag = "[\(label)]"
        let padded = tag + String(repeating: " ", count: max(1, width + 1 - tag.count))
        let body: String = switch tone {
        case .plain: text
        case .sent: paint(text, "2")
        case .event: paint(text, "1")
        case .warning: paint(text, "33")
        case .error: paint(text, "31")
        }
        write(paint(elapsed, "2") + "  " + paint(padded, labelColours[label] ?? "0") + body)
    }

    /// A step heading and what should happen in it.
    func narrate(_ title: String, _ detail: String) {
        write("\n" + paint("=== \(title)", "1;4"))
        for text in detail.split(separator: "\n") {
            write("    " + paint(String(text), "3"))
        }
    }

    func check(_ passed: Bool, _ text: String) {
        let mark = colour ? (passed ? paint("✓", "32") : paint("✗", "1;31")) : (passed ? "ok:" : "FAIL:")
        line("demo", "\(mark) \(passed ? text : paint(text, "31"))")
    }

    func write(_ text: String) {
        lock.withLock {
            try? FileHandle.standardOutput.write(contentsOf: Data((text + "\n").utf8))
        }
    }

    func error(_ text: String) {
        let prefix = isatty(STDERR_FILENO) == 1 && colour ? "\u{1B}[1;31mtabsync-demo:\u{1B}[0m " : "tabsync-demo: "
        lock.withLock {
            try? FileHandle.standardError.write(contentsOf: Data((prefix + text + "\n").utf8))
        }
    }
}

/// How the demo shows a tab's JSON lines to a person. Tokens are shown only as a fingerprint.
enum Describe {
    static func tabLine(_ line: OutputLine) -> (text: String, tone: Console.Tone) {
        guard let object = line.object, let type = object["type"] as? String else {
            return ("(not a protocol line) " + String(line.text.prefix(160)), .error)
        }
        let seq = integer(object["seq"]).map { " (seq \($0))" } ?? ""
        switch type {
        case "ready":
            return ("ready (pid \(integer(object["pid"]).map(String.init) ?? "?"))", .plain)
        case "session":
            let state = object["state"] as? String ?? "?"
            let origin = object["origin"] as? String ?? "?"
            let reason = (object["reason"] as? String).map { ", reason \($0)" } ?? ""
            return ("session \(state) by \(origin)\(reason)\(seq)", .event)
        case "storage":
            let origin = object["origin"] as? String ?? "?"
            guard let key = object["key"] as? String else {
                return ("storage cleared by \(origin)\(seq)", .event)
            }
            return ("storage \(key): \(quote(object["oldValue"])) -> \(quote(object["newValue"])) by \(origin)\(seq)", .event)
        case "ok":
            return ("ok \(object["cmd"] as? String ?? "?")\(seq)", .plain)
        case "value":
            return ("value \(object["key"] as? String ?? "?") = \(quote(object["value"]))", .plain)
        case "token":
            let token = (object["accessToken"] as? String).map(fingerprint) ?? "(none)"
            let refreshed = object["refreshedHere"] as? Bool == true ? ", refreshed here" : ""
            return ("token \(token), \(expiry(object["expiresAt"]))\(refreshed)", .plain)
        case "status":
            let state = object["state"] as? String ?? "?"
            let expires = integer(object["expiresAt"]) == nil ? "" : ", access token \(expiry(object["expiresAt"]))"
            let reason = (object["reason"] as? String).map { ", reason \($0)" } ?? ""
            return ("status \(state)\(expires)\(reason)\(seq)", .plain)
        case "error":
            let command = (object["cmd"] as? String).map { " (reply to \($0))" } ?? ""
            let code = object["code"] as? String ?? "?"
            return ("error\(command) \(code): \(object["message"] as? String ?? "")", .error)
        case "sessionExpiring":
            let reason = object["reason"] as? String ?? "?"
            return ("sessionExpiring: \(reason) in \(integer(object["in"]).map(String.init) ?? "?") s", .warning)
        default:
            return ("\(type): \(redacted(object))", .warning)
        }
    }

    /// "expires in 3.9 s" / "expired 0.2 s ago", from UNIX milliseconds.
    static func expiry(_ value: Any?) -> String {
        guard let milliseconds = integer(value) else { return "no expiry" }
        let remaining = Double(milliseconds - nowMilliseconds()) / 1000
        return remaining >= 0 ? "expires in \(seconds(remaining)) s" : "expired \(seconds(-remaining)) s ago"
    }

    static func quote(_ value: Any?) -> String {
        guard let text = value as? String else { return "null" }
        return "\"" + (text.count > 60 ? text.prefix(60) + "..." : text) + "\""
    }

    /// An unknown line, with any string under a key that mentions "token" replaced by its fingerprint.
    static func redacted(_ object: [String: Any]) -> String {
        object.keys.sorted().map { key -> String in
            let value = object[key]
            if key.lowercased().contains("token"), let text = value as? String { return "\(key)=\(fingerprint(text))" }
            if let text = value as? String { return "\(key)=\(quote(text))" }
            if value is NSNull { return "\(key)=null" }
            if value is [String: Any] { return "\(key)={...}" }
            if value is [Any] { return "\(key)=[...]" }
            return "\(key)=\(value.map { "\($0)" } ?? "null")"
        }.joined(separator: " ")
    }
}
