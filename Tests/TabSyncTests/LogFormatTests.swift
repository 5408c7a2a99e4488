import Foundation
import Testing
@testable import TabSync

/// The change log's records (format 2, docs/FORMAT.md §2): what is written reads back, and what
/// is torn, foreign or absurd never reads as a record.
@Suite struct LogFormatTests {
    static let salt = Array(0..<16).map(UInt8.init)

    /// A generation with a snapshot and `commits` one-change commits on key "k".
    static func log(commits: Int, salt: [UInt8] = salt) -> [UInt8] {
        var bytes = LogView.fresh(salt: salt, flags: [], store: "s", sequence: 7, values: ["a": "1"], origins: ["a": "o"])
        for index in 1...max(1, commits) where commits > 0 {
            let change = LogFormat.Change(key: "k", value: "v\(index)", origin: "o", instance: "i", time: 1_767_225_600_000)
            LogFormat.append(LogFormat.Record(sequence: 7 + UInt64(index), flags: .commitEnd, body: .change(change)), salt: salt, to: &bytes)
        }
        return bytes
    }

    static func read(_ bytes: [UInt8]) throws -> (LogView, [ChangeRecord], LogView.Stop) {
        let header = try bytes.withUnsafeBytes { try LogFormat.decodeHeader($0).get() }
        var view = LogView(header: header, retention: 100)
        let (applied, stop) = bytes.withUnsafeBytes { view.read(UnsafeRawBufferPointer(rebasing: $0[LogFormat.headerSize...]), maximumLength: 1 << 20) }
        return (view, applied, stop)
    }

    @Test func whatIsWrittenReadsBackWithOldValues() throws {
        let (view, applied, stop) = try Self.read(Self.log(commits: 3))
        #expect(stop == .end)
        #expect(view.store == "s" && view.sequence == 10 && view.values == ["a": "1", "k": "v3"])
        #expect(applied.map(\.sequence) == [8, 9, 10])
        #expect(applied.map(\.oldValue) == [nil, "v1", "v2"])
        #expect(view.offset == Self.log(commits: 3).count)
    }

    /// Every prefix of a log (a writer killed at any byte of an append) reads as the commits
    /// that are complete in it, and no more.
    @Test func everyPrefixReadsAsItsCompleteCommits() throws {
        let full = Self.log(commits: 3)
        let ends = try (0...3).map { try Self.read(Self.log(commits: $0)).0.offset }
        for length in ends[0]...full.count {
            let (view, _, stop) = try Self.read(Array(full[..<length]))
            let complete = ends.lastIndex { $0 <= length }!
            #expect(view.sequence == 7 + UInt64(complete), "prefix of \(length) bytes")
            #expect(stop == (ends.contains(length) ? .end : .incomplete), "prefix of \(length) bytes")
        }
    }

    /// A commit of several records is applied whole or not at all.
    @Test func aCommitOfSeveralRecordsIsAppliedWholeOrNotAtAll() throws {
        var bytes = Self.log(commits: 0)
        let start = bytes.count
        for (index, key) in ["x", "y", "z"].enumerated() {
            let change = LogFormat.Change(key: key, value: "1", origin: "o", instance: "i", time: 0)
            LogFormat.append(LogFormat.Record(sequence: 8 + UInt64(index), flags: index == 2 ? .commitEnd : [], body: .change(change)), salt: Self.salt, to: &bytes)
        }
        for length in start..<bytes.count {
            let (view, applied, _) = try Self.read(Array(bytes[..<length]))
            #expect(applied.isEmpty && view.sequence == 7 && view.offset == start)
        }
        #expect(try Self.read(bytes).0.values == ["a": "1", "x": "1", "y": "1", "z": "1"])
    }

    /// Bytes of another generation (another salt) never check, even where they would fit.
    @Test func recordsOfAnotherGenerationDoNotCheck() throws {
        let ours = Self.log(commits: 1)
        let theirs = Self.log(commits: 2, salt: Array(repeating: 9, count: 16))
        // Our generation, followed by the tail of theirs (as stale blocks after a power loss).
        let mixed = ours + theirs[ours.count...]
        let (view, _, stop) = try Self.read(mixed)
        #expect(view.sequence == 8)
        guard case .invalid = stop else { Issue.record("stale bytes read as a record: \(stop)"); return }
    }

