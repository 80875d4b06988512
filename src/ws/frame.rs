//! Frame header decoding and frame encoding (RFC 6455 §5.2), sans-IO.
//!
//! Decoding never consumes input on its own: it reports how long the header is and the caller
//! decides when to advance. Lengths are checked against the caller's limit before anything is
//! allocated, so a 64-bit length field can't make us reserve memory.

use std::rc::Rc;

use super::close::CloseCode;
use super::mask::apply_mask;

/// An encoded frame that many connections can queue without copying: a broadcast is serialized
/// and framed once, then each recipient's queue holds another reference to the same bytes.
/// `Rc`, not `Arc`: the loop is single-threaded and fan-out touches this count per recipient.
/// (Re-exported as `crate::service::SharedFrame`.)
pub type SharedFrame = Rc<[u8]>;

/// Frame opcodes we understand; everything else is a protocol error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    pub fn from_u8(v: u8) -> Option<OpCode> {
        Some(match v {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// Which side of the connection we are: servers require masked frames and send unmasked ones;
/// clients (the benchmark tool) the other way round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: OpCode,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// Bytes taken by the header itself (2 to 14).
    pub header_len: usize,
}

/// Why a frame was refused; maps to the close code we fail the connection with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// RSV bits, unknown opcode, bad masking, fragmented or oversized control frame,
    /// 64-bit length with the top bit set, non-minimal length encoding is allowed (RFC says
    /// "minimal number of bytes MUST be used" but peers don't fail on it; neither do we).
    Protocol(&'static str),
    /// Payload longer than the limit.
    TooBig,
}

impl FrameError {
    pub fn close_code(self) -> CloseCode {
        match self {
            FrameError::Protocol(_) => CloseCode::ProtocolError,
            FrameError::TooBig => CloseCode::MessageTooBig,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            FrameError::Protocol(r) => r,
            FrameError::TooBig => "message too big",
        }
    }
}

/// Decodes a frame header from the start of `buf`. `Ok(None)` means more bytes are needed (and
/// nothing was consumed). `max_payload` bounds a single frame's payload.
pub fn decode_header(
    buf: &[u8],
    role: Role,
    max_payload: u64,
) -> Result<Option<Header>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x70 != 0 {
        return Err(FrameError::Protocol("reserved bits set"));
    }
    let opcode = OpCode::from_u8(b0 & 0x0f).ok_or(FrameError::Protocol("unknown opcode"))?;
    let fin = b0 & 0x80 != 0;
    let masked = b1 & 0x80 != 0;
    match (role, masked) {
        (Role::Server, false) => return Err(FrameError::Protocol("client frame not masked")),
        (Role::Client, true) => return Err(FrameError::Protocol("server frame masked")),
        _ => {}
    }
    let len7 = b1 & 0x7f;
    if opcode.is_control() {
        if !fin {
            return Err(FrameError::Protocol("fragmented control frame"));
        }
        if len7 > 125 {
            return Err(FrameError::Protocol("control frame too long"));
        }
    }
    let (payload_len, mut pos) = match len7 {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let len = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
            if len >> 63 != 0 {
                return Err(FrameError::Protocol(
                    "64-bit length with most significant bit set",
                ));
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    if payload_len > max_payload {
        return Err(FrameError::TooBig);
    }
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let m = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        payload_len,
        header_len: pos,
    }))
}

/// A whole frame decoded in place: the payload is unmasked inside the caller's buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub fin: bool,
    pub opcode: OpCode,
    pub payload: &'a [u8],
}

