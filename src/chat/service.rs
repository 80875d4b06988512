//! [`ChatService`]: protocol v1 on the event loop.
//!
//! Every decision is made here, on the loop thread, from in-memory state; disk and hashing go
//! to worker threads and come back through `on_wake`. Ordering guarantees follow from that:
//! a message is given its id and broadcast in the same call, so every connection sees ids in
//! increasing order; its `ack` waits for the store's commit report.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::auth::{self, AuthJob, AuthPool, AuthResult};
use super::confusable::{skeleton_keys, SkeletonIndex};
use super::frame::text_frame;
use super::hashq::{FairQueue, Refused};
use super::protocol::{
    parse_client_frame, ChatMessage, Command, ErrorCode, MemberInfo, PresenceEvent, RoomInfo,
    ServerFrame, WhoMember,
};
use super::ratelimit::{FailureThrottle, TokenBucket};
use super::state::{Conn, DedupEntry, Ring, Room, Session, User};
use super::store::{self, Durability, Query, StoreEvent, StoreReq, Target, Write};
use super::validate;
use super::{ChatConfig, DurabilityArg, Wake};
use crate::service::{CloseCode, ConnId, Message, Outbox, Service};

/// Ids reserved ahead in the store. Refreshed at half use, so the loop never waits for it in
/// practice; if it ever ran out (store stalled for 500,000 messages) messages are refused.
const ID_RESERVE: i64 = 1_000_000;
/// The room every new account is a member of.
const GENERAL: &str = "general";
const DEFAULT_HISTORY_LIMIT: u32 = 50;
const MAX_HISTORY_LIMIT: u32 = 200;
/// Sessions (tokens) kept per user; a new login beyond this revokes the oldest. Without a
/// bound, repeated logins would grow memory and the store forever.
const MAX_SESSIONS: usize = 64;
/// How often expired sessions and dedup refs are swept from memory and the store.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Replaces `scratch` with the connections of the users `keys`, minus `skip_conn`. A free
/// function over the two fields so callers can iterate another part of the service (a room's
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

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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
    Reserved {
        upto: i64,
    },
}

enum QueryWaiter {
    Ring {
        room: String,
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
    },
}

/// A hashing job waiting in [`ChatService::hash_queue`] for a free worker.
struct QueuedHash {
    conn: ConnId,
    job: AuthJob,
}

impl AuthJob {
    fn id(&self) -> u64 {
        match self {
            AuthJob::Hash { job, .. } | AuthJob::Verify { job, .. } => *job,
        }
    }
}

/// count / sum / max of a duration or size, exported as a Prometheus summary without quantiles.
#[derive(Default, Clone, Copy)]
struct Stat {
    count: u64,
    sum: f64,
    max: f64,
}

impl Stat {
    fn add(&mut self, v: f64) {
        self.count += 1;
        self.sum += v;
        if v > self.max {
            self.max = v;
        }
    }

    fn write(&self, w: &mut crate::prom::Writer<'_>, name: &str, help: &str) {
        let s = crate::prom::Summary {
            count: self.count,
            sum: self.sum,
            max: self.max,
        };
        w.summary(name, help, &s);
    }
}

#[derive(Default)]
struct Metrics {
    messages_in: u64,
    deliveries: u64,
    frames_out: u64,
    store_batch_seconds: Stat,
    store_batch_writes: Stat,
    ack_seconds: Stat,
    store_failures: u64,
    errors: [u64; ErrorCode::ALL.len()],
    logins_ok: u64,
    logins_failed: u64,
}

/// The chat service. Construct with [`ChatService::open`]; register on `/ws`.
pub struct ChatService {
    cfg: ChatConfig,
    /// Bumped whenever any user's connections or any room's members or pending joins change;
    /// a room's cached fan-out list is valid only for the epoch it was built in.
    membership_epoch: u64,
    wake: Wake,
    store_tx: Sender<Vec<StoreReq>>,
    /// Store requests of the current loop turn, handed over together in `on_turn_end`.
    store_batch: Vec<StoreReq>,
    store_rx: Receiver<StoreEvent>,
    store_thread: Option<JoinHandle<()>>,
    auth: AuthPool,
    auth_rx: Receiver<AuthResult>,
    /// Sequence number of the last write sent to the store.
    write_seq: u64,
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
    m: Metrics,
    /// Reused recipient list, so a broadcast allocates nothing per recipient.
    scratch: Vec<ConnId>,
    stopped: bool,
}

