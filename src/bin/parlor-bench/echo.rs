//! `echo`: C connections keep K messages of S bytes in flight each; every echo is timed and
//! answered with the next message.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::conn::{ConnOut, Target};
use crate::pool::{Handler, Pool};
use crate::stats::{fmt_us, CpuWindow, Histogram};
use crate::{connect_all, Common, Progress};

#[derive(clap::Args, Debug, Clone)]
pub struct EchoArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections.
    #[arg(short = 'c', long, default_value_t = 100)]
    pub connections: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 20)]
    pub size: usize,
    /// Messages in flight per connection.
    #[arg(long, default_value_t = 1)]
    pub inflight: usize,
    /// Send binary frames instead of text (text is the default, as chat traffic is).
    #[arg(long)]
    pub binary: bool,
}

struct Echo {
    payload: Vec<u8>,
    binary: bool,
    inflight: usize,
    /// Send times of the messages in flight, per connection (echoes come back in order).
    sent: Vec<VecDeque<Instant>>,
    hist: Histogram,
    /// Echoes received while measuring.
    count: u64,
    measuring: bool,
    stopping: bool,
    wrong: u64,
}

impl Echo {
    fn send(&mut self, idx: usize, now: Instant, out: &mut ConnOut<'_>) {
        if self.binary {
            out.frame(parlor::ws::frame::OpCode::Binary, &self.payload);
        } else {
            out.text(&self.payload);
        }
        self.sent[idx].push_back(now);
    }
}

impl Handler for Echo {
    fn on_open(&mut self, idx: usize, now: Instant, out: &mut ConnOut<'_>) {
        for _ in 0..self.inflight {
            self.send(idx, now, out);
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
        let Some(t0) = self.sent[idx].pop_front() else {
            self.wrong += 1;
            return;
        };
        if data.len() != self.payload.len() {
            self.wrong += 1;
        }
        if self.measuring {
            self.hist
                .record(now.saturating_duration_since(t0).as_micros() as u64);
            self.count += 1;
        }
        if !self.stopping {
            self.send(idx, now, out);
        }
    }
}

pub fn run(a: &EchoArgs) -> Result<serde_json::Value, String> {
    let c = &a.common;
    let target = Target::parse(c.single_url("echo")?, c.tls_ca.as_deref())?;
    let mut pool = Pool::new(vec![target]).map_err(|e| format!("poll: {e}"))?;
    let payload: Vec<u8> = (0..a.size).map(|i| b'a' + (i % 26) as u8).collect();
    let mut h = Echo {
        payload,
        binary: a.binary,
        inflight: a.inflight.max(1),
        sent: vec![VecDeque::new(); a.connections],
        hist: Histogram::new(),
        count: 0,
        measuring: false,
        stopping: false,
        wrong: 0,
    };
    connect_all(&mut pool, a.connections, None, None, &mut h)?;

    let warmup_end = Instant::now() + c.warmup;
    while Instant::now() < warmup_end {
        pool.turn(Duration::from_millis(50), &mut h)
            .map_err(|e| e.to_string())?;
        check_alive(&pool)?;
    }
    h.measuring = true;
    let cpu = CpuWindow::start(&c.pid, c.db_pid);
    let start = Instant::now();
    let end = start + c.duration;
    let mut progress = Progress::new(c.quiet);
    let mut last = (0u64, Instant::now());
    while Instant::now() < end {
        pool.turn(Duration::from_millis(20), &mut h)
            .map_err(|e| e.to_string())?;
        check_alive(&pool)?;
        if progress.due() {
            let now = Instant::now();
            let rate = (h.count - last.0) as f64 / now.duration_since(last.1).as_secs_f64();
            last = (h.count, now);
            progress.line(&format!(
                "{:.0} msg/s, p99 {} (so far), open {}",
                rate,
                fmt_us(h.hist.quantile(0.99)),
                pool.count_open()
            ));
        }
    }
    let report = cpu.stop();
    h.measuring = false;
    h.stopping = true;
    let elapsed = start.elapsed().as_secs_f64();
    // Let the in-flight echoes come back, then close.
    let drain_end = Instant::now() + Duration::from_millis(500);
    while Instant::now() < drain_end && h.sent.iter().any(|q| !q.is_empty()) {
        pool.turn(Duration::from_millis(20), &mut h)
            .map_err(|e| e.to_string())?;
    }
    pool.close_all();
    let rate = h.count as f64 / elapsed;
    let server_ns = report.server_secs.map(|s| {
        if h.count > 0 {
            s * 1e9 / h.count as f64
        } else {
            0.0
        }
    });
    if !c.json {
        println!(
            "echo {} conns × {} B × {} in flight, {:.1} s: {:.0} msg/s",
            a.connections, a.size, a.inflight, elapsed, rate
        );
        println!(
            "round trip: p50 {}  p99 {}  p999 {}  max {}  ({} samples)",
            fmt_us(h.hist.quantile(0.5)),
            fmt_us(h.hist.quantile(0.99)),
            fmt_us(h.hist.quantile(0.999)),
            fmt_us(h.hist.max()),
            h.hist.count()
        );
        crate::print_cpu(&report, server_ns, "message");
        if h.wrong > 0 {
            println!("WARNING: {} unexpected or wrong-sized echoes", h.wrong);
        }
    }
    Ok(json!({
        "mode": "echo",
        "url": c.url,
        "connections": a.connections,
        "size": a.size,
        "inflight": a.inflight,
        "seconds": elapsed,
        "messages": h.count,
        "msgs_per_sec": rate,
        "p50_us": h.hist.quantile(0.5),
        "p99_us": h.hist.quantile(0.99),
        "p999_us": h.hist.quantile(0.999),
        "max_us": h.hist.max(),
        "mean_us": h.hist.mean(),
        "bench_cpu_pct": report.bench_pct,
        "server_pids": c.pid,
        "server_cpu_secs": report.server_secs,
        "server_ns_per_msg": server_ns,
        "db_pid": c.db_pid,
        "db_cpu_secs": report.db_secs,
        "wrong": h.wrong,
    }))
}

fn check_alive(pool: &Pool) -> Result<(), String> {
    if pool.closed > 0 {
        return Err(format!(
            "{} connection(s) closed during the run: {}",
            pool.closed,
            pool.first_error().unwrap_or_else(|| "closed".into())
        ));
    }
    Ok(())
}
