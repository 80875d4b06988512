//! RFC 6455 framing against the real server over real sockets: echo at the length-encoding
//! boundaries, fragmentation with interleaved control frames, every protocol violation and the
//! close code it must produce, and the close handshake.

mod common;

use std::thread;
use std::time::Duration;

use common::*;
use parlor::ws::frame::OpCode;
use parlor::ws::reader::OwnedEvent;

const SIZES: [usize; 6] = [0, 125, 126, 65535, 65536, 1 << 20];

#[test]
fn echo_text_at_length_boundaries() {
    let server = Server::echo();
    let mut ws = server.ws();
    for (i, &n) in SIZES.iter().enumerate() {
        let text = text_of(n, i as u8);
        ws.send_text(&text);
        ws.expect_text(&text);
    }
}

#[test]
fn echo_multibyte_text() {
    let server = Server::echo();
    let mut ws = server.ws();
    let text = "κόσμε 🌍 parlor ".repeat(5000);
    ws.echo(&text);
}

#[test]
fn echo_binary_at_length_boundaries() {
    let server = Server::echo();
    let mut ws = server.ws();
    for (i, &n) in SIZES.iter().enumerate() {
        let data = pattern(n, i as u8 + 1);
        ws.send_binary(&data);
        ws.expect_binary(&data);
    }
}

#[test]
fn echo_many_messages_in_one_write() {
    let server = Server::echo();
    let mut ws = server.ws();
    let mut burst = Vec::new();
    for i in 0..500 {
        burst.extend_from_slice(&masked(true, OpCode::Text, format!("m{i}").as_bytes()));
    }
    ws.send_raw(&burst);
    for i in 0..500 {
        ws.expect_text(&format!("m{i}"));
    }
}

#[test]
fn server_frames_are_unmasked_and_use_minimal_lengths() {
    let server = Server::echo();
    let mut ws = server.ws();
    ws.send_binary(&[7u8; 126]);
    // Read the raw bytes ourselves: FIN+binary, no mask bit, 16-bit length 126.
    let mut got = [0u8; 4 + 126];
    std::io::Read::read_exact(&mut ws.stream, &mut got).unwrap();
    assert_eq!(&got[..4], &[0x82, 0x7e, 0x00, 0x7e]);
    assert!(got[4..].iter().all(|&b| b == 7));
}

#[test]
fn fragmented_message_with_interleaved_ping() {
    let server = Server::echo();
    let mut ws = server.ws();
    let mut bytes = masked(false, OpCode::Text, b"Hel");
    bytes.extend_from_slice(&masked(true, OpCode::Ping, b"in between"));
    bytes.extend_from_slice(&masked(false, OpCode::Continuation, b""));
    bytes.extend_from_slice(&masked(false, OpCode::Continuation, "lo, κό".as_bytes()));
    bytes.extend_from_slice(&masked(true, OpCode::Pong, b"unsolicited"));
    bytes.extend_from_slice(&masked(true, OpCode::Continuation, "σμε".as_bytes()));
    ws.send_raw(&bytes);
    assert_eq!(
        ws.recv_event(),
        OwnedEvent::Pong(b"in between".to_vec()),
        "the ping is answered with its payload (before the message completes)"
    );
    assert_eq!(ws.recv_event(), OwnedEvent::Text("Hello, κόσμε".into()));
    ws.echo("after");
}

#[test]
fn fragmented_binary_sent_in_separate_writes() {
    let server = Server::echo();
    let mut ws = server.ws();
    let data = pattern(200_000, 9);
    let parts: Vec<&[u8]> = data.chunks(30_000).collect();
    for (i, part) in parts.iter().enumerate() {
        let op = if i == 0 {
            OpCode::Binary
        } else {
            OpCode::Continuation
        };
        let f = masked(i + 1 == parts.len(), op, part);
        ws.send_raw(&f);
        if i == 2 {
            ws.send_ping(b"mid");
            assert_eq!(ws.recv_event(), OwnedEvent::Pong(b"mid".to_vec()));
        }
    }
    ws.expect_binary(&data);
}

#[test]
fn ping_is_answered_with_same_payload() {
    let server = Server::echo();
    let mut ws = server.ws();
    for payload in [&b""[..], b"x", &[0xffu8; 125][..]] {
        ws.send_ping(payload);
        assert_eq!(ws.recv_event(), OwnedEvent::Pong(payload.to_vec()));
    }
}

/// Sends `bytes` on a fresh `/echo` connection and expects close `code` then EOF.
fn violation(server: &Server, bytes: &[u8], code: u16) -> String {
    let mut ws = server.ws();
    ws.send_raw(bytes);
    ws.expect_close_then_eof(code)
}

