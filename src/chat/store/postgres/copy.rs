//! `parlor migrate`: a single-node SQLite chat database copied into PostgreSQL, to start a
//! cluster from it.
//!
//! The SQLite file is opened read-only and read in one read transaction (a consistent
//! snapshot even if a server is still running on it); PostgreSQL gets everything in one
//! transaction that holds the log head lock, into a database with no users and no messages
//! (refused otherwise). The log head is set above every id, seq and id reservation the SQLite
//! database ever had, so the cluster's positions continue after them.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use super::PgOptions;
use super::{schema, sql, Target};
use crate::chat::store::{sqlite, CopySummary, StoreError};

/// Rows per INSERT statement.
const CHUNK: usize = 2000;

/// Copies `dir/chat.db` (schema version [`sqlite::SCHEMA_VERSION`]) into the PostgreSQL
/// database at `url`, creating the cluster schema there; refuses a target that already holds
/// users or messages. Returns the counts read back from PostgreSQL.
pub fn migrate_from_sqlite(dir: &Path, url: &str) -> Result<CopySummary, StoreError> {
    let path = dir.join("chat.db");
    if !path.is_file() {
        return Err(StoreError::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no chat database here"),
        });
    }
    // Integrity and a schema version this build knows; then it must be the latest, whose
    // columns are what is copied (an older file is migrated by running parlor on it once).
    sqlite::verify_copy(&path)?;
    let mut lite =
        Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|e| {
            StoreError::Open {
                path: path.clone(),
                source: Box::new(e),
            }
        })?;
    let version: i64 = lite
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sqlite::sql("read user_version"))?;
    if version != sqlite::SCHEMA_VERSION {
        return Err(StoreError::Migration {
            to_version: sqlite::SCHEMA_VERSION,
            source: format!(
                "{}: schema version {version}; start parlor once on this data directory \
                 (single node) so it is migrated to version {}, then migrate it to PostgreSQL",
                path.display(),
                sqlite::SCHEMA_VERSION
            )
            .into(),
        });
    }
    let target = Target::parse(url, PgOptions::default().connect_timeout)?;
    let mut pg = target.connect().map_err(|e| target.open_error(&e))?;
    schema::migrate(&mut pg, target.shown())?;

    let read = lite.transaction().map_err(sqlite::sql("begin read"))?;
    let mut tx = pg.transaction().map_err(sql("begin copy"))?;
    tx.query_one("SELECT pos FROM log_head FOR UPDATE", &[])
        .map_err(sql("lock the log head"))?;
    let used: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM users) OR EXISTS (SELECT 1 FROM messages)",
            &[],
        )
        .map_err(sql("check the target is empty"))?
        .get(0);
    if used {
        return Err(StoreError::Io {
            path: PathBuf::from(target.shown()),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the target database already has users or messages; migrate into an empty one",
            ),
        });
    }
    copy_all(&read, &mut tx)?;
    let head = top_position(&read)?;
    tx.execute("UPDATE log_head SET pos = GREATEST(pos, $1)", &[&head])
        .map_err(sql("set the log head"))?;
    let count = |tx: &mut postgres::Transaction<'_>, table: &str| -> Result<i64, StoreError> {
        Ok(tx
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .map_err(sql("count rows"))?
            .get(0))
    };
    let summary = CopySummary {
        users: count(&mut tx, "users")?,
        rooms: count(&mut tx, "rooms")?,
        messages: count(&mut tx, "messages")?,
    };
    tx.commit().map_err(sql("commit copy"))?;
    drop(read);
    Ok(summary)
}

/// The highest id, seq or reservation the SQLite database has (the new log head).
fn top_position(lite: &Connection) -> Result<i64, StoreError> {
    lite.query_row(
        "SELECT MAX(COALESCE((SELECT MAX(id) FROM messages), 0),
                    COALESCE((SELECT MAX(seq) FROM events), 0),
                    COALESCE((SELECT MAX(seq) FROM reactions), 0),
                    COALESCE((SELECT MAX(id) FROM dedup), 0),
                    COALESCE((SELECT MAX(v) FROM meta
                              WHERE k IN ('id_reserved', 'events_horizon')), 0))",
        [],
        |r| r.get(0),
    )
    .map_err(sqlite::sql("read the highest id"))
}

/// Reads `query` from SQLite in chunks of [`CHUNK`] rows, handing each to `sink`.
fn chunked<T>(
    lite: &Connection,
    query: &str,
    row: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    mut sink: impl FnMut(Vec<T>) -> Result<(), postgres::Error>,
) -> Result<(), StoreError> {
    let mut st = lite.prepare(query).map_err(sqlite::sql("read for copy"))?;
    let mut rows = st.query([]).map_err(sqlite::sql("read for copy"))?;
    let mut buf = Vec::with_capacity(CHUNK);
    while let Some(r) = rows.next().map_err(sqlite::sql("read for copy"))? {
        buf.push(row(r).map_err(sqlite::sql("read for copy"))?);
        if buf.len() == CHUNK {
            sink(std::mem::take(&mut buf)).map_err(sql("copy rows"))?;
        }
    }
    if !buf.is_empty() {
        sink(buf).map_err(sql("copy rows"))?;
    }
    Ok(())
}

