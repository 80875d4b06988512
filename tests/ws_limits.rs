//! Per-message and per-connection limits: message size, fragment count, ping floods and
//! clients that stop reading.

mod common;

use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use parlor::ws::frame::OpCode;
use parlor::ws::reader::OwnedEvent;

#[test]
fn message_at_limit_passes_and_over_limit_is_1009() {
    let server = Server::echo_with(&["--echo-max-message", "1000"]);
    let mut ws = server.ws();
    let ok = pattern(1000, 3);
    ws.send_binary(&ok);
    ws.expect_binary(&ok);
    ws.send_binary(&pattern(1001, 4));
    ws.expect_close_then_eof(1009);

    let mut ws = server.ws();
    ws.send_text(&text_of(1001, 1));
    ws.expect_close_then_eof(1009);
}

#[test]
fn oversize_length_is_refused_from_the_header_alone() {
    let server = Server::echo_with(&["--echo-max-message", "1000"]);
    let mut ws = server.ws();
    // Header of a 1 GiB masked binary frame; the payload never comes.
    let mut h = vec![0x82, 0xff];
    h.extend_from_slice(&(1u64 << 30).to_be_bytes());
    h.extend_from_slice(&[1, 2, 3, 4]);
    ws.send_raw(&h);
    ws.expect_close_then_eof(1009);
}

#[test]
fn fragments_adding_up_over_limit_are_1009() {
    let server = Server::echo_with(&["--echo-max-message", "1000"]);
    // Exactly at the limit in three fragments: fine.
    let mut ws = server.ws();
    let mut bytes = masked(false, OpCode::Text, text_of(400, 0).as_bytes());
    bytes.extend_from_slice(&masked(
        false,
        OpCode::Continuation,
        text_of(400, 0).as_bytes(),
    ));
    bytes.extend_from_slice(&masked(
        true,
        OpCode::Continuation,
        text_of(200, 0).as_bytes(),
    ));
    ws.send_raw(&bytes);
    match ws.recv_message() {
        OwnedEvent::Text(t) => assert_eq!(t.len(), 1000),
        other => panic!("expected the 1000-byte message, got {other:?}"),
    }

    // One byte more: 1009.
    let mut bytes = masked(false, OpCode::Binary, &[0u8; 600]);
    bytes.extend_from_slice(&masked(true, OpCode::Continuation, &[0u8; 401]));
    ws.send_raw(&bytes);
    ws.expect_close_then_eof(1009);
}

#[test]
fn max_fragments_exceeded_is_1009() {
    let server = Server::echo_with(&["--max-fragments", "3"]);
    let mut ws = server.ws();
    // Three fragments (one empty) are allowed.
    let mut ok = masked(false, OpCode::Text, b"a");
    ok.extend_from_slice(&masked(false, OpCode::Continuation, b""));
    ok.extend_from_slice(&masked(true, OpCode::Continuation, b"c"));
    ws.send_raw(&ok);
    ws.expect_text("ac");
    // Four, even if empty, are not.
    let mut bytes = masked(false, OpCode::Text, b"a");
    for _ in 0..2 {
        bytes.extend_from_slice(&masked(false, OpCode::Continuation, b""));
    }
    bytes.extend_from_slice(&masked(true, OpCode::Continuation, b"d"));
    ws.send_raw(&bytes);
    ws.expect_close_then_eof(1009);
}

#[test]
fn fragment_count_resets_between_messages() {
    let server = Server::echo_with(&["--max-fragments", "2"]);
    let mut ws = server.ws();
    for i in 0..5 {
        let mut bytes = masked(false, OpCode::Binary, &[i]);
        bytes.extend_from_slice(&masked(true, OpCode::Continuation, &[i]));
        ws.send_raw(&bytes);
        ws.expect_binary(&[i, i]);
        // Unfragmented messages in between.
        ws.send_binary(&[i]);
        ws.expect_binary(&[i]);
    }
}

