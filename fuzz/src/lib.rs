//! Fuzz-target bodies for Parlor, as plain functions.
//!
//! The checks live in `checks.rs`, which depends only on `std` and `parlor` so that the main
//! crate's `tests/fuzz_corpus.rs` can compile the very same file (via `#[path]`) and replay the
//! committed corpora on stable Rust without cargo-fuzz. Each target in `fuzz_targets/` is a
//! one-line call into this library.

mod checks;

pub use checks::{check_forwarded, check_frame_decoder, check_handshake, check_utf8};
