import Foundation

/// The state file format, version 1 (docs/FORMAT.md):
///
///     tabsync-state 1 <sequence> <body length> <crc32 of body, 8 lowercase hex digits>\n
///     <body: UTF-8 JSON, exactly <body length> bytes>
///
/// The header repeats the sequence number so that a reader can tell whether anything changed
/// by reading one short line.
enum StateFileCodec {
    static let magic = "tabsync-state"
    static let version = 1
    /// The longest header a valid file can have.
    static let maximumHeaderBytes = 96

    struct Header: Equatable {
        var version: Int
        var sequence: UInt64
        var bodyLength: Int
        var checksum: UInt32
        var headerLength: Int
    }

    static func encode(_ document: StateDocument) -> [UInt8] {
        var memo = StateBody.Memo()
        return encode(document, memo: &memo)
    }

    /// `memo` is what the last encode or decode saw (it saves the work on unchanged journal
    /// entries); it is replaced by what this one wrote.
    static func encode(_ document: StateDocument, memo: inout StateBody.Memo) -> [UInt8] {
        let body = StateBody.encode(document, memo: &memo)
        let header = "\(magic) \(version) \(document.sequence) \(body.count) \(hex(CRC32.checksum(body)))\n"
        memo.header = Array(header.utf8)
        var bytes = [UInt8](header.utf8)
        bytes.reserveCapacity(header.utf8.count + body.count)
        bytes.append(contentsOf: body)
        return bytes
    }

    /// The header line of an encoded file, its newline included (empty when there is none).
    static func headerLine(_ bytes: [UInt8]) -> ArraySlice<UInt8> {
        guard let newline = bytes.prefix(maximumHeaderBytes).firstIndex(of: UInt8(ascii: "\n")) else { return [] }
        return bytes[...newline]
    }

    /// Parses the header line. Throws ``TabSyncError/Code/corruptState`` or
    /// ``TabSyncError/Code/unsupportedVersion``.
    static func header(_ bytes: some Collection<UInt8>, path: String) throws(TabSyncError) -> Header {
        guard let newline = bytes.prefix(maximumHeaderBytes).firstIndex(of: UInt8(ascii: "\n")) else {
            throw corrupt(path, bytes.isEmpty ? "the file is empty" : "no valid header line (not a TabSync state file)")
        }
        let line = String(decoding: bytes[bytes.startIndex..<newline], as: UTF8.self)
        let fields = line.split(separator: " ", omittingEmptySubsequences: false)
        guard fields.first == Substring(magic), fields.count >= 2 else {
            throw corrupt(path, "no valid header line (not a TabSync state file)")
        }
        // Plain digits only: Swift's integer parsing would also take a sign ("+1").
        func decimal(_ field: Substring) -> Bool { !field.isEmpty && field.utf8.allSatisfy { (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) } }
        func hex(_ field: Substring) -> Bool {
            field.utf8.count == 8 && field.utf8.allSatisfy {
                (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) || (UInt8(ascii: "a")...UInt8(ascii: "f")).contains($0) || (UInt8(ascii: "A")...UInt8(ascii: "F")).contains($0)
            }
        }
        guard decimal(fields[1]), let version = Int(fields[1]) else { throw corrupt(path, "the header's version is not a number") }
        guard version == Self.version else {
            throw TabSyncError(
                code: .unsupportedVersion, path: path,
                message: "The state file has format version \(version); this TabSync reads version \(Self.version) (written by a newer TabSync?)")
        }
        guard fields.count == 5, decimal(fields[2]), decimal(fields[3]), hex(fields[4]),
              let sequence = UInt64(fields[2]), let length = Int(fields[3]), let checksum = UInt32(fields[4], radix: 16)
        else {
            throw corrupt(path, "the header line is malformed")
        }
        return Header(version: version, sequence: sequence, bodyLength: length, checksum: checksum,
                      headerLength: bytes.distance(from: bytes.startIndex, to: newline) + 1)
    }

    /// Decodes a whole file. Throws ``TabSyncError/Code/corruptState`` or ``TabSyncError/Code/unsupportedVersion``.
    static func decode(_ bytes: [UInt8], path: String) throws(TabSyncError) -> StateDocument {
        var memo = StateBody.Memo()
        return try decode(bytes, path: path, memo: &memo)
    }

