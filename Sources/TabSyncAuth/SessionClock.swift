import CKernelClock
import Foundation
import Synchronization

/// The wall clock that session decisions use: deadlines, activity, backoff, token expiry.
///
/// The default, ``system``, reads the kernel's clock directly, which every process of a machine
/// shares, so a process started under a tool that fakes its time (libfaketime) still agrees with
/// the others. Tests and apps with a clock of their own inject one with ``init(_:)``.
public struct SessionClock: Sendable {
    let read: @Sendable () -> Int64

    /// The machine's clock (`clock_gettime(CLOCK_REALTIME)` as a system call).
    public static let system = SessionClock(milliseconds: {
        let now = tabsync_kernel_realtime_ms()
        return now >= 0 ? now : Date().millisecondsSince1970
    })

    /// A clock of the caller's.
    public init(_ now: @escaping @Sendable () -> Date) {
        read = { now().millisecondsSince1970 }
    }

    init(milliseconds: @escaping @Sendable () -> Int64) {
        read = milliseconds
    }

    /// Now, in milliseconds since 1970, within ``SessionLimits``' range.
    var milliseconds: Int64 { min(max(read(), 0), SessionLimits.maximumTime) }

    public var now: Date { Date(milliseconds: milliseconds) }
}

extension AuthSession {
    /// The longest shared backoff after transient refresh failures, in milliseconds.
    static let maximumBackoff: Int64 = 30_000
}

/// Times written into the shared record by another process, another clock: one that lies
/// further in the future than ``tolerance`` is clamped to this process's now when it first sees
/// it, and keeps that clamped value (so a session signed in "ten years from now" still ends).
/// A backoff never lasts longer than ``AuthSession/maximumBackoff`` from now.
final class ClockGuard: Sendable {
    /// How far in the future another process's time may lie before it is not believed.
    static let tolerance: Int64 = 5_000

    private let clamped = Mutex<[Int64: Int64]>([:])

    func trusted(_ time: Int64?, now: Int64) -> Int64? {
        guard let time, time > now + Self.tolerance else { return time }
        return clamped.withLock { memo in
            if let first = memo[time] { return first }
            if memo.count >= 64 { memo.removeAll() }
            memo[time] = now
            return now
        }
    }

    /// The record as this process may act on it: start, activity and backoff times clamped.
    func trusted(_ record: SessionRecord, now: Int64) -> SessionRecord {
        var record = record
        record.startedAt = trusted(record.startedAt, now: now)
        record.lastActivity = trusted(record.lastActivity, now: now)
        if let until = record.backoffUntil {
            // A backoff beyond its maximum was written by a wrong clock: it is not believed at all.
            record.backoffUntil = until > now + AuthSession.maximumBackoff + Self.tolerance ? nil : until
        }
        return record
    }
}