#[test]
fn ping_flood_answers_at_most_once_per_ping_and_keeps_the_connection_usable() {
    let server = Server::echo();
    let mut ws = server.ws();
    const PINGS: usize = 10_000;
    // 125-byte payloads: 1.27 MB of pongs if every ping were answered, more than the socket
    // buffers hold while we do not read.
    let burst = ping_burst(PINGS);
    ws.send_raw(&burst);
    ws.send_text("after the flood");

    let mut pongs = 0usize;
    let mut last_seq: Option<usize> = None;
    loop {
        match ws.recv_event() {
            OwnedEvent::Pong(p) => {
                pongs += 1;
                assert_eq!(p.len(), 125, "pong payload must be the ping's");
                let seq: usize = std::str::from_utf8(&p[..8]).unwrap().parse().unwrap();
                if let Some(prev) = last_seq {
                    assert!(seq > prev, "pong for ping {seq} after pong for {prev}");
                }
                last_seq = Some(seq);
            }
            OwnedEvent::Text(t) => {
                assert_eq!(t, "after the flood");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    eprintln!("{pongs} pongs for {PINGS} pings");
    assert!(pongs >= 1, "no pong at all");
    assert!(pongs <= PINGS, "{pongs} pongs for {PINGS} pings");
    assert_eq!(
        last_seq,
        Some(PINGS - 1),
        "the latest ping must be answered"
    );
    ws.echo("still usable");
    ws.send_close(1000, "");
    ws.expect_close_then_eof(1000);
}

#[test]
fn client_that_never_reads_is_closed_while_others_are_served() {
    let server = Server::echo_with(&[
        "--max-queue",
        "1000000",
        "--echo-max-message",
        "70000",
        "--close-timeout",
        "0.5",
    ]);

    // A well-behaved client keeps echoing on its own thread the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let mut ws = server.ws();
        let stop = stop.clone();
        thread::spawn(move || {
            let mut rounds = 0u32;
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                ws.echo(&format!("good {rounds}"));
                worst = worst.max(t.elapsed());
                rounds += 1;
                thread::sleep(Duration::from_millis(5));
            }
            (ws, rounds, worst)
        })
    };

    let mut slow = server.ws();
    slow.stream
        .set_write_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let msg = masked(true, OpCode::Binary, &pattern(64 * 1024, 5));
    let mut sent = 0usize;
    let mut write_failed = None;
    // Up to 256 MiB; the server gives up long before (about 1 MB queue + socket buffers).
    for _ in 0..4096 {
        match slow.stream.write_all(&msg) {
            Ok(()) => sent += 1,
            Err(e) => {
                write_failed = Some(e);
                break;
            }
        }
    }
    // What the slow client finds when it finally reads: echoes, then close 1008, or the
    // connection was already torn down (EOF or reset).
    let mut saw_close = None;
    slow.set_read_timeout(Duration::from_secs(5));
    loop {
        match slow.try_recv() {
            Ok(Incoming::Event(OwnedEvent::Binary(_))) => {}
            Ok(Incoming::Event(OwnedEvent::Close(code, _))) => {
                saw_close = code;
                break;
            }
            Ok(Incoming::Event(other)) => panic!("unexpected {other:?}"),
            Ok(Incoming::Eof) => break,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("slow client read failed: {e} (sent {sent} messages)"),
        }
    }
    eprintln!("slow client: sent {sent}, write error {write_failed:?}, close {saw_close:?}");
    if let Some(code) = saw_close {
        assert_eq!(code, 1008);
    }
    assert!(
        write_failed.is_some() || saw_close.is_some(),
        "server accepted {sent} unread 64 KiB messages without closing"
    );
    assert!(
        eventually(Duration::from_secs(3), || server
            .metric("parlor_slow_consumer_drops_total")
            == 1),
        "slow consumer drop not counted"
    );

    stop.store(true, Ordering::Relaxed);
    let (mut ws, rounds, worst) = good.join().expect("good client thread");
    assert!(rounds > 0, "the good client never completed an echo");
    assert!(
        worst < Duration::from_secs(2),
        "an echo took {worst:?} while the slow client was flooding"
    );
    ws.echo("after");
    // Only one connection was dropped for being slow.
    let body = server.http("GET", "/metrics").text();
    assert!(
        body.lines()
            .any(|l| l == "parlor_closes_sent_total{code=\"1008\"} 1"),
        "expected exactly one 1008 close in:\n{body}"
    );
    let _ = slow.stream.flush();
}

#[test]
fn ping_flood_larger_than_socket_buffers_is_coalesced() {
    let server = Server::echo();
    let mut ws = server.ws();
    // 100,000 pings with 125-byte payloads: 12.7 MB of pongs if each were answered, far more
    // than loopback socket buffers hold while we do not read, so the server must coalesce
    // (RFC 6455 §5.5.3 allows answering only the most recent ping) instead of queueing them.
    const PINGS: usize = 100_000;
    let burst = ping_burst(PINGS);
    ws.stream
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    ws.send_raw(&burst);
    ws.send_text("after the flood");
    let mut pongs = 0usize;
    let mut last_seq = None;
    loop {
        match ws.recv_event() {
            OwnedEvent::Pong(p) => {
                pongs += 1;
                let seq: usize = std::str::from_utf8(&p[..8]).unwrap().parse().unwrap();
                assert!(last_seq < Some(seq), "pongs out of order");
                last_seq = Some(seq);
            }
            OwnedEvent::Text(t) => {
                assert_eq!(t, "after the flood");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    eprintln!("{pongs} pongs for {PINGS} pings");
    assert!(pongs >= 1);
    assert!(
        pongs < PINGS,
        "every one of {PINGS} pings was answered although the client was not reading"
    );
    assert_eq!(
        last_seq,
        Some(PINGS - 1),
        "the latest ping must be answered"
    );
    ws.echo("still usable");
}

/// A ping that arrives while a big frame is half-written is answered at the next frame boundary,
/// so before anything queued behind it. (The pong used to wait for a write that started exactly
/// at a boundary, so a text queued after the ping could overtake it in the same writev.)
#[test]
fn pong_for_a_backlogged_ping_is_not_overtaken_by_later_frames() {
    // A 12 MiB echo outgrows the loopback socket buffers; the queue limit is raised so the
    // frames behind it are accepted.
    let server = Server::echo_with(&["--max-queue", "64000000"]);
    let mut ws = server.ws();
    let big = pattern(12 << 20, 9);
    ws.stream
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    ws.send_raw(&masked(true, OpCode::Binary, &big));
    // The server echoes until the socket buffers are full: its queue head is now half-written.
    thread::sleep(Duration::from_millis(200));
    let mut rest = masked(true, OpCode::Ping, b"while backlogged");
    rest.extend(masked(true, OpCode::Text, b"after the ping"));
    ws.send_raw(&rest);
    thread::sleep(Duration::from_millis(200));
    let mut seen = Vec::new();
    loop {
        match ws.recv_event() {
            OwnedEvent::Binary(b) => {
                assert!(b == big, "echo of the big message differs");
                seen.push("big");
            }
            OwnedEvent::Pong(p) => {
                assert_eq!(p, b"while backlogged");
                seen.push("pong");
            }
            OwnedEvent::Text(t) => {
                assert_eq!(t, "after the ping");
                seen.push("text");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["big", "pong", "text"]);
}

#[test]
fn slow_consumer_that_resumes_reading_gets_close_1008() {
    let server = Server::echo_with(&[
        "--max-queue",
        "1000000",
        "--echo-max-message",
        "70000",
        "--close-timeout",
        "5",
    ]);
    let mut slow = server.ws();
    let msg = masked(true, OpCode::Binary, &pattern(64 * 1024, 6));
    let mut sent = 0;
    // Write without reading until the server has given up on us.
    loop {
        slow.send_raw(&msg);
        sent += 1;
        if sent % 8 == 0 && server.metric("parlor_slow_consumer_drops_total") == 1 {
            break;
        }
        assert!(
            sent < 4096,
            "server never closed a client that does not read"
        );
    }
    // Now read: some echoes, then the close with 1008.
    let mut echoes = 0;
    loop {
        match slow.recv_event() {
            OwnedEvent::Binary(b) => {
                assert_eq!(b.len(), 64 * 1024);
                echoes += 1;
            }
            OwnedEvent::Close(code, _) => {
                assert_eq!(code, Some(1008));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(echoes < sent, "{echoes} echoes for {sent} messages");
    slow.send_close(1008, "");
    assert_eq!(slow.recv(), Incoming::Eof);
}

#[test]
fn one_message_of_the_maximum_size_is_echoed_despite_the_queue_limit() {
    // Default --echo-max-message is 16 MiB and --max-queue 4 MiB: one maximal echo must fit.
    let server = Server::echo();
    let mut ws = server.ws();
    ws.stream
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    ws.set_read_timeout(Duration::from_secs(20));
    let data = pattern(16 << 20, 8);
    ws.send_binary(&data);
    ws.expect_binary(&data);
    ws.echo("after the big one");
}

/// The outbound queue limit must bound memory, not just payload bytes: a client that sends
/// tiny messages and never reads makes the server queue one tiny echo frame per message, and
/// the memory those frames pin has to stay within a small factor of the configured limit.
#[test]
fn queue_limit_bounds_memory_for_tiny_frames_too() {
    if rss_bytes(std::process::id()).is_none() {
        return; // needs Linux /proc
    }
    let max_queue = 1_000_000u64;
    let server = Server::echo_with(&[
        "--max-queue",
        "1000000",
        "--echo-max-message",
        "1000",
        "--close-timeout",
        "5",
        // The chat's password workers each hash a dummy password at start (19 MiB of argon2
        // memory by default); keep that out of this measurement of the echo path.
        "--argon2-memory",
        "64",
    ]);
    let mut ws = server.ws();
    ws.stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let base = rss_bytes(server.pid()).unwrap();
    let mut peak = base;
    // 2-byte text messages (8 bytes on the wire, 4-byte echoes), 256 KiB per write.
    let frame = masked(true, OpCode::Text, b"ab");
    let chunk: Vec<u8> = frame.iter().copied().cycle().take(256 << 10).collect();
    let mut written = 0usize;
    let mut dropped = false;
    while written < 64 << 20 {
        if ws.stream.write_all(&chunk).is_err() {
            break;
        }
        written += chunk.len();
        peak = peak.max(rss_bytes(server.pid()).unwrap());
        if written.is_multiple_of(4 << 20) && server.metric("parlor_slow_consumer_drops_total") == 1
        {
            dropped = true;
            break;
        }
    }
    for _ in 0..10 {
        thread::sleep(Duration::from_millis(20));
        peak = peak.max(rss_bytes(server.pid()).unwrap());
    }
    dropped = dropped || server.metric("parlor_slow_consumer_drops_total") == 1;
    assert!(dropped, "the non-reading client was not closed with 1008");
    let growth = peak.saturating_sub(base);
    eprintln!("RSS grew by {growth} bytes for a {max_queue}-byte queue limit");
    assert!(
        growth < 4 * max_queue + (2 << 20),
        "one non-reading connection grew the server by {} KiB with --max-queue {} KiB",
        growth / 1024,
        max_queue / 1024
    );
}

/// `count` masked pings with 125-byte payloads numbered `00000000…`, in one buffer.
fn ping_burst(count: usize) -> Vec<u8> {
    let mut burst = Vec::with_capacity(count * 131);
    for i in 0..count {
        let mut p = format!("{i:08}").into_bytes();
        p.resize(125, b'.');
        burst.extend_from_slice(&masked(true, OpCode::Ping, &p));
    }
    burst
}
