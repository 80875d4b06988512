//! The event loop: one thread, one `mio::Poll`, every connection.
//!
//! Each turn: poll (with a timeout up to the next deadline), handle listener/waker/signal and
//! connection events, give connections that ran out of read budget another turn, fire due
//! timers, then flush every connection that got output this turn with one vectored write each.
//! Services run inside these steps with the loop lent to them as their [`Outbox`]; they never
//! touch sockets.

use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, Read, Write};
use std::mem;
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use super::connection::{Connection, Phase};
use super::metrics::Metrics;
use super::outbound::{Chunk, Cork, OutQueue, TurnFrames, CORK_BYTES, MAX_IOVECS};
use super::timers::Timers;
use super::tls::{self, Tls, TlsError};
use crate::config::Config;
use crate::http::{self, HeadLimits, Parsed, Response, StaticFiles};
use crate::service::{ConnId, Message, Outbox, Service, SharedFrame};
use crate::ws::close::{self, CloseCode};
use crate::ws::frame::{self, OpCode, Role};
use crate::ws::reader::{Event, MessageReader, ReadLimits};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const SIGNALS: Token = Token(2);
const METRICS_LISTENER: Token = Token(3);
/// Connection tokens are `generation << 32 | (slab index + FIRST_CONN)`.
const FIRST_CONN: usize = 4;
/// Size of the loop-wide read buffer every socket reads into first.
const SCRATCH: usize = 64 * 1024;
/// How long accepting pauses after the process ran out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Most connections the slab and timer heap are sized for at start (see `Server::bind`).
const PRESIZE_MAX: usize = 1 << 18;
/// Largest static site we cache in memory.
const MAX_STATIC_BYTES: usize = 64 * 1024 * 1024;

/// A WebSocket path and the service behind it.
pub struct Endpoint {
    pub path: String,
    /// Largest message this endpoint accepts (bigger closes with 1009).
    pub max_message: usize,
    pub service: Box<dyn Service>,
}

pub struct Server {
    poll: Poll,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    waker: Arc<Waker>,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    config: Config,
    endpoints: Vec<Endpoint>,
    static_files: StaticFiles,
    conns: Slab<Connection>,
    generation: u32,
    scratch: Vec<u8>,
    timers: Timers,
    /// Connections whose read budget ran out while data may remain.
    ready: VecDeque<usize>,
    /// Connections with output queued this turn.
    dirty: Vec<usize>,
    /// Slab indices to remove at the end of the turn.
    dead: Vec<usize>,
    /// Services to tell that a connection stopped being open: (endpoint, conn).
    closed: Vec<(usize, ConnId)>,
    metrics: Metrics,
    accept_paused_until: Option<Instant>,
    shutdown_deadline: Option<Instant>,
    now: Instant,
    /// Open connections per client address (`--max-connections-per-ip`); no zero entries.
    per_ip: HashMap<IpAddr, u32>,
    /// Connections admitted into the loopback reserve.
    reserve_open: usize,
    /// Bytes charged to all connections together (`--memory-budget`).
    mem_used: usize,
    /// Connections with output waiting for WRITABLE, (slab index, token): checked for write
    /// stalls once a second, so the check costs nothing for connections that keep up.
    backlog: Vec<(usize, usize)>,
    /// `--tls-cert`/`--tls-key`: every connection on the main listener speaks TLS. Replaced
    /// on SIGHUP; connections keep the configuration they started with.
    tls: Option<Arc<rustls::ServerConfig>>,
    /// A SIGHUP reload in progress on its own thread (file reads are disk I/O).
    tls_reload: Option<mpsc::Receiver<Result<Arc<rustls::ServerConfig>, TlsError>>>,
    /// Decrypted input of one read, before the HTTP/WebSocket layers see it.
    plain: Vec<u8>,
    /// One record's worth of frames gathered for encryption (see [`tls`]).
    cork: Vec<u8>,
    /// Small frames gathered for one plain `write` ([`OutQueue::write_corked`]), lent to each
    /// connection in turn; up to [`CORK_BYTES`]. Released at the end of every turn.
    write_cork: Cork,
    /// This turn's broadcast frames, which recipients' queues hold ranges of; retired at the
    /// end of every turn.
    turn: TurnFrames,
    /// [`OutQueue::retire_turn`]'s copies of unwritten ranges, kept for its allocation.
    turn_copies: Vec<(u32, u32, SharedFrame)>,
    /// `--metrics-listen`: only /metrics and /healthz, to anyone who reaches it.
    metrics_listener: Option<TcpListener>,
    /// Connections open on the metrics listener.
    metrics_open: usize,
}

/// `--memory-budget`'s rule: the loop-wide total `used` may go from charging `old` to `new`
/// bytes for one connection if that does not grow it past `budget` (shrinking always may).
#[inline]
fn within_budget(used: usize, budget: usize, old: usize, new: usize) -> bool {
    new <= old || used - old + new <= budget
}

fn index_of(token: usize) -> Option<usize> {
    (token & 0xffff_ffff).checked_sub(FIRST_CONN)
}

impl Server {
    /// Binds the listener and prepares the loop; nothing is served until [`Server::run`].
    pub fn bind(config: Config, endpoints: Vec<Endpoint>) -> io::Result<Server> {
        let poll = Poll::new()?;
        let mut listener = TcpListener::bind(config.listen)?;
        let local_addr = listener.local_addr()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let metrics_listener = match config.metrics_listen {
            Some(addr) => {
                let mut l = TcpListener::bind(addr)?;
                poll.registry()
                    .register(&mut l, METRICS_LISTENER, Interest::READABLE)?;
                Some(l)
            }
            None => None,
        };
        // The client built into the binary, unless --www serves one from disk (for working on
        // the client without rebuilding).
        let static_files = match &config.www {
            Some(dir) => StaticFiles::load(dir, MAX_STATIC_BYTES)?,
            None => StaticFiles::from_memory(crate::embedded::EMBEDDED_WWW),
        };
        for ep in &endpoints {
            if ep.max_message > config.memory_budget {
                log::warn!(
                    "--memory-budget {} is below the largest message on {} ({} bytes): such \
                     messages will be refused with 1013",
                    config.memory_budget,
                    ep.path,
                    ep.max_message
                );
            }
        }
        // Sized for the connection limits up front. Only address space: pages are touched as
        // connections arrive. Growing by doubling instead copies the slab each time and, once
        // it is in the malloc heap, leaves the old copies resident (≈ 0.1 KiB per connection
        // of idle memory with 10,000 connections).
        let presize =
            (config.max_connections + config.loopback_reserve + config.metrics_max_connections)
                .min(PRESIZE_MAX);
        Ok(Server {
            poll,
            listener: Some(listener),
            local_addr,
            waker,
            signals: None,
            config,
            endpoints,
            static_files,
            conns: Slab::with_capacity(presize),
            generation: 0,
            scratch: vec![0; SCRATCH],
            // A connection has at most two entries for long: its handshake deadline, stale
            // once it is open, and its keepalive deadline.
            timers: Timers::with_capacity(2 * presize),
            ready: VecDeque::new(),
            dirty: Vec::new(),
            dead: Vec::new(),
            closed: Vec::new(),
            metrics: Metrics::default(),
            accept_paused_until: None,
            shutdown_deadline: None,
            now: Instant::now(),
            per_ip: HashMap::new(),
            reserve_open: 0,
            mem_used: 0,
            backlog: Vec::new(),
            tls: None,
            tls_reload: None,
            plain: Vec::new(),
            cork: Vec::new(),
            write_cork: Cork::with_capacity(CORK_BYTES),
            turn: TurnFrames::default(),
            turn_copies: Vec::new(),
            metrics_listener,
            metrics_open: 0,
        })
    }

