//! SQLite storage on a dedicated thread.
//!
//! The event loop never touches the database after startup. It sends [`StoreReq`]s over a
//! channel, a loop turn's worth per message: one wake-up of this thread per turn rather than
//! one per chat message (on a shared core every wake-up preempted the loop and committed a
//! one-row transaction). The store thread takes everything queued, applies it in one transaction (group
//! commit), commits, and reports the results of any queries in that batch followed by the
//! highest committed write sequence number. Queries run inside the batch after the writes
//! queued before them, so a query sees everything the loop accepted before sending it.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};

use super::protocol::ChatMessage;
use super::Wake;

/// Most requests folded into one transaction; bounds the latency of a batch under flood.
const MAX_BATCH: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// WAL + synchronous=NORMAL: a commit is in the OS before we ack, so it survives the
    /// process being killed; a power loss may lose the last batches.
    Normal,
    /// WAL + synchronous=FULL: every commit is fsynced before we ack.
    Full,
}

/// A state change. Each one sent gets the next write sequence number (1, 2, ...), which is
/// what [`StoreEvent::Committed`] refers to.
#[derive(Debug, Clone)]
pub enum Write {
    InsertUser {
        key: String,
        name: String,
        nick: String,
        phc: String,
        created: i64,
    },
    InsertSession {
        hash: [u8; 32],
        user_key: String,
        created: i64,
    },
    DeleteSession {
        hash: [u8; 32],
    },
    /// Every session of a user ("log out everywhere").
    DeleteUserSessions {
        user_key: String,
    },
    /// A session was used (resume, or a connection using it closed): `--session-ttl` counts
    /// from here.
    TouchSession {
        hash: [u8; 32],
        ts: i64,
    },
    InsertRoom {
        name: String,
        created: i64,
    },
    AddMember {
        room: String,
        user_key: String,
    },
    RemoveMember {
        room: String,
        user_key: String,
    },
    /// `dm` is the pair key of a direct message (see [`dm_key`]). `dedup` is the sender's key
    /// and the message's `ref`: stored in the same transaction as the message, so a retry after
    /// any restart finds the original exactly when the message itself survived.
    InsertMessage {
        msg: ChatMessage,
        dm: Option<String>,
        dedup: Option<(String, String)>,
    },
    /// Forgets refs of messages older than `ts` (outside `--dedup-window`).
    PruneDedup {
        before_ts: i64,
    },
    SetNick {
        key: String,
        nick: String,
    },
    SetLastSeen {
        key: String,
        ts: i64,
    },
    AddDmPair {
        a: String,
        b: String,
    },
    /// Ids below `upto` may be handed out; persisted so a restart never reuses an id that was
    /// broadcast but not yet committed when the process died.
    ReserveIds {
        upto: i64,
    },
}

#[derive(Debug, Clone)]
pub enum Target {
    Room(String),
    Dm(String),
}

#[derive(Debug, Clone)]
pub enum Query {
    /// The newest `limit` messages of a room, for the join snapshot ring.
    LoadRing { room: String, limit: usize },
    /// History paging; see `docs/PROTOCOL.md`.
    History {
        target: Target,
        before: Option<i64>,
        after: Option<i64>,
        limit: usize,
        /// Set when the asking connection closed: the store skips the query if it has not run
        /// yet, so a flood of queries does not outlive its sender.
        cancelled: Option<Arc<AtomicBool>>,
    },
}

#[derive(Debug)]
pub enum StoreReq {
    Write(Write),
    Query { qid: u64, query: Query },
    Shutdown,
}

#[derive(Debug)]
pub enum StoreEvent {
    /// All writes with sequence ≤ `upto` are committed (or, if `ok` is false, the batch failed
    /// and writes up to `upto` are lost).
    Committed {
        upto: u64,
        ok: bool,
        /// Writes of this batch whose statement failed (the rest committed).
        failed: Vec<u64>,
        batch: usize,
        latency: Duration,
    },
    /// Messages oldest first; `more` tells whether the range continues past them.
    QueryDone {
        qid: u64,
        messages: Vec<ChatMessage>,
        more: bool,
    },
}

