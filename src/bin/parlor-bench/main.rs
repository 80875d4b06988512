//! `parlor-bench`: a WebSocket load generator on mio with Parlor's own codec in the client role.
//!
//! One thread, one `mio::Poll` (pin it with `taskset -c 1`). Modes:
//! - `echo`: round trips against an echo endpoint;
//! - `chat`: fan-out through Parlor's chat protocol v1 on `/ws`;
//! - `broadcast`: the same fan-out, raw, against a `/broadcast` endpoint (the reference peers);
//! - `connections`: many idle connections, memory per connection.
//!
//! See `docs/BENCHMARKS.md` for the method.

mod conn;
mod connections;
mod echo;
mod fanout;
mod pool;
mod stats;
mod transport;

use std::net::IpAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use crate::pool::{Handler, Pool};
use crate::stats::CpuReport;

/// parlor-bench: load generator for Parlor and other WebSocket servers.
///
/// Every mode prints a summary (or one JSON line with --json), a progress line on stderr every
/// second, and its own CPU use so you can tell when the bench, not the server, is the limit
/// (near 100 % of a core means the numbers are a lower bound for the server). With --pid it
/// also reads the server's CPU time from /proc/PID/stat over the measurement window and
/// reports server CPU nanoseconds per message or delivery.
///
/// Exit status: 0 on success, 1 when the target is down, refuses the upgrade, or a check fails
/// (connections closed during echo, or for chat/broadcast with --strict, lost or duplicated
/// messages).
///
/// Method: release builds, server pinned with `taskset -c 0`, bench with `taskset -c 1`,
/// ~10 s per scenario, several rounds interleaved with the servers being compared.
/// Many connections need file descriptors: run `ulimit -n 200000` (or as high as the hard
/// limit allows) in the shell first.
#[derive(Parser, Debug)]
#[command(
    name = "parlor-bench",
    version,
    about,
    long_about,
    verbatim_doc_comment
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Round trips: C connections to an echo endpoint, S-byte messages, K in flight each.
    /// Prints messages/s and round-trip p50/p99/p999.
    ///
    /// Example: parlor-bench echo --url ws://127.0.0.1:8080/echo -c 100 --size 20 --inflight 1
    Echo(echo::EchoArgs),
    /// Chat fan-out over protocol v1 (`/ws`): registers (or logs in, or resumes with cached
    /// tokens) users bench-s-N and bench-p-N, joins them all to one room (or spreads them over
    /// --rooms N), then the publishers `say` messages whose text carries publisher, sequence
    /// and send time. Every receiver (subscribers and publishers) computes end-to-end latency.
    /// Prints deliveries/s, accepted (acked) messages/s, p50/p99/p999, and lost and duplicated
    /// counts after a drain period. --url may list several servers (the nodes of a cluster).
    ///
    /// The server must run with `--rate-limit 0` (or the publishers get rate_limited errors,
    /// which are reported).
    ///
    /// Example: parlor-bench chat --url ws://127.0.0.1:8080/ws --subscribers 1000
    /// --publishers 1 --rate 0 --room bench
    Chat(fanout::FanoutArgs),
    /// Raw fan-out: like `chat`, but publishers send the text frame itself to a `/broadcast`
    /// endpoint that relays every frame to every connection on it (sender included), as the
    /// reference peers do. No accounts, no JSON.
    ///
    /// Example: parlor-bench broadcast --url ws://127.0.0.1:9001/broadcast --subscribers 1000
    Broadcast(fanout::FanoutArgs),
    /// Idle connections: opens C websocket connections (ramped), holds them (answering
    /// pings), reports how many stayed open; with --pid, the server's resident memory per
    /// connection (VmRSS before connecting and after all are open).
    ///
    /// Example: parlor-bench connections --url ws://127.0.0.1:8080/echo -c 10000 --pid PID
    Connections(connections::ConnArgs),
}

