/// The change log, format version 2 (docs/FORMAT.md §2): how `NAME.log` is laid out, and its
/// encoder and decoder. No I/O here; ``FileBackend`` reads and writes the bytes.
///
/// A log is a 48-byte header and then records, all integers little-endian:
///
///     header:  "TABSYNC-LOG\n" | u32 version (2) | u32 flags | 16-byte salt | u64 base | u32 crc
///     record:  u32 length | u32 flags | u64 sequence | payload (length bytes) | u32 crc
///
/// A record's CRC-32 covers the generation's salt, then the record's bytes before the CRC: a
/// record torn by a killed writer, or bytes of another generation or file, never check. The
/// first record is a snapshot (the values as of the header's `base`), every later one a change
/// with the next sequence number. A commit is one or more records, the last one marked.
enum LogFormat {
    static let magic: [UInt8] = Array("TABSYNC-LOG\n".utf8)
    static let version: UInt32 = 2
    static let headerSize = 48
    /// Length, flags and sequence.
    static let frameSize = 16
    /// The CRC after the payload.
    static let trailerSize = 4
    static let saltSize = 16
    /// A string field's length that stands for nil.
    static let absent = UInt32.max

    /// The header's flags.
    struct HeaderFlags: OptionSet, Sendable, Hashable {
        let rawValue: UInt32
        /// The log holds values whose history was scrubbed (tokens): a damaged generation is
        /// deleted, never moved aside, so that no replaced value survives in the directory.
        static let secret = HeaderFlags(rawValue: 1)
    }

    /// A record's flags.
    struct RecordFlags: OptionSet, Sendable, Hashable {
        let rawValue: UInt32
        /// The last record of its commit: a reader applies a commit once it has read this one.
        static let commitEnd = RecordFlags(rawValue: 1)
        /// The snapshot that starts a generation.
        static let snapshot = RecordFlags(rawValue: 2)
    }

    struct Header: Sendable, Hashable {
        var flags: HeaderFlags
        var salt: [UInt8]
        /// The sequence number of the snapshot.
        var base: UInt64
    }

    /// The first record of a generation: the values as of its sequence number.
    struct Snapshot: Sendable, Hashable {
        var store: String
        var recovery: String?
        var values: [String: String]
        /// The origin of the last change of each key, where known (for resynchronisations).
        var origins: [String: String]
    }

    /// A change record: `key` set to `value` (nil: removed); a nil key clears every key.
    struct Change: Sendable, Hashable {
        var key: String?
        var value: String?
        var origin: String
        var instance: String
        /// Milliseconds since 1970.
        var time: Int64
    }

    enum Body: Sendable, Hashable {
        case snapshot(Snapshot)
        case change(Change)
    }

    struct Record: Sendable, Hashable {
        var sequence: UInt64
        var flags: RecordFlags
        var body: Body
    }

    // MARK: Encoding

    static func header(_ header: Header) -> [UInt8] {
        var bytes = magic
        bytes.reserveCapacity(headerSize)
        append(version, to: &bytes)
        append(header.flags.rawValue, to: &bytes)
        bytes.append(contentsOf: header.salt)
        append(header.base, to: &bytes)
        append(CRC32.checksum(bytes), to: &bytes)
        return bytes
    }

    /// Appends one record, framed and checked with `salt`.
    static func append(_ record: Record, salt: [UInt8], to bytes: inout [UInt8]) {
        let start = bytes.count
        append(UInt32(0), to: &bytes)  // the length, set below
        append(record.flags.rawValue, to: &bytes)
        append(record.sequence, to: &bytes)
        switch record.body {
        case let .snapshot(snapshot):
            append(string: snapshot.store, to: &bytes)
            append(string: snapshot.recovery, to: &bytes)
            append(UInt32(snapshot.values.count), to: &bytes)
            for key in snapshot.values.keys.sorted() {
                append(string: key, to: &bytes)
                append(string: snapshot.values[key], to: &bytes)
                append(string: snapshot.origins[key], to: &bytes)
            }
        case let .change(change):
            append(string: change.key, to: &bytes)
            append(string: change.value, to: &bytes)
            append(string: change.origin, to: &bytes)
            append(string: change.instance, to: &bytes)
            append(UInt64(bitPattern: change.time), to: &bytes)
        }
        let length = UInt32(bytes.count - start - frameSize)
        withUnsafeBytes(of: length.littleEndian) { bytes.replaceSubrange(start..<start + 4, with: $0) }
        let crc = bytes[start...].withUnsafeBytes { CRC32.checksum($0, continuing: CRC32.checksum(salt)) }
        append(crc, to: &bytes)
    }

    /// Appends the records of one commit, the last one marked as its end.
    static func append(commit records: some Collection<JournalEntry>, salt: [UInt8], to bytes: inout [UInt8]) {
        for (index, record) in records.enumerated() {
            let change = Change(key: record.key, value: record.newValue, origin: record.origin, instance: record.instance, time: record.time)
            append(Record(sequence: record.sequence, flags: index == records.count - 1 ? .commitEnd : [], body: .change(change)), salt: salt, to: &bytes)
        }
    }

    private static func append<T: FixedWidthInteger>(_ value: T, to bytes: inout [UInt8]) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    private static func append(string: String?, to bytes: inout [UInt8]) {
        guard var text = string else { return append(absent, to: &bytes) }
        text.withUTF8 { utf8 in
            append(UInt32(utf8.count), to: &bytes)
            bytes.append(contentsOf: utf8)
        }
    }