/// Decodes one whole frame from the start of `buf`, unmasking its payload in place.
/// Returns the frame and the number of bytes it occupied, or `Ok(None)` if `buf` does not yet
/// hold the whole frame (in which case `buf` is left untouched).
pub fn decode_frame(
    buf: &mut [u8],
    role: Role,
    max_payload: u64,
) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    let Some(h) = decode_header(buf, role, max_payload)? else {
        return Ok(None);
    };
    let total = h.header_len as u64 + h.payload_len;
    if (buf.len() as u64) < total {
        return Ok(None);
    }
    let total = total as usize;
    let payload = &mut buf[h.header_len..total];
    if let Some(m) = h.mask {
        apply_mask(payload, m, 0);
    }
    Ok(Some((
        Frame {
            fin: h.fin,
            opcode: h.opcode,
            payload,
        },
        total,
    )))
}

/// Writes a frame header into `out` and returns its length (2 to 14 bytes).
pub fn encode_header(
    out: &mut [u8; 14],
    fin: bool,
    opcode: OpCode,
    len: usize,
    mask: Option<[u8; 4]>,
) -> usize {
    out[0] = (if fin { 0x80 } else { 0 }) | opcode as u8;
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut pos = if len < 126 {
        out[1] = mask_bit | len as u8;
        2
    } else if len <= 0xffff {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    if let Some(m) = mask {
        out[pos..pos + 4].copy_from_slice(&m);
        pos += 4;
    }
    pos
}

/// Bytes of an unmasked frame with a payload of `payload_len` bytes.
#[inline]
pub fn frame_len(payload_len: usize) -> usize {
    let header = if payload_len < 126 {
        2
    } else if payload_len <= 0xffff {
        4
    } else {
        10
    };
    header + payload_len
}

/// Appends a complete frame to `out`. With `mask` (client role) the payload is masked.
#[inline]
pub fn encode(out: &mut Vec<u8>, fin: bool, opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>) {
    if mask.is_none() && payload.len() < 126 {
        // A server's short frame (echoes, acks, chat messages): two header bytes and the
        // payload, inlined into the caller (an echo reply appends one per message); longer
        // or masked frames take the general header builder out of line.
        out.reserve(2 + payload.len());
        out.extend_from_slice(&[u8::from(fin) << 7 | opcode as u8, payload.len() as u8]);
        out.extend_from_slice(payload);
        return;
    }
    encode_general(out, fin, opcode, payload, mask);
}

#[inline(never)]
fn encode_general(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: OpCode,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) {
    let mut h = [0u8; 14];
    let n = encode_header(&mut h, fin, opcode, payload.len(), mask);
    out.reserve(n + payload.len());
    out.extend_from_slice(&h[..n]);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(m) = mask {
        apply_mask(&mut out[start..], m, 0);
    }
}

/// Encodes an unmasked, final server frame once, for queueing on any number of connections.
pub fn encode_shared(opcode: OpCode, payload: &[u8]) -> SharedFrame {
    let mut v = Vec::new();
    encode(&mut v, true, opcode, payload, None);
    Rc::from(v)
}

/// Encodes an unmasked, final server frame into a fresh vector.
pub fn encode_vec(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    encode(&mut v, true, opcode, payload, None);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 1 << 30;

    // RFC 6455 §5.7 examples, byte for byte.
    #[test]
    fn rfc_single_frame_unmasked_text() {
        assert_eq!(
            encode_vec(OpCode::Text, b"Hello"),
            [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]
        );
    }

    #[test]
    fn rfc_single_frame_masked_text() {
        let mut f = vec![
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let (frame, used) = decode_frame(&mut f, Role::Server, MAX).unwrap().unwrap();
        assert_eq!(used, 11);
        assert_eq!(
            frame,
            Frame {
                fin: true,
                opcode: OpCode::Text,
                payload: b"Hello"
            }
        );
        let mut out = Vec::new();
        encode(
            &mut out,
            true,
            OpCode::Text,
            b"Hello",
            Some([0x37, 0xfa, 0x21, 0x3d]),
        );
        assert_eq!(
            out,
            [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
        );
    }

    #[test]
    fn rfc_fragmented_unmasked_text() {
        let mut out = Vec::new();
        encode(&mut out, false, OpCode::Text, b"Hel", None);
        encode(&mut out, true, OpCode::Continuation, b"lo", None);
        assert_eq!(out, [0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f]);
        let (a, n) = decode_frame(&mut out, Role::Client, MAX).unwrap().unwrap();
        assert_eq!(
            (a.fin, a.opcode, a.payload),
            (false, OpCode::Text, &b"Hel"[..])
        );
        assert_eq!(n, 5);
    }

    #[test]
    fn rfc_ping_and_pong() {
        assert_eq!(
            encode_vec(OpCode::Ping, b"Hello"),
            [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]
        );
        let mut pong = vec![
            0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let (f, _) = decode_frame(&mut pong, Role::Server, MAX).unwrap().unwrap();
        assert_eq!((f.opcode, f.payload), (OpCode::Pong, &b"Hello"[..]));
    }

    #[test]
    fn rfc_256_byte_and_64k_binary_headers() {
        let v = encode_vec(OpCode::Binary, &[0u8; 256]);
        assert_eq!(&v[..4], [0x82, 0x7e, 0x01, 0x00]);
        let v = encode_vec(OpCode::Binary, &vec![0u8; 65536]);
        assert_eq!(&v[..10], [0x82, 0x7f, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00]);
        assert_eq!(v.len(), 65546);
    }

    #[test]
    fn needs_more_bytes_at_every_cut_without_consuming() {
        let mut full = Vec::new();
        encode(
            &mut full,
            true,
            OpCode::Binary,
            &[7u8; 300],
            Some([1, 2, 3, 4]),
        );
        for cut in 0..full.len() {
            let mut part = full[..cut].to_vec();
            let before = part.clone();
            assert_eq!(
                decode_frame(&mut part, Role::Server, MAX).unwrap(),
                None,
                "cut {cut}"
            );
            assert_eq!(part, before, "buffer touched at cut {cut}");
        }
        let (f, n) = decode_frame(&mut full, Role::Server, MAX).unwrap().unwrap();
        assert_eq!(n, 308);
        assert_eq!(f.payload, &[7u8; 300][..]);
    }

    #[test]
    fn protocol_errors() {
        let cases: &[(&[u8], &str)] = &[
            (&[0xc1, 0x80, 0, 0, 0, 0], "reserved bits set"),
            (&[0x83, 0x80, 0, 0, 0, 0], "unknown opcode"),
            (&[0x8b, 0x80, 0, 0, 0, 0], "unknown opcode"),
            (&[0x81, 0x00], "client frame not masked"),
            (&[0x09, 0x80, 0, 0, 0, 0], "fragmented control frame"),
            (&[0x89, 0xfe, 0, 126], "control frame too long"),
            (
                &[0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0],
                "64-bit length with most significant bit set",
            ),
        ];
        for (bytes, why) in cases {
            let mut b = bytes.to_vec();
            assert_eq!(
                decode_frame(&mut b, Role::Server, MAX),
                Err(FrameError::Protocol(why)),
                "{why}"
            );
        }
        assert_eq!(
            FrameError::Protocol("x").close_code(),
            CloseCode::ProtocolError
        );
    }

    #[test]
    fn length_checked_against_limit_before_payload_arrives() {
        // Header claims 2^40 bytes; only the header is present. Must fail now, not wait.
        let mut h = vec![0x82, 0xff, 0, 0, 0x01, 0, 0, 0, 0, 0, 1, 2, 3, 4];
        assert_eq!(
            decode_frame(&mut h, Role::Server, 1 << 20),
            Err(FrameError::TooBig)
        );
        assert_eq!(FrameError::TooBig.close_code(), CloseCode::MessageTooBig);
    }

    #[test]
    fn client_role_rejects_masked_server_frames() {
        let mut b = vec![0x81, 0x80, 1, 2, 3, 4];
        assert!(decode_frame(&mut b, Role::Client, MAX).is_err());
    }
}
