//! HTTP responses as plain values, serialized in one go.
//!
//! Every response other than `101 Switching Protocols` ends the connection: the server only
//! speaks HTTP to hand out the browser client and to upgrade, so there is no keep-alive to
//! manage and `Connection: close` is always sent.

/// An HTTP/1.1 response, built with [`Response::new`] / [`Response::text`] and
/// [`Response::header`], then written out with [`Response::to_bytes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Extra headers, in order. `Content-Length` and (except for 101) `Connection` are written
    /// by [`Response::to_bytes`] itself; same-named entries here are ignored.
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    /// Answer to a `HEAD` request: headers describe `body`, but the body is not sent.
    pub head_only: bool,
}

impl Response {
    /// An empty response with the given status.
    pub fn new(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            head_only: false,
        }
    }

    /// Plain-text error/info response: `Content-Type: text/plain; charset=utf-8`, body =
    /// `body` + `"\n"` (so `curl` output ends on its own line).
    pub fn text(status: u16, body: &str) -> Response {
        let mut bytes = Vec::with_capacity(body.len() + 1);
        bytes.extend_from_slice(body.as_bytes());
        bytes.push(b'\n');
        Response {
            body: bytes,
            ..Response::new(status)
        }
        .header("Content-Type", "text/plain; charset=utf-8")
    }

    /// Appends a header (builder style).
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// The first value of header `name` (case-insensitive), if set.
    pub fn get_header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Serializes status line, headers, `Content-Length` and body.
    ///
    /// `Content-Length` is omitted for 1xx, 204 and 304, which never carry a body (RFC 9110
    /// §8.6); for those statuses `body` is not written either. For `head_only` it is the length
    /// of the body that GET would have sent, and the body is not written. Every non-101
    /// response carries `Connection: close`, because the event loop closes after sending it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let bodyless = self.status < 200 || self.status == 204 || self.status == 304;
        let upgrade = self.status == 101;
        let mut out = Vec::with_capacity(128 + self.body.len());
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(self.status.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(reason_phrase(self.status).as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in &self.headers {
            if name.eq_ignore_ascii_case("content-length")
                || (!upgrade && name.eq_ignore_ascii_case("connection"))
            {
                continue;
            }
            push_header(&mut out, name, value);
        }
        if !upgrade {
            push_header(&mut out, "Connection", "close");
        }
        if !bodyless {
            push_header(&mut out, "Content-Length", &self.body.len().to_string());
        }
        out.extend_from_slice(b"\r\n");
        if !bodyless && !self.head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// Writes `name: value\r\n`. Values are built by this crate, never copied from requests, but a
/// stray CR or LF would split the response (header injection), so they are blanked defensively.
fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    debug_assert!(
        !value.bytes().any(|b| b == b'\r' || b == b'\n'),
        "header {name} contains CR/LF"
    );
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend(
        value
            .bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

/// Standard reason phrases for the statuses this server sends. Unknown statuses get an empty
/// phrase, which HTTP/1.1 allows (the space after the code is still written).
fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        301 => "Moved Permanently",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(r: &Response) -> String {
        String::from_utf8(r.to_bytes()).unwrap()
    }

    #[test]
    fn text_response() {
        let r = Response::text(404, "not found");
        assert_eq!(
            s(&r),
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Connection: close\r\nContent-Length: 10\r\n\r\nnot found\n"
        );
    }

    #[test]
    fn reason_phrases() {
        for (code, phrase) in [
            (101, "Switching Protocols"),
            (200, "OK"),
            (204, "No Content"),
            (304, "Not Modified"),
            (400, "Bad Request"),
            (403, "Forbidden"),
            (404, "Not Found"),
            (405, "Method Not Allowed"),
            (413, "Content Too Large"),
            (426, "Upgrade Required"),
            (431, "Request Header Fields Too Large"),
            (500, "Internal Server Error"),
            (503, "Service Unavailable"),
        ] {
            let line = format!("HTTP/1.1 {code} {phrase}\r\n");
            assert!(s(&Response::new(code)).starts_with(&line), "{code}");
        }
        assert!(s(&Response::new(599)).starts_with("HTTP/1.1 599 \r\n"));
    }

    #[test]
    fn switching_protocols_has_no_length_and_no_close() {
        let r = Response::new(101)
            .header("Upgrade", "websocket")
            .header("Connection", "Upgrade");
        assert_eq!(
            s(&r),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        );
    }

    #[test]
    fn not_modified_has_no_length_and_no_body() {
        let mut r = Response::new(304).header("ETag", "\"x\"");
        r.body = b"ignored".to_vec();
        assert_eq!(
            s(&r),
            "HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn no_content_has_no_length() {
        assert_eq!(
            s(&Response::new(204)),
            "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn head_only_keeps_length_drops_body() {
        let mut r = Response::text(200, "hello");
        r.head_only = true;
        let out = s(&r);
        assert!(out.contains("Content-Length: 6\r\n"));
        assert!(out.ends_with("\r\n\r\n"));
    }

    #[test]
    fn caller_cannot_override_framing_headers() {
        let r = Response::text(200, "ab")
            .header("Content-Length", "999")
            .header("Connection", "keep-alive");
        let out = s(&r);
        assert!(!out.contains("999"));
        assert!(!out.contains("keep-alive"));
        assert_eq!(out.matches("Content-Length").count(), 1);
        assert!(out.contains("Connection: close\r\n"));
    }

    #[test]
    fn empty_body_has_zero_length() {
        assert!(s(&Response::new(200)).contains("Content-Length: 0\r\n"));
    }

    #[test]
    fn get_header_is_case_insensitive() {
        let r = Response::new(200).header("ETag", "\"1\"");
        assert_eq!(r.get_header("etag"), Some("\"1\""));
        assert_eq!(r.get_header("vary"), None);
    }
}
