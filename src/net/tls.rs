//! Built-in TLS (`--tls-cert`/`--tls-key`): rustls driven sans-IO from the loop.
//!
//! rustls never touches the socket. The loop reads ciphertext into its scratch buffer as for a
//! plain connection and hands it to [`Tls::feed`], which returns the plaintext for the HTTP
//! and WebSocket layers; on the way out [`Tls::pump`] moves the connection's [`OutQueue`]
//! through rustls into any `Write` (the socket, or a buffer in tests). So a TLS connection has
//! the same phases, limits, deadlines and fairness as a plain one; only the bytes differ.
//!
//! Output is corked: queued frames are copied into one buffer of up to a full record
//! ([`RECORD_PLAINTEXT`]) and encrypted together, so a burst of small chat frames costs one
//! record and one AEAD pass, not one per frame (rustls would make a record per slice).

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};

use super::outbound::OutQueue;

/// Largest plaintext of one TLS record (RFC 8446 §5.1).
pub const RECORD_PLAINTEXT: usize = 16 * 1024;

/// Why a certificate/key pair could not be loaded.
#[derive(Debug)]
pub enum TlsError {
    Read {
        path: PathBuf,
        source: io::Error,
    },
    /// The file holds no PEM `CERTIFICATE` block.
    NoCertificate {
        path: PathBuf,
    },
    /// The file holds no PEM private key (PKCS#8, PKCS#1 or SEC1).
    NoKey {
        path: PathBuf,
    },
    /// rustls refused the pair (e.g. the key does not match the certificate).
    Rejected(rustls::Error),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Read { path, source } => write!(f, "{}: {source}", path.display()),
            TlsError::NoCertificate { path } => write!(
                f,
                "{}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)",
                path.display()
            ),
            TlsError::NoKey { path } => write!(
                f,
                "{}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1)",
                path.display()
            ),
            TlsError::Rejected(e) => write!(f, "certificate and key refused: {e}"),
        }
    }
}

impl std::error::Error for TlsError {}

