//! Hub tests: no threads, no sockets, a fixed clock. The test plays the store and the hashing
//! workers by hand, so it decides exactly when a commit report or a query result arrives
//! relative to everything else.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};

use super::cmd::auth::token_hash;
use super::{AuthJob, AuthResult, Effect, Hub, Now};
use crate::chat::frame::decode_text_frame;
use crate::chat::protocol::ChatMessage;
use crate::chat::store::{Loaded, LoadedUser, Query, StoreEvent, StoreReq, UserChange, Write};
use crate::service::ConnId;

struct T {
    hub: Hub,
    now: Now,
    frames: HashMap<ConnId, Vec<Value>>,
    closed: HashMap<ConnId, u16>,
    /// Store requests not yet answered, in order.
    store: Vec<StoreReq>,
    /// Write sequence numbers handed out so far (the store numbers writes 1, 2, …).
    seq: u64,
    jobs: Vec<AuthJob>,
    tokens: u32,
    /// Keys of `LoadUser` requests not yet answered.
    reloads: Vec<String>,
}

/// The fake hashing worker's "hash": deterministic and checkable.
fn fake_phc(password: &str) -> String {
    format!("fake${password}")
}

/// What the store loads for users alice and bob (session tokens `tok-alice` / `tok-bob`), the
/// rooms `general` and `rust`, and `members`.
fn alice_and_bob_loaded(members: &[(&str, &str)], next_id: i64) -> Loaded {
    Loaded {
        users: vec![user("alice"), user("bob")],
        sessions: vec![
            (token_hash("tok-alice"), "alice".into(), 1_800_000_000_000),
            (token_hash("tok-bob"), "bob".into(), 1_800_000_000_000),
        ],
        rooms: vec!["general".into(), "rust".into()],
        members: members
            .iter()
            .map(|(r, u)| (r.to_string(), u.to_string()))
            .collect(),
        next_id,
        ..Loaded::default()
    }
}
fn user(key: &str) -> LoadedUser {
    LoadedUser {
        key: key.into(),
        name: key.into(),
        nick: key.into(),
        phc: fake_phc("password123"),
        last_seen: None,
        disabled: false,
    }
}

impl T {
    fn new(loaded: Loaded, flags: &[&str]) -> T {
        let mut args = vec!["parlor"];
        args.extend_from_slice(flags);
        let cfg = crate::config::Config::parse_from(args).chat;
        let now = Now {
            mono: Instant::now(),
            wall_ms: 1_800_000_000_000,
        };
        T {
            hub: Hub::new(cfg, loaded, 1_000_000, now),
            now,
            frames: HashMap::new(),
            closed: HashMap::new(),
            store: Vec::new(),
            seq: 0,
            jobs: Vec::new(),
            tokens: 0,
            reloads: Vec::new(),
        }
    }

    /// Alice and bob, members of `general` and of the existing (cold) room `rust`, each with
    /// a session token `tok-alice` / `tok-bob`.
    fn with_alice_and_bob(flags: &[&str]) -> T {
        let members = [
            ("general", "alice"),
            ("general", "bob"),
            ("rust", "alice"),
            ("rust", "bob"),
        ];
        T::new(alice_and_bob_loaded(&members, 100), flags)
    }

    /// Carries out the hub's effects into this test's records.
    fn drain(&mut self) {
        let fx = self.hub.effects();
        for e in fx.list.drain(..) {
            match e {
                Effect::Send { conn, json } => {
                    let v: Value = serde_json::from_str(&json).expect("json");
                    self.frames.entry(conn).or_default().push(v);
                }
                Effect::Broadcast {
                    frame, from, to, ..
                } => {
                    let text = decode_text_frame(&frame).expect("text frame");
                    let v: Value = serde_json::from_slice(text).expect("json");
                    for c in &fx.recipients[from..to] {
                        self.frames.entry(*c).or_default().push(v.clone());
                    }
                }
                Effect::Close { conn, code, .. } => {
                    self.closed.insert(conn, code.as_u16());
                }
                Effect::Auth(job) => self.jobs.push(job),
            }
        }
        fx.recipients.clear();
        self.store.append(&mut fx.store);
    }

    /// Connection `n` from 10.0.0.n.
    fn open(&mut self, n: u64) -> ConnId {
        self.open_from(n, [10, 0, 0, n as u8])
    }

    fn open_from(&mut self, n: u64, ip: [u8; 4]) -> ConnId {
        let c = ConnId(n);
        self.hub.handle_open(c, Some(ip.into()), self.now);
        self.drain();
        c
    }

    fn send(&mut self, c: ConnId, v: Value) {
        self.hub.handle_text(c, &v.to_string(), self.now);
        self.drain();
    }

    fn close(&mut self, c: ConnId) {
        self.hub.handle_close(c, self.now);
        self.drain();
    }

    fn take(&mut self, c: ConnId) -> Vec<Value> {
        self.frames.remove(&c).unwrap_or_default()
    }

