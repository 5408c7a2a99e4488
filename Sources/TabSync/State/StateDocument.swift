import Foundation

/// The state of one storage as format 1 stored it in one file: its values, the sequence number
/// of the last change, and a bounded journal of the most recent changes.
///
/// Format 2 keeps a log instead (docs/FORMAT.md); ``FileBackend`` reads a document once, to
/// upgrade a directory, and ``FileBackend/load()`` gives tools the latest state in this shape.
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

/// How much history a log keeps for readers that fall behind: at least the last
/// `maximumEntries` changes (and about `maximumBytes` of log). Once the log holds more than
/// ``compactionEntries`` changes since its snapshot, or twice `maximumBytes`, the next commit
/// compacts it to a snapshot and the last `maximumEntries` changes. A reader further behind
/// resynchronises (see ``StorageEvent/isResync``).
public struct JournalLimits: Sendable, Hashable {
    /// At least this many changes.
    public var maximumEntries: Int
    /// About this many bytes of log.
    public var maximumBytes: Int

    public init(maximumEntries: Int = 10_000, maximumBytes: Int = 4 << 20) {
        self.maximumEntries = max(1, maximumEntries)
        self.maximumBytes = max(1, maximumBytes)
    }

    /// How many changes the log holds before it is compacted: the history and as many again, or
    /// the history and 1,024 when that is more (at most nine times the history). A compaction
    /// makes every reader read a new generation whole, so a small history is not compacted
    /// every few changes.
    public var compactionEntries: Int {
        maximumEntries + max(maximumEntries, min(1024, 8 * maximumEntries))
    }
}
