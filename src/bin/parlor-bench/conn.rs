//! One client WebSocket connection on mio: connect, HTTP upgrade, then frames in Parlor's own
//! codec in the client role (every frame we send is masked, every frame we get must not be).
//!
//! The connection owns its socket and buffers; modes drive it with [`Conn::on_event`] and read
//! events through a callback, and queue frames with [`Conn::send`]. Output is only written by
//! [`Conn::flush`], which modes call once per loop turn for connections that queued something,
//! so several frames go out in one `write`.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::FromRawFd;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use parlor::http::accept_key;
use parlor::ws::close::{self, CloseCode};
use parlor::ws::frame::{encode, OpCode, Role};
use parlor::ws::reader::{Event, MessageReader, ReadLimits};

use crate::transport::{TlsTarget, Transport};

/// Biggest message the bench accepts from a server (16 MiB, as /echo).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// Largest HTTP response head we wait for.
const MAX_HEAD: usize = 16 * 1024;
/// Read chunk size; the input buffer grows by this much when full.
const READ_CHUNK: usize = 64 * 1024;

/// A `ws://` or `wss://` `host:port/path` URL, resolved.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
    /// For `wss://`: the client configuration and the name to check the certificate against.
    pub tls: Option<TlsTarget>,
}

impl Target {
    /// Parses `url`; a `wss://` URL needs `ca`, the PEM file of the certificate to trust.
    pub fn parse(url: &str, ca: Option<&std::path::Path>) -> Result<Target, String> {
        let (rest, secure) = if let Some(r) = url.strip_prefix("ws://") {
            (r, false)
        } else if let Some(r) = url.strip_prefix("wss://") {
            (r, true)
        } else {
            return Err(format!("{url}: only ws:// and wss:// URLs are supported"));
        };
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let with_port = if hostport
            .rsplit(':')
            .next()
            .is_some_and(|p| p.parse::<u16>().is_ok())
            && !hostport.ends_with(']')
        {
            hostport.to_string()
        } else if secure {
            format!("{hostport}:443")
        } else {
            format!("{hostport}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("{url}: cannot resolve {hostport}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url}: {hostport} resolves to nothing"))?;
        let tls = if secure {
            let ca = ca.ok_or_else(|| format!("{url}: wss:// needs --tls-ca FILE"))?;
            let host = hostport
                .rsplit_once(':')
                .map_or(hostport, |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']');
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| format!("{url}: {e}"))?;
            Some(TlsTarget {
                config: crate::transport::client_config(ca)?,
                name,
            })
        } else {
            None
        };
        Ok(Target {
            addr,
            host: hostport.to_string(),
            path: path.to_string(),
            tls,
        })
    }
}

/// xorshift64*: masks, keys and padding. Not cryptographic; the bench only needs cheap bits.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn from_clock() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9);
        Rng::new(t ^ (u64::from(std::process::id()) << 32))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_ne_bytes()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// TCP connect in progress.
    Connecting,
    /// Upgrade request sent, waiting for the 101.
    Handshake,
    Open,
    /// We sent a close frame or got one; no more data frames.
    Closing,
    Closed,
}

/// What happened on a connection during one `on_event`, besides data messages.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    /// The upgrade just completed.
    pub opened: bool,
    /// The connection just ended (see `Conn::error` for why, if it failed).
    pub closed: bool,
    /// Something was queued (a pong, a close): flush this connection.
    pub wrote: bool,
}

pub struct Conn {
    pub stream: Transport,
    pub state: State,
    pub token: Token,
    out: Vec<u8>,
    out_pos: usize,
    inb: Vec<u8>,
    in_start: usize,
    in_end: usize,
    reader: MessageReader,
    accept: String,
    /// Why the connection failed, if it did (connect error, bad upgrade, protocol error...).
    pub error: Option<String>,
    /// Close code the server sent, if any.
    pub close_code: Option<u16>,
    pub dirty: bool,
    peer: SocketAddr,
}

