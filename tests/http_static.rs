//! Static files, health and metrics over real HTTP.

mod common;

use std::io::{Read, Write};

use common::*;

#[test]
fn get_root_serves_index_html() {
    let server = Server::start();
    let resp = server.http("GET", "/");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), INDEX_HTML);
    let ct = resp.header("content-type").expect("Content-Type");
    assert!(ct.starts_with("text/html"), "Content-Type {ct}");
    assert_eq!(
        resp.header("content-length"),
        Some(INDEX_HTML.len().to_string().as_str())
    );
    assert_eq!(resp.header("connection"), Some("close"));
    // Same bytes under its own name.
    assert_eq!(server.http("GET", "/index.html").text(), INDEX_HTML);
}

#[test]
fn other_files_get_their_content_type() {
    let server = Server::start();
    let resp = server.http("GET", "/app.js");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "console.log('parlor');\n");
    assert!(resp.header("content-type").is_some_and(
        |v| v.starts_with("text/javascript") || v.starts_with("application/javascript")
    ));
}

#[test]
fn head_has_headers_but_no_body() {
    let server = Server::start();
    let resp = server.http("HEAD", "/");
    assert_eq!(resp.status, 200);
    assert!(resp.body.is_empty(), "HEAD body: {:?}", resp.text());
    assert_eq!(
        resp.header("content-length"),
        Some(INDEX_HTML.len().to_string().as_str()),
        "HEAD announces the GET length"
    );
    assert!(resp
        .header("content-type")
        .is_some_and(|v| v.starts_with("text/html")));
}

#[test]
fn missing_file_is_404() {
    let server = Server::start();
    assert_eq!(server.http("GET", "/missing").status, 404);
    assert_eq!(server.http("GET", "/missing.html").status, 404);
    let head = server.http("HEAD", "/missing");
    assert_eq!(head.status, 404);
    assert!(head.body.is_empty());
}

#[test]
fn post_is_405() {
    let server = Server::start();
    for method in ["POST", "PUT", "DELETE"] {
        let mut s = server.tcp();
        s.write_all(
            format!("{method} / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let resp = read_http_to_eof(&mut s);
        assert_eq!(resp.status, 405, "{method}");
        let allow = resp.header("allow").expect("Allow header");
        assert!(allow.contains("GET"), "Allow: {allow}");
    }
}

#[test]
fn traversal_is_404() {
    let server = Server::start();
    for path in [
        "/../Cargo.toml",
        "/%2e%2e/Cargo.toml",
        "/%2E%2E/Cargo.toml",
        "/..%2fCargo.toml",
        "/./index.html",
        "/a/../index.html",
        "//etc/passwd",
        "/..%5cCargo.toml",
    ] {
        let resp = server.http("GET", path);
        assert_eq!(resp.status, 404, "{path}: {resp:?}");
        assert!(!resp.text().contains("[package]"), "{path} leaked a file");
    }
}

#[test]
fn no_directory_listing() {
    let server = Server::start();
    // www has no subdirectory with an index; "/" maps to index.html, never a listing.
    let resp = server.http("GET", "/nosuchdir/");
    assert_eq!(resp.status, 404);
    assert!(!server.http("GET", "/").text().contains("app.js"));
}

#[test]
fn healthz_is_200() {
    let server = Server::start();
    let resp = server.http("GET", "/healthz");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text().trim(), "ok");
}

#[test]
fn metrics_is_prometheus_text() {
    let server = Server::echo();
    let mut ws = server.ws();
    ws.echo("count me");
    let resp = server.http("GET", "/metrics");
    assert_eq!(resp.status, 200);
    assert!(resp
        .header("content-type")
        .is_some_and(|v| v.starts_with("text/plain")));
    let body = resp.text();
    assert!(body.contains("# TYPE parlor_connections gauge"), "{body}");
    // This request and the WebSocket.
    assert_eq!(metric_value(&body, "parlor_connections"), Some(2));
    assert_eq!(metric_value(&body, "parlor_websocket_connections"), Some(1));
    assert_eq!(metric_value(&body, "parlor_messages_in_total"), Some(1));
    // Every sample line is `name[{labels}] value`.
    for line in body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (name, value) = line.rsplit_once(' ').expect("sample line");
        assert!(name.starts_with("parlor_"), "{line}");
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
}

#[test]
fn request_split_over_reads_is_served() {
    let server = Server::start();
    let mut s = server.tcp();
    for part in ["GE", "T /heal", "thz HTTP/1.1\r\nHo", "st: x\r\n", "\r\n"] {
        s.write_all(part.as_bytes()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let resp = read_http_to_eof(&mut s);
    assert_eq!(resp.status, 200);
}

#[test]
fn garbage_request_is_400() {
    let server = Server::start();
    let mut s = server.tcp();
    s.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        buf.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
}

/// A client may half-close its sending side once the request is out (`nc -N`, scripts using
/// `shutdown(SHUT_WR)`); TCP still carries the response the other way, and the server must
/// send it.
#[test]
fn request_followed_by_half_close_still_gets_its_response() {
    let server = Server::start();
    for path in ["/healthz", "/"] {
        let mut s = server.tcp();
        let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
        server.send_with_fin(&mut s, request.as_bytes());
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(
            buf.starts_with(b"HTTP/1.1 200"),
            "GET {path} then half-close got {:?}",
            String::from_utf8_lossy(&buf)
        );
    }
}
