// The fuzz targets' bodies, as plain functions with no libfuzzer dependency.
//
// This file is compiled twice: as `parlor_fuzz::checks` (fuzz/src/lib.rs) for the cargo-fuzz
// targets, and as a module of the main crate's `tests/fuzz_corpus.rs`, which replays every
// committed corpus and regression file through these functions on stable Rust, without
// cargo-fuzz. So: only `std` and `parlor` imports here.
//
// Every check must never panic on any input, except through its own assertions, each of which
// states a property of the code under test.

use parlor::http::{
    check_upgrade, client_addr, is_trusted, is_upgrade, parse_request, switching_protocols, Cidr,
    HeadLimits, Parsed,
};
use parlor::ws::close::CloseCode;
use parlor::ws::frame::{decode_frame, decode_header, encode, FrameError, OpCode, Role};
use parlor::ws::reader::{
    read_all, read_all_observing, MessageReader, OwnedEvent, ReadError, ReadLimits,
};
use parlor::ws::utf8::{self, validate_in_pieces, Utf8Validator};

/// Takes fuzz-chosen parameters off the front of the input; past the end every value is 0.
struct Params<'a> {
    data: &'a [u8],
}

impl<'a> Params<'a> {
    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// Up to `max` cut points (positions into a buffer of any length, reduced by the caller).
    fn cuts(&mut self, max: u8) -> Vec<usize> {
        let n = self.u8() % (max + 1);
        (0..n).map(|_| usize::from(self.u16())).collect()
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    fn rest(self) -> &'a [u8] {
        self.data
    }
}

const OPCODES: [OpCode; 6] = [
    OpCode::Continuation,
    OpCode::Text,
    OpCode::Binary,
    OpCode::Close,
    OpCode::Ping,
    OpCode::Pong,
];

/// Largest unconsumed input `MessageReader` may leave behind between reads: a whole control
/// frame (2-byte header + 4-byte mask + 125 bytes), as its module doc promises.
const MAX_UNCONSUMED: usize = 131;

/// `read_all`, plus the reader's own promise that the caller never has to keep more than a
/// control frame of unconsumed bytes, checked after every piece.
fn read_checking_unconsumed(
    reader: &mut MessageReader,
    stream: &[u8],
    cuts: &[usize],
) -> (Vec<OwnedEvent>, Option<ReadError>) {
    read_all_observing(reader, stream, cuts, |left| {
        assert!(
            left <= MAX_UNCONSUMED,
            "reader left {left} bytes unconsumed"
        )
    })
}

/// `frame_decoder`: the frame decoder and message reader on arbitrary bytes, plus an
/// encode/decode round trip on fuzz-chosen frames.
///
/// Input layout: flags (1 byte), max_message (2), max_fragments (1), cuts (1 + 2 each),
/// round-trip section length (1), round-trip section, then the stream.
pub fn check_frame_decoder(data: &[u8]) {
    let mut p = Params { data };
    let flags = p.u8();
    let role = if flags & 1 == 0 {
        Role::Server
    } else {
        Role::Client
    };
    // Mostly small limits (so the limit paths are reached), sometimes no limit at all (so a
    // 64-bit length must still not allocate before the payload arrives).
    let max_message = if flags & 2 != 0 {
        usize::MAX
    } else {
        usize::from(p.u16())
    };
    let limits = ReadLimits {
        max_message,
        max_fragments: usize::from(p.u8() % 16),
    };
    let cuts = p.cuts(8);
    let rt_len = usize::from(p.u8());
    let rt = p.bytes(rt_len);
    let stream = p.rest();

    // 1. The reader: never panics, and the result does not depend on how the stream was cut.
    let whole = read_all(&mut MessageReader::new(role, limits), stream, &[]);
    let pieces = read_all(&mut MessageReader::new(role, limits), stream, &cuts);
    assert_eq!(
        whole, pieces,
        "reader result depends on cut points {cuts:?}"
    );
    let checked = read_checking_unconsumed(&mut MessageReader::new(role, limits), stream, &cuts);
    assert_eq!(whole, checked);
    if flags & 4 != 0 {
        let single: Vec<usize> = (0..stream.len().min(512)).collect();
        // Byte at a time (first 512 bytes), the worst case for reassembly.
        let bytewise =
            read_checking_unconsumed(&mut MessageReader::new(role, limits), stream, &single);
        assert_eq!(
            whole, bytewise,
            "reader result differs when fed byte by byte"
        );
    }
    if let (events, None) = &whole {
        for ev in events {
            if let OwnedEvent::Text(t) | OwnedEvent::Close(_, t) = ev {
                assert!(std::str::from_utf8(t.as_bytes()).is_ok());
            }
            let size = match ev {
                OwnedEvent::Text(t) => t.len(),
                OwnedEvent::Binary(b) => b.len(),
                OwnedEvent::Ping(b) | OwnedEvent::Pong(b) => {
                    assert!(b.len() <= 125, "control payload over 125 bytes");
                    continue;
                }
                OwnedEvent::Close(..) => continue,
            };
            assert!(size <= max_message.max(125), "message over the limit");
        }
    }

    // 2. decode_frame on the raw stream.
    check_decode_frame(stream, role, max_message as u64, cuts.first().copied());

    // 3. Round trip through encode and decode_frame.
    check_round_trip(rt);
}