    // MARK: Decoding

    enum HeaderProblem: Error, Equatable {
        /// Fewer bytes than a header.
        case short
        /// Not a TabSync log (no magic), or a damaged header.
        case foreign(String)
        /// A log of another format version.
        case version(UInt32)
    }

    static func decodeHeader(_ bytes: UnsafeRawBufferPointer) -> Result<Header, HeaderProblem> {
        guard bytes.count >= headerSize else { return .failure(.short) }
        guard bytes.prefix(magic.count).elementsEqual(magic) else { return .failure(.foreign("it does not start with \"TABSYNC-LOG\"")) }
        let version = load(UInt32.self, bytes, at: 12)
        guard version == Self.version else { return .failure(.version(version)) }
        guard CRC32.checksum(UnsafeRawBufferPointer(rebasing: bytes[0..<44])) == load(UInt32.self, bytes, at: 44) else {
            return .failure(.foreign("its header's checksum does not match"))
        }
        return .success(Header(
            flags: HeaderFlags(rawValue: load(UInt32.self, bytes, at: 16)),
            salt: Array(bytes[20..<36]), base: load(UInt64.self, bytes, at: 36)))
    }

    /// What is at an offset of a log.
    enum Read: Sendable, Hashable {
        /// A valid record, and the offset after it.
        case record(Record, end: Int)
        /// The bytes end inside a record (or before one begins): a commit being written, or torn.
        case incomplete
        /// Bytes that are not a record of this generation (the problem, for messages).
        case invalid(String)
    }

    /// Decodes the record at `offset` of `bytes` (the whole log or a part that starts at a
    /// record). A length above `maximumLength` is refused before anything is allocated.
    static func record(in bytes: UnsafeRawBufferPointer, at offset: Int, salt: [UInt8], maximumLength: Int) -> Read {
        guard bytes.count - offset >= frameSize else { return .incomplete }
        let length = Int(load(UInt32.self, bytes, at: offset))
        guard length <= maximumLength else { return .invalid("a record claims \(length) bytes, more than the limit of \(maximumLength)") }
        let end = offset + frameSize + length + trailerSize
        guard end <= bytes.count else { return .incomplete }
        let covered = UnsafeRawBufferPointer(rebasing: bytes[offset..<end - trailerSize])
        guard CRC32.checksum(covered, continuing: CRC32.checksum(salt)) == load(UInt32.self, bytes, at: end - trailerSize) else {
            return .invalid("a record's checksum does not match")
        }
        let flags = RecordFlags(rawValue: load(UInt32.self, bytes, at: offset + 4))
        let sequence = load(UInt64.self, bytes, at: offset + 8)
        var reader = FieldReader(bytes: bytes, offset: offset + frameSize, end: end - trailerSize)
        let body: Body?
        if flags.contains(.snapshot) {
            body = reader.snapshot()
        } else {
            body = reader.change()
        }
        guard let body, reader.offset == reader.end else { return .invalid("a record's fields do not fit its length") }
        return .record(Record(sequence: sequence, flags: flags, body: body), end: end)
    }

    /// Reads a payload's fields; nil for anything out of bounds or not UTF-8.
    private struct FieldReader {
        let bytes: UnsafeRawBufferPointer
        var offset: Int
        let end: Int

        mutating func integer<T: FixedWidthInteger>(_: T.Type) -> T? {
            guard end - offset >= MemoryLayout<T>.size else { return nil }
            defer { offset += MemoryLayout<T>.size }
            return LogFormat.load(T.self, bytes, at: offset)
        }

        /// `.some(nil)` for an absent string, nil for a malformed one.
        mutating func string() -> String?? {
            guard let length = integer(UInt32.self) else { return nil }
            if length == LogFormat.absent { return .some(nil) }
            guard Int(length) <= end - offset else { return nil }
            defer { offset += Int(length) }
            guard let string = String(validating: bytes[offset..<offset + Int(length)], as: UTF8.self) else { return nil }
            return .some(string)
        }

        mutating func present() -> String? {
            guard case let .some(.some(string)) = string() else { return nil }
            return string
        }

        mutating func change() -> Body? {
            guard let key = string(), let value = string(), let origin = present(), let instance = present(),
                  let time = integer(UInt64.self) else { return nil }
            return .change(Change(key: key, value: value, origin: origin, instance: instance, time: Int64(bitPattern: time)))
        }

        mutating func snapshot() -> Body? {
            guard let store = present(), let recovery = string(), let count = integer(UInt32.self) else { return nil }
            // Each entry takes at least 12 bytes: a count beyond that is refused before it is used.
            guard Int(count) <= (end - offset) / 12 else { return nil }
            var values: [String: String] = [:], origins: [String: String] = [:]
            values.reserveCapacity(Int(count))
            for _ in 0..<count {
                guard let key = present(), let value = present(), let origin = string() else { return nil }
                guard values.updateValue(value, forKey: key) == nil else { return nil }
                if let origin { origins[key] = origin }
            }
            return .snapshot(Snapshot(store: store, recovery: recovery, values: values, origins: origins))
        }
    }

    fileprivate static func load<T: FixedWidthInteger>(_: T.Type, _ bytes: UnsafeRawBufferPointer, at offset: Int) -> T {
        T(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: T.self))
    }
}
