//! The SQLite [`Store`]: `dir/chat.db` on a dedicated thread.
//!
//! The event loop never touches the database after startup. It sends [`StoreReq`]s over a
//! channel, a loop turn's worth per message: one wake-up of this thread per turn rather than
//! one per chat message (on a shared core every wake-up preempted the loop and committed a
//! one-row transaction). The store thread takes everything queued, applies it in one transaction (group
//! commit), commits, and reports the results of any queries in that batch followed by the
//! highest committed write sequence number. Queries run inside the batch after the writes
//! queued before them, so a query sees everything the loop accepted before sending it.
//!
//! The schema is versioned with `PRAGMA user_version` (see [`SCHEMA_VERSION`] and
//! [`MIGRATIONS`]): opening a database migrates it forward, one transaction per version.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{
    next_batch, ChangeItem, ChangeKind, Channels, Durability, Loaded, LoadedUser, Query, Store,
    StoreError, StoreEvent, StoreReq, StoredMessage, Target, UserChange, Write,
};
use crate::chat::protocol::ChatMessage;
use crate::chat::Wake;

/// How often the store thread looks at `admin_changes` for accounts changed by an operator
/// command (`parlor user …`) in another process. The bound on how long a disabled user or a
/// changed password goes unnoticed by a running server; a poll with nothing new is one
/// index lookup.
pub const CHANGE_POLL: Duration = Duration::from_millis(250);

/// How long a connection waits for another process's write lock before a statement fails
/// with `SQLITE_BUSY`. The server and `parlor user …` both write; each holds the lock for one
/// short transaction.
pub const BUSY_WAIT: Duration = Duration::from_secs(10);

/// Version 1: the schema as first shipped (commit e05a242), before versioning: such a
/// database has `user_version` 0.
const SCHEMA_V1: &str = "
CREATE TABLE users (
    key TEXT PRIMARY KEY, name TEXT NOT NULL, nick TEXT NOT NULL, phc TEXT NOT NULL,
    created INTEGER NOT NULL, last_seen INTEGER);
CREATE TABLE sessions (
    hash BLOB PRIMARY KEY, user_key TEXT NOT NULL, created INTEGER NOT NULL);
CREATE TABLE rooms (name TEXT PRIMARY KEY, created INTEGER NOT NULL);
CREATE TABLE members (
    room TEXT NOT NULL, user_key TEXT NOT NULL, PRIMARY KEY (room, user_key)) WITHOUT ROWID;
CREATE TABLE dm_pairs (
    a TEXT NOT NULL, b TEXT NOT NULL, PRIMARY KEY (a, b)) WITHOUT ROWID;
CREATE TABLE messages (
    id INTEGER PRIMARY KEY, room TEXT, dm TEXT, from_name TEXT NOT NULL, to_name TEXT,
    nick TEXT NOT NULL, text TEXT NOT NULL, ts INTEGER NOT NULL);
CREATE INDEX messages_room ON messages (room, id);
CREATE INDEX messages_dm ON messages (dm, id);
CREATE TABLE meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
";

/// Version 2: refs of recent messages for retry deduplication across restarts, and the last
/// use of a session (`--session-ttl`). `IF NOT EXISTS` (and the column check in
/// [`to_v2`]) because a database written between the two changes and versioning may hold
/// part of it already.
const SCHEMA_V2: &str = "
CREATE TABLE IF NOT EXISTS dedup (
    user_key TEXT NOT NULL, ref TEXT NOT NULL, id INTEGER NOT NULL, ts INTEGER NOT NULL,
    PRIMARY KEY (user_key, ref)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_ts ON dedup (ts);
";

/// Version 3: accounts an operator disabled (`parlor user disable`), and the log of operator
/// account changes that a running server polls (see [`CHANGE_POLL`]).
const SCHEMA_V3: &str = "
ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;
CREATE TABLE admin_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, user_key TEXT NOT NULL, kind TEXT NOT NULL,
    ts INTEGER NOT NULL);
";

/// Version 4 (after the users' `disabled` column of version 3): messages that change — replies,
/// edits with their history, deletes, reactions — and the change-event log `catchup` reads.
/// `events` holds edits, deletes and reactions only: a new message's event is its row in
/// `messages` (its `seq` is its `id`).
const SCHEMA_V4: &str = "
ALTER TABLE messages ADD COLUMN reply_to INTEGER;
ALTER TABLE messages ADD COLUMN edited_ts INTEGER;
ALTER TABLE messages ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN edits INTEGER NOT NULL DEFAULT 0;
CREATE TABLE edits (msg_id INTEGER NOT NULL, text TEXT NOT NULL, ts INTEGER NOT NULL);
CREATE INDEX edits_msg ON edits (msg_id);
CREATE TABLE reactions (
    msg_id INTEGER NOT NULL, emoji TEXT NOT NULL, user TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (msg_id, emoji, user)) WITHOUT ROWID;
CREATE TABLE events (
    seq INTEGER PRIMARY KEY, conv TEXT NOT NULL, kind INTEGER NOT NULL, msg_id INTEGER NOT NULL,
    user TEXT, emoji TEXT, on_ INTEGER, ts INTEGER NOT NULL);
CREATE INDEX events_conv ON events (conv, seq);
CREATE INDEX events_ts ON events (ts);
";

/// `events.kind`.
const EV_EDITED: i64 = 1;
const EV_DELETED: i64 = 2;
const EV_REACTION: i64 = 3;

/// `meta` key: the highest `seq` of a change event that was pruned (catch-up from before it
/// is a reset).
const EVENTS_HORIZON: &str = "events_horizon";

fn to_v4(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA_V4)
}

/// Version 5: read markers and notification levels per user and conversation, and full-text
/// search. Existing memberships start read up to their room's newest message (nothing old is
/// suddenly "unread"). `messages_fts` is an external-content FTS5 index of `messages.text`,
/// kept by triggers (an edit or delete rewrites `text`, so the index follows), with
/// diacritics-insensitive tokens and FTS5's `secure-delete` so a deleted text's words leave the
/// index at once rather than at the next segment merge.
const SCHEMA_V5: &str = "
CREATE TABLE conv_state (
    user_key TEXT NOT NULL, conv TEXT NOT NULL, read_id INTEGER NOT NULL DEFAULT 0, notify TEXT,
    PRIMARY KEY (user_key, conv)) WITHOUT ROWID;
INSERT INTO conv_state (user_key, conv, read_id)
    SELECT m.user_key, m.room, COALESCE((SELECT MAX(id) FROM messages WHERE room = m.room), 0)
    FROM members m;
CREATE VIRTUAL TABLE messages_fts USING fts5(
    text, content='messages', content_rowid='id',
    tokenize='unicode61 remove_diacritics 2', prefix='2 3');
INSERT INTO messages_fts (messages_fts, rank) VALUES ('secure-delete', 1);
CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts (rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
CREATE TRIGGER messages_fts_update AFTER UPDATE OF text ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', old.id, old.text);
    INSERT INTO messages_fts (rowid, text) VALUES (new.id, new.text);
END;
INSERT INTO messages_fts (messages_fts) VALUES ('rebuild');
";

fn to_v5(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA_V5)
}

/// Version 6: new messages are no longer indexed by a per-row trigger but by the store thread,
/// once per batch ([`FtsPending`]). FTS5 flushes its pending index at every statement's
/// savepoint, so the trigger wrote an index segment per message: in the fan-out benchmark
/// that was ~19 ns per delivery, half the store thread's CPU (profile in BENCHMARKS.md).
const SCHEMA_V6: &str = "DROP TRIGGER messages_fts_insert;";

fn to_v6(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA_V6)
}

/// Version 7, three changes that together took 38 % off the store thread's CPU per
/// message (docs/BENCHMARKS.md):
/// - `meta.fts_upto`, the highest message id in `messages_fts`. New messages are indexed a
///   few thousand at a time rather than once per batch ([`FtsPending`]); this is how a start
///   after a crash knows which ones to index. Every message is indexed at version 6.
/// - `messages_room` and `messages_dm` become partial indexes: a room message has no `dm`
///   and a DM no `room`, so every insert also wrote a NULL entry into the other index, which
///   no query reads (they all ask `room = ?` or `dm = ?`, which SQLite matches to a partial
///   index on `IS NOT NULL`; a test checks the plans).
/// - `dedup` is keyed by message id (each message has at most one ref) instead of by
///   `(user_key, ref)` with a second index on `ts`: a new ref is appended at the table's right
///   edge, one b-tree instead of two, each a search by string key. Uniqueness of a user's
///   refs is the chat core's (it answers a retry before writing anything); expiry deletes a
///   prefix of ids ([`PRUNE_DEDUP`]).
const SCHEMA_V7: &str = "
INSERT OR REPLACE INTO meta (k, v) SELECT 'fts_upto', COALESCE(MAX(id), 0) FROM messages;
DROP INDEX messages_room;
DROP INDEX messages_dm;
CREATE INDEX messages_room ON messages (room, id) WHERE room IS NOT NULL;
CREATE INDEX messages_dm ON messages (dm, id) WHERE dm IS NOT NULL;
CREATE TABLE dedup_v7 (
    id INTEGER PRIMARY KEY, user_key TEXT NOT NULL, ref TEXT NOT NULL, ts INTEGER NOT NULL);
INSERT OR IGNORE INTO dedup_v7 (id, user_key, ref, ts) SELECT id, user_key, ref, ts FROM dedup;
DROP TABLE dedup;
ALTER TABLE dedup_v7 RENAME TO dedup;
";

/// Forgets retry refs older than `?1` (ms): every row below the first id whose `ts` is
/// recent. Ids follow time, so that is the old ones; were the clock to step back, a few old
/// refs would stay a little longer (and be loaded at a start), never a recent one go early.
/// The scan in id order stops at the first recent row, so it costs what it deletes.
const PRUNE_DEDUP: &str = "DELETE FROM dedup WHERE id < COALESCE(
    (SELECT id FROM dedup WHERE ts >= ?1 ORDER BY id LIMIT 1),
    (SELECT MAX(id) FROM dedup) + 1)";

