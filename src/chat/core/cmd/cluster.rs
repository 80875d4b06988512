//! Cluster mode: applying what the nodes did (log entries, in log order), and presence across
//! nodes.
//!
//! Two kinds of entries come back through the log. Messages and changes to messages are
//! numbered by the database, so every node — the one that accepted them included — delivers
//! them only from the log: one order everywhere. Everything else (accounts, sessions, rooms,
//! memberships, nicks, read markers, presence, typing) was applied by its own node when it
//! decided it, so a node skips its own entries of those kinds and applies the others' as if
//! it had decided them, telling its own connections what they would have been told.

use crate::chat::confusable::skeleton_keys;
use crate::chat::core::cmd::auth::token_hash;
use crate::chat::core::cmd::changes::Change;
use crate::chat::core::state::{Ring, Room, Session, User};
use crate::chat::core::{Hub, NOBODY};
use crate::chat::protocol::{PresenceEvent, ServerFrame};
use crate::chat::store::cluster::{unhex, ClusterLoaded, LogEntry, LogEvent, NodeId};
use crate::chat::store::Write;
use crate::service::{CloseCode, ConnId};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What a clustered hub knows beyond a single node's state. Which users are online on other
/// nodes lives in each [`User::remote`].
pub struct ClusterState {
    /// This node (the `origin` of what it appends to the log).
    pub node: NodeId,
    /// The last log position applied: the hub's state is the database's at this position,
    /// plus its own decisions not yet committed.
    pub log_pos: i64,
    /// Resumes with a token this node does not know (yet), waiting for the log until their
    /// deadline: a session issued on another node a moment ago may still be on its way.
    pub parked: Vec<ParkedResume>,
    /// Users announced online who have no connection anywhere now, and when their `offline`
    /// is due (see [`Hub::presence_changed`]).
    pub offline_due: HashMap<String, Instant>,
}

/// How long a user with no connection left anywhere stays announced online (checked at the
/// next tick after it, so 1-2 s): covers a move between nodes whose "opened" the log orders
/// after the "closed".
pub const PRESENCE_GRACE: Duration = Duration::from_secs(1);

/// How long a resume with an unknown token waits for the log before `auth_failed`. Entries
/// arrive within milliseconds; this covers a node that is catching up after a hiccup.
pub const RESUME_WAIT: Duration = Duration::from_secs(2);

pub struct ParkedResume {
    pub until: Instant,
    pub conn: ConnId,
    pub token: String,
    pub reference: Option<String>,
}

impl ClusterState {
    pub fn new(loaded: &ClusterLoaded) -> ClusterState {
        ClusterState {
            node: loaded.node.clone(),
            log_pos: loaded.log_pos,
            parked: Vec::new(),
            offline_due: HashMap::new(),
        }
    }
}

impl Hub {
    /// Log entries, in log order, each once (the store guarantees it; positions at or below
    /// the last applied one are ignored all the same).
    pub(in crate::chat::core) fn on_log(&mut self, entries: Vec<LogEntry>) {
        for e in entries {
            let Some(cl) = &mut self.cluster else {
                return;
            };
            if e.pos <= cl.log_pos {
                continue;
            }
            cl.log_pos = e.pos;
            let own = e.origin == cl.node;
            self.apply_entry(e.pos, &e.origin, own, e.event);
        }
        self.retry_parked(false);
    }

    /// Cluster mode: parks a resume whose token is unknown here (the connection's later
    /// frames wait behind it). False when it cannot wait (single node).
    pub(in crate::chat::core) fn park_resume(
        &mut self,
        conn: ConnId,
        token: &str,
        reference: &Option<String>,
    ) -> bool {
        let until = self.now.mono + RESUME_WAIT;
        let Some(cl) = &mut self.cluster else {
            return false;
        };
        cl.parked.push(ParkedResume {
            until,
            conn,
            token: token.to_string(),
            reference: reference.clone(),
        });
        self.block(conn);
        true
    }

