/// What one process knows of one generation of a log: the values as of the last complete commit
/// it read, where that commit ends, and the recent change records, for readers that replay.
/// Pure: it is fed bytes, and the fuzzer feeds it anything.
struct LogView: Sendable {
    let header: LogFormat.Header
    private(set) var store = ""
    private(set) var recovery: String?
    private(set) var values: [String: String] = [:]
    /// The origin of the last change of each key, where known.
    private(set) var origins: [String: String] = [:]
    /// The sequence number of the last complete commit read (the snapshot's, before any).
    private(set) var sequence: UInt64
    /// The offset after the last complete commit read: where the next commit goes.
    private(set) var offset = LogFormat.headerSize
    private(set) var hasSnapshot = false
    /// The recent records, consecutive, ending at ``sequence``, with their old values.
    private(set) var window: [JournalEntry] = []
    /// The values and origins just before ``window``'s first record, at ``windowBase``.
    private(set) var baseValues: [String: String] = [:]
    private(set) var baseOrigins: [String: String] = [:]
    private(set) var windowBase: UInt64
    /// How many records ``window`` keeps at least; it is cut back to this at twice as many.
    let retention: Int

    init(header: LogFormat.Header, retention: Int) {
        self.header = header
        self.sequence = header.base
        self.windowBase = header.base
        self.retention = max(1, retention)
    }

    /// A whole generation (header and records) read into a view; nil when its header is not valid.
    init?(generation bytes: [UInt8], retention: Int, maximumLength: Int) {
        guard case let .success(header) = bytes.withUnsafeBytes({ LogFormat.decodeHeader($0) }) else { return nil }
        self.init(header: header, retention: retention)
        _ = bytes.withUnsafeBytes { read(UnsafeRawBufferPointer(rebasing: $0[LogFormat.headerSize...]), maximumLength: maximumLength) }
    }

    /// Why reading stopped.
    enum Stop: Sendable, Equatable {
        /// At the end of the bytes, after a complete commit.
        case end
        /// Inside a record or a commit: one being written, or torn by a killed writer.
        case incomplete
        /// At bytes that are not the next record (offset in the file, problem).
        case invalid(at: Int, String)
    }

    /// Applies the complete commits in `bytes`, which are the log's bytes from ``offset`` on,
    /// and returns the records applied and why it stopped. A commit is applied only once its
    /// last record has been read.
    mutating func read(_ bytes: UnsafeRawBufferPointer, maximumLength: Int) -> (applied: [JournalEntry], stop: Stop) {
        var position = 0, committed = 0
        var pending: [LogFormat.Record] = []
        var applied: [JournalEntry] = []
        // The stop's offset, computed before this runs, is the commit in progress's start.
        defer { offset += committed }
        while position < bytes.count {
            switch LogFormat.record(in: bytes, at: position, salt: header.salt, maximumLength: maximumLength) {
            case .incomplete:
                return (applied, .incomplete)
            case let .invalid(problem):
                return (applied, .invalid(at: offset + committed, problem))
            case let .record(record, end):
                // A planted log can start at any number: one that cannot count on is not read on
                // past its last number (its snapshot, which takes none, still is).
                let (expected, overflow) = sequence.addingReportingOverflow(UInt64(pending.count) + 1)
                if overflow, case .change = record.body {
                    return (applied, .invalid(at: offset + committed, "the sequence numbers run out"))
                }
                if let problem = problem(with: record, expected: expected, pending: pending.count) {
                    return (applied, .invalid(at: offset + committed, problem))
                }
                pending.append(record)
                position = end
                if record.flags.contains(.commitEnd) {
                    for record in pending { apply(record, into: &applied) }
                    pending.removeAll()
                    committed = position
                }
            }
        }
        return (applied, pending.isEmpty ? .end : .incomplete)
    }

