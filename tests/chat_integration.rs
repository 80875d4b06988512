//! Chat over real sockets: the `parlor` binary (event loop + `ChatService` on `/ws`) in a
//! child process, and `tungstenite` clients. A separate process is what lets the crash test
//! SIGKILL the server.

mod chat_common;

use std::time::{Duration, Instant};

use chat_common::{chat_figures, Client, Server, TempDir};
use serde_json::{json, Value};
use tungstenite::Message;
#[test]
fn every_command_and_error_code() {
    let dir = TempDir::new("all");
    let srv = Server::spawn(&dir.0, &["--max-text", "10"]);
    let addr = srv.addr.clone();

    let mut anon = srv.client();
    anon.send(json!({"type":"say","room":"general","text":"x","ref":"u"}));
    assert_eq!(anon.expect_error("unauthenticated")["ref"], "u");
    anon.send_raw(Message::text("{oops"));
    anon.expect_error("bad_json");
    anon.send(json!({"type":"teleport","ref":"t"}));
    assert_eq!(anon.expect_error("unknown_type")["ref"], "t");
    anon.send(json!({"type":"register","user":"x y","password":"password123"}));
    anon.expect_error("bad_request");
    anon.send(json!({"type":"register","user":"weak","password":"123"}));
    anon.expect_error("weak_password");

    let (mut a1, ta) = Client::register(&addr, "alice");
    let mut a2 = Client::resume(&addr, &ta);
    let (mut b, tb) = Client::register(&addr, "bob");
    a1.expect_arrival("bob");
    a2.expect_arrival("bob");
    let (mut c, _) = Client::register(&addr, "carol");
    for cl in [&mut a1, &mut a2, &mut b] {
        cl.expect_arrival("carol");
    }
    anon.send(json!({"type":"register","user":"ALICE","password":"password123"}));
    anon.expect_error("user_taken");
    anon.send(json!({"type":"login","user":"alice","password":"wrongpass"}));
    anon.expect_error("auth_failed");
    anon.send(json!({"type":"login","user":"alice","password":"password123","ref":"L"}));
    let w = anon.expect("welcome");
    assert_eq!(w["ref"], "L");
    assert_eq!(w["rooms"], json!(["general"]));

    // join / presence / say / ack
    a1.send(json!({"type":"join","room":"rust","ref":"j"}));
    let j = a1.expect("joined");
    assert_eq!(j["ref"], "j");
    assert_eq!(j["history"], json!([]));
    let p = a2.expect("presence");
    assert_eq!(p["event"], "join");
    anon.expect("presence");
    b.send(json!({"type":"join","room":"rust"}));
    b.expect("joined");
    a1.expect("presence");
    a2.expect("presence");
    anon.expect("presence");
    a1.send(json!({"type":"say","room":"rust","text":"hi **all**","ref":"c1"}));
    let m = a1.expect("message");
    let ack = a1.expect("ack");
    assert_eq!(ack["ref"], "c1");
    assert_eq!(ack["id"], m["id"]);
    assert_eq!(a2.expect("message"), m);
    assert_eq!(b.expect("message"), m);
    assert_eq!(anon.expect("message"), m);
    c.expect_silence();
    // Retry: same ack, no broadcast.
    a2.send(json!({"type":"say","room":"rust","text":"hi **all**","ref":"c1"}));
    assert_eq!(a2.expect("ack"), ack);
    b.expect_silence();

    // dm privacy
    b.send(json!({"type":"dm","to":"alice","text":"psst","ref":"d"}));
    let dm = b.expect("message");
    b.expect("ack");
    assert_eq!(dm["to"], "alice");
    assert_eq!(a1.expect("message"), dm);
    assert_eq!(a2.expect("message"), dm);
    assert_eq!(anon.expect("message"), dm);
    c.expect_silence();
    b.send(json!({"type":"dm","to":"ghost","text":"x"}));
    b.expect_error("no_such_user");

    // errors on say
    c.send(json!({"type":"say","room":"rust","text":"x","ref":"nm"}));
    assert_eq!(c.expect_error("not_member")["ref"], "nm");
    c.send(json!({"type":"say","room":"general","text":"01234567890"}));
    c.expect_error("too_long");
    c.send(json!({"type":"say","room":"general"}));
    c.expect_error("bad_request");

    // rooms / who / history
    c.send(json!({"type":"rooms"}));
    let r = c.expect("rooms");
    assert_eq!(r["rooms"][1], json!({"name":"rust","members":2,"online":2}));
    c.send(json!({"type":"who","room":"rust"}));
    assert_eq!(
        c.expect("who")["members"].as_array().map(|m| m.len()),
        Some(2)
    );
    c.send(json!({"type":"who","room":"void"}));
    c.expect_error("no_such_room");
    b.send(json!({"type":"history","room":"rust","after":0,"ref":"h"}));
    let h = b.expect("history");
    assert_eq!(h["messages"][0]["id"], m["id"]);
    assert_eq!(h["more"], false);
    b.send(json!({"type":"history","with":"alice"}));
    assert_eq!(b.expect("history")["messages"][0]["text"], "psst");

    // nick
    a1.send(json!({"type":"nick","nick":"Bob"}));
    a1.expect_error("nick_taken");
    a1.send(json!({"type":"nick","nick":"Ally","ref":"n"}));
    let n = a1.expect("nick");
    assert_eq!(n["ref"], "n");
    for cl in [&mut a2, &mut b, &mut c, &mut anon] {
        let n = cl.expect("nick");
        assert_eq!(
            (n["user"].clone(), n["nick"].clone()),
            (json!("alice"), json!("Ally"))
        );
    }
    b.send(json!({"type":"nick","nick":"ally"}));
    b.expect_error("nick_taken");

    // typing
    a1.send(json!({"type":"typing","room":"rust"}));
    let t = b.expect("typing");
    assert_eq!(
        t,
        json!({"type":"typing","room":"rust","user":"alice","nick":"Ally"})
    );
    a1.send(json!({"type":"typing","room":"rust"}));
    b.expect_silence();
    a1.expect_silence();

    // leave
    b.send(json!({"type":"leave","room":"rust","ref":"l"}));
    assert_eq!(b.expect("left")["ref"], "l");
    assert_eq!(a1.expect("presence")["event"], "leave");
    b.send(json!({"type":"leave","room":"rust"}));
    b.expect_error("not_member");

    // offline presence, logout, binary, oversize
    drop(c);
    let off = a1.expect("presence");
    assert_eq!(off["event"], "offline");
    assert!(off["last_seen"].is_i64());
    b.send(json!({"type":"logout"}));
    assert_eq!(b.expect_close(), 1000);
    let mut b2 = srv.client();
    b2.send(json!({"type":"resume","token":tb}));
    b2.expect_error("auth_failed");
    b2.send_raw(Message::binary(vec![1, 2, 3]));
    assert_eq!(b2.expect_close(), 1003);
    let mut big = srv.client();
    big.send_raw(Message::text("x".repeat(70 * 1024)));
    assert_eq!(big.expect_close(), 1009);
    drop(srv);
}

