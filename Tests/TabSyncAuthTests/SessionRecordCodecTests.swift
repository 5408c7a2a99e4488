import Foundation
import Testing
@testable import TabSyncAuth

/// The record's hand-written JSON against Foundation's: what `JSONEncoder` wrote (every record
/// stored before the codec, and what another program may write) reads the same, and what the
/// codec writes is JSON that Foundation reads back to the same fields.
@Suite struct SessionRecordCodecTests {
    /// The record's fields as `Codable` synthesised them before the codec: the reference.
    struct Mirror: Codable, Equatable {
        struct Refreshing: Codable, Equatable {
            var generation: Int
            var pid: Int32
            var origin: String
            var startedAt: Int64
        }
        var state: String
        var accessToken: String?
        var refreshToken: String?
        var expiresAt: Int64?
        var issuedAt: Int64?
        var startedAt: Int64?
        var lastActivity: Int64?
        var idleTimeout: Int64?
        var absoluteTimeout: Int64?
        var warningLead: Int64?
        var generation: Int
        var reason: String?
        var refreshing: Refreshing?
        var failures: Int
        var backoffUntil: Int64?
        var event: String?
        var eventOrigin: String?
        var eventSerial: Int

        init(_ record: SessionRecord) {
            state = record.state.rawValue
            (accessToken, refreshToken, expiresAt, issuedAt) = (record.accessToken, record.refreshToken, record.expiresAt, record.issuedAt)
            (startedAt, lastActivity, idleTimeout) = (record.startedAt, record.lastActivity, record.idleTimeout)
            (absoluteTimeout, warningLead, generation) = (record.absoluteTimeout, record.warningLead, record.generation)
            reason = record.reason?.rawValue
            refreshing = record.refreshing.map { Refreshing(generation: $0.generation, pid: $0.pid, origin: $0.origin, startedAt: $0.startedAt) }
            (failures, backoffUntil, event) = (record.failures, record.backoffUntil, record.event?.rawValue)
            (eventOrigin, eventSerial) = (record.eventOrigin, record.eventSerial)
        }
    }

    static func full() -> SessionRecord {
        var record = SessionRecord()
        record.state = .signedIn
        record.accessToken = "eyJhbGciOi.a/b+c=\"quoted\"\\back\u{01}\n\té ☃ 𝄞"
        record.refreshToken = "r/1"
        (record.expiresAt, record.issuedAt, record.startedAt, record.lastActivity) = (1_800_000_060_000, 1_800_000_000_000, 1_799_000_000_000, -1)
        (record.idleTimeout, record.absoluteTimeout, record.warningLead) = (600_000, 86_400_000, 0)
        (record.generation, record.failures, record.eventSerial) = (9_007_199_254_740_992, 3, 17)
        record.reason = .refreshFailed
        record.refreshing = .init(generation: 8, pid: Int32.max, origin: "tab \"one\"", startedAt: 1_800_000_000_500)
        record.backoffUntil = Int64.max
        record.event = .refreshed
        record.eventOrigin = "t/0"
        return record
    }

