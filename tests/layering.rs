//! Module layering, checked on the source text (see `docs/ARCHITECTURE.md`, "Modules"):
//!
//! - `ws` and `http` are sans-IO protocol code and import nothing from `net`, `service`, `chat`
//!   or `config`.
//! - `chat::core` is the sans-IO chat hub: no threads, channels, sockets, `mio`, SQLite,
//!   argon2 or clocks (time comes in as an argument).
//!
//! `use` trees are flattened (`use crate::{net, ws}` → `crate::net`, `crate::ws`) and `super::`
//! / `self::` are resolved against the file's module path; the rest of the code (comments
//! removed) is searched for the same paths written inline.

use std::fs;
use std::path::{Path, PathBuf};

const PROTOCOL_DIRS: [&str; 2] = ["src/ws", "src/http"];
const PROTOCOL_FORBIDDEN: [&str; 4] = [
    "crate::net",
    "crate::service",
    "crate::chat",
    "crate::config",
];

const CORE_DIR: &str = "src/chat/core";
/// Paths the core must not use (as a `use` path or inline).
const CORE_FORBIDDEN_PATHS: [&str; 6] = [
    "std::thread",
    "std::sync::mpsc",
    "std::net",
    "mio",
    "rusqlite",
    "argon2",
];
/// Calls the core must not make: it is given the time, it does not read a clock.
const CORE_FORBIDDEN_CALLS: [&str; 2] = ["SystemTime::now", "Instant::now"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`, recursively, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The module path of a file under `src/` (`src/ws/frame.rs` → `crate::ws::frame`,
/// `src/ws/mod.rs` → `crate::ws`).
fn module_path(rel: &Path) -> Vec<String> {
    let mut m = vec!["crate".to_string()];
    let parts: Vec<String> = rel
        .strip_prefix("src")
        .unwrap_or(rel)
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    for (i, p) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let name = if last { p.trim_end_matches(".rs") } else { p };
        if !(last && (name == "mod" || name == "lib")) {
            m.push(name.to_string());
        }
    }
    m
}

/// Removes `//` and `/* */` comments and empties string and char literals (`"--argon2"` →
/// `""`), keeping newlines so line numbers stay right.
fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let b = src.as_bytes();
    let mut i = 0;
    let mut depth = 0;
    while i < b.len() {
        let rest = &b[i..];
        if depth > 0 {
            if rest.starts_with(b"*/") {
                depth -= 1;
                i += 2;
            } else if rest.starts_with(b"/*") {
                depth += 1;
                i += 2;
            } else {
                if b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
        } else if rest.starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if rest.starts_with(b"/*") {
            depth = 1;
            i += 2;
        } else if let Some(len) = literal_len(src, i) {
            out.push_str("\"\"");
            out.extend(src[i..i + len].chars().filter(|&c| c == '\n'));
            i += len;
        } else {
            let ch = src[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// The length of the string, raw string, byte string or char literal starting at `i`, if one
/// does (a `'` that starts a lifetime is not a literal).
fn literal_len(src: &str, i: usize) -> Option<usize> {
    let b = src.as_bytes();
    let prev_ident = i > 0 && is_ident(b[i - 1] as char);
    let mut j = i;
    if !prev_ident && (b[j] == b'b' || b[j] == b'c') && j + 1 < b.len() {
        j += 1;
    }
    if !prev_ident && b[j] == b'r' && j + 1 < b.len() && matches!(b[j + 1], b'"' | b'#') {
        let hashes = b[j + 1..].iter().take_while(|&&c| c == b'#').count();
        let open = j + 1 + hashes;
        if b.get(open) != Some(&b'"') {
            return None;
        }
        let close = format!("\"{}", "#".repeat(hashes));
        return src[open + 1..]
            .find(&close)
            .map(|e| open + 1 + e + close.len() - i);
    }
    if j > i && b[j] != b'"' && b[j] != b'\'' {
        return None; // an identifier starting with b or c
    }
    if prev_ident && j == i {
        return None;
    }
    match b[j] {
        b'"' => {
            let mut k = j + 1;
            while k < b.len() {
                match b[k] {
                    b'\\' => k += 2,
                    b'"' => return Some(k + 1 - i),
                    _ => k += 1,
                }
            }
            Some(b.len() - i)
        }
        b'\'' => {
            // 'x', '\n', '\u{..}', '"'; anything else is a lifetime or label.
            let body = &src[j + 1..];
            let len = if body.starts_with('\\') {
                body.find('\'').filter(|&e| e >= 2)?
            } else {
                body.chars().next()?.len_utf8()
            };
            (body.as_bytes().get(len) == Some(&b'\'')).then_some(j + 1 + len + 1 - i)
        }
        _ => None,
    }
}

/// Removes `#[cfg(test)]` modules (`#[cfg(test)] mod tests { … }`) from comment-free code:
/// tests may read the clock to make an `Instant`; the code they test may not.
fn strip_test_modules(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut from = 0;
    while let Some(pos) = code[from..].find("#[cfg(test)]").map(|p| p + from) {
        let after = &code[pos + "#[cfg(test)]".len()..];
        let item = after.trim_start();
        let is_mod = item.starts_with("mod ") || item.starts_with("pub mod ");
        let brace = after.find('{');
        let semi = after.find(';');
        match brace {
            Some(open) if is_mod && semi.is_none_or(|s| s > open) => {
                let start = pos + "#[cfg(test)]".len() + open;
                let mut depth = 0;
                let mut end = code.len();
                for (k, c) in code[start..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = start + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                out.push_str(&code[from..pos]);
                out.extend(code[pos..end].chars().filter(|&c| c == '\n'));
                from = end;
            }
            _ => {
                out.push_str(&code[from..pos + 1]);
                from = pos + 1;
            }
        }
    }
    out.push_str(&code[from..]);
    out
}

/// Flattens a use tree (`a::{b, c::{d as e, self}}`) into full paths (`a::b`, `a::c::d`,
/// `a::c`).
fn flatten_use(tree: &str) -> Vec<String> {
    let t: String = tree.split_whitespace().collect::<Vec<_>>().join(" ");
    let t = t.replace(" ::", "::").replace(":: ", "::");
    let Some(open) = t.find('{') else {
        let path = t.split(" as ").next().unwrap().trim();
        return vec![path.to_string()];
    };
    let close = t.rfind('}').unwrap_or(t.len());
    let prefix = &t[..open];
    let inner = &t[open + 1..close];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    let mut out = Vec::new();
    for part in parts.into_iter().map(str::trim).filter(|p| !p.is_empty()) {
        for sub in flatten_use(part) {
            if sub == "self" {
                out.push(prefix.trim_end_matches("::").to_string());
            } else {
                out.push(format!("{prefix}{sub}"));
            }
        }
    }
    out
}

/// Makes a path absolute: `super::x` and `self::x` against `module`; a leading `::` dropped.
fn resolve(path: &str, module: &[String]) -> String {
    let path = path.trim_start_matches("::");
    let mut segs: Vec<&str> = path.split("::").collect();
    let mut base: Vec<String> = Vec::new();
    match segs.first() {
        Some(&"self") => {
            base = module.to_vec();
            segs.remove(0);
        }
        Some(&"super") => {
            base = module.to_vec();
            while segs.first() == Some(&"super") {
                base.pop();
                segs.remove(0);
            }
        }
        _ => {}
    }
    base.extend(segs.iter().map(|s| s.to_string()));
    base.join("::")
}

/// The full paths of every `use` item in `code` (comments already stripped), and `code` with
/// those `use` items blanked out (newlines kept, so line numbers stay right).
fn split_uses(code: &str, module: &[String]) -> (Vec<String>, String) {
    let mut paths = Vec::new();
    let mut rest = String::with_capacity(code.len());
    let mut from = 0;
    while let Some(pos) = find_word(&code[from..], "use").map(|p| p + from) {
        let Some(end) = code[pos..].find(';').map(|e| e + pos) else {
            break;
        };
        for p in flatten_use(code[pos + 3..end].trim()) {
            paths.push(resolve(&p, module));
        }
        rest.push_str(&code[from..pos]);
        rest.extend(
            code[pos..=end]
                .chars()
                .map(|c| if c == '\n' { c } else { ' ' }),
        );
        from = end + 1;
    }
    rest.push_str(&code[from..]);
    (paths, rest)
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The first occurrence of `word` not inside a longer identifier or path
/// (`std::net` matches in `std::net::IpAddr`, not in `std::network` or `x::std::net`).
fn find_word(hay: &str, word: &str) -> Option<usize> {
    find_in_path(hay, word, true)
}

/// Like [`find_word`]; with `anchored` false `word` may also end a longer path
/// (`Instant::now` in `std::time::Instant::now()`).
fn find_in_path(hay: &str, word: &str, anchored: bool) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = hay[from..].find(word).map(|i| i + from) {
        let before = hay[..i].chars().next_back();
        let after = hay[i + word.len()..].chars().next();
        let starts = before.is_none_or(|c| !is_ident(c) && (c != ':' || !anchored));
        if starts && after.is_none_or(|c| !is_ident(c)) {
            return Some(i);
        }
        from = i + word.len();
    }
    None
}

/// Whether `path` is `prefix` or lies under it.
fn under(path: &str, prefix: &str) -> bool {
    path == prefix || path.starts_with(&format!("{prefix}::"))
}

/// What `forbidden_paths` / `forbidden_calls` find in one file, as readable lines.
fn violations(
    rel: &Path,
    src: &str,
    forbidden_paths: &[&str],
    forbidden_calls: &[&str],
    skip_tests: bool,
) -> Vec<String> {
    let mut code = strip_comments(src);
    if skip_tests {
        code = strip_test_modules(&code);
    }
    let module = module_path(rel);
    let mut found = Vec::new();
    let (paths, code) = split_uses(&code, &module);
    for p in paths {
        if let Some(f) = forbidden_paths.iter().find(|f| under(&p, f)) {
            found.push(format!("{}: `use {p}` ({f})", rel.display()));
        }
    }
    for (n, line) in code.lines().enumerate() {
        let all = forbidden_paths.iter().map(|f| (f, true));
        for (f, anchored) in all.chain(forbidden_calls.iter().map(|f| (f, false))) {
            // Inline paths: `crate::net::x`, `std::thread::spawn`, `mio::Poll`, `Instant::now()`.
            let hit = find_in_path(line, f, anchored).is_some();
            if hit {
                found.push(format!(
                    "{}:{}: `{}` ({f})",
                    rel.display(),
                    n + 1,
                    line.trim()
                ));
            }
        }
    }
    found
}

/// Files only compiled for tests (`tests.rs`, `testutil.rs`, `*_tests.rs`), skipped with
/// `skip_tests` like `#[cfg(test)]` modules.
fn is_test_file(p: &Path) -> bool {
    let stem = p.file_stem().unwrap_or_default().to_string_lossy();
    stem == "tests" || stem == "testutil" || stem.ends_with("_tests")
}

fn check_dirs(
    dirs: &[&str],
    forbidden_paths: &[&str],
    forbidden_calls: &[&str],
    skip_tests: bool,
) -> Vec<String> {
    let root = root();
    let mut found = Vec::new();
    for dir in dirs {
        for file in rust_files(&root.join(dir)) {
            let rel = file.strip_prefix(&root).unwrap().to_path_buf();
            if skip_tests && is_test_file(&rel) {
                continue;
            }
            let src = fs::read_to_string(&file).unwrap();
            found.extend(violations(
                &rel,
                &src,
                forbidden_paths,
                forbidden_calls,
                skip_tests,
            ));
        }
    }
    found
}

#[test]
fn ws_and_http_import_nothing_above_them() {
    let found = check_dirs(&PROTOCOL_DIRS, &PROTOCOL_FORBIDDEN, &[], false);
    assert!(
        found.is_empty(),
        "ws and http must not depend on net, service, chat or config:\n{}",
        found.join("\n")
    );
}

#[test]
fn chat_core_is_sans_io() {
    let dir = root().join(CORE_DIR);
    assert!(dir.is_dir(), "src/chat/core is missing");
    assert!(
        !rust_files(&dir).is_empty(),
        "src/chat/core has no .rs files"
    );
    let found = check_dirs(
        &[CORE_DIR],
        &CORE_FORBIDDEN_PATHS,
        &CORE_FORBIDDEN_CALLS,
        true,
    );
    assert!(
        found.is_empty(),
        "chat::core must stay sans-IO (no threads, channels, sockets, mio, SQLite, argon2 or \
         clock reads):\n{}",
        found.join("\n")
    );
}

/// The checker itself: it must see what it is meant to see, and nothing else.
#[test]
fn checker_finds_forbidden_paths() {
    let ws = Path::new("src/ws/frame.rs");
    let hits = |src: &str| violations(ws, src, &PROTOCOL_FORBIDDEN, &[], false).len();
    assert_eq!(hits("use crate::service::SharedFrame;"), 1);
    assert_eq!(hits("use crate::{net, ws::mask};"), 1);
    assert_eq!(
        hits("use crate::{\n    config::Config,\n    chat::{self, X},\n};"),
        3
    );
    assert_eq!(hits("use super::super::net::Server;"), 1);
    assert_eq!(hits("fn f(x: crate::chat::Foo) {}"), 1);
    assert_eq!(
        hits("use super::close::CloseCode;\nuse crate::ws::mask;"),
        0
    );
    assert_eq!(
        hits("// crate::service is mentioned in a comment\n/* crate::net */"),
        0
    );
    assert_eq!(hits("use crate::network;"), 0);

    let core = Path::new("src/chat/core/hub.rs");
    let hits = |src: &str| {
        violations(
            core,
            src,
            &CORE_FORBIDDEN_PATHS,
            &CORE_FORBIDDEN_CALLS,
            true,
        )
        .len()
    };
    assert_eq!(hits("use std::thread;"), 1);
    assert_eq!(
        hits("use std::{sync::{mpsc::Sender, Arc}, net::TcpStream};"),
        2
    );
    assert_eq!(hits("use mio::Waker;"), 1);
    assert_eq!(hits("let c = rusqlite::Connection::open(p);"), 1);
    assert_eq!(hits("let t = std::time::Instant::now();"), 1);
    assert_eq!(hits("let t = SystemTime::now();"), 1);
    assert_eq!(hits("std::thread::spawn(f);"), 1);
    assert_eq!(hits("let s = \"mio:: and rusqlite:: in a string\";"), 0);
    assert_eq!(
        hits("let s = r#\"Instant::now()\"#; let c = '\"'; fn f<'a>(x: &'a u8) {}"),
        0
    );
    assert_eq!(
        hits("fn f() {}\n#[cfg(test)]\nmod tests {\n    fn t() { let t = Instant::now(); }\n}\nuse mio::Poll;"),
        1
    );
    assert_eq!(
        hits("use std::sync::Arc;\nuse std::time::{Duration, Instant};"),
        0
    );
    assert_eq!(
        hits("fn f(now: Instant) -> Instant { now }\nlet mio_like = 1;"),
        0
    );
}

#[test]
fn module_paths() {
    assert_eq!(module_path(Path::new("src/ws/mod.rs")), ["crate", "ws"]);
    assert_eq!(
        module_path(Path::new("src/chat/core/hub.rs")),
        ["crate", "chat", "core", "hub"]
    );
    assert_eq!(
        resolve("super::close", &module_path(Path::new("src/ws/frame.rs"))),
        "crate::ws::close"
    );
}
