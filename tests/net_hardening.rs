//! Abuse limits of the network layer, over real sockets against the real binary: the memory
//! budget (`--memory-budget`), per-address connection limits (`--max-connections-per-ip`) with
//! the loopback reserve for monitoring, the write stall deadline (`--write-timeout`) and client
//! addresses behind a reverse proxy (`--trusted-proxy`).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use parlor::ws::frame::OpCode;
use parlor::ws::reader::OwnedEvent;

const MIB: usize = 1 << 20;

/// Cheap password hashing for the chat user these tests register.
const FAST_HASH: [&str; 4] = ["--argon2-memory", "64", "--argon2-iterations", "1"];

fn localhost(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

/// A chat user on `/ws`: registered, ready to `say`.
struct ChatUser {
    ws: WsClient,
    next_ref: u32,
}

impl ChatUser {
    fn register(server: &Server, user: &str) -> ChatUser {
        let mut ws = server.ws_at("/ws");
        ws.send_text(&format!(
            r#"{{"type":"register","user":"{user}","password":"password123","ref":"reg"}}"#
        ));
        let mut u = ChatUser { ws, next_ref: 0 };
        u.wait_for("welcome", "reg");
        u
    }

    /// Reads text frames until one of `kind` with `ref` arrives (others, e.g. presence, are
    /// skipped); panics on anything else, or after the client's read timeout.
    fn wait_for(&mut self, kind: &str, r: &str) -> serde_json::Value {
        loop {
            match self.ws.recv_message() {
                OwnedEvent::Text(t) => {
                    let v: serde_json::Value = serde_json::from_str(&t).expect("chat sends JSON");
                    if v["type"] == kind && v["ref"] == r {
                        return v;
                    }
                    assert_ne!(v["type"], "error", "chat error: {t}");
                }
                other => panic!("expected a chat frame, got {other:?}"),
            }
        }
    }

    /// Says something in `general` and waits for the ack; returns how long that took.
    fn say(&mut self, text: &str) -> Duration {
        self.next_ref += 1;
        let r = format!("r{}", self.next_ref);
        let t = Instant::now();
        self.ws.send_text(&format!(
            r#"{{"type":"say","room":"general","text":"{text}","ref":"{r}"}}"#
        ));
        self.wait_for("ack", &r);
        t.elapsed()
    }
}

/// What a flooding connection saw in the end.
#[derive(Debug, PartialEq, Eq)]
enum FloodEnd {
    /// A close frame with this code.
    Closed(u16),
    /// EOF or reset without a close frame.
    Dropped,
    /// Still open and silent (the server kept its message within the budget).
    Silent,
}

/// Opens `/echo` and sends the first `total` bytes of one binary message in 1 MiB fragments,
/// none with FIN, never reading echoes (there are none: the message never ends); reports how
/// the connection ended. A second thread does the writing so that a close frame is seen as soon
/// as it comes, even while the writes still block.
fn flood_one(server_addr: std::net::SocketAddr, total: usize) -> FloodEnd {
    let mut ws = WsClient::connect(server_addr, "/echo");
    let mut w = ws.stream.try_clone().expect("clone socket");
    let writer = thread::spawn(move || {
        let frag = vec![0u8; MIB];
        let mut sent = 0;
        while sent < total {
            // Masked with the all-zero key: the payload goes out as is.
            let opcode: u8 = if sent == 0 { 0x2 } else { 0x0 };
            let mut head = vec![opcode, 0x80 | 127];
            head.extend_from_slice(&(MIB as u64).to_be_bytes());
            head.extend_from_slice(&[0, 0, 0, 0]);
            if w.write_all(&head).is_err() || w.write_all(&frag).is_err() {
                return;
            }
            sent += MIB;
        }
    });
    ws.set_read_timeout(Duration::from_millis(500));
    let mut quiet = 0;
    let end = loop {
        match ws.try_recv() {
            Ok(Incoming::Event(OwnedEvent::Close(Some(code), _))) => break FloodEnd::Closed(code),
            Ok(Incoming::Event(_)) => continue,
            Ok(Incoming::Eof) => break FloodEnd::Dropped,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if writer.is_finished() {
                    quiet += 1;
                    if quiet >= 4 {
                        break FloodEnd::Silent;
                    }
                }
            }
            Err(_) => break FloodEnd::Dropped,
        }
    };
    let _ = ws.stream.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    end
}

