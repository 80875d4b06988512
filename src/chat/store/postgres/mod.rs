//! The PostgreSQL [`Store`] of cluster mode: several parlor nodes on one database, which is
//! both the shared store and the bus between them (see [`super::cluster`] for the design).
//!
//! Two threads per node, each with its own connection:
//! - the writer ([`write`]) takes the loop's batches, applies them in one transaction each
//!   under the `log_head` row lock, appends their log entries (positions are message ids and
//!   change seqs), answers the queries in between ([`query`]) and reports the commit;
//! - the bus ([`bus`]) tails the log (`LISTEN parlor_log` plus a read at least every second),
//!   keeps this node's heartbeat and expires nodes whose heartbeat stopped.
//!
//! [`schema`] creates and migrates the tables and loads the startup state; [`copy`] moves a
//! single-node SQLite chat database into PostgreSQL (`parlor migrate`). The `postgres` crate's
//! blocking client runs a small tokio runtime on these threads; the event loop never waits on
//! it (it only sends requests over a channel and reads events from another).

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Channels, Loaded, Store, StoreError, StoreEvent, StoreReq};
use crate::chat::Wake;

mod bus;
mod copy;
mod query;
mod schema;
mod search;
mod write;

pub use copy::migrate_from_sqlite;
pub use search::{fold, tsquery};

/// Tuning of a clustered store.
#[derive(Debug, Clone, Copy)]
pub struct PgOptions {
    /// A node whose heartbeat is older than this is declared gone (its users go offline on
    /// every node). The heartbeat runs every `node_ttl / 5`.
    pub node_ttl: Duration,
    /// Connecting (at start and when reconnecting) gives up after this long.
    pub connect_timeout: Duration,
    /// Log entries older than this are deleted; a node that falls further behind must
    /// restart.
    pub log_keep: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            node_ttl: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(5),
            log_keep: Duration::from_secs(3600),
        }
    }
}

/// The single `pg_advisory_xact_lock` key under which the schema is created or migrated, so
/// nodes starting at once do it one after the other ("parlor" in ASCII).
const SCHEMA_LOCK: i64 = 0x7061_726c_6f72;

/// The channel `NOTIFY` uses when the log grew (payload: the new head position).
const CHANNEL: &str = "parlor_log";

/// Reconnect backoff: from the first to the last, doubling.
pub(crate) const BACKOFF_FIRST: Duration = Duration::from_millis(100);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// When the writer or the bus tries a lost connection again: the first retry after
/// [`BACKOFF_FIRST`], each failed attempt doubling the wait up to [`BACKOFF_MAX`].
pub(crate) struct Backoff {
    delay: Duration,
    next_try: Instant,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff {
            delay: BACKOFF_FIRST,
            next_try: Instant::now(),
        }
    }

    /// A working connection was lost just now: the first retry comes soon.
    pub(crate) fn restart(&mut self) {
        self.delay = BACKOFF_FIRST;
    }

    /// The connection went, or an attempt failed: the next try is after the delay, which
    /// doubles.
    pub(crate) fn failed(&mut self) {
        self.next_try = Instant::now() + self.delay;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
    }

    pub(crate) fn until_next(&self) -> Duration {
        self.next_try.saturating_duration_since(Instant::now())
    }

    pub(crate) fn due(&self) -> bool {
        Instant::now() >= self.next_try
    }

    /// Takes the result of a connection attempt by `who` ("store", "store bus"): a success is
    /// logged, counted and resets the delay; a failure is logged only as the first of a row
    /// (an outage is one line, not one per retry) and schedules the next try.
    pub(crate) fn outcome<T>(
        &mut self,
        who: &str,
        target: &Target,
        metrics: &Metrics,
        r: Result<T, postgres::Error>,
    ) -> Option<T> {
        match r {
            Ok(conn) => {
                log::info!("{who}: reconnected to {}", target.shown());
                metrics.reconnected();
                self.delay = BACKOFF_FIRST;
                Some(conn)
            }
            Err(e) => {
                if self.delay == BACKOFF_FIRST {
                    log::warn!(
                        "{who}: reconnecting to {}: {}",
                        target.shown(),
                        describe(&e)
                    );
                }
                self.failed();
                None
            }
        }
    }
}

