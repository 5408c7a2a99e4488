/// The session record's JSON text (docs/FORMAT.md, "The session record"), written and read by
/// hand rather than through `Codable`.
///
/// Every process decodes the record on every change to the session, and during a refresh storm
/// that is a cold path in each of them: `JSONDecoder` spent most of its time there instantiating
/// its generic containers for the record's types (a run-time scan of every protocol conformance
/// in the process, once per type and process), a third of a `tab`'s CPU in the storm. The text
/// is the same as `JSONEncoder` with sorted keys wrote: an object whose absent optionals are
/// left out; `state`, `generation`, `failures` and `eventSerial` are required; keys it does not
/// know are skipped, so a newer writer's additions do not make the record unreadable.
extension SessionRecord {
    /// The record's JSON text, keys sorted.
    func encoded() -> String {
        var writer = JSONObjectWriter()
        writer.integer("absoluteTimeout", absoluteTimeout)
        writer.string("accessToken", accessToken)
        writer.integer("backoffUntil", backoffUntil)
        writer.string("event", event?.rawValue)
        writer.string("eventOrigin", eventOrigin)
        writer.integer("eventSerial", Int64(eventSerial))
        writer.integer("expiresAt", expiresAt)
        writer.integer("failures", Int64(failures))
        writer.integer("generation", Int64(generation))
        writer.integer("idleTimeout", idleTimeout)
        writer.integer("issuedAt", issuedAt)
        writer.integer("lastActivity", lastActivity)
        writer.string("reason", reason?.rawValue)
        writer.string("refreshToken", refreshToken)
        if let refreshing {
            var inner = JSONObjectWriter()
            inner.integer("generation", Int64(refreshing.generation))
            inner.string("origin", refreshing.origin)
            inner.integer("pid", Int64(refreshing.pid))
            inner.integer("startedAt", refreshing.startedAt)
            writer.raw("refreshing", inner.finished())
        }
        writer.integer("startedAt", startedAt)
        writer.string("state", state.rawValue)
        writer.integer("warningLead", warningLead)
        return writer.finished()
    }

    /// The record in `text`, or nil when it is not a record's JSON (before the range checks of
    /// ``problem``).
    static func parse(_ text: String) -> SessionRecord? {
        var text = text
        return text.withUTF8 { bytes in
            var reader = JSONReader(bytes)
            guard let record = try? reader.record(), reader.atEnd() else { return nil }
            return record
        }
    }
}

/// Builds one JSON object, in the order its members are added.
private struct JSONObjectWriter {
    private var text = "{"

    mutating func integer(_ key: String, _ value: Int64?) {
        guard let value else { return }
        member(key)
        text += String(value)
    }

    mutating func string(_ key: String, _ value: String?) {
        guard let value else { return }
        member(key)
        Self.quote(value, into: &text)
    }

    mutating func raw(_ key: String, _ json: String) {
        member(key)
        text += json
    }

    mutating func finished() -> String { text + "}" }

    private mutating func member(_ key: String) {
        if text.utf8.count > 1 { text += "," }
        Self.quote(key, into: &text)
        text += ":"
    }

    /// A JSON string, escaped as `JSONEncoder` does (including `/`).
    private static func quote(_ value: String, into text: inout String) {
        text += "\""
        var plainStart = value.utf8.startIndex
        var index = plainStart
        let utf8 = value.utf8
        func flush(upTo end: String.Index) {
            if plainStart < end { text += value[plainStart..<end] }
        }
        while index < utf8.endIndex {
            let byte = utf8[index]
            let escape: String? = switch byte {
            case UInt8(ascii: "\""): "\\\""
            case UInt8(ascii: "\\"): "\\\\"
            case UInt8(ascii: "/"): "\\/"
            case 0x0A: "\\n"
            case 0x0D: "\\r"
            case 0x09: "\\t"
            case 0x08: "\\b"
            case 0x0C: "\\f"
            case 0..<0x20: "\\u00" + (byte < 0x10 ? "0" : "") + String(byte, radix: 16)
            default: nil
            }
            if let escape {
                flush(upTo: index)
                text += escape
                plainStart = utf8.index(after: index)
            }
            index = utf8.index(after: index)
        }
        flush(upTo: utf8.endIndex)
        text += "\""
    }
}

