//! `--log-format json`: one JSON object per log line on stderr, for log collectors that parse
//! lines (Loki, journald exporters, Elasticsearch). The text format stays `simple_logger`'s.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// How log lines are written (`--log-format`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (timestamp, level, module, message).
    Text,
    /// One JSON object per line: `ts` (RFC 3339, UTC, milliseconds), `level`, `target`, `msg`,
    /// and `peer` when the line is about one connection.
    Json,
}

/// One log record as a JSON line (without the newline). Pure, for tests.
///
/// Every line about one connection starts with its client address (`203.0.113.9:5120: …`, the
/// loop's convention); that address is also given as `peer`, so a collector can select one
/// client's lines without parsing messages.
pub fn json_line(ts_ms: u128, level: log::Level, target: &str, msg: &str) -> String {
    let mut v = serde_json::json!({
        "ts": rfc3339_ms(ts_ms),
        "level": level.as_str(),
        "target": target,
        "msg": msg,
    });
    if let Some(peer) = leading_peer(msg) {
        v["peer"] = peer.to_string().into();
    }
    v.to_string()
}

/// The socket address a message starts with, followed by `": "`.
fn leading_peer(msg: &str) -> Option<std::net::SocketAddr> {
    let (head, _) = msg.split_once(": ")?;
    head.parse().ok()
}

/// `2026-12-01T02:56:01.113Z` from milliseconds since the Unix epoch (proleptic Gregorian).
pub fn rfc3339_ms(ms: u128) -> String {
    let secs = (ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

struct JsonLogger {
    level: log::LevelFilter,
}

impl log::Log for JsonLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let line = json_line(ms, r.level(), r.target(), &r.args().to_string());
        // One write per line, so lines from several threads never interleave.
        let _ = std::io::stderr()
            .lock()
            .write_all(format!("{line}\n").as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the logger for `format` at `level`. Call once, before any thread logs.
pub fn init(format: LogFormat, level: log::LevelFilter) -> Result<(), log::SetLoggerError> {
    match format {
        LogFormat::Text => simple_logger::SimpleLogger::new().with_level(level).init(),
        LogFormat::Json => {
            log::set_boxed_logger(Box::new(JsonLogger { level }))?;
            log::set_max_level(level);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_796_093_761_113), "2026-12-01T02:56:01.113Z");
        assert_eq!(rfc3339_ms(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
    }

    #[test]
    fn lines_are_json_with_escaping() {
        let l = json_line(0, log::Level::Warn, "parlor::net", "say \"hi\"\n");
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["target"], "parlor::net");
        assert_eq!(v["msg"], "say \"hi\"\n");
        assert_eq!(v["ts"], "1970-01-01T00:00:00.000Z");
        assert!(!l.contains('\n'), "one line");
        assert!(v.get("peer").is_none());
    }

    #[test]
    fn connection_lines_carry_the_peer() {
        let l = json_line(
            0,
            log::Level::Info,
            "parlor::net",
            "10.1.2.3:5120: TLS error: x",
        );
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["peer"], "10.1.2.3:5120");
        let l = json_line(
            0,
            log::Level::Info,
            "parlor::net",
            "[2001:db8::1]:443: closed",
        );
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["peer"], "[2001:db8::1]:443");
        let l = json_line(0, log::Level::Info, "parlor", "store: commit failed: x");
        assert!(serde_json::from_str::<serde_json::Value>(&l)
            .unwrap()
            .get("peer")
            .is_none());
    }
}
