//! Built-in TLS over real sockets: the chat over `wss://`, HTTPS, plain HTTP on the TLS port,
//! the handshake deadline, certificate reload on SIGHUP, and `--metrics-listen`. Certificates
//! are made here with rcgen; none is committed.

mod chat_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;

/// A self-signed certificate for `localhost` and 127.0.0.1, written as PEM into `dir`.
struct Cert {
    der: CertificateDer<'static>,
    cert: PathBuf,
    key: PathBuf,
}

fn make_cert(dir: &Path, tag: &str) -> Cert {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("generate certificate");
    let cert = dir.join(format!("{tag}-cert.pem"));
    let key = dir.join(format!("{tag}-key.pem"));
    std::fs::write(&cert, ck.cert.pem()).expect("write cert");
    std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write key");
    Cert {
        der: ck.cert.der().clone(),
        cert,
        key,
    }
}

/// A client configuration that trusts only `root`.
fn trusting(root: &CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).expect("add root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn tls_server(dir: &Path, cert: &Cert, extra: &[&str]) -> Server {
    let mut args = vec![
        "--tls-cert",
        cert.cert.to_str().expect("utf8"),
        "--tls-key",
        cert.key.to_str().expect("utf8"),
    ];
    args.extend_from_slice(extra);
    Server::spawn(&dir.join("data"), &args)
}

/// One HTTPS request (Connection: close); returns the status and body, or the TLS/IO error.
fn https_get(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
) -> Result<(u16, Vec<u8>), String> {
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let name = ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(tls, name).map_err(|e| e.to_string())?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    // The server ends with close_notify: a clean end of stream, not an error.
    s.read_to_end(&mut resp).map_err(|e| e.to_string())?;
    let head_end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no response head")?;
    let head = String::from_utf8_lossy(&resp[..head_end]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    Ok((status, resp[head_end + 4..].to_vec()))
}

fn signal(server: &Server, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &server.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// The next frame of type `ty`, skipping presence and other traffic.
fn until(c: &mut Client, ty: &str) -> serde_json::Value {
    loop {
        let v = c.recv();
        if v["type"] == ty {
            return v;
        }
    }
}

#[test]
fn the_chat_works_over_wss() {
    let dir = TempDir::new("tls-chat");
    let cert = make_cert(&dir.0, "a");
    // The burst below is about TLS records, not the per-user message rate.
    let server = tls_server(&dir.0, &cert, &["--rate-burst", "100"]);
    let tls = trusting(&cert.der);

    let mut alice = Client::connect_tls(&server.addr, tls.clone());
    alice.send(json!({"type":"register","user":"alice","password":"password123"}));
    let token = alice.expect("welcome")["token"]
        .as_str()
        .expect("token")
        .to_string();
    let mut bob = Client::connect_tls(&server.addr, tls.clone());
    bob.send(json!({"type":"register","user":"bob","password":"password123"}));
    bob.expect("welcome");
    for c in [&mut alice, &mut bob] {
        c.send(json!({"type":"join","room":"tls"}));
        until(c, "joined");
    }
    // A message bigger than a TLS record (16 KiB) and many small ones in one burst.
    let big = "x".repeat(3000);
    alice.send(json!({"type":"say","room":"tls","text":big,"ref":"big"}));
    for i in 0..50 {
        alice.send(json!({"type":"say","room":"tls","text":format!("m{i}"),"ref":format!("r{i}")}));
    }
    let mut seen = Vec::new();
    while seen.len() < 51 {
        let v = bob.recv();
        if v["type"] == "message" {
            seen.push(v["text"].as_str().expect("text").to_string());
        }
    }
    assert_eq!(seen[0], big);
    assert_eq!(seen[50], "m49");
    // Resume over wss as well.
    drop(alice);
    let mut again = Client::connect_tls(&server.addr, tls);
    again.send(json!({"type":"resume","token":token}));
    assert_eq!(again.expect("welcome")["user"], "alice");
}

#[test]
fn https_serves_the_client_and_plain_http_gets_a_readable_refusal() {
    let dir = TempDir::new("tls-http");
    let cert = make_cert(&dir.0, "a");
    let server = tls_server(&dir.0, &cert, &[]);
    let (status, body) = https_get(&server.addr, trusting(&cert.der), "/").expect("https /");
    assert_eq!(status, 200);
    let index = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("www/index.html"))
        .expect("www/index.html");
    assert_eq!(body, index);
    let (status, body) =
        https_get(&server.addr, trusting(&cert.der), "/healthz").expect("https /healthz");
    assert_eq!((status, body.as_slice()), (200, &b"ok\n"[..]));

    // http:// to the https:// port.
    let mut s = TcpStream::connect(&server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("a clean close");
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("https://"), "{resp}");

    // A client that does not trust the certificate fails its handshake; the server goes on.
    let other = make_cert(&dir.0, "other");
    assert!(https_get(&server.addr, trusting(&other.der), "/healthz").is_err());
    assert!(https_get(&server.addr, trusting(&cert.der), "/healthz").is_ok());
}

#[test]
fn a_handshake_that_never_completes_is_dropped() {
    let dir = TempDir::new("tls-timeout");
    let cert = make_cert(&dir.0, "a");
    let server = tls_server(&dir.0, &cert, &["--handshake-timeout", "1"]);
    // Half a ClientHello record header, then silence.
    let mut s = TcpStream::connect(&server.addr).expect("connect");
    s.write_all(&[0x16, 0x03, 0x01]).expect("write");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(5),
        "dropped after {waited:?}"
    );
}

