//! Replies that wait for the store: commit reports release acks, welcomes, logout closes and
//! id reservations in write order; query results complete joins and history requests.

use crate::chat::core::cmd::auth::{token_hash, ACCOUNT_DISABLED};
use crate::chat::core::{Hub, Pending, QueryWaiter};
use crate::chat::protocol::{ChatMessage, ErrorCode, ServerFrame};
use crate::chat::store::cluster::Assigned;
use crate::service::CloseCode;

impl Hub {
    /// Runs what waited for writes up to `upto`. A reply whose own write failed (in `failed`,
    /// or the whole batch when `!batch_ok`) reports `internal` instead of promising durability.
    /// Cluster mode: `assigned` gives the ids and `seq`s the store chose, and `unavailable`
    /// says a failure was the database being unreachable (replies say `unavailable`).
    pub(in crate::chat::core) fn on_committed(
        &mut self,
        upto: u64,
        batch_ok: bool,
        failed: &[u64],
        assigned: &[Assigned],
        unavailable: bool,
    ) {
        let now = self.now.mono;
        let (fail_code, fail_what) = if unavailable {
            (ErrorCode::Unavailable, "database unavailable; ")
        } else {
            (ErrorCode::Internal, "")
        };
        let given = |seq: u64| assigned.iter().find(|a| a.write == seq);
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
                    id: placeholder,
                    ts,
                    accepted,
                } => {
                    // Cluster mode: the id is the message's log position (or, for a retry
                    // the database already had, the original's id and time).
                    let (id, ts) = given(seq).map_or((placeholder, ts), |a| (a.id, a.ts));
                    let mut waiters = Vec::new();
                    if let Some(reference) = &reference {
                        if let Some(u) = self.users.get_mut(&user) {
                            if let Some(e) = u.dedup.entries.get_mut(reference) {
                                if e.id == placeholder {
                                    waiters = std::mem::take(&mut e.waiters);
                                    e.committed = ok;
                                    (e.id, e.ts) = (id, ts);
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
                            seq: None,
                        }
                        .to_json();
                        // Usually one waiter: the last one takes the string itself.
                        if let Some((last, others)) = waiters.split_last() {
                            for c in others {
                                self.send_json(*c, json.clone());
                            }
                            self.send_json(*last, json);
                        }
                    } else {
                        let msg = format!("{fail_what}message could not be stored");
                        for c in waiters {
                            self.error(c, fail_code, &msg, reference.as_deref());
                        }
                    }
                }
                Pending::Welcome {
                    conn,
                    user,
                    token,
                    reference,
                } => {
                    let hash = token_hash(&token);
                    if ok && !self.sessions.contains_key(&hash) {
                        // Revoked while it committed: an operator disabled the account or
                        // changed its password (see `cmd/accounts.rs`).
                        let disabled = self.users.get(&user).is_some_and(|u| u.disabled);
                        let (code, message) = if disabled {
                            (ErrorCode::AccountDisabled, ACCOUNT_DISABLED)
                        } else {
                            (ErrorCode::AuthFailed, "session revoked")
                        };
                        if self.conns.contains_key(&conn) {
                            self.auth_failed(conn, code, message, reference.as_deref());
                        }
                    } else if ok {
                        self.authenticate(conn, &user, &token, reference.as_deref());
                    } else {
                        self.forget_session(&user, hash);
                        let msg = format!("{fail_what}could not store the session");
                        self.auth_failed(conn, fail_code, &msg, reference.as_deref());
                    }
                }
                Pending::Close { conns } => {
                    for c in conns {
                        self.close(c, CloseCode::Normal, "logged out");
                    }
                }
                Pending::Account {
                    conn,
                    key,
                    phc,
                    reference,
                } => {
                    if !ok {
                        self.account_not_stored(conn, key, &phc, reference);
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
                Pending::ChangeAck {
                    conn,
                    reference,
                    id,
                    seq: change_seq,
                    ts,
                    assigned: from_store,
                } => {
                    let seq = if from_store {
                        given(seq).map(|a| a.id)
                    } else {
                        change_seq
                    };
                    if ok {
                        let ack = ServerFrame::Ack {
                            reference: reference.as_deref(),
                            id,
                            ts,
                            seq,
                        };
                        self.send(conn, &ack);
                    } else {
                        self.change_failed(id);
                        let msg = format!("{fail_what}change could not be stored");
                        self.error(conn, fail_code, &msg, reference.as_deref());
                    }
                }
            }
        }
    }

    pub(in crate::chat::core) fn on_query(
        &mut self,
        qid: u64,
        messages: Vec<ChatMessage>,
        more: bool,
    ) {
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
                    self.send_joined(conn, &room, reference.as_deref());
                    self.unblock(conn);
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
                if !self.query_answered(conn) {
                    return; // closed meanwhile (the store skipped it if it could)
                }
                let json = ServerFrame::History {
                    room: room.as_deref(),
                    with: with.as_deref(),
                    messages: messages.iter().collect(),
                    more,
                    reference: reference.as_deref(),
                }
                .to_json();
                self.send_json(conn, json);
            }
            // Answered by their own store events.
            Some(
                QueryWaiter::Lookup { .. }
                | QueryWaiter::Catchup { .. }
                | QueryWaiter::Welcome { .. }
                | QueryWaiter::Search { .. },
            )
            | None => {}
        }
    }
}
