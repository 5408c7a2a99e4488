#if canImport(Glibc)
import Glibc
#endif

/// The JSON body of a state file (docs/FORMAT.md section 2), written and read by hand.
///
/// Every commit writes, and every reader reads, the whole document with its journal (about
/// 80 KB when the journal is full), so this is the hot path of every change. `JSONEncoder` and
/// `JSONDecoder` spent milliseconds on it (Benchmarks/README.md); this codec works on bytes and
/// knows the schema. It accepts any JSON that the format allows (whitespace, escapes, keys in
/// any order, unknown keys, which it skips) and rejects everything else with the byte offset
/// of the problem. `StateDocument` stays `Codable` for applications; the two agree, which
/// StateBodyTests checks.
enum StateBody {
    struct Problem: Error, Equatable {
        let offset: Int
        let message: String
    }

    /// How deep unknown values may nest before the body counts as hostile.
    static let maximumDepth = 64

    /// The journal entries of the last body written or read, with their bytes. Consecutive
    /// states share almost their whole journal, and an entry's bytes are a complete JSON object,
    /// which always reads as the same entry: so the next encode copies the bytes of every entry
    /// that did not change, and the next decode takes the entry of every object whose bytes are
    /// the same, without reading it again. Only the new entries (and the values) cost work.
    struct Memo: Sendable {
        /// The header line of the file these entries are from: the file is told apart by it.
        var header: [UInt8] = []
        /// The bytes the spans point into.
        var bytes: [UInt8] = []
        var entries: [JournalEntry] = []
        /// Where each entry's object is in `bytes`.
        var spans: [Range<Int>] = []

        /// The index of the entry with this sequence number (the journal's are consecutive).
        func index(of sequence: UInt64) -> Int? {
            guard let first = entries.first?.sequence, sequence >= first, sequence - first < UInt64(entries.count) else { return nil }
            let index = Int(sequence - first)
            return entries[index].sequence == sequence ? index : nil
        }
    }

    // MARK: Writing

    /// Compact JSON with sorted keys, `/` and non-ASCII characters unescaped, nulls written out
    /// in journal entries, `recovery` omitted when absent: the layout `JSONEncoder` produced with
    /// `[.sortedKeys, .withoutEscapingSlashes]`.
    static func encode(_ document: StateDocument) -> [UInt8] {
        var memo = Memo()
        return encode(document, memo: &memo)
    }

    /// `memo` is what the last encode or decode saw; it is replaced by what this one wrote.
    static func encode(_ document: StateDocument, memo: inout Memo) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(estimatedSize(document))
        var spans: [Range<Int>] = []
        spans.reserveCapacity(document.journal.count)
        out.append(contentsOf: #"{"journal":["#.utf8)
        for (index, entry) in document.journal.enumerated() {
            if index > 0 { out.append(UInt8(ascii: ",")) }
            let start = out.count
            // `==` on the entries' strings is canonical equivalence, not byte equality. That is
            // enough because the caller passes a memo only of the file the document was read
            // from (FileBackend compares the header lines), so an unchanged entry was read from
            // these very bytes; a changed one (scrubbed, new) differs. Reading, below, reuses an
            // entry only for identical bytes.
            if let known = memo.index(of: entry.sequence), memo.entries[known] == entry {
                memo.bytes.withUnsafeBufferPointer { out.append(contentsOf: UnsafeBufferPointer(rebasing: $0[memo.spans[known]])) }
            } else {
                appendEntry(entry, to: &out)
            }
            spans.append(start..<out.count)
        }
        appendRest(of: document, to: &out)
        memo = Memo(bytes: out, entries: document.journal, spans: spans)
        return out
    }

