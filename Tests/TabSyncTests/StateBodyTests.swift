import Foundation
import Testing
@testable import TabSync

/// The hand-written state body codec against Foundation's JSON, the reference it replaced, and
/// against the JSON a program in another language may write.
@Suite struct StateBodyTests {
    static let awkward = [
        "", "plain", "with \"quotes\" and \\backslashes\\", "a/b//c", "tab\there\nnew line\r\u{8}\u{C}",
        "\u{0}\u{1}\u{1F}\u{7F}", "été ünïcödé", "日本語", "emoji 👩‍👩‍👧 and 𝄞", String(repeating: "long ", count: 200),
    ]

    static func document(recovery: String? = nil) -> StateDocument {
        var document = StateDocument(storeID: "0b5d2f8e-6c1a-4e7b-9f3d-2a8c4e6b1d90")
        let limits = JournalLimits()
        for (index, text) in awkward.enumerated() {
            document.record(key: text, newValue: awkward[(index + 3) % awkward.count], origin: "tab \(text.prefix(3))", instance: "i-\(index % 2)", limits: limits)
            document.record(key: "k\(index)", newValue: text, origin: "tab-1", instance: "i-0", limits: limits)
        }
        document.record(key: "k1", newValue: nil, origin: "tab-2", instance: "i-1", limits: limits)
        document.record(key: nil, newValue: nil, origin: "tab-2", instance: "i-1", limits: limits)
        document.record(key: "after clear", newValue: "x", origin: "tab-2", instance: "i-1", limits: limits)
        document.recovery = recovery
        return document
    }