#[test]
fn echo_flood_is_bounded_by_memory_budget_while_chat_works() {
    const FLOODERS: usize = 40;
    const MESSAGE: usize = 16 * MIB;
    const BUDGET: u64 = 64 * MIB as u64;
    let mut args = vec!["--echo", "--memory-budget", "64MiB", "--rate-limit", "0"];
    args.extend(FAST_HASH);
    let server = Server::with_args(&args);
    let mut alice = ChatUser::register(&server, "alice");
    alice.say("before the flood");
    let baseline = rss_bytes(server.pid()).expect("VmRSS");

    // Sample the server's RSS while the flood runs.
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = {
        let (done, peak, pid) = (done.clone(), peak.clone(), server.pid());
        thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some(r) = rss_bytes(pid) {
                    peak.fetch_max(r, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let addr = server.addr;
    let flooders: Vec<_> = (0..FLOODERS)
        .map(|_| thread::spawn(move || flood_one(addr, MESSAGE)))
        .collect();

    // Alice keeps chatting during the flood; every say gets its ack.
    let mut acks = 0;
    let mut worst = Duration::ZERO;
    while !flooders.iter().all(|f| f.is_finished()) {
        worst = worst.max(alice.say(&format!("during the flood {acks}")));
        acks += 1;
        thread::sleep(Duration::from_millis(20));
    }
    let ends: Vec<FloodEnd> = flooders.into_iter().map(|f| f.join().unwrap()).collect();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    alice.say("after the flood");

    let closed_1013 = ends
        .iter()
        .filter(|e| **e == FloodEnd::Closed(1013))
        .count();
    let held = ends.iter().filter(|e| **e == FloodEnd::Silent).count();
    eprintln!(
        "flood: {FLOODERS} x {} MiB; baseline RSS {} MiB, peak {} MiB; {closed_1013} closed \
         with 1013, {held} held within the budget; {acks} chat acks, slowest {worst:?}",
        MESSAGE / MIB,
        baseline / MIB as u64,
        peak / MIB as u64
    );
    // Without the budget the server holds FLOODERS x 16 MiB = 640 MiB. With it: the budget,
    // plus at most one buffer growth step over it, plus allocator slack.
    assert!(
        peak <= baseline + BUDGET + 64 * MIB as u64,
        "peak RSS {} MiB over baseline {} MiB + 64 MiB budget + 64 MiB slack",
        peak / MIB as u64,
        baseline / MIB as u64
    );
    // At most budget / message size connections can keep a whole message; every other one
    // was told to try again later.
    assert!(
        held <= (BUDGET as usize) / MESSAGE,
        "{held} flooders kept their message: {ends:?}"
    );
    assert!(
        closed_1013 >= FLOODERS - (BUDGET as usize) / MESSAGE - 1,
        "only {closed_1013} flooders got 1013: {ends:?}"
    );
    assert!(acks >= 1, "no chat message went through during the flood");
    assert!(server.metric("parlor_memory_budget_closes_total") >= closed_1013 as u64);
}

/// Sends an upgrade for `/echo` from `src` (127.0.0.N) with `extra` headers; the status and,
/// for a 101, the client.
fn upgrade_from(server: &Server, src: Ipv4Addr, extra: &[&str]) -> (u16, Option<WsClient>) {
    upgrade_on(tcp_with(server.addr, Some(src), None), "/echo", extra)
}

/// A plain GET from `src`, read to EOF.
fn get_from(server: &Server, src: Ipv4Addr, path: &str) -> HttpResponse {
    let mut s = tcp_with(server.addr, Some(src), None);
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    read_http_to_eof(&mut s)
}

#[test]
fn one_address_cannot_take_every_slot() {
    // The default limit: 256 per address.
    let server = Server::echo();
    let mut mine: Vec<WsClient> = (0..256)
        .map(|i| match upgrade_from(&server, localhost(1), &[]) {
            (101, Some(ws)) => ws,
            (st, _) => panic!("connection {i} from 127.0.0.1 refused with {st}"),
        })
        .collect();
    // The 257th from the same address is refused with a clear answer...
    let mut s = tcp_with(server.addr, Some(localhost(1)), None);
    s.write_all(upgrade_request("/echo", RFC_KEY, &[]).as_bytes())
        .unwrap();
    let resp = read_http_to_eof(&mut s);
    assert_eq!(resp.status, 429, "{resp:?}");
    assert!(resp.text().contains("too many connections"), "{resp:?}");
    // ...while another address still gets in, and the first address's sockets work.
    match upgrade_from(&server, localhost(2), &[]) {
        (101, Some(mut ws)) => ws.echo("another address"),
        (st, _) => panic!("127.0.0.2 refused with {st}"),
    }
    mine[0].echo("still here");
    mine[255].echo("still here");
    // Local monitoring still answers from the exhausted address.
    let health = get_from(&server, localhost(1), "/healthz");
    assert_eq!(health.status, 200, "{health:?}");
    assert!(server.metric("parlor_rejected_per_ip_total") >= 1);
    // One slot freed: the address may connect again.
    let mut one = mine.pop().unwrap();
    one.send_close(1000, "");
    one.expect_close_then_eof(1000);
    drop(one);
    let mut last = 0;
    assert!(
        eventually(Duration::from_secs(3), || {
            let (st, ws) = upgrade_from(&server, localhost(1), &[]);
            last = st;
            if let Some(mut ws) = ws {
                ws.echo("back");
            }
            st == 101
        }),
        "no slot for 127.0.0.1 after one closed (last {last})"
    );
}

/// `GET /healthz` on a new socket and whatever comes back, without panicking on a reset (a
/// socket refused at accept is answered and closed before its request is read).
fn healthz_raw(server: &Server) -> Vec<u8> {
    let mut s = server.tcp();
    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

#[test]
fn healthz_answers_from_loopback_when_full() {
    let server = Server::echo_with(&["--max-connections", "5", "--max-connections-per-ip", "0"]);
    let mut clients: Vec<WsClient> = (0..5).map(|_| server.ws()).collect();
    // Full: monitoring from loopback still answers...
    let health = server.http("GET", "/healthz");
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(health.text().trim(), "ok");
    let metrics = server.http("GET", "/metrics");
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metric_value(&metrics.text(), "parlor_websocket_connections"),
        Some(5)
    );
    assert_eq!(server.http("HEAD", "/healthz").status, 200);
    // ...but nothing else does: no WebSocket, no static file.
    let (status, _) = upgrade_on(server.tcp(), "/echo", &[]);
    assert_eq!(status, 503);
    assert_eq!(server.http("GET", "/").status, 503);
    // The reserve is small: 16 idle loopback sockets take it, the next is refused at once
    // (the answer is written at accept, before the request is read, so a reset may follow it).
    let idle: Vec<_> = (0..16).map(|_| server.tcp()).collect();
    let refused = || healthz_raw(&server).starts_with(b"HTTP/1.1 503");
    assert!(
        eventually(Duration::from_secs(3), refused),
        "a 17th loopback connection was admitted past the reserve"
    );
    drop(idle);
    // Until the server has seen those closes, a new socket may still be refused at accept
    // (and reset): ask without panicking on that.
    let answered = || healthz_raw(&server).starts_with(b"HTTP/1.1 200");
    assert!(
        eventually(Duration::from_secs(3), answered),
        "the reserve did not come back after its sockets closed"
    );
    for (i, c) in clients.iter_mut().enumerate() {
        c.echo(&format!("unaffected {i}"));
    }
}

#[test]
fn stalled_reader_of_small_frames_is_dropped_by_write_timeout() {
    // The kernel takes up to tcp_wmem's maximum into the server's send buffer before anything
    // stays in the server's queue: send that much in echoes plus 2 MB.
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20);
    let msg = masked(true, OpCode::Text, text_of(100, 1).as_bytes());
    let bursts = (wmem_max + (2 << 20)) / (msg.len() * 1000) + 1;
    // The queue (at most every echo, 150 bytes of cost each) stays far below --max-queue.
    let max_queue = (bursts * 1000 * 150 * 4).to_string();
    let server = Server::echo_with(&["--write-timeout", "1", "--max-queue", &max_queue]);
    let mut idle = server.ws();
    idle.echo("an idle connection with nothing queued");

    // A client with a small receive buffer that sends small messages and never reads: the
    // echoes fill its window and the server's socket buffer, then wait in the server's queue.
    let (status, stalled) = upgrade_on(tcp_with(server.addr, None, Some(4096)), "/echo", &[]);
    assert_eq!(status, 101);
    let mut stalled = stalled.unwrap();
    let burst: Vec<u8> = msg.iter().copied().cycle().take(msg.len() * 1000).collect();
    for _ in 0..bursts {
        stalled.send_raw(&burst);
    }
    let sent_at = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || server
            .metric("parlor_write_timeouts_total")
            == 1),
        "the stalled reader was not dropped"
    );
    let took = sent_at.elapsed();
    assert!(took < Duration::from_secs(8), "dropped only after {took:?}");
    assert_eq!(server.metric("parlor_slow_consumer_drops_total"), 0);
    assert!(eventually(Duration::from_secs(2), || server
        .metric("parlor_websocket_connections")
        == 1));
    // The idle connection (empty queue) is not touched by the stall deadline.
    thread::sleep(Duration::from_millis(1500));
    idle.echo("still fine");
    assert_eq!(server.metric("parlor_write_timeouts_total"), 1);
    // What the stalled client finds: some echoes, then the end (no close frame could follow
    // the backlog).
    let mut echoes = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stalled.stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => echoes += n,
        }
    }
    assert!(
        echoes < bursts * 1000 * msg.len(),
        "everything was delivered after all"
    );
}

