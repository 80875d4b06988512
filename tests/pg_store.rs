//! The PostgreSQL store against a real (throwaway) PostgreSQL, through the `Store` trait:
//! schema creation, every write and query (compared with the SQLite store given the same
//! writes), the replication log seen by two nodes, dedup across nodes, outages, heartbeats and
//! shutdown, and `migrate_from_sqlite`.
//!
//! `cargo test --release --features pg-tests --test pg_store`

mod pg_common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use parlor::chat::protocol::ChatMessage;
use parlor::chat::store::cluster::{LogEntry, LogEvent};
use parlor::chat::store::postgres::PgOptions;
use parlor::chat::store::{
    self, dm_key, Durability, Loaded, Query, SearchQuery, Store, StoreError, StoreEvent, StoreReq,
    Target, UnreadQuery, Write,
};
use parlor::chat::Wake;
use pg_common::Pg;

const WAIT: Duration = Duration::from_secs(20);

/// What a `Committed` said.
#[derive(Debug, Clone)]
struct Commit {
    upto: u64,
    ok: bool,
    failed: Vec<u64>,
    assigned: Vec<store::cluster::Assigned>,
    unavailable: bool,
    /// The store's own measure of the batch.
    latency: Duration,
}

/// A store with its events sorted out: log entries, query answers by qid, commits.
struct Node {
    store: Box<dyn Store>,
    loaded: Loaded,
    log: Vec<LogEntry>,
    answers: HashMap<u64, StoreEvent>,
    commits: Vec<Commit>,
    /// Every id or seq assigned to this node's writes, from all commits.
    assigned: Vec<store::cluster::Assigned>,
    /// Writes submitted so far.
    seq: u64,
}

impl Node {
    fn open(url: &str) -> Node {
        Node::open_with(url, PgOptions::default())
    }

    fn open_with(url: &str, opts: PgOptions) -> Node {
        let (store, loaded, reserved) =
            store::open_postgres(url, opts, 0, Wake::default()).expect("open the pg store");
        assert_eq!(reserved, i64::MAX);
        Node {
            store,
            loaded,
            log: Vec::new(),
            answers: HashMap::new(),
            commits: Vec::new(),
            assigned: Vec::new(),
            seq: 0,
        }
    }

    fn node_id(&self) -> String {
        self.loaded.cluster.as_ref().unwrap().node.clone()
    }

    fn pump(&mut self) -> bool {
        let mut any = false;
        while let Some(ev) = self.store.try_event() {
            any = true;
            match ev {
                StoreEvent::Log(entries) => self.log.extend(entries),
                StoreEvent::Committed {
                    upto,
                    ok,
                    failed,
                    assigned,
                    unavailable,
                    latency,
                    ..
                } => {
                    self.assigned.extend(assigned.iter().copied());
                    self.commits.push(Commit {
                        upto,
                        ok,
                        failed,
                        assigned,
                        unavailable,
                        latency,
                    })
                }
                StoreEvent::QueryDone { qid, .. }
                | StoreEvent::MessageFound { qid, .. }
                | StoreEvent::UnreadDone { qid, .. }
                | StoreEvent::SearchDone { qid, .. }
                | StoreEvent::CatchupDone { qid, .. } => {
                    self.answers.insert(qid, ev);
                }
                StoreEvent::UserChanged { .. } => {}
            }
        }
        any
    }