    /// Runs parked resumes whose token arrived (or, with `expired`, whose wait is over: they
    /// fail now), in arrival order; a closed connection's is dropped.
    pub(in crate::chat::core) fn retry_parked(&mut self, expired: bool) {
        let now = self.now.mono;
        let Some(cl) = &mut self.cluster else {
            return;
        };
        if cl.parked.is_empty() {
            return;
        }
        let sessions = &self.sessions;
        let (ready, waiting): (Vec<ParkedResume>, Vec<ParkedResume>) =
            std::mem::take(&mut cl.parked).into_iter().partition(|p| {
                sessions.contains_key(&token_hash(&p.token)) || (expired && now >= p.until)
            });
        cl.parked = waiting;
        for p in ready {
            if !self.conns.contains_key(&p.conn) {
                continue;
            }
            // Signed in: the welcome unblocks the connection once its counts are in. Refused:
            // what the client sent meanwhile runs now (and is refused as unauthenticated).
            if !self.resume_with(p.conn, &p.token, p.reference, false) {
                self.unblock(p.conn);
            }
        }
    }

    fn apply_entry(&mut self, pos: i64, origin: &str, own: bool, event: LogEvent) {
        match event {
            LogEvent::Message {
                msg,
                sender,
                reference,
                ..
            } => {
                let mut msg = msg.into_message();
                msg.id = pos;
                self.deliver_logged(msg, &sender, reference, own);
            }
            LogEvent::Edit {
                id,
                text,
                edited_ts,
                conv,
                dm_names,
            } => self.publish_change(
                id,
                pos,
                &conv,
                dm_names.as_ref(),
                Change::Edit { text, edited_ts },
            ),
            LogEvent::Delete { id, conv, dm_names } => {
                self.publish_change(id, pos, &conv, dm_names.as_ref(), Change::Delete)
            }
            LogEvent::React {
                id,
                user,
                emoji,
                on,
                conv,
                dm_names,
            } => self.publish_change(
                id,
                pos,
                &conv,
                dm_names.as_ref(),
                Change::React { user, emoji, on },
            ),
            // Whoever noticed the expiry wrote it; only a node told of its own death ignores it.
            LogEvent::NodeGone { node } => {
                if self.cluster.as_ref().is_some_and(|c| c.node != node) {
                    self.node_gone(&node);
                } else {
                    self.declared_gone();
                }
            }
            // This node decided the rest of its own entries when it wrote them.
            _ if own => {}
            LogEvent::User {
                key,
                name,
                nick,
                phc,
            } => {
                if !self.users.contains_key(&key) {
                    self.name_skeletons.insert(&skeleton_keys(&name), &key);
                    self.nick_skeletons.insert(&skeleton_keys(&nick), &key);
                    self.users
                        .insert(key.clone(), User::new(key, name, nick, phc));
                }
            }
            LogEvent::Nick { key, nick } => {
                self.change_nick(&key, &nick, &skeleton_keys(&nick), NOBODY)
            }
            LogEvent::LastSeen { key, ts } => {
                if let Some(u) = self.users.get_mut(&key) {
                    u.last_seen = Some(ts);
                }
            }
            LogEvent::Session {
                hash,
                user_key,
                created,
            } => {
                let Some(hash) = unhex(&hash) else { return };
                if let Some(u) = self.users.get_mut(&user_key) {
                    if !u.sessions.contains(&hash) {
                        u.sessions.push_back(hash);
                    }
                    self.sessions.insert(
                        hash,
                        Session {
                            user: user_key,
                            last_used: created,
                        },
                    );
                }
            }
            LogEvent::EndSession { hash } => {
                let Some(hash) = unhex(&hash) else { return };
                if let Some(s) = self.sessions.get(&hash) {
                    let key = s.user.clone();
                    self.forget_session(&key, hash);
                    self.close_conns_of(&key, Some(hash));
                }
            }
            LogEvent::EndUserSessions { user_key } => {
                let hashes: Vec<[u8; 32]> = self
                    .users
                    .get(&user_key)
                    .map(|u| u.sessions.iter().copied().collect())
                    .unwrap_or_default();
                for h in hashes {
                    self.forget_session(&user_key, h);
                }
                self.close_conns_of(&user_key, None);
            }
            LogEvent::TouchSession { hash, ts } => {
                if let Some(s) = unhex(&hash).and_then(|h| self.sessions.get_mut(&h)) {
                    s.last_used = s.last_used.max(ts);
                }
            }
            LogEvent::Room { name } => {
                // Created at this position: every message of it comes later, through the log,
                // so an empty ring is exact.
                self.rooms
                    .entry(name)
                    .or_insert_with(|| Room::new(Ring::Warm(Default::default())));
            }
            LogEvent::Member { room, user_key, on } => {
                if on {
                    self.enter_room(NOBODY, &user_key, &room);
                } else {
                    self.remove_member(&room, &user_key, NOBODY);
                }
            }
            LogEvent::DmPair { a, b } => self.partners_in_memory(&a, &b),
            LogEvent::Read { user_key, conv, id } => self.remote_read(&user_key, &conv, id),
            LogEvent::Notify {
                user_key,
                conv,
                level,
            } => self.remote_notify(&user_key, &conv, level),
            LogEvent::Online { user_key } => self.remote_online(&user_key, origin),
            LogEvent::Offline { user_key } => self.remote_offline(&user_key, origin),
            LogEvent::Typing {
                user_key,
                room,
                to_key,
            } => self.remote_typing(&user_key, room, to_key),
        }
    }

