//! The browser client, served from memory.
//!
//! Files are read once at startup ([`StaticFiles::load`]) so the event loop never blocks on
//! the disk, and so the set of servable files is fixed and known: a request can only ever
//! name an entry of a map, never a path on the filesystem. Path normalisation below is still
//! strict, because "it would 404 anyway" is a weaker argument than "it is rejected".

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{Request, Response};

/// Content-Security-Policy for documents: scripts, styles and sockets from this origin only.
const CSP: &str = "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; \
                   style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; \
                   frame-ancestors 'none'";

/// Symlinked directories can form cycles; past this depth the walk stops descending.
const MAX_DEPTH: usize = 32;

/// An in-memory snapshot of the static file directory.
#[derive(Debug, Default)]
pub struct StaticFiles {
    /// Keyed by path relative to the root, `/`-separated, no leading slash (`js/app.js`).
    files: HashMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    body: Box<[u8]>,
    content_type: &'static str,
    /// Strong validator, quotes included (`"<len>-<hash>"`).
    etag: String,
}

impl StaticFiles {
    /// Walks `root` recursively and reads every regular file into memory.
    ///
    /// Skipped: names starting with `.` (`.git`, `.env`, editor swap files), symlinks whose
    /// target lies outside `root` or does not exist, non-UTF-8 names (no request could name
    /// them reliably) and anything that is not a regular file or directory (a FIFO would block
    /// the read). Symlinks inside `root` are followed, so a file reachable under several names
    /// is held (and counted against `max_total`) once per name; directory cycles are cut.
    ///
    /// Errors if the files total more than `max_total` bytes (checked before reading each file),
    /// if `root` exists but is not a directory, or on any I/O error. A missing `root` is not an
    /// error: the server then only speaks WebSocket, which is a legitimate deployment, so it
    /// yields an empty cache and a warning.
    pub fn load(root: &Path, max_total: usize) -> io::Result<StaticFiles> {
        let canonical = match fs::canonicalize(root) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                log::warn!(
                    "static root {} does not exist; serving no files",
                    root.display()
                );
                return Ok(StaticFiles::default());
            }
            Err(e) => return Err(with_path(e, root)),
        };
        if !canonical.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("static root {} is not a directory", root.display()),
            ));
        }
        let mut walk = Walk {
            root: canonical.clone(),
            max_total,
            total: 0,
            files: HashMap::new(),
            ancestors: Vec::new(),
        };
        walk.dir(&canonical, "")?;
        log::info!(
            "loaded {} static files ({} bytes) from {}",
            walk.files.len(),
            walk.total,
            root.display()
        );
        Ok(StaticFiles { files: walk.files })
    }

    /// A snapshot of files given in memory as (relative `/`-separated path, bytes): the
    /// browser client embedded in the binary at build time.
    pub fn from_memory(files: &[(&str, &[u8])]) -> StaticFiles {
        let files = files
            .iter()
            .map(|(key, body)| {
                let entry = Entry {
                    content_type: content_type(key),
                    etag: etag(body),
                    body: body.to_vec().into_boxed_slice(),
                };
                (key.to_string(), entry)
            })
            .collect();
        StaticFiles { files }
    }

    /// Number of files held.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// True if no files are held (e.g. the root was missing).
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Responds to a non-upgrade request.
    ///
    /// GET and HEAD only (else 405, `Allow: GET, HEAD`). The path is percent-decoded (bad
    /// escapes → 400); NUL, backslash, empty segments (`//`), `.`/`..` and other dot-segments
    /// → 404. A path ending in `/` means that directory's `index.html`; there are no listings.
    /// `If-None-Match` naming the current ETag → 304. HEAD gets the GET headers and no body;
    /// this applies to error responses too.
    pub fn respond(&self, req: &Request) -> Response {
        let head_only = match req.method.as_str() {
            "GET" => false,
            "HEAD" => true,
            _ => {
                return Response::text(405, "method not allowed").header("Allow", "GET, HEAD");
            }
        };
        let mut resp = self.respond_get(req);
        resp.head_only = head_only;
        resp
    }

    fn respond_get(&self, req: &Request) -> Response {
        let key = match lookup_key(&req.path) {
            Ok(key) => key,
            Err(resp) => return resp,
        };
        let Some(entry) = self.files.get(&key) else {
            return not_found();
        };
        if req
            .headers
            .iter()
            .filter(|(n, _)| n == "if-none-match")
            .any(|(_, v)| etag_matches(v, &entry.etag))
        {
            return Response::new(304)
                .header("ETag", entry.etag.clone())
                .header("Cache-Control", "no-cache");
        }
        let mut resp = Response::new(200)
            .header("Content-Type", entry.content_type)
            .header("ETag", entry.etag.clone())
            .header("Cache-Control", "no-cache")
            .header("X-Content-Type-Options", "nosniff");
        // SVG is a document too: opened directly it can run script in our origin.
        if entry.content_type.starts_with("text/html") || entry.content_type == "image/svg+xml" {
            resp = resp
                .header("Content-Security-Policy", CSP)
                .header("Referrer-Policy", "no-referrer");
        }
        resp.body = entry.body.to_vec();
        resp
    }
}

