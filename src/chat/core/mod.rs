//! The chat's decisions, sans-IO: the [`Hub`].
//!
//! The hub holds every user, room, session and connection of the chat in memory and decides
//! everything from that state. It performs no I/O and reads no clock: inputs arrive through
//! `handle_*` calls with the time passed in ([`Now`]); outputs are [`Effect`]s and store
//! requests queued in [`Effects`], which the caller (the `ChatService` adapter) carries out
//! after each call: frames to connections, closes, hashing jobs, store writes and queries.
//! Worker results come back as `handle_auth_result` / `handle_store_event`. Tests drive the
//! hub directly with a fixed clock, no threads and no sockets.
//!
//! Commands live in [`cmd`], one file per family; replies that wait for the store in
//! [`commit`]; in-memory records in [`state`].

use core::net::IpAddr;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::confusable::{skeleton_keys, SkeletonIndex};
use super::frame::text_frame;
use super::hashq::FairQueue;
use super::protocol::{parse_client_frame, Command, ErrorCode, PresenceEvent, ServerFrame};
use super::ratelimit::{FailureThrottle, TokenBucket};
use super::store::{Loaded, LoadedUser, Query, StoreEvent, StoreReq, UserChange, Write};
use super::ChatConfig;
use crate::service::{CloseCode, ConnId};

pub mod cmd;
pub mod commit;
pub mod effects;
pub mod state;
#[cfg(test)]
mod tests;

pub use effects::{AuthJob, AuthResult, Effect, Effects, Now};
use state::{Conn, DedupEntry, Ring, Room, Session, User};

/// Ids reserved ahead in the store. Refreshed at half use, so the hub never waits for it in
/// practice; if it ever ran out (store stalled for 500,000 messages) messages are refused.
pub const ID_RESERVE: i64 = 1_000_000;
/// The room every new account is a member of.
const GENERAL: &str = "general";
const DEFAULT_HISTORY_LIMIT: u32 = 50;
const MAX_HISTORY_LIMIT: u32 = 200;
/// Sessions (tokens) kept per user; a new login beyond this revokes the oldest. Without a
/// bound, repeated logins would grow memory and the store forever.
const MAX_SESSIONS: usize = 64;
/// How often expired sessions and dedup refs are swept from memory and the store.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// No connection: a broadcast that skips `NOBODY` reaches every recipient.
const NOBODY: ConnId = ConnId(u64::MAX);

/// Replaces `scratch` with the connections of the users `keys`, minus `skip_conn`. A free
/// function over the two fields so callers can iterate another part of the hub (a room's
/// members) while filling the list.
fn conns_of<'a>(
    scratch: &mut Vec<ConnId>,
    users: &HashMap<String, User>,
    keys: impl Iterator<Item = &'a String>,
    skip_conn: ConnId,
) {
    scratch.clear();
    extend_conns_of(scratch, users, keys, skip_conn);
}

/// Appends the connections of `keys` (minus `skip_conn`) to `scratch`.
fn extend_conns_of<'a>(
    scratch: &mut Vec<ConnId>,
    users: &HashMap<String, User>,
    keys: impl Iterator<Item = &'a String>,
    skip_conn: ConnId,
) {
    for k in keys {
        if let Some(u) = users.get(k) {
            scratch.extend(u.conns.iter().copied().filter(|c| *c != skip_conn));
        }
    }
}

/// Work that may only happen once a write has committed.
enum Pending {
    Ack {
        conn: ConnId,
        user: String,
        reference: Option<String>,
        id: i64,
        ts: i64,
        accepted: Instant,
    },
    Welcome {
        conn: ConnId,
        user: String,
        token: String,
        reference: Option<String>,
    },
    /// Logout: close these connections with 1000 once the revocation is durable.
    Close {
        conns: Vec<ConnId>,
    },
    /// A registration's account row. If it did not store (`parlor user add` took the name
    /// meanwhile), the `Welcome` queued behind it is cancelled and the row is reloaded.
    Account {
        conn: ConnId,
        key: String,
        /// The registration's password hash, for as long as memory may still hold it.
        phc: String,
        reference: Option<String>,
    },
    Reserved {
        upto: i64,
    },
    /// An edit, delete or reaction (`seq` is `None` when it changed nothing).
    ChangeAck {
        conn: ConnId,
        reference: Option<String>,
        id: i64,
        seq: Option<i64>,
        ts: i64,
        /// Cluster mode: the `seq` is the one the store assigned to this write.
        assigned: bool,
    },
}

