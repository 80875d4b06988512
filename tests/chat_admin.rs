//! `parlor user add|passwd|disable|enable|list` run as a separate process on the server's
//! `--data`, offline and beside a running server, which must notice each change within about
//! a second: new accounts sign in, changed passwords and disabled accounts lose their sessions
//! and connections.

mod chat_common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use chat_common::{Client, Server, TempDir};
use serde_json::{json, Value};

/// Runs `parlor --data DIR (cheap hashing) ARGS`, with `stdin` as its standard input.
fn parlor(data: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_parlor"))
        .args(["--data", data.to_str().expect("utf8")])
        .args(["--argon2-memory", "64", "--argon2-iterations", "1"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run parlor");
    // A command that exits before reading (a usage error) closes the pipe: ignore that.
    let _ = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes());
    child.wait_with_output().expect("wait for parlor")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// The command succeeded and printed `want` (one line).
fn ok(o: Output, want: &str) {
    assert!(o.status.success(), "{:?}: {}", o.status, stderr(&o));
    assert_eq!(stdout(&o), format!("{want}\n"));
}

/// The command failed with exit code 1, saying `why` on stderr and nothing on stdout.
fn refused(o: Output, why: &str) {
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stderr(&o).contains(why), "{}", stderr(&o));
    assert!(o.stdout.is_empty(), "{}", stdout(&o));
}

/// A `login` on a new connection: the reply frame and the connection.
fn login(addr: &str, user: &str, password: &str) -> (Value, Client) {
    let mut c = Client::connect(addr);
    c.send(json!({"type":"login","user":user,"password":password}));
    (c.recv(), c)
}

/// `welcome`, or the error code.
fn verdict(reply: &Value) -> &str {
    match reply["type"].as_str() {
        Some("error") => reply["code"].as_str().unwrap_or_default(),
        t => t.unwrap_or_default(),
    }
}

/// What a `login` on a new connection gets: `welcome` or the error code.
fn login_says(addr: &str, user: &str, password: &str) -> String {
    verdict(&login(addr, user, password).0).to_string()
}

/// What a `resume` on a new connection gets: `welcome` or the error code.
fn resume_says(addr: &str, token: &str) -> String {
    let mut c = Client::connect(addr);
    c.send(json!({"type":"resume","token":token}));
    verdict(&c.recv()).to_string()
}

/// The close code the server sent `c`, which it must send within about a second of the
/// command's end (`since`): one poll of the store's change log, every 250 ms.
fn closed_soon(c: &mut Client, since: Instant, what: &str) -> u16 {
    let code = c.expect_close();
    let after = since.elapsed();
    println!("closed {after:?} after {what}");
    assert!(
        after < Duration::from_millis(1500),
        "closed after {after:?}"
    );
    code
}

#[test]
fn account_added_offline_signs_in_when_the_server_starts() {
    let dir = TempDir::new("admin-offline");
    // The first account, before the server ever ran (a private server's first step).
    ok(
        parlor(&dir.0, &["user", "add", "Alice"], "password123\n"),
        "added user Alice",
    );
    for (name, password, why) in [
        ("alice", "password123\n", "user Alice already exists"),
        (
            "a1ice",
            "password123\n",
            "looks like the existing user Alice",
        ),
        ("bob", "short\n", "at least 8 bytes"),
        ("bob", "", "no password on standard input"),
        ("bob smith", "password123\n", "A-Z a-z 0-9"),
    ] {
        refused(parlor(&dir.0, &["user", "add", name], password), why);
    }
    // A CRLF line (a Windows-made file) is the password without its line end.
    ok(
        parlor(&dir.0, &["user", "add", "carol"], "carol pass\r\nignored\n"),
        "added user carol",
    );

    let srv = Server::spawn(&dir.0, &["--registration", "closed"]);
    let (w, _a) = login(&srv.addr, "alice", "password123");
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(
        (&w["user"], &w["rooms"]),
        (&json!("Alice"), &json!(["general"]))
    );
    assert_eq!(login_says(&srv.addr, "carol", "carol pass"), "welcome");
    srv.stop();
}

#[test]
fn account_added_while_running_signs_in_at_once() {
    let dir = TempDir::new("admin-add-live");
    let srv = Server::spawn(&dir.0, &[]);
    let (mut bob, _) = Client::register(&srv.addr, "bob");
    // The name a client holds is refused to the operator too, in any case.
    refused(
        parlor(&dir.0, &["user", "add", "BOB"], "password123\n"),
        "user bob already exists",
    );
    let t = Instant::now();
    ok(
        parlor(&dir.0, &["user", "add", "carol"], "carol pass\n"),
        "added user carol",
    );
    // Members of general see the newcomer arrive, as for a registration.
    let p = bob.recv_within(Duration::from_secs(5)).expect("presence");
    let noticed = t.elapsed();
    assert_eq!(
        (&p["type"], &p["event"], &p["room"], &p["user"]),
        (
            &json!("presence"),
            &json!("join"),
            &json!("general"),
            &json!("carol")
        ),
        "{p}"
    );
    assert!(noticed < Duration::from_millis(1500), "{noticed:?}");
    let (w, _c) = login(&srv.addr, "carol", "carol pass");
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(w["rooms"], json!(["general"]));
    // And the server now refuses the name (and look-alikes) to `register`.
    let mut r = Client::connect(&srv.addr);
    r.send(json!({"type":"register","user":"caro1","password":"password123"}));
    r.expect_error("user_taken");
    println!("the running server noticed the new account after {noticed:?}");
    srv.stop();
}

#[test]
fn new_password_while_running_ends_every_session() {
    let dir = TempDir::new("admin-passwd");
    let srv = Server::spawn(&dir.0, &[]);
    let (mut a, token) = Client::register(&srv.addr, "alice");
    let mut a2 = Client::resume(&srv.addr, &token);
    let (_bob, bob_token) = Client::register(&srv.addr, "bob");
    let t = Instant::now();
    ok(
        parlor(&dir.0, &["user", "passwd", "alice"], "new password\n"),
        "changed the password of alice; 1 session revoked",
    );
    assert_eq!(closed_soon(&mut a, t, "passwd"), 1000);
    assert_eq!(closed_soon(&mut a2, t, "passwd"), 1000);
    assert_eq!(resume_says(&srv.addr, &token), "auth_failed");
    assert_eq!(login_says(&srv.addr, "alice", "password123"), "auth_failed");
    assert_eq!(login_says(&srv.addr, "alice", "new password"), "welcome");
    // Nobody else was touched.
    assert_eq!(resume_says(&srv.addr, &bob_token), "welcome");
    refused(
        parlor(&dir.0, &["user", "passwd", "nobody"], "new password\n"),
        "no user nobody",
    );
    srv.stop();
    // The new password is what the next start loads.
    let srv = Server::spawn(&dir.0, &[]);
    assert_eq!(login_says(&srv.addr, "alice", "new password"), "welcome");
    srv.stop();
}

#[test]
fn disabled_account_is_closed_and_refused_until_enabled() {
    let dir = TempDir::new("admin-disable");
    let srv = Server::spawn(&dir.0, &[]);
    let (mut d, token) = Client::register(&srv.addr, "dave");
    let (mut other, _) = Client::register(&srv.addr, "erin");
    d.expect_arrival("erin");
    let t = Instant::now();
    ok(
        parlor(&dir.0, &["user", "disable", "Dave"], ""),
        "disabled Dave; 1 session revoked",
    );
    d.expect_error("account_disabled");
    assert_eq!(closed_soon(&mut d, t, "disable"), 1008);
    // erin sees dave go offline, and stays connected.
    let p = other.recv_within(Duration::from_secs(5)).expect("presence");
    assert_eq!(
        (&p["event"], &p["user"]),
        (&json!("offline"), &json!("dave"))
    );
    other.expect_silence();

    assert_eq!(
        login_says(&srv.addr, "dave", "password123"),
        "account_disabled"
    );
    assert_eq!(resume_says(&srv.addr, &token), "auth_failed");
    ok(
        parlor(&dir.0, &["user", "disable", "dave"], ""),
        "dave was already disabled",
    );

    // A restart keeps it disabled.
    srv.stop();
    let srv = Server::spawn(&dir.0, &[]);
    assert_eq!(
        login_says(&srv.addr, "dave", "password123"),
        "account_disabled"
    );

    ok(
        parlor(&dir.0, &["user", "enable", "dave"], ""),
        "enabled dave",
    );
    // The server learns it within a poll; until then the answer is still account_disabled.
    let t = Instant::now();
    loop {
        match login_says(&srv.addr, "dave", "password123").as_str() {
            "welcome" => break,
            said => assert_eq!(said, "account_disabled"),
        }
        assert!(t.elapsed() < Duration::from_secs(3), "still disabled");
        std::thread::sleep(Duration::from_millis(50));
    }
    refused(
        parlor(&dir.0, &["user", "enable", "nobody"], ""),
        "no user nobody",
    );
    srv.stop();
}

#[test]
fn list_shows_every_account() {
    let dir = TempDir::new("admin-list");
    refused(
        parlor(&dir.0, &["user", "list"], ""),
        "no chat database here",
    );
    let srv = Server::spawn(&dir.0, &[]);
    let (mut a, _) = Client::register(&srv.addr, "alice");
    a.send(json!({"type":"nick","nick":"Ally ✨"}));
    a.expect("nick");
    ok(
        parlor(&dir.0, &["user", "add", "Bob"], "password123\n"),
        "added user Bob",
    );
    ok(
        parlor(&dir.0, &["user", "disable", "bob"], ""),
        "disabled bob; 0 sessions revoked",
    );
    drop(a);
    srv.stop();

    let out = parlor(&dir.0, &["user", "list"], "");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert_eq!(rows[0][..2], ["alice", "Ally ✨"]);
    assert_eq!(rows[0][4], "enabled");
    assert!(rows[0][3].ends_with('Z'), "alice was seen: {text}");
    assert_eq!(rows[1][..2], ["Bob", "Bob"]);
    assert_eq!(rows[1][3..], ["-", "disabled"]);
    for r in &rows {
        // 2026-12-01T02:56:01.113Z
        assert_eq!((r[2].len(), &r[2][10..11]), (24, "T"), "{text}");
    }

    let out = parlor(&dir.0, &["user", "list", "--json"], "");
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(
        (&v[0]["name"], &v[0]["disabled"]),
        (&json!("alice"), &json!(false))
    );
    assert!(v[0]["last_seen"].as_i64().unwrap() >= v[0]["created"].as_i64().unwrap());
    assert_eq!(
        (&v[1]["nick"], &v[1]["last_seen"]),
        (&json!("Bob"), &Value::Null)
    );
    assert_eq!(v[1]["disabled"], true);
}

#[test]
fn a_password_is_never_taken_from_the_command_line() {
    let dir = TempDir::new("admin-argv");
    for args in [
        &["user", "add", "alice", "password123"][..],
        &["user", "add", "alice", "--password", "password123"][..],
        &["user", "passwd", "alice", "password123"][..],
    ] {
        let out = parlor(&dir.0, args, "password123\n");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stdout(&out));
        assert!(
            stderr(&out).contains("unexpected argument"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert!(
        !dir.0.join("chat.db").exists(),
        "nothing was created by a refused command line"
    );
}