impl ChatService {
    /// Opens (creating if needed) `config.data` and the SQLite database in it, loads accounts,
    /// sessions, rooms and memberships (not messages: those stay on disk and are loaded per
    /// room on first join), and starts the store and hashing threads.
    pub fn open(config: &crate::config::Config) -> Result<ChatService, String> {
        let cfg = config.chat.clone();
        if !(cfg.rate_limit.is_finite() && cfg.rate_limit >= 0.0) {
            return Err("--rate-limit must be >= 0".into());
        }
        if !(cfg.rate_burst.is_finite() && cfg.rate_burst >= 1.0) {
            return Err("--rate-burst must be >= 1".into());
        }
        let durability = match cfg.durability {
            DurabilityArg::Normal => Durability::Normal,
            DurabilityArg::Full => Durability::Full,
        };
        let conn = store::open_db(&config.data, durability)?;
        let dedup_since = now_ms() - cfg.dedup_window.as_millis() as i64;
        let (loaded, reserved) = store::load(&conn, ID_RESERVE, dedup_since)?;

        let mut users = HashMap::with_capacity(loaded.users.len());
        let mut name_skeletons = SkeletonIndex::default();
        let mut nick_skeletons = SkeletonIndex::default();
        for u in loaded.users {
            name_skeletons.insert(&skeleton_keys(&u.name), &u.key);
            nick_skeletons.insert(&skeleton_keys(&u.nick), &u.key);
            let mut user = User::new(u.key.clone(), u.name, u.nick, u.phc);
            user.last_seen = u.last_seen;
            users.insert(u.key, user);
        }
        // Refs of messages committed before the restart: a client retrying one of them gets
        // the original ack, not a second message.
        let (start, start_ms) = (Instant::now(), now_ms());
        let mut dedup_users = HashSet::new();
        for (key, reference, id, ts) in loaded.dedup {
            let Some(u) = users.get_mut(&key) else {
                continue;
            };
            let age = Duration::from_millis(start_ms.saturating_sub(ts).max(0) as u64);
            let at = start.checked_sub(age).unwrap_or(start);
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

        let wake = Wake::default();
        let (store_tx, store_req_rx) = channel();
        let (store_ev_tx, store_rx) = channel();
        let w = wake.clone();
        let store_thread = std::thread::Builder::new()
            .name("chat-store".into())
            .spawn(move || store::run(conn, store_req_rx, store_ev_tx, w))
            .map_err(|e| format!("spawn store thread: {e}"))?;
        let (auth_tx, auth_rx) = channel();
        let auth = AuthPool::start(
            cfg.hash_threads,
            cfg.argon2_memory,
            cfg.argon2_iterations,
            auth_tx,
            wake.clone(),
        )?;
        log::info!(
            "chat: {} users, {} rooms, {} sessions, next id {}",
            users.len(),
            rooms.len(),
            sessions.len(),
            loaded.next_id
        );
        Ok(ChatService {
            membership_epoch: 0,
            pair_throttle: FailureThrottle::new(cfg.login_throttle, cfg.login_window),
            ip_throttle: FailureThrottle::new(
                if cfg.login_throttle == 0 {
                    0
                } else {
                    cfg.login_throttle_ip
                },
                cfg.login_window,
            ),
            account_throttle: FailureThrottle::new(
                if cfg.login_throttle == 0 {
                    0
                } else {
                    cfg.login_throttle_account
                },
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
            wake,
            store_tx,
            store_batch: Vec::new(),
            store_rx,
            store_thread: Some(store_thread),
            auth,
            auth_rx,
            write_seq: 0,
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
            auth_deadlines: VecDeque::new(),
            last_sweep: None,
            rooms,
            conns: HashMap::new(),
            online: HashSet::new(),
            dedup_users,
            maybe_unwatched: HashSet::new(),
            next_id: loaded.next_id,
            id_durable: reserved,
            id_requested: reserved,
            typing: HashMap::new(),
            m: Metrics::default(),
            scratch: Vec::new(),
            stopped: false,
        })
    }

    // ----- plumbing -------------------------------------------------------------------------

    fn write(&mut self, w: Write) -> u64 {
        self.write_seq += 1;
        self.store_batch.push(StoreReq::Write(w));
        self.write_seq
    }

    /// Runs `p` once everything written so far has committed.
    fn after_commit(&mut self, p: Pending) {
        self.pending.push_back((self.write_seq, p));
    }

    fn query(&mut self, q: Query, waiter: QueryWaiter) {
        self.next_qid += 1;
        self.queries.insert(self.next_qid, waiter);
        self.store_batch.push(StoreReq::Query {
            qid: self.next_qid,
            query: q,
        });
    }

    /// Sends the turn's store requests to the store thread in one message.
    fn hand_to_store(&mut self) {
        if self.store_batch.is_empty() {
            return;
        }
        let reqs = std::mem::take(&mut self.store_batch);
        if self.store_tx.send(reqs).is_err() {
            log::error!("chat: store thread is gone; writes dropped");
        }
    }

    fn send(&mut self, out: &mut dyn Outbox, conn: ConnId, frame: &ServerFrame<'_>) {
        if out.send_text(conn, &frame.to_json()) {
            self.m.frames_out += 1;
        }
    }

    fn error(
        &mut self,
        out: &mut dyn Outbox,
        conn: ConnId,
        code: ErrorCode,
        message: &str,
        reference: Option<&str>,
    ) {
        self.m.errors[code.index()] += 1;
        self.send(
            out,
            conn,
            &ServerFrame::Error {
                code,
                message,
                reference,
            },
        );
    }

    /// Frames `json` once and queues the same bytes on every connection in `self.scratch`.
    fn fanout_scratch(&mut self, out: &mut dyn Outbox, json: &str, is_message: bool) {
        if self.scratch.is_empty() {
            return;
        }
        let frame = text_frame(json.as_bytes());
        let mut n = 0;
        for c in &self.scratch {
            if out.send_frame(*c, &frame) {
                n += 1;
            }
        }
        self.m.frames_out += n;
        if is_message {
            self.m.deliveries += n;
        }
    }

    /// Puts the connections of `keys` (minus `skip_conn`) into the scratch list.
    fn collect_conns<'a>(&mut self, keys: impl Iterator<Item = &'a String>, skip_conn: ConnId) {
        conns_of(&mut self.scratch, &self.users, keys, skip_conn);
    }

    /// Puts the connections of users sharing a room with `key` (not `key`'s own, nor
    /// `skip_conn`) into the scratch list, each once. Presence goes to this list on every
    /// first connect and last disconnect, so when everyone reconnects at once it runs once per
    /// user over a room of everyone: no per-member String clone or set insert here, only the
    /// member's connection lookup.
    fn collect_sharer_conns(&mut self, key: &str, skip_conn: ConnId) {
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
    fn take_token(&mut self, key: &str, now: Instant) -> bool {
        let (rate, burst) = (self.cfg.rate_limit, self.cfg.rate_burst);
        match self.users.get_mut(key) {
            Some(u) => u
                .bucket
                .get_or_insert_with(|| TokenBucket::new(burst, now))
                .try_take(rate, burst, now),
            None => false,
        }
    }

    fn conn_user(&self, conn: ConnId) -> Option<String> {
        self.conns.get(&conn).and_then(|c| c.user.clone())
    }

    // ----- authentication -------------------------------------------------------------------

    fn handle_auth(
        &mut self,
        out: &mut dyn Outbox,
        conn: ConnId,
        cmd: Command,
        reference: Option<String>,
    ) {
        let r = reference.as_deref();
        let (authed, pending, ip) = match self.conns.get(&conn) {
            Some(c) => (c.user.is_some(), c.auth_pending, c.peer.map(|p| p.ip())),
            None => return,
        };
        if authed {
            return self.error(out, conn, ErrorCode::BadRequest, "already authenticated", r);
        }
        if pending {
            return self.error(
                out,
                conn,
                ErrorCode::BadRequest,
                "authentication already in progress",
                r,
            );
        }
        let now = out.now();
        match cmd {
            Command::Register { user, password } => {
                if let Err((code, msg)) =
                    validate::user_name(&user).and_then(|_| validate::password(&password))
                {
                    return self.error(out, conn, code, &msg, r);
                }
                let key = validate::user_key(&user);
                let skeleton = skeleton_keys(&user);
                // Nobody may register a name that looks like another account's name or
                // another user's nick (`aIice` beside `alice`).
                if self.users.contains_key(&key)
                    || self.registering.held_by_other(&skeleton, "")
                    || self.name_skeletons.held_by_other(&skeleton, &key)
                    || self.nick_skeletons.held_by_other(&skeleton, &key)
                {
                    return self.error(out, conn, ErrorCode::UserTaken, "user name is taken", r);
                }
                if ip.is_some_and(|ip| self.register_throttle.is_blocked(&ip, now)) {
                    return self.error(
                        out,
                        conn,
                        ErrorCode::RateLimited,
                        "too many registrations from this address; try again later",
                        r,
                    );
                }
                self.next_job += 1;
                let job = AuthJob::Hash {
                    job: self.next_job,
                    password,
                };
                if let Err(why) = self.hash_queue.push(ip, QueuedHash { conn, job }) {
                    return self.hash_queue_full(out, conn, why, r);
                }
                if let Some(ip) = ip {
                    self.register_throttle.record_failure(ip, now);
                }
                self.registering.insert(&skeleton, &key);
                self.jobs.insert(
                    self.next_job,
                    AuthWaiter::Register {
                        conn,
                        key,
                        skeleton,
                        name: user,
                        reference,
                    },
                );
                self.set_auth_pending(conn, true);
                self.pump_hashes();
            }
            Command::Login { user, password } => {
                if let Err((code, msg)) = validate::user_name(&user) {
                    return self.error(out, conn, code, &msg, r);
                }
                if password.len() > 1024 {
                    return self.error(out, conn, ErrorCode::BadRequest, "password too long", r);
                }
                let key = validate::user_key(&user);
                // Attempts still being hashed count as failures until they are known not to
                // be, so parallel guesses cannot all slip past the limit.
                let pair = (key.clone(), ip);
                if self.pair_throttle.is_blocked(&pair, now)
                    || ip.is_some_and(|ip| self.ip_throttle.is_blocked(&ip, now))
                    || self.account_throttle.is_blocked(&key, now)
                {
                    return self.error(
                        out,
                        conn,
                        ErrorCode::RateLimited,
                        "too many failed logins; try again later",
                        r,
                    );
                }
                // Unknown users are verified against a dummy hash (phc None) so that the
                // answer takes as long as for a wrong password.
                let phc = self.users.get(&key).map(|u| u.phc.clone());
                self.next_job += 1;
                let job = AuthJob::Verify {
                    job: self.next_job,
                    phc,
                    password,
                };
                if let Err(why) = self.hash_queue.push(ip, QueuedHash { conn, job }) {
                    return self.hash_queue_full(out, conn, why, r);
                }
                self.pair_throttle.begin(pair);
                if let Some(ip) = ip {
                    self.ip_throttle.begin(ip);
                }
                self.account_throttle.begin(key.clone());
                self.jobs.insert(
                    self.next_job,
                    AuthWaiter::Login {
                        conn,
                        key,
                        ip,
                        reference,
                    },
                );
                self.set_auth_pending(conn, true);
                self.pump_hashes();
            }
            Command::Resume { token } => {
                // A valid token is never refused because of anyone's failed logins: it is
                // 128 random bits, so there is nothing to guess, and refusing it would let a
                // stranger's typos log people out. Hence no throttle on this path at all.
                let hash = auth::token_hash(&token);
                let ttl = self.cfg.session_ttl.as_millis() as i64;
                let now_ms = now_ms();
                let (key, expired) = match self.sessions.get(&hash) {
                    Some(s) if self.users.contains_key(&s.user) => {
                        (Some(s.user.clone()), now_ms - s.last_used > ttl)
                    }
                    _ => (None, false),
                };
                match key {
                    Some(key) if !expired => {
                        self.touch_session(hash, now_ms);
                        self.authenticate(out, conn, &key, &token, reference.as_deref());
                    }
                    Some(key) => {
                        self.revoke_session(&key, hash);
                        self.m.logins_failed += 1;
                        self.error(out, conn, ErrorCode::AuthFailed, "session expired", r);
                    }
                    None => {
                        self.m.logins_failed += 1;
                        self.error(out, conn, ErrorCode::AuthFailed, "invalid token", r);
                    }
                }
            }
            _ => {}
        }
    }

    fn hash_queue_full(
        &mut self,
        out: &mut dyn Outbox,
        conn: ConnId,
        why: Refused,
        r: Option<&str>,
    ) {
        let msg = match why {
            Refused::AddressFull => "too many sign-ins waiting from this address; try again later",
            Refused::QueueFull => "server busy with sign-ins; try again later",
        };
        self.error(out, conn, ErrorCode::RateLimited, msg, r);
    }

    /// Hands queued hashing jobs to free workers, fairly across addresses.
    fn pump_hashes(&mut self) {
        while let Some(q) = self.hash_queue.next_job() {
            self.auth.submit(q.job);
        }
    }

    /// Undoes the bookkeeping of a hashing job whose result will never be used.
    fn abandon_job(&mut self, job: u64) {
        match self.jobs.remove(&job) {
            Some(AuthWaiter::Register { skeleton, key, .. }) => {
                self.registering.remove(&skeleton, &key);
            }
            Some(AuthWaiter::Login { key, ip, .. }) => self.finish_login_attempt(key, ip),
            None => {}
        }
    }

    fn finish_login_attempt(&mut self, key: String, ip: Option<IpAddr>) {
        if let Some(ip) = ip {
            self.ip_throttle.finish(&ip);
        }
        self.account_throttle.finish(&key);
        self.pair_throttle.finish(&(key, ip));
    }

    /// Marks a session used now (resume, or a connection using it closing).
    fn touch_session(&mut self, hash: [u8; 32], ts: i64) {
        if let Some(s) = self.sessions.get_mut(&hash) {
            s.last_used = ts;
            self.write(Write::TouchSession { hash, ts });
        }
    }

    /// Forgets a session token (memory and store).
    fn revoke_session(&mut self, key: &str, hash: [u8; 32]) {
        self.sessions.remove(&hash);
        if let Some(u) = self.users.get_mut(key) {
            u.sessions.retain(|h| *h != hash);
        }
        self.write(Write::DeleteSession { hash });
    }

    /// Marks an authentication in progress; the connection's later messages wait for it
    /// (a client may pipeline `login` and `join` without waiting for `welcome`).
    fn set_auth_pending(&mut self, conn: ConnId, v: bool) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.auth_pending = v;
        }
        if v {
            self.block(conn);
        }
    }