    static let foundationEncoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return encoder
    }()

    @Test(arguments: [nil, "recovered from \"the previous generation\"\n"])
    func writesWhatJSONEncoderWroteAndBothDecodersAgree(recovery: String?) throws {
        let document = Self.document(recovery: recovery)
        let ours = StateBody.encode(document)
        let foundation = [UInt8](try Self.foundationEncoder.encode(document))
        #expect(ours == foundation, "byte for byte the layout of docs/FORMAT.md")
        #expect(try StateBody.decode(foundation) == document)
        #expect(try JSONDecoder().decode(StateDocument.self, from: Data(ours)) == document)
    }

    /// Reusing the last file's entries (the memo) changes nothing that is written or read: over
    /// commits that append, trim, clear and scrub, and when another writer put different
    /// entries under the same sequence numbers.
    @Test func theMemoOfTheLastFileChangesNothingWrittenOrRead() throws {
        var document = StateDocument(storeID: "s")
        let limits = JournalLimits(maximumEntries: 16)
        var writer = StateBody.Memo(), reader = StateBody.Memo()
        for step in 0..<120 {
            switch step % 17 {
            case 5: document.record(key: nil, newValue: nil, origin: "w", instance: "i", limits: limits)
            case 11: document.scrubHistory(of: "k3")
            default: document.record(key: "k\(step % 7)", newValue: "v\(step) \(Self.awkward[step % Self.awkward.count])", origin: "w\(step % 3)", instance: "i", limits: limits)
            }
            let file = StateFileCodec.encode(document, memo: &writer)
            let plain = StateFileCodec.encode(document)
            #expect(file == plain, "step \(step): the same bytes as without the memo:\n\(String(decoding: file, as: UTF8.self))\n\(String(decoding: plain, as: UTF8.self))")
            document.scrubbed = false  // not stored
            let read = try StateFileCodec.decode(file, path: "p", memo: &reader)
            #expect(read == document, "step \(step)")
            #expect(StateFileCodec.encode(read) == file, "step \(step): what was read has the bytes of what was written")
        }

        // Another writer's file: the same store and sequence numbers, other entries.
        var other = StateDocument(storeID: "s", sequence: document.sequence - UInt64(document.journal.count), values: [:])
        for entry in document.journal {
            other.record(key: entry.key.map { $0 + "'" }, newValue: "x", origin: entry.origin, instance: "j", limits: limits)
        }
        let foreign = StateFileCodec.encode(other)
        #expect(try StateFileCodec.decode(foreign, path: "p", memo: &reader) == other)
        var fresh = StateBody.Memo()
        #expect(try StateFileCodec.decode(foreign, path: "p", memo: &fresh) == StateFileCodec.decode(foreign, path: "p"))
    }

    @Test func readsJSONLaidOutByAnotherProgram() throws {
        // Whitespace everywhere, keys in another order, escapes for every character that can
        // have one, an unknown key with a nested value, and an absent optional field.
        let body = """
             {
              "values" : { "n\\u00e9" : "\\ud834\\udd1e \\"q\\" \\\\ \\/ \\b\\f\\n\\r\\t" , "e": "" } ,
              "future": {"a": [1, -2.5e+3, true, false, null, {"b": []}]},
              "seq" : 3 ,
              "journal" : [
                { "time": -1, "seq": 3, "origin": "py", "instance": "i", "new": "x", "key": "e" }
              ],
              "store": "s"
             }\t
            """
        let document = try StateBody.decode(Array(body.utf8))
        #expect(document.storeID == "s")
        #expect(document.sequence == 3)
        #expect(document.values == ["né": "𝄞 \"q\" \\ / \u{8}\u{C}\n\r\t", "e": ""])
        #expect(document.journal == [JournalEntry(sequence: 3, key: "e", oldValue: nil, newValue: "x", origin: "py", instance: "i", time: -1)])
        #expect(document.recovery == nil)
    }

    @Test(arguments: [
        (#"{"seq":1,"values":{},"journal":[]}"#, #"no "store""#),
        (#"{"store":"s","seq":1,"values":{},"journal":[]} x"#, "unexpected bytes after the document"),
        (#"{"store":"s","seq":18446744073709551616,"values":{},"journal":[]}"#, "does not fit 64 bits"),
        (#"{"store":"s","seq":01,"values":{},"journal":[]}"#, "leading zero"),
        (#"{"store":"s","seq":1,"values":{},"journal":[],"x":[-01]}"#, "leading zero"),
        (#"{"store":"s","seq":1.0,"values":{},"journal":[]}"#, "expected an integer"),
        (#"{"store":"s","seq":-1,"values":{},"journal":[]}"#, "expected an unsigned integer"),
        (#"{"store":"\ud800","seq":1,"values":{},"journal":[]}"#, "unpaired surrogate"),
        (#"{"store":"\q","seq":1,"values":{},"journal":[]}"#, "unknown escape"),
        (#"{"store":"s","seq":1,"values":{"k":1},"journal":[]}"#, #"expected '"'"#),
        (#"{"store":"s","seq":1,"values":{},"journal":[{"seq":1}]}"#, "a journal entry lacks"),
        (#"{"store":"s","seq":1,"values":{},"journal":[],"x":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}"#, "nest deeper"),
        (#"{"store":"s","seq":1,"values":{},"journal":["#, "ends early"),
        (#"{"store":"s","seq":1,"values":{},"journal":[],"seq":2}"#, "appears twice"),
        (#"{"store":"s","seq":1,"values":{"k":"a","k":"b"},"journal":[]}"#, "appears twice"),
        (#"{"store":"s","seq":1,"values":{},"journal":[{"seq":1,"key":"a","key":"b","origin":"o","instance":"i","time":1}]}"#, "appears twice"),
    ])
    func refusesWhatIsNotAStateDocumentAndSaysWhere(body: String, problem: String) {
        #expect {
            try StateBody.decode(Array(body.utf8))
        } throws: { error in
            let error = error as! StateBody.Problem
            return error.message.contains(problem) && (0...body.utf8.count).contains(error.offset)
        }
    }

    /// In a value, and in the name of an unknown field, which is skipped but still checked.
    @Test(arguments: [#"{"store":"s?","seq":1,"values":{},"journal":[]}"#, #"{"store":"s","seq":1,"values":{},"journal":[],"x?":1}"#])
    func refusesInvalidUTF8InAString(template: String) {
        let body = Array(template.utf8)
        let mark = body.firstIndex(of: UInt8(ascii: "?"))!
        var valid = body
        valid[mark] = UInt8(ascii: "z")
        #expect(throws: Never.self) { try StateBody.decode(valid) }
        for bad: [UInt8] in [[0xFF], [0xC0, 0xAF], [0xED, 0xA0, 0x80], [0xF4, 0x90, 0x80, 0x80], [0xE2, 0x82]] {
            var broken = body
            broken.replaceSubrange(mark...mark, with: bad)
            #expect(throws: StateBody.Problem.self, "\(bad)") { try StateBody.decode(broken) }
        }
    }

    /// JSON names that differ only in Unicode normalisation are one key to Swift's String: the
    /// first stays (as with JSONDecoder) instead of the file being called corrupt.
    @Test func keysThatDifferOnlyInNormalisationAreOneKeyAndTheFirstStays() throws {
        let body = #"{"store":"s","seq":0,"values":{"\#u{E9}":"composed","e\#u{301}":"decomposed"},"journal":[]}"#
        let document = try StateBody.decode(Array(body.utf8))
        #expect(document.values.count == 1)
        #expect(document.values["\u{E9}"] == "composed")
        #expect(try JSONDecoder().decode(StateDocument.self, from: Data(body.utf8)).values == document.values)
    }

    @Test func theValidatorAgreesWithTheStandardLibrary() {
        var generator = SplitMix64(seed: 0x7AB5_1C)
        for _ in 0..<2_000 {
            let bytes = (0..<Int.random(in: 0...12, using: &generator)).map { _ in
                Bool.random(using: &generator) ? UInt8.random(in: 0x80...0xFF, using: &generator) : UInt8.random(in: 0...0xFF, using: &generator)
            }
            let ours = bytes.withUnsafeBufferPointer(StateBody.isValidUTF8)
            #expect(ours == (String(validating: bytes, as: UTF8.self) != nil), "\(bytes)")
        }
    }

    @Test func crc32OfEveryLengthAndAlignmentMatchesTheBitwiseDefinition() {
        let bytes = (0..<100).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
        for offset in 0..<4 {
            for end in offset...bytes.count {
                var crc: UInt32 = 0xFFFF_FFFF
                for byte in bytes[offset..<end] {
                    crc ^= UInt32(byte)
                    for _ in 0..<8 { crc = crc & 1 == 1 ? 0xEDB8_8320 ^ (crc >> 1) : crc >> 1 }
                }
                #expect(CRC32.checksum(bytes[offset..<end]) == crc ^ 0xFFFF_FFFF, "bytes \(offset)..<\(end)")
            }
        }
    }
}

/// A small deterministic generator, so that a failing input can be found again.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
