//! `edit`, `delete`, `react`, the check behind a reply's `reply_to`, and `catchup`: changes to
//! messages as events in the same ordered log as the messages (see `docs/PROTOCOL.md`,
//! "Changing messages").
//!
//! A change needs the message's current state (author, conversation, edit count, reactions),
//! which for anything but the newest messages lives only in the store. The first change to a
//! message looks it up ([`Query::Message`]); from then on the hub keeps its state in `known`
//! and decides every later change from memory, because every change goes through here: the
//! store only ever learns them after the hub. While a lookup runs, the asking connection is
//! blocked (its later frames wait, in order) and other changes to the same message queue
//! behind the lookup.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use crate::chat::core::{Hub, Pending, QueryWaiter};
use crate::chat::protocol::{ChatMessage, ConvRef, ErrorCode, ServerFrame};
use crate::chat::store::{self, ChangeItem, ChangeKind, Query, StoredMessage, Write};
use crate::chat::validate;
use crate::service::ConnId;

/// Messages whose state the hub keeps after a change (oldest forgotten first; forgetting only
/// costs a lookup at the next change).
const KNOWN_MAX: usize = 4096;

/// A catch-up's default and largest `limit`.
pub(in crate::chat::core) const DEFAULT_CATCHUP_LIMIT: u32 = 500;
pub(in crate::chat::core) const MAX_CATCHUP_LIMIT: u32 = 1000;

/// At most this many distinct emoji on one message.
const MAX_EMOJI_PER_MESSAGE: usize = 20;

/// Where a message lives, for who may see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::chat::core) enum Conv {
    Room(String),
    /// The DM pair key ([`store::dm_key`]) and both users' keys.
    Dm {
        pair: String,
        a: String,
        b: String,
    },
}

/// A decided change to a message, as every node applies it.
#[derive(Debug, Clone, PartialEq)]
pub(in crate::chat::core) enum Change {
    Edit {
        text: String,
        edited_ts: i64,
    },
    Delete,
    /// `user` is the account name.
    React {
        user: String,
        emoji: String,
        on: bool,
    },
}

impl Change {
    fn apply_to(&self, msg: &mut ChatMessage) {
        match self {
            Change::Edit { text, edited_ts } => {
                msg.text = text.clone();
                msg.edited_ts = Some(*edited_ts);
            }
            Change::Delete => msg.mark_deleted(),
            Change::React { user, emoji, on } => {
                msg.set_reaction(user, emoji, *on);
            }
        }
    }
}

impl Conv {
    /// The conversation of a change-log key: a DM pair key holds a newline (two user keys),
    /// a room name never does.
    pub(in crate::chat::core) fn of_key(key: &str) -> Conv {
        match key.split_once('\n') {
            Some((a, b)) => Conv::Dm {
                pair: key.to_string(),
                a: a.to_string(),
                b: b.to_string(),
            },
            None => Conv::Room(key.to_string()),
        }
    }

    fn store_key(&self) -> &str {
        match self {
            Conv::Room(r) => r,
            Conv::Dm { pair, .. } => pair,
        }
    }
}

/// A message's state as the hub keeps it for changes.
pub(in crate::chat::core) struct Known {
    pub msg: ChatMessage,
    pub author: String,
    pub conv: Conv,
    pub edits: u32,
}

/// The hub's memory of messages for changes: what is known, and what is being looked up.
#[derive(Default)]
pub(in crate::chat::core) struct Changes {
    known: HashMap<i64, Known>,
    order: VecDeque<i64>,
    /// Changes waiting for the lookup of their message, in arrival order.
    lookups: HashMap<i64, Vec<Waiting>>,
}

/// A change waiting for its message's state.
pub(in crate::chat::core) struct Waiting {
    conn: ConnId,
    key: String,
    op: Op,
    reference: Option<String>,
}

pub(in crate::chat::core) enum Op {
    Edit {
        text: String,
    },
    Delete,
    React {
        emoji: String,
        on: bool,
    },
    /// A `say`/`dm` whose `reply_to` is this message: it goes on once the message is checked.
    Reply {
        room: Option<String>,
        to: Option<String>,
        text: String,
    },
}

impl Changes {
    fn remember(&mut self, id: i64, k: Known) {
        if self.known.insert(id, k).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > KNOWN_MAX {
            if let Some(old) = self.order.pop_front() {
                self.known.remove(&old);
            }
        }
    }