#[test]
fn forged_forwarded_for_from_untrusted_peer_is_ignored() {
    // 127.0.0.2 is a trusted proxy; our sockets come from 127.0.0.1, which is not.
    let server = Server::echo_with(&[
        "--max-connections-per-ip",
        "2",
        "--trusted-proxy",
        "127.0.0.2",
        "--log-level",
        "debug",
    ]);
    let mut kept = Vec::new();
    for xff in ["10.0.0.1", "10.0.0.2"] {
        let header = format!("X-Forwarded-For: {xff}");
        match upgrade_from(&server, localhost(1), &[&header]) {
            (101, Some(ws)) => kept.push(ws),
            (st, _) => panic!("refused with {st}"),
        }
    }
    // A third claims yet another address, and a Forwarded header too: still 127.0.0.1's third.
    let (status, _) = upgrade_from(
        &server,
        localhost(1),
        &["X-Forwarded-For: 10.0.0.3", "Forwarded: for=10.0.0.4"],
    );
    assert_eq!(status, 429);
    for ws in &mut kept {
        ws.echo("real address");
    }
    let log = server.log();
    assert!(
        !log.contains("forwarded for"),
        "headers were believed:\n{log}"
    );
    assert!(
        log.contains("127.0.0.1:") && log.contains("WebSocket open on /echo"),
        "{log}"
    );
}

