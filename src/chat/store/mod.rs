//! Chat storage: the vocabulary the chat speaks to its store, and the [`Store`] trait an
//! implementation provides. Nothing here knows SQL or threads; [`sqlite`] is the one
//! implementation today (SQLite on a dedicated thread, group commit).
//!
//! The contract, whatever the backend: the loop hands over one turn's requests at a time
//! ([`Store::submit`]); writes are numbered 1, 2, … in the order they are submitted, across
//! calls; a query sees every write submitted before it; the store reports progress as
//! [`StoreEvent`]s, query results of a batch before the [`StoreEvent::Committed`] that ends
//! it, and wakes the loop (through [`Wake`]) after sending them.

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use super::protocol::ChatMessage;
use super::Wake;

pub mod accounts;
pub mod cluster;
pub mod postgres;
pub mod sqlite;

pub use sqlite::{backup, restore, verify_copy, CopySummary, SqliteStore};

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
    /// A new text for message `id`; the old one goes to its edit history. `conv` is the
    /// conversation key ([`conv_key`]), `seq` the change's place in the log.
    EditMessage {
        id: i64,
        text: String,
        edited_ts: i64,
        seq: i64,
        conv: String,
        /// For a DM: the message's author and recipient (names), which change frames carry.
        dm_names: Option<(String, String)>,
    },
    /// Message `id` loses its text, edit history and reactions for good.
    DeleteMessage {
        id: i64,
        seq: i64,
        conv: String,
        ts: i64,
        dm_names: Option<(String, String)>,
    },
    /// `user` (an account name) adds (`on`) or removes a reaction. Only sent for a change.
    SetReaction {
        id: i64,
        user: String,
        emoji: String,
        on: bool,
        seq: i64,
        conv: String,
        ts: i64,
        dm_names: Option<(String, String)>,
    },
    /// Forgets change events older than `before_ts`, except the newest `keep`; catch-up from
    /// before the oldest kept one is answered with a reset.
    PruneEvents {
        before_ts: i64,
        keep: usize,
    },
    /// The user read conversation `conv` up to `id` (only ever moves forward).
    SetRead {
        user_key: String,
        conv: String,
        id: i64,
    },
    /// The user's notification level for `conv`.
    SetNotify {
        user_key: String,
        conv: String,
        level: String,
    },
    /// Cluster mode: an event other nodes must see that changes nothing stored (presence,
    /// typing). Appended to the log only; a single-node store ignores it.
    Relay(cluster::LogEvent),
}

/// One conversation whose unread counts `welcome` needs.
#[derive(Debug, Clone)]
pub struct UnreadQuery {
    /// Room name or DM pair key ([`conv_key`]).
    pub conv: String,
    pub dm: bool,
    pub read: i64,
}

/// Unread messages by others after the read marker, and how many of them mention the user
/// (every DM message counts as a mention), each at most [`MAX_UNREAD`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Unread {
    pub unread: u32,
    pub mentions: u32,
}

/// Unread counts stop here ("999+"): counting further would read the whole backlog.
pub const MAX_UNREAD: u32 = 999;

/// What to search (see `docs/PROTOCOL.md`, "search").
#[derive(Debug, Clone)]
pub struct SearchQuery {
    /// The FTS5 expression ([`crate::chat::search::fts_query`]).
    pub fts: String,
    /// Conversations to look in (room names and DM pair keys): the user's, or the one asked.
    pub convs: Vec<String>,
    /// Only messages by this account name.
    pub from: Option<String>,
    pub before: Option<i64>,
    pub limit: usize,
}

/// The conversation a message belongs to, as change events are filed: the room's name, or the
/// DM pair key ([`dm_key`], which contains a newline and so never looks like a room).
pub fn conv_key(room: Option<&str>, dm: Option<&str>) -> String {
    room.or(dm).unwrap_or_default().to_string()
}

/// A message with what only the store knows about it, for edits, deletes and reactions.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub msg: ChatMessage,
    /// The DM pair key, for a DM.
    pub dm: Option<String>,
    /// How many times it was edited.
    pub edits: u32,
}

