//! Read state, notification levels and search over real sockets: read markers merge forward
//! across connections and survive restarts, `welcome` counts unread messages and mentions,
//! `notify` levels, and search visibility, prefixes, diacritics, phrases and edits.

mod chat_common;

use chat_common::*;
use serde_json::{json, Value};

fn until(c: &mut Client, pred: impl Fn(&Value) -> bool) -> Value {
    loop {
        let v = c.recv();
        if pred(&v) {
            return v;
        }
    }
}

fn send_wait(c: &mut Client, mut v: Value, r: &str) -> Value {
    v["ref"] = r.into();
    c.send(v);
    until(c, |v| v["ref"] == r)
}

/// A fresh `ref` per message: a reused one would be answered as a retry of the first.
fn fresh_ref() -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    format!("m{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

fn say(c: &mut Client, room: &str, text: &str) -> i64 {
    let v = send_wait(
        c,
        json!({"type":"say","room":room,"text":text}),
        &fresh_ref(),
    );
    assert_eq!(v["type"], "ack", "{v}");
    v["id"].as_i64().unwrap()
}

fn dm(c: &mut Client, to: &str, text: &str) -> i64 {
    let v = send_wait(c, json!({"type":"dm","to":to,"text":text}), &fresh_ref());
    assert_eq!(v["type"], "ack", "{v}");
    v["id"].as_i64().unwrap()
}

/// `welcome` of a fresh connection resuming `token`.
fn welcome(addr: &str, token: &str) -> (Client, Value) {
    let mut c = Client::connect(addr);
    c.send(json!({"type":"resume","token":token}));
    let w = c.expect("welcome");
    (c, w)
}

fn conv<'a>(w: &'a Value, key: &str, name: &str) -> &'a Value {
    w["conversations"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c[key] == name))
        .unwrap_or_else(|| panic!("no {key} {name} in {w}"))
}

fn server(dir: &TempDir) -> Server {
    Server::spawn(
        &dir.0.join("data"),
        &["--rate-limit", "0", "--query-rate", "0"],
    )
}

#[test]
fn welcome_counts_unread_and_mentions_and_they_survive_a_restart() {
    let dir = TempDir::new("reading-counts");
    let s = server(&dir);
    let (alice, token) = Client::register(&s.addr, "alice");
    let (mut bob, _) = Client::register(&s.addr, "bob");
    drop(alice);
    // History from before alice joined a room is not unread for her; general she joined at
    // registration, so bob's messages after that are.
    say(&mut bob, "general", "hello all");
    say(&mut bob, "general", "@alice look at this");
    say(&mut bob, "general", "mail@alice.org is not a mention");
    dm(&mut bob, "alice", "psst");
    dm(&mut bob, "alice", "psst again");
    let (_, w) = welcome(&s.addr, &token);
    let g = conv(&w, "room", "general");
    assert_eq!(
        (g["unread"].as_u64(), g["mentions"].as_u64()),
        (Some(3), Some(1)),
        "{g}"
    );
    assert_eq!(g["notify"], "mentions", "rooms default to mentions");
    let d = conv(&w, "with", "bob");
    assert_eq!(
        (d["unread"].as_u64(), d["mentions"].as_u64()),
        (Some(2), Some(2)),
        "{d}"
    );
    assert_eq!(d["notify"], "all", "DMs default to all");
    assert_eq!(d["read"], 0);
    // bob's own view: nothing unread (his own messages do not count).
    s.stop();
    let s = server(&dir);
    let (_, w) = welcome(&s.addr, &token);
    assert_eq!(
        conv(&w, "room", "general")["unread"],
        3,
        "after a restart: {w}"
    );
    assert_eq!(conv(&w, "with", "bob")["mentions"], 2);
}