    /// Serves TLS on the main listener with `config` (see [`tls::load`]).
    pub fn set_tls(&mut self, config: Arc<rustls::ServerConfig>) {
        self.tls = Some(config);
    }

    /// The address `--metrics-listen` is bound to, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops gracefully on SIGINT/SIGTERM (close 1001 to everyone, flush, exit).
    pub fn handle_signals(&mut self) -> io::Result<()> {
        let mut signals = signal_hook_mio::v1_0::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ])?;
        self.poll
            .registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        self.signals = Some(signals);
        Ok(())
    }

    /// Runs until shut down by a signal. Returns after services have flushed their state.
    pub fn run(mut self) -> io::Result<()> {
        for ep in &mut self.endpoints {
            ep.service.init(self.waker.clone());
        }
        let mut events = Events::with_capacity(1024);
        let mut next_tick = Instant::now() + Duration::from_secs(1);
        loop {
            self.now = Instant::now();
            // Output queued after the end of the last turn's flush (see `end_turn`) must not
            // wait for an unrelated wake-up: poll without blocking while any is dirty.
            let timeout = if !self.ready.is_empty() || !self.dirty.is_empty() {
                Duration::ZERO
            } else {
                let mut until = next_tick;
                if let Some(t) = self.timers.next_deadline() {
                    until = until.min(t);
                }
                if let Some(t) = self.accept_paused_until {
                    until = until.min(t);
                }
                if let Some(t) = self.shutdown_deadline {
                    until = until.min(t);
                }
                until.saturating_duration_since(self.now)
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            self.now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    METRICS_LISTENER => self.accept_monitoring(),
                    WAKER => {
                        self.finish_tls_reload();
                        self.wake_services();
                    }
                    SIGNALS => self.on_signal(),
                    Token(t) => self.on_conn_event(
                        t,
                        event.is_readable() || event.is_read_closed() || event.is_error(),
                        event.is_read_closed() || event.is_error(),
                        event.is_writable(),
                    ),
                }
            }
            // Connections that used their read budget get another turn, after everyone else.
            for _ in 0..self.ready.len() {
                let Some(idx) = self.ready.pop_front() else {
                    break;
                };
                if let Some(c) = self.conns.get_mut(idx) {
                    c.needs_read = false;
                    self.read_conn(idx);
                }
            }
            if let Some(t) = self.accept_paused_until {
                if self.now >= t {
                    self.accept_paused_until = None;
                    self.accept_all();
                }
            }
            self.fire_timers();
            if self.now >= next_tick {
                next_tick = self.now + Duration::from_secs(1);
                self.check_write_stalls();
                self.tick_services();
            }
            self.end_turn();
            if let Some(deadline) = self.shutdown_deadline {
                if self.conns.is_empty() || self.now >= deadline {
                    break;
                }
            }
        }
        log::info!("stopping: {} connections left", self.conns.len());
        for ep in &mut self.endpoints {
            ep.service.shutdown();
        }
        Ok(())
    }

    // ----- accepting -----

    fn accept_all(&mut self) {
        if self.accept_paused_until.is_some() || self.listener.is_none() {
            return;
        }
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((socket, peer)) => self.admit(socket, peer, false),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e)
                    if e.kind() == ErrorKind::Interrupted
                        || e.kind() == ErrorKind::ConnectionAborted =>
                {
                    continue
                }
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: the pending connection stays in the backlog and the
                    // listener will not signal again for it, so retry after a pause instead of
                    // spinning on an error that repeats until some descriptor is closed.
                    self.metrics.accept_errors += 1;
                    log::warn!("accept failed: {e}; pausing accepts for {ACCEPT_BACKOFF:?}");
                    self.accept_paused_until = Some(self.now + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    /// Accepts on `--metrics-listen`. Its connections are served /metrics and /healthz only,
    /// are plain HTTP, and count against `--metrics-max-connections`, not the chat's limits.
    fn accept_monitoring(&mut self) {
        loop {
            let Some(listener) = &self.metrics_listener else {
                return;
            };
            match listener.accept() {
                Ok((socket, peer)) => {
                    if self.metrics_open >= self.config.metrics_max_connections {
                        log::info!(
                            "{peer}: refusing metrics connection, at --metrics-max-connections"
                        );
                        continue;
                    }
                    self.admit(socket, peer, true);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors: the main listener's backoff covers both.
                    log::warn!("metrics accept failed: {e}");
                    self.accept_paused_until = Some(self.now + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    /// Takes a new connection in: from the main listener, or with `monitor` from
    /// `--metrics-listen`.
    fn admit(&mut self, mut socket: TcpStream, peer: SocketAddr, monitor: bool) {
        self.metrics.accepted += 1;
        let ip = peer.ip().to_canonical();
        let peer = SocketAddr::new(ip, peer.port());
        // A trusted proxy is counted by the client address its request head names, later.
        let via_proxy = !monitor && http::is_trusted(&self.config.trusted_proxy, ip);
        let chat_conns = self.conns.len() - self.reserve_open - self.metrics_open;
        let full = !monitor && chat_conns >= self.config.max_connections;
        let ip_full = !monitor && !via_proxy && self.per_ip_full(ip);
        let mut reserve = None;
        if full || ip_full {
            let status = if full { 503 } else { 429 };
            if ip.is_loopback() && self.reserve_open < self.config.loopback_reserve {
                // Local monitoring must still reach /healthz and /metrics; anything else this
                // connection asks for gets the refusal once its head is read.
                reserve = Some(status);
                self.reserve_open += 1;
            } else {
                self.refuse_at_accept(&mut socket, peer, status);
                return;
            }
        }
        let counted_ip = if monitor || via_proxy || reserve.is_some() {
            None
        } else {
            self.count_ip(ip);
            Some(ip)
        };
        if monitor {
            self.metrics_open += 1;
        }
        let tls = match (&self.tls, monitor) {
            (Some(config), false) => match Tls::new(config.clone()) {
                Ok(t) => Some(t),
                Err(e) => {
                    log::warn!("{peer}: TLS session refused: {e}");
                    self.release_slot(counted_ip, reserve.is_some(), monitor);
                    return;
                }
            },
            _ => None,
        };
        let _ = socket.set_nodelay(true);
        self.generation = self.generation.wrapping_add(1);
        let entry = self.conns.vacant_entry();
        let idx = entry.key();
        let token = ((self.generation as usize) << 32) | (idx + FIRST_CONN);
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut socket, Token(token), Interest::READABLE)
        {
            log::warn!("{peer}: register failed: {e}");
            self.release_slot(counted_ip, reserve.is_some(), monitor);
            return;
        }
        let deadline = self.now + self.config.handshake_timeout;
        entry.insert(Connection {
            socket,
            token,
            peer,
            via_proxy,
            counted: counted_ip.is_some(),
            reserve,
            monitor,
            charged_in: 0,
            charged_out: 0,
            write_progress: self.now,
            in_backlog: false,
            phase: Phase::Http,
            endpoint: 0,
            rbuf: Vec::new(),
            tls,
            reader: None,
            out: Default::default(),
            pending_pong: None,
            last_rx: self.now,
            ping_sent: None,
            deadline,
            writable_registered: false,
            dirty: false,
            eof: false,
            needs_read: false,
            hangup_seen: false,
        });
        self.timers.push(deadline, token);
        log::debug!("{peer}: connected");
        // Data may already be waiting (edge-triggered: no event would tell us).
        self.read_conn(idx);
    }

    /// Answers `status` (503 at --max-connections, 429 at --max-connections-per-ip) on a fresh
    /// socket and drops it.
    fn refuse_at_accept(&mut self, socket: &mut TcpStream, peer: SocketAddr, status: u16) {
        let text = self.count_refusal(peer, status);
        if self.tls.is_some() {
            // A TLS client cannot read a plain-text answer before its handshake: just close.
            return;
        }
        // Best effort on a fresh socket: its send buffer is empty, so this does not block.
        let _ = socket.write(&Response::text(status, text).to_bytes());
    }

    /// Counts and logs a refusal for a connection limit; returns the response text.
    fn count_refusal(&mut self, peer: SocketAddr, status: u16) -> &'static str {
        if status == 503 {
            self.metrics.rejected_max_connections += 1;
            log::info!(
                "{peer}: refusing connection, at --max-connections {}",
                self.config.max_connections
            );
            "server at connection limit"
        } else {
            self.metrics.rejected_per_ip += 1;
            log::info!(
                "{peer}: refusing connection, address at --max-connections-per-ip {}",
                self.config.max_connections_per_ip
            );
            "too many connections from your address"
        }
    }

    fn per_ip_full(&self, ip: IpAddr) -> bool {
        let limit = self.config.max_connections_per_ip;
        limit > 0 && self.per_ip.get(&ip).is_some_and(|&n| n as usize >= limit)
    }

    fn count_ip(&mut self, ip: IpAddr) {
        *self.per_ip.entry(ip).or_default() += 1;
    }

    /// A connection's slot is free again: its per-address count, its place in the loopback
    /// reserve, or on the metrics listener.
    fn release_slot(&mut self, counted_ip: Option<IpAddr>, in_reserve: bool, monitor: bool) {
        if let Some(ip) = counted_ip {
            self.uncount_ip(ip);
        }
        if in_reserve {
            self.reserve_open -= 1;
        }
        if monitor {
            self.metrics_open -= 1;
        }
    }

    fn uncount_ip(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    // ----- events -----

    fn on_conn_event(&mut self, token: usize, readable: bool, hangup: bool, writable: bool) {
        let Some(idx) = index_of(token) else { return };
        // A stale event for a connection that was removed (and whose slot may be reused) is
        // recognised by the generation in the token and ignored.
        match self.conns.get(idx) {
            Some(c) if c.token == token => {}
            _ => return,
        }
        if hangup {
            self.conns[idx].hangup_seen = true;
        }
        if writable {
            self.flush(idx);
        }
        if readable && !self.conns[idx].needs_read {
            self.read_conn(idx);
        }
    }

    fn read_conn(&mut self, idx: usize) {
        let mut scratch = mem::take(&mut self.scratch);
        let mut budget = self.config.read_budget.max(1);
        while let Some(conn) = self.conns.get_mut(idx) {
            if conn.phase == Phase::Dead {
                break;
            }
            if budget == 0 {
                conn.needs_read = true;
                self.ready.push_back(idx);
                break;
            }
            let want = scratch.len().min(budget);
            match conn.socket.read(&mut scratch[..want]) {
                Ok(0) => {
                    self.on_eof(idx);
                    break;
                }
                Ok(n) => {
                    budget -= n;
                    self.metrics.bytes_in += n as u64;
                    conn.last_rx = self.now;
                    conn.ping_sent = None;
                    // A short read drained the socket (epoll(7), Q9): new data will raise a
                    // new edge, so the read that would only say WouldBlock is skipped (it was
                    // a third of all syscalls in the echo benchmark). A seen FIN is the
                    // exception: its edge is spent, so read on to the 0.
                    let drained = n < want && !conn.hangup_seen;
                    if conn.tls.is_some() {
                        self.on_tls_input(idx, &scratch[..n]);
                    } else {
                        self.on_input(idx, &mut scratch[..n]);
                    }
                    if drained {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("{}: read error: {e}", conn.peer);
                    self.kill(idx);
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    fn on_eof(&mut self, idx: usize) {
        let conn = &mut self.conns[idx];
        log::debug!("{}: peer closed ({:?})", conn.peer, conn.phase);
        conn.eof = true;
        match conn.phase {
            // A half-closed peer may still read: what we owe it (an HTTP response, a close
            // reply, echoes of what it sent) is flushed before the connection goes.
            Phase::Finishing => self.mark_dirty(idx),
            // An open WebSocket ending without a close frame is an abnormal closure (1006):
            // the service hears of it now; queued output still gets its chance.
            Phase::Open | Phase::CloseSent if !conn.out.is_empty() => {
                self.leave_open(idx, Phase::Finishing)
            }
            _ => self.kill(idx),
        }
    }

    /// Decrypts freshly read records and feeds their plaintext on, as if it had been read from
    /// a plain socket.
    fn on_tls_input(&mut self, idx: usize, wire: &[u8]) {
        let conn = &mut self.conns[idx];
        if !matches!(conn.phase, Phase::Http | Phase::Open | Phase::CloseSent) {
            return; // nothing more is read from a finishing connection
        }
        let Some(tls) = conn.tls.as_mut() else { return };
        if tls.is_plain_http(wire) {
            // Someone typed http:// for an https:// server: tell them in words they can read.
            self.metrics.tls_plain_http += 1;
            log::info!("{}: plain HTTP on the TLS port", conn.peer);
            conn.tls = None;
            self.reply_and_finish(
                idx,
                Response::text(400, "this server speaks HTTPS: use https:// (or wss://)"),
            );
            return;
        }
        let mut plain = mem::take(&mut self.plain);
        plain.clear();
        let result = tls.feed(wire, &mut plain);
        let wants_write = tls.wants_write();
        match result {
            Ok(fed) => {
                if fed.handshake_done {
                    self.metrics.tls_handshakes += 1;
                }
                if wants_write {
                    self.mark_dirty(idx);
                }
                if !plain.is_empty() {
                    self.on_input(idx, &mut plain);
                }
                if fed.peer_closed && self.conns[idx].phase != Phase::Dead {
                    self.on_eof(idx);
                }
            }
            Err(e) => {
                self.metrics.tls_failures += 1;
                let conn = &mut self.conns[idx];
                log::info!("{}: TLS error: {e}", conn.peer);
                // The alert rustls queued, best effort; the connection cannot continue.
                if let Some(tls) = conn.tls.as_mut() {
                    tls.write_alert(&mut conn.socket);
                }
                self.kill(idx);
            }
        }
        // Keep the buffer for the next read, unless one huge burst made it big.
        if plain.capacity() <= 2 * SCRATCH {
            self.plain = plain;
        }
    }

    /// Feeds freshly read bytes to the connection's current phase.
    fn on_input(&mut self, idx: usize, fresh: &mut [u8]) {
        let conn = &mut self.conns[idx];
        match conn.phase {
            Phase::Http => {
                conn.rbuf.extend_from_slice(fresh);
                self.on_http_input(idx);
            }
            Phase::Open | Phase::CloseSent => {
                // Common case: nothing held over, so parse straight out of the loop's scratch
                // buffer; otherwise the held bytes (at most a frame header or a control frame)
                // go first.
                let mut held = mem::take(&mut conn.rbuf);
                let data: &mut [u8] = if held.is_empty() {
                    fresh
                } else {
                    held.extend_from_slice(fresh);
                    &mut held
                };
                let used = self.on_frames(idx, data);
                let conn = &mut self.conns[idx];
                if matches!(conn.phase, Phase::Open | Phase::CloseSent) {
                    conn.rbuf.extend_from_slice(&data[used..]);
                }
                if !self.recharge_in(idx) {
                    self.fail_over_budget(idx);
                }
            }
            // Nothing more is read from a connection that is finishing.
            Phase::Finishing | Phase::Lingering | Phase::Dead => {}
        }
    }

    // ----- HTTP -----

    fn on_http_input(&mut self, idx: usize) {
        let limits = HeadLimits {
            max_head: self.config.max_request_head,
            max_headers: self.config.max_headers,
        };
        let conn = &mut self.conns[idx];
        let (head_len, request) = match http::parse_request(&conn.rbuf, &limits) {
            Parsed::Partial => return,
            Parsed::Reject(resp) => {
                log::info!("{}: bad request: {}", conn.peer, resp.status);
                self.metrics.handshake_failures += 1;
                self.reply_and_finish(idx, resp);
                return;
            }
            Parsed::Complete { head_len, request } => (head_len, request),
        };
        let monitoring = matches!(request.method.as_str(), "GET" | "HEAD")
            && matches!(request.path.as_str(), "/healthz" | "/metrics")
            && !http::is_upgrade(&request);
        if conn.monitor {
            if !monitoring {
                let resp = Response::text(404, "this address serves /metrics and /healthz only");
                self.reply_and_finish(idx, resp);
                return;
            }
        } else if let Some(status) = conn.reserve {
            if !monitoring {
                let peer = conn.peer;
                let text = self.count_refusal(peer, status);
                self.reply_and_finish(idx, Response::text(status, text));
                return;
            }
        } else if conn.via_proxy {
            // The peer is a trusted proxy: the client is who its headers say, and that address
            // is what the per-address limit counts, services see and logs show.
            conn.via_proxy = false;
            let client = http::client_addr(conn.peer, &self.config.trusted_proxy, &request.headers);
            if client != conn.peer {
                log::debug!("{}: forwarded for {client}", conn.peer);
                conn.peer = client;
            }
            let ip = client.ip();
            if self.per_ip_full(ip) {
                let text = self.count_refusal(client, 429);
                self.reply_and_finish(idx, Response::text(429, text));
                return;
            }
            self.count_ip(ip);
            self.conns[idx].counted = true;
        }
        if !http::is_upgrade(&request) {
            self.metrics.http_requests += 1;
            let (client, monitor) = (self.conns[idx].peer.ip(), self.conns[idx].monitor);
            let resp = self.http_response(&request, client, monitor);
            log::debug!(
                "{}: {} {} -> {}",
                self.conns[idx].peer,
                request.method,
                request.path,
                resp.status
            );
            self.reply_and_finish(idx, resp);
            return;
        }
        let Some(endpoint) = self.endpoints.iter().position(|e| e.path == request.path) else {
            self.metrics.handshake_failures += 1;
            self.reply_and_finish(
                idx,
                Response::text(404, "no WebSocket endpoint at this path"),
            );
            return;
        };
        let accept = match http::check_upgrade(&request, &self.config.allowed_origin) {
            Ok(a) => a,
            Err(resp) => {
                log::info!("{}: upgrade refused: {}", self.conns[idx].peer, resp.status);
                self.metrics.handshake_failures += 1;
                self.reply_and_finish(idx, resp);
                return;
            }
        };
        self.metrics.handshakes += 1;
        let conn = &mut self.conns[idx];
        conn.out
            .push_pinned(Chunk::Owned(http::switching_protocols(&accept)));
        conn.phase = Phase::Open;
        conn.endpoint = u16::try_from(endpoint).expect("fewer than 65,536 endpoints");
        // The frame reader, with this endpoint's limits, is made when frames arrive (see
        // `on_frames`).
        conn.reader = None;
        let rest = conn.rbuf.split_off(head_len);
        conn.rbuf = Vec::new();
        let token = conn.token;
        let peer = conn.peer;
        // Keepalive from now on. A handshake deadline that comes first stays armed instead of
        // adding a second timer entry (24 bytes per connection): when it fires on an open
        // connection, `check_idle` re-arms from the last input.
        let idle_at = self.now + self.config.ping_interval;
        if conn.deadline > idle_at {
            self.set_deadline(idx, idle_at);
        }
        self.mark_dirty(idx);
        log::debug!(
            "{peer}: WebSocket open on {}",
            self.endpoints[endpoint].path
        );
        self.with_service(endpoint, |svc, out| {
            svc.on_open(out, ConnId(token as u64), peer)
        });
        if !rest.is_empty() {
            // Frames that arrived in the same read as the request head go through the same path
            // as every later read.
            let mut rest = rest;
            self.on_input(idx, &mut rest);
        }
    }

    /// Whether `client` may read `/metrics`: anyone on `--metrics-listen` (`monitor`), a
    /// direct connection from loopback (a request that carries forwarding headers came through
    /// a proxy, so it is not local whatever the TCP peer), or an address in `--metrics-allow`.
    fn may_read_metrics(&self, req: &http::Request, client: IpAddr, monitor: bool) -> bool {
        if monitor {
            return true;
        }
        let proxied = req
            .headers
            .iter()
            .any(|(name, _)| name == "x-forwarded-for" || name == "forwarded");
        (client.is_loopback() && !proxied) || http::is_trusted(&self.config.metrics_allow, client)
    }

    fn http_response(&self, req: &http::Request, client: IpAddr, monitor: bool) -> Response {
        let mut r = match (req.method.as_str(), req.path.as_str()) {
            ("GET" | "HEAD", "/metrics") if !self.may_read_metrics(req, client, monitor) => {
                Response::text(
                    403,
                    "metrics are served to loopback and to --metrics-allow addresses only",
                )
            }
            ("GET" | "HEAD", "/api/server") => {
                // What the browser client needs to know before signing in.
                let body = format!(
                    "{{\"registration\":\"{}\"}}",
                    self.config.chat.registration.as_str()
                );
                let mut r = Response::new(200)
                    .header("Content-Type", "application/json")
                    .header("Cache-Control", "no-store");
                r.body = body.into_bytes();
                r
            }
            ("GET" | "HEAD", "/healthz") => {
                // 503 with the reasons while a service cannot work (its store is failing), so
                // a load balancer sends people elsewhere.
                let trouble: Vec<String> = self
                    .endpoints
                    .iter()
                    .filter_map(|ep| ep.service.health(self.now).err())
                    .collect();
                if trouble.is_empty() {
                    Response::text(200, "ok")
                } else {
                    Response::text(503, &trouble.join("; "))
                }
            }
            ("GET" | "HEAD", "/metrics") => {
                let mut body = String::new();
                let websockets = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.phase == Phase::Open)
                    .count();
                self.metrics
                    .render(self.conns.len(), websockets, self.mem_used, &mut body);
                for ep in &self.endpoints {
                    ep.service.metrics(&mut body);
                }
                let mut r = Response::new(200)
                    .header("Content-Type", "text/plain; version=0.0.4; charset=utf-8");
                r.body = body.into_bytes();
                r
            }
            // Static files answer HEAD themselves (error responses included).
            _ => return self.static_files.respond(req),
        };
        r.head_only = req.method == "HEAD";
        r
    }

    fn reply_and_finish(&mut self, idx: usize, resp: Response) {
        let conn = &mut self.conns[idx];
        conn.rbuf = Vec::new();
        conn.out.push(Chunk::Owned(resp.to_bytes()));
        conn.phase = Phase::Finishing;
        self.set_deadline(idx, self.now + self.config.close_timeout);
        self.mark_dirty(idx);
    }

    // ----- WebSocket frames -----

    /// Runs the frame reader over `data`; returns the bytes consumed. Stops early when the
    /// connection leaves the Open/CloseSent phases.
    ///
    /// A connection keeps a reader only while a frame or a fragmented message is incomplete;
    /// between whole messages (almost always) it holds none and a fresh one is made here, so
    /// an idle connection does not carry the reader's ~100 bytes.
    fn on_frames(&mut self, idx: usize, data: &mut [u8]) -> usize {
        let conn = &mut self.conns[idx];
        let mut reader = match conn.reader.take() {
            Some(r) => *r,
            None => MessageReader::new(
                Role::Server,
                ReadLimits {
                    max_message: self.endpoints[usize::from(conn.endpoint)].max_message,
                    max_fragments: self.config.max_fragments,
                },
            ),
        };
        let mut pos = 0;
        // The endpoint's service is lent out once for all the messages of this read rather
        // than once per message; connections that close meanwhile are reported to it after.
        let endpoint = usize::from(self.conns[idx].endpoint);
        let mut service = mem::replace(&mut self.endpoints[endpoint].service, Box::new(Detached));
        loop {
            let phase = self.conns[idx].phase;
            if !matches!(phase, Phase::Open | Phase::CloseSent) {
                break;
            }
            match reader.next(&mut data[pos..]) {
                Ok((0, None)) => break,
                Ok((n, event)) => {
                    pos += n;
                    if let Some(event) = event {
                        self.on_event(idx, phase, event, service.as_mut());
                    }
                }
                Err(e) => {
                    let conn = &self.conns[idx];
                    if phase == Phase::Open {
                        log::info!(
                            "{}: protocol violation, closing with {}: {}",
                            conn.peer,
                            e.code,
                            e.reason
                        );
                        self.fail(idx, e.code, e.reason);
                    } else {
                        self.kill(idx);
                    }
                    break;
                }
            }
        }
        self.endpoints[endpoint].service = service;
        self.notify_closed();
        // The last message (if its bytes were assembled) has been handled: free them now.
        reader.release_delivered();
        let c = &mut self.conns[idx];
        if matches!(c.phase, Phase::Open | Phase::CloseSent) && !reader.is_idle() {
            c.reader = Some(Box::new(reader));
        }
        // Otherwise no more input is parsed: the reader (and a half-assembled message) goes.
        pos
    }

    fn on_event(&mut self, idx: usize, phase: Phase, event: Event<'_>, service: &mut dyn Service) {
        match event {
            Event::Text(_) | Event::Binary(_) if phase != Phase::Open => {}
            Event::Text(t) => self.deliver(idx, Message::Text(t), service),
            Event::Binary(b) => self.deliver(idx, Message::Binary(b), service),
            Event::Ping(payload) => self.on_ping(idx, payload),
            Event::Pong(_) => {} // any input already counts as liveness
            Event::Close(cf) => {
                let code = cf.code.map_or(CloseCode::NoStatusReceived, CloseCode::from);
                *self
                    .metrics
                    .closes_received
                    .entry(code.as_u16())
                    .or_default() += 1;
                let conn = &mut self.conns[idx];
                if phase == Phase::CloseSent {
                    // The peer answered our close: the handshake is complete.
                    conn.phase = Phase::Finishing;
                    self.mark_dirty(idx);
                    return;
                }
                log::debug!("{}: close {:?} {:?}", conn.peer, cf.code, cf.reason);
                // Echo the status code (none if the peer sent none), then close TCP.
                let payload = match cf.code {
                    Some(_) => close::close_payload(code, ""),
                    None => Vec::new(),
                };
                self.queue_close(idx, code, &payload, Phase::Finishing);
            }
        }
    }

    /// Hands a message to the connection's service (lent out by [`Server::on_frames`]).
    fn deliver(&mut self, idx: usize, msg: Message<'_>, service: &mut dyn Service) {
        self.metrics.messages_in += 1;
        let id = ConnId(self.conns[idx].token as u64);
        service.on_message(self, id, msg);
    }

    fn on_ping(&mut self, idx: usize, payload: &[u8]) {
        let conn = &mut self.conns[idx];
        if conn.out.is_empty() {
            // Answer right away while the socket keeps up: every ping gets its pong.
            conn.out
                .push(Chunk::Owned(frame::encode_vec(OpCode::Pong, payload)));
            self.flush(idx);
        } else {
            // Backlogged: keep only the latest ping's answer.
            conn.pending_pong = Some(payload.into());
            self.mark_dirty(idx);
        }
    }

    /// Fails the connection after a protocol violation: close frame with `code`, no more input.
    fn fail(&mut self, idx: usize, code: CloseCode, reason: &str) {
        // Replies already queued (e.g. the echo of a valid message that arrived in the same
        // read) still go out before the close.
        self.queue_close(
            idx,
            code,
            &close::close_payload(code, reason),
            Phase::Finishing,
        );
    }

    /// Starts a close handshake we initiate: close frame, then wait for the peer's close.
    fn initiate_close(&mut self, idx: usize, code: CloseCode, reason: &str) {
        if self.conns[idx].phase != Phase::Open {
            return;
        }
        self.queue_close(
            idx,
            code,
            &close::close_payload(code, reason),
            Phase::CloseSent,
        );
    }

    /// Queues a close frame with `payload` (counted under `code`, `NoStatusReceived` for an
    /// empty one) after whatever is already queued, and moves the connection to `next`.
    fn queue_close(&mut self, idx: usize, code: CloseCode, payload: &[u8], next: Phase) {
        self.conns[idx]
            .out
            .push(Chunk::Owned(frame::encode_vec(OpCode::Close, payload)));
        *self.metrics.closes_sent.entry(code.as_u16()).or_default() += 1;
        self.leave_open(idx, next);
    }

    /// Moves an open connection to a closing phase and tells its service it is gone.
    fn leave_open(&mut self, idx: usize, phase: Phase) {
        let conn = &mut self.conns[idx];
        let was_open = conn.phase == Phase::Open;
        conn.phase = phase;
        let token = conn.token;
        let endpoint = usize::from(conn.endpoint);
        self.set_deadline(idx, self.now + self.config.close_timeout);
        self.mark_dirty(idx);
        if was_open {
            self.closed.push((endpoint, ConnId(token as u64)));
        }
    }

    /// Drops the connection at the end of this turn (no close handshake possible).
    fn kill(&mut self, idx: usize) {
        let conn = &mut self.conns[idx];
        if conn.phase == Phase::Dead {
            return;
        }
        if conn.phase == Phase::Open {
            self.closed
                .push((usize::from(conn.endpoint), ConnId(conn.token as u64)));
        }
        conn.phase = Phase::Dead;
        self.dead.push(idx);
    }

    // ----- deadlines -----

    fn set_deadline(&mut self, idx: usize, at: Instant) {
        let conn = &mut self.conns[idx];
        conn.deadline = at;
        self.timers.push(at, conn.token);
    }

    fn fire_timers(&mut self) {
        while let Some((at, token)) = self.timers.pop_due(self.now) {
            let Some(idx) = index_of(token) else { continue };
            let conn = match self.conns.get_mut(idx) {
                Some(c) if c.token == token && c.deadline == at => c,
                _ => continue, // superseded or for a connection that is gone
            };
            match conn.phase {
                Phase::Http => {
                    self.metrics.handshake_timeouts += 1;
                    log::debug!("{}: handshake not finished in time", conn.peer);
                    self.kill(idx);
                }
                Phase::Open => self.check_idle(idx),
                Phase::CloseSent | Phase::Finishing | Phase::Lingering => {
                    log::debug!("{}: close timed out in {:?}", conn.peer, conn.phase);
                    self.kill(idx);
                }
                Phase::Dead => {}
            }
        }
    }

    /// Keepalive: ping a connection that has been silent for the ping interval, and drop it if
    /// nothing at all arrives within the pong timeout (any input clears `ping_sent`).
    fn check_idle(&mut self, idx: usize) {
        let now = self.now;
        let conn = &mut self.conns[idx];
        if let Some(sent) = conn.ping_sent {
            let give_up = sent + self.config.pong_timeout;
            if now >= give_up {
                self.metrics.ping_timeouts += 1;
                log::info!("{}: no answer to ping, dropping", conn.peer);
                self.kill(idx);
            } else {
                self.set_deadline(idx, give_up);
            }
            return;
        }
        // Quiet for a while: a drained queue gives back the ring it kept for reuse.
        conn.out.release_idle();
        let idle_at = conn.last_rx + self.config.ping_interval;
        if now < idle_at {
            self.set_deadline(idx, idle_at);
            return;
        }
        conn.out
            .push(Chunk::Owned(frame::encode_vec(OpCode::Ping, b"parlor")));
        conn.ping_sent = Some(now);
        self.metrics.pings_sent += 1;
        self.mark_dirty(idx);
        self.set_deadline(idx, now + self.config.pong_timeout);
    }

    // ----- memory budget -----

    /// Whether the total may go from charging `old` to `new` bytes for one connection.
    fn budget_allows(&self, old: usize, new: usize) -> bool {
        within_budget(self.mem_used, self.config.memory_budget, old, new)
    }

    /// Charges the connection for its reader's assembly buffer as it is now. Growth that would
    /// take the loop-wide total over `--memory-budget` is refused (returns false, nothing
    /// changes): the caller fails the connection.
    fn recharge_in(&mut self, idx: usize) -> bool {
        let c = &self.conns[idx];
        let (old, new) = (c.charged_in, c.reader.as_ref().map_or(0, |r| r.buffered()));
        if !self.budget_allows(old, new) {
            return false;
        }
        self.mem_used = self.mem_used - old + new;
        self.conns[idx].charged_in = new;
        true
    }

    /// Charges the connection for its unshared queued frames as they are now; with `check`,
    /// growth over the budget is refused like in [`Server::recharge_in`]. Without it (bytes
    /// written, the loop's own small frames) the count simply follows.
    fn recharge_out(&mut self, idx: usize, check: bool) -> bool {
        let c = &self.conns[idx];
        let (old, new) = (c.charged_out, c.out.owned_bytes());
        if check && !self.budget_allows(old, new) {
            return false;
        }
        self.mem_used = self.mem_used - old + new;
        self.conns[idx].charged_out = new;
        true
    }

    /// The connection asked for memory past `--memory-budget`: drop what it holds and close it
    /// with 1013 (Try Again Later); if a frame is half-written no close frame can follow it
    /// soon, so the connection is dropped instead.
    fn fail_over_budget(&mut self, idx: usize) {
        self.metrics.memory_budget_closes += 1;
        let budget = self.config.memory_budget;
        let conn = &mut self.conns[idx];
        log::info!(
            "{}: would pass --memory-budget {budget} ({} bytes held), closing with 1013",
            conn.peer,
            self.mem_used
        );
        conn.reader = None;
        conn.rbuf = Vec::new();
        conn.pending_pong = None;
        let mid_frame = conn.out.mid_frame();
        conn.out.discard_unstarted();
        let phase = conn.phase;
        self.recharge_in(idx);
        self.recharge_out(idx, false);
        if phase == Phase::Open && !mid_frame {
            let code = CloseCode::TryAgainLater;
            let payload = close::close_payload(code, "server memory budget exceeded");
            self.queue_close(idx, code, &payload, Phase::Finishing);
        } else {
            self.kill(idx);
        }
    }

    // ----- write stalls -----

    /// Drops backlogged connections that wrote nothing for `--write-timeout`. Runs once a
    /// second over the backlog only; entries of connections that drained or went are dropped.
    fn check_write_stalls(&mut self) {
        let timeout = self.config.write_timeout;
        let mut i = 0;
        while i < self.backlog.len() {
            let (idx, token) = self.backlog[i];
            let keep = match self.conns.get_mut(idx) {
                Some(c) if c.token == token => {
                    if !c.writable_registered || c.phase == Phase::Dead {
                        c.in_backlog = false;
                        false
                    } else if self.now.saturating_duration_since(c.write_progress) >= timeout {
                        c.in_backlog = false;
                        self.metrics.write_timeouts += 1;
                        log::info!(
                            "{}: no write progress for {timeout:?} with {} bytes queued, dropping",
                            c.peer,
                            c.out.bytes()
                        );
                        self.kill(idx);
                        false
                    } else {
                        true
                    }
                }
                _ => false,
            };
            if keep {
                i += 1;
            } else {
                self.backlog.swap_remove(i);
            }
        }
    }

    // ----- shutdown -----

    fn on_signal(&mut self) {
        let mut stop = false;
        let mut reload = false;
        if let Some(signals) = &mut self.signals {
            for sig in signals.pending() {
                log::info!("received signal {sig}");
                if sig == signal_hook::consts::SIGHUP {
                    reload = true;
                } else {
                    stop = true;
                }
            }
        }
        if reload {
            self.start_tls_reload();
        }
        if stop {
            self.shut_down();
        }
    }

    /// SIGHUP: read the certificate and key again on a thread of its own (disk I/O stays off
    /// the loop); [`Server::finish_tls_reload`] installs the result when the waker fires.
    fn start_tls_reload(&mut self) {
        let (Some(cert), Some(key)) = (&self.config.tls_cert, &self.config.tls_key) else {
            log::info!("SIGHUP: no --tls-cert to reload");
            return;
        };
        if self.tls_reload.is_some() {
            return; // one at a time; it reads the files as they are now anyway
        }
        let (tx, rx) = mpsc::channel();
        let (cert, key, waker) = (cert.clone(), key.clone(), self.waker.clone());
        let spawned = std::thread::Builder::new()
            .name("parlor-tls-reload".into())
            .spawn(move || {
                let _ = tx.send(tls::load(&cert, &key));
                let _ = waker.wake();
            });
        match spawned {
            Ok(_) => self.tls_reload = Some(rx),
            Err(e) => log::error!("SIGHUP: cannot start the reload thread: {e}"),
        }
    }

    /// Installs a reloaded certificate for new handshakes; a failed reload keeps the old pair.
    fn finish_tls_reload(&mut self) {
        let Some(rx) = &self.tls_reload else { return };
        let result = match rx.try_recv() {
            Ok(r) => r,
            Err(mpsc::TryRecvError::Empty) => return,
            Err(mpsc::TryRecvError::Disconnected) => Err(TlsError::Rejected(
                rustls::Error::General("the reload thread ended without a result".into()),
            )),
        };
        self.tls_reload = None;
        match result {
            Ok(config) => {
                self.tls = Some(config);
                self.metrics.tls_reloads += 1;
                log::info!("TLS certificate and key reloaded; new connections use them");
            }
            Err(e) => {
                self.metrics.tls_reload_failures += 1;
                log::error!("TLS reload failed, keeping the previous certificate: {e}");
            }
        }
    }

    /// SIGINT/SIGTERM: stop accepting, close every WebSocket with 1001 and wait for the peers
    /// up to `--shutdown-grace`; a second signal stops waiting.
    fn shut_down(&mut self) {
        if self.shutdown_deadline.is_some() {
            // A second signal: stop waiting for peers.
            self.shutdown_deadline = Some(self.now);
            return;
        }
        log::info!(
            "shutting down: closing {} connections (grace {:?})",
            self.conns.len(),
            self.config.shutdown_grace
        );
        self.shutdown_deadline = Some(self.now + self.config.shutdown_grace);
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let all: Vec<(usize, Phase)> = self.conns.iter().map(|(i, c)| (i, c.phase)).collect();
        for (idx, phase) in all {
            match phase {
                Phase::Open => {
                    self.initiate_close(idx, CloseCode::GoingAway, "server shutting down")
                }
                Phase::Http => self.kill(idx),
                _ => {}
            }
        }
    }

    // ----- output -----

    #[inline]
    fn mark_dirty(&mut self, idx: usize) {
        Self::list_dirty(&mut self.dirty, &mut self.conns[idx], idx);
    }

    /// [`Server::mark_dirty`] on a slab entry the caller already holds (a delivery or a reply
    /// looks its recipient up once).
    #[inline]
    fn list_dirty(dirty: &mut Vec<usize>, conn: &mut Connection, idx: usize) {
        if !conn.dirty {
            conn.dirty = true;
            dirty.push(idx);
        }
    }

    /// Writes as much queued output as the socket takes, then adjusts interest and finishes
    /// connections whose last bytes are out.
    fn flush(&mut self, idx: usize) {
        let conn = &mut self.conns[idx];
        if conn.phase == Phase::Dead {
            return;
        }
        if conn.tls.is_some() {
            self.flush_tls(idx);
            return;
        }
        loop {
            if conn.out.at_frame_boundary() {
                if let Some(p) = conn.pending_pong.take() {
                    conn.out
                        .push_front(Chunk::Owned(frame::encode_vec(OpCode::Pong, &p)));
                }
            }
            if conn.out.is_empty() {
                break;
            }
            // A pong still waiting for a frame boundary goes right after the half-written head,
            // so the head is written alone: frames queued behind it must not overtake the pong.
            let max_chunks = if conn.pending_pong.is_some() {
                1
            } else {
                usize::MAX
            };
            match conn.out.write_corked(
                &mut conn.socket,
                max_chunks,
                &mut self.write_cork,
                &self.turn.buf,
            ) {
                Ok(0) => {
                    self.kill(idx);
                    return;
                }
                Ok(n) => {
                    self.metrics.bytes_out += n as u64;
                    conn.write_progress = self.now;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("{}: write error: {e}", conn.peer);
                    self.kill(idx);
                    return;
                }
            }
        }
        let want_writable = !conn.out.is_empty();
        self.after_flush(idx, want_writable);
    }

    /// [`Server::flush`] for a TLS connection: frames go through rustls, corked a record at a
    /// time (see [`tls`]).
    fn flush_tls(&mut self, idx: usize) {
        let conn = &mut self.conns[idx];
        let Some(tls) = conn.tls.as_mut() else { return };
        if conn.out.at_frame_boundary() {
            if let Some(p) = conn.pending_pong.take() {
                conn.out
                    .push_front(Chunk::Owned(frame::encode_vec(OpCode::Pong, &p)));
            }
        }
        let max_chunks = if conn.pending_pong.is_some() {
            1
        } else {
            MAX_IOVECS
        };
        let finishing = conn.phase == Phase::Finishing;
        let result = tls.pump(
            &mut conn.out,
            &mut conn.socket,
            &mut self.cork,
            max_chunks,
            finishing,
            &self.turn.buf,
        );
        let wants_write = tls.wants_write();
        match result {
            Ok(p) => {
                if p.wire > 0 {
                    self.metrics.bytes_out += p.wire as u64;
                    conn.write_progress = self.now;
                }
            }
            Err(e) => {
                log::debug!("{}: write error: {e}", conn.peer);
                self.kill(idx);
                return;
            }
        }
        if self.cork.capacity() > tls::RECORD_PLAINTEXT {
            self.cork = Vec::new();
        }
        // Frames wait in the queue during the handshake; what can move now is ciphertext.
        let want_writable = wants_write || (!conn.out.is_empty() && tls.is_handshaken());
        self.after_flush(idx, want_writable);
    }

    /// After writing: WRITABLE interest while output waits, the write-stall backlog, memory
    /// accounting, and the half-close of a finished connection.
    fn after_flush(&mut self, idx: usize, want_writable: bool) {
        let conn = &mut self.conns[idx];
        if want_writable != conn.writable_registered {
            let interest = if want_writable {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            if self
                .poll
                .registry()
                .reregister(&mut conn.socket, Token(conn.token), interest)
                .is_err()
            {
                self.kill(idx);
                return;
            }
            conn.writable_registered = want_writable;
            if want_writable {
                // A backlog starts now (if this flush wrote something, that was progress now).
                conn.write_progress = self.now;
                if !conn.in_backlog && !self.config.write_timeout.is_zero() {
                    conn.in_backlog = true;
                    self.backlog.push((idx, conn.token));
                }
            }
        }
        // Written chunks released their memory.
        self.recharge_out(idx, false);
        let conn = &mut self.conns[idx];
        if !want_writable && conn.phase == Phase::Finishing {
            // Everything we had to say is out: half-close so the peer sees EOF after our last
            // bytes, and read until its EOF (or the deadline) so unread input can't turn our
            // close into a reset that destroys the reply.
            let _ = conn.socket.shutdown(Shutdown::Write);
            conn.phase = Phase::Lingering;
            if conn.eof {
                self.kill(idx);
            }
        }
    }

    fn end_turn(&mut self) {
        self.notify_closed();
        // Before the flush, so workers (the store's commit) overlap with our writes.
        self.services_turn_end();
        self.flush_dirty();
        // Connections that died while flushing (a write error) are reported now, and what the
        // services say about it (an `offline` presence to a room) is written this turn too,
        // not at the next wake-up, which may be a second away. Deaths in this second flush
        // are reported here as well; their consequences go out in the next turn, which the
        // loop starts without blocking while anything is dirty (see `run`).
        self.notify_closed();
        if !self.dirty.is_empty() {
            self.flush_dirty();
            self.notify_closed();
        }
        // The cork's frame references must not outlive the turn (see `Cork`).
        self.write_cork.release();
        // Closes found while flushing may have produced work too.
        self.services_turn_end();
        self.retire_turn();
        for idx in mem::take(&mut self.dead) {
            if let Some(mut conn) = self.conns.try_remove(idx) {
                let _ = self.poll.registry().deregister(&mut conn.socket);
                log::debug!("{}: connection closed", conn.peer);
                self.mem_used -= conn.charged_in + conn.charged_out;
                let counted_ip = conn.counted.then(|| conn.peer.ip());
                self.release_slot(counted_ip, conn.reserve.is_some(), conn.monitor);
            }
        }
    }

    /// Writes the queued output of every connection marked dirty this turn.
    fn flush_dirty(&mut self) {
        let mut dirty = mem::take(&mut self.dirty);
        for &idx in &dirty {
            if let Some(c) = self.conns.get_mut(idx) {
                c.dirty = false;
                self.flush(idx);
            }
        }
        dirty.clear();
        // Keep the allocation, unless the flush marked connections dirty again meanwhile.
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
    }

    // ----- services -----

    /// Runs `f` with the endpoint's service and this loop as its outbox, then tells services
    /// about connections that stopped being open meanwhile. The service is moved out for the
    /// call so the loop can lend itself as the outbox; closes it requests are queued, never
    /// re-entered.
    fn with_service(&mut self, endpoint: usize, f: impl FnOnce(&mut dyn Service, &mut dyn Outbox)) {
        let mut svc = mem::replace(&mut self.endpoints[endpoint].service, Box::new(Detached));
        f(svc.as_mut(), self);
        self.endpoints[endpoint].service = svc;
        self.notify_closed();
    }

    fn notify_closed(&mut self) {
        while let Some((endpoint, id)) = self.closed.pop() {
            let mut svc = mem::replace(&mut self.endpoints[endpoint].service, Box::new(Detached));
            svc.on_close(self, id);
            self.endpoints[endpoint].service = svc;
        }
    }

    fn wake_services(&mut self) {
        for ep in 0..self.endpoints.len() {
            self.with_service(ep, |svc, out| svc.on_wake(out));
        }
    }

    fn services_turn_end(&mut self) {
        for ep in &mut self.endpoints {
            ep.service.on_turn_end();
        }
    }

    fn tick_services(&mut self) {
        for ep in 0..self.endpoints.len() {
            self.with_service(ep, |svc, out| svc.on_tick(out));
        }
    }
}

/// Stands in for a service while it is lent out during its own call.
struct Detached;

impl Service for Detached {
    fn on_message(&mut self, _: &mut dyn Outbox, _: ConnId, _: Message<'_>) {}
}

impl Server {
    /// The live connection behind `id`, if it is still the same connection.
    fn lookup(&self, id: ConnId) -> Option<usize> {
        let token = id.0 as usize;
        let idx = index_of(token)?;
        match self.conns.get(idx) {
            Some(c) if c.token == token => Some(idx),
            _ => None,
        }
    }

    /// The check before queueing output for `id` (a broadcast delivery or a reply), kept small
    /// because it runs once per delivery: `id`'s connection if it is still the same open
    /// connection and its queue is not over `--max-queue`; `Err(Some(idx))` if it is over (the
    /// client stopped reading: the caller drops it, out of line, with [`Server::refuse`]).
    /// Takes the slab rather than `self`, so the caller can queue and mark the connection
    /// dirty with this one lookup.
    #[inline]
    fn recipient(
        conns: &mut Slab<Connection>,
        id: ConnId,
        max_queue: usize,
    ) -> Result<(usize, &mut Connection), Option<usize>> {
        let token = id.0 as usize;
        let idx = index_of(token).ok_or(None)?;
        let conn = conns.get_mut(idx).ok_or(None)?;
        if conn.token != token || conn.phase != Phase::Open {
            return Err(None);
        }
        if conn.out.cost() > max_queue {
            return Err(Some(idx));
        }
        Ok((idx, conn))
    }

    /// Queues broadcast output for `id` with `push` (which returns whether the connection now
    /// holds a new range of [`TurnFrames`] and must be listed for [`Server::retire_turn`]): no
    /// memory-budget charge, the bytes belong to every recipient at once. Does not count
    /// `frames_out`.
    #[inline]
    fn queue_broadcast(&mut self, id: ConnId, push: impl FnOnce(&mut OutQueue) -> bool) -> bool {
        match Self::recipient(&mut self.conns, id, self.config.max_queue) {
            Ok((idx, conn)) => {
                if push(&mut conn.out) {
                    self.turn.holders.push(idx);
                }
                Self::list_dirty(&mut self.dirty, conn, idx);
                true
            }
            Err(slow) => self.refuse(slow),
        }
    }

    /// Output [`Server::recipient`] refused: a connection over `--max-queue` (`Some`) is
    /// dropped; either way nothing was queued.
    fn refuse(&mut self, slow: Option<usize>) -> bool {
        if let Some(idx) = slow {
            self.drop_slow_consumer(idx);
        }
        false
    }

    /// The end of a turn: what queues still hold of this turn's broadcast buffer becomes shared
    /// frames (they were not written: a full socket, or frames queued after the flush), and
    /// the buffer is emptied for the next turn.
    fn retire_turn(&mut self) {
        for idx in mem::take(&mut self.turn.holders) {
            if let Some(c) = self.conns.get_mut(idx) {
                c.out.retire_turn(&self.turn.buf, &mut self.turn_copies);
            }
        }
        self.turn_copies.clear();
        self.turn.buf.clear();
    }

    /// A queue already over `--max-queue`: the client stopped reading. Unstarted output goes
    /// and the connection is closed with 1008.
    #[cold]
    #[inline(never)]
    fn drop_slow_consumer(&mut self, idx: usize) {
        let limit = self.config.max_queue;
        let conn = &mut self.conns[idx];
        self.metrics.slow_consumer_drops += 1;
        log::info!(
            "{}: outbound queue over {limit} bytes, closing with 1008",
            conn.peer
        );
        conn.out.discard_unstarted();
        conn.pending_pong = None;
        self.initiate_close(
            idx,
            CloseCode::PolicyViolation,
            "too slow: outbound queue full",
        );
    }

    /// Queues an unshared frame of `payload` for `id` (see [`OutQueue::push_frame`]), charged
    /// to the connection's share of `--memory-budget`.
    fn queue_frame(&mut self, id: ConnId, opcode: OpCode, payload: &[u8]) -> bool {
        // A queue already over the limit means the client stopped reading. Below the limit any
        // frame is accepted, so one frame of the endpoint's largest message always fits on top
        // of --max-queue (a 16 MiB echo works) while a pile of small frames cannot pass it.
        // The cost includes per-frame bookkeeping, so tiny frames are bounded as well.
        let (idx, conn) = match Self::recipient(&mut self.conns, id, self.config.max_queue) {
            Ok(found) => found,
            Err(slow) => return self.refuse(slow),
        };
        conn.out.push_frame(opcode, payload);
        // What `recharge_out` and `mark_dirty` do, on the entry already in hand (an echo
        // queues one frame per message; each slab lookup is a bounds and a vacancy check).
        let (old, new) = (conn.charged_out, conn.out.owned_bytes());
        if !within_budget(self.mem_used, self.config.memory_budget, old, new) {
            self.fail_over_budget(idx);
            return false;
        }
        self.mem_used = self.mem_used - old + new;
        conn.charged_out = new;
        Self::list_dirty(&mut self.dirty, conn, idx);
        self.metrics.frames_out += 1;
        true
    }
}

impl Outbox for Server {
    fn send_frame(&mut self, conn: ConnId, frame: &SharedFrame) -> bool {
        let queued = self.queue_broadcast(conn, |out| {
            out.push_shared(frame.clone());
            false
        });
        self.metrics.frames_out += u64::from(queued);
        queued
    }

    fn send_frame_to_all(&mut self, conns: &[ConnId], frame: &SharedFrame) -> usize {
        let mut n = 0;
        match (conns.len() > 1).then(|| self.turn.add(frame)).flatten() {
            Some((start, len)) => {
                for &conn in conns {
                    n += usize::from(self.queue_broadcast(conn, |out| out.push_turn(start, len)));
                }
            }
            None => {
                for &conn in conns {
                    n += usize::from(self.queue_broadcast(conn, |out| {
                        out.push_shared(frame.clone());
                        false
                    }));
                }
            }
        }
        self.metrics.frames_out += n as u64;
        n
    }

    fn send_text(&mut self, conn: ConnId, text: &str) -> bool {
        self.queue_frame(conn, OpCode::Text, text.as_bytes())
    }

    fn send_binary(&mut self, conn: ConnId, data: &[u8]) -> bool {
        self.queue_frame(conn, OpCode::Binary, data)
    }

    fn close(&mut self, conn: ConnId, code: CloseCode, reason: &str) {
        if let Some(idx) = self.lookup(conn) {
            self.initiate_close(idx, code, reason);
        }
    }

    fn peer_addr(&self, conn: ConnId) -> Option<SocketAddr> {
        self.lookup(conn).map(|idx| self.conns[idx].peer)
    }

    fn now(&self) -> Instant {
        self.now
    }
}