fn check_decode_frame(stream: &[u8], role: Role, max_payload: u64, cut: Option<usize>) {
    let mut buf = stream.to_vec();
    let header = decode_header(stream, role, max_payload);
    match decode_frame(&mut buf, role, max_payload) {
        Ok(Some((frame, used))) => {
            let h = header
                .expect("decode_header agrees")
                .expect("header complete");
            assert!((2..=stream.len()).contains(&used));
            assert_eq!(used as u64, h.header_len as u64 + h.payload_len);
            assert!(h.payload_len <= max_payload);
            assert_eq!(frame.payload.len() as u64, h.payload_len);
            assert_eq!((frame.fin, frame.opcode), (h.fin, h.opcode));
            assert_eq!(h.mask.is_some(), role == Role::Server);
            if h.opcode.is_control() {
                assert!(frame.fin && frame.payload.len() <= 125);
            }
            // Any strict prefix is "need more bytes", never an error.
            if let Some(cut) = cut {
                let cut = cut % used;
                let mut prefix = stream[..cut].to_vec();
                assert_eq!(decode_frame(&mut prefix, role, max_payload), Ok(None));
                assert_eq!(prefix, &stream[..cut], "prefix buffer touched");
            }
        }
        Ok(None) => {
            assert_eq!(buf, stream, "buffer touched without a frame");
            assert!(header.is_ok());
        }
        Err(e) => {
            assert_eq!(header, Err(e));
            assert!(matches!(
                e.close_code(),
                CloseCode::ProtocolError | CloseCode::MessageTooBig
            ));
            assert!(!e.reason().is_empty());
        }
    }
}

/// Frames built from fuzz-chosen (fin, opcode, payload, mask) survive encode → decode_frame:
/// masked frames decoded as a server, unmasked ones as a client. Several frames go into one
/// buffer so each decode must consume exactly its own frame.
fn check_round_trip(spec: &[u8]) {
    let mut p = Params { data: spec };
    let mut frames = Vec::new();
    while !p.data.is_empty() && frames.len() < 8 {
        let b = p.u8();
        let fin = b & 0x80 != 0;
        let opcode = OPCODES[usize::from(b & 0x7f) % OPCODES.len()];
        let mask = if b & 0x40 != 0 {
            Some([p.u8(), p.u8(), p.u8(), p.u8()])
        } else {
            None
        };
        // Payload: up to 255 literal bytes, or a longer repeated pattern so the 16- and 64-bit
        // length encodings (126..=65535 and 65536+) are exercised too.
        let len_sel = p.u8();
        let literal = p.bytes(usize::from(len_sel));
        let payload: Vec<u8> = match b & 0x30 {
            0x30 => literal
                .iter()
                .copied()
                .cycle()
                .take(65_536 + usize::from(len_sel))
                .collect(),
            0x20 => literal
                .iter()
                .copied()
                .cycle()
                .take(126 + usize::from(p.u16()) % 65_410)
                .collect(),
            _ => literal.to_vec(),
        };
        let payload = if payload.is_empty() && b & 0x20 != 0 {
            vec![0xa5; 126 + usize::from(len_sel)]
        } else {
            payload
        };
        frames.push((fin, opcode, payload, mask));
    }

    for (fin, opcode, payload, mask) in &frames {
        let role = if mask.is_some() {
            Role::Server
        } else {
            Role::Client
        };
        let mut buf = Vec::new();
        encode(&mut buf, *fin, *opcode, payload, *mask);
        let encoded_len = buf.len();
        let expected_header = match payload.len() {
            0..=125 => 2,
            126..=65_535 => 4,
            _ => 10,
        } + if mask.is_some() { 4 } else { 0 };
        assert_eq!(encoded_len, expected_header + payload.len());
        // A trailing byte that must not be consumed.
        buf.push(0x81);
        let result = decode_frame(&mut buf, role, u64::MAX);
        if opcode.is_control() && (!fin || payload.len() > 125) {
            assert!(
                matches!(result, Err(FrameError::Protocol(_))),
                "invalid control frame accepted: fin={fin} len={}",
                payload.len()
            );
            continue;
        }
        let (frame, used) = result
            .expect("valid frame decodes")
            .expect("whole frame is there");
        assert_eq!(used, encoded_len);
        assert_eq!(frame.fin, *fin);
        assert_eq!(frame.opcode, *opcode);
        assert_eq!(frame.payload, &payload[..]);
        // The other role refuses it.
        let other = if role == Role::Server {
            Role::Client
        } else {
            Role::Server
        };
        let mut again = Vec::new();
        encode(&mut again, *fin, *opcode, payload, *mask);
        assert!(decode_frame(&mut again, other, u64::MAX).is_err());
        // And a limit one byte under the payload refuses it as too big.
        if let Some(limit) = (payload.len() as u64).checked_sub(1) {
            let mut again = Vec::new();
            encode(&mut again, *fin, *opcode, payload, *mask);
            assert_eq!(
                decode_frame(&mut again, role, limit),
                Err(FrameError::TooBig)
            );
        }
    }
}

