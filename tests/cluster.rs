//! Cluster mode over real sockets: three `parlor` processes on one throwaway PostgreSQL
//! (started by `pg_common` from the installed server binaries; the test fails, naming the
//! Debian package, when they are missing). Each test checks one guarantee of docs/CLUSTER.md
//! across nodes.
//!
//! Run: `cargo test --release --features pg-tests --test cluster`.

mod chat_common;
mod pg_common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use chat_common::{eventually, metrics_text, Client, Server, TempDir};
use pg_common::Pg;
use serde_json::{json, Value};

/// A node of the cluster: its own (unused) data directory, the shared database.
fn node(pg: &Pg, tag: &str, extra: &[&str]) -> (Server, TempDir) {
    let dir = TempDir::new(tag);
    let url = pg.url();
    let mut args = vec!["--database", url.as_str(), "--query-rate", "0"];
    args.extend_from_slice(extra);
    (Server::spawn(&dir.0, &args), dir)
}

fn three_nodes(pg: &Pg, extra: &[&str]) -> Vec<(Server, TempDir)> {
    (1..=3)
        .map(|i| node(pg, &format!("cluster-n{i}"), extra))
        .collect()
}

/// Registers `user` on the node at `addr` and skips what a new account is sent first.
fn register(addr: &str, user: &str) -> (Client, String) {
    Client::register(addr, user)
}

/// Reads frames until one satisfies `pick`, giving up after `limit`.
fn until(c: &mut Client, limit: Duration, mut pick: impl FnMut(&Value) -> bool) -> Option<Value> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match c.recv_within(deadline.saturating_duration_since(Instant::now())) {
            Some(v) if pick(&v) => return Some(v),
            Some(v) => {
                if std::env::var_os("CLUSTER_TEST_TRACE").is_some() {
                    eprintln!("skipped: {v}");
                }
            }
            None => return None,
        }
    }
    None
}

/// Every message id of `room`, oldest first, paging through `history` (other frames that
/// arrive meanwhile are skipped).
fn history_ids(c: &mut Client, room: &str) -> Vec<i64> {
    let mut ids = Vec::new();
    let mut after = 0i64;
    loop {
        c.send(json!({"type":"history","room":room,"after":after,"limit":200,"ref":"ids"}));
        let h = until(c, Duration::from_secs(10), |v| {
            v["type"] == "history" && v["ref"] == "ids"
        })
        .expect("history");
        for m in h["messages"].as_array().into_iter().flatten() {
            let id = m["id"].as_i64().unwrap_or(-1);
            ids.push(id);
            after = after.max(id);
        }
        if h["more"] != true {
            return ids;
        }
    }
}

fn join(c: &mut Client, room: &str) -> Value {
    c.send(json!({"type":"join","room":room,"ref":format!("join-{room}")}));
    until(c, Duration::from_secs(10), |v| {
        v["type"] == "joined" && v["room"] == room
    })
    .unwrap_or_else(|| panic!("no joined for {room}"))
}

/// Messages of `room` received by `c` until `n` arrived (ids in arrival order).
fn collect_messages(c: &mut Client, room: &str, n: usize) -> Vec<(i64, String)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < n && Instant::now() < deadline {
        match c.recv_within(Duration::from_secs(10)) {
            Some(v) if v["type"] == "message" && v["room"] == room => got.push((
                v["id"].as_i64().unwrap_or(-1),
                v["text"].as_str().unwrap_or_default().to_string(),
            )),
            Some(_) => {}
            None => break,
        }
    }
    got
}

