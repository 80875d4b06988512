//! The chat's promises under attack and across restarts, over real sockets against the
//! `parlor` binary. Each test is named after the point of the hardening issue it proves.

mod chat_common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use chat_common::{Client, Server, TempDir};
use serde_json::{json, Value};
use tungstenite::Message;

/// The timing tests (a flood against a victim's latency) run one at a time, so that they
/// measure the server rather than each other.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

fn say(c: &mut Client, text: &str, reference: &str) -> Value {
    c.send(json!({"type":"say","room":"general","text":text,"ref":reference}));
    loop {
        let v = c.recv();
        if v["type"] == "ack" || v["type"] == "error" {
            assert_eq!(v["ref"], reference, "{v}");
            return v;
        }
    }
}

/// Every message of `general` with `text`, over all history.
fn stored_with_text(c: &mut Client, text: &str) -> Vec<i64> {
    c.send(json!({"type":"history","room":"general","limit":200}));
    let h = loop {
        let v = c.recv();
        if v["type"] == "history" {
            break v;
        }
    };
    h["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|m| m["text"] == text)
        .map(|m| m["id"].as_i64().unwrap_or(-1))
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

// ----- 1. retries across a restart -----

#[test]
fn p1_retry_after_restart_or_kill_gets_the_original_ack() {
    let dir = TempDir::new("dedup-restart");
    let srv = Server::spawn(&dir.0, &[]);
    let (mut c, token) = Client::register(&srv.addr, "alice");
    let first = say(&mut c, "once only", "r1");
    assert_eq!(first["type"], "ack", "{first}");
    drop(c);

    // A clean restart (SIGTERM).
    srv.stop();
    let srv = Server::spawn(&dir.0, &[]);
    let mut c = Client::resume(&srv.addr, &token);
    let again = say(&mut c, "once only", "r1");
    assert_eq!(
        again, first,
        "the resend gets the original ack (same id and ts)"
    );
    assert_eq!(stored_with_text(&mut c, "once only").len(), 1);

    // kill -9 right after the ack.
    let second = say(&mut c, "twice? no", "r2");
    assert_eq!(second["type"], "ack");
    drop(c);
    srv.crash();
    let srv = Server::spawn(&dir.0, &[]);
    let mut c = Client::resume(&srv.addr, &token);
    assert_eq!(say(&mut c, "twice? no", "r2"), second);
    assert_eq!(say(&mut c, "once only", "r1"), first);
    assert_eq!(
        stored_with_text(&mut c, "twice? no"),
        vec![second["id"].as_i64().unwrap_or(0)]
    );
    assert_eq!(stored_with_text(&mut c, "once only").len(), 1);
    // A new ref is a new message.
    let third = say(&mut c, "once only", "r3");
    assert_ne!(third["id"], first["id"]);
    srv.stop();
}

/// Outside `--dedup-window` a ref is forgotten, on disk too.
#[test]
fn p1_dedup_window_applies_after_restart() {
    let dir = TempDir::new("dedup-window");
    let srv = Server::spawn(&dir.0, &["--dedup-window", "1"]);
    let (mut c, token) = Client::register(&srv.addr, "alice");
    let first = say(&mut c, "old", "r1");
    drop(c);
    srv.stop();
    std::thread::sleep(Duration::from_millis(1200));
    let srv = Server::spawn(&dir.0, &["--dedup-window", "1"]);
    let mut c = Client::resume(&srv.addr, &token);
    let again = say(&mut c, "old", "r1");
    assert_eq!(again["type"], "ack");
    assert_ne!(again["id"], first["id"], "window passed: stored anew");
    srv.stop();
}

// ----- 2. logout ends the session -----

fn expect_logged_out(c: &mut Client) {
    assert_eq!(c.expect_close(), 1000);
}

#[test]
fn p2_logout_closes_every_connection_using_the_token() {
    let dir = TempDir::new("logout");
    let srv = Server::spawn(&dir.0, &[]);
    let (mut a1, token) = Client::register(&srv.addr, "alice");
    let mut a2 = Client::resume(&srv.addr, &token);
    let mut other = Client::connect(&srv.addr);
    other.send(json!({"type":"login","user":"alice","password":"password123"}));
    other.expect("welcome");
    a1.send(json!({"type":"logout"}));
    expect_logged_out(&mut a1);
    // The second connection with the same token is closed too, not left sending.
    let mut closed = false;
    a2.send(json!({"type":"say","room":"general","text":"still here?","ref":"x"}));
    loop {
        match a2.ws.read() {
            Ok(Message::Close(Some(f))) => {
                assert_eq!(u16::from(f.code), 1000);
                closed = true;
                break;
            }
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                assert_ne!(
                    v["type"], "ack",
                    "a revoked session must not be served: {v}"
                );
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert!(closed, "close 1000 on the other connection");
    let mut r = Client::connect(&srv.addr);
    r.send(json!({"type":"resume","token":token}));
    r.expect_error("auth_failed");
    // A connection with another token of the same user stays.
    assert_eq!(say(&mut other, "hello", "o1")["type"], "ack");
    srv.stop();
}

#[test]
fn p2_logout_all_revokes_every_token_and_closes_every_connection() {
    let dir = TempDir::new("logout-all");
    let srv = Server::spawn(&dir.0, &[]);
    let (mut a1, t1) = Client::register(&srv.addr, "alice");
    let mut a2 = Client::connect(&srv.addr);
    a2.send(json!({"type":"login","user":"alice","password":"password123"}));
    let t2 = a2.expect("welcome")["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (mut b, _) = Client::register(&srv.addr, "bob");
    a1.send(json!({"type":"logout","all":true}));
    expect_logged_out(&mut a1);
    expect_logged_out(&mut a2);
    for t in [&t1, &t2] {
        let mut r = Client::connect(&srv.addr);
        r.send(json!({"type":"resume","token":t}));
        r.expect_error("auth_failed");
    }
    // Survives a restart: the revocation is durable.
    drop(b);
    srv.stop();
    let srv = Server::spawn(&dir.0, &[]);
    let mut r = Client::connect(&srv.addr);
    r.send(json!({"type":"resume","token":t2}));
    r.expect_error("auth_failed");
    b = Client::connect(&srv.addr);
    b.send(json!({"type":"login","user":"bob","password":"password123"}));
    b.expect("welcome");
    srv.stop();
}

#[test]
fn p2_unused_tokens_expire_after_session_ttl() {
    let dir = TempDir::new("session-ttl");
    let srv = Server::spawn(&dir.0, &["--session-ttl", "1"]);
    let (c, token) = Client::register(&srv.addr, "alice");
    // Used (resume) within the TTL: still valid.
    drop(c);
    std::thread::sleep(Duration::from_millis(600));
    let c = Client::resume(&srv.addr, &token);
    drop(c);
    std::thread::sleep(Duration::from_millis(600));
    let c = Client::resume(&srv.addr, &token);
    drop(c);
    // Not used for longer than the TTL: gone, across a restart too.
    srv.stop();
    std::thread::sleep(Duration::from_millis(1500));
    let srv = Server::spawn(&dir.0, &["--session-ttl", "1"]);
    let mut r = Client::connect(&srv.addr);
    r.send(json!({"type":"resume","token":token}));
    r.expect_error("auth_failed");
    srv.stop();
}

// ----- 4. parallel logins and a fair hashing queue -----

/// 300 guesses sent at once from one address: only `--login-throttle` are hashed (the right
/// password among the rest is never checked), and a login from another address while the
/// flood is queued waits for about one hash, not hundreds. Real argon2 costs (the defaults).
#[test]
fn p4_parallel_logins_are_counted_and_hashing_is_fair() {
    let _g = heavy();
    let dir = TempDir::new("login-flood");
    let srv = Server::spawn(
        &dir.0,
        &[
            "--argon2-memory",
            "19456",
            "--argon2-iterations",
            "2",
            // 300 sockets from 127.0.0.1: the per-address connection limit is not under test.
            "--max-connections-per-ip",
            "0",
        ],
    );
    let (c, _) = Client::register(&srv.addr, "alice");
    drop(c);
    let (c, _) = Client::register(&srv.addr, "victim");
    drop(c);
    // What one hash costs here.
    let t = Instant::now();
    let mut one = Client::connect_from(&srv.addr, [127, 0, 0, 3]);
    one.send(json!({"type":"login","user":"victim","password":"password123"}));
    one.expect("welcome");
    let one_hash = t.elapsed();

    let mut guesses: Vec<Client> = (0..300)
        .map(|_| Client::connect_from(&srv.addr, [127, 0, 0, 1]))
        .collect();
    let started = Instant::now();
    for (i, g) in guesses.iter_mut().enumerate() {
        let pw = if i == 150 {
            "password123"
        } else {
            "wrong-guess"
        };
        // Many accounts too, so the per-(account, address) limit is not the only stop.
        let user = if i % 2 == 0 {
            "alice".to_string()
        } else {
            format!("u{i}")
        };
        g.send(json!({"type":"login","user":user,"password":pw}));
    }
    let t = Instant::now();
    let mut victim = Client::connect_from(&srv.addr, [127, 0, 0, 2]);
    victim.send(json!({"type":"login","user":"victim","password":"password123"}));
    victim.expect("welcome");
    let victim_wait = t.elapsed();

    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for g in &mut guesses {
        let v = g.recv();
        let code = if v["type"] == "error" {
            v["code"].as_str().unwrap_or("?").to_string()
        } else {
            v["type"].as_str().unwrap_or("?").to_string()
        };
        *codes.entry(code).or_default() += 1;
    }
    println!(
        "login flood: one hash {:?}; victim's login during the flood {:?}; flood answered in {:?}: {codes:?}",
        one_hash,
        victim_wait,
        started.elapsed()
    );
    assert_eq!(
        codes.get("welcome"),
        None,
        "the right guess was never checked"
    );
    let hashed = codes.get("auth_failed").copied().unwrap_or(0);
    assert!(
        hashed <= 20,
        "only the per-address allowance is hashed: {codes:?}"
    );
    assert!(codes.get("rate_limited").copied().unwrap_or(0) >= 280);
    // The victim waits behind at most the hash already running (plus its own), not the queue.
    assert!(
        victim_wait < one_hash * 6 + Duration::from_millis(300),
        "victim waited {victim_wait:?} (one hash {one_hash:?})"
    );
    srv.stop();
}

// ----- 5. no lockout -----

#[test]
fn p5_failed_logins_elsewhere_do_not_lock_out_the_owner_or_resumes() {
    let dir = TempDir::new("lockout");
    let srv = Server::spawn(&dir.0, &[]);
    let (c, token) = Client::register(&srv.addr, "alice");
    drop(c);
    let mut attacker = Client::connect_from(&srv.addr, [127, 0, 0, 1]);
    for _ in 0..5 {
        attacker.send(json!({"type":"login","user":"alice","password":"wrong-guess"}));
        attacker.expect_error("auth_failed");
    }
    attacker.send(json!({"type":"login","user":"alice","password":"wrong-guess"}));
    attacker.expect_error("rate_limited");
    // The owner, from another address, with the right password.
    let mut owner = Client::connect_from(&srv.addr, [127, 0, 0, 2]);
    owner.send(json!({"type":"login","user":"alice","password":"password123"}));
    owner.expect("welcome");
    // Five failures for a made-up account from an address do not stop a valid resume there.
    let mut typo = Client::connect_from(&srv.addr, [127, 0, 0, 4]);
    for _ in 0..6 {
        typo.send(json!({"type":"login","user":"nobody-here","password":"wrong-guess"}));
        let v = typo.recv();
        assert_eq!(v["type"], "error", "{v}");
    }
    let mut r = Client::connect_from(&srv.addr, [127, 0, 0, 4]);
    r.send(json!({"type":"resume","token":token}));
    r.expect("welcome");
    let mut r = Client::connect_from(&srv.addr, [127, 0, 0, 1]);
    r.send(json!({"type":"resume","token":token}));
    r.expect("welcome");
    srv.stop();
}

// ----- 6. history floods -----

/// One user pipelines 60,000 `history` requests; another user's acks stay fast, and the
/// flooder gets `rate_limited` for what is over its allowance.
#[test]
fn p6_history_flood_does_not_delay_other_users() {
    let _g = heavy();
    let dir = TempDir::new("history-flood");
    let srv = Server::spawn(&dir.0, &["--rate-limit", "0"]);
    let (mut filler, _) = Client::register(&srv.addr, "filler");
    for i in 0..300 {
        filler.send(json!({"type":"say","room":"general","text":format!("history line {i:04} with some words in it")}));
    }
    let mut acks = 0;
    while acks < 300 {
        if filler.recv()["type"] == "ack" {
            acks += 1;
        }
    }
    let (mut victim, _) = Client::register(&srv.addr, "victim");
    let (mut flooder, _) = Client::register(&srv.addr, "flooder");
    while victim.recv_within(Duration::from_millis(200)).is_some() {}

    let addr = srv.addr.clone();
    let flood = std::thread::spawn(move || {
        let mut batch = String::new();
        let mut sent = 0;
        let frames: Vec<Message> = (0..60_000)
            .map(|i| {
                batch.clear();
                Message::text(
                    json!({"type":"history","room":"general","limit":200,"ref":format!("h{i}")})
                        .to_string(),
                )
            })
            .collect();
        for m in frames {
            if flooder.ws.write(m).is_err() {
                break;
            }
            sent += 1;
        }
        let _ = flooder.ws.flush();
        let _ = addr;
        // Read what came back for a while: count the kinds.
        let mut histories = 0;
        let mut limited = 0;
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            match flooder.recv_within(Duration::from_millis(300)) {
                Some(v) if v["type"] == "history" => histories += 1,
                Some(v) if v["code"] == "rate_limited" => limited += 1,
                Some(_) => {}
                None => break,
            }
        }
        (sent, histories, limited)
    });
    std::thread::sleep(Duration::from_millis(30));
    let mut lat = Vec::new();
    for i in 0..200 {
        let t = Instant::now();
        let v = say(&mut victim, "still fast?", &format!("v{i}"));
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(v["type"], "ack", "{v}");
    }
    let (sent, histories, limited) = flood.join().expect("flooder");
    lat.sort_by(|a, b| a.total_cmp(b));
    println!(
        "history flood: {sent} requests sent, {histories} answered, {limited} rate_limited seen; victim ack p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat[lat.len() - 1]
    );
    assert!(histories <= 40, "queries are rate-limited: {histories}");
    assert!(limited > 0);
    assert!(
        percentile(&lat, 0.99) < 50.0,
        "victim ack p99 {:.2} ms",
        percentile(&lat, 0.99)
    );
    // Sampled one after another, a stall behind the flood is a single slow sample (10 s on
    // the unlimited server), which a percentile alone would not see.
    let max = lat[lat.len() - 1];
    assert!(max < 1000.0, "victim ack max {max:.2} ms");
    srv.stop();
}

// ----- 7. authentication deadline -----

#[test]
fn p7_unauthenticated_connection_is_closed_after_auth_timeout() {
    let dir = TempDir::new("auth-timeout");
    let srv = Server::spawn(&dir.0, &["--auth-timeout", "1"]);
    let t = Instant::now();
    let mut idle = Client::connect(&srv.addr);
    let (mut user, _) = Client::register(&srv.addr, "alice");
    assert_eq!(idle.expect_close(), 1008);
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    // An authenticated connection is not affected.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(say(&mut user, "still here", "s")["type"], "ack");
    srv.stop();
}

// ----- 9. look-alike names -----

#[test]
fn p9_look_alike_names_and_nicks_are_refused() {
    let dir = TempDir::new("confusables");
    let srv = Server::spawn(&dir.0, &[]);
    let (_alice, _) = Client::register(&srv.addr, "alice");
    let (mut mark, _) = Client::register(&srv.addr, "mark");
    for name in ["aIice", "a1ice", "ALICE", "rnark", "MARK"] {
        let mut c = Client::connect(&srv.addr);
        c.send(json!({"type":"register","user":name,"password":"password123"}));
        c.expect_error("user_taken");
    }
    let (mut eve, _) = Client::register(&srv.addr, "eve");
    for nick in ["M\u{0430}rk", "ｍａｒｋ", "rnark", "Mark", "aIice"] {
        eve.send(json!({"type":"nick","nick":nick,"ref":"n"}));
        loop {
            let v = eve.recv();
            if v["ref"] == "n" {
                assert_eq!(v["code"], "nick_taken", "{nick:?}: {v}");
                break;
            }
        }
    }
    // An offline user's nick cannot be taken and shown to everyone.
    mark.send(json!({"type":"nick","nick":"Zed","ref":"z"}));
    loop {
        if mark.recv()["ref"] == "z" {
            break;
        }
    }
    drop(mark);
    std::thread::sleep(Duration::from_millis(100));
    for nick in ["zed", "Z\u{0435}d", "ＺＥＤ"] {
        eve.send(json!({"type":"nick","nick":nick,"ref":"n2"}));
        loop {
            let v = eve.recv();
            if v["ref"] == "n2" {
                assert_eq!(v["code"], "nick_taken", "{nick:?}: {v}");
                break;
            }
        }
    }
    // Nor can an account be registered under it.
    let mut c = Client::connect(&srv.addr);
    c.send(json!({"type":"register","user":"zed","password":"password123"}));
    c.expect_error("user_taken");
    srv.stop();
}

// ----- 10. behind a reverse proxy -----

/// Two failed logins for alice (`--login-throttle 2`) from forwarded address `first`, then one
/// from `second`: what does the second get?
fn second_forwarded_address_gets(trusted: bool) -> String {
    let dir = TempDir::new("proxy");
    let mut args = vec!["--login-throttle", "2"];
    if trusted {
        args.extend_from_slice(&["--trusted-proxy", "127.0.0.1"]);
    }
    let srv = Server::spawn(&dir.0, &args);
    let (c, _) = Client::register(&srv.addr, "alice");
    drop(c);
    let login = json!({"type":"login","user":"alice","password":"wrong-guess"});
    let mut first = Client::connect_from_with(
        &srv.addr,
        [127, 0, 0, 1],
        &[("X-Forwarded-For", "203.0.113.7")],
    );
    for _ in 0..2 {
        first.send(login.clone());
        first.expect_error("auth_failed");
    }
    first.send(login.clone());
    first.expect_error("rate_limited");
    let mut second = Client::connect_from_with(
        &srv.addr,
        [127, 0, 0, 1],
        &[("X-Forwarded-For", "198.51.100.9, 203.0.113.8")],
    );
    second.send(login);
    let v = second.recv();
    srv.stop();
    v["code"].as_str().unwrap_or_default().to_string()
}

#[test]
fn p10_forwarded_addresses_are_throttled_separately_only_through_a_trusted_proxy() {
    // Through a trusted proxy the rightmost untrusted X-Forwarded-For entry is the client:
    // another client behind the same proxy is not throttled for the first one's failures.
    assert_eq!(second_forwarded_address_gets(true), "auth_failed");
    // From an untrusted peer the header is ignored: both are the same (real) address.
    assert_eq!(second_forwarded_address_gets(false), "rate_limited");
}