/// `handshake`: `parse_request` with small limits on arbitrary bytes, fed as a fuzz-chosen
/// prefix and then whole; `is_upgrade`/`check_upgrade` on any complete request.
///
/// Input layout: max_head (1), max_headers (1), cut (2), origin-list flag (1), then the bytes.
pub fn check_handshake(data: &[u8]) {
    let mut p = Params { data };
    let limits = HeadLimits {
        max_head: 16 + usize::from(p.u8()) * 4,
        max_headers: usize::from(p.u8() % 16),
    };
    let cut = usize::from(p.u16());
    let with_origins = p.u8() & 1 != 0;
    let buf = p.rest();
    let cut = cut % (buf.len() + 1);

    let whole = parse_request(buf, &limits);
    // What a server reading `buf[..cut]` first would have decided: only Partial lets it read on.
    let first = parse_request(&buf[..cut], &limits);
    if first != Parsed::Partial {
        assert_eq!(
            first, whole,
            "decided at {cut} bytes, but more bytes change the outcome"
        );
    }
    // Deterministic.
    assert_eq!(parse_request(buf, &limits), whole);

    match whole {
        Parsed::Partial => assert!(buf.len() <= limits.max_head),
        Parsed::Reject(r) => {
            assert!(matches!(r.status, 400 | 431), "status {}", r.status);
            let _ = r.to_bytes();
        }
        Parsed::Complete { head_len, request } => {
            assert!(head_len <= buf.len().min(limits.max_head));
            assert!(request.headers.len() <= limits.max_headers);
            assert!(request.version <= 1);
            assert!(request.path.starts_with('/') || request.path == "*");
            for (name, _) in &request.headers {
                assert_eq!(*name, name.to_ascii_lowercase());
            }
            // Bytes after the head don't change the request.
            assert_eq!(
                parse_request(&buf[..head_len], &limits),
                Parsed::Complete {
                    head_len,
                    request: request.clone()
                }
            );
            let upgrade = is_upgrade(&request);
            let origins = if with_origins {
                vec!["http://example.com".to_string()]
            } else {
                Vec::new()
            };
            match check_upgrade(&request, &origins) {
                Ok(accept) => {
                    assert!(upgrade, "handshake accepted without Upgrade: websocket");
                    assert_eq!(accept.len(), 28);
                    let resp = switching_protocols(&accept);
                    assert!(resp.starts_with(b"HTTP/1.1 101 "));
                }
                Err(r) => {
                    assert!(
                        matches!(r.status, 400 | 403 | 405 | 426),
                        "status {}",
                        r.status
                    );
                    let _ = r.to_bytes();
                }
            }
            if !with_origins {
                // An allow-list can only take acceptance away, never grant it.
                let open = check_upgrade(&request, &[]);
                let restricted = check_upgrade(&request, &["http://example.com".to_string()]);
                if open.is_err() {
                    assert!(restricted.is_err());
                }
            }
        }
    }
}

