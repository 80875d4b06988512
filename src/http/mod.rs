//! HTTP/1.1, sans-IO: the upgrade handshake and static file responses.
