//! Every flag and every limit, in one struct, so `parlor --help` is the whole operator manual.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::units::{parse_bytes, parse_secs};

/// Parlor: a self-hosted real-time chat server.
///
/// Every flag can also be set by the environment variable shown with it (`PARLOR_` and the
/// flag's name in capitals); a flag on the command line wins.
#[derive(Parser, Debug, Clone)]
#[command(name = "parlor", version, about)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port; the bound address is printed on stdout).
    #[arg(long, env = "PARLOR_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// PEM certificate chain for built-in TLS: with --tls-key, --listen serves HTTPS and
    /// wss:// (TLS 1.2 and 1.3). SIGHUP reloads both files; new handshakes use the new pair.
    #[arg(long, env = "PARLOR_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for --tls-cert.
    #[arg(long, env = "PARLOR_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// A second address serving only /metrics and /healthz, plain HTTP, to anyone who reaches
    /// it (for a Prometheus scraper on a private network). Off by default.
    #[arg(long, env = "PARLOR_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Maximum simultaneous connections on --metrics-listen; extra ones are closed.
    #[arg(long, env = "PARLOR_METRICS_MAX_CONNECTIONS", default_value_t = 16)]
    pub metrics_max_connections: usize,

    /// Serve the browser client from this directory instead of the copy built into the binary
    /// (for working on the client without rebuilding).
    #[arg(long, env = "PARLOR_WWW")]
    pub www: Option<PathBuf>,

    /// Directory for chat storage (created if missing).
    #[arg(long, env = "PARLOR_DATA", default_value = "data", global = true)]
    pub data: PathBuf,

    /// Log level: error, warn, info, debug or trace.
    #[arg(long, env = "PARLOR_LOG_LEVEL", default_value = "info")]
    pub log_level: log::LevelFilter,

    /// Log line format on stderr: text, or json (one object per line: ts, level, target, msg).
    #[arg(long, env = "PARLOR_LOG_FORMAT", value_enum, default_value_t = crate::logfmt::LogFormat::Text)]
    pub log_format: crate::logfmt::LogFormat,

    /// Serve the /echo endpoint (every message sent back; for Autobahn and benchmarks). Off by
    /// default: it lets anyone without an account make the server hold large messages.
    #[arg(long, env = "PARLOR_ECHO")]
    pub echo: bool,

    /// Does nothing: /echo is off unless --echo is given (this is the default now). Still
    /// accepted so existing command lines keep working.
    #[arg(long, env = "PARLOR_NO_ECHO")]
    pub no_echo: bool,

    /// Origins allowed to open WebSockets (repeat or comma-separate). Empty: any origin.
    /// A browser upgrade whose Origin is not listed gets 403.
    #[arg(long, env = "PARLOR_ALLOWED_ORIGIN", value_delimiter = ',')]
    pub allowed_origin: Vec<String>,

    /// Maximum simultaneous connections; extra ones get 503 and are closed.
    #[arg(long, env = "PARLOR_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// Maximum simultaneous connections from one client address (0: unlimited); extra ones get
    /// 429 and are closed. Behind a --trusted-proxy the forwarded address counts.
    #[arg(long, env = "PARLOR_MAX_CONNECTIONS_PER_IP", default_value_t = 256)]
    pub max_connections_per_ip: usize,

    /// Extra connections from loopback admitted past --max-connections or
    /// --max-connections-per-ip; they are served only /healthz and /metrics, so local
    /// monitoring still gets an answer from a full server.
    #[arg(long, env = "PARLOR_LOOPBACK_RESERVE", default_value_t = 16)]
    pub loopback_reserve: usize,

    /// Proxies whose X-Forwarded-For / Forwarded headers name the client (comma-separated IPs
    /// or CIDRs, IPv4 or IPv6). From any other peer those headers are ignored. Default: none.
    #[arg(long, env = "PARLOR_TRUSTED_PROXY", value_delimiter = ',', value_parser = crate::http::Cidr::parse_arg)]
    pub trusted_proxy: Vec<crate::http::Cidr>,

    /// Addresses besides loopback that may read /metrics (comma-separated IPs or CIDRs, e.g. a
    /// Prometheus scraper's network). Everyone else gets 403; /healthz stays public.
    #[arg(long, env = "PARLOR_METRICS_ALLOW", value_delimiter = ',', value_parser = crate::http::Cidr::parse_arg)]
    pub metrics_allow: Vec<crate::http::Cidr>,

    /// Maximum size of an HTTP request head, in bytes (larger gets 431).
    #[arg(long, env = "PARLOR_MAX_REQUEST_HEAD", default_value_t = 8 * 1024)]
    pub max_request_head: usize,

    /// Maximum number of HTTP request headers (more gets 431).
    #[arg(long, env = "PARLOR_MAX_HEADERS", default_value_t = 64)]
    pub max_headers: usize,

    /// Seconds allowed from accept to a complete request head; slower connections are dropped.
    #[arg(long, env = "PARLOR_HANDSHAKE_TIMEOUT", default_value = "10", value_parser = parse_secs)]
    pub handshake_timeout: Duration,

    /// Largest WebSocket message accepted on /echo, in bytes (larger closes with 1009).
    #[arg(long, env = "PARLOR_ECHO_MAX_MESSAGE", default_value_t = 16 * 1024 * 1024)]
    pub echo_max_message: usize,

    /// Maximum number of frames one fragmented message may have (larger closes with 1009).
    #[arg(long, env = "PARLOR_MAX_FRAGMENTS", default_value_t = 1 << 20)]
    pub max_fragments: usize,

    /// Per-connection outbound queue limit in bytes; a client that stops reading is closed with
    /// 1008. One frame of the endpoint's largest message always fits on top of it.
    #[arg(long, env = "PARLOR_MAX_QUEUE", default_value_t = 4 * 1024 * 1024)]
    pub max_queue: usize,

    /// Bytes all connections together may hold in partly received messages and unshared
    /// outbound frames (e.g. large echoes); the connection whose growth would pass it is closed
    /// with 1013. Accepts K/KiB, M/MiB, G/GiB suffixes (binary).
    #[arg(long, env = "PARLOR_MEMORY_BUDGET", default_value = "256MiB", value_parser = parse_bytes)]
    pub memory_budget: usize,

    /// Seconds a connection with queued output may go without any write progress before it is
    /// dropped (a client that stopped reading small frames). 0 disables.
    #[arg(long, env = "PARLOR_WRITE_TIMEOUT", default_value = "30", value_parser = parse_secs)]
    pub write_timeout: Duration,

    /// Bytes read from one connection per wakeup before others get their turn.
    #[arg(long, env = "PARLOR_READ_BUDGET", default_value_t = 256 * 1024)]
    pub read_budget: usize,

    /// Seconds of silence after which the server pings a connection.
    #[arg(long, env = "PARLOR_PING_INTERVAL", default_value = "30", value_parser = parse_secs)]
    pub ping_interval: Duration,

    /// Seconds a pinged connection has to answer before it is dropped.
    #[arg(long, env = "PARLOR_PONG_TIMEOUT", default_value = "10", value_parser = parse_secs)]
    pub pong_timeout: Duration,

    /// Seconds to wait for the peer's close frame (and for a closed connection to drain).
    #[arg(long, env = "PARLOR_CLOSE_TIMEOUT", default_value = "5", value_parser = parse_secs)]
    pub close_timeout: Duration,

    /// Seconds to flush close frames to clients on SIGINT/SIGTERM before exiting.
    #[arg(long, env = "PARLOR_SHUTDOWN_GRACE", default_value = "3", value_parser = parse_secs)]
    pub shutdown_grace: Duration,

    /// Bytes of freed heap the allocator keeps for reuse before handing memory back to the
    /// kernel (glibc's M_TRIM_THRESHOLD; ignored elsewhere). glibc's own default (128 KiB, raised
    /// only by chance at run time) returns the heap top after every burst of large frames and
    /// faults the same pages back in on the next one. 0 leaves glibc's default.
    #[arg(long, env = "PARLOR_MALLOC_TRIM_THRESHOLD", default_value_t = 16 * 1024 * 1024)]
    pub malloc_trim_threshold: usize,

    #[command(flatten)]
    pub chat: crate::chat::ChatConfig,

    /// Without a command, run the server.
    #[command(subcommand)]
    pub command: Option<Admin>,
}

