//! The chat service (protocol v1 on `/ws`). See `docs/PROTOCOL.md` and the "Chat" section of
//! `docs/ARCHITECTURE.md`.
//!
//! Modules, each owning one thing:
//! - [`core`]: the sans-IO [`core::Hub`], every decision of the chat; `core::cmd` has one
//!   file per command family.
//! - [`protocol`]: wire types and the pure client-frame parser; [`error`]: error codes.
//! - [`validate`]: field formats and limits; [`confusable`]: look-alike names.
//! - [`frame`]: encoding a server text frame once for fan-out.
//! - [`store`]: the `Store` trait and its vocabulary; [`store::sqlite`]: SQLite on its own
//!   thread, group commit, schema migrations.
//! - [`auth`]: argon2id on worker threads, tokens.
//! - [`ratelimit`]: token bucket and login failure throttle; [`hashq`]: the fair queue in
//!   front of the hashing threads.
//! - [`service`]: [`ChatService`], the adapter: `impl Service`, carries out the hub's effects.
//! - [`admin`]: `parlor user …`, the operator's account commands (another process, same
//!   store).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub mod admin;
pub mod auth;
pub mod confusable;
pub mod core;
pub mod error;
pub mod frame;
pub mod hashq;
pub mod protocol;
pub mod ratelimit;
pub mod search;
pub mod service;
pub mod store;
pub mod validate;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;

pub use protocol::{parse_client_frame, ClientFrame, Command, ParseError};
pub use service::ChatService;

/// Whether anyone may create an account (`--registration`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// `register` creates accounts.
    Open,
    /// `register` answers `registration_closed`; an operator creates the accounts.
    Closed,
}

impl Registration {
    pub fn as_str(self) -> &'static str {
        match self {
            Registration::Open => "open",
            Registration::Closed => "closed",
        }
    }
}

/// Durability of acknowledged messages (`--durability`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurabilityArg {
    /// Acked messages survive the process being killed (WAL, synchronous=NORMAL).
    Normal,
    /// Acked messages also survive power loss (every batch is fsynced).
    Full,
}

/// Chat flags, flattened into [`crate::config::Config`].
#[derive(clap::Args, Debug, Clone)]
pub struct ChatConfig {
    /// Largest WebSocket message accepted on /ws, in bytes (larger closes with 1009).
    #[arg(long, env = "PARLOR_CHAT_MAX_MESSAGE", default_value_t = 64 * 1024)]
    pub chat_max_message: usize,

    /// open: anyone may create an account with `register`; closed: `register` answers
    /// `registration_closed` (a private server). `GET /api/server` tells the browser client.
    #[arg(long, env = "PARLOR_REGISTRATION", value_enum, default_value_t = Registration::Open)]
    pub registration: Registration,

    /// Chat messages (say/dm) per second per user; 0 disables the limit.
    #[arg(long, env = "PARLOR_RATE_LIMIT", default_value_t = 10.0)]
    pub rate_limit: f64,

    /// Chat messages a user may send in a burst before --rate-limit applies.
    #[arg(long, env = "PARLOR_RATE_BURST", default_value_t = 20.0)]
    pub rate_burst: f64,

    /// normal: acked messages survive kill -9; full: also power loss (fsync per batch).
    #[arg(long, env = "PARLOR_DURABILITY", value_enum, default_value_t = DurabilityArg::Normal)]
    pub durability: DurabilityArg,

    /// Longest message text, in characters (longer gets `too_long`).
    #[arg(long, env = "PARLOR_MAX_TEXT", default_value_t = 4000)]
    pub max_text: usize,

    /// Messages of history in the `joined` reply.
    #[arg(long, env = "PARLOR_HISTORY_ON_JOIN", default_value_t = 50)]
    pub history_on_join: usize,

    /// Rooms one user may be a member of.
    #[arg(long, env = "PARLOR_MAX_ROOMS_PER_USER", default_value_t = 200)]
    pub max_rooms_per_user: usize,

    /// Failed logins for one account from one client address (attempts still being checked
    /// count too) after which that address's logins to that account get `rate_limited` until
    /// the oldest failure is --login-window old; 0 disables all login throttles.
    #[arg(long, env = "PARLOR_LOGIN_THROTTLE", default_value_t = 5)]
    pub login_throttle: usize,

    /// Failed logins from one client address, to any accounts, within --login-window after
    /// which that address's logins get `rate_limited`.
    #[arg(long, env = "PARLOR_LOGIN_THROTTLE_IP", default_value_t = 20)]
    pub login_throttle_ip: usize,

    /// Failed logins for one account from all addresses together within --login-window after
    /// which every login to it gets `rate_limited`. Much higher than --login-throttle: a few
    /// wrong guesses from elsewhere must not lock the owner out; this only stops a guessing
    /// campaign spread over many addresses.
    #[arg(long, env = "PARLOR_LOGIN_THROTTLE_ACCOUNT", default_value_t = 100)]
    pub login_throttle_account: usize,

    /// Password hashes (register/login) waiting per client address; more get `rate_limited`
    /// at once, without hashing. 0: no per-address bound.
    #[arg(long, env = "PARLOR_HASH_QUEUE_PER_IP", default_value_t = 16)]
    pub hash_queue_per_ip: usize,

    /// Password hashes waiting in total; more get `rate_limited` at once. 0: no bound.
    #[arg(long, env = "PARLOR_HASH_QUEUE", default_value_t = 1024)]
    pub hash_queue: usize,

