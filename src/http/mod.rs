//! HTTP/1.1, sans-IO: the upgrade handshake and static file responses.
//!
//! Nothing here touches a socket or (after [`StaticFiles::load`] at startup) the disk: the
//! event loop hands in the bytes it has read and gets back values and bytes to write. That
//! keeps every edge case (split reads, oversize heads, hostile paths) testable as a plain
//! function call.
//!
//! The flow for one connection, as driven by the loop:
//! 1. [`parse_request`] on the read buffer until it returns [`Parsed::Complete`] (or a
//!    [`Parsed::Reject`] response to send before closing).
//! 2. If [`is_upgrade`]: [`check_upgrade`], then write [`switching_protocols`] and hand the
//!    bytes after `head_len` to the WebSocket layer. Otherwise [`StaticFiles::respond`].
//! 3. Any [`Response`] other than 101 is followed by closing the connection.
//!
//! [`client_addr`] says who the client is when the peer is a `--trusted-proxy`.

mod forwarded;
mod handshake;
mod response;
mod static_files;

pub use forwarded::{client_addr, is_trusted, Cidr};
pub use handshake::{
    accept_key, check_upgrade, is_upgrade, parse_request, switching_protocols, HeadLimits, Parsed,
    Request,
};
pub use response::Response;
pub use static_files::StaticFiles;
