//! Shared helpers for the integration tests: start the real `parlor` binary on port 0 and talk
//! to it over real sockets, either as raw HTTP or as a hand-driven WebSocket client that sends
//! masked frames (built with the crate's own encoder) and decodes the server's frames with the
//! crate's own reader in client role.
//!
//! Not every test binary uses every helper.
#![allow(dead_code)]

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use parlor::ws::frame::{encode, OpCode, Role};
use parlor::ws::reader::{MessageReader, OwnedEvent, ReadLimits};

/// Default read/write timeout on test sockets, so a broken server fails a test instead of
/// hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The content of `index.html` in every test server's static directory.
pub const INDEX_HTML: &str = "<!doctype html><title>parlor test</title><p>hello from www</p>\n";

/// The `Sec-WebSocket-Key` from RFC 6455 §1.3 and its accept value.
pub const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const RFC_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

// ----- temporary directories -----

/// A directory under the system temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "parlor-it-{tag}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&self, rel: &str, content: &[u8]) {
        let p = self.path.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).expect("create parent dir");
        }
        fs::write(p, content).expect("write temp file");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

// ----- the server process -----

/// A running `parlor` process, killed on drop.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    exited: Option<ExitStatus>,
    _www: TempDir,
    _data: TempDir,
}

impl Server {
    /// Starts the server with the test defaults and no extra flags.
    pub fn start() -> Server {
        Server::with_args(&[])
    }

    /// Starts `parlor --listen 127.0.0.1:0 --data <tmp> --www <tmp with index.html> ARGS...` and
    /// waits for its `parlor listening on ADDR` line.
    pub fn with_args(args: &[&str]) -> Server {
        Server::spawn(None, args)
    }

    /// Starts the server with the `/echo` endpoint (`--echo`, off by default) and no other flags.
    pub fn echo() -> Server {
        Server::with_args(&["--echo"])
    }

    /// [`Server::with_args`] plus `--echo`: most protocol tests talk to `/echo`.
    pub fn echo_with(args: &[&str]) -> Server {
        let mut all = vec!["--echo"];
        all.extend_from_slice(args);
        Server::with_args(&all)
    }

    /// Like [`Server::with_args`] with `ulimit -n LIMIT` (via `sh`), to run out of descriptors.
    pub fn with_fd_limit(limit: u32, args: &[&str]) -> Server {
        Server::spawn(Some(limit), args)
    }

    fn spawn(fd_limit: Option<u32>, args: &[&str]) -> Server {
        let www = TempDir::new("www");
        www.write("index.html", INDEX_HTML.as_bytes());
        www.write("app.js", b"console.log('parlor');\n");
        let data = TempDir::new("data");
        let bin = env!("CARGO_BIN_EXE_parlor");
        let mut cmd = match fd_limit {
            None => Command::new(bin),
            Some(n) => {
                // `exec` keeps the pid, so signals and /proc refer to the server itself.
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(bin);
                c
            }
        };
        let mut child = cmd
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data")
            .arg(data.path())
            .arg("--www")
            .arg(www.path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn parlor");

        // Keep the log for failure reports; the pipe must be drained or the server would block.
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let mut err_pipe = child.stderr.take().expect("stderr piped");
        thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
                // Bound memory for chatty tests: keep the tail.
                if s.len() > 1 << 20 {
                    let cut = s.len() - (1 << 19);
                    let cut = (cut..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(0);
                    s.drain(..cut);
                }
            }
        });