    @Test func everyFlippedBitIsRefused() throws {
        let full = Self.log(commits: 1)
        let snapshotEnd = try Self.read(Self.log(commits: 0)).0.offset
        for index in snapshotEnd..<full.count {
            for bit in 0..<8 {
                var damaged = full
                damaged[index] ^= 1 << bit
                let (view, _, _) = try Self.read(damaged)
                #expect(view.sequence == 7, "byte \(index) bit \(bit)")
            }
        }
    }

    /// A record claiming 4 GiB is refused at once, before anything is allocated for it.
    @Test func anAbsurdLengthIsRefusedNotAllocated() throws {
        var bytes = Self.log(commits: 0)
        bytes += [0xFF, 0xFF, 0xFF, 0xFF] + Array(repeating: 0, count: 12)
        let (_, _, stop) = try Self.read(bytes)
        guard case let .invalid(_, problem) = stop else { Issue.record("\(stop)"); return }
        #expect(problem.contains("4294967295"))
    }

    @Test func foreignAndFutureHeadersAreToldApart() {
        let good = Self.log(commits: 0)
        var future = good
        future[12] = 3
        var garbage = good
        garbage[0] = UInt8(ascii: "X")
        #expect(future.withUnsafeBytes { LogFormat.decodeHeader($0) } == .failure(.version(3)))
        guard case .failure(.foreign) = garbage.withUnsafeBytes({ LogFormat.decodeHeader($0) }) else { Issue.record("garbage accepted"); return }
        #expect(Array(good.prefix(20)).withUnsafeBytes { LogFormat.decodeHeader($0) } == .failure(.short))
    }

    /// Sequence numbers go on by one; anything else is not the next record.
    @Test func aGapInSequenceNumbersStopsTheRead() throws {
        var bytes = Self.log(commits: 1)
        let change = LogFormat.Change(key: "k", value: "late", origin: "o", instance: "i", time: 0)
        LogFormat.append(LogFormat.Record(sequence: 10, flags: .commitEnd, body: .change(change)), salt: Self.salt, to: &bytes)
        let (view, _, stop) = try Self.read(bytes)
        #expect(view.sequence == 8)
        guard case let .invalid(_, problem) = stop else { Issue.record("\(stop)"); return }
        #expect(problem.contains("sequence 10 where 9"))
    }

    /// A compacted generation keeps the values and the last records, and reads back the same.
    @Test func aCompactedGenerationHasTheSameValuesAndTheRetainedRecords() throws {
        let (view, _, _) = try Self.read(Self.log(commits: 30))
        let compacted = view.compacted(salt: Array(repeating: 5, count: 16), flags: [], retained: 10)
        let (again, _, stop) = try Self.read(compacted)
        #expect(stop == .end)
        #expect(again.values == view.values && again.sequence == view.sequence && again.store == view.store)
        #expect(again.records(after: 34)?.map(\.newValue) == ["v28", "v29", "v30"])
        #expect(again.records(after: 34)?.map(\.oldValue) == ["v27", "v28", "v29"])
        #expect(again.records(after: 27)?.count == 10 && again.records(after: 26) == nil)
    }

    /// A planted log whose sequence numbers cannot count on (found by scripts/fuzz: it trapped
    /// with an arithmetic overflow) stops the read instead.
    @Test func aLogAtTheLastSequenceNumberStopsTheReadNotTheProcess() throws {
        var bytes = LogView.fresh(salt: Self.salt, flags: [], store: "s", sequence: .max, values: [:])
        let change = LogFormat.Change(key: "k", value: "v", origin: "o", instance: "i", time: 0)
        LogFormat.append(LogFormat.Record(sequence: 0, flags: .commitEnd, body: .change(change)), salt: Self.salt, to: &bytes)
        let (view, _, stop) = try Self.read(bytes)
        #expect(view.sequence == .max)
        guard case let .invalid(_, problem) = stop else { Issue.record("\(stop)"); return }
        #expect(problem.contains("run out"))
    }
}
