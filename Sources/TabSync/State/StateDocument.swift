import Foundation

/// The whole shared state of one storage: its values, the sequence number of the last change,
/// and a bounded journal of the most recent changes, so that a reader that was busy or missed
/// a notification can replay exactly what it missed.
///
/// The document is backend-neutral: the file backend stores it as described in docs/FORMAT.md,
/// a database backend would store the same fields in rows.
public struct StateDocument: Sendable, Hashable, Codable {
    /// A random identifier, new whenever the state is created from nothing or recovered.
    /// A reader that sees it change cannot replay the journal and resynchronises.
    public var storeID: String
    /// The sequence number of the last change; 0 for a state that never changed.
    public var sequence: UInt64
    /// The application's keys and values.
    public var values: [String: String]
    /// The most recent changes, oldest first, with consecutive sequence numbers ending at ``sequence``.
    public var journal: [JournalEntry]
    /// Set when this store was created by recovering from a corrupt state file: what was found
    /// and what was recovered. Every reader that moves to this store reports it.
    public var recovery: String?
    /// Set by ``scrubHistory(of:)``: the commit then drops the previous generation too.
    /// Not stored.
    public internal(set) var scrubbed = false

    enum CodingKeys: String, CodingKey {
        case storeID = "store"
        case sequence = "seq"
        case values
        case journal
        case recovery
    }

    public init(storeID: String = StateDocument.newStoreID(), sequence: UInt64 = 0, values: [String: String] = [:], journal: [JournalEntry] = []) {
        self.storeID = storeID
        self.sequence = sequence
        self.values = values
        self.journal = journal
    }

    public static func newStoreID() -> String {
        UUID().uuidString.lowercased()
    }

    /// Records one change: applies it to ``values``, gives it the next sequence number and
    /// appends it to the journal, which is then trimmed to `limits`.
    @discardableResult
    mutating func record(key: String?, newValue: String?, origin: String, instance: String, limits: JournalLimits) -> UInt64 {
        let oldValue: String?
        if let key {
            oldValue = values[key]
            values[key] = newValue
        } else {
            oldValue = nil
            values.removeAll()
        }
        sequence += 1
        journal.append(JournalEntry(
            sequence: sequence, key: key, oldValue: oldValue, newValue: newValue,
            origin: origin, instance: instance, time: Int64(Date().timeIntervalSince1970 * 1000)))
        limits.trim(&journal)
        return sequence
    }

    /// Forgets the history of `key`: clears the old and new values of its journal entries
    /// (but the newest entry's new value, which is the current one), and drops the previous
    /// generation file when committed. For values that must not outlive their replacement,
    /// such as tokens after a sign-out. Readers far behind then see those entries without values.
    public mutating func scrubHistory(of key: String) {
        let newest = journal.lastIndex { $0.key == key }
        for index in journal.indices where journal[index].key == key || journal[index].key == nil {
            journal[index].oldValue = nil
            if index != newest { journal[index].newValue = nil }
        }
        scrubbed = true
    }

    /// The journal entries after `sequence`, or nil when the journal no longer reaches back that far.
    func entries(after sequence: UInt64) -> ArraySlice<JournalEntry>? {
        if sequence >= self.sequence { return [] }
        guard let first = journal.first, first.sequence <= sequence + 1 else { return nil }
        return journal[Int(sequence + 1 - first.sequence)...]
    }

    /// Checks the invariants a reader relies on. Returns a description of the first violation.
    /// The largest sequence number a valid state has: 2^53, the largest integer that every
    /// JSON reader (JavaScript's included) reads exactly. Far beyond any real session, and it
    /// leaves room above it, so that counting on from a planted file cannot overflow.
    public static let maximumSequence: UInt64 = 1 << 53

    func violation() -> String? {
        if sequence > Self.maximumSequence { return "the sequence number is above 2^53" }
        // Checked first: the expected sequences below would underflow otherwise.
        if UInt64(journal.count) > sequence { return "journal is longer than the sequence" }
        for (index, entry) in journal.enumerated() {
            let expected = sequence - UInt64(journal.count - 1 - index)
            if entry.sequence != expected {
                return "journal entry \(index) has sequence \(entry.sequence), expected \(expected)"
            }
        }
        return nil
    }
}

/// One committed change, as kept in the journal.
public struct JournalEntry: Sendable, Hashable, Codable {
    public var sequence: UInt64
    /// The key changed, or nil for a clear.
    public var key: String?
    public var oldValue: String?
    public var newValue: String?
    /// The name of the process that made the change.
    public var origin: String
    /// A random identifier of the storage instance that made the change.
    public var instance: String
    /// Wall-clock time of the commit, milliseconds since 1970.
    public var time: Int64

    public init(sequence: UInt64, key: String?, oldValue: String?, newValue: String?, origin: String, instance: String, time: Int64) {
        self.sequence = sequence
        self.key = key
        self.oldValue = oldValue
        self.newValue = newValue
        self.origin = origin
        self.instance = instance
        self.time = time
    }

    enum CodingKeys: String, CodingKey {
        case sequence = "seq"
        case key
        case oldValue = "old"
        case newValue = "new"
        case origin
        case instance
        case time
    }

    public func encode(to encoder: any Encoder) throws {
        // Nulls are written out, so that a reader in any language sees every field.
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(sequence, forKey: .sequence)
        try container.encode(key, forKey: .key)
        try container.encode(oldValue, forKey: .oldValue)
        try container.encode(newValue, forKey: .newValue)
        try container.encode(origin, forKey: .origin)
        try container.encode(instance, forKey: .instance)
        try container.encode(time, forKey: .time)
    }
}

/// How much history the journal keeps. A reader that falls further behind than this
/// resynchronises from a snapshot (see ``StorageEvent/isResync``).
public struct JournalLimits: Sendable, Hashable {
    /// At most this many entries.
    public var maximumEntries: Int
    /// At most about this many bytes of keys and values in the journal.
    public var maximumBytes: Int

    public init(maximumEntries: Int = 512, maximumBytes: Int = 256 * 1024) {
        self.maximumEntries = max(1, maximumEntries)
        self.maximumBytes = max(1, maximumBytes)
    }

    func trim(_ journal: inout [JournalEntry]) {
        var excess = journal.count - maximumEntries
        var bytes = 0
        for entry in journal.reversed() {
            bytes += (entry.key?.utf8.count ?? 0) + (entry.oldValue?.utf8.count ?? 0) + (entry.newValue?.utf8.count ?? 0) + 96
        }
        var index = 0
        while index < journal.count - 1, excess > 0 || bytes > maximumBytes {
            let entry = journal[index]
            bytes -= (entry.key?.utf8.count ?? 0) + (entry.oldValue?.utf8.count ?? 0) + (entry.newValue?.utf8.count ?? 0) + 96
            excess -= 1
            index += 1
        }
        if index > 0 { journal.removeFirst(index) }
    }
}
