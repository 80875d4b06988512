//! The writer thread: one transaction per batch of the loop's requests, under the `log_head`
//! row lock, which makes log positions gap-free and in commit order (see
//! [`crate::chat::store::cluster`]).
//!
//! Per batch: `BEGIN` and `SELECT pos FROM log_head FOR UPDATE` (one round trip); the writes
//! in order, each logged one taking the next position (a message's id, a change's seq);
//! consecutive messages go in as one statement (`unnest` arrays) after one look-up of their
//! dedup refs; queries run where they stand, seeing the writes before them; then one
//! statement appends every log row, moves the head and notifies the bus of every node; then
//! `COMMIT`. The head lock is held from the first statement to the commit, so the number of
//! round trips in between is what bounds the cluster's write rate.
//!
//! A statement that fails on its own (not a lost connection) rolls the batch back, and the
//! batch runs again with a savepoint around each write, so one bad row fails only its own
//! write. A lost connection fails the batch as `unavailable`; the thread reconnects with
//! backoff, failing batches at once meanwhile. A `COMMIT` whose answer was lost may have
//! committed: that batch is reported failed although its entries reach every node through the
//! log — which is why messages carry dedup refs: the client's retry finds the original.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::{Client, SimpleQueryMessage, Statement};

use super::query::{unanswered, Reads, EVENTS_HORIZON, EV_DELETED, EV_EDITED, EV_REACTION};
use super::{describe, is_connection_loss, Backoff, Metrics, Target};
use crate::chat::protocol::ChatMessage;
use crate::chat::store::cluster::{Assigned, LogEvent, LogMessage, NodeId};
use crate::chat::store::{next_batch, Query, StoreEvent, StoreReq, UserChange, Write};
use crate::chat::Wake;

/// While a connection is being made in the background, how often the idle writer looks
/// whether it is ready.
const CONNECT_POLL: Duration = Duration::from_millis(20);

/// Appends log rows (`$1` positions, `$2` origin, `$3` bodies), moves the head to `$4` and
/// notifies the bus of every node (payload `$5`, the new head), in one statement.
pub(crate) const APPEND: &str = "
WITH l AS (
    INSERT INTO log (pos, origin, body)
    SELECT u.pos, $2, u.body FROM unnest($1::bigint[], $3::text[]) AS u(pos, body)
), h AS (
    UPDATE log_head SET pos = $4
)
SELECT pg_notify('parlor_log', $5::text)";

/// Starts a transaction and takes the head lock in one round trip; returns the head.
pub(crate) fn begin_locked(c: &mut Client) -> Result<i64, postgres::Error> {
    let msgs = c.simple_query("BEGIN; SELECT pos FROM log_head FOR UPDATE")?;
    for m in msgs {
        if let SimpleQueryMessage::Row(r) = m {
            if let Some(p) = r.get(0).and_then(|s| s.parse().ok()) {
                return Ok(p);
            }
        }
    }
    // No head row: the schema is damaged. Roll back and surface it as the error of a
    // statement that expects the row.
    c.batch_execute("ROLLBACK")?;
    match c.query_one("SELECT pos FROM log_head WHERE false", &[]) {
        Err(e) => Err(e),
        Ok(_) => unreachable!("WHERE false returned a row"),
    }
}

/// Appends `rows` (position, JSON body) from `origin`; `head` is the last position.
pub(crate) fn append<S: postgres::ToStatement + ?Sized>(
    c: &mut Client,
    stmt: &S,
    origin: &str,
    rows: &[(i64, String)],
    head: i64,
) -> Result<(), postgres::Error> {
    let pos: Vec<i64> = rows.iter().map(|r| r.0).collect();
    let body: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    c.execute(stmt, &[&pos, &origin, &body, &head, &head.to_string()])
        .map(|_| ())
}

/// The JSON body of a log event.
pub(crate) fn body(ev: &LogEvent) -> String {
    serde_json::to_string(ev).unwrap_or_else(|e| {
        log::error!("store: serializing a log event: {e}");
        "{}".into()
    })
}

/// The write statements, prepared on one connection.
struct Writes {
    dedup_find: Statement,
    insert_msgs: Statement,
    append: Statement,
    insert_user: Statement,
    insert_session: Statement,
    delete_session: Statement,
    delete_user_sessions: Statement,
    touch_session: Statement,
    insert_room: Statement,
    add_member: Statement,
    remove_member: Statement,
    prune_dedup: Statement,
    set_nick: Statement,
    set_last_seen: Statement,
    add_dm_pair: Statement,
    edit: Statement,
    delete: Statement,
    react_on: Statement,
    react_off: Statement,
    set_read: Statement,
    set_notify: Statement,
    presence_on: Statement,
    presence_off: Statement,
}