    /// `memo` is what the last encode or decode saw; it is replaced by what this one read, and
    /// left as it was when the file is refused.
    static func decode(_ bytes: [UInt8], path: String, memo: inout StateBody.Memo) throws(TabSyncError) -> StateDocument {
        let header = try header(bytes, path: path)
        let body = bytes[header.headerLength...]
        guard body.count == header.bodyLength else {
            throw corrupt(path, body.count < header.bodyLength
                ? "the file is truncated (\(body.count) of \(header.bodyLength) body bytes)"
                : "the file has \(body.count - header.bodyLength) bytes after its body")
        }
        guard CRC32.checksum(body) == header.checksum else {
            throw corrupt(path, "the checksum does not match the contents")
        }
        let document: StateDocument
        do {
            var next = memo
            document = try StateBody.decode(bytes, from: header.headerLength, memo: &next)
            if document.sequence == header.sequence, document.violation() == nil {
                next.header = Array(bytes[..<header.headerLength])
                memo = next
            }
        } catch {
            throw corrupt(path, "the body is not a valid state document: \(error.message) (at body byte \(error.offset))")
        }
        guard document.sequence == header.sequence else {
            throw corrupt(path, "the header's sequence \(header.sequence) differs from the body's \(document.sequence)")
        }
        if let violation = document.violation() {
            throw corrupt(path, violation)
        }
        return document
    }

    static func corrupt(_ path: String, _ problem: String) -> TabSyncError {
        TabSyncError(code: .corruptState, path: path, message: "The state file is corrupt: \(problem)")
    }

    static func hex(_ value: UInt32) -> String {
        let digits = String(value, radix: 16)
        return String(repeating: "0", count: 8 - digits.count) + digits
    }
}

/// CRC-32 as in zlib, PNG and Ethernet (polynomial 0xEDB88320, reflected), so that any language's
/// standard library (Python's `zlib.crc32`, Go's `hash/crc32`) can check a state file.
///
/// Computed eight bytes at a time ("slicing by 8": eight tables, each the previous one advanced by
/// a byte), since every reader checks the whole file on every change.
enum CRC32 {
    /// `tables[k][b]`: the CRC contribution of byte `b` followed by `k` zero bytes.
    static let tables: [UInt32] = {
        var tables = [UInt32](repeating: 0, count: 8 * 256)
        for index in 0..<256 {
            var value = UInt32(index)
            for _ in 0..<8 {
                value = value & 1 == 1 ? 0xEDB8_8320 ^ (value >> 1) : value >> 1
            }
            tables[index] = value
        }
        for slice in 1..<8 {
            for index in 0..<256 {
                let previous = tables[(slice - 1) * 256 + index]
                tables[slice * 256 + index] = (previous >> 8) ^ tables[Int(previous & 0xFF)]
            }
        }
        return tables
    }()

    static func checksum(_ bytes: some Sequence<UInt8>) -> UInt32 {
        // Contiguous bytes (an array, Data) are read through a buffer pointer: iterating
        // Data byte by byte costs more than the table look-ups.
        bytes.withContiguousStorageIfAvailable(checksum) ?? checksum(Array(bytes))
    }

    private static func checksum(_ bytes: UnsafeBufferPointer<UInt8>) -> UInt32 {
        var crc: UInt32 = 0xFFFF_FFFF
        tables.withUnsafeBufferPointer { table in
            var index = 0
            if let base = bytes.baseAddress {
                let raw = UnsafeRawPointer(base)
                while index + 8 <= bytes.count {
                    let low = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: index, as: UInt32.self)) ^ crc
                    let high = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: index + 4, as: UInt32.self))
                    crc = table[7 * 256 + Int(low & 0xFF)] ^ table[6 * 256 + Int((low >> 8) & 0xFF)]
                        ^ table[5 * 256 + Int((low >> 16) & 0xFF)] ^ table[4 * 256 + Int(low >> 24)]
                        ^ table[3 * 256 + Int(high & 0xFF)] ^ table[2 * 256 + Int((high >> 8) & 0xFF)]
                        ^ table[1 * 256 + Int((high >> 16) & 0xFF)] ^ table[Int(high >> 24)]
                    index += 8
                }
            }
            while index < bytes.count {
                crc = table[Int((crc ^ UInt32(bytes[index])) & 0xFF)] ^ (crc >> 8)
                index += 1
            }
        }
        return crc ^ 0xFFFF_FFFF
    }
}
