//! Request head parsing and the RFC 6455 §4.2 opening handshake, server side.
//!
//! The event loop feeds [`parse_request`] the bytes read so far; once a head is complete it
//! asks [`is_upgrade`] whether to go down the WebSocket path ([`check_upgrade`], then
//! [`switching_protocols`]) or to serve a static file.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha1::{Digest, Sha1};

use super::Response;

/// Limits on the request head, so a client cannot make the server buffer or parse without bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// Maximum bytes from the first byte of the request to the end of the blank line.
    pub max_head: usize,
    /// Maximum number of header lines.
    pub max_headers: usize,
}

/// A parsed request head. Owned, so the read buffer can be drained right after parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The request target without the query (still percent-encoded). For absolute-form targets
    /// (`GET http://host/path`) only the path is kept.
    pub path: String,
    /// Everything after the first `?`, without the `?`; empty if there is none.
    pub query: String,
    /// Minor HTTP version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Header names lowercased, values as sent (raw bytes: they need not be UTF-8). Order and
    /// duplicates are preserved.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Request {
    /// The first value of the header named `name_lowercase`.
    pub fn header(&self, name_lowercase: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name_lowercase)
            .map(|(_, v)| v.as_slice())
    }

    /// Every value of the header named `name_lowercase`, in order.
    fn headers_named<'a>(&'a self, name_lowercase: &'a str) -> impl Iterator<Item = &'a [u8]> {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name_lowercase)
            .map(|(_, v)| v.as_slice())
    }
}

/// Outcome of [`parse_request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// No complete head yet, and nothing wrong so far: read more and call again.
    Partial,
    /// The head occupies `buf[..head_len]`; later bytes are not part of the request.
    Complete { head_len: usize, request: Request },
    /// Send this response and close.
    Reject(Response),
}

/// Parses a request head out of `buf`, the whole of what has been read so far.
///
/// Incremental in the simplest way: call again with the grown buffer each time more bytes
/// arrive. Only `buf[..max_head]` is ever examined, so a slow client cannot make the server
/// re-parse more than `max_head` bytes per read. Bytes after `head_len` belong to whatever
/// follows the head (WebSocket frames a client pipelined after its handshake) and are left to
/// the caller.
///
/// Rejects with 431 if the head does not fit in `max_head` (even before it is complete) or has
/// more than `max_headers` headers, with 400 if it is malformed or announces a body (this
/// server only handles GET/HEAD and upgrades, so a body would be a desync risk, not data).
/// HTTP/1.0 and 1.1 are both accepted here; [`check_upgrade`] insists on 1.1.
pub fn parse_request(buf: &[u8], limits: &HeadLimits) -> Parsed {
    let window = &buf[..buf.len().min(limits.max_head)];
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > limits.max_head => {
            return Parsed::Reject(Response::text(431, "request head too large"));
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Reject(Response::text(431, "too many headers"));
        }
        Err(e) => return Parsed::Reject(bad_request(&format!("malformed request head: {e}"))),
    };

    // Complete guarantees method, path and version are set.
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Reject(bad_request("malformed request head"));
    };
    let Some(target) = origin_form(target) else {
        return Parsed::Reject(bad_request("invalid request target"));
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (target, ""),
    };

    let mut out_headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        match name.as_str() {
            "transfer-encoding" => {
                return Parsed::Reject(bad_request("request body not supported"));
            }
            "content-length" => match parse_content_length(h.value) {
                Some(0) => {}
                Some(_) => return Parsed::Reject(bad_request("request body not supported")),
                None => return Parsed::Reject(bad_request("invalid Content-Length")),
            },
            _ => {}
        }
        out_headers.push((name, h.value.to_vec()));
    }

    Parsed::Complete {
        head_len,
        request: Request {
            method: method.to_owned(),
            path: path.to_owned(),
            query: query.to_owned(),
            version,
            headers: out_headers,
        },
    }
}