/// Reads JSON (RFC 8259) from UTF-8 bytes: the session record (objects, strings, integers,
/// `null`, and any other value skipped where a key is unknown), and for ``FlatJSON`` the
/// members of the token endpoint's answers.
struct JSONReader {
    struct Invalid: Error {}

    private let bytes: UnsafeBufferPointer<UInt8>
    private var index = 0
    /// Nesting of skipped values, bounded so that a hostile record cannot exhaust the stack.
    private var depth = 0

    init(_ bytes: UnsafeBufferPointer<UInt8>) { self.bytes = bytes }

    mutating func atEnd() -> Bool {
        skipSpace()
        return index == bytes.count
    }

    mutating func record() throws(Invalid) -> SessionRecord {
        var record = SessionRecord()
        var seen = Set<String>()
        try members { (key: String, reader: inout JSONReader) throws(Invalid) in
            seen.insert(key)
            switch key {
            case "state":
                guard let state = try SessionRecord.State(rawValue: reader.string()) else { throw Invalid() }
                record.state = state
            case "accessToken": record.accessToken = try reader.optional { (r: inout JSONReader) throws(Invalid) in try r.string() }
            case "refreshToken": record.refreshToken = try reader.optional { (r: inout JSONReader) throws(Invalid) in try r.string() }
            case "expiresAt": record.expiresAt = try reader.optionalInteger()
            case "issuedAt": record.issuedAt = try reader.optionalInteger()
            case "startedAt": record.startedAt = try reader.optionalInteger()
            case "lastActivity": record.lastActivity = try reader.optionalInteger()
            case "idleTimeout": record.idleTimeout = try reader.optionalInteger()
            case "absoluteTimeout": record.absoluteTimeout = try reader.optionalInteger()
            case "warningLead": record.warningLead = try reader.optionalInteger()
            case "generation": record.generation = try Int(reader.integer())
            case "failures": record.failures = try Int(reader.integer())
            case "eventSerial": record.eventSerial = try Int(reader.integer())
            case "backoffUntil": record.backoffUntil = try reader.optionalInteger()
            case "eventOrigin": record.eventOrigin = try reader.optional { (r: inout JSONReader) throws(Invalid) in try r.string() }
            case "reason":
                record.reason = try reader.optional { (r: inout JSONReader) throws(Invalid) -> SignOutReason in
                    guard let reason = try SignOutReason(rawValue: r.string()) else { throw Invalid() }
                    return reason
                }
            case "event":
                record.event = try reader.optional { (r: inout JSONReader) throws(Invalid) -> SessionRecord.EventKind in
                    guard let kind = try SessionRecord.EventKind(rawValue: r.string()) else { throw Invalid() }
                    return kind
                }
            case "refreshing":
                record.refreshing = try reader.optional { (r: inout JSONReader) throws(Invalid) in try r.refreshing() }
            default:
                try reader.skipValue()
            }
        }
        guard seen.isSuperset(of: ["state", "generation", "failures", "eventSerial"]) else { throw Invalid() }
        return record
    }

    private mutating func refreshing() throws(Invalid) -> SessionRecord.Refreshing {
        var generation: Int?, pid: Int32?, origin: String?, startedAt: Int64?
        try members { (key: String, reader: inout JSONReader) throws(Invalid) in
            switch key {
            case "generation": generation = try Int(reader.integer())
            case "pid":
                guard let value = try Int32(exactly: reader.integer()) else { throw Invalid() }
                pid = value
            case "origin": origin = try reader.string()
            case "startedAt": startedAt = try reader.integer()
            default: try reader.skipValue()
            }
        }
        guard let generation, let pid, let origin, let startedAt else { throw Invalid() }
        return SessionRecord.Refreshing(generation: generation, pid: pid, origin: origin, startedAt: startedAt)
    }

    /// The whole input as one object (whitespace before it allowed), calling `body` for each
    /// member with the reader at the member's value; see ``atEnd()`` for what may follow.
    mutating func object(_ body: (String, inout JSONReader) throws(Invalid) -> Void) throws(Invalid) {
        skipSpace()
        try members(body)
    }

