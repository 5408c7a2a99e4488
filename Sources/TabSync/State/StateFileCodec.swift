import Foundation

/// The state file format, version 1 (docs/FORMAT.md):
///
///     tabsync-state 1 <sequence> <body length> <crc32 of body, 8 lowercase hex digits>\n
///     <body: UTF-8 JSON, exactly <body length> bytes>
///
/// Format 2 keeps a log instead (``LogFormat``); this is read once, to upgrade a directory of an
/// older TabSync (``FileBackend``), and written only by tests that plant such a file.
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
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let body = [UInt8]((try? encoder.encode(document)) ?? Data())
        let header = "\(magic) \(version) \(document.sequence) \(body.count) \(hex(CRC32.checksum(body)))\n"
        return Array(header.utf8) + body
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
            document = try JSONDecoder().decode(StateDocument.self, from: Data(body))
        } catch {
            throw corrupt(path, "the body is not a valid state document")
        }
        guard !document.storeID.isEmpty else { throw corrupt(path, "the body has no store identifier") }
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
