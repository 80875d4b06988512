//! A connection's outbound queue: encoded frames waiting for the socket to take them.
//!
//! Broadcast frames are shared (`Rc`) between every recipient's queue; a partial write leaves
//! an offset into the head chunk. Writing gathers up to [`MAX_IOVECS`] chunks into one `writev`,
//! so a burst of small messages costs one syscall, not one per message.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::ops::Deref;

use crate::service::SharedFrame;

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

#[derive(Debug, Default)]
pub struct OutQueue {
    chunks: VecDeque<Chunk>,
    /// Bytes of the head chunk already written.
    head_offset: usize,
    /// Bytes not yet written, over all chunks.
    bytes: usize,
}

impl OutQueue {
    pub fn push(&mut self, chunk: Chunk) {
        self.bytes += chunk.len();
        self.chunks.push_back(chunk);
    }

    /// Puts a chunk first. Only valid at a frame boundary (nothing partially written), which is
    /// how a pong overtakes queued data without splitting a frame.
    pub fn push_front(&mut self, chunk: Chunk) {
        debug_assert!(self.at_frame_boundary());
        self.bytes += chunk.len();
        self.chunks.push_front(chunk);
    }

    pub fn at_frame_boundary(&self) -> bool {
        self.head_offset == 0
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Unwritten bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Drops everything not yet started, keeping a partially written head so the stream stays
    /// well-framed (used before queueing a close to a client that stopped reading).
    pub fn discard_unstarted(&mut self) {
        let keep = usize::from(self.head_offset > 0);
        while self.chunks.len() > keep {
            let c = self.chunks.pop_back().expect("non-empty");
            self.bytes -= c.len();
        }
    }

    /// One vectored write of the queue's head. Returns the bytes written.
    pub fn write_to<W: Write>(&mut self, w: &mut W) -> io::Result<usize> {
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let mut n = 0;
        for (i, c) in self.chunks.iter().take(MAX_IOVECS).enumerate() {
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
        while written > 0 {
            let head_left = self.chunks[0].len() - self.head_offset;
            if written >= head_left {
                written -= head_left;
                self.chunks.pop_front();
                self.head_offset = 0;
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
            q.write_to(&mut w).unwrap();
        }
        assert_eq!(w.got, expected);
        assert_eq!(q.bytes(), 0);
        assert_eq!(Rc::strong_count(&shared), 1);
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
        q.write_to(&mut w).unwrap();
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