    /// A member's value for ``FlatJSON``: a string, a number, null, or any other value skipped.
    mutating func flatValue() throws(Invalid) -> FlatJSON.Value {
        guard let first = peek() else { throw Invalid() }
        switch first {
        case UInt8(ascii: "\""):
            return .string(try string())
        case UInt8(ascii: "n"):
            try literal("null")
            return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            return .number(try number())
        default:
            try skipValue()
            return .other
        }
    }

    /// Calls `body` for each member of an object, with the reader at the member's value.
    private mutating func members(_ body: (String, inout JSONReader) throws(Invalid) -> Void) throws(Invalid) {
        try expect(UInt8(ascii: "{"))
        skipSpace()
        if peek() == UInt8(ascii: "}") {
            index += 1
            return
        }
        while true {
            skipSpace()
            let key = try string()
            skipSpace()
            try expect(UInt8(ascii: ":"))
            skipSpace()
            try body(key, &self)
            skipSpace()
            guard let next = peek() else { throw Invalid() }
            index += 1
            if next == UInt8(ascii: "}") { return }
            guard next == UInt8(ascii: ",") else { throw Invalid() }
        }
    }

    private mutating func optional<Value>(_ value: (inout JSONReader) throws(Invalid) -> Value) throws(Invalid) -> Value? {
        if try null() { return nil }
        return try value(&self)
    }

    private mutating func optionalInteger() throws(Invalid) -> Int64? {
        try optional { (r: inout JSONReader) throws(Invalid) in try r.integer() }
    }

    private mutating func null() throws(Invalid) -> Bool {
        guard peek() == UInt8(ascii: "n") else { return false }
        try literal("null")
        return true
    }

    /// A JSON number that is an integer within Int64 (no fraction, no exponent).
    private mutating func integer() throws(Invalid) -> Int64 {
        let negative = peek() == UInt8(ascii: "-")
        if negative { index += 1 }
        let start = index
        var value: Int64 = 0
        while let byte = peek(), (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) {
            let digit = Int64(byte - UInt8(ascii: "0"))
            let (times, overflow) = value.multipliedReportingOverflow(by: 10)
            let (sum, overflow2) = negative ? times.subtractingReportingOverflow(digit) : times.addingReportingOverflow(digit)
            guard !overflow, !overflow2 else { throw Invalid() }
            value = sum
            index += 1
        }
        // At least one digit, no leading zero, and not followed by a fraction or an exponent.
        guard index > start, index - start == 1 || bytes[start] != UInt8(ascii: "0") else { throw Invalid() }
        if let next = peek(), [UInt8(ascii: "."), UInt8(ascii: "e"), UInt8(ascii: "E")].contains(next) { throw Invalid() }
        return value
    }

    private mutating func string() throws(Invalid) -> String {
        try expect(UInt8(ascii: "\""))
        let start = index
        // Most strings have no escapes: they are taken as they stand.
        while let byte = peek(), byte != UInt8(ascii: "\""), byte != UInt8(ascii: "\\") {
            guard byte >= 0x20 else { throw Invalid() }
            index += 1
        }
        guard let stop = peek() else { throw Invalid() }
        guard let plain = String(validating: UnsafeBufferPointer(rebasing: bytes[start..<index]), as: UTF8.self) else { throw Invalid() }
        if stop == UInt8(ascii: "\"") {
            index += 1
            return plain
        }
        var text = plain
        var pending: [UInt8] = []
        func flushPending() throws(Invalid) {
            guard !pending.isEmpty else { return }
            guard let part = String(validating: pending, as: UTF8.self) else { throw Invalid() }
            text += part
            pending.removeAll(keepingCapacity: true)
        }
        while true {
            guard let byte = peek() else { throw Invalid() }
            index += 1
            switch byte {
            case UInt8(ascii: "\""):
                try flushPending()
                return text
            case UInt8(ascii: "\\"):
                try flushPending()
                guard let escaped = peek() else { throw Invalid() }
                index += 1
                switch escaped {
                case UInt8(ascii: "\""): text += "\""
                case UInt8(ascii: "\\"): text += "\\"
                case UInt8(ascii: "/"): text += "/"
                case UInt8(ascii: "b"): text += "\u{08}"
                case UInt8(ascii: "f"): text += "\u{0C}"
                case UInt8(ascii: "n"): text += "\n"
                case UInt8(ascii: "r"): text += "\r"
                case UInt8(ascii: "t"): text += "\t"
                case UInt8(ascii: "u"):
                    var scalar = try hex4()
                    if (0xD800..<0xDC00).contains(scalar) {
                        // A high surrogate must be followed by an escaped low one.
                        try expect(UInt8(ascii: "\\"))
                        try expect(UInt8(ascii: "u"))
                        let low = try hex4()
                        guard (0xDC00..<0xE000).contains(low) else { throw Invalid() }
                        scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                    }
                    guard let unicode = Unicode.Scalar(scalar) else { throw Invalid() }
                    text.unicodeScalars.append(unicode)
                default:
                    throw Invalid()
                }
            case 0..<0x20:
                throw Invalid()
            default:
                pending.append(byte)
            }
        }
    }