/// Options every mode takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// Target, e.g. ws://127.0.0.1:8080/echo, or wss://localhost:8443/echo with --tls-ca.
    /// `chat` also takes a comma-separated list (the nodes of a cluster, e.g.
    /// ws://127.0.0.1:8081/ws,ws://127.0.0.1:8082/ws): connection i goes to URL i % n, so
    /// publishers and subscribers are both spread over the nodes. Other modes take one URL.
    #[arg(long)]
    pub url: String,
    /// For a wss:// URL: PEM file of the certificate (or CA) to trust.
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Measurement window in seconds (fractions allowed). `connections` uses --hold instead.
    #[arg(long, default_value = "10", value_parser = parlor::units::parse_secs)]
    pub duration: Duration,
    /// Seconds of load before measuring starts (not counted; echo, chat, broadcast).
    #[arg(long, default_value = "1", value_parser = parlor::units::parse_secs)]
    pub warmup: Duration,
    /// Server process ID: report its CPU time during the window (and memory, for
    /// `connections`). For a multi-process server, give the process doing the work. Several
    /// (repeat the flag, or comma-separated; not for `connections`), e.g. the nodes of a
    /// cluster: their CPU is summed (and listed per PID in the JSON).
    #[arg(long, value_delimiter = ',')]
    pub pid: Vec<u32>,
    /// A database server's parent process, e.g. PostgreSQL's postmaster: its CPU during the
    /// window, with its children's (the backends; those that exited through the parent's
    /// cutime/cstime), reported apart from the server's, per delivery and per accepted message.
    #[arg(long)]
    pub db_pid: Option<u32>,
    /// Print one JSON object on one line at the end instead of the human summary.
    #[arg(long)]
    pub json: bool,
    /// No progress lines on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl Common {
    /// The `--url` list (one or more URLs).
    pub fn urls(&self) -> Result<Vec<&str>, String> {
        parse_url_list(&self.url)
    }

    /// The one `--url` of a mode that takes no list.
    pub fn single_url(&self, mode: &str) -> Result<&str, String> {
        match self.urls()?[..] {
            [u] => Ok(u),
            _ => Err(format!(
                "--url: {mode} takes one URL; a comma-separated list is for chat"
            )),
        }
    }
}

/// Splits a comma-separated `--url` list; blanks around items are ignored, empty items are
/// an error (a stray comma usually means a variable was empty).
pub fn parse_url_list(s: &str) -> Result<Vec<&str>, String> {
    let urls: Vec<&str> = s.split(',').map(str::trim).collect();
    if urls.iter().any(|u| u.is_empty()) {
        return Err(format!("--url {s:?}: empty item in the list"));
    }
    Ok(urls)
}

/// A progress line on stderr once a second.
pub struct Progress {
    start: Instant,
    next: Instant,
    quiet: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Progress {
        let now = Instant::now();
        Progress {
            start: now,
            next: now + Duration::from_secs(1),
            quiet,
        }
    }

    pub fn due(&mut self) -> bool {
        let now = Instant::now();
        if now >= self.next {
            self.next += Duration::from_secs(1);
            if self.next < now {
                self.next = now + Duration::from_secs(1);
            }
            return !self.quiet;
        }
        false
    }

    pub fn line(&self, s: &str) {
        eprintln!("[{:5.1}s] {s}", self.start.elapsed().as_secs_f64());
    }
}

