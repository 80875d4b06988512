//! The HTTP upgrade handshake against the real server: incremental parsing, bytes after the
//! head, validation, limits, origins, and handshake timeouts.

mod common;

use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use parlor::ws::frame::OpCode;

#[test]
fn request_split_byte_by_byte_still_upgrades() {
    let server = Server::echo();
    let mut s = server.tcp();
    let req = upgrade_request("/echo", RFC_KEY, &["Origin: http://whatever"]);
    for b in req.as_bytes() {
        s.write_all(std::slice::from_ref(b)).unwrap();
        thread::sleep(Duration::from_millis(1));
    }
    let (resp, rest) = read_head(&mut s);
    assert_upgraded(&resp);
    assert!(rest.is_empty(), "nothing may follow the 101 unasked");
    let mut ws = WsClient::from_upgraded(s, rest);
    // A frame written byte by byte as well.
    let frame = masked(true, OpCode::Text, "slow frame".as_bytes());
    for b in &frame {
        ws.send_raw(std::slice::from_ref(b));
        thread::sleep(Duration::from_millis(1));
    }
    ws.expect_text("slow frame");
}

#[test]
fn frame_in_same_write_as_request_head_is_processed() {
    let server = Server::echo();
    let mut s = server.tcp();
    let mut bytes = upgrade_request("/echo", RFC_KEY, &[]).into_bytes();
    bytes.extend_from_slice(&masked(true, OpCode::Text, b"early bird"));
    bytes.extend_from_slice(&masked(true, OpCode::Binary, &[1, 2, 3]));
    s.write_all(&bytes).unwrap();
    let (resp, rest) = read_head(&mut s);
    assert_upgraded(&resp);
    let mut ws = WsClient::from_upgraded(s, rest);
    ws.expect_text("early bird");
    ws.expect_binary(&[1, 2, 3]);
    ws.echo("and later");
}