/// Reduces a request target to origin-form (`/path?query`). Absolute-form must be accepted by
/// servers (RFC 9112 §3.2.2) and is reduced to its path; `*` (only meaningful for OPTIONS) is
/// kept as is; anything else is malformed.
fn origin_form(target: &str) -> Option<&str> {
    if target.starts_with('/') || target == "*" {
        return Some(target);
    }
    let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
    let rest = if lower.starts_with("http://") {
        &target[7..]
    } else if lower.starts_with("https://") {
        &target[8..]
    } else {
        return None;
    };
    match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => Some(&rest[i..]),
        // `http://host` or `http://host?q`: the path is empty, which means `/`; the query
        // would be lost by returning "/", so reject that oddity instead.
        Some(_) => None,
        None => Some("/"),
    }
}

/// A Content-Length value: digits only (no sign, no list), as RFC 9110 §8.6 requires.
fn parse_content_length(value: &[u8]) -> Option<u64> {
    let value = trim_ows(value);
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Is this request asking for a WebSocket upgrade at all? True if an `Upgrade` header lists the
/// token `websocket` (case-insensitive). Only this decides static files vs. handshake; whether
/// the handshake is valid is [`check_upgrade`]'s job, so a broken upgrade gets a precise 400
/// instead of a confusing 404 from the file server.
pub fn is_upgrade(req: &Request) -> bool {
    has_token(req, "upgrade", "websocket")
}

/// Full RFC 6455 §4.2.1 validation of an upgrade request. On success returns the
/// `Sec-WebSocket-Accept` value for [`switching_protocols`].
///
/// Failures: method other than GET → 405 (`Allow: GET`); not HTTP/1.1, missing Host, no
/// `websocket` in Upgrade, no `upgrade` in Connection, bad Sec-WebSocket-Key → 400 with a
/// specific reason; Sec-WebSocket-Version missing or not exactly `13` → 426 with
/// `Sec-WebSocket-Version: 13` (§4.4); Origin not in a non-empty `allowed_origins` → 403.
///
/// No Origin header is allowed: only browsers send it, and the check exists to stop other
/// sites' pages from opening sockets with the user's cookies (cross-site WebSocket hijacking),
/// not to keep out non-browser clients.
pub fn check_upgrade(req: &Request, allowed_origins: &[String]) -> Result<String, Response> {
    if req.method != "GET" {
        return Err(Response::text(405, "WebSocket upgrade requires GET").header("Allow", "GET"));
    }
    if req.version != 1 {
        return Err(bad_request("WebSocket upgrade requires HTTP/1.1"));
    }
    match req.headers_named("host").count() {
        0 => return Err(bad_request("missing Host")),
        1 => {}
        _ => return Err(bad_request("multiple Host headers")),
    }
    if !has_token(req, "upgrade", "websocket") {
        return Err(bad_request("Upgrade header must include websocket"));
    }
    if !has_token(req, "connection", "upgrade") {
        return Err(bad_request("Connection header must include Upgrade"));
    }

    let mut versions = req.headers_named("sec-websocket-version");
    match (versions.next(), versions.next()) {
        (Some(v), None) if trim_ows(v) == b"13" => {}
        (None, _) => return Err(version_required("missing Sec-WebSocket-Version")),
        _ => return Err(version_required("unsupported Sec-WebSocket-Version")),
    }

    let mut keys = req.headers_named("sec-websocket-key");
    let key = match (keys.next(), keys.next()) {
        (Some(k), None) => trim_ows(k),
        (None, _) => return Err(bad_request("missing Sec-WebSocket-Key")),
        _ => return Err(bad_request("multiple Sec-WebSocket-Key headers")),
    };
    match BASE64.decode(key) {
        Ok(nonce) if nonce.len() == 16 => {}
        _ => return Err(bad_request("invalid Sec-WebSocket-Key")),
    }

    if !allowed_origins.is_empty() {
        for origin in req.headers_named("origin") {
            let origin = trim_ows(origin);
            if !allowed_origins
                .iter()
                .any(|a| a.as_bytes().eq_ignore_ascii_case(origin))
            {
                return Err(Response::text(403, "origin not allowed"));
            }
        }
    }

    Ok(accept_key(key))
}

/// `base64(sha1(key + GUID))`, the proof that the server understood the handshake (§4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID);
    BASE64.encode(sha.finalize())
}

