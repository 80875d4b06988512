//! Password hashing must not make the server's memory grow with every login: argon2 needs
//! 19 MiB of scratch per hash (OWASP settings), and allocating it per call once left glibc
//! holding ~10 MB per registration (20 registrations: 25 MB → 220 MB of resident memory).

mod common;

use common::{rss_bytes, Server};
use parlor::ws::reader::OwnedEvent;

fn register(server: &Server, user: &str) {
    let mut ws = server.ws_at("/ws");
    ws.send_text(&format!(
        r#"{{"type":"register","user":"{user}","password":"correct horse battery"}}"#
    ));
    match ws.recv_message() {
        OwnedEvent::Text(t) => assert!(t.contains(r#""type":"welcome""#), "{t}"),
        other => panic!("expected welcome, got {other:?}"),
    }
}

#[test]
fn registrations_do_not_grow_memory() {
    // Default argon2 cost on purpose: the growth came from its 19 MiB blocks.
    let server = Server::with_args(&["--rate-limit", "0"]);
    register(&server, "warmup");
    let base = rss_bytes(server.pid()).expect("VmRSS") / 1024;
    for i in 0..12 {
        register(&server, &format!("user{i}"));
    }
    let grown = (rss_bytes(server.pid()).expect("VmRSS") / 1024).saturating_sub(base);
    assert!(
        grown < 8 * 1024,
        "12 registrations grew the server by {grown} KiB (base {base} KiB)"
    );
}