/// The key of a DM conversation: both user keys, sorted, so either side finds it.
pub fn dm_key(a: &str, b: &str) -> String {
    if a <= b {
        format!("{a}\n{b}")
    } else {
        format!("{b}\n{a}")
    }
}

/// What startup needs in memory. Messages are deliberately absent: they are loaded lazily
/// per room, so startup stays fast however long the history is.
#[derive(Debug, Default)]
pub struct Loaded {
    pub users: Vec<LoadedUser>,
    /// Token hash, user key, last use (ms), oldest first.
    pub sessions: Vec<([u8; 32], String, i64)>,
    /// Refs of messages stored since `dedup_since` (see [`load`]): user key, ref, id, ts.
    pub dedup: Vec<(String, String, i64, i64)>,
    pub rooms: Vec<String>,
    pub members: Vec<(String, String)>,
    pub dm_pairs: Vec<(String, String)>,
    /// First id free for use: above every stored id and every reservation ever made.
    pub next_id: i64,
}

#[derive(Debug)]
pub struct LoadedUser {
    pub key: String,
    pub name: String,
    pub nick: String,
    pub phc: String,
    pub last_seen: Option<i64>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    key TEXT PRIMARY KEY, name TEXT NOT NULL, nick TEXT NOT NULL, phc TEXT NOT NULL,
    created INTEGER NOT NULL, last_seen INTEGER);
