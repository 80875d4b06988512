//! Connection lifecycle on the event loop: keepalive, the connection cap, fairness between
//! connections, token reuse, and graceful shutdown on signals.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use parlor::ws::frame::OpCode;
use parlor::ws::reader::OwnedEvent;

const KEEPALIVE: [&str; 4] = ["--ping-interval", "0.3", "--pong-timeout", "0.3"];

#[test]
fn silent_client_is_pinged_and_dropped_if_it_never_answers() {
    let server = Server::echo_with(&KEEPALIVE);
    let mut ws = server.ws();
    let start = Instant::now();
    match ws.recv_event() {
        OwnedEvent::Ping(_) => {}
        other => panic!("expected a keepalive ping, got {other:?}"),
    }
    let pinged = start.elapsed();
    assert!(
        pinged >= Duration::from_millis(200),
        "pinged after only {pinged:?}"
    );
    match ws.try_recv() {
        Ok(Incoming::Eof) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection to be dropped, got {other:?}"),
    }
    let dropped = start.elapsed();
    assert!(
        dropped < Duration::from_millis(1500),
        "dropped only after {dropped:?}"
    );
    assert!(dropped >= pinged + Duration::from_millis(200));
    assert_eq!(server.metric("parlor_ping_timeouts_total"), 1);
}

#[test]
fn client_answering_pings_stays_connected() {
    let server = Server::echo_with(&KEEPALIVE);
    let mut ws = server.ws();
    ws.set_read_timeout(Duration::from_millis(50));
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_secs(2) {
        match ws.try_recv() {
            Ok(Incoming::Event(OwnedEvent::Ping(p))) => {
                pings += 1;
                ws.send_raw(&masked(true, OpCode::Pong, &p));
            }
            Ok(other) => panic!("unexpected {other:?} after {:?}", start.elapsed()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("connection failed after {:?}: {e}", start.elapsed()),
        }
    }
    assert!(pings >= 2, "only {pings} keepalive pings in 2 s");
    ws.set_read_timeout(IO_TIMEOUT);
    ws.echo("still connected");
    assert_eq!(server.metric("parlor_ping_timeouts_total"), 0);
}

#[test]
fn busy_client_is_not_pinged() {
    let server = Server::echo_with(&KEEPALIVE);
    let mut ws = server.ws();
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(1) {
        // recv_message would answer pings; insist there are none.
        ws.send_text(&format!("busy {i}"));
        assert_eq!(ws.recv_event(), OwnedEvent::Text(format!("busy {i}")));
        i += 1;
        thread::sleep(Duration::from_millis(50));
    }
}

/// Sends an upgrade request on a fresh connection and returns the response status (and the
/// socket, for a 101).
fn try_upgrade(server: &Server) -> (u16, std::net::TcpStream, Vec<u8>) {
    let mut s = server.tcp();
    s.write_all(upgrade_request("/echo", RFC_KEY, &[]).as_bytes())
        .unwrap();
    let (resp, rest) = read_head(&mut s);
    (resp.status, s, rest)
}

#[test]
fn max_connections_answers_503_then_recovers() {
    let server = Server::echo_with(&["--max-connections", "5"]);
    let mut clients: Vec<WsClient> = (0..5).map(|_| server.ws()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.echo(&format!("client {i}"));
    }
    // The sixth gets a 503 and is closed.
    let mut s = server.tcp();
    s.write_all(upgrade_request("/echo", RFC_KEY, &[]).as_bytes())
        .unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        got.starts_with(b"HTTP/1.1 503"),
        "sixth connection got {:?}",
        String::from_utf8_lossy(&got)
    );
    // The five are unaffected.
    for (i, c) in clients.iter_mut().enumerate() {
        c.echo(&format!("again {i}"));
    }
    // Close one cleanly; then a new connection is accepted again.
    let mut one = clients.pop().unwrap();
    one.send_close(1000, "");
    one.expect_close_then_eof(1000);
    drop(one);
    let mut status = 0;
    let ok = eventually(Duration::from_secs(2), || {
        let (st, s, rest) = try_upgrade(&server);
        status = st;
        if st == 101 {
            WsClient::from_upgraded(s, rest).echo("newcomer");
            true
        } else {
            false
        }
    });
    assert!(
        ok,
        "no new connection accepted after one closed (last {status})"
    );
}

