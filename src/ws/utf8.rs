//! Incremental UTF-8 validation for text messages that arrive in pieces.
//!
//! RFC 6455 §8.1 lets an endpoint fail a connection as soon as it sees invalid UTF-8, and
//! Autobahn (6.4.x) checks that we do so mid-frame instead of after buffering the whole message.
//! The validator keeps at most three bytes of an unfinished code point between calls and relies
//! on `std::str::from_utf8`, whose `error_len()` tells apart "invalid" from "cut short".

/// The input is not UTF-8 (or cannot become UTF-8 whatever follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Utf8Error;

#[derive(Debug, Default, Clone)]
pub struct Utf8Validator {
    pending: [u8; 4],
    pending_len: usize,
}

impl Utf8Validator {
    pub fn new() -> Utf8Validator {
        Utf8Validator::default()
    }

    /// Validates the next piece. Fails on the first byte sequence that no continuation can
    /// make valid; an unfinished code point at the end is remembered for the next call.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<(), Utf8Error> {
        if self.pending_len > 0 {
            // Complete the pending code point one byte at a time (at most 3 more bytes).
            while self.pending_len > 0 {
                let Some((&b, rest)) = input.split_first() else {
                    return Ok(());
                };
                self.pending[self.pending_len] = b;
                self.pending_len += 1;
                input = rest;
                match std::str::from_utf8(&self.pending[..self.pending_len]) {
                    Ok(_) => self.pending_len = 0,
                    Err(e) if e.error_len().is_some() => return Err(Utf8Error),
                    Err(_) => {}
                }
            }
        }
        match std::str::from_utf8(input) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => Err(Utf8Error),
            Err(e) => {
                let tail = &input[e.valid_up_to()..];
                self.pending[..tail.len()].copy_from_slice(tail);
                self.pending_len = tail.len();
                Ok(())
            }
        }
    }

    /// The message ended: an unfinished code point is an error. Resets for the next message.
    pub fn finish(&mut self) -> Result<(), Utf8Error> {
        let complete = self.pending_len == 0;
        self.pending_len = 0;
        if complete {
            Ok(())
        } else {
            Err(Utf8Error)
        }
    }

    pub fn reset(&mut self) {
        self.pending_len = 0;
    }
}

/// `bytes` as text if they are UTF-8. Chat and benchmark text is mostly ASCII, which a few word
/// loads prove; `std::str::from_utf8` (several times the instructions on a short message, most
/// of it set-up) validates the rest.
#[inline]
pub fn text(bytes: &[u8]) -> Result<&str, Utf8Error> {
    if is_ascii(bytes) {
        // SAFETY: every byte is below 0x80 (checked just above), and a sequence of ASCII bytes
        // is valid UTF-8. `ascii_fast_path_agrees_with_std` tests the check at every length
        // and position of a high byte.
        Ok(unsafe { std::str::from_utf8_unchecked(bytes) })
    } else {
        std::str::from_utf8(bytes).map_err(|_| Utf8Error)
    }
}

/// Whether every byte is below 0x80, a word at a time: whole words from the front, then one
/// last word that overlaps them so no byte loop is needed (a short slice uses 4-byte halves).
#[inline]
fn is_ascii(bytes: &[u8]) -> bool {
    const HIGH64: u64 = 0x8080_8080_8080_8080;
    const HIGH32: u32 = 0x8080_8080;
    let n = bytes.len();
    if n >= 8 {
        let mut acc = 0u64;
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            acc |= u64::from_ne_bytes(w.try_into().expect("8 bytes"));
        }
        if !words.remainder().is_empty() {
            acc |= u64::from_ne_bytes(bytes[n - 8..].try_into().expect("8 bytes"));
        }
        acc & HIGH64 == 0
    } else if n >= 4 {
        let first = u32::from_ne_bytes(bytes[..4].try_into().expect("4 bytes"));
        let last = u32::from_ne_bytes(bytes[n - 4..].try_into().expect("4 bytes"));
        (first | last) & HIGH32 == 0
    } else {
        bytes.iter().all(|&b| b < 0x80)
    }
}

/// Validates `input` fed in pieces cut at `cuts`, then finished; the result must equal
/// `std::str::from_utf8(input).is_ok()` (used by unit tests and the differential fuzz target).
pub fn validate_in_pieces(input: &[u8], cuts: &[usize]) -> bool {
    let mut v = Utf8Validator::new();
    let mut start = 0;
    for &c in cuts {
        let c = c.min(input.len()).max(start);
        if v.feed(&input[start..c]).is_err() {
            return false;
        }
        start = c;
    }
    v.feed(&input[start..]).is_ok() && v.finish().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CASES: &[&[u8]] = &[
        b"",
        b"hello",
        "κόσμε".as_bytes(),
        "𝄞 music".as_bytes(),
        b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80\x65\x64\x69\x74\x65\x64",
        b"\xed\xa0\x80",     // surrogate
        b"\xc0\xaf",         // overlong
        b"\xf4\x90\x80\x80", // above U+10FFFF
        b"\xf0\x9f\x98",     // truncated 4-byte
        b"\x80",
        b"\xfe",
        b"ok\xe2\x82\xac",
        b"\xef\xbf\xbf",
    ];

    #[test]
    fn agrees_with_std_at_every_single_and_double_cut() {
        for input in CASES {
            let expected = std::str::from_utf8(input).is_ok();
            for i in 0..=input.len() {
                assert_eq!(
                    validate_in_pieces(input, &[i]),
                    expected,
                    "{input:?} cut {i}"
                );
                for j in i..=input.len() {
                    assert_eq!(validate_in_pieces(input, &[i, j]), expected);
                }
            }
            // byte at a time
            let cuts: Vec<usize> = (0..input.len()).collect();
            assert_eq!(validate_in_pieces(input, &cuts), expected);
        }
    }

    #[test]
    fn ascii_fast_path_agrees_with_std() {
        // Every length up to 40, with no high byte and with one at each position, plus the
        // multi-byte cases: `text` must accept and reject exactly what std does.
        for len in 0..40 {
            let plain: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            assert_eq!(text(&plain).ok(), std::str::from_utf8(&plain).ok());
            assert!(is_ascii(&plain));
            for at in 0..len {
                for high in [0x80u8, 0xc3, 0xff] {
                    let mut v = plain.clone();
                    v[at] = high;
                    assert!(!is_ascii(&v), "len {len} high byte at {at}");
                    assert_eq!(text(&v).ok(), std::str::from_utf8(&v).ok());
                }
            }
        }
        for input in CASES {
            assert_eq!(text(input).ok(), std::str::from_utf8(input).ok());
        }
    }

    #[test]
    fn fails_fast_on_impossible_prefix() {
        let mut v = Utf8Validator::new();
        // 0xF4 0x90 can never start a valid code point: reject before the sequence completes.
        assert!(v.feed(b"abc\xf4").is_ok());
        assert_eq!(v.feed(b"\x90"), Err(Utf8Error));
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(b"\xed\xa0"), Err(Utf8Error));
    }

    #[test]
    fn unfinished_code_point_fails_at_finish() {
        let mut v = Utf8Validator::new();
        assert!(v.feed(b"\xe2\x82").is_ok());
        assert_eq!(v.finish(), Err(Utf8Error));
        assert!(v.feed(b"fine").is_ok());
        assert!(v.finish().is_ok());
    }
}