fn not_found() -> Response {
    Response::text(404, "not found")
}

/// Maps a request path to a cache key, or the response refusing it.
fn lookup_key(path: &str) -> Result<String, Response> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(not_found());
    };
    let Some(decoded) = percent_decode(rest.as_bytes()) else {
        return Err(Response::text(400, "invalid percent-encoding in path"));
    };
    if decoded.iter().any(|&b| b == 0 || b == b'\\') {
        return Err(not_found());
    }
    let Ok(mut key) = String::from_utf8(decoded) else {
        return Err(not_found());
    };
    if key.is_empty() || key.ends_with('/') {
        key.push_str("index.html");
    }
    // Checked after decoding, so `%2e%2e` and `..%2f` are caught like `..` and `../`. Dot
    // segments are never resolved, only refused: nothing legitimate needs them.
    if key
        .split('/')
        .any(|seg| seg.is_empty() || seg.starts_with('.'))
    {
        return Err(not_found());
    }
    Ok(key)
}

/// Decodes `%XX` escapes. `None` if a `%` is not followed by two hex digits.
fn percent_decode(input: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' {
            let hi = hex_value(*input.get(i + 1)?)?;
            let lo = hex_value(*input.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(input[i]);
            i += 1;
        }
    }
    Some(out)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `If-None-Match` uses the weak comparison (RFC 9110 §13.1.2): `W/` prefixes are ignored.
fn etag_matches(header: &[u8], etag: &str) -> bool {
    let strip_weak = |t: &[u8]| -> Vec<u8> {
        let t = t.trim_ascii();
        t.strip_prefix(b"W/").unwrap_or(t).to_vec()
    };
    if header.trim_ascii() == b"*" {
        return true;
    }
    let ours = strip_weak(etag.as_bytes());
    header.split(|&b| b == b',').any(|t| strip_weak(t) == ours)
}

/// Content-Type by (case-insensitive) extension; text types are declared UTF-8 so browsers
/// never guess.
fn content_type(name: &str) -> &'static str {
    let ext = match name.rsplit_once('.') {
        Some((_, ext)) => ext.to_ascii_lowercase(),
        None => return "application/octet-stream",
    };
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "txt" => "text/plain; charset=utf-8",
        "json" | "map" => "application/json",
        "webmanifest" => "application/manifest+json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "ico" => "image/x-icon",
        "wav" => "audio/wav",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        _ => "application/octet-stream",
    }
}

/// Strong ETag from length and 64-bit FNV-1a of the content: cheap, and stable across
/// restarts so browsers revalidate instead of re-downloading after a redeploy of the same files.
fn etag(body: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in body {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("\"{:x}-{:016x}\"", body.len(), hash)
}

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {}", path.display(), e))
}

struct Walk {
    /// Canonical root: every followed symlink must resolve under it.
    root: PathBuf,
    max_total: usize,
    total: usize,
    files: HashMap<String, Entry>,
    /// Canonical directories on the current descent, to cut symlink cycles.
    ancestors: Vec<PathBuf>,
}