    /// Forgets a message's state (after a change of it failed to store, memory may be ahead
    /// of the store): the next change looks it up again.
    pub(in crate::chat::core) fn forget(&mut self, id: i64) {
        if self.known.remove(&id).is_some() {
            self.order.retain(|i| *i != id);
        }
    }
}

impl Known {
    fn from_stored(s: StoredMessage) -> Known {
        let author = validate::user_key(&s.msg.from);
        let conv = match (&s.msg.room, &s.dm) {
            (Some(room), _) => Conv::Room(room.clone()),
            (None, dm) => {
                let to = validate::user_key(s.msg.to.as_deref().unwrap_or_default());
                let pair = dm.clone().unwrap_or_else(|| store::dm_key(&author, &to));
                Conv::Dm {
                    pair,
                    a: author.clone(),
                    b: to,
                }
            }
        };
        Known {
            msg: s.msg,
            author,
            conv,
            edits: s.edits,
        }
    }
}

impl Hub {
    pub(in crate::chat::core) fn edit(
        &mut self,
        conn: ConnId,
        key: &str,
        id: i64,
        text: String,
        r: Option<&str>,
    ) {
        if let Err((c, m)) = validate::text(&text, self.cfg.max_text) {
            return self.error(conn, c, &m, r);
        }
        self.with_message(conn, key, id, Op::Edit { text }, r);
    }

    pub(in crate::chat::core) fn delete(
        &mut self,
        conn: ConnId,
        key: &str,
        id: i64,
        r: Option<&str>,
    ) {
        self.with_message(conn, key, id, Op::Delete, r);
    }

    pub(in crate::chat::core) fn react(
        &mut self,
        conn: ConnId,
        key: &str,
        id: i64,
        emoji: String,
        on: bool,
        r: Option<&str>,
    ) {
        if let Err((c, m)) = validate::emoji(&emoji) {
            return self.error(conn, c, &m, r);
        }
        self.with_message(conn, key, id, Op::React { emoji, on }, r);
    }

    /// Whether a `say`/`dm` may reply to `reply_to` right now: `Some(true)` if the message is
    /// in memory and in the same conversation, `Some(false)` if it is known not to be, `None`
    /// if the store must be asked (the say was parked behind that lookup).
    #[allow(clippy::too_many_arguments)]
    pub(in crate::chat::core) fn check_reply(
        &mut self,
        conn: ConnId,
        key: &str,
        reply_to: i64,
        conv: &Conv,
        room: &Option<String>,
        to: &Option<String>,
        text: &str,
        r: Option<&str>,
    ) -> Option<bool> {
        if let Some(k) = self.changes.known.get(&reply_to) {
            return Some(k.conv.store_key() == conv.store_key());
        }
        // The newest messages of a warm room are in its ring.
        if let Conv::Room(name) = conv {
            if let Some(rm) = self.rooms.get(name) {
                if let crate::chat::core::state::Ring::Warm(ring) = &rm.ring {
                    if ring.iter().any(|m| m.id == reply_to) {
                        return Some(true);
                    }
                }
            }
        }
        let op = Op::Reply {
            room: room.clone(),
            to: to.clone(),
            text: text.to_string(),
        };
        self.look_up(conn, key, reply_to, op, r);
        None
    }

    /// Runs `op` on message `id` now if its state is in memory, else after looking it up.
    fn with_message(&mut self, conn: ConnId, key: &str, id: i64, op: Op, r: Option<&str>) {
        if self.changes.known.contains_key(&id) {
            return self.apply(conn, key, id, op, r);
        }
        self.look_up(conn, key, id, op, r);
    }

    fn look_up(&mut self, conn: ConnId, key: &str, id: i64, op: Op, r: Option<&str>) {
        let waiting = Waiting {
            conn,
            key: key.to_string(),
            op,
            reference: r.map(str::to_string),
        };
        self.block(conn);
        match self.changes.lookups.get_mut(&id) {
            Some(queue) => queue.push(waiting),
            None => {
                self.changes.lookups.insert(id, vec![waiting]);
                self.query(Query::Message { id }, QueryWaiter::Lookup { id });
            }
        }
    }

