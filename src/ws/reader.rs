//! Turns a stream of received bytes into WebSocket events (RFC 6455 §5.4–5.5), sans-IO.
//!
//! The reader is fed whatever bytes the socket produced and consumes as much as it can:
//! - a complete single-frame message already in the buffer is unmasked in place and handed out
//!   without a copy (the common case for chat traffic);
//! - otherwise a data frame's payload is consumed as it arrives, unmasked, UTF-8-checked and
//!   appended to the message being assembled. Text is therefore rejected on the first invalid
//!   byte even in the middle of a frame, and the caller never has to keep more than one frame
//!   header or one control frame (≤ 131 bytes) of unconsumed input.
//!
//! Control frames may arrive between the fragments of a message and are reported at once.

use super::close::{self, CloseCode, CloseFrame};
use super::frame::{decode_header, FrameError, OpCode, Role};
use super::mask::apply_mask;
use super::utf8::{self, Utf8Validator};

/// Per-endpoint bounds on what a peer may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// Largest reassembled message, in bytes (bigger → 1009).
    pub max_message: usize,
    /// Most frames in one message, empty ones included (more → 1009).
    pub max_fragments: usize,
}

/// Something the peer sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    Close(CloseFrame<'a>),
}

/// The peer broke the protocol: fail the connection with this close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadError {
    pub code: CloseCode,
    pub reason: &'static str,
}

impl From<FrameError> for ReadError {
    fn from(e: FrameError) -> ReadError {
        ReadError {
            code: e.close_code(),
            reason: e.reason(),
        }
    }
}

fn protocol(reason: &'static str) -> ReadError {
    ReadError {
        code: CloseCode::ProtocolError,
        reason,
    }
}

const INVALID_UTF8: ReadError = ReadError {
    code: CloseCode::InvalidPayload,
    reason: "invalid UTF-8 in text message",
};

/// A data frame whose payload is still arriving.
#[derive(Debug, Clone, Copy)]
struct PartialFrame {
    mask: Option<[u8; 4]>,
    remaining: u64,
    /// Payload bytes already consumed (the masking key position).
    offset: usize,
    fin: bool,
}

#[derive(Debug, Clone)]
pub struct MessageReader {
    role: Role,
    limits: ReadLimits,
    frame: Option<PartialFrame>,
    /// Opcode of the message being assembled (Text or Binary), if any.
    message: Option<OpCode>,
    assembled: Vec<u8>,
    fragments: usize,
    utf8: Utf8Validator,
    /// The last event borrowed `assembled`; release it on the next call.
    delivered: bool,
}

impl Default for MessageReader {
    fn default() -> MessageReader {
        MessageReader::new(
            Role::Server,
            ReadLimits {
                max_message: 0,
                max_fragments: 0,
            },
        )
    }
}

impl MessageReader {
    pub fn new(role: Role, limits: ReadLimits) -> MessageReader {
        MessageReader {
            role,
            limits,
            frame: None,
            message: None,
            assembled: Vec::new(),
            fragments: 0,
            utf8: Utf8Validator::new(),
            delivered: false,
        }
    }

    /// Nothing in progress: no partial frame, no fragmented message, no buffer held. A reader
    /// in this state is interchangeable with a fresh one of the same role and limits.
    pub fn is_idle(&self) -> bool {
        self.frame.is_none()
            && self.message.is_none()
            && self.assembled.capacity() == 0
            && !self.delivered
            && self.fragments == 0
    }

    /// Bytes held for a message being assembled (for memory accounting).
    pub fn buffered(&self) -> usize {
        self.assembled.capacity()
    }

    /// Frees the buffer of a message already handed out, instead of at the next call to
    /// [`MessageReader::next`] (which may not come for a long time on a quiet connection).
    pub fn release_delivered(&mut self) {
        if self.delivered {
            self.delivered = false;
            self.assembled = Vec::new();
        }
    }

