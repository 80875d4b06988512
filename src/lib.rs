//! Parlor: a self-hosted chat server on a hand-rolled RFC 6455 stack.
//!
//! Layering (a module may only depend on the ones above it in this list; `tests/layering.rs`
//! checks the first two):
//! - [`units`], [`prom`]: value parsers for flags and the Prometheus text writer; leaves that
//!   depend on nothing in the crate.
//! - [`ws`]: the WebSocket protocol, sans-IO (byte slices in, frames and events out).
//! - [`http`]: the HTTP/1.1 upgrade handshake and static file responses, sans-IO.
//! - [`service`]: the interface between the event loop and what runs on it (echo, chat).
//! - [`net`]: the mio event loop: sockets, buffers, queues, timers. The only module doing I/O
//!   on client sockets.
//! - [`echo`], [`chat`]: services plugged into the loop by path.
//! - [`config`]: every flag and limit, in one place.
//! - [`embedded`]: the browser client (`www/`), built into the binary by `build.rs`.

pub mod chat;
pub mod config;
pub mod echo;

/// The browser client as it was in `www/` at build time (see `build.rs`).
pub mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded_www.rs"));
}

pub mod http;
pub mod logfmt;
pub mod net;
pub mod prom;
pub mod service;
pub mod units;
pub mod ws;