impl Writes {
    fn prepare(c: &mut Client) -> Result<Writes, postgres::Error> {
        Ok(Writes {
            dedup_find: c.prepare(
                "SELECT d.user_key, d.ref, d.id, d.ts FROM dedup d
                 JOIN unnest($1::text[], $2::text[]) AS u(k, r) ON d.user_key = u.k AND d.ref = u.r",
            )?,
            insert_msgs: c.prepare(
                "WITH m AS (
                    INSERT INTO messages
                        (id, room, dm, from_name, to_name, nick, text, ts, reply_to, fts)
                    SELECT u.id, u.room, u.dm, u.f, u.t, u.n, u.x, u.ts, u.r,
                           to_tsvector('simple', u.s)
                    FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                                $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::text[])
                         AS u(id, room, dm, f, t, n, x, ts, r, s)
                 )
                 INSERT INTO dedup (user_key, ref, id, ts)
                 SELECT * FROM unnest($11::text[], $12::text[], $13::bigint[], $14::bigint[])
                 ON CONFLICT (user_key, ref) DO NOTHING",
            )?,
            append: c.prepare(APPEND)?,
            // Never overwrite: an account made meanwhile (another node, `parlor user add`)
            // makes this write fail, and the hub reloads the row.
            insert_user: c.prepare(
                "INSERT INTO users (key, name, nick, phc, created) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (key) DO NOTHING",
            )?,
            insert_session: c.prepare(
                "INSERT INTO sessions (hash, user_key, created) VALUES ($1, $2, $3)
                 ON CONFLICT (hash) DO UPDATE SET user_key = excluded.user_key,
                     created = excluded.created, last_used = NULL",
            )?,
            delete_session: c.prepare("DELETE FROM sessions WHERE hash = $1")?,
            delete_user_sessions: c.prepare("DELETE FROM sessions WHERE user_key = $1")?,
            touch_session: c.prepare("UPDATE sessions SET last_used = $2 WHERE hash = $1")?,
            insert_room: c.prepare(
                "INSERT INTO rooms (name, created) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )?,
            add_member: c.prepare(
                "INSERT INTO members (room, user_key) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )?,
            remove_member: c.prepare("DELETE FROM members WHERE room = $1 AND user_key = $2")?,
            prune_dedup: c.prepare("DELETE FROM dedup WHERE ts < $1")?,
            set_nick: c.prepare("UPDATE users SET nick = $2 WHERE key = $1")?,
            set_last_seen: c.prepare("UPDATE users SET last_seen = $2 WHERE key = $1")?,
            add_dm_pair: c.prepare(
                "INSERT INTO dm_pairs (a, b) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )?,
            // The old text goes to the edit history (the CTEs all read the snapshot from
            // before the update).
            edit: c.prepare(&format!(
                "WITH h AS (
                    INSERT INTO edits (msg_id, text, ts)
                    SELECT id, text, COALESCE(edited_ts, ts) FROM messages WHERE id = $1
                 ), u AS (
                    UPDATE messages SET text = $2, edited_ts = $3, edits = edits + 1,
                        fts = to_tsvector('simple', $4) WHERE id = $1
                 )
                 INSERT INTO events (seq, conv, kind, msg_id, ts)
                 VALUES ($5, $6, {EV_EDITED}, $1, $3)"
            ))?,
            // The text, its search words, history and reactions are gone for good.
            delete: c.prepare(&format!(
                "WITH u AS (
                    UPDATE messages SET text = '', deleted = true, fts = ''::tsvector
                    WHERE id = $1
                 ), e AS (
                    DELETE FROM edits WHERE msg_id = $1
                 ), r AS (
                    DELETE FROM reactions WHERE msg_id = $1
                 )
                 INSERT INTO events (seq, conv, kind, msg_id, ts) VALUES ($2, $3, {EV_DELETED}, $1, $4)"
            ))?,
            react_on: c.prepare(&format!(
                "WITH r AS (
                    INSERT INTO reactions (msg_id, emoji, user_name, seq) VALUES ($1, $2, $3, $4)
                    ON CONFLICT DO NOTHING
                 )
                 INSERT INTO events (seq, conv, kind, msg_id, user_name, emoji, on_, ts)
                 VALUES ($4, $5, {EV_REACTION}, $1, $3, $2, true, $6)"
            ))?,
            react_off: c.prepare(&format!(
                "WITH r AS (
                    DELETE FROM reactions WHERE msg_id = $1 AND emoji = $2 AND user_name = $3
                 )
                 INSERT INTO events (seq, conv, kind, msg_id, user_name, emoji, on_, ts)
                 VALUES ($4, $5, {EV_REACTION}, $1, $3, $2, false, $6)"
            ))?,
            set_read: c.prepare(
                "INSERT INTO conv_state (user_key, conv, read_id) VALUES ($1, $2, $3)
                 ON CONFLICT (user_key, conv)
                 DO UPDATE SET read_id = GREATEST(conv_state.read_id, excluded.read_id)",
            )?,
            set_notify: c.prepare(
                "INSERT INTO conv_state (user_key, conv, notify) VALUES ($1, $2, $3)
                 ON CONFLICT (user_key, conv) DO UPDATE SET notify = excluded.notify",
            )?,
            presence_on: c.prepare(
                "INSERT INTO presence (node, user_key) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )?,
            presence_off: c.prepare("DELETE FROM presence WHERE node = $1 AND user_key = $2")?,
        })
    }
}

