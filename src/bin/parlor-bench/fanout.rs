//! `chat` and `broadcast`: P publishers send into one room (or one `/broadcast` path), every
//! connection receives every message; receivers time each delivery from the send time carried
//! in the text, and count what was lost or duplicated.
//!
//! `chat` may spread the connections over several servers (`--url A,B,C`: connection i to URL
//! i % n, the nodes of a cluster) and over several rooms (`--rooms N`: connection i in room
//! i % N, so publisher p publishes into room p % N); a receiver then expects exactly the
//! messages of the publishers in its room. Acks are only counted (accepted messages/s): the
//! closed loop of `--rate 0` waits for deliveries, so it does not matter whether a publisher's
//! `ack` arrives before or after its own copy of the message (in cluster mode either happens).
//!
//! Message text: `<run> <publisher> <seq> <send µs>[ ~~~padding]`. `run` is a random nonce,
//! so history or stragglers from earlier runs are ignored. Incoming chat frames are not
//! JSON-parsed: the type is read from the frame's start and the text found by searching for
//! `"text":"` (the bench must not be the bottleneck).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::conn::{ConnOut, Target};
use crate::pool::{Handler, Pool};
use crate::stats::{fmt_us, CpuWindow, Histogram};
use crate::{connect_all, Common, Progress};

#[derive(clap::Args, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    /// Subscriber connections (receive only).
    #[arg(long, short = 'c', default_value_t = 100)]
    pub subscribers: usize,
    /// Publisher connections (send, and also receive everything).
    #[arg(long, short = 'p', default_value_t = 1)]
    pub publishers: usize,
    /// Total messages per second over all publishers; 0 = as fast as the server takes them,
    /// with at most --max-inflight messages per publisher not yet received by every connection
    /// (chat: and acked, in either order; see --no-ack-window): a closed loop on the slowest
    /// receiver and the commit, so the server's queues stay bounded and the latency figures
    /// mean something.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Unanswered messages allowed per publisher when --rate 0.
    #[arg(long, default_value_t = 32)]
    pub max_inflight: usize,
    /// Chat, --rate 0: a message leaves the window when every receiver has got it, without
    /// waiting for its ack too (the rule before cluster mode; the store's commit queue can then
    /// grow without bound on a server that broadcasts before it commits).
    #[arg(long)]
    pub no_ack_window: bool,
    /// Pad message texts to at least this many bytes.
    #[arg(long, default_value_t = 0)]
    pub size: usize,
    /// Room to join (chat).
    #[arg(long, default_value = "bench")]
    pub room: String,
    /// Rooms (chat): with N > 1, connection i joins ROOM-<i % N> and publisher p publishes
    /// into its own room; each receiver expects only the messages of the publishers in its
    /// room. With 1 (the default) everyone joins ROOM itself.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub rooms: u32,
    /// Account name prefix (chat): users are PREFIX-s-N and PREFIX-p-N.
    #[arg(long, default_value = "bench")]
    pub user_prefix: String,
    /// Password for the bench accounts (chat).
    #[arg(long, default_value = "bench-password-not-secret")]
    pub password: String,
    /// Token cache file (chat): resume sessions from it and save new tokens to it, so repeated
    /// runs skip password hashing (register/login cost the server an argon2 hash each).
    #[arg(long)]
    pub tokens: Option<std::path::PathBuf>,
    /// Seconds to wait after publishing stops for the last deliveries (then lost = expected -
    /// received).
    #[arg(long, default_value = "3", value_parser = parlor::units::parse_secs)]
    pub drain: Duration,
    /// Every connection receives only its own messages (point `broadcast` at an echo path,
    /// e.g. for a smoke test of a server without a broadcast endpoint); expected counts follow.
    #[arg(long)]
    pub own_only: bool,
    /// Exit non-zero if any message was lost or duplicated or any publish got an error.
    #[arg(long)]
    pub strict: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Broadcast,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    /// register / login / resume sent.
    Auth(AuthStep),
    Joining,
    Ready,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthStep {
    Resume,
    Register,
    Login,
}

