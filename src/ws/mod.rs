//! RFC 6455, sans-IO: nothing here touches a socket.
//!
//! - [`frame`]: frame headers and frame encoding.
//! - [`mask`]: payload (un)masking.
//! - [`utf8`]: incremental UTF-8 validation.
//! - [`close`]: close codes and close payloads.
//! - [`reader`]: bytes → messages and control events (reassembly, limits, validation).

pub mod close;
pub mod frame;
pub mod mask;
pub mod reader;
pub mod utf8;
