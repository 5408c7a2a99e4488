// The TabSync side of the benchmark: one role per process, started by Benchmarks/driver.py.
// The roles and their options are those of the C baseline (Benchmarks/baseline/raw.c):
//
//   tabsync-bench writer     --dir D --ack FIFO --readers N --changes K [--durability none|file|full]
//   tabsync-bench reader     --dir D --ack FIFO --changes K --out FILE
//   tabsync-bench inline-reader (the same, with onNotification instead of events())
//   tabsync-bench idle       --dir D --ack FIFO
//   tabsync-bench throughput --dir D --start-at MONO_NS --seconds S [--durability none|file|full] [--key K]
//   tabsync-bench bare-idle  --dir D --ack FIFO  (no storage: an async Swift process waiting on a stream)
//   tabsync-bench fill       --dir D --changes K [--durability none|file|full]
//
// Every role also takes --journal-entries N (default: TabSync's 512), to see what the journal costs,
// and --postgres URL --store NAME in place of --dir, for the store on PostgreSQL (TabSyncPostgres;
// the password in PGPASSWORD).
//
// `fill` commits K changes before a measurement, so that the journal is as full as in a session
// that has been in use for a while (512 entries by default) rather than empty.
//
// The writer stamps CLOCK_MONOTONIC (one clock for every process of the machine) into the
// value just before `set`; a reader's sample is the time its `events()` loop got the event
// minus that stamp. The writer waits until every reader has acknowledged a change (one byte
// each on the ack FIFO) before it commits the next one.
import Foundation
import TabSync
import TabSyncPostgres

#if canImport(Glibc)
import Glibc
#endif

func now() -> Int64 {
    var time = timespec()
    clock_gettime(CLOCK_MONOTONIC, &time)
    return Int64(time.tv_sec) * 1_000_000_000 + Int64(time.tv_nsec)
}

func fail(_ message: String) -> Never {
    FileHandle.standardError.write(Data("tabsync-bench: \(message)\n".utf8))
    exit(1)
}

struct Options {
    var role = ""
    var dir = ""
    var ack: String?
    var out: String?
    var readers = 1
    var changes = 0
    var seconds = 0
    var startAt: Int64 = 0
    var key = "stamp"
    var durability = Durability.file
    var journalEntries: Int?
    var postgres: String?
    var store = "bench"

    init(_ arguments: [String]) {
        guard arguments.count >= 2 else { fail("usage: tabsync-bench writer|reader|idle|throughput [options]") }
        role = arguments[1]
        var rest = arguments.dropFirst(2).makeIterator()
        while let name = rest.next() {
            guard let value = rest.next() else { fail("\(name) needs a value") }
            switch name {
            case "--dir": dir = value
            case "--ack": ack = value
            case "--out": out = value
            case "--readers": readers = Int(value) ?? 1
            case "--changes": changes = Int(value) ?? 0
            case "--seconds": seconds = Int(value) ?? 0
            case "--start-at": startAt = Int64(value) ?? 0
            case "--key": key = value
            case "--journal-entries": journalEntries = Int(value)
            case "--postgres": postgres = value
            case "--store": store = value
            case "--durability":
                guard let setting = Durability(rawValue: value) else { fail("--durability must be none, file or full") }
                durability = setting
            default: fail("unknown option \(name)")
            }
        }
        guard !dir.isEmpty || postgres != nil else { fail("--dir or --postgres is required") }
    }
}

/// The ack FIFO: readers write one byte per delivered change, the writer reads them.
struct AckPipe {
    let descriptor: Int32

    init(path: String, forWriting: Bool) {
        descriptor = open(path, (forWriting ? O_WRONLY : O_RDWR) | O_CLOEXEC)
        if descriptor < 0 { fail("cannot open \(path): \(String(cString: strerror(errno)))") }
    }

    func send() {
        var byte: UInt8 = 1
        while write(descriptor, &byte, 1) != 1 {
            if errno != EINTR { fail("ack write: \(String(cString: strerror(errno)))") }
        }
    }

    func receive(_ count: Int) {
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let got = bytes.withUnsafeMutableBytes { read(descriptor, $0.baseAddress! + done, count - done) }
            if got < 0, errno == EINTR { continue }
            if got <= 0 { fail("the ack pipe ended") }
            done += got
        }
    }
}

func required(_ value: String?, _ name: String) -> String {
    guard let value else { fail("\(name) is required") }
    return value
}

func openStorage(_ options: Options, origin: String) -> SharedStorage {
    var settings = SharedStorage.Options()
    settings.durability = options.durability
    if let entries = options.journalEntries {
        settings.journalLimits = JournalLimits(maximumEntries: entries)
    }
    do {
        if let url = options.postgres {
            let configuration = try PostgresConfiguration(url: url, password: ProcessInfo.processInfo.environment["PGPASSWORD"])
            let backend = try PostgresBackend(configuration: configuration, store: options.store, origin: origin)
            return try SharedStorage(backend: backend, origin: origin, options: settings)
        }
        return try SharedStorage(directory: options.dir, name: "bench", origin: origin, options: settings)
    } catch {
        fail("cannot open the storage: \(error)")
    }
}

