//! Counters kept by the event loop, rendered as Prometheus text at `/metrics`.

use std::collections::BTreeMap;

use crate::prom::{Kind, Writer};

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
    pub tls_handshakes: u64,
    pub tls_failures: u64,
    pub tls_plain_http: u64,
    pub tls_reloads: u64,
    pub tls_reload_failures: u64,
    /// Close frames we sent, by code.
    pub closes_sent: BTreeMap<u16, u64>,
    /// Close frames we received, by code (1005 for an empty close).
    pub closes_received: BTreeMap<u16, u64>,
}

impl Metrics {
    /// Renders the counters; `open`, `websockets` and `accounted` (bytes charged against
    /// `--memory-budget`) are gauges the loop knows at render time.
    pub fn render(&self, open: usize, websockets: usize, accounted: usize, out: &mut String) {
        let mut w = Writer::new(out);
        w.gauge("parlor_connections", "Open TCP connections.", open);
        w.gauge(
            "parlor_websocket_connections",
            "Open WebSocket connections.",
            websockets,
        );
        w.counter(
            "parlor_accepted_total",
            "Accepted TCP connections.",
            self.accepted,
        );
        w.counter(
            "parlor_rejected_max_connections_total",
            "Connections refused with 503 at --max-connections.",
            self.rejected_max_connections,
        );
        w.counter(
            "parlor_rejected_per_ip_total",
            "Connections refused with 429 at --max-connections-per-ip.",
            self.rejected_per_ip,
        );
        w.gauge(
            "parlor_memory_accounted_bytes",
            "Bytes of partly received messages and unshared queued frames (--memory-budget).",
            accounted,
        );
        w.counter(
            "parlor_memory_budget_closes_total",
            "Connections closed with 1013 because their growth would pass --memory-budget.",
            self.memory_budget_closes,
        );
        w.counter(
            "parlor_write_timeouts_total",
            "Connections dropped for making no write progress for --write-timeout.",
            self.write_timeouts,
        );
        w.counter(
            "parlor_handshakes_total",
            "Completed WebSocket handshakes.",
            self.handshakes,
        );
        w.counter(
            "parlor_handshake_failures_total",
            "Refused WebSocket upgrades.",
            self.handshake_failures,
        );
        w.counter(
            "parlor_handshake_timeouts_total",
            "Connections dropped for not finishing the handshake in time.",
            self.handshake_timeouts,
        );
        w.counter(
            "parlor_http_requests_total",
            "Plain HTTP requests served.",
            self.http_requests,
        );
        w.counter(
            "parlor_messages_in_total",
            "WebSocket data messages received.",
            self.messages_in,
        );
        w.counter(
            "parlor_frames_out_total",
            "WebSocket frames queued for sending.",
            self.frames_out,
        );
        w.counter(
            "parlor_bytes_in_total",
            "Bytes read from sockets.",
            self.bytes_in,
        );
        w.counter(
            "parlor_bytes_out_total",
            "Bytes written to sockets.",
            self.bytes_out,
        );
        w.counter(
            "parlor_pings_sent_total",
            "Keepalive pings sent to idle connections.",
            self.pings_sent,
        );
        w.counter(
            "parlor_ping_timeouts_total",
            "Connections dropped for not answering a ping.",
            self.ping_timeouts,
        );
        w.counter(
            "parlor_slow_consumer_drops_total",
            "Connections closed with 1008 because their outbound queue was full.",
            self.slow_consumer_drops,
        );
        w.counter(
            "parlor_accept_errors_total",
            "accept() failures (e.g. out of file descriptors).",
            self.accept_errors,
        );
        w.counter(
            "parlor_tls_handshakes_total",
            "Completed TLS handshakes.",
            self.tls_handshakes,
        );
        w.counter(
            "parlor_tls_failures_total",
            "Connections dropped for a TLS error (bad handshake, corrupt record).",
            self.tls_failures,
        );
        w.counter(
            "parlor_tls_plain_http_total",
            "Plain HTTP requests on the TLS port, answered 400.",
            self.tls_plain_http,
        );
        w.counter(
            "parlor_tls_reloads_total",
            "Certificate reloads (SIGHUP) that took effect.",
            self.tls_reloads,
        );
        w.counter(
            "parlor_tls_reload_failures_total",
            "Certificate reloads that failed (the previous pair stays in use).",
            self.tls_reload_failures,
        );
        for (name, map, help) in [
            (
                "parlor_closes_sent_total",
                &self.closes_sent,
                "Close frames sent, by code.",
            ),
            (
                "parlor_closes_received_total",
                &self.closes_received,
                "Close frames received, by code.",
            ),
        ] {
            w.labelled(
                name,
                Kind::Counter,
                help,
                "code",
                map.iter().map(|(c, n)| (c, *n)),
            );
        }
    }
}