/// Every statement of the writer's connection.
struct Stmts {
    reads: Reads,
    writes: Writes,
}

impl Stmts {
    fn prepare(c: &mut Client) -> Result<Stmts, postgres::Error> {
        // Statements are prepared once, but a generic plan (which PostgreSQL may switch to
        // after five runs) cannot know which room or conversation a query is for: for
        // `room = $1 ORDER BY id DESC LIMIT n` it picks a backward scan of the whole primary
        // key, which reads every message of the chat for a quiet room. Planning each run costs
        // a fraction of a millisecond and always uses the (room, id) / (dm, id) indexes.
        c.batch_execute("SET plan_cache_mode = force_custom_plan")?;
        Ok(Stmts {
            reads: Reads::prepare(c)?,
            writes: Writes::prepare(c)?,
        })
    }
}

/// One request of a batch, writes numbered.
enum Item {
    Write(u64, Write),
    Query(u64, Query),
    LoadUser(String),
}

/// Why an attempt at a batch failed.
enum Fail {
    /// The connection was found gone at the batch's first statement: nothing of the batch
    /// reached the database, so it may run again on a new connection (an idle connection
    /// that the server closed meanwhile, e.g. across a restart, costs no failed batch).
    Stale(postgres::Error),
    /// The connection is gone: the batch is `unavailable`.
    Conn(postgres::Error),
    /// A statement failed on its own.
    Statement(postgres::Error),
}

/// What a committed batch produced.
#[derive(Default)]
struct Outcome {
    results: Vec<StoreEvent>,
    failed: Vec<u64>,
    assigned: Vec<Assigned>,
}

/// The transaction state of one attempt: the head, the log rows to append.
struct Tx<'a> {
    c: &'a mut Client,
    st: &'a Stmts,
    node: &'a str,
    head: i64,
    logs: Vec<(i64, String)>,
    out: Outcome,
}

/// Messages waiting to go in as one statement.
type Run<'a> = Vec<(
    u64,
    &'a ChatMessage,
    &'a Option<String>,
    &'a Option<(String, String)>,
)>;

impl<'a> Tx<'a> {
    fn fail(&self, e: postgres::Error) -> Fail {
        if is_connection_loss(self.c, &e) {
            Fail::Conn(e)
        } else {
            Fail::Statement(e)
        }
    }