    fn types(&mut self, c: ConnId) -> Vec<String> {
        self.take(c)
            .iter()
            .map(|v| v["type"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Runs the oldest hashing job the way a worker would.
    fn finish_one_job(&mut self) {
        let job = self.jobs.remove(0);
        self.tokens += 1;
        let token = Some(format!("token-{}", self.tokens));
        let res = match job {
            AuthJob::Hash { job, password } => AuthResult::Hashed {
                job,
                phc: Ok(fake_phc(&password)),
                token,
            },
            AuthJob::Verify { job, phc, password } => {
                let ok = phc.as_deref() == Some(fake_phc(&password).as_str());
                AuthResult::Verified {
                    job,
                    ok,
                    token: token.filter(|_| ok),
                }
            }
        };
        self.hub.handle_auth_result(res, self.now);
        self.drain();
    }

    /// Plays the store for every request so far: writes get sequence numbers, queries are
    /// answered by `answer`, and one commit report covers them all. `fail` lists writes (by
    /// their position among this batch's writes, from 0) whose statement fails.
    fn run_store(&mut self, fail: &[usize], answer: impl Fn(&Query) -> Vec<ChatMessage>) {
        self.answer_unread();
        let reqs = std::mem::take(&mut self.store);
        let mut failed = Vec::new();
        let mut writes = 0;
        let mut results = Vec::new();
        for r in reqs {
            match r {
                StoreReq::Write(_) => {
                    self.seq += 1;
                    if fail.contains(&writes) {
                        failed.push(self.seq);
                    }
                    writes += 1;
                }
                StoreReq::Query { qid, query } => results.push(StoreEvent::QueryDone {
                    qid,
                    messages: answer(&query),
                    more: false,
                }),
                StoreReq::LoadUser { key } => self.reloads.push(key),
                StoreReq::Shutdown => {}
            }
        }
        for ev in results {
            self.hub.handle_store_event(ev, self.now);
            self.drain();
        }
        self.commit_batch(self.seq, failed, writes);
        self.answer_unread();
    }

    /// Answers the unread-count queries of sign-ins at once (no unread messages), as a store
    /// that keeps up would: a commit that releases a welcome is followed by its welcome.
    fn answer_unread(&mut self) {
        loop {
            let Some(i) = self.store.iter().position(|r| {
                matches!(
                    r,
                    StoreReq::Query {
                        query: Query::Unread { .. },
                        ..
                    }
                )
            }) else {
                return;
            };
            if let StoreReq::Query {
                qid,
                query: Query::Unread { convs, .. },
            } = self.store.remove(i)
            {
                let counts = vec![Default::default(); convs.len()];
                self.hub
                    .handle_store_event(StoreEvent::UnreadDone { qid, counts }, self.now);
                self.drain();
            }
        }
    }

    fn commit(&mut self, upto: u64, failed: Vec<u64>) {
        self.commit_batch(upto, failed, 0);
        self.answer_unread();
    }

    /// A commit report for a batch of `batch` writes.
    fn commit_batch(&mut self, upto: u64, failed: Vec<u64>, batch: usize) {
        self.hub.handle_store_event(
            StoreEvent::Committed {
                upto,
                ok: true,
                failed,
                batch,
                latency: Duration::ZERO,
                assigned: Vec::new(),
                unavailable: false,
            },
            self.now,
        );
        self.drain();
    }

    /// The position among the pending writes (as `run_store`'s `fail` counts them) of the
    /// first one `is` picks.
    fn write_position(&self, is: impl Fn(&Write) -> bool) -> usize {
        self.store
            .iter()
            .filter_map(|r| match r {
                StoreReq::Write(w) => Some(w),
                _ => None,
            })
            .position(is)
            .expect("no such write pending")
    }

    fn resume(&mut self, n: u64, token: &str) -> ConnId {
        let c = self.open(n);
        self.send(c, json!({"type":"resume","token":token}));
        self.run_store(&[], |_| Vec::new());
        let f = self.take(c);
        assert_eq!(f.last().map(|v| v["type"].clone()), Some(json!("welcome")));
        c
    }
}

fn no_answer(_: &Query) -> Vec<ChatMessage> {
    Vec::new()
}

/// The string `field` of every object in the array `list`.
fn each<'a>(list: &'a Value, field: &str) -> Vec<&'a str> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|m| m[field].as_str().unwrap_or_default())
        .collect()
}

/// A client may pipeline register, join and say without waiting: they take effect in order
/// once the hash and the commits are done, and nothing is answered early.
#[test]
fn pipelined_register_join_say_run_in_order() {
    let mut t = T::new(Loaded::default(), &[]);
    let c = t.open(1);
    t.send(
        c,
        json!({"type":"register","user":"carol","password":"password123","ref":"a"}),
    );
    t.send(c, json!({"type":"join","room":"lounge","ref":"j"}));
    t.send(
        c,
        json!({"type":"say","room":"lounge","text":"hi","ref":"s"}),
    );
    assert!(t.take(c).is_empty(), "nothing before the hash is done");
    assert_eq!(t.jobs.len(), 1);
    t.finish_one_job();
    assert!(t.take(c).is_empty(), "no welcome before the commit");
    t.run_store(&[], no_answer);
    assert_eq!(t.types(c), ["welcome", "joined", "message"]);
    t.run_store(&[], no_answer);
    let acks = t.take(c);
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0]["type"], "ack");
    assert_eq!(acks[0]["ref"], "s");
}

