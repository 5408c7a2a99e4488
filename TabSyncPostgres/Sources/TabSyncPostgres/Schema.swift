import Foundation
import PostgresNIO
import TabSync

/// The tables of TabSync stores (docs/POSTGRES.md). Every statement names them here.
enum Schema {
    /// The layout version this code reads and writes; a database of a newer one is refused.
    static let version: Int32 = 1

    /// The channel of every store's notifications; the payload names the store.
    static let channel = "tabsync"

    static let create: [String] = [
        """
        CREATE TABLE IF NOT EXISTS tabsync_schema (version integer NOT NULL)
        """,
        """
        CREATE TABLE IF NOT EXISTS tabsync_stores (
            name text PRIMARY KEY,
            store_id text NOT NULL,
            sequence bigint NOT NULL CHECK (sequence >= 0)
        )
        """,
        """
        CREATE TABLE IF NOT EXISTS tabsync_values (
            store text NOT NULL REFERENCES tabsync_stores (name) ON DELETE CASCADE,
            key text NOT NULL,
            value text NOT NULL,
            PRIMARY KEY (store, key)
        )
        """,
        """
        CREATE TABLE IF NOT EXISTS tabsync_changes (
            store text NOT NULL REFERENCES tabsync_stores (name) ON DELETE CASCADE,
            sequence bigint NOT NULL,
            key text,
            old_value text,
            new_value text,
            origin text NOT NULL,
            instance text NOT NULL,
            time_ms bigint NOT NULL,
            PRIMARY KEY (store, sequence)
        )
        """,
    ]

    /// The names of each store's named locks, so that a holder query can list them.
    static let createLocks = """
        CREATE TABLE IF NOT EXISTS tabsync_locks (
            store text NOT NULL,
            name text NOT NULL,
            PRIMARY KEY (store, name)
        )
        """

    /// The advisory-lock key of a store's commit lock or of one of its named locks: FNV-1a (64
    /// bits) of `tabsync:STORE` or `tabsync:STORE:NAME`, as a signed 64-bit integer.
    static func lockKey(store: String, name: String? = nil) -> Int64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in "tabsync:\(store)\(name.map { ":\($0)" } ?? "")".utf8 {
            hash ^= UInt64(byte)
            hash = hash &* 0x0000_0100_0000_01B3
        }
        return Int64(bitPattern: hash)
    }

    /// The holders and waiters of an advisory lock, from `pg_locks` and `pg_stat_activity`.
    static func lockHoldersQuery(key: Int64) -> PostgresQuery {
        let bits = UInt64(bitPattern: key)
        let high = Int64(bits >> 32), low = Int64(bits & 0xFFFF_FFFF)
        return """
            SELECT l.granted, a.pid, coalesce(a.application_name, ''), host(a.client_addr),
                   extract(epoch FROM coalesce(l.waitstart, a.xact_start, a.query_start, a.backend_start))::float8
            FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
            WHERE l.locktype = 'advisory' AND l.classid = \(high)::bigint::oid AND l.objid = \(low)::bigint::oid AND l.objsubid = 1
            ORDER BY l.granted DESC, a.pid
            """
    }
}