#[test]
fn rate_limit_over_the_wire() {
    let dir = TempDir::new("rate");
    let srv = Server::spawn(&dir.0, &["--rate-limit", "1", "--rate-burst", "2"]);
    let (mut a, _) = Client::register(&srv.addr, "alice");
    for i in 0..3 {
        a.send(json!({"type":"say","room":"general","text":"x","ref":format!("r{i}")}));
    }
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(a.recv());
    }
    let errors: Vec<&Value> = got.iter().filter(|f| f["type"] == "error").collect();
    assert_eq!(errors.len(), 1, "{got:#?}");
    assert_eq!(errors[0]["code"], "rate_limited");
    assert_eq!(errors[0]["ref"], "r2");
}

/// 200 connections in one room, all sending: every connection gets every message exactly once,
/// in increasing id order.
#[test]
fn two_hundred_connections_one_room() {
    const CONNS: usize = 200;
    const EACH: usize = 10;
    let dir = TempDir::new("fanout");
    let srv = Server::spawn(&dir.0, &["--rate-limit", "0"]);
    let addr = srv.addr.clone();
    let t0 = Instant::now();
    let mut clients: Vec<Client> = (0..CONNS)
        .map(|i| Client::register(&addr, &format!("u{i}")).0)
        .collect();
    // Everyone joins a fresh room; then wait until every client has seen every join, so the
    // sending phase starts from a known state.
    for c in clients.iter_mut() {
        c.send(json!({"type":"join","room":"load"}));
    }
    let setup = t0.elapsed();
    let start = Instant::now();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(CONNS));
    let handles: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                // Drain until our own `joined`, keeping nothing: presence frames only.
                loop {
                    let v = c.recv();
                    if v["type"] == "joined" {
                        break;
                    }
                }
                barrier.wait();
                for k in 0..EACH {
                    c.send(json!({"type":"say","room":"load","text":format!("{i}:{k}"),"ref":format!("{k}")}));
                }
                let mut ids = Vec::with_capacity(CONNS * EACH);
                let mut acks = 0;
                let mut first_ack = None;
                while ids.len() < CONNS * EACH || acks < EACH {
                    let v = c.recv();
                    match v["type"].as_str() {
                        Some("message") => ids.push(v["id"].as_i64().unwrap_or(-1)),
                        Some("ack") => {
                            acks += 1;
                            first_ack.get_or_insert_with(Instant::now);
                        }
                        Some("presence") => {}
                        _ => panic!("unexpected {v}"),
                    }
                }
                ids
            })
        })
        .collect();
    let all: Vec<Vec<i64>> = handles
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .collect();
    let elapsed = start.elapsed();
    let reference = &all[0];
    assert_eq!(reference.len(), CONNS * EACH);
    assert!(
        reference.windows(2).all(|w| w[0] < w[1]),
        "ids increase, no duplicate"
    );
    for ids in &all {
        assert_eq!(ids, reference, "every connection sees the same stream");
    }
    let deliveries = CONNS * CONNS * EACH;
    println!(
        "fan-out: {CONNS} connections x {EACH} messages = {} messages, {deliveries} deliveries in {:.3} s ({:.0} deliveries/s); setup {:.3} s",
        CONNS * EACH,
        elapsed.as_secs_f64(),
        deliveries as f64 / elapsed.as_secs_f64(),
        setup.as_secs_f64()
    );
    println!("{}", chat_figures(&srv.addr));
    srv.stop();
}

