//! `say` and `dm`: validation, retry deduplication, rate limit, id assignment, fan-out, and
//! the write whose commit releases the `ack`.

use std::rc::Rc;

use crate::chat::core::state::DedupEntry;
use crate::chat::core::{Hub, Pending, ID_RESERVE};
use crate::chat::protocol::{ChatMessage, ErrorCode, ServerFrame};
use crate::chat::store::{self, Write};
use crate::chat::validate;
use crate::service::ConnId;

impl Hub {
    /// `say` (room set) and `dm` (to set).
    #[allow(clippy::too_many_arguments)]
    pub(in crate::chat::core) fn say(
        &mut self,
        conn: ConnId,
        key: &str,
        room: Option<String>,
        to: Option<String>,
        text: String,
        r: Option<&str>,
    ) {
        let now = self.now.mono;
        let check = match (&room, &to) {
            (Some(room), _) => validate::room_name(room),
            (_, Some(to)) => validate::user_name(to),
            _ => Ok(()),
        }
        .and_then(|_| validate::text(&text, self.cfg.max_text));
        if let Err((c, m)) = check {
            return self.error(conn, c, &m, r);
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
        if !self.take_token(key, now) {
            return self.error(
                conn,
                ErrorCode::RateLimited,
                "sending too fast; message not stored",
                r,
            );
        }
        if self.next_id >= self.id_durable {
            return self.error(
                conn,
                ErrorCode::RateLimited,
                "server busy; message not stored",
                r,
            );
        }
        let id = self.next_id;
        self.next_id += 1;
        let ts = self.now.wall_ms;
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
        self.broadcast(&json, true);
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
}
