import Foundation
import Testing
@testable import TabSync

/// Issue 16: paths resolved once, the conventional place, messages a person can act on, and
/// transactions that throw the caller's own error.
@Suite struct PathsAndMessagesTests {
    @Test func aRelativePathIsResolvedOnceAndReportedAbsolute() throws {
        let cwd = FileManager.default.currentDirectoryPath
        #expect(try SessionDirectory.absolute("notes") == cwd + "/notes")
        #expect(try SessionDirectory.absolute("./notes") == cwd + "/notes")
        // `~` is a folder name like any other.
        #expect(try SessionDirectory.absolute("~/notes") == cwd + "/~/notes")
        #expect(try SessionDirectory.absolute("/abs/notes") == "/abs/notes")
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        #expect(storage.backend.location.hasPrefix("/"))
    }

    @Test func theConventionalPlaceIsTheRuntimeDirectoryOrAnExplicitFallback() throws {
        #expect(try SessionDirectory.conventionalPath(app: "myapp", fallback: nil, runtimeDirectory: "/run/user/1000") == "/run/user/1000/myapp")
        #expect(try SessionDirectory.conventionalPath(app: "myapp", fallback: "/var/tmp/x", runtimeDirectory: nil) == "/var/tmp/x")
        #expect {
            try SessionDirectory.conventionalPath(app: "myapp", fallback: nil, runtimeDirectory: nil)
        } throws: { error in
            (error as? TabSyncError)?.message.contains("XDG_RUNTIME_DIR") == true
        }
        #expect(throws: TabSyncError.self) { try SessionDirectory.conventionalPath(app: "a/b", fallback: nil, runtimeDirectory: "/run") }
    }

    @Test func aStickyWorldWritableDirectoryIsReportedWithItsWholeMode() throws {
        let directory = TemporaryDirectory()
        try FileManager.default.createDirectory(atPath: directory.path, withIntermediateDirectories: true)
        chmod(directory.path, 0o1777)
        #expect {
            try SessionDirectory(path: directory.path, create: false)
        } throws: { error in
            let error = error as? TabSyncError
            return error?.code == .insecurePath && error?.message.contains("mode 1777") == true && error?.path == directory.path
        }
    }

    @Test func aDirectoryDeletedUnderAWriterIsReportedAsSuch() throws {
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        try storage.set("k", "1")
        try FileManager.default.removeItem(atPath: directory.path)
        #expect {
            try storage.set("k", "2")
        } throws: { error in
            let error = error as? TabSyncError
            return error?.code == .directoryChanged && error?.message.contains("deleted") == true && error?.path == directory.path
        }
    }

    @Test func aTransactionRethrowsTheCallersOwnErrorAndCommitsNothing() throws {
        enum BookingError: Error, Equatable { case soldOut }
        let directory = TemporaryDirectory()
        let storage = try SharedStorage(directory: directory.path, origin: "a")
        try storage.set("seats", "0")
        let before = try storage.snapshot().sequence
        #expect {
            try storage.transaction { (transaction: inout SharedStorage.Transaction) throws(BookingError) in
                transaction.set("note", "tried")
                guard let seats = transaction.values["seats"].flatMap(Int.init), seats > 0 else { throw .soldOut }
                transaction.set("seats", String(seats - 1))
            }
        } throws: { error in
            guard case .aborted(.soldOut)? = error as? TransactionError<BookingError> else { return false }
            return true
        }
        #expect(try storage.get("note") == nil, "rolled back")
        #expect(try storage.snapshot().sequence == before)
    }
}