/// A ping that arrives together with the request head must be answered after the 101: the
/// response head has to be the first thing on the wire (RFC 6455 §4.2.2: the server sends the
/// handshake response, and only then is the connection in the OPEN state).
#[test]
fn ping_in_same_write_as_request_head_is_answered_after_the_101() {
    let server = Server::echo();
    let mut s = server.tcp();
    let mut bytes = upgrade_request("/echo", RFC_KEY, &[]).into_bytes();
    bytes.extend_from_slice(&masked(true, OpCode::Ping, b"early ping"));
    // Frozen while the bytes arrive, the server is sure to read head and ping together.
    server.pause();
    s.write_all(&bytes).unwrap();
    thread::sleep(Duration::from_millis(50));
    server.resume();
    let mut first = [0u8; 12];
    s.read_exact(&mut first).unwrap();
    assert_eq!(
        &first, b"HTTP/1.1 101",
        "the response must start with the status line, got {first:02x?}"
    );
    let mut buf = first.to_vec();
    let (resp, end) = loop {
        if let Some(parsed) = parse_http_head(&buf) {
            break parsed;
        }
        let mut chunk = [0u8; 1024];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "EOF inside the response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    assert_upgraded(&resp);
    let mut ws = WsClient::from_upgraded(s, buf[end..].to_vec());
    assert_eq!(
        ws.recv_event(),
        parlor::ws::reader::OwnedEvent::Pong(b"early ping".to_vec())
    );
}

#[test]
fn accept_key_matches_rfc_vector_and_other_keys() {
    let server = Server::echo();
    // The RFC 6455 §1.3 example (assert_upgraded checks it).
    let ws = server.ws();
    drop(ws);
    // Another key, computed independently: SHA-1 of key + GUID, base64. Value from a
    // reference implementation (Python: base64.b64encode(hashlib.sha1(...).digest())).
    let mut s = server.tcp();
    s.write_all(upgrade_request("/echo", "x3JJHMbDL1EzLkh9GBhXDw==", &[]).as_bytes())
        .unwrap();
    let (resp, _) = read_head(&mut s);
    assert_eq!(resp.status, 101);
    assert_eq!(
        resp.header("sec-websocket-accept"),
        Some("HSmrc0sMlYUkAGmm5OPpG2HaGWk=")
    );
}

#[test]
fn missing_key_is_400() {
    let server = Server::echo();
    let req = "GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
               Sec-WebSocket-Version: 13\r\n\r\n";
    let resp = refused_upgrade(server.addr, req);
    assert_eq!(resp.status, 400, "{resp:?}");
    assert_eq!(resp.header("connection"), Some("close"));
}

#[test]
fn bad_keys_are_400() {
    let server = Server::echo();
    for key in [
        "not base64!!",
        "dGhlIHNhbXBsZSBub25j",         // decodes to 15 bytes
        "dGhlIHNhbXBsZSBub25jZSE=",     // decodes to 17 bytes
        "AAAAAAAAAAAAAAAAAAAAAAAAAAA=", // decodes to 20 bytes
    ] {
        let resp = refused_upgrade(server.addr, &upgrade_request("/echo", key, &[]));
        assert_eq!(resp.status, 400, "key {key:?}: {resp:?}");
    }
}

#[test]
fn wrong_version_is_426_naming_13() {
    let server = Server::echo();
    for version in ["8", "12", "14", ""] {
        let req = format!(
            "GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {RFC_KEY}\r\nSec-WebSocket-Version: {version}\r\n\r\n"
        );
        let resp = refused_upgrade(server.addr, &req);
        assert_eq!(resp.status, 426, "version {version:?}: {resp:?}");
        assert_eq!(resp.header("sec-websocket-version"), Some("13"));
    }
}

#[test]
fn post_upgrade_is_405() {
    let server = Server::echo();
    let req = upgrade_request("/echo", RFC_KEY, &[]).replacen("GET", "POST", 1);
    let resp = refused_upgrade(server.addr, &req);
    assert_eq!(resp.status, 405, "{resp:?}");
    assert_eq!(resp.header("allow"), Some("GET"));
}

#[test]
fn unknown_websocket_path_is_404() {
    let server = Server::echo();
    let resp = refused_upgrade(server.addr, &upgrade_request("/nope", RFC_KEY, &[]));
    assert_eq!(resp.status, 404, "{resp:?}");
}

#[test]
fn echo_is_off_by_default_and_on_with_the_flag() {
    // Default: /echo is an unknown WebSocket path, like any other.
    let server = Server::start();
    let resp = refused_upgrade(server.addr, &upgrade_request("/echo", RFC_KEY, &[]));
    assert_eq!(resp.status, 404, "{resp:?}");
    // --no-echo is still accepted and changes nothing.
    let server = Server::with_args(&["--no-echo"]);
    let resp = refused_upgrade(server.addr, &upgrade_request("/echo", RFC_KEY, &[]));
    assert_eq!(resp.status, 404, "{resp:?}");
    // --echo turns it on.
    let server = Server::with_args(&["--echo"]);
    server.ws().echo("opted in");
}

#[test]
fn oversize_head_is_431() {
    let server = Server::echo();
    let filler = format!("X-Filler: {}", "a".repeat(9 * 1024));
    let resp = refused_upgrade(server.addr, &upgrade_request("/echo", RFC_KEY, &[&filler]));
    assert_eq!(resp.status, 431, "{resp:?}");
}

#[test]
fn oversize_head_without_end_is_431_without_waiting_for_the_end() {
    let server = Server::echo();
    let mut s = server.tcp();
    let mut req = upgrade_request("/echo", RFC_KEY, &[]);
    req.truncate(req.len() - 2); // the blank line never comes
    req.push_str(&format!("X-Filler: {}", "a".repeat(9 * 1024)));
    s.write_all(req.as_bytes()).unwrap();
    let resp = read_http_to_eof(&mut s);
    assert_eq!(resp.status, 431);
}

#[test]
fn max_request_head_flag_is_honoured() {
    let server = Server::echo_with(&["--max-request-head", "300"]);
    let small = refused_upgrade(
        server.addr,
        &upgrade_request("/echo", RFC_KEY, &[&format!("X-A: {}", "b".repeat(400))]),
    );
    assert_eq!(small.status, 431);
    // A normal request still fits.
    server.ws().echo("fits");
}

#[test]
fn too_many_headers_is_431() {
    let server = Server::echo_with(&["--max-headers", "10"]);
    let extra: Vec<String> = (0..10).map(|i| format!("X-H{i}: v")).collect();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let resp = refused_upgrade(server.addr, &upgrade_request("/echo", RFC_KEY, &extra));
    assert_eq!(resp.status, 431, "{resp:?}");
    // Six headers (the standard five plus one) are fine.
    let mut s = server.tcp();
    s.write_all(upgrade_request("/echo", RFC_KEY, &["X-One: 1"]).as_bytes())
        .unwrap();
    let (resp, _) = read_head(&mut s);
    assert_upgraded(&resp);
}

#[test]
fn default_header_limit_is_64() {
    let server = Server::echo();
    let extra: Vec<String> = (0..70).map(|i| format!("X-H{i}: v")).collect();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let resp = refused_upgrade(server.addr, &upgrade_request("/echo", RFC_KEY, &extra));
    assert_eq!(resp.status, 431, "{resp:?}");
}

#[test]
fn allowed_origin_refuses_other_origins() {
    let server = Server::echo_with(&["--allowed-origin", "http://good"]);
    let evil = refused_upgrade(
        server.addr,
        &upgrade_request("/echo", RFC_KEY, &["Origin: http://evil"]),
    );
    assert_eq!(evil.status, 403, "{evil:?}");

    for extra in [&["Origin: http://good"][..], &[][..]] {
        let mut s = server.tcp();
        s.write_all(upgrade_request("/echo", RFC_KEY, extra).as_bytes())
            .unwrap();
        let (resp, rest) = read_head(&mut s);
        assert_upgraded(&resp);
        WsClient::from_upgraded(s, rest).echo("origin ok");
    }
}

#[test]
fn half_request_is_dropped_after_handshake_timeout() {
    let server = Server::echo_with(&["--handshake-timeout", "0.5"]);
    let mut s = server.tcp();
    let req = upgrade_request("/echo", RFC_KEY, &[]);
    s.write_all(&req.as_bytes()[..req.len() / 2]).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let n = match s.read(&mut buf) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
        Err(e) => panic!("expected the server to close the connection, got {e}"),
    };
    let waited = start.elapsed();
    assert_eq!(n, 0, "no response expected, got {:?}", &buf[..n]);
    assert!(
        waited >= Duration::from_millis(300),
        "closed too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "closed too late: {waited:?}"
    );
    assert_eq!(server.metric("parlor_handshake_timeouts_total"), 1);
}

