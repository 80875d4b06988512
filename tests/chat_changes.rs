//! Edits, deletes, reactions, replies and `catchup` over real sockets: authorship, visibility,
//! idempotent reactions, the deleted text gone from the database files, retention and reset,
//! and the catch-up equivalence property (a client that was away and catches up ends in
//! exactly the state of one that never left), over random sequences of changes.

mod chat_common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chat_common::*;
use serde_json::{json, Value};

/// Frames until one satisfies `pred`; returns it and the frames before it.
fn until(c: &mut Client, pred: impl Fn(&Value) -> bool) -> (Value, Vec<Value>) {
    let mut before = Vec::new();
    loop {
        let v = c.recv();
        if pred(&v) {
            return (v, before);
        }
        before.push(v);
    }
}

/// The reply to the request carrying `r`.
fn reply(c: &mut Client, r: &str) -> Value {
    until(c, |v| v["ref"] == r).0
}

fn of_type(c: &mut Client, ty: &str) -> Value {
    until(c, |v| v["type"] == ty).0
}

fn send_wait(c: &mut Client, mut v: Value, r: &str) -> Value {
    v["ref"] = r.into();
    c.send(v);
    reply(c, r)
}

fn join(c: &mut Client, room: &str) {
    let r = format!("join-{room}");
    let v = send_wait(c, json!({"type":"join","room":room}), &r);
    assert_eq!(v["type"], "joined", "{v}");
}

fn say(c: &mut Client, room: &str, text: &str, r: &str) -> i64 {
    let v = send_wait(c, json!({"type":"say","room":room,"text":text}), r);
    assert_eq!(v["type"], "ack", "{v}");
    v["id"].as_i64().expect("id")
}