    /// Consumes bytes from the front of `buf`. Returns how many were consumed and possibly an
    /// event. `(0, None)` means "need more bytes"; the caller keeps the unconsumed rest and calls
    /// again once more has arrived. Call repeatedly until it returns `(0, None)`.
    pub fn next<'a>(
        &'a mut self,
        buf: &'a mut [u8],
    ) -> Result<(usize, Option<Event<'a>>), ReadError> {
        if self.delivered {
            self.delivered = false;
            // Don't keep a big buffer around for an idle connection.
            self.assembled = Vec::new();
        }
        if let Some(pf) = self.frame {
            return self.continue_payload(pf, buf);
        }
        if let Some(total) = self.small_frame(buf) {
            return self.small_message(buf, total);
        }
        self.general(buf)
    }

    /// [`MessageReader::next`] for every frame [`MessageReader::small_frame`] does not take.
    fn general<'a>(
        &'a mut self,
        buf: &'a mut [u8],
    ) -> Result<(usize, Option<Event<'a>>), ReadError> {
        let max_payload = self.limits.max_message as u64;
        let Some(h) = decode_header(buf, self.role, max_payload.max(125))? else {
            return Ok((0, None));
        };
        let total = h.header_len as u64 + h.payload_len;
        if h.opcode.is_control() {
            if (buf.len() as u64) < total {
                return Ok((0, None));
            }
            let total = total as usize;
            let payload = &mut buf[h.header_len..total];
            if let Some(m) = h.mask {
                apply_mask(payload, m, 0);
            }
            let event =
                match h.opcode {
                    OpCode::Ping => Event::Ping(payload),
                    OpCode::Pong => Event::Pong(payload),
                    _ => Event::Close(close::parse_close_payload(payload).map_err(|code| {
                        ReadError {
                            code,
                            reason: if code == CloseCode::InvalidPayload {
                                "invalid UTF-8 in close reason"
                            } else {
                                "invalid close frame"
                            },
                        }
                    })?),
                };
            return Ok((total, Some(event)));
        }

        match (h.opcode, self.message) {
            (OpCode::Continuation, None) => {
                return Err(protocol("continuation frame without a message"))
            }
            (OpCode::Text | OpCode::Binary, Some(_)) => {
                return Err(protocol("new data frame inside a fragmented message"))
            }
            _ => {}
        }
        let new_len = (self.assembled.len() as u64)
            .checked_add(h.payload_len)
            .ok_or(FrameError::TooBig)?;
        if new_len > max_payload {
            return Err(FrameError::TooBig.into());
        }
        self.fragments += 1;
        if self.fragments > self.limits.max_fragments.max(1) {
            return Err(ReadError {
                code: CloseCode::MessageTooBig,
                reason: "too many fragments",
            });
        }

        // Fast path: a whole unfragmented message is in the buffer; hand it out in place.
        if self.message.is_none() && h.fin && (buf.len() as u64) >= total {
            self.fragments = 0;
            let total = total as usize;
            let payload = &mut buf[h.header_len..total];
            if let Some(m) = h.mask {
                apply_mask(payload, m, 0);
            }
            let event = if h.opcode == OpCode::Text {
                Event::Text(utf8::text(payload).map_err(|_| INVALID_UTF8)?)
            } else {
                Event::Binary(payload)
            };
            return Ok((total, Some(event)));
        }

        if self.message.is_none() {
            self.message = Some(h.opcode);
        }
        let pf = PartialFrame {
            mask: h.mask,
            remaining: h.payload_len,
            offset: 0,
            fin: h.fin,
        };
        if h.payload_len == 0 {
            if h.fin {
                return self.finish_message(h.header_len);
            }
            return Ok((h.header_len, None));
        }
        self.frame = Some(pf);
        Ok((h.header_len, None))
    }

    /// The common case in a few tests instead of the general header decoder: a client's
    /// final, masked text or binary frame under 126 bytes, whole in `buf`, with no message in
    /// progress. Returns the frame's length; anything else (including every error) is `None`,
    /// and the general path decides. `small_frames_agree_with_the_general_path` checks that the
    /// two give the same result on every such frame and its near misses.
    #[inline]
    fn small_frame(&self, buf: &[u8]) -> Option<usize> {
        let &[b0, b1, ..] = buf.first_chunk::<6>()?;
        let len = usize::from(b1 & 0x7f);
        let total = 6 + len;
        // FIN, no reserved bits, text (0x1) or binary (0x2); mask bit set, 7-bit length.
        let small = matches!(b0, 0x81 | 0x82)
            && b1 & 0x80 != 0
            && len < 126
            && self.role == Role::Server
            && self.message.is_none()
            && len <= self.limits.max_message
            && buf.len() >= total;
        small.then_some(total)
    }

    /// Hands out the frame [`MessageReader::small_frame`] found, unmasked in place.
    fn small_message<'a>(
        &mut self,
        buf: &'a mut [u8],
        total: usize,
    ) -> Result<(usize, Option<Event<'a>>), ReadError> {
        self.fragments = 0;
        let text = buf[0] == 0x81;
        let mask = [buf[2], buf[3], buf[4], buf[5]];
        let payload = &mut buf[6..total];
        apply_mask(payload, mask, 0);
        let event = if text {
            Event::Text(utf8::text(payload).map_err(|_| INVALID_UTF8)?)
        } else {
            Event::Binary(payload)
        };
        Ok((total, Some(event)))
    }

    fn continue_payload<'a>(
        &'a mut self,
        mut pf: PartialFrame,
        buf: &'a mut [u8],
    ) -> Result<(usize, Option<Event<'a>>), ReadError> {
        let take = (pf.remaining.min(buf.len() as u64)) as usize;
        if take == 0 {
            return Ok((0, None));
        }
        let chunk = &mut buf[..take];
        if let Some(m) = pf.mask {
            apply_mask(chunk, m, pf.offset);
        }
        if self.message == Some(OpCode::Text) {
            self.utf8.feed(chunk).map_err(|_| INVALID_UTF8)?;
        }
        self.assembled.extend_from_slice(chunk);
        pf.remaining -= take as u64;
        pf.offset += take;
        if pf.remaining > 0 {
            self.frame = Some(pf);
            return Ok((take, None));
        }
        self.frame = None;
        if pf.fin {
            return self.finish_message(take);
        }
        Ok((take, None))
    }

    fn finish_message(&mut self, consumed: usize) -> Result<(usize, Option<Event<'_>>), ReadError> {
        let opcode = self.message.take().expect("message in progress");
        self.fragments = 0;
        self.delivered = true;
        if opcode == OpCode::Text {
            self.utf8.finish().map_err(|_| INVALID_UTF8)?;
            let text = utf8::text(&self.assembled).map_err(|_| INVALID_UTF8)?;
            Ok((consumed, Some(Event::Text(text))))
        } else {
            Ok((consumed, Some(Event::Binary(&self.assembled))))
        }
    }
}

