// libFuzzer entry point for the change-log decoder (scripts/fuzz builds and runs it).
//
// Compiled together with Sources/TabSync/Log/LogFormat.swift, LogView.swift, CRC32.swift and
// Sources/TabSync/State/StateDocument.swift (for JournalEntry), so that the fuzzer exercises the
// decoder's own code, not a copy.
//
// Each input is read as a log (the 48-byte header, then records) twice: as it is, and with its
// header and every record's CRC repaired (a random mutation almost never keeps a checksum right,
// and without the repair the field decoding behind the checksums would hardly be reached).
//
// Differential: a second decoder, written here independently of LogFormat (plain loops over the
// bytes, no shared helpers), must find the same commits: the same sequence number, values and
// offset. Any crash, trap or disagreement is a finding.

import Foundation

@_cdecl("LLVMFuzzerTestOneInput")
public func logFuzzerTestOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    check(bytes)
    check(repaired(bytes))
    return 0
}

private let maximumLength = 1 << 20

private func check(_ bytes: [UInt8]) {
    guard case let .success(header) = bytes.withUnsafeBytes({ LogFormat.decodeHeader($0) }) else {
        if Independent.header(bytes) != nil { fatalError("the independent decoder accepts a header LogFormat refuses") }
        return
    }
    guard let independentHeader = Independent.header(bytes), independentHeader.salt == header.salt, independentHeader.base == header.base else {
        fatalError("the independent decoder reads the header differently")
    }
    var view = LogView(header: header, retention: 64)
    _ = bytes.withUnsafeBytes { view.read(UnsafeRawBufferPointer(rebasing: $0[LogFormat.headerSize...]), maximumLength: maximumLength) }
    let other = Independent.commits(bytes, salt: header.salt, base: header.base)
    if !view.hasSnapshot {
        if other != nil { fatalError("the independent decoder finds a snapshot LogView does not") }
        return
    }
    guard let other else { fatalError("LogView finds a snapshot the independent decoder does not") }
    if other.sequence != view.sequence || other.values != view.values || other.offset != view.offset {
        fatalError("the decoders disagree: \(other.sequence) / \(view.sequence), offset \(other.offset) / \(view.offset)")
    }
    // What was read encodes and reads back the same.
    let again = view.compacted(salt: header.salt, flags: header.flags, retained: nil)
    guard case let .success(againHeader) = again.withUnsafeBytes({ LogFormat.decodeHeader($0) }) else { fatalError("a compacted log has no valid header") }
    var reread = LogView(header: againHeader, retention: 64)
    let (_, stop) = again.withUnsafeBytes { reread.read(UnsafeRawBufferPointer(rebasing: $0[LogFormat.headerSize...]), maximumLength: maximumLength) }
    if stop != .end || reread.values != view.values || reread.sequence != view.sequence {
        fatalError("a compacted log does not read back as what it was made from")
    }
}

/// The input with a valid header (magic, version 2, its CRC) and every record's length and CRC
/// rewritten to fit, as far as the bytes go.
private func repaired(_ input: [UInt8]) -> [UInt8] {
    var bytes = input
    if bytes.count < 48 { bytes += [UInt8](repeating: 0, count: 48 - bytes.count) }
    bytes.replaceSubrange(0..<12, with: Array("TABSYNC-LOG\n".utf8))
    bytes.replaceSubrange(12..<16, with: [2, 0, 0, 0])
    bytes.replaceSubrange(44..<48, with: Independent.little(Independent.crc(bytes[0..<44])))
    let salt = Array(bytes[20..<36])
    var offset = 48
    while offset + 20 <= bytes.count {
        var length = Int(Independent.u32(bytes, offset))
        if offset + 20 + length > bytes.count { length = bytes.count - offset - 20 }
        bytes.replaceSubrange(offset..<offset + 4, with: Independent.little(UInt32(length)))
        let end = offset + 16 + length
        bytes.replaceSubrange(end..<end + 4, with: Independent.little(Independent.crc(salt + bytes[offset..<end])))
        offset = end + 4
    }
    return bytes
}

/// The second decoder: the format as docs/FORMAT.md states it, byte by byte.
private enum Independent {
    static func u32(_ b: [UInt8], _ at: Int) -> UInt32 {
        UInt32(b[at]) | UInt32(b[at + 1]) << 8 | UInt32(b[at + 2]) << 16 | UInt32(b[at + 3]) << 24
    }