CREATE TABLE IF NOT EXISTS sessions (
    hash BLOB PRIMARY KEY, user_key TEXT NOT NULL, created INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rooms (name TEXT PRIMARY KEY, created INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    room TEXT NOT NULL, user_key TEXT NOT NULL, PRIMARY KEY (room, user_key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dm_pairs (
    a TEXT NOT NULL, b TEXT NOT NULL, PRIMARY KEY (a, b)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY, room TEXT, dm TEXT, from_name TEXT NOT NULL, to_name TEXT,
    nick TEXT NOT NULL, text TEXT NOT NULL, ts INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS messages_room ON messages (room, id);
CREATE INDEX IF NOT EXISTS messages_dm ON messages (dm, id);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dedup (
    user_key TEXT NOT NULL, ref TEXT NOT NULL, id INTEGER NOT NULL, ts INTEGER NOT NULL,
    PRIMARY KEY (user_key, ref)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_ts ON dedup (ts);
";

/// Columns added after a table first shipped: `CREATE TABLE IF NOT EXISTS` leaves an older
/// database's table as it was, so each is added here if missing.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[("sessions", "last_used", "INTEGER")];

fn add_missing_columns(conn: &Connection) -> Result<(), String> {
    for (table, column, decl) in ADDED_COLUMNS {
        let mut st = conn
            .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
            .map_err(sql_err)?;
        let names = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(sql_err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql_err)?;
        if !names.iter().any(|n| n == column) {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))
                .map_err(sql_err)?;
        }
    }
    Ok(())
}

fn sql_err(e: rusqlite::Error) -> String {
    e.to_string()
}

/// Opens (creating if needed) `dir/chat.db`, applies the schema and pragmas.
pub fn open_db(dir: &Path, durability: Durability) -> Result<Connection, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let path = dir.join("chat.db");
    let conn = Connection::open(&path).map_err(|e| format!("open {}: {e}", path.display()))?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(sql_err)?;
    let sync = match durability {
        Durability::Normal => "NORMAL",
        Durability::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", sync)
        .map_err(sql_err)?;
    conn.pragma_update(None, "foreign_keys", "OFF")
        .map_err(sql_err)?;
    conn.execute_batch(SCHEMA).map_err(sql_err)?;
    add_missing_columns(&conn)?;
    Ok(conn)
}

/// Loads startup state and persists a fresh id reservation of `reserve` ids before returning,
/// so ids handed out before the store thread's first commit are already covered. Refs of
/// messages with `ts >= dedup_since` are loaded for retry deduplication; older ones are
/// deleted.
pub fn load(conn: &Connection, reserve: i64, dedup_since: i64) -> Result<(Loaded, i64), String> {
    let mut l = Loaded::default();
    {
        let mut st = conn
            .prepare("SELECT key, name, nick, phc, last_seen FROM users")
            .map_err(sql_err)?;
        let rows = st
            .query_map([], |r| {
                Ok(LoadedUser {
                    key: r.get(0)?,
                    name: r.get(1)?,
                    nick: r.get(2)?,
                    phc: r.get(3)?,
                    last_seen: r.get(4)?,
                })
            })
            .map_err(sql_err)?;
        for u in rows {
            l.users.push(u.map_err(sql_err)?);
        }
        let mut st = conn
            .prepare(
                "SELECT hash, user_key, COALESCE(last_used, created) FROM sessions
                 ORDER BY created, rowid",
            )
            .map_err(sql_err)?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(sql_err)?;
        for s in rows {
            let (h, u, used) = s.map_err(sql_err)?;
            if let Ok(h) = <[u8; 32]>::try_from(h.as_slice()) {
                l.sessions.push((h, u, used));
            }
        }
        conn.execute("DELETE FROM dedup WHERE ts < ?1", params![dedup_since])
            .map_err(sql_err)?;
        let mut st = conn
            .prepare("SELECT user_key, ref, id, ts FROM dedup ORDER BY ts, id")
            .map_err(sql_err)?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .map_err(sql_err)?;
        for r in rows {
            l.dedup.push(r.map_err(sql_err)?);
        }
        let mut st = conn.prepare("SELECT name FROM rooms").map_err(sql_err)?;
        let rows = st.query_map([], |r| r.get(0)).map_err(sql_err)?;
        for r in rows {
            l.rooms.push(r.map_err(sql_err)?);
        }
        let mut st = conn
            .prepare("SELECT room, user_key FROM members")
            .map_err(sql_err)?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(sql_err)?;
        for r in rows {
            l.members.push(r.map_err(sql_err)?);
        }
        let mut st = conn.prepare("SELECT a, b FROM dm_pairs").map_err(sql_err)?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(sql_err)?;
        for r in rows {
            l.dm_pairs.push(r.map_err(sql_err)?);
        }
    }
    // MAX on the rowid is answered from the b-tree's right edge: O(log n), not a scan.
    let max_id: Option<i64> = conn
        .query_row("SELECT MAX(id) FROM messages", [], |r| r.get(0))
        .map_err(sql_err)?;
    let reserved: Option<i64> = conn
        .query_row("SELECT v FROM meta WHERE k = 'id_reserved'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(sql_err)?;
    l.next_id = (max_id.unwrap_or(0) + 1).max(reserved.unwrap_or(1));
    let upto = l.next_id + reserve;
    write_reservation(conn, upto)?;
    Ok((l, upto))
}

fn write_reservation(conn: &Connection, upto: i64) -> Result<(), String> {
    conn.execute(
        "INSERT INTO meta (k, v) VALUES ('id_reserved', ?1)
         ON CONFLICT (k) DO UPDATE SET v = MAX(v, excluded.v)",
        params![upto],
    )
    .map_err(sql_err)?;
    Ok(())
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
            .prepare_cached(
                "INSERT OR REPLACE INTO users (key, name, nick, phc, created) VALUES (?1,?2,?3,?4,?5)",
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
                "INSERT INTO messages (id, room, dm, from_name, to_name, nick, text, ts)
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
            )?
            .execute(params![
                msg.id, msg.room, dm, msg.from, msg.to, msg.nick, msg.text, msg.ts
            ])?;
            if let Some((user_key, reference)) = dedup {
                conn.prepare_cached(
                    "INSERT OR REPLACE INTO dedup (user_key, ref, id, ts) VALUES (?1,?2,?3,?4)",
                )?
                .execute(params![user_key, reference, msg.id, msg.ts])?;
            }
            Ok(())
        }
        Write::PruneDedup { before_ts } => conn
            .prepare_cached("DELETE FROM dedup WHERE ts < ?1")?
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
        Write::ReserveIds { upto } => write_reservation(conn, *upto)
            .map_err(rusqlite::Error::InvalidParameterName),
    }
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
    })
}

