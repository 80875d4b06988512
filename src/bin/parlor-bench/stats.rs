//! Latency histogram, CPU accounting from /proc, resident memory.

use std::fs;
use std::time::Instant;

/// Sub-bucket bits: each power-of-two range is split into 64 buckets (≤ 1.6 % relative error).
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Values up to 2^44 µs (≈ 200 days) are kept exactly to this precision.
const BUCKETS: usize = (SUB as usize) * (44 - SUB_BITS as usize + 2);

/// HDR-like log-linear histogram of microsecond values: values below 128 µs are exact, above
/// that every power-of-two range has 64 equal buckets. Recording is a few instructions.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram::new()
    }
}

fn index(v: u64) -> usize {
    if v < 2 * SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros();
    let shift = exp - SUB_BITS;
    let i = (shift as usize) * SUB as usize + (v >> shift) as usize;
    i.min(BUCKETS - 1)
}

/// The largest value that lands in bucket `i` (reporting the upper edge never understates).
fn value_at(i: usize) -> u64 {
    if i < 2 * SUB as usize {
        return i as u64;
    }
    let shift = (i / SUB as usize - 1) as u32;
    let m = (i % SUB as usize) as u64 + SUB;
    ((m + 1) << shift) - 1
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
            sum: 0,
        }
    }

    #[inline]
    pub fn record(&mut self, us: u64) {
        self.counts[index(us)] += 1;
        self.total += 1;
        self.sum += u128::from(us);
        if us > self.max {
            self.max = us;
        }
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// Value at quantile `q` (0..=1), in µs; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return value_at(i).min(self.max);
            }
        }
        self.max
    }
}

/// Formats microseconds for people: `850µs`, `1.25ms`, `2.0s`.
pub fn fmt_us(us: u64) -> String {
    if us < 1000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.2}ms", us as f64 / 1000.0)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

/// Clock ticks per second for /proc/*/stat times.
fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of a process (all its threads), in seconds, from /proc/PID/stat.
pub fn process_cpu_secs(pid: &str) -> Option<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f = stat_fields(&s)?;
    // f starts at field 3 (state); utime is field 14, stime 15.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clk_tck())
}

/// Our own CPU time (user + system), in seconds, at µs resolution.
pub fn self_cpu_secs() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut ru) != 0 {
            return process_cpu_secs("self").unwrap_or(0.0);
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }
}

/// Resident memory (VmRSS) of a process, in KiB.
pub fn rss_kib(pid: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time of a process tree, in seconds: the process itself, its reaped children (cutime +
/// cstime: a PostgreSQL backend that exited during the window is counted there) and its live
/// children (found by their parent PID in /proc/*/stat). For a database server started as one
/// parent process that forks a worker per connection.
pub fn tree_cpu_secs(pid: u32) -> Option<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f = stat_fields(&s)?;
    let field = |i: usize| -> Option<f64> { f.get(i)?.parse().ok() };
    // After the name: state is index 0, so utime (field 14) is 11, cutime (16) is 13.
    let mut ticks = field(11)? + field(12)? + field(13)? + field(14)?;
    let me = pid.to_string();
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let name = e.file_name();
        let Some(child) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(cs) = fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let Some(cf) = stat_fields(&cs) else {
            continue;
        };
        if cf.get(1) == Some(&me.as_str()) {
            let t = |i: usize| cf.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            ticks += t(11) + t(12);
        }
    }
    Some(ticks / clk_tck())
}

/// The fields of a /proc/PID/stat line after the command name (which is in parentheses and
/// may contain spaces): index 0 is the state (field 3), 1 the parent PID (field 4).
fn stat_fields(s: &str) -> Option<Vec<&str>> {
    Some(s.get(s.rfind(')')? + 2..)?.split_whitespace().collect())
}

/// CPU use over a measurement window: ours, the server processes' (summed, e.g. the nodes of
/// a cluster), and a database process tree's if given.
pub struct CpuWindow {
    start: Instant,
    self_start: f64,
    server_pids: Vec<u32>,
    server_start: Vec<Option<f64>>,
    db_pid: Option<u32>,
    db_start: Option<f64>,
}