    /// Inserts a run of messages: looks their dedup refs up, gives each new one the next
    /// position (its id), inserts them with their refs in one statement. Positions and log
    /// rows are taken only once the statement succeeded.
    fn messages(&mut self, run: &Run<'_>) -> Result<(), postgres::Error> {
        let (keys, refs): (Vec<&str>, Vec<&str>) = run
            .iter()
            .filter_map(|(_, _, _, d)| d.as_ref().map(|(k, r)| (k.as_str(), r.as_str())))
            .unzip();
        let mut known: HashMap<(String, String), (i64, i64)> = HashMap::new();
        if !keys.is_empty() {
            for r in self.c.query(&self.st.writes.dedup_find, &[&keys, &refs])? {
                known.insert((r.get(0), r.get(1)), (r.get(2), r.get(3)));
            }
        }
        let n = run.len();
        let mut head = self.head;
        let (mut ids, mut rooms, mut dms, mut froms, mut tos, mut nicks, mut texts) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut tss, mut replies, mut folded) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut dk, mut dr, mut did, mut dts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut logs = Vec::with_capacity(n);
        let mut assigned = Vec::with_capacity(n);
        for &(write, msg, dm, dedup) in run {
            if let Some((k, r)) = dedup {
                if let Some(&(id, ts)) = known.get(&(k.clone(), r.clone())) {
                    // A retry of a message already stored (here or on another node, or
                    // earlier in this very batch): nothing is inserted or logged.
                    assigned.push(Assigned {
                        write,
                        id,
                        ts,
                        duplicate: true,
                    });
                    continue;
                }
            }
            head += 1;
            let id = head;
            ids.push(id);
            rooms.push(msg.room.as_deref());
            dms.push(dm.as_deref());
            froms.push(msg.from.as_str());
            tos.push(msg.to.as_deref());
            nicks.push(msg.nick.as_str());
            texts.push(msg.text.as_str());
            tss.push(msg.ts);
            replies.push(msg.reply_to);
            folded.push(super::fold(&msg.text));
            if let Some((k, r)) = dedup {
                dk.push(k.as_str());
                dr.push(r.as_str());
                did.push(id);
                dts.push(msg.ts);
                known.insert((k.clone(), r.clone()), (id, msg.ts));
            }
            // What `LogEvent::of_write` makes of the message, with its id.
            let ev = LogEvent::Message {
                msg: LogMessage {
                    id,
                    ..LogMessage::of(msg)
                },
                dm: dm.clone(),
                sender: dedup
                    .as_ref()
                    .map(|(k, _)| k.clone())
                    .unwrap_or_else(|| crate::chat::validate::user_key(&msg.from)),
                reference: dedup.as_ref().map(|(_, r)| r.clone()),
            };
            logs.push((id, body(&ev)));
            assigned.push(Assigned {
                write,
                id,
                ts: msg.ts,
                duplicate: false,
            });
        }
        if !ids.is_empty() {
            self.c.execute(
                &self.st.writes.insert_msgs,
                &[
                    &ids, &rooms, &dms, &froms, &tos, &nicks, &texts, &tss, &replies, &folded, &dk,
                    &dr, &did, &dts,
                ],
            )?;
        }
        self.head = head;
        self.logs.extend(logs);
        self.out.assigned.extend(assigned);
        Ok(())
    }

    /// Applies one write (not a message). Returns whether it took effect (`false`: an
    /// `InsertUser` that found the account already there), logging it if so.
    fn write(&mut self, seq: u64, w: &Write) -> Result<bool, postgres::Error> {
        let c = &mut *self.c;
        let s = &self.st.writes;
        let pos = self.head + 1;
        let mut assign = None;
        match w {
            Write::InsertUser {
                key,
                name,
                nick,
                phc,
                created,
            } => {
                if c.execute(&s.insert_user, &[key, name, nick, phc, created])? == 0 {
                    return Ok(false);
                }
            }
            Write::InsertSession {
                hash,
                user_key,
                created,
            } => {
                c.execute(&s.insert_session, &[&&hash[..], user_key, created])?;
            }
            Write::DeleteSession { hash } => {
                c.execute(&s.delete_session, &[&&hash[..]])?;
            }
            Write::DeleteUserSessions { user_key } => {
                c.execute(&s.delete_user_sessions, &[user_key])?;
            }
            Write::TouchSession { hash, ts } => {
                c.execute(&s.touch_session, &[&&hash[..], ts])?;
            }
            Write::InsertRoom { name, created } => {
                c.execute(&s.insert_room, &[name, created])?;
            }
            Write::AddMember { room, user_key } => {
                c.execute(&s.add_member, &[room, user_key])?;
            }
            Write::RemoveMember { room, user_key } => {
                c.execute(&s.remove_member, &[room, user_key])?;
            }
            Write::InsertMessage { .. } => {
                unreachable!("messages go in through Tx::messages")
            }
            Write::PruneDedup { before_ts } => {
                c.execute(&s.prune_dedup, &[before_ts])?;
            }
            Write::SetNick { key, nick } => {
                c.execute(&s.set_nick, &[key, nick])?;
            }
            Write::SetLastSeen { key, ts } => {
                c.execute(&s.set_last_seen, &[key, ts])?;
            }
            Write::AddDmPair { a, b } => {
                c.execute(&s.add_dm_pair, &[a, b])?;
            }
            // Ids are log positions in cluster mode: nothing to reserve.
            Write::ReserveIds { .. } => {}
            Write::EditMessage {
                id,
                text,
                edited_ts,
                conv,
                ..
            } => {
                let folded = super::fold(text);
                c.execute(&s.edit, &[id, text, edited_ts, &folded, &pos, conv])?;
                assign = Some(*edited_ts);
            }
            Write::DeleteMessage { id, conv, ts, .. } => {
                c.execute(&s.delete, &[id, &pos, conv, ts])?;
                assign = Some(*ts);
            }
            Write::SetReaction {
                id,
                user,
                emoji,
                on,
                conv,
                ts,
                ..
            } => {
                let st = if *on { &s.react_on } else { &s.react_off };
                c.execute(st, &[id, emoji, user, &pos, conv, ts])?;
                assign = Some(*ts);
            }
            Write::PruneEvents { before_ts, keep } => prune_events(c, *before_ts, *keep)?,
            Write::SetRead { user_key, conv, id } => {
                c.execute(&s.set_read, &[user_key, conv, id])?;
            }
            Write::SetNotify {
                user_key,
                conv,
                level,
            } => {
                c.execute(&s.set_notify, &[user_key, conv, level])?;
            }
            Write::Relay(ev) => match ev {
                LogEvent::Online { user_key } => {
                    c.execute(&s.presence_on, &[&self.node, user_key])?;
                }
                LogEvent::Offline { user_key } => {
                    c.execute(&s.presence_off, &[&self.node, user_key])?;
                }
                _ => {}
            },
        }
        if let Some(ev) = LogEvent::of_write(w) {
            self.head = pos;
            self.logs.push((pos, body(&ev)));
            if let Some(ts) = assign {
                self.out.assigned.push(Assigned {
                    write: seq,
                    id: pos,
                    ts,
                    duplicate: false,
                });
            }
        }
        Ok(true)
    }

    fn savepoint(&mut self) -> Result<(), Fail> {
        self.c
            .batch_execute("SAVEPOINT w")
            .map_err(|e| self.fail(e))
    }

    /// Ends a savepoint: kept, or rolled back after `e` (a lost connection is returned).
    fn end_savepoint(&mut self, err: Option<postgres::Error>) -> Result<(), Fail> {
        match err {
            None => self
                .c
                .batch_execute("RELEASE SAVEPOINT w")
                .map_err(|e| self.fail(e)),
            Some(e) => {
                if is_connection_loss(self.c, &e) {
                    return Err(Fail::Conn(e));
                }
                self.c
                    .batch_execute("ROLLBACK TO SAVEPOINT w; RELEASE SAVEPOINT w")
                    .map_err(|e| self.fail(e))
            }
        }
    }
}