#[test]
fn trusted_proxy_forwarded_addresses_are_limited_separately() {
    let server = Server::echo_with(&[
        "--max-connections-per-ip",
        "2",
        "--trusted-proxy",
        "127.0.0.1,::1",
        "--log-level",
        "debug",
    ]);
    // All sockets come from the proxy (127.0.0.1); the proxy itself is not limited.
    let mut kept = Vec::new();
    for extra in [
        "X-Forwarded-For: 10.0.0.1",
        // The client forged the left entry; the proxy appended the real one.
        "X-Forwarded-For: 6.6.6.6, 10.0.0.1",
    ] {
        match upgrade_on(server.tcp(), "/echo", &[extra]) {
            (101, Some(ws)) => kept.push(ws),
            (st, _) => panic!("{extra}: refused with {st}"),
        }
    }
    // 10.0.0.1 is at its limit.
    let (status, _) = upgrade_on(server.tcp(), "/echo", &["X-Forwarded-For: 10.0.0.1"]);
    assert_eq!(status, 429);
    // Other forwarded clients are not.
    for extra in [
        "X-Forwarded-For: 10.0.0.2",
        "Forwarded: for=\"[2001:db8::1]:4711\";proto=http",
        "X-Forwarded-For: 10.0.0.1, 127.0.0.1",
    ] {
        let st = upgrade_on(server.tcp(), "/echo", &[extra]);
        if extra.ends_with("127.0.0.1") {
            // A second trusted hop in front of 10.0.0.1: still 10.0.0.1, still full.
            assert_eq!(st.0, 429, "{extra}");
            continue;
        }
        match st {
            (101, Some(ws)) => kept.push(ws),
            (st, _) => panic!("{extra}: refused with {st}"),
        }
    }
    for ws in &mut kept {
        ws.echo("forwarded");
    }
    // Services and logs see the forwarded address. (The server's stderr is read by a thread:
    // its last lines may arrive a moment after the replies.)
    let wants = [
        "10.0.0.1:0: WebSocket open on /echo",
        "10.0.0.2:0: WebSocket open on /echo",
        "[2001:db8::1]:4711: WebSocket open on /echo",
    ];
    eventually(Duration::from_secs(5), || {
        let log = server.log();
        wants.iter().all(|w| log.contains(w))
    });
    let log = server.log();
    for want in wants {
        assert!(log.contains(want), "log lacks {want:?}:\n{log}");
    }
    assert_eq!(server.metric("parlor_rejected_per_ip_total"), 2);
}