#[derive(Debug, Clone, Default)]
pub struct CpuReport {
    pub wall_secs: f64,
    /// Bench CPU as % of one core.
    pub bench_pct: f64,
    /// Sum over the server PIDs; None without --pid or if one could not be read.
    pub server_secs: Option<f64>,
    /// Per server PID (those that could be read at both ends).
    pub server_by_pid: Vec<(u32, f64)>,
    /// The database process tree (--db-pid).
    pub db_secs: Option<f64>,
}

impl CpuWindow {
    pub fn start(server_pids: &[u32], db_pid: Option<u32>) -> CpuWindow {
        CpuWindow {
            server_start: server_pids
                .iter()
                .map(|p| process_cpu_secs(&p.to_string()))
                .collect(),
            server_pids: server_pids.to_vec(),
            db_start: db_pid.and_then(tree_cpu_secs),
            db_pid,
            start: Instant::now(),
            self_start: self_cpu_secs(),
        }
    }

    pub fn stop(&self) -> CpuReport {
        let wall = self.start.elapsed().as_secs_f64();
        let me = self_cpu_secs() - self.self_start;
        let mut server_by_pid = Vec::new();
        for (&pid, s0) in self.server_pids.iter().zip(&self.server_start) {
            if let (Some(s0), Some(s1)) = (s0, process_cpu_secs(&pid.to_string())) {
                server_by_pid.push((pid, s1 - s0));
            }
        }
        let server_secs = (!self.server_pids.is_empty()
            && server_by_pid.len() == self.server_pids.len())
        .then(|| server_by_pid.iter().map(|(_, s)| s).sum());
        let db_secs = match (self.db_pid, self.db_start) {
            (Some(pid), Some(s0)) => tree_cpu_secs(pid).map(|s1| s1 - s0),
            _ => None,
        };
        CpuReport {
            wall_secs: wall,
            bench_pct: if wall > 0.0 { 100.0 * me / wall } else { 0.0 },
            server_secs,
            server_by_pid,
            db_secs,
        }
    }
}

/// Checks that the server (and database) PIDs exist before a run, so a typo fails early.
pub fn check_pids(pids: &[u32], db_pid: Option<u32>) -> Result<(), String> {
    for &p in pids {
        if process_cpu_secs(&p.to_string()).is_none() {
            return Err(format!("--pid {p}: no such process (or /proc unreadable)"));
        }
    }
    if let Some(p) = db_pid {
        if tree_cpu_secs(p).is_none() {
            return Err(format!(
                "--db-pid {p}: no such process (or /proc unreadable)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_monotonic() {
        let mut last = 0;
        for v in 0..1_000_000u64 {
            let i = index(v);
            assert!(i == last || i == last + 1, "v {v}: {last} -> {i}");
            assert!(value_at(i) >= v, "v {v} bucket top {}", value_at(i));
            last = i;
        }
    }

    #[test]
    fn relative_error_is_small() {
        for v in [150u64, 1_000, 12_345, 999_999, 123_456_789] {
            let top = value_at(index(v));
            assert!(
                (top - v) as f64 / v as f64 <= 1.0 / 64.0 + 1e-9,
                "{v} -> {top}"
            );
        }
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::new();
        for v in 1..=1000 {
            h.record(v);
        }
        let p50 = h.quantile(0.5);
        assert!((500..=508).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99);
        assert!((990..=1000).contains(&p99), "{p99}");
        assert_eq!(h.quantile(1.0), 1000);
        assert_eq!(h.count(), 1000);
    }

    #[test]
    fn tree_cpu_counts_this_process() {
        let me = std::process::id();
        // Burn a little CPU so the tick counters move.
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < 30 {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let tree = tree_cpu_secs(me).unwrap();
        let own = process_cpu_secs(&me.to_string()).unwrap();
        assert!(tree >= own, "{tree} < {own}");
        assert!(check_pids(&[me], Some(me)).is_ok());
        assert!(check_pids(&[u32::MAX], None).is_err());
    }
}