        let out = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(out);
            let mut line = String::new();
            loop {
                line.clear();
                match lines.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if let Some(rest) = line.trim().strip_prefix("parlor listening on ") {
                            let _ = tx.send(rest.to_owned());
                        }
                    }
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a.parse().expect("listening line names a socket address"),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                thread::sleep(Duration::from_millis(100));
                panic!(
                    "parlor did not print its listening line; stderr:\n{}",
                    stderr.lock().unwrap_or_else(|e| e.into_inner())
                );
            }
        };
        Server {
            child,
            addr,
            stderr,
            exited: None,
            _www: www,
            _data: data,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sends a signal by name (`TERM`, `INT`) with the `kill` utility.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Freezes the process (SIGSTOP), so bytes sent meanwhile all wait in its socket buffers
    /// and are seen together on [`Server::resume`]: makes "data and FIN in one read" races
    /// deterministic.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// Writes `bytes` and then a FIN on `stream` while the server is frozen, so that it finds
    /// both in the same read (as it does whenever it is busy) instead of by scheduling luck.
    pub fn send_with_fin(&self, stream: &mut TcpStream, bytes: &[u8]) {
        self.pause();
        stream.write_all(bytes).expect("send before FIN");
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        thread::sleep(Duration::from_millis(50));
        self.resume();
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(s);
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.exited.is_none() && self.child.try_wait().expect("try_wait").is_none()
    }

    /// Opens a WebSocket on `/echo`.
    pub fn ws(&self) -> WsClient {
        WsClient::connect(self.addr, "/echo")
    }

    /// A WebSocket client on another endpoint (e.g. the chat's `/ws`).
    pub fn ws_at(&self, path: &str) -> WsClient {
        WsClient::connect(self.addr, path)
    }

    /// A raw TCP connection with the test timeouts.
    pub fn tcp(&self) -> TcpStream {
        tcp(self.addr)
    }

    /// One plain HTTP request (`Connection: close`), read to EOF.
    pub fn http(&self, method: &str, path: &str) -> HttpResponse {
        let mut s = self.tcp();
        let req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).expect("send request");
        read_http_to_eof(&mut s)
    }

    /// Fetches `/metrics` and returns the value of an unlabelled sample.
    pub fn metric(&self, name: &str) -> u64 {
        let body = self.http("GET", "/metrics").text();
        metric_value(&body, name).unwrap_or_else(|| panic!("no metric {name} in:\n{body}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            let log = self.log();
            let tail: String = {
                let start = log.len().saturating_sub(4000);
                let start = (start..log.len())
                    .find(|&i| log.is_char_boundary(i))
                    .unwrap_or(0);
                log[start..].to_owned()
            };
            eprintln!("---- parlor stderr (tail) ----\n{tail}\n------------------------------");
        }
    }
}

/// The value of `name` in Prometheus text (the line `name VALUE`).
/// Resident memory of a process, from `/proc` (Linux).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

pub fn metric_value(body: &str, name: &str) -> Option<u64> {
    body.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
        rest.trim().parse().ok()
    })
}

pub fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A blocking TCP connection to `addr`, optionally from the local address `src` (all of
/// 127.0.0.0/8 is loopback on Linux, so tests can be clients at several addresses) and with a
/// small receive buffer set before connecting (`rcvbuf`, so a client that does not read stops
/// absorbing the server's output early). With the test timeouts.
pub fn tcp_with(addr: SocketAddr, src: Option<Ipv4Addr>, rcvbuf: Option<usize>) -> TcpStream {
    use std::os::fd::{AsRawFd, FromRawFd};
    let SocketAddr::V4(dst) = addr else {
        panic!("tcp_with needs an IPv4 server address, got {addr}")
    };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a plain socket() call; the descriptor is owned by the TcpStream right away, so it
    // is closed on every path below.
    let stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        TcpStream::from_raw_fd(fd)
    };
    let fd = stream.as_raw_fd();
    if let Some(bytes) = rcvbuf {
        let v = libc::c_int::try_from(bytes).expect("rcvbuf fits a c_int");
        // SAFETY: setsockopt on a live socket we own, with a pointer to a c_int that outlives
        // the call and its exact size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_RCVBUF: {}", io::Error::last_os_error());
    }
    if let Some(ip) = src {
        let local = sockaddr(ip, 0);
        // SAFETY: bind on a live socket we own with a valid sockaddr_in and its length.
        let rc = unsafe { libc::bind(fd, &local as *const _ as *const libc::sockaddr, len) };
        assert_eq!(rc, 0, "bind {ip}: {}", io::Error::last_os_error());
    }
    let remote = sockaddr(*dst.ip(), dst.port());
    // SAFETY: connect on a live blocking socket we own with a valid sockaddr_in and its length.
    let rc = unsafe { libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len) };
    assert_eq!(rc, 0, "connect to {addr}: {}", io::Error::last_os_error());
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Sends an upgrade request for `path` with `extra` header lines on `s` and reads the response
/// head: the status, and for a 101 a client on the socket.
pub fn upgrade_on(mut s: TcpStream, path: &str, extra: &[&str]) -> (u16, Option<WsClient>) {
    s.write_all(upgrade_request(path, RFC_KEY, extra).as_bytes())
        .expect("send upgrade");
    let (resp, rest) = read_head(&mut s);
    if resp.status == 101 {
        assert_upgraded(&resp);
        (101, Some(WsClient::from_upgraded(s, rest)))
    } else {
        (resp.status, None)
    }
}

