//! `connections`: many idle connections; how many stay open, and server memory per connection.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::conn::{ConnOut, Target};
use crate::pool::{Handler, Pool};
use crate::stats::{rss_kib, CpuWindow};
use crate::{Common, Progress};

#[derive(clap::Args, Debug, Clone)]
pub struct ConnArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open.
    #[arg(short = 'c', long, default_value_t = 1000)]
    pub connections: usize,
    /// New connections per second (0 = as fast as possible, 256 handshakes outstanding).
    #[arg(long, default_value_t = 5000.0)]
    pub ramp: f64,
    /// Bind sources round-robin over 127.0.0.1..127.0.0.K (loopback only), so more than ~28k
    /// connections to one port do not exhaust ephemeral ports. Default: one address per
    /// 20,000 connections.
    #[arg(long)]
    pub source_addrs: Option<u8>,
    /// Seconds to hold the connections open once all are up (pings are answered).
    #[arg(long, default_value = "10", value_parser = parlor::units::parse_secs)]
    pub hold: Duration,
}

struct Idle {
    failures: u64,
    first_error: Option<String>,
}

impl Handler for Idle {
    fn on_message(&mut self, _: usize, _: &[u8], _: bool, _: Instant, _: &mut ConnOut<'_>) {}

    fn on_close(&mut self, _idx: usize, error: Option<&str>) {
        self.failures += 1;
        if self.first_error.is_none() {
            self.first_error = error.map(str::to_string);
        }
    }
}

/// Raises the soft RLIMIT_NOFILE towards the hard limit if `need` descriptors would not fit.
fn raise_nofile(need: u64) -> u64 {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 0;
        }
        if rl.rlim_cur < need && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
        rl.rlim_cur
    }
}

pub fn run(a: &ConnArgs) -> Result<serde_json::Value, String> {
    let c = &a.common;
    let target = Target::parse(c.single_url("connections")?, c.tls_ca.as_deref())?;
    if c.pid.len() > 1 {
        return Err("connections takes one --pid (memory per connection of one server)".into());
    }
    let n = a.connections;
    let limit = raise_nofile(n as u64 + 64);
    if limit < n as u64 + 16 {
        return Err(format!(
            "{n} connections need {} file descriptors but RLIMIT_NOFILE is {limit}; \
             run `ulimit -n 200000` (or as high as the hard limit allows) first",
            n + 16
        ));
    }
    let k = a
        .source_addrs
        .unwrap_or((n / 20_000 + 1).min(250) as u8)
        .max(1);
    let sources: Vec<IpAddr> = (1..=k)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
        .collect();
    let use_sources = k > 1 || a.source_addrs.is_some();
    let pid = c.pid.first().map(|p| p.to_string());
    let rss_before = pid.as_deref().and_then(rss_kib);

    let mut pool = Pool::new(vec![target]).map_err(|e| format!("poll: {e}"))?;
    let mut h = Idle {
        failures: 0,
        first_error: None,
    };
    let start = Instant::now();
    let mut progress = Progress::new(c.quiet);
    let mut last_change = Instant::now();
    let mut last_done = 0;
    const MAX_PENDING: usize = 256;
    let cpu = CpuWindow::start(&c.pid, c.db_pid);
    loop {
        let done = pool.open + pool.closed;
        if done >= n {
            break;
        }
        let pending = pool.conns.len() - done;
        let allowed = if a.ramp > 0.0 {
            ((start.elapsed().as_secs_f64() * a.ramp) as usize + 1).min(n)
        } else {
            n
        };
        let to_add = allowed
            .saturating_sub(pool.conns.len())
            .min(MAX_PENDING.saturating_sub(pending));
        for _ in 0..to_add {
            let i = pool.conns.len();
            let src = use_sources.then(|| sources[i % sources.len()]);
            if let Err(e) = pool.add(src) {
                return Err(format!(
                    "connection {i} to {}: {e} ({} open so far)",
                    pool.target_for(i).addr,
                    pool.open
                ));
            }
        }
        pool.turn(Duration::from_millis(5), &mut h)
            .map_err(|e| e.to_string())?;
        if pool.open == 0 && h.failures > 0 {
            return Err(h.first_error.clone().unwrap_or_else(|| "refused".into()));
        }
        let done = pool.open + pool.closed;
        if done > last_done {
            last_done = done;
            last_change = Instant::now();
        } else if last_change.elapsed() > Duration::from_secs(30) {
            break;
        }
        if progress.due() {
            progress.line(&format!(
                "connecting: {} open, {} failed, of {n}",
                pool.count_open(),
                h.failures
            ));
        }
    }
    let ramp_secs = start.elapsed().as_secs_f64();
    // Let the server finish its side of the last handshakes before sampling memory.
    let settle = Instant::now() + Duration::from_millis(500);
    while Instant::now() < settle {
        pool.turn(Duration::from_millis(50), &mut h)
            .map_err(|e| e.to_string())?;
    }
    let opened = pool.count_open();
    let rss_open = pid.as_deref().and_then(rss_kib);
    let hold_end = Instant::now() + a.hold;
    while Instant::now() < hold_end {
        pool.turn(Duration::from_millis(100), &mut h)
            .map_err(|e| e.to_string())?;
        if progress.due() {
            progress.line(&format!("holding: {} open", pool.count_open()));
        }
    }
    let still_open = pool.count_open();
    let rss_end = pid.as_deref().and_then(rss_kib);
    let report = cpu.stop();
    pool.close_all();

    let per_conn = |after: Option<u64>| match (rss_before, after) {
        (Some(b), Some(a)) if opened > 0 => Some((a as f64 - b as f64) / opened as f64),
        _ => None,
    };
    if !c.json {
        println!(
            "connections: {opened} of {n} opened in {ramp_secs:.1} s ({} failed), \
             {still_open} still open after holding {:.0} s",
            h.failures,
            a.hold.as_secs_f64()
        );
        if let Some(e) = &h.first_error {
            println!("first failure: {e}");
        }
        if let (Some(b), Some(o), Some(e)) = (rss_before, rss_open, rss_end) {
            println!(
                "server VmRSS: {b} KiB before, {o} KiB with all open ({:.2} KiB per connection), \
                 {e} KiB at the end ({:.2} KiB per connection)",
                per_conn(Some(o)).unwrap_or(0.0),
                per_conn(Some(e)).unwrap_or(0.0)
            );
        }
        crate::print_cpu(&report, None, "");
    }
    Ok(json!({
        "mode": "connections",
        "url": c.url,
        "connections": n,
        "source_addrs": if use_sources { k } else { 1 },
        "opened": opened,
        "failed": false,
        "failures": h.failures,
        "first_failure": h.first_error,
        "still_open": still_open,
        "ramp_secs": ramp_secs,
        "rss_before_kib": rss_before,
        "rss_open_kib": rss_open,
        "rss_end_kib": rss_end,
        "kib_per_conn": per_conn(rss_open),
        "kib_per_conn_end": per_conn(rss_end),
        "bench_cpu_pct": report.bench_pct,
        "server_cpu_secs": report.server_secs,
    }))
}
