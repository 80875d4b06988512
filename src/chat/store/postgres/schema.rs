//! The cluster schema: creating and migrating it (one transaction under an advisory lock, so
//! nodes starting together are safe), registering a node, and loading the startup state in
//! one snapshot.
//!
//! The tables are SQLite's schema version 5 (see `sqlite.rs`) in PostgreSQL types, plus what
//! cluster mode needs: `log` / `log_head` (the replication log, see [`super::super::cluster`]),
//! `nodes` (heartbeats) and `presence` (which users have connections on which node). A
//! message's `fts` column is the `tsvector` of its text folded by [`super::fold`] (see
//! [`super::search`]). The version is `meta.schema_version`.
//!
//! Every message insert happens under the log head lock, so each index on `messages` and
//! `log` costs the whole cluster's write rate: the room and DM indexes are partial (a message
//! is in one or the other), and the log's `ts` index (for pruning only) is a BRIN, which
//! entries appended in time order keep tiny.

use std::path::PathBuf;
use std::time::Duration;

use postgres::{Client, IsolationLevel};

use super::{sql, PgError, SCHEMA_LOCK};
use crate::chat::store::cluster::{ClusterLoaded, NodeId};
use crate::chat::store::{Loaded, LoadedUser, StoreError};

/// Version 1: the whole schema as first shipped.
const SCHEMA_V1: &str = "
CREATE TABLE meta (k text PRIMARY KEY, v bigint NOT NULL);
CREATE TABLE users (
    key text PRIMARY KEY, name text NOT NULL, nick text NOT NULL, phc text NOT NULL,
    created bigint NOT NULL, last_seen bigint, disabled boolean NOT NULL DEFAULT false);
CREATE TABLE sessions (
    hash bytea PRIMARY KEY, user_key text NOT NULL, created bigint NOT NULL, last_used bigint);
CREATE INDEX sessions_user ON sessions (user_key);
CREATE TABLE rooms (name text PRIMARY KEY, created bigint NOT NULL);
CREATE TABLE members (room text NOT NULL, user_key text NOT NULL, PRIMARY KEY (room, user_key));
CREATE TABLE dm_pairs (a text NOT NULL, b text NOT NULL, PRIMARY KEY (a, b));
CREATE TABLE messages (
    id bigint PRIMARY KEY, room text, dm text, from_name text NOT NULL, to_name text,
    nick text NOT NULL, text text NOT NULL, ts bigint NOT NULL, reply_to bigint,
    edited_ts bigint, deleted boolean NOT NULL DEFAULT false, edits integer NOT NULL DEFAULT 0,
    fts tsvector NOT NULL DEFAULT ''::tsvector);
CREATE INDEX messages_room ON messages (room, id) WHERE room IS NOT NULL;
CREATE INDEX messages_dm ON messages (dm, id) WHERE dm IS NOT NULL;
CREATE INDEX messages_fts ON messages USING gin (fts);
CREATE TABLE edits (msg_id bigint NOT NULL, text text NOT NULL, ts bigint NOT NULL);
CREATE INDEX edits_msg ON edits (msg_id);
CREATE TABLE reactions (
    msg_id bigint NOT NULL, emoji text NOT NULL, user_name text NOT NULL, seq bigint NOT NULL,
    PRIMARY KEY (msg_id, emoji, user_name));
CREATE TABLE events (
    seq bigint PRIMARY KEY, conv text NOT NULL, kind smallint NOT NULL, msg_id bigint NOT NULL,
    user_name text, emoji text, on_ boolean, ts bigint NOT NULL);
CREATE INDEX events_conv ON events (conv, seq);
CREATE INDEX events_ts ON events (ts);
CREATE TABLE dedup (
    user_key text NOT NULL, ref text NOT NULL, id bigint NOT NULL, ts bigint NOT NULL,
    PRIMARY KEY (user_key, ref));
CREATE INDEX dedup_ts ON dedup (ts);
CREATE TABLE conv_state (
    user_key text NOT NULL, conv text NOT NULL, read_id bigint NOT NULL DEFAULT 0, notify text,
    PRIMARY KEY (user_key, conv));
CREATE TABLE log (
    pos bigint PRIMARY KEY, origin text NOT NULL, body text NOT NULL,
    ts timestamptz NOT NULL DEFAULT now());
CREATE INDEX log_ts ON log USING brin (ts);
CREATE TABLE log_head (one integer PRIMARY KEY CHECK (one = 1), pos bigint NOT NULL);
INSERT INTO log_head (one, pos) VALUES (1, 0);
CREATE TABLE nodes (id text PRIMARY KEY, started timestamptz NOT NULL, heartbeat timestamptz NOT NULL);
CREATE TABLE presence (node text NOT NULL, user_key text NOT NULL, PRIMARY KEY (node, user_key));
";

