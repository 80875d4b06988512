//! Every [`Query`] of the store, ported from `sqlite.rs` with the same results: statements
//! prepared once per connection ([`Reads::prepare`]), run inside the writer's batch
//! transaction after the writes before them.

use std::sync::atomic::Ordering;

use postgres::{Client, Statement};

use super::schema::{user_of, USER_COLS};
use crate::chat::protocol::ChatMessage;
use crate::chat::store::{
    ChangeItem, ChangeKind, LoadedUser, Query, SearchQuery, StoreEvent, StoredMessage, Target,
    Unread, UnreadQuery, MAX_UNREAD,
};

/// `events.kind` (as in SQLite).
pub(crate) const EV_EDITED: i16 = 1;
pub(crate) const EV_DELETED: i16 = 2;
pub(crate) const EV_REACTION: i16 = 3;

/// `meta` key: the highest `seq` of a pruned change event (catch-up from before it resets).
pub(crate) const EVENTS_HORIZON: &str = "events_horizon";

/// The message columns [`msg_of`] reads, in its order.
const COLS: &str = "id, room, from_name, to_name, nick, text, ts, reply_to, edited_ts, deleted";

fn qualified(cols: &str, table: &str) -> String {
    cols.split(", ")
        .map(|c| format!("{table}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn msg_of(r: &postgres::Row) -> ChatMessage {
    ChatMessage {
        id: r.get(0),
        room: r.get(1),
        from: r.get(2),
        to: r.get(3),
        nick: r.get(4),
        text: r.get(5),
        ts: r.get(6),
        reply_to: r.get(7),
        edited_ts: r.get(8),
        deleted: r.get(9),
        reactions: Vec::new(),
    }
}

/// The read statements, prepared on one connection.
pub(crate) struct Reads {
    back_room: Statement,
    back_dm: Statement,
    fwd_room: Statement,
    fwd_dm: Statement,
    ring: Statement,
    reactions: Statement,
    find: Statement,
    unread_room: Statement,
    unread_dm: Statement,
    horizon: Statement,
    catchup_msgs: Statement,
    catchup_events: Statement,
    search: Statement,
    user: Statement,
}

impl Reads {
    pub(crate) fn prepare(c: &mut Client) -> Result<Reads, postgres::Error> {
        let back = |col: &str| {
            format!(
                "SELECT {COLS} FROM messages WHERE {col} = $1 AND id < $2
                 ORDER BY id DESC LIMIT $3"
            )
        };
        let fwd = |col: &str| {
            format!(
                "SELECT {COLS} FROM messages WHERE {col} = $1 AND id > $2 AND id < $3
                 ORDER BY id ASC LIMIT $4"
            )
        };
        let unread = |col: &str| {
            format!(
                "SELECT text FROM messages WHERE {col} = $1 AND id > $2 AND from_name <> $3
                 AND NOT deleted ORDER BY id LIMIT $4"
            )
        };
        let m = qualified(COLS, "m");
        Ok(Reads {
            back_room: c.prepare(&back("room"))?,
            back_dm: c.prepare(&back("dm"))?,
            fwd_room: c.prepare(&fwd("room"))?,
            fwd_dm: c.prepare(&fwd("dm"))?,
            ring: c.prepare(&format!(
                "SELECT {COLS} FROM messages WHERE room = $1 AND id <= $2
                 ORDER BY id DESC LIMIT $3"
            ))?,
            reactions: c.prepare(
                "SELECT msg_id, emoji, user_name FROM reactions
                 WHERE msg_id BETWEEN $1 AND $2 ORDER BY seq",
            )?,
            find: c.prepare(&format!(
                "SELECT {COLS}, dm, edits FROM messages WHERE id = $1"
            ))?,
            unread_room: c.prepare(&unread("room"))?,
            unread_dm: c.prepare(&unread("dm"))?,
            horizon: c.prepare("SELECT v FROM meta WHERE k = $1")?,
            catchup_msgs: c.prepare(&format!(
                "SELECT {COLS} FROM messages
                 WHERE id > $1 AND (room = ANY($2) OR dm = ANY($2))
                 ORDER BY id LIMIT $3"
            ))?,
            catchup_events: c.prepare(&format!(
                "SELECT {m}, e.seq, e.kind, e.user_name, e.emoji, e.on_
                 FROM events e JOIN messages m ON m.id = e.msg_id
                 WHERE e.seq > $1 AND e.conv = ANY($2)
                 ORDER BY e.seq LIMIT $3"
            ))?,
            // The GIN index finds the matches; they are ordered by id (newest first) and cut
            // at the limit.
            search: c.prepare(&format!(
                "SELECT {m} FROM messages m
                 WHERE m.fts @@ to_tsquery('simple', $1) AND m.id < $2
                   AND (m.room = ANY($3) OR m.dm = ANY($3))
                   AND NOT m.deleted AND ($4::text IS NULL OR lower(m.from_name) = lower($4))
                 ORDER BY m.id DESC LIMIT $5"
            ))?,
            user: c.prepare(&format!("SELECT {USER_COLS} FROM users WHERE key = $1"))?,
        })
    }

    /// One user's row as it is now (`None`: no such account).
    pub(crate) fn load_user(
        &self,
        c: &mut Client,
        key: &str,
    ) -> Result<Option<LoadedUser>, postgres::Error> {
        Ok(c.query_opt(&self.user, &[&key])?.map(|r| user_of(&r, 0)))
    }

    /// Runs a query into the event that answers it. A statement error is returned (the
    /// caller decides between a lost connection and a failed statement).
    pub(crate) fn answer(
        &self,
        c: &mut Client,
        qid: u64,
        q: &Query,
    ) -> Result<StoreEvent, postgres::Error> {
        if is_cancelled(q) {
            return Ok(unanswered(qid, q, false));
        }
        Ok(match q {
            Query::LoadRing { room, limit, upto } => {
                let rows = c.query(
                    &self.ring,
                    &[room, &upto.unwrap_or(i64::MAX), &(*limit as i64 + 1)],
                )?;
                let mut out: Vec<ChatMessage> = rows.iter().map(msg_of).collect();
                let more = out.len() > *limit;
                out.truncate(*limit);
                out.reverse();
                self.attach_reactions(c, &mut out)?;
                StoreEvent::QueryDone {
                    qid,
                    messages: out,
                    more,
                }
            }
            Query::History {
                target,
                before,
                after,
                limit,
                ..
            } => {
                let (messages, more) = self.history(c, target, *before, *after, *limit)?;
                StoreEvent::QueryDone {
                    qid,
                    messages,
                    more,
                }
            }
            Query::Message { id } => StoreEvent::MessageFound {
                qid,
                found: self.find_message(c, *id)?,
            },
            Query::Unread { user, names, convs } => StoreEvent::UnreadDone {
                qid,
                counts: self.unread(c, user, names, convs)?,
            },
            Query::Search { search, .. } => {
                let (results, more) = self.search(c, search)?;
                StoreEvent::SearchDone { qid, results, more }
            }
            Query::Catchup {
                since,
                convs,
                limit,
                ..
            } => {
                let (items, more, reset) = self.catchup(c, *since, convs, *limit)?;
                StoreEvent::CatchupDone {
                    qid,
                    items,
                    more,
                    reset,
                }
            }
        })
    }

    /// History paging: messages oldest first and whether more exist in the paging
    /// direction (fetches `limit + 1` rows so `more` costs no second query).
    fn history(
        &self,
        c: &mut Client,
        target: &Target,
        before: Option<i64>,
        after: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<ChatMessage>, bool), postgres::Error> {
        let (dm, key) = match target {
            Target::Room(r) => (false, r),
            Target::Dm(k) => (true, k),
        };
        let before = before.unwrap_or(i64::MAX);
        let fetch = limit as i64 + 1;
        let mut out: Vec<ChatMessage> = if let Some(after) = after {
            // Forward paging: the oldest `limit` after `after`.
            let st = if dm { &self.fwd_dm } else { &self.fwd_room };
            c.query(st, &[key, &after, &before, &fetch])?
                .iter()
                .map(msg_of)
                .collect()
        } else {
            // Backward paging: the newest `limit` before `before`.
            let st = if dm { &self.back_dm } else { &self.back_room };
            c.query(st, &[key, &before, &fetch])?
                .iter()
                .map(msg_of)
                .collect()
        };
        let more = out.len() > limit;
        out.truncate(limit);
        if after.is_none() {
            out.reverse();
        }
        self.attach_reactions(c, &mut out)?;
        Ok((out, more))
    }

    /// Fills in the reactions of `msgs` (ordered by id): emoji in the order of their earliest
    /// current reaction, users in the order they reacted.
    fn attach_reactions(
        &self,
        c: &mut Client,
        msgs: &mut [ChatMessage],
    ) -> Result<(), postgres::Error> {
        let (Some(first), Some(last)) = (msgs.first(), msgs.last()) else {
            return Ok(());
        };
        let (lo, hi) = (first.id.min(last.id), first.id.max(last.id));
        for r in c.query(&self.reactions, &[&lo, &hi])? {
            let (id, emoji, user): (i64, String, String) = (r.get(0), r.get(1), r.get(2));
            if let Some(m) = msgs.iter_mut().find(|m| m.id == id) {
                m.set_reaction(&user, &emoji, true);
            }
        }
        Ok(())
    }

    fn find_message(
        &self,
        c: &mut Client,
        id: i64,
    ) -> Result<Option<StoredMessage>, postgres::Error> {
        let Some(r) = c.query_opt(&self.find, &[&id])? else {
            return Ok(None);
        };
        let mut found = StoredMessage {
            msg: msg_of(&r),
            dm: r.get(10),
            edits: r.get::<_, i32>(11) as u32,
        };
        self.attach_reactions(c, std::slice::from_mut(&mut found.msg))?;
        Ok(Some(found))
    }

    /// Unread messages (by others, not deleted) after each read marker, and the mentions
    /// among them; reads at most `MAX_UNREAD + 1` rows per conversation.
    fn unread(
        &self,
        c: &mut Client,
        user: &str,
        names: &[String],
        convs: &[UnreadQuery],
    ) -> Result<Vec<Unread>, postgres::Error> {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut out = Vec::with_capacity(convs.len());
        for q in convs {
            let st = if q.dm {
                &self.unread_dm
            } else {
                &self.unread_room
            };
            let mut counts = Unread::default();
            let cap = i64::from(MAX_UNREAD) + 1;
            for r in c.query(st, &[&q.conv, &q.read, &user, &cap])? {
                let text: String = r.get(0);
                counts.unread += 1;
                if q.dm || crate::chat::search::mentions(&text, &names) {
                    counts.mentions += 1;
                }
            }
            counts.unread = counts.unread.min(MAX_UNREAD);
            counts.mentions = counts.mentions.min(MAX_UNREAD);
            out.push(counts);
        }
        Ok(out)
    }

    /// Full-text search in the given conversations, newest first.
    fn search(
        &self,
        c: &mut Client,
        q: &SearchQuery,
    ) -> Result<(Vec<ChatMessage>, bool), postgres::Error> {
        let Some(tsq) = super::search::tsquery(&q.fts) else {
            return Ok((Vec::new(), false));
        };
        let before = q.before.unwrap_or(i64::MAX);
        let fetch = q.limit as i64 + 1;
        let mut out: Vec<ChatMessage> = c
            .query(&self.search, &[&tsq, &before, &q.convs, &q.from, &fetch])?
            .iter()
            .map(msg_of)
            .collect();
        let more = out.len() > q.limit;
        out.truncate(q.limit);
        out.reverse();
        self.attach_reactions(c, &mut out)?;
        out.reverse();
        Ok((out, more))
    }

    /// New messages and change events after `since` in `convs`, merged in `seq` order, at
    /// most `limit`; messages in their current state. Returns (items, more, reset).
    fn catchup(
        &self,
        c: &mut Client,
        since: i64,
        convs: &[String],
        limit: usize,
    ) -> Result<(Vec<ChangeItem>, bool, bool), postgres::Error> {
        let horizon: i64 = c
            .query_opt(&self.horizon, &[&EVENTS_HORIZON])?
            .map_or(0, |r| r.get(0));
        if since < horizon {
            return Ok((Vec::new(), false, true));
        }
        let fetch = limit as i64 + 1;
        let msgs: Vec<ChatMessage> = c
            .query(&self.catchup_msgs, &[&since, &convs, &fetch])?
            .iter()
            .map(msg_of)
            .collect();
        let mut changes = Vec::new();
        for r in c.query(&self.catchup_events, &[&since, &convs, &fetch])? {
            let msg = msg_of(&r);
            let seq: i64 = r.get(10);
            let kind: i16 = r.get(11);
            let user: Option<String> = r.get(12);
            let emoji: Option<String> = r.get(13);
            let on: Option<bool> = r.get(14);
            let kind = match kind {
                EV_EDITED => ChangeKind::Edited,
                EV_DELETED => ChangeKind::Deleted,
                _ => ChangeKind::Reaction {
                    user: user.unwrap_or_default(),
                    emoji: emoji.unwrap_or_default(),
                    on: on.unwrap_or(false),
                },
            };
            // A deleted message's earlier edits and reactions are left out (its `deleted`
            // event says all there is).
            if msg.deleted && kind != ChangeKind::Deleted {
                continue;
            }
            changes.push(ChangeItem { seq, kind, msg });
        }
        let mut items = Vec::with_capacity(limit + 1);
        let (mut a, mut b) = (msgs.into_iter().peekable(), changes.into_iter().peekable());
        loop {
            let take_msg = match (a.peek(), b.peek()) {
                (Some(m), Some(c)) => m.id < c.seq,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            if take_msg {
                let msg = a.next().expect("peeked");
                items.push(ChangeItem {
                    seq: msg.id,
                    kind: ChangeKind::Message,
                    msg,
                });
            } else {
                items.push(b.next().expect("peeked"));
            }
            if items.len() > limit {
                break;
            }
        }
        let more = items.len() > limit;
        items.truncate(limit);
        let mut with_reactions: Vec<ChatMessage> = items
            .iter()
            .filter(|i| i.kind == ChangeKind::Message && !i.msg.deleted)
            .map(|i| i.msg.clone())
            .collect();
        self.attach_reactions(c, &mut with_reactions)?;
        for it in items.iter_mut().filter(|i| i.kind == ChangeKind::Message) {
            if let Some(m) = with_reactions.iter_mut().find(|m| m.id == it.msg.id) {
                it.msg.reactions = std::mem::take(&mut m.reactions);
            }
        }
        Ok((items, more, false))
    }
}

fn is_cancelled(q: &Query) -> bool {
    match q {
        Query::History {
            cancelled: Some(c), ..
        }
        | Query::Catchup {
            cancelled: Some(c), ..
        }
        | Query::Search {
            cancelled: Some(c), ..
        } => c.load(Ordering::Relaxed),
        _ => false,
    }
}

/// The empty answer to a query that was cancelled or could not run. A catch-up that could not
/// run says `reset` (the client must not think it is up to date); a cancelled one does not
/// matter (nobody reads it).
pub(crate) fn unanswered(qid: u64, q: &Query, failed: bool) -> StoreEvent {
    match q {
        Query::LoadRing { .. } | Query::History { .. } => StoreEvent::QueryDone {
            qid,
            messages: Vec::new(),
            more: false,
        },
        Query::Message { .. } => StoreEvent::MessageFound { qid, found: None },
        Query::Unread { convs, .. } => StoreEvent::UnreadDone {
            qid,
            counts: vec![Unread::default(); convs.len()],
        },
        Query::Search { .. } => StoreEvent::SearchDone {
            qid,
            results: Vec::new(),
            more: false,
        },
        Query::Catchup { .. } => StoreEvent::CatchupDone {
            qid,
            items: Vec::new(),
            more: false,
            reset: failed,
        },
    }
}