// ----- HTTP -----

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lowercased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Splits `buf` after the first `\r\n\r\n` and parses the head.
pub fn parse_http_head(buf: &[u8]) -> Option<(HttpResponse, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).expect("response head is UTF-8");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(
        parts.next(),
        Some("HTTP/1.1"),
        "bad status line {status_line:?}"
    );
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').expect("header has a colon");
            (n.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    Some((
        HttpResponse {
            status,
            headers,
            body: Vec::new(),
        },
        end,
    ))
}

/// Reads a whole response from a connection the server closes after answering.
pub fn read_http_to_eof(s: &mut TcpStream) -> HttpResponse {
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read response to EOF");
    let (mut resp, end) = parse_http_head(&buf)
        .unwrap_or_else(|| panic!("no complete head in {:?}", String::from_utf8_lossy(&buf)));
    resp.body = buf[end..].to_vec();
    resp
}

/// An upgrade request for `path` with the standard headers, `extra` lines appended
/// (each without CRLF).
pub fn upgrade_request(path: &str, key: &str, extra: &[&str]) -> String {
    let mut r = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for line in extra {
        r.push_str(line);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r
}

/// Sends a (possibly broken) upgrade request and reads the response to EOF; for refusals.
pub fn refused_upgrade(addr: SocketAddr, request: &str) -> HttpResponse {
    let mut s = tcp(addr);
    s.write_all(request.as_bytes()).expect("send request");
    read_http_to_eof(&mut s)
}

// ----- frames -----

/// A masking key generator so frames use varied keys.
fn next_mask() -> [u8; 4] {
    static STATE: AtomicUsize = AtomicUsize::new(0x9e37_79b9);
    let mut x = STATE.fetch_add(0x6d2b_79f5, Ordering::Relaxed) as u32;
    x ^= x >> 15;
    x = x.wrapping_mul(0x2c1b_3c6d);
    x ^= x >> 12;
    x.to_be_bytes()
}

/// One masked client frame.
pub fn masked(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 14);
    encode(&mut v, fin, opcode, payload, Some(next_mask()));
    v
}

/// One unmasked frame (what a server sends; illegal from a client).
pub fn unmasked(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 14);
    encode(&mut v, fin, opcode, payload, None);
    v
}

/// A masked close frame with `code` and raw `reason` bytes.
pub fn close_frame(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    masked(true, OpCode::Close, &p)
}

/// What the server sent, as seen by a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Event(OwnedEvent),
    /// Orderly end of the TCP stream.
    Eof,
}

// ----- the raw WebSocket client -----

/// A WebSocket client driven by hand: the handshake is written as raw bytes, frames are
/// encoded with the crate's encoder (masked) and the server's bytes are decoded by the crate's
/// [`MessageReader`] in client role, which also checks that server frames are unmasked, use
/// no RSV bits, have valid close payloads and valid UTF-8 text.
pub struct WsClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
    reader: MessageReader,
}

impl WsClient {
    /// Connects and upgrades on `path`, asserting a correct 101.
    pub fn connect(addr: SocketAddr, path: &str) -> WsClient {
        let mut stream = tcp(addr);
        stream
            .write_all(upgrade_request(path, RFC_KEY, &[]).as_bytes())
            .expect("send upgrade");
        let (resp, rest) = read_head(&mut stream);
        assert_upgraded(&resp);
        WsClient::from_upgraded(stream, rest)
    }

