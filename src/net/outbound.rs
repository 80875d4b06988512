//! A connection's outbound queue: encoded frames waiting for the socket to take them.
//!
//! Broadcast frames are shared (`Rc`) between every recipient's queue; a partial write leaves
//! an offset into the head chunk. Writing gathers up to [`MAX_IOVECS`] chunks into one `writev`,
//! so a burst of small messages costs one syscall, not one per message.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::ops::Deref;

use crate::service::SharedFrame;

/// Bookkeeping charged per queued chunk on top of its bytes: the ring slot plus, for owned
/// chunks, the allocation's header.
pub const CHUNK_OVERHEAD: usize = 48;

/// Chunks gathered into one vectored write.
pub const MAX_IOVECS: usize = 64;

#[derive(Debug)]
pub enum Chunk {
    Shared(SharedFrame),
    Owned(Vec<u8>),
}

impl Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Chunk::Shared(b) => b,
            Chunk::Owned(v) => v,
        }
    }
}

fn owned_len(c: &Chunk) -> usize {
    match c {
        Chunk::Owned(v) => v.len(),
        Chunk::Shared(_) => 0,
    }
}

#[derive(Debug, Default)]
pub struct OutQueue {
    chunks: VecDeque<Chunk>,
    /// Bytes of the head chunk already written.
    head_offset: usize,
    /// Bytes not yet written, over all chunks.
    bytes: usize,
    /// Memory the queue holds on the connection's behalf: unwritten bytes plus a per-chunk
    /// overhead, so a flood of tiny frames is bounded like a few big ones.
    cost: usize,
    /// The head chunk is an HTTP response (the 101) that nothing may overtake.
    pinned_head: bool,
    /// Bytes of the [`Chunk::Owned`] chunks queued (whole chunks: a partly written one is
    /// still allocated). Shared broadcast frames are not counted: their bytes belong to every
    /// recipient at once. This is what the loop's `--memory-budget` charges the connection.
    owned: usize,
}

impl OutQueue {
    pub fn push(&mut self, chunk: Chunk) {
        self.bytes += chunk.len();
        self.cost += chunk.len() + CHUNK_OVERHEAD;
        self.owned += owned_len(&chunk);
        self.chunks.push_back(chunk);
    }

    /// Queues the HTTP response that must precede every frame (the 101 of an upgrade).
    pub fn push_pinned(&mut self, chunk: Chunk) {
        debug_assert!(self.chunks.is_empty());
        self.pinned_head = true;
        self.push(chunk);
    }

    /// Puts a chunk first. Only valid at a frame boundary (nothing partially written), which is
    /// how a pong overtakes queued data without splitting a frame.
    pub fn push_front(&mut self, chunk: Chunk) {
        debug_assert!(self.at_frame_boundary());
        self.bytes += chunk.len();
        self.cost += chunk.len() + CHUNK_OVERHEAD;
        self.owned += owned_len(&chunk);
        self.chunks.push_front(chunk);
    }

