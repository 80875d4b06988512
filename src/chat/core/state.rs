//! In-memory chat state: users, rooms, connections, and per-user bookkeeping (dedup, rate
//! limit). Owned by the event loop thread; the database is the durable copy, this is the
//! working copy every decision is made from without waiting on disk.

use core::net::IpAddr;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use crate::chat::protocol::ChatMessage;
use crate::chat::ratelimit::TokenBucket;
use crate::service::ConnId;

pub struct User {
    pub key: String,
    pub name: String,
    pub nick: String,
    pub phc: String,
    pub last_seen: Option<i64>,
    /// Live authenticated connections on this node.
    pub conns: Vec<ConnId>,
    /// Cluster mode: the other nodes where the user has a connection open.
    pub remote: Vec<String>,
    pub rooms: BTreeSet<String>,
    /// Users this one has exchanged DMs with (keys), for nick broadcasts.
    pub dm_partners: HashSet<String>,
    pub bucket: Option<TokenBucket>,
    /// `history` requests (`--query-rate`), separate from messages.
    pub query_bucket: Option<TokenBucket>,
    pub dedup: Dedup,
    /// Token hashes of this user's sessions, oldest first (bounded; see `MAX_SESSIONS`).
    pub sessions: VecDeque<[u8; 32]>,
    /// Read marker and notification level per conversation (room name or DM pair key).
    pub convs: HashMap<String, ConvPrefs>,
    /// An operator disabled the account (`parlor user disable`): no login, no resume.
    pub disabled: bool,
    /// Bumped whenever the credentials change under a sign-in in flight (a new password, a
    /// disable, the account's own write failing): a login verified against the old ones is
    /// refused.
    pub cred_epoch: u64,
}

impl User {
    pub fn new(key: String, name: String, nick: String, phc: String) -> User {
        User {
            key,
            name,
            nick,
            phc,
            last_seen: None,
            conns: Vec::new(),
            remote: Vec::new(),
            rooms: BTreeSet::new(),
            dm_partners: HashSet::new(),
            bucket: None,
            query_bucket: None,
            dedup: Dedup::default(),
            sessions: VecDeque::new(),
            convs: HashMap::new(),
            disabled: false,
            cred_epoch: 0,
        }
    }

    /// A connection is open here, or (cluster mode) on another node.
    pub fn online(&self) -> bool {
        !self.conns.is_empty() || !self.remote.is_empty()
    }
}

/// What a user set for one conversation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConvPrefs {
    /// Read up to this message id.
    pub read: i64,
    /// `all`, `mentions` or `none`; `None` is the default (all for DMs, mentions for rooms).
    pub notify: Option<String>,
}

pub struct Conn {
    /// The client's address (behind a trusted proxy: the forwarded one), for throttles.
    pub addr: Option<IpAddr>,
    /// Key of the authenticated user.
    pub user: Option<String>,
    /// A register/login is being hashed or committed; more auth frames are refused meanwhile.
    pub auth_pending: bool,
    /// Hash of the token this connection authenticated with, for `logout`.
    pub token_hash: Option<[u8; 32]>,
    /// Logout is committing (or the auth deadline passed); the connection closes when it does
    /// and its further messages are ignored.
    pub closing: bool,
    /// `history` queries sent to the store and not answered yet (`--queries-in-flight`).
    pub queries: usize,
    /// Set when the connection closes; its queries still queued in the store are skipped.
    pub gone: Option<Arc<AtomicBool>>,
    /// `Some` while a join or authentication of this connection waits on a worker thread:
    /// later messages queue here and run, in order, when it completes.
    pub backlog: Option<VecDeque<String>>,
}

impl Conn {
    pub fn new(addr: Option<IpAddr>) -> Conn {
        Conn {
            addr,
            user: None,
            auth_pending: false,
            token_hash: None,
            closing: false,
            queries: 0,
            gone: None,
            backlog: None,
        }
    }
}