#[test]
fn flooding_client_does_not_starve_others() {
    let server = Server::echo();
    let flooder = server.ws();
    let mut rd = flooder.stream.try_clone().unwrap();
    let mut wr = flooder.stream.try_clone().unwrap();
    wr.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    rd.set_read_timeout(Some(Duration::from_secs(20))).unwrap();

    // 50 MB of 2-byte masked text frames (8 bytes each on the wire).
    const TOTAL: usize = 50 << 20;
    let frame = masked(true, OpCode::Text, b"ab");
    let chunk: Vec<u8> = frame.iter().copied().cycle().take(1 << 20).collect();
    let frames = TOTAL / frame.len();
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let done = done.clone();
        thread::spawn(move || {
            for _ in 0..TOTAL / chunk.len() {
                wr.write_all(&chunk).expect("flood write");
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    // Drain the flooder's echoes (4 bytes each: 81 02 'a' 'b') and check every byte.
    let reader = thread::spawn(move || {
        let want = frames * 4;
        let pattern = [0x81u8, 0x02, b'a', b'b'];
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        while got < want {
            let n = rd.read(&mut buf).expect("flood echo read");
            assert!(
                n > 0,
                "flooder connection closed after {got} of {want} bytes"
            );
            for (i, &b) in buf[..n].iter().enumerate() {
                assert_eq!(b, pattern[(got + i) % 4], "echo byte {}", got + i);
            }
            got += n;
        }
        got
    });

    let mut other = server.ws();
    let mut rounds_during = 0;
    let mut worst = Duration::ZERO;
    let mut i = 0;
    while !done.load(Ordering::SeqCst) {
        let t = Instant::now();
        other.echo(&format!("other {i}"));
        let took = t.elapsed();
        worst = worst.max(took);
        assert!(
            took < Duration::from_secs(2),
            "echo {i} took {took:?} during the flood"
        );
        if !done.load(Ordering::SeqCst) {
            rounds_during += 1;
        }
        i += 1;
        thread::sleep(Duration::from_millis(10));
    }
    writer.join().expect("writer");
    let echoed = reader.join().expect("reader");
    eprintln!("{rounds_during} echoes during the flood, worst {worst:?}, {echoed} bytes echoed");
    assert!(
        rounds_during >= 1,
        "no echo completed while the flood was running"
    );
    other.echo("after the flood");
}

#[test]
fn reused_tokens_never_mix_up_connections() {
    // 1000 connections from one address in quick succession: no per-address limit here.
    let server = Server::echo_with(&["--max-connections-per-ip", "0"]);
    let mut long = server.ws();
    for i in 0..1000 {
        let mut c = server.ws();
        match i % 4 {
            0 => {
                c.echo(&format!("short {i}"));
                c.send_close(1000, "");
                c.expect_close_then_eof(1000);
            }
            1 => {
                // Abrupt drop with an echo in flight.
                c.send_text(&format!("short {i} never read"));
            }
            2 => {} // abrupt drop right after the handshake
            _ => {
                // Abrupt drop with half a frame sent.
                c.echo(&format!("short {i}"));
                let f = masked(true, OpCode::Binary, &[9u8; 300]);
                c.send_raw(&f[..100]);
            }
        }
        drop(c);
        if i % 10 == 0 {
            long.echo(&format!("long {i}"));
        }
    }
    // Nothing meant for another connection arrived on the long one.
    long.set_read_timeout(Duration::from_millis(300));
    match long.try_recv() {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("stray input on the long-lived connection: {other:?}"),
    }
    long.set_read_timeout(IO_TIMEOUT);
    long.echo("long final");
    // All the short ones are gone from the server's table: left are the long one and the
    // connection asking for the metrics.
    assert!(
        eventually(Duration::from_secs(3), || {
            let body = server.http("GET", "/metrics").text();
            metric_value(&body, "parlor_websocket_connections") == Some(1)
                && metric_value(&body, "parlor_connections") == Some(2)
        }),
        "short connections linger:\n{}",
        server.http("GET", "/metrics").text()
    );
    assert_eq!(server.metric("parlor_handshakes_total"), 1001);
}

#[test]
fn sigterm_sends_1001_to_every_client_and_exits_0() {
    let mut server = Server::echo_with(&["--shutdown-grace", "3"]);
    let mut clients: Vec<WsClient> = (0..3).map(|_| server.ws()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.echo(&format!("client {i}"));
    }
    // A connection still in its handshake is simply dropped.
    let mut half = server.tcp();
    half.write_all(b"GET /echo HTTP/1.1\r\n").unwrap();
    thread::sleep(Duration::from_millis(50));

    let start = Instant::now();
    server.signal("TERM");
    for c in &mut clients {
        c.expect_close(1001);
        c.send_close(1001, "");
    }
    for c in &mut clients {
        assert_eq!(
            c.recv(),
            Incoming::Eof,
            "TCP closes after the close handshake"
        );
    }
    // Like any client, close our end once the server closed its end.
    clients.clear();
    let mut buf = [0u8; 8];
    assert_eq!(half.read(&mut buf).unwrap_or(0), 0);
    let status = server
        .wait_exit(Duration::from_secs(3))
        .expect("server did not exit within the grace period");
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(status.code(), Some(0));
    // Every client answered, so the server needs no grace period at all.
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "exit took {:?}",
        start.elapsed()
    );
}

#[test]
fn sigterm_with_unresponsive_clients_exits_after_grace() {
    let mut server = Server::echo_with(&["--shutdown-grace", "0.5"]);
    let mut clients: Vec<WsClient> = (0..3).map(|_| server.ws()).collect();
    for c in &mut clients {
        c.echo("hi");
    }
    let start = Instant::now();
    server.signal("TERM");
    // Nobody answers the close.
    let status = server
        .wait_exit(Duration::from_secs(3))
        .expect("server did not exit after its grace period");
    assert_eq!(status.code(), Some(0));
    assert!(start.elapsed() >= Duration::from_millis(400));
    for c in &mut clients {
        c.expect_close(1001);
    }
}

#[test]
fn sigint_behaves_like_sigterm() {
    let mut server = Server::echo_with(&["--shutdown-grace", "3"]);
    let mut ws = server.ws();
    ws.echo("hi");
    server.signal("INT");
    ws.expect_close(1001);
    ws.send_close(1001, "");
    assert_eq!(ws.recv(), Incoming::Eof);
    drop(ws);
    let status = server.wait_exit(Duration::from_secs(3)).expect("exit");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn listener_closes_on_sigterm() {
    let mut server = Server::echo_with(&["--shutdown-grace", "3"]);
    let mut ws = server.ws();
    ws.echo("hi");
    server.signal("TERM");
    ws.expect_close(1001);
    // The server is still running (waiting for our close), but accepts nothing new.
    assert!(server.is_running());
    assert!(
        std::net::TcpStream::connect(server.addr).is_err(),
        "new connection accepted during shutdown"
    );
    ws.send_close(1001, "");
    assert_eq!(ws.recv(), Incoming::Eof);
    drop(ws);
    let status = server.wait_exit(Duration::from_secs(3)).expect("exit");
    assert_eq!(status.code(), Some(0));
}

/// User + system CPU time of a process, from /proc (Linux).
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux configuration Rust supports.
    Some(Duration::from_millis(ticks * 10))
}

#[test]
fn running_out_of_file_descriptors_does_not_spin_and_recovers() {
    if !std::path::Path::new("/proc/self/stat").exists() {
        return; // needs Linux /proc for the CPU-time check
    }
    let server = Server::with_fd_limit(40, &["--echo"]);
    let mut ws = server.ws();
    ws.echo("before");
    // Far more connections than descriptors: the rest wait in the listen backlog while
    // accept() fails with EMFILE.
    let mut conns: Vec<_> = (0..60).map(|_| server.tcp()).collect();
    thread::sleep(Duration::from_millis(200));
    let before = cpu_time(server.pid()).expect("cpu time");
    thread::sleep(Duration::from_secs(1));
    let used = cpu_time(server.pid()).expect("cpu time") - before;
    // A loop retrying accept() without pause would burn the whole second.
    assert!(
        used < Duration::from_millis(500),
        "server used {used:?} of CPU in 1 s while out of descriptors"
    );
    // The open WebSocket still works.
    ws.echo("during");
    // Free descriptors: everything recovers, including the connections that waited.
    conns.truncate(0);
    let mut status = 0;
    assert!(
        eventually(Duration::from_secs(3), || {
            let mut s = server.tcp();
            let ok = s
                .write_all(upgrade_request("/echo", RFC_KEY, &[]).as_bytes())
                .is_ok();
            if !ok {
                return false;
            }
            let mut buf = Vec::new();
            let mut chunk = [0u8; 256];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk) {
                    Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => return false,
                }
            }
            status = parse_http_head(&buf).map(|(r, _)| r.status).unwrap_or(0);
            status == 101
        }),
        "no new connection accepted after descriptors were freed (last status {status})"
    );
    ws.echo("after");
    assert!(server.metric("parlor_accept_errors_total") >= 1);
}