/// Where to connect, and how to name it in messages (the URL without its password).
#[derive(Clone)]
pub(crate) struct Target {
    config: postgres::Config,
    shown: String,
}

impl Target {
    pub(crate) fn parse(url: &str, connect_timeout: Duration) -> Result<Target, StoreError> {
        let shown_raw = redact(url);
        let mut config = postgres::Config::from_str(url).map_err(|e| StoreError::Open {
            path: PathBuf::from(&shown_raw),
            source: Box::new(PgError::of(&e)),
        })?;
        config
            .connect_timeout(connect_timeout)
            .application_name("parlor")
            // A peer that vanished without closing the socket (power loss, network cut) is
            // noticed in seconds rather than at TCP's default of hours.
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3)
            .tcp_user_timeout(Duration::from_secs(15));
        // A node that freezes inside a transaction (stopped process, lost network with the
        // socket still open) holds the log head lock, and with it every node's writes: the
        // server ends such a session after 10 s, which frees the lock.
        let mut options = config
            .get_options()
            .map(|o| format!("{o} "))
            .unwrap_or_default();
        options.push_str("-c idle_in_transaction_session_timeout=10s");
        config.options(&options);
        let shown = shown_of(&config).unwrap_or(shown_raw);
        Ok(Target { config, shown })
    }

    pub(crate) fn connect(&self) -> Result<postgres::Client, postgres::Error> {
        self.config.connect(postgres::NoTls)
    }

    /// The error of a failed connect, naming the server (never the password).
    pub(crate) fn open_error(&self, e: &postgres::Error) -> StoreError {
        StoreError::Open {
            path: PathBuf::from(&self.shown),
            source: Box::new(PgError::of(e)),
        }
    }

    pub(crate) fn shown(&self) -> &str {
        &self.shown
    }
}