/// A join of a cold room waits for its ring to load; messages accepted meanwhile reach the
/// joiner through the snapshot, not live, and the first live one is the next message.
#[test]
fn join_while_the_ring_loads_meets_the_live_stream_exactly() {
    let mut t = T::with_alice_and_bob(&[]);
    let a = t.resume(1, "tok-alice");
    let b = t.resume(2, "tok-bob");
    t.take(a);
    t.take(b);
    t.send(a, json!({"type":"join","room":"rust","ref":"j"}));
    let load = t.store.iter().any(|r| {
        matches!(
            r,
            StoreReq::Query {
                query: Query::LoadRing { .. },
                ..
            }
        )
    });
    assert!(load, "a cold room's ring is loaded from the store");
    // bob says something while the load is queued.
    t.send(
        b,
        json!({"type":"say","room":"rust","text":"during","ref":"b1"}),
    );
    assert!(
        t.take(a).is_empty(),
        "the joiner is not a live recipient before its snapshot"
    );
    let old = ChatMessage {
        id: 50,
        room: Some("rust".into()),
        from: "bob".into(),
        to: None,
        nick: "bob".into(),
        text: "before".into(),
        ts: 1,
        ..ChatMessage::default()
    };
    t.run_store(&[], move |q| match q {
        Query::LoadRing { .. } => vec![old.clone()],
        _ => Vec::new(),
    });
    let joined = t.take(a);
    assert_eq!(joined[0]["type"], "joined", "{joined:?}");
    assert_eq!(each(&joined[0]["history"], "text"), ["before", "during"]);
    t.send(
        b,
        json!({"type":"say","room":"rust","text":"after","ref":"b2"}),
    );
    let live = t.take(a);
    assert_eq!(live.len(), 1);
    assert_eq!(live[0]["text"], "after");
}

/// Acks wait for the commit that covers their write, in write order; a write whose statement
/// failed turns its ack into `internal`, and the ref may then be stored on retry.
#[test]
fn commit_reports_release_acks_in_order_and_a_store_failure_is_internal() {
    let mut t = T::with_alice_and_bob(&[]);
    let a = t.resume(1, "tok-alice");
    let b = t.resume(2, "tok-bob");
    t.take(a);
    t.take(b);
    t.send(
        a,
        json!({"type":"say","room":"general","text":"one","ref":"a1"}),
    );
    let first_write = t.seq + t.store.len() as u64;
    t.send(
        b,
        json!({"type":"say","room":"general","text":"two","ref":"b1"}),
    );
    assert_eq!(t.types(a), ["message", "message"]);
    assert_eq!(t.types(b), ["message", "message"]);
    // The store numbers the writes but reports only the first one committed so far.
    let reqs = std::mem::take(&mut t.store);
    let writes = reqs
        .iter()
        .filter(|r| matches!(r, StoreReq::Write(_)))
        .count() as u64;
    t.commit(first_write, Vec::new());
    assert_eq!(t.types(a), ["ack"]);
    assert!(t.take(b).is_empty(), "b's write is not committed yet");
    t.seq += writes;
    t.commit(t.seq, Vec::new());
    assert_eq!(t.types(b), ["ack"]);

    // A failed statement: the reply says so.
    t.send(
        a,
        json!({"type":"say","room":"general","text":"lost","ref":"a2"}),
    );
    t.take(a);
    let pos = t.write_position(|w| matches!(w, Write::InsertMessage { .. }));
    t.run_store(&[pos], no_answer);
    let f = t.take(a);
    assert_eq!(f[0]["code"], "internal", "{f:?}");
    assert_eq!(f[0]["ref"], "a2");
    // The retry is stored (not deduplicated against the failed one).
    t.send(
        a,
        json!({"type":"say","room":"general","text":"lost","ref":"a2"}),
    );
    assert_eq!(t.types(a), ["message"]);
    t.run_store(&[], no_answer);
    assert_eq!(t.types(a), ["ack"]);
}

/// A connection that closes while its sign-in waits for a worker: a queued job is dropped
/// without hashing, a running one's result is ignored, and neither leaves anything behind.
#[test]
fn a_connection_closing_while_its_auth_is_pending() {
    let mut t = T::with_alice_and_bob(&["--login-throttle", "2"]);
    let c1 = t.open_from(1, [10, 0, 0, 1]);
    let c2 = t.open_from(2, [10, 0, 0, 1]);
    t.send(
        c1,
        json!({"type":"login","user":"alice","password":"password123"}),
    );
    t.send(
        c2,
        json!({"type":"login","user":"alice","password":"password123"}),
    );
    assert_eq!(t.jobs.len(), 1, "one worker: one job in flight");
    assert_eq!(t.hub.hash_jobs_waiting(), 1);
    t.close(c2);
    assert_eq!(
        t.hub.hash_jobs_waiting(),
        0,
        "the queued job left with its connection"
    );
    t.close(c1);
    t.finish_one_job();
    t.run_store(&[], no_answer);
    assert!(t.take(c1).is_empty() && t.take(c2).is_empty());
    assert_eq!(
        t.hub.session_count(),
        2,
        "no session for a connection that is gone"
    );
    // Both attempts were released from the throttle: two more logins are allowed.
    let c3 = t.open_from(3, [10, 0, 0, 1]);
    t.send(
        c3,
        json!({"type":"login","user":"alice","password":"password123"}),
    );
    t.finish_one_job();
    t.run_store(&[], no_answer);
    assert_eq!(t.types(c3), ["welcome"]);
}

