import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A really full file system: a small tmpfs filled to the last page. (The RLIMIT_FSIZE case is
/// StorageAcrossProcessesTests.aFullDiskFailsTheCommitCleanlyAndOthersKeepWorking.)
@Suite(.serialized, .timeLimit(.minutes(2)))
struct WriteFailureTests {
    @Test(.enabled(if: canMountTmpfs, "mounting a tmpfs needs root and a container that allows mount(2)"))
    func aFullFileSystemFailsTheCommitKeepsTheStateAndRecoversWhenSpaceIsBack() async throws {
        let mountPoint = try Self.mountSmallTmpfs("tmpfs")
        defer { Self.unmount(mountPoint) }
        let directory = "\(mountPoint)/session"
        let writer = try await launchTab(name: "writer", directory: directory)
        let reader = try await launchTab(name: "reader", directory: directory)
        defer { writer.stop(); reader.stop() }
        let committed = try await writer.command("set k before")
        #expect(committed.type == "ok")
        try await reader.waitFor("the first change") { $0.type == "storage" && $0.string("key") == "k" }
        let before = try checkLog("\(directory)/app.log")

        // Fill every remaining page of the file system.
        let filler = "\(mountPoint)/filler"
        Self.fill(filler)

        // The commit fails with a clear error naming the file it could not write.
        let failed = try await writer.command("set k \(String(repeating: "x", count: 8192))")
        #expect(failed.type == "error")
        #expect(failed.string("code") == "storageFull")
        #expect(failed.string("message")?.contains(directory) == true, "the message names the path: \(failed)")
        // The previous state is intact and readable, by the writer and by the other process; the
        // failed append left no tail.
        let after = try checkLog("\(directory)/app.log")
        #expect(after.values == before.values && after.tail == 0)
        #expect(try await writer.command("get k").string("value") == "before")
        #expect(try await reader.command("get k").string("value") == "before")
        // The other process keeps running and sees no change that did not happen.
        #expect(reader.storageEvents.count == 1)
        #expect(reader.unsolicitedErrors.isEmpty)

        // Space is back: writing works again, and the reader sees the change.
        #expect(unlink(filler) == 0)
        let again = try await writer.command("set k after")
        #expect(again.type == "ok")
        #expect(again.seq == 2)
        try await reader.waitFor("the change after space came back") { $0.type == "storage" && $0.string("newValue") == "after" }
        #expect(!FileManager.default.fileExists(atPath: "\(directory)/app.log.tmp") && !FileManager.default.fileExists(atPath: "\(directory)/.compacting/app.log.tmp"))
    }

    /// The same full file system, while the log is compacted (every 32 changes with a history of
    /// 4): a commit fails cleanly or goes in, and a compaction that cannot write its new
    /// generation leaves the log as it was. Nothing acknowledged is lost, and once space is back
    /// the log is compacted again.
    @Test(.enabled(if: canMountTmpfs, "mounting a tmpfs needs root and a container that allows mount(2)"))
    func aFullFileSystemDuringCompactionsLosesNoAcknowledgedChange() async throws {
        let mountPoint = try Self.mountSmallTmpfs("tmpfs-compaction")
        defer { Self.unmount(mountPoint) }
        let directory = "\(mountPoint)/session"
        let writer = try await launchTab(name: "writer", directory: directory, extra: ["--history", "4"])
        let reader = try await launchTab(name: "reader", directory: directory, extra: ["--history", "4"])
        defer { writer.stop(); reader.stop() }
        // A log of a few pages, so that an append often fits in its last page while a new
        // generation (a new file) needs pages of its own.
        let value = String(repeating: "v", count: 1500)
        for index in 0..<6 { #expect(try await writer.command("set k\(index) \(value)").type == "ok") }

        let filler = "\(mountPoint)/filler"
        Self.fill(filler)

        var acknowledged: [String: String] = [:]
        for index in 0..<100 {
            let reply = try await writer.command("set small\(index % 3) \(index)")
            if reply.type == "ok" {
                acknowledged["small\(index % 3)"] = "\(index)"
            } else {
                #expect(reply.string("code") == "storageFull", "only a full disk fails a commit: \(reply)")
            }
        }
        #expect(unlink(filler) == 0)
        #expect(try await writer.command("set done yes").type == "ok")
        try await reader.waitFor("the last change") { $0.type == "storage" && $0.string("key") == "done" }
        let log = try checkLog("\(directory)/app.log")
        for (key, value) in acknowledged { #expect(log.values[key] == value, "\(key) holds its last acknowledged value") }
        for (key, value) in acknowledged { #expect(try await reader.command("get \(key)").string("value") == value) }
        #expect(reader.unsolicitedErrors.isEmpty, "\(reader.unsolicitedErrors.prefix(3))")
        #expect(!FileManager.default.fileExists(atPath: "\(directory)/app.log.tmp") && !FileManager.default.fileExists(atPath: "\(directory)/.compacting/app.log.tmp"))
        // Compacted again: no more than the snapshot and the 36 changes (4 + 32) of a history of 4.
        #expect(log.sequence - (try logBase("\(directory)/app.log")) <= 36)
    }

    /// A 512 KiB tmpfs on a new directory; checked to be that small, so that nothing else is ever filled.
    static func mountSmallTmpfs(_ name: String) throws -> String {
        let mountPoint = temporaryDirectory(name)
        try #require(mkdir(mountPoint, 0o700) == 0)
        guard shell("mount -t tmpfs -o size=512k,mode=0700 tmpfs '\(mountPoint)'") == 0 else {
            rmdir(mountPoint)
            throw TestFailure("could not mount a 512 KiB tmpfs on \(mountPoint)")
        }
        var fileSystem = statvfs()
        guard statvfs(mountPoint, &fileSystem) == 0, Int(fileSystem.f_blocks) * Int(fileSystem.f_frsize) <= 1 << 20 else {
            unmount(mountPoint)
            throw TestFailure("\(mountPoint) is not the small tmpfs")
        }
        return mountPoint
    }

    static func unmount(_ mountPoint: String) {
        shell("umount -l '\(mountPoint)'")
        rmdir(mountPoint)
    }

    /// Fills every remaining page of the file system with `filler`.
    static func fill(_ filler: String) {
        let fd = open(filler, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        #expect(fd >= 0)
        let chunk = [UInt8](repeating: 0x55, count: 4096)
        var filled = 0
        while filled < 1 << 20, case let written = write(fd, chunk, chunk.count), written > 0 { filled += written }
        #expect(errno == ENOSPC, "the tmpfs is full after \(filled) bytes")
        close(fd)
    }
}