impl Walk {
    /// Loads directory `dir` (canonical) whose files get keys prefixed by `prefix`.
    fn dir(&mut self, dir: &Path, prefix: &str) -> io::Result<()> {
        if self.ancestors.iter().any(|a| a == dir) {
            log::warn!("static: skipping {} (directory cycle)", dir.display());
            return Ok(());
        }
        if self.ancestors.len() >= MAX_DEPTH {
            log::warn!("static: skipping {} (too deep)", dir.display());
            return Ok(());
        }
        let mut entries = fs::read_dir(dir)
            .and_then(|rd| rd.collect::<io::Result<Vec<_>>>())
            .map_err(|e| with_path(e, dir))?;
        // Deterministic order, so which file trips `max_total` does not vary between runs.
        entries.sort_by_key(|e| e.file_name());
        self.ancestors.push(dir.to_path_buf());
        for entry in entries {
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                log::warn!("static: skipping {} (name not UTF-8)", path.display());
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let file_type = entry.file_type().map_err(|e| with_path(e, &path))?;
            let target = if file_type.is_symlink() {
                match fs::canonicalize(&path) {
                    Ok(t) if t.starts_with(&self.root) => t,
                    Ok(_) => {
                        log::warn!("static: skipping {} (links outside root)", path.display());
                        continue;
                    }
                    Err(_) => {
                        log::warn!("static: skipping {} (dangling link)", path.display());
                        continue;
                    }
                }
            } else {
                path
            };
            let meta = fs::metadata(&target).map_err(|e| with_path(e, &target))?;
            let key = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            if meta.is_dir() {
                self.dir(&target, &key)?;
            } else if meta.is_file() {
                self.file(&target, key, meta.len())?;
            }
        }
        self.ancestors.pop();
        Ok(())
    }