/// Every protocol v1 feature works whichever nodes the users are on.
#[test]
fn chat_works_across_three_nodes() {
    let pg = Pg::start();
    let nodes = three_nodes(&pg, &[]);
    let (mut alice, _) = register(&nodes[0].0.addr, "alice");
    let (mut bob, _) = register(&nodes[1].0.addr, "bob");
    let (mut carol, _) = register(&nodes[2].0.addr, "carol");
    // alice (node 1) learns of bob's and carol's arrival on other nodes.
    let saw_bob = until(&mut alice, Duration::from_secs(10), |v| {
        v["type"] == "presence" && v["user"] == "bob" && v["event"] == "online"
    });
    assert!(saw_bob.is_some(), "alice never saw bob come online");

    for c in [&mut alice, &mut bob, &mut carol] {
        join(c, "ops");
    }
    // A room message from each node reaches everyone, in the same order.
    alice.send(json!({"type":"say","room":"ops","text":"from n1","ref":"a1"}));
    bob.send(json!({"type":"say","room":"ops","text":"from n2","ref":"b1"}));
    carol.send(json!({"type":"say","room":"ops","text":"from n3","ref":"c1"}));
    let seen: Vec<Vec<(i64, String)>> = [&mut alice, &mut bob, &mut carol]
        .into_iter()
        .map(|c| collect_messages(c, "ops", 3))
        .collect();
    assert_eq!(seen[0].len(), 3, "{seen:?}");
    assert_eq!(seen[0], seen[1]);
    assert_eq!(seen[1], seen[2]);
    assert!(seen[0].windows(2).all(|w| w[0].0 < w[1].0), "{seen:?}");

    // A DM from node 1 to node 3.
    alice.send(json!({"type":"dm","to":"carol","text":"psst","ref":"d1"}));
    let dm = until(&mut carol, Duration::from_secs(10), |v| {
        v["type"] == "message" && v["to"] == "carol"
    });
    assert_eq!(dm.map(|v| v["text"].clone()), Some(json!("psst")));

    // A nick change on node 2 reaches node 1.
    bob.send(json!({"type":"nick","nick":"Bobby","ref":"n"}));
    let nick = until(&mut alice, Duration::from_secs(10), |v| {
        v["type"] == "nick" && v["user"] == "bob"
    });
    assert_eq!(nick.map(|v| v["nick"].clone()), Some(json!("Bobby")));

    // Typing on node 1 reaches node 2.
    alice.send(json!({"type":"typing","room":"ops"}));
    let typing = until(&mut bob, Duration::from_secs(10), |v| v["type"] == "typing");
    assert_eq!(typing.map(|v| v["user"].clone()), Some(json!("alice")));

    // `who` on node 3 counts members and presence of every node.
    carol.send(json!({"type":"who","room":"ops","ref":"w"}));
    let who = until(&mut carol, Duration::from_secs(10), |v| v["type"] == "who").expect("who");
    let online: HashSet<String> = who["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["online"] == true)
        .map(|m| m["user"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(online, ["alice", "bob", "carol"].map(String::from).into());

    // History on node 2 has node 1's and node 3's messages.
    bob.send(json!({"type":"history","room":"ops","ref":"h"}));
    let h = until(&mut bob, Duration::from_secs(10), |v| {
        v["type"] == "history"
    })
    .expect("history");
    let mut texts: Vec<&str> = h["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| m["text"].as_str().unwrap_or_default())
        .collect();
    texts.sort();
    assert_eq!(texts, ["from n1", "from n2", "from n3"]);

    // bob leaves: node 1 and node 3 see him go offline (his only connection closed).
    drop(bob);
    for c in [&mut alice, &mut carol] {
        let off = until(c, Duration::from_secs(10), |v| {
            v["type"] == "presence" && v["user"] == "bob" && v["event"] == "offline"
        });
        assert!(off.is_some(), "bob's offline did not reach another node");
    }
}

/// Concurrent senders on three nodes into one room: every connection on every node receives
/// every message once, in increasing id order, the same order everywhere; acks carry those ids.
#[test]
fn concurrent_senders_on_three_nodes_give_one_order() {
    let pg = Pg::start();
    let nodes = three_nodes(&pg, &["--rate-limit", "0"]);
    let per_sender = 150;
    let mut senders = Vec::new();
    let mut listeners = Vec::new();
    for (i, (n, _)) in nodes.iter().enumerate() {
        let (mut s, _) = register(&n.addr, &format!("sender{i}"));
        join(&mut s, "race");
        senders.push(s);
        let (mut l, _) = register(&n.addr, &format!("listener{i}"));
        join(&mut l, "race");
        listeners.push(l);
    }
    // Everyone pipelines their messages at once.
    let handles: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            std::thread::spawn(move || {
                for k in 0..per_sender {
                    s.send(json!({"type":"say","room":"race","text":format!("s{i}-{k}"),"ref":format!("r{k}")}));
                }
                let mut acks = HashMap::new();
                let deadline = Instant::now() + Duration::from_secs(60);
                while acks.len() < per_sender && Instant::now() < deadline {
                    match s.recv_within(Duration::from_secs(10)) {
                        Some(v) if v["type"] == "ack" => {
                            acks.insert(v["ref"].as_str().unwrap_or_default().to_string(), v["id"].as_i64().unwrap_or(-1));
                        }
                        Some(v) if v["type"] == "error" => panic!("sender {i}: {v}"),
                        Some(_) => {}
                        None => break,
                    }
                }
                acks
            })
        })
        .collect();
    let total = per_sender * 3;
    let seen: Vec<Vec<(i64, String)>> = listeners
        .iter_mut()
        .map(|l| collect_messages(l, "race", total))
        .collect();
    let acks: Vec<HashMap<String, i64>> = handles
        .into_iter()
        .map(|h| h.join().expect("sender"))
        .collect();
    for s in &seen {
        assert_eq!(s.len(), total, "a listener missed messages");
        assert!(s.windows(2).all(|w| w[0].0 < w[1].0), "ids not increasing");
        assert_eq!(s, &seen[0], "two nodes delivered different orders");
    }
    let ids: HashSet<i64> = seen[0].iter().map(|m| m.0).collect();
    for (i, a) in acks.iter().enumerate() {
        assert_eq!(a.len(), per_sender, "sender {i} missed acks");
        assert!(
            a.values().all(|id| ids.contains(id)),
            "an acked id was never delivered"
        );
    }
}

/// A retry with the same ref on another node gets the original ack, never a second message.
#[test]
fn retry_on_another_node_gets_the_original_ack() {
    let pg = Pg::start();
    let nodes = three_nodes(&pg, &[]);
    let (mut a1, token) = register(&nodes[0].0.addr, "alice");
    join(&mut a1, "ops");
    a1.send(json!({"type":"say","room":"ops","text":"once","ref":"only-once"}));
    let ack = until(&mut a1, Duration::from_secs(10), |v| v["type"] == "ack").expect("ack");
    let mut a2 = Client::resume(&nodes[1].0.addr, &token);
    a2.send(json!({"type":"say","room":"ops","text":"once","ref":"only-once"}));
    let again = until(&mut a2, Duration::from_secs(10), |v| {
        v["type"] == "ack" || v["type"] == "error"
    })
    .expect("answer to the retry");
    assert_eq!(
        (again["type"].clone(), again["id"].clone()),
        (json!("ack"), ack["id"].clone())
    );
    let stored = history_ids(&mut a2, "ops");
    assert_eq!(
        stored.len(),
        1,
        "the retry stored a second message: {stored:?}"
    );

    // The first node dies before its ack could be read; the retry on another node resolves it
    // either way to exactly one message.
    a1.send(json!({"type":"say","room":"ops","text":"in flight","ref":"in-flight"}));
    let mut nodes = nodes;
    let (n1, _d1) = nodes.remove(0);
    n1.crash();
    a2.send(json!({"type":"say","room":"ops","text":"in flight","ref":"in-flight"}));
    let answer =
        until(&mut a2, Duration::from_secs(10), |v| v["type"] == "ack").expect("ack of the retry");
    let ids = history_ids(&mut a2, "ops");
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.contains(&answer["id"].as_i64().unwrap_or(-1)));
}

/// The first live message after `joined` on one node is the one right after the snapshot's
/// last, while another node floods the room.
#[test]
fn join_snapshot_is_exact_across_nodes() {
    let pg = Pg::start();
    let nodes = three_nodes(&pg, &["--rate-limit", "0"]);
    let (mut bob, _) = register(&nodes[1].0.addr, "bob");
    join(&mut bob, "flood");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooding = stop.clone();
    let flood = std::thread::spawn(move || {
        let mut k = 0;
        while !flooding.load(std::sync::atomic::Ordering::Relaxed) {
            bob.send(json!({"type":"say","room":"flood","text":format!("m{k}")}));
            k += 1;
            if k % 20 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        bob
    });
    std::thread::sleep(Duration::from_millis(100));
    let (mut alice, _) = register(&nodes[0].0.addr, "alice");
    let joined = join(&mut alice, "flood");
    let last = joined["history"]
        .as_array()
        .and_then(|h| h.last())
        .map(|m| m["id"].as_i64().unwrap_or(0))
        .unwrap_or(0);
    let live = until(&mut alice, Duration::from_secs(20), |v| {
        v["type"] == "message"
    })
    .expect("a live message");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _bob = flood.join().expect("flood");
    let (mut carol, _) = register(&nodes[2].0.addr, "carol");
    join(&mut carol, "flood");
    let all = history_ids(&mut carol, "flood");
    let next = all.iter().copied().find(|id| *id > last);
    assert_eq!(live["id"].as_i64(), next, "snapshot ended at {last}");
}

/// Logout on one node revokes the token on every node and closes its connections there.
#[test]
fn logout_revokes_the_token_on_every_node() {
    let pg = Pg::start();
    let nodes = three_nodes(&pg, &[]);
    let (mut a1, token) = register(&nodes[0].0.addr, "alice");
    let mut a2 = Client::resume(&nodes[1].0.addr, &token);
    a1.send(json!({"type":"logout"}));
    assert_eq!(a1.expect_close(), 1000);
    assert_eq!(
        a2.expect_close(),
        1000,
        "the other node kept the revoked session open"
    );
    let mut a3 = Client::connect(&nodes[2].0.addr);
    a3.send(json!({"type":"resume","token":token}));
    a3.expect_error("auth_failed");
}

/// kill -9 of a node: the others keep serving, and its users go offline for the others
/// within the node TTL (not forever, not flapping).
#[test]
fn killed_node_users_go_offline_within_the_ttl() {
    let pg = Pg::start();
    let nodes = three_nodes(&pg, &["--node-ttl", "3"]);
    let mut it = nodes.into_iter();
    let (n1, _d1) = it.next().expect("n1");
    let (n2, _d2) = it.next().expect("n2");
    let (n3, _d3) = it.next().expect("n3");
    let (mut alice, _) = register(&n1.addr, "alice");
    let (mut bob, _) = register(&n2.addr, "bob");
    let (_carol, _) = register(&n3.addr, "carol");
    let _ = until(&mut alice, Duration::from_secs(10), |v| {
        v["type"] == "presence" && v["user"] == "carol" && v["event"] == "online"
    });
    bob.send(json!({"type":"join","room":"general"}));
    let killed = Instant::now();
    n2.crash();
    let off = until(&mut alice, Duration::from_secs(20), |v| {
        v["type"] == "presence" && v["user"] == "bob" && v["event"] == "offline"
    });
    let after = killed.elapsed();
    eprintln!("bob offline for node 1 {after:?} after his node was killed (TTL 3 s)");
    assert!(off.is_some(), "bob stayed online after his node died");
    assert!(
        after < Duration::from_secs(10),
        "took {after:?} with a 3 s TTL"
    );
    // No flapping: bob does not come back, carol is not taken offline.
    let flap = until(&mut alice, Duration::from_secs(4), |v| {
        v["type"] == "presence"
    });
    assert!(flap.is_none(), "presence changed again: {flap:?}");
    // The surviving nodes keep serving.
    alice.send(json!({"type":"say","room":"general","text":"still here","ref":"s"}));
    assert!(until(&mut alice, Duration::from_secs(10), |v| v["type"] == "ack").is_some());
}

/// A client whose node dies resumes on another node and gets exactly what it missed.
#[test]
fn catch_up_on_another_node_after_a_node_dies() {
    let pg = Pg::start();
    let nodes = three_nodes(&pg, &[]);
    let mut it = nodes.into_iter();
    let (n1, _d1) = it.next().expect("n1");
    let (n2, _d2) = it.next().expect("n2");
    let (n3, _d3) = it.next().expect("n3");
    let (mut alice, _) = register(&n1.addr, "alice");
    let (mut carol, token) = register(&n3.addr, "carol");
    join(&mut alice, "ops");
    join(&mut carol, "ops");
    // `joined` does not wait for the membership to commit (no durability promise, as on one
    // node): node 1 hearing of it proves it did, before node 3 is killed.
    let stored = until(&mut alice, Duration::from_secs(10), |v| {
        v["type"] == "presence" && v["event"] == "join" && v["user"] == "carol"
    });
    assert!(stored.is_some(), "carol's join never reached node 1");
    alice.send(json!({"type":"say","room":"ops","text":"seen","ref":"1"}));
    let seen = collect_messages(&mut carol, "ops", 1);
    let last_seen = seen[0].0;
    until(&mut alice, Duration::from_secs(10), |v| v["type"] == "ack").expect("ack of seen");
    n3.crash();
    drop(carol);
    for k in 0..5 {
        alice.send(
            json!({"type":"say","room":"ops","text":format!("missed {k}"),"ref":format!("m{k}")}),
        );
    }
    let acked: Vec<i64> = (0..5)
        .map(|_| {
            until(&mut alice, Duration::from_secs(10), |v| v["type"] == "ack").expect("ack")["id"]
                .as_i64()
                .unwrap_or(-1)
        })
        .collect();
    let mut carol = Client::resume(&n2.addr, &token);
    carol.send(json!({"type":"history","room":"ops","after":last_seen,"ref":"c"}));
    let h = until(&mut carol, Duration::from_secs(10), |v| {
        v["type"] == "history"
    })
    .expect("history");
    let ids: Vec<i64> = h["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| m["id"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(
        ids, acked,
        "catch-up on another node is not exactly what was missed"
    );
}

/// PostgreSQL restarted under the nodes: connections stay open, writes during the outage get
/// `unavailable` (not a hang), the nodes reconnect by themselves, and what was acked before is
/// still there; messages after the restart cross nodes again.
#[test]
fn postgres_restart_keeps_connections_and_loses_nothing() {
    let mut pg = Pg::start();
    let nodes = three_nodes(&pg, &[]);
    let (mut alice, _) = register(&nodes[0].0.addr, "alice");
    let (mut bob, _) = register(&nodes[1].0.addr, "bob");
    join(&mut alice, "ops");
    join(&mut bob, "ops");
    alice.send(json!({"type":"say","room":"ops","text":"before","ref":"b"}));
    let before = until(&mut alice, Duration::from_secs(10), |v| v["type"] == "ack").expect("ack");

    pg.stop();
    let asked = Instant::now();
    alice.send(json!({"type":"say","room":"ops","text":"during","ref":"d"}));
    let answer = until(&mut alice, Duration::from_secs(20), |v| {
        v["type"] == "ack" || v["type"] == "error"
    })
    .expect("no answer while PostgreSQL is down: the node hangs");
    assert_eq!(answer["code"], "unavailable", "{answer}");
    eprintln!(
        "unavailable {:?} after the say, PostgreSQL down",
        asked.elapsed()
    );
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "took {:?}",
        asked.elapsed()
    );

    pg.restart();
    // The nodes reconnect (backoff) and take writes again; bob (node 2) receives them.
    let ok = eventually(Duration::from_secs(30), || {
        alice.send(json!({"type":"say","room":"ops","text":"after","ref":format!("a{}", Instant::now().elapsed().as_nanos())}));
        matches!(until(&mut alice, Duration::from_secs(5), |v| v["type"] == "ack" || v["type"] == "error"), Some(v) if v["type"] == "ack")
    });
    assert!(ok, "the node did not recover after PostgreSQL came back");
    let after = until(&mut bob, Duration::from_secs(15), |v| {
        v["type"] == "message" && v["text"] == "after"
    });
    assert!(
        after.is_some(),
        "node 2 did not receive node 1's message after the restart"
    );
    let ids = history_ids(&mut bob, "ops");
    assert!(
        ids.contains(&before["id"].as_i64().unwrap_or(-1)),
        "an acked message was lost: {ids:?}"
    );
}

/// A bad --database gives a clear error and a non-zero exit at start.
#[test]
fn bad_database_url_or_password_exits_non_zero() {
    let pg = Pg::start();
    let dir = TempDir::new("cluster-bad-url");
    let wrong = pg.url().replacen(pg.password(), "not-the-password", 1);
    for (url, says) in [
        (wrong.as_str(), "password"),
        ("postgres://nobody@127.0.0.1:1/x", "127.0.0.1"),
        ("definitely not a url", "connection string"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_parlor"))
            .args(["--listen", "127.0.0.1:0", "--data"])
            .arg(&dir.0)
            .args(["--database", url])
            .output()
            .expect("run parlor");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{url}: {stderr}");
        assert!(stderr.to_lowercase().contains(says), "{url}: {stderr}");
        assert!(
            !stderr.contains("not-the-password"),
            "the password was printed: {stderr}"
        );
    }
}

/// `parlor migrate` moves a single-node store into PostgreSQL: accounts keep passwords and
/// sessions, messages keep ids; a second migrate into the same database is refused.
#[test]
fn migrate_moves_a_single_node_store_into_the_cluster() {
    let data = TempDir::new("cluster-migrate");
    let server = Server::spawn(&data.0, &[]);
    let (mut alice, token) = register(&server.addr, "alice");
    join(&mut alice, "ops");
    let mut ids = Vec::new();
    for k in 0..3 {
        alice.send(
            json!({"type":"say","room":"ops","text":format!("old {k}"),"ref":format!("o{k}")}),
        );
        ids.push(
            until(&mut alice, Duration::from_secs(10), |v| v["type"] == "ack").expect("ack")["id"]
                .as_i64()
                .unwrap_or(-1),
        );
    }
    drop(alice);
    server.stop();

    let pg = Pg::start();
    let migrate = || {
        // The issue's form: the subcommand first, then its --data and --database.
        Command::new(env!("CARGO_BIN_EXE_parlor"))
            .args(["migrate", "--data"])
            .arg(&data.0)
            .args(["--database", &pg.url()])
            .output()
            .expect("run migrate")
    };
    let out = migrate();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = migrate();
    assert!(
        !again.status.success(),
        "a second migrate into a non-empty database was accepted"
    );

    let (n1, _d1) = node(&pg, "cluster-migrated", &[]);
    let mut alice = Client::resume(&n1.addr, &token);
    let stored = history_ids(&mut alice, "ops");
    assert_eq!(stored, ids, "messages changed ids in the move");
    join(&mut alice, "ops");
    alice.send(json!({"type":"say","room":"ops","text":"new","ref":"n"}));
    let ack = until(&mut alice, Duration::from_secs(10), |v| v["type"] == "ack").expect("ack");
    assert!(
        ack["id"].as_i64().unwrap_or(0) > *ids.last().unwrap_or(&0),
        "a new id reuses an old one"
    );
    let mut login = Client::connect(&n1.addr);
    login.send(json!({"type":"login","user":"alice","password":"password123"}));
    login.expect("welcome");
}

/// The value of the sample `name` (no labels) in a metrics text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A node's `/metrics` has the cluster's view: peers seen, its log position, bus figures,
/// store round trips, reconnects.
#[test]
fn metrics_show_the_cluster() {
    let pg = Pg::start();
    let (n1, _d1) = node(
        &pg,
        "cluster-m1",
        &["--metrics-listen", "127.0.0.1:0", "--node-ttl", "2"],
    );
    let (n2, _d2) = node(&pg, "cluster-m2", &[]);
    let (n3, _d3) = node(&pg, "cluster-m3", &[]);
    let (mut alice, _) = register(&n2.addr, "alice");
    join(&mut alice, "ops");
    alice.send(json!({"type":"say","room":"ops","text":"hi","ref":"1"}));
    until(&mut alice, Duration::from_secs(10), |v| v["type"] == "ack").expect("ack");
    let maddr = n1.metrics_addr.clone().expect("metrics address");
    let mut text = String::new();
    let peers_seen = eventually(Duration::from_secs(10), || {
        text = metrics_text(&maddr);
        sample(&text, "parlor_cluster_peers") == Some(2.0)
    });
    assert!(peers_seen, "node 1 does not count its 2 peers:\n{text}");
    let pos = sample(&text, "parlor_cluster_log_position").unwrap_or(0.0);
    assert!(pos > 0.0, "no log position:\n{text}");
    assert!(
        sample(&text, "parlor_cluster_bus_entries_total").unwrap_or(0.0) > 0.0,
        "{text}"
    );
    for name in [
        "parlor_cluster_bus_lag_seconds",
        "parlor_cluster_store_rtt_seconds",
        "parlor_cluster_reconnects_total",
    ] {
        assert!(sample(&text, name).is_some(), "{name} missing:\n{text}");
    }
    // A peer that stops is no longer counted.
    n3.stop();
    let one_left = eventually(Duration::from_secs(10), || {
        text = metrics_text(&maddr);
        sample(&text, "parlor_cluster_peers") == Some(1.0)
    });
    assert!(one_left, "a stopped peer is still counted:\n{text}");
    drop(n2);
}

/// A user is online while a connection is open on any node: closing one of two (on different
/// nodes) changes nothing for the others, closing the last makes them offline once; `rooms`
/// counts online members of every node.
#[test]
fn presence_counts_connections_on_every_node() {
    let pg = Pg::start();
    let nodes = three_nodes(&pg, &[]);
    let (mut bob, _) = register(&nodes[2].0.addr, "bob");
    let (a1, token) = register(&nodes[0].0.addr, "alice");
    let online = until(&mut bob, Duration::from_secs(10), |v| {
        v["type"] == "presence" && v["user"] == "alice" && v["event"] == "online"
    });
    assert!(online.is_some(), "bob did not see alice come online");
    let a2 = Client::resume(&nodes[1].0.addr, &token);
    bob.send(json!({"type":"rooms","ref":"r"}));
    let rooms = until(&mut bob, Duration::from_secs(10), |v| v["type"] == "rooms").expect("rooms");
    let general = rooms["rooms"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == "general")
        .cloned()
        .expect("general");
    assert_eq!(
        (general["members"].as_u64(), general["online"].as_u64()),
        (Some(2), Some(2))
    );
    drop(a1);
    let flap = until(&mut bob, Duration::from_secs(3), |v| {
        v["type"] == "presence"
    });
    assert!(
        flap.is_none(),
        "alice went offline with a connection still open: {flap:?}"
    );
    drop(a2);
    let off = until(&mut bob, Duration::from_secs(10), |v| {
        v["type"] == "presence"
    });
    let off = off.expect("no offline after alice's last connection closed");
    assert_eq!(
        (off["user"].as_str(), off["event"].as_str()),
        (Some("alice"), Some("offline"))
    );
}

/// A TCP proxy in front of PostgreSQL that can freeze one of its connections: it stops
/// forwarding in both directions but keeps both sockets open, so the node's side sees a
/// connection that went silent (its bytes are acknowledged by the proxy's kernel, no error,
/// no answer), as with a frozen server process or a proxy that hung.
struct FreezeProxy {
    port: u16,
    frozen: std::sync::Arc<std::sync::Mutex<HashSet<usize>>>,
}

impl FreezeProxy {
    fn start(upstream: u16) -> FreezeProxy {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let frozen = std::sync::Arc::new(std::sync::Mutex::new(HashSet::new()));
        let f = frozen.clone();
        std::thread::spawn(move || {
            for (i, down) in listener.incoming().enumerate() {
                let Ok(down) = down else { continue };
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                for (mut src, mut dst) in [
                    (
                        down.try_clone().expect("clone"),
                        up.try_clone().expect("clone"),
                    ),
                    (up, down),
                ] {
                    let f = f.clone();
                    std::thread::spawn(move || {
                        let _ = src.set_read_timeout(Some(Duration::from_millis(50)));
                        let mut buf = [0u8; 16384];
                        loop {
                            if f.lock().map(|s| s.contains(&i)).unwrap_or(false) {
                                std::thread::sleep(Duration::from_millis(50));
                                continue;
                            }
                            match src.read(&mut buf) {
                                Ok(0) => {
                                    let _ = dst.shutdown(Shutdown::Write);
                                    return;
                                }
                                Ok(n) => {
                                    if dst.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => return,
                            }
                        }
                    });
                }
            }
        });
        FreezeProxy { port, frozen }
    }

    /// Freezes the `i`-th connection accepted (0-based).
    fn freeze(&self, i: usize) {
        self.frozen.lock().expect("lock").insert(i);
    }
}

/// A node whose bus connection goes silent (no error, no answer) notices within seconds,
/// reads the log on a new connection and delivers what it missed, each message once.
#[test]
fn a_silent_bus_connection_is_replaced_and_the_node_catches_up() {
    let pg = Pg::start();
    let proxy = FreezeProxy::start(pg.port());
    let direct = format!("127.0.0.1:{}", pg.port());
    let via_proxy = pg
        .url()
        .replace(&direct, &format!("127.0.0.1:{}", proxy.port));
    assert_ne!(
        via_proxy,
        pg.url(),
        "the URL has no 127.0.0.1:PORT to redirect"
    );
    let (n1, _d1) = node(&pg, "cluster-silent-1", &[]);
    let d2 = TempDir::new("cluster-silent-2");
    let n2 = Server::spawn(&d2.0, &["--database", &via_proxy, "--query-rate", "0"]);
    let (mut alice, _) = register(&n1.addr, "alice");
    let (mut bob, _) = register(&n2.addr, "bob");
    join(&mut alice, "ops");
    join(&mut bob, "ops");
    alice.send(json!({"type":"say","room":"ops","text":"before","ref":"0"}));
    assert_eq!(collect_messages(&mut bob, "ops", 1).len(), 1);

    // Node 2's connections through the proxy: 0 is its writer, 1 its bus.
    proxy.freeze(1);
    let frozen_at = Instant::now();
    for k in 1..=3 {
        alice.send(
            json!({"type":"say","room":"ops","text":format!("after {k}"),"ref":format!("{k}")}),
        );
    }
    let got = collect_messages(&mut bob, "ops", 3);
    eprintln!(
        "node 2 caught up {:?} after its bus froze",
        frozen_at.elapsed()
    );
    let texts: Vec<&str> = got.iter().map(|m| m.1.as_str()).collect();
    assert_eq!(
        texts,
        ["after 1", "after 2", "after 3"],
        "node 2 served a stale chat"
    );
    assert!(
        frozen_at.elapsed() < Duration::from_secs(20),
        "took {:?}",
        frozen_at.elapsed()
    );
    // Nothing twice, and the node keeps working on its new bus.
    let extra = until(&mut bob, Duration::from_secs(2), |v| v["type"] == "message");
    assert!(extra.is_none(), "delivered again: {extra:?}");
    alice.send(json!({"type":"say","room":"ops","text":"later","ref":"4"}));
    let later = collect_messages(&mut bob, "ops", 1);
    assert_eq!(later.first().map(|m| m.1.as_str()), Some("later"));
}