struct Fanout {
    kind: Kind,
    run: String,
    base: Instant,
    publishers: usize,
    names: Vec<String>,
    phase: Vec<Phase>,
    ready: usize,
    tokens: HashMap<String, String>,
    tokens_changed: bool,
    password: String,
    /// Room names, and each connection's room (an index into them).
    rooms: u32,
    room_names: Vec<String>,
    room_of: Vec<u32>,
    own_only: bool,
    fatal: Option<String>,
    /// Sign-ins the server refused with `rate_limited` because its hashing queue was full;
    /// each one is resent when another sign-in finishes (a hashing slot is free then).
    auth_retry: std::collections::VecDeque<(usize, AuthStep)>,
    /// Retries due now: sent by the join loop between pool turns (a handler can only write to
    /// the connection it was called for).
    auth_resend: Vec<(usize, Vec<u8>)>,
    // Publishing.
    publishing: bool,
    unlimited: bool,
    max_inflight: usize,
    sent: Vec<u64>,
    /// The closed loop: what each publisher has in flight.
    win: Window,
    /// Per publisher: connections that receive each of its messages.
    receivers: Vec<u32>,
    acks: u64,
    /// Acks received in the measurement window (accepted messages).
    acked: u64,
    size: usize,
    text_buf: String,
    frame_buf: String,
    /// Publishes answered with an error (not stored, not broadcast), by code.
    errors: HashMap<String, u64>,
    error_count: u64,
    /// Per publisher: publishes refused with an error (expected by nobody).
    errors_by_pub: Vec<u64>,
    // Receiving: per connection, per publisher, a bitset of sequence numbers seen.
    seen: Vec<Vec<Vec<u64>>>,
    distinct: u64,
    dups: u64,
    foreign: u64,
    /// Messages of this run from a publisher outside the receiver's room: ignored (an account
    /// may still be a member of a room it joined in an earlier run with other --rooms).
    other_room: u64,
    measuring: bool,
    window_deliveries: u64,
    hist: Histogram,
    total_deliveries: u64,
    /// Finds `"text":"` in message frames (built once; the hot path of the receiver).
    text_field: memchr::memmem::Finder<'static>,
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    let mut v = 0u64;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u64::from(b - b'0');
    }
    Some(v)
}

/// The room (index) of connection `i` with `rooms` rooms.
fn room_index(i: usize, rooms: u32) -> u32 {
    (i % rooms as usize) as u32
}

/// The name of room `k`: `base` itself when there is one room (runs without --rooms are
/// unchanged), `base-k` otherwise.
fn room_name(base: &str, rooms: u32, k: u32) -> String {
    if rooms == 1 {
        base.to_string()
    } else {
        format!("{base}-{k}")
    }
}

/// Whether connection `i` is meant to receive the messages of publisher `p`: those in its
/// room, or with `own_only` only its own.
fn receives(i: usize, p: usize, rooms: u32, own_only: bool) -> bool {
    if own_only {
        i == p
    } else {
        room_index(i, rooms) == room_index(p, rooms)
    }
}

/// Per publisher, how many of the `n` connections receive its messages.
fn receivers_per_publisher(n: usize, publishers: usize, rooms: u32, own_only: bool) -> Vec<u32> {
    (0..publishers)
        .map(|p| (0..n).filter(|&i| receives(i, p, rooms, own_only)).count() as u32)
        .collect()
}

/// The closed loop of `--rate 0`: per publisher, the messages not yet done. A message is done
/// when every receiver has got it and (chat, unless --no-ack-window) its ack has arrived, in
/// either order: on a single node the message is broadcast before the commit and acked after
/// it; in cluster mode the sender's own copy comes back through the database log and may
/// arrive before or after the ack. Waiting for both keeps every server queue bounded (the
/// fan-out queues and the store's commit queue).
struct Window {
    /// Per publisher: from sequence `base[p]` on, receivers so far (low bits) and ACKED.
    counts: Vec<std::collections::VecDeque<u32>>,
    base: Vec<u64>,
    /// Messages not done, per publisher.
    inflight: Vec<usize>,
    receivers: Vec<u32>,
    wait_ack: bool,
}

const ACKED: u32 = 1 << 31;

impl Window {
    fn new(receivers: Vec<u32>, wait_ack: bool) -> Window {
        let p = receivers.len();
        Window {
            counts: vec![Default::default(); p],
            base: vec![0; p],
            inflight: vec![0; p],
            receivers,
            wait_ack,
        }
    }

    fn done(&self, p: usize, c: u32) -> bool {
        c & !ACKED >= self.receivers[p] && (!self.wait_ack || c & ACKED != 0)
    }

    /// Publisher `p` sent its next message.
    fn push(&mut self, p: usize) {
        self.inflight[p] += 1;
        self.counts[p].push_back(0);
    }

    /// Applies `f` to the state of (p, seq); the message leaves the window when it becomes
    /// done, and done messages at the front are dropped.
    fn update(&mut self, p: usize, seq: u64, f: impl FnOnce(u32, u32) -> u32) {
        let Some(off) = seq.checked_sub(self.base[p]) else {
            return;
        };
        let all = self.receivers[p];
        let Some(&c) = self.counts[p].get(off as usize) else {
            return;
        };
        if self.done(p, c) {
            return;
        }
        let c = f(c, all);
        self.counts[p][off as usize] = c;
        if self.done(p, c) {
            self.inflight[p] = self.inflight[p].saturating_sub(1);
            while let Some(&front) = self.counts[p].front() {
                if !self.done(p, front) {
                    break;
                }
                self.counts[p].pop_front();
                self.base[p] += 1;
            }
        }
    }

