// libFuzzer entry point for the shared session record's decoder (scripts/fuzz builds and runs it).
//
// Compiled together with Sources/TabSyncAuth/SessionRecord.swift, SessionClock.swift,
// TokenResponse.swift and AuthError.swift (plus a TabSync module built from
// Sources/TabSync/TabSyncError.swift alone, and Sources/CKernelClock as a C object), so that the
// fuzzer exercises the decoder's own internal code, not a copy. AuthSession.swift needs swift-log
// and most of the library, so it is not compiled in: the empty `AuthSession` below only carries
// the library's own `AuthSession.maximumBackoff` (declared in SessionClock.swift), and the
// overflow checks of `AuthSession.deadline(of:)` are repeated here (`checkDeadlines`).
//
// Each input is decoded three times: as it is; when it is a JSON object, with the keys that a
// record must have (state, generation, failures, eventSerial) filled in, because a random
// mutation often drops one; and as the bytes of a record built by `structured`, whose every
// number is taken from the input (often a boundary of its range, or one past it), because a
// mutation of JSON text hardly ever lands on 253402300799999 or 315360000001, and without these
// two the range checks behind the decoder would hardly be reached.
//
// Any input must either decode to a record that its own range check (`problem`) accepts, or
// fail with an invalidRecord error; a record that decodes must be what Foundation's
// JSONSerialization, an independent parser, reads from the same text (the decoder is hand-written). A record that decodes must survive encoding and decoding
// again, its deadlines (idle and absolute timeouts added to its start and activity times) must
// not overflow, and ClockGuard.trusted, announce, signOut and install on it must give records
// that still pass the check. A crash, a trap or any other error is a finding.

import Foundation

@_cdecl("LLVMFuzzerTestOneInput")
public func sessionRecordFuzzerTestOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = UnsafeBufferPointer(start: data, count: size)
    check(String(decoding: bytes, as: UTF8.self))
    if let text = repaired(Data(bytes)) { check(text) }
    check(structured(bytes))
    return 0
}

/// Stands in for the library's class, which AuthSession.swift declares: `maximumBackoff` is an
/// extension of it in SessionClock.swift.
enum AuthSession {}

/// The fixed "now" of every check (2027-01-15), in milliseconds since 1970.
private let now: Int64 = 1_800_000_000_000

private func check(_ text: String) {
    let record: SessionRecord
    switch SessionRecord.decodeChecked(text) {
    case let .failure(error):
        guard error.code == .invalidRecord else { fatalError("decodeChecked failed with \(error.code), not invalidRecord: \(error)") }
        return
    case let .success(decoded):
        record = decoded
    }
    checkRecord(record, "a decoded record")
    checkAgainstFoundation(text, record)

    let trusted = ClockGuard().trusted(record, now: now)
    checkRecord(trusted, "ClockGuard.trusted's record")
    for (name, time) in [("startedAt", trusted.startedAt), ("lastActivity", trusted.lastActivity), ("backoffUntil", trusted.backoffUntil)] {
        if let time, time > now + ClockGuard.tolerance + (name == "backoffUntil" ? AuthSession.maximumBackoff : 0) {
            fatalError("ClockGuard.trusted left \(name) \(time) in the future of now \(now)")
        }
    }

    var changed = record
    changed.announce(.refreshed, origin: "fuzz")
    checkRecord(changed, "an announced record")
    changed = record
    changed.signOut(reason: .idleTimeout, origin: "fuzz")
    checkRecord(changed, "a signed-out record")
    changed = record
    do throws(AuthError) {
        try changed.install(TokenResponse(accessToken: "fuzz", tokenType: "Bearer", refreshToken: "r", expiresIn: 3600), now: now, origin: "fuzz", kind: .refreshed)
    } catch {
        fatalError("installing a valid token response into a decoded record threw: \(error)")
    }
    checkRecord(changed, "a refreshed record")
}

/// A record that should be usable: the range check accepts it, its deadlines do not overflow,
/// and it survives encoding and decoding again.
private func checkRecord(_ record: SessionRecord, _ what: String) {
    if let problem = record.problem { fatalError("\(what) is out of range: \(problem)") }
    checkDeadlines(record, what)
    let text = record.encoded()
    guard case let .success(again) = SessionRecord.decodeChecked(text) else {
        fatalError("\(what) does not decode again from its encoding: \(text)")
    }
    if again != record { fatalError("\(what) decodes to a different record from its encoding: \(text)") }
}

/// The hand-written decoder against Foundation's JSON parser, an independent second one: a text
/// it accepts is a JSON object to Foundation too, whose members give the same record.
private func checkAgainstFoundation(_ text: String, _ record: SessionRecord) {
    guard let object = (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any] else {
        fatalError("decodeChecked accepted what JSONSerialization does not read as an object: \(text)")
    }
    func integer(_ value: Any?) -> Int64? { (value as? NSNumber)?.int64Value }
    func string(_ value: Any?) -> String? { value as? String }
    let refreshing = object["refreshing"] as? [String: Any]
    let agrees = string(object["state"]) == record.state.rawValue
        && string(object["accessToken"]) == record.accessToken && string(object["refreshToken"]) == record.refreshToken
        && integer(object["expiresAt"]) == record.expiresAt && integer(object["issuedAt"]) == record.issuedAt
        && integer(object["startedAt"]) == record.startedAt && integer(object["lastActivity"]) == record.lastActivity
        && integer(object["idleTimeout"]) == record.idleTimeout && integer(object["absoluteTimeout"]) == record.absoluteTimeout
        && integer(object["warningLead"]) == record.warningLead && integer(object["generation"]) == Int64(record.generation)
        && string(object["reason"]) == record.reason?.rawValue && integer(object["failures"]) == Int64(record.failures)
        && integer(object["backoffUntil"]) == record.backoffUntil && string(object["event"]) == record.event?.rawValue
        && string(object["eventOrigin"]) == record.eventOrigin && integer(object["eventSerial"]) == Int64(record.eventSerial)
        && integer(refreshing?["generation"]) == record.refreshing.map { Int64($0.generation) }
        && integer(refreshing?["pid"]) == record.refreshing.map { Int64($0.pid) }
        && string(refreshing?["origin"]) == record.refreshing?.origin
        && integer(refreshing?["startedAt"]) == record.refreshing?.startedAt
    if !agrees { fatalError("decodeChecked and JSONSerialization read different records from: \(text)") }
}

