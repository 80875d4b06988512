//! Cluster mode's vocabulary (several nodes on one PostgreSQL database): the replication log
//! that every node tails, and what a clustered store reports beyond a single node's.
//!
//! The log is one table of events numbered by a gap-free position (`pos`) that is taken
//! under one row lock held until commit, so positions are in commit order: a node that has
//! applied every entry up to `pos` has seen exactly the database's state at `pos`. Message
//! ids and change `seq`s are the log positions of their events, so within a conversation
//! (within the whole chat, in fact) increasing id order is commit order, the same on every
//! node. NOTIFY only says "the log grew"; nodes read the entries from the table, so a missed
//! notification costs latency, never an entry.
//!
//! A store reports log entries ([`super::StoreEvent::Log`]) and commit reports
//! ([`super::StoreEvent::Committed`]) from two threads, in no order relative to each other: a
//! node may read its own message from the log before or after the commit report that acks it.
//! A batch reported `unavailable` may still have committed (its `COMMIT` answer was lost): its
//! entries then arrive through the log like any others; a resent message is recognised by its
//! `ref`, a resent edit is applied again (another entry in its edit history).
//!
//! Nothing here knows SQL or threads: these are values, serialized as the log's JSON body.

use serde::{Deserialize, Serialize};

use super::Write;
use crate::chat::protocol::{ChatMessage, Reaction};

/// A node's identity in the log (`origin`) and in the presence table: random per process
/// start, so a restarted node is a new node and the old one expires by its heartbeat.
pub type NodeId = String;

/// One log entry as a node reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    pub pos: i64,
    pub origin: NodeId,
    pub event: LogEvent,
}

/// A message as the log carries it (the fields of [`ChatMessage`] a new message has).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogMessage {
    pub id: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    pub from: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    pub nick: String,
    pub text: String,
    pub ts: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<i64>,
}

impl LogMessage {
    pub fn of(m: &ChatMessage) -> LogMessage {
        LogMessage {
            id: m.id,
            room: m.room.clone(),
            from: m.from.clone(),
            to: m.to.clone(),
            nick: m.nick.clone(),
            text: m.text.clone(),
            ts: m.ts,
            reply_to: m.reply_to,
        }
    }

    pub fn into_message(self) -> ChatMessage {
        ChatMessage {
            id: self.id,
            room: self.room,
            from: self.from,
            to: self.to,
            nick: self.nick,
            text: self.text,
            ts: self.ts,
            reply_to: self.reply_to,
            edited_ts: None,
            deleted: false,
            reactions: Vec::<Reaction>::new(),
        }
    }
}

/// What a node did that the others must apply. Tagged by `k` in the log's JSON body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum LogEvent {
    /// A new message; `msg.id` is this entry's `pos`. `dm` is the DM pair key, `sender` the
    /// sender's user key, `reference` its `ref` (retry deduplication on every node).
    Message {
        msg: LogMessage,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dm: Option<String>,
        sender: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    /// Message `id` has a new text; `seq` is this entry's `pos`.
    Edit {
        id: i64,
        text: String,
        edited_ts: i64,
        conv: String,
        /// For a DM: (author, recipient) names, which change frames carry.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dm_names: Option<(String, String)>,
    },
    Delete {
        id: i64,
        conv: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dm_names: Option<(String, String)>,
    },
    React {
        id: i64,
        user: String,
        emoji: String,
        on: bool,
        conv: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dm_names: Option<(String, String)>,
    },
    User {
        key: String,
        name: String,
        nick: String,
        phc: String,
    },
    Nick {
        key: String,
        nick: String,
    },
    LastSeen {
        key: String,
        ts: i64,
    },
    /// A session token (its SHA-256, hex) was issued.
    Session {
        hash: String,
        user_key: String,
        created: i64,
    },
    EndSession {
        hash: String,
    },
    EndUserSessions {
        user_key: String,
    },
    TouchSession {
        hash: String,
        ts: i64,
    },
    Room {
        name: String,
    },
    Member {
        room: String,
        user_key: String,
        on: bool,
    },
    DmPair {
        a: String,
        b: String,
    },
    Read {
        user_key: String,
        conv: String,
        id: i64,
    },
    Notify {
        user_key: String,
        conv: String,
        level: String,
    },
    /// `user_key` has a connection open on the entry's origin node (its first one there).
    Online {
        user_key: String,
    },
    /// `user_key` closed its last connection on the entry's origin node.
    Offline {
        user_key: String,
    },
    /// A typing indicator, relayed (nothing is stored but the log entry).
    Typing {
        user_key: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        room: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_key: Option<String>,
    },
    /// `node` stopped (cleanly), or its heartbeat expired: every user online only through it
    /// is offline now.
    NodeGone {
        node: NodeId,
    },
}

