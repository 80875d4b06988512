//! The bus thread: tails the replication log for the hub, and keeps the cluster's membership
//! (this node's heartbeat, expiry of nodes whose heartbeat stopped, pruning of old entries).
//!
//! Tailing reads `log` rows after the last position delivered, in order, 1000 at a time,
//! whenever `NOTIFY parlor_log` says the log grew, and at least every second without one: that
//! read doubles as the connection's keepalive, and it is what makes a missed notification (or
//! a whole outage) cost latency only. After a reconnect it goes on from the last position
//! delivered, so nothing is skipped and nothing delivered twice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Statement};

use super::write::{append, begin_locked, body, APPEND, BACKOFF_FIRST, BACKOFF_MAX};
use super::{describe, is_connection_loss, Metrics, PgOptions, Target, CHANNEL};
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

pub(crate) struct Bus {
    /// `None` while disconnected; the statement reads the log.
    conn: Option<(Client, Statement)>,
    target: Target,
    node: NodeId,
    /// The last position delivered.
    last: i64,
    opts: PgOptions,
    events: Sender<StoreEvent>,
    wake: Wake,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    backoff: Duration,
    next_try: Instant,
    next_heartbeat: Instant,
    next_prune: Instant,
    /// Logged once: entries after `last` were pruned before this node read them.
    gap_reported: bool,
}

impl Bus {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        client: Client,
        target: Target,
        node: NodeId,
        last: i64,
        opts: PgOptions,
        events: Sender<StoreEvent>,
        wake: Wake,
        metrics: Arc<Metrics>,
        stop: Arc<AtomicBool>,
    ) -> Bus {
        let now = Instant::now();
        let mut bus = Bus {
            conn: None,
            target,
            node,
            last,
            opts,
            events,
            wake,
            metrics,
            stop,
            backoff: BACKOFF_FIRST,
            next_try: now,
            next_heartbeat: now + heartbeat_every(&opts),
            next_prune: now + prune_every(&opts),
            gap_reported: false,
        };
        match listen(client) {
            Ok(conn) => bus.conn = Some(conn),
            Err(e) => {
                log::warn!("store bus: {}", describe(&e));
                bus.lost();
            }
        }
        bus
    }

    pub(crate) fn run(mut self) {
        while !self.stop.load(Ordering::Relaxed) {
            if self.conn.is_none() {
                let now = Instant::now();
                if now < self.next_try {
                    std::thread::sleep((self.next_try - now).min(Duration::from_millis(100)));
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
                self.next_prune = Instant::now() + prune_every(&self.opts);
                if let Err(e) = self.prune() {
                    self.failed("pruning the log", e);
                    continue;
                }
            }
            if self.stop.load(Ordering::Relaxed) {
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
                self.target.shown(),
                describe(&e)
            );
            self.backoff = BACKOFF_FIRST;
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
        self.next_try = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    fn reconnect(&mut self) {
        match self.target.connect().and_then(listen) {
            Ok(conn) => {
                log::info!("store bus: reconnected to {}", self.target.shown());
                self.conn = Some(conn);
                self.metrics.reconnected();
                self.backoff = BACKOFF_FIRST;
            }
            Err(e) => {
                if self.backoff == BACKOFF_FIRST {
                    log::warn!(
                        "store bus: reconnecting to {}: {}",
                        self.target.shown(),
                        describe(&e)
                    );
                }
                self.lost();
            }
        }
    }

    /// Delivers every entry after `last`.
    fn read(&mut self) -> Result<(), postgres::Error> {
        let Some((c, st)) = self.conn.as_mut() else {
            return Ok(());
        };
        loop {
            let rows = c.query(&*st, &[&self.last, &PAGE])?;
            let Some(newest) = rows.last() else {
                self.metrics.set_bus_lag(0.0);
                return Ok(());
            };
            self.metrics.set_bus_lag(newest.get(3));
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
            self.metrics.add_bus_entries(entries.len() as u64);
            if !entries.is_empty() {
                let _ = self.events.send(StoreEvent::Log(entries));
                self.wake.wake();
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
        self.next_heartbeat = Instant::now() + heartbeat_every(&self.opts);
        let Some((c, _)) = self.conn.as_mut() else {
            return Ok(());
        };
        let node = self.node.as_str();
        let ttl = self.opts.node_ttl.as_secs_f64();
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
        self.metrics.set_peers(peers.max(0) as u64);
        Ok(())
    }

    /// Deletes log entries older than `log_keep`.
    fn prune(&mut self) -> Result<(), postgres::Error> {
        let Some((c, _)) = self.conn.as_mut() else {
            return Ok(());
        };
        let keep = self.opts.log_keep.as_secs_f64();
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