    /// Wraps a socket whose 101 head was read already; `rest` are the bytes after the head.
    pub fn from_upgraded(stream: TcpStream, rest: Vec<u8>) -> WsClient {
        WsClient {
            stream,
            buf: rest,
            reader: MessageReader::new(
                Role::Client,
                ReadLimits {
                    max_message: 64 << 20,
                    max_fragments: usize::MAX,
                },
            ),
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send to server");
    }

    pub fn try_send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub fn send_text(&mut self, text: &str) {
        let f = masked(true, OpCode::Text, text.as_bytes());
        self.send_raw(&f);
    }

    pub fn send_binary(&mut self, data: &[u8]) {
        let f = masked(true, OpCode::Binary, data);
        self.send_raw(&f);
    }

    pub fn send_ping(&mut self, payload: &[u8]) {
        let f = masked(true, OpCode::Ping, payload);
        self.send_raw(&f);
    }

    pub fn send_close(&mut self, code: u16, reason: &str) {
        let f = close_frame(code, reason.as_bytes());
        self.send_raw(&f);
    }

    pub fn set_read_timeout(&self, t: Duration) {
        self.stream.set_read_timeout(Some(t)).unwrap();
    }

    /// The next frame-level event or EOF; I/O errors (including timeouts and resets) are
    /// returned; a protocol error in the server's bytes panics.
    pub fn try_recv(&mut self) -> io::Result<Incoming> {
        loop {
            match self.reader.next(&mut self.buf) {
                Ok((0, None)) => {}
                Ok((n, ev)) => {
                    let ev = ev.map(OwnedEvent::from);
                    self.buf.drain(..n);
                    match ev {
                        Some(ev) => return Ok(Incoming::Event(ev)),
                        None => continue,
                    }
                }
                Err(e) => panic!(
                    "server sent an invalid frame: {} ({}); buffered {:02x?}",
                    e.reason,
                    e.code,
                    &self.buf[..self.buf.len().min(32)]
                ),
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                assert!(
                    self.buf.is_empty(),
                    "EOF in the middle of a frame: {:02x?}",
                    &self.buf[..self.buf.len().min(32)]
                );
                return Ok(Incoming::Eof);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Like [`WsClient::try_recv`] but panics on I/O errors.
    pub fn recv(&mut self) -> Incoming {
        self.try_recv().expect("read from server")
    }

    /// The next event, panicking on EOF.
    pub fn recv_event(&mut self) -> OwnedEvent {
        match self.recv() {
            Incoming::Event(e) => e,
            Incoming::Eof => panic!("unexpected EOF"),
        }
    }

    /// The next data message, answering any keepalive pings on the way.
    pub fn recv_message(&mut self) -> OwnedEvent {
        loop {
            match self.recv_event() {
                OwnedEvent::Ping(p) => {
                    let f = masked(true, OpCode::Pong, &p);
                    self.send_raw(&f);
                }
                OwnedEvent::Pong(_) => {}
                other => return other,
            }
        }
    }

    pub fn expect_text(&mut self, want: &str) {
        match self.recv_message() {
            OwnedEvent::Text(t) => {
                assert_eq!(t.len(), want.len(), "echoed text length");
                assert!(t == want, "echoed text differs");
            }
            other => panic!("expected text of {} bytes, got {other:?}", want.len()),
        }
    }

    pub fn expect_binary(&mut self, want: &[u8]) {
        match self.recv_message() {
            OwnedEvent::Binary(b) => {
                assert_eq!(b.len(), want.len(), "echoed binary length");
                assert!(b == want, "echoed binary differs");
            }
            other => panic!("expected binary of {} bytes, got {other:?}", want.len()),
        }
    }

    /// Round trip: send `text`, expect it back.
    pub fn echo(&mut self, text: &str) {
        self.send_text(text);
        self.expect_text(text);
    }

    /// Expects a close frame with `code` (any reason) as the next non-ping event.
    pub fn expect_close(&mut self, code: u16) -> String {
        loop {
            match self.recv() {
                Incoming::Event(OwnedEvent::Ping(_) | OwnedEvent::Pong(_)) => continue,
                Incoming::Event(OwnedEvent::Close(Some(c), reason)) => {
                    assert_eq!(c, code, "close code (reason {reason:?})");
                    return reason;
                }
                other => panic!("expected close {code}, got {other:?}"),
            }
        }
    }

    /// Expects a close frame with `code` (any reason) as the next non-ping event, then EOF.
    pub fn expect_close_then_eof(&mut self, code: u16) -> String {
        let reason = self.expect_close(code);
        assert_eq!(
            self.recv(),
            Incoming::Eof,
            "TCP must close after the close frame"
        );
        reason
    }
}

/// Reads a response head; returns it and whatever followed it in the same reads.
pub fn read_head(s: &mut TcpStream) -> (HttpResponse, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((resp, end)) = parse_http_head(&buf) {
            return (resp, buf[end..].to_vec());
        }
        let n = s.read(&mut chunk).expect("read response head");
        assert!(
            n > 0,
            "EOF before a complete response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Asserts a proper 101 for [`RFC_KEY`].
pub fn assert_upgraded(resp: &HttpResponse) {
    assert_eq!(resp.status, 101, "expected 101, got {resp:?}");
    assert_eq!(
        resp.header("sec-websocket-accept"),
        Some(RFC_ACCEPT),
        "accept key"
    );
    assert!(
        resp.header("upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
        "Upgrade header: {resp:?}"
    );
    assert!(
        resp.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("upgrade")),
        "Connection header: {resp:?}"
    );
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(seed as u32 % 31) as u8
                ^ seed
        })
        .collect()
}

/// Deterministic ASCII text.
pub fn text_of(len: usize, seed: u8) -> String {
    (0..len)
        .map(|i| char::from(b'a' + ((i + seed as usize) % 26) as u8))
        .collect()
}

/// Polls `f` until it returns true or `limit` passes.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}