fn hex(hash: &[u8; 32]) -> String {
    let mut s = String::with_capacity(64);
    for b in hash {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A token hash from its log form.
pub fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl LogEvent {
    /// The log event of a write, `None` for writes only the database needs (pruning, id
    /// reservations). A message's or change's position is assigned when the entry is
    /// appended, so the id/seq in the event is filled in by the store.
    pub fn of_write(w: &Write) -> Option<LogEvent> {
        Some(match w {
            Write::InsertUser {
                key,
                name,
                nick,
                phc,
                ..
            } => LogEvent::User {
                key: key.clone(),
                name: name.clone(),
                nick: nick.clone(),
                phc: phc.clone(),
            },
            Write::InsertSession {
                hash,
                user_key,
                created,
            } => LogEvent::Session {
                hash: hex(hash),
                user_key: user_key.clone(),
                created: *created,
            },
            Write::DeleteSession { hash } => LogEvent::EndSession { hash: hex(hash) },
            Write::DeleteUserSessions { user_key } => LogEvent::EndUserSessions {
                user_key: user_key.clone(),
            },
            Write::TouchSession { hash, ts } => LogEvent::TouchSession {
                hash: hex(hash),
                ts: *ts,
            },
            Write::InsertRoom { name, .. } => LogEvent::Room { name: name.clone() },
            Write::AddMember { room, user_key } => LogEvent::Member {
                room: room.clone(),
                user_key: user_key.clone(),
                on: true,
            },
            Write::RemoveMember { room, user_key } => LogEvent::Member {
                room: room.clone(),
                user_key: user_key.clone(),
                on: false,
            },
            Write::InsertMessage { msg, dm, dedup } => LogEvent::Message {
                msg: LogMessage::of(msg),
                dm: dm.clone(),
                sender: dedup
                    .as_ref()
                    .map(|(k, _)| k.clone())
                    .unwrap_or_else(|| crate::chat::validate::user_key(&msg.from)),
                reference: dedup.as_ref().map(|(_, r)| r.clone()),
            },
            Write::SetNick { key, nick } => LogEvent::Nick {
                key: key.clone(),
                nick: nick.clone(),
            },
            Write::SetLastSeen { key, ts } => LogEvent::LastSeen {
                key: key.clone(),
                ts: *ts,
            },
            Write::AddDmPair { a, b } => LogEvent::DmPair {
                a: a.clone(),
                b: b.clone(),
            },
            Write::EditMessage {
                id,
                text,
                edited_ts,
                conv,
                dm_names,
                ..
            } => LogEvent::Edit {
                id: *id,
                text: text.clone(),
                edited_ts: *edited_ts,
                conv: conv.clone(),
                dm_names: dm_names.clone(),
            },
            Write::DeleteMessage {
                id, conv, dm_names, ..
            } => LogEvent::Delete {
                id: *id,
                conv: conv.clone(),
                dm_names: dm_names.clone(),
            },
            Write::SetReaction {
                id,
                user,
                emoji,
                on,
                conv,
                dm_names,
                ..
            } => LogEvent::React {
                id: *id,
                user: user.clone(),
                emoji: emoji.clone(),
                on: *on,
                conv: conv.clone(),
                dm_names: dm_names.clone(),
            },
            Write::SetRead { user_key, conv, id } => LogEvent::Read {
                user_key: user_key.clone(),
                conv: conv.clone(),
                id: *id,
            },
            Write::SetNotify {
                user_key,
                conv,
                level,
            } => LogEvent::Notify {
                user_key: user_key.clone(),
                conv: conv.clone(),
                level: level.clone(),
            },
            Write::Relay(ev) => ev.clone(),
            Write::PruneDedup { .. } | Write::ReserveIds { .. } | Write::PruneEvents { .. } => {
                return None
            }
        })
    }

    /// Whether the entry's position becomes the id (`Message`) or `seq` (`Edit`, `Delete`,
    /// `React`) of what it carries.
    pub fn takes_position(&self) -> bool {
        matches!(
            self,
            LogEvent::Message { .. }
                | LogEvent::Edit { .. }
                | LogEvent::Delete { .. }
                | LogEvent::React { .. }
        )
    }
}

/// A position the clustered store assigned to one write of a batch (reported with
/// [`super::StoreEvent::Committed`]): the id of an `InsertMessage` (sent with id 0), or the
/// `seq` of an edit, delete or reaction (sent with seq 0). For a message whose `(sender,
/// ref)` was already stored (a retry that reached another node, or raced its original),
/// nothing is inserted: `duplicate` is set and `id`/`ts` are the original's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assigned {
    /// The write's sequence number (see [`super::Store::submit`]).
    pub write: u64,
    pub id: i64,
    pub ts: i64,
    pub duplicate: bool,
}

/// What a clustered store loads at startup besides [`super::Loaded`], read in the same
/// snapshot: the state is exactly the log's up to `log_pos`.
#[derive(Debug, Clone, Default)]
pub struct ClusterLoaded {
    /// This process's node id (already registered with a fresh heartbeat).
    pub node: NodeId,
    /// The log position the loaded state is consistent with; tailing starts after it.
    pub log_pos: i64,
    /// (node, user key) of every live connection's user on the other nodes.
    pub online: Vec<(NodeId, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hashes_round_trip_through_hex() {
        let mut h = [0u8; 32];
        for (i, b) in h.iter_mut().enumerate() {
            *b = (i * 37) as u8;
        }
        assert_eq!(unhex(&hex(&h)), Some(h));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex(&"g".repeat(64)), None);
    }

    #[test]
    fn events_round_trip_through_json() {
        let ev = LogEvent::Message {
            msg: LogMessage {
                id: 7,
                room: Some("rust".into()),
                from: "Alice".into(),
                to: None,
                nick: "al".into(),
                text: "hi \"there\"".into(),
                ts: 1,
                reply_to: Some(3),
            },
            dm: None,
            sender: "alice".into(),
            reference: Some("r1".into()),
        };
        let json = serde_json::to_string(&ev).unwrap();
        assert!(json.starts_with("{\"k\":\"message\""), "{json}");
        assert_eq!(serde_json::from_str::<LogEvent>(&json).unwrap(), ev);
        let gone = LogEvent::NodeGone { node: "n1".into() };
        let json = serde_json::to_string(&gone).unwrap();
        assert_eq!(json, r#"{"k":"node_gone","node":"n1"}"#);
    }

    #[test]
    fn database_only_writes_are_not_logged() {
        assert!(LogEvent::of_write(&Write::ReserveIds { upto: 5 }).is_none());
        assert!(LogEvent::of_write(&Write::PruneDedup { before_ts: 5 }).is_none());
        let ev = LogEvent::of_write(&Write::AddMember {
            room: "r".into(),
            user_key: "u".into(),
        })
        .unwrap();
        assert!(!ev.takes_position());
        assert_eq!(
            ev,
            LogEvent::Member {
                room: "r".into(),
                user_key: "u".into(),
                on: true
            }
        );
    }
}
