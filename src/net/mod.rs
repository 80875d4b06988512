//! The mio event loop: the only code that touches client sockets.
//!
//! - [`server`]: the loop itself, accepting, reading, routing to services, flushing.
//! - [`connection`]: per-connection state and phases.
//! - [`outbound`]: the bounded outbound queue and vectored writes.
//! - [`timers`]: handshake, keepalive and close deadlines.
//! - [`metrics`]: counters for `/metrics`.
//! - [`tls`]: built-in TLS, rustls driven sans-IO.

pub mod connection;
pub mod metrics;
pub mod outbound;
pub mod server;
pub mod timers;
pub mod tls;

pub use server::{Endpoint, Server};