/// The authentication deadline and the tick use the time passed in, nothing else.
#[test]
fn auth_deadline_follows_the_given_clock() {
    let mut t = T::new(Loaded::default(), &["--auth-timeout", "5"]);
    let c = t.open(1);
    t.now.mono += Duration::from_secs(4);
    t.hub.handle_tick(t.now);
    t.drain();
    assert!(t.closed.is_empty());
    t.now.mono += Duration::from_secs(2);
    t.hub.handle_tick(t.now);
    t.drain();
    assert_eq!(t.closed.get(&c), Some(&1008));
}

/// `/healthz` through the hub: a batch whose every write failed makes the store unhealthy
/// until a batch succeeds; writes waiting past STORE_STALL with no commit report do too.
#[test]
fn store_health_follows_commit_reports() {
    let mut t = T::with_alice_and_bob(&[]);
    let a = t.resume(1, "tok-alice");
    assert_eq!(t.hub.store_health(t.now.mono), Ok(()));
    let say = |t: &mut T, r: &str| {
        t.send(a, json!({"type":"say","room":"general","text":"x","ref":r}));
        t.take(a);
    };
    say(&mut t, "1");
    let writes = t
        .store
        .iter()
        .filter(|r| matches!(r, StoreReq::Write(_)))
        .count();
    t.run_store(&(0..writes).collect::<Vec<_>>(), no_answer);
    let e = t.hub.store_health(t.now.mono).unwrap_err();
    assert!(e.contains("failed"), "{e}");
    say(&mut t, "2");
    t.run_store(&[], no_answer);
    assert_eq!(t.hub.store_health(t.now.mono), Ok(()));

    // Waiting writes are normal for a while; with no commit for STORE_STALL, unhealthy.
    say(&mut t, "3");
    let later = t.now.mono + super::STORE_STALL - Duration::from_secs(1);
    assert_eq!(t.hub.store_health(later), Ok(()));
    let e = t
        .hub
        .store_health(t.now.mono + super::STORE_STALL)
        .unwrap_err();
    assert!(e.contains("no commit"), "{e}");
    t.run_store(&[], no_answer);
    assert_eq!(t.hub.store_health(t.now.mono + super::STORE_STALL), Ok(()));
}

// ----- accounts changed by an operator (`parlor user …`, cmd/accounts.rs) -------------------

/// `welcome`, or the code of each `error`, of these frames (presence aside).
fn outcomes(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .filter(|v| v["type"] != "presence")
        .map(|v| match v["type"].as_str() {
            Some("error") => v["code"].as_str().unwrap_or_default().to_string(),
            t => t.unwrap_or_default().to_string(),
        })
        .collect()
}

fn row(key: &str, password: &str, disabled: bool) -> LoadedUser {
    LoadedUser {
        phc: fake_phc(password),
        disabled,
        ..user(key)
    }
}

impl T {
    /// The store reports an operator's change of `row.key`.
    fn changed(&mut self, change: UserChange, row: LoadedUser) {
        let key = row.key.clone();
        self.hub
            .handle_user_changed(change, key, Ok(Some(row)), self.now);
        self.drain();
    }

    fn login(&mut self, n: u64, user: &str, password: &str) -> ConnId {
        let c = self.open(n);
        self.send(
            c,
            json!({"type":"login","user":user,"password":password,"ref":"l"}),
        );
        c
    }

    /// Errors and welcomes `c` got, as `welcome` or the error code.
    fn outcome(&mut self, c: ConnId) -> Vec<String> {
        let frames = self.take(c);
        outcomes(&frames)
    }

    /// A login on a new connection `n`, run to its end (its hash, if one was queued, and the
    /// store): the frames it got, presence aside.
    fn sign_in(&mut self, n: u64, user: &str, password: &str) -> Vec<Value> {
        let c = self.login(n, user, password);
        if !self.jobs.is_empty() {
            self.finish_one_job();
        }
        self.run_store(&[], no_answer);
        let mut frames = self.take(c);
        frames.retain(|v| v["type"] != "presence");
        frames
    }

    fn wrote(&self, f: impl Fn(&Write) -> bool) -> bool {
        self.store
            .iter()
            .any(|r| matches!(r, StoreReq::Write(w) if f(w)))
    }
}