    private static func appendEntry(_ entry: JournalEntry, to out: inout [UInt8]) {
        out.append(contentsOf: #"{"instance":"#.utf8)
        appendString(entry.instance, to: &out)
        out.append(contentsOf: #","key":"#.utf8)
        appendOptional(entry.key, to: &out)
        out.append(contentsOf: #","new":"#.utf8)
        appendOptional(entry.newValue, to: &out)
        out.append(contentsOf: #","old":"#.utf8)
        appendOptional(entry.oldValue, to: &out)
        out.append(contentsOf: #","origin":"#.utf8)
        appendString(entry.origin, to: &out)
        out.append(contentsOf: #","seq":"#.utf8)
        out.append(contentsOf: String(entry.sequence).utf8)
        out.append(contentsOf: #","time":"#.utf8)
        out.append(contentsOf: String(entry.time).utf8)
        out.append(UInt8(ascii: "}"))
    }

    private static func appendRest(of document: StateDocument, to out: inout [UInt8]) {
        out.append(UInt8(ascii: "]"))
        if let recovery = document.recovery {
            out.append(contentsOf: #","recovery":"#.utf8)
            appendString(recovery, to: &out)
        }
        out.append(contentsOf: #","seq":"#.utf8)
        out.append(contentsOf: String(document.sequence).utf8)
        out.append(contentsOf: #","store":"#.utf8)
        appendString(document.storeID, to: &out)
        out.append(contentsOf: #","values":{"#.utf8)
        // Sorted by UTF-8 bytes, which is Unicode scalar order.
        let keys = document.values.keys.sorted { $0.utf8.lexicographicallyPrecedes($1.utf8) }
        for (index, key) in keys.enumerated() {
            if index > 0 { out.append(UInt8(ascii: ",")) }
            appendString(key, to: &out)
            out.append(UInt8(ascii: ":"))
            appendString(document.values[key]!, to: &out)
        }
        out.append(contentsOf: "}}".utf8)
    }

    private static func estimatedSize(_ document: StateDocument) -> Int {
        var size = 128 + (document.recovery?.utf8.count ?? 0)
        for (key, value) in document.values { size += key.utf8.count + value.utf8.count + 6 }
        for entry in document.journal {
            size += 130 + entry.instance.utf8.count + entry.origin.utf8.count
                + (entry.key?.utf8.count ?? 0) + (entry.oldValue?.utf8.count ?? 0) + (entry.newValue?.utf8.count ?? 0)
        }
        return size
    }

    private static func appendOptional(_ string: String?, to out: inout [UInt8]) {
        if let string { appendString(string, to: &out) } else { out.append(contentsOf: "null".utf8) }
    }

    private static let hexDigits = Array("0123456789abcdef".utf8)

    private static func appendString(_ string: String, to out: inout [UInt8]) {
        out.append(UInt8(ascii: "\""))
        var string = string
        string.withUTF8 { bytes in
            var start = 0
            for (index, byte) in bytes.enumerated() where byte < 0x20 || byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "\\") {
                out.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[start..<index]))
                start = index + 1
                out.append(UInt8(ascii: "\\"))
                switch byte {
                case UInt8(ascii: "\""), UInt8(ascii: "\\"): out.append(byte)
                case 0x08: out.append(UInt8(ascii: "b"))
                case 0x0C: out.append(UInt8(ascii: "f"))
                case 0x0A: out.append(UInt8(ascii: "n"))
                case 0x0D: out.append(UInt8(ascii: "r"))
                case 0x09: out.append(UInt8(ascii: "t"))
                default:
                    out.append(contentsOf: "u00".utf8)
                    out.append(hexDigits[Int(byte >> 4)])
                    out.append(hexDigits[Int(byte & 0xF)])
                }
            }
            out.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[start...]))
        }
        out.append(UInt8(ascii: "\""))
    }

    // MARK: Reading

    static func decode(_ bytes: [UInt8]) throws(Problem) -> StateDocument {
        var memo = Memo()
        return try decode(bytes, from: 0, memo: &memo)
    }

    /// Decodes the body that starts at `start` in `bytes` (a whole state file). `memo` is what
    /// the last encode or decode saw; it is replaced by what this one read, unless it throws.
    static func decode(_ bytes: [UInt8], from start: Int, memo: inout Memo) throws(Problem) -> StateDocument {
        let previous = memo
        let result = bytes.withUnsafeBufferPointer { file in
            previous.bytes.withUnsafeBufferPointer { known in
                Result { () throws(Problem) in
                    var reader = Reader(UnsafeBufferPointer(rebasing: file[start...]), previous: previous, known: known)
                    let document = try reader.document()
                    return (document, reader.spans.map { ($0.lowerBound + start)..<($0.upperBound + start) })
                }
            }
        }
        let (document, spans) = try result.get()
        memo = Memo(bytes: bytes, entries: document.journal, spans: spans)
        return document
    }

    /// Whether `bytes` are well-formed UTF-8 (no overlong forms, no surrogates, nothing above
    /// U+10FFFF), the rule of RFC 3629 that `String(validating:)` applies, without its generic cost.
    static func isValidUTF8(_ bytes: UnsafeBufferPointer<UInt8>) -> Bool {
        var index = 0
        let count = bytes.count
        while index < count {
            let lead = bytes[index]
            if lead < 0x80 { index += 1; continue }
            let length: Int
            var lower: UInt8 = 0x80, upper: UInt8 = 0xBF  // the allowed range of the second byte
            switch lead {
            case 0xC2...0xDF: length = 2
            case 0xE0: length = 3; lower = 0xA0
            case 0xE1...0xEC, 0xEE...0xEF: length = 3
            case 0xED: length = 3; upper = 0x9F
            case 0xF0: length = 4; lower = 0x90
            case 0xF1...0xF3: length = 4
            case 0xF4: length = 4; upper = 0x8F
            default: return false
            }
            guard index + length <= count, (lower...upper).contains(bytes[index + 1]) else { return false }
            for offset in 2..<length where !(0x80...0xBF).contains(bytes[index + offset]) { return false }
            index += length
        }
        return true
    }

    /// A cursor over the body's bytes. Every method leaves `index` after what it read.
    private struct Reader {
        let bytes: UnsafeBufferPointer<UInt8>
        var index = 0
        /// The last few distinct journal `instance` and `origin` strings: a journal repeats a
        /// handful of them hundreds of times, and a String made once is shared.
        var recent: [(bytes: [UInt8], string: String)] = []

        /// The last body's entries, and the bytes their spans point into.
        let previous: Memo
        let known: UnsafeBufferPointer<UInt8>
        /// Where each journal entry read so far is, in `bytes`.
        var spans: [Range<Int>] = []

        init(_ bytes: UnsafeBufferPointer<UInt8>, previous: Memo = Memo(), known: UnsafeBufferPointer<UInt8> = UnsafeBufferPointer(start: nil, count: 0)) {
            self.bytes = bytes
            self.previous = previous
            self.known = known
        }

        func problem(_ message: String, at offset: Int? = nil) -> Problem {
            Problem(offset: offset ?? index, message: message)
        }

        mutating func document() throws(Problem) -> StateDocument {
            var store: String?, sequence: UInt64?, values: [String: String]?, journal: [JournalEntry]?, recovery: String?
            skipWhitespace()
            var seen = Fields(names: ["journal", "seq", "store", "values", "recovery"])
            try object { reader, key throws(Problem) in
                switch try seen.match(key, in: reader) {
                case 0: journal = try reader.journal()
                case 1: sequence = try reader.unsigned()
                case 2: store = try reader.string()
                case 3: values = try reader.values()
                case 4: recovery = try reader.optionalString()
                default: try reader.skipValue(depth: 1)
                }
            }
            skipWhitespace()
            guard index == bytes.count else { throw problem("unexpected bytes after the document") }
            guard let store else { throw problem("the document has no \"store\"", at: 0) }
            guard let sequence else { throw problem("the document has no \"seq\"", at: 0) }
            guard let values else { throw problem("the document has no \"values\"", at: 0) }
            guard let journal else { throw problem("the document has no \"journal\"", at: 0) }
            var document = StateDocument(storeID: store, sequence: sequence, values: values, journal: journal)
            document.recovery = recovery
            return document
        }

        mutating func values() throws(Problem) -> [String: String] {
            var values: [String: String] = [:]
            try object { reader, key throws(Problem) in
                let name = try reader.makeString(key)
                let value = try reader.string()
                if let existing = values.index(forKey: name) {
                    // The same name twice is ambiguous: refused. Two names that differ only in
                    // Unicode normalisation are one key to Swift: the first stays, as with
                    // Foundation's JSONDecoder (docs/FORMAT.md).
                    if values[existing].key.utf8.elementsEqual(name.utf8) {
                        throw reader.problem("a key appears twice in \"values\"", at: key.start)
                    }
                    return
                }
                values[name] = value
            }
            return values
        }

        mutating func journal() throws(Problem) -> [JournalEntry] {
            var entries: [JournalEntry] = []
            entries.reserveCapacity(previous.entries.count + 1)
            spans.removeAll(keepingCapacity: true)
            try array("the journal") { reader throws(Problem) in
                let start = reader.index
                if let last = entries.last, let reused = reader.reuse(after: last.sequence) {
                    entries.append(reused)
                } else {
                    entries.append(try reader.entry())
                }
                reader.spans.append(start..<reader.index)
            }
            return entries
        }

        /// The previous body's entry that follows `sequence`, when its bytes come next here:
        /// a complete object with the same bytes reads as the same entry.
        mutating func reuse(after sequence: UInt64) -> JournalEntry? {
            guard sequence < UInt64.max, let known = previous.index(of: sequence + 1) else { return nil }
            let span = previous.spans[known]
            guard index + span.count <= bytes.count, span.upperBound <= self.known.count,
                  memcmp(bytes.baseAddress! + index, self.known.baseAddress! + span.lowerBound, span.count) == 0
            else { return nil }
            index += span.count
            return previous.entries[known]
        }

        mutating func entry() throws(Problem) -> JournalEntry {
            let start = index
            var sequence: UInt64?, key: String?, old: String?, new: String?, origin: String?, instance: String?, time: Int64?
            var seen = Fields(names: ["instance", "key", "new", "old", "origin", "seq", "time"])
            try object { reader, field throws(Problem) in
                switch try seen.match(field, in: reader) {
                case 0: instance = try reader.sharedString()
                case 1: key = try reader.optionalString()
                case 2: new = try reader.optionalString()
                case 3: old = try reader.optionalString()
                case 4: origin = try reader.sharedString()
                case 5: sequence = try reader.unsigned()
                case 6: time = try reader.signed()
                default: try reader.skipValue(depth: 2)
                }
            }
            guard let sequence, let origin, let instance, let time else {
                throw problem("a journal entry lacks \"seq\", \"origin\", \"instance\" or \"time\"", at: start)
            }
            return JournalEntry(sequence: sequence, key: key, oldValue: old, newValue: new, origin: origin, instance: instance, time: time)
        }

        /// The known fields of one object read so far. A field that appears twice makes the body
        /// invalid: JSON leaves the meaning of duplicate names open, and two readers that settle
        /// it differently would see different states in one file.
        struct Fields {
            /// The names this object knows, in the order of the indices `match` returns.
            let names: [StaticString]
            var seen: UInt8 = 0

            /// The index of `key` among the known names (nil for an unknown one), refusing a
            /// known name that was seen before in this object.
            mutating func match(_ key: StringToken, in reader: Reader) throws(Problem) -> Int? {
                guard let field = names.firstIndex(where: { reader.token(key, is: $0) }) else { return nil }
                guard seen & (1 << field) == 0 else { throw reader.problem("a field appears twice in an object", at: key.start) }
                seen |= 1 << field
                return field
            }
        }

        /// Reads `{ "key": value, ... }`, calling `member` with the reader placed at each value.
        mutating func object(_ member: (inout Reader, StringToken) throws(Problem) -> Void) throws(Problem) {
            try expect(UInt8(ascii: "{"))
            skipWhitespace()
            if peek() == UInt8(ascii: "}") { index += 1; return }
            while true {
                skipWhitespace()
                let key = try stringToken()
                if !key.plain { _ = try makeString(key) }  // checks its escapes and UTF-8, even when unknown
                skipWhitespace()
                try expect(UInt8(ascii: ":"))
                skipWhitespace()
                try member(&self, key)
                skipWhitespace()
                switch next() {
                case UInt8(ascii: ","): continue
                case UInt8(ascii: "}"): return
                default: throw problem("expected ',' or '}' in an object", at: index - 1)
                }
            }
        }

        /// Reads `[ value, ... ]`, calling `element` with the reader placed at each value.
        mutating func array(_ what: String, _ element: (inout Reader) throws(Problem) -> Void) throws(Problem) {
            try expect(UInt8(ascii: "["))
            skipWhitespace()
            if peek() == UInt8(ascii: "]") { index += 1; return }
            while true {
                skipWhitespace()
                try element(&self)
                skipWhitespace()
                switch next() {
                case UInt8(ascii: ","): continue
                case UInt8(ascii: "]"): return
                default: throw problem("expected ',' or ']' in \(what)", at: index - 1)
                }
            }
        }

        mutating func optionalString() throws(Problem) -> String? {
            if try literal("null") { return nil }
            return try string()
        }

        /// A string that is likely one of the few seen recently (an entry's instance or origin):
        /// compared as bytes, made into a String only when new.
        mutating func sharedString() throws(Problem) -> String {
            let token = try stringToken()
            if token.plain {
                let raw = UnsafeBufferPointer(rebasing: bytes[token.content])
                let known = recent.first { known in
                    known.bytes.count == raw.count && raw.count > 0 && known.bytes.withUnsafeBufferPointer { memcmp($0.baseAddress!, raw.baseAddress!, raw.count) == 0 }
                }
                if let known { return known.string }
                let string = try makeString(token)
                if recent.count == 8 { recent.removeFirst() }
                recent.append((Array(raw), string))
                return string
            }
            return try makeString(token)
        }

        mutating func string() throws(Problem) -> String {
            try makeString(try stringToken())
        }

        /// A string's place in the body: `content` is between the quotes; `plain` when it has
        /// no escapes and is ASCII, so that its bytes are its text.
        struct StringToken {
            var start: Int
            var content: Range<Int>
            var plain: Bool
            var escaped: Bool
        }

        mutating func stringToken() throws(Problem) -> StringToken {
            let start = index
            try expect(UInt8(ascii: "\""))
            let contentStart = index
            var high: UInt8 = 0
            var escaped = false
            while index < bytes.count {
                let byte = bytes[index]
                if byte == UInt8(ascii: "\"") {
                    index += 1
                    return StringToken(start: start, content: contentStart..<(index - 1), plain: !escaped && high < 0x80, escaped: escaped)
                }
                if byte == UInt8(ascii: "\\") {
                    escaped = true
                    index += 1  // the escaped character is checked when the string is made
                } else if byte < 0x20 {
                    throw problem("a control character inside a string")
                }
                high |= byte
                index += 1
            }
            throw problem("a string is not terminated", at: start)
        }

        /// A key compared with a known name without making a String.
        func token(_ token: StringToken, is name: StaticString) -> Bool {
            if token.escaped { return (try? makeString(token)) == name.description }
            return token.content.count == name.utf8CodeUnitCount
                && memcmp(bytes.baseAddress! + token.content.lowerBound, name.utf8Start, name.utf8CodeUnitCount) == 0
        }

        func makeString(_ token: StringToken) throws(Problem) -> String {
            let raw = UnsafeBufferPointer(rebasing: bytes[token.content])
            if token.plain { return String(decoding: raw, as: UTF8.self) }
            var text: [UInt8]
            if token.escaped {
                text = []
                text.reserveCapacity(raw.count)
                var position = token.content.lowerBound
                while position < token.content.upperBound {
                    let byte = bytes[position]
                    position += 1
                    if byte == UInt8(ascii: "\\") {
                        try unescape(at: &position, into: &text)
                    } else {
                        text.append(byte)
                    }
                }
            } else {
                text = Array(raw)
            }
            return try text.withUnsafeBufferPointer { text throws(Problem) in
                guard StateBody.isValidUTF8(text) else { throw problem("a string is not valid UTF-8", at: token.start) }
                return String(decoding: text, as: UTF8.self)
            }
        }

        private func unescape(at position: inout Int, into out: inout [UInt8]) throws(Problem) {
            guard position < bytes.count else { throw problem("a string ends inside an escape", at: position) }
            let byte = bytes[position]
            position += 1
            switch byte {
            case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): out.append(byte)
            case UInt8(ascii: "b"): out.append(0x08)
            case UInt8(ascii: "f"): out.append(0x0C)
            case UInt8(ascii: "n"): out.append(0x0A)
            case UInt8(ascii: "r"): out.append(0x0D)
            case UInt8(ascii: "t"): out.append(0x09)
            case UInt8(ascii: "u"):
                var scalar = UInt32(try hex4(at: &position))
                if (0xD800..<0xDC00).contains(scalar) {
                    // A high surrogate must be followed by an escaped low one.
                    guard position + 1 < bytes.count, bytes[position] == UInt8(ascii: "\\"), bytes[position + 1] == UInt8(ascii: "u") else {
                        throw problem("an unpaired surrogate in a \\u escape", at: position)
                    }
                    position += 2
                    let low = UInt32(try hex4(at: &position))
                    guard (0xDC00..<0xE000).contains(low) else { throw problem("an unpaired surrogate in a \\u escape", at: position) }
                    scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                } else if (0xDC00..<0xE000).contains(scalar) {
                    throw problem("an unpaired surrogate in a \\u escape", at: position)
                }
                // Not a surrogate, so a valid scalar.
                out.append(contentsOf: UTF8.encode(Unicode.Scalar(scalar)!)!)
            default:
                throw problem("an unknown escape in a string", at: position - 2)
            }
        }

        private func hex4(at position: inout Int) throws(Problem) -> UInt16 {
            guard position + 4 <= bytes.count else { throw problem("a \\u escape is cut short", at: position) }
            var value: UInt16 = 0
            for _ in 0..<4 {
                let byte = bytes[position]
                let digit: UInt8
                switch byte {
                case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = byte - UInt8(ascii: "0")
                case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
                case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = byte - UInt8(ascii: "A") + 10
                default: throw problem("a \\u escape has a non-hex digit", at: position)
                }
                value = value << 4 | UInt16(digit)
                position += 1
            }
            return value
        }

        /// A JSON number that is a non-negative integer fitting 64 bits.
        mutating func unsigned() throws(Problem) -> UInt64 {
            let start = index
            var value: UInt64 = 0
            while index < bytes.count, case let byte = bytes[index], byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") {
                let (times10, overflow1) = value.multipliedReportingOverflow(by: 10)
                let (sum, overflow2) = times10.addingReportingOverflow(UInt64(byte - UInt8(ascii: "0")))
                guard !overflow1, !overflow2 else { throw problem("a number does not fit 64 bits", at: start) }
                value = sum
                index += 1
            }
            guard index > start else { throw problem("expected an unsigned integer", at: start) }
            guard bytes[start] != UInt8(ascii: "0") || index == start + 1 else { throw problem("a number has a leading zero", at: start) }
            if index < bytes.count, [UInt8(ascii: "."), UInt8(ascii: "e"), UInt8(ascii: "E")].contains(bytes[index]) {
                throw problem("expected an integer", at: start)
            }
            return value
        }

        /// A JSON number that is an integer fitting 64 bits, signed.
        mutating func signed() throws(Problem) -> Int64 {
            let start = index
            let negative = peek() == UInt8(ascii: "-")
            if negative { index += 1 }
            let magnitude = try unsigned()
            if negative {
                guard magnitude <= UInt64(Int64.max) + 1 else { throw problem("a number does not fit 64 bits", at: start) }
                return magnitude == UInt64(Int64.max) + 1 ? Int64.min : -Int64(magnitude)
            }
            guard magnitude <= UInt64(Int64.max) else { throw problem("a number does not fit 64 bits", at: start) }
            return Int64(magnitude)
        }

        /// Skips any JSON value (an unknown key's), checking its syntax.
        mutating func skipValue(depth: Int) throws(Problem) {
            guard depth <= StateBody.maximumDepth else { throw problem("values nest deeper than \(StateBody.maximumDepth) levels") }
            switch peek() {
            case UInt8(ascii: "\""): _ = try string()  // made, so that its escapes and UTF-8 are checked
            case UInt8(ascii: "{"): try object { reader, _ throws(Problem) in try reader.skipValue(depth: depth + 1) }
            case UInt8(ascii: "["): try array("an array") { reader throws(Problem) in try reader.skipValue(depth: depth + 1) }
            case UInt8(ascii: "t"): guard try literal("true") else { throw problem("expected a value") }
            case UInt8(ascii: "f"): guard try literal("false") else { throw problem("expected a value") }
            case UInt8(ascii: "n"): guard try literal("null") else { throw problem("expected a value") }
            default: try skipNumber()
            }
        }

        private mutating func skipNumber() throws(Problem) {
            let start = index
            if peek() == UInt8(ascii: "-") { index += 1 }
            func digits(_ reader: inout Reader) -> Int {
                let first = reader.index
                while reader.index < reader.bytes.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(reader.bytes[reader.index]) { reader.index += 1 }
                return reader.index - first
            }
            let integer = index
            let count = digits(&self)
            guard count > 0 else { throw problem("expected a value", at: start) }
            guard count == 1 || bytes[integer] != UInt8(ascii: "0") else { throw problem("a number has a leading zero", at: start) }
            if peek() == UInt8(ascii: ".") {
                index += 1
                guard digits(&self) > 0 else { throw problem("a number has no digits after '.'", at: start) }
            }
            if peek() == UInt8(ascii: "e") || peek() == UInt8(ascii: "E") {
                index += 1
                if peek() == UInt8(ascii: "+") || peek() == UInt8(ascii: "-") { index += 1 }
                guard digits(&self) > 0 else { throw problem("a number has no exponent digits", at: start) }
            }
        }

        /// Consumes `word` if it comes next.
        private mutating func literal(_ word: StaticString) throws(Problem) -> Bool {
            let count = word.utf8CodeUnitCount
            guard index + count <= bytes.count else { return false }
            for offset in 0..<count where bytes[index + offset] != word.utf8Start[offset] { return false }
            index += count
            return true
        }

        private func peek() -> UInt8? { index < bytes.count ? bytes[index] : nil }

        private mutating func next() -> UInt8? {
            guard index < bytes.count else { return nil }
            defer { index += 1 }
            return bytes[index]
        }

        private mutating func expect(_ byte: UInt8) throws(Problem) {
            guard index < bytes.count else { throw problem("the document ends early, expected '\(Character(Unicode.Scalar(byte)))'") }
            guard bytes[index] == byte else { throw problem("expected '\(Character(Unicode.Scalar(byte)))'") }
            index += 1
        }

        mutating func skipWhitespace() {
            while index < bytes.count {
                switch bytes[index] {
                case 0x20, 0x09, 0x0A, 0x0D: index += 1
                default: return
                }
            }
        }
    }
}