/// Deletes change events older than `before_ts` that are not among the newest `keep`, and
/// moves the catch-up horizon up to the newest one deleted (as SQLite).
fn prune_events(c: &mut Client, before_ts: i64, keep: usize) -> Result<(), postgres::Error> {
    let floor: Option<i64> = c
        .query_opt(
            "SELECT seq FROM events ORDER BY seq DESC LIMIT 1 OFFSET $1",
            &[&(keep as i64)],
        )?
        .map(|r| r.get(0));
    let Some(floor) = floor else { return Ok(()) };
    let top: Option<i64> = c
        .query_one(
            "SELECT MAX(seq) FROM events WHERE ts < $1 AND seq <= $2",
            &[&before_ts, &floor],
        )?
        .get(0);
    let Some(top) = top else { return Ok(()) };
    c.execute("DELETE FROM events WHERE seq <= $1", &[&top])?;
    c.execute(
        "INSERT INTO meta (k, v) VALUES ($1, $2)
         ON CONFLICT (k) DO UPDATE SET v = GREATEST(meta.v, excluded.v)",
        &[&EVENTS_HORIZON, &top],
    )?;
    Ok(())
}

/// Whether a write has a log entry (what `LogEvent::of_write` says, without building it).
fn is_logged(w: &Write) -> bool {
    !matches!(
        w,
        Write::PruneDedup { .. } | Write::ReserveIds { .. } | Write::PruneEvents { .. }
    )
}