    /// Closes `key`'s connections on this node that use `token` (all of them with `None`):
    /// their session ended on another node (logout there).
    fn close_conns_of(&mut self, key: &str, token: Option<[u8; 32]>) {
        let conns = self
            .users
            .get(key)
            .map(|u| u.conns.clone())
            .unwrap_or_default();
        for c in conns {
            let Some(x) = self.conns.get_mut(&c) else {
                continue;
            };
            if token.is_none() || x.token_hash == token {
                x.closing = true;
                self.close(c, CloseCode::Normal, "logged out");
            }
        }
    }

    /// The room name or DM partner name a conversation key names, from `key`'s side.
    fn conv_names(&self, key: &str, conv: &str) -> (Option<String>, Option<String>) {
        match conv.split_once('\n') {
            Some((a, b)) => {
                let other = if a == key { b } else { a };
                let with = self.users.get(other).map(|u| u.name.clone());
                (None, with)
            }
            None => (Some(conv.to_string()), None),
        }
    }

    fn remote_read(&mut self, key: &str, conv: &str, id: i64) {
        let Some(u) = self.users.get_mut(key) else {
            return;
        };
        let prefs = u.convs.entry(conv.to_string()).or_default();
        if id <= prefs.read {
            return;
        }
        prefs.read = id;
        let (room, with) = self.conv_names(key, conv);
        let json = ServerFrame::Read {
            room: room.as_deref(),
            with: with.as_deref(),
            id,
        }
        .to_json();
        self.collect_conns(std::iter::once(&key.to_string()), NOBODY);
        self.broadcast(&json, false);
    }

    fn remote_notify(&mut self, key: &str, conv: &str, level: String) {
        let Some(u) = self.users.get_mut(key) else {
            return;
        };
        u.convs.entry(conv.to_string()).or_default().notify = Some(level.clone());
        let (room, with) = self.conv_names(key, conv);
        let json = ServerFrame::Notify {
            room: room.as_deref(),
            with: with.as_deref(),
            level: &level,
            reference: None,
        }
        .to_json();
        self.collect_conns(std::iter::once(&key.to_string()), NOBODY);
        self.broadcast(&json, false);
    }

    fn remote_typing(&mut self, key: &str, room: Option<String>, to_key: Option<String>) {
        if !self.users.contains_key(key) {
            return;
        }
        match (&room, &to_key) {
            (Some(room), _) => {
                let Some(rm) = self.rooms.get(room) else {
                    return;
                };
                let others = rm.members.iter().filter(|m| *m != key);
                crate::chat::core::conns_of(&mut self.scratch, &self.users, others, NOBODY);
            }
            (None, Some(tk)) if tk != key => {
                let other = [tk.clone()];
                crate::chat::core::conns_of(&mut self.scratch, &self.users, other.iter(), NOBODY);
            }
            _ => return,
        }
        self.send_typing(key, room.as_deref(), to_key.as_deref());
    }

    // ----- presence across nodes -------------------------------------------------------------

    /// Tells the connections of users sharing a room with `key` that it came online or went
    /// offline (the same frame a single node sends on a first connect / last disconnect).
    fn announce_presence(&mut self, key: &str, online: bool) {
        self.collect_sharer_conns(key, NOBODY);
        let Some(u) = self.users.get(key) else {
            return;
        };
        let json = ServerFrame::Presence {
            room: None,
            user: &u.name,
            nick: &u.nick,
            event: if online {
                PresenceEvent::Online
            } else {
                PresenceEvent::Offline
            },
            last_seen: if online { None } else { u.last_seen },
        }
        .to_json();
        self.broadcast(&json, false);
        if !online {
            let rooms = &self.users[key].rooms;
            self.maybe_unwatched.extend(rooms.iter().cloned());
        }
    }

