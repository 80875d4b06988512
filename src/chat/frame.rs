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
/// The payload of a final, unmasked text frame (what the fake outbox in tests records).
#[cfg(test)]
pub fn decode_text_frame(frame: &[u8]) -> Option<&[u8]> {
    use crate::ws::frame::{decode_header, Role};
    let h = decode_header(frame, Role::Client, u64::MAX).ok()??;
    if !h.fin || h.opcode != OpCode::Text {
        return None;
    }
    frame.get(h.header_len..h.header_len + usize::try_from(h.payload_len).ok()?)
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
