//! Embeds the browser client (`www/`) in the binary, so `parlor` serves it from any working
//! directory. Writes `$OUT_DIR/embedded_www.rs`: a list of (relative path, bytes) with
//! `include_bytes!` for every regular file under `www/` (names starting with `.` skipped, as
//! `StaticFiles::load` does). A plain build script instead of a crate: twenty lines, and cargo
//! reruns it whenever anything under `www/` changes.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

fn walk(dir: &Path, prefix: &str, out: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = e.path();
        let key = format!("{prefix}{name}");
        match e.file_type() {
            Ok(t) if t.is_dir() => walk(&path, &format!("{key}/"), out),
            Ok(t) if t.is_file() => out.push((key, path)),
            _ => {}
        }
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("www");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut files = Vec::new();
    walk(&root, "", &mut files);
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("embedded_www.rs");
    let mut f = fs::File::create(&out).expect("create embedded_www.rs");
    writeln!(f, "pub static EMBEDDED_WWW: &[(&str, &[u8])] = &[").expect("write");
    for (key, path) in &files {
        println!("cargo:rerun-if-changed={}", path.display());
        writeln!(
            f,
            "    ({key:?}, include_bytes!({:?})),",
            path.display().to_string()
        )
        .expect("write");
    }
    writeln!(f, "];").expect("write");
}
