//! Prometheus text exposition format (version 0.0.4), the one writer behind `/metrics`.
//!
//! The loop ([`crate::net::metrics`]) and the services (`Service::metrics`) append their series
//! to the same `String` through a [`Writer`], so every family is written the same way:
//! `# HELP`, `# TYPE`, then its samples. Pure: no clocks, no I/O.

use std::fmt::{self, Display, Write as _};

/// A sample value. Integers are written as integers; floats as Rust prints them (`3` for 3.0,
/// `0.25`), with `+Inf`, `-Inf` and `NaN` spelled the way Prometheus reads them.
pub trait Value: Copy {
    fn write_to(self, out: &mut String);
}

macro_rules! int_value {
    ($($t:ty),*) => {$(
        impl Value for $t {
            fn write_to(self, out: &mut String) {
                let _ = write!(out, "{self}");
            }
        }
    )*};
}
int_value!(u64, u32, usize, i64);

impl Value for f64 {
    fn write_to(self, out: &mut String) {
        if self.is_nan() {
            out.push_str("NaN");
        } else if self.is_infinite() {
            out.push_str(if self > 0.0 { "+Inf" } else { "-Inf" });
        } else {
            let _ = write!(out, "{self}");
        }
    }
}

/// The kind of a metric family (`# TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Summary,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Summary => "summary",
        }
    }
}

/// Count, sum and maximum of observed values (latencies, batch sizes), written by
/// [`Writer::summary`] as `NAME_count`, `NAME_sum` and a `NAME_max` gauge.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub sum: f64,
    pub max: f64,
}

impl Summary {
    pub fn add(&mut self, v: f64) {
        self.count += 1;
        self.sum += v;
        if v > self.max {
            self.max = v;
        }
    }
}

/// Appends metric families to a `String`. Names are written as given (callers include the
/// `parlor_` prefix); help text should be one line.
pub struct Writer<'a> {
    out: &'a mut String,
}

impl<'a> Writer<'a> {
    pub fn new(out: &'a mut String) -> Writer<'a> {
        Writer { out }
    }

    /// `# HELP` and `# TYPE` lines of a family whose samples the caller writes next.
    pub fn header(&mut self, name: &str, kind: Kind, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    /// One unlabelled sample line.
    pub fn sample(&mut self, name: &str, value: impl Value) {
        self.out.push_str(name);
        self.out.push(' ');
        value.write_to(self.out);
        self.out.push('\n');
    }

    /// One sample line with a single label, `name{label="value"} v`.
    pub fn labelled_sample(
        &mut self,
        name: &str,
        label: &str,
        label_value: impl Display,
        value: impl Value,
    ) {
        let _ = write!(self.out, "{name}{{{label}=\"");
        let _ = write!(Escaped(self.out), "{label_value}");
        self.out.push_str("\"} ");
        value.write_to(self.out);
        self.out.push('\n');
    }

    /// A counter family with one unlabelled sample.
    pub fn counter(&mut self, name: &str, help: &str, value: impl Value) {
        self.header(name, Kind::Counter, help);
        self.sample(name, value);
    }

    /// A gauge family with one unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: impl Value) {
        self.header(name, Kind::Gauge, help);
        self.sample(name, value);
    }

    /// A family with one sample per value of `label` (the header is written even when
    /// `series` is empty).
    pub fn labelled<L: Display, V: Value>(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        label: &str,
        series: impl IntoIterator<Item = (L, V)>,
    ) {
        self.header(name, kind, help);
        for (l, v) in series {
            self.labelled_sample(name, label, l, v);
        }
    }

    /// A summary without quantiles (`NAME_count`, `NAME_sum`) plus a `NAME_max` gauge.
    pub fn summary(&mut self, name: &str, help: &str, s: &Summary) {
        self.header(name, Kind::Summary, help);
        self.sample(&format!("{name}_count"), s.count);
        self.sample(&format!("{name}_sum"), s.sum);
        let _ = writeln!(self.out, "# TYPE {name}_max gauge");
        self.sample(&format!("{name}_max"), s.max);
    }
}

/// Escapes a label value as the text format requires (`\\`, `\"`, `\n`).
struct Escaped<'a>(&'a mut String);

impl fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            match c {
                '\\' => self.0.push_str("\\\\"),
                '"' => self.0.push_str("\\\""),
                '\n' => self.0.push_str("\\n"),
                c => self.0.push(c),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families() {
        let mut s = String::new();
        let mut w = Writer::new(&mut s);
        w.counter("parlor_x_total", "Things.", 3u64);
        w.gauge("parlor_y", "Level.", 0.25);
        w.labelled(
            "parlor_z_total",
            Kind::Counter,
            "By code.",
            "code",
            [(1000u16, 2u64), (1008, 1)],
        );
        assert_eq!(
            s,
            "# HELP parlor_x_total Things.\n# TYPE parlor_x_total counter\nparlor_x_total 3\n\
             # HELP parlor_y Level.\n# TYPE parlor_y gauge\nparlor_y 0.25\n\
             # HELP parlor_z_total By code.\n# TYPE parlor_z_total counter\n\
             parlor_z_total{code=\"1000\"} 2\nparlor_z_total{code=\"1008\"} 1\n"
        );
    }

    #[test]
    fn summary_and_special_values() {
        let mut sum = Summary::default();
        sum.add(0.5);
        sum.add(2.0);
        let mut s = String::new();
        let mut w = Writer::new(&mut s);
        w.summary("lat", "Latency.", &sum);
        w.gauge("inf", "h", f64::INFINITY);
        w.gauge("nan", "h", f64::NAN);
        assert_eq!(
            s,
            "# HELP lat Latency.\n# TYPE lat summary\nlat_count 2\nlat_sum 2.5\n\
             # TYPE lat_max gauge\nlat_max 2\n\
             # HELP inf h\n# TYPE inf gauge\ninf +Inf\n# HELP nan h\n# TYPE nan gauge\nnan NaN\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut s = String::new();
        Writer::new(&mut s).labelled_sample("m", "l", "a\"b\\c\nd", 1u64);
        assert_eq!(s, "m{l=\"a\\\"b\\\\c\\nd\"} 1\n");
    }
}