    static func u64(_ b: [UInt8], _ at: Int) -> UInt64 {
        UInt64(u32(b, at)) | UInt64(u32(b, at + 4)) << 32
    }

    static func little(_ value: UInt32) -> [UInt8] {
        [UInt8(value & 0xFF), UInt8(value >> 8 & 0xFF), UInt8(value >> 16 & 0xFF), UInt8(value >> 24)]
    }

    /// Bit by bit, without tables.
    static func crc(_ bytes: some Sequence<UInt8>) -> UInt32 {
        var crc: UInt32 = 0xFFFF_FFFF
        for byte in bytes {
            crc ^= UInt32(byte)
            for _ in 0..<8 { crc = crc & 1 == 1 ? (crc >> 1) ^ 0xEDB8_8320 : crc >> 1 }
        }
        return ~crc
    }

    static func header(_ b: [UInt8]) -> (salt: [UInt8], base: UInt64)? {
        guard b.count >= 48, Array(b[0..<12]) == Array("TABSYNC-LOG\n".utf8), u32(b, 12) == 2, crc(b[0..<44]) == u32(b, 44) else { return nil }
        return (Array(b[20..<36]), u64(b, 36))
    }

    enum Field { case absent, text(String) }

    /// Reads the string fields of a payload in order; nil if they do not fit exactly.
    struct Fields {
        let b: [UInt8]
        var at: Int
        let end: Int

        mutating func string() -> Field? {
            guard end - at >= 4 else { return nil }
            let length = u32(b, at)
            at += 4
            if length == 0xFFFF_FFFF { return .absent }
            guard Int(length) <= end - at else { return nil }
            let slice = Array(b[at..<at + Int(length)])
            at += Int(length)
            guard let text = String(validating: slice, as: UTF8.self) else { return nil }
            return .text(text)
        }
    }

    /// The commits of a log: the snapshot, then change records with the next sequence numbers;
    /// the values after the last complete commit. nil when there is no valid snapshot.
    static func commits(_ b: [UInt8], salt: [UInt8], base: UInt64) -> (sequence: UInt64, values: [String: String], offset: Int)? {
        var offset = 48
        var committed: (UInt64, [String: String], Int)?
        var values: [String: String] = [:]
        var sequence = base
        var pending: [(key: String?, value: String?)] = []
        while b.count - offset >= 16 {
            let length = Int(u32(b, offset))
            guard length <= maximumLength, offset + 20 + length <= b.count else { break }
            let end = offset + 16 + length
            guard crc(salt + b[offset..<end]) == u32(b, end) else { break }
            let flags = u32(b, offset + 4)
            let number = u64(b, offset + 8)
            var fields = Fields(b: b, at: offset + 16, end: end)
            if committed == nil {
                // The snapshot.
                guard flags & 2 != 0, flags & 1 != 0, number == base, case .text = fields.string(), fields.string() != nil,
                      fields.end - fields.at >= 4 else { return nil }
                let count = u32(b, fields.at)
                fields.at += 4
                guard Int(count) <= (fields.end - fields.at) / 12 else { return nil }
                for _ in 0..<count {
                    guard case let .text(key)? = fields.string(), case let .text(value)? = fields.string(), fields.string() != nil,
                          values[key] == nil else { return nil }
                    values[key] = value
                }
                guard fields.at == end else { return nil }
                committed = (base, values, end + 4)
            } else {
                let (next, overflow) = sequence.addingReportingOverflow(UInt64(pending.count) + 1)
                guard flags & 2 == 0, !overflow, number == next else { break }
                guard let key = fields.string(), let value = fields.string(), case .text = fields.string(), case .text = fields.string(),
                      fields.end - fields.at == 8 else { break }
                func text(_ field: Field) -> String? { if case let .text(string) = field { string } else { nil } }
                pending.append((text(key), text(value)))
                if flags & 1 != 0 {
                    for change in pending {
                        if let key = change.key { values[key] = change.value } else { values.removeAll() }
                    }
                    sequence += UInt64(pending.count)
                    pending.removeAll()
                    committed = (sequence, values, end + 4)
                }
            }
            offset = end + 4
        }
        return committed.map { (sequence: $0.0, values: $0.1, offset: $0.2) }
    }
}