/// `GET path` with extra header lines, from 127.0.0.1; the response status.
fn status_of(server: &Server, path: &str, headers: &str) -> u16 {
    let mut s = server.tcp();
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).expect("request");
    read_http_to_eof(&mut s).status
}

/// `/metrics` answers loopback only (a proxied request is not local, whatever the TCP peer),
/// and the addresses of `--metrics-allow`; `/healthz` stays public.
#[test]
fn metrics_are_served_to_loopback_and_metrics_allow_only() {
    let xff = |ip: &str| format!("X-Forwarded-For: {ip}\r\n");
    // Behind a trusted proxy, the forwarded client is who asks.
    let server = Server::with_args(&["--trusted-proxy", "127.0.0.1"]);
    assert_eq!(
        status_of(&server, "/metrics", ""),
        200,
        "direct from loopback"
    );
    assert_eq!(status_of(&server, "/metrics", &xff("203.0.113.5")), 403);
    assert_eq!(status_of(&server, "/healthz", &xff("203.0.113.5")), 200);
    drop(server);
    let server = Server::with_args(&[
        "--trusted-proxy",
        "127.0.0.1",
        "--metrics-allow",
        "203.0.113.0/24",
    ]);
    assert_eq!(status_of(&server, "/metrics", &xff("203.0.113.5")), 200);
    assert_eq!(status_of(&server, "/metrics", &xff("198.51.100.1")), 403);
    drop(server);
    // A reverse proxy on the same host that is not declared trusted: its requests carry
    // forwarding headers, so they are not taken as local.
    let server = Server::start();
    assert_eq!(status_of(&server, "/metrics", &xff("203.0.113.5")), 403);
    assert_eq!(
        status_of(&server, "/metrics", "Forwarded: for=203.0.113.5\r\n"),
        403
    );
    assert_eq!(status_of(&server, "/metrics", ""), 200);
}
