//! The bus thread: tails the replication log for the hub, and keeps the cluster's membership
//! (this node's heartbeat, expiry of nodes whose heartbeat stopped, pruning of old entries).
//!
//! Tailing reads `log` rows after the last position delivered, in order, 1000 at a time,
//! whenever `NOTIFY parlor_log` says the log grew, and at least every second without one: that
//! read doubles as the connection's keepalive, and it is what makes a missed notification (or
//! a whole outage) cost latency only. After a reconnect it goes on from the last position
//! delivered, so nothing is skipped and nothing delivered twice.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Statement};

use super::write::{append, begin_locked, body, APPEND};
use super::{describe, is_connection_loss, Backoff, Metrics, PgOptions, Target, CHANNEL};
use crate::chat::store::cluster::{LogEntry, LogEvent, NodeId};
use crate::chat::store::StoreEvent;
use crate::chat::Wake;

/// Entries read per statement.
const PAGE: i64 = 1000;

/// The longest wait for a notification: the bound on the latency of a missed one, and the
/// keepalive interval.
const POLL: Duration = Duration::from_secs(1);

/// How often old log entries are pruned (at most; `log_keep / 10` when that is shorter).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// A bus whose loop made no progress for this long is stuck inside a call that will not
/// return (the connection went silent with its socket still open: a frozen server process, a
/// proxy that stopped forwarding). The watchdog replaces it with a bus on a new connection.
/// Well above the longest healthy pause: a notification wait ([`POLL`]) plus a read.
pub(crate) const STALL: Duration = Duration::from_secs(5);

/// What every bus of a store shares, so that a replaced bus that wakes up later delivers
/// nothing: the generation of the current bus and the last position delivered, under one
/// lock taken for each delivery (exactly once, in order, whichever bus delivers).
pub(crate) struct Shared {
    delivered: Mutex<Delivered>,
    /// Milliseconds since `epoch` of the current bus's last loop iteration.
    beat: AtomicU64,
    epoch: Instant,
}

struct Delivered {
    generation: u64,
    last: i64,
}