    /// Ends a failed authentication: the error, then whatever the client sent meanwhile.
    fn auth_failed(
        &mut self,
        out: &mut dyn Outbox,
        conn: ConnId,
        code: ErrorCode,
        message: &str,
        reference: Option<&str>,
    ) {
        self.set_auth_pending(conn, false);
        self.error(out, conn, code, message, reference);
        self.unblock(out, conn);
    }

    fn on_auth_result(&mut self, out: &mut dyn Outbox, res: AuthResult) {
        let now = out.now();
        // A worker is free: the next address in turn gets it.
        self.hash_queue.done();
        self.pump_hashes();
        match res {
            AuthResult::Hashed { job, phc } => {
                let Some(AuthWaiter::Register {
                    conn,
                    key,
                    skeleton,
                    name,
                    reference,
                }) = self.jobs.remove(&job)
                else {
                    return;
                };
                self.registering.remove(&skeleton, &key);
                if !self.conns.contains_key(&conn) {
                    // The client is gone before getting a token: creating the account anyway
                    // would leave a name it cannot use until it remembers the password.
                    return;
                }
                let phc = match phc {
                    Ok(p) => p,
                    Err(e) => {
                        log::error!("chat: hashing failed: {e}");
                        return self.auth_failed(
                            out,
                            conn,
                            ErrorCode::Internal,
                            "could not hash password",
                            reference.as_deref(),
                        );
                    }
                };
                let created = now_ms();
                self.write(Write::InsertUser {
                    key: key.clone(),
                    name: name.clone(),
                    nick: name.clone(),
                    phc: phc.clone(),
                    created,
                });
                self.name_skeletons.insert(&skeleton, &key);
                self.nick_skeletons.insert(&skeleton, &key);
                self.users
                    .insert(key.clone(), User::new(key.clone(), name.clone(), name, phc));
                if !self.rooms.contains_key(GENERAL) {
                    self.rooms
                        .insert(GENERAL.to_string(), Room::new(Ring::Warm(VecDeque::new())));
                    self.write(Write::InsertRoom {
                        name: GENERAL.into(),
                        created,
                    });
                }
                // Members of general see the newcomer arrive like any other join.
                self.add_member(out, conn, &key, GENERAL);
                self.issue_token(out, conn, key, reference);
            }
            AuthResult::Verified { job, ok } => {
                let Some(AuthWaiter::Login {
                    conn,
                    key,
                    ip,
                    reference,
                }) = self.jobs.remove(&job)
                else {
                    return;
                };
                self.finish_login_attempt(key.clone(), ip);
                if ok && self.users.contains_key(&key) {
                    if self.conns.contains_key(&conn) {
                        self.m.logins_ok += 1;
                        self.issue_token(out, conn, key, reference);
                    }
                } else {
                    self.m.logins_failed += 1;
                    self.account_throttle.record_failure(key.clone(), now);
                    self.pair_throttle.record_failure((key, ip), now);
                    if let Some(ip) = ip {
                        self.ip_throttle.record_failure(ip, now);
                    }
                    if self.conns.contains_key(&conn) {
                        self.auth_failed(
                            out,
                            conn,
                            ErrorCode::AuthFailed,
                            "wrong user or password",
                            reference.as_deref(),
                        );
                    }
                }
            }
        }
    }

    /// Creates a session and sends `welcome` once it (and the account, for register) commits:
    /// a token the client holds must survive a crash.
    fn issue_token(
        &mut self,
        out: &mut dyn Outbox,
        conn: ConnId,
        key: String,
        reference: Option<String>,
    ) {
        let token = match auth::new_token() {
            Ok(t) => t,
            Err(e) => {
                log::error!("chat: no randomness for a token: {e}");
                return self.auth_failed(
                    out,
                    conn,
                    ErrorCode::Internal,
                    "could not create a session",
                    reference.as_deref(),
                );
            }
        };
        let hash = auth::token_hash(&token);
        let created = now_ms();
        self.sessions.insert(
            hash,
            Session {
                user: key.clone(),
                last_used: created,
            },
        );
        let mut evicted = Vec::new();
        if let Some(u) = self.users.get_mut(&key) {
            u.sessions.push_back(hash);
            while u.sessions.len() > MAX_SESSIONS {
                evicted.extend(u.sessions.pop_front());
            }
        }
        for old in evicted {
            self.sessions.remove(&old);
            self.write(Write::DeleteSession { hash: old });
        }
        self.write(Write::InsertSession {
            hash,
            user_key: key.clone(),
            created,
        });
        self.after_commit(Pending::Welcome {
            conn,
            user: key,
            token,
            reference,
        });
    }