/// Opens `n` connections (at most `ramp` new ones per second, if given; source addresses
/// round-robin over `sources`) and waits until all have upgraded. Any failure is an error:
/// a load test against a server that refuses connections measures nothing.
pub fn connect_all(
    pool: &mut Pool,
    n: usize,
    ramp: Option<f64>,
    sources: Option<&[IpAddr]>,
    h: &mut impl Handler,
) -> Result<(), String> {
    // Few handshakes outstanding at once, so the server's listen backlog never overflows.
    const MAX_PENDING: usize = 256;
    let start = Instant::now();
    let deadline_idle = Duration::from_secs(30);
    let mut last_progress = Instant::now();
    let mut last_open = 0;
    let mut progress = Progress::new(false);
    while pool.open < n {
        let pending = pool.conns.len() - pool.open - pool.closed;
        let allowed = match ramp {
            Some(r) if r > 0.0 => ((start.elapsed().as_secs_f64() * r) as usize + 1).min(n),
            _ => n,
        };
        let mut to_add = allowed
            .saturating_sub(pool.conns.len())
            .min(MAX_PENDING.saturating_sub(pending));
        while to_add > 0 {
            let i = pool.conns.len();
            let src = sources.map(|s| s[i % s.len()]);
            pool.add(src)
                .map_err(|e| format!("connect to {}: {e}", pool.target_for(i).addr))?;
            to_add -= 1;
        }
        pool.turn(Duration::from_millis(10), h)
            .map_err(|e| e.to_string())?;
        if pool.closed > 0 {
            let e = pool.first_error().unwrap_or_else(|| "closed".into());
            return Err(hint(&e));
        }
        if pool.open > last_open {
            last_open = pool.open;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > deadline_idle {
            return Err(format!(
                "only {} of {n} connections upgraded; no progress for {}s",
                pool.open,
                deadline_idle.as_secs()
            ));
        }
        if progress.due() && !pool.conns.is_empty() && n > 1000 {
            progress.line(&format!("connecting: {}/{n} open", pool.open));
        }
    }
    Ok(())
}

/// Adds a hint to the common "server not running" error.
pub fn hint(e: &str) -> String {
    if e.contains("Connection refused") && !e.contains("is the server running") {
        format!("{e} (is the server running and listening there?)")
    } else {
        e.to_string()
    }
}

/// Prints the CPU lines of a summary.
pub fn print_cpu(r: &CpuReport, server_ns: Option<f64>, unit: &str) {
    println!(
        "bench CPU: {:.0}% of one core{}",
        r.bench_pct,
        if r.bench_pct > 90.0 {
            "  (the bench is saturated: figures are a lower bound for the server)"
        } else {
            ""
        }
    );
    if let (Some(s), Some(ns)) = (r.server_secs, server_ns) {
        println!(
            "server CPU: {:.2} s over {:.1} s ({:.0}% of one core), {:.0} ns per {unit}{}",
            s,
            r.wall_secs,
            100.0 * s / r.wall_secs.max(1e-9),
            ns,
            if r.server_by_pid.len() > 1 {
                let each: Vec<String> = r
                    .server_by_pid
                    .iter()
                    .map(|(p, s)| format!("{p}: {s:.2} s"))
                    .collect();
                format!(" ({} processes: {})", each.len(), each.join(", "))
            } else {
                String::new()
            }
        );
    }
    if let Some(s) = r.db_secs {
        println!(
            "database CPU: {:.2} s ({:.0}% of one core)",
            s,
            100.0 * s / r.wall_secs.max(1e-9)
        );
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (json, result) = match &cli.mode {
        Mode::Echo(a) => (
            a.common.json,
            stats::check_pids(&a.common.pid, a.common.db_pid).and_then(|_| echo::run(a)),
        ),
        Mode::Chat(a) => (
            a.common.json,
            stats::check_pids(&a.common.pid, a.common.db_pid)
                .and_then(|_| fanout::run(a, fanout::Kind::Chat)),
        ),
        Mode::Broadcast(a) => (
            a.common.json,
            stats::check_pids(&a.common.pid, a.common.db_pid)
                .and_then(|_| fanout::run(a, fanout::Kind::Broadcast)),
        ),
        Mode::Connections(a) => (
            a.common.json,
            stats::check_pids(&a.common.pid, a.common.db_pid).and_then(|_| connections::run(a)),
        ),
    };
    match result {
        Ok(v) => {
            let failed = v.get("failed").and_then(|f| f.as_bool()).unwrap_or(false);
            if json {
                println!("{v}");
            }
            if failed {
                eprintln!(
                    "parlor-bench: check failed: {}",
                    v.get("failure").and_then(|f| f.as_str()).unwrap_or("")
                );
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("parlor-bench: error: {}", hint(&e));
            if json {
                println!("{}", serde_json::json!({ "error": e }));
            }
            ExitCode::FAILURE
        }
    }
}