/// Reads a PEM certificate chain and private key and builds the server configuration: TLS 1.2
/// and 1.3, ALPN `http/1.1`, no client certificates.
pub fn load(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_owned(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::NoKey {
        path: key.to_owned(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Rejected)?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(TlsError::Rejected)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What one [`Tls::feed`] found besides plaintext.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fed {
    /// The handshake completed during this call.
    pub handshake_done: bool,
    /// The peer sent `close_notify`: no more plaintext will come.
    pub peer_closed: bool,
}

/// What one [`Tls::pump`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pumped {
    /// Ciphertext bytes written.
    pub wire: usize,
    /// The writer would block with ciphertext still waiting.
    pub blocked: bool,
}

/// One connection's TLS state.
pub struct Tls {
    conn: ServerConnection,
    /// Nothing has been fed yet: the next bytes are the client's first.
    fresh: bool,
    handshaken: bool,
    close_notify_sent: bool,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("handshaken", &self.handshaken)
            .field("close_notify_sent", &self.close_notify_sent)
            .finish()
    }
}

impl Tls {
    pub fn new(config: Arc<ServerConfig>) -> Result<Box<Tls>, rustls::Error> {
        Ok(Box::new(Tls {
            conn: ServerConnection::new(config)?,
            fresh: true,
            handshaken: false,
            close_notify_sent: false,
        }))
    }

    /// Whether `wire`, the first bytes a client sent, is plain HTTP rather than a TLS record
    /// (which starts with content type 22, a handshake). Such a client gets a readable
    /// plain-text refusal instead of a TLS alert it cannot show.
    pub fn is_plain_http(&self, wire: &[u8]) -> bool {
        self.fresh && wire.first().is_some_and(|b| b.is_ascii_uppercase())
    }

    pub fn is_handshaken(&self) -> bool {
        self.handshaken
    }

    /// Decrypts `wire` (ciphertext as read from the socket, any split), appending the
    /// plaintext to `plain`. An error is fatal for the connection; an alert describing it may
    /// be waiting in [`Tls::write_alert`].
    pub fn feed(&mut self, mut wire: &[u8], plain: &mut Vec<u8>) -> Result<Fed, rustls::Error> {
        self.fresh = false;
        let mut fed = Fed::default();
        while !wire.is_empty() {
            // From a slice this only fails when rustls's record buffer is full, which cannot
            // happen: every complete record is processed before the next read.
            self.conn
                .read_tls(&mut wire)
                .map_err(|e| rustls::Error::General(format!("reading records: {e}")))?;
            let state = self.conn.process_new_packets()?;
            let n = state.plaintext_bytes_to_read();
            if n > 0 {
                let start = plain.len();
                plain.resize(start + n, 0);
                self.conn
                    .reader()
                    .read_exact(&mut plain[start..])
                    .map_err(|e| rustls::Error::General(format!("reading plaintext: {e}")))?;
            }
            if state.peer_has_closed() {
                fed.peer_closed = true;
            }
        }
        if !self.handshaken && !self.conn.is_handshaking() {
            self.handshaken = true;
            fed.handshake_done = true;
        }
        Ok(fed)
    }

    /// Handshake messages, alerts or records are waiting to be written.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Best effort after a fatal error: one write of whatever rustls queued (the alert).
    pub fn write_alert<W: Write>(&mut self, w: &mut W) {
        if self.conn.wants_write() {
            let _ = self.conn.write_tls(w);
        }
    }

    /// Writes waiting ciphertext to `w`, then encrypts queued frames from `out` (up to
    /// `max_chunks` chunks, one record at a time, corked through `cork`) and writes those,
    /// until `out` is empty or `w` would block. With `finishing`, a `close_notify` follows the
    /// last queued byte. Frames wait in `out` until the handshake is done.
    pub fn pump<W: Write>(
        &mut self,
        out: &mut OutQueue,
        w: &mut W,
        cork: &mut Vec<u8>,
        max_chunks: usize,
        finishing: bool,
        turn: &[u8],
    ) -> io::Result<Pumped> {
        let mut done = Pumped::default();
        loop {
            while self.conn.wants_write() {
                match self.conn.write_tls(w) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => done.wire += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        done.blocked = true;
                        return Ok(done);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if self.conn.is_handshaking() {
                return Ok(done);
            }
            if out.is_empty() {
                if finishing && !self.close_notify_sent {
                    self.close_notify_sent = true;
                    self.conn.send_close_notify();
                    continue;
                }
                return Ok(done);
            }
            cork.clear();
            out.write_to(
                &mut Cork {
                    buf: cork,
                    room: RECORD_PLAINTEXT,
                },
                max_chunks,
                turn,
            )?;
            // rustls's send buffer is empty here (everything was written above) and a record's
            // worth is far below its limit, so it takes the whole cork.
            let taken = self.conn.writer().write(cork)?;
            if taken != cork.len() {
                return Err(io::Error::other("TLS send buffer refused queued frames"));
            }
        }
    }
}

/// A `Write` that copies into `buf` until `room` bytes are in it, then takes no more.
struct Cork<'a> {
    buf: &'a mut Vec<u8>,
    room: usize,
}

impl Write for Cork<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(data)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut total = 0;
        for b in bufs {
            let n = b.len().min(self.room - self.buf.len());
            self.buf.extend_from_slice(&b[..n]);
            total += n;
            if self.buf.len() == self.room {
                break;
            }
        }
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! rustls client and server wired together in memory: no sockets.

    use super::*;
    use crate::net::outbound::Chunk;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    struct Pair {
        server: Box<Tls>,
        client: ClientConnection,
    }

    fn pair() -> Pair {
        let dir = tempdir();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        let server_cfg = load(&cert, &key).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ck.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client_cfg = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client_cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let client = ClientConnection::new(
            Arc::new(client_cfg),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        Pair {
            server: Tls::new(server_cfg).unwrap(),
            client,
        }
    }

    fn tempdir() -> PathBuf {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let d = std::env::temp_dir().join(format!("parlor-tls-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Client → server: everything the client wants to send, fed to the server.
    fn to_server(p: &mut Pair, plain: &mut Vec<u8>) -> Fed {
        let mut wire = Vec::new();
        while p.client.wants_write() {
            p.client.write_tls(&mut wire).unwrap();
        }
        p.server.feed(&wire, plain).unwrap()
    }

    /// Server → client: pump `out` and let the client read it; returns the plaintext.
    fn to_client(p: &mut Pair, out: &mut OutQueue, finishing: bool) -> Vec<u8> {
        let mut wire = Vec::new();
        let mut cork = Vec::new();
        let pumped = p
            .server
            .pump(out, &mut wire, &mut cork, 64, finishing, &[])
            .unwrap();
        assert!(!pumped.blocked);
        assert_eq!(pumped.wire, wire.len());
        client_reads(p, &wire)
    }

    /// The client decrypts `wire`, draining plaintext as it goes (its buffer is bounded).
    fn client_reads(p: &mut Pair, mut wire: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        while !wire.is_empty() {
            p.client.read_tls(&mut wire).unwrap();
            p.client.process_new_packets().unwrap();
            let _ = p.client.reader().read_to_end(&mut got);
        }
        got
    }

    fn handshake(p: &mut Pair) {
        let mut plain = Vec::new();
        let mut out = OutQueue::default();
        for _ in 0..4 {
            to_server(p, &mut plain);
            to_client(p, &mut out, false);
            if !p.client.is_handshaking() && p.server.is_handshaken() {
                break;
            }
        }
        assert!(p.server.is_handshaken());
        assert_eq!(p.client.alpn_protocol(), Some(&b"http/1.1"[..]));
        assert!(plain.is_empty());
    }

    #[test]
    fn frames_go_both_ways_and_small_frames_share_a_record() {
        let mut p = pair();
        handshake(&mut p);
        p.client
            .writer()
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .unwrap();
        let mut plain = Vec::new();
        let fed = to_server(&mut p, &mut plain);
        assert_eq!(plain, b"GET / HTTP/1.1\r\n\r\n");
        assert!(!fed.peer_closed);

        let mut out = OutQueue::default();
        let mut expect = Vec::new();
        for i in 0..100u8 {
            let frame = vec![i; 20];
            expect.extend_from_slice(&frame);
            out.push(Chunk::Owned(frame));
        }
        let mut wire = Vec::new();
        let mut cork = Vec::new();
        let pumped = p
            .server
            .pump(&mut out, &mut wire, &mut cork, 64, false, &[])
            .unwrap();
        // 64 chunks per pump step, each step one record: 2 records of 22 bytes' overhead,
        // not 100.
        assert!(pumped.wire < expect.len() + 2 * 40, "{} bytes", pumped.wire);
        assert_eq!(client_reads(&mut p, &wire), expect);
        assert!(out.is_empty());
    }

    #[test]
    fn a_big_frame_is_split_into_records_and_arrives_whole() {
        let mut p = pair();
        handshake(&mut p);
        let mut out = OutQueue::default();
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        out.push(Chunk::Owned(big.clone()));
        let got = to_client(&mut p, &mut out, false);
        assert_eq!(got, big);
    }

    #[test]
    fn finishing_sends_close_notify_after_the_last_frame() {
        let mut p = pair();
        handshake(&mut p);
        let mut out = OutQueue::default();
        out.push(Chunk::Owned(b"bye".to_vec()));
        let got = to_client(&mut p, &mut out, true);
        assert_eq!(got, b"bye");
        let mut rest = [0u8; 8];
        // After close_notify a clean EOF (Ok(0)), not an error.
        assert_eq!(p.client.reader().read(&mut rest).unwrap(), 0);
    }

    #[test]
    fn a_blocked_writer_keeps_the_ciphertext() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::WouldBlock.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut p = pair();
        handshake(&mut p);
        let mut out = OutQueue::default();
        out.push(Chunk::Owned(b"later".to_vec()));
        let mut cork = Vec::new();
        let pumped = p
            .server
            .pump(&mut out, &mut Full, &mut cork, 64, false, &[])
            .unwrap();
        assert!(pumped.blocked);
        assert!(p.server.wants_write());
        let got = to_client(&mut p, &mut out, false);
        assert_eq!(got, b"later");
    }

    #[test]
    fn close_notify_from_the_client_is_reported() {
        let mut p = pair();
        handshake(&mut p);
        p.client.send_close_notify();
        let mut plain = Vec::new();
        assert!(to_server(&mut p, &mut plain).peer_closed);
    }

    #[test]
    fn plain_http_and_garbage_are_told_apart_from_a_client_hello() {
        let p = pair();
        assert!(p.server.is_plain_http(b"GET / HTTP/1.1\r\n"));
        assert!(!p.server.is_plain_http(&[0x16, 0x03, 0x01]));
        let mut p = pair();
        let mut plain = Vec::new();
        assert!(p
            .server
            .feed(b"\x17\x03\x03\x00\x05hello", &mut plain)
            .is_err());
    }

    #[test]
    fn load_explains_what_is_wrong_with_the_files() {
        let dir = tempdir();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not pem").unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = dir.join("cert.pem");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let wrong_key = dir.join("wrong.pem");
        std::fs::write(&wrong_key, other.serialize_pem()).unwrap();
        let missing = dir.join("missing.pem");

        let e = load(&missing, &junk).unwrap_err().to_string();
        assert!(e.contains("missing.pem"), "{e}");
        let e = load(&junk, &junk).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = load(&cert, &junk).unwrap_err().to_string();
        assert!(e.contains("no PEM private key"), "{e}");
        let e = load(&cert, &wrong_key).unwrap_err().to_string();
        assert!(e.contains("refused"), "{e}");
    }
}
