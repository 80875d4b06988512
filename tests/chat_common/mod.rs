//! Chat over real sockets, shared by the chat test files: the `parlor` binary in a child
//! process (so a test can SIGKILL it) and `tungstenite` clients.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// Cheap hashing (these tests are about the protocol, not argon2's cost), and no limit on
/// registrations from 127.0.0.1 (the load test registers 200 accounts).
pub const FAST_HASH: [&str; 6] = [
    "--argon2-memory",
    "64",
    "--argon2-iterations",
    "1",
    "--register-throttle",
    "0",
];

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "parlor-it-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Server {
    pub child: Child,
    pub addr: String,
    /// The `--metrics-listen` address, when the test asked for one.
    pub metrics_addr: Option<String>,
}

impl Server {
    pub fn spawn(data: &Path, extra: &[&str]) -> Server {
        let mut args = vec![
            "--listen".to_string(),
            "127.0.0.1:0".into(),
            "--data".into(),
            data.display().to_string(),
            // The built-in client. (Serving --www from the data directory would read the live
            // database's -shm file into memory at start; closing that descriptor drops the
            // process's POSIX locks on it, and a second process opening the database, such as
            // `parlor backup`, would then reinitialise the -shm under the server: SIGBUS.)
            "--log-level".into(),
            "error".into(),
        ];
        // A test may ask for other hashing costs or throttles: its flags win.
        for pair in FAST_HASH.chunks(2) {
            if !extra.contains(&pair[0]) {
                args.extend(pair.iter().map(|s| s.to_string()));
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_parlor"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn server");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut addr = None;
        let mut line = String::new();
        while out.read_line(&mut line).unwrap_or(0) > 0 {
            if let Some(a) = line.trim().strip_prefix("parlor listening on ") {
                addr = Some(a.to_string());
                break;
            }
            line.clear();
        }
        let mut metrics_addr = None;
        if extra.contains(&"--metrics-listen") {
            // After the "open http://…" line comes "metrics and health on http://ADDR/metrics".
            while out.read_line(&mut line).unwrap_or(0) > 0 {
                if let Some(rest) = line.trim().strip_prefix("metrics and health on http://") {
                    metrics_addr = rest.split('/').next().map(str::to_string);
                    break;
                }
                line.clear();
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while out.read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        Server {
            child,
            addr: addr.expect("server did not print its address"),
            metrics_addr,
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.addr)
    }

    /// SIGTERM and wait: a clean stop that flushes the store.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "server exit: {status}");
                return;
            }
            assert!(Instant::now() < deadline, "server did not stop");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The whole `/metrics` response of the server (or metrics listener) at `addr`; empty if it
/// cannot be reached.
pub fn metrics_text(addr: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

/// The `parlor_chat_*` summary lines of `/metrics` (store batches, ack latency).
pub fn chat_figures(addr: &str) -> String {
    metrics_text(addr)
        .lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.starts_with("parlor_chat_store_batch") || l.starts_with("parlor_chat_ack"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub struct Client {
    pub ws: WebSocket<MaybeTlsStream<TcpStream>>,
}

impl Client {
    pub fn connect(addr: &str) -> Client {
        let (ws, _) = tungstenite::connect(format!("ws://{addr}/ws")).expect("connect");
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let _ = s.set_nodelay(true);
        }
        Client { ws }
    }

    /// Connects from another loopback address (`127.0.0.2`, …), so the server sees a second
    /// client address: bind before connect, which std cannot do.
    pub fn connect_from(addr: &str, source: [u8; 4]) -> Client {
        Client::connect_from_with(addr, source, &[])
    }

    /// [`Client::connect_from`] with extra request headers (e.g. `X-Forwarded-For`).
    pub fn connect_from_with(addr: &str, source: [u8; 4], headers: &[(&str, &str)]) -> Client {
        use tungstenite::client::IntoClientRequest;
        let target: std::net::SocketAddr = addr.parse().expect("socket address");
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let from = std::net::SocketAddr::from((source, 0));
        sock.bind(&from.into()).expect("bind source address");
        sock.connect(&target.into()).expect("connect");
        let stream: TcpStream = sock.into();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = stream.set_nodelay(true);
        let mut req = format!("ws://{addr}/ws")
            .into_client_request()
            .expect("request");
        for (k, v) in headers {
            req.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                tungstenite::http::HeaderValue::from_str(v).expect("header value"),
            );
        }
        let (ws, _) =
            tungstenite::client::client(req, MaybeTlsStream::Plain(stream)).expect("handshake");
        Client { ws }
    }

    /// A `wss://` client trusting what `tls` trusts (`addr` is `127.0.0.1:port`; the name
    /// checked against the certificate is `localhost`).
    pub fn connect_tls(addr: &str, tls: std::sync::Arc<rustls::ClientConfig>) -> Client {
        use tungstenite::client::IntoClientRequest;
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = stream.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let conn = rustls::ClientConnection::new(tls, name).expect("TLS client");
        let stream = MaybeTlsStream::Rustls(rustls::StreamOwned::new(conn, stream));
        let req = format!(
            "wss://localhost:{}/ws",
            addr.rsplit(':').next().unwrap_or("")
        )
        .into_client_request()
        .expect("request");
        let (ws, _) = tungstenite::client::client(req, stream).expect("wss handshake");
        Client { ws }
    }

    fn tcp(&self) -> Option<&TcpStream> {
        match self.ws.get_ref() {
            MaybeTlsStream::Plain(s) => Some(s),
            MaybeTlsStream::Rustls(s) => Some(s.get_ref()),
            _ => None,
        }
    }

    /// The next frame, or `None` if nothing arrives within `t` (the socket stays usable) or the
    /// server closed the connection.
    pub fn recv_within(&mut self, t: Duration) -> Option<Value> {
        if let Some(s) = self.tcp() {
            let _ = s.set_read_timeout(Some(t));
        }
        let got = loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => break serde_json::from_str(&t).ok(),
                Ok(Message::Close(_)) => break None,
                Ok(_) => {}
                Err(_) => break None,
            }
        };
        if let Some(s) = self.tcp() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        }
        got
    }

    pub fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).expect("send");
    }

    pub fn send_raw(&mut self, m: Message) {
        self.ws.send(m).expect("send");
    }

    /// The next text frame as JSON (control frames are handled by tungstenite).
    pub fn recv(&mut self) -> Value {
        loop {
            match self.ws.read().expect("read") {
                Message::Text(t) => return serde_json::from_str(&t).expect("json"),
                Message::Close(c) => panic!("closed: {c:?}"),
                _ => {}
            }
        }
    }

    pub fn expect(&mut self, ty: &str) -> Value {
        let v = self.recv();
        assert_eq!(v["type"], ty, "{v}");
        v
    }

    pub fn expect_error(&mut self, code: &str) -> Value {
        let v = self.expect("error");
        assert_eq!(v["code"], code, "{v}");
        v
    }

    /// A new account: it joins `general` (presence join), then comes online.
    pub fn expect_arrival(&mut self, user: &str) {
        let j = self.expect("presence");
        assert_eq!(
            (j["event"].as_str(), j["room"].as_str(), j["user"].as_str()),
            (Some("join"), Some("general"), Some(user)),
            "{j}"
        );
        let o = self.expect("presence");
        assert_eq!(
            (o["event"].as_str(), o["user"].as_str()),
            (Some("online"), Some(user)),
            "{o}"
        );
    }

    /// Nothing arrives for a short while (a `ping` round trip proves the server is past it).
    pub fn expect_silence(&mut self) {
        self.send(json!({"type":"rooms","ref":"silence"}));
        let v = self.recv();
        assert_eq!(v["ref"], "silence", "unexpected frame {v}");
    }

    /// The close code the server sends.
    pub fn expect_close(&mut self) -> u16 {
        loop {
            match self.ws.read() {
                Ok(Message::Close(Some(f))) => return u16::from(f.code),
                Ok(Message::Close(None)) => return 1005,
                Ok(_) => {}
                Err(e) => panic!("no close frame: {e}"),
            }
        }
    }

    /// The id of every message of `room`, paging forward through `history` until `more` is
    /// false (the server must allow that many queries: `--query-rate 0`).
    pub fn all_message_ids(&mut self, room: &str) -> std::collections::HashSet<i64> {
        let mut stored = std::collections::HashSet::new();
        let mut after = 0i64;
        loop {
            self.send(json!({"type":"history","room":room,"after":after,"limit":200}));
            let h = self.expect("history");
            for m in h["messages"].as_array().into_iter().flatten() {
                let id = m["id"].as_i64().unwrap_or(-1);
                stored.insert(id);
                after = after.max(id);
            }
            if h["more"] != true {
                return stored;
            }
        }
    }

    pub fn register(addr: &str, user: &str) -> (Client, String) {
        let mut c = Client::connect(addr);
        c.send(json!({"type":"register","user":user,"password":"password123"}));
        let w = c.expect("welcome");
        (c, w["token"].as_str().unwrap_or_default().to_string())
    }

    pub fn resume(addr: &str, token: &str) -> Client {
        let mut c = Client::connect(addr);
        c.send(json!({"type":"resume","token":token}));
        c.expect("welcome");
        c
    }
}

/// Polls `f` every 50 ms until it holds or `limit` passes; returns whether it held.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