#[test]
fn read_markers_only_move_forward_and_reach_the_other_devices() {
    let dir = TempDir::new("reading-read");
    let s = server(&dir);
    let (mut phone, token) = Client::register(&s.addr, "alice");
    let (mut laptop, _) = welcome(&s.addr, &token);
    let (mut bob, _) = Client::register(&s.addr, "bob");
    let ids: Vec<i64> = (0..3)
        .map(|i| say(&mut bob, "general", &format!("m{i}")))
        .collect();
    let ack = send_wait(
        &mut phone,
        json!({"type":"read","room":"general","id":ids[1]}),
        "r1",
    );
    assert_eq!(ack["type"], "ack", "{ack}");
    let seen = until(&mut laptop, |v| v["type"] == "read");
    assert_eq!(
        (&seen["room"], &seen["id"]),
        (&json!("general"), &json!(ids[1]))
    );
    // A lower marker from another device changes nothing and tells nobody.
    send_wait(
        &mut laptop,
        json!({"type":"read","room":"general","id":ids[0]}),
        "r2",
    );
    send_wait(
        &mut laptop,
        json!({"type":"read","room":"general","id":ids[2]}),
        "r3",
    );
    let seen = until(&mut phone, |v| v["type"] == "read");
    assert_eq!(
        seen["id"], ids[2],
        "the ignored lower marker sent nothing first"
    );
    // Errors.
    for (v, code) in [
        (json!({"type":"read","room":"nowhere","id":1}), "not_member"),
        (
            json!({"type":"read","with":"nobody","id":1}),
            "no_such_user",
        ),
        (
            json!({"type":"read","room":"general","id":ids[2] + 1_000_000_000}),
            "bad_request",
        ),
        (json!({"type":"read","id":1}), "bad_request"),
    ] {
        let e = send_wait(&mut phone, v, "e");
        assert_eq!(e["code"], code, "{e}");
    }
    drop((phone, laptop, bob));
    s.stop();
    let s = server(&dir);
    let (_, w) = welcome(&s.addr, &token);
    let g = conv(&w, "room", "general");
    assert_eq!(
        (g["read"].as_i64(), g["unread"].as_u64()),
        (Some(ids[2]), Some(0)),
        "{g}"
    );
}

#[test]
fn notify_levels_are_stored_and_echoed_to_every_connection() {
    let dir = TempDir::new("reading-notify");
    let s = server(&dir);
    let (mut a1, token) = Client::register(&s.addr, "alice");
    let (mut a2, _) = welcome(&s.addr, &token);
    let (_bob, _) = Client::register(&s.addr, "bob");
    let v = send_wait(
        &mut a1,
        json!({"type":"notify","room":"general","level":"none"}),
        "n1",
    );
    assert_eq!(
        (&v["type"], &v["level"]),
        (&json!("notify"), &json!("none"))
    );
    let other = until(&mut a2, |v| v["type"] == "notify");
    assert_eq!(
        (&other["room"], &other["level"]),
        (&json!("general"), &json!("none"))
    );
    assert!(other.get("ref").is_none());
    send_wait(
        &mut a1,
        json!({"type":"notify","with":"bob","level":"mentions"}),
        "n2",
    );
    let e = send_wait(
        &mut a1,
        json!({"type":"notify","room":"general","level":"loud"}),
        "n3",
    );
    assert_eq!(e["code"], "bad_request");
    drop((a1, a2));
    s.stop();
    let s = server(&dir);
    let (_, w) = welcome(&s.addr, &token);
    assert_eq!(conv(&w, "room", "general")["notify"], "none");
    // A DM conversation with a level but no message yet is listed once it has messages; the
    // level is kept either way.
    let (mut b, _) = {
        let mut c = Client::connect(&s.addr);
        c.send(json!({"type":"login","user":"bob","password":"password123"}));
        let w = c.expect("welcome");
        (c, w)
    };
    dm(&mut b, "alice", "hi");
    let (_, w) = welcome(&s.addr, &token);
    assert_eq!(conv(&w, "with", "bob")["notify"], "mentions");
}