/// An owned copy of an event, for tests and tools that collect events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedEvent {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
}

impl From<Event<'_>> for OwnedEvent {
    fn from(e: Event<'_>) -> OwnedEvent {
        match e {
            Event::Text(t) => OwnedEvent::Text(t.to_owned()),
            Event::Binary(b) => OwnedEvent::Binary(b.to_vec()),
            Event::Ping(p) => OwnedEvent::Ping(p.to_vec()),
            Event::Pong(p) => OwnedEvent::Pong(p.to_vec()),
            Event::Close(c) => OwnedEvent::Close(c.code, c.reason.to_owned()),
        }
    }
}

/// Feeds `stream` to a fresh reader in pieces cut at `cuts` (as a socket would deliver it) and
/// collects events until the first error. Used by tests and the fuzz targets.
pub fn read_all(
    reader: &mut MessageReader,
    stream: &[u8],
    cuts: &[usize],
) -> (Vec<OwnedEvent>, Option<ReadError>) {
    read_all_observing(reader, stream, cuts, |_| {})
}

/// Like [`read_all`], and calls `after_piece` with the number of bytes the reader left
/// unconsumed after each piece (the fuzz target checks the module's promise that this never
/// exceeds one control frame).
pub fn read_all_observing(
    reader: &mut MessageReader,
    stream: &[u8],
    cuts: &[usize],
    mut after_piece: impl FnMut(usize),
) -> (Vec<OwnedEvent>, Option<ReadError>) {
    let mut events = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut start = 0;
    let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(stream.len())).collect();
    bounds.sort_unstable();
    bounds.push(stream.len());
    for end in bounds {
        pending.extend_from_slice(&stream[start..end]);
        start = end;
        let mut pos = 0;
        loop {
            let available = pending.len() - pos;
            match reader.next(&mut pending[pos..]) {
                Ok((0, None)) => break,
                Ok((n, ev)) => {
                    assert!(n <= available, "reader consumed more than it was given");
                    if let Some(ev) = ev {
                        events.push(OwnedEvent::from(ev));
                    }
                    pos += n;
                }
                Err(e) => return (events, Some(e)),
            }
        }
        pending.drain(..pos);
        after_piece(pending.len());
    }
    (events, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::encode;

    const MASK: Option<[u8; 4]> = Some([0xa1, 0xb2, 0xc3, 0xd4]);

    fn reader(max_message: usize) -> MessageReader {
        MessageReader::new(
            Role::Server,
            ReadLimits {
                max_message,
                max_fragments: 100,
            },
        )
    }

    fn frame(fin: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode(&mut v, fin, op, payload, MASK);
        v
    }

    #[test]
    fn small_frames_agree_with_the_general_path() {
        type Outcome = Result<(usize, Option<OwnedEvent>), ReadError>;
        fn run(r: &mut MessageReader, buf: &mut [u8], general: bool) -> Outcome {
            let res = if general { r.general(buf) } else { r.next(buf) };
            res.map(|(n, e)| (n, e.map(OwnedEvent::from)))
        }
        let payloads: [&[u8]; 4] = [
            b"",
            b"hello there, plain ascii text",
            "é ü ☃".as_bytes(),
            b"\xff\xfe bad",
        ];
        let mut fast_hits = 0;
        for b0 in [
            0x81u8, 0x82, 0x80, 0x01, 0x02, 0x89, 0x8a, 0x88, 0x91, 0xc1, 0xa2, 0x83,
        ] {
            for mask_bit in [0x80u8, 0] {
                for body in payloads {
                    for len_delta in [0usize, 1] {
                        for max_message in [0usize, 4, 29, 125, 1 << 20] {
                            for mid_message in [false, true] {
                                for cut in [0usize, 1, 3] {
                                    let len = body.len() + len_delta * 100;
                                    let mut payload = body.to_vec();
                                    payload.resize(len.min(125), b'x');
                                    let mut wire = vec![b0, mask_bit | payload.len() as u8];
                                    let key = [0x11, 0x22, 0x33, 0x44];
                                    if mask_bit != 0 {
                                        wire.extend_from_slice(&key);
                                    }
                                    let start = wire.len();
                                    wire.extend_from_slice(&payload);
                                    if mask_bit != 0 {
                                        apply_mask(&mut wire[start..], key, 0);
                                    }
                                    wire.truncate(wire.len().saturating_sub(cut));
                                    let mut fast = reader(max_message);
                                    if mid_message && max_message > 0 {
                                        let first = frame(false, OpCode::Text, b"a");
                                        let (events, err) = read_all(&mut fast, &first, &[]);
                                        assert!(events.is_empty() && err.is_none());
                                    }
                                    let mut slow = fast.clone();
                                    fast_hits += usize::from(fast.small_frame(&wire).is_some());
                                    let (mut a, mut b) = (wire.clone(), wire.clone());
                                    let got = run(&mut fast, &mut a, false);
                                    let want = run(&mut slow, &mut b, true);
                                    assert_eq!(got, want, "wire {wire:?} max {max_message}");
                                    assert_eq!(format!("{fast:?}"), format!("{slow:?}"));
                                    assert_eq!(a, b, "unmasked in place alike");
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(fast_hits > 40, "the fast path was taken {fast_hits} times");
    }

    #[test]
    fn idle_only_between_whole_messages() {
        let mut r = reader(1 << 20);
        assert!(r.is_idle());
        // A whole frame in the buffer: handed out in place, nothing kept.
        let mut whole = frame(true, OpCode::Text, b"hello");
        assert!(matches!(
            r.next(&mut whole),
            Ok((_, Some(Event::Text("hello"))))
        ));
        assert!(r.is_idle());
        // Half a frame's payload: a partial frame is in progress.
        let mut big = frame(true, OpCode::Binary, &[7u8; 300]);
        let (first, second) = big.split_at_mut(150);
        let (n, ev) = r.next(first).unwrap();
        assert!(ev.is_none());
        let (m, ev) = r.next(&mut first[n..]).unwrap();
        assert!(ev.is_none());
        assert!(!r.is_idle());
        assert_eq!(n + m, 150);
        let (_, ev) = r.next(second).unwrap();
        assert!(matches!(ev, Some(Event::Binary(b)) if b == [7u8; 300]));
        // Its bytes were assembled and lent out: not idle until released.
        assert!(!r.is_idle());
        r.release_delivered();
        assert!(r.is_idle());
        // A first fragment: a message is in progress even with no frame open.
        let mut frag = frame(false, OpCode::Text, b"par");
        let mut pos = 0;
        while pos < frag.len() {
            let (n, ev) = r.next(&mut frag[pos..]).unwrap();
            assert!(ev.is_none() && n > 0);
            pos += n;
        }
        assert!(!r.is_idle());
        let mut last = frame(true, OpCode::Continuation, b"t");
        let (n, ev) = r.next(&mut last).unwrap();
        assert!(ev.is_none());
        let (_, ev) = r.next(&mut last[n..]).unwrap();
        assert!(matches!(ev, Some(Event::Text("part"))));
        r.release_delivered();
        assert!(r.is_idle());
    }

    fn run(stream: &[u8], cuts: &[usize]) -> (Vec<OwnedEvent>, Option<ReadError>) {
        read_all(&mut reader(1 << 20), stream, cuts)
    }

    #[test]
    fn fragmented_text_with_interleaved_ping_at_every_cut() {
        let mut s = frame(false, OpCode::Text, "κό".as_bytes());
        s.extend(frame(false, OpCode::Continuation, b""));
        s.extend(frame(true, OpCode::Ping, b"p"));
        s.extend(frame(true, OpCode::Continuation, "σμε".as_bytes()));
        s.extend(frame(true, OpCode::Binary, &[1, 2, 3]));
        let expected = vec![
            OwnedEvent::Ping(b"p".to_vec()),
            OwnedEvent::Text("κόσμε".into()),
            OwnedEvent::Binary(vec![1, 2, 3]),
        ];
        for cut in 0..=s.len() {
            assert_eq!(run(&s, &[cut]), (expected.clone(), None), "cut {cut}");
        }
        let every: Vec<usize> = (0..s.len()).collect();
        assert_eq!(run(&s, &every), (expected, None));
    }

    #[test]
    fn sequence_errors() {
        let (_, e) = run(&frame(true, OpCode::Continuation, b"x"), &[]);
        assert_eq!(e.unwrap().code, CloseCode::ProtocolError);
        let mut s = frame(false, OpCode::Text, b"a");
        s.extend(frame(true, OpCode::Text, b"b"));
        assert_eq!(run(&s, &[]).1.unwrap().code, CloseCode::ProtocolError);
        let mut s = frame(false, OpCode::Binary, b"a");
        s.extend(frame(true, OpCode::Binary, b"b"));
        assert_eq!(run(&s, &[]).1.unwrap().code, CloseCode::ProtocolError);
    }

    #[test]
    fn invalid_utf8_fails_fast_mid_frame() {
        // A 1000-byte text frame whose 3rd byte is invalid: the error comes before the frame ends.
        let mut payload = vec![b'a'; 1000];
        payload[2] = 0xff;
        let s = frame(true, OpCode::Text, &payload);
        let mut r = reader(1 << 20);
        let mut part = s[..12].to_vec(); // 8-byte header + 4 payload bytes
        let mut pos = 0;
        let mut err = None;
        loop {
            match r.next(&mut part[pos..]) {
                Ok((0, None)) => break,
                Ok((n, _)) => pos += n,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        assert_eq!(err.map(|e| e.code), Some(CloseCode::InvalidPayload));
    }

    #[test]
    fn invalid_utf8_in_whole_frame_and_across_fragments() {
        assert_eq!(
            run(&frame(true, OpCode::Text, b"\xed\xa0\x80"), &[])
                .1
                .unwrap()
                .code,
            CloseCode::InvalidPayload
        );
        let mut s = frame(false, OpCode::Text, b"\xe2\x82");
        s.extend(frame(true, OpCode::Continuation, b""));
        assert_eq!(run(&s, &[]).1.unwrap().code, CloseCode::InvalidPayload);
    }

    #[test]
    fn message_size_limit_counts_fragments_together() {
        let mut r = reader(10);
        let mut s = frame(false, OpCode::Binary, &[0; 6]);
        s.extend(frame(true, OpCode::Continuation, &[0; 5]));
        let (_, e) = read_all(&mut r, &s, &[]);
        assert_eq!(e.unwrap().code, CloseCode::MessageTooBig);
        let mut r = reader(11);
        assert_eq!(read_all(&mut r, &s, &[]).1, None);
    }

    #[test]
    fn fragment_count_limit_includes_empty_fragments() {
        let mut r = MessageReader::new(
            Role::Server,
            ReadLimits {
                max_message: 100,
                max_fragments: 3,
            },
        );
        let mut s = frame(false, OpCode::Text, b"");
        s.extend(frame(false, OpCode::Continuation, b""));
        s.extend(frame(false, OpCode::Continuation, b""));
        s.extend(frame(true, OpCode::Continuation, b""));
        let (ev, e) = read_all(&mut r, &s, &[]);
        assert!(ev.is_empty());
        assert_eq!(
            e.unwrap(),
            ReadError {
                code: CloseCode::MessageTooBig,
                reason: "too many fragments"
            }
        );
    }

    #[test]
    fn close_frames() {
        let (ev, e) = run(&frame(true, OpCode::Close, b"\x03\xe8bye"), &[]);
        assert_eq!(
            (ev, e),
            (vec![OwnedEvent::Close(Some(1000), "bye".into())], None)
        );
        assert_eq!(
            run(&frame(true, OpCode::Close, b"\x03"), &[])
                .1
                .unwrap()
                .code,
            CloseCode::ProtocolError
        );
        assert_eq!(
            run(&frame(true, OpCode::Close, b"\x03\xe8\xff"), &[])
                .1
                .unwrap()
                .code,
            CloseCode::InvalidPayload
        );
        assert_eq!(
            run(&frame(true, OpCode::Close, b"\x03\xed"), &[])
                .1
                .unwrap()
                .code,
            CloseCode::ProtocolError
        );
    }

    #[test]
    fn unconsumed_input_stays_small() {
        // A big frame arriving in pieces: after each call only a header-sized rest is left.
        let s = frame(true, OpCode::Binary, &vec![9u8; 100_000]);
        let mut r = reader(1 << 20);
        let mut pending = Vec::new();
        let mut got = None;
        for chunk in s.chunks(1000) {
            pending.extend_from_slice(chunk);
            let mut pos = 0;
            loop {
                match r.next(&mut pending[pos..]).unwrap() {
                    (0, None) => break,
                    (n, ev) => {
                        if let Some(ev) = ev {
                            got = Some(OwnedEvent::from(ev));
                        }
                        pos += n;
                    }
                }
            }
            pending.drain(..pos);
            assert!(pending.len() <= 14, "kept {} bytes", pending.len());
        }
        assert_eq!(got, Some(OwnedEvent::Binary(vec![9u8; 100_000])));
    }
}