/// One entry of a catch-up: what changed, and the message as it is now.
#[derive(Debug, Clone)]
pub struct ChangeItem {
    pub seq: i64,
    pub kind: ChangeKind,
    pub msg: ChatMessage,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ChangeKind {
    Message,
    Edited,
    Deleted,
    Reaction {
        user: String,
        emoji: String,
        on: bool,
    },
}

#[derive(Debug, Clone)]
pub enum Target {
    Room(String),
    Dm(String),
}

#[derive(Debug, Clone)]
pub enum Query {
    /// The newest `limit` messages of a room, for the join snapshot ring. Cluster mode: only
    /// messages with `id <= upto` (the log position the hub has applied), so the ring is
    /// exactly what the hub has seen and later messages reach it through the log.
    LoadRing {
        room: String,
        limit: usize,
        upto: Option<i64>,
    },
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
    /// One message in its current state, for an edit, delete, reaction or reply check.
    Message { id: i64 },
    /// Unread counts for `welcome`: `names` are the user's account name and nick (mentions),
    /// `user` the account name (their own messages are not unread).
    Unread {
        user: String,
        names: Vec<String>,
        convs: Vec<UnreadQuery>,
    },
    Search {
        search: SearchQuery,
        cancelled: Option<Arc<AtomicBool>>,
    },
    /// Messages and change events with `seq > since` in the conversations `convs` (room names
    /// and DM pair keys), oldest first, at most `limit`.
    Catchup {
        since: i64,
        convs: Vec<String>,
        limit: usize,
        cancelled: Option<Arc<AtomicBool>>,
    },
}

#[derive(Debug)]
pub enum StoreReq {
    Write(Write),
    Query {
        qid: u64,
        query: Query,
    },
    /// Read one user's row as it is now; answered by [`StoreEvent::UserChanged`] with
    /// [`UserChange::Reloaded`] (the hub's way back to the truth after its own write of that
    /// user failed).
    LoadUser {
        key: String,
    },
    Shutdown,
}

/// What an operator command (`parlor user …`, see [`accounts`]) did to an account. The
/// command records it in the store's change log together with the change itself; the store of
/// a running server notices it and reports [`StoreEvent::UserChanged`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserChange {
    /// `parlor user add`: a new account.
    Added,
    /// `parlor user passwd`: a new password; every session was revoked.
    Password,
    /// `parlor user disable`: no sign-in any more; every session was revoked.
    Disabled,
    /// `parlor user enable`.
    Enabled,
    /// Not an operator command: the answer to [`StoreReq::LoadUser`].
    Reloaded,
}