fn results(v: &Value) -> Vec<String> {
    assert_eq!(v["type"], "search", "{v}");
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn search_finds_what_one_can_see_by_prefix_phrase_and_without_accents() {
    let dir = TempDir::new("reading-search");
    let s = server(&dir);
    let (mut alice, _) = Client::register(&s.addr, "alice");
    let (mut bob, _) = Client::register(&s.addr, "bob");
    let (mut carol, _) = Client::register(&s.addr, "carol");
    for c in [&mut alice, &mut bob] {
        send_wait(c, json!({"type":"join","room":"ops"}), "j");
    }
    say(&mut bob, "ops", "the deploy failed again");
    say(&mut bob, "ops", "deployment fixed");
    say(&mut alice, "general", "Café at noon?");
    say(
        &mut carol,
        "general",
        "failed to deploy? no, the deploy worked",
    );
    let gone = say(&mut bob, "ops", "deploy secret plan");
    send_wait(&mut bob, json!({"type":"delete","id":gone}), "d");
    let edited = say(&mut bob, "general", "original wording");
    send_wait(
        &mut bob,
        json!({"type":"edit","id":edited,"text":"rewritten text"}),
        "e",
    );
    dm(&mut carol, "bob", "deploy gossip between carol and bob");

    let q = |c: &mut Client, v: Value| send_wait(c, v, "q");
    // Prefix, newest first, everything alice can see; not the deleted one, not carol's DM.
    let r = results(&q(&mut alice, json!({"type":"search","q":"depl"})));
    assert_eq!(
        r,
        [
            "failed to deploy? no, the deploy worked",
            "deployment fixed",
            "the deploy failed again"
        ]
    );
    // A phrase matches in order only.
    let r = results(&q(
        &mut alice,
        json!({"type":"search","q":"\"deploy failed\""}),
    ));
    assert_eq!(r, ["the deploy failed again"]);
    // Diacritics and case do not matter.
    assert_eq!(
        results(&q(&mut alice, json!({"type":"search","q":"CAFE"}))),
        ["Café at noon?"]
    );
    assert_eq!(
        results(&q(&mut bob, json!({"type":"search","q":"café"}))),
        ["Café at noon?"]
    );
    // Filters: room, author, and paging with before/more.
    let r = results(&q(
        &mut alice,
        json!({"type":"search","q":"deploy","room":"ops"}),
    ));
    assert_eq!(r.len(), 2);
    let r = results(&q(
        &mut alice,
        json!({"type":"search","q":"deploy","from":"carol"}),
    ));
    assert_eq!(r, ["failed to deploy? no, the deploy worked"]);
    let page = q(&mut alice, json!({"type":"search","q":"deploy","limit":2}));
    assert_eq!(page["more"], true);
    let last = page["results"][1]["id"].as_i64().unwrap();
    let rest = q(
        &mut alice,
        json!({"type":"search","q":"deploy","before":last}),
    );
    assert_eq!(results(&rest), ["the deploy failed again"]);
    assert_eq!(rest["more"], false);
    // An edited message by its current text only.
    assert_eq!(
        results(&q(&mut alice, json!({"type":"search","q":"rewritten"}))).len(),
        1
    );
    assert!(results(&q(&mut alice, json!({"type":"search","q":"original"}))).is_empty());
    // DMs: bob finds his, carol hers, alice nothing.
    assert_eq!(
        results(&q(&mut bob, json!({"type":"search","q":"gossip"}))).len(),
        1
    );
    assert_eq!(
        results(&q(
            &mut bob,
            json!({"type":"search","q":"gossip","with":"carol"})
        ))
        .len(),
        1
    );
    assert!(results(&q(&mut alice, json!({"type":"search","q":"gossip"}))).is_empty());
    // A room one left is out of sight.
    send_wait(&mut alice, json!({"type":"leave","room":"ops"}), "l");
    let r = results(&q(&mut alice, json!({"type":"search","q":"deploy"})));
    assert_eq!(r, ["failed to deploy? no, the deploy worked"]);
    let e = q(
        &mut alice,
        json!({"type":"search","q":"deploy","room":"ops"}),
    );
    assert_eq!(e["code"], "not_member");
    // Nothing to search for.
    for empty in ["", "  ", "?!*", "\"\""] {
        let e = q(&mut alice, json!({"type":"search","q":empty}));
        assert_eq!(e["code"], "bad_request", "{empty:?}");
    }
    // FTS syntax is just text.
    assert!(results(&q(
        &mut alice,
        json!({"type":"search","q":"deploy OR NEAR(x"})
    ))
    .is_empty());
}