    /// The store answered a lookup: remember the message and run what waited for it, in order.
    pub(in crate::chat::core) fn on_lookup(&mut self, id: i64, found: Option<StoredMessage>) {
        let waiting = self.changes.lookups.remove(&id).unwrap_or_default();
        if let Some(s) = found {
            self.changes.remember(id, Known::from_stored(s));
        }
        for w in waiting {
            let r = w.reference.as_deref();
            if self.changes.known.contains_key(&id) {
                self.apply(w.conn, &w.key, id, w.op, r);
            } else if matches!(w.op, Op::Reply { .. }) {
                self.error(
                    w.conn,
                    ErrorCode::BadRequest,
                    "reply_to: no such message",
                    r,
                );
            } else {
                self.error(w.conn, ErrorCode::NotFound, "no such message", r);
            }
            self.unblock(w.conn);
        }
    }

    fn can_see(&self, key: &str, conv: &Conv) -> bool {
        match conv {
            Conv::Room(room) => self
                .rooms
                .get(room)
                .is_some_and(|rm| rm.members.contains(key)),
            Conv::Dm { a, b, .. } => key == a || key == b,
        }
    }

    /// Decides `op` on a message whose state is in `known`.
    fn apply(&mut self, conn: ConnId, key: &str, id: i64, op: Op, r: Option<&str>) {
        let Some(k) = self.changes.known.get(&id) else {
            return;
        };
        let visible = self.can_see(key, &k.conv);
        if let Op::Reply { room, to, text } = op {
            let same = visible
                && match (&room, &to, &k.conv) {
                    (Some(rm), _, Conv::Room(c)) => rm == c,
                    (None, Some(to), Conv::Dm { pair, .. }) => {
                        *pair == store::dm_key(key, &validate::user_key(to))
                    }
                    _ => false,
                };
            if !same {
                return self.error(
                    conn,
                    ErrorCode::BadRequest,
                    "reply_to: no such message in this conversation",
                    r,
                );
            }
            return self.say_checked(conn, key, room, to, text, Some(id), r);
        }
        if !visible || k.msg.deleted {
            // The same answer whether it does not exist or is not yours to see.
            return self.error(conn, ErrorCode::NotFound, "no such message", r);
        }
        let is_author = k.author == key;
        match &op {
            Op::Edit { .. } | Op::Delete if !is_author => {
                return self.error(conn, ErrorCode::Forbidden, "only the author may do that", r);
            }
            Op::Edit { .. } if k.edits >= self.cfg.max_edits => {
                let m = format!("a message may be edited {} times", self.cfg.max_edits);
                return self.error(conn, ErrorCode::BadRequest, &m, r);
            }
            Op::React { emoji, on: true }
                if k.msg.reactions.len() >= MAX_EMOJI_PER_MESSAGE
                    && !k.msg.reactions.iter().any(|x| &x.emoji == emoji) =>
            {
                return self.error(
                    conn,
                    ErrorCode::BadRequest,
                    "a message has at most 20 different reactions",
                    r,
                );
            }
            _ => {}
        }
        let ts = self.now.wall_ms;
        let user_name = self
            .users
            .get(key)
            .map(|u| u.name.clone())
            .unwrap_or_default();
        let already = match &op {
            Op::React { emoji, on } => {
                let present = k
                    .msg
                    .reactions
                    .iter()
                    .any(|x| &x.emoji == emoji && x.users.contains(&user_name));
                present == *on
            }
            _ => false,
        };
        if matches!(op, Op::Edit { .. } | Op::React { .. }) && !self.take_token(key, self.now.mono)
        {
            return self.error(conn, ErrorCode::RateLimited, "changing too fast", r);
        }
        // A reaction that is already so changes nothing: acknowledged (after whatever this
        // connection wrote before, if that is not committed yet), not logged.
        if let Op::React { .. } = &op {
            if already {
                let ack = Pending::ChangeAck {
                    conn,
                    reference: r.map(str::to_string),
                    id,
                    seq: None,
                    ts,
                    assigned: false,
                };
                return self.after_commit_or_now(ack);
            }
        }
        // Cluster mode: the database gives the change its `seq` (its log position) and every
        // node, this one included, applies and broadcasts it from the log in that order.
        let clustered = self.cluster.is_some();
        let seq = if clustered {
            0
        } else {
            match self.take_id() {
                Some(seq) => seq,
                None => {
                    return self.error(conn, ErrorCode::RateLimited, "server busy; try again", r)
                }
            }
        };
        let Some(k) = self.changes.known.get(&id) else {
            return;
        };
        let conv_key = k.conv.store_key().to_string();
        let dm_names = match &k.conv {
            Conv::Room(_) => None,
            Conv::Dm { .. } => Some((k.msg.from.clone(), k.msg.to.clone().unwrap_or_default())),
        };
        let (change, write) = match op {
            Op::Edit { text } => (
                Change::Edit {
                    text: text.clone(),
                    edited_ts: ts,
                },
                Write::EditMessage {
                    id,
                    text,
                    edited_ts: ts,
                    seq,
                    conv: conv_key.clone(),
                    dm_names: dm_names.clone(),
                },
            ),
            Op::Delete => (
                Change::Delete,
                Write::DeleteMessage {
                    id,
                    seq,
                    conv: conv_key.clone(),
                    ts,
                    dm_names: dm_names.clone(),
                },
            ),
            Op::React { emoji, on } => (
                Change::React {
                    user: user_name.clone(),
                    emoji: emoji.clone(),
                    on,
                },
                Write::SetReaction {
                    id,
                    user: user_name.clone(),
                    emoji,
                    on,
                    seq,
                    conv: conv_key.clone(),
                    ts,
                    dm_names: dm_names.clone(),
                },
            ),
            Op::Reply { .. } => return,
        };
        self.m.changes_in += 1;
        if !clustered {
            self.publish_change(id, seq, &conv_key, dm_names.as_ref(), change);
        }
        self.write(write);
        self.after_commit(Pending::ChangeAck {
            conn,
            reference: r.map(str::to_string),
            id,
            seq: (!clustered).then_some(seq),
            ts,
            assigned: clustered,
        });
        if !clustered {
            self.reserve_ids_if_low();
        }
    }