    /// Marks `conn` as `key`'s, announces the user online if this is its first connection,
    /// and sends `welcome`.
    fn authenticate(
        &mut self,
        out: &mut dyn Outbox,
        conn: ConnId,
        key: &str,
        token: &str,
        reference: Option<&str>,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.user = Some(key.to_string());
        c.auth_pending = false;
        c.token_hash = Some(auth::token_hash(token));
        let Some(u) = self.users.get_mut(key) else {
            return;
        };
        let first = u.conns.is_empty();
        u.conns.push(conn);
        self.membership_epoch += 1;
        if first {
            self.online.insert(key.to_string());
            self.collect_sharer_conns(key, conn);
            let u = &self.users[key];
            let json = ServerFrame::Presence {
                room: None,
                user: &u.name,
                nick: &u.nick,
                event: PresenceEvent::Online,
                last_seen: None,
            }
            .to_json();
            self.fanout_scratch(out, &json, false);
        }
        let u = &self.users[key];
        let json = ServerFrame::Welcome {
            user: &u.name,
            nick: &u.nick,
            token,
            rooms: u.rooms.iter().map(|s| s.as_str()).collect(),
            reference,
        }
        .to_json();
        if out.send_text(conn, &json) {
            self.m.frames_out += 1;
        }
        self.unblock(out, conn);
    }

    // ----- commands -------------------------------------------------------------------------

    fn handle(
        &mut self,
        out: &mut dyn Outbox,
        conn: ConnId,
        key: String,
        cmd: Command,
        reference: Option<String>,
    ) {
        let r = reference.as_deref();
        match cmd {
            Command::Register { .. } | Command::Login { .. } | Command::Resume { .. } => {
                self.error(out, conn, ErrorCode::BadRequest, "already authenticated", r)
            }
            Command::Logout { all } => self.logout(conn, &key, all),
            Command::Join { room } => self.join(out, conn, &key, room, reference),
            Command::Leave { room } => self.leave(out, conn, &key, &room, r),
            Command::Rooms {} => {
                let rooms: Vec<RoomInfo<'_>> = self
                    .rooms
                    .iter()
                    .map(|(name, room)| RoomInfo {
                        name,
                        members: room.members.len(),
                        online: room
                            .members
                            .iter()
                            .filter(|m| self.online.contains(*m))
                            .count(),
                    })
                    .collect();
                let json = ServerFrame::Rooms {
                    rooms,
                    reference: r,
                }
                .to_json();
                if out.send_text(conn, &json) {
                    self.m.frames_out += 1;
                }
            }
            Command::Who { room } => {
                if let Err((c, m)) = validate::room_name(&room) {
                    return self.error(out, conn, c, &m, r);
                }
                let Some(rm) = self.rooms.get(&room) else {
                    return self.error(out, conn, ErrorCode::NoSuchRoom, "no such room", r);
                };
                let members: Vec<WhoMember<'_>> = rm
                    .members
                    .iter()
                    .filter_map(|k| self.users.get(k))
                    .map(|u| WhoMember {
                        user: &u.name,
                        nick: &u.nick,
                        online: u.online(),
                        last_seen: u.last_seen,
                    })
                    .collect();
                let json = ServerFrame::Who {
                    room: &room,
                    members,
                    reference: r,
                }
                .to_json();
                if out.send_text(conn, &json) {
                    self.m.frames_out += 1;
                }
            }
            Command::Say { room, text } => self.say(out, conn, &key, Some(room), None, text, r),
            Command::Dm { to, text } => self.say(out, conn, &key, None, Some(to), text, r),
            Command::History {
                room,
                with,
                before,
                after,
                limit,
            } => self.history(out, conn, &key, room, with, before, after, limit, r),
            Command::Nick { nick } => self.nick(out, conn, &key, nick, r),
            Command::Typing { room, to } => self.typing(out, conn, &key, room, to, r),
        }
    }

    /// Revokes the connection's token (or, with `all`, every token of the user) and closes
    /// every connection that used a revoked token. They stop being served at once; the close
    /// (1000) goes out once the revocation is durable, so a client may forget the token knowing
    /// it is dead even if we crash right after.
    fn logout(&mut self, conn: ConnId, key: &str, all: bool) {
        let hash = self.conns.get(&conn).and_then(|c| c.token_hash);
        let revoked: Vec<[u8; 32]> = if all {
            self.users
                .get(key)
                .map(|u| u.sessions.iter().copied().collect())
                .unwrap_or_default()
        } else {
            hash.into_iter().collect()
        };
        for h in &revoked {
            self.sessions.remove(h);
        }
        if let Some(u) = self.users.get_mut(key) {
            u.sessions.retain(|h| !revoked.contains(h));
        }
        if all {
            self.write(Write::DeleteUserSessions {
                user_key: key.to_string(),
            });
        } else if let Some(h) = hash {
            self.write(Write::DeleteSession { hash: h });
        }
        let user_conns = self
            .users
            .get(key)
            .map(|u| u.conns.clone())
            .unwrap_or_default();
        let mut closing = vec![conn];
        for c in user_conns {
            if c == conn {
                continue;
            }
            let uses_revoked = self
                .conns
                .get(&c)
                .and_then(|x| x.token_hash)
                .is_some_and(|h| revoked.contains(&h));
            if all || uses_revoked {
                closing.push(c);
            }
        }
        for c in &closing {
            if let Some(x) = self.conns.get_mut(c) {
                x.closing = true;
            }
        }
        self.after_commit(Pending::Close { conns: closing });
    }

    fn join(
        &mut self,
        out: &mut dyn Outbox,
        conn: ConnId,
        key: &str,
        room: String,
        reference: Option<String>,
    ) {
        let r = reference.as_deref();
        if let Err((c, m)) = validate::room_name(&room) {
            return self.error(out, conn, c, &m, r);
        }
        let is_member = self.users.get(key).is_some_and(|u| u.rooms.contains(&room));
        if !is_member
            && self
                .users
                .get(key)
                .is_some_and(|u| u.rooms.len() >= self.cfg.max_rooms_per_user)
        {
            let msg = format!("at most {} rooms per user", self.cfg.max_rooms_per_user);
            return self.error(out, conn, ErrorCode::BadRequest, &msg, r);
        }
        if !self.rooms.contains_key(&room) {
            // Rooms are never deleted, so creating one costs a token like a message does.
            if !self.take_token(key, out.now()) {
                return self.error(
                    out,
                    conn,
                    ErrorCode::RateLimited,
                    "creating rooms too fast",
                    r,
                );
            }
            // A new room has no history: its ring is warm (and empty) from the start.
            self.rooms
                .insert(room.clone(), Room::new(Ring::Warm(VecDeque::new())));
            self.write(Write::InsertRoom {
                name: room.clone(),
                created: now_ms(),
            });
        }
        // Membership changes now, in request order with everything else; only the `joined`
        // reply may have to wait for the ring.
        self.add_member(out, conn, key, &room);
        let cap = self.cfg.history_on_join;
        let Some(rm) = self.rooms.get_mut(&room) else {
            return;
        };
        match rm.ring {
            Ring::Warm(_) => self.send_joined(out, conn, &room, r),
            Ring::Cold if cap == 0 => {
                rm.ring = Ring::Warm(VecDeque::new());
                self.send_joined(out, conn, &room, r)
            }
            Ring::Loading(_) => {
                rm.pending_joins.push((conn, reference));
                self.membership_epoch += 1;
                self.block(conn);
            }
            Ring::Cold => {
                rm.ring = Ring::Loading(Vec::new());
                rm.pending_joins.push((conn, reference));
                self.membership_epoch += 1;
                self.block(conn);
                self.query(
                    Query::LoadRing {
                        room: room.clone(),
                        limit: cap,
                    },
                    QueryWaiter::Ring { room },
                );
            }
        }
    }

