//! Encoding a server text frame once for fan-out.
//!
//! Server frames for fan-out are encoded by the WebSocket layer ([`encode_shared`]): once per
//! broadcast, then the same bytes are queued on every recipient.

use crate::service::SharedFrame;
use crate::ws::frame::{encode_shared, OpCode};

/// One final, unmasked text frame carrying `payload`.
pub fn text_frame(payload: &[u8]) -> SharedFrame {
    encode_shared(OpCode::Text, payload)
}

/// Decodes what [`text_frame`] produced (tests only): the payload of one unmasked frame.
#[cfg(test)]
pub fn decode_text_frame(frame: &[u8]) -> Option<&[u8]> {
    if frame.len() < 2 || frame[0] != 0x81 {
        return None;
    }
    let (len, start) = match frame[1] {
        126 => (
            u16::from_be_bytes([*frame.get(2)?, *frame.get(3)?]) as usize,
            4,
        ),
        127 => {
            let b: [u8; 8] = frame.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(b) as usize, 10)
        }
        n => (n as usize, 2),
    };
    frame.get(start..start + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_roundtrip() {
        for n in [0usize, 1, 125, 126, 65535, 65536, 70000] {
            let p = vec![b'a'; n];
            let f = text_frame(&p);
            assert_eq!(decode_text_frame(&f), Some(&p[..]), "len {n}");
        }
        assert_eq!(&text_frame(b"hi")[..], &[0x81, 2, b'h', b'i']);
    }
}