impl UserChange {
    /// The change log's `kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            UserChange::Added => "add",
            UserChange::Password => "passwd",
            UserChange::Disabled => "disable",
            UserChange::Enabled => "enable",
            UserChange::Reloaded => "reload",
        }
    }

    pub fn parse(s: &str) -> Option<UserChange> {
        [
            UserChange::Added,
            UserChange::Password,
            UserChange::Disabled,
            UserChange::Enabled,
            UserChange::Reloaded,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
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
        /// Cluster mode: the ids and `seq`s the store gave this batch's messages and changes
        /// (see [`cluster::Assigned`]); empty for a single-node store.
        assigned: Vec<cluster::Assigned>,
        /// The failure was the database being unreachable (cluster mode), not a statement:
        /// replies say `unavailable`.
        unavailable: bool,
    },
    /// Cluster mode: log entries other nodes (and this one) appended, in log order, each
    /// exactly once, with no gap since the previous report.
    Log(Vec<cluster::LogEntry>),
    /// Messages oldest first; `more` tells whether the range continues past them.
    QueryDone {
        qid: u64,
        messages: Vec<ChatMessage>,
        more: bool,
    },
    /// The answer to [`Query::Message`].
    MessageFound {
        qid: u64,
        found: Option<StoredMessage>,
    },
    /// The answer to [`Query::Unread`], in the order asked.
    UnreadDone { qid: u64, counts: Vec<Unread> },
    /// The answer to [`Query::Search`]: matches newest first.
    SearchDone {
        qid: u64,
        results: Vec<ChatMessage>,
        more: bool,
    },
    /// The answer to [`Query::Catchup`]: `reset` when `since` is older than the oldest change
    /// event kept.
    CatchupDone {
        qid: u64,
        items: Vec<ChangeItem>,
        more: bool,
        reset: bool,
    },
    /// An account changed behind the hub's back (an operator command), or the answer to
    /// [`StoreReq::LoadUser`]: `user` is its row as stored now (`Ok(None)`: there is no such
    /// account; `Err`: it could not be read, which only a `LoadUser` answer can say).
    UserChanged {
        change: UserChange,
        key: String,
        user: Result<Option<LoadedUser>, String>,
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
    /// Refs of messages stored since `dedup_since` (see [`open_sqlite`]): user key, ref, id,
    /// ts.
    pub dedup: Vec<(String, String, i64, i64)>,
    pub rooms: Vec<String>,
    pub members: Vec<(String, String)>,
    pub dm_pairs: Vec<(String, String)>,
    /// Read markers and notification levels: user key, conversation key ([`conv_key`]), read
    /// up to this id, level (`None`: the default).
    pub conv_state: Vec<(String, String, i64, Option<String>)>,
    /// First id free for use: above every stored id and every reservation ever made.
    pub next_id: i64,
    /// Cluster mode (a PostgreSQL store): this node and the log position the rest was read at.
    pub cluster: Option<cluster::ClusterLoaded>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedUser {
    pub key: String,
    pub name: String,
    pub nick: String,
    pub phc: String,
    pub last_seen: Option<i64>,
    /// `parlor user disable`: the account may not sign in.
    pub disabled: bool,
}

/// A backend error, boxed so this module names no backend's types.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a store could not be opened (or a startup step failed).
#[derive(Debug)]
pub enum StoreError {
    /// Creating or reading the data directory.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The database could not be opened at all.
    Open { path: PathBuf, source: BoxError },
    /// A statement failed; `context` says which step.
    Sql {
        context: &'static str,
        source: BoxError,
    },
    /// Migrating the schema to `to_version` failed; that migration was rolled back.
    Migration { to_version: i64, source: BoxError },
    /// The database was written by a newer version of parlor (schema `found_version`, this
    /// build knows up to `known_version`); it is left untouched.
    Schema {
        path: PathBuf,
        found_version: i64,
        known_version: i64,
    },
    /// The file holds tables but not a parlor chat database's (`user_version` 0, no `users`).
    NotChatDb { path: PathBuf },
    /// The store's worker thread could not be started.
    Thread(std::io::Error),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            StoreError::Open { path, source } => write!(f, "open {}: {source}", path.display()),
            StoreError::Sql { context, source } => write!(f, "store: {context}: {source}"),
            StoreError::Migration { to_version, source } => {
                write!(
                    f,
                    "store: migrating to schema version {to_version}: {source}"
                )
            }
            StoreError::Schema {
                path,
                found_version,
                known_version,
            } => write!(
                f,
                "{}: schema version {found_version} is newer than this parlor knows \
                 ({known_version}); use a newer parlor or restore a backup",
                path.display()
            ),
            StoreError::NotChatDb { path } => write!(
                f,
                "{}: not a parlor chat database (it has tables, but no `users`)",
                path.display()
            ),
            StoreError::Thread(e) => write!(f, "spawn store thread: {e}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Io { source, .. } | StoreError::Thread(source) => Some(source),
            StoreError::Open { source, .. }
            | StoreError::Sql { source, .. }
            | StoreError::Migration { source, .. } => Some(source.as_ref()),
            StoreError::Schema { .. } | StoreError::NotChatDb { .. } => None,
        }
    }
}

/// A chat store: takes writes and queries, reports commits and query results. Opened by a
/// backend's constructor (e.g. [`open_sqlite`]), which also returns the startup [`Loaded`]
/// state and the first id reservation.
pub trait Store: Send {
    /// Hands one loop turn's requests over, in order (writes get sequence numbers 1, 2, … in
    /// send order, counted across calls).
    fn submit(&mut self, reqs: Vec<StoreReq>);
    /// The next event (query result or commit report) if one is ready; never blocks.
    fn try_event(&mut self) -> Option<StoreEvent>;
    /// Commits everything submitted so far and stops the worker (joins it). Idempotent; no
    /// request may be submitted afterwards.
    fn shutdown(&mut self);
    /// Backend figures for `/metrics` (name, help, value), read on the loop thread: must not
    /// block (atomics the worker updates).
    fn metrics(&self) -> Vec<(&'static str, &'static str, f64)> {
        Vec::new()
    }
}

/// Requests one store transaction takes at most (every backend): bounds the latency of a batch
/// under flood.
pub(crate) const MAX_BATCH: usize = 4096;

/// A store worker's next batch: what is `queued` plus whatever the loop sent meanwhile, at
/// most [`MAX_BATCH`] requests (the rest stays queued for the next one).
pub(crate) fn next_batch(
    queued: &mut VecDeque<StoreReq>,
    rx: &Receiver<Vec<StoreReq>>,
) -> Vec<StoreReq> {
    while queued.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(reqs) => queued.extend(reqs),
            Err(_) => break,
        }
    }
    let take = queued.len().min(MAX_BATCH);
    queued.drain(..take).collect()
}