/// `postgres://user@host:port/db` from a parsed config (no password).
fn shown_of(c: &postgres::Config) -> Option<String> {
    let host = match c.get_hosts().first()? {
        postgres::config::Host::Tcp(h) => h.clone(),
        postgres::config::Host::Unix(p) => p.display().to_string(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    let user = c.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    let db = c.get_dbname().unwrap_or("");
    Some(format!("postgres://{user}{host}:{port}/{db}"))
}

/// A URL with any `:password@` removed (for messages about a URL that did not even parse).
fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // key=value form: drop a password=… pair.
        return url
            .split_whitespace()
            .filter(|kv| !kv.starts_with("password="))
            .collect::<Vec<_>>()
            .join(" ");
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    let user = userinfo.split(':').next().unwrap_or("");
    format!("{}{}@{}", &url[..scheme_end + 3], user, &rest[at + 1..])
}

/// A PostgreSQL error as text that says what the server said (the `postgres` crate's own
/// `Display` of a server error is just "db error").
#[derive(Debug)]
pub(crate) struct PgError(String);

impl PgError {
    pub(crate) fn of(e: &postgres::Error) -> PgError {
        PgError(describe(e))
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PgError {}

/// "FATAL: password authentication failed for user …", "error connecting to server:
/// Connection refused (os error 111)", …
pub(crate) fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// A statement error mapped to a [`StoreError::Sql`].
pub(crate) fn sql(context: &'static str) -> impl FnOnce(postgres::Error) -> StoreError {
    move |e| StoreError::Sql {
        context,
        source: Box::new(PgError::of(&e)),
    }
}

/// Whether `e` means the connection is gone (or going): the server is unreachable, was shut
/// down, or closed the session. Any other error is a statement's own failure (which must not
/// send the store into a reconnect loop).
pub(crate) fn is_connection_loss(client: &postgres::Client, e: &postgres::Error) -> bool {
    if client.is_closed() || e.is_closed() {
        return true;
    }
    match e.code() {
        // Class 08: connection exception; 57P01..57P03: admin/crash shutdown, cannot connect
        // now; 53300: too many connections.
        Some(code) => {
            let c = code.code();
            c.starts_with("08") || c.starts_with("57P") || c == "53300"
        }
        // Not the server's answer: the crate's error kind says whether it was the transport
        // (its kinds are not public; their texts are stable in 0.19) or our own values.
        None => {
            let kind = e.to_string();
            [
                "error communicating with the server",
                "timeout waiting for server",
                "error connecting to server",
                "unexpected message from server",
                "error parsing response from server",
                "error performing TLS handshake",
            ]
            .iter()
            .any(|k| kind.starts_with(k))
        }
    }
}

/// The figures of [`Store::metrics`], updated by the threads.
#[derive(Default)]
pub(crate) struct Metrics {
    /// f64 bits: the last batch's duration (s).
    rtt: AtomicU64,
    reconnects: AtomicU64,
    peers: AtomicU64,
    /// f64 bits: the bus's lag (s).
    bus_lag: AtomicU64,
    bus_entries: AtomicU64,
    /// Buses the watchdog replaced because they stalled.
    bus_stalls: AtomicU64,
}

impl Metrics {
    pub(crate) fn set_rtt(&self, d: Duration) {
        self.rtt.store(d.as_secs_f64().to_bits(), Ordering::Relaxed);
    }
    pub(crate) fn reconnected(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn set_peers(&self, n: u64) {
        self.peers.store(n, Ordering::Relaxed);
    }
    pub(crate) fn set_bus_lag(&self, secs: f64) {
        self.bus_lag
            .store(secs.max(0.0).to_bits(), Ordering::Relaxed);
    }
    pub(crate) fn bus_replaced(&self) {
        self.bus_stalls.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_bus_entries(&self, n: u64) {
        self.bus_entries.fetch_add(n, Ordering::Relaxed);
    }
}

/// The PostgreSQL store: the request channel to the writer, the event channel both threads
/// send on, and the two threads.
pub struct PgStore {
    /// `None` after [`Store::shutdown`].
    channels: Channels,
    writer: Option<JoinHandle<()>>,
    bus: Option<JoinHandle<()>>,
    stop_bus: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

/// Opens the cluster store at `url`: connects, creates or migrates the schema (under an
/// advisory lock), registers this node, loads the startup state in one snapshot and starts the
/// writer and bus threads (which call `wake.wake()` after sending events). Refs of messages
/// with `ts >= dedup_since` are loaded for retry deduplication. The returned id reservation is
/// `i64::MAX`: ids are log positions, handed out by the database.
pub fn open_postgres(
    url: &str,
    opts: PgOptions,
    dedup_since: i64,
    wake: Wake,
) -> Result<(Box<dyn Store>, Loaded, i64), StoreError> {
    let (store, loaded) = PgStore::open(url, opts, dedup_since, wake)?;
    Ok((Box::new(store), loaded, i64::MAX))
}

impl PgStore {
    /// See [`open_postgres`].
    pub fn open(
        url: &str,
        opts: PgOptions,
        dedup_since: i64,
        wake: Wake,
    ) -> Result<(PgStore, Loaded), StoreError> {
        let target = Target::parse(url, opts.connect_timeout)?;
        let mut client = target.connect().map_err(|e| target.open_error(&e))?;
        schema::migrate(&mut client, target.shown())?;
        let node = schema::new_node_id()?;
        schema::register_node(&mut client, &node)?;
        let loaded = schema::load(&mut client, &node, dedup_since, opts.node_ttl)?;
        let log_pos = loaded.cluster.as_ref().map_or(0, |c| c.log_pos);
        // The bus gets a connection of its own; the writer keeps this one.
        let bus_client = target.connect().map_err(|e| target.open_error(&e))?;
        let metrics = Arc::new(Metrics::default());
        let stop_bus = Arc::new(AtomicBool::new(false));
        let (tx, req_rx) = channel();
        let (ev_tx, rx) = channel();
        let writer = write::Writer::new(
            client,
            target.clone(),
            node.clone(),
            ev_tx.clone(),
            wake.clone(),
            metrics.clone(),
        )
        .map_err(sql("prepare statements"))?;
        let writer = std::thread::Builder::new()
            .name("chat-store".into())
            .spawn(move || writer.run(req_rx))
            .map_err(StoreError::Thread)?;
        let bus = bus::Bus::new(
            bus_client,
            bus::BusSetup {
                target,
                node,
                opts,
                events: ev_tx,
                wake,
                metrics: metrics.clone(),
                stop: stop_bus.clone(),
                shared: bus::Shared::new(log_pos),
            },
        );
        // The watchdog runs the bus and replaces it if it stalls on a silent connection.
        let bus = bus::watch(bus, stop_bus.clone()).map_err(StoreError::Thread)?;
        let store = PgStore {
            channels: Channels::new(tx, rx),
            writer: Some(writer),
            bus: Some(bus),
            stop_bus,
            metrics,
        };
        Ok((store, loaded))
    }
}

impl Store for PgStore {
    fn submit(&mut self, reqs: Vec<StoreReq>) {
        self.channels.submit(reqs);
    }

    fn try_event(&mut self) -> Option<StoreEvent> {
        self.channels.try_event()
    }

    fn shutdown(&mut self) {
        // The writer commits everything sent before Shutdown, then removes this node
        // (presence, `nodes` row, a `NodeGone` entry), then exits.
        self.channels.stop();
        if let Some(h) = self.writer.take() {
            if h.join().is_err() {
                log::error!("chat: store writer thread panicked");
            }
        }
        self.stop_bus.store(true, Ordering::Relaxed);
        if let Some(h) = self.bus.take() {
            if h.join().is_err() {
                log::error!("chat: store bus thread panicked");
            }
        }
    }

    fn metrics(&self) -> Vec<(&'static str, &'static str, f64)> {
        let m = &self.metrics;
        let f = |a: &AtomicU64| f64::from_bits(a.load(Ordering::Relaxed));
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        vec![
            (
                "parlor_cluster_store_rtt_seconds",
                "Duration of the last store batch (transaction with its round trips).",
                f(&m.rtt),
            ),
            (
                "parlor_cluster_reconnects_total",
                "Times a store connection to PostgreSQL was re-established.",
                n(&m.reconnects),
            ),
            (
                "parlor_cluster_peers",
                "Live nodes other than this one, at the last heartbeat.",
                n(&m.peers),
            ),
            (
                "parlor_cluster_bus_lag_seconds",
                "Age of the newest log entry at the last bus read (0 when caught up).",
                f(&m.bus_lag),
            ),
            (
                "parlor_cluster_bus_entries_total",
                "Log entries delivered by the bus.",
                n(&m.bus_entries),
            ),
            (
                "parlor_cluster_bus_stalls_total",
                "Times the bus made no progress for 5 s (a silent connection) and was replaced.",
                n(&m.bus_stalls),
            ),
        ]
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_password() {
        assert_eq!(
            redact("postgres://parlor:s3cret@db:5432/chat"),
            "postgres://parlor@db:5432/chat"
        );
        assert_eq!(redact("postgres://db/chat"), "postgres://db/chat");
        assert_eq!(redact("host=db password=s3cret user=p"), "host=db user=p");
        let t = Target::parse(
            "postgres://parlor:s3cret@127.0.0.1:5433/chat",
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(t.shown(), "postgres://parlor@127.0.0.1:5433/chat");
        let e = Target::parse("postgres://u:s3cret@[bad", Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }
}