#[test]
fn unmasked_client_frame_is_1002() {
    let server = Server::echo();
    violation(&server, &unmasked(true, OpCode::Text, b"hi"), 1002);
}

#[test]
fn rsv_bits_are_1002() {
    let server = Server::echo();
    for rsv in [0x40u8, 0x20, 0x10] {
        let mut f = masked(true, OpCode::Text, b"hi");
        f[0] |= rsv;
        violation(&server, &f, 1002);
    }
}

#[test]
fn reserved_opcodes_are_1002() {
    let server = Server::echo();
    for op in [3u8, 7, 0xb, 0xf] {
        let mut f = masked(true, OpCode::Binary, b"hi");
        f[0] = (f[0] & 0xf0) | op;
        violation(&server, &f, 1002);
    }
}

#[test]
fn ping_with_126_byte_payload_is_1002() {
    let server = Server::echo();
    violation(&server, &masked(true, OpCode::Ping, &[1u8; 126]), 1002);
}

#[test]
fn fragmented_ping_is_1002() {
    let server = Server::echo();
    violation(&server, &masked(false, OpCode::Ping, b"frag"), 1002);
}

#[test]
fn continuation_without_start_is_1002() {
    let server = Server::echo();
    violation(
        &server,
        &masked(true, OpCode::Continuation, b"orphan"),
        1002,
    );
}

#[test]
fn new_message_inside_fragmented_message_is_1002() {
    let server = Server::echo();
    let mut bytes = masked(false, OpCode::Text, b"one");
    bytes.extend_from_slice(&masked(true, OpCode::Text, b"two"));
    violation(&server, &bytes, 1002);
}

#[test]
fn invalid_utf8_is_1007() {
    let server = Server::echo();
    violation(&server, &masked(true, OpCode::Text, b"ok \xc0\xaf"), 1007);
    // Surrogate half encoded in UTF-8.
    violation(&server, &masked(true, OpCode::Text, b"\xed\xa0\x80"), 1007);
}

#[test]
fn invalid_utf8_fails_fast_mid_fragment() {
    let server = Server::echo();
    let mut ws = server.ws();
    // The first fragment already holds an impossible byte; the message never finishes.
    ws.send_raw(&masked(false, OpCode::Text, b"fine so far \xff"));
    ws.expect_close_then_eof(1007);
}

#[test]
fn utf8_sequence_split_across_fragments_is_fine() {
    let server = Server::echo();
    let mut ws = server.ws();
    let s = "€"; // e2 82 ac
    let mut bytes = masked(false, OpCode::Text, &s.as_bytes()[..1]);
    bytes.extend_from_slice(&masked(false, OpCode::Continuation, &s.as_bytes()[1..2]));
    bytes.extend_from_slice(&masked(true, OpCode::Continuation, &s.as_bytes()[2..]));
    ws.send_raw(&bytes);
    ws.expect_text(s);
}

#[test]
fn truncated_utf8_at_message_end_is_1007() {
    let server = Server::echo();
    let mut bytes = masked(false, OpCode::Text, b"abc");
    bytes.extend_from_slice(&masked(true, OpCode::Continuation, b"\xe2\x82"));
    violation(&server, &bytes, 1007);
}

#[test]
fn close_with_1005_is_1002() {
    let server = Server::echo();
    violation(&server, &close_frame(1005, b""), 1002);
}

#[test]
fn close_with_999_is_1002() {
    let server = Server::echo();
    violation(&server, &close_frame(999, b""), 1002);
}

#[test]
fn close_with_other_reserved_codes_is_1002() {
    let server = Server::echo();
    for code in [1004u16, 1006, 1015, 2000, 5000] {
        violation(&server, &close_frame(code, b""), 1002);
    }
}

#[test]
fn close_with_one_byte_payload_is_1002() {
    let server = Server::echo();
    violation(&server, &masked(true, OpCode::Close, &[0x03]), 1002);
}

#[test]
fn close_with_invalid_utf8_reason_is_1007() {
    let server = Server::echo();
    violation(&server, &close_frame(1000, b"bye \xff"), 1007);
}

#[test]
fn valid_close_is_echoed_then_tcp_closes() {
    let server = Server::echo();
    let mut ws = server.ws();
    ws.echo("before close");
    ws.send_close(1000, "bye");
    ws.expect_close_then_eof(1000);
}

#[test]
fn close_codes_are_echoed() {
    let server = Server::echo();
    for code in [1001u16, 1003, 3000, 4999] {
        let mut ws = server.ws();
        ws.send_close(code, "");
        ws.expect_close_then_eof(code);
    }
}