enum QueryWaiter {
    Ring {
        room: String,
    },
    /// Changes (or a reply) waiting for message `id`'s state.
    Lookup {
        id: i64,
    },
    Catchup {
        conn: ConnId,
        reference: Option<String>,
        since: i64,
        /// The newest seq handed out when the query was sent.
        head: i64,
    },
    /// A sign-in whose `welcome` waits for its unread counts.
    Welcome {
        conn: ConnId,
        key: String,
        token: String,
        reference: Option<String>,
        /// The conversations counted, in order.
        convs: Vec<String>,
    },
    Search {
        conn: ConnId,
        reference: Option<String>,
    },
    History {
        conn: ConnId,
        reference: Option<String>,
        room: Option<String>,
        with: Option<String>,
    },
}

enum AuthWaiter {
    Register {
        conn: ConnId,
        key: String,
        /// The name's look-alike keys, reserved while hashing (see `registering`).
        skeleton: Vec<String>,
        name: String,
        reference: Option<String>,
    },
    Login {
        conn: ConnId,
        key: String,
        ip: Option<IpAddr>,
        reference: Option<String>,
        /// The account's `cred_epoch` when its hash was handed to the worker.
        epoch: u64,
    },
}

/// A hashing job waiting in [`Hub::hash_queue`] for a free worker.
struct QueuedHash {
    conn: ConnId,
    job: AuthJob,
}

/// count / sum / max of a duration or size (a Prometheus summary without quantiles).
pub use crate::prom::Summary as Stat;

/// The hub's counters, read by the adapter for `/metrics`.
#[derive(Default, Debug)]
pub struct Counters {
    pub messages_in: u64,
    /// Edits, deletes and reactions that changed something.
    pub changes_in: u64,
    pub store_batch_seconds: Stat,
    pub store_batch_writes: Stat,
    pub ack_seconds: Stat,
    pub store_failures: u64,
    pub errors: [u64; ErrorCode::ALL.len()],
    pub logins_ok: u64,
    pub logins_failed: u64,
}

/// The chat: all state and every decision. See the module docs.
/// How long writes may wait for a commit before `/healthz` reports the store as stalled.
pub const STORE_STALL: std::time::Duration = std::time::Duration::from_secs(10);

/// The store as the hub sees it through commit reports.
#[derive(Debug)]
struct StoreState {
    /// Writes up to this sequence number are done (committed or failed).
    committed: u64,
    /// The last batch with writes failed as a whole.
    failing: bool,
    /// The last commit report, or the last moment nothing was waiting.
    progress: std::time::Instant,
}

