//! Replays the committed fuzz corpora through the fuzz targets' checks, on stable Rust and
//! without cargo-fuzz, so CI catches a regression that a corpus or regression file reproduces.
//!
//! The checks are the very code the fuzz targets run: `fuzz/src/checks.rs` is compiled here as
//! a module. Every file in `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` (if that
//! directory exists) goes through the matching check; a target with no file at all fails the
//! test, so a lost corpus cannot silently turn this into a no-op.

use std::fs;
use std::path::{Path, PathBuf};

#[path = "../fuzz/src/checks.rs"]
mod checks;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every corpus and regression file of `target` through `check`; returns how many ran.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let mut count = 0;
    for kind in ["corpus", "regressions"] {
        for path in files_in(&fuzz_dir().join(kind).join(target)) {
            let data = fs::read(&path).expect("readable corpus file");
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(
                outcome.is_ok(),
                "{target}: {} fails its check (reproduce with \
                 `cargo fuzz run {target} {}` in fuzz/)",
                path.display(),
                path.display()
            );
            count += 1;
        }
    }
    assert!(
        count > 0,
        "{target}: no corpus files under fuzz/corpus/{target}/ or fuzz/regressions/{target}/"
    );
    count
}

#[test]
fn frame_decoder_corpus() {
    replay("frame_decoder", checks::check_frame_decoder);
}

#[test]
fn handshake_corpus() {
    replay("handshake", checks::check_handshake);
}

#[test]
fn utf8_corpus() {
    replay("utf8", checks::check_utf8);
}

#[test]
fn forwarded_corpus() {
    replay("forwarded", checks::check_forwarded);
}

#[test]
fn chat_command_corpus() {
    replay("chat_command", parlor::chat::protocol::check_client_frame);
}