    /// Makes `key` a member of `room` (if it is not already) and tells the room.
    fn add_member(&mut self, out: &mut dyn Outbox, conn: ConnId, key: &str, room: &str) {
        let Some(rm) = self.rooms.get_mut(room) else {
            return;
        };
        if !rm.members.insert(key.to_string()) {
            return;
        }
        self.membership_epoch += 1;
        if let Some(u) = self.users.get_mut(key) {
            u.rooms.insert(room.to_string());
        }
        self.write(Write::AddMember {
            room: room.to_string(),
            user_key: key.to_string(),
        });
        let members: Vec<String> = self.rooms[room].members.iter().cloned().collect();
        self.collect_conns(members.iter(), conn);
        let u = &self.users[key];
        let json = ServerFrame::Presence {
            room: Some(room),
            user: &u.name,
            nick: &u.nick,
            event: PresenceEvent::Join,
            last_seen: None,
        }
        .to_json();
        self.fanout_scratch(out, &json, false);
    }

    /// Sends `joined` with the ring as snapshot. Runs in one step of the single-threaded loop
    /// with the connection becoming a live recipient, so the next message broadcast to the room
    /// is exactly the one after the snapshot's last.
    fn send_joined(
        &mut self,
        out: &mut dyn Outbox,
        conn: ConnId,
        room: &str,
        reference: Option<&str>,
    ) {
        if self.conn_user(conn).is_none() {
            return; // closed while the ring loaded
        }
        let rm = &self.rooms[room];
        let members: Vec<MemberInfo<'_>> = rm
            .members
            .iter()
            .filter_map(|k| self.users.get(k))
            .map(|u| MemberInfo {
                user: &u.name,
                nick: &u.nick,
                online: u.online(),
            })
            .collect();
        let history: Vec<&ChatMessage> = match &rm.ring {
            Ring::Warm(ring) => ring.iter().map(|m| &**m).collect(),
            _ => Vec::new(),
        };
        let json = ServerFrame::Joined {
            room,
            members,
            history,
            reference,
        }
        .to_json();
        if out.send_text(conn, &json) {
            self.m.frames_out += 1;
        }
    }

    fn leave(
        &mut self,
        out: &mut dyn Outbox,
        conn: ConnId,
        key: &str,
        room: &str,
        r: Option<&str>,
    ) {
        if let Err((c, m)) = validate::room_name(room) {
            return self.error(out, conn, c, &m, r);
        }
        let removed = self
            .rooms
            .get_mut(room)
            .is_some_and(|rm| rm.members.remove(key));
        self.membership_epoch += 1;
        if !removed {
            return self.error(out, conn, ErrorCode::NotMember, "not a member", r);
        }
        if let Some(u) = self.users.get_mut(key) {
            u.rooms.remove(room);
        }
        self.write(Write::RemoveMember {
            room: room.to_string(),
            user_key: key.to_string(),
        });
        // Remaining members and the leaver's other connections learn of it.
        let mut keys: Vec<String> = self.rooms[room].members.iter().cloned().collect();
        keys.push(key.to_string());
        self.collect_conns(keys.iter(), conn);
        let u = &self.users[key];
        let json = ServerFrame::Presence {
            room: Some(room),
            user: &u.name,
            nick: &u.nick,
            event: PresenceEvent::Leave,
            last_seen: None,
        }
        .to_json();
        self.fanout_scratch(out, &json, false);
        self.send(out, conn, &ServerFrame::Left { room, reference: r });
        self.maybe_unwatched.insert(room.to_string());
    }

    /// Drops a room's join snapshot from memory once no member is online: the store has the
    /// same messages and the next join loads them (off the loop), so memory follows the rooms
    /// of online users rather than every room touched since start.
    fn cool_if_unwatched(&mut self, room: &str) {
        let Some(rm) = self.rooms.get_mut(room) else {
            return;
        };
        // A loading ring has joins waiting on it; only a warm one can go.
        if rm.is_warm() && !rm.members.iter().any(|m| self.online.contains(m)) {
            rm.ring = Ring::Cold;
        }
    }

    /// Whether `room`'s join snapshot is in memory (for tests).
    #[cfg(test)]
    pub(super) fn ring_is_warm(&self, room: &str) -> bool {
        self.rooms.get(room).is_some_and(Room::is_warm)
    }