/// `parlor user disable`: every connection of the account gets `account_disabled` and close
/// 1008, its tokens are forgotten, and sign-ins are refused until `enable`.
#[test]
fn operator_disable_closes_connections_and_refuses_sign_in() {
    let mut t = T::with_alice_and_bob(&[]);
    let a1 = t.resume(1, "tok-alice");
    let a2 = t.resume(2, "tok-alice");
    let b = t.resume(3, "tok-bob");
    t.take(a1);
    t.take(a2);
    t.take(b);
    assert_eq!(t.hub.session_count(), 2);
    t.changed(UserChange::Disabled, row("alice", "password123", true));
    for c in [a1, a2] {
        let f = t.take(c);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0]["code"], "account_disabled");
        assert_eq!(t.closed.get(&c), Some(&1008));
    }
    assert!(!t.closed.contains_key(&b));
    assert_eq!(t.hub.session_count(), 1, "alice's token is forgotten");
    assert!(t.wrote(|w| matches!(w, Write::DeleteUserSessions { user_key } if user_key == "alice")));
    // A closing connection's frames are ignored.
    t.send(a1, json!({"type":"say","room":"general","text":"x"}));
    assert!(t.take(a1).is_empty());
    t.run_store(&[], no_answer);

    let l = t.login(4, "alice", "password123");
    assert!(t.jobs.is_empty(), "refused before any hashing");
    assert_eq!(t.outcome(l), ["account_disabled"]);
    let r = t.open(5);
    t.send(r, json!({"type":"resume","token":"tok-alice"}));
    assert_eq!(t.outcome(r), ["auth_failed"], "the token was revoked");

    t.changed(UserChange::Enabled, row("alice", "password123", false));
    assert!(!t.closed.contains_key(&b) && t.take(b).is_empty());
    assert_eq!(outcomes(&t.sign_in(6, "alice", "password123")), ["welcome"]);
}

/// `parlor user passwd`: connections close with 1000, a login verified against the old
/// password (in flight, or waiting for its commit) is refused, the new password works.
#[test]
fn operator_password_change_ends_sessions_and_sign_ins_in_flight() {
    let mut t = T::with_alice_and_bob(&[]);
    let a = t.resume(1, "tok-alice");
    t.take(a);
    // One login hashing, one verified and waiting for its session to commit.
    let waiting = t.login(2, "alice", "password123");
    t.finish_one_job();
    assert!(t.take(waiting).is_empty());
    let hashing = t.login(3, "alice", "password123");
    assert_eq!(t.jobs.len(), 1);

    t.changed(UserChange::Password, row("alice", "new password", false));
    assert!(t.take(a).is_empty(), "no error frame, only the close");
    assert_eq!(t.closed.get(&a), Some(&1000));
    t.run_store(&[], no_answer);
    assert_eq!(
        t.outcome(waiting),
        ["auth_failed"],
        "its session was revoked"
    );
    t.finish_one_job();
    assert_eq!(
        t.outcome(hashing),
        ["auth_failed"],
        "checked the old password"
    );
    assert_eq!(t.hub.session_count(), 1, "only bob's");

    let old = t.sign_in(4, "alice", "password123");
    assert_eq!(outcomes(&old), ["auth_failed"]);
    assert_eq!(
        outcomes(&t.sign_in(5, "alice", "new password")),
        ["welcome"]
    );
}

/// `parlor user add`: the account can sign in at once, joins `general` in front of its
/// members, and its name (and look-alikes) can no longer be registered.
#[test]
fn operator_added_account_signs_in_and_holds_its_name() {
    let mut t = T::with_alice_and_bob(&[]);
    let a = t.resume(1, "tok-alice");
    t.take(a);
    t.changed(UserChange::Added, row("carol", "carol pass", false));
    let f = t.take(a);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(
        (&f[0]["event"], &f[0]["room"], &f[0]["user"]),
        (&json!("join"), &json!("general"), &json!("carol"))
    );
    // The command stored the account and its membership; the hub only adds where the
    // newcomer has read `general` up to (its history is not unread).
    assert!(
        t.store
            .iter()
            .all(|r| matches!(r, StoreReq::Write(Write::SetRead { .. }))),
        "the command stored it already"
    );
    let w = t.sign_in(2, "carol", "carol pass");
    assert_eq!(w[0]["type"], "welcome");
    assert_eq!(w[0]["rooms"], json!(["general"]));
    for name in ["Carol", "caro1"] {
        let r = t.open(3);
        t.send(
            r,
            json!({"type":"register","user":name,"password":"password123"}),
        );
        assert_eq!(t.outcome(r), ["user_taken"], "{name}");
    }
}

/// A `register` checked before `parlor user add` of the same name committed: its account row
/// fails to store (no INSERT OR REPLACE), so it gets no token, its session row is deleted,
/// the hub reloads the row and adopts the operator's account, and the client is told
/// `user_taken`. Both orders of the operator's change report and the failed commit.
#[test]
fn registration_racing_an_operator_add_gets_user_taken() {
    for change_first in [false, true] {
        let mut t = T::with_alice_and_bob(&[]);
        let c = t.open(1);
        t.send(
            c,
            json!({"type":"register","user":"Dave","password":"racer pass","ref":"r"}),
        );
        t.finish_one_job();
        if change_first {
            t.changed(UserChange::Added, row("dave", "operator pass", false));
        }
        let insert = t.write_position(|w| matches!(w, Write::InsertUser { .. }));
        t.run_store(&[insert], no_answer);
        assert!(
            t.take(c).is_empty(),
            "no welcome, no verdict before the reload"
        );
        assert!(t
            .store
            .iter()
            .any(|r| matches!(r, StoreReq::LoadUser { key } if key == "dave")));
        assert!(t.wrote(|w| matches!(w, Write::DeleteSession { .. })));
        assert_eq!(t.hub.session_count(), 2, "the racer's session is gone");
        if !change_first {
            // Until the reload answers, the racer's password is worth nothing.
            let l = t.login(2, "dave", "racer pass");
            t.finish_one_job();
            assert_eq!(t.outcome(l), ["auth_failed"]);
        }
        let stored = row("dave", "operator pass", false);
        t.hub
            .handle_user_changed(UserChange::Reloaded, "dave".into(), Ok(Some(stored)), t.now);
        t.drain();
        let f = t.take(c);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(
            (&f[0]["code"], &f[0]["ref"]),
            (&json!("user_taken"), &json!("r"))
        );
        t.run_store(&[], no_answer);
        let racer = t.sign_in(3, "dave", "racer pass");
        assert_eq!(
            outcomes(&racer),
            ["auth_failed"],
            "change_first {change_first}"
        );
        let w = t.sign_in(4, "dave", "operator pass");
        assert_eq!(outcomes(&w), ["welcome"]);
        assert_eq!(w[0]["user"], "dave", "the operator's spelling");
        assert!(t.hub.is_idle());
    }
}

