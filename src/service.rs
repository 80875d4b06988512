//! The contract between the event loop ([`crate::net`]) and the services that run on it.
//!
//! A service never sees a socket. It receives whole, validated WebSocket messages and answers
//! through an [`Outbox`], which queues bytes on connections. That keeps services testable with a
//! fake outbox and lets the loop own every buffer and deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

pub use crate::ws::close::CloseCode;
/// Defined in `ws::frame` (which must not depend on this module) and re-exported here.
pub use crate::ws::frame::SharedFrame;

/// Names one connection for its whole life. The loop builds it from a slab index plus a
/// generation counter, so an id is never reused even when the slab slot is.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ConnId(pub u64);

/// A complete WebSocket data message, already reassembled and (for text) UTF-8 validated.
#[derive(Debug, Clone, Copy)]
pub enum Message<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
}

/// What a service may do to connections. Implemented by the event loop; tests may fake it.
pub trait Outbox {
    /// Queues an already-encoded frame (see [`crate::ws::frame::encode_shared`]).
    /// Returns `false` if the connection is gone or closing; if the queue limit is exceeded the
    /// loop closes that connection with [`CloseCode::PolicyViolation`] and also returns `false`.
    fn send_frame(&mut self, conn: ConnId, frame: &SharedFrame) -> bool;
    /// Queues the same already-encoded frame on each of `conns` (a broadcast) and returns how
    /// many took it; each is as [`Outbox::send_frame`]. The loop does it in one lean pass.
    fn send_frame_to_all(&mut self, conns: &[ConnId], frame: &SharedFrame) -> usize {
        conns.iter().filter(|&&c| self.send_frame(c, frame)).count()
    }
    /// Encodes `text` as one text frame and queues it.
    fn send_text(&mut self, conn: ConnId, text: &str) -> bool;
    /// Encodes `data` as one binary frame for this connection alone and queues it. Like
    /// [`Outbox::send_text`], the bytes count against the loop's `--memory-budget` (a shared
    /// frame from [`Outbox::send_frame`] does not). The default wraps it in a shared frame.
    fn send_binary(&mut self, conn: ConnId, data: &[u8]) -> bool {
        let frame = crate::ws::frame::encode_shared(crate::ws::frame::OpCode::Binary, data);
        self.send_frame(conn, &frame)
    }
    /// Starts the close handshake with `code` and a UTF-8 `reason` (≤ 123 bytes).
    fn close(&mut self, conn: ConnId, code: CloseCode, reason: &str);
    /// The peer address of a live connection.
    fn peer_addr(&self, conn: ConnId) -> Option<SocketAddr>;
    /// The loop's notion of now (taken once per loop turn).
    fn now(&self) -> Instant;
}

/// A WebSocket endpoint's behaviour. All methods run on the event loop thread and must not
/// block: slow work (disk, password hashing) goes to worker threads, whose results come back
/// through the [`mio::Waker`] given to [`Service::init`] and are collected in [`Service::on_wake`].
pub trait Service {
    /// Called once before the loop starts.
    fn init(&mut self, _waker: Arc<mio::Waker>) {}
    /// A WebSocket connection finished its handshake on this service's path.
    fn on_open(&mut self, _out: &mut dyn Outbox, _conn: ConnId, _peer: SocketAddr) {}
    /// A complete message arrived.
    fn on_message(&mut self, out: &mut dyn Outbox, conn: ConnId, msg: Message<'_>);
    /// The connection is gone (closed by either side, timed out, or dropped); it must not be
    /// sent to again. Called exactly once per opened connection.
    fn on_close(&mut self, _out: &mut dyn Outbox, _conn: ConnId) {}
    /// The waker fired: collect results from worker threads.
    fn on_wake(&mut self, _out: &mut dyn Outbox) {}
    /// The loop finished a turn (input read, before and after its writes are flushed): hand
    /// work gathered during the turn to worker threads in one go, so a burst of messages costs
    /// one wake-up of a worker instead of one per message.
    fn on_turn_end(&mut self) {}
    /// Called about once a second, for housekeeping that is due by time rather than by input.
    fn on_tick(&mut self, _out: &mut dyn Outbox) {}
    /// Appends Prometheus text for `/metrics`.
    fn metrics(&self, _out: &mut String) {}
    /// For `/healthz`: `Err` with a reason when the service cannot do its work (its store is
    /// unreachable); the endpoint then answers 503 with the reason.
    fn health(&self, _now: Instant) -> Result<(), String> {
        Ok(())
    }
    /// The server is stopping: finish durable work (flush the store) before returning.
    fn shutdown(&mut self) {}
}
