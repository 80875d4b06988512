//! `/healthz` tells whether the store takes writes: 200 `ok` normally, 503 with the reason
//! while the database is locked by another process, 200 again once it is released.

mod chat_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use chat_common::*;
use serde_json::json;

fn healthz(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    r
}

#[test]
fn healthz_reports_a_store_that_cannot_write() {
    let dir = TempDir::new("healthz");
    let data = dir.0.join("data");
    let server = Server::spawn(&data, &[]);
    let (mut alice, _) = Client::register(&server.addr, "alice");
    assert!(healthz(&server.addr).starts_with("HTTP/1.1 200"));

    // Another process takes the write lock and keeps it.
    let lock = rusqlite::Connection::open(data.join("chat.db")).expect("open db");
    lock.execute_batch("BEGIN EXCLUSIVE").expect("lock");
    alice.send(json!({"type":"say","room":"general","text":"stuck","ref":"s1"}));
    // The server's write waits out its busy timeout, fails, and says so; /healthz follows.
    let mut said = String::new();
    assert!(
        eventually(Duration::from_secs(30), || {
            said = healthz(&server.addr);
            said.starts_with("HTTP/1.1 503")
        }),
        "{said}"
    );
    assert!(said.contains("store"), "{said}");
    loop {
        let v = alice.recv();
        if v["ref"] == "s1" {
            assert_eq!(v["type"], "error", "{v}");
            assert_eq!(v["code"], "internal", "{v}");
            break;
        }
    }

    lock.execute_batch("ROLLBACK").expect("unlock");
    alice.send(json!({"type":"say","room":"general","text":"free","ref":"s2"}));
    loop {
        let v = alice.recv();
        if v["ref"] == "s2" {
            assert_eq!(v["type"], "ack", "{v}");
            break;
        }
    }
    assert!(healthz(&server.addr).starts_with("HTTP/1.1 200"));
}