#[test]
fn sighup_reloads_the_certificate_without_dropping_connections() {
    let dir = TempDir::new("tls-reload");
    let first = make_cert(&dir.0, "first");
    // The server reads these two paths; the test swaps their content.
    let live = Cert {
        der: first.der.clone(),
        cert: dir.0.join("live-cert.pem"),
        key: dir.0.join("live-key.pem"),
    };
    std::fs::copy(&first.cert, &live.cert).expect("copy");
    std::fs::copy(&first.key, &live.key).expect("copy");
    let server = tls_server(&dir.0, &live, &[]);

    let (mut alice, _) = {
        let mut c = Client::connect_tls(&server.addr, trusting(&first.der));
        c.send(json!({"type":"register","user":"alice","password":"password123"}));
        let w = c.expect("welcome");
        (c, w)
    };
    alice.send(json!({"type":"join","room":"r"}));
    until(&mut alice, "joined");

    let second = make_cert(&dir.0, "second");
    std::fs::copy(&second.cert, &live.cert).expect("copy");
    std::fs::copy(&second.key, &live.key).expect("copy");
    signal(&server, "-HUP");
    assert!(
        eventually(Duration::from_secs(5), || https_get(
            &server.addr,
            trusting(&second.der),
            "/healthz"
        )
        .is_ok()),
        "new handshakes use the new certificate"
    );
    assert!(https_get(&server.addr, trusting(&first.der), "/healthz").is_err());
    // The connection made with the old certificate is still served.
    alice.send(json!({"type":"say","room":"r","text":"still here","ref":"s"}));
    assert_eq!(until(&mut alice, "ack")["ref"], "s");

    // A broken file on reload keeps the pair in use.
    std::fs::write(&live.cert, "garbage").expect("write");
    signal(&server, "-HUP");
    let metrics = || {
        https_get(&server.addr, trusting(&second.der), "/metrics")
            .map(|(_, b)| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    assert!(
        eventually(Duration::from_secs(5), || metrics()
            .contains("parlor_tls_reload_failures_total 1")),
        "{}",
        metrics()
    );
    assert!(metrics().contains("parlor_tls_reloads_total 1"));
    assert!(https_get(&server.addr, trusting(&second.der), "/healthz").is_ok());
    alice.send(json!({"type":"say","room":"r","text":"and now","ref":"t"}));
    assert_eq!(until(&mut alice, "ack")["ref"], "t");
}

/// `--metrics-listen`: /metrics for anyone who reaches that address, nothing else there; the
/// main port still keeps /metrics to loopback.
#[test]
fn metrics_listen_serves_only_monitoring_to_anyone() {
    let dir = TempDir::new("metrics-listen");
    let server = Server::spawn(&dir.0.join("data"), &["--metrics-listen", "127.0.0.1:0"]);
    let metrics_addr = server
        .metrics_addr
        .clone()
        .expect("metrics address printed");
    // A request with forwarding headers is not local, whatever the TCP peer: the main port
    // refuses it /metrics, the metrics address serves it.
    let get = |addr: &str, path: &str, extra: &str| {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n"
        )
        .expect("write");
        let mut r = String::new();
        let _ = s.read_to_string(&mut r);
        r
    };
    let proxied = "X-Forwarded-For: 203.0.113.9\r\n";
    assert!(get(&server.addr, "/metrics", proxied).starts_with("HTTP/1.1 403"));
    let r = get(&metrics_addr, "/metrics", proxied);
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("parlor_connections"), "{r}");
    assert!(get(&metrics_addr, "/healthz", "").starts_with("HTTP/1.1 200"));
    let r = get(&metrics_addr, "/", "");
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    // No WebSocket on the metrics address.
    let r = get(
        &metrics_addr,
        "/ws",
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
}