/// A registration whose row did not store and that no one else holds (a store failure): the
/// reload finds nothing, the client gets `internal`, and nothing of the name is left.
#[test]
fn registration_whose_row_never_stored_leaves_nothing_behind() {
    let mut t = T::with_alice_and_bob(&[]);
    let a = t.resume(9, "tok-alice");
    let c = t.open(1);
    t.send(
        c,
        json!({"type":"register","user":"erin","password":"password123"}),
    );
    t.finish_one_job();
    let insert = t.write_position(|w| matches!(w, Write::InsertUser { .. }));
    t.run_store(&[insert], no_answer);
    t.hub
        .handle_user_changed(UserChange::Reloaded, "erin".into(), Ok(None), t.now);
    t.drain();
    assert_eq!(t.outcome(c), ["internal"]);
    assert!(t.wrote(
        |w| matches!(w, Write::RemoveMember { room, user_key } if room == "general" && user_key == "erin")
    ));
    t.run_store(&[], no_answer);
    t.take(a);
    t.send(a, json!({"type":"who","room":"general","ref":"w"}));
    let who = t.take(a);
    assert_eq!(each(&who[0]["members"], "user"), ["alice", "bob"]);
    // The name is free again.
    t.send(
        c,
        json!({"type":"register","user":"erin","password":"password123"}),
    );
    t.finish_one_job();
    t.run_store(&[], no_answer);
    assert_eq!(t.outcome(c), ["welcome"]);
}

// ----- cluster mode: two hubs and a fake PostgreSQL (the log, its positions, dedup) -----------

/// Plays PostgreSQL for several hubs: each hub's writes get log positions in the order the
/// "database" takes them, messages and changes their ids from them, retried refs are
/// reported as duplicates; every hub then reads the log.
struct FakeCluster {
    nodes: Vec<T>,
    log: Vec<crate::chat::store::cluster::LogEntry>,
    /// How far each node has read the log.
    read: Vec<usize>,
    refs: HashMap<(String, String), (i64, i64)>,
}

impl FakeCluster {
    fn new(n: usize) -> FakeCluster {
        use crate::chat::store::cluster::ClusterLoaded;
        let nodes = (0..n)
            .map(|i| {
                let mut t = T::with_alice_and_bob(&[]);
                let members = [("general", "alice"), ("general", "bob")];
                let loaded = Loaded {
                    cluster: Some(ClusterLoaded {
                        node: format!("n{i}"),
                        log_pos: 0,
                        online: Vec::new(),
                    }),
                    ..alice_and_bob_loaded(&members, 1)
                };
                let cfg = t.hub.cfg.clone();
                t.hub = Hub::new(cfg, loaded, i64::MAX, t.now);
                t
            })
            .collect();
        FakeCluster {
            nodes,
            log: Vec::new(),
            read: vec![0; n],
            refs: HashMap::new(),
        }
    }

    /// Commits node `i`'s queued requests (one batch) and reports it to that node.
    fn commit(&mut self, i: usize) {
        use crate::chat::store::cluster::{Assigned, LogEntry, LogEvent};
        let t = &mut self.nodes[i];
        t.answer_unread();
        let reqs = std::mem::take(&mut t.store);
        let mut assigned = Vec::new();
        let mut results = Vec::new();
        let mut writes = 0;
        for r in reqs {
            match r {
                StoreReq::Write(w) => {
                    t.seq += 1;
                    writes += 1;
                    let Some(mut ev) = LogEvent::of_write(&w) else {
                        continue;
                    };
                    let pos = self.log.len() as i64 + 1;
                    if let LogEvent::Message {
                        msg,
                        sender,
                        reference: Some(r),
                        ..
                    } = &mut ev
                    {
                        if let Some(&(id, ts)) = self.refs.get(&(sender.clone(), r.clone())) {
                            assigned.push(Assigned {
                                write: t.seq,
                                id,
                                ts,
                                duplicate: true,
                            });
                            continue;
                        }
                        self.refs.insert((sender.clone(), r.clone()), (pos, msg.ts));
                    }
                    if let LogEvent::Message { msg, .. } = &mut ev {
                        msg.id = pos;
                    }
                    if ev.takes_position() {
                        assigned.push(Assigned {
                            write: t.seq,
                            id: pos,
                            ts: 0,
                            duplicate: false,
                        });
                    }
                    self.log.push(LogEntry {
                        pos,
                        origin: format!("n{i}"),
                        event: ev,
                    });
                }
                StoreReq::Query {
                    qid,
                    query: Query::Message { id },
                } => {
                    let found = self.log.iter().find_map(|e| match &e.event {
                        LogEvent::Message { msg, dm, .. } if e.pos == id => {
                            Some(crate::chat::store::StoredMessage {
                                msg: msg.clone().into_message(),
                                dm: dm.clone(),
                                edits: 0,
                            })
                        }
                        _ => None,
                    });
                    results.push(StoreEvent::MessageFound { qid, found });
                }
                StoreReq::Query { qid, .. } => results.push(StoreEvent::QueryDone {
                    qid,
                    messages: Vec::new(),
                    more: false,
                }),
                StoreReq::LoadUser { .. } | StoreReq::Shutdown => {}
            }
        }
        for ev in results {
            t.hub.handle_store_event(ev, t.now);
            t.drain();
        }
        t.hub.handle_store_event(
            StoreEvent::Committed {
                upto: t.seq,
                ok: true,
                failed: Vec::new(),
                batch: writes,
                latency: Duration::ZERO,
                assigned,
                unavailable: false,
            },
            t.now,
        );
        t.drain();
        t.answer_unread();
    }