    /// Whether a frame may be put in front of the queue: nothing is half-written and the head
    /// is not a pinned HTTP response.
    pub fn at_frame_boundary(&self) -> bool {
        self.head_offset == 0 && !self.pinned_head
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Unwritten bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Unwritten bytes plus per-chunk overhead (what the queue limit is checked against).
    pub fn cost(&self) -> usize {
        self.cost
    }

    /// Bytes held in unshared ([`Chunk::Owned`]) chunks, written or not.
    pub fn owned_bytes(&self) -> usize {
        self.owned
    }

    /// A data frame is partly written: nothing can be sent on this connection until it is
    /// finished (a close frame cannot interrupt it).
    pub fn mid_frame(&self) -> bool {
        self.head_offset > 0 && !self.pinned_head
    }

    /// Drops everything not yet started, keeping a partially written head so the stream stays
    /// well-framed (used before queueing a close to a client that stopped reading).
    pub fn discard_unstarted(&mut self) {
        let keep = usize::from(self.head_offset > 0 || self.pinned_head);
        while self.chunks.len() > keep {
            let c = self.chunks.pop_back().expect("non-empty");
            self.bytes -= c.len();
            self.cost -= c.len() + CHUNK_OVERHEAD;
            self.owned -= owned_len(&c);
        }
    }

    /// One vectored write of up to `max_chunks` (at most [`MAX_IOVECS`]) chunks from the head.
    /// Returns the bytes written.
    pub fn write_to<W: Write>(&mut self, w: &mut W, max_chunks: usize) -> io::Result<usize> {
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let mut n = 0;
        for (i, c) in self
            .chunks
            .iter()
            .take(max_chunks.min(MAX_IOVECS))
            .enumerate()
        {
            let bytes: &[u8] = if i == 0 { &c[self.head_offset..] } else { c };
            slices[n] = IoSlice::new(bytes);
            n += 1;
        }
        let written = w.write_vectored(&slices[..n])?;
        self.advance(written);
        Ok(written)
    }

    fn advance(&mut self, mut written: usize) {
        self.bytes -= written;
        self.cost -= written;
        while written > 0 {
            let head_left = self.chunks[0].len() - self.head_offset;
            if written >= head_left {
                written -= head_left;
                if let Some(c) = self.chunks.pop_front() {
                    self.owned -= owned_len(&c);
                }
                self.cost -= CHUNK_OVERHEAD;
                self.head_offset = 0;
                self.pinned_head = false;
            } else {
                self.head_offset += written;
                written = 0;
            }
        }
        if self.chunks.is_empty() && self.chunks.capacity() > 16 {
            // Release the ring after a burst: idle connections should cost next to nothing.
            self.chunks = VecDeque::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    /// A writer that takes at most `limit` bytes per call, like a full socket buffer.
    struct Trickle {
        got: Vec<u8>,
        limit: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.limit);
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let mut total = 0;
            for b in bufs {
                let n = b.len().min(self.limit - total);
                self.got.extend_from_slice(&b[..n]);
                total += n;
                if total == self.limit {
                    break;
                }
            }
            Ok(total)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_preserve_order_and_bytes() {
        let shared: SharedFrame = Rc::from(&b"shared-frame"[..]);
        let mut q = OutQueue::default();
        let mut expected = Vec::new();
        for i in 0..200u32 {
            if i % 3 == 0 {
                q.push(Chunk::Shared(shared.clone()));
                expected.extend_from_slice(&shared);
            } else {
                let v = format!("msg{i};").into_bytes();
                expected.extend_from_slice(&v);
                q.push(Chunk::Owned(v));
            }
        }
        assert_eq!(q.bytes(), expected.len());
        let mut w = Trickle {
            got: Vec::new(),
            limit: 7,
        };
        while !q.is_empty() {
            q.write_to(&mut w, MAX_IOVECS).unwrap();
        }
        assert_eq!(w.got, expected);
        assert_eq!(q.bytes(), 0);
        assert_eq!(q.cost(), 0);
        assert_eq!(q.owned_bytes(), 0);
        assert_eq!(Rc::strong_count(&shared), 1);
    }

    #[test]
    fn pinned_response_stays_first_until_written() {
        let mut q = OutQueue::default();
        q.push_pinned(Chunk::Owned(b"HTTP/1.1 101\r\n\r\n".to_vec()));
        q.push(Chunk::Owned(b"frame".to_vec()));
        assert!(!q.at_frame_boundary());
        let mut w = Trickle {
            got: Vec::new(),
            limit: 16,
        };
        q.write_to(&mut w, MAX_IOVECS).unwrap();
        assert!(q.at_frame_boundary());
        q.push_front(Chunk::Owned(b"pong".to_vec()));
        while !q.is_empty() {
            q.write_to(&mut w, MAX_IOVECS).unwrap();
        }
        assert_eq!(w.got, b"HTTP/1.1 101\r\n\r\npongframe");
    }

    #[test]
    fn a_write_limited_to_one_chunk_stops_at_the_frame_boundary() {
        let mut q = OutQueue::default();
        q.push(Chunk::Owned(b"head".to_vec()));
        q.push(Chunk::Owned(b"next".to_vec()));
        let mut w = Trickle {
            got: Vec::new(),
            limit: 3,
        };
        q.write_to(&mut w, 1).unwrap();
        assert!(!q.at_frame_boundary());
        w.limit = 100;
        assert_eq!(q.write_to(&mut w, 1).unwrap(), 1);
        assert!(q.at_frame_boundary());
        assert_eq!(w.got, b"head");
        assert_eq!(q.bytes(), 4);
    }

    #[test]
    fn owned_bytes_count_unshared_chunks_until_popped() {
        let shared: SharedFrame = Rc::from(&[7u8; 100][..]);
        let mut q = OutQueue::default();
        q.push(Chunk::Shared(shared.clone()));
        assert_eq!(q.owned_bytes(), 0);
        q.push(Chunk::Owned(vec![1; 10]));
        q.push(Chunk::Owned(vec![2; 20]));
        q.push_front(Chunk::Owned(vec![3; 5]));
        assert_eq!(q.owned_bytes(), 35);
        let mut w = Trickle {
            got: Vec::new(),
            limit: 7,
        };
        // The 5-byte chunk goes, the shared one is started: still 30 owned.
        q.write_to(&mut w, MAX_IOVECS).unwrap();
        assert_eq!(q.owned_bytes(), 30);
        assert!(q.mid_frame());
        q.discard_unstarted();
        assert_eq!(q.owned_bytes(), 0);
        w.limit = 1000;
        q.write_to(&mut w, MAX_IOVECS).unwrap();
        assert!(q.is_empty());
        assert!(!q.mid_frame());
    }

    #[test]
    fn discard_keeps_partially_written_head() {
        let mut q = OutQueue::default();
        q.push(Chunk::Owned(vec![1; 10]));
        q.push(Chunk::Owned(vec![2; 10]));
        let mut w = Trickle {
            got: Vec::new(),
            limit: 4,
        };
        q.write_to(&mut w, MAX_IOVECS).unwrap();
        q.discard_unstarted();
        assert_eq!(q.bytes(), 6);
        assert!(!q.at_frame_boundary());
        let mut q2 = OutQueue::default();
        q2.push(Chunk::Owned(vec![1; 10]));
        q2.discard_unstarted();
        assert!(q2.is_empty());
        assert_eq!(q2.bytes(), 0);
    }
}