    /// `k` receivers got (p, seq).
    fn delivered(&mut self, p: usize, seq: u64, k: u32) {
        self.update(p, seq, |c, all| {
            ((c & !ACKED).saturating_add(k)).min(all) | (c & ACKED)
        });
    }

    /// The ack of (p, seq) arrived.
    fn acked(&mut self, p: usize, seq: u64) {
        self.update(p, seq, |c, _| c | ACKED);
    }

    /// The server refused (p, seq): nobody will get it, no ack will come.
    fn refused(&mut self, p: usize, seq: u64) {
        self.update(p, seq, |_, all| all | ACKED);
    }
}

/// `"key":"` as the byte pattern `str_field` looks for.
macro_rules! field {
    ($key:literal) => {
        concat!("\"", $key, "\":\"").as_bytes()
    };
}

/// Value of a simple (unescaped) string field in a JSON frame; `pat` is `field!("key")`.
/// A substring search, not a JSON parse: the load generator must stay cheaper per delivery
/// than the server it measures.
fn str_field<'a>(data: &'a [u8], pat: &[u8]) -> Option<&'a [u8]> {
    str_field_by(data, &memchr::memmem::Finder::new(pat))
}

/// [`str_field`] with a prebuilt searcher, for the field read on every delivery.
fn str_field_by<'a>(data: &'a [u8], finder: &memchr::memmem::Finder<'_>) -> Option<&'a [u8]> {
    let start = finder.find(data)? + finder.needle().len();
    let len = memchr::memchr(b'"', &data[start..])?;
    Some(&data[start..start + len])
}

/// The frame's `type`: serde writes an internally tagged enum's tag first, so look at the
/// start; fall back to a search.
fn frame_type(data: &[u8]) -> &[u8] {
    if let Some(rest) = data.strip_prefix(b"{\"type\":\"") {
        if let Some(n) = rest.iter().position(|&b| b == b'"') {
            return &rest[..n];
        }
    }
    str_field(data, field!("type")).unwrap_or(b"")
}

impl Fanout {
    fn is_publisher(&self, idx: usize) -> bool {
        idx < self.publishers
    }

    fn send_auth(&mut self, idx: usize, step: AuthStep, out: &mut ConnOut<'_>) {
        let frame = self.auth_frame(idx, step);
        out.text(&frame);
        self.phase[idx] = Phase::Auth(step);
    }

    /// Schedules one sign-in that the server's full hashing queue refused, now that another
    /// finished (a hashing slot is free).
    fn retry_one_auth(&mut self) {
        if let Some((idx, step)) = self.auth_retry.pop_front() {
            let frame = self.auth_frame(idx, step);
            self.auth_resend.push((idx, frame));
            self.phase[idx] = Phase::Auth(step);
        }
    }

    fn auth_frame(&self, idx: usize, step: AuthStep) -> Vec<u8> {
        let user = &self.names[idx];
        let frame = match step {
            AuthStep::Resume => json!({"type": "resume", "token": self.tokens[user]}),
            AuthStep::Register => {
                json!({"type": "register", "user": user, "password": self.password})
            }
            AuthStep::Login => json!({"type": "login", "user": user, "password": self.password}),
        };
        frame.to_string().into_bytes()
    }

    /// Queues the next message of publisher `p`.
    fn publish(&mut self, p: usize, out: &mut ConnOut<'_>) {
        let seq = self.sent[p];
        self.sent[p] += 1;
        self.win.push(p);
        let t = self.base.elapsed().as_micros() as u64;
        self.text_buf.clear();
        let _ = write!(self.text_buf, "{} {p} {seq} {t}", self.run);
        if self.text_buf.len() < self.size {
            self.text_buf.push(' ');
            while self.text_buf.len() < self.size {
                self.text_buf.push('~');
            }
        }
        match self.kind {
            Kind::Broadcast => out.text(self.text_buf.as_bytes()),
            Kind::Chat => {
                self.frame_buf.clear();
                let _ = write!(
                    self.frame_buf,
                    "{{\"type\":\"say\",\"room\":\"{}\",\"text\":\"{}\",\"ref\":\"{}-{seq}\"}}",
                    self.room_names[self.room_of[p] as usize], self.text_buf, self.run
                );
                out.text(self.frame_buf.as_bytes());
            }
        }
    }