#[test]
fn silent_connection_is_dropped_after_handshake_timeout() {
    let server = Server::echo_with(&["--handshake-timeout", "0.3"]);
    let mut s = server.tcp();
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0);
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn slowloris_does_not_starve_a_fresh_client() {
    // 300 sockets from 127.0.0.1: more than the default --max-connections-per-ip.
    let server = Server::echo_with(&[
        "--handshake-timeout",
        "1.5",
        "--max-connections-per-ip",
        "0",
    ]);
    let req = upgrade_request("/echo", RFC_KEY, &[]);
    let half = &req.as_bytes()[..req.len() / 2];
    let mut loris = Vec::new();
    for _ in 0..300 {
        let mut s = server.tcp();
        s.write_all(half).unwrap();
        loris.push(s);
    }
    // While all 300 are still half-open, a fresh client upgrades and echoes.
    let start = Instant::now();
    let mut ws = server.ws();
    for i in 0..20 {
        ws.echo(&format!("fresh {i}"));
    }
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "the fresh client had to wait for the slowloris to time out ({:?})",
        start.elapsed()
    );
    // Then the half-open ones are all dropped by the handshake timeout.
    for (i, s) in loris.iter_mut().enumerate() {
        let mut buf = [0u8; 8];
        let n = s.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "slowloris connection {i} got a response");
    }
    assert_eq!(server.metric("parlor_handshake_timeouts_total"), 300);
    // The fresh client is unaffected.
    ws.echo("still here");
}

