//! XOR (un)masking of frame payloads (RFC 6455 §5.3).
//!
//! Every client frame is masked, so this runs over every received byte: it works a machine word
//! at a time, with a byte loop only for the tail. Safe code only:
//! `chunks_exact_mut` + `u64::from_ne_bytes` compiles to plain word loads/stores.

/// XORs `buf` with `mask`, as if `buf` started `offset` bytes into the payload (payloads are
/// unmasked in pieces as they arrive, so the key position carries over between calls).
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    // The key as a little-endian number, turned so that its lowest byte is the one for `buf[0]`;
    // the data is read little-endian too, so byte i of a word meets key byte i & 3 on any CPU.
    let key = u32::from_le_bytes(mask).rotate_right(8 * (offset & 3) as u32);
    let word = u64::from(key) | u64::from(key) << 32;
    // Words from the slice's start, aligned or not (x86 and aarch64 load unaligned words at
    // full speed): a byte loop up to the next aligned address cost more than it saved on the
    // short payloads that are most of a chat's traffic.
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v = u64::from_le_bytes(chunk.try_into().expect("chunk of 8")) ^ word;
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    // The tail starts a multiple of 8 (so of 4) bytes in: the key is where it was at the start.
    // Four of its bytes at once when there are, then at most three one by one.
    let mut tail = chunks.into_remainder();
    if tail.len() >= 4 {
        let (four, rest) = tail.split_at_mut(4);
        let v = u32::from_le_bytes(four.try_into().expect("4 bytes")) ^ key;
        four.copy_from_slice(&v.to_le_bytes());
        tail = rest;
    }
    for (b, k) in tail.iter_mut().zip(key.to_le_bytes()) {
        *b ^= k;
    }
}

/// The obvious byte-at-a-time version, kept as the reference the fast one is tested against.
pub fn apply_mask_naive(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[(offset + i) & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_at_every_alignment_offset_and_length() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let backing: Vec<u8> = (0..200u32).map(|i| (i * 7 + 3) as u8).collect();
        for start in 0..8 {
            for len in 0..(200 - start).min(80) {
                for offset in 0..4 {
                    let mut fast = backing.clone();
                    let mut slow = backing.clone();
                    apply_mask(&mut fast[start..start + len], mask, offset);
                    apply_mask_naive(&mut slow[start..start + len], mask, offset);
                    assert_eq!(fast, slow, "start {start} len {len} offset {offset}");
                }
            }
        }
    }

    #[test]
    fn masking_in_pieces_equals_masking_whole() {
        let mask = [1, 2, 3, 4];
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut whole = data.clone();
        apply_mask(&mut whole, mask, 0);
        for cut in [1, 3, 7, 8, 9, 500, 999] {
            let mut pieces = data.clone();
            let (a, b) = pieces.split_at_mut(cut);
            apply_mask(a, mask, 0);
            apply_mask(b, mask, cut);
            assert_eq!(pieces, whole, "cut at {cut}");
        }
    }

    #[test]
    fn rfc_example_hello() {
        // RFC 6455 §5.7: "Hello" masked with 37 fa 21 3d.
        let mut p = *b"Hello";
        apply_mask(&mut p, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(p, [0x7f, 0x9f, 0x4d, 0x51, 0x58]);
    }
}