/// The join-snapshot ring of a room's last messages.
pub enum Ring {
    /// Not in memory; the store has the truth.
    Cold,
    /// A load is queued on the store thread. Messages accepted meanwhile are kept here, because
    /// the load (queued before them) cannot see them.
    Loading(Vec<Rc<ChatMessage>>),
    Warm(VecDeque<Rc<ChatMessage>>),
}

pub struct Room {
    pub members: BTreeSet<String>,
    pub ring: Ring,
    /// Joins waiting for the ring to load, in arrival order, with their `ref`. These
    /// connections are skipped by live broadcasts until their `joined` is sent, since the
    /// snapshot then contains what they would have received: nothing twice.
    pub pending_joins: Vec<(ConnId, Option<String>)>,
    /// Connections a message to this room goes to, as of `fanout_epoch` (see
    /// `ChatService::membership_epoch`).
    pub fanout: Vec<ConnId>,
    pub fanout_epoch: Option<u64>,
}

impl Room {
    pub fn new(ring: Ring) -> Room {
        Room {
            members: BTreeSet::new(),
            ring,
            pending_joins: Vec::new(),
            fanout: Vec::new(),
            fanout_epoch: None,
        }
    }

    /// Whether the join ring is in memory (not cold, not loading).
    pub fn is_warm(&self) -> bool {
        matches!(self.ring, Ring::Warm(_))
    }

    /// Adds a just-accepted message to the ring (if the room has one) keeping the last `cap`.
    pub fn remember(&mut self, msg: &Rc<ChatMessage>, cap: usize) {
        match &mut self.ring {
            Ring::Cold => {}
            Ring::Loading(tail) => tail.push(msg.clone()),
            Ring::Warm(ring) => {
                ring.push_back(msg.clone());
                while ring.len() > cap {
                    ring.pop_front();
                }
            }
        }
    }

    /// Installs a loaded ring: the store's last messages plus those accepted during the load.
    pub fn warm(&mut self, loaded: Vec<ChatMessage>, cap: usize) {
        let tail = match std::mem::replace(&mut self.ring, Ring::Cold) {
            Ring::Loading(t) => t,
            _ => Vec::new(),
        };
        let mut all: Vec<Rc<ChatMessage>> = loaded.into_iter().map(Rc::new).collect();
        let last = all.last().map(|m| m.id).unwrap_or(i64::MIN);
        // The load ran after every write queued before it and before every write queued after
        // it, so the tail is strictly newer; the id check is belt and braces against overlap.
        all.extend(tail.into_iter().filter(|m| m.id > last));
        let skip = all.len().saturating_sub(cap);
        self.ring = Ring::Warm(all.into_iter().skip(skip).collect());
    }
}

/// A session token's owner and when it was last used (ms since the epoch).
pub struct Session {
    pub user: String,
    pub last_used: i64,
}

/// Per-user memory of recent `ref`s of say/dm, for retry deduplication.
#[derive(Default)]
pub struct Dedup {
    pub entries: HashMap<String, DedupEntry>,
    /// Refs in insertion order, for expiry and the size bound.
    pub order: VecDeque<(Instant, String)>,
}

pub struct DedupEntry {
    /// When the ref was first seen; identifies this entry in `order`.
    pub at: Instant,
    pub id: i64,
    pub ts: i64,
    pub committed: bool,
    /// Connections that retried before the original committed; acked when it does.
    pub waiters: Vec<ConnId>,
}

impl Dedup {
    pub fn insert(&mut self, reference: String, entry: DedupEntry, max: usize) {
        self.order.push_back((entry.at, reference.clone()));
        self.entries.insert(reference, entry);
        while self.order.len() > max {
            self.pop_oldest();
        }
    }

    /// Forgets the oldest ref, unless it was re-used since (then the newer entry stays).
    fn pop_oldest(&mut self) {
        if let Some((t, r)) = self.order.pop_front() {
            if self.entries.get(&r).is_some_and(|e| e.at == t) {
                self.entries.remove(&r);
            }
        }
    }

    pub fn expire(&mut self, now: Instant, window: std::time::Duration) {
        while let Some((t, _)) = self.order.front() {
            if now.saturating_duration_since(*t) < window {
                break;
            }
            self.pop_oldest();
        }
    }
}