    /// Applies a change to what the hub holds of message `id` (its state for changes, the
    /// join ring) and tells every connection that can see it. A single node calls this when it
    /// accepts the change; a cluster node when the change comes back through the log, where
    /// the message may be unknown to it (then `conv_key` and `dm_names` say where it lives).
    pub(in crate::chat::core) fn publish_change(
        &mut self,
        id: i64,
        seq: i64,
        conv_key: &str,
        dm_names: Option<&(String, String)>,
        change: Change,
    ) {
        let (conv, state) = match self.changes.known.get_mut(&id) {
            Some(k) => {
                change.apply_to(&mut k.msg);
                if let Change::Edit { .. } = change {
                    k.edits += 1;
                }
                (k.conv.clone(), Some(k.msg.clone()))
            }
            None => {
                let conv = Conv::of_key(conv_key);
                let mut state = self.ring_copy(&conv, id);
                if let Some(m) = &mut state {
                    change.apply_to(m);
                }
                (conv, state)
            }
        };
        if let Some(state) = state {
            self.refresh_ring(&conv, state);
        }
        let conv_ref = match &conv {
            Conv::Room(room) => ConvRef {
                room: Some(room),
                from: None,
                to: None,
            },
            Conv::Dm { .. } => ConvRef {
                room: None,
                from: dm_names.map(|(f, _)| f.as_str()),
                to: dm_names.map(|(_, t)| t.as_str()),
            },
        };
        let json = match &change {
            Change::Edit { text, edited_ts } => ServerFrame::Edited {
                id,
                conv: conv_ref,
                text,
                edited_ts: *edited_ts,
                seq,
            },
            Change::Delete => ServerFrame::Deleted {
                id,
                conv: conv_ref,
                seq,
            },
            Change::React { user, emoji, on } => ServerFrame::Reaction {
                id,
                conv: conv_ref,
                user,
                emoji,
                on: *on,
                seq,
            },
        }
        .to_json();
        self.broadcast_to(&conv, &json);
    }

    /// A copy of message `id` from a room's join ring, if it is there.
    fn ring_copy(&self, conv: &Conv, id: i64) -> Option<ChatMessage> {
        use crate::chat::core::state::Ring;
        let Conv::Room(room) = conv else { return None };
        let rm = self.rooms.get(room)?;
        let found = match &rm.ring {
            Ring::Warm(ring) => ring.iter().find(|m| m.id == id),
            Ring::Loading(tail) => tail.iter().find(|m| m.id == id),
            Ring::Cold => None,
        };
        found.map(|m| (**m).clone())
    }

    /// A room's join ring holds the newest messages: keep a changed one up to date there.
    fn refresh_ring(&mut self, conv: &Conv, state: ChatMessage) {
        use crate::chat::core::state::Ring;
        let Conv::Room(room) = conv else { return };
        let Some(rm) = self.rooms.get_mut(room) else {
            return;
        };
        let slot = match &mut rm.ring {
            Ring::Warm(ring) => ring.iter_mut().find(|m| m.id == state.id),
            Ring::Loading(tail) => tail.iter_mut().find(|m| m.id == state.id),
            Ring::Cold => None,
        };
        if let Some(slot) = slot {
            *slot = Rc::new(state);
        }
    }