pub struct Hub {
    cfg: ChatConfig,
    /// The time of the call being handled.
    now: Now,
    fx: Effects,
    /// Bumped whenever any user's connections or any room's members or pending joins change;
    /// a room's cached fan-out list is valid only for the epoch it was built in.
    membership_epoch: u64,
    /// Sequence number of the last write sent to the store.
    write_seq: u64,
    /// Messages' state for edits, deletes and reactions (see `cmd::changes`).
    changes: cmd::changes::Changes,
    /// What `/healthz` says of the store (see [`Hub::store_health`]).
    store_state: StoreState,
    pending: VecDeque<(u64, Pending)>,
    next_qid: u64,
    queries: HashMap<u64, QueryWaiter>,
    next_job: u64,
    jobs: HashMap<u64, AuthWaiter>,
    /// Hashing jobs waiting for a worker, fair across client addresses.
    hash_queue: FairQueue<Option<IpAddr>, QueuedHash>,
    /// Look-alike keys of names being registered (hashing in progress): a second
    /// registration of the same or a look-alike name is `user_taken`.
    registering: SkeletonIndex,
    /// Look-alike keys of every account name, and of every user's current nick.
    name_skeletons: SkeletonIndex,
    nick_skeletons: SkeletonIndex,
    users: HashMap<String, User>,
    sessions: HashMap<[u8; 32], Session>,
    /// Registrations waiting for a `LoadUser` answer (their account did not store), by key.
    reloads: HashMap<String, Vec<(ConnId, Option<String>)>>,
    /// Unauthenticated connections in order of their `--auth-timeout` deadline.
    auth_deadlines: VecDeque<(Instant, ConnId)>,
    /// When sessions and dedup refs were last swept (see `SWEEP_INTERVAL`).
    last_sweep: Option<Instant>,
    rooms: BTreeMap<String, Room>,
    conns: HashMap<ConnId, Conn>,
    online: HashSet<String>,
    /// Users with dedup entries, so expiry does not walk every account.
    dedup_users: HashSet<String>,
    /// Rooms that may have lost their last online member since the last tick (see
    /// `cool_if_unwatched`). Checked once per tick, so a storm of departures from a big room
    /// costs one scan of its members, not one per departure.
    maybe_unwatched: HashSet<String>,
    next_id: i64,
    /// Ids below this are covered by a committed reservation and may be broadcast.
    id_durable: i64,
    /// Highest reservation sent to the store (committed or not).
    id_requested: i64,
    /// Failed logins per (account, address), per address, per account (all addresses).
    pair_throttle: FailureThrottle<(String, Option<IpAddr>)>,
    ip_throttle: FailureThrottle<IpAddr>,
    account_throttle: FailureThrottle<String>,
    /// Registrations per client address (counted like failures: every one counts).
    register_throttle: FailureThrottle<IpAddr>,
    typing: HashMap<(String, String), Instant>,
    m: Counters,
    /// Reused recipient list, so a broadcast allocates nothing per recipient.
    scratch: Vec<ConnId>,
    /// Cluster mode (PostgreSQL): this node and what it knows of the others.
    cluster: Option<cmd::cluster::ClusterState>,
}