/// `utf8`: the incremental validator against `std::str::from_utf8`, for fuzz-chosen cuts.
///
/// Input layout: cuts (1 + 2 each), then the bytes.
pub fn check_utf8(data: &[u8]) {
    let mut p = Params { data };
    let cuts = p.cuts(8);
    let input = p.rest();
    let expected = std::str::from_utf8(input).is_ok();
    // The whole-message check (an ASCII fast path before std) agrees with std, and hands back
    // the same bytes.
    match utf8::text(input) {
        Ok(t) => assert!(
            expected && t.as_bytes() == input,
            "utf8::text accepted {input:?}"
        ),
        Err(_) => assert!(!expected, "utf8::text refused valid UTF-8 {input:?}"),
    }
    assert_eq!(
        validate_in_pieces(input, &cuts),
        expected,
        "validate_in_pieces disagrees with std at cuts {cuts:?}"
    );
    assert_eq!(validate_in_pieces(input, &[]), expected);

    // Fail-fast is exact: after each piece, the validator has failed iff the input so far can
    // no longer be the start of valid UTF-8.
    let mut ends: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
    ends.sort_unstable();
    ends.push(input.len());
    let mut v = Utf8Validator::new();
    let mut start = 0;
    for end in ends {
        let ok = v.feed(&input[start..end]).is_ok();
        let viable = match std::str::from_utf8(&input[..end]) {
            Ok(_) => true,
            Err(e) => e.error_len().is_none(),
        };
        assert_eq!(ok, viable, "after {end} bytes");
        if !ok {
            return;
        }
        start = end;
    }
    assert_eq!(v.finish().is_ok(), expected);
    // finish() resets: the validator is reusable.
    assert!(v.feed(b"ok").is_ok() && v.finish().is_ok());
}

/// `--trusted-proxy` CIDRs and the client address from forwarding headers.
///
/// Input layout: u8 flags (bit 0: the peer is IPv6; bit 1: trust everything instead of the
/// CIDR list; bit 2: the peer is untrusted), then up to eight `\n`-separated lines: the first
/// is a comma-separated CIDR list (each entry is also parsed on its own), the rest are header
/// values, alternately `X-Forwarded-For` and `Forwarded` when bit 3 is set, otherwise all
/// `Forwarded`.
pub fn check_forwarded(data: &[u8]) {
    use std::net::{IpAddr, SocketAddr};
    let mut p = Params { data };
    let flags = p.u8();
    let mut lines = p.rest().split(|&b| b == b'\n').take(8);
    let cidr_line = String::from_utf8_lossy(lines.next().unwrap_or(b"")).into_owned();
    let mut trusted: Vec<Cidr> = Vec::new();
    for entry in cidr_line.split(',') {
        if let Ok(c) = Cidr::parse(entry) {
            // A network contains its own (masked) address, and prints as something that
            // parses back to itself.
            let shown = c.to_string();
            let again = Cidr::parse(&shown).expect("a printed CIDR parses");
            assert_eq!(again, c, "{entry:?} -> {shown:?}");
            let base: IpAddr = shown.split('/').next().unwrap().parse().unwrap();
            assert!(c.contains(base), "{shown} does not contain its address");
            trusted.push(c);
        }
    }
    if flags & 2 != 0 {
        trusted = vec![
            Cidr::parse("0.0.0.0/0").unwrap(),
            Cidr::parse("::/0").unwrap(),
        ];
    }
    let peer: SocketAddr = if flags & 1 != 0 {
        "[2001:db8::99]:4000".parse().unwrap()
    } else {
        "192.0.2.99:4000".parse().unwrap()
    };
    if flags & 4 == 0 && !trusted.is_empty() && !is_trusted(&trusted, peer.ip()) {
        trusted.push(Cidr::parse(&peer.ip().to_string()).unwrap());
    }
    let headers: Vec<(String, Vec<u8>)> = lines
        .enumerate()
        .map(|(i, v)| {
            let name = if flags & 8 != 0 && i % 2 == 0 {
                "x-forwarded-for"
            } else {
                "forwarded"
            };
            (name.to_string(), v.to_vec())
        })
        .collect();
    let got = client_addr(peer, &trusted, &headers);
    // Deterministic.
    assert_eq!(client_addr(peer, &trusted, &headers), got);
    if !is_trusted(&trusted, peer.ip()) {
        assert_eq!(got, peer, "headers believed from an untrusted peer");
    }
    // The answer is the peer or an address the headers spell out.
    if got != peer {
        let ip = got.ip().to_string();
        let v4_mapped = format!("::ffff:{ip}");
        let named = headers.iter().any(|(_, v)| {
            let v = String::from_utf8_lossy(v).to_ascii_lowercase();
            v.contains(&ip) || v.contains(&v4_mapped) || v.contains(':')
        });
        assert!(named, "{got} appears in no header: {headers:?}");
    }
    // Without any forwarding header, the peer.
    assert_eq!(client_addr(peer, &trusted, &[]), peer);
}