func writer(_ options: Options) {
    let storage = openStorage(options, origin: "writer")
    let ack = AckPipe(path: required(options.ack, "--ack"), forWriting: false)
    ack.receive(options.readers)
    for _ in 0..<options.changes {
        do {
            try storage.set("stamp", String(now()))
        } catch {
            fail("set failed: \(error)")
        }
        ack.receive(options.readers)
    }
}

/// The reader with ``SharedStorage/onNotification(includingOwnChanges:_:)``: each change is taken
/// on the watcher thread, without the hop to the task that `events()` takes.
func inlineReader(_ options: Options) {
    let storage = openStorage(options, origin: "reader-\(getpid())")
    let ack = AckPipe(path: required(options.ack, "--ack"), forWriting: true)
    let done = DispatchSemaphore(value: 0)
    final class Samples: @unchecked Sendable {
        var values: [Int64] = []
        var last: UInt64 = 0
    }
    let samples = Samples()
    samples.values.reserveCapacity(options.changes)
    let subscription = storage.onNotification { notification in
        guard case let .change(event) = notification, samples.values.count < options.changes else { return }
        let delivered = now()
        guard let value = event.newValue, let stamp = Int64(value) else { fail("unexpected event \(event)") }
        if event.isResync { fail("resynchronised at \(event.sequence): a change was not delivered from the log") }
        if event.sequence <= samples.last { fail("sequence went from \(samples.last) to \(event.sequence)") }
        samples.last = event.sequence
        samples.values.append(delivered - stamp)
        ack.send()
        if samples.values.count == options.changes { done.signal() }
    }
    ack.send()  // watching: the subscription exists, so no later change can be missed
    done.wait()
    subscription.cancel()
    let text = samples.values.map(String.init).joined(separator: "\n") + "\n"
    guard FileManager.default.createFile(atPath: required(options.out, "--out"), contents: Data(text.utf8)) else {
        fail("cannot write \(options.out!)")
    }
    writeCPUTime(to: options.out! + ".cpu")
    storage.close()
}

func reader(_ options: Options) async {
    let storage = openStorage(options, origin: "reader-\(getpid())")
    let events = storage.events()
    let ack = AckPipe(path: required(options.ack, "--ack"), forWriting: true)
    var samples: [Int64] = []
    samples.reserveCapacity(options.changes)
    var last: UInt64 = 0
    ack.send()  // watching: the stream exists, so no later change can be missed
    for await event in events {
        let delivered = now()
        guard let value = event.newValue, let stamp = Int64(value) else { fail("unexpected event \(event)") }
        if event.isResync { fail("resynchronised at \(event.sequence): a change was not delivered from the log") }
        if event.sequence <= last { fail("sequence went from \(last) to \(event.sequence)") }
        last = event.sequence
        samples.append(delivered - stamp)
        ack.send()
        if samples.count >= options.changes { break }
    }
    let text = samples.map(String.init).joined(separator: "\n") + "\n"
    guard FileManager.default.createFile(atPath: required(options.out, "--out"), contents: Data(text.utf8)) else {
        fail("cannot write \(options.out!)")
    }
    writeCPUTime(to: options.out! + ".cpu")
    storage.close()
}

/// The process's CPU time so far (user and system, nanoseconds), for the CPU cost per change.
func writeCPUTime(to path: String) {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    let nanoseconds = (Int64(usage.ru_utime.tv_sec) + Int64(usage.ru_stime.tv_sec)) * 1_000_000_000
        + (Int64(usage.ru_utime.tv_usec) + Int64(usage.ru_stime.tv_usec)) * 1000
    _ = FileManager.default.createFile(atPath: path, contents: Data("\(nanoseconds)\n".utf8))
}

func idle(_ options: Options) async {
    let storage = openStorage(options, origin: "idle-\(getpid())")
    let events = storage.events()
    AckPipe(path: required(options.ack, "--ack"), forWriting: true).send()
    for await _ in events {}
}

/// The floor under `idle`: what the Swift runtime itself costs a process that awaits a stream
/// that never yields (the concurrency runtime keeps a 1 s Dispatch timer).
func bareIdle(_ options: Options) async {
    let (stream, continuation) = AsyncStream.makeStream(of: Int.self)
    AckPipe(path: required(options.ack, "--ack"), forWriting: true).send()
    for await _ in stream {}
    continuation.finish()
}

func throughput(_ options: Options) {
    let storage = openStorage(options, origin: "throughput-\(getpid())")
    let wait = options.startAt - now()
    if wait > 0 { usleep(UInt32(wait / 1000)) }
    let end = options.startAt + Int64(options.seconds) * 1_000_000_000
    var count = 0
    var time = now()
    while time < end {
        do {
            try storage.set(options.key, String(count))
        } catch {
            fail("set failed: \(error)")
        }
        count += 1
        time = now()
    }
    print(count, time - options.startAt)
}

func fill(_ options: Options) {
    let storage = openStorage(options, origin: "fill")
    for _ in 0..<options.changes {
        do {
            try storage.set("stamp", String(now()))
        } catch {
            fail("set failed: \(error)")
        }
    }
}

let options = Options(CommandLine.arguments)
switch options.role {
case "writer": writer(options)
case "reader": await reader(options)
case "inline-reader": inlineReader(options)
case "idle": await idle(options)
case "bare-idle": await bareIdle(options)
case "throughput": throughput(options)
case "fill": fill(options)
default: fail("unknown role \(options.role)")
}
