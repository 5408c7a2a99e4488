// libFuzzer entry point for the token-response parser (scripts/fuzz builds and runs it).
//
// Compiled together with Sources/TabSyncAuth/TokenResponse.swift, SessionRecord.swift and
// AuthError.swift (and a TabSync module built from Sources/TabSync/TabSyncError.swift alone), so
// that the fuzzer exercises the parser's own internal code, not a copy.
//
// Each input is used four ways:
// - as the body of a token endpoint's answer (TokenResponse.parse), and each response it parses
//   goes on to SessionRecord.expiry(of:receivedAt:) and SessionRecord.install;
// - as the text of an access token (JWTExpiry.expiry);
// - as the payload of a JWT (base64url between a header and a signature), because a random
//   mutation almost never stays valid base64 of JSON, and without the wrapping the `exp` checks
//   would hardly be reached; that token also goes through SessionRecord.expiry;
// - as the body of an error answer (TokenEndpointError.error);
// - as the bytes of a response built by `structured`, whose expires_in (a number or a string)
//   and JWT `exp` are taken from the input (often a boundary of their range, or next to one),
//   because a mutation of JSON text hardly ever lands on 315360000.5 or 253402300799.999.
//
// Any input must either parse or throw an invalidResponse AuthError. A response that parses has
// a non-empty access token and an expires_in of nil or 0 ... 315360000; its expiry is nil or a
// time in 1970 ... 9999 (or an invalidResponse error); installing it gives a record that the
// record checker accepts and that survives encoding and decoding again, or throws and leaves
// the record unchanged. A crash, a trap or any other error is a finding.

import Foundation

@_cdecl("LLVMFuzzerTestOneInput")
public func tokenResponseFuzzerTestOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let body = Data(UnsafeBufferPointer(start: data, count: size))
    let parsed = checkResponse(body)
    checkAccessToken(String(decoding: body, as: UTF8.self))
    let token = jwt(payload: body)
    checkAccessToken(token)
    checkExpiry(TokenResponse(accessToken: token, tokenType: "Bearer", expiresIn: parsed?.expiresIn ?? 3600))
    checkErrorAnswer(body)
    _ = checkResponse(structured(body))
    return 0
}

/// The fixed "now" of every check (2027-01-15), in milliseconds since 1970.
private let now: Int64 = 1_800_000_000_000

private func expectInvalidResponse(_ error: AuthError, _ what: String) {
    guard error.code == .invalidResponse else {
        fatalError("\(what) threw \(error.code), not invalidResponse: \(error)")
    }
}

private func checkResponse(_ body: Data) -> TokenResponse? {
    let response: TokenResponse
    do throws(AuthError) {
        response = try TokenResponse.parse(body)
    } catch {
        expectInvalidResponse(error, "TokenResponse.parse")
        return nil
    }
    if let expiresIn = response.expiresIn, !(0...315_360_000).contains(expiresIn) {
        fatalError("TokenResponse.parse let through expires_in \(expiresIn)")
    }
    if response.accessToken.isEmpty { fatalError("TokenResponse.parse let through an empty access token") }
    if response.refreshToken?.isEmpty == true { fatalError("TokenResponse.parse kept an empty refresh token") }
    checkExpiry(response)
    return response
}

/// SessionRecord.expiry and SessionRecord.install of a response that parsed (or was built).
private func checkExpiry(_ response: TokenResponse) {
    do throws(AuthError) {
        if let expiry = try SessionRecord.expiry(of: response, receivedAt: now),
           !(0...SessionLimits.maximumTime).contains(expiry) {
            fatalError("SessionRecord.expiry gave \(expiry), not a time between 1970 and 9999")
        }
    } catch {
        expectInvalidResponse(error, "SessionRecord.expiry")
    }

    let before = SessionRecord()
    var record = before
    do throws(AuthError) {
        try record.install(response, now: now, origin: "fuzz", kind: .signedIn)
    } catch {
        expectInvalidResponse(error, "SessionRecord.install")
        if record != before { fatalError("SessionRecord.install threw but changed the record") }
        return
    }
    if let problem = record.problem {
        fatalError("SessionRecord.install made a record that its own check refuses: \(problem)")
    }
    guard case let .success(again) = SessionRecord.decodeChecked(record.encoded()), again == record else {
        fatalError("an installed record does not survive encoding and decoding again")
    }
}

private func checkAccessToken(_ token: String) {
    do throws(AuthError) {
        if let date = try JWTExpiry.expiry(of: token) {
            let seconds = date.timeIntervalSince1970
            guard seconds.isFinite, seconds >= 0, seconds * 1000 <= Double(SessionLimits.maximumTime) else {
                fatalError("JWTExpiry.expiry gave \(seconds) s, not a time between 1970 and 9999")
            }
        }
    } catch {
        expectInvalidResponse(error, "JWTExpiry.expiry")
    }
}

/// A JWT (`{"alg":"none"}` header, a fake signature) whose payload is `payload`, base64url without padding.
private func jwt(payload: Data) -> String {
    let encoded = payload.base64EncodedString()
        .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
        .replacingOccurrences(of: "=", with: "")
    return "eyJhbGciOiJub25lIn0.\(encoded).c2ln"
}

/// The answer of an error status: never a crash, never a control character in the message.
private func checkErrorAnswer(_ body: Data) {
    let statuses = [400, 401, 403, 429, 500]
    let status = statuses[body.count % statuses.count]
    let grant = body.count % 2 == 0 ? "refresh_token" : "password"
    let error = TokenEndpointError.error(status: status, body: body, grant: grant)
    if error.httpStatus != status { fatalError("TokenEndpointError.error lost the status \(status)") }
    if error.message.unicodeScalars.contains(where: { $0.properties.generalCategory == .control || $0.properties.generalCategory == .format }) {
        fatalError("TokenEndpointError.error put a control character into its message")
    }
}

/// A token response whose expires_in and access token's `exp` are read from `bytes`: for each a
/// selector byte picks absent, a boundary (``boundaries``, or the next double up or down) or eight
/// raw bytes as a double, and whether it is written as a JSON number or a string.
private func structured(_ body: Data) -> Data {
    var bytes = body.makeIterator()
    func byte() -> UInt8 { bytes.next() ?? 0 }
    func number() -> String? {
        let selector = byte()
        let value: Double
        switch selector % 8 {
        case 0: return nil
        case 1...5:
            let boundary = boundaries[Int(selector / 8) % boundaries.count]
            value = selector % 8 == 1 ? boundary.nextDown : selector % 8 == 2 ? boundary.nextUp : boundary
        default:
            var bits: UInt64 = 0
            for _ in 0..<8 { bits = bits << 8 | UInt64(byte()) }
            value = Double(bitPattern: bits)
        }
        let text = "\(value)"
        return selector & 0x80 == 0 ? text : "\"\(text)\""
    }
    var token = "at"
    if let exp = number() { token = jwt(payload: Data("{\"exp\":\(exp)}".utf8)) }
    var fields = ["\"access_token\":\"\(token)\"", "\"token_type\":\"Bearer\""]
    if let expiresIn = number() { fields.append("\"expires_in\":\(expiresIn)") }
    return Data(("{" + fields.joined(separator: ",") + "}").utf8)
}

/// The edges of the ranges that the parser enforces, and values that conversions trip on.
private let boundaries: [Double] = [
    0, 315_360_000, Double(SessionLimits.maximumTime) / 1000, Double(now) / 1000, 1e300,
    Double(Int64.max), .greatestFiniteMagnitude, .infinity, .nan, -1,
]