impl Hub {
    /// A hub over what the store loaded at startup. `reserved`: ids below it are covered by a
    /// committed reservation.
    pub fn new(cfg: ChatConfig, loaded: Loaded, reserved: i64, now: Now) -> Hub {
        let mut users = HashMap::with_capacity(loaded.users.len());
        let mut name_skeletons = SkeletonIndex::default();
        let mut nick_skeletons = SkeletonIndex::default();
        for u in loaded.users {
            name_skeletons.insert(&skeleton_keys(&u.name), &u.key);
            nick_skeletons.insert(&skeleton_keys(&u.nick), &u.key);
            let mut user = User::new(u.key.clone(), u.name, u.nick, u.phc);
            user.last_seen = u.last_seen;
            user.disabled = u.disabled;
            users.insert(u.key, user);
        }
        // Refs of messages committed before the restart: a client retrying one of them gets
        // the original ack, not a second message.
        let mut dedup_users = HashSet::new();
        for (key, reference, id, ts) in loaded.dedup {
            let Some(u) = users.get_mut(&key) else {
                continue;
            };
            let age = Duration::from_millis(now.wall_ms.saturating_sub(ts).max(0) as u64);
            let at = now.mono.checked_sub(age).unwrap_or(now.mono);
            let entry = DedupEntry {
                at,
                id,
                ts,
                committed: true,
                waiters: Vec::new(),
            };
            u.dedup.insert(reference, entry, cfg.dedup_max_refs);
            dedup_users.insert(key);
        }
        let mut rooms = BTreeMap::new();
        for r in loaded.rooms {
            rooms.insert(r, Room::new(Ring::Cold));
        }
        for (room, key) in loaded.members {
            if let (Some(r), Some(u)) = (rooms.get_mut(&room), users.get_mut(&key)) {
                r.members.insert(key.clone());
                u.rooms.insert(room);
            }
        }
        for (a, b) in loaded.dm_pairs {
            if let Some(u) = users.get_mut(&a) {
                u.dm_partners.insert(b.clone());
            }
            if let Some(u) = users.get_mut(&b) {
                u.dm_partners.insert(a);
            }
        }
        for (key, conv, read, notify) in loaded.conv_state {
            if let Some(u) = users.get_mut(&key) {
                u.convs.insert(conv, state::ConvPrefs { read, notify });
            }
        }
        let mut sessions = HashMap::with_capacity(loaded.sessions.len());
        for (hash, key, last_used) in loaded.sessions {
            if let Some(u) = users.get_mut(&key) {
                u.sessions.push_back(hash);
                sessions.insert(
                    hash,
                    Session {
                        user: key,
                        last_used,
                    },
                );
            }
        }
        let cluster = loaded.cluster.as_ref().map(cmd::cluster::ClusterState::new);
        let mut online = HashSet::new();
        for (node, key) in loaded.cluster.map(|c| c.online).unwrap_or_default() {
            if let Some(u) = users.get_mut(&key) {
                u.remote.push(node);
                online.insert(key);
            }
        }
        let login_limit = |n: usize| if cfg.login_throttle == 0 { 0 } else { n };
        Hub {
            membership_epoch: 0,
            pair_throttle: FailureThrottle::new(cfg.login_throttle, cfg.login_window),
            ip_throttle: FailureThrottle::new(login_limit(cfg.login_throttle_ip), cfg.login_window),
            account_throttle: FailureThrottle::new(
                login_limit(cfg.login_throttle_account),
                cfg.login_window,
            ),
            hash_queue: FairQueue::new(cfg.hash_queue_per_ip, cfg.hash_queue, cfg.hash_threads),
            register_throttle: FailureThrottle::new(
                if cfg.rate_limit == 0.0 {
                    0
                } else {
                    cfg.register_throttle
                },
                cfg.login_window,
            ),
            cfg,
            now,
            fx: Effects::default(),
            write_seq: 0,
            changes: Default::default(),
            store_state: StoreState {
                committed: 0,
                failing: false,
                progress: now.mono,
            },
            pending: VecDeque::new(),
            next_qid: 0,
            queries: HashMap::new(),
            next_job: 0,
            jobs: HashMap::new(),
            registering: SkeletonIndex::default(),
            name_skeletons,
            nick_skeletons,
            users,
            sessions,
            reloads: HashMap::new(),
            auth_deadlines: VecDeque::new(),
            last_sweep: None,
            rooms,
            conns: HashMap::new(),
            online,
            dedup_users,
            maybe_unwatched: HashSet::new(),
            next_id: loaded.next_id,
            id_durable: reserved,
            id_requested: reserved,
            typing: HashMap::new(),
            m: Counters::default(),
            scratch: Vec::new(),
            cluster,
        }
    }

    // ----- inputs ---------------------------------------------------------------------------

    /// A WebSocket connection opened on the chat endpoint, from client address `addr`.
    pub fn handle_open(&mut self, conn: ConnId, addr: Option<IpAddr>, now: Now) {
        self.now = now;
        self.conns.insert(conn, Conn::new(addr));
        self.auth_deadlines
            .push_back((now.mono + self.cfg.auth_timeout, conn));
    }

    /// A text message from a connection.
    pub fn handle_text(&mut self, conn: ConnId, text: &str, now: Now) {
        self.now = now;
        // Defensive: the loop always opens first, but a test double may not.
        self.conns.entry(conn).or_insert_with(|| Conn::new(None));
        self.on_text(conn, text);
    }

    /// A binary message: the protocol is JSON text only.
    pub fn handle_binary(&mut self, conn: ConnId, now: Now) {
        self.now = now;
        self.close(conn, CloseCode::UnsupportedData, "binary not supported");
    }

    /// The connection is gone (closed by either side, or dropped).
    pub fn handle_close(&mut self, conn: ConnId, now: Now) {
        self.now = now;
        self.on_close(conn);
    }

