//! Counters kept by the event loop, rendered as Prometheus text at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(Debug, Default)]
pub struct Metrics {
    pub accepted: u64,
    pub rejected_max_connections: u64,
    pub rejected_per_ip: u64,
    pub memory_budget_closes: u64,
    pub write_timeouts: u64,
    pub handshakes: u64,
    pub handshake_failures: u64,
    pub handshake_timeouts: u64,
    pub http_requests: u64,
    pub messages_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub pings_sent: u64,
    pub ping_timeouts: u64,
    pub slow_consumer_drops: u64,
    pub accept_errors: u64,
    /// Close frames we sent, by code.
    pub closes_sent: BTreeMap<u16, u64>,
    /// Close frames we received, by code (1005 for an empty close).
    pub closes_received: BTreeMap<u16, u64>,
}

impl Metrics {
    /// Renders the counters; `open`, `websockets` and `accounted` (bytes charged against
    /// `--memory-budget`) are gauges the loop knows at render time.
    pub fn render(&self, open: usize, websockets: usize, accounted: usize, out: &mut String) {
        let mut g = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP parlor_{name} {help}\n# TYPE parlor_{name} {kind}\nparlor_{name} {v}"
            );
        };
        g("connections", "gauge", "Open TCP connections.", open as u64);
        g(
            "websocket_connections",
            "gauge",
            "Open WebSocket connections.",
            websockets as u64,
        );
        g(
            "accepted_total",
            "counter",
            "Accepted TCP connections.",
            self.accepted,
        );
        g(
            "rejected_max_connections_total",
            "counter",
            "Connections refused with 503 at --max-connections.",
            self.rejected_max_connections,
        );
        g(
            "rejected_per_ip_total",
            "counter",
            "Connections refused with 429 at --max-connections-per-ip.",
            self.rejected_per_ip,
        );
        g(
            "memory_accounted_bytes",
            "gauge",
            "Bytes of partly received messages and unshared queued frames (--memory-budget).",
            accounted as u64,
        );
        g(
            "memory_budget_closes_total",
            "counter",
            "Connections closed with 1013 because their growth would pass --memory-budget.",
            self.memory_budget_closes,
        );
        g(
            "write_timeouts_total",
            "counter",
            "Connections dropped for making no write progress for --write-timeout.",
            self.write_timeouts,
        );
        g(
            "handshakes_total",
            "counter",
            "Completed WebSocket handshakes.",
            self.handshakes,
        );
        g(
            "handshake_failures_total",
            "counter",
            "Refused WebSocket upgrades.",
            self.handshake_failures,
        );
        g(
            "handshake_timeouts_total",
            "counter",
            "Connections dropped for not finishing the handshake in time.",
            self.handshake_timeouts,
        );
        g(
            "http_requests_total",
            "counter",
            "Plain HTTP requests served.",
            self.http_requests,
        );
        g(
            "messages_in_total",
            "counter",
            "WebSocket data messages received.",
            self.messages_in,
        );
        g(
            "frames_out_total",
            "counter",
            "WebSocket frames queued for sending.",
            self.frames_out,
        );
        g(
            "bytes_in_total",
            "counter",
            "Bytes read from sockets.",
            self.bytes_in,
        );
        g(
            "bytes_out_total",
            "counter",
            "Bytes written to sockets.",
            self.bytes_out,
        );
        g(
            "pings_sent_total",
            "counter",
            "Keepalive pings sent to idle connections.",
            self.pings_sent,
        );
        g(
            "ping_timeouts_total",
            "counter",
            "Connections dropped for not answering a ping.",
            self.ping_timeouts,
        );
        g(
            "slow_consumer_drops_total",
            "counter",
            "Connections closed with 1008 because their outbound queue was full.",
            self.slow_consumer_drops,
        );
        g(
            "accept_errors_total",
            "counter",
            "accept() failures (e.g. out of file descriptors).",
            self.accept_errors,
        );
        for (name, map, help) in [
            (
                "closes_sent_total",
                &self.closes_sent,
                "Close frames sent, by code.",
            ),
            (
                "closes_received_total",
                &self.closes_received,
                "Close frames received, by code.",
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP parlor_{name} {help}\n# TYPE parlor_{name} counter"
            );
            for (code, n) in map {
                let _ = writeln!(out, "parlor_{name}{{code=\"{code}\"}} {n}");
            }
        }
    }
}