/// The loop's end of a store worker's two channels, behind [`Store::submit`] and
/// [`Store::try_event`] for every backend.
pub(crate) struct Channels {
    /// `None` once the worker was asked to stop.
    tx: Option<Sender<Vec<StoreReq>>>,
    rx: Receiver<StoreEvent>,
}

impl Channels {
    pub(crate) fn new(tx: Sender<Vec<StoreReq>>, rx: Receiver<StoreEvent>) -> Channels {
        Channels { tx: Some(tx), rx }
    }

    pub(crate) fn submit(&mut self, reqs: Vec<StoreReq>) {
        if reqs.is_empty() {
            return;
        }
        let sent = match &self.tx {
            Some(tx) => tx.send(reqs).is_ok(),
            None => false,
        };
        if !sent {
            log::error!("chat: store thread is gone; writes dropped");
        }
    }

    pub(crate) fn try_event(&mut self) -> Option<StoreEvent> {
        self.rx.try_recv().ok()
    }

    /// Sends [`StoreReq::Shutdown`] (the worker commits everything sent before it) and
    /// closes the request channel; later calls do nothing.
    pub(crate) fn stop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(vec![StoreReq::Shutdown]);
        }
    }
}

/// Opens (creating or migrating) `dir/chat.db`, loads startup state, persists a reservation
/// of `reserve` ids (returned: ids below it may be handed out) and starts the store thread,
/// which calls `wake.wake()` after sending events. Refs of messages with `ts >= dedup_since`
/// are loaded for retry deduplication; older ones are deleted.
pub fn open_sqlite(
    dir: &Path,
    durability: Durability,
    reserve: i64,
    dedup_since: i64,
    wake: Wake,
) -> Result<(Box<dyn Store>, Loaded, i64), StoreError> {
    let (store, loaded, reserved) = SqliteStore::open(dir, durability, reserve, dedup_since, wake)?;
    Ok((Box::new(store), loaded, reserved))
}

/// Opens the cluster store in the PostgreSQL database at `url` (see [`postgres`]): creates or
/// migrates the schema, registers this node, loads startup state (with
/// [`Loaded::cluster`] set) and starts the writer and bus threads, which call `wake.wake()`
/// after sending events. The returned reservation is `i64::MAX`: ids are log positions.
pub fn open_postgres(
    url: &str,
    opts: postgres::PgOptions,
    dedup_since: i64,
    wake: Wake,
) -> Result<(Box<dyn Store>, Loaded, i64), StoreError> {
    postgres::open_postgres(url, opts, dedup_since, wake)
}