    /// A hashing worker finished a job.
    pub fn handle_auth_result(&mut self, res: AuthResult, now: Now) {
        self.now = now;
        self.on_auth_result(res);
    }

    /// The store reported a commit or a query result.
    pub fn handle_store_event(&mut self, ev: StoreEvent, now: Now) {
        self.now = now;
        match ev {
            StoreEvent::Committed {
                upto,
                ok,
                failed,
                batch,
                latency,
                assigned,
                unavailable,
            } => {
                self.m.store_batch_seconds.add(latency.as_secs_f64());
                self.m.store_batch_writes.add(batch as f64);
                if !ok {
                    self.m.store_failures += 1;
                }
                let st = &mut self.store_state;
                st.committed = upto;
                st.progress = now.mono;
                if batch > 0 {
                    // A batch whose every write failed says the store cannot take writes (a
                    // lock held elsewhere, a full disk); one bad row among good ones does not.
                    st.failing = !ok || failed.len() == batch;
                }
                self.on_committed(upto, ok, &failed, &assigned, unavailable);
            }
            StoreEvent::QueryDone {
                qid,
                messages,
                more,
            } => self.on_query(qid, messages, more),
            StoreEvent::MessageFound { qid, found } => {
                if let Some(QueryWaiter::Lookup { id }) = self.queries.remove(&qid) {
                    self.on_lookup(id, found);
                }
            }
            StoreEvent::UnreadDone { qid, counts } => {
                if let Some(QueryWaiter::Welcome {
                    conn,
                    key,
                    token,
                    reference,
                    convs,
                }) = self.queries.remove(&qid)
                {
                    self.finish_welcome(conn, &key, &token, reference.as_deref(), &convs, &counts);
                }
            }
            StoreEvent::SearchDone { qid, results, more } => {
                if let Some(QueryWaiter::Search { conn, reference }) = self.queries.remove(&qid) {
                    self.on_search(conn, reference, results, more);
                }
            }
            StoreEvent::CatchupDone {
                qid,
                items,
                more,
                reset,
            } => {
                if let Some(QueryWaiter::Catchup {
                    conn,
                    reference,
                    since,
                    head,
                }) = self.queries.remove(&qid)
                {
                    self.on_catchup(conn, reference, (since, head), (items, more, reset));
                }
            }
            StoreEvent::UserChanged { change, key, user } => {
                self.on_user_changed(change, key, user)
            }
            StoreEvent::Log(entries) => self.on_log(entries),
        }
    }

    /// Whether the store takes writes, for `/healthz`: `Err` with the reason when its last
    /// batch of writes failed, or when writes have waited [`STORE_STALL`] with no commit.
    pub fn store_health(&self, now: std::time::Instant) -> Result<(), String> {
        let st = &self.store_state;
        if st.failing {
            return Err("store: the last writes failed".into());
        }
        let waiting = self.write_seq > st.committed;
        let quiet = now.saturating_duration_since(st.progress);
        if waiting && quiet >= STORE_STALL {
            return Err(format!(
                "store: {} writes waiting, no commit for {}s",
                self.write_seq - st.committed,
                quiet.as_secs()
            ));
        }
        Ok(())
    }

    /// An account changed outside the protocol (an operator command, reported by the store
    /// with the row as it now is), or the answer to the hub's own `LoadUser`. The same as
    /// `handle_store_event` with [`StoreEvent::UserChanged`].
    pub fn handle_user_changed(
        &mut self,
        change: UserChange,
        key: String,
        user: Result<Option<LoadedUser>, String>,
        now: Now,
    ) {
        self.now = now;
        self.on_user_changed(change, key, user);
    }