/// Forward migrations: `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`. Append
/// only; a shipped step never changes.
const MIGRATIONS: &[&str] = &[SCHEMA_V1];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the schema to [`SCHEMA_VERSION`] in one transaction holding the schema advisory
/// lock (a second node starting meanwhile waits, then finds it done). A newer version is
/// refused untouched.
pub(crate) fn migrate(client: &mut Client, shown: &str) -> Result<(), StoreError> {
    let mut tx = client.transaction().map_err(sql("begin schema"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .map_err(sql("schema lock"))?;
    let has_meta: bool = tx
        .query_one("SELECT to_regclass('meta') IS NOT NULL", &[])
        .map_err(sql("read schema"))?
        .get(0);
    let found: i64 = if has_meta {
        tx.query_opt("SELECT v FROM meta WHERE k = 'schema_version'", &[])
            .map_err(sql("read schema version"))?
            .map_or(0, |r| r.get(0))
    } else {
        0
    };
    if found > SCHEMA_VERSION {
        return Err(StoreError::Schema {
            path: PathBuf::from(shown),
            found_version: found,
            known_version: SCHEMA_VERSION,
        });
    }
    if found == SCHEMA_VERSION {
        return tx.commit().map_err(sql("commit schema"));
    }
    if found == 0 && has_meta {
        // A `meta` table without a version: not ours.
        return Err(StoreError::NotChatDb {
            path: PathBuf::from(shown),
        });
    }
    for (v, step) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let to = v as i64 + 1;
        if found != 0 {
            log::info!("store: migrating {shown} to schema version {to}");
        }
        tx.batch_execute(step).map_err(|e| StoreError::Migration {
            to_version: to,
            source: Box::new(PgError::of(&e)),
        })?;
    }
    tx.execute(
        "INSERT INTO meta (k, v) VALUES ('schema_version', $1)
         ON CONFLICT (k) DO UPDATE SET v = excluded.v",
        &[&SCHEMA_VERSION],
    )
    .map_err(sql("write schema version"))?;
    tx.commit().map_err(|e| StoreError::Migration {
        to_version: SCHEMA_VERSION,
        source: Box::new(PgError::of(&e)),
    })
}

/// A fresh node id: 16 random hex digits.
pub(crate) fn new_node_id() -> Result<NodeId, StoreError> {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).map_err(|e| StoreError::Sql {
        context: "node id",
        source: e.to_string().into(),
    })?;
    Ok(b.iter().map(|b| format!("{b:02x}")).collect())
}

/// Adds this node's row (started and heartbeat are the database's `now()`: node clocks are
/// never compared).
pub(crate) fn register_node(client: &mut Client, node: &str) -> Result<(), StoreError> {
    client
        .execute(
            "INSERT INTO nodes (id, started, heartbeat) VALUES ($1, now(), now())
             ON CONFLICT (id) DO UPDATE SET heartbeat = now()",
            &[&node],
        )
        .map(|_| ())
        .map_err(sql("register node"))
}

/// The columns [`user_of`] reads, in its order.
pub(crate) const USER_COLS: &str = "key, name, nick, phc, last_seen, disabled";

pub(crate) fn user_of(r: &postgres::Row, at: usize) -> LoadedUser {
    LoadedUser {
        key: r.get(at),
        name: r.get(at + 1),
        nick: r.get(at + 2),
        phc: r.get(at + 3),
        last_seen: r.get(at + 4),
        disabled: r.get(at + 5),
    }
}

/// The startup state, read in one REPEATABLE READ snapshot together with the log head it is
/// consistent with, and the presence of users on the other live nodes.
pub(crate) fn load(
    client: &mut Client,
    node: &str,
    dedup_since: i64,
    node_ttl: Duration,
) -> Result<Loaded, StoreError> {
    let mut tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(sql("begin load"))?;
    let mut l = Loaded {
        users: tx
            .query(&format!("SELECT {USER_COLS} FROM users"), &[])
            .map_err(sql("load users"))?
            .iter()
            .map(|r| user_of(r, 0))
            .collect(),
        ..Loaded::default()
    };
    for r in tx
        .query(
            "SELECT hash, user_key, COALESCE(last_used, created) FROM sessions
             ORDER BY created, hash",
            &[],
        )
        .map_err(sql("load sessions"))?
    {
        let h: Vec<u8> = r.get(0);
        if let Ok(h) = <[u8; 32]>::try_from(h.as_slice()) {
            l.sessions.push((h, r.get(1), r.get(2)));
        }
    }
    l.dedup = tx
        .query(
            "SELECT user_key, ref, id, ts FROM dedup WHERE ts >= $1 ORDER BY ts, id",
            &[&dedup_since],
        )
        .map_err(sql("load dedup"))?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    l.rooms = tx
        .query("SELECT name FROM rooms", &[])
        .map_err(sql("load rooms"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    l.members = tx
        .query("SELECT room, user_key FROM members", &[])
        .map_err(sql("load members"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    l.dm_pairs = tx
        .query("SELECT a, b FROM dm_pairs", &[])
        .map_err(sql("load dm pairs"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    l.conv_state = tx
        .query(
            "SELECT user_key, conv, read_id, notify FROM conv_state",
            &[],
        )
        .map_err(sql("load read state"))?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let log_pos: i64 = tx
        .query_one("SELECT pos FROM log_head", &[])
        .map_err(sql("read log head"))?
        .get(0);
    let online = tx
        .query(
            "SELECT p.node, p.user_key FROM presence p JOIN nodes n ON n.id = p.node
             WHERE p.node <> $1 AND n.heartbeat >= now() - $2::float8 * interval '1 second'
             ORDER BY p.node, p.user_key",
            &[&node, &node_ttl.as_secs_f64()],
        )
        .map_err(sql("load presence"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    tx.commit().map_err(sql("end load"))?;
    l.next_id = log_pos + 1;
    l.cluster = Some(ClusterLoaded {
        node: node.to_string(),
        log_pos,
        online,
    });
    Ok(l)
}