fn to_v7(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA_V7)
}

/// `meta` key: the highest message id indexed for search (see [`SCHEMA_V7`]).
const FTS_UPTO: &str = "fts_upto";

/// Messages gathered before [`FtsPending`] indexes them without being asked to. Each flush
/// writes an FTS5 segment (and its doclists) that later merges rewrite; once per batch (a loop
/// turn's messages) that was 30 % of the store thread's CPU per message in batches of 32
/// (docs/BENCHMARKS.md). At most this many messages are indexed again at a start after a
/// crash.
pub const FTS_BATCH: usize = 2048;

/// How long the store thread waits with nothing to do before it indexes the messages
/// gathered so far ([`FtsPending`]).
pub const FTS_IDLE: Duration = Duration::from_millis(100);

/// Messages stored but not yet in `messages_fts`: the id range of the inserts that succeeded
/// since the last flush (ids only grow, and only this thread inserts messages, so the range
/// holds exactly them). Indexed with one statement, which also moves `meta.fts_upto`, when
/// anything would read or change the index (a search, an edit, a delete), when
/// [`FTS_BATCH`] have gathered, when the store thread has been idle for [`FTS_IDLE`] and
/// before it stops. A search therefore always sees every message stored before it.
#[derive(Default, Clone)]
struct FtsPending {
    range: Option<(i64, i64)>,
    count: usize,
}

impl FtsPending {
    fn add(&mut self, id: i64) {
        self.count += 1;
        self.range = Some(match self.range {
            Some((lo, hi)) => (lo.min(id), hi.max(id)),
            None => (id, id),
        });
    }

    fn is_empty(&self) -> bool {
        self.range.is_none()
    }

    fn flush(&mut self, conn: &Connection) {
        let Some((lo, hi)) = self.range.take() else {
            return;
        };
        self.count = 0;
        if let Err(e) = index_messages(conn, lo, hi) {
            // The messages are stored and `fts_upto` did not move: the next start indexes them.
            log::error!("store: indexing messages {lo}..={hi} for search: {e}");
        }
    }
}

/// Indexes messages `lo..=hi` for search and records `hi` as indexed, in the caller's
/// transaction. Returns how many messages were indexed.
fn index_messages(conn: &Connection, lo: i64, hi: i64) -> rusqlite::Result<usize> {
    let indexed = conn
        .prepare_cached(
            "INSERT INTO messages_fts (rowid, text)
             SELECT id, text FROM messages WHERE id BETWEEN ?1 AND ?2",
        )?
        .execute(params![lo, hi])?;
    conn.prepare_cached("INSERT OR REPLACE INTO meta (k, v) VALUES (?1, ?2)")?
        .execute(params![FTS_UPTO, hi])?;
    Ok(indexed)
}

/// Indexes the messages a crash left unindexed (ids above `meta.fts_upto`). Returns how many.
fn index_missed(conn: &Connection) -> rusqlite::Result<usize> {
    let upto: i64 = conn.query_row(
        "SELECT COALESCE((SELECT v FROM meta WHERE k = ?1), 0)",
        params![FTS_UPTO],
        |r| r.get(0),
    )?;
    let max: i64 = conn.query_row("SELECT COALESCE(MAX(id), 0) FROM messages", [], |r| {
        r.get(0)
    })?;
    if max <= upto {
        return Ok(0);
    }
    index_messages(conn, upto + 1, max)
}

fn to_v1(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA_V1)
}

fn to_v2(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA_V2)?;
    if !has_column(conn, "sessions", "last_used")? {
        conn.execute_batch("ALTER TABLE sessions ADD COLUMN last_used INTEGER")?;
    }
    Ok(())
}

fn to_v3(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA_V3)
}

/// Forward migrations: `MIGRATIONS[i]` takes a database from version `i` to `i + 1`. Append
/// only; a shipped step never changes.
pub const MIGRATIONS: &[fn(&Connection) -> rusqlite::Result<()>] =
    &[to_v1, to_v2, to_v3, to_v4, to_v5, to_v6, to_v7];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

fn has_column(conn: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2",
        params![table, column],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

pub(super) fn sql(context: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |e| StoreError::Sql {
        context,
        source: Box::new(e),
    }
}

/// The schema version of an open database: `user_version`, or for one written before
/// versioning (`user_version` 0) what its tables say: none at all is a new database (0).
fn schema_version(conn: &Connection, path: &Path) -> Result<i64, StoreError> {
    let v: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql("read user_version"))?;
    if v != 0 {
        return Ok(v);
    }
    let table = |name: &str| -> Result<bool, StoreError> {
        conn.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
            params![name],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n > 0)
        .map_err(sql("read schema"))
    };
    let tables: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
            [],
            |r| r.get(0),
        )
        .map_err(sql("read schema"))?;
    if tables == 0 {
        return Ok(0);
    }
    if !table("users")? {
        return Err(StoreError::NotChatDb {
            path: path.to_path_buf(),
        });
    }
    let v2 =
        table("dedup")? && has_column(conn, "sessions", "last_used").map_err(sql("read schema"))?;
    Ok(if v2 { 2 } else { 1 })
}

/// Brings the database to [`SCHEMA_VERSION`]: a new one in a single transaction, an older one
/// one version per transaction (a failure leaves it at the last version reached). A newer one
/// is refused untouched.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let stamped: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql("read user_version"))?;
    let found = schema_version(conn, path)?;
    if !(0..=SCHEMA_VERSION).contains(&found) {
        return Err(StoreError::Schema {
            path: path.to_path_buf(),
            found_version: found,
            known_version: SCHEMA_VERSION,
        });
    }
    let step = |conn: &mut Connection, steps: &[fn(&Connection) -> rusqlite::Result<()>], to| {
        let fail = |e: rusqlite::Error| StoreError::Migration {
            to_version: to,
            source: Box::new(e),
        };
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(fail)?;
        for s in steps {
            s(&tx).map_err(fail)?;
        }
        tx.pragma_update(None, "user_version", to).map_err(fail)?;
        tx.commit().map_err(fail)
    };
    if found == 0 {
        step(conn, MIGRATIONS, SCHEMA_VERSION)?;
        return Ok(());
    }
    for v in found..SCHEMA_VERSION {
        log::info!(
            "store: migrating {} to schema version {}",
            path.display(),
            v + 1
        );
        step(conn, &MIGRATIONS[v as usize..v as usize + 1], v + 1)?;
    }
    if stamped != SCHEMA_VERSION && found == SCHEMA_VERSION {
        // A database from before versioning that already has the latest tables: record it.
        step(conn, &[], SCHEMA_VERSION)?;
    }
    Ok(())
}

/// Opens (creating if needed) `dir/chat.db`, sets the pragmas and migrates the schema.
pub(super) fn open_db(dir: &Path, durability: Durability) -> Result<Connection, StoreError> {
    std::fs::create_dir_all(dir).map_err(|e| StoreError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let path = dir.join("chat.db");
    let mut conn = Connection::open(&path).map_err(|e| StoreError::Open {
        path: path.clone(),
        source: Box::new(e),
    })?;
    conn.busy_timeout(BUSY_WAIT).map_err(sql("busy_timeout"))?;
    // Refuse a newer schema before changing anything about the file (journal mode included).
    let found = schema_version(&conn, &path)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::Schema {
            path,
            found_version: found,
            known_version: SCHEMA_VERSION,
        });
    }
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(sql("journal_mode"))?;
    let sync = match durability {
        Durability::Normal => "NORMAL",
        Durability::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", sync)
        .map_err(sql("synchronous"))?;
    // A deleted message's text must not stay behind in free space of the file.
    conn.pragma_update(None, "secure_delete", "ON")
        .map_err(sql("secure_delete"))?;
    conn.pragma_update(None, "foreign_keys", "OFF")
        .map_err(sql("foreign_keys"))?;
    migrate(&mut conn, &path)?;
    Ok(conn)
}