/// The `101 Switching Protocols` response. No subprotocol and no extensions are negotiated:
/// omitting the headers is how a server declines them (§4.2.2).
pub fn switching_protocols(accept: &str) -> Vec<u8> {
    Response::new(101)
        .header("Upgrade", "websocket")
        .header("Connection", "Upgrade")
        .header("Sec-WebSocket-Accept", accept)
        .to_bytes()
}

fn bad_request(reason: &str) -> Response {
    Response::text(400, reason)
}

/// 426 per RFC 6455 §4.4 (`Sec-WebSocket-Version` lists what we speak) and RFC 9110 §15.5.22
/// (a 426 must name the protocol to upgrade to).
fn version_required(reason: &str) -> Response {
    Response::text(426, reason)
        .header("Sec-WebSocket-Version", "13")
        .header("Upgrade", "websocket")
}

/// Does any `name` header contain `token` in its comma-separated list (case-insensitive)?
/// Handles `Connection: keep-alive, Upgrade` and repeated headers alike.
fn has_token(req: &Request, name: &str, token: &str) -> bool {
    req.headers_named(name).any(|v| {
        v.split(|&b| b == b',')
            .any(|t| trim_ows(t).eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// Strips optional whitespace (space and tab, RFC 9110 §5.6.3) from both ends.
fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_head: 8192,
        max_headers: 32,
    };

    const UPGRADE: &str = "GET /chat?room=1 HTTP/1.1\r\n\
        Host: server.example.com\r\n\
        Upgrade: websocket\r\n\
        Connection: Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Origin: http://example.com\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";

    fn complete(buf: &[u8]) -> (usize, Request) {
        match parse_request(buf, &LIMITS) {
            Parsed::Complete { head_len, request } => (head_len, request),
            other => panic!("expected Complete, got {other:?}"),
        }
    }

    fn reject(buf: &[u8], limits: &HeadLimits) -> Response {
        match parse_request(buf, limits) {
            Parsed::Reject(r) => r,
            other => panic!("expected Reject, got {other:?}"),
        }
    }

    fn body(r: &Response) -> &str {
        std::str::from_utf8(&r.body).unwrap()
    }

    /// Builds an upgrade request from `UPGRADE` with header lines replaced/removed/added.
    /// `edits`: (lowercase name, Some(full line) to replace / None to remove).
    fn upgrade_with(edits: &[(&str, Option<&str>)], extra: &[&str]) -> Request {
        let mut lines: Vec<String> = Vec::new();
        for line in UPGRADE.trim_end().split("\r\n") {
            let name = line.split(':').next().unwrap().to_ascii_lowercase();
            match edits.iter().find(|(n, _)| *n == name) {
                Some((_, Some(new))) => lines.push(new.to_string()),
                Some((_, None)) => {}
                None => lines.push(line.to_string()),
            }
        }
        lines.extend(extra.iter().map(|s| s.to_string()));
        let text = lines.join("\r\n") + "\r\n\r\n";
        complete(text.as_bytes()).1
    }

    fn upgrade() -> Request {
        upgrade_with(&[], &[])
    }

    #[test]
    fn parses_upgrade_request() {
        let (len, req) = complete(UPGRADE.as_bytes());
        assert_eq!(len, UPGRADE.len());
        assert_eq!(req.method, "GET");
        assert_eq!(req.path, "/chat");
        assert_eq!(req.query, "room=1");
        assert_eq!(req.version, 1);
        assert_eq!(req.headers.len(), 6);
        assert_eq!(req.header("host"), Some(&b"server.example.com"[..]));
        assert_eq!(req.header("sec-websocket-version"), Some(&b"13"[..]));
        assert_eq!(req.header("nope"), None);
        assert!(req
            .headers
            .iter()
            .all(|(n, _)| *n == n.to_ascii_lowercase()));
    }

    #[test]
    fn header_returns_first_match() {
        let (_, req) = complete(b"GET / HTTP/1.1\r\nX-A: 1\r\nx-a: 2\r\n\r\n");
        assert_eq!(req.header("x-a"), Some(&b"1"[..]));
        assert_eq!(req.headers.len(), 2);
    }

    #[test]
    fn split_at_every_byte_boundary() {
        let trailing = b"\x81\x85frame";
        let mut buf = UPGRADE.as_bytes().to_vec();
        buf.extend_from_slice(trailing);
        let (full_len, full_req) = complete(&buf);
        assert_eq!(full_len, UPGRADE.len());
        for cut in 0..UPGRADE.len() {
            assert_eq!(
                parse_request(&buf[..cut], &LIMITS),
                Parsed::Partial,
                "cut at {cut}"
            );
        }
        for cut in UPGRADE.len()..=buf.len() {
            let (len, req) = complete(&buf[..cut]);
            assert_eq!(len, full_len);
            assert_eq!(req, full_req);
        }
        assert_eq!(&buf[full_len..], trailing);
    }

    #[test]
    fn accepts_http_1_0() {
        let (_, req) = complete(b"GET /index.html HTTP/1.0\r\n\r\n");
        assert_eq!(req.version, 0);
        assert_eq!(req.path, "/index.html");
        assert_eq!(req.query, "");
    }

    #[test]
    fn rejects_other_versions() {
        for head in [&b"GET / HTTP/2.0\r\n\r\n"[..], b"GET / HTTP/1.2\r\n\r\n"] {
            assert_eq!(reject(head, &LIMITS).status, 400);
        }
    }

    #[test]
    fn oversize_head_complete_and_incomplete() {
        let limits = HeadLimits {
            max_head: 64,
            max_headers: 32,
        };
        let long = format!("GET / HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(100));
        let r = reject(long.as_bytes(), &limits);
        assert_eq!(r.status, 431);
        // Incomplete but already over the limit: no point waiting for the rest.
        let r = reject(&long.as_bytes()[..65], &limits);
        assert_eq!(r.status, 431);
        // Exactly at the limit is fine, one byte under is still Partial.
        let exact = format!("GET / HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(64 - 27));
        assert_eq!(exact.len(), 64);
        assert_eq!(complete_with(exact.as_bytes(), &limits), 64);
        assert_eq!(
            parse_request(&exact.as_bytes()[..63], &limits),
            Parsed::Partial
        );
        assert_eq!(
            parse_request(&long.as_bytes()[..64], &limits),
            Parsed::Partial
        );
    }

    fn complete_with(buf: &[u8], limits: &HeadLimits) -> usize {
        match parse_request(buf, limits) {
            Parsed::Complete { head_len, .. } => head_len,
            other => panic!("expected Complete, got {other:?}"),
        }
    }

    #[test]
    fn header_count_limit() {
        let limits = HeadLimits {
            max_head: 8192,
            max_headers: 3,
        };
        let three = "GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
        assert_eq!(complete_with(three.as_bytes(), &limits), three.len());
        let four = "GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n";
        assert_eq!(reject(four.as_bytes(), &limits).status, 431);
    }

    #[test]
    fn malformed_heads() {
        for head in [
            &b"GET\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nNo-Colon\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"G\x00T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: 1\r\n folded\r\n\r\n",
            b"GET / FTP/1.1\r\n\r\n",
            b"GET relative HTTP/1.1\r\n\r\n",
            b"GET http://host?q HTTP/1.1\r\n\r\n",
        ] {
            let r = reject(head, &LIMITS);
            assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(head));
            assert!(!r.body.is_empty());
        }
    }

    #[test]
    fn garbage_is_rejected_early() {
        assert_eq!(reject(b"\x16\x03\x01\x02", &LIMITS).status, 400);
    }

    #[test]
    fn absolute_form_is_reduced_to_path() {
        let (_, req) = complete(b"GET http://example.com/a/b?x=1 HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(req.path, "/a/b");
        assert_eq!(req.query, "x=1");
        let (_, req) = complete(b"GET HTTPS://example.com HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(req.path, "/");
    }

    #[test]
    fn bodies_are_rejected() {
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length:\r\n\r\n",
        ] {
            assert_eq!(reject(head, &LIMITS).status, 400);
        }
        let (_, req) = complete(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(req.header("content-length"), Some(&b"0"[..]));
    }

    #[test]
    fn accept_key_rfc_vector() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn valid_upgrade() {
        let req = upgrade();
        assert!(is_upgrade(&req));
        assert_eq!(
            check_upgrade(&req, &[]).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn switching_protocols_bytes() {
        let bytes = switching_protocols("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\n\
             Upgrade: websocket\r\n\
             Connection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
    }

    #[test]
    fn is_upgrade_detection() {
        assert!(!is_upgrade(
            &complete(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").1
        ));
        assert!(!is_upgrade(&upgrade_with(
            &[("upgrade", Some("Upgrade: h2c"))],
            &[]
        )));
        assert!(is_upgrade(&upgrade_with(
            &[("upgrade", Some("Upgrade: h2c, WebSocket"))],
            &[]
        )));
        assert!(!is_upgrade(&upgrade_with(
            &[("upgrade", Some("Upgrade: websockets"))],
            &[]
        )));
    }

    #[test]
    fn connection_token_lists() {
        for line in [
            "Connection: Upgrade",
            "Connection: upgrade",
            "Connection: keep-alive, Upgrade",
            "Connection: keep-alive,Upgrade",
            "Connection:\tUPGRADE\t, close",
        ] {
            let req = upgrade_with(&[("connection", Some(line))], &[]);
            assert!(check_upgrade(&req, &[]).is_ok(), "{line}");
        }
        // Token spread over repeated headers.
        let req = upgrade_with(
            &[("connection", Some("Connection: keep-alive"))],
            &["Connection: Upgrade"],
        );
        assert!(check_upgrade(&req, &[]).is_ok());
        for line in [
            "Connection: keep-alive",
            "Connection: Upgraded",
            "Connection: Up grade",
        ] {
            let req = upgrade_with(&[("connection", Some(line))], &[]);
            let r = check_upgrade(&req, &[]).unwrap_err();
            assert_eq!(r.status, 400, "{line}");
            assert_eq!(body(&r), "Connection header must include Upgrade\n");
        }
    }

    fn fails(req: &Request, status: u16, reason: &str) -> Response {
        let r = check_upgrade(req, &[]).unwrap_err();
        assert_eq!(r.status, status, "{reason}");
        assert_eq!(body(&r), format!("{reason}\n"));
        r
    }

    #[test]
    fn wrong_method_is_405() {
        let text = UPGRADE.replacen("GET", "POST", 1);
        let req = complete(text.as_bytes()).1;
        let r = fails(&req, 405, "WebSocket upgrade requires GET");
        assert_eq!(r.get_header("Allow"), Some("GET"));
    }

    #[test]
    fn http_1_0_upgrade_is_400() {
        let text = UPGRADE.replacen("HTTP/1.1", "HTTP/1.0", 1);
        let req = complete(text.as_bytes()).1;
        fails(&req, 400, "WebSocket upgrade requires HTTP/1.1");
    }

    #[test]
    fn missing_or_duplicate_host_is_400() {
        fails(&upgrade_with(&[("host", None)], &[]), 400, "missing Host");
        fails(
            &upgrade_with(&[], &["Host: other"]),
            400,
            "multiple Host headers",
        );
    }

    #[test]
    fn upgrade_header_must_name_websocket() {
        let reason = "Upgrade header must include websocket";
        fails(&upgrade_with(&[("upgrade", None)], &[]), 400, reason);
        fails(
            &upgrade_with(&[("upgrade", Some("Upgrade: websocket2, h2c"))], &[]),
            400,
            reason,
        );
    }

    #[test]
    fn missing_connection_is_400() {
        fails(
            &upgrade_with(&[("connection", None)], &[]),
            400,
            "Connection header must include Upgrade",
        );
    }

    #[test]
    fn version_must_be_13() {
        let r = fails(
            &upgrade_with(&[("sec-websocket-version", None)], &[]),
            426,
            "missing Sec-WebSocket-Version",
        );
        assert_eq!(r.get_header("Sec-WebSocket-Version"), Some("13"));
        for line in [
            "Sec-WebSocket-Version: 8",
            "Sec-WebSocket-Version: 13, 8",
            "Sec-WebSocket-Version: 013",
            "Sec-WebSocket-Version: ",
        ] {
            let req = upgrade_with(&[("sec-websocket-version", Some(line))], &[]);
            let r = fails(&req, 426, "unsupported Sec-WebSocket-Version");
            assert_eq!(r.get_header("Sec-WebSocket-Version"), Some("13"));
        }
        let req = upgrade_with(&[], &["Sec-WebSocket-Version: 13"]);
        fails(&req, 426, "unsupported Sec-WebSocket-Version");
    }

    #[test]
    fn key_must_be_16_bytes_of_padded_base64() {
        fails(
            &upgrade_with(&[("sec-websocket-key", None)], &[]),
            400,
            "missing Sec-WebSocket-Key",
        );
        for line in [
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ",   // unpadded
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j",     // 15 bytes
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZTE=", // 17 bytes
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==AA", // trailing data
            "Sec-WebSocket-Key: dGhl*HNhbXBsZSBub25jZQ==", // bad alphabet
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZR==", // non-canonical bits
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ-_", // url-safe alphabet
            "Sec-WebSocket-Key: ",
        ] {
            let req = upgrade_with(&[("sec-websocket-key", Some(line))], &[]);
            fails(&req, 400, "invalid Sec-WebSocket-Key");
        }
        fails(
            &upgrade_with(&[], &["Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA=="]),
            400,
            "multiple Sec-WebSocket-Key headers",
        );
        // Surrounding whitespace is not part of the key (httparse already trims the
        // leading part; a trailing tab must not change the accept value).
        let req = upgrade_with(
            &[(
                "sec-websocket-key",
                Some("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\t"),
            )],
            &[],
        );
        assert_eq!(
            check_upgrade(&req, &[]).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn origin_allow_and_deny() {
        let allowed = vec![
            "http://localhost:8080".to_string(),
            "http://example.com".to_string(),
        ];
        // Origin in the list (UPGRADE sends http://example.com).
        assert!(check_upgrade(&upgrade(), &allowed).is_ok());
        let req = upgrade_with(&[("origin", Some("Origin: HTTP://LOCALHOST:8080"))], &[]);
        assert!(check_upgrade(&req, &allowed).is_ok());
        // Not in the list.
        for line in [
            "Origin: http://evil.example",
            "Origin: http://localhost:8081",
            "Origin: http://localhost:8080.evil.example",
            "Origin: null",
        ] {
            let req = upgrade_with(&[("origin", Some(line))], &[]);
            let r = check_upgrade(&req, &allowed).unwrap_err();
            assert_eq!(r.status, 403, "{line}");
        }
        // A second, foreign Origin header cannot hide behind an allowed first one.
        let req = upgrade_with(&[], &["Origin: http://evil.example"]);
        assert_eq!(check_upgrade(&req, &allowed).unwrap_err().status, 403);
        // No Origin header: non-browser client, allowed.
        let req = upgrade_with(&[("origin", None)], &[]);
        assert!(check_upgrade(&req, &allowed).is_ok());
        // Empty allow-list: any origin.
        let req = upgrade_with(&[("origin", Some("Origin: http://evil.example"))], &[]);
        assert!(check_upgrade(&req, &[]).is_ok());
    }

    #[test]
    fn trim_ows_strips_spaces_and_tabs_only() {
        assert_eq!(trim_ows(b" \t a b\t "), b"a b");
        assert_eq!(trim_ows(b"   "), b"");
        assert_eq!(trim_ows(b"x"), b"x");
    }
}