#[test]
fn restart_keeps_accounts_tokens_memberships_history() {
    let dir = TempDir::new("restart");
    let srv = Server::spawn(&dir.0, &[]);
    let (mut a, token) = Client::register(&srv.addr, "alice");
    a.send(json!({"type":"join","room":"rust"}));
    a.expect("joined");
    a.send(json!({"type":"say","room":"rust","text":"before restart","ref":"1"}));
    a.expect("message");
    let id = a.expect("ack")["id"].as_i64().unwrap_or(0);
    drop(a);
    srv.stop();

    let srv = Server::spawn(&dir.0, &[]);
    let mut a = Client::connect(&srv.addr);
    a.send(json!({"type":"resume","token":token}));
    let w = a.expect("welcome");
    assert_eq!(w["rooms"], json!(["general", "rust"]));
    a.send(json!({"type":"join","room":"rust"}));
    let j = a.expect("joined");
    assert_eq!(j["history"][0]["text"], "before restart");
    let mut b = Client::connect(&srv.addr);
    b.send(json!({"type":"login","user":"alice","password":"password123"}));
    b.expect("welcome");
    b.send(json!({"type":"say","room":"rust","text":"after","ref":"2"}));
    b.expect("message");
    assert!(b.expect("ack")["id"].as_i64().unwrap_or(0) > id);
    srv.stop();
}

