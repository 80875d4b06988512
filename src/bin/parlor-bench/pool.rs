//! All of a run's connections on one `mio::Poll`, in one thread.

use std::io;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};
use parlor::ws::close::CloseCode;

use crate::conn::{Conn, ConnOut, Rng, State, Target};

/// What a mode does with connection events.
pub trait Handler {
    /// The upgrade completed; `out` queues frames on that connection.
    fn on_open(&mut self, _idx: usize, _now: Instant, _out: &mut ConnOut<'_>) {}
    /// A complete data message arrived. `now` is taken once per readiness event (one socket's
    /// read batch).
    fn on_message(
        &mut self,
        idx: usize,
        data: &[u8],
        text: bool,
        now: Instant,
        out: &mut ConnOut<'_>,
    );
    /// The connection ended; `error` says why unless we closed it.
    fn on_close(&mut self, _idx: usize, _error: Option<&str>) {}
}

pub struct Pool {
    poll: Poll,
    events: Events,
    pub conns: Vec<Conn>,
    pub rng: Rng,
    /// Where connections go: connection i to `targets[i % len]`.
    pub targets: Vec<Target>,
    dirty: Vec<usize>,
    pub open: usize,
    pub closed: usize,
}

impl Pool {
    /// A pool whose connections go round-robin over `targets` (at least one).
    pub fn new(targets: Vec<Target>) -> io::Result<Pool> {
        assert!(!targets.is_empty(), "a pool needs a target");
        Ok(Pool {
            poll: Poll::new()?,
            events: Events::with_capacity(4096),
            conns: Vec::new(),
            rng: Rng::from_clock(),
            targets,
            dirty: Vec::new(),
            open: 0,
            closed: 0,
        })
    }

    /// The target of connection `idx`.
    pub fn target_for(&self, idx: usize) -> &Target {
        &self.targets[idx % self.targets.len()]
    }

    /// Starts one more connection (to the next target, round-robin); returns its index.
    pub fn add(&mut self, source: Option<IpAddr>) -> io::Result<usize> {
        let idx = self.conns.len();
        let c = Conn::open(
            self.poll.registry(),
            Token(idx),
            &self.targets[idx % self.targets.len()],
            source,
            &mut self.rng,
        )?;
        self.conns.push(c);
        Ok(idx)
    }

    /// Queues a text frame on connection `idx` (flushed at the end of the turn).
    pub fn send_text(&mut self, idx: usize, payload: &[u8]) {
        let c = &mut self.conns[idx];
        let was_dirty = c.dirty;
        c.send(mio_text(), payload, &mut self.rng);
        if c.dirty && !was_dirty {
            self.dirty.push(idx);
        }
    }

    /// Remembers that connection `idx` has output queued (from `Conn::out`).
    pub fn mark_dirty(&mut self, idx: usize) {
        if self.conns[idx].dirty {
            self.dirty.push(idx);
        }
    }

    /// Closes every open connection politely.
    pub fn close_all(&mut self) {
        for i in 0..self.conns.len() {
            let c = &mut self.conns[i];
            if c.state == State::Open {
                c.close(CloseCode::Normal, &mut self.rng);
                self.dirty.push(i);
            }
        }
        self.flush();
    }

    /// One loop turn: wait up to `timeout` for events, dispatch them, flush queued output.
    pub fn turn(&mut self, timeout: Duration, h: &mut impl Handler) -> io::Result<()> {
        self.flush();
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        for ev in self.events.iter() {
            // Receive time per readiness event (not per poll turn): a turn can carry 1,000
            // readable sockets, and stamping them all with the turn's start would understate
            // the latency of the last ones by the time it takes to read the others.
            let now = Instant::now();
            let idx = ev.token().0;
            let Some(c) = self.conns.get_mut(idx) else {
                continue;
            };
            let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
            let writable = ev.is_writable() || ev.is_error();
            let was_dirty = c.dirty;
            let o = c.on_event(readable, writable, &mut self.rng, |data, text, out| {
                h.on_message(idx, data, text, now, out)
            });
            if o.opened {
                self.open += 1;
                h.on_open(idx, now, &mut c.out(&mut self.rng));
            }
            if o.closed {
                self.closed += 1;
                h.on_close(idx, c.error.as_deref());
                let _ = self.poll.registry().deregister(&mut c.stream);
            }
            if c.dirty && !was_dirty {
                self.dirty.push(idx);
            }
        }
        self.flush();
        Ok(())
    }

    fn flush(&mut self) {
        for i in std::mem::take(&mut self.dirty) {
            let c = &mut self.conns[i];
            if c.dirty {
                let _ = c.flush();
            }
        }
    }

    /// Connections currently open (upgraded and not closed).
    pub fn count_open(&self) -> usize {
        self.conns.iter().filter(|c| c.state == State::Open).count()
    }

    /// The first failure among the connections, if any.
    pub fn first_error(&self) -> Option<String> {
        self.conns.iter().find_map(|c| c.error.clone())
    }
}

fn mio_text() -> parlor::ws::frame::OpCode {
    parlor::ws::frame::OpCode::Text
}