impl Shared {
    pub(crate) fn new(last: i64) -> Arc<Shared> {
        Arc::new(Shared {
            delivered: Mutex::new(Delivered {
                generation: 0,
                last,
            }),
            beat: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    fn beat(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.beat.store(ms, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        let ms = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(ms.saturating_sub(self.beat.load(Ordering::Relaxed)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Delivered> {
        self.delivered.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Watches the current bus and replaces it when it stalls (see [`STALL`]); stops with the
/// store. The stuck bus is left to return on its own (its generation is stale, so it delivers
/// nothing and exits); it cannot be interrupted inside the client library's blocking call.
pub(crate) fn watch(first: Bus, stop: Arc<AtomicBool>) -> std::io::Result<JoinHandle<()>> {
    let setup = first.setup.clone();
    let shared = setup.shared.clone();
    shared.beat();
    let mut current = Some(spawn(first)?);
    std::thread::Builder::new()
        .name("chat-bus-watch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                if shared.quiet_for() < STALL {
                    continue;
                }
                let generation = {
                    let mut d = shared.lock();
                    d.generation += 1;
                    d.generation
                };
                log::error!(
                    "store bus: no progress for {}s (a silent connection); replacing it with a \
                     new connection (bus generation {generation})",
                    STALL.as_secs()
                );
                setup.metrics.bus_replaced();
                shared.beat();
                match spawn(setup.clone_for(generation)) {
                    Ok(h) => {
                        // The old one is not joined: it may never return.
                        current = Some(h);
                    }
                    Err(e) => log::error!("store bus: cannot start a new bus thread: {e}"),
                }
            }
            if let Some(h) = current.take() {
                // Joined only if it is not stuck: a stuck bus would hold the shutdown.
                if shared.quiet_for() < STALL {
                    let _ = h.join();
                }
            }
        })
}

fn spawn(bus: Bus) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("chat-bus".into())
        .spawn(move || bus.run())
}

/// What a bus is made from: kept by each bus, so the watchdog can make a replacement.
#[derive(Clone)]
pub(crate) struct BusSetup {
    pub(crate) target: Target,
    pub(crate) node: NodeId,
    pub(crate) opts: PgOptions,
    pub(crate) events: Sender<StoreEvent>,
    pub(crate) wake: Wake,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) shared: Arc<Shared>,
}

impl BusSetup {
    /// A replacement bus: connects on its first round and heartbeats at once.
    fn clone_for(&self, generation: u64) -> Bus {
        self.bus(generation, Instant::now())
    }

    /// A bus of `generation`, not connected yet, from the last position delivered.
    fn bus(&self, generation: u64, next_heartbeat: Instant) -> Bus {
        Bus {
            conn: None,
            last: self.shared.lock().last,
            backoff: Backoff::new(),
            next_heartbeat,
            next_prune: Instant::now() + prune_every(&self.opts),
            gap_reported: false,
            generation,
            setup: self.clone(),
        }
    }
}

pub(crate) struct Bus {
    /// `None` while disconnected; the statement reads the log.
    conn: Option<(Client, Statement)>,
    /// The last position delivered.
    last: i64,
    backoff: Backoff,
    next_heartbeat: Instant,
    next_prune: Instant,
    /// Logged once: entries after `last` were pruned before this node read them.
    gap_reported: bool,
    /// This bus's generation: once the watchdog replaced it, it delivers nothing and stops.
    generation: u64,
    setup: BusSetup,
}

impl Bus {
    /// The first bus, on `client` (already connected).
    pub(crate) fn new(client: Client, setup: BusSetup) -> Bus {
        let mut bus = setup.bus(0, Instant::now() + heartbeat_every(&setup.opts));
        match listen(client) {
            Ok(conn) => bus.conn = Some(conn),
            Err(e) => {
                log::warn!("store bus: {}", describe(&e));
                bus.lost();
            }
        }
        bus
    }

    /// Whether the watchdog replaced this bus.
    fn replaced(&self) -> bool {
        self.setup.shared.lock().generation != self.generation
    }

    pub(crate) fn run(mut self) {
        while !self.setup.stop.load(Ordering::Relaxed) {
            if self.replaced() {
                log::warn!(
                    "store bus: generation {} returned after being replaced; it stops",
                    self.generation
                );
                return;
            }
            self.setup.shared.beat();
            if self.conn.is_none() {
                if !self.backoff.due() {
                    let wait = self.backoff.until_next();
                    std::thread::sleep(wait.min(Duration::from_millis(100)));
                    continue;
                }
                self.reconnect();
                continue;
            }
            if let Err(e) = self.read() {
                self.failed("reading the log", e);
                continue;
            }
            if Instant::now() >= self.next_heartbeat {
                if let Err(e) = self.heartbeat() {
                    self.failed("heartbeat", e);
                    continue;
                }
            }
            if Instant::now() >= self.next_prune {
                self.next_prune = Instant::now() + prune_every(&self.setup.opts);
                if let Err(e) = self.prune() {
                    self.failed("pruning the log", e);
                    continue;
                }
            }
            if self.setup.stop.load(Ordering::Relaxed) {
                break;
            }
            let wait = self
                .next_heartbeat
                .saturating_duration_since(Instant::now())
                .min(POLL);
            if let Err(e) = self.wait(wait) {
                self.failed("waiting for notifications", e);
            }
        }
    }

    /// A statement failed: a lost connection is reconnected with backoff; anything else is
    /// logged (the next round tries again).
    fn failed(&mut self, what: &str, e: postgres::Error) {
        let lost = match &self.conn {
            Some((c, _)) => is_connection_loss(c, &e),
            None => true,
        };
        if lost {
            log::error!(
                "store bus: lost the connection to {} ({what}): {}",
                self.setup.target.shown(),
                describe(&e)
            );
            self.backoff.restart();
            self.lost();
        } else {
            log::error!("store bus: {what}: {}", describe(&e));
            if let Some((c, _)) = self.conn.as_mut() {
                let _ = c.batch_execute("ROLLBACK");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn lost(&mut self) {
        self.conn = None;
        self.backoff.failed();
    }

    fn reconnect(&mut self) {
        let r = self.setup.target.connect().and_then(listen);
        self.conn = self
            .backoff
            .outcome("store bus", &self.setup.target, &self.setup.metrics, r);
    }

    /// Delivers every entry after `last`.
    fn read(&mut self) -> Result<(), postgres::Error> {
        let Some((c, st)) = self.conn.as_mut() else {
            return Ok(());
        };
        loop {
            let rows = c.query(&*st, &[&self.last, &PAGE])?;
            self.setup.shared.beat();
            let Some(newest) = rows.last() else {
                self.setup.metrics.set_bus_lag(0.0);
                return Ok(());
            };
            self.setup.metrics.set_bus_lag(newest.get(3));
            let first: i64 = rows[0].get(0);
            if first != self.last + 1 && !self.gap_reported {
                // Positions are gap-free, so the entries in between were pruned (`log_keep`)
                // before this node read them: its state can no longer be brought up to date
                // from the log.
                log::error!(
                    "store bus: log entries {}..{} were pruned before this node read them; \
                     this node's state is stale: restart it",
                    self.last + 1,
                    first - 1
                );
                self.gap_reported = true;
            }
            let full = rows.len() as i64 == PAGE;
            let mut entries = Vec::with_capacity(rows.len());
            for r in &rows {
                let pos: i64 = r.get(0);
                let body: &str = r.get(2);
                match serde_json::from_str::<LogEvent>(body) {
                    Ok(event) => entries.push(LogEntry {
                        pos,
                        origin: r.get(1),
                        event,
                    }),
                    // Written by a newer parlor: this one cannot apply it.
                    Err(e) => log::error!("store bus: log entry {pos} unreadable ({e}): {body}"),
                }
                self.last = pos;
            }
            // Delivered under the shared lock, and only what is newer than what any bus
            // delivered: a replaced bus that got here late sends nothing twice.
            {
                let mut d = self.setup.shared.lock();
                if d.generation != self.generation {
                    return Ok(());
                }
                entries.retain(|e| e.pos > d.last);
                if let Some(e) = entries.last() {
                    d.last = e.pos;
                }
                self.last = self.last.max(d.last);
                self.setup.metrics.add_bus_entries(entries.len() as u64);
                if !entries.is_empty() {
                    let _ = self.setup.events.send(StoreEvent::Log(entries));
                    self.setup.wake.wake();
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Waits up to `wait` for a notification (and takes all that are queued).
    fn wait(&mut self, wait: Duration) -> Result<(), postgres::Error> {
        let Some((c, _)) = self.conn.as_mut() else {
            return Ok(());
        };
        let mut n = c.notifications();
        if n.timeout_iter(wait).next()?.is_some() {
            while n.iter().next()?.is_some() {}
        }
        Ok(())
    }

    /// Refreshes this node's heartbeat, expires nodes whose heartbeat is older than the TTL
    /// (their presence goes, and a `NodeGone` entry tells every node), counts live peers.
    fn heartbeat(&mut self) -> Result<(), postgres::Error> {
        self.next_heartbeat = Instant::now() + heartbeat_every(&self.setup.opts);
        let Some((c, _)) = self.conn.as_mut() else {
            return Ok(());
        };
        let node = self.setup.node.as_str();
        let ttl = self.setup.opts.node_ttl.as_secs_f64();
        let n = c.execute("UPDATE nodes SET heartbeat = now() WHERE id = $1", &[&node])?;
        if n == 0 {
            log::warn!(
                "store bus: this node ({node}) was declared gone (its heartbeat expired); \
                 registering it again"
            );
            c.execute(
                "INSERT INTO nodes (id, started, heartbeat) VALUES ($1, now(), now())
                 ON CONFLICT (id) DO UPDATE SET heartbeat = now()",
                &[&node],
            )?;
        }
        // Cheap check first, so the head lock is only taken when there is something to do.
        let stale = c.query_one(
            "SELECT count(*) FROM nodes WHERE heartbeat < now() - $1::float8 * interval '1 second'",
            &[&ttl],
        )?;
        if stale.get::<_, i64>(0) > 0 {
            let head = begin_locked(c)?;
            let gone: Vec<String> = c
                .query(
                    "DELETE FROM nodes WHERE heartbeat < now() - $1::float8 * interval '1 second'
                     RETURNING id",
                    &[&ttl],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if gone.is_empty() {
                c.batch_execute("COMMIT")?;
            } else {
                c.execute("DELETE FROM presence WHERE node = ANY($1)", &[&gone])?;
                let rows: Vec<(i64, String)> = gone
                    .iter()
                    .zip(head + 1..)
                    .map(|(g, pos)| (pos, body(&LogEvent::NodeGone { node: g.clone() })))
                    .collect();
                let top = head + rows.len() as i64;
                append(c, APPEND, node, &rows, top)?;
                c.batch_execute("COMMIT")?;
                log::warn!("store bus: nodes {gone:?} stopped heartbeating; declared gone");
            }
        }
        let peers: i64 = c
            .query_one(
                "SELECT count(*) FROM nodes
                 WHERE id <> $1 AND heartbeat >= now() - $2::float8 * interval '1 second'",
                &[&node, &ttl],
            )?
            .get(0);
        self.setup.metrics.set_peers(peers.max(0) as u64);
        Ok(())
    }

    /// Deletes log entries older than `log_keep`.
    fn prune(&mut self) -> Result<(), postgres::Error> {
        let Some((c, _)) = self.conn.as_mut() else {
            return Ok(());
        };
        let keep = self.setup.opts.log_keep.as_secs_f64();
        c.execute(
            "DELETE FROM log WHERE ts < now() - $1::float8 * interval '1 second'",
            &[&keep],
        )?;
        Ok(())
    }
}

fn heartbeat_every(opts: &PgOptions) -> Duration {
    (opts.node_ttl / 5).max(Duration::from_millis(10))
}

fn prune_every(opts: &PgOptions) -> Duration {
    (opts.log_keep / 10).min(PRUNE_EVERY)
}

/// `LISTEN`s on a fresh connection and prepares the log read.
fn listen(mut c: Client) -> Result<(Client, Statement), postgres::Error> {
    c.batch_execute(&format!("LISTEN {CHANNEL}"))?;
    let st = c.prepare(
        "SELECT pos, origin, body, EXTRACT(EPOCH FROM now() - ts)::float8 FROM log
         WHERE pos > $1 ORDER BY pos LIMIT $2",
    )?;
    Ok((c, st))
}