/// Opens a non-blocking TCP connection, optionally from a given local address.
pub fn connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let Some(src) = source else {
        return TcpStream::connect(addr);
    };
    let (IpAddr::V4(src4), SocketAddr::V4(dst4)) = (src, addr) else {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "--source-addrs needs an IPv4 target",
        ));
    };
    // SAFETY: plain socket syscalls on a descriptor we own; it is handed to std right after
    // creation so it is closed on every error path.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let std_stream = std::net::TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        // Let the kernel pick the port at connect time, per 4-tuple, not at bind time.
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let sa = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(ip.octets()),
            },
            sin_zero: [0; 8],
        };
        let local = sa(src4, 0);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::bind(fd, &local as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(io::Error::last_os_error());
        }
        let remote = sa(*dst4.ip(), dst4.port());
        if libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len) != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(e);
            }
        }
        Ok(TcpStream::from_std(std_stream))
    }
}

impl Conn {
    /// Starts connecting and registers the socket; the upgrade request is queued at once and
    /// goes out when the socket becomes writable.
    pub fn open(
        registry: &Registry,
        token: Token,
        target: &Target,
        source: Option<IpAddr>,
        rng: &mut Rng,
    ) -> io::Result<Conn> {
        let tcp = connect(target.addr, source)?;
        tcp.set_nodelay(true)?;
        let mut stream = Transport::new(tcp, target.tls.as_ref())?;
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        let key_raw = rng.next_u64().to_le_bytes();
        let key_raw2 = rng.next_u64().to_le_bytes();
        let mut key_bytes = [0u8; 16];
        key_bytes[..8].copy_from_slice(&key_raw);
        key_bytes[8..].copy_from_slice(&key_raw2);
        use base64::Engine;
        let key = base64::engine::general_purpose::STANDARD.encode(key_bytes);
        let accept = accept_key(key.as_bytes());
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            target.path, target.host, key
        );
        Ok(Conn {
            stream,
            state: State::Connecting,
            token,
            out: req.into_bytes(),
            out_pos: 0,
            inb: Vec::new(),
            in_start: 0,
            in_end: 0,
            reader: MessageReader::new(
                Role::Client,
                ReadLimits {
                    max_message: MAX_MESSAGE,
                    max_fragments: 1 << 20,
                },
            ),
            accept,
            error: None,
            close_code: None,
            dirty: false,
            peer: target.addr,
        })
    }

    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// Queues one masked data frame (a no-op unless open). Call [`Conn::flush`] later.
    pub fn send(&mut self, opcode: OpCode, payload: &[u8], rng: &mut Rng) {
        if self.state != State::Open {
            return;
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        encode(&mut self.out, true, opcode, payload, Some(rng.mask()));
        self.dirty = true;
    }

    /// Queues a close frame; the connection ends when the server answers or drops.
    pub fn close(&mut self, code: CloseCode, rng: &mut Rng) {
        if self.state != State::Open {
            return;
        }
        encode(
            &mut self.out,
            true,
            OpCode::Close,
            &close::close_payload(code, ""),
            Some(rng.mask()),
        );
        self.state = State::Closing;
        self.dirty = true;
    }

    /// A handle to queue frames on this connection from outside a message callback.
    pub fn out<'a>(&'a mut self, rng: &'a mut Rng) -> ConnOut<'a> {
        ConnOut {
            open: self.state == State::Open,
            out: &mut self.out,
            out_pos: &mut self.out_pos,
            dirty: &mut self.dirty,
            rng,
        }
    }

    /// Bytes queued but not yet written (plus one while TLS holds unwritten ciphertext).
    pub fn pending_out(&self) -> usize {
        self.out.len() - self.out_pos + usize::from(self.stream.wants_write())
    }

    /// Writes queued output until done or `WouldBlock`. Errors close the connection.
    pub fn flush(&mut self) -> Outcome {
        self.dirty = false;
        let mut outcome = Outcome::default();
        if self.state == State::Connecting || self.state == State::Closed {
            return outcome;
        }
        while self.out_pos < self.out.len() {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(0) => {
                    self.fail("connection closed while writing".into(), &mut outcome);
                    return outcome;
                }
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fail(format!("write: {e}"), &mut outcome);
                    return outcome;
                }
            }
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            if self.out.capacity() > 1 << 20 {
                self.out = Vec::new();
            }
        }
        if let Err(e) = self.stream.flush_tls() {
            self.fail(format!("write: {e}"), &mut outcome);
        }
        outcome
    }

    fn fail(&mut self, why: String, outcome: &mut Outcome) {
        if self.state != State::Closed {
            if self.error.is_none() && self.state != State::Closing {
                self.error = Some(why);
            }
            self.state = State::Closed;
            outcome.closed = true;
        }
    }

    /// Handles a readiness event. Every complete data message is passed to `on_msg` as
    /// `(text_or_binary_payload, is_text, &mut self_out)`; pings are answered here.
    pub fn on_event(
        &mut self,
        readable: bool,
        writable: bool,
        rng: &mut Rng,
        mut on_msg: impl FnMut(&[u8], bool, &mut ConnOut<'_>),
    ) -> Outcome {
        let mut outcome = Outcome::default();
        if self.state == State::Closed {
            return outcome;
        }
        if self.state == State::Connecting {
            if let Ok(Some(e)) | Err(e) = self.stream.tcp.take_error() {
                self.fail(
                    format!("connect to {}: {e}", self.peer_name()),
                    &mut outcome,
                );
                return outcome;
            }
            match self.stream.tcp.peer_addr() {
                Ok(_) => self.state = State::Handshake,
                Err(e) if e.kind() == ErrorKind::NotConnected => {
                    if readable || writable {
                        // Spurious or error wakeup; a failed connect shows up in take_error
                        // above or as a read error below.
                        let mut b = [0u8; 1];
                        if let Err(e) = self.stream.tcp.read(&mut b) {
                            if e.kind() != ErrorKind::WouldBlock
                                && e.kind() != ErrorKind::NotConnected
                            {
                                self.fail(
                                    format!("connect to {}: {e}", self.peer_name()),
                                    &mut outcome,
                                );
                            }
                        }
                    }
                    return outcome;
                }
                Err(e) => {
                    self.fail(
                        format!("connect to {}: {e}", self.peer_name()),
                        &mut outcome,
                    );
                    return outcome;
                }
            }
            let o = self.flush();
            outcome.closed |= o.closed;
        }
        if writable && self.pending_out() > 0 {
            let o = self.flush();
            outcome.closed |= o.closed;
        }
        if readable {
            self.read_all(rng, &mut on_msg, &mut outcome);
        }
        if self.dirty {
            outcome.wrote = true;
        }
        outcome
    }

    fn peer_name(&self) -> String {
        self.peer.to_string()
    }

    fn read_all(
        &mut self,
        rng: &mut Rng,
        on_msg: &mut impl FnMut(&[u8], bool, &mut ConnOut<'_>),
        outcome: &mut Outcome,
    ) {
        loop {
            if self.state == State::Closed {
                return;
            }
            if self.inb.len() - self.in_end < READ_CHUNK / 4 {
                if self.in_start > 0 {
                    self.inb.copy_within(self.in_start..self.in_end, 0);
                    self.in_end -= self.in_start;
                    self.in_start = 0;
                }
                if self.inb.len() - self.in_end < READ_CHUNK / 4 {
                    let new_len = self.inb.len() + READ_CHUNK;
                    self.inb.resize(new_len, 0);
                }
            }
            let n = match self.stream.read(&mut self.inb[self.in_end..]) {
                Ok(0) => {
                    let why = if self.state == State::Handshake {
                        "server closed the connection during the upgrade".to_string()
                    } else {
                        "server closed the TCP connection".to_string()
                    };
                    self.fail(why, outcome);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    let why = if self.state == State::Handshake {
                        format!("connect to {}: {e}", self.peer_name())
                    } else {
                        format!("read: {e}")
                    };
                    self.fail(why, outcome);
                    return;
                }
            };
            self.in_end += n;
            if self.state == State::Handshake && !self.parse_head(outcome) {
                return;
            }
            if self.state != State::Handshake {
                self.parse_frames(rng, on_msg, outcome);
            }
        }
        // Idle connections keep no big buffer.
        if self.in_start == self.in_end {
            self.in_start = 0;
            self.in_end = 0;
            if self.inb.len() > 4 * READ_CHUNK {
                self.inb = Vec::new();
            }
        }
    }

    /// Returns false if the connection failed.
    fn parse_head(&mut self, outcome: &mut Outcome) -> bool {
        let data = &self.inb[self.in_start..self.in_end];
        let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
            if data.len() > MAX_HEAD {
                self.fail("upgrade response head too large".into(), outcome);
                return false;
            }
            return true;
        };
        let head = String::from_utf8_lossy(&data[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or("");
        let code = status.split(' ').nth(1).unwrap_or("");
        if code != "101" {
            self.fail(
                format!("server refused the upgrade: {status:?} (expected 101)"),
                outcome,
            );
            return false;
        }
        let accept = lines.find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("sec-websocket-accept")
                .then(|| v.trim().to_string())
        });
        match accept {
            Some(a) if a == self.accept => {}
            Some(a) => {
                self.fail(
                    format!("bad Sec-WebSocket-Accept {a:?}, expected {:?}", self.accept),
                    outcome,
                );
                return false;
            }
            None => {
                self.fail("101 without Sec-WebSocket-Accept".into(), outcome);
                return false;
            }
        }
        self.in_start += end + 4;
        self.state = State::Open;
        outcome.opened = true;
        true
    }

    fn parse_frames(
        &mut self,
        rng: &mut Rng,
        on_msg: &mut impl FnMut(&[u8], bool, &mut ConnOut<'_>),
        outcome: &mut Outcome,
    ) {
        loop {
            let buf = &mut self.inb[self.in_start..self.in_end];
            let (used, ev) = match self.reader.next(buf) {
                Ok(r) => r,
                Err(e) => {
                    let why = format!("server broke the protocol: {} ({})", e.reason, e.code);
                    self.error.get_or_insert(why);
                    self.state = State::Closed;
                    outcome.closed = true;
                    return;
                }
            };
            let mut out = ConnOut {
                out: &mut self.out,
                out_pos: &mut self.out_pos,
                dirty: &mut self.dirty,
                rng,
                open: self.state == State::Open,
            };
            match ev {
                None => {
                    self.in_start += used;
                    if used == 0 {
                        return;
                    }
                }
                Some(Event::Text(t)) => {
                    if out.open {
                        on_msg(t.as_bytes(), true, &mut out);
                    }
                    self.in_start += used;
                }
                Some(Event::Binary(b)) => {
                    if out.open {
                        on_msg(b, false, &mut out);
                    }
                    self.in_start += used;
                }
                Some(Event::Ping(p)) => {
                    let p = p.to_vec();
                    out.frame(OpCode::Pong, &p);
                    self.in_start += used;
                }
                Some(Event::Pong(_)) => self.in_start += used,
                Some(Event::Close(c)) => {
                    let code = c.code;
                    if self.state == State::Open {
                        let payload = close::close_payload(
                            code.map_or(CloseCode::Normal, CloseCode::from),
                            "",
                        );
                        out.frame(OpCode::Close, &payload);
                        self.error
                            .get_or_insert(format!("server closed the connection ({code:?})"));
                    }
                    self.close_code = code;
                    self.in_start += used;
                    let _ = self.flush();
                    self.state = State::Closed;
                    outcome.closed = true;
                    return;
                }
            }
        }
    }
}

/// Lets a message handler queue frames on the connection the message came from.
pub struct ConnOut<'a> {
    out: &'a mut Vec<u8>,
    out_pos: &'a mut usize,
    dirty: &'a mut bool,
    rng: &'a mut Rng,
    open: bool,
}

impl ConnOut<'_> {
    pub fn frame(&mut self, opcode: OpCode, payload: &[u8]) {
        if *self.out_pos == self.out.len() {
            self.out.clear();
            *self.out_pos = 0;
        }
        encode(self.out, true, opcode, payload, Some(self.rng.mask()));
        *self.dirty = true;
    }

    pub fn text(&mut self, payload: &[u8]) {
        if self.open {
            self.frame(OpCode::Text, payload);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = Target::parse("ws://127.0.0.1:9001/echo", None).unwrap();
        assert_eq!(t.addr.port(), 9001);
        assert_eq!(t.path, "/echo");
        let t = Target::parse("ws://127.0.0.1:9001", None).unwrap();
        assert_eq!(t.path, "/");
        assert!(Target::parse("http://x/", None).is_err());
    }
}