    /// Frames `json` once for every connection that can see `conv`.
    fn broadcast_to(&mut self, conv: &Conv, json: &str) {
        match conv {
            Conv::Room(room) => {
                let from = self.fx.recipients.len();
                self.append_room_fanout(room);
                self.broadcast_appended(json, false, from);
            }
            Conv::Dm { a, b, .. } => {
                let pair = [a.clone(), b.clone()];
                let n = if a == b { 1 } else { 2 };
                self.collect_conns(pair.iter().take(n), ConnId(u64::MAX));
                self.broadcast(json, false);
            }
        }
    }

    /// `catchup`: what the user would have received live after `since`.
    pub(in crate::chat::core) fn catchup(
        &mut self,
        conn: ConnId,
        key: &str,
        since: i64,
        limit: Option<u32>,
        r: Option<&str>,
    ) {
        let limit = limit.unwrap_or(DEFAULT_CATCHUP_LIMIT);
        if limit == 0 || limit > MAX_CATCHUP_LIMIT {
            return self.error(conn, ErrorCode::BadRequest, "limit must be 1-1000", r);
        }
        if !self.admit_query(conn, key, r) {
            return;
        }
        let head = self.head_seq();
        if since > head {
            // From another server, or a restored backup: nothing to continue from.
            let json = catchup_json(&[], head, false, true, r);
            return self.send_json(conn, json);
        }
        let convs = self.conversations_of(key);
        let Some(cancelled) = self.query_started(conn) else {
            return;
        };
        self.query(
            Query::Catchup {
                since,
                convs,
                limit: limit as usize,
                cancelled: Some(cancelled),
            },
            QueryWaiter::Catchup {
                conn,
                reference: r.map(str::to_string),
                since,
                head,
            },
        );
    }

    /// The store's catch-up answer, as one frame. When nothing more is left the reply's `seq`
    /// is the head as of the request: everything up to it was visible to the query, and
    /// anything after it reached this connection live.
    pub(in crate::chat::core) fn on_catchup(
        &mut self,
        conn: ConnId,
        reference: Option<String>,
        (since, head): (i64, i64),
        (items, more, reset): (Vec<ChangeItem>, bool, bool),
    ) {
        if !self.query_answered(conn) {
            return;
        }
        let r = reference.as_deref();
        if reset {
            let json = catchup_json(&[], self.head_seq(), false, true, r);
            return self.send_json(conn, json);
        }
        let events: Vec<String> = items.iter().map(render).collect();
        let seq = match items.last() {
            Some(last) if more => last.seq,
            _ => head.max(since),
        };
        let json = catchup_json(&events, seq, more, false, r);
        self.send_json(conn, json);
    }

    /// A change's write failed: memory may be ahead of the store, so look the message up again
    /// at its next change.
    pub(in crate::chat::core) fn change_failed(&mut self, id: i64) {
        self.changes.forget(id);
    }
}

/// One catch-up event as the frame it would have been live.
fn render(item: &ChangeItem) -> String {
    let msg = &item.msg;
    let conv = ConvRef::of(msg);
    match &item.kind {
        ChangeKind::Message => ServerFrame::Message(msg).to_json(),
        ChangeKind::Edited => ServerFrame::Edited {
            id: msg.id,
            conv,
            text: &msg.text,
            edited_ts: msg.edited_ts.unwrap_or(msg.ts),
            seq: item.seq,
        }
        .to_json(),
        ChangeKind::Deleted => ServerFrame::Deleted {
            id: msg.id,
            conv,
            seq: item.seq,
        }
        .to_json(),
        ChangeKind::Reaction { user, emoji, on } => ServerFrame::Reaction {
            id: msg.id,
            conv,
            user,
            emoji,
            on: *on,
            seq: item.seq,
        }
        .to_json(),
    }
}

fn catchup_json(events: &[String], seq: i64, more: bool, reset: bool, r: Option<&str>) -> String {
    let raw: Vec<Box<serde_json::value::RawValue>> = events
        .iter()
        .filter_map(|e| serde_json::value::RawValue::from_string(e.clone()).ok())
        .collect();
    ServerFrame::Catchup {
        events: raw.iter().map(|b| b.as_ref()).collect(),
        seq,
        more,
        reset,
        reference: r,
    }
    .to_json()
}
