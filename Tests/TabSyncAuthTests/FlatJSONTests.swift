import Foundation
import Testing
@testable import TabSyncAuth

/// The token endpoint's answers are read by ``FlatJSON``, not `JSONSerialization`: it must read
/// what `JSONSerialization` reads, and refuse what is not JSON.
struct FlatJSONTests {
    /// Valid objects: the strings and numbers `JSONSerialization` finds, member by member.
    @Test(arguments: [
        #"{"access_token":"eyJ.a-b_c.d","token_type":"bearer","expires_in":3600,"refresh_token":"r1"}"#,
        #" { "a" : "x" , "b" : -12.5e-1 , "c" : 0 , "d" : 1E3 } "#,
        #"{"escapes":"q\" b\\ s\/ \b\f\n\r\t","unicode":"\u00e9 \u20AC \ud83d\ude00","raw":"é € 😀"}"#,
        #"{"skipped":{"deep":[1,{"x":[true,false,null]},"s"]},"after":"kept","n":null,"t":true}"#,
        #"{}"#,
        "{\"tab\":\t\"x\"\n}",
    ])
    func readsWhatJSONSerializationReads(_ text: String) throws {
        let members = try #require(FlatJSON.members(Data(text.utf8)))
        let expected = try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
        #expect(Set(members.keys) == Set(expected.keys))
        for (name, value) in expected {
            switch members[name] {
            case let .string(text)?: #expect(text == value as? String, "\(name)")
            case let .number(number)?: #expect(number == (value as? NSNumber)?.doubleValue, "\(name)")
            case .null?: #expect(value is NSNull, "\(name)")
            case .other?: #expect(value is [Any] || value is [String: Any] || value is Bool, "\(name)")
            case nil: Issue.record("\(name) is missing")
            }
        }
    }

    /// Not one JSON object with valid strings: refused (a token response is then invalid).
    @Test(arguments: [
        "", " ", "[1]", #""text""#, "{", "}", #"{"a"}"#, #"{"a":}"#, #"{"a":1,}"#, #"{,"a":1}"#, #"{"a":1} x"#,
        #"{"a":01}"#, #"{"a":1.}"#, #"{"a":.5}"#, #"{"a":-}"#, #"{"a":1e}"#, #"{"a":+1}"#, #"{"a":tru}"#,
        #"{"a":"\x"}"#, #"{"a":"\u12"}"#, #"{"a":"\ud800"}"#, #"{"a":"\ud800\u0041"}"#, #"{"a":"\udc00"}"#,
        "{\"a\":\"line\nbreak\"}", #"{"a":"unterminated}"#, #"{a:1}"#, #"{"a":[1,]}"#, #"{"a":[1 2]}"#,
        // Beyond a Double, as JSONSerialization refuses it (the record fuzzer found the difference).
        #"{"a":1e400}"#, #"{"a":-1800e086400000}"#, #"{"a":[1e999]}"#,
    ])
    func refusesWhatIsNotAnObject(_ text: String) {
        #expect(FlatJSON.members(Data(text.utf8)) == nil)
    }

    @Test func refusesInvalidUTF8AndDeepNesting() {
        #expect(FlatJSON.members(Data(#"{"a":""#.utf8) + [0xFF] + Data(#""}"#.utf8)) == nil)
        let deep = String(repeating: "[", count: 100) + String(repeating: "]", count: 100)
        #expect(FlatJSON.members(Data(#"{"a":\#(deep)}"#.utf8)) == nil)
        let shallow = String(repeating: "[", count: 10) + String(repeating: "]", count: 10)
        #expect(FlatJSON.members(Data(#"{"a":\#(shallow)}"#.utf8)) == ["a": .other])
    }

    @Test func theLastOfTwoMembersWithOneNameCounts() {
        #expect(FlatJSON.members(Data(#"{"a":"1","a":"2"}"#.utf8)) == ["a": .string("2")])
    }

    /// The form encoding is a loop over bytes now; it must agree with Foundation's.
    @Test(arguments: ["plain", "a b/+=&?#%", "é € 😀", "-._~", "", "line\nbreak\u{0}"])
    func formEncodingAgreesWithFoundation(_ text: String) {
        var allowed = CharacterSet.alphanumerics
        allowed.insert(charactersIn: "-._~")
        // CharacterSet.alphanumerics is Unicode-wide; ASCII letters and digits are what RFC 3986 means.
        let foundation = text.unicodeScalars.map { scalar in
            scalar.isASCII && allowed.contains(scalar) ? String(scalar) : String(scalar).utf8.map { String(format: "%%%02X", $0) }.joined()
        }.joined()
        #expect(OAuthClient.formEncode(text) == foundation)
    }
}
