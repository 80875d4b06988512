//! Parsers for the units that flags are given in (seconds, byte counts). Used as clap
//! `value_parser`s by [`crate::config`], [`crate::chat`] and `parlor-bench`; they depend on
//! nothing in the crate, so neither of those has to import the other for them.

use std::time::Duration;

/// Parses a duration given in (possibly fractional) seconds, e.g. `10` or `0.25`.
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("not a number of seconds: {s}"))?;
    if !v.is_finite() || !(0.0..=1e9).contains(&v) {
        return Err(format!("out of range: {s}"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Parses a byte count: a plain number, or one with a binary suffix (`K`/`KiB`, `M`/`MiB`,
/// `G`/`GiB`, case-insensitive), e.g. `65536`, `64MiB`, `1g`.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("not a byte count: {s:?} (e.g. 65536 or 64MiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        _ => return Err(format!("unknown unit in {s:?} (use K/KiB, M/MiB or G/GiB)")),
    };
    n.checked_mul(mult)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| format!("too large: {s}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("0"), Ok(0));
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("64m"), Ok(64 << 20));
        assert_eq!(parse_bytes("2KiB"), Ok(2048));
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("1.5M").is_err());
        assert!(parse_bytes("3TB").is_err());
        assert!(parse_bytes("99999999999999999999G").is_err());
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_secs("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_secs("0.25"), Ok(Duration::from_millis(250)));
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("inf").is_err());
        assert!(parse_secs("soon").is_err());
    }
}