    /// About once a second: expiries and housekeeping that are due by time.
    pub fn handle_tick(&mut self, now: Now) {
        self.now = now;
        if self.write_seq == self.store_state.committed {
            // Nothing waits: a stall can only start from here.
            self.store_state.progress = now.mono;
        }
        let now = now.mono;
        self.pair_throttle.prune(now);
        self.ip_throttle.prune(now);
        self.account_throttle.prune(now);
        self.register_throttle.prune(now);
        self.expire_unauthenticated(now);
        self.sweep(now);
        let interval = self.cfg.typing_interval;
        self.typing
            .retain(|_, t| now.saturating_duration_since(*t) < interval);
        let window = self.cfg.dedup_window;
        let users = &mut self.users;
        self.dedup_users.retain(|k| match users.get_mut(k) {
            Some(u) => {
                u.dedup.expire(now, window);
                !u.dedup.entries.is_empty()
            }
            None => false,
        });
        for room in std::mem::take(&mut self.maybe_unwatched) {
            self.cool_if_unwatched(&room);
        }
        self.retry_parked(true);
    }

    // ----- outputs --------------------------------------------------------------------------

    /// What the calls so far asked for; the caller carries it out and clears it.
    pub fn effects(&mut self) -> &mut Effects {
        &mut self.fx
    }

    pub fn counters(&self) -> &Counters {
        &self.m
    }

    /// Authenticated connections.
    pub fn authenticated(&self) -> usize {
        self.conns.values().filter(|c| c.user.is_some()).count()
    }

    pub fn users_online(&self) -> usize {
        self.online.len()
    }

    pub fn rooms_warm(&self) -> usize {
        self.rooms.values().filter(|r| r.is_warm()).count()
    }

    pub fn hash_jobs_waiting(&self) -> usize {
        self.hash_queue.queued()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Replies waiting for a commit (acks, welcomes, logout closes, id reservations).
    pub fn replies_waiting_for_commit(&self) -> usize {
        self.pending.len()
    }

    // ----- plumbing -------------------------------------------------------------------------

    fn send(&mut self, conn: ConnId, frame: &ServerFrame<'_>) {
        self.send_json(conn, frame.to_json());
    }

    fn send_json(&mut self, conn: ConnId, json: String) {
        self.fx.list.push(Effect::Send { conn, json });
    }

    fn close(&mut self, conn: ConnId, code: CloseCode, reason: &'static str) {
        self.fx.list.push(Effect::Close { conn, code, reason });
    }

    fn error(&mut self, conn: ConnId, code: ErrorCode, message: &str, reference: Option<&str>) {
        self.m.errors[code.index()] += 1;
        self.send(
            conn,
            &ServerFrame::Error {
                code,
                message,
                reference,
            },
        );
    }

    /// Frames `json` once and queues the same bytes for every connection in `self.scratch`.
    fn broadcast(&mut self, json: &str, message: bool) {
        let from = self.fx.recipients.len();
        self.fx.recipients.extend_from_slice(&self.scratch);
        self.broadcast_appended(json, message, from);
    }

    /// Frames `json` once for the recipients appended to `fx.recipients` since `from` (a
    /// room's cached list goes there directly, without a stop in `scratch`).
    fn broadcast_appended(&mut self, json: &str, message: bool, from: usize) {
        let to = self.fx.recipients.len();
        if to == from {
            return;
        }
        let frame = text_frame(json.as_bytes());
        self.fx.list.push(Effect::Broadcast {
            frame,
            from,
            to,
            message,
        });
    }

    fn on_close(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(gone) = &c.gone {
            gone.store(true, Ordering::Relaxed);
        }
        if c.auth_pending {
            // Its sign-in may still be waiting for a worker: nobody will read the answer.
            let dropped = self.hash_queue.remove_where(|q| q.conn == conn);
            for q in dropped {
                self.abandon_job(q.job.id());
            }
        }
        let Some(key) = c.user else {
            return;
        };
        if let Some(hash) = c.token_hash {
            self.touch_session(hash, self.now.wall_ms);
        }
        let Some(u) = self.users.get_mut(&key) else {
            return;
        };
        u.conns.retain(|x| *x != conn);
        self.membership_epoch += 1;
        if !u.conns.is_empty() {
            return;
        }
        let ts = self.now.wall_ms;
        u.last_seen = Some(ts);
        self.write(Write::SetLastSeen {
            key: key.clone(),
            ts,
        });
        if !self.local_presence(&key, false) {
            return; // still online on another node
        }
        self.online.remove(&key);
        self.collect_sharer_conns(&key, conn);
        let u = &self.users[&key];
        let json = ServerFrame::Presence {
            room: None,
            user: &u.name,
            nick: &u.nick,
            event: PresenceEvent::Offline,
            last_seen: Some(ts),
        }
        .to_json();
        self.broadcast(&json, false);
        let rooms = &self.users[&key].rooms;
        self.maybe_unwatched.extend(rooms.iter().cloned());
    }

    pub(in crate::chat::core) fn write(&mut self, w: Write) -> u64 {
        self.write_seq += 1;
        self.fx.store.push(StoreReq::Write(w));
        self.write_seq
    }

    /// Runs `p` once everything written so far has committed.
    pub(in crate::chat::core) fn after_commit(&mut self, p: Pending) {
        self.pending.push_back((self.write_seq, p));
    }

    /// [`Self::after_commit`], or at once when nothing written is still waiting (no commit
    /// report would come to release it).
    pub(in crate::chat::core) fn after_commit_or_now(&mut self, p: Pending) {
        self.after_commit(p);
        if self.write_seq <= self.store_state.committed {
            let upto = self.store_state.committed;
            self.on_committed(upto, true, &[], &[], false);
        }
    }

    pub(in crate::chat::core) fn query(&mut self, q: Query, waiter: QueryWaiter) {
        self.next_qid += 1;
        self.queries.insert(self.next_qid, waiter);
        self.fx.store.push(StoreReq::Query {
            qid: self.next_qid,
            query: q,
        });
    }

    /// Puts the connections of `keys` (minus `skip_conn`) into the scratch list.
    pub(in crate::chat::core) fn collect_conns<'a>(
        &mut self,
        keys: impl Iterator<Item = &'a String>,
        skip_conn: ConnId,
    ) {
        conns_of(&mut self.scratch, &self.users, keys, skip_conn);
    }