    @Test func writesWhatJSONEncoderWroteWithSortedKeys() throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        for record in [Self.full(), SessionRecord()] {
            let foundation = String(decoding: try encoder.encode(Mirror(record)), as: UTF8.self)
            #expect(record.encoded() == foundation)
            #expect(try JSONDecoder().decode(Mirror.self, from: Data(record.encoded().utf8)) == Mirror(record))
        }
    }

    @Test func readsWhatFoundationWritesInAnyLayout() throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .withoutEscapingSlashes]
        let text = String(decoding: try encoder.encode(Mirror(Self.full())), as: UTF8.self)
        #expect(SessionRecord.parse(text) == Self.full())
        // Escapes written another way: \u for every character, a surrogate pair for U+1D11E.
        let escaped = #"{"state":"signedIn","generation":1,"failures":0,"eventSerial":0,"accessToken":"\u0041\/\ud834\udd1e\u00e9"}"#
        #expect(SessionRecord.parse(escaped)?.accessToken == "A/𝄞é")
    }

    @Test func skipsKeysItDoesNotKnowAndReadsNullAsAbsent() {
        let text = #"""
            {"future": {"a": [1, 2.5e-3, "x", true, false, null, {}], "b": []}, "state": "signedOut",
             "generation": 0, "failures": 0, "eventSerial": 0, "accessToken": null, "refreshing": null, "more": -0.0}
            """#
        #expect(SessionRecord.parse(text) == SessionRecord())
    }

    @Test(arguments: [
        "", "null", "[]", "{}",
        #"{"state":"signedIn","generation":1,"failures":0}"#,  // eventSerial missing
        #"{"state":"maybe","generation":1,"failures":0,"eventSerial":0}"#,
        #"{"state":"signedIn","generation":1.5,"failures":0,"eventSerial":0}"#,
        #"{"state":"signedIn","generation":"1","failures":0,"eventSerial":0}"#,
        #"{"state":"signedIn","generation":01,"failures":0,"eventSerial":0}"#,
        #"{"state":"signedIn","generation":99999999999999999999,"failures":0,"eventSerial":0}"#,
        #"{"state":"signedIn","generation":1,"failures":0,"eventSerial":0} x"#,
        #"{"state":"signedIn","generation":1,"failures":0,"eventSerial":0,}"#,
        #"{"state":"signedIn","generation":1,"failures":0,"eventSerial":0,"accessToken":"\x"}"#,
        #"{"state":"signedIn","generation":1,"failures":0,"eventSerial":0,"accessToken":"\ud834"}"#,
        "{\"state\":\"signedIn\",\"generation\":1,\"failures\":0,\"eventSerial\":0,\"accessToken\":\"a\u{01}b\"}",
        #"{"state":"signedIn","generation":1,"failures":0,"eventSerial":0,"reason":"bored"}"#,
        #"{"state":"signedIn","generation":1,"failures":0,"eventSerial":0,"refreshing":{"generation":1,"pid":1,"origin":"a"}}"#,
        #"{"state":"signedIn","generation":1,"failures":0,"eventSerial":0,"refreshing":{"generation":1,"pid":4294967296,"origin":"a","startedAt":0}}"#,
        #"{"state":"signedIn","generation":1,"failures":0,"eventSerial":0,"x":"# + String(repeating: "[", count: 100_000),
    ])
    func refusesWhatIsNotARecord(_ text: String) {
        #expect(SessionRecord.parse(text) == nil)
    }

    /// A record shown in a log line or a failed expectation shows no token.
    @Test func aRecordsDescriptionShowsNoToken() {
        var record = SessionRecord()
        record.state = .signedIn
        record.accessToken = "access-SECRET-1"
        record.refreshToken = "refresh-SECRET-2"
        record.generation = 3
        for shown in [String(describing: record), String(reflecting: record), "\(record)", String(describing: Optional(record))] {
            #expect(!shown.contains("SECRET"), "\(shown.replacingOccurrences(of: "SECRET", with: "*"))")
            #expect(shown.contains("generation: 3"))
        }
    }

    /// The process remembers the last records it decoded, by their text: two texts that differ
    /// in their bytes but are equal as Swift strings (canonically equivalent) are two records.
    @Test func canonicallyEquivalentTextsAreDecodedEachAsItIs() throws {
        var composed = SessionRecord()
        composed.state = .signedIn
        composed.eventOrigin = "caf\u{E9}"
        var decomposed = composed
        decomposed.eventOrigin = "cafe\u{301}"
        let (first, second) = (composed.encoded(), decomposed.encoded())
        try #require(first == second && !first.utf8.elementsEqual(second.utf8), "Swift compares them as equal, their bytes differ")
        #expect(SessionRecord.decode(first)?.eventOrigin?.utf8.elementsEqual("caf\u{E9}".utf8) == true)
        #expect(SessionRecord.decode(second)?.eventOrigin?.utf8.elementsEqual("cafe\u{301}".utf8) == true)
    }
}