    fn remote_online(&mut self, key: &str, node: &str) {
        let Some(u) = self.users.get_mut(key) else {
            return;
        };
        if !u.remote.iter().any(|n| n == node) {
            u.remote.push(node.to_string());
        }
        self.presence_changed(key);
    }

    fn remote_offline(&mut self, key: &str, node: &str) {
        let Some(u) = self.users.get_mut(key) else {
            return;
        };
        u.remote.retain(|n| n != node);
        self.presence_changed(key);
    }

    /// A node stopped or its heartbeat expired: users online only through it go offline.
    fn node_gone(&mut self, node: &str) {
        let now = self.now.wall_ms;
        let mut changed = Vec::new();
        for (key, u) in self.users.iter_mut() {
            if u.remote.iter().any(|n| n == node) {
                u.remote.retain(|n| n != node);
                if !u.online() {
                    u.last_seen = Some(now);
                }
                changed.push(key.clone());
            }
        }
        for key in changed {
            self.presence_changed(&key);
        }
    }

    /// Another node took this one for dead (its heartbeat stalled) and told everyone its users
    /// are offline; the store registered it again. Its users with connections here are
    /// announced again, within the others' offline grace if the stall was short.
    fn declared_gone(&mut self) {
        log::warn!("cluster: this node was declared gone; announcing its users again");
        let here: Vec<String> = self
            .users
            .values()
            .filter(|u| !u.conns.is_empty())
            .map(|u| u.key.clone())
            .collect();
        for user_key in here {
            self.write(Write::Relay(LogEvent::Online { user_key }));
        }
    }

    /// This node's first connection of `key` opened (`online`) or its last one closed: the
    /// other nodes learn it through the log, and this node's connections as for any change.
    pub(in crate::chat::core) fn local_presence(&mut self, key: &str, online: bool) {
        let user_key = key.to_string();
        self.write(Write::Relay(if online {
            LogEvent::Online { user_key }
        } else {
            LogEvent::Offline { user_key }
        }));
        self.presence_changed(key);
    }

    /// Brings what this node's connections were told (`self.online`: announced online) in
    /// line with where the user has connections now. Coming online is announced at once;
    /// going offline only after [`PRESENCE_GRACE`] with no connection anywhere, because the
    /// log may order one node's "closed" before another node's "opened" of the same moment
    /// (a user moving between nodes): without the grace the others would see it flap.
    pub(in crate::chat::core) fn presence_changed(&mut self, key: &str) {
        let now = self.now.mono;
        let Some(online) = self.users.get(key).map(|u| u.online()) else {
            return;
        };
        let announced = self.online.contains(key);
        let Some(cl) = &mut self.cluster else {
            return;
        };
        if online {
            cl.offline_due.remove(key);
            if !announced {
                self.online.insert(key.to_string());
                self.membership_epoch += 1;
                self.announce_presence(key, true);
            }
        } else if announced {
            cl.offline_due
                .entry(key.to_string())
                .or_insert(now + PRESENCE_GRACE);
        }
    }

    /// On each tick: users whose grace ran out with no connection anywhere are offline.
    pub(in crate::chat::core) fn announce_due_offline(&mut self) {
        let now = self.now.mono;
        let Some(cl) = &mut self.cluster else {
            return;
        };
        if cl.offline_due.is_empty() {
            return;
        }
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut cl.offline_due)
            .into_iter()
            .partition(|(_, at)| *at <= now);
        cl.offline_due = waiting.into_iter().collect();
        for (key, _) in due {
            let gone = self.users.get(&key).is_some_and(|u| !u.online());
            if gone && self.online.remove(&key) {
                self.membership_epoch += 1;
                self.announce_presence(&key, false);
            }
        }
    }

    /// Cluster mode: a typing indicator that passed this node's throttle, for the others.
    pub(in crate::chat::core) fn relay_typing(
        &mut self,
        key: &str,
        room: Option<&str>,
        to_key: Option<String>,
    ) {
        if self.cluster.is_some() {
            self.write(Write::Relay(LogEvent::Typing {
                user_key: key.to_string(),
                room: room.map(str::to_string),
                to_key,
            }));
        }
    }

    /// Test and metrics hook: the last log position applied (cluster mode).
    pub fn log_position(&self) -> Option<i64> {
        self.cluster.as_ref().map(|c| c.log_pos)
    }
}
