/// The JSON parameters of the commit statements, written directly: `JSONSerialization` took a
/// seventh of a committing process's time, for three small documents per commit.
enum JSONText {
    /// A JSON string (RFC 8259 §7): quotes, backslashes and control characters escaped.
    static func string(_ value: String?) -> String {
        guard let value else { return "null" }
        var text = "\""
        text.reserveCapacity(value.utf8.count + 2)
        for scalar in value.unicodeScalars {
            switch scalar {
            case "\"": text += "\\\""
            case "\\": text += "\\\\"
            case "\n": text += "\\n"
            case "\r": text += "\\r"
            case "\t": text += "\\t"
            case let control where control.value < 0x20:
                text += "\\u00" + (control.value < 0x10 ? "0" : "") + String(control.value, radix: 16)
            default: text.unicodeScalars.append(scalar)
            }
        }
        return text + "\""
    }

    static func array(_ elements: [String]) -> String {
        "[" + elements.joined(separator: ",") + "]"
    }

    /// An object of string members, in the order given.
    static func object(_ members: [(key: String, value: String)]) -> String {
        "{" + members.map { string($0.key) + ":" + string($0.value) }.joined(separator: ",") + "}"
    }
}