    fn until(&mut self, what: &str, mut done: impl FnMut(&mut Node) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            self.pump();
            if done(self) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Submits `writes` as one turn and returns their commit.
    fn write(&mut self, writes: Vec<Write>) -> Commit {
        self.seq += writes.len() as u64;
        let upto = self.seq;
        self.store
            .submit(writes.into_iter().map(StoreReq::Write).collect());
        self.commit_of(upto)
    }

    fn commit_of(&mut self, upto: u64) -> Commit {
        self.until("a commit", |n| n.commits.iter().any(|c| c.upto >= upto));
        let i = self.commits.iter().position(|c| c.upto >= upto).unwrap();
        self.commits.remove(i)
    }

    fn ask(&mut self, qid: u64, query: Query) -> StoreEvent {
        self.store.submit(vec![StoreReq::Query { qid, query }]);
        self.until("an answer", |n| n.answers.contains_key(&qid));
        self.answers.remove(&qid).unwrap()
    }

    fn wait_log(&mut self, pos: i64) {
        self.until(&format!("log position {pos}"), |n| {
            n.log.last().is_some_and(|e| e.pos >= pos)
        });
    }
}

fn msg(room: Option<&str>, to: Option<&str>, from: &str, text: &str, ts: i64) -> ChatMessage {
    ChatMessage {
        id: 0,
        room: room.map(String::from),
        from: from.into(),
        to: to.map(String::from),
        nick: from.into(),
        text: text.into(),
        ts,
        ..ChatMessage::default()
    }
}

fn room_msg(room: &str, from: &str, text: &str, ts: i64, reference: &str) -> Write {
    Write::InsertMessage {
        msg: msg(Some(room), None, from, text, ts),
        dm: None,
        dedup: Some((from.to_lowercase(), reference.into())),
    }
}

fn user(key: &str) -> Write {
    Write::InsertUser {
        key: key.into(),
        name: key.into(),
        nick: key.into(),
        phc: format!("phc-{key}"),
        created: 1,
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let d = std::env::temp_dir().join(format!(
        "parlor-pgtest-{tag}-{}-{nanos:x}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Asks both stores every query; their answers must be identical. Returns how many were not
/// empty (so a test can tell its comparison is not vacuous).
fn same_answers(node: &mut Node, lite: &mut Box<dyn Store>, queries: Vec<Query>) -> usize {
    let mut nonempty = 0;
    for (i, q) in queries.into_iter().enumerate() {
        let qid = 10_000 + i as u64;
        let ours = node.ask(qid, q.clone());
        lite.submit(vec![StoreReq::Query {
            qid,
            query: q.clone(),
        }]);
        let deadline = Instant::now() + WAIT;
        let theirs = loop {
            match lite.try_event() {
                Some(StoreEvent::Committed { .. }) | Some(StoreEvent::UserChanged { .. }) => {}
                Some(ev) => break ev,
                None => {
                    assert!(Instant::now() < deadline);
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        };
        assert_eq!(shown(&ours), shown(&theirs), "{q:?}");
        nonempty += match &ours {
            StoreEvent::QueryDone { messages: m, .. }
            | StoreEvent::SearchDone { results: m, .. } => usize::from(!m.is_empty()),
            StoreEvent::CatchupDone { items, .. } => usize::from(!items.is_empty()),
            _ => 1,
        };
    }
    nonempty
}

/// Submits writes to a SQLite store and waits for their commit (`seq`: writes so far).
fn lite_write(lite: &mut Box<dyn Store>, seq: &mut u64, writes: Vec<Write>) {
    *seq += writes.len() as u64;
    lite.submit(writes.into_iter().map(StoreReq::Write).collect());
    let deadline = Instant::now() + WAIT;
    loop {
        match lite.try_event() {
            Some(StoreEvent::Committed {
                upto, ok, failed, ..
            }) if upto >= *seq => {
                assert!(ok && failed.is_empty(), "{failed:?}");
                return;
            }
            Some(_) => {}
            None => {
                assert!(Instant::now() < deadline);
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// The events a query got from a store, comparable across backends.
fn shown(ev: &StoreEvent) -> String {
    format!("{ev:?}")
}

#[test]
fn concurrent_opens_create_the_schema_once() {
    let pg = Pg::start();
    let url = pg.url();
    let nodes: Vec<Node> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3).map(|_| s.spawn(|| Node::open(&url))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ids: HashSet<String> = nodes.iter().map(Node::node_id).collect();
    assert_eq!(ids.len(), 3, "three distinct node ids");
    for id in &ids {
        assert_eq!(id.len(), 16);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    }
    let mut c = pg.client();
    let versions: i64 = c
        .query_one("SELECT count(*) FROM meta WHERE k = 'schema_version'", &[])
        .unwrap()
        .get(0);
    assert_eq!(versions, 1);
    let registered: i64 = c
        .query_one("SELECT count(*) FROM nodes", &[])
        .unwrap()
        .get(0);
    assert_eq!(registered, 3);
    for n in &nodes {
        assert_eq!(n.loaded.next_id, 1);
        assert_eq!(n.loaded.cluster.as_ref().unwrap().log_pos, 0);
    }
    drop(nodes);
    // Reopening an existing schema changes nothing; a newer one is refused.
    let again = Node::open(&url);
    drop(again);
    c.execute("UPDATE meta SET v = 99 WHERE k = 'schema_version'", &[])
        .unwrap();
    let e = store::open_postgres(&url, PgOptions::default(), 0, Wake::default())
        .err()
        .expect("a newer schema is refused");
    assert!(
        matches!(
            e,
            StoreError::Schema {
                found_version: 99,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(!e.to_string().contains(pg.password()), "{e}");
}

#[test]
fn wrong_password_is_an_authentication_error() {
    let pg = Pg::start();
    let url = pg.url_with_password("not-the-password");
    let t = Instant::now();
    let e = store::open_postgres(&url, PgOptions::default(), 0, Wake::default())
        .err()
        .expect("a wrong password fails");
    let text = e.to_string();
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(text.contains(&format!("127.0.0.1:{}", pg.port())), "{text}");
    assert!(!text.contains("not-the-password"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(10));
    // Nobody listening: a clear connect error, quickly.
    let mut pg = pg;
    pg.stop();
    let e = store::open_postgres(&pg.url(), PgOptions::default(), 0, Wake::default())
        .err()
        .expect("no server");
    assert!(e.to_string().contains("error connecting"), "{e}");
}

/// The same writes through the PostgreSQL store and the SQLite store (given the ids and seqs
/// PostgreSQL assigned) answer every query kind identically.
#[test]
fn queries_answer_like_sqlite() {
    let pg = Pg::start();
    let mut node = Node::open(&pg.url());
    let dir = temp_dir("like-sqlite");
    let (mut lite, _, _) =
        store::open_sqlite(&dir, Durability::Normal, 1000, 0, Wake::default()).unwrap();
    let mut lite_seq = 0u64;
    // Accounts, rooms, memberships, then messages in two rooms and a DM.
    let mut setup = vec![user("alice"), user("bob"), user("carol")];
    for r in ["rust", "ops"] {
        setup.push(Write::InsertRoom {
            name: r.into(),
            created: 1,
        });
        for u in ["alice", "bob"] {
            setup.push(Write::AddMember {
                room: r.into(),
                user_key: u.into(),
            });
        }
    }
    setup.push(Write::AddDmPair {
        a: "alice".into(),
        b: "bob".into(),
    });
    let c = node.write(setup.clone());
    assert!(c.ok && c.failed.is_empty(), "{c:?}");
    lite_write(&mut lite, &mut lite_seq, setup);

    let dm = dm_key("alice", "bob");
    let texts = [
        "Deploy failed on staging",
        "the café is open",
        "@bob please look at the deploy",
        "Crème brûlée for everyone",
        "deployment fixed, deploy again",
        "unrelated chatter",
        "naïve approach works",
        "@alice ping",
        "DEPLOY FAILED again",
        "last words",
    ];
    let mut writes = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        let from = if i % 3 == 2 { "bob" } else { "alice" };
        let room = if i % 4 == 3 { "ops" } else { "rust" };
        writes.push(room_msg(room, from, t, 1000 + i as i64, &format!("r{i}")));
    }
    for (i, t) in ["hi bob", "hi alice, café?", "see you"].iter().enumerate() {
        let (from, to) = if i == 1 {
            ("bob", "alice")
        } else {
            ("alice", "bob")
        };
        writes.push(Write::InsertMessage {
            msg: msg(None, Some(to), from, t, 2000 + i as i64),
            dm: Some(dm.clone()),
            dedup: Some((from.into(), format!("d{i}"))),
        });
    }
    let c = node.write(writes.clone());
    assert!(c.ok && c.failed.is_empty(), "{c:?}");
    assert_eq!(c.assigned.len(), writes.len());
    // Ids are log positions, consecutive after the setup's entries, in submission order.
    let ids: Vec<i64> = c.assigned.iter().map(|a| a.id).collect();
    let first = ids[0];
    assert_eq!(ids, (first..first + ids.len() as i64).collect::<Vec<_>>());
    assert!(c.assigned.iter().all(|a| !a.duplicate));
    let lite_writes: Vec<Write> = writes
        .into_iter()
        .zip(&ids)
        .map(|(w, id)| match w {
            Write::InsertMessage { mut msg, dm, dedup } => {
                msg.id = *id;
                Write::InsertMessage { msg, dm, dedup }
            }
            w => w,
        })
        .collect();
    lite_write(&mut lite, &mut lite_seq, lite_writes);

    // Edits, a delete, reactions (seq 0: the store assigns them).
    let (m0, m1, m2, m4) = (ids[0], ids[1], ids[2], ids[4]);
    let changes = vec![
        Write::EditMessage {
            id: m0,
            text: "Deploy failed on production".into(),
            edited_ts: 3000,
            seq: 0,
            conv: "rust".into(),
            dm_names: None,
        },
        Write::SetReaction {
            id: m1,
            user: "bob".into(),
            emoji: "👍".into(),
            on: true,
            seq: 0,
            conv: "rust".into(),
            ts: 3001,
            dm_names: None,
        },
        Write::SetReaction {
            id: m1,
            user: "alice".into(),
            emoji: "👍".into(),
            on: true,
            seq: 0,
            conv: "rust".into(),
            ts: 3002,
            dm_names: None,
        },
        Write::SetReaction {
            id: m1,
            user: "alice".into(),
            emoji: "🎉".into(),
            on: true,
            seq: 0,
            conv: "rust".into(),
            ts: 3003,
            dm_names: None,
        },
        Write::SetReaction {
            id: m1,
            user: "alice".into(),
            emoji: "🎉".into(),
            on: false,
            seq: 0,
            conv: "rust".into(),
            ts: 3004,
            dm_names: None,
        },
        Write::EditMessage {
            id: m2,
            text: "edited before delete".into(),
            edited_ts: 3005,
            seq: 0,
            conv: "rust".into(),
            dm_names: None,
        },
        Write::SetReaction {
            id: m2,
            user: "alice".into(),
            emoji: "👀".into(),
            on: true,
            seq: 0,
            conv: "rust".into(),
            ts: 3006,
            dm_names: None,
        },
        Write::DeleteMessage {
            id: m2,
            seq: 0,
            conv: "rust".into(),
            ts: 3007,
            dm_names: None,
        },
        Write::EditMessage {
            id: m0,
            text: "Deploy failed on production, twice".into(),
            edited_ts: 3008,
            seq: 0,
            conv: "rust".into(),
            dm_names: None,
        },
        Write::SetRead {
            user_key: "bob".into(),
            conv: "rust".into(),
            id: m1,
        },
        Write::SetRead {
            user_key: "bob".into(),
            conv: "rust".into(),
            id: m0,
        },
        Write::SetNotify {
            user_key: "bob".into(),
            conv: "rust".into(),
            level: "mentions".into(),
        },
        Write::SetNick {
            key: "bob".into(),
            nick: "Bobby".into(),
        },
    ];
    let c = node.write(changes.clone());
    assert!(c.ok && c.failed.is_empty(), "{c:?}");
    let seqs: HashMap<u64, i64> = c.assigned.iter().map(|a| (a.write, a.id)).collect();
    let base = node.seq - changes.len() as u64;
    let mut last_seq = 0;
    for (i, w) in changes.iter().enumerate() {
        let takes = matches!(
            w,
            Write::EditMessage { .. } | Write::SetReaction { .. } | Write::DeleteMessage { .. }
        );
        let s = seqs.get(&(base + 1 + i as u64));
        assert_eq!(s.is_some(), takes, "{w:?}");
        if let Some(s) = s {
            assert!(*s > last_seq && *s > ids[ids.len() - 1]);
            last_seq = *s;
        }
    }
    let lite_changes: Vec<Write> = changes
        .into_iter()
        .enumerate()
        .map(|(i, w)| {
            let s = seqs.get(&(base + 1 + i as u64)).copied().unwrap_or(0);
            match w {
                Write::EditMessage {
                    id,
                    text,
                    edited_ts,
                    conv,
                    ..
                } => Write::EditMessage {
                    id,
                    text,
                    edited_ts,
                    seq: s,
                    conv,
                    dm_names: None,
                },
                Write::SetReaction {
                    id,
                    user,
                    emoji,
                    on,
                    conv,
                    ts,
                    ..
                } => Write::SetReaction {
                    id,
                    user,
                    emoji,
                    on,
                    seq: s,
                    conv,
                    ts,
                    dm_names: None,
                },
                Write::DeleteMessage { id, conv, ts, .. } => Write::DeleteMessage {
                    id,
                    seq: s,
                    conv,
                    ts,
                    dm_names: None,
                },
                w => w,
            }
        })
        .collect();
    lite_write(&mut lite, &mut lite_seq, lite_changes);

    // Every query kind, on both stores.
    let convs = vec!["rust".to_string(), "ops".to_string(), dm.clone()];
    let hist = |target: Target, before, after, limit| Query::History {
        target,
        before,
        after,
        limit,
        cancelled: None,
    };
    let search = |fts: &str, from: Option<&str>, before: Option<i64>, limit| Query::Search {
        search: SearchQuery {
            fts: parlor::chat::search::fts_query(fts).unwrap(),
            convs: convs.clone(),
            from: from.map(String::from),
            before,
            limit,
        },
        cancelled: None,
    };
    let rust = || Target::Room("rust".into());
    let mut queries = vec![
        hist(rust(), None, None, 3),
        hist(rust(), Some(ids[5]), None, 3),
        hist(rust(), Some(ids[1]), None, 3),
        hist(rust(), None, Some(0), 4),
        hist(rust(), None, Some(ids[4]), 4),
        hist(rust(), Some(ids[8]), Some(ids[0]), 10),
        hist(Target::Room("ops".into()), None, None, 10),
        hist(Target::Dm(dm.clone()), None, None, 10),
        hist(Target::Room("nowhere".into()), None, None, 10),
        Query::LoadRing {
            room: "rust".into(),
            limit: 100,
            upto: None,
        },
        Query::LoadRing {
            room: "rust".into(),
            limit: 3,
            upto: None,
        },
        Query::Message { id: m0 },
        Query::Message { id: m1 },
        Query::Message { id: m2 },
        Query::Message { id: ids[10] },
        Query::Message { id: 999_999 },
        Query::Unread {
            user: "bob".into(),
            names: vec!["bob".into(), "Bobby".into()],
            convs: vec![
                UnreadQuery {
                    conv: "rust".into(),
                    dm: false,
                    read: 0,
                },
                UnreadQuery {
                    conv: "rust".into(),
                    dm: false,
                    read: m1,
                },
                UnreadQuery {
                    conv: dm.clone(),
                    dm: true,
                    read: 0,
                },
            ],
        },
        search("deploy", None, None, 10),
        search("deploy failed", None, None, 10),
        search("\"deploy failed\"", None, None, 10),
        search("depl", None, None, 2),
        search("depl", None, Some(ids[4]), 10),
        search("cafe", None, None, 10),
        search("CRÈME brulee", None, None, 10),
        search("naive", None, None, 10),
        search("deploy", Some("BOB"), None, 10),
        search("before delete", None, None, 10),
        search("staging", None, None, 10),
        search("zebra", None, None, 10),
    ];
    for since in [0, ids[3], m0, last_seq - 3, last_seq] {
        for limit in [2, 5, 100] {
            queries.push(Query::Catchup {
                since,
                convs: convs.clone(),
                limit,
                cancelled: None,
            });
        }
    }
    let nonempty = same_answers(&mut node, &mut lite, queries);
    assert!(nonempty >= 35, "the comparison is not vacuous: {nonempty}");

    // Ring up to a position: only what the hub has applied.
    let StoreEvent::QueryDone { messages, .. } = node.ask(
        1,
        Query::LoadRing {
            room: "rust".into(),
            limit: 100,
            upto: Some(ids[4]),
        },
    ) else {
        panic!()
    };
    assert!(!messages.is_empty() && messages.iter().all(|m| m.id <= ids[4]));
    assert_eq!(messages.last().unwrap().id, ids[4]);

    // Pruning change events moves the catch-up horizon: from before it is a reset.
    let c = node.write(vec![Write::PruneEvents {
        before_ts: i64::MAX,
        keep: 2,
    }]);
    assert!(c.ok);
    let StoreEvent::CatchupDone { reset, items, .. } = node.ask(
        2,
        Query::Catchup {
            since: ids[3],
            convs: convs.clone(),
            limit: 10,
            cancelled: None,
        },
    ) else {
        panic!()
    };
    assert!(reset && items.is_empty());
    let StoreEvent::CatchupDone { reset, items, .. } = node.ask(
        3,
        Query::Catchup {
            since: last_seq - 1,
            convs,
            limit: 10,
            cancelled: None,
        },
    ) else {
        panic!()
    };
    assert!(!reset);
    assert_eq!(items.len(), 1);
    let _ = m4;
    lite.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Unread counts stop at MAX_UNREAD (and so do mentions).
#[test]
fn unread_counts_are_capped() {
    let pg = Pg::start();
    let mut node = Node::open(&pg.url());
    let writes: Vec<Write> = (0..1100)
        .map(|i| room_msg("big", "alice", &format!("@bob {i}"), i, &format!("r{i}")))
        .collect();
    let c = node.write(writes);
    assert!(c.ok && c.assigned.len() == 1100);
    let StoreEvent::UnreadDone { counts, .. } = node.ask(
        1,
        Query::Unread {
            user: "bob".into(),
            names: vec!["bob".into()],
            convs: vec![UnreadQuery {
                conv: "big".into(),
                dm: false,
                read: 0,
            }],
        },
    ) else {
        panic!()
    };
    assert_eq!(counts[0].unread, store::MAX_UNREAD);
    assert_eq!(counts[0].mentions, store::MAX_UNREAD);
}

/// Two nodes append to one room at once: both buses deliver the same entries in the same
/// order, gap-free, each once, and the ids the writers were given are the entries' positions.
#[test]
fn two_nodes_share_one_log() {
    let pg = Pg::start();
    let url = pg.url();
    let a = Node::open(&url);
    let b = Node::open(&url);
    const BATCHES: usize = 30;
    const PER: usize = 20;
    let nodes: Vec<Node> = std::thread::scope(|s| {
        let run = |mut n: Node, tag: &'static str| {
            s.spawn(move || {
                for i in 0..BATCHES {
                    let writes = (0..PER)
                        .map(|j| {
                            let text = format!("{tag} {i}.{j}");
                            room_msg("rust", tag, &text, 1, &format!("{i}.{j}"))
                        })
                        .collect();
                    let c = n.write(writes);
                    assert!(c.ok && c.failed.is_empty());
                }
                n
            })
        };
        let ha = run(a, "alice");
        let hb = run(b, "bob");
        vec![ha.join().unwrap(), hb.join().unwrap()]
    });
    let total = (2 * BATCHES * PER) as i64;
    let mut nodes = nodes;
    for n in nodes.iter_mut() {
        n.wait_log(total);
        let positions: Vec<i64> = n.log.iter().map(|e| e.pos).collect();
        assert_eq!(
            positions,
            (1..=total).collect::<Vec<_>>(),
            "gap-free, once, in order"
        );
    }
    assert_eq!(nodes[0].log, nodes[1].log, "both nodes saw the same log");
    // Every id a writer was given is the position of its own message's entry.
    for n in &nodes {
        let by_pos: HashMap<i64, &LogEntry> = n.log.iter().map(|e| (e.pos, e)).collect();
        assert_eq!(n.assigned.len(), BATCHES * PER);
        for a in &n.assigned {
            assert!(!a.duplicate);
            let e = by_pos[&a.id];
            assert_eq!(e.origin, n.node_id());
            let LogEvent::Message { msg, .. } = &e.event else {
                panic!("{e:?}")
            };
            assert_eq!(msg.id, a.id);
        }
    }
}

/// A retry of a message (same sender and ref) through another node is reported as a duplicate
/// with the original's id and ts, and inserts and logs nothing; so is a repeat within a batch.
#[test]
fn dedup_retry_through_another_node_is_a_duplicate() {
    let pg = Pg::start();
    let url = pg.url();
    let mut a = Node::open(&url);
    let mut b = Node::open(&url);
    let c = a.write(vec![room_msg("rust", "alice", "hello", 111, "ref-1")]);
    assert!(c.ok);
    let original = c.assigned[0];
    assert!(!original.duplicate);
    let c = b.write(vec![
        room_msg("rust", "alice", "hello", 222, "ref-1"),
        room_msg("rust", "alice", "second", 333, "ref-2"),
        room_msg("rust", "alice", "second again", 444, "ref-2"),
    ]);
    assert!(c.ok && c.failed.is_empty(), "{c:?}");
    assert_eq!(c.assigned.len(), 3);
    let (dup, second, again) = (c.assigned[0], c.assigned[1], c.assigned[2]);
    assert!(dup.duplicate);
    assert_eq!((dup.id, dup.ts), (original.id, original.ts));
    assert!(!second.duplicate);
    assert_eq!(second.id, original.id + 1, "the duplicate took no position");
    assert!(again.duplicate);
    assert_eq!((again.id, again.ts), (second.id, 333));
    let StoreEvent::QueryDone { messages, .. } = b.ask(
        1,
        Query::History {
            target: Target::Room("rust".into()),
            before: None,
            after: None,
            limit: 10,
            cancelled: None,
        },
    ) else {
        panic!()
    };
    let texts: Vec<&str> = messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["hello", "second"]);
    for n in [&mut a, &mut b] {
        n.wait_log(second.id);
        assert_eq!(n.log.len(), 2, "{:?}", n.log);
    }
    // A node opened now knows both refs.
    let c = Node::open(&url);
    let mut refs: Vec<_> = c.loaded.dedup.clone();
    refs.sort();
    assert_eq!(
        refs,
        vec![
            ("alice".into(), "ref-1".into(), original.id, 111),
            ("alice".into(), "ref-2".into(), second.id, 333)
        ]
    );
}

/// PostgreSQL goes away mid-stream and comes back: batches during the outage fail fast as
/// `unavailable`; afterwards writes succeed again, and the bus delivers every committed entry
/// once, with no gap.
#[test]
fn postgres_restart_mid_stream() {
    let mut pg = Pg::start();
    let mut node = Node::open(&pg.url());
    let mut sent = 0;
    let mut batch = |node: &mut Node, tag: &str| {
        let writes: Vec<Write> = (0..10)
            .map(|j| {
                sent += 1;
                room_msg(
                    "rust",
                    "alice",
                    &format!("{tag} {j}"),
                    1,
                    &format!("m{sent}"),
                )
            })
            .collect();
        let t = Instant::now();
        let c = node.write(writes);
        (c, t.elapsed())
    };
    let mut committed: Vec<i64> = Vec::new();
    for _ in 0..5 {
        let (c, _) = batch(&mut node, "before");
        assert!(c.ok);
        committed.extend(c.assigned.iter().map(|a| a.id));
    }
    pg.kill();
    let down = Instant::now();
    let mut failures = 0;
    while down.elapsed() < Duration::from_secs(3) {
        let (c, took) = batch(&mut node, "during");
        assert!(!c.ok && c.unavailable, "{c:?}");
        assert!(c.assigned.is_empty());
        assert!(took < Duration::from_secs(2), "failed fast: {took:?}");
        failures += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(failures > 5);
    // A query during the outage is answered (empty), not left hanging.
    let ev = node.ask(1, Query::Message { id: committed[0] });
    assert!(
        matches!(ev, StoreEvent::MessageFound { found: None, .. }),
        "{ev:?}"
    );
    pg.restart();
    let back = Instant::now();
    loop {
        let (c, _) = batch(&mut node, "after");
        if c.ok {
            committed.extend(c.assigned.iter().map(|a| a.id));
            break;
        }
        assert!(c.unavailable);
        assert!(back.elapsed() < Duration::from_secs(15), "never recovered");
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..5 {
        let (c, _) = batch(&mut node, "after");
        assert!(c.ok, "{c:?}");
        committed.extend(c.assigned.iter().map(|a| a.id));
    }
    let top = *committed.last().unwrap();
    node.wait_log(top);
    let positions: Vec<i64> = node.log.iter().map(|e| e.pos).collect();
    assert_eq!(
        positions,
        (1..=top).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    assert_eq!(positions, committed, "exactly the committed messages");
    let ev = node.ask(2, Query::Message { id: committed[0] });
    assert!(
        matches!(ev, StoreEvent::MessageFound { found: Some(_), .. }),
        "{ev:?}"
    );
    let m = node.store.metrics();
    let reconnects = m
        .iter()
        .find(|(n, _, _)| *n == "parlor_cluster_reconnects_total")
        .unwrap()
        .2;
    assert!(reconnects >= 2.0, "writer and bus reconnected: {m:?}");
}

fn metric(node: &Node, name: &str) -> f64 {
    node.store
        .metrics()
        .iter()
        .find(|(n, _, _)| *n == name)
        .unwrap_or_else(|| panic!("no metric {name}"))
        .2
}

/// A node whose heartbeat stopped (here: a row left by a node that died an hour ago) is
/// expired by a live one: its row and presence go, and a `NodeGone` entry tells every node.
/// Presence of live nodes is loaded by a node that starts.
#[test]
fn stale_node_is_expired_and_presence_is_shared() {
    let pg = Pg::start();
    let url = pg.url();
    let short = PgOptions {
        node_ttl: Duration::from_millis(1000),
        ..PgOptions::default()
    };
    let mut a = Node::open_with(&url, short);
    let mut c = pg.client();
    let dead = "deadbeefdeadbeef";
    c.execute(
        "INSERT INTO nodes (id, started, heartbeat)
         VALUES ($1, now() - interval '2 hours', now() - interval '1 hour')",
        &[&dead],
    )
    .unwrap();
    c.execute(
        "INSERT INTO presence (node, user_key) VALUES ($1, 'zed'), ($1, 'yan')",
        &[&dead],
    )
    .unwrap();
    let online = a.write(vec![Write::Relay(LogEvent::Online {
        user_key: "alice".into(),
    })]);
    assert!(online.ok);
    a.until("the dead node's NodeGone", |n| {
        n.log
            .iter()
            .any(|e| e.event == LogEvent::NodeGone { node: dead.into() })
    });
    let left: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM nodes WHERE id = $1)
                  + (SELECT count(*) FROM presence WHERE node = $1)",
            &[&dead],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    // Heartbeats keep the live node alive well past its TTL.
    std::thread::sleep(Duration::from_millis(2500));
    let b = Node::open(&url);
    assert_eq!(
        b.loaded.cluster.as_ref().unwrap().online,
        vec![(a.node_id(), "alice".to_string())]
    );
    a.until("a peer counted", |n| {
        metric(n, "parlor_cluster_peers") == 1.0
    });
    assert!(a
        .log
        .iter()
        .all(|e| e.event != LogEvent::NodeGone { node: a.node_id() }));
    // Offline removes the presence row.
    assert!(
        a.write(vec![Write::Relay(LogEvent::Offline {
            user_key: "alice".into(),
        })])
        .ok
    );
    let rows: i64 = c
        .query_one("SELECT count(*) FROM presence", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
    // Online, NodeGone, Offline.
    a.until("three entries", |n| n.log.len() >= 3);
    assert_eq!(metric(&a, "parlor_cluster_bus_entries_total"), 3.0);
}

/// A clean shutdown commits what was submitted, then removes the node (row, presence) and
/// appends `NodeGone` for it, which the other nodes see at once.
#[test]
fn clean_shutdown_appends_node_gone() {
    let pg = Pg::start();
    let url = pg.url();
    let mut a = Node::open(&url);
    let mut b = Node::open(&url);
    let b_id = b.node_id();
    assert!(
        b.write(vec![Write::Relay(LogEvent::Online {
            user_key: "bob".into(),
        })])
        .ok
    );
    // Submitted right before shutdown: still committed.
    b.store.submit(vec![StoreReq::Write(room_msg(
        "rust", "bob", "bye", 5, "last",
    ))]);
    let t = Instant::now();
    b.store.shutdown();
    b.store.shutdown();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    b.pump();
    let last = b.commits.last().expect("the last batch was reported");
    assert!(last.ok && last.upto == 2, "{last:?}");
    a.until("b's NodeGone", |n| {
        n.log
            .iter()
            .any(|e| e.event == LogEvent::NodeGone { node: b_id.clone() })
    });
    let gone = a
        .log
        .iter()
        .find(|e| matches!(&e.event, LogEvent::NodeGone { .. }))
        .unwrap();
    assert_eq!(gone.origin, b_id);
    let mut c = pg.client();
    let left: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM nodes WHERE id = $1)
                  + (SELECT count(*) FROM presence WHERE node = $1)",
            &[&b_id],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

/// `migrate_from_sqlite` copies a populated single-node database: the cluster loads the same
/// state and answers every query like the SQLite store; new ids continue above every old one;
/// a target that already holds a chat is refused.
#[test]
fn migrate_from_sqlite_copies_everything() {
    let pg = Pg::start();
    let dir = temp_dir("migrate");
    let (mut lite, first, reserved) =
        store::open_sqlite(&dir, Durability::Normal, 1000, 0, Wake::default()).unwrap();
    let mut seq = 0;
    let dm = dm_key("alice", "bob");
    let mut writes = vec![user("alice"), user("bob")];
    writes.push(Write::InsertSession {
        hash: [7; 32],
        user_key: "alice".into(),
        created: 10,
    });
    writes.push(Write::InsertSession {
        hash: [9; 32],
        user_key: "bob".into(),
        created: 11,
    });
    writes.push(Write::TouchSession {
        hash: [7; 32],
        ts: 99,
    });
    for r in ["rust", "ops"] {
        writes.push(Write::InsertRoom {
            name: r.into(),
            created: 1,
        });
        writes.push(Write::AddMember {
            room: r.into(),
            user_key: "alice".into(),
        });
    }
    writes.push(Write::AddDmPair {
        a: "alice".into(),
        b: "bob".into(),
    });
    let mut id = first.next_id;
    for i in 0..30 {
        let mut m = if i % 5 == 4 {
            msg(
                None,
                Some("bob"),
                "alice",
                &format!("dm número {i}"),
                100 + i,
            )
        } else {
            let room = if i % 2 == 0 { "rust" } else { "ops" };
            msg(
                Some(room),
                None,
                "alice",
                &format!("mensaje número {i}"),
                100 + i,
            )
        };
        m.id = id;
        if i == 7 {
            m.reply_to = Some(id - 1);
        }
        writes.push(Write::InsertMessage {
            dm: m.to.as_ref().map(|_| dm.clone()),
            msg: m,
            dedup: Some(("alice".into(), format!("ref{i}"))),
        });
        id += 1;
    }
    let m0 = first.next_id;
    writes.extend([
        Write::EditMessage {
            id: m0,
            text: "editado".into(),
            edited_ts: 500,
            seq: id,
            conv: "rust".into(),
            dm_names: None,
        },
        Write::SetReaction {
            id: m0 + 2,
            user: "bob".into(),
            emoji: "👍".into(),
            on: true,
            seq: id + 1,
            conv: "rust".into(),
            ts: 501,
            dm_names: None,
        },
        Write::DeleteMessage {
            id: m0 + 1,
            seq: id + 2,
            conv: "ops".into(),
            ts: 502,
            dm_names: None,
        },
        Write::SetRead {
            user_key: "alice".into(),
            conv: "rust".into(),
            id: m0 + 3,
        },
        Write::SetNotify {
            user_key: "alice".into(),
            conv: "ops".into(),
            level: "none".into(),
        },
        Write::SetLastSeen {
            key: "bob".into(),
            ts: 777,
        },
    ]);
    lite_write(&mut lite, &mut seq, writes);
    let top_seq = id + 2;

    let summary = store::postgres::migrate_from_sqlite(&dir, &pg.url()).unwrap();
    assert_eq!((summary.users, summary.rooms, summary.messages), (2, 2, 30));

    let mut node = Node::open(&pg.url());
    // The same startup state as the SQLite store loads.
    lite.shutdown();
    drop(lite);
    let (mut lite, l, _) =
        store::open_sqlite(&dir, Durability::Normal, 1000, 0, Wake::default()).unwrap();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let p = &node.loaded;
    let mut users = p.users.clone();
    users.sort_by(|a, b| a.key.cmp(&b.key));
    let mut lusers = l.users.clone();
    lusers.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(users, lusers);
    let mut sessions = p.sessions.clone();
    sessions.sort();
    let mut lsessions = l.sessions.clone();
    lsessions.sort();
    assert_eq!(sessions, lsessions);
    assert!(sessions.contains(&([7; 32], "alice".into(), 99)));
    assert_eq!(sorted(p.rooms.clone()), sorted(l.rooms.clone()));
    assert_eq!(
        sorted(p.members.iter().map(|m| format!("{m:?}")).collect()),
        sorted(l.members.iter().map(|m| format!("{m:?}")).collect())
    );
    assert_eq!(p.dm_pairs, l.dm_pairs);
    assert_eq!(p.dedup, l.dedup);
    assert_eq!(
        sorted(p.conv_state.iter().map(|c| format!("{c:?}")).collect()),
        sorted(l.conv_state.iter().map(|c| format!("{c:?}")).collect())
    );
    assert!(
        p.next_id > top_seq && p.next_id >= reserved,
        "{}",
        p.next_id
    );

    let convs = vec!["rust".to_string(), "ops".to_string(), dm.clone()];
    let mut queries = Vec::new();
    for target in [
        Target::Room("rust".into()),
        Target::Room("ops".into()),
        Target::Dm(dm.clone()),
    ] {
        queries.push(Query::History {
            target,
            before: None,
            after: None,
            limit: 100,
            cancelled: None,
        });
    }
    for id in [m0, m0 + 1, m0 + 2, m0 + 7] {
        queries.push(Query::Message { id });
    }
    queries.push(Query::Catchup {
        since: 0,
        convs: convs.clone(),
        limit: 100,
        cancelled: None,
    });
    for q in ["numero", "NÚMERO 1", "editado", "\"dm numero\""] {
        queries.push(Query::Search {
            search: SearchQuery {
                fts: parlor::chat::search::fts_query(q).unwrap(),
                convs: convs.clone(),
                from: None,
                before: None,
                limit: 50,
            },
            cancelled: None,
        });
    }
    let n = queries.len();
    assert_eq!(same_answers(&mut node, &mut lite, queries), n);

    // New messages continue above every old id and seq.
    let c = node.write(vec![room_msg(
        "rust",
        "alice",
        "first in the cluster",
        9,
        "new",
    )]);
    assert!(c.ok);
    assert!(c.assigned[0].id > top_seq && c.assigned[0].id >= reserved);

    // A target that already holds a chat is refused, and left as it was.
    let e = store::postgres::migrate_from_sqlite(&dir, &pg.url()).expect_err("refused");
    assert!(
        e.to_string().contains("already has users or messages"),
        "{e}"
    );
    assert!(!e.to_string().contains(pg.password()), "{e}");
    let count: i64 = pg
        .client()
        .query_one("SELECT count(*) FROM messages", &[])
        .unwrap()
        .get(0);
    assert_eq!(count, 31);
    lite.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Timing (printed; run with `--nocapture`): one batch of 500 messages into one room, and
/// three nodes writing into one room at once, with the server's default
/// `synchronous_commit = on`. The bounds asserted are loose (a shared CI machine); the
/// figures printed are what to compare.
#[test]
fn batch_timing() {
    let pg = Pg::start();
    let url = pg.url();
    let mut node = Node::open(&url);
    let mut n = 0;
    let mut batch = |node: &mut Node, size: usize, tag: &str| {
        let writes: Vec<Write> = (0..size)
            .map(|_| {
                n += 1;
                let text = format!("message number {n} from {tag}");
                room_msg("rust", tag, &text, n as i64, &format!("r{n}"))
            })
            .collect();
        let t = Instant::now();
        let c = node.write(writes);
        assert!(c.ok && c.assigned.len() == size);
        (c.latency, t.elapsed())
    };
    // Warm up (statements, caches), then time.
    for _ in 0..3 {
        batch(&mut node, 500, "alice");
    }
    let (mut store, mut wall): (Vec<Duration>, Vec<Duration>) =
        (0..20).map(|_| batch(&mut node, 500, "alice")).unzip();
    store.sort();
    wall.sort();
    let median = store[store.len() / 2];
    eprintln!(
        "pg store: a batch of 500 messages: transaction {:.1} ms median (min {:.1}, max \
         {:.1}), submit to Committed seen {:.1} ms median: {:.0} messages/s from one node",
        median.as_secs_f64() * 1e3,
        store[0].as_secs_f64() * 1e3,
        store[store.len() - 1].as_secs_f64() * 1e3,
        wall[wall.len() / 2].as_secs_f64() * 1e3,
        500.0 / median.as_secs_f64()
    );
    assert!(median < Duration::from_secs(2), "{median:?}");
    drop(node);

    // Three nodes, each submitting batches of 100 back to back for 3 s.
    let nodes: Vec<Node> = (0..3).map(|_| Node::open(&url)).collect();
    let start = Instant::now();
    let counts: Vec<usize> = std::thread::scope(|s| {
        let hs: Vec<_> = nodes
            .into_iter()
            .enumerate()
            .map(|(k, mut node)| {
                s.spawn(move || {
                    let tag = format!("user{k}");
                    let mut sent = 0;
                    while start.elapsed() < Duration::from_secs(3) {
                        let writes: Vec<Write> = (0..100)
                            .map(|j| {
                                let r = format!("{k}-{sent}-{j}");
                                room_msg("rust", &tag, "a message of ordinary length", 1, &r)
                            })
                            .collect();
                        assert!(node.write(writes).ok);
                        sent += 100;
                    }
                    sent
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let total: usize = counts.iter().sum();
    eprintln!(
        "pg store: 3 nodes, batches of 100 into one room: {total} messages in {secs:.1} s = \
         {:.0} messages/s",
        total as f64 / secs
    );
}

/// A write whose statement fails (text PostgreSQL cannot store; an account that exists) fails
/// alone: the rest of its batch commits, takes consecutive positions, and is logged; the
/// failed ones get no position and no entry. `LoadUser` reports the stored row.
#[test]
fn one_bad_write_fails_alone() {
    let pg = Pg::start();
    let mut node = Node::open(&pg.url());
    assert!(node.write(vec![user("alice")]).ok);
    let mut taken = user("alice");
    if let Write::InsertUser { phc, .. } = &mut taken {
        *phc = "someone else's".into();
    }
    let c = node.write(vec![
        room_msg("rust", "alice", "one", 1, "a"),
        room_msg("rust", "alice", "nul \0 byte", 2, "b"),
        room_msg("rust", "alice", "three", 3, "c"),
        taken,
        user("bob"),
    ]);
    assert!(c.ok, "{c:?}");
    assert_eq!(
        c.failed,
        vec![3, 5],
        "the NUL message and the existing account"
    );
    let ids: Vec<i64> = c.assigned.iter().map(|a| a.id).collect();
    assert_eq!(ids, vec![2, 3]);
    node.wait_log(4);
    let kinds: Vec<String> = node
        .log
        .iter()
        .map(|e| match &e.event {
            LogEvent::User { key, .. } => format!("user {key}"),
            LogEvent::Message { msg, .. } => format!("message {}", msg.text),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        ["user alice", "message one", "message three", "user bob"]
    );
    node.store.submit(vec![StoreReq::LoadUser {
        key: "alice".into(),
    }]);
    let deadline = Instant::now() + WAIT;
    loop {
        match node.store.try_event() {
            Some(StoreEvent::UserChanged { key, user, .. }) => {
                assert_eq!(key, "alice");
                assert_eq!(user.unwrap().unwrap().phc, "phc-alice");
                break;
            }
            Some(_) => {}
            None => {
                assert!(Instant::now() < deadline);
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
    assert!(metric(&node, "parlor_cluster_store_rtt_seconds") > 0.0);
}

/// The server restarts while the store is idle: the next batch finds its connection closed
/// before anything was sent, reconnects and succeeds (no failed batch for an idle restart).
#[test]
fn idle_connection_survives_a_restart() {
    let mut pg = Pg::start();
    let mut node = Node::open(&pg.url());
    assert!(
        node.write(vec![room_msg("rust", "alice", "one", 1, "a")])
            .ok
    );
    pg.restart();
    let c = node.write(vec![room_msg("rust", "alice", "two", 2, "b")]);
    assert!(c.ok, "{c:?}");
    node.wait_log(2);
    assert_eq!(
        node.log.iter().map(|e| e.pos).collect::<Vec<_>>(),
        vec![1, 2]
    );
}

/// A node whose row was removed (declared gone by another node during a long pause) puts
/// its row back at its next heartbeat.
#[test]
fn node_declared_gone_registers_again() {
    let pg = Pg::start();
    let node = Node::open_with(
        &pg.url(),
        PgOptions {
            node_ttl: Duration::from_millis(500),
            ..PgOptions::default()
        },
    );
    let mut c = pg.client();
    let id = node.node_id();
    let count = |c: &mut postgres::Client| -> i64 {
        c.query_one("SELECT count(*) FROM nodes WHERE id = $1", &[&id])
            .unwrap()
            .get(0)
    };
    assert_eq!(count(&mut c), 1);
    c.execute("DELETE FROM nodes WHERE id = $1", &[&id])
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while count(&mut c) == 0 {
        assert!(Instant::now() < deadline, "never registered again");
        std::thread::sleep(Duration::from_millis(20));
    }
    let setting: String = c
        .query_one(
            "SELECT setting FROM pg_settings WHERE name = 'idle_in_transaction_session_timeout'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(setting, "0", "only the store's own sessions set it");
}