    /// Node `by` found node `gone`'s heartbeat expired: the log says so.
    fn node_gone_noticed_by(&mut self, by: usize, gone: usize) {
        use crate::chat::store::cluster::{LogEntry, LogEvent};
        let pos = self.log.len() as i64 + 1;
        self.log.push(LogEntry {
            pos,
            origin: format!("n{by}"),
            event: LogEvent::NodeGone {
                node: format!("n{gone}"),
            },
        });
    }

    /// Node `i` reads what the log has for it.
    fn tail(&mut self, i: usize) {
        let entries = self.log[self.read[i]..].to_vec();
        self.read[i] = self.log.len();
        let t = &mut self.nodes[i];
        t.hub.handle_store_event(StoreEvent::Log(entries), t.now);
        t.drain();
    }

    /// Commits and tails everywhere until nothing is left to do.
    fn settle(&mut self) {
        for _ in 0..5 {
            for i in 0..self.nodes.len() {
                self.commit(i);
            }
            for i in 0..self.nodes.len() {
                self.tail(i);
            }
        }
    }

    /// Lets `d` pass on every node and runs their ticks.
    fn tick_after(&mut self, d: Duration) {
        for t in &mut self.nodes {
            t.now.mono += d;
            t.now.wall_ms += d.as_millis() as i64;
            t.hub.handle_tick(t.now);
            t.drain();
        }
    }

    fn resume(&mut self, i: usize, n: u64, token: &str) -> ConnId {
        let c = self.nodes[i].open(n);
        self.nodes[i].send(c, json!({"type":"resume","token":token}));
        self.settle();
        let f = self.nodes[i].take(c);
        assert!(f.iter().any(|v| v["type"] == "welcome"), "{f:?}");
        c
    }
}

