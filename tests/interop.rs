//! Interop with an independent client implementation: `tungstenite` (blocking).

mod common;

use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Error, Message, WebSocket};

fn connect(server: &Server) -> WebSocket<TcpStream> {
    let stream = server.tcp();
    let (ws, resp) = tungstenite::client(format!("ws://{}/echo", server.addr), stream)
        .expect("tungstenite handshake");
    assert_eq!(resp.status(), 101);
    ws
}

fn read_data(ws: &mut WebSocket<TcpStream>) -> Message {
    loop {
        match ws.read().expect("read") {
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

#[test]
fn tungstenite_echoes_text_and_binary() {
    let server = Server::echo();
    let mut ws = connect(&server);
    for (i, n) in [0usize, 1, 125, 126, 65535, 65536, 1 << 20]
        .into_iter()
        .enumerate()
    {
        let text = text_of(n, i as u8);
        ws.send(Message::Text(text.clone())).unwrap();
        assert_eq!(read_data(&mut ws), Message::Text(text));
        let bin = pattern(n, i as u8);
        ws.send(Message::Binary(bin.clone())).unwrap();
        assert_eq!(read_data(&mut ws), Message::Binary(bin));
    }
    let unicode = "Grüße, 世界 🌍".to_string();
    ws.send(Message::Text(unicode.clone())).unwrap();
    assert_eq!(read_data(&mut ws), Message::Text(unicode));
}

#[test]
fn tungstenite_ping_gets_pong() {
    let server = Server::echo();
    let mut ws = connect(&server);
    ws.send(Message::Ping(b"are you there".to_vec())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Pong(b"are you there".to_vec()));
}

#[test]
fn tungstenite_close_handshake_completes_cleanly() {
    let server = Server::echo();
    let mut ws = connect(&server);
    ws.send(Message::Text("bye soon".into())).unwrap();
    assert_eq!(read_data(&mut ws), Message::Text("bye soon".into()));
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .unwrap();
    match ws.read() {
        Ok(Message::Close(Some(f))) => assert_eq!(f.code, CloseCode::Normal),
        other => panic!("expected Close(1000), got {other:?}"),
    }
    match ws.read() {
        Err(Error::ConnectionClosed) => {}
        other => panic!("expected ConnectionClosed, got {other:?}"),
    }
    // And the server closed TCP.
    let mut buf = [0u8; 1];
    assert_eq!(ws.get_mut().read(&mut buf).unwrap(), 0);
}

#[test]
fn tungstenite_sees_1009_for_oversize_message() {
    let server = Server::echo_with(&["--echo-max-message", "1000"]);
    let mut ws = connect(&server);
    ws.send(Message::Binary(vec![0u8; 1001])).unwrap();
    match ws.read() {
        Ok(Message::Close(Some(f))) => assert_eq!(f.code, CloseCode::Size),
        other => panic!("expected Close(1009), got {other:?}"),
    }
    // tungstenite answers the close; then the connection ends cleanly.
    match ws.read() {
        Err(Error::ConnectionClosed) => {}
        other => panic!("expected a clean close, got {other:?}"),
    }
}

#[test]
fn tungstenite_keepalive_answers_keep_it_connected() {
    let server = Server::echo_with(&["--ping-interval", "0.3", "--pong-timeout", "0.3"]);
    let mut ws = connect(&server);
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        match ws.read() {
            // tungstenite queues the pong and flushes it on the next read/write.
            Ok(Message::Ping(_)) => pings += 1,
            Ok(m) => panic!("unexpected {m:?}"),
            Err(Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                let _ = ws.flush();
            }
            Err(e) => panic!("dropped after {:?}: {e}", start.elapsed()),
        }
    }
    assert!(pings >= 2, "{pings} pings");
    ws.get_ref().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    ws.send(Message::Text("alive".into())).unwrap();
    assert_eq!(read_data(&mut ws), Message::Text("alive".into()));
}

#[test]
fn tungstenite_sees_going_away_on_sigterm() {
    let mut server = Server::echo_with(&["--shutdown-grace", "3"]);
    let mut ws = connect(&server);
    ws.send(Message::Text("hi".into())).unwrap();
    assert_eq!(read_data(&mut ws), Message::Text("hi".into()));
    server.signal("TERM");
    match ws.read() {
        Ok(Message::Close(Some(f))) => assert_eq!(f.code, CloseCode::Away),
        other => panic!("expected Close(1001), got {other:?}"),
    }
    match ws.read() {
        Err(Error::ConnectionClosed) => {}
        other => panic!("expected ConnectionClosed, got {other:?}"),
    }
    drop(ws);
    let status = server.wait_exit(Duration::from_secs(3)).expect("exit");
    assert_eq!(status.code(), Some(0));
}
