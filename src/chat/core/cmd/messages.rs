//! `say` and `dm`: validation, retry deduplication, rate limit, id assignment, fan-out, and
//! the write whose commit releases the `ack`.

use std::rc::Rc;

use crate::chat::core::cmd::changes::Conv;
use crate::chat::core::state::DedupEntry;
use crate::chat::core::{Hub, Pending, ID_RESERVE, NOBODY};
use crate::chat::protocol::{ChatMessage, ErrorCode, ServerFrame};
use crate::chat::store::{self, Write};
use crate::chat::validate;
use crate::service::ConnId;

impl Hub {
    /// `say` (room set) and `dm` (to set). With `reply_to`, the message replied to must be of
    /// the same conversation; if the hub does not know it, the say waits for its lookup.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::chat::core) fn say(
        &mut self,
        conn: ConnId,
        key: &str,
        room: Option<String>,
        to: Option<String>,
        text: String,
        reply_to: Option<i64>,
        r: Option<&str>,
    ) {
        if let Some(rt) = reply_to {
            let conv = match (&room, &to) {
                (Some(room), _) => Conv::Room(room.clone()),
                (_, to) => {
                    let tk = validate::user_key(to.as_deref().unwrap_or_default());
                    Conv::Dm {
                        pair: store::dm_key(key, &tk),
                        a: key.to_string(),
                        b: tk,
                    }
                }
            };
            match self.check_reply(conn, key, rt, &conv, &room, &to, &text, r) {
                Some(true) => {}
                Some(false) => {
                    return self.error(
                        conn,
                        ErrorCode::BadRequest,
                        "reply_to: no such message in this conversation",
                        r,
                    )
                }
                None => return, // continues in `say_checked` once the message is looked up
            }
        }
        self.say_checked(conn, key, room, to, text, reply_to, r);
    }

    /// `say`/`dm` once `reply_to` (if any) is known to be of the same conversation.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::chat::core) fn say_checked(
        &mut self,
        conn: ConnId,
        key: &str,
        room: Option<String>,
        to: Option<String>,
        text: String,
        reply_to: Option<i64>,
        r: Option<&str>,
    ) {
        let check = match (&room, &to) {
            (Some(room), _) => validate::room_name(room),
            (_, Some(to)) => validate::user_name(to),
            _ => Ok(()),
        }
        .and_then(|_| validate::text(&text, self.cfg.max_text));
        if let Err((c, m)) = check {
            return self.error(conn, c, &m, r);
        }
        if r.is_some_and(|reference| self.answer_retry(conn, key, reference)) {
            return;
        }
        let to_key = match &to {
            Some(to) => {
                let k = validate::user_key(to);
                if !self.users.contains_key(&k) {
                    return self.error(conn, ErrorCode::NoSuchUser, "no such user", r);
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
                return self.error(conn, ErrorCode::NotMember, "not a member", r);
            }
        }
        if !self.take_token(key, self.now.mono) {
            return self.error(
                conn,
                ErrorCode::RateLimited,
                "sending too fast; message not stored",
                r,
            );
        }
        // Cluster mode: the message is stored with id 0 and the database numbers it (its log
        // position). Nothing is broadcast here: every node, this one included, delivers it
        // when it comes through the log, so all see one order. The ack waits for the commit
        // report, which carries the id.
        let clustered = self.cluster.is_some();
        let id = if clustered {
            0
        } else {
            let Some(id) = self.take_id() else {
                return self.error(
                    conn,
                    ErrorCode::RateLimited,
                    "server busy; message not stored",
                    r,
                );
            };
            id
        };
        let u = &self.users[key];
        let msg = Rc::new(ChatMessage {
            id,
            room,
            from: u.name.clone(),
            to: to_key.as_ref().map(|k| self.users[k].name.clone()),
            nick: u.nick.clone(),
            text,
            ts: self.now.wall_ms,
            reply_to,
            ..ChatMessage::default()
        });
        self.m.messages_in += 1;
        let dm = if clustered {
            to_key.map(|tk| {
                self.note_dm_pair(key, &tk);
                store::dm_key(key, &tk)
            })
        } else {
            let Some(dm) = self.deliver(key, &msg, to_key.as_deref()) else {
                return;
            };
            dm
        };
        self.record(conn, key, r, msg, dm);
    }

    /// Cluster mode: a message from the log (any node's, this one's too), delivered to this
    /// node's connections in log order. A remote sender's `ref` is remembered, so a retry that
    /// reaches this node gets the original ack.
    pub(in crate::chat::core) fn deliver_logged(
        &mut self,
        msg: ChatMessage,
        sender: &str,
        reference: Option<String>,
        own: bool,
    ) {
        let msg = Rc::new(msg);
        let to_key = msg.to.as_deref().map(validate::user_key);
        if let (false, Some(reference)) = (own, reference) {
            let (max, now) = (self.cfg.dedup_max_refs, self.now.mono);
            if let Some(u) = self.users.get_mut(sender) {
                if !u.dedup.entries.contains_key(&reference) {
                    let entry = DedupEntry {
                        at: now,
                        id: msg.id,
                        ts: msg.ts,
                        committed: true,
                        waiters: Vec::new(),
                    };
                    u.dedup.insert(reference, entry, max);
                    self.dedup_users.insert(sender.to_string());
                }
            }
        }
        let json = ServerFrame::Message(&msg).to_json();
        match (&msg.room, to_key) {
            (Some(room), _) => {
                let cap = self.cfg.history_on_join;
                let Some(rm) = self.rooms.get_mut(room) else {
                    return;
                };
                rm.remember(&msg, cap);
                let from = self.fx.recipients.len();
                self.append_room_fanout(room);
                self.broadcast_appended(&json, true, from);
            }
            (None, Some(tk)) => {
                let pair = [sender.to_string(), tk.clone()];
                let n = if tk == sender { 1 } else { 2 };
                self.collect_conns(pair.iter().take(n), NOBODY);
                self.broadcast(&json, true);
                self.partners_in_memory(sender, &tk);
            }
            _ => {}
        }
    }

    /// Two users have a DM conversation (memory only: the store has it from whoever wrote it).
    pub(in crate::chat::core) fn partners_in_memory(&mut self, a: &str, b: &str) {
        if let Some(u) = self.users.get_mut(a) {
            u.dm_partners.insert(b.to_string());
        }
        if let Some(u) = self.users.get_mut(b) {
            u.dm_partners.insert(a.to_string());
        }
    }

    /// A retry of a ref seen within `--dedup-window` gets the original ack (now, or when the
    /// original commits) and nothing else. Returns whether `reference` was such a retry.
    fn answer_retry(&mut self, conn: ConnId, key: &str, reference: &str) -> bool {
        let window = self.cfg.dedup_window;
        let now = self.now.mono;
        let Some(e) = self
            .users
            .get_mut(key)
            .and_then(|u| u.dedup.entries.get_mut(reference))
            .filter(|e| now.saturating_duration_since(e.at) < window)
        else {
            return false;
        };
        if e.committed {
            let (id, ts) = (e.id, e.ts);
            let ack = ServerFrame::Ack {
                reference: Some(reference),
                id,
                ts,
                seq: None,
            };
            self.send(conn, &ack);
        } else if !e.waiters.contains(&conn) {
            e.waiters.push(conn);
        }
        true
    }

    /// Broadcasts an accepted message to its room's connections (from the room's cached list)
    /// or to both sides of the DM, and puts it in the room's ring. Returns the DM pair key for
    /// the store (`Some(None)` for a room message), `None` if the room vanished.
    fn deliver(
        &mut self,
        key: &str,
        msg: &Rc<ChatMessage>,
        to_key: Option<&str>,
    ) -> Option<Option<String>> {
        let json = ServerFrame::Message(msg).to_json();
        let dm = match (&msg.room, to_key) {
            (Some(room), _) => {
                let cap = self.cfg.history_on_join;
                let rm = self.rooms.get_mut(room)?;
                rm.remember(msg, cap);
                let from = self.fx.recipients.len();
                self.append_room_fanout(room);
                self.broadcast_appended(&json, true, from);
                None
            }
            (None, Some(tk)) => {
                let pair = [key.to_string(), tk.to_string()];
                self.collect_conns(pair.iter().take(if tk == key { 1 } else { 2 }), NOBODY);
                self.broadcast(&json, true);
                self.note_dm_pair(key, tk);
                Some(store::dm_key(key, tk))
            }
            _ => return None,
        };
        Some(dm)
    }

    /// Remembers (and stores) that two users have a DM conversation, for nick broadcasts.
    fn note_dm_pair(&mut self, key: &str, tk: &str) {
        let is_new = self
            .users
            .get(key)
            .is_some_and(|u| !u.dm_partners.contains(tk));
        if !is_new {
            return;
        }
        if let Some(u) = self.users.get_mut(key) {
            u.dm_partners.insert(tk.to_string());
        }
        if let Some(u) = self.users.get_mut(tk) {
            u.dm_partners.insert(key.to_string());
        }
        let (a, b) = if key <= tk { (key, tk) } else { (tk, key) };
        self.write(Write::AddDmPair {
            a: a.to_string(),
            b: b.to_string(),
        });
    }

    /// Stores a broadcast message: the write (with its ref, for dedup after a restart), the
    /// ack once it commits, the ref in memory, and a new id reservation when half is used.
    fn record(
        &mut self,
        conn: ConnId,
        key: &str,
        r: Option<&str>,
        msg: Rc<ChatMessage>,
        dm: Option<String>,
    ) {
        let now = self.now.mono;
        let msg = Rc::try_unwrap(msg).unwrap_or_else(|rc| (*rc).clone());
        let (id, ts) = (msg.id, msg.ts);
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
                let entry = DedupEntry {
                    at: now,
                    id,
                    ts,
                    committed: false,
                    waiters: Vec::new(),
                };
                u.dedup.insert(reference.to_string(), entry, max);
                self.dedup_users.insert(key.to_string());
            }
        }
        self.reserve_ids_if_low();
    }

    /// The newest id or `seq` handed out: what `welcome.seq` and catch-up report as the head.
    /// In cluster mode, the newest log position this node has applied.
    pub(in crate::chat::core) fn head_seq(&self) -> i64 {
        match &self.cluster {
            Some(c) => c.log_pos,
            None => self.next_id - 1,
        }
    }

    /// The next number of the one sequence of message ids and change `seq`s, if the durable
    /// reservation covers it (else the caller answers "busy" until it does).
    pub(in crate::chat::core) fn take_id(&mut self) -> Option<i64> {
        if self.next_id >= self.id_durable {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        Some(id)
    }

    /// Persists a new id reservation when half of the current one is used.
    pub(in crate::chat::core) fn reserve_ids_if_low(&mut self) {
        if self.cluster.is_some() {
            return; // the database numbers messages and changes
        }
        if self.next_id + ID_RESERVE / 2 > self.id_requested {
            self.id_requested = self.next_id + ID_RESERVE;
            let upto = self.id_requested;
            self.write(Write::ReserveIds { upto });
            self.after_commit(Pending::Reserved { upto });
        }
    }

    /// Appends the connections a message to `room` goes to, from the room's cached list. The
    /// recipients of a room change rarely and its messages often: the list is rebuilt (a hash
    /// lookup per member) only when membership changed since.
    pub(in crate::chat::core) fn append_room_fanout(&mut self, room: &str) {
        let Some(rm) = self.rooms.get_mut(room) else {
            return;
        };
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
        self.fx.recipients.extend_from_slice(&rm.fanout);
    }
}
