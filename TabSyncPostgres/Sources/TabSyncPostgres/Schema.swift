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

    /// The one-round-trip commit (docs/POSTGRES.md, "Commit"): under the store's commit lock,
    /// waited for at most `p_lock_wait`, it applies a transaction's records only if the store is
    /// still at `p_expected` of `p_store_id`, the head the client computed them from. Returns the
    /// new sequence number, or NULL (nothing written) when the head moved or the store is gone.
    /// Its name carries a version: a changed body gets a new name, and older clients keep theirs.
    static let commitFunction = "tabsync_commit_v1"

    static let createCommitFunction = """
        CREATE OR REPLACE FUNCTION tabsync_commit_v1(
            p_store text, p_store_id text, p_expected bigint, p_lock bigint, p_lock_wait text,
            p_records json, p_upserts json, p_deletes json, p_cleared boolean, p_scrub json,
            p_origin text, p_instance text, p_keep bigint)
        RETURNS bigint LANGUAGE plpgsql AS $tabsync$
        DECLARE
            v_id text;
            v_sequence bigint;
            v_head bigint;
        BEGIN
            PERFORM set_config('lock_timeout', p_lock_wait, true);
            PERFORM pg_advisory_xact_lock(p_lock);
            SELECT s.store_id, s.sequence INTO v_id, v_sequence FROM tabsync_stores s WHERE s.name = p_store;
            IF NOT FOUND OR v_id IS DISTINCT FROM p_store_id OR v_sequence <> p_expected THEN
                RETURN NULL;
            END IF;
            v_head := p_expected + json_array_length(p_records);
            IF v_head > p_expected THEN
                INSERT INTO tabsync_changes (store, sequence, key, old_value, new_value, origin, instance, time_ms)
                    SELECT p_store, r.s, r.k, r.o, r.n, p_origin, p_instance, (extract(epoch FROM clock_timestamp()) * 1000)::bigint
                    FROM json_to_recordset(p_records) AS r(s bigint, k text, o text, n text);
                DELETE FROM tabsync_values v WHERE v.store = p_store
                    AND ((p_cleared AND v.key NOT IN (SELECT u.key FROM json_each_text(p_upserts) u))
                         OR v.key IN (SELECT d.value FROM json_array_elements_text(p_deletes) d));
                INSERT INTO tabsync_values (store, key, value) SELECT p_store, u.key, u.value FROM json_each_text(p_upserts) u
                    ON CONFLICT (store, key) DO UPDATE SET value = EXCLUDED.value;
                DELETE FROM tabsync_changes c WHERE c.store = p_store AND c.sequence <= v_head - p_keep;
                UPDATE tabsync_stores s SET sequence = v_head WHERE s.name = p_store;
                PERFORM pg_notify('tabsync', v_head || ' ' || p_instance || ' ' || p_store);
            END IF;
            IF json_array_length(p_scrub) > 0 THEN
                UPDATE tabsync_changes c SET old_value = NULL,
                    new_value = CASE WHEN c.key IS NOT NULL AND c.sequence =
                        (SELECT max(m.sequence) FROM tabsync_changes m WHERE m.store = c.store AND m.key = c.key)
                    THEN c.new_value ELSE NULL END
                WHERE c.store = p_store AND (c.key IS NULL OR c.key IN (SELECT d.value FROM json_array_elements_text(p_scrub) d));
            END IF;
            RETURN v_head;
        END
        $tabsync$
        """

    /// The one-round-trip write of one key (docs/POSTGRES.md, "Commit"): under the store's commit
    /// lock, waited for at most `p_lock_wait`, it sets `p_key` to `p_value` (NULL removes it) at
    /// whatever head it finds, creating the store when there is none: a change, or none when the
    /// key has that value already. Returns the store, the sequence number of the change (or the
    /// current one), the value it replaced and the change's time (NULL when nothing changed).
    static let writeFunction = "tabsync_write_v1"

    static let createWriteFunction = """
        CREATE OR REPLACE FUNCTION tabsync_write_v1(
            p_store text, p_lock bigint, p_lock_wait text, p_key text, p_value text,
            p_origin text, p_instance text, p_keep bigint,
            OUT o_store_id text, OUT o_sequence bigint, OUT o_old_value text, OUT o_time_ms bigint)
        LANGUAGE plpgsql AS $tabsync$
        DECLARE
            v_head bigint;
        BEGIN
            PERFORM set_config('lock_timeout', p_lock_wait, true), pg_advisory_xact_lock(p_lock);
            SELECT s.store_id, s.sequence, v.value INTO o_store_id, v_head, o_old_value
                FROM tabsync_stores s LEFT JOIN tabsync_values v ON v.store = s.name AND v.key = p_key
                WHERE s.name = p_store;
            IF NOT FOUND THEN
                o_store_id := gen_random_uuid()::text;
                v_head := 0;
                INSERT INTO tabsync_stores (name, store_id, sequence) VALUES (p_store, o_store_id, 0);
            END IF;
            o_sequence := v_head;
            IF o_old_value IS NOT DISTINCT FROM p_value THEN
                RETURN;
            END IF;
            o_sequence := v_head + 1;
            o_time_ms := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
            INSERT INTO tabsync_changes (store, sequence, key, old_value, new_value, origin, instance, time_ms)
                VALUES (p_store, o_sequence, p_key, o_old_value, p_value, p_origin, p_instance, o_time_ms);
            IF p_value IS NULL THEN
                DELETE FROM tabsync_values v WHERE v.store = p_store AND v.key = p_key;
            ELSE
                INSERT INTO tabsync_values (store, key, value) VALUES (p_store, p_key, p_value)
                    ON CONFLICT (store, key) DO UPDATE SET value = EXCLUDED.value;
            END IF;
            -- The change that falls out of the history; every 256th change also whatever a
            -- writer with a longer history left. (Deleting the whole range each time walks the
            -- index entries of the changes deleted before, until a vacuum: a third of a write.)
            IF o_sequence % 256 = 0 THEN
                DELETE FROM tabsync_changes c WHERE c.store = p_store AND c.sequence <= o_sequence - p_keep;
            ELSE
                DELETE FROM tabsync_changes c WHERE c.store = p_store AND c.sequence = o_sequence - p_keep;
            END IF;
            UPDATE tabsync_stores s SET sequence = o_sequence WHERE s.name = p_store;
            PERFORM pg_notify('tabsync', o_sequence || ' ' || p_instance || ' ' || p_store);
        END
        $tabsync$
        """

    /// The call of ``writeFunction``, prepared once per connection: store, lock key, lock wait,
    /// key, value, origin, instance, history limit.
    ///
    /// Its numbers come as text: PostgresNIO labels the columns of a statement prepared this way
    /// as text while the server sends them in binary, which text columns survive.
    static let writeStatement = """
        SELECT o_store_id, o_sequence::text, o_old_value, o_time_ms::text FROM tabsync_write_v1($1, $2, $3, $4, $5, $6, $7, $8)
        """

    /// A reader's query (docs/POSTGRES.md, "Reading and wake-ups"), prepared once per connection:
    /// the store's head, and its changes after `$1` when the store is `$3` (or any, with `$2`),
    /// of the store named `$4`. Its numbers come as text, as ``writeStatement``'s.
    static let changesQuery = """
        SELECT s.store_id, s.sequence::text, c.sequence::text, c.key, c.old_value, c.new_value, c.origin, c.instance, c.time_ms::text
        FROM tabsync_stores s
        LEFT JOIN tabsync_changes c ON c.store = s.name AND c.sequence > $1 AND ($2 OR s.store_id = $3)
        WHERE s.name = $4 ORDER BY c.sequence
        """

    /// ``changesQuery``'s parameters: the changes after `sequence` of the store `storeID` (of
    /// any, when nil) named `name`.
    static func changesBinds(after sequence: Int64, of storeID: String?, in name: String) -> [PostgresData] {
        [PostgresData(int64: sequence), PostgresData(bool: storeID == nil), PostgresData(string: storeID ?? ""), PostgresData(string: name)]
    }

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