/// Message `id` as the newest page of `room`'s history shows it.
fn in_history(c: &mut Client, room: &str, id: i64) -> Value {
    let h = send_wait(c, json!({"type":"history","room":room}), "in-history");
    let found = h["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["id"] == id);
    found.cloned().unwrap_or_else(|| panic!("{id} not in {h}"))
}

fn code(v: &Value) -> &str {
    assert_eq!(v["type"], "error", "{v}");
    v["code"].as_str().unwrap_or_default()
}

fn server(dir: &TempDir, extra: &[&str]) -> Server {
    let mut args = vec!["--rate-limit", "0", "--query-rate", "0"];
    args.extend_from_slice(extra);
    Server::spawn(&dir.0.join("data"), &args)
}

#[test]
fn edit_delete_react_and_reply_follow_authorship_and_visibility() {
    let dir = TempDir::new("changes-rules");
    let s = server(&dir, &[]);
    let (mut alice, _) = Client::register(&s.addr, "alice");
    let (mut bob, _) = Client::register(&s.addr, "bob");
    let (mut carol, _) = Client::register(&s.addr, "carol");
    join(&mut alice, "rust");
    join(&mut bob, "rust");

    let m1 = say(&mut alice, "rust", "frist", "s1");
    let at_bob = until(&mut bob, |v| v["type"] == "message" && v["id"] == m1).0;
    assert_eq!(at_bob["seq"], m1, "a message's seq is its id");

    // A reply carries reply_to; one to a message of another conversation is refused.
    let v = send_wait(
        &mut bob,
        json!({"type":"say","room":"rust","text":"typo?","reply_to":m1}),
        "s2",
    );
    assert_eq!(v["type"], "ack");
    let reply_msg = until(&mut alice, |v| {
        v["type"] == "message" && v["reply_to"] == m1
    })
    .0;
    assert_eq!(reply_msg["text"], "typo?");
    let g = say(&mut carol, "general", "elsewhere", "s3");
    let v = send_wait(
        &mut bob,
        json!({"type":"say","room":"rust","text":"x","reply_to":g}),
        "s4",
    );
    assert_eq!(code(&v), "bad_request");

    // Only the author edits; everyone in the room sees it with a seq above the message's.
    let v = send_wait(&mut bob, json!({"type":"edit","id":m1,"text":"hack"}), "e0");
    assert_eq!(code(&v), "forbidden");
    let v = send_wait(
        &mut carol,
        json!({"type":"edit","id":m1,"text":"hack"}),
        "e1",
    );
    assert_eq!(
        code(&v),
        "not_found",
        "not a member: same answer as no message"
    );
    let v = send_wait(
        &mut carol,
        json!({"type":"edit","id":999_999,"text":"x"}),
        "e2",
    );
    assert_eq!(code(&v), "not_found");
    let ack = send_wait(
        &mut alice,
        json!({"type":"edit","id":m1,"text":"first"}),
        "e3",
    );
    assert_eq!(ack["type"], "ack", "{ack}");
    let seq = ack["seq"].as_i64().expect("seq");
    assert!(seq > m1);
    let ed = of_type(&mut bob, "edited");
    assert_eq!(ed["id"], m1);
    assert_eq!(ed["room"], "rust");
    assert_eq!(ed["text"], "first");
    assert_eq!(ed["seq"], seq);
    assert!(ed["edited_ts"].as_i64().is_some());

    // Reactions: anyone who can see it; repeating is a no-op; off removes.
    let v = send_wait(
        &mut carol,
        json!({"type":"react","id":m1,"emoji":"👍","on":true}),
        "r0",
    );
    assert_eq!(code(&v), "not_found");
    let ack = send_wait(
        &mut bob,
        json!({"type":"react","id":m1,"emoji":"👍","on":true}),
        "r1",
    );
    assert!(ack["seq"].as_i64().is_some(), "{ack}");
    let re = of_type(&mut alice, "reaction");
    assert_eq!(
        (&re["user"], &re["emoji"], &re["on"]),
        (&json!("bob"), &json!("👍"), &json!(true))
    );
    let again = send_wait(
        &mut bob,
        json!({"type":"react","id":m1,"emoji":"👍","on":true}),
        "r2",
    );
    assert_eq!(again["type"], "ack");
    assert!(again.get("seq").is_none(), "no change, no event: {again}");
    for bad in ["", "👍 👍", "123456789"] {
        let v = send_wait(
            &mut bob,
            json!({"type":"react","id":m1,"emoji":bad,"on":true}),
            "r3",
        );
        assert_eq!(code(&v), "bad_request", "{bad:?}");
    }
    // History carries the current state.
    let m = in_history(&mut bob, "rust", m1);
    assert_eq!(m["text"], "first");
    assert!(m["edited_ts"].is_i64());
    assert_eq!(m["reactions"], json!([{"emoji":"👍","users":["bob"]}]));
    let off = send_wait(
        &mut bob,
        json!({"type":"react","id":m1,"emoji":"👍","on":false}),
        "r4",
    );
    assert!(off["seq"].is_i64());
    until(&mut alice, |v| v["type"] == "reaction" && v["on"] == false);

    // Delete: only the author; then the message is a tombstone and cannot change.
    let v = send_wait(&mut bob, json!({"type":"delete","id":m1}), "d0");
    assert_eq!(code(&v), "forbidden");
    let ack = send_wait(&mut alice, json!({"type":"delete","id":m1}), "d1");
    assert!(ack["seq"].is_i64(), "{ack}");
    let del = of_type(&mut bob, "deleted");
    assert_eq!((&del["id"], &del["room"]), (&json!(m1), &json!("rust")));
    for (by_alice, v) in [
        (true, json!({"type":"edit","id":m1,"text":"again"})),
        (true, json!({"type":"delete","id":m1})),
        (
            false,
            json!({"type":"react","id":m1,"emoji":"👍","on":true}),
        ),
    ] {
        let c = if by_alice { &mut alice } else { &mut bob };
        let v = send_wait(c, v, "x");
        assert_eq!(code(&v), "not_found");
    }
    let m = in_history(&mut bob, "rust", m1);
    assert_eq!(m["deleted"], true);
    assert!(m.get("text").is_none(), "{m}");
}

#[test]
fn dm_changes_reach_both_people_and_nobody_else() {
    let dir = TempDir::new("changes-dm");
    let s = server(&dir, &[]);
    let (mut alice, _) = Client::register(&s.addr, "alice");
    let (mut bob, _) = Client::register(&s.addr, "bob");
    let (mut carol, _) = Client::register(&s.addr, "carol");
    let v = send_wait(
        &mut alice,
        json!({"type":"dm","to":"bob","text":"psst"}),
        "m",
    );
    let id = v["id"].as_i64().unwrap();
    for v in [
        json!({"type":"react","id":id,"emoji":"👀","on":true}),
        json!({"type":"edit","id":id,"text":"x"}),
        json!({"type":"delete","id":id}),
    ] {
        let v = send_wait(&mut carol, v, "c");
        assert_eq!(code(&v), "not_found");
    }
    send_wait(
        &mut bob,
        json!({"type":"react","id":id,"emoji":"👀","on":true}),
        "b",
    );
    let re = of_type(&mut alice, "reaction");
    assert_eq!((&re["from"], &re["to"]), (&json!("alice"), &json!("bob")));
    // A reply in the DM is fine; the same id from another DM is not.
    let v = send_wait(
        &mut bob,
        json!({"type":"dm","to":"alice","text":"yes","reply_to":id}),
        "rp",
    );
    assert_eq!(v["type"], "ack", "{v}");
    let v = send_wait(
        &mut bob,
        json!({"type":"dm","to":"carol","text":"no","reply_to":id}),
        "rq",
    );
    assert_eq!(code(&v), "bad_request");
    send_wait(&mut alice, json!({"type":"delete","id":id}), "d");
    let del = of_type(&mut bob, "deleted");
    assert_eq!((&del["from"], &del["to"]), (&json!("alice"), &json!("bob")));
    // Carol saw none of it.
    carol.send(json!({"type":"rooms","ref":"silence"}));
    let (_, before) = until(&mut carol, |v| v["ref"] == "silence");
    assert!(before.iter().all(|v| v["id"] != id), "carol got {before:?}");
}

#[test]
fn changes_to_old_messages_work_after_a_restart() {
    let dir = TempDir::new("changes-restart");
    let s = server(&dir, &[]);
    let (mut alice, token) = Client::register(&s.addr, "alice");
    let id = say(&mut alice, "general", "old", "s");
    drop(alice);
    s.stop();
    let s = server(&dir, &["--max-edits", "2"]);
    let mut alice = Client::resume(&s.addr, &token);
    for (i, t) in ["one", "two"].iter().enumerate() {
        let v = send_wait(
            &mut alice,
            json!({"type":"edit","id":id,"text":t}),
            &format!("e{i}"),
        );
        assert_eq!(v["type"], "ack", "{v}");
    }
    let v = send_wait(
        &mut alice,
        json!({"type":"edit","id":id,"text":"three"}),
        "e3",
    );
    assert_eq!(code(&v), "bad_request", "--max-edits");
    // The edit count survives a restart too (it is stored, not only remembered).
    drop(alice);
    s.stop();
    let s = server(&dir, &["--max-edits", "2"]);
    let mut alice = Client::resume(&s.addr, &token);
    let v = send_wait(
        &mut alice,
        json!({"type":"edit","id":id,"text":"four"}),
        "e4",
    );
    assert_eq!(code(&v), "bad_request");
    let h = send_wait(&mut alice, json!({"type":"history","room":"general"}), "h");
    assert_eq!(h["messages"][0]["text"], "two");
}

#[test]
fn a_deleted_text_is_gone_from_the_database_files() {
    let dir = TempDir::new("changes-secure-delete");
    let s = server(&dir, &[]);
    let (mut alice, _) = Client::register(&s.addr, "alice");
    let id = say(&mut alice, "general", "SECRET-7f3a-original", "s");
    send_wait(
        &mut alice,
        json!({"type":"edit","id":id,"text":"SECRET-7f3a-edited"}),
        "e",
    );
    let files = || -> Vec<u8> {
        let mut all = Vec::new();
        for f in ["chat.db", "chat.db-wal"] {
            all.extend(std::fs::read(dir.0.join("data").join(f)).unwrap_or_default());
        }
        all
    };
    let has = |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
    // The check can fail: before the delete both versions are on disk.
    let before = files();
    assert!(has(&before, "SECRET-7f3a-original") && has(&before, "SECRET-7f3a-edited"));
    let ack = send_wait(&mut alice, json!({"type":"delete","id":id}), "d");
    assert_eq!(ack["type"], "ack");
    let after = files();
    assert!(
        !has(&after, "SECRET-7f3a"),
        "the text is still in the files"
    );
    // And after a clean stop (final checkpoint) as well.
    drop(alice);
    s.stop();
    assert!(!has(&files(), "SECRET-7f3a"));
}

#[test]
fn catchup_pages_and_resets_past_retention() {
    let dir = TempDir::new("changes-retention");
    let s = server(&dir, &[]);
    let (mut alice, token) = Client::register(&s.addr, "alice");
    let w = send_wait(&mut alice, json!({"type":"rooms"}), "w");
    assert_eq!(w["type"], "rooms");
    let start = {
        let mut c = Client::connect(&s.addr);
        c.send(json!({"type":"resume","token":token}));
        c.expect("welcome")["seq"].as_i64().expect("welcome seq")
    };
    let first = say(&mut alice, "general", "a", "1");
    say(&mut alice, "general", "b", "2");
    send_wait(
        &mut alice,
        json!({"type":"react","id":first,"emoji":"👍","on":true}),
        "3",
    );
    // Two per page: message, message | reaction.
    let p1 = send_wait(
        &mut alice,
        json!({"type":"catchup","since":start,"limit":2}),
        "k1",
    );
    assert_eq!(p1["more"], true, "{p1}");
    let evs = p1["events"].as_array().unwrap();
    assert_eq!(evs.len(), 2);
    assert_eq!(evs[0]["type"], "message");
    assert_eq!(
        evs[0]["reactions"],
        json!([{"emoji":"👍","users":["alice"]}])
    );
    let p2 = send_wait(
        &mut alice,
        json!({"type":"catchup","since":p1["seq"],"limit":2}),
        "k2",
    );
    assert_eq!(p2["more"], false);
    assert_eq!(p2["events"][0]["type"], "reaction");
    let head = p2["seq"].as_i64().unwrap();
    let v = send_wait(
        &mut alice,
        json!({"type":"catchup","since":head + 1000}),
        "k3",
    );
    assert_eq!(v["reset"], true, "newer than anything handed out: {v}");
    let v = send_wait(
        &mut alice,
        json!({"type":"catchup","since":0,"limit":0}),
        "k4",
    );
    assert_eq!(code(&v), "bad_request");

    // With no retention, a restart prunes every change event: catching up from before them
    // is a reset; from after them it is not.
    drop(alice);
    s.stop();
    let s = server(
        &dir,
        &["--event-retention", "0", "--event-retention-count", "0"],
    );
    let mut alice = Client::resume(&s.addr, &token);
    let mut reset = Value::Null;
    assert!(
        eventually(Duration::from_secs(10), || {
            reset = send_wait(&mut alice, json!({"type":"catchup","since":start}), "k5");
            reset["reset"] == true
        }),
        "{reset}"
    );
    let v = send_wait(&mut alice, json!({"type":"catchup","since":head}), "k6");
    assert!(v.get("reset").is_none(), "{v}");
    assert_eq!(v["events"], json!([]));
}

// ----- the catch-up equivalence property -----

/// What a client knows about one message, built only from the frames it received.
#[derive(Debug, Clone, PartialEq, Default)]
struct Seen {
    text: Option<String>,
    deleted: bool,
    edited_ts: Option<i64>,
    reply_to: Option<i64>,
    reactions: BTreeMap<String, BTreeSet<String>>,
}

#[derive(Debug, Default, PartialEq)]
struct View(BTreeMap<i64, Seen>);

impl View {
    /// Applies one frame the way a client must: by message id, reactions as sets.
    fn apply(&mut self, v: &Value) {
        let id = v["id"].as_i64().unwrap_or(-1);
        match v["type"].as_str().unwrap_or_default() {
            "message" => {
                let mut s = Seen {
                    text: v["text"].as_str().map(String::from),
                    deleted: v["deleted"] == true,
                    edited_ts: v["edited_ts"].as_i64(),
                    reply_to: v["reply_to"].as_i64(),
                    ..Seen::default()
                };
                for r in v["reactions"].as_array().into_iter().flatten() {
                    let users = r["users"].as_array().unwrap();
                    s.reactions.insert(
                        r["emoji"].as_str().unwrap().into(),
                        users.iter().map(|u| u.as_str().unwrap().into()).collect(),
                    );
                }
                self.0.insert(id, s);
            }
            "edited" => {
                if let Some(s) = self.0.get_mut(&id) {
                    s.text = v["text"].as_str().map(String::from);
                    s.edited_ts = v["edited_ts"].as_i64();
                }
            }
            "deleted" => {
                if let Some(s) = self.0.get_mut(&id) {
                    s.deleted = true;
                    s.text = None;
                    s.reactions.clear();
                }
            }
            "reaction" => {
                if let Some(s) = self.0.get_mut(&id) {
                    let emoji = v["emoji"].as_str().unwrap().to_string();
                    let user = v["user"].as_str().unwrap().to_string();
                    let set = s.reactions.entry(emoji.clone()).or_default();
                    if v["on"] == true {
                        set.insert(user);
                    } else {
                        set.remove(&user);
                        if set.is_empty() {
                            s.reactions.remove(&emoji);
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// xorshift64*, seeded: a failing seed can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Drains every frame that arrives within a short quiet period into `view`.
fn drain_into(c: &mut Client, view: &mut View) {
    c.send(json!({"type":"rooms","ref":"sync"}));
    let (_, frames) = until(c, |v| v["ref"] == "sync");
    for f in &frames {
        view.apply(f);
    }
}

/// One random change by one of the actors, acknowledged before the next.
fn random_op(rng: &mut Rng, actors: &mut [(String, Client)], ids: &mut Vec<i64>, n: usize) {
    let emoji = ["👍", "🎉", "👀"];
    let who = rng.below(actors.len());
    let (name, c) = &mut actors[who];
    let r = format!("op{n}");
    let pick = |rng: &mut Rng, ids: &Vec<i64>| ids[rng.below(ids.len())];
    let v = match rng.below(10) {
        0..=3 => {
            let (conv, reply) = (rng.below(3), rng.below(3) == 0 && !ids.is_empty());
            let mut f = match conv {
                0 => json!({"type":"say","room":"general","text":format!("{name} {n}")}),
                1 => json!({"type":"say","room":"side","text":format!("{name} side {n}")}),
                _ => json!({"type":"dm","to":"obs","text":format!("{name} dm {n}")}),
            };
            if reply {
                f["reply_to"] = pick(rng, ids).into();
            }
            send_wait(c, f, &r)
        }
        4 | 5 if !ids.is_empty() => {
            let id = pick(rng, ids);
            send_wait(
                c,
                json!({"type":"edit","id":id,"text":format!("edit {n}")}),
                &r,
            )
        }
        6 if !ids.is_empty() => {
            let id = pick(rng, ids);
            send_wait(c, json!({"type":"delete","id":id}), &r)
        }
        _ if !ids.is_empty() => {
            let id = pick(rng, ids);
            let e = emoji[rng.below(emoji.len())];
            let on = rng.below(3) != 0;
            send_wait(c, json!({"type":"react","id":id,"emoji":e,"on":on}), &r)
        }
        _ => send_wait(
            c,
            json!({"type":"say","room":"general","text":format!("{name} {n}")}),
            &r,
        ),
    };
    // Errors (someone else's message, a deleted one, a reply across conversations) are part
    // of the sequence; a new message's id joins the pool.
    if v["type"] == "ack"
        && v.get("seq").is_none()
        && ids.iter().all(|i| Some(*i) != v["id"].as_i64())
    {
        if let Some(id) = v["id"].as_i64() {
            ids.push(id);
        }
    }
}

#[test]
fn catchup_after_being_away_equals_never_leaving() {
    let dir = TempDir::new("changes-equivalence");
    let s = server(&dir, &[]);
    // Two actors make changes; `obs` watches from two connections: one stays, one leaves and
    // catches up. obs is in general and side and has DMs from both actors.
    let mut actors = Vec::new();
    for name in ["alice", "bob"] {
        let (mut c, _) = Client::register(&s.addr, name);
        join(&mut c, "side");
        actors.push((name.to_string(), c));
    }
    let (mut stay, token) = Client::register(&s.addr, "obs");
    join(&mut stay, "side");
    // What the catch-up pages carried, over all seeds: every kind of event must have been
    // exercised for the comparison to mean something.
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for seed in 1..=6u64 {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0x1234_5678_9abc_def1));
        let mut ids = Vec::new();
        // What `stay` got during the previous seed is not part of this one.
        drain_into(&mut stay, &mut View::default());
        let mut live = View::default();
        let mut away = View::default();
        let mut leaver = Client::resume(&s.addr, &token);
        // Seed some history both watchers see live.
        for n in 0..15 {
            random_op(&mut rng, &mut actors, &mut ids, n);
        }
        drain_into(&mut stay, &mut live);
        drain_into(&mut leaver, &mut away);
        assert_eq!(
            live, away,
            "seed {seed}: both watched the same frames so far"
        );
        // The leaver's last seq: the highest it saw in any frame.
        leaver.send(json!({"type":"catchup","since":i64::MAX / 2,"ref":"probe"}));
        let probe = reply(&mut leaver, "probe");
        assert_eq!(probe["reset"], true);
        let last_seq = probe["seq"].as_i64().unwrap();
        drop(leaver);
        // Away: random changes to old and new messages.
        for n in 15..60 {
            random_op(&mut rng, &mut actors, &mut ids, n);
        }
        // Back: resume, ask for what was missed page by page, hold live frames meanwhile.
        let mut back = Client::resume(&s.addr, &token);
        let mut held = Vec::new();
        let mut cursor = last_seq;
        // Changes keep coming while the catch-up runs.
        for n in 60..64 {
            random_op(&mut rng, &mut actors, &mut ids, n);
        }
        loop {
            back.send(json!({"type":"catchup","since":cursor,"limit":7,"ref":"k"}));
            let (page, before) = until(&mut back, |v| v["type"] == "catchup");
            held.extend(before);
            assert!(page.get("reset").is_none(), "{page}");
            for e in page["events"].as_array().unwrap() {
                *kinds
                    .entry(e["type"].as_str().unwrap().to_string())
                    .or_insert(0) += 1;
                away.apply(e);
            }
            cursor = page["seq"].as_i64().unwrap();
            if page["more"] != true {
                break;
            }
        }
        for f in &held {
            away.apply(f);
        }
        for n in 64..70 {
            random_op(&mut rng, &mut actors, &mut ids, n);
        }
        drain_into(&mut stay, &mut live);
        drain_into(&mut back, &mut away);
        assert!(!live.0.is_empty(), "seed {seed}: no messages");
        // Only messages the leaver had or was sent matter; everything else must match too.
        assert_eq!(live, away, "seed {seed}: state after catch-up differs");
    }
    for k in ["message", "edited", "deleted", "reaction"] {
        assert!(kinds.get(k).is_some_and(|n| *n >= 3), "{k}: {kinds:?}");
    }
}
