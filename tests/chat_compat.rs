//! Compatibility: the current `parlor` binary on a database written by an old one.
//! `tests/fixtures/chat-v1.db` comes from parlor at commit e05a242 (schema version 1, before
//! `PRAGMA user_version`; see `tests/fixtures/make_v1_db.py`), `chat-v1.json` lists what it
//! holds. The server must migrate it and serve every account, token, room and message.

mod chat_common;

use std::path::Path;

use chat_common::{Client, Server, TempDir};
use serde_json::{json, Value};

/// The next frame of type `ty`, skipping others (presence).
fn until(c: &mut Client, ty: &str) -> Value {
    loop {
        let v = c.recv();
        assert_ne!(v["type"], "error", "{v}");
        if v["type"] == ty {
            return v;
        }
    }
}

#[test]
fn v1_database_from_an_old_build_is_migrated_and_served() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let want: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("chat-v1.json")).expect("chat-v1.json"),
    )
    .expect("json");
    let dir = TempDir::new("compat-v1");
    std::fs::copy(fixtures.join("chat-v1.db"), dir.0.join("chat.db")).expect("copy fixture");
    // The fixture's sessions were created when it was generated: a TTL long enough that they
    // have not expired whenever this runs.
    let srv = Server::spawn(&dir.0, &["--session-ttl", "1000000000"]);

    // Served messages carry `seq` (their id; added with message changes) besides what the
    // old build stored.
    let msgs: Vec<Value> = want["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            let mut m = m.clone();
            m["seq"] = m["id"].clone();
            m
        })
        .collect();
    let in_room =
        |r: &str| -> Vec<Value> { msgs.iter().filter(|m| m["room"] == r).cloned().collect() };
    let between = |a: &str, b: &str| -> Vec<Value> {
        msgs.iter()
            .filter(|m| (m["from"] == a && m["to"] == b) || (m["from"] == b && m["to"] == a))
            .cloned()
            .collect()
    };

    // Every token resumes its user.
    let tokens = want["tokens"].as_array().expect("tokens");
    assert_eq!(tokens.len(), 4);
    for t in tokens {
        let user = t["user"].as_str().unwrap_or_default();
        let mut c = Client::connect(&srv.addr);
        c.send(json!({"type":"resume","token":t["token"]}));
        let w = until(&mut c, "welcome");
        assert_eq!(w["user"], user, "{w}");
        let nick = want["users"]
            .as_array()
            .and_then(|u| u.iter().find(|u| u["name"] == user))
            .map(|u| u["nick"].clone());
        assert_eq!(Some(w["nick"].clone()), nick, "{w}");
        let rooms: Vec<&str> = want["members"]
            .as_array()
            .expect("members")
            .iter()
            .filter(|m| m[1] == user)
            .filter_map(|m| m[0].as_str())
            .collect();
        assert_eq!(w["rooms"], json!(rooms), "{w}");
    }

    // alice (resumed) sees every room's history and both DM conversations.
    let token = tokens[0]["token"].as_str().unwrap_or_default();
    let mut a = Client::resume(&srv.addr, token);
    for room in ["general", "rust"] {
        a.send(json!({"type":"join","room":room}));
        let j = until(&mut a, "joined");
        assert_eq!(j["history"], json!(in_room(room)), "{room}");
        a.send(json!({"type":"history","room":room,"after":0,"limit":50}));
        let h = until(&mut a, "history");
        assert_eq!(h["messages"], json!(in_room(room)), "{room}");
    }
    for other in ["bob", "carol"] {
        a.send(json!({"type":"history","with":other,"limit":50}));
        let h = until(&mut a, "history");
        let want_dms = between("alice", other);
        assert_eq!(want_dms.len(), 1);
        assert_eq!(h["messages"], json!(want_dms), "{other}");
    }

    // Passwords still verify; a new message gets an id past the old reservation.
    let mut c = Client::connect(&srv.addr);
    c.send(json!({"type":"login","user":"carol","password":want["password"]}));
    until(&mut c, "welcome");
    c.send(json!({"type":"say","room":"general","text":"after upgrade","ref":"u1"}));
    let ack = until(&mut c, "ack");
    assert!(ack["id"].as_i64().unwrap_or(0) > 1_000_000, "{ack}");
    drop((a, c));
    srv.stop();

    let db = rusqlite::Connection::open(dir.0.join("chat.db")).expect("db");
    let version: i64 = db
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("user_version");
    assert_eq!(version, parlor::chat::store::sqlite::SCHEMA_VERSION);
    // Version 3: no account is disabled after the migration.
    let enabled: i64 = db
        .query_row("SELECT COUNT(*) FROM users WHERE disabled = 0", [], |r| {
            r.get(0)
        })
        .expect("users.disabled");
    assert_eq!(
        enabled as usize,
        want["users"].as_array().map_or(0, Vec::len)
    );
    let stored: i64 = db
        .query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))
        .expect("count");
    assert_eq!(stored as usize, msgs.len() + 1);
}
