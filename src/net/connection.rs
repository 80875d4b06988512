//! One TCP connection's state: where it is in its life, its buffers and its deadlines.

use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;

use super::outbound::OutQueue;
use super::tls::Tls;
use crate::ws::reader::MessageReader;

/// Where a connection is in its life. Transitions only move down this list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the HTTP request head.
    Http,
    /// A WebSocket in use.
    Open,
    /// We sent a close frame (shutdown, slow consumer, idle, app request) and wait for the
    /// peer's; data frames that still arrive are read and dropped.
    CloseSent,
    /// Our last bytes (an HTTP response, a close reply, or a close after a protocol error) are
    /// queued; once flushed we half-close and wait briefly for the peer's EOF, so the peer reads
    /// our reply instead of a reset.
    Finishing,
    /// Flushed and half-closed; input is discarded until EOF or the deadline.
    Lingering,
    /// To be removed at the end of this loop turn.
    Dead,
}

#[derive(Debug)]
pub struct Connection {
    pub socket: TcpStream,
    /// The mio token (slab index and generation), also the [`crate::service::ConnId`].
    pub token: usize,
    /// The client's address: the TCP peer, or for a `--trusted-proxy` peer the address its
    /// forwarding headers name (set once the request head is parsed). Services and logs see this.
    pub peer: SocketAddr,
    /// The TCP peer is a trusted proxy whose request head has not been read yet: the client
    /// address (and its per-address count) is still to be resolved.
    pub via_proxy: bool,
    /// Counted under `peer`'s address for `--max-connections-per-ip` (which is always the
    /// address a connection is counted under: a proxied one is counted once `peer` is the
    /// client's).
    pub counted: bool,
    /// Admitted into the loopback reserve past a connection limit: only `/healthz` and
    /// `/metrics` are served; anything else gets this status.
    pub reserve: Option<u16>,
    /// Accepted on `--metrics-listen`: only `/metrics` and `/healthz`, readable by anyone.
    pub monitor: bool,
    /// Bytes of the reader's assembly buffer and of unshared queued frames that this connection
    /// is charged in the loop's `--memory-budget` count.
    pub charged_in: usize,
    pub charged_out: usize,
    /// Last write that made progress, or when output started waiting (`--write-timeout`).
    pub write_progress: Instant,
    /// Listed in the loop's backlog (connections waiting for WRITABLE), checked for stalls.
    pub in_backlog: bool,
    pub phase: Phase,
    /// Index of the endpoint (service) this WebSocket belongs to.
    pub endpoint: u16,
    /// Unconsumed input. Empty (no allocation) almost always: the reader consumes payloads as
    /// they arrive, so this holds at most a partial request head, frame header or control frame.
    pub rbuf: Vec<u8>,
    /// TLS state on a `--tls-cert` listener: bytes on the socket are records, and everything
    /// above sees only their plaintext.
    pub tls: Option<Box<Tls>>,
    /// The frame reader, while a frame or fragmented message is incomplete; `None` between
    /// whole messages (see `Server::on_frames`), which is where an idle connection is.
    pub reader: Option<Box<MessageReader>>,
    pub out: OutQueue,
    /// The latest unanswered ping's payload, sent at the next frame boundary. A ping flood
    /// replaces it instead of growing the queue.
    pub pending_pong: Option<Box<[u8]>>,
    pub last_rx: Instant,
    /// When we pinged and are still waiting for any sign of life.
    pub ping_sent: Option<Instant>,
    /// The deadline this connection currently wants from the timer heap.
    pub deadline: Instant,
    pub writable_registered: bool,
    /// Queued output since the last flush: the connection is in the loop's flush list.
    pub dirty: bool,
    /// The peer closed its sending side (read returned 0).
    pub eof: bool,
    /// Read budget ran out with data possibly left in the socket: in the loop's ready list.
    pub needs_read: bool,
    /// epoll reported the peer's FIN or a socket error: read until EOF/error, not just until
    /// a short read (that event will not be reported again).
    pub hangup_seen: bool,
}

impl Connection {
    pub fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }

    /// Bytes this connection holds in user space (for memory accounting and tests).
    pub fn buffered(&self) -> usize {
        self.rbuf.capacity() + self.reader.as_ref().map_or(0, |r| r.buffered()) + self.out.bytes()
    }
}

#[cfg(test)]
mod tests {
    /// Every idle connection is one of these in the loop's slab, which is most of what an idle
    /// connection costs in memory (docs/BENCHMARKS.md, idle memory; target ≤ 0.30 KiB in all).
    /// Growing it is a decision, not an accident.
    #[test]
    fn connection_stays_small() {
        let size = std::mem::size_of::<super::Connection>();
        eprintln!("Connection is {size} bytes");
        // mio's `TcpStream` carries an 8-byte selector id in debug builds (it checks that a
        // socket is not registered with two polls), so the bound is the release size plus that.
        let bound = if cfg!(debug_assertions) { 272 } else { 264 };
        assert!(size <= bound, "Connection is {size} bytes");
    }
}