    private func problem(with record: LogFormat.Record, expected: UInt64, pending: Int) -> String? {
        switch record.body {
        case .snapshot:
            if hasSnapshot || pending > 0 { return "a second snapshot" }
            if record.sequence != header.base { return "the snapshot has sequence \(record.sequence), the header \(header.base)" }
            if !record.flags.contains(.commitEnd) { return "the snapshot does not end its commit" }
        case .change:
            if !hasSnapshot && pending == 0 { return "the first record is not a snapshot" }
            if record.sequence != expected { return "a record has sequence \(record.sequence) where \(expected) comes next" }
        }
        return nil
    }

    private mutating func apply(_ record: LogFormat.Record, into applied: inout [JournalEntry]) {
        switch record.body {
        case let .snapshot(snapshot):
            store = snapshot.store
            recovery = snapshot.recovery
            values = snapshot.values
            origins = snapshot.origins
            baseValues = values
            baseOrigins = origins
            hasSnapshot = true
        case let .change(change):
            let old: String?
            if let key = change.key {
                old = values[key]
                values[key] = change.value
                origins[key] = change.value == nil ? nil : change.origin
            } else {
                old = nil
                values.removeAll()
                origins.removeAll()
            }
            sequence = record.sequence
            let entry = JournalEntry(
                sequence: record.sequence, key: change.key, oldValue: old, newValue: change.value,
                origin: change.origin, instance: change.instance, time: change.time)
            window.append(entry)
            applied.append(entry)
            if window.count >= 2 * retention { trimWindow(to: retention) }
        }
    }

    /// Keeps the last `count` records, moving the base forward over the others.
    private mutating func trimWindow(to count: Int) {
        let dropped = window.count - count
        guard dropped > 0 else { return }
        for record in window[..<dropped] {
            if let key = record.key {
                baseValues[key] = record.newValue
                baseOrigins[key] = record.newValue == nil ? nil : record.origin
            } else {
                baseValues.removeAll()
                baseOrigins.removeAll()
            }
        }
        windowBase = window[dropped - 1].sequence
        window.removeFirst(dropped)
    }

    /// The records after `sequence`, or nil when the window does not reach back that far.
    func records(after sequence: UInt64) -> ArraySlice<JournalEntry>? {
        if sequence >= self.sequence { return [] }
        guard sequence >= windowBase else { return nil }
        return window[Int(sequence - windowBase)...]
    }

    /// A new generation of the same store with this one's values and its last `retained`
    /// records (all of them with nil): the header and records, encoded.
    func compacted(salt: [UInt8], flags: LogFormat.HeaderFlags, retained: Int?) -> [UInt8] {
        var view = self
        view.trimWindow(to: min(retained ?? window.count, window.count))
        var bytes = LogFormat.header(LogFormat.Header(flags: flags, salt: salt, base: view.windowBase))
        let snapshot = LogFormat.Snapshot(store: store, recovery: recovery, values: view.baseValues, origins: view.baseOrigins)
        LogFormat.append(LogFormat.Record(sequence: view.windowBase, flags: [.snapshot, .commitEnd], body: .snapshot(snapshot)), salt: salt, to: &bytes)
        // The retained records as one commit: a reader applies them together.
        LogFormat.append(commit: view.window, salt: salt, to: &bytes)
        return bytes
    }

    /// A generation that starts with `values` at `sequence`, and no records.
    static func fresh(
        salt: [UInt8], flags: LogFormat.HeaderFlags, store: String, sequence: UInt64, values: [String: String],
        origins: [String: String] = [:], recovery: String? = nil
    ) -> [UInt8] {
        var bytes = LogFormat.header(LogFormat.Header(flags: flags, salt: salt, base: sequence))
        let snapshot = LogFormat.Snapshot(store: store, recovery: recovery, values: values, origins: origins)
        LogFormat.append(LogFormat.Record(sequence: sequence, flags: [.snapshot, .commitEnd], body: .snapshot(snapshot)), salt: salt, to: &bytes)
        return bytes
    }
}