#[test]
fn plain_http_request_to_ws_path_is_not_an_upgrade() {
    let server = Server::echo();
    let resp = server.http("GET", "/echo");
    assert_eq!(resp.status, 404);
}

#[test]
fn header_token_lists_are_case_insensitive() {
    let server = Server::echo();
    let req = format!(
        "GET /echo HTTP/1.1\r\nhost: x\r\nupgrade: WebSocket\r\nconnection: keep-alive, UPGRADE\r\n\
         sec-websocket-key: {RFC_KEY}\r\nsec-websocket-version: 13\r\n\r\n"
    );
    let mut s = server.tcp();
    s.write_all(req.as_bytes()).unwrap();
    let (resp, rest) = read_head(&mut s);
    assert_upgraded(&resp);
    WsClient::from_upgraded(s, rest).echo("tokens");
}

#[test]
fn other_malformed_upgrades_are_400() {
    let server = Server::echo();
    let std_req = upgrade_request("/echo", RFC_KEY, &[]);
    let cases = [
        ("HTTP/1.0", std_req.replacen("HTTP/1.1", "HTTP/1.0", 1)),
        ("no Host", std_req.replacen("Host: 127.0.0.1\r\n", "", 1)),
        (
            "two Hosts",
            std_req.replacen("Host: 127.0.0.1\r\n", "Host: a\r\nHost: b\r\n", 1),
        ),
        (
            "no Connection: Upgrade",
            std_req.replacen("Connection: Upgrade", "Connection: keep-alive", 1),
        ),
    ];
    for (what, req) in cases {
        let resp = refused_upgrade(server.addr, &req);
        assert_eq!(resp.status, 400, "{what}: {resp:?}");
    }
}

#[test]
fn trickling_slowloris_is_dropped_at_the_deadline() {
    // The handshake deadline runs from accept: sending a byte now and then does not extend it.
    let server = Server::echo_with(&["--handshake-timeout", "0.5"]);
    let mut s = server.tcp();
    let start = Instant::now();
    let req = upgrade_request("/echo", RFC_KEY, &[]);
    let mut dropped = false;
    for b in req.as_bytes()[..req.len() - 4].iter() {
        if s.write_all(std::slice::from_ref(b)).is_err() {
            dropped = true;
            break;
        }
        thread::sleep(Duration::from_millis(50));
        if start.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    if !dropped {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 8];
        dropped = match s.read(&mut buf) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
    }
    assert!(dropped, "a trickling client outlived the handshake timeout");
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_eq!(server.metric("parlor_handshake_timeouts_total"), 1);
}

#[test]
fn several_allowed_origins() {
    let server = Server::echo_with(&["--allowed-origin", "http://a.example,https://b.example"]);
    for (origin, status) in [
        ("http://a.example", 101),
        ("https://b.example", 101),
        ("HTTPS://B.EXAMPLE", 101),
        ("https://a.example", 403),
        ("http://a.example.evil", 403),
        ("null", 403),
    ] {
        let mut s = server.tcp();
        s.write_all(upgrade_request("/echo", RFC_KEY, &[&format!("Origin: {origin}")]).as_bytes())
            .unwrap();
        let (resp, _) = read_head(&mut s);
        assert_eq!(resp.status, status, "Origin {origin}");
    }
}