#[test]
fn empty_close_gets_empty_close() {
    let server = Server::echo();
    let mut ws = server.ws();
    ws.send_raw(&masked(true, OpCode::Close, b""));
    assert_eq!(ws.recv_event(), OwnedEvent::Close(None, String::new()));
    assert_eq!(ws.recv(), Incoming::Eof);
}

#[test]
fn nothing_is_processed_after_a_close() {
    let server = Server::echo();
    let mut ws = server.ws();
    let mut bytes = close_frame(1000, b"");
    bytes.extend_from_slice(&masked(true, OpCode::Text, b"too late"));
    ws.send_raw(&bytes);
    ws.expect_close_then_eof(1000);
}

#[test]
fn valid_messages_before_a_violation_are_still_echoed() {
    let server = Server::echo();
    let mut ws = server.ws();
    let mut bytes = masked(true, OpCode::Text, b"first");
    bytes.extend_from_slice(&masked(true, OpCode::Binary, b"second"));
    bytes.extend_from_slice(&unmasked(true, OpCode::Text, b"bad"));
    ws.send_raw(&bytes);
    ws.expect_text("first");
    ws.expect_binary(b"second");
    ws.expect_close_then_eof(1002);
}

#[test]
fn violation_counts_reach_metrics() {
    let server = Server::echo();
    violation(&server, &masked(true, OpCode::Text, b"\xff"), 1007);
    let body = server.http("GET", "/metrics").text();
    assert!(
        body.lines()
            .any(|l| l == "parlor_closes_sent_total{code=\"1007\"} 1"),
        "no 1007 close counted in:\n{body}"
    );
}

#[test]
fn peer_that_drops_mid_frame_does_not_hurt_others() {
    let server = Server::echo();
    let mut other = server.ws();
    {
        let mut ws = server.ws();
        let f = masked(true, OpCode::Binary, &[0u8; 1000]);
        ws.send_raw(&f[..500]);
    }
    thread::sleep(Duration::from_millis(50));
    other.echo("unaffected");
}

/// RFC 6455 §5.5.1: an endpoint that receives a Close frame and has not sent one MUST send a
/// Close frame in response. A client that half-closes TCP right after its Close (it will not
/// send anything more anyway, §7.1.2) still reads, and must get that response.
#[test]
fn close_followed_by_half_close_still_gets_the_close_reply() {
    let server = Server::echo();
    let mut ws = server.ws();
    ws.echo("hello");
    server.send_with_fin(&mut ws.stream, &close_frame(1000, b"bye"));
    ws.expect_close_then_eof(1000);
}

/// The loop stops reading at a short read (the socket is drained; new data raises a new
/// edge), but a FIN that arrived together with the data raised its edge already: the server
/// must still see it and end the connection, not wait for the idle timeout.
#[test]
fn data_and_fin_in_one_read_end_the_connection() {
    let server = Server::echo();
    let mut ws = server.ws();
    ws.echo("warm");
    server.send_with_fin(&mut ws.stream, &masked(true, OpCode::Text, b"last words"));
    ws.expect_text("last words");
    assert_eq!(ws.recv(), Incoming::Eof, "server must close after the FIN");
}

/// A FIN that comes after the server drained the socket with a short read raises its own edge.
#[test]
fn fin_after_a_drained_read_ends_the_connection() {
    let server = Server::echo();
    let mut ws = server.ws();
    ws.echo("one");
    thread::sleep(Duration::from_millis(50));
    ws.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(ws.recv(), Incoming::Eof, "server must close after the FIN");
}

#[test]
fn queued_echo_goes_out_before_the_close_reply() {
    let server = Server::echo();
    let mut ws = server.ws();
    let data = pattern(1 << 20, 7);
    let mut bytes = masked(true, OpCode::Binary, &data);
    bytes.extend_from_slice(&close_frame(1000, b""));
    ws.send_raw(&bytes);
    ws.expect_binary(&data);
    ws.expect_close_then_eof(1000);
}

#[test]
fn query_string_does_not_change_the_endpoint() {
    let server = Server::echo();
    let mut ws = WsClient::connect(server.addr, "/echo?room=1&x=%20");
    ws.echo("query ok");
}

#[test]
fn length_with_most_significant_bit_set_is_1002() {
    let server = Server::echo();
    let mut h = vec![0x82, 0xff];
    h.extend_from_slice(&(1u64 << 63 | 5).to_be_bytes());
    h.extend_from_slice(&[1, 2, 3, 4]);
    violation(&server, &h, 1002);
}

#[test]
fn close_with_longest_reason_is_echoed() {
    let server = Server::echo();
    let mut ws = server.ws();
    ws.send_close(4000, &"r".repeat(123));
    ws.expect_close_then_eof(4000);
}