    private mutating func hex4() throws(Invalid) -> UInt32 {
        guard index + 4 <= bytes.count else { throw Invalid() }
        var value: UInt32 = 0
        for _ in 0..<4 {
            let byte = bytes[index]
            let digit: UInt8 = switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): byte - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): byte - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): byte - UInt8(ascii: "A") + 10
            default: throw Invalid()
            }
            value = value << 4 | UInt32(digit)
            index += 1
        }
        return value
    }

    /// Any JSON value, for a key this version does not know.
    private mutating func skipValue() throws(Invalid) {
        depth += 1
        defer { depth -= 1 }
        guard depth <= 64, let first = peek() else { throw Invalid() }
        switch first {
        case UInt8(ascii: "{"):
            try members { (_: String, reader: inout JSONReader) throws(Invalid) in try reader.skipValue() }
        case UInt8(ascii: "["):
            index += 1
            skipSpace()
            if peek() == UInt8(ascii: "]") {
                index += 1
                return
            }
            while true {
                skipSpace()
                try skipValue()
                skipSpace()
                guard let next = peek() else { throw Invalid() }
                index += 1
                if next == UInt8(ascii: "]") { return }
                guard next == UInt8(ascii: ",") else { throw Invalid() }
            }
        case UInt8(ascii: "\""): _ = try string()
        case UInt8(ascii: "t"): try literal("true")
        case UInt8(ascii: "f"): try literal("false")
        case UInt8(ascii: "n"): try literal("null")
        default: try skipNumber()
        }
    }

    private mutating func skipNumber() throws(Invalid) {
        _ = try number()
    }

    /// A JSON number of any form (RFC 8259 §6) within the range of a Double, as `JSONSerialization`
    /// reads numbers (`1e400` is refused, not read as infinity).
    private mutating func number() throws(Invalid) -> Double {
        let start = index
        try scanNumber()
        guard let value = Double(String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<index]), as: UTF8.self)), value.isFinite else {
            throw Invalid()
        }
        return value
    }

    private mutating func scanNumber() throws(Invalid) {
        func digits() throws(Invalid) {
            let start = index
            while let byte = peek(), (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) { index += 1 }
            guard index > start else { throw Invalid() }
        }
        if peek() == UInt8(ascii: "-") { index += 1 }
        if peek() == UInt8(ascii: "0") { index += 1 } else { try digits() }
        if peek() == UInt8(ascii: ".") {
            index += 1
            try digits()
        }
        if peek() == UInt8(ascii: "e") || peek() == UInt8(ascii: "E") {
            index += 1
            if peek() == UInt8(ascii: "+") || peek() == UInt8(ascii: "-") { index += 1 }
            try digits()
        }
    }

    private mutating func literal(_ word: StaticString) throws(Invalid) {
        let count = word.utf8CodeUnitCount
        guard index + count <= bytes.count else { throw Invalid() }
        for offset in 0..<count where bytes[index + offset] != word.utf8Start[offset] { throw Invalid() }
        index += count
    }

    private mutating func expect(_ byte: UInt8) throws(Invalid) {
        guard peek() == byte else { throw Invalid() }
        index += 1
    }

    private func peek() -> UInt8? { index < bytes.count ? bytes[index] : nil }

    private mutating func skipSpace() {
        while let byte = peek(), byte == 0x20 || byte == 0x0A || byte == 0x0D || byte == 0x09 { index += 1 }
    }
}