/// Loads startup state and persists a fresh id reservation of `reserve` ids before returning,
/// so ids handed out before the store thread's first commit are already covered. Refs of
/// messages with `ts >= dedup_since` are loaded for retry deduplication; older ones are
/// deleted.
fn load(conn: &Connection, reserve: i64, dedup_since: i64) -> Result<(Loaded, i64), StoreError> {
    let mut l = Loaded::default();
    let mut st = conn
        .prepare(&format!("SELECT {USER_COLS} FROM users"))
        .map_err(sql("load users"))?;
    let rows = st.query_map([], |r| user_at(r, 0));
    l.users = rows
        .and_then(|rows| rows.collect::<Result<_, _>>())
        .map_err(sql("load users"))?;
    let mut st = conn
        .prepare(
            "SELECT hash, user_key, COALESCE(last_used, created) FROM sessions
             ORDER BY created, rowid",
        )
        .map_err(sql("load sessions"))?;
    let rows = st
        .query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(sql("load sessions"))?;
    for (h, u, used) in rows {
        if let Ok(h) = <[u8; 32]>::try_from(h.as_slice()) {
            l.sessions.push((h, u, used));
        }
    }
    let missed = index_missed(conn).map_err(sql("index messages for search"))?;
    if missed > 0 {
        log::info!("indexed {missed} messages for search that the last run had not");
    }
    conn.execute(PRUNE_DEDUP, params![dedup_since])
        .map_err(sql("prune dedup"))?;
    l.dedup = conn
        .prepare("SELECT user_key, ref, id, ts FROM dedup WHERE ts >= ?1 ORDER BY id")
        .and_then(|mut st| {
            st.query_map(params![dedup_since], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect()
        })
        .map_err(sql("load dedup"))?;
    l.rooms = conn
        .prepare("SELECT name FROM rooms")
        .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
        .map_err(sql("load rooms"))?;
    l.members = conn
        .prepare("SELECT room, user_key FROM members")
        .and_then(|mut st| st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .map_err(sql("load members"))?;
    l.dm_pairs = conn
        .prepare("SELECT a, b FROM dm_pairs")
        .and_then(|mut st| st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .map_err(sql("load dm pairs"))?;
    l.conv_state = conn
        .prepare("SELECT user_key, conv, read_id, notify FROM conv_state")
        .and_then(|mut st| {
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect()
        })
        .map_err(sql("load read state"))?;
    // MAX on the rowid is answered from the b-tree's right edge: O(log n), not a scan.
    let max_id: Option<i64> = conn
        .query_row("SELECT MAX(id) FROM messages", [], |r| r.get(0))
        .map_err(sql("max message id"))?;
    let reserved: Option<i64> = conn
        .query_row("SELECT v FROM meta WHERE k = 'id_reserved'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(sql("read id reservation"))?;
    l.next_id = (max_id.unwrap_or(0) + 1).max(reserved.unwrap_or(1));
    let upto = l.next_id + reserve;
    write_reservation(conn, upto).map_err(sql("write id reservation"))?;
    Ok((l, upto))
}

/// The columns [`user_at`] reads, in its order.
const USER_COLS: &str = "key, name, nick, phc, last_seen, disabled";

/// A user from the [`USER_COLS`] of a row, starting at column `at`.
fn user_at(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<LoadedUser> {
    Ok(LoadedUser {
        key: r.get(at)?,
        name: r.get(at + 1)?,
        nick: r.get(at + 2)?,
        phc: r.get(at + 3)?,
        last_seen: r.get(at + 4)?,
        disabled: r.get(at + 5)?,
    })
}

/// One user's row as it is now (`None`: no such account).
fn load_user(conn: &Connection, key: &str) -> rusqlite::Result<Option<LoadedUser>> {
    conn.prepare_cached(&format!("SELECT {USER_COLS} FROM users WHERE key = ?1"))?
        .query_row(params![key], |r| user_at(r, 0))
        .optional()
}

/// The last entry of the operator change log: what a store opened now has already loaded.
fn last_change(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM admin_changes", [], |r| {
        r.get(0)
    })
}

/// Operator changes logged after `after`, oldest first, each with its account's row as it is
/// now.
fn changes_since(conn: &Connection, after: i64) -> rusqlite::Result<Vec<(i64, StoreEvent)>> {
    let cols = qualified(USER_COLS, "u");
    let mut st = conn.prepare_cached(&format!(
        "SELECT c.seq, c.user_key, c.kind, {cols} FROM admin_changes c
         LEFT JOIN users u ON u.key = c.user_key WHERE c.seq > ?1 ORDER BY c.seq"
    ))?;
    let rows = st.query_map(params![after], |r| {
        let kind: String = r.get(2)?;
        let present: Option<String> = r.get(3)?;
        Ok((
            r.get(0)?,
            StoreEvent::UserChanged {
                // A kind this build does not know: the row is still the truth to adopt.
                change: UserChange::parse(&kind).unwrap_or(UserChange::Reloaded),
                key: r.get(1)?,
                user: Ok(present.map(|_| user_at(r, 3)).transpose()?),
            },
        ))
    })?;
    rows.collect()
}

/// The store thread's watch on `admin_changes`.
struct ChangeWatch {
    /// The last change reported (or loaded at startup).
    seen: i64,
    next: Instant,
    /// The last poll failed (logged once, not every poll).
    failing: bool,
}

impl ChangeWatch {
    /// Reports changes made since the last poll; whether there were any.
    fn poll(&mut self, conn: &Connection, events: &Sender<StoreEvent>) -> bool {
        self.next = Instant::now() + CHANGE_POLL;
        match changes_since(conn, self.seen) {
            Ok(changes) => {
                self.failing = false;
                let any = !changes.is_empty();
                for (seq, ev) in changes {
                    self.seen = seq;
                    let _ = events.send(ev);
                }
                any
            }
            Err(e) => {
                if !self.failing {
                    log::error!("store: reading operator account changes: {e}");
                }
                self.failing = true;
                false
            }
        }
    }
}

fn write_reservation(conn: &Connection, upto: i64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO meta (k, v) VALUES ('id_reserved', ?1)
         ON CONFLICT (k) DO UPDATE SET v = MAX(v, excluded.v)",
        params![upto],
    )
    .map(|_| ())
}

/// What a backup or restore copied: the chat's counts in the copy, read back from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopySummary {
    pub users: i64,
    pub rooms: i64,
    pub messages: i64,
}

/// Opens `path` read-only, checks it is a whole chat database of a version this build knows
/// (`PRAGMA integrity_check`, the schema version) and counts what it holds.
pub fn verify_copy(path: &Path) -> Result<CopySummary, StoreError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| StoreError::Open {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(sql("integrity check"))?;
    if check != "ok" {
        return Err(StoreError::Sql {
            context: "integrity check",
            source: check.into(),
        });
    }
    let found = schema_version(&conn, path)?;
    if !(1..=SCHEMA_VERSION).contains(&found) {
        return Err(StoreError::Schema {
            path: path.to_path_buf(),
            found_version: found,
            known_version: SCHEMA_VERSION,
        });
    }
    let count = |table: &str| -> Result<i64, StoreError> {
        conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .map_err(sql("count rows"))
    };
    Ok(CopySummary {
        users: count("users")?,
        rooms: count("rooms")?,
        messages: count("messages")?,
    })
}

/// `parlor backup`: a consistent copy of `dir/chat.db` in `dest` (which must not exist),
/// taken with SQLite's online backup API, so a running server goes on committing meanwhile:
/// the copy holds exactly the transactions committed when the backup's last step ran. The copy
/// is verified by opening it.
pub fn backup(dir: &Path, dest: &Path) -> Result<CopySummary, StoreError> {
    let src_path = dir.join("chat.db");
    if !src_path.is_file() {
        return Err(StoreError::Io {
            path: src_path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no chat database here"),
        });
    }
    if dest.exists() {
        return Err(StoreError::Io {
            path: dest.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "refusing to overwrite"),
        });
    }
    let src = Connection::open_with_flags(&src_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| StoreError::Open {
            path: src_path.clone(),
            source: Box::new(e),
        })?;
    let mut out = Connection::open(dest).map_err(|e| StoreError::Open {
        path: dest.to_path_buf(),
        source: Box::new(e),
    })?;
    {
        let b = rusqlite::backup::Backup::new(&src, &mut out).map_err(sql("start backup"))?;
        // Many small steps, so a busy server's writers are never held up for long.
        b.run_to_completion(256, std::time::Duration::from_millis(2), None)
            .map_err(sql("backup"))?;
    }
    drop(out);
    verify_copy(dest)
}

/// `parlor restore`: puts the backup `src` in `dir` as its chat database. Refuses a `dir` that
/// already holds one (restore is for an empty data directory) and a file that is not a whole
/// chat database this build can read.
pub fn restore(src: &Path, dir: &Path) -> Result<CopySummary, StoreError> {
    let summary = verify_copy(src)?;
    let dest = dir.join("chat.db");
    if dest.exists() {
        return Err(StoreError::Io {
            path: dest,
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the data directory already has a chat database; restore into an empty one",
            ),
        });
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e| StoreError::Io { path, source: e }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // Copy under a temporary name and rename, so a crash never leaves half a database where
    // the server would open it.
    let tmp = dir.join("chat.db.restoring");
    std::fs::copy(src, &tmp).map_err(io(&tmp))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    Ok(summary)
}

/// The SQLite store: owns the request channel, the event channel and the store thread.
pub struct SqliteStore {
    channels: Channels,
    thread: Option<JoinHandle<()>>,
}

impl SqliteStore {
    /// See [`super::open_sqlite`]: opens (creating or migrating) `dir/chat.db`, loads startup
    /// state, persists a reservation of `reserve` ids (the returned `i64`: ids below it may
    /// be handed out) and starts the `chat-store` thread.
    pub fn open(
        dir: &Path,
        durability: Durability,
        reserve: i64,
        dedup_since: i64,
        wake: Wake,
    ) -> Result<(SqliteStore, Loaded, i64), StoreError> {
        let mut conn = open_db(dir, durability)?;
        // Under the write lock, so that no operator change (`parlor user …`) can fall between
        // what is loaded and the change log's position the store thread watches from.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin load"))?;
        let (loaded, reserved) = load(&tx, reserve, dedup_since)?;
        let seen = last_change(&tx).map_err(sql("read admin_changes"))?;
        tx.commit().map_err(sql("commit load"))?;
        let watch = ChangeWatch {
            seen,
            next: Instant::now() + CHANGE_POLL,
            failing: false,
        };
        let (tx, req_rx) = channel();
        let (ev_tx, rx) = channel();
        let thread = std::thread::Builder::new()
            .name("chat-store".into())
            .spawn(move || run(conn, req_rx, ev_tx, wake, watch))
            .map_err(StoreError::Thread)?;
        let store = SqliteStore {
            channels: Channels::new(tx, rx),
            thread: Some(thread),
        };
        Ok((store, loaded, reserved))
    }
}

impl Store for SqliteStore {
    fn submit(&mut self, reqs: Vec<StoreReq>) {
        self.channels.submit(reqs);
    }

    fn try_event(&mut self) -> Option<StoreEvent> {
        self.channels.try_event()
    }