    /// Puts the connections of users sharing a room with `key` (not `key`'s own, nor
    /// `skip_conn`) into the scratch list, each once. Presence goes to this list on every
    /// first connect and last disconnect, so when everyone reconnects at once it runs once per
    /// user over a room of everyone: no per-member String clone or set insert here, only the
    /// member's connection lookup.
    pub(in crate::chat::core) fn collect_sharer_conns(&mut self, key: &str, skip_conn: ConnId) {
        self.scratch.clear();
        let Some(u) = self.users.get(key) else {
            return;
        };
        for r in &u.rooms {
            let Some(room) = self.rooms.get(r) else {
                continue;
            };
            let others = room.members.iter().filter(|m| *m != key);
            extend_conns_of(&mut self.scratch, &self.users, others, skip_conn);
        }
        if u.rooms.len() > 1 {
            // Someone in two of these rooms has been collected twice.
            self.scratch.sort_unstable();
            self.scratch.dedup();
        }
    }

    /// One token from the user's bucket (say, dm, nick, creating a room).
    pub(in crate::chat::core) fn take_token(&mut self, key: &str, now: Instant) -> bool {
        let (rate, burst) = (self.cfg.rate_limit, self.cfg.rate_burst);
        match self.users.get_mut(key) {
            Some(u) => u
                .bucket
                .get_or_insert_with(|| TokenBucket::new(burst, now))
                .try_take(rate, burst, now),
            None => false,
        }
    }

    pub(in crate::chat::core) fn conn_user(&self, conn: ConnId) -> Option<String> {
        self.conns.get(&conn).and_then(|c| c.user.clone())
    }