#[test]
fn concurrent_clients_only_get_their_own_echoes() {
    let server = Server::echo();
    let workers: Vec<_> = (0..32)
        .map(|c| {
            let mut ws = server.ws();
            thread::spawn(move || {
                for i in 0..100 {
                    if i % 2 == 0 {
                        ws.echo(&format!("client {c} message {i}"));
                    } else {
                        let data = pattern(1000 + c * 10 + i, c as u8);
                        ws.send_binary(&data);
                        ws.expect_binary(&data);
                    }
                }
                ws.send_close(1000, "");
                ws.expect_close_then_eof(1000);
            })
        })
        .collect();
    for w in workers {
        w.join().expect("client thread");
    }
    assert_eq!(server.metric("parlor_messages_in_total"), 3200);
}

#[test]
fn second_signal_stops_waiting_for_peers() {
    let mut server = Server::echo_with(&["--shutdown-grace", "60"]);
    let mut ws = server.ws();
    ws.echo("hi");
    server.signal("TERM");
    ws.expect_close(1001);
    // We never answer; a second signal ends the wait long before the 60 s grace.
    assert!(server.is_running());
    server.signal("TERM");
    let status = server
        .wait_exit(Duration::from_secs(5))
        .expect("second signal did not stop the server");
    assert_eq!(status.code(), Some(0));
}