/// Operator commands that work on `--data` instead of serving.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Admin {
    /// Write a consistent copy of the chat store to FILE (which must not exist). Safe while
    /// the server runs: it keeps committing during the copy (SQLite's online backup API). The
    /// copy is verified by opening it.
    Backup { file: PathBuf },
    /// Put the backup FILE in --data as its chat store. --data must not hold one yet; the
    /// server must not be running on it.
    Restore { file: PathBuf },
    /// Copy the single-node SQLite store in --data into the empty PostgreSQL database of
    /// --database (accounts with their passwords and sessions, rooms, memberships, DMs,
    /// messages with their ids and times), once, when growing from one node to several. The
    /// server must not be running on --data. A database that already holds a chat is refused.
    Migrate,
    /// Manage accounts in --data's chat store, whether the server runs or not: a running
    /// server applies each change within a second (a disabled user's connections close, a
    /// new password ends every session).
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
}

/// `parlor user …`. Passwords are never taken from the command line (other users could read
/// them in the process list or the shell's history): on a terminal they are asked twice
/// without echo, otherwise one line is read from standard input.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum UserCmd {
    /// Create the account NAME, a member of `general`, with the rules of `register`: 1-32 of
    /// A-Z a-z 0-9 _ . -, not taken in any case, not looking like another account's name or
    /// nick; a password of 8-1024 bytes. Hashed with --argon2-memory / --argon2-iterations.
    Add { name: String },
    /// Set a new password for NAME; every session (token) of the account ends.
    Passwd { name: String },
    /// Forbid NAME to sign in (`account_disabled`); every session ends and its connections
    /// are closed.
    Disable { name: String },
    /// Allow a disabled NAME to sign in again.
    Enable { name: String },
    /// One line per account, tab-separated: name, nick, created, last seen (RFC 3339 UTC, `-`
    /// for never), `enabled` or `disabled`.
    List {
        /// A JSON array of {name, nick, created, last_seen, disabled} instead (times in ms
        /// since the Unix epoch).
        #[arg(long)]
        json: bool,
    },
}

impl Config {
    /// Defaults as if no flag had been given (handy in tests).
    pub fn defaults() -> Config {
        Config::parse_from(["parlor"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_limits_have_their_defaults() {
        let c = Config::defaults();
        assert!(!c.echo);
        assert_eq!(c.memory_budget, 256 << 20);
        assert_eq!(c.max_connections_per_ip, 256);
        assert_eq!(c.write_timeout, Duration::from_secs(30));
        assert!(c.trusted_proxy.is_empty());
    }
}