const COLS: &str = "id, room, from_name, to_name, nick, text, ts";

/// Runs a query; returns messages oldest first and whether more exist in the paging
/// direction. Fetches `limit + 1` rows so `more` costs no second query.
fn run_query(conn: &Connection, q: &Query) -> rusqlite::Result<(Vec<ChatMessage>, bool)> {
    let (col, key, before, after, limit) = match q {
        Query::LoadRing { room, limit } => ("room", room.as_str(), None, None, *limit),
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
        Ok((out, more))
    }
}

fn is_cancelled(q: &Query) -> bool {
    match q {
        Query::History {
            cancelled: Some(c), ..
        } => c.load(Ordering::Relaxed),
        _ => false,
    }
}

/// The store thread's body. Returns when it gets [`StoreReq::Shutdown`] (after committing
/// everything before it) or when the loop side hangs up.
pub fn run(
    mut conn: Connection,
    rx: Receiver<Vec<StoreReq>>,
    events: Sender<StoreEvent>,
    wake: Wake,
) {
    let mut seq: u64 = 0;
    // Requests arrive a loop turn's worth at a time; a transaction takes at most MAX_BATCH.
    let mut queued: VecDeque<StoreReq> = VecDeque::new();
    loop {
        if queued.is_empty() {
            match rx.recv() {
                Ok(reqs) => queued.extend(reqs),
                Err(_) => return,
            }
        }
        while queued.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(reqs) => queued.extend(reqs),
                Err(_) => break,
            }
        }
        let take = queued.len().min(MAX_BATCH);
        let batch: Vec<StoreReq> = queued.drain(..take).collect();
        let start = Instant::now();
        let mut results = Vec::new();
        let mut failed = Vec::new();
        let mut writes = 0usize;
        let mut stop = false;
        let ok = match conn.transaction() {
            Ok(tx) => {
                for req in batch {
                    match req {
                        StoreReq::Write(w) => {
                            seq += 1;
                            writes += 1;
                            if let Err(e) = apply(&tx, &w) {
                                // One bad row must not sink the batch (and every ack in it),
                                // but its own reply must not claim it is stored.
                                log::error!("store: {w:?}: {e}");
                                failed.push(seq);
                            }
                        }
                        StoreReq::Query { qid, query } => {
                            let (messages, more) = if is_cancelled(&query) {
                                (Vec::new(), false)
                            } else {
                                run_query(&tx, &query).unwrap_or_else(|e| {
                                    log::error!("store query {query:?}: {e}");
                                    (Vec::new(), false)
                                })
                            };
                            results.push(StoreEvent::QueryDone {
                                qid,
                                messages,
                                more,
                            });
                        }
                        StoreReq::Shutdown => stop = true,
                    }
                }
                match tx.commit() {
                    Ok(()) => true,
                    Err(e) => {
                        log::error!("store commit failed: {e}");
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
                        StoreReq::Query { qid, .. } => results.push(StoreEvent::QueryDone {
                            qid,
                            messages: Vec::new(),
                            more: false,
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
        let _ = events.send(StoreEvent::Committed {
            upto: seq,
            ok,
            failed,
            batch: writes,
            latency: start.elapsed(),
        });
        wake.wake();
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: i64, room: &str) -> ChatMessage {
        ChatMessage {
            id,
            room: Some(room.into()),
            from: "a".into(),
            to: None,
            nick: "a".into(),
            text: format!("m{id}"),
            ts: id,
        }
    }

    #[test]
    fn paging_both_ways() {
        let dir = super::super::testutil::TempDir::new("store-paging");
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
}