    /// A bench message text arrived on connection `idx`.
    fn deliver(&mut self, idx: usize, text: &[u8], now: Instant) {
        let Some(rest) = text
            .strip_prefix(self.run.as_bytes())
            .and_then(|r| r.strip_prefix(b" "))
        else {
            self.foreign += 1;
            return;
        };
        let mut it = rest.splitn(4, |&b| b == b' ');
        let (Some(p), Some(seq), Some(t)) = (
            it.next().and_then(parse_u64),
            it.next().and_then(parse_u64),
            it.next().and_then(parse_u64),
        ) else {
            self.foreign += 1;
            return;
        };
        let p = p as usize;
        if p >= self.publishers {
            self.foreign += 1;
            return;
        }
        if !self.own_only && self.room_of[idx] != self.room_of[p] {
            self.other_room += 1;
            return;
        }
        let bits = &mut self.seen[idx][p];
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if bits.len() <= w {
            bits.resize(w + 1, 0);
        }
        if bits[w] & (1 << b) != 0 {
            self.dups += 1;
            return;
        }
        bits[w] |= 1 << b;
        self.distinct += 1;
        self.total_deliveries += 1;
        if self.measuring {
            let sent_at = self.base + Duration::from_micros(t);
            self.hist
                .record(now.saturating_duration_since(sent_at).as_micros() as u64);
            self.window_deliveries += 1;
        }
        self.win.delivered(p, seq, 1);
    }

    fn top_up(&mut self, p: usize, out: &mut ConnOut<'_>) {
        if self.publishing && self.unlimited {
            while self.win.inflight[p] < self.max_inflight {
                self.publish(p, out);
            }
        }
    }

    fn on_chat_frame(&mut self, idx: usize, data: &[u8], now: Instant, out: &mut ConnOut<'_>) {
        let ty = frame_type(data);
        match ty {
            b"message" => {
                if let Some(text) = str_field_by(data, &self.text_field) {
                    self.deliver(idx, text, now);
                }
            }
            // Not tied to the message frame: in cluster mode the sender's own copy comes back
            // through the database log and may arrive before or after its ack.
            b"ack" => {
                self.acks += 1;
                if self.measuring {
                    self.acked += 1;
                }
                // Its ref is "<run>-<seq>" (a say of this run).
                let seq = str_field(data, field!("ref"))
                    .and_then(|r| r.strip_prefix(self.run.as_bytes()))
                    .and_then(|r| r.strip_prefix(b"-"))
                    .and_then(parse_u64);
                if let (true, Some(seq)) = (self.is_publisher(idx), seq) {
                    self.win.acked(idx, seq);
                }
            }
            b"welcome" => {
                self.retry_one_auth();
                if let Some(tok) = str_field(data, field!("token")) {
                    let tok = String::from_utf8_lossy(tok).into_owned();
                    self.tokens.insert(self.names[idx].clone(), tok);
                    self.tokens_changed = true;
                }
                let room = &self.room_names[self.room_of[idx] as usize];
                let join = json!({"type": "join", "room": room}).to_string();
                out.text(join.as_bytes());
                self.phase[idx] = Phase::Joining;
            }
            b"joined" if self.phase[idx] == Phase::Joining => {
                self.phase[idx] = Phase::Ready;
                self.ready += 1;
            }
            b"error" => {
                let code = str_field(data, field!("code"))
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .unwrap_or_default();
                if matches!(self.phase[idx], Phase::Auth(_)) && code != "rate_limited" {
                    self.retry_one_auth();
                }
                match (self.phase[idx], code.as_str()) {
                    (
                        Phase::Auth(step @ (AuthStep::Register | AuthStep::Login)),
                        "rate_limited",
                    ) => {
                        self.auth_retry.push_back((idx, step));
                    }
                    (Phase::Auth(AuthStep::Register), "user_taken") => {
                        self.send_auth(idx, AuthStep::Login, out)
                    }
                    (Phase::Auth(AuthStep::Resume), _) => {
                        self.tokens.remove(&self.names[idx]);
                        self.tokens_changed = true;
                        self.send_auth(idx, AuthStep::Login, out)
                    }
                    (Phase::Ready, _) => {
                        // A publish refused (rate_limited, ...): not stored, not broadcast.
                        *self.errors.entry(code).or_default() += 1;
                        self.error_count += 1;
                        // Its ref is "<run>-<seq>": take it out of the window.
                        let seq = str_field(data, field!("ref"))
                            .and_then(|r| r.rsplit(|&b| b == b'-').next())
                            .and_then(parse_u64);
                        if self.is_publisher(idx) {
                            self.errors_by_pub[idx] += 1;
                            if let Some(seq) = seq {
                                self.win.refused(idx, seq);
                            }
                        }
                    }
                    (phase, _) => {
                        self.fatal.get_or_insert(format!(
                            "{} during {:?}: {}",
                            self.names[idx],
                            phase,
                            String::from_utf8_lossy(data)
                        ));
                    }
                }
            }
            _ => {}
        }
    }
}