    /// `say` (room set) and `dm` (to set).
    #[allow(clippy::too_many_arguments)]
    fn say(
        &mut self,
        out: &mut dyn Outbox,
        conn: ConnId,
        key: &str,
        room: Option<String>,
        to: Option<String>,
        text: String,
        r: Option<&str>,
    ) {
        let now = out.now();
        let check = match (&room, &to) {
            (Some(room), _) => validate::room_name(room),
            (_, Some(to)) => validate::user_name(to),
            _ => Ok(()),
        }
        .and_then(|_| validate::text(&text, self.cfg.max_text));
        if let Err((c, m)) = check {
            return self.error(out, conn, c, &m, r);
        }
        // A retry of a ref seen in the window gets the original ack and nothing else.
        if let Some(reference) = r {
            let window = self.cfg.dedup_window;
            if let Some(u) = self.users.get_mut(key) {
                if let Some(e) = u.dedup.entries.get_mut(reference) {
                    if now.saturating_duration_since(e.at) < window {
                        if e.committed {
                            let (id, ts) = (e.id, e.ts);
                            return self.send(
                                out,
                                conn,
                                &ServerFrame::Ack {
                                    reference: r,
                                    id,
                                    ts,
                                },
                            );
                        }
                        if !e.waiters.contains(&conn) {
                            e.waiters.push(conn);
                        }
                        return;
                    }
                }
            }
        }
        let to_key = match &to {
            Some(to) => {
                let k = validate::user_key(to);
                if !self.users.contains_key(&k) {
                    return self.error(out, conn, ErrorCode::NoSuchUser, "no such user", r);
                }
                Some(k)
            }
            None => None,
        };
        if let Some(room) = &room {
            if !self
                .rooms
                .get(room)
                .is_some_and(|rm| rm.members.contains(key))
            {
                return self.error(out, conn, ErrorCode::NotMember, "not a member", r);
            }
        }
        if !self.take_token(key, now) {
            return self.error(
                out,
                conn,
                ErrorCode::RateLimited,
                "sending too fast; message not stored",
                r,
            );
        }
        if self.next_id >= self.id_durable {
            return self.error(
                out,
                conn,
                ErrorCode::RateLimited,
                "server busy; message not stored",
                r,
            );
        }
        let id = self.next_id;
        self.next_id += 1;
        let ts = now_ms();
        let u = &self.users[key];
        let msg = Rc::new(ChatMessage {
            id,
            room: room.clone(),
            from: u.name.clone(),
            to: to_key.as_ref().map(|k| self.users[k].name.clone()),
            nick: u.nick.clone(),
            text,
            ts,
        });
        self.m.messages_in += 1;
        let json = ServerFrame::Message(&msg).to_json();
        let dm = match (&room, &to_key) {
            (Some(room), _) => {
                let cap = self.cfg.history_on_join;
                let Some(rm) = self.rooms.get_mut(room) else {
                    return;
                };
                rm.remember(&msg, cap);
                // The recipients of a room change rarely and its messages often: rebuild the
                // list (a hash lookup per member) only when membership changed since.
                if rm.fanout_epoch != Some(self.membership_epoch) {
                    rm.fanout.clear();
                    for m in &rm.members {
                        if let Some(u) = self.users.get(m) {
                            rm.fanout.extend(
                                u.conns
                                    .iter()
                                    .copied()
                                    .filter(|c| !rm.pending_joins.iter().any(|(p, _)| p == c)),
                            );
                        }
                    }
                    rm.fanout_epoch = Some(self.membership_epoch);
                }
                self.scratch.clear();
                self.scratch.extend_from_slice(&rm.fanout);
                None
            }
            (None, Some(tk)) => {
                let pair = [key.to_string(), tk.clone()];
                self.collect_conns(
                    pair.iter().take(if tk == key { 1 } else { 2 }),
                    ConnId(u64::MAX),
                );
                let is_new = self
                    .users
                    .get(key)
                    .is_some_and(|u| !u.dm_partners.contains(tk));
                if is_new {
                    if let Some(u) = self.users.get_mut(key) {
                        u.dm_partners.insert(tk.clone());
                    }
                    if let Some(u) = self.users.get_mut(tk) {
                        u.dm_partners.insert(key.to_string());
                    }
                    let (a, b) = if key <= tk.as_str() {
                        (key.to_string(), tk.clone())
                    } else {
                        (tk.clone(), key.to_string())
                    };
                    self.write(Write::AddDmPair { a, b });
                }
                Some(store::dm_key(key, tk))
            }
            _ => return,
        };
        self.fanout_scratch(out, &json, true);
        let msg = Rc::try_unwrap(msg).unwrap_or_else(|rc| (*rc).clone());
        let dedup = r.map(|reference| (key.to_string(), reference.to_string()));
        self.write(Write::InsertMessage { msg, dm, dedup });
        self.after_commit(Pending::Ack {
            conn,
            user: key.to_string(),
            reference: r.map(str::to_string),
            id,
            ts,
            accepted: now,
        });
        if let Some(reference) = r {
            let max = self.cfg.dedup_max_refs;
            if let Some(u) = self.users.get_mut(key) {
                u.dedup.insert(
                    reference.to_string(),
                    DedupEntry {
                        at: now,
                        id,
                        ts,
                        committed: false,
                        waiters: Vec::new(),
                    },
                    max,
                );
                self.dedup_users.insert(key.to_string());
            }
        }
        if self.next_id + ID_RESERVE / 2 > self.id_requested {
            self.id_requested = self.next_id + ID_RESERVE;
            let upto = self.id_requested;
            self.write(Write::ReserveIds { upto });
            self.after_commit(Pending::Reserved { upto });
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn history(
        &mut self,
        out: &mut dyn Outbox,
        conn: ConnId,
        key: &str,
        room: Option<String>,
        with: Option<String>,
        before: Option<i64>,
        after: Option<i64>,
        limit: Option<u32>,
        r: Option<&str>,
    ) {
        let limit = limit.unwrap_or(DEFAULT_HISTORY_LIMIT);
        if limit == 0 || limit > MAX_HISTORY_LIMIT {
            return self.error(out, conn, ErrorCode::BadRequest, "limit must be 1-200", r);
        }
        // Queries cost the store real work: a few in flight per connection, and a rate per
        // user, so one client pipelining thousands cannot queue seconds of work ahead of
        // everyone's messages.
        let in_flight = self.conns.get(&conn).map_or(0, |c| c.queries);
        if in_flight >= self.cfg.queries_in_flight {
            return self.error(
                out,
                conn,
                ErrorCode::RateLimited,
                "too many history requests in flight; wait for the replies",
                r,
            );
        }
        let (rate, burst) = (self.cfg.query_rate, self.cfg.query_burst);
        let now = out.now();
        let allowed = self.users.get_mut(key).is_some_and(|u| {
            u.query_bucket
                .get_or_insert_with(|| TokenBucket::new(burst, now))
                .try_take(rate, burst, now)
        });
        if !allowed {
            return self.error(
                out,
                conn,
                ErrorCode::RateLimited,
                "history requests too fast",
                r,
            );
        }
        let (target, room, with) = match (room, with) {
            (Some(room), None) => {
                if let Err((c, m)) = validate::room_name(&room) {
                    return self.error(out, conn, c, &m, r);
                }
                if !self
                    .rooms
                    .get(&room)
                    .is_some_and(|rm| rm.members.contains(key))
                {
                    return self.error(out, conn, ErrorCode::NotMember, "not a member", r);
                }
                (Target::Room(room.clone()), Some(room), None)
            }
            (None, Some(with)) => {
                if let Err((c, m)) = validate::user_name(&with) {
                    return self.error(out, conn, c, &m, r);
                }
                let wk = validate::user_key(&with);
                let Some(w) = self.users.get(&wk) else {
                    return self.error(out, conn, ErrorCode::NoSuchUser, "no such user", r);
                };
                (
                    Target::Dm(store::dm_key(key, &wk)),
                    None,
                    Some(w.name.clone()),
                )
            }
            _ => {
                return self.error(
                    out,
                    conn,
                    ErrorCode::BadRequest,
                    "exactly one of room and with is required",
                    r,
                )
            }
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.queries += 1;
        let cancelled = c.gone.get_or_insert_with(Default::default).clone();
        self.query(
            Query::History {
                target,
                before,
                after,
                limit: limit as usize,
                cancelled: Some(cancelled),
            },
            QueryWaiter::History {
                conn,
                reference: r.map(str::to_string),
                room,
                with,
            },
        );
    }

    fn nick(
        &mut self,
        out: &mut dyn Outbox,
        conn: ConnId,
        key: &str,
        nick: String,
        r: Option<&str>,
    ) {
        if let Err((c, m)) = validate::nick(&nick) {
            return self.error(out, conn, c, &m, r);
        }
        // Another account's name, or another user's nick (online or not), or anything that
        // looks like one of them: nobody may pass as someone else.
        let skeleton = skeleton_keys(&nick);
        let taken = self.name_skeletons.held_by_other(&skeleton, key)
            || self.nick_skeletons.held_by_other(&skeleton, key);
        if taken {
            return self.error(out, conn, ErrorCode::NickTaken, "nick is taken", r);
        }
        // A nick change is broadcast widely: it costs a token like a message.
        if !self.take_token(key, out.now()) {
            return self.error(
                out,
                conn,
                ErrorCode::RateLimited,
                "changing nick too fast",
                r,
            );
        }
        let Some(u) = self.users.get_mut(key) else {
            return;
        };
        self.nick_skeletons.remove(&skeleton_keys(&u.nick), key);
        self.nick_skeletons.insert(&skeleton, key);
        u.nick = nick.clone();
        let mut hearers: Vec<String> = u.dm_partners.iter().cloned().collect();
        hearers.push(key.to_string());
        self.write(Write::SetNick {
            key: key.to_string(),
            nick: nick.clone(),
        });
        // Room sharers, DM partners and the user's other connections: each connection once.
        self.collect_sharer_conns(key, conn);
        extend_conns_of(&mut self.scratch, &self.users, hearers.iter(), conn);
        self.scratch.sort_unstable();
        self.scratch.dedup();
        let name = self.users[key].name.clone();
        let json = ServerFrame::Nick {
            user: &name,
            nick: &nick,
            reference: None,
        }
        .to_json();
        self.fanout_scratch(out, &json, false);
        self.send(
            out,
            conn,
            &ServerFrame::Nick {
                user: &name,
                nick: &nick,
                reference: r,
            },
        );
    }

    fn typing(
        &mut self,
        out: &mut dyn Outbox,
        conn: ConnId,
        key: &str,
        room: Option<String>,
        to: Option<String>,
        r: Option<&str>,
    ) {
        let now = out.now();
        // The throttle key; recipients are only gathered for events that pass the throttle.
        let target = match (&room, &to) {
            (Some(room), None) => {
                if let Err((c, m)) = validate::room_name(room) {
                    return self.error(out, conn, c, &m, r);
                }
                match self.rooms.get(room) {
                    Some(rm) if rm.members.contains(key) => format!("#{room}"),
                    _ => return self.error(out, conn, ErrorCode::NotMember, "not a member", r),
                }
            }
            (None, Some(to)) => {
                if let Err((c, m)) = validate::user_name(to) {
                    return self.error(out, conn, c, &m, r);
                }
                let tk = validate::user_key(to);
                if !self.users.contains_key(&tk) {
                    return self.error(out, conn, ErrorCode::NoSuchUser, "no such user", r);
                }
                format!("@{tk}")
            }
            _ => {
                return self.error(
                    out,
                    conn,
                    ErrorCode::BadRequest,
                    "exactly one of room and to is required",
                    r,
                )
            }
        };
        let tkey = (key.to_string(), target);
        if let Some(last) = self.typing.get(&tkey) {
            if now.saturating_duration_since(*last) < self.cfg.typing_interval {
                return; // throttled silently: typing is best effort
            }
        }
        self.typing.insert(tkey, now);
        // Everyone else in the room, or the other side of the DM; never the typist's own
        // connections. Gathered only now, for an event that passed the throttle.
        match (&room, &to) {
            (Some(room), _) => {
                let others = self.rooms[room].members.iter().filter(|m| *m != key);
                conns_of(&mut self.scratch, &self.users, others, conn);
            }
            (_, to) => {
                let other = to.as_ref().map(|t| validate::user_key(t));
                let other = other.iter().filter(|tk| *tk != key);
                conns_of(&mut self.scratch, &self.users, other, conn);
            }
        }
        let u = &self.users[key];
        let to_name = to
            .as_ref()
            .and_then(|t| self.users.get(&validate::user_key(t)))
            .map(|u| u.name.as_str());
        let json = ServerFrame::Typing {
            room: room.as_deref(),
            to: to_name,
            user: &u.name,
            nick: &u.nick,
        }
        .to_json();
        self.fanout_scratch(out, &json, false);
    }

    // ----- results from the store -----------------------------------------------------------

    /// Runs what waited for writes up to `upto`. A reply whose own write failed (in `failed`,
    /// or the whole batch when `!batch_ok`) reports `internal` instead of promising durability.
    fn on_committed(&mut self, out: &mut dyn Outbox, upto: u64, batch_ok: bool, failed: &[u64]) {
        let now = out.now();
        while self.pending.front().is_some_and(|(s, _)| *s <= upto) {
            let Some((seq, p)) = self.pending.pop_front() else {
                break;
            };
            let ok = batch_ok && !failed.contains(&seq);
            match p {
                Pending::Ack {
                    conn,
                    user,
                    reference,
                    id,
                    ts,
                    accepted,
                } => {
                    let mut waiters = Vec::new();
                    if let Some(reference) = &reference {
                        if let Some(u) = self.users.get_mut(&user) {
                            if let Some(e) = u.dedup.entries.get_mut(reference) {
                                if e.id == id {
                                    waiters = std::mem::take(&mut e.waiters);
                                    e.committed = ok;
                                    if !ok {
                                        // Not stored: a retry must be able to store it.
                                        u.dedup.entries.remove(reference);
                                    }
                                }
                            }
                        }
                    }
                    waiters.insert(0, conn);
                    if ok {
                        self.m
                            .ack_seconds
                            .add(now.saturating_duration_since(accepted).as_secs_f64());
                        let json = ServerFrame::Ack {
                            reference: reference.as_deref(),
                            id,
                            ts,
                        }
                        .to_json();
                        for c in waiters {
                            if out.send_text(c, &json) {
                                self.m.frames_out += 1;
                            }
                        }
                    } else {
                        for c in waiters {
                            self.error(
                                out,
                                c,
                                ErrorCode::Internal,
                                "message could not be stored",
                                reference.as_deref(),
                            );
                        }
                    }
                }
                Pending::Welcome {
                    conn,
                    user,
                    token,
                    reference,
                } => {
                    if ok {
                        self.authenticate(out, conn, &user, &token, reference.as_deref());
                    } else {
                        let hash = auth::token_hash(&token);
                        self.sessions.remove(&hash);
                        if let Some(u) = self.users.get_mut(&user) {
                            u.sessions.retain(|h| *h != hash);
                        }
                        self.auth_failed(
                            out,
                            conn,
                            ErrorCode::Internal,
                            "could not store the session",
                            reference.as_deref(),
                        );
                    }
                }
                Pending::Close { conns } => {
                    for c in conns {
                        out.close(c, CloseCode::Normal, "logged out");
                    }
                }
                Pending::Reserved { upto } => {
                    if ok {
                        self.id_durable = self.id_durable.max(upto);
                    } else {
                        // Ask again at the next message.
                        self.id_requested = self.id_durable;
                    }
                }
            }
        }
    }

    fn on_query(&mut self, out: &mut dyn Outbox, qid: u64, messages: Vec<ChatMessage>, more: bool) {
        match self.queries.remove(&qid) {
            Some(QueryWaiter::Ring { room }) => {
                let cap = self.cfg.history_on_join;
                let Some(rm) = self.rooms.get_mut(&room) else {
                    return;
                };
                rm.warm(messages, cap);
                let joins = std::mem::take(&mut rm.pending_joins);
                self.membership_epoch += 1;
                for (conn, reference) in joins {
                    self.send_joined(out, conn, &room, reference.as_deref());
                    self.unblock(out, conn);
                }
                // The joiners may have gone offline while it loaded.
                self.maybe_unwatched.insert(room);
            }
            Some(QueryWaiter::History {
                conn,
                reference,
                room,
                with,
            }) => {
                let Some(c) = self.conns.get_mut(&conn) else {
                    return; // closed meanwhile (the store skipped it if it could)
                };
                c.queries = c.queries.saturating_sub(1);
                let json = ServerFrame::History {
                    room: room.as_deref(),
                    with: with.as_deref(),
                    messages: messages.iter().collect(),
                    more,
                    reference: reference.as_deref(),
                }
                .to_json();
                if out.send_text(conn, &json) {
                    self.m.frames_out += 1;
                }
            }
            None => {}
        }
    }

    /// Processes one text message, or queues it behind an outstanding join or authentication
    /// so that a connection's requests always take effect in the order it sent them.
    fn on_text(&mut self, out: &mut dyn Outbox, conn: ConnId, text: &str) {
        let (user, closing) = match self.conns.get_mut(&conn) {
            Some(c) => {
                if let Some(b) = &mut c.backlog {
                    if b.len() >= self.cfg.max_pending_requests {
                        c.closing = true;
                        return out.close(
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
                return self.error(out, conn, e.code, &e.message, e.reference.as_deref());
            }
        };
        match (user, frame.command) {
            (
                None,
                cmd @ (Command::Register { .. } | Command::Login { .. } | Command::Resume { .. }),
            ) => self.handle_auth(out, conn, cmd, frame.reference),
            (None, _) => self.error(
                out,
                conn,
                ErrorCode::Unauthenticated,
                "register, login or resume first",
                frame.reference.as_deref(),
            ),
            (Some(key), cmd) => self.handle(out, conn, key, cmd, frame.reference),
        }
    }

    /// Holds further messages of `conn` until [`Self::unblock`].
    fn block(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.backlog.get_or_insert_with(VecDeque::new);
        }
    }

    /// Releases `conn` and runs what it sent meanwhile, in order. If one of those blocks it
    /// again, the rest queue up behind that one.
    fn unblock(&mut self, out: &mut dyn Outbox, conn: ConnId) {
        let Some(items) = self.conns.get_mut(&conn).and_then(|c| c.backlog.take()) else {
            return;
        };
        for text in items {
            self.on_text(out, conn, &text);
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
            && self.queries.is_empty()
            && self.jobs.is_empty()
            && self.hash_queue.queued() == 0
    }

    /// Closes connections that did not authenticate within `--auth-timeout`. Deadlines are
    /// queued in connection order, so only due ones are looked at.
    fn expire_unauthenticated(&mut self, out: &mut dyn Outbox, now: Instant) {
        while let Some(&(at, conn)) = self.auth_deadlines.front() {
            if at > now {
                break;
            }
            self.auth_deadlines.pop_front();
            let Some(c) = self.conns.get_mut(&conn) else {
                continue;
            };
            // A sign-in waiting for its hash is the server's delay, not the client's.
            if c.user.is_some() || c.auth_pending || c.closing {
                continue;
            }
            c.closing = true;
            out.close(conn, CloseCode::PolicyViolation, "authentication timeout");
        }
    }

    /// Once a minute: forget sessions unused for `--session-ttl` (except those in use by an
    /// open connection, which count as used) and dedup refs older than `--dedup-window`.
    fn sweep(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_some_and(|t| now.saturating_duration_since(t) < SWEEP_INTERVAL)
        {
            return;
        }
        self.last_sweep = Some(now);
        let now_ms = now_ms();
        let ttl = self.cfg.session_ttl.as_millis() as i64;
        let in_use: HashSet<[u8; 32]> = self.conns.values().filter_map(|c| c.token_hash).collect();
        let expired: Vec<([u8; 32], String)> = self
            .sessions
            .iter()
            .filter(|(h, s)| now_ms - s.last_used > ttl && !in_use.contains(*h))
            .map(|(h, s)| (*h, s.user.clone()))
            .collect();
        for (hash, key) in expired {
            self.revoke_session(&key, hash);
        }
        let before_ts = now_ms - self.cfg.dedup_window.as_millis() as i64;
        self.write(Write::PruneDedup { before_ts });
    }
}

impl Service for ChatService {
    fn init(&mut self, waker: Arc<mio::Waker>) {
        self.wake.set(waker);
        // Results that arrived before the waker existed are still queued: make sure the loop
        // looks at them.
        self.wake.wake();
    }

    fn on_open(&mut self, out: &mut dyn Outbox, conn: ConnId, peer: SocketAddr) {
        self.conns.insert(conn, Conn::new(Some(peer)));
        self.auth_deadlines
            .push_back((out.now() + self.cfg.auth_timeout, conn));
    }

    fn on_message(&mut self, out: &mut dyn Outbox, conn: ConnId, msg: Message<'_>) {
        let text = match msg {
            Message::Binary(_) => {
                return out.close(conn, CloseCode::UnsupportedData, "binary not supported")
            }
            Message::Text(t) => t,
        };
        // Defensive: the loop always calls on_open first, but a test double may not.
        self.conns
            .entry(conn)
            .or_insert_with(|| Conn::new(out.peer_addr(conn)));
        self.on_text(out, conn, text);
    }

    fn on_close(&mut self, out: &mut dyn Outbox, conn: ConnId) {
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
            self.touch_session(hash, now_ms());
        }
        let Some(u) = self.users.get_mut(&key) else {
            return;
        };
        u.conns.retain(|x| *x != conn);
        self.membership_epoch += 1;
        if !u.conns.is_empty() {
            return;
        }
        let ts = now_ms();
        u.last_seen = Some(ts);
        self.online.remove(&key);
        self.write(Write::SetLastSeen {
            key: key.clone(),
            ts,
        });
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
        self.fanout_scratch(out, &json, false);
        let rooms = &self.users[&key].rooms;
        self.maybe_unwatched.extend(rooms.iter().cloned());
    }

    fn on_wake(&mut self, out: &mut dyn Outbox) {
        while let Ok(res) = self.auth_rx.try_recv() {
            self.on_auth_result(out, res);
        }
        while let Ok(ev) = self.store_rx.try_recv() {
            match ev {
                StoreEvent::Committed {
                    upto,
                    ok,
                    failed,
                    batch,
                    latency,
                } => {
                    self.m.store_batch_seconds.add(latency.as_secs_f64());
                    self.m.store_batch_writes.add(batch as f64);
                    if !ok {
                        self.m.store_failures += 1;
                    }
                    self.on_committed(out, upto, ok, &failed);
                }
                StoreEvent::QueryDone {
                    qid,
                    messages,
                    more,
                } => self.on_query(out, qid, messages, more),
            }
        }
    }

    fn on_tick(&mut self, out: &mut dyn Outbox) {
        let now = out.now();
        self.pair_throttle.prune(now);
        self.ip_throttle.prune(now);
        self.account_throttle.prune(now);
        self.register_throttle.prune(now);
        self.expire_unauthenticated(out, now);
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
    }

    fn metrics(&self, out: &mut String) {
        let authed = self.conns.values().filter(|c| c.user.is_some()).count();
        let m = &self.m;
        let mut w = crate::prom::Writer::new(out);
        w.gauge(
            "parlor_chat_connections",
            "Authenticated chat connections.",
            authed,
        );
        w.gauge(
            "parlor_chat_users_online",
            "Users with at least one authenticated connection.",
            self.online.len(),
        );
        w.gauge(
            "parlor_chat_rooms_warm",
            "Rooms whose recent messages are held in memory (rooms with a member online).",
            self.rooms.values().filter(|r| r.is_warm()).count(),
        );
        w.counter(
            "parlor_chat_messages_in_total",
            "Chat messages (say/dm) accepted.",
            m.messages_in,
        );
        w.counter(
            "parlor_chat_messages_out_total",
            "Chat message deliveries queued to connections.",
            m.deliveries,
        );
        w.counter(
            "parlor_chat_frames_out_total",
            "All chat frames queued to connections.",
            m.frames_out,
        );
        w.counter(
            "parlor_chat_logins_total",
            "Successful password logins.",
            m.logins_ok,
        );
        w.counter(
            "parlor_chat_login_failures_total",
            "Failed logins and resumes.",
            m.logins_failed,
        );
        w.counter(
            "parlor_chat_store_failures_total",
            "Store batches that failed to commit.",
            m.store_failures,
        );
        w.gauge(
            "parlor_chat_hash_jobs_waiting",
            "Sign-ins (register/login) waiting for a hashing thread.",
            self.hash_queue.queued(),
        );
        w.gauge(
            "parlor_chat_sessions",
            "Session tokens held (expire after --session-ttl without use).",
            self.sessions.len(),
        );
        w.gauge(
            "parlor_chat_store_pending_writes",
            "Writes sent to the store and not yet committed.",
            self.pending.len(),
        );
        m.store_batch_seconds.write(
            &mut w,
            "parlor_chat_store_batch_seconds",
            "Time to apply and commit one store batch.",
        );
        m.store_batch_writes.write(
            &mut w,
            "parlor_chat_store_batch_writes",
            "Writes per store batch (group commit).",
        );
        m.ack_seconds.write(
            &mut w,
            "parlor_chat_ack_seconds",
            "From accepting a message to sending its ack (durable commit).",
        );
        w.labelled(
            "parlor_chat_errors_total",
            crate::prom::Kind::Counter,
            "Error frames sent, by code.",
            "code",
            ErrorCode::ALL.map(|c| (c.as_str(), m.errors[c.index()])),
        );
    }

    fn on_turn_end(&mut self) {
        self.hand_to_store();
    }

    fn shutdown(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        // Everything queued before Shutdown is committed before the thread exits.
        self.store_batch.push(StoreReq::Shutdown);
        self.hand_to_store();
        if let Some(h) = self.store_thread.take() {
            if h.join().is_err() {
                log::error!("chat: store thread panicked");
            }
        }
        self.auth.stop();
    }
}

impl Drop for ChatService {
    fn drop(&mut self) {
        self.shutdown();
    }
}