fn col<T, U>(rows: &[T], f: impl Fn(&T) -> U) -> Vec<U> {
    rows.iter().map(f).collect()
}

/// Every table of the chat, in SQLite's columns.
fn copy_all(lite: &Connection, tx: &mut postgres::Transaction<'_>) -> Result<(), StoreError> {
    type User = (String, String, String, String, i64, Option<i64>, bool);
    chunked(
        lite,
        "SELECT key, name, nick, phc, created, last_seen, disabled FROM users",
        |r| -> rusqlite::Result<User> {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get::<_, i64>(6)? != 0,
            ))
        },
        |rows| {
            tx.execute(
                "INSERT INTO users (key, name, nick, phc, created, last_seen, disabled)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                                      $5::bigint[], $6::bigint[], $7::bool[])",
                &[
                    &col(&rows, |r| r.0.clone()),
                    &col(&rows, |r| r.1.clone()),
                    &col(&rows, |r| r.2.clone()),
                    &col(&rows, |r| r.3.clone()),
                    &col(&rows, |r| r.4),
                    &col(&rows, |r| r.5),
                    &col(&rows, |r| r.6),
                ],
            )
            .map(|_| ())
        },
    )?;
    type Session = (Vec<u8>, String, i64, Option<i64>);
    chunked(
        lite,
        "SELECT hash, user_key, created, last_used FROM sessions",
        |r| -> rusqlite::Result<Session> { Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)) },
        |rows| {
            tx.execute(
                "INSERT INTO sessions (hash, user_key, created, last_used)
                 SELECT * FROM unnest($1::bytea[], $2::text[], $3::bigint[], $4::bigint[])
                 ON CONFLICT DO NOTHING",
                &[
                    &col(&rows, |r| r.0.clone()),
                    &col(&rows, |r| r.1.clone()),
                    &col(&rows, |r| r.2),
                    &col(&rows, |r| r.3),
                ],
            )
            .map(|_| ())
        },
    )?;
    chunked(
        lite,
        "SELECT name, created FROM rooms",
        |r| -> rusqlite::Result<(String, i64)> { Ok((r.get(0)?, r.get(1)?)) },
        |rows| {
            tx.execute(
                "INSERT INTO rooms (name, created) SELECT * FROM unnest($1::text[], $2::bigint[])",
                &[&col(&rows, |r| r.0.clone()), &col(&rows, |r| r.1)],
            )
            .map(|_| ())
        },
    )?;
    for (table, a, b) in [("members", "room", "user_key"), ("dm_pairs", "a", "b")] {
        chunked(
            lite,
            &format!("SELECT {a}, {b} FROM {table}"),
            |r| -> rusqlite::Result<(String, String)> { Ok((r.get(0)?, r.get(1)?)) },
            |rows| {
                tx.execute(
                    &format!(
                        "INSERT INTO {table} ({a}, {b})
                         SELECT * FROM unnest($1::text[], $2::text[])"
                    ),
                    &[&col(&rows, |r| r.0.clone()), &col(&rows, |r| r.1.clone())],
                )
                .map(|_| ())
            },
        )?;
    }
    struct Msg {
        id: i64,
        room: Option<String>,
        dm: Option<String>,
        from: String,
        to: Option<String>,
        nick: String,
        text: String,
        ts: i64,
        reply_to: Option<i64>,
        edited_ts: Option<i64>,
        deleted: bool,
        edits: i32,
    }
    chunked(
        lite,
        "SELECT id, room, dm, from_name, to_name, nick, text, ts, reply_to, edited_ts, deleted,
                edits FROM messages ORDER BY id",
        |r| {
            Ok(Msg {
                id: r.get(0)?,
                room: r.get(1)?,
                dm: r.get(2)?,
                from: r.get(3)?,
                to: r.get(4)?,
                nick: r.get(5)?,
                text: r.get(6)?,
                ts: r.get(7)?,
                reply_to: r.get(8)?,
                edited_ts: r.get(9)?,
                deleted: r.get::<_, i64>(10)? != 0,
                edits: r.get(11)?,
            })
        },
        |rows| {
            tx.execute(
                "INSERT INTO messages (id, room, dm, from_name, to_name, nick, text, ts, reply_to,
                                       edited_ts, deleted, edits, fts)
                 SELECT u.id, u.room, u.dm, u.f, u.t, u.n, u.x, u.ts, u.r, u.e, u.d, u.c,
                        to_tsvector('simple', u.s)
                 FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[],
                             $11::bool[], $12::int[], $13::text[])
                      AS u(id, room, dm, f, t, n, x, ts, r, e, d, c, s)",
                &[
                    &col(&rows, |m| m.id),
                    &col(&rows, |m| m.room.clone()),
                    &col(&rows, |m| m.dm.clone()),
                    &col(&rows, |m| m.from.clone()),
                    &col(&rows, |m| m.to.clone()),
                    &col(&rows, |m| m.nick.clone()),
                    &col(&rows, |m| m.text.clone()),
                    &col(&rows, |m| m.ts),
                    &col(&rows, |m| m.reply_to),
                    &col(&rows, |m| m.edited_ts),
                    &col(&rows, |m| m.deleted),
                    &col(&rows, |m| m.edits),
                    // A deleted message's text is empty: no words.
                    &col(&rows, |m| super::fold(&m.text)),
                ],
            )
            .map(|_| ())
        },
    )?;
    chunked(
        lite,
        "SELECT msg_id, text, ts FROM edits ORDER BY rowid",
        |r| -> rusqlite::Result<(i64, String, i64)> { Ok((r.get(0)?, r.get(1)?, r.get(2)?)) },
        |rows| {
            tx.execute(
                "INSERT INTO edits (msg_id, text, ts)
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[])",
                &[
                    &col(&rows, |r| r.0),
                    &col(&rows, |r| r.1.clone()),
                    &col(&rows, |r| r.2),
                ],
            )
            .map(|_| ())
        },
    )?;
    chunked(
        lite,
        "SELECT msg_id, emoji, user, seq FROM reactions",
        |r| -> rusqlite::Result<(i64, String, String, i64)> {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        },
        |rows| {
            tx.execute(
                "INSERT INTO reactions (msg_id, emoji, user_name, seq)
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[])",
                &[
                    &col(&rows, |r| r.0),
                    &col(&rows, |r| r.1.clone()),
                    &col(&rows, |r| r.2.clone()),
                    &col(&rows, |r| r.3),
                ],
            )
            .map(|_| ())
        },
    )?;
    type Event = (
        i64,
        String,
        i16,
        i64,
        Option<String>,
        Option<String>,
        Option<bool>,
        i64,
    );
    chunked(
        lite,
        "SELECT seq, conv, kind, msg_id, user, emoji, on_, ts FROM events",
        |r| -> rusqlite::Result<Event> {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get::<_, Option<i64>>(6)?.map(|v| v != 0),
                r.get(7)?,
            ))
        },
        |rows| {
            tx.execute(
                "INSERT INTO events (seq, conv, kind, msg_id, user_name, emoji, on_, ts)
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::smallint[], $4::bigint[],
                                      $5::text[], $6::text[], $7::bool[], $8::bigint[])",
                &[
                    &col(&rows, |r| r.0),
                    &col(&rows, |r| r.1.clone()),
                    &col(&rows, |r| r.2),
                    &col(&rows, |r| r.3),
                    &col(&rows, |r| r.4.clone()),
                    &col(&rows, |r| r.5.clone()),
                    &col(&rows, |r| r.6),
                    &col(&rows, |r| r.7),
                ],
            )
            .map(|_| ())
        },
    )?;
    chunked(
        lite,
        "SELECT user_key, ref, id, ts FROM dedup",
        |r| -> rusqlite::Result<(String, String, i64, i64)> {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        },
        |rows| {
            tx.execute(
                "INSERT INTO dedup (user_key, ref, id, ts)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])",
                &[
                    &col(&rows, |r| r.0.clone()),
                    &col(&rows, |r| r.1.clone()),
                    &col(&rows, |r| r.2),
                    &col(&rows, |r| r.3),
                ],
            )
            .map(|_| ())
        },
    )?;
    chunked(
        lite,
        "SELECT user_key, conv, read_id, notify FROM conv_state",
        |r| -> rusqlite::Result<(String, String, i64, Option<String>)> {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        },
        |rows| {
            tx.execute(
                "INSERT INTO conv_state (user_key, conv, read_id, notify)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[])",
                &[
                    &col(&rows, |r| r.0.clone()),
                    &col(&rows, |r| r.1.clone()),
                    &col(&rows, |r| r.2),
                    &col(&rows, |r| r.3.clone()),
                ],
            )
            .map(|_| ())
        },
    )?;
    // The catch-up horizon (change events pruned before it).
    let horizon: Option<i64> = lite
        .query_row("SELECT v FROM meta WHERE k = 'events_horizon'", [], |r| {
            r.get(0)
        })
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })
        .map_err(sqlite::sql("read the catch-up horizon"))?;
    if let Some(h) = horizon {
        tx.execute(
            "INSERT INTO meta (k, v) VALUES ('events_horizon', $1)
             ON CONFLICT (k) DO UPDATE SET v = GREATEST(meta.v, excluded.v)",
            &[&h],
        )
        .map_err(sql("copy the catch-up horizon"))?;
    }
    Ok(())
}