/// SIGKILL while clients send; after a restart every acked message is in history.
#[test]
fn crash_loses_no_acked_message() {
    const SENDERS: usize = 4;
    let dir = TempDir::new("crash");
    let srv = Server::spawn(&dir.0, &["--rate-limit", "0"]);
    let addr = srv.addr.clone();
    let handles: Vec<_> = (0..SENDERS)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let (mut c, _) = Client::register(&addr, &format!("s{i}"));
                let mut acked = Vec::new();
                // Send until the server dies; keep a few messages in flight.
                let mut n = 0u64;
                loop {
                    let text = json!({"type":"say","room":"general","text":format!("{i}-{n}"),"ref":format!("{n}")}).to_string();
                    if c.ws.send(Message::text(text)).is_err() {
                        return acked;
                    }
                    n += 1;
                    loop {
                        match c.ws.read() {
                            Ok(Message::Text(t)) => {
                                let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                                if v["type"] == "ack" {
                                    acked.push(v["id"].as_i64().unwrap_or(-1));
                                    break;
                                }
                            }
                            Ok(_) => {}
                            Err(_) => return acked,
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    println!("{}", chat_figures(&addr));
    srv.crash();
    let acked: Vec<i64> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("sender"))
        .collect();
    assert!(acked.len() > 10, "senders got acks before the crash");

    // The reader pages through tens of thousands of messages: no history rate limit here.
    let srv = Server::spawn(&dir.0, &["--query-rate", "0"]);
    let (mut r, _) = Client::register(&srv.addr, "reader");
    let stored = r.all_message_ids("general");
    let after = stored.iter().copied().max().unwrap_or(0);
    let missing: Vec<&i64> = acked.iter().filter(|id| !stored.contains(id)).collect();
    println!(
        "crash: {} acked before SIGKILL, {} stored after restart, {} acked missing",
        acked.len(),
        stored.len(),
        missing.len()
    );
    assert!(missing.is_empty(), "acked but lost: {missing:?}");
    // New ids never collide with anything broadcast before the crash.
    r.send(json!({"type":"say","room":"general","text":"after crash"}));
    let m = r.expect("message");
    assert!(m["id"].as_i64().unwrap_or(0) > after);
    srv.stop();
}

#[test]
fn history_paging_typing_and_presence_over_the_wire() {
    let dir = TempDir::new("paging");
    let srv = Server::spawn(&dir.0, &["--rate-limit", "0", "--durability", "full"]);
    let (mut a, _) = Client::register(&srv.addr, "alice");
    let (mut b, tb) = Client::register(&srv.addr, "bob");
    a.expect_arrival("bob");
    let mut b2 = Client::resume(&srv.addr, &tb);
    a.expect_silence(); // bob's second connection is not a new "online"
    let mut ids = Vec::new();
    for i in 0..25 {
        a.send(json!({"type":"dm","to":"bob","text":format!("d{i}")}));
        ids.push(a.expect("message")["id"].as_i64().unwrap_or(0));
        a.expect("ack");
        assert_eq!(b.expect("message")["text"], format!("d{i}"));
        assert_eq!(b2.expect("message")["text"], format!("d{i}"));
    }
    // Backward from the newest, 10 at a time.
    let mut back: Vec<i64> = Vec::new();
    let mut before: Option<i64> = None;
    loop {
        let mut q = json!({"type":"history","with":"alice","limit":10});
        if let Some(x) = before {
            q["before"] = json!(x);
        }
        b.send(q);
        let h = b.expect("history");
        let page: Vec<i64> = h["messages"]
            .as_array()
            .map(|m| m.iter().filter_map(|m| m["id"].as_i64()).collect())
            .unwrap_or_default();
        back.splice(0..0, page.iter().copied());
        before = page.first().copied();
        if h["more"] != true {
            break;
        }
    }
    assert_eq!(back, ids);
    // Forward from the start.
    let mut fwd: Vec<i64> = Vec::new();
    let mut after = 0;
    loop {
        b2.send(json!({"type":"history","with":"alice","after":after,"limit":7}));
        let h = b2.expect("history");
        let page: Vec<i64> = h["messages"]
            .as_array()
            .map(|m| m.iter().filter_map(|m| m["id"].as_i64()).collect())
            .unwrap_or_default();
        fwd.extend(&page);
        after = page.last().copied().unwrap_or(after);
        if h["more"] != true {
            break;
        }
    }
    assert_eq!(fwd, ids);

    // Typing to a user reaches all of that user's connections, at most once per 2 s.
    a.send(json!({"type":"typing","to":"bob"}));
    a.send(json!({"type":"typing","to":"bob"}));
    let t = json!({"type":"typing","to":"bob","user":"alice","nick":"alice"});
    assert_eq!(b.expect("typing"), t);
    assert_eq!(b2.expect("typing"), t);
    b.expect_silence();
    b2.expect_silence();

    // Offline only when the last connection goes.
    drop(b);
    a.expect_silence();
    drop(b2);
    let off = a.expect("presence");
    assert_eq!(off["event"], "offline");
    assert_eq!(off["user"], "bob");
    srv.stop();
}

/// A member that stops reading is closed with 1008 once its queue overflows; the others keep
/// receiving everything meanwhile.
#[test]
fn slow_consumer_is_dropped_without_delaying_others() {
    let dir = TempDir::new("slow");
    let srv = Server::spawn(&dir.0, &["--rate-limit", "0", "--max-queue", "262144"]);
    let (mut sender, _) = Client::register(&srv.addr, "sender");
    let (mut reader, _) = Client::register(&srv.addr, "reader");
    let (mut stalled, _) = Client::register(&srv.addr, "stalled");
    // Drain the presence frames so far; from here on `stalled` never reads until the end.
    sender.expect_arrival("reader");
    sender.expect_arrival("stalled");
    reader.expect_arrival("stalled");
    let text = "x".repeat(4000);
    const N: usize = 2500; // 10 MB: more than loopback socket buffers plus the queue limit
    let start = Instant::now();
    let reader_thread = std::thread::spawn(move || {
        let mut got = 0;
        while got < N {
            let v = reader.recv();
            if v["type"] == "message" {
                got += 1;
            }
        }
        got
    });
    say_paced(&mut sender, N, |_| text.clone());
    assert_eq!(reader_thread.join().expect("reader"), N);
    println!(
        "slow consumer: {N} x 4000-char messages to a reader and a stalled member in {:.2} s",
        start.elapsed().as_secs_f64()
    );
    // The stalled client finds, after whatever was queued before the overflow, a 1008 close.
    let code = loop {
        match stalled.ws.read() {
            Ok(Message::Close(Some(f))) => break u16::from(f.code),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!(code, 1008);
    srv.stop();
}

/// Sends `n` messages to `general`, paced by acks (16 in flight), so a sender and members
/// that do read keep up.
fn say_paced(sender: &mut Client, n: usize, text: impl Fn(usize) -> String) {
    let mut acks = 0;
    for i in 0..n {
        sender.send(json!({"type":"say","room":"general","text":text(i)}));
        if i + 1 - acks >= 16 || i + 1 == n {
            let target = if i + 1 == n { n } else { acks + 8 };
            while acks < target {
                if sender.recv()["type"] == "ack" {
                    acks += 1;
                }
            }
        }
    }
}

/// A member that stops reading while a room floods gets, once it reads again, every message
/// intact and in order: broadcasts its socket could not take stay queued past the turn that
/// sent them (the turn's broadcast buffer is reused, so they must be kept as their own frames).
#[test]
fn a_member_that_pauses_reading_gets_every_broadcast_intact() {
    let dir = TempDir::new("pause");
    let srv = Server::spawn(&dir.0, &["--rate-limit", "0", "--max-queue", "33554432"]);
    let (mut sender, _) = Client::register(&srv.addr, "sender");
    let (mut paused, _) = Client::register(&srv.addr, "paused");
    sender.expect_arrival("paused");
    const N: usize = 1000; // 4 MB: more than the loopback socket buffers of a reader that stops
    let text = |i: usize| {
        format!(
            "{i:05}:{}",
            char::from(b'a' + (i % 26) as u8).to_string().repeat(3994)
        )
    };
    say_paced(&mut sender, N, text);
    let mut got = 0;
    while got < N {
        let v = paused.recv();
        if v["type"] == "message" {
            assert_eq!(v["text"], text(got), "message {got}");
            got += 1;
        }
    }
    srv.stop();
}

/// `--registration closed`: `register` answers `registration_closed` (nothing is hashed or
/// stored), existing accounts still log in, and `GET /api/server` tells clients.
#[test]
fn closed_registration_refuses_register_and_says_so() {
    use std::io::{Read, Write};
    let dir = TempDir::new("registration");
    let srv = Server::spawn(&dir.0, &[]);
    let (c, _) = Client::register(&srv.addr, "alice");
    drop(c);
    srv.stop();
    let srv = Server::spawn(&dir.0, &["--registration", "closed"]);
    let mut c = Client::connect(&srv.addr);
    c.send(json!({"type":"register","user":"mallory","password":"password123","ref":"r"}));
    let e = c.expect_error("registration_closed");
    assert_eq!(e["ref"], "r");
    c.send(json!({"type":"login","user":"mallory","password":"password123"}));
    c.expect_error("auth_failed");
    c.send(json!({"type":"login","user":"alice","password":"password123"}));
    c.expect("welcome");
    let mut s = std::net::TcpStream::connect(&srv.addr).expect("connect");
    s.write_all(b"GET /api/server HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("response");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with(r#"{"registration":"closed"}"#), "{resp}");
    srv.stop();
}