    fn file(&mut self, path: &Path, key: String, size_hint: u64) -> io::Result<()> {
        let too_big = |total: usize| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "static files under {} exceed {} bytes ({} with {})",
                    self.root.display(),
                    self.max_total,
                    total,
                    path.display()
                ),
            )
        };
        let hint = usize::try_from(size_hint).unwrap_or(usize::MAX);
        if self.total.saturating_add(hint) > self.max_total {
            return Err(too_big(self.total.saturating_add(hint)));
        }
        let body = fs::read(path).map_err(|e| with_path(e, path))?;
        // The file may have grown since stat.
        let total = self.total + body.len();
        if total > self.max_total {
            return Err(too_big(total));
        }
        self.total = total;
        let entry = Entry {
            content_type: content_type(&key),
            etag: etag(&body),
            body: body.into_boxed_slice(),
        };
        self.files.insert(key, entry);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "parlor-static-{}-{}-{}",
                std::process::id(),
                tag,
                n
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        fn write(&self, rel: &str, content: &[u8]) {
            let p = self.0.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, content).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// `outer/` holds `secret.txt` (outside the root) and `root/`, the static root.
    fn site() -> (TempDir, StaticFiles) {
        let t = TempDir::new("site");
        t.write("secret.txt", b"top secret");
        t.write("root/index.html", b"<!doctype html><title>parlor</title>");
        t.write("root/app.js", b"console.log(1)");
        t.write("root/style.css", b"body{}");
        t.write("root/sub/index.html", b"sub index");
        t.write("root/sub/page.html", b"sub page");
        t.write("root/nested/deeper/file.txt", b"deep");
        t.write("root/empty/.keep", b"");
        t.write("root/.env", b"SECRET=1");
        t.write("root/.git/config", b"[core]");
        t.write("root/sub/.hidden", b"hidden");
        t.write("root/a b.txt", b"space");
        #[cfg(unix)]
        {
            use std::os::unix::fs::symlink;
            let root = t.0.join("root");
            symlink(t.0.join("secret.txt"), root.join("leak.txt")).unwrap();
            symlink(&t.0, root.join("up")).unwrap();
            symlink(root.join("app.js"), root.join("alias.js")).unwrap();
            symlink(&root, root.join("sub/loop")).unwrap();
            symlink(root.join("nested"), root.join("linkdir")).unwrap();
            symlink(root.join("missing"), root.join("dangling")).unwrap();
        }
        let files = StaticFiles::load(&t.0.join("root"), 1 << 20).unwrap();
        (t, files)
    }

    fn req(method: &str, path: &str) -> Request {
        Request {
            method: method.to_string(),
            path: path.to_string(),
            query: String::new(),
            version: 1,
            headers: vec![("host".to_string(), b"localhost".to_vec())],
        }
    }

    fn get(files: &StaticFiles, path: &str) -> Response {
        files.respond(&req("GET", path))
    }

    #[test]
    fn serves_files_with_headers() {
        let (_t, files) = site();
        let r = get(&files, "/app.js");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"console.log(1)");
        assert_eq!(
            r.get_header("Content-Type"),
            Some("text/javascript; charset=utf-8")
        );
        assert_eq!(r.get_header("Cache-Control"), Some("no-cache"));
        assert_eq!(r.get_header("X-Content-Type-Options"), Some("nosniff"));
        assert_eq!(r.get_header("ETag"), Some(etag(b"console.log(1)").as_str()));
        // CSP only on documents.
        assert_eq!(r.get_header("Content-Security-Policy"), None);
        assert!(!r.head_only);
    }

    #[test]
    fn html_gets_csp_and_referrer_policy() {
        let (_t, files) = site();
        let r = get(&files, "/index.html");
        assert_eq!(r.status, 200);
        assert_eq!(
            r.get_header("Content-Type"),
            Some("text/html; charset=utf-8")
        );
        assert_eq!(
            r.get_header("Content-Security-Policy"),
            Some(
                "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; \
                 style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; \
                 frame-ancestors 'none'"
            )
        );
        assert_eq!(r.get_header("Referrer-Policy"), Some("no-referrer"));
        // Guard against line-continuation mistakes in the const: one exact line.
        assert_eq!(
            CSP.split("; ").collect::<Vec<_>>(),
            [
                "default-src 'self'",
                "connect-src 'self' ws: wss:",
                "img-src 'self' data:",
                "style-src 'self'",
                "script-src 'self'",
                "object-src 'none'",
                "base-uri 'none'",
                "frame-ancestors 'none'",
            ]
        );
    }

    #[test]
    fn index_mapping() {
        let (_t, files) = site();
        assert_eq!(
            get(&files, "/").body,
            b"<!doctype html><title>parlor</title>"
        );
        assert_eq!(get(&files, "/sub/").body, b"sub index");
        assert_eq!(get(&files, "/sub/page.html").body, b"sub page");
        assert_eq!(get(&files, "/nested/deeper/file.txt").body, b"deep");
        // Directory without index: no listing.
        assert_eq!(get(&files, "/nested/").status, 404);
        assert_eq!(get(&files, "/empty/").status, 404);
        // A directory named without the slash is not a file.
        assert_eq!(get(&files, "/sub").status, 404);
    }

    #[test]
    fn query_is_ignored_and_percent_decoding_applies() {
        let (_t, files) = site();
        let mut r = req("GET", "/app.js");
        r.query = "v=2".to_string();
        assert_eq!(files.respond(&r).status, 200);
        assert_eq!(get(&files, "/a%20b.txt").body, b"space");
        assert_eq!(get(&files, "/%61pp.js").status, 200);
        assert_eq!(get(&files, "/sub%2Fpage.html").body, b"sub page");
    }

    #[test]
    fn not_found() {
        let (_t, files) = site();
        let r = get(&files, "/nope.js");
        assert_eq!(r.status, 404);
        assert_eq!(r.body, b"not found\n");
        assert_eq!(get(&files, "*").status, 404);
        assert_eq!(get(&files, "/index.html/").status, 404);
    }

    #[test]
    fn dotfiles_are_neither_loaded_nor_served() {
        let (_t, files) = site();
        for path in [
            "/.env",
            "/.git/config",
            "/sub/.hidden",
            "/%2eenv",
            "/empty/.keep",
        ] {
            assert_eq!(get(&files, path).status, 404, "{path}");
        }
        assert!(!files
            .files
            .keys()
            .any(|k| k.contains("/.") || k.starts_with('.')));
    }

    #[test]
    fn traversal_attempts_are_404() {
        let (_t, files) = site();
        for path in [
            "/../Cargo.toml",
            "/../secret.txt",
            "/%2e%2e/secret.txt",
            "/%2E%2E/secret.txt",
            "/a/../../x",
            "/sub/../app.js",
            "/./app.js",
            "/sub/./page.html",
            "//etc/passwd",
            "/sub//page.html",
            "/..%2f",
            "/..%2fsecret.txt",
            "/%2e%2e%2fsecret.txt",
            "/..",
            "/.",
            "/sub/..",
            "/..\\secret.txt",
            "/%5c..%5csecret.txt",
            "/app.js%00.html",
            "/%00",
            "/up/secret.txt",
            "/leak.txt",
            "/%ff",
        ] {
            let r = get(&files, path);
            assert_eq!(r.status, 404, "{path}");
            assert!(!r.body.starts_with(b"top secret"), "{path}");
        }
    }

    #[test]
    fn bad_percent_encoding_is_400() {
        let (_t, files) = site();
        for path in ["/%", "/%2", "/%zz", "/app%2.js", "/%g0"] {
            assert_eq!(get(&files, path).status, 400, "{path}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_inside_root_are_followed_outside_skipped() {
        let (_t, files) = site();
        assert_eq!(get(&files, "/alias.js").body, b"console.log(1)");
        assert_eq!(get(&files, "/leak.txt").status, 404);
        assert_eq!(get(&files, "/dangling").status, 404);
        // A symlinked directory inside the root is served under its own name too.
        assert_eq!(get(&files, "/linkdir/deeper/file.txt").body, b"deep");
        // sub/loop -> root, an ancestor: the cycle is cut and the walk terminates.
        assert_eq!(get(&files, "/sub/loop/app.js").status, 404);
        assert!(files.files.keys().all(|k| !k.starts_with("sub/loop")));
        assert!(files.files.keys().all(|k| !k.starts_with("up/")));
    }

    #[test]
    fn methods() {
        let (_t, files) = site();
        for m in ["POST", "PUT", "DELETE", "OPTIONS", "get"] {
            let r = files.respond(&req(m, "/app.js"));
            assert_eq!(r.status, 405, "{m}");
            assert_eq!(r.get_header("Allow"), Some("GET, HEAD"));
        }
    }

    #[test]
    fn head_has_get_headers_without_body() {
        let (_t, files) = site();
        let g = get(&files, "/app.js");
        let h = files.respond(&req("HEAD", "/app.js"));
        assert_eq!(h.status, 200);
        assert!(h.head_only);
        assert_eq!(h.headers, g.headers);
        let bytes = String::from_utf8(h.to_bytes()).unwrap();
        assert!(bytes.contains("Content-Length: 14\r\n"));
        assert!(bytes.ends_with("\r\n\r\n"));
        let missing = files.respond(&req("HEAD", "/nope"));
        assert_eq!(missing.status, 404);
        assert!(missing.head_only);
    }

    #[test]
    fn if_none_match() {
        let (_t, files) = site();
        let tag = get(&files, "/app.js")
            .get_header("ETag")
            .unwrap()
            .to_string();
        for value in [
            tag.clone(),
            format!("W/{tag}"),
            format!("\"other\", {tag}"),
            "*".to_string(),
        ] {
            let mut r = req("GET", "/app.js");
            r.headers
                .push(("if-none-match".into(), value.clone().into_bytes()));
            let resp = files.respond(&r);
            assert_eq!(resp.status, 304, "{value}");
            assert_eq!(resp.get_header("ETag"), Some(tag.as_str()));
            assert!(!String::from_utf8(resp.to_bytes())
                .unwrap()
                .contains("Content-Length"));
        }
        let mut r = req("GET", "/app.js");
        r.headers
            .push(("if-none-match".into(), b"\"stale\"".to_vec()));
        assert_eq!(files.respond(&r).status, 200);
        // Another file's tag does not match.
        let other = get(&files, "/style.css")
            .get_header("ETag")
            .unwrap()
            .to_string();
        let mut r = req("GET", "/app.js");
        r.headers.push(("if-none-match".into(), other.into_bytes()));
        assert_eq!(files.respond(&r).status, 200);
        // HEAD revalidation too.
        let mut r = req("HEAD", "/app.js");
        r.headers.push(("if-none-match".into(), tag.into_bytes()));
        assert_eq!(files.respond(&r).status, 304);
    }

    #[test]
    fn files_from_memory_are_served_like_loaded_ones() {
        let sf = StaticFiles::from_memory(&[("index.html", b"<p>hi</p>"), ("js/a.js", b"1")]);
        assert_eq!(sf.len(), 2);
        let (files, _) = (&sf.files, ());
        assert_eq!(&*files["index.html"].body, b"<p>hi</p>");
        assert_eq!(files["js/a.js"].content_type, content_type("js/a.js"));
        assert_eq!(files["index.html"].etag, etag(b"<p>hi</p>"));
    }

    #[test]
    fn etags_are_strong_and_content_based() {
        assert_eq!(etag(b"abc"), etag(b"abc"));
        assert_ne!(etag(b"abc"), etag(b"abd"));
        let t = etag(b"");
        assert!(t.starts_with('"') && t.ends_with('"') && !t.starts_with("W/"));
    }

    #[test]
    fn content_types() {
        for (name, ct) in [
            ("index.html", "text/html; charset=utf-8"),
            ("a.HTM", "text/html; charset=utf-8"),
            ("a.js", "text/javascript; charset=utf-8"),
            ("a.mjs", "text/javascript; charset=utf-8"),
            ("a.css", "text/css; charset=utf-8"),
            ("a.json", "application/json"),
            ("a.svg", "image/svg+xml"),
            ("a.png", "image/png"),
            ("a.jpg", "image/jpeg"),
            ("a.JPEG", "image/jpeg"),
            ("a.gif", "image/gif"),
            ("a.webp", "image/webp"),
            ("favicon.ico", "image/x-icon"),
            ("a.wav", "audio/wav"),
            ("a.mp3", "audio/mpeg"),
            ("a.ogg", "audio/ogg"),
            ("a.woff", "font/woff"),
            ("a.woff2", "font/woff2"),
            ("a.txt", "text/plain; charset=utf-8"),
            ("app.js.map", "application/json"),
            ("site.webmanifest", "application/manifest+json"),
            ("a.bin", "application/octet-stream"),
            ("Makefile", "application/octet-stream"),
            ("dir.d/noext", "application/octet-stream"),
        ] {
            assert_eq!(content_type(name), ct, "{name}");
        }
    }

    #[test]
    fn content_type_reaches_response() {
        let t = TempDir::new("ct");
        t.write("logo.svg", b"<svg/>");
        t.write("img/a.png", b"\x89PNG");
        let files = StaticFiles::load(&t.0, 1024).unwrap();
        assert_eq!(files.len(), 2);
        let svg = get(&files, "/logo.svg");
        assert_eq!(svg.get_header("Content-Type"), Some("image/svg+xml"));
        assert!(svg.get_header("Content-Security-Policy").is_some());
        let png = get(&files, "/img/a.png");
        assert_eq!(png.get_header("Content-Type"), Some("image/png"));
        assert_eq!(png.body, b"\x89PNG");
    }

    #[test]
    fn missing_root_is_empty_not_error() {
        let t = TempDir::new("missing");
        let files = StaticFiles::load(&t.0.join("does-not-exist"), 1024).unwrap();
        assert!(files.is_empty());
        assert_eq!(files.len(), 0);
        assert_eq!(get(&files, "/").status, 404);
    }

    #[test]
    fn root_that_is_a_file_is_an_error() {
        let t = TempDir::new("file-root");
        t.write("f", b"x");
        assert!(StaticFiles::load(&t.0.join("f"), 1024).is_err());
    }

    #[test]
    fn total_size_cap() {
        let t = TempDir::new("cap");
        t.write("a.txt", &[b'a'; 600]);
        t.write("b.txt", &[b'b'; 600]);
        let err = StaticFiles::load(&t.0, 1000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(StaticFiles::load(&t.0, 1200).unwrap().len(), 2);
    }

    #[test]
    fn percent_decode_cases() {
        assert_eq!(percent_decode(b"a%20b").unwrap(), b"a b");
        assert_eq!(percent_decode(b"%2e%2E").unwrap(), b"..");
        assert_eq!(percent_decode(b"%C3%A9").unwrap(), "é".as_bytes());
        assert_eq!(percent_decode(b"+").unwrap(), b"+");
        assert!(percent_decode(b"%").is_none());
        assert!(percent_decode(b"%4").is_none());
        assert!(percent_decode(b"%-1").is_none());
    }
}