    /// Processes one text message, or queues it behind an outstanding join or authentication
    /// so that a connection's requests always take effect in the order it sent them.
    pub(in crate::chat::core) fn on_text(&mut self, conn: ConnId, text: &str) {
        let (user, closing) = match self.conns.get_mut(&conn) {
            Some(c) => {
                if let Some(b) = &mut c.backlog {
                    if b.len() >= self.cfg.max_pending_requests {
                        c.closing = true;
                        return self.close(
                            conn,
                            CloseCode::PolicyViolation,
                            "too many requests in flight",
                        );
                    }
                    b.push_back(text.to_string());
                    return;
                }
                (c.user.clone(), c.closing)
            }
            None => return,
        };
        if closing {
            return;
        }
        let frame = match parse_client_frame(text.as_bytes()) {
            Ok(f) => f,
            Err(e) => {
                return self.error(conn, e.code, &e.message, e.reference.as_deref());
            }
        };
        match (user, frame.command) {
            (
                None,
                cmd @ (Command::Register { .. } | Command::Login { .. } | Command::Resume { .. }),
            ) => self.handle_auth(conn, cmd, frame.reference),
            (None, _) => self.error(
                conn,
                ErrorCode::Unauthenticated,
                "register, login or resume first",
                frame.reference.as_deref(),
            ),
            (Some(key), cmd) => self.handle(conn, key, cmd, frame.reference),
        }
    }

    /// Holds further messages of `conn` until [`Self::unblock`].
    pub(in crate::chat::core) fn block(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.backlog.get_or_insert_with(VecDeque::new);
        }
    }

    /// Releases `conn` and runs what it sent meanwhile, in order. If one of those blocks it
    /// again, the rest queue up behind that one.
    pub(in crate::chat::core) fn unblock(&mut self, conn: ConnId) {
        let Some(items) = self.conns.get_mut(&conn).and_then(|c| c.backlog.take()) else {
            return;
        };
        for text in items {
            self.on_text(conn, &text);
        }
    }

    /// Test hook: the id the next accepted message will get.
    #[cfg(test)]
    pub(crate) fn next_id(&self) -> i64 {
        self.next_id
    }

    /// Test hook: nothing is waiting on a worker thread.
    #[cfg(test)]
    pub(crate) fn is_idle(&self) -> bool {
        self.pending.is_empty()
            && self.reloads.is_empty()
            && self.queries.is_empty()
            && self.jobs.is_empty()
            && self.hash_queue.queued() == 0
    }

    pub(in crate::chat::core) fn handle(
        &mut self,
        conn: ConnId,
        key: String,
        cmd: Command,
        reference: Option<String>,
    ) {
        let r = reference.as_deref();
        match cmd {
            Command::Register { .. } | Command::Login { .. } | Command::Resume { .. } => {
                self.error(conn, ErrorCode::BadRequest, "already authenticated", r)
            }
            Command::Logout { all } => self.logout(conn, &key, all),
            Command::Join { room } => self.join(conn, &key, room, reference),
            Command::Leave { room } => self.leave(conn, &key, &room, r),
            Command::Rooms {} => self.list_rooms(conn, r),
            Command::Who { room } => self.who(conn, &room, r),
            Command::Say {
                room,
                text,
                reply_to,
            } => self.say(conn, &key, Some(room), None, text, reply_to, r),
            Command::Dm { to, text, reply_to } => {
                self.say(conn, &key, None, Some(to), text, reply_to, r)
            }
            Command::Edit { id, text } => self.edit(conn, &key, id, text, r),
            Command::Delete { id } => self.delete(conn, &key, id, r),
            Command::React { id, emoji, on } => self.react(conn, &key, id, emoji, on, r),
            Command::Catchup { since, limit } => self.catchup(conn, &key, since, limit, r),
            Command::Read { room, with, id } => self.read(conn, &key, room, with, id, r),
            Command::Notify { room, with, level } => self.notify(conn, &key, room, with, level, r),
            Command::Search {
                q,
                room,
                with,
                from,
                before,
                limit,
            } => self.search(conn, &key, q, (room, with, from), before, limit, r),
            Command::History {
                room,
                with,
                before,
                after,
                limit,
            } => self.history(conn, &key, room, with, before, after, limit, r),
            Command::Nick { nick } => self.nick(conn, &key, nick, r),
            Command::Typing { room, to } => self.typing(conn, &key, room, to, r),
        }
    }
}