/// One attempt at a batch: the whole transaction. `careful`: a savepoint around every write
/// and query, so a failing one is reported (`failed`, or an empty answer) and the rest
/// commits.
fn attempt(
    c: &mut Client,
    st: &Stmts,
    node: &str,
    items: &[Item],
    careful: bool,
) -> Result<Outcome, Fail> {
    let logged = items
        .iter()
        .any(|i| matches!(i, Item::Write(_, w) if is_logged(w)));
    let begun = if logged {
        begin_locked(c)
    } else {
        c.batch_execute("BEGIN").map(|_| 0)
    };
    let head = match begun {
        Ok(h) => h,
        Err(e) => {
            return Err(if is_connection_loss(c, &e) {
                Fail::Stale(e)
            } else {
                Fail::Statement(e)
            })
        }
    };
    let mut tx = Tx {
        c,
        st,
        node,
        head,
        logs: Vec::new(),
        out: Outcome::default(),
    };
    let mut run: Run<'_> = Vec::new();
    let mut i = 0;
    while i < items.len() {
        // A run of consecutive messages goes in as one statement (one at a time when
        // careful, so a bad one fails alone).
        if let Item::Write(seq, Write::InsertMessage { msg, dm, dedup }) = &items[i] {
            run.push((*seq, msg, dm, dedup));
            i += 1;
            let more = matches!(
                items.get(i),
                Some(Item::Write(_, Write::InsertMessage { .. }))
            );
            if more && !careful {
                continue;
            }
            if careful {
                tx.savepoint()?;
                let err = tx.messages(&run).err();
                if let Some(e) = &err {
                    log::error!("store: message {:?}: {}", run[0].1, describe(e));
                    tx.out.failed.push(run[0].0);
                }
                tx.end_savepoint(err)?;
            } else {
                tx.messages(&run).map_err(|e| tx.fail(e))?;
            }
            run.clear();
            continue;
        }
        match &items[i] {
            Item::Write(seq, w) => {
                if careful {
                    tx.savepoint()?;
                    let r = tx.write(*seq, w);
                    let (ok, err) = match r {
                        Ok(ok) => (ok, None),
                        Err(e) => (false, Some(e)),
                    };
                    if let Some(e) = &err {
                        log::error!("store: {w:?}: {}", describe(e));
                    }
                    if !ok {
                        tx.out.failed.push(*seq);
                    }
                    tx.end_savepoint(err)?;
                } else if !tx.write(*seq, w).map_err(|e| tx.fail(e))? {
                    tx.out.failed.push(*seq);
                }
            }
            Item::Query(qid, q) => {
                if careful {
                    tx.savepoint()?;
                    let r = st.reads.answer(tx.c, *qid, q);
                    let (ev, err) = match r {
                        Ok(ev) => (ev, None),
                        Err(e) => {
                            log::error!("store query {q:?}: {}", describe(&e));
                            (unanswered(*qid, q, true), Some(e))
                        }
                    };
                    tx.out.results.push(ev);
                    tx.end_savepoint(err)?;
                } else {
                    let ev = st.reads.answer(tx.c, *qid, q).map_err(|e| tx.fail(e))?;
                    tx.out.results.push(ev);
                }
            }
            Item::LoadUser(key) => {
                if careful {
                    tx.savepoint()?;
                    let r = st.reads.load_user(tx.c, key);
                    let (user, err) = match r {
                        Ok(u) => (Ok(u), None),
                        Err(e) => {
                            let msg = describe(&e);
                            log::error!("store: load user {key}: {msg}");
                            (Err(msg), Some(e))
                        }
                    };
                    tx.out.results.push(StoreEvent::UserChanged {
                        change: UserChange::Reloaded,
                        key: key.clone(),
                        user,
                    });
                    tx.end_savepoint(err)?;
                } else {
                    let user = st.reads.load_user(tx.c, key).map_err(|e| tx.fail(e))?;
                    tx.out.results.push(StoreEvent::UserChanged {
                        change: UserChange::Reloaded,
                        key: key.clone(),
                        user: Ok(user),
                    });
                }
            }
        }
        i += 1;
    }
    if !tx.logs.is_empty() {
        let (head, logs) = (tx.head, std::mem::take(&mut tx.logs));
        append(tx.c, &st.writes.append, node, &logs, head).map_err(|e| tx.fail(e))?;
    }
    let out = std::mem::take(&mut tx.out);
    c.batch_execute("COMMIT").map_err(|e| {
        if is_connection_loss(c, &e) {
            Fail::Conn(e)
        } else {
            Fail::Statement(e)
        }
    })?;
    Ok(out)
}