/// The arithmetic that AuthSession does on a trusted record (`deadline(of:)`, `run()`'s
/// warning, `recordActivity()`'s throttle): with every value within the ranges that `problem`
/// enforces, none of it may overflow, and each deadline lies within 1970 ... 9999 plus ten years.
private func checkDeadlines(_ record: SessionRecord, _ what: String) {
    func difference(_ a: Int64, _ b: Int64, _ name: String) {
        if a.subtractingReportingOverflow(b).overflow { fatalError("\(what): \(name) \(a) - \(b) overflows") }
    }
    let latest = SessionLimits.maximumTime + SessionLimits.maximumDurationMilliseconds
    let deadlines: [(String, Int64, Int64?)] = [
        ("idle", record.lastActivity ?? record.startedAt ?? 0, record.idleTimeout),
        ("absolute", record.startedAt ?? 0, record.absoluteTimeout),
    ]
    for (name, start, span) in deadlines {
        guard let span else { continue }
        let (deadline, overflow) = start.addingReportingOverflow(span)
        if overflow || !(0...latest).contains(deadline) {
            fatalError("\(what): the \(name) deadline \(start) + \(span) is out of range")
        }
        difference(deadline, record.warningLead ?? min(span / 5, 60000), "the \(name) warning")
        difference(deadline, now, "the time to the \(name) deadline")
    }
    difference(now, record.lastActivity ?? 0, "the time since the last activity")
}

/// The input as a JSON object with the record's required keys filled in, or nil when it is not
/// a JSON object or already has them all.
private func repaired(_ data: Data) -> String? {
    guard var object = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else { return nil }
    let required: [(String, Any)] = [("state", "signedIn"), ("generation", 1), ("failures", 0), ("eventSerial", 1)]
    let missing = required.filter { object[$0.0] == nil }
    if missing.isEmpty { return nil }
    for (key, value) in missing { object[key] = value }
    guard let repaired = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) else { return nil }
    return String(decoding: repaired, as: UTF8.self)
}

/// A record in JSON whose fields are all read from `bytes`: for each number a selector byte picks
/// absent, a boundary of the ranges (``boundaries``, give or take one) or eight raw bytes.
private func structured(_ bytes: UnsafeBufferPointer<UInt8>) -> String {
    var reader = ByteReader(bytes: bytes)
    var fields = ["\"state\":\"\(reader.byte() % 2 == 0 ? "signedIn" : "signedOut")\""]
    func add(_ key: String, _ value: Int64?) { if let value { fields.append("\"\(key)\":\(value)") } }
    for key in ["expiresAt", "startedAt", "lastActivity", "backoffUntil", "idleTimeout", "absoluteTimeout", "warningLead"] {
        add(key, reader.number())
    }
    for key in ["generation", "failures", "eventSerial"] { add(key, reader.number() ?? 0) }
    if reader.byte() % 2 == 0 {
        let generation = reader.number() ?? 1, startedAt = reader.number() ?? now
        let pid = Int32(truncatingIfNeeded: reader.number() ?? 1)
        fields.append("\"refreshing\":{\"generation\":\(generation),\"origin\":\"fuzz\",\"pid\":\(pid),\"startedAt\":\(startedAt)}")
    }
    if reader.byte() % 2 == 0 { fields.append("\"accessToken\":\"at\",\"refreshToken\":\"rt\"") }
    return "{" + fields.joined(separator: ",") + "}"
}

/// The edges of the ranges that `problem` enforces, and the values that arithmetic trips on.
private let boundaries: [Int64] = [
    0, SessionLimits.maximumTime, SessionLimits.maximumDurationMilliseconds, 1 << 53, now,
    .max, .min, Int64(Int32.max), 1000,
]

private struct ByteReader {
    let bytes: UnsafeBufferPointer<UInt8>
    var offset = 0

    /// The next byte, 0 once the input is used up.
    mutating func byte() -> UInt8 {
        guard offset < bytes.count else { return 0 }
        defer { offset += 1 }
        return bytes[offset]
    }

    /// nil, a boundary give or take one, or eight raw bytes, by a selector byte.
    mutating func number() -> Int64? {
        let selector = byte()
        switch selector % 8 {
        case 0: return nil
        case 1...5:
            let boundary = boundaries[Int(selector / 8) % boundaries.count]
            return boundary &+ Int64(selector % 8) &- 3  // boundary - 2 ... boundary + 2
        default:
            var value: UInt64 = 0
            for _ in 0..<8 { value = value << 8 | UInt64(byte()) }
            return Int64(bitPattern: value)
        }
    }
}