    fn shutdown(&mut self) {
        // Everything sent before Shutdown is committed before the thread exits.
        self.channels.stop();
        if let Some(h) = self.thread.take() {
            if h.join().is_err() {
                log::error!("chat: store thread panicked");
            }
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn apply(conn: &Connection, w: &Write) -> rusqlite::Result<()> {
    match w {
        Write::InsertUser {
            key,
            name,
            nick,
            phc,
            created,
        } => conn
            // Never OR REPLACE: an account created meanwhile by `parlor user add` must make
            // this write fail (the hub then reloads the row), not be overwritten by it.
            .prepare_cached(
                "INSERT INTO users (key, name, nick, phc, created) VALUES (?1,?2,?3,?4,?5)",
            )?
            .execute(params![key, name, nick, phc, created])
            .map(|_| ()),
        Write::InsertSession {
            hash,
            user_key,
            created,
        } => conn
            .prepare_cached(
                "INSERT OR REPLACE INTO sessions (hash, user_key, created) VALUES (?1,?2,?3)",
            )?
            .execute(params![&hash[..], user_key, created])
            .map(|_| ()),
        Write::DeleteSession { hash } => conn
            .prepare_cached("DELETE FROM sessions WHERE hash = ?1")?
            .execute(params![&hash[..]])
            .map(|_| ()),
        Write::DeleteUserSessions { user_key } => conn
            .prepare_cached("DELETE FROM sessions WHERE user_key = ?1")?
            .execute(params![user_key])
            .map(|_| ()),
        Write::TouchSession { hash, ts } => conn
            .prepare_cached("UPDATE sessions SET last_used = ?2 WHERE hash = ?1")?
            .execute(params![&hash[..], ts])
            .map(|_| ()),
        Write::InsertRoom { name, created } => conn
            .prepare_cached("INSERT OR IGNORE INTO rooms (name, created) VALUES (?1, ?2)")?
            .execute(params![name, created])
            .map(|_| ()),
        Write::AddMember { room, user_key } => conn
            .prepare_cached("INSERT OR IGNORE INTO members (room, user_key) VALUES (?1, ?2)")?
            .execute(params![room, user_key])
            .map(|_| ()),
        Write::RemoveMember { room, user_key } => conn
            .prepare_cached("DELETE FROM members WHERE room = ?1 AND user_key = ?2")?
            .execute(params![room, user_key])
            .map(|_| ()),
        Write::InsertMessage { msg, dm, dedup } => {
            conn.prepare_cached(
                "INSERT INTO messages (id, room, dm, from_name, to_name, nick, text, ts, reply_to)
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)",
            )?
            .execute(params![
                msg.id,
                msg.room,
                dm,
                msg.from,
                msg.to,
                msg.nick,
                msg.text,
                msg.ts,
                msg.reply_to
            ])?;
            if let Some((user_key, reference)) = dedup {
                conn.prepare_cached(
                    "INSERT OR REPLACE INTO dedup (id, user_key, ref, ts) VALUES (?3,?1,?2,?4)",
                )?
                .execute(params![user_key, reference, msg.id, msg.ts])?;
            }
            Ok(())
        }
        Write::PruneDedup { before_ts } => conn
            .prepare_cached(PRUNE_DEDUP)?
            .execute(params![before_ts])
            .map(|_| ()),
        Write::SetNick { key, nick } => conn
            .prepare_cached("UPDATE users SET nick = ?2 WHERE key = ?1")?
            .execute(params![key, nick])
            .map(|_| ()),
        Write::SetLastSeen { key, ts } => conn
            .prepare_cached("UPDATE users SET last_seen = ?2 WHERE key = ?1")?
            .execute(params![key, ts])
            .map(|_| ()),
        Write::AddDmPair { a, b } => conn
            .prepare_cached("INSERT OR IGNORE INTO dm_pairs (a, b) VALUES (?1, ?2)")?
            .execute(params![a, b])
            .map(|_| ()),
        Write::ReserveIds { upto } => write_reservation(conn, *upto),
        Write::EditMessage {
            id,
            text,
            edited_ts,
            seq,
            conv,
            ..
        } => {
            conn.prepare_cached(
                "INSERT INTO edits (msg_id, text, ts)
                 SELECT id, text, COALESCE(edited_ts, ts) FROM messages WHERE id = ?1",
            )?
            .execute(params![id])?;
            conn.prepare_cached(
                "UPDATE messages SET text = ?2, edited_ts = ?3, edits = edits + 1 WHERE id = ?1",
            )?
            .execute(params![id, text, edited_ts])?;
            insert_event(conn, *seq, conv, EV_EDITED, *id, None, *edited_ts)
        }
        Write::DeleteMessage {
            id, seq, conv, ts, ..
        } => {
            conn.prepare_cached("UPDATE messages SET text = '', deleted = 1 WHERE id = ?1")?
                .execute(params![id])?;
            conn.prepare_cached("DELETE FROM edits WHERE msg_id = ?1")?
                .execute(params![id])?;
            conn.prepare_cached("DELETE FROM reactions WHERE msg_id = ?1")?
                .execute(params![id])?;
            insert_event(conn, *seq, conv, EV_DELETED, *id, None, *ts)
        }
        Write::SetReaction {
            id,
            user,
            emoji,
            on,
            seq,
            conv,
            ts,
            ..
        } => {
            if *on {
                conn.prepare_cached(
                    "INSERT OR IGNORE INTO reactions (msg_id, emoji, user, seq) VALUES (?1,?2,?3,?4)",
                )?
                .execute(params![id, emoji, user, seq])?;
            } else {
                conn.prepare_cached(
                    "DELETE FROM reactions WHERE msg_id = ?1 AND emoji = ?2 AND user = ?3",
                )?
                .execute(params![id, emoji, user])?;
            }
            let r = Some((user.as_str(), emoji.as_str(), *on));
            insert_event(conn, *seq, conv, EV_REACTION, *id, r, *ts)
        }
        Write::PruneEvents { before_ts, keep } => prune_events(conn, *before_ts, *keep),
        Write::SetRead { user_key, conv, id } => conn
            .prepare_cached(
                "INSERT INTO conv_state (user_key, conv, read_id) VALUES (?1, ?2, ?3)
                 ON CONFLICT (user_key, conv) DO UPDATE SET read_id = MAX(read_id, excluded.read_id)",
            )?
            .execute(params![user_key, conv, id])
            .map(|_| ()),
        Write::SetNotify {
            user_key,
            conv,
            level,
        } => conn
            .prepare_cached(
                "INSERT INTO conv_state (user_key, conv, notify) VALUES (?1, ?2, ?3)
                 ON CONFLICT (user_key, conv) DO UPDATE SET notify = excluded.notify",
            )?
            .execute(params![user_key, conv, level])
            .map(|_| ()),
        // Presence and typing across nodes: nothing to store on a single node.
        Write::Relay(_) => Ok(()),
    }
}

/// Unread messages (by others, not deleted) after each conversation's read marker, and the
/// mentions among them. Reads at most `MAX_UNREAD + 1` rows per conversation: the counts stop
/// at the cap.
fn unread(
    conn: &Connection,
    user: &str,
    names: &[String],
    convs: &[super::UnreadQuery],
) -> rusqlite::Result<Vec<super::Unread>> {
    use super::MAX_UNREAD;
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut out = Vec::with_capacity(convs.len());
    for c in convs {
        let col = if c.dm { "dm" } else { "room" };
        let sql = format!(
            "SELECT text FROM messages WHERE {col} = ?1 AND id > ?2 AND from_name <> ?3
             AND deleted = 0 ORDER BY id LIMIT ?4"
        );
        let mut st = conn.prepare_cached(&sql)?;
        let mut counts = super::Unread::default();
        let rows = st.query_map(params![c.conv, c.read, user, MAX_UNREAD + 1], |r| {
            r.get::<_, String>(0)
        })?;
        for text in rows {
            let text = text?;
            counts.unread += 1;
            if c.dm || crate::chat::search::mentions(&text, &names) {
                counts.mentions += 1;
            }
        }
        counts.unread = counts.unread.min(MAX_UNREAD);
        counts.mentions = counts.mentions.min(MAX_UNREAD);
        out.push(counts);
    }
    Ok(out)
}

/// Full-text search in the given conversations, newest first (see [`super::SearchQuery`]).
fn search(conn: &Connection, q: &super::SearchQuery) -> rusqlite::Result<(Vec<ChatMessage>, bool)> {
    let convs = serde_json::to_string(&q.convs).unwrap_or_else(|_| "[]".into());
    let cols = qualified(COLS, "m");
    // FTS5 walks the matches from the highest rowid (= id) down, so `LIMIT` stops early; the
    // conversation, author and deletion filters apply per match.
    let sql = format!(
        "SELECT {cols} FROM messages_fts f JOIN messages m ON m.id = f.rowid
         WHERE messages_fts MATCH ?1 AND f.rowid < ?2
           AND (m.room IN (SELECT value FROM json_each(?3)) OR m.dm IN (SELECT value FROM json_each(?3)))
           AND m.deleted = 0 AND (?4 IS NULL OR m.from_name = ?4 COLLATE NOCASE)
         ORDER BY f.rowid DESC LIMIT ?5"
    );
    let mut st = conn.prepare_cached(&sql)?;
    let before = q.before.unwrap_or(i64::MAX);
    let mut out = Vec::new();
    for m in st.query_map(
        params![q.fts, before, convs, q.from, q.limit as i64 + 1],
        row_to_msg,
    )? {
        out.push(m?);
    }
    let more = out.len() > q.limit;
    out.truncate(q.limit);
    // Reactions as everywhere else (attach_reactions wants ascending ids).
    out.reverse();
    attach_reactions(conn, &mut out)?;
    out.reverse();
    Ok((out, more))
}

fn insert_event(
    conn: &Connection,
    seq: i64,
    conv: &str,
    kind: i64,
    msg_id: i64,
    reaction: Option<(&str, &str, bool)>,
    ts: i64,
) -> rusqlite::Result<()> {
    let (user, emoji, on) = match reaction {
        Some((u, e, on)) => (Some(u), Some(e), Some(on)),
        None => (None, None, None),
    };
    conn.prepare_cached(
        "INSERT INTO events (seq, conv, kind, msg_id, user, emoji, on_, ts)
         VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
    )?
    .execute(params![seq, conv, kind, msg_id, user, emoji, on, ts])
    .map(|_| ())
}

/// Deletes change events older than `before_ts` that are not among the newest `keep`, and
/// moves the catch-up horizon up to the newest one deleted.
fn prune_events(conn: &Connection, before_ts: i64, keep: usize) -> rusqlite::Result<()> {
    let floor: Option<i64> = conn
        .query_row(
            "SELECT seq FROM events ORDER BY seq DESC LIMIT 1 OFFSET ?1",
            params![keep as i64],
            |r| r.get(0),
        )
        .optional()?;
    let Some(floor) = floor else {
        return Ok(()); // no more than `keep` events
    };
    let top: Option<i64> = conn.query_row(
        "SELECT MAX(seq) FROM events WHERE ts < ?1 AND seq <= ?2",
        params![before_ts, floor],
        |r| r.get(0),
    )?;
    let Some(top) = top else { return Ok(()) };
    conn.prepare_cached("DELETE FROM events WHERE seq <= ?1")?
        .execute(params![top])?;
    conn.prepare_cached(
        "INSERT INTO meta (k, v) VALUES (?1, ?2)
         ON CONFLICT (k) DO UPDATE SET v = MAX(v, excluded.v)",
    )?
    .execute(params![EVENTS_HORIZON, top])
    .map(|_| ())
}

fn row_to_msg(r: &rusqlite::Row<'_>) -> rusqlite::Result<ChatMessage> {
    Ok(ChatMessage {
        id: r.get(0)?,
        room: r.get(1)?,
        from: r.get(2)?,
        to: r.get(3)?,
        nick: r.get(4)?,
        text: r.get(5)?,
        ts: r.get(6)?,
        reply_to: r.get(7)?,
        edited_ts: r.get(8)?,
        deleted: r.get::<_, i64>(9)? != 0,
        reactions: Vec::new(),
    })
}

const COLS: &str = "id, room, from_name, to_name, nick, text, ts, reply_to, edited_ts, deleted";

/// A column list (`"a, b"`) with every column qualified by `table` (`"m.a, m.b"`), for joins.
fn qualified(cols: &str, table: &str) -> String {
    cols.split(", ")
        .map(|c| format!("{table}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Fills in the reactions of `msgs` (ordered by id): emoji in the order of their earliest
/// current reaction, users in the order they reacted — the order the hub keeps in memory.
fn attach_reactions(conn: &Connection, msgs: &mut [ChatMessage]) -> rusqlite::Result<()> {
    let (Some(first), Some(last)) = (msgs.first(), msgs.last()) else {
        return Ok(());
    };
    let (lo, hi) = (first.id.min(last.id), first.id.max(last.id));
    let mut st = conn.prepare_cached(
        "SELECT msg_id, emoji, user FROM reactions WHERE msg_id BETWEEN ?1 AND ?2 ORDER BY seq",
    )?;
    let rows = st.query_map(params![lo, hi], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
    for row in rows {
        let (id, emoji, user) = row?;
        if let Some(m) = msgs.iter_mut().find(|m| m.id == id) {
            m.set_reaction(&user, &emoji, true);
        }
    }
    Ok(())
}

/// Runs a query into the event that answers it.
fn answer(conn: &Connection, qid: u64, q: &Query) -> StoreEvent {
    match q {
        Query::LoadRing { .. } | Query::History { .. } => {
            let (messages, more) = if is_cancelled(q) {
                (Vec::new(), false)
            } else {
                run_query(conn, q).unwrap_or_else(|e| {
                    log::error!("store query {q:?}: {e}");
                    (Vec::new(), false)
                })
            };
            StoreEvent::QueryDone {
                qid,
                messages,
                more,
            }
        }
        Query::Unread { user, names, convs } => StoreEvent::UnreadDone {
            qid,
            counts: unread(conn, user, names, convs).unwrap_or_else(|e| {
                log::error!("store unread counts: {e}");
                vec![super::Unread::default(); convs.len()]
            }),
        },
        Query::Search { search: sq, .. } => {
            let (results, more) = if is_cancelled(q) {
                (Vec::new(), false)
            } else {
                search(conn, sq).unwrap_or_else(|e| {
                    log::error!("store search {sq:?}: {e}");
                    (Vec::new(), false)
                })
            };
            StoreEvent::SearchDone { qid, results, more }
        }
        Query::Message { id } => StoreEvent::MessageFound {
            qid,
            found: find_message(conn, *id).unwrap_or_else(|e| {
                log::error!("store query {q:?}: {e}");
                None
            }),
        },
        Query::Catchup {
            since,
            convs,
            limit,
            ..
        } => {
            let (items, more, reset) = if is_cancelled(q) {
                (Vec::new(), false, false)
            } else {
                catchup(conn, *since, convs, *limit).unwrap_or_else(|e| {
                    log::error!("store catchup from {since}: {e}");
                    (Vec::new(), false, true)
                })
            };
            StoreEvent::CatchupDone {
                qid,
                items,
                more,
                reset,
            }
        }
    }
}

fn find_message(conn: &Connection, id: i64) -> rusqlite::Result<Option<StoredMessage>> {
    let sql = format!("SELECT {COLS}, dm, edits FROM messages WHERE id = ?1");
    let found = conn
        .prepare_cached(&sql)?
        .query_row(params![id], |r| {
            Ok(StoredMessage {
                msg: row_to_msg(r)?,
                dm: r.get(10)?,
                edits: r.get::<_, i64>(11)? as u32,
            })
        })
        .optional()?;
    let Some(mut found) = found else {
        return Ok(None);
    };
    attach_reactions(conn, std::slice::from_mut(&mut found.msg))?;
    Ok(Some(found))
}

/// New messages and change events after `since` in `convs`, merged in `seq` order, at most
/// `limit`; messages in their current state. Returns (items, more, reset).
fn catchup(
    conn: &Connection,
    since: i64,
    convs: &[String],
    limit: usize,
) -> rusqlite::Result<(Vec<ChangeItem>, bool, bool)> {
    let horizon: i64 = conn
        .query_row(
            "SELECT v FROM meta WHERE k = ?1",
            params![EVENTS_HORIZON],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    if since < horizon {
        return Ok((Vec::new(), false, true));
    }
    let convs = serde_json::to_string(convs).unwrap_or_else(|_| "[]".into());
    let fetch = limit as i64 + 1;
    // New messages of those conversations (their seq is their id).
    let sql = format!(
        "SELECT {COLS} FROM messages
         WHERE id > ?1 AND (room IN (SELECT value FROM json_each(?2))
                            OR dm IN (SELECT value FROM json_each(?2)))
         ORDER BY id LIMIT ?3"
    );
    let mut msgs = Vec::new();
    for m in conn
        .prepare_cached(&sql)?
        .query_map(params![since, convs, fetch], row_to_msg)?
    {
        msgs.push(m?);
    }
    // Change events, with the message each is about as it is now.
    let sql = format!(
        "SELECT {}, e.seq, e.kind, e.user, e.emoji, e.on_
         FROM events e JOIN messages m ON m.id = e.msg_id
         WHERE e.seq > ?1 AND e.conv IN (SELECT value FROM json_each(?2))
         ORDER BY e.seq LIMIT ?3",
        qualified(COLS, "m")
    );
    let mut changes = Vec::new();
    let mut st = conn.prepare_cached(&sql)?;
    let rows = st.query_map(params![since, convs, fetch], |r| {
        // The message's columns come first, as `row_to_msg` reads them.
        let msg = row_to_msg(r)?;
        let seq: i64 = r.get(10)?;
        let kind: i64 = r.get(11)?;
        let user: Option<String> = r.get(12)?;
        let emoji: Option<String> = r.get(13)?;
        let on: Option<bool> = r.get(14)?;
        let kind = match kind {
            EV_EDITED => ChangeKind::Edited,
            EV_DELETED => ChangeKind::Deleted,
            _ => ChangeKind::Reaction {
                user: user.unwrap_or_default(),
                emoji: emoji.unwrap_or_default(),
                on: on.unwrap_or(false),
            },
        };
        Ok(ChangeItem { seq, kind, msg })
    })?;
    for c in rows {
        let c = c?;
        // What a deleted message had before is gone: its edits and reactions are left out
        // (its `deleted` event follows and says all there is).
        if c.msg.deleted && c.kind != ChangeKind::Deleted {
            continue;
        }
        changes.push(c);
    }
    // Merge by seq; each list is sorted and holds up to limit + 1, so the first `limit` of the
    // merge are exact, and `more` is whether anything is left.
    let mut items = Vec::with_capacity(limit + 1);
    let (mut a, mut b) = (msgs.into_iter().peekable(), changes.into_iter().peekable());
    loop {
        let take_msg = match (a.peek(), b.peek()) {
            (Some(m), Some(c)) => m.id < c.seq,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        if take_msg {
            let msg = a.next().expect("peeked");
            items.push(ChangeItem {
                seq: msg.id,
                kind: ChangeKind::Message,
                msg,
            });
        } else {
            items.push(b.next().expect("peeked"));
        }
        if items.len() > limit {
            break;
        }
    }
    let more = items.len() > limit;
    items.truncate(limit);
    // Messages travel in their current state, reactions included.
    let mut with_reactions: Vec<ChatMessage> = items
        .iter()
        .filter(|i| i.kind == ChangeKind::Message && !i.msg.deleted)
        .map(|i| i.msg.clone())
        .collect();
    attach_reactions(conn, &mut with_reactions)?;
    for it in items.iter_mut().filter(|i| i.kind == ChangeKind::Message) {
        if let Some(m) = with_reactions.iter_mut().find(|m| m.id == it.msg.id) {
            it.msg.reactions = std::mem::take(&mut m.reactions);
        }
    }
    Ok((items, more, false))
}

/// Runs a query; returns messages oldest first and whether more exist in the paging
/// direction. Fetches `limit + 1` rows so `more` costs no second query.
fn run_query(conn: &Connection, q: &Query) -> rusqlite::Result<(Vec<ChatMessage>, bool)> {
    let (col, key, before, after, limit) = match q {
        Query::LoadRing { room, limit, .. } => ("room", room.as_str(), None, None, *limit),
        Query::Message { .. }
        | Query::Catchup { .. }
        | Query::Unread { .. }
        | Query::Search { .. } => return Ok((Vec::new(), false)),
        Query::History {
            target,
            before,
            after,
            limit,
            ..
        } => {
            let (col, key) = match target {
                Target::Room(r) => ("room", r.as_str()),
                Target::Dm(k) => ("dm", k.as_str()),
            };
            (col, key, *before, *after, *limit)
        }
    };
    let before = before.unwrap_or(i64::MAX);
    let fetch = limit as i64 + 1;
    let mut out = Vec::with_capacity(limit + 1);
    if let Some(after) = after {
        // Forward paging: the oldest `limit` after `after` (catching up after a reconnect).
        let sql = format!(
            "SELECT {COLS} FROM messages WHERE {col} = ?1 AND id > ?2 AND id < ?3 ORDER BY id ASC LIMIT ?4"
        );
        let mut st = conn.prepare_cached(&sql)?;
        for m in st.query_map(params![key, after, before, fetch], row_to_msg)? {
            out.push(m?);
        }
        let more = out.len() > limit;
        out.truncate(limit);
        attach_reactions(conn, &mut out)?;
        Ok((out, more))
    } else {
        // Backward paging: the newest `limit` before `before` (scrolling up).
        let sql = format!(
            "SELECT {COLS} FROM messages WHERE {col} = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3"
        );
        let mut st = conn.prepare_cached(&sql)?;
        for m in st.query_map(params![key, before, fetch], row_to_msg)? {
            out.push(m?);
        }
        let more = out.len() > limit;
        out.truncate(limit);
        out.reverse();
        attach_reactions(conn, &mut out)?;
        Ok((out, more))
    }
}

fn is_cancelled(q: &Query) -> bool {
    match q {
        Query::History {
            cancelled: Some(c), ..
        }
        | Query::Catchup {
            cancelled: Some(c), ..
        }
        | Query::Search {
            cancelled: Some(c), ..
        } => c.load(Ordering::Relaxed),
        _ => false,
    }
}

/// The empty answer to a query that could not run (the batch's transaction did not start).
fn unanswered(qid: u64, q: &Query) -> StoreEvent {
    match q {
        Query::LoadRing { .. } | Query::History { .. } => StoreEvent::QueryDone {
            qid,
            messages: Vec::new(),
            more: false,
        },
        Query::Message { .. } => StoreEvent::MessageFound { qid, found: None },
        Query::Unread { convs, .. } => StoreEvent::UnreadDone {
            qid,
            counts: vec![super::Unread::default(); convs.len()],
        },
        Query::Search { .. } => StoreEvent::SearchDone {
            qid,
            results: Vec::new(),
            more: false,
        },
        Query::Catchup { .. } => StoreEvent::CatchupDone {
            qid,
            items: Vec::new(),
            more: false,
            reset: true,
        },
    }
}

/// [`FtsPending::flush`] in a transaction of its own (the store thread is idle).
fn flush_alone(conn: &mut Connection, fts: &mut FtsPending) {
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            // `fts_upto` stays: the next start indexes them; searches until then miss them.
            log::error!("store: begin indexing for search: {e}");
            *fts = FtsPending::default();
            return;
        }
    };
    fts.flush(&tx);
    if let Err(e) = tx.commit() {
        // `fts_upto` did not move either: the next start indexes them.
        log::error!("store: commit indexing for search: {e}");
    }
}

/// The store thread's body. Returns when it gets [`StoreReq::Shutdown`] (after committing
/// everything before it) or when the loop side hangs up. Between batches, and at least every
/// [`CHANGE_POLL`] when idle, it reports operator account changes (`watch`).
fn run(
    mut conn: Connection,
    rx: Receiver<Vec<StoreReq>>,
    events: Sender<StoreEvent>,
    wake: Wake,
    mut watch: ChangeWatch,
) {
    let mut seq: u64 = 0;
    // Requests arrive a loop turn's worth at a time; a transaction takes at most MAX_BATCH.
    let mut queued: VecDeque<StoreReq> = VecDeque::new();
    let mut fts = FtsPending::default();
    loop {
        if queued.is_empty() {
            let mut idle = watch.next.saturating_duration_since(Instant::now());
            if !fts.is_empty() {
                idle = idle.min(FTS_IDLE);
            }
            match rx.recv_timeout(idle) {
                Ok(reqs) => queued.extend(reqs),
                Err(RecvTimeoutError::Timeout) => {
                    // Idle: index what gathered rather than keep it for a start after a crash.
                    if !fts.is_empty() {
                        flush_alone(&mut conn, &mut fts);
                    }
                    if Instant::now() >= watch.next && watch.poll(&conn, &events) {
                        wake.wake();
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        let batch = next_batch(&mut queued, &rx);
        // What was waiting for the index before this batch: a failed commit takes the batch's
        // own messages back, but not those (nor their need of indexing).
        let fts_before = fts.clone();
        let start = Instant::now();
        let mut results = Vec::new();
        let mut failed = Vec::new();
        let mut writes = 0usize;
        let mut stop = false;
        let mut deleted = false;
        // IMMEDIATE: take the write lock (waiting up to BUSY_WAIT for `parlor user …`) before
        // the first read, so a write after a read cannot fail on a snapshot another process
        // has moved past.
        let ok = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => {
                for req in batch {
                    match req {
                        StoreReq::Write(w) => {
                            seq += 1;
                            writes += 1;
                            deleted |= matches!(w, Write::DeleteMessage { .. });
                            if matches!(w, Write::EditMessage { .. } | Write::DeleteMessage { .. })
                            {
                                fts.flush(&tx);
                            }
                            match apply(&tx, &w) {
                                Ok(()) => {
                                    if let Write::InsertMessage { msg, .. } = &w {
                                        fts.add(msg.id);
                                    }
                                }
                                Err(e) => {
                                    // One bad row must not sink the batch (and every ack in
                                    // it), but its own reply must not claim it is stored.
                                    log::error!("store: {w:?}: {e}");
                                    failed.push(seq);
                                }
                            }
                        }
                        StoreReq::Query { qid, query } => {
                            if matches!(query, Query::Search { .. }) {
                                fts.flush(&tx);
                            }
                            results.push(answer(&tx, qid, &query))
                        }
                        StoreReq::LoadUser { key } => {
                            let user = load_user(&tx, &key).map_err(|e| {
                                log::error!("store: load user {key}: {e}");
                                e.to_string()
                            });
                            results.push(StoreEvent::UserChanged {
                                change: UserChange::Reloaded,
                                key,
                                user,
                            });
                        }
                        StoreReq::Shutdown => stop = true,
                    }
                }
                if stop || fts.count >= FTS_BATCH {
                    fts.flush(&tx);
                }
                match tx.commit() {
                    Ok(()) => true,
                    Err(e) => {
                        log::error!("store commit failed: {e}");
                        fts = fts_before;
                        false
                    }
                }
            }
            Err(e) => {
                log::error!("store begin failed: {e}");
                for req in batch {
                    match req {
                        StoreReq::Write(_) => {
                            seq += 1;
                            writes += 1;
                        }
                        StoreReq::Query { qid, query } => results.push(unanswered(qid, &query)),
                        StoreReq::LoadUser { key } => results.push(StoreEvent::UserChanged {
                            change: UserChange::Reloaded,
                            key,
                            user: Err(format!("store unavailable: {e}")),
                        }),
                        StoreReq::Shutdown => stop = true,
                    }
                }
                false
            }
        };
        // Query results first: a join waiting on a ring load then completes before the acks
        // of messages accepted during the load, whatever the batching was, so the order a
        // client sees does not depend on how the store happened to group its work.
        for r in results {
            let _ = events.send(r);
        }
        if ok && deleted {
            // secure_delete zeroed the text in the pages this batch wrote, but the WAL still
            // holds older copies of those pages (and the main file the pre-delete ones): copy
            // the new pages home and empty the WAL, so the text is gone from the files.
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
                log::warn!("store: checkpoint after a delete: {e}");
            }
        }
        let _ = events.send(StoreEvent::Committed {
            upto: seq,
            ok,
            failed,
            batch: writes,
            latency: start.elapsed(),
            assigned: Vec::new(),
            unavailable: false,
        });
        if Instant::now() >= watch.next {
            watch.poll(&conn, &events);
        }
        wake.wake();
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::testutil::TempDir;

    fn msg(id: i64, room: &str) -> ChatMessage {
        ChatMessage {
            id,
            room: Some(room.into()),
            from: "a".into(),
            to: None,
            nick: "a".into(),
            text: format!("m{id}"),
            ts: id,
            ..ChatMessage::default()
        }
    }

    #[test]
    fn paging_both_ways() {
        let dir = TempDir::new("store-paging");
        let conn = open_db(dir.path(), Durability::Normal).unwrap();
        for id in 1..=10 {
            apply(
                &conn,
                &Write::InsertMessage {
                    msg: msg(id, if id % 2 == 0 { "even" } else { "odd" }),
                    dm: None,
                    dedup: None,
                },
            )
            .unwrap();
        }
        let h = |before, after, limit| {
            let (m, more) = run_query(
                &conn,
                &Query::History {
                    target: Target::Room("even".into()),
                    before,
                    after,
                    limit,
                    cancelled: None,
                },
            )
            .unwrap();
            (m.iter().map(|m| m.id).collect::<Vec<_>>(), more)
        };
        assert_eq!(h(None, None, 2), (vec![8, 10], true));
        assert_eq!(h(Some(8), None, 2), (vec![4, 6], true));
        assert_eq!(h(Some(4), None, 2), (vec![2], false));
        assert_eq!(h(None, Some(0), 3), (vec![2, 4, 6], true));
        assert_eq!(h(None, Some(6), 3), (vec![8, 10], false));
        assert_eq!(h(Some(8), Some(2), 10), (vec![4, 6], false));
        let (l, _) = load(&conn, 100, 0).unwrap();
        assert_eq!(l.next_id, 11);
        let (l, _) = load(&conn, 100, 0).unwrap();
        assert_eq!(l.next_id, 111, "reservation survives and is honoured");
    }

    fn user_version(conn: &Connection) -> i64 {
        conn.pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap()
    }

    fn table_exists(conn: &Connection, name: &str) -> bool {
        conn.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = ?1",
            params![name],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
            > 0
    }

    /// A database as an older build left it: `setup` runs on a fresh file, no pragmas.
    fn legacy_db(tag: &str, setup: &str) -> TempDir {
        let dir = TempDir::new(tag);
        let conn = Connection::open(dir.path().join("chat.db")).unwrap();
        conn.execute_batch(setup).unwrap();
        dir
    }

    fn assert_latest(conn: &Connection) {
        assert_eq!(user_version(conn), SCHEMA_VERSION);
        assert!(table_exists(conn, "dedup"));
        assert!(
            !table_exists(conn, "dedup_ts"),
            "version 7 keys dedup by id"
        );
        assert!(has_column(conn, "sessions", "last_used").unwrap());
        assert!(has_column(conn, "users", "disabled").unwrap());
        assert!(table_exists(conn, "admin_changes"));
    }

    const SESSION: &str = "INSERT INTO sessions (hash, user_key, created)
        VALUES (x'0000000000000000000000000000000000000000000000000000000000000001', 'alice', 5);
        INSERT INTO users (key, name, nick, phc, created) VALUES ('alice', 'alice', 'A', 'p', 1);";

    #[test]
    fn new_database_is_created_at_the_latest_version() {
        let dir = TempDir::new("store-new");
        let conn = open_db(dir.path(), Durability::Normal).unwrap();
        assert_latest(&conn);
        drop(conn);
        // Reopening changes nothing.
        let conn = open_db(dir.path(), Durability::Full).unwrap();
        assert_latest(&conn);
    }

    #[test]
    fn unversioned_v1_database_is_migrated() {
        let dir = legacy_db("store-v1", &format!("{SCHEMA_V1}{SESSION}"));
        let conn = open_db(dir.path(), Durability::Normal).unwrap();
        assert_latest(&conn);
        let (l, _) = load(&conn, 10, 0).unwrap();
        assert_eq!(l.users.len(), 1);
        assert_eq!(l.sessions.len(), 1);
        assert_eq!(l.sessions[0].2, 5, "last use defaults to creation");
    }

    #[test]
    fn versioned_v1_database_is_migrated() {
        let dir = legacy_db(
            "store-v1-stamped",
            &format!("{SCHEMA_V1}{SESSION} PRAGMA user_version = 1;"),
        );
        let conn = open_db(dir.path(), Durability::Normal).unwrap();
        assert_latest(&conn);
        assert_eq!(load(&conn, 10, 0).unwrap().0.sessions.len(), 1);
    }

    #[test]
    fn unversioned_v2_database_is_recognised() {
        // What the main branch wrote before versioning: every table, `last_used` added by
        // ALTER TABLE, `user_version` 0.
        let dir = legacy_db(
            "store-v2",
            &format!(
                "{SCHEMA_V1}{SCHEMA_V2}
                 ALTER TABLE sessions ADD COLUMN last_used INTEGER;
                 {SESSION}
                 UPDATE sessions SET last_used = 9;
                 INSERT INTO dedup (user_key, ref, id, ts) VALUES ('alice', 'r1', 1, 100);"
            ),
        );
        let conn = open_db(dir.path(), Durability::Normal).unwrap();
        assert_latest(&conn);
        let (l, _) = load(&conn, 10, 0).unwrap();
        assert_eq!(l.sessions[0].2, 9);
        assert_eq!(l.dedup, vec![("alice".into(), "r1".into(), 1, 100)]);

        // Half of version 2 (the dedup table without the column) counts as version 1, and
        // the migration completes it.
        let dir = legacy_db("store-v1-half", &format!("{SCHEMA_V1}{SCHEMA_V2}{SESSION}"));
        let conn = open_db(dir.path(), Durability::Normal).unwrap();
        assert_latest(&conn);
    }

    #[test]
    fn newer_database_is_refused_untouched() {
        let dir = legacy_db(
            "store-newer",
            "CREATE TABLE users (key TEXT PRIMARY KEY); PRAGMA user_version = 99;",
        );
        let e = open_db(dir.path(), Durability::Normal).unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::Schema {
                    found_version: 99,
                    known_version: SCHEMA_VERSION,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("schema version 99 is newer"), "{e}");
        let conn = Connection::open(dir.path().join("chat.db")).unwrap();
        assert_eq!(user_version(&conn), 99);
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete", "not even the journal mode changed");
    }

    #[test]
    fn foreign_database_is_refused() {
        let dir = legacy_db("store-foreign", "CREATE TABLE photos (id INTEGER);");
        let e = open_db(dir.path(), Durability::Normal).unwrap_err();
        assert!(matches!(e, StoreError::NotChatDb { .. }), "{e:?}");
    }

    #[test]
    fn failed_migration_is_rolled_back() {
        // Stamped version 1 but without its tables: the step to 2 fails at ALTER TABLE.
        let dir = legacy_db("store-broken", "PRAGMA user_version = 1;");
        let e = open_db(dir.path(), Durability::Normal).unwrap_err();
        assert!(
            matches!(e, StoreError::Migration { to_version: 2, .. }),
            "{e:?}"
        );
        assert!(std::error::Error::source(&e).is_some());
        let conn = Connection::open(dir.path().join("chat.db")).unwrap();
        assert_eq!(user_version(&conn), 1);
        assert!(
            !table_exists(&conn, "dedup"),
            "the step's CREATE TABLE rolled back"
        );
    }

    /// The hub's account write never replaces a row (`parlor user add` may have made it
    /// meanwhile): it fails, and `LoadUser` then reports the stored row, or none.
    #[test]
    fn insert_user_never_overwrites_and_load_user_reports_the_row() {
        let dir = TempDir::new("store-insert-user");
        let (mut store, _, _) =
            super::super::open_sqlite(dir.path(), Durability::Normal, 10, 0, Wake::default())
                .unwrap();
        let mut accounts = super::super::accounts::Accounts::open(dir.path(), false).unwrap();
        let added = accounts.add("alice", "Alice", "operator", 1, |_| false);
        assert_eq!(added.unwrap(), super::super::accounts::Added::Added);
        let insert = |key: &str| {
            StoreReq::Write(Write::InsertUser {
                key: key.into(),
                name: key.into(),
                nick: key.into(),
                phc: "racer".into(),
                created: 2,
            })
        };
        let load = |key: &str| StoreReq::LoadUser { key: key.into() };
        store.submit(vec![
            insert("alice"),
            insert("bob"),
            load("alice"),
            load("nobody"),
        ]);
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let (mut reloaded, mut committed, mut polled) = (Vec::new(), None, false);
        while committed.is_none() || !polled {
            match store.try_event() {
                Some(StoreEvent::UserChanged {
                    change: UserChange::Reloaded,
                    key,
                    user,
                }) => reloaded.push((key, user.unwrap())),
                Some(StoreEvent::UserChanged { change, key, user }) => {
                    assert_eq!((change, key.as_str()), (UserChange::Added, "alice"));
                    assert_eq!(user.unwrap().unwrap().phc, "operator");
                    polled = true;
                }
                Some(StoreEvent::Committed { upto, failed, .. }) => {
                    committed = Some((upto, failed))
                }
                Some(_) => {}
                None => {
                    assert!(Instant::now() < deadline, "{reloaded:?} {committed:?}");
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
        }
        assert_eq!(
            committed,
            Some((2, vec![1])),
            "alice's insert failed, bob's did not"
        );
        assert_eq!(reloaded.len(), 2);
        let alice = reloaded[0].1.as_ref().unwrap();
        assert_eq!(
            (alice.name.as_str(), alice.phc.as_str()),
            ("Alice", "operator")
        );
        assert!(!alice.disabled);
        assert_eq!(reloaded[1], ("nobody".to_string(), None));
        store.shutdown();
    }

    /// The conversation queries still use the (partial, since version 7) conversation indexes:
    /// no scan of `messages`, no temporary sort.
    #[test]
    fn conversation_queries_use_the_partial_indexes() {
        let dir = TempDir::new("store-plans");
        let conn = open_db(dir.path(), Durability::Normal).unwrap();
        for (col, index) in [("room", "messages_room"), ("dm", "messages_dm")] {
            for sql in [
                format!("SELECT id FROM messages WHERE {col} = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3"),
                format!("SELECT id FROM messages WHERE {col} = ?1 AND id > ?2 AND id < ?3 ORDER BY id ASC LIMIT ?4"),
                format!("SELECT COUNT(*) FROM messages WHERE {col} = ?1 AND id > ?2"),
            ] {
                let mut st = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
                let nulls = vec![rusqlite::types::Null; st.parameter_count()];
                let plan: Vec<String> = st
                    .query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
                let plan = plan.join(" | ");
                assert!(plan.contains(&format!("USING COVERING INDEX {index}")) || plan.contains(&format!("USING INDEX {index}")), "{sql}: {plan}");
                assert!(!plan.contains("TEMP B-TREE"), "{sql}: {plan}");
            }
        }
    }

    /// Retry refs expire by id prefix (version 7): everything below the first recent ref goes,
    /// nothing recent goes early (even after the clock stepped back), and a start loads only
    /// the recent ones, in id order.
    #[test]
    fn retry_refs_expire_oldest_first() {
        let dir = TempDir::new("store-dedup-prune");
        let open = |since: i64| {
            super::super::open_sqlite(dir.path(), Durability::Normal, 1000, since, Wake::default())
                .unwrap()
        };
        let (mut store, l, _) = open(0);
        let first = l.next_id;
        // ts by id: 100, 200, 300, then the clock steps back: 150, then 400.
        let stamps = [100, 200, 300, 150, 400];
        let mut reqs: Vec<StoreReq> = stamps
            .iter()
            .enumerate()
            .map(|(i, &ts)| {
                StoreReq::Write(Write::InsertMessage {
                    msg: ChatMessage {
                        ts,
                        ..msg(first + i as i64, "r")
                    },
                    dm: None,
                    dedup: Some(("alice".into(), format!("r{i}"))),
                })
            })
            .collect();
        reqs.push(StoreReq::Write(Write::PruneDedup { before_ts: 250 }));
        store.submit(reqs);
        store.shutdown();
        drop(store);
        let (mut store, l, _) = open(0);
        let kept: Vec<i64> = l.dedup.iter().map(|d| d.2).collect();
        assert_eq!(
            kept,
            vec![first + 2, first + 3, first + 4],
            "r0 and r1 expired; r3 (ts 150) waits behind r2, which is recent"
        );
        store.shutdown();
        let (mut store, l, _) = open(250);
        let loaded: Vec<(String, i64)> = l.dedup.iter().map(|d| (d.1.clone(), d.3)).collect();
        assert_eq!(
            loaded,
            vec![("r2".to_string(), 300), ("r4".to_string(), 400)],
            "a start loads the recent ones only, in id order"
        );
        store.shutdown();
    }

    /// Waits for the store thread's answer to a search for `word` in room `r`.
    fn search_ids(store: &mut dyn Store, qid: u64, word: &str) -> Vec<i64> {
        store.submit(vec![StoreReq::Query {
            qid,
            query: Query::Search {
                search: super::super::SearchQuery {
                    fts: word.into(),
                    convs: vec!["r".into()],
                    from: None,
                    before: None,
                    limit: 100,
                },
                cancelled: None,
            },
        }]);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match store.try_event() {
                Some(StoreEvent::SearchDone {
                    qid: q, results, ..
                }) if q == qid => return results.iter().map(|m| m.id).collect(),
                Some(_) => {}
                None => {
                    assert!(Instant::now() < deadline, "no answer to search {qid}");
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }

    fn fts_upto(dir: &Path) -> i64 {
        let conn = Connection::open(dir.join("chat.db")).unwrap();
        conn.query_row("SELECT v FROM meta WHERE k = 'fts_upto'", [], |r| r.get(0))
            .unwrap()
    }

    /// New messages are indexed for search in bulk, not per batch: a search still finds every
    /// message stored before it; an idle store indexes what gathered; and messages a crash
    /// left stored but unindexed (above `fts_upto`) are indexed at the next start, once.
    #[test]
    fn deferred_search_indexing_misses_nothing() {
        let dir = TempDir::new("store-fts-defer");
        let open = || {
            super::super::open_sqlite(dir.path(), Durability::Normal, 1000, 0, Wake::default())
                .unwrap()
        };
        let (mut store, l, _) = open();
        let insert = |id: i64, text: &str| {
            StoreReq::Write(Write::InsertMessage {
                msg: ChatMessage {
                    text: text.into(),
                    ..msg(id, "r")
                },
                dm: None,
                dedup: None,
            })
        };
        let first = l.next_id;
        store.submit((0..3).map(|i| insert(first + i, "needle one")).collect());
        // The next batch is the search: the three are in the index by then.
        assert_eq!(
            search_ids(&mut *store, 1, "needle"),
            vec![first + 2, first + 1, first]
        );
        // Nothing more comes: the idle store indexes the next ones without being asked.
        store.submit(vec![insert(first + 3, "haystack")]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while fts_upto(dir.path()) != first + 3 {
            assert!(Instant::now() < deadline, "idle store did not index");
            std::thread::sleep(Duration::from_millis(20));
        }
        store.shutdown();
        drop(store);
        // A crash after a commit and before indexing: rows above fts_upto, not in the index.
        {
            let conn = Connection::open(dir.path().join("chat.db")).unwrap();
            for id in [first + 10, first + 11] {
                conn.execute(
                    "INSERT INTO messages (id, room, from_name, nick, text, ts)
                     VALUES (?1, 'r', 'a', 'a', 'needle two', ?1)",
                    params![id],
                )
                .unwrap();
            }
        }
        let (mut store, _, _) = open();
        assert_eq!(fts_upto(dir.path()), first + 11);
        assert_eq!(
            search_ids(&mut *store, 2, "needle"),
            vec![first + 11, first + 10, first + 2, first + 1, first],
            "each once: the start indexed only what was missing"
        );
        store.shutdown();
    }

    /// Waits for the store thread's answer to query `qid` (nobody wakes a test).
    fn query(store: &mut dyn Store, qid: u64, target: Target) -> Vec<ChatMessage> {
        store.submit(vec![StoreReq::Query {
            qid,
            query: Query::History {
                target,
                before: None,
                after: None,
                limit: 100,
                cancelled: None,
            },
        }]);
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match store.try_event() {
                Some(StoreEvent::QueryDone {
                    qid: q, messages, ..
                }) if q == qid => return messages,
                Some(_) => {}
                None => {
                    assert!(Instant::now() < deadline, "no answer to query {qid}");
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            }
        }
    }

    /// `tests/fixtures/chat-v1.db` was written by parlor at commit e05a242 (schema version 1,
    /// before versioning); `chat-v1.json` lists what it holds. Opened through the store API
    /// (which migrates it), everything is still there, and the migrated tables work.
    #[test]
    fn fixture_v1_database_keeps_everything() {
        use serde_json::Value;
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let want: Value =
            serde_json::from_str(&std::fs::read_to_string(fixtures.join("chat-v1.json")).unwrap())
                .unwrap();
        let dir = TempDir::new("store-fixture-v1");
        std::fs::copy(fixtures.join("chat-v1.db"), dir.path().join("chat.db")).unwrap();
        let (mut store, l, reserved) =
            super::super::open_sqlite(dir.path(), Durability::Normal, 1000, 0, Wake::default())
                .unwrap();

        let s = |v: &Value| v.as_str().unwrap().to_string();
        let mut users: Vec<_> = l
            .users
            .iter()
            .map(|u| (u.key.clone(), u.name.clone(), u.nick.clone()))
            .collect();
        users.sort();
        let want_users: Vec<_> = want["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| (s(&u["key"]), s(&u["name"]), s(&u["nick"])))
            .collect();
        assert_eq!(users, want_users);
        // The PHC strings still verify (argon2 takes its parameters from the string).
        let password = s(&want["password"]);
        for u in &l.users {
            use argon2::password_hash::{PasswordHash, PasswordVerifier};
            let phc = PasswordHash::new(&u.phc).unwrap();
            assert!(argon2::Argon2::default()
                .verify_password(password.as_bytes(), &phc)
                .is_ok());
        }
        let mut sessions: Vec<_> = l.sessions.iter().map(|(h, u, _)| (*h, u.clone())).collect();
        sessions.sort();
        let mut want_sessions: Vec<_> = want["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    crate::chat::auth::token_hash(&s(&t["token"])),
                    s(&t["user"]),
                )
            })
            .collect();
        want_sessions.sort();
        assert_eq!(sessions, want_sessions);
        let mut rooms = l.rooms.clone();
        rooms.sort();
        let want_rooms: Vec<String> = want["rooms"].as_array().unwrap().iter().map(s).collect();
        assert_eq!(rooms, want_rooms);
        let pairs = |v: &Value| -> Vec<(String, String)> {
            let mut p: Vec<_> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (s(&p[0]), s(&p[1])))
                .collect();
            p.sort();
            p
        };
        let mut members = l.members.clone();
        members.sort();
        assert_eq!(members, pairs(&want["members"]));
        let mut dm_pairs = l.dm_pairs.clone();
        dm_pairs.sort();
        assert_eq!(dm_pairs, pairs(&want["dm_pairs"]));
        assert!(l.dedup.is_empty());
        let want_msgs: Vec<ChatMessage> = want["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage {
                id: m["id"].as_i64().unwrap(),
                room: m["room"].as_str().map(String::from),
                from: s(&m["from"]),
                to: m["to"].as_str().map(String::from),
                nick: s(&m["nick"]),
                text: s(&m["text"]),
                ts: m["ts"].as_i64().unwrap(),
                ..ChatMessage::default()
            })
            .collect();
        assert_eq!(want_msgs.len(), 7);
        let max_id = want_msgs.iter().map(|m| m.id).max().unwrap();
        assert!(l.next_id > max_id && reserved == l.next_id + 1000);

        // Every message, through History queries per room and per DM pair.
        let mut got = Vec::new();
        let mut qid = 0;
        for room in &want_rooms {
            qid += 1;
            got.extend(query(store.as_mut(), qid, Target::Room(room.clone())));
        }
        for (a, b) in &dm_pairs {
            qid += 1;
            got.extend(query(
                store.as_mut(),
                qid,
                Target::Dm(super::super::dm_key(a, b)),
            ));
        }
        got.sort_by_key(|m| m.id);
        assert_eq!(got, want_msgs);

        // The version-2 parts work on the migrated file: a message with a dedup ref, a
        // session's last use; both are there after a reopen.
        let (alice_token, _) = &want_sessions[0];
        let msg = ChatMessage {
            id: l.next_id,
            room: Some("rust".into()),
            from: "alice".into(),
            to: None,
            nick: "Ally".into(),
            text: "after migration".into(),
            ts: 2_000_000_000_000,
            ..ChatMessage::default()
        };
        store.submit(vec![
            StoreReq::Write(Write::InsertMessage {
                msg: msg.clone(),
                dm: None,
                dedup: Some(("alice".into(), "m1".into())),
            }),
            StoreReq::Write(Write::TouchSession {
                hash: *alice_token,
                ts: 2_000_000_000_001,
            }),
        ]);
        store.shutdown();
        let mut committed = false;
        while let Some(ev) = store.try_event() {
            if let StoreEvent::Committed {
                upto, ok, failed, ..
            } = ev
            {
                committed |= upto == 2 && ok && failed.is_empty();
            }
        }
        assert!(committed);
        drop(store);
        let (mut store, l, _) =
            super::super::open_sqlite(dir.path(), Durability::Normal, 1000, 0, Wake::default())
                .unwrap();
        assert_eq!(l.dedup, vec![("alice".into(), "m1".into(), msg.id, msg.ts)]);
        assert!(l
            .sessions
            .iter()
            .any(|(h, _, used)| h == alice_token && *used == 2_000_000_000_001));
        let rust = query(store.as_mut(), 1, Target::Room("rust".into()));
        assert_eq!(rust.last(), Some(&msg));
        store.shutdown();
    }
}