/// The writer thread's state.
pub(crate) struct Writer {
    /// `None` while disconnected.
    conn: Option<(Client, Stmts)>,
    target: Target,
    node: NodeId,
    events: Sender<StoreEvent>,
    wake: Wake,
    metrics: Arc<Metrics>,
    /// The last write sequence number handed out.
    seq: u64,
    /// When to try reconnecting next (while disconnected).
    backoff: Backoff,
    /// A connection being made on a helper thread (while disconnected), so that batches go
    /// on failing at once however long connecting takes (up to the connect timeout for an
    /// unreachable host).
    connecting: Option<Receiver<Result<(Client, Stmts), postgres::Error>>>,
}

impl Writer {
    pub(crate) fn new(
        mut client: Client,
        target: Target,
        node: NodeId,
        events: Sender<StoreEvent>,
        wake: Wake,
        metrics: Arc<Metrics>,
    ) -> Result<Writer, postgres::Error> {
        let st = Stmts::prepare(&mut client)?;
        Ok(Writer {
            conn: Some((client, st)),
            target,
            node,
            events,
            wake,
            metrics,
            seq: 0,
            backoff: Backoff::new(),
            connecting: None,
        })
    }

    /// The thread's body: batches until [`StoreReq::Shutdown`] (after which this node is
    /// removed from the cluster) or until the loop side hangs up.
    pub(crate) fn run(mut self, rx: Receiver<Vec<StoreReq>>) {
        let mut queued: VecDeque<StoreReq> = VecDeque::new();
        loop {
            if queued.is_empty() {
                let got = if self.conn.is_some() {
                    rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
                } else {
                    let wait = if self.connecting.is_some() {
                        CONNECT_POLL
                    } else {
                        self.backoff.until_next()
                    };
                    rx.recv_timeout(wait)
                };
                match got {
                    Ok(reqs) => queued.extend(reqs),
                    Err(RecvTimeoutError::Timeout) => {
                        self.connect_in_background();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            let batch = next_batch(&mut queued, &rx);
            if self.conn.is_none() {
                self.connect_in_background();
            }
            if self.batch(batch) {
                self.goodbye();
                return;
            }
        }
    }

    /// While disconnected: adopts the connection a helper thread made, or starts one when
    /// the backoff has passed. Never waits for the server.
    fn connect_in_background(&mut self) {
        if let Some(rx) = &self.connecting {
            match rx.try_recv() {
                Err(TryRecvError::Empty) => return,
                Ok(r) => {
                    self.connecting = None;
                    self.conn = self
                        .backoff
                        .outcome("store", &self.target, &self.metrics, r);
                    if self.conn.is_some() {
                        return;
                    }
                }
                Err(TryRecvError::Disconnected) => {
                    self.connecting = None;
                    self.lost();
                }
            }
        }
        if self.conn.is_some() || !self.backoff.due() {
            return;
        }
        let (tx, rx) = channel();
        let target = self.target.clone();
        let spawned = std::thread::Builder::new()
            .name("chat-store-connect".into())
            .spawn(move || {
                let r = target.connect().and_then(|mut c| {
                    let st = Stmts::prepare(&mut c)?;
                    Ok((c, st))
                });
                let _ = tx.send(r);
            });
        match spawned {
            Ok(_) => self.connecting = Some(rx),
            Err(e) => {
                log::warn!("store: starting a connect thread: {e}; connecting here");
                self.reconnect();
            }
        }
    }

    /// Connects (and prepares) on this thread; on failure schedules the next try with
    /// backoff. For the moments a batch may wait for it: a connection found closed before
    /// its batch started, and leaving the cluster at shutdown.
    fn reconnect(&mut self) {
        self.connecting = None;
        let r = self.target.connect().and_then(|mut c| {
            let st = Stmts::prepare(&mut c)?;
            Ok((c, st))
        });
        self.conn = self
            .backoff
            .outcome("store", &self.target, &self.metrics, r);
    }

    /// The connection is gone: the next try is after the backoff, which doubles.
    fn lost(&mut self) {
        self.conn = None;
        self.backoff.failed();
    }

    /// Runs a batch's transaction: fast, then (after a failed statement) write by write;
    /// once more on a new connection if the connection was found gone before the batch
    /// started. `None`: there is no connection.
    fn attempts(&mut self, items: &[Item]) -> Option<Result<Outcome, Fail>> {
        if items.is_empty() {
            // A lone Shutdown: nothing to run.
            return Some(Ok(Outcome::default()));
        }
        for round in 0..2 {
            let (c, st) = self.conn.as_mut()?;
            let mut r = attempt(c, st, &self.node, items, false);
            if let Err(Fail::Statement(e)) = &r {
                log::warn!(
                    "store: a statement failed ({}); running the batch again write by write",
                    describe(e)
                );
                r = match c.batch_execute("ROLLBACK") {
                    Ok(()) => attempt(c, st, &self.node, items, true),
                    Err(e) => Err(Fail::Conn(e)),
                };
            }
            match r {
                Err(Fail::Stale(e)) if round == 0 => {
                    log::warn!(
                        "store: the connection to {} was closed ({}); reconnecting",
                        self.target.shown(),
                        describe(&e)
                    );
                    self.backoff.restart();
                    self.reconnect();
                }
                r => return Some(r),
            }
        }
        None
    }

    /// Runs one batch and reports it; returns whether it held a Shutdown.
    fn batch(&mut self, batch: Vec<StoreReq>) -> bool {
        let start = Instant::now();
        let mut items = Vec::with_capacity(batch.len());
        let mut stop = false;
        let mut writes = 0usize;
        for req in batch {
            match req {
                StoreReq::Write(w) => {
                    self.seq += 1;
                    writes += 1;
                    items.push(Item::Write(self.seq, w));
                }
                StoreReq::Query { qid, query } => items.push(Item::Query(qid, query)),
                StoreReq::LoadUser { key } => items.push(Item::LoadUser(key)),
                StoreReq::Shutdown => stop = true,
            }
        }
        let mut unavailable = false;
        let outcome = match self.attempts(&items) {
            None => {
                unavailable = true;
                None
            }
            Some(Ok(o)) => Some(o),
            Some(Err(Fail::Statement(e))) => {
                log::error!("store: batch failed: {}", describe(&e));
                if let Some((c, _)) = self.conn.as_mut() {
                    let _ = c.batch_execute("ROLLBACK");
                }
                None
            }
            Some(Err(Fail::Conn(e) | Fail::Stale(e))) => {
                log::error!(
                    "store: lost the connection to {}: {}",
                    self.target.shown(),
                    describe(&e)
                );
                unavailable = true;
                self.backoff.restart();
                self.lost();
                None
            }
        };
        let ok = outcome.is_some();
        let Outcome {
            results,
            failed,
            assigned,
        } = match outcome {
            Some(o) => o,
            None => Outcome {
                results: items
                    .iter()
                    .filter_map(|i| match i {
                        Item::Write(..) => None,
                        Item::Query(qid, q) => Some(unanswered(*qid, q, true)),
                        Item::LoadUser(key) => Some(StoreEvent::UserChanged {
                            change: UserChange::Reloaded,
                            key: key.clone(),
                            user: Err("store unavailable".into()),
                        }),
                    })
                    .collect(),
                ..Outcome::default()
            },
        };
        // Query results first, then the commit (as SQLite).
        for r in results {
            let _ = self.events.send(r);
        }
        let latency = start.elapsed();
        self.metrics.set_rtt(latency);
        let _ = self.events.send(StoreEvent::Committed {
            upto: self.seq,
            ok,
            failed,
            batch: writes,
            latency,
            assigned,
            unavailable,
        });
        self.wake.wake();
        stop
    }

    /// Leaves the cluster cleanly: this node's presence and `nodes` row go, and a `NodeGone`
    /// entry tells the other nodes at once (rather than at heartbeat expiry).
    fn goodbye(&mut self) {
        if self.conn.is_none() {
            if let Some(rx) = self.connecting.take() {
                if let Ok(Ok(conn)) = rx.recv_timeout(Duration::from_secs(5)) {
                    self.conn = Some(conn);
                }
            }
        }
        if self.conn.is_none() {
            self.reconnect();
        }
        let Some((c, st)) = self.conn.as_mut() else {
            log::warn!("store: leaving the cluster without a connection; the other nodes will expire this node by its heartbeat");
            return;
        };
        let node = self.node.as_str();
        let r = (|| -> Result<(), postgres::Error> {
            let head = begin_locked(c)? + 1;
            c.execute("DELETE FROM presence WHERE node = $1", &[&node])?;
            c.execute("DELETE FROM nodes WHERE id = $1", &[&node])?;
            let gone = body(&LogEvent::NodeGone {
                node: node.to_string(),
            });
            append(c, &st.writes.append, node, &[(head, gone)], head)?;
            c.batch_execute("COMMIT")
        })();
        if let Err(e) = r {
            log::warn!("store: leaving the cluster: {}", describe(&e));
            let _ = c.batch_execute("ROLLBACK");
        }
    }
}