impl Handler for Fanout {
    fn on_open(&mut self, idx: usize, _now: Instant, out: &mut ConnOut<'_>) {
        match self.kind {
            Kind::Broadcast => {
                self.phase[idx] = Phase::Ready;
                self.ready += 1;
            }
            Kind::Chat => {
                let step = if self.tokens.contains_key(&self.names[idx]) {
                    AuthStep::Resume
                } else {
                    AuthStep::Register
                };
                self.send_auth(idx, step, out);
            }
        }
    }

    fn on_message(
        &mut self,
        idx: usize,
        data: &[u8],
        _text: bool,
        now: Instant,
        out: &mut ConnOut<'_>,
    ) {
        match self.kind {
            Kind::Broadcast => {
                self.deliver(idx, data, now);
                if self.is_publisher(idx) {
                    self.top_up(idx, out);
                }
            }
            Kind::Chat => self.on_chat_frame(idx, data, now, out),
        }
    }

    fn on_close(&mut self, idx: usize, error: Option<&str>) {
        if let Some(e) = error {
            self.fatal
                .get_or_insert(format!("connection {} closed: {e}", self.names[idx]));
        }
    }
}

impl Fanout {
    /// Messages each receiver should have got in the end (every pair of receiver and
    /// publisher that share a room; refused publishes are expected by nobody).
    fn expected_all(&self) -> u64 {
        (0..self.publishers)
            .map(|p| {
                self.sent[p].saturating_sub(self.errors_by_pub[p]) * u64::from(self.receivers[p])
            })
            .sum()
    }

    /// Lost: per (receiver, publisher) pair that shares a room, what the publisher got
    /// accepted minus the distinct messages of it that the receiver saw.
    fn lost(&self) -> u64 {
        let mut lost = 0;
        for (i, seen) in self.seen.iter().enumerate() {
            for (p, bits) in seen.iter().enumerate() {
                if !receives(i, p, self.rooms, self.own_only) {
                    continue;
                }
                let got: u64 = bits.iter().map(|w| u64::from(w.count_ones())).sum();
                lost += self.sent[p]
                    .saturating_sub(self.errors_by_pub[p])
                    .saturating_sub(got);
            }
        }
        lost
    }
}