/// Two nodes: messages are delivered from the log only, in log order on both nodes (also
/// on the sender's own node); acks carry the log position; presence and joins cross nodes.
#[test]
fn cluster_nodes_deliver_in_log_order_and_share_presence() {
    let mut cl = FakeCluster::new(2);
    let a = cl.resume(0, 1, "tok-alice");
    cl.nodes[0].take(a);
    let b = cl.resume(1, 2, "tok-bob");
    let f = cl.nodes[0].take(a);
    assert!(
        f.iter()
            .any(|v| v["type"] == "presence" && v["user"] == "bob" && v["event"] == "online"),
        "alice (node 0) did not see bob (node 1) come online: {f:?}"
    );
    cl.nodes[1].take(b);
    cl.nodes[0].send(
        a,
        json!({"type":"say","room":"general","text":"one","ref":"a1"}),
    );
    cl.nodes[1].send(
        b,
        json!({"type":"say","room":"general","text":"two","ref":"b1"}),
    );
    assert!(
        cl.nodes[0].take(a).is_empty(),
        "nothing is delivered before the log has it"
    );
    // Node 1 commits first: its message gets the lower id everywhere.
    cl.commit(1);
    cl.commit(0);
    cl.tail(0);
    cl.tail(1);
    let fa = cl.nodes[0].take(a);
    let fb = cl.nodes[1].take(b);
    let msgs = |f: &[Value]| -> Vec<(i64, String)> {
        f.iter()
            .filter(|v| v["type"] == "message")
            .map(|v| {
                (
                    v["id"].as_i64().unwrap(),
                    v["text"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    assert_eq!(msgs(&fa), msgs(&fb));
    assert_eq!(
        msgs(&fa).iter().map(|m| m.1.as_str()).collect::<Vec<_>>(),
        ["two", "one"]
    );
    let ack = fa.iter().find(|v| v["type"] == "ack").expect("ack");
    assert_eq!(ack["id"].as_i64(), Some(msgs(&fa)[1].0));

    // A retry of a1 on node 1 (alice resumed there) is answered with the original ack.
    let a2 = cl.resume(1, 3, "tok-alice");
    cl.nodes[1].send(
        a2,
        json!({"type":"say","room":"general","text":"one","ref":"a1"}),
    );
    let f = cl.nodes[1].take(a2);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(
        (f[0]["type"].clone(), f[0]["id"].clone()),
        (json!("ack"), ack["id"].clone())
    );

    // bob closes his only connection on node 1: alice is told he is offline; alice's second
    // connection on node 1 does not make her flap.
    cl.nodes[0].take(a);
    cl.nodes[1].close(b);
    cl.settle();
    assert!(
        !cl.nodes[0].take(a).iter().any(|v| v["type"] == "presence"),
        "offline is only announced after the grace"
    );
    cl.tick_after(Duration::from_secs(2));
    let f = cl.nodes[0].take(a);
    assert!(
        f.iter()
            .any(|v| v["type"] == "presence" && v["user"] == "bob" && v["event"] == "offline"),
        "{f:?}"
    );
    assert!(
        !f.iter()
            .any(|v| v["type"] == "presence" && v["user"] == "alice"),
        "{f:?}"
    );

    // A join on node 1 of a room created on node 0 tells node 0's members.
    cl.nodes[0].send(a, json!({"type":"join","room":"ops","ref":"j"}));
    cl.settle();
    cl.nodes[0].take(a);
    let c = cl.resume(1, 4, "tok-bob");
    cl.nodes[1].send(c, json!({"type":"join","room":"ops","ref":"j"}));
    cl.settle();
    let f = cl.nodes[0].take(a);
    assert!(
        f.iter()
            .any(|v| v["type"] == "presence" && v["event"] == "join" && v["room"] == "ops"),
        "{f:?}"
    );
    // An edit on node 1 reaches node 0 with the log's seq.
    let first = msgs(&fa)[0].0;
    cl.nodes[1].send(c, json!({"type":"edit","id":first,"text":"two!","ref":"e"}));
    cl.settle();
    let f = cl.nodes[0].take(a);
    let edited = f.iter().find(|v| v["type"] == "edited");
    assert!(edited.is_some(), "{f:?}");
}

/// A node that is gone (its heartbeat expired) takes its users offline for the others.
#[test]
fn cluster_node_gone_takes_its_users_offline() {
    let mut cl = FakeCluster::new(2);
    let a = cl.resume(0, 1, "tok-alice");
    let _b = cl.resume(1, 2, "tok-bob");
    cl.nodes[0].take(a);
    cl.node_gone_noticed_by(0, 1);
    cl.tail(0);
    cl.tick_after(Duration::from_secs(2));
    let f = cl.nodes[0].take(a);
    assert!(
        f.iter()
            .any(|v| v["type"] == "presence" && v["user"] == "bob" && v["event"] == "offline"),
        "{f:?}"
    );
}

/// A user moving between nodes, whose "closed" on one node the log orders before its
/// "opened" on the other: the others see no offline (the grace covers the gap).
#[test]
fn cluster_move_between_nodes_does_not_flap() {
    let mut cl = FakeCluster::new(3);
    let b = cl.resume(2, 1, "tok-bob");
    let a1 = cl.resume(0, 2, "tok-alice");
    cl.nodes[2].take(b);
    // alice opens on node 1 and closes on node 0; node 0 commits first.
    let a2 = cl.nodes[1].open(3);
    cl.nodes[1].send(a2, json!({"type":"resume","token":"tok-alice"}));
    cl.nodes[0].close(a1);
    cl.commit(0);
    for i in 0..3 {
        cl.tail(i);
    }
    cl.settle();
    cl.tick_after(Duration::from_secs(2));
    let f = cl.nodes[2].take(b);
    assert!(
        !f.iter()
            .any(|v| v["type"] == "presence" && v["user"] == "alice"),
        "alice flapped: {f:?}"
    );
    // Her last connection closes: offline once, after the grace.
    cl.nodes[1].close(a2);
    cl.settle();
    cl.tick_after(Duration::from_secs(2));
    let f = cl.nodes[2].take(b);
    let offline: Vec<_> = f
        .iter()
        .filter(|v| v["type"] == "presence" && v["user"] == "alice")
        .collect();
    assert_eq!(offline.len(), 1, "{f:?}");
    assert_eq!(offline[0]["event"], "offline");
}

/// A node declared gone while it still runs (a stall) announces its users again: the others
/// do not see them go offline if that happens within the grace.
#[test]
fn cluster_node_declared_gone_announces_its_users_again() {
    use crate::chat::store::cluster::LogEvent;
    let mut cl = FakeCluster::new(2);
    let a = cl.resume(0, 1, "tok-alice");
    let _b = cl.resume(1, 2, "tok-bob");
    cl.nodes[0].take(a);
    cl.node_gone_noticed_by(0, 1);
    cl.settle();
    cl.tick_after(Duration::from_secs(2));
    let f = cl.nodes[0].take(a);
    assert!(
        !f.iter()
            .any(|v| v["type"] == "presence" && v["user"] == "bob"),
        "bob flapped: {f:?}"
    );
    assert!(cl.log.iter().any(|e| e.origin == "n1"
        && matches!(&e.event, LogEvent::Online { user_key } if user_key == "bob")));
}