    /// Seconds a session token stays valid without being used (resume, or a connection using
    /// it closing); an expired token gets `auth_failed`. Default 30 days.
    #[arg(long, env = "PARLOR_SESSION_TTL", default_value = "2592000", value_parser = crate::units::parse_secs)]
    pub session_ttl: Duration,

    /// Seconds a /ws connection may stay unauthenticated; then it is closed with 1008.
    #[arg(long, env = "PARLOR_AUTH_TIMEOUT", default_value = "30", value_parser = crate::units::parse_secs)]
    pub auth_timeout: Duration,

    /// `history` requests per second per user (token bucket); more get `rate_limited`.
    /// 0 disables.
    #[arg(long, env = "PARLOR_QUERY_RATE", default_value_t = 10.0)]
    pub query_rate: f64,

    /// `history` requests a user may send in a burst before --query-rate applies.
    #[arg(long, env = "PARLOR_QUERY_BURST", default_value_t = 20.0)]
    pub query_burst: f64,

    /// `history` requests one connection may have waiting for the store; more get
    /// `rate_limited`.
    #[arg(long, env = "PARLOR_QUERIES_IN_FLIGHT", default_value_t = 4)]
    pub queries_in_flight: usize,

    /// Requests one connection may send while its join or sign-in waits on a worker thread
    /// (they run in order afterwards); more close the connection with 1008.
    #[arg(long, env = "PARLOR_MAX_PENDING_REQUESTS", default_value_t = 256)]
    pub max_pending_requests: usize,

    /// Registrations accepted from one client address per --login-window (each costs an
    /// argon2 hash and an account); 0 disables, and so does --rate-limit 0 (benchmarks and
    /// browser tests register many accounts from one address).
    #[arg(long, env = "PARLOR_REGISTER_THROTTLE", default_value_t = 20)]
    pub register_throttle: usize,

    /// Window for --login-throttle and --register-throttle, in seconds.
    #[arg(long, env = "PARLOR_LOGIN_WINDOW", default_value = "60", value_parser = crate::units::parse_secs)]
    pub login_window: Duration,

    /// Seconds a `ref` is remembered for retry deduplication of say/dm.
    #[arg(long, env = "PARLOR_DEDUP_WINDOW", default_value = "600", value_parser = crate::units::parse_secs)]
    pub dedup_window: Duration,

    /// Refs remembered per user for deduplication (oldest forgotten first).
    #[arg(long, env = "PARLOR_DEDUP_MAX_REFS", default_value_t = 1000)]
    pub dedup_max_refs: usize,

    /// Times one message may be edited (more gets `bad_request`).
    #[arg(long, env = "PARLOR_MAX_EDITS", default_value_t = 100)]
    pub max_edits: u32,

    /// Seconds change events (edits, deletes, reactions) are kept for `catchup`; a client
    /// away longer gets `reset` and reloads its conversations.
    #[arg(long, env = "PARLOR_EVENT_RETENTION", default_value = "604800", value_parser = crate::units::parse_secs)]
    pub event_retention: Duration,

    /// Change events kept for `catchup` whatever their age (the newest ones).
    #[arg(long, env = "PARLOR_EVENT_RETENTION_COUNT", default_value_t = 100_000)]
    pub event_retention_count: usize,

    /// Seconds between two `typing` frames forwarded for the same user and target.
    #[arg(long, env = "PARLOR_TYPING_INTERVAL", default_value = "2", value_parser = crate::units::parse_secs)]
    pub typing_interval: Duration,

    /// Password hashing threads.
    #[arg(long, env = "PARLOR_HASH_THREADS", default_value_t = 1)]
    pub hash_threads: usize,

    /// argon2id memory cost in KiB (OWASP: 19456). Lower only for tests.
    #[arg(long, env = "PARLOR_ARGON2_MEMORY", default_value_t = 19456)]
    pub argon2_memory: u32,

    /// argon2id iterations (OWASP: 2). Lower only for tests.
    #[arg(long, env = "PARLOR_ARGON2_ITERATIONS", default_value_t = 2)]
    pub argon2_iterations: u32,

    /// Cluster mode: a PostgreSQL URL (postgres://USER:PASS@HOST:PORT/DB) used as the chat
    /// store and as the bus between nodes, instead of SQLite in --data. Every node of one chat
    /// gets the same URL. See docs/CLUSTER.md.
    #[arg(long, env = "PARLOR_DATABASE", global = true)]
    pub database: Option<String>,

    /// Cluster mode: seconds after its last heartbeat that a node counts as gone (its users go
    /// offline for the others). Nodes heartbeat every fifth of it.
    #[arg(long, env = "PARLOR_NODE_TTL", default_value = "15", value_parser = crate::units::parse_secs)]
    pub node_ttl: Duration,
}

/// Wakes the event loop from a worker thread. The waker only exists after
/// [`crate::service::Service::init`], but workers start in `open`, so they share a cell that
/// is filled later; a result produced before that is still in the channel and collected by the
/// first `on_wake`.
#[derive(Clone, Default)]
pub struct Wake(Arc<OnceLock<Arc<mio::Waker>>>);

impl Wake {
    pub fn set(&self, waker: Arc<mio::Waker>) {
        let _ = self.0.set(waker);
    }

    pub fn wake(&self) {
        if let Some(w) = self.0.get() {
            if let Err(e) = w.wake() {
                log::warn!("chat: wake failed: {e}");
            }
        }
    }
}