fn load_tokens(path: &std::path::Path) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .map(|s| {
            s.lines()
                .filter_map(|l| {
                    let (u, t) = l.split_once(' ')?;
                    Some((u.to_string(), t.to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn save_tokens(path: &std::path::Path, tokens: &HashMap<String, String>) -> Result<(), String> {
    let mut s = String::new();
    for (u, t) in tokens {
        let _ = writeln!(s, "{u} {t}");
    }
    std::fs::write(path, s).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn run(a: &FanoutArgs, kind: Kind) -> Result<serde_json::Value, String> {
    let c = &a.common;
    let urls = match kind {
        Kind::Chat => c.urls()?,
        // A relay on one server does not reach the connections of another.
        Kind::Broadcast => vec![c.single_url("broadcast")?],
    };
    if kind == Kind::Broadcast && a.rooms > 1 {
        return Err("--rooms is for chat".into());
    }
    let targets = urls
        .iter()
        .map(|u| Target::parse(u, c.tls_ca.as_deref()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut pool = Pool::new(targets).map_err(|e| format!("poll: {e}"))?;
    let n = a.publishers + a.subscribers;
    if a.publishers == 0 {
        return Err("need at least one publisher".into());
    }
    if a.rooms as usize > a.publishers {
        return Err(format!(
            "--rooms {} with {} publishers: a room without a publisher measures nothing",
            a.rooms, a.publishers
        ));
    }
    let run_id = format!("{:016x}", pool.rng.next_u64());
    let names: Vec<String> = (0..n)
        .map(|i| {
            if i < a.publishers {
                format!("{}-p-{i}", a.user_prefix)
            } else {
                format!("{}-s-{}", a.user_prefix, i - a.publishers)
            }
        })
        .collect();
    let mut h = Fanout {
        kind,
        run: run_id.clone(),
        base: Instant::now(),
        publishers: a.publishers,
        names,
        phase: vec![Phase::Connecting; n],
        ready: 0,
        tokens: a.tokens.as_deref().map(load_tokens).unwrap_or_default(),
        tokens_changed: false,
        password: a.password.clone(),
        rooms: a.rooms,
        room_names: (0..a.rooms)
            .map(|k| room_name(&a.room, a.rooms, k))
            .collect(),
        room_of: (0..n).map(|i| room_index(i, a.rooms)).collect(),
        own_only: a.own_only,
        fatal: None,
        auth_retry: Default::default(),
        auth_resend: Vec::new(),
        publishing: false,
        unlimited: a.rate <= 0.0,
        max_inflight: a.max_inflight.max(1),
        sent: vec![0; a.publishers],
        win: Window::new(
            receivers_per_publisher(n, a.publishers, a.rooms, a.own_only),
            kind == Kind::Chat && !a.no_ack_window,
        ),
        receivers: receivers_per_publisher(n, a.publishers, a.rooms, a.own_only),
        acks: 0,
        acked: 0,
        size: a.size,
        text_buf: String::new(),
        frame_buf: String::new(),
        errors: HashMap::new(),
        error_count: 0,
        errors_by_pub: vec![0; a.publishers],
        seen: vec![vec![Vec::new(); a.publishers]; n],
        distinct: 0,
        dups: 0,
        foreign: 0,
        other_room: 0,
        measuring: false,
        window_deliveries: 0,
        hist: Histogram::new(),
        total_deliveries: 0,
        text_field: memchr::memmem::Finder::new(field!("text")),
    };

    connect_all(&mut pool, n, None, None, &mut h)?;
    // Chat: wait until every connection is authenticated and has joined.
    let mut progress = Progress::new(c.quiet);
    let mut last = (0usize, Instant::now());
    while h.ready < n {
        pool.turn(Duration::from_millis(20), &mut h)
            .map_err(|e| e.to_string())?;
        if let Some(e) = h.fatal.take() {
            return Err(e);
        }
        for (idx, frame) in h.auth_resend.drain(..) {
            pool.send_text(idx, &frame);
        }
        if h.auth_retry.len() == n - h.ready && !h.auth_retry.is_empty() {
            // Nothing of ours is being hashed, so no finish will free a slot: retry one now.
            h.retry_one_auth();
        }
        if h.ready > last.0 {
            last = (h.ready, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(60) {
            return Err(format!("only {} of {n} joined; stuck for 60 s", h.ready));
        }
        if progress.due() {
            progress.line(&format!("joining: {}/{n} ready", h.ready));
        }
    }
    if let (Some(path), true) = (&a.tokens, h.tokens_changed) {
        save_tokens(path, &h.tokens)?;
    }
    // Let join/presence traffic settle.
    let settle = Instant::now() + Duration::from_millis(300);
    while Instant::now() < settle {
        pool.turn(Duration::from_millis(20), &mut h)
            .map_err(|e| e.to_string())?;
    }

    // Publish: warmup, then the measured window.
    h.publishing = true;
    let pub_start = Instant::now();
    let warm_end = pub_start + c.warmup;
    let end = warm_end + c.duration;
    let mut cpu = None;
    let mut win_start = warm_end;
    let per_pub = a.rate / a.publishers as f64;
    let mut progress = Progress::new(c.quiet);
    let mut last = (0u64, Instant::now());
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if !h.measuring && now >= warm_end {
            h.measuring = true;
            win_start = now;
            cpu = Some(CpuWindow::start(&c.pid, c.db_pid));
        }
        let mut timeout = Duration::from_millis(10);
        if h.unlimited {
            for p in 0..a.publishers {
                if h.win.inflight[p] < h.max_inflight {
                    let (conn, rng) = (&mut pool.conns[p], &mut pool.rng);
                    h.top_up(p, &mut conn.out(rng));
                    pool.mark_dirty(p);
                }
            }
        } else {
            let elapsed = now.duration_since(pub_start).as_secs_f64();
            let due = (elapsed * per_pub) as u64 + 1;
            for p in 0..a.publishers {
                let mut k = 0;
                while h.sent[p] < due && k < 10_000 {
                    let (conn, rng) = (&mut pool.conns[p], &mut pool.rng);
                    h.publish(p, &mut conn.out(rng));
                    k += 1;
                }
                if k > 0 {
                    pool.mark_dirty(p);
                }
            }
            let next = pub_start + Duration::from_secs_f64(due as f64 / per_pub);
            timeout = next.saturating_duration_since(Instant::now());
        }
        pool.turn(timeout.min(Duration::from_millis(10)), &mut h)
            .map_err(|e| e.to_string())?;
        if let Some(e) = h.fatal.take() {
            return Err(e);
        }
        let sent_so_far: u64 = h.sent.iter().sum();
        if h.error_count > 100 && h.error_count * 2 > sent_so_far {
            return Err(format!(
                "the server refused {} of {sent_so_far} publishes ({:?}); for a benchmark start \
                 it with --rate-limit 0",
                h.error_count, h.errors
            ));
        }
        if progress.due() {
            let now = Instant::now();
            let rate = (h.total_deliveries - last.0) as f64
                / now.duration_since(last.1).as_secs_f64().max(1e-9);
            last = (h.total_deliveries, now);
            let sent: u64 = h.sent.iter().sum();
            progress.line(&format!(
                "{rate:.0} deliveries/s, sent {sent}, p99 {} (so far){}",
                fmt_us(h.hist.quantile(0.99)),
                if h.error_count > 0 {
                    format!(", {} publish errors", h.error_count)
                } else {
                    String::new()
                }
            ));
        }
    }
    let report = cpu
        .unwrap_or_else(|| CpuWindow::start(&c.pid, c.db_pid))
        .stop();
    let window_secs = win_start.elapsed().as_secs_f64();
    let window_deliveries = h.window_deliveries;
    let acked = h.acked;
    h.publishing = false;

    // Drain: wait for the deliveries still in flight.
    let total_sent: u64 = h.sent.iter().sum();
    let expected_all = h.expected_all();
    let drain_end = Instant::now() + a.drain;
    while Instant::now() < drain_end && h.distinct < expected_all {
        pool.turn(Duration::from_millis(20), &mut h)
            .map_err(|e| e.to_string())?;
        if let Some(e) = h.fatal.take() {
            return Err(e);
        }
    }
    let lost = h.lost();
    pool.close_all();

    let rate = window_deliveries as f64 / window_secs.max(1e-9);
    let acked_rate = acked as f64 / window_secs.max(1e-9);
    let per = |secs: Option<f64>, count: u64| {
        secs.map(|s| {
            if count > 0 {
                s * 1e9 / count as f64
            } else {
                0.0
            }
        })
    };
    let server_ns = per(report.server_secs, window_deliveries);
    let (server_ns_ack, db_ns, db_ns_ack) = if kind == Kind::Chat {
        (
            per(report.server_secs, acked),
            per(report.db_secs, window_deliveries),
            per(report.db_secs, acked),
        )
    } else {
        (None, None, None)
    };
    let mode = match kind {
        Kind::Chat => "chat",
        Kind::Broadcast => "broadcast",
    };
    let mut failure = Vec::new();
    if lost > 0 {
        failure.push(format!("{lost} lost"));
    }
    if h.dups > 0 {
        failure.push(format!("{} duplicated", h.dups));
    }
    if h.error_count > 0 {
        failure.push(format!("{} publish errors {:?}", h.error_count, h.errors));
    }
    if total_sent == 0 {
        failure.push("nothing was published".into());
    }
    if !c.json {
        println!(
            "{mode}: {} subscribers + {} publishers{}{}, rate {}, {:.1} s measured",
            a.subscribers,
            a.publishers,
            if a.rooms > 1 {
                format!(" in {} rooms", a.rooms)
            } else {
                String::new()
            },
            if urls.len() > 1 {
                format!(" over {} servers", urls.len())
            } else {
                String::new()
            },
            if h.unlimited {
                format!("max ({} in flight per publisher)", h.max_inflight)
            } else {
                format!("{} msg/s", a.rate)
            },
            window_secs
        );
        println!(
            "published {total_sent} ({:.0} msg/s), {:.0} deliveries/s",
            total_sent as f64 / (window_secs + c.warmup.as_secs_f64()).max(1e-9),
            rate
        );
        println!(
            "latency: p50 {}  p99 {}  p999 {}  max {}  ({} samples)",
            fmt_us(h.hist.quantile(0.5)),
            fmt_us(h.hist.quantile(0.99)),
            fmt_us(h.hist.quantile(0.999)),
            fmt_us(h.hist.max()),
            h.hist.count()
        );
        if kind == Kind::Chat {
            println!("accepted: {acked} acks in the window ({acked_rate:.0} msg/s)");
        }
        println!(
            "lost {lost}, duplicated {}, publish errors {}{}{}",
            h.dups,
            h.error_count,
            if h.errors.is_empty() {
                String::new()
            } else {
                format!(" {:?}", h.errors)
            },
            if h.other_room > 0 {
                format!(
                    " ({} deliveries from other rooms ignored: memberships from earlier runs)",
                    h.other_room
                )
            } else {
                String::new()
            }
        );
        crate::print_cpu(&report, server_ns, "delivery");
        if let (Some(s), Some(d)) = (server_ns_ack, db_ns_ack) {
            println!("per accepted message: server {s:.0} ns, database {d:.0} ns");
        } else if let Some(s) = server_ns_ack {
            println!("per accepted message: server {s:.0} ns");
        }
        if let Some(d) = db_ns {
            println!("database CPU per delivery: {d:.0} ns");
        }
    }
    let failed = a.strict && !failure.is_empty();
    Ok(json!({
        "mode": mode,
        "url": c.url,
        "urls": urls,
        "subscribers": a.subscribers,
        "publishers": a.publishers,
        "rooms": a.rooms,
        "rate": a.rate,
        "max_inflight": a.max_inflight,
        "seconds": window_secs,
        "published": total_sent,
        "deliveries": window_deliveries,
        "deliveries_per_sec": rate,
        "p50_us": h.hist.quantile(0.5),
        "p99_us": h.hist.quantile(0.99),
        "p999_us": h.hist.quantile(0.999),
        "max_us": h.hist.max(),
        "lost": lost,
        "duplicated": h.dups,
        "publish_errors": h.error_count,
        "acks": h.acks,
        "acked": acked,
        "acked_per_sec": acked_rate,
        "other_room": h.other_room,
        "bench_cpu_pct": report.bench_pct,
        "server_pids": c.pid,
        "server_cpu_secs": report.server_secs,
        "server_cpu_secs_by_pid": report
            .server_by_pid
            .iter()
            .map(|(p, s)| (p.to_string(), json!(s)))
            .collect::<serde_json::Map<_, _>>(),
        "server_ns_per_delivery": server_ns,
        "server_ns_per_ack": server_ns_ack,
        "db_pid": c.db_pid,
        "db_cpu_secs": report.db_secs,
        "db_ns_per_delivery": db_ns,
        "db_ns_per_ack": db_ns_ack,
        "failed": failed,
        "failure": failure.join(", "),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_without_parsing_json() {
        let f = br#"{"type":"message","id":42,"room":"bench","from":"a","nick":"a","text":"abc 0 7 99","ts":1}"#;
        assert_eq!(frame_type(f), b"message");
        assert_eq!(str_field(f, field!("text")), Some(&b"abc 0 7 99"[..]));
        assert_eq!(frame_type(br#"{"id":1,"type":"ack"}"#), b"ack");
        assert_eq!(parse_u64(b"12345"), Some(12345));
        assert_eq!(parse_u64(b"12x"), None);
    }

    #[test]
    fn one_room_keeps_the_room_name_and_everyone_receives_everything() {
        assert_eq!(room_name("bench", 1, 0), "bench");
        assert_eq!(receivers_per_publisher(1001, 1, 1, false), vec![1001]);
        assert_eq!(receivers_per_publisher(5, 2, 1, false), vec![5, 5]);
        assert!((0..5).all(|i| receives(i, 1, 1, false)));
    }

    #[test]
    fn rooms_are_assigned_round_robin_and_pairs_share_a_room() {
        assert_eq!(room_name("bench", 3, 2), "bench-2");
        // 3 publishers (0..3) and 7 subscribers (3..10) in 3 rooms: room 0 holds 0, 3, 6, 9.
        let rooms: Vec<u32> = (0..10).map(|i| room_index(i, 3)).collect();
        assert_eq!(rooms, vec![0, 1, 2, 0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(receivers_per_publisher(10, 3, 3, false), vec![4, 3, 3]);
        assert!(receives(9, 0, 3, false));
        assert!(!receives(9, 1, 3, false));
        // 100 publishers, no subscribers, 100 rooms: each receives only its own.
        assert_eq!(receivers_per_publisher(100, 100, 100, false), vec![1; 100]);
        // --own-only: only one's own messages, whatever the rooms.
        assert_eq!(receivers_per_publisher(10, 2, 1, true), vec![1, 1]);
        assert!(!receives(3, 0, 1, true));
    }

    #[test]
    fn window_waits_for_every_receiver_and_the_ack_in_either_order() {
        let mut w = Window::new(vec![2], true);
        for _ in 0..3 {
            w.push(0);
        }
        // seq 0: the ack first (cluster mode), then both copies.
        w.acked(0, 0);
        w.delivered(0, 0, 1);
        assert_eq!(w.inflight[0], 3);
        w.delivered(0, 0, 1);
        assert_eq!(w.inflight[0], 2);
        // seq 2 done before seq 1: stays queued until seq 1 is done.
        w.delivered(0, 2, 2);
        w.acked(0, 2);
        assert_eq!(w.inflight[0], 1);
        assert_eq!(w.base[0], 1);
        // seq 1: the copies first (single node), then the ack; duplicates change nothing.
        w.delivered(0, 1, 2);
        w.delivered(0, 1, 1);
        assert_eq!(w.inflight[0], 1);
        w.acked(0, 1);
        w.acked(0, 1);
        assert_eq!(w.inflight[0], 0);
        assert_eq!(w.base[0], 3);
        assert!(w.counts[0].is_empty());
        // A refused publish is done at once; without waiting for acks, deliveries suffice.
        w.push(0);
        w.refused(0, 3);
        assert_eq!(w.inflight[0], 0);
        let mut d = Window::new(vec![1], false);
        d.push(0);
        d.delivered(0, 0, 1);
        assert_eq!(d.inflight[0], 0);
        d.acked(0, 0);
        assert_eq!(d.inflight[0], 0);
    }

    #[test]
    fn url_lists() {
        assert_eq!(
            crate::parse_url_list("ws://a:1/ws, ws://b:2/ws").unwrap(),
            vec!["ws://a:1/ws", "ws://b:2/ws"]
        );
        assert_eq!(
            crate::parse_url_list("ws://a:1/ws").unwrap(),
            vec!["ws://a:1/ws"]
        );
        assert!(crate::parse_url_list("ws://a:1/ws,").is_err());
        assert!(crate::parse_url_list("").is_err());
    }
}
