//! A connection's outbound queue: encoded frames waiting for the socket to take them.
//!
//! Broadcast frames are shared (`Rc`) between every recipient's queue; a partial write leaves
//! an offset into the head chunk. Writing is corked ([`OutQueue::write_corked`]): small queued
//! frames are copied into one loop-wide buffer of up to [`CORK_BYTES`] and go out in one plain
//! `write`, so a burst of small messages costs one syscall and one contiguous kernel copy, not
//! one per message nor one iovec each; big frames go out in place with `writev`
//! ([`OutQueue::write_to`], up to [`MAX_IOVECS`] chunks).

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::rc::Rc;

use crate::service::SharedFrame;
use crate::ws::frame::{self, OpCode};

/// Bookkeeping charged per queued chunk on top of its bytes: the ring slot plus, for owned
/// chunks, the allocation's header.
pub const CHUNK_OVERHEAD: usize = 48;

/// Chunks gathered into one vectored write.
pub const MAX_IOVECS: usize = 64;

/// Ring slots a drained queue keeps for the next turn, at most ([`Chunk`] is 24 bytes, so
/// ≤ 3 KiB): a connection that gets frames every turn reuses its ring instead of freeing it
/// and growing a new one (4, 8, 16, ... slots, a `realloc` each) every turn, which was a third
/// of the user-space instructions per fan-out delivery. A bigger ring is released as soon as
/// it drains; any is released by [`OutQueue::release_idle`] (at the keepalive check), so idle
/// connections hold none.
pub const RING_KEEP: usize = 128;

/// Most bytes copied into the cork buffer for one `write`. The buffer is the loop's, lent to
/// each connection in turn during a flush, so its size costs nothing per connection.
pub const CORK_BYTES: usize = 64 * 1024;

/// Unshared frames up to this size are encoded straight onto the end of the queue's last chunk
/// when that is an unshared one with room ([`OutQueue::push_frame`]): a burst of small replies
/// (echoes, acks) is one allocation, one ring slot and one in-place write, where a chunk each
/// cost a `malloc`, a `free` and a copy into the cork per frame.
pub const APPEND_MAX: usize = 4096;

/// Capacity of a fresh chunk that later small frames may be appended to: room for a typical
/// burst without growing, small enough that one tiny frame held by an idle reader costs little.
const APPEND_FIRST: usize = 512;

/// Largest broadcast frame copied into the turn buffer ([`TurnFrames`]); bigger ones are
/// queued as shared frames (their bytes are not worth a copy, and they would crowd the buffer).
pub const TURN_FRAME_MAX: usize = 16 * 1024;

/// Most bytes the turn buffer takes in one turn; broadcasts past it are queued as shared
/// frames. Bounds the buffer's memory (kept from turn to turn) and the copy a turn's
/// unwritten ranges can cost at its end.
pub const TURN_BYTES: usize = 256 * 1024;

#[derive(Debug)]
pub enum Chunk {
    Shared(SharedFrame),
    Owned(Vec<u8>),
    /// `len` bytes at `start` in the loop's [`TurnFrames`]: one or more whole broadcast frames
    /// of the current turn. Never outlives the turn ([`OutQueue::retire_turn`]).
    Turn {
        start: u32,
        len: u32,
    },
}

impl Chunk {
    pub fn len(&self) -> usize {
        match self {
            Chunk::Shared(b) => b.len(),
            Chunk::Owned(v) => v.len(),
            Chunk::Turn { len, .. } => *len as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The chunk's bytes; a [`Chunk::Turn`] range is read from `turn`, this turn's buffer.
    pub fn bytes<'a>(&'a self, turn: &'a [u8]) -> &'a [u8] {
        match self {
            Chunk::Shared(b) => b,
            Chunk::Owned(v) => v,
            Chunk::Turn { start, len } => &turn[*start as usize..(*start + *len) as usize],
        }
    }
}

fn owned_len(c: &Chunk) -> usize {
    match c {
        Chunk::Owned(v) => v.len(),
        Chunk::Shared(_) | Chunk::Turn { .. } => 0,
    }
}

/// This turn's broadcast frames, back to back. A frame sent to many connections is copied in
/// once ([`TurnFrames::add`]) and each recipient's queue gets a [`Chunk::Turn`] range of it,
/// which the next broadcast to the same connection extends when it follows directly — the
/// usual case, since every member of a room gets the same frames in the same order. So a
/// delivery is a few integer updates on the recipient's queue (no reference count, no ring
/// slot, no pointer to compare at the write), and a recipient's turn of broadcasts goes out as
/// one slice of this buffer, copied nowhere. This is uWebSockets' TopicTree idea (a loop
/// iteration's publishes gathered and sent to each subscriber at once) kept per connection.
///
/// Ranges are only valid during the turn: at its end every queue that got one is visited
/// ([`TurnFrames::holders`]) and what it has not written becomes a shared frame, one per
/// distinct range ([`OutQueue::retire_turn`]), before the buffer is cleared.
#[derive(Debug, Default)]
pub struct TurnFrames {
    pub buf: Vec<u8>,
    /// Slab indices of connections that got a new `Turn` chunk this turn (a connection may be
    /// listed more than once; retiring is idempotent).
    pub holders: Vec<usize>,
}

impl TurnFrames {
    /// Copies `frame` in and returns its range, or `None` when it is too big or the turn's
    /// buffer is full (the caller queues the shared frame instead).
    pub fn add(&mut self, frame: &[u8]) -> Option<(u32, u32)> {
        if frame.len() > TURN_FRAME_MAX || self.buf.len() + frame.len() > TURN_BYTES {
            return None;
        }
        let start = self.buf.len() as u32;
        self.buf.extend_from_slice(frame);
        Some((start, frame.len() as u32))
    }
}

/// The loop's cork: one buffer that small frames are copied into for one plain `write`, lent
/// to each connection in turn ([`OutQueue::write_corked`]). A broadcast gives every recipient
/// the same frames in the same order, so the cork also remembers which shared frames its bytes
/// are: the next connection whose queue starts with the same frames writes the same bytes
/// without copying them again. It holds references to those frames, so their memory (and
/// thus their address, which is what is compared) cannot be reused while it does; the loop
/// calls [`Cork::release`] at the end of every turn.
#[derive(Debug, Default)]
pub struct Cork {
    buf: Vec<u8>,
    /// The frames `buf` holds, in order, whole; empty when it holds anything else.
    frames: Vec<SharedFrame>,
    /// Writes that reused the bytes already in the cork (for tests and metrics).
    pub reused: u64,
}

impl Cork {
    pub fn with_capacity(bytes: usize) -> Cork {
        Cork {
            buf: Vec::with_capacity(bytes),
            ..Cork::default()
        }
    }

    /// Forgets the bytes and drops the frame references (end of a loop turn).
    pub fn release(&mut self) {
        self.buf.clear();
        self.frames.clear();
    }
}

#[derive(Debug, Default)]
pub struct OutQueue {
    chunks: VecDeque<Chunk>,
    /// Bytes of the head chunk already written.
    head_offset: usize,
    /// Memory the queue holds on the connection's behalf: unwritten bytes plus a per-chunk
    /// overhead, so a flood of tiny frames is bounded like a few big ones. (The unwritten
    /// bytes themselves are this less the overhead: not stored, to keep idle connections
    /// small.)
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
        self.cost += chunk.len() + CHUNK_OVERHEAD;
        self.owned += owned_len(&chunk);
        self.chunks.push_back(chunk);
    }

    /// Queues an unshared, final frame of `payload`. A small one is encoded onto the end of the
    /// last chunk when that is unshared, not the pinned HTTP response, and has room under
    /// [`APPEND_MAX`]; otherwise it starts a chunk of its own. A chunk may thus hold several
    /// whole frames: [`OutQueue::at_frame_boundary`] and [`OutQueue::mid_frame`] look at chunk
    /// boundaries only, so inside such a chunk they answer conservatively (not at a boundary,
    /// mid-frame) until it is written out.
    pub fn push_frame(&mut self, opcode: OpCode, payload: &[u8]) {
        let len = frame::frame_len(payload.len());
        if len <= APPEND_MAX {
            let tail_open = self.chunks.len() > usize::from(self.pinned_head);
            if let (true, Some(Chunk::Owned(v))) = (tail_open, self.chunks.back_mut()) {
                if v.len() + len <= APPEND_MAX {
                    frame::encode(v, true, opcode, payload, None);
                    self.cost += len;
                    self.owned += len;
                    return;
                }
            }
            let mut v = Vec::with_capacity(len.max(APPEND_FIRST));
            frame::encode(&mut v, true, opcode, payload, None);
            self.push(Chunk::Owned(v));
            return;
        }
        self.push(Chunk::Owned(frame::encode_vec(opcode, payload)));
    }

    /// Queues `len` bytes at `start` of the turn buffer: extends the last chunk when it is the
    /// range just before (returns `false`), else adds a [`Chunk::Turn`] (returns `true`: the
    /// connection must be listed in [`TurnFrames::holders`]).
    #[inline]
    pub fn push_turn(&mut self, start: u32, len: u32) -> bool {
        if let Some(Chunk::Turn { start: s, len: l }) = self.chunks.back_mut() {
            if *s + *l == start {
                *l += len;
                self.cost += len as usize;
                return false;
            }
        }
        self.cost += len as usize + CHUNK_OVERHEAD;
        self.chunks.push_back(Chunk::Turn { start, len });
        true
    }

    /// The end of a turn: every [`Chunk::Turn`] still queued becomes a shared frame of its
    /// bytes. `copies` maps ranges already copied this turn to their frame, so a thousand
    /// slow members of a room still share one copy of what they have not read.
    pub fn retire_turn(&mut self, turn: &[u8], copies: &mut Vec<(u32, u32, SharedFrame)>) {
        for c in self.chunks.iter_mut() {
            let Chunk::Turn { start, len } = *c else {
                continue;
            };
            let frame = match copies.iter().find(|(s, l, _)| (*s, *l) == (start, len)) {
                Some((_, _, f)) => f.clone(),
                None => {
                    let f: SharedFrame = Rc::from(c.bytes(turn));
                    copies.push((start, len, f.clone()));
                    f
                }
            };
            *c = Chunk::Shared(frame);
        }
    }

    /// [`OutQueue::push`] of a broadcast frame, the fan-out's hot path (no owned bytes to
    /// count).
    #[inline]
    pub fn push_shared(&mut self, frame: SharedFrame) {
        let len = frame.len();
        self.cost += len + CHUNK_OVERHEAD;
        self.chunks.push_back(Chunk::Shared(frame));
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

    /// Frees a drained queue's ring (kept for reuse after a turn's writes, see [`RING_KEEP`]).
    pub fn release_idle(&mut self) {
        if self.chunks.is_empty() {
            self.chunks = VecDeque::new();
        }
    }

    /// Bytes of the ring's allocation (queue slots, whether in use or kept for reuse).
    pub fn ring_bytes(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<Chunk>()
    }

    /// Unwritten bytes.
    pub fn bytes(&self) -> usize {
        self.cost - self.chunks.len() * CHUNK_OVERHEAD
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
            self.cost -= c.len() + CHUNK_OVERHEAD;
            self.owned -= owned_len(&c);
        }
    }

    /// One vectored write of up to `max_chunks` (at most [`MAX_IOVECS`]) chunks from the head.
    /// Returns the bytes written.
    /// `turn` is this turn's [`TurnFrames`] buffer.
    pub fn write_to<W: Write>(
        &mut self,
        w: &mut W,
        max_chunks: usize,
        turn: &[u8],
    ) -> io::Result<usize> {
        if max_chunks == 1 || self.chunks.len() == 1 {
            // One chunk (a connection's turn of broadcasts is one range): a plain write, with
            // no iovec array to build here nor to import in the kernel.
            let Some(head) = self.chunks.front() else {
                return Ok(0);
            };
            let written = w.write(&head.bytes(turn)[self.head_offset..])?;
            self.advance(written);
            return Ok(written);
        }
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let mut n = 0;
        for (i, c) in self
            .chunks
            .iter()
            .take(max_chunks.min(MAX_IOVECS))
            .enumerate()
        {
            let bytes = c.bytes(turn);
            slices[n] = IoSlice::new(if i == 0 {
                &bytes[self.head_offset..]
            } else {
                bytes
            });
            n += 1;
        }
        let written = w.write_vectored(&slices[..n])?;
        self.advance(written);
        Ok(written)
    }

    /// One write from the head, corked: when the head and the chunk after it fit in
    /// [`CORK_BYTES`] together, the head and as many following chunks as fit (at most
    /// `max_chunks` in all; [`MAX_IOVECS`] does not limit a copy) go out with one plain
    /// `write` of the [`Cork`]; otherwise (a lone chunk, or big ones) this is
    /// [`OutQueue::write_to`], in place. If the queue starts with exactly the shared frames the
    /// cork already holds (the previous recipient of the same broadcasts), their bytes are
    /// written again without being copied. A partial write leaves the rest queued exactly as
    /// `write_to` does. Returns the bytes written.
    pub fn write_corked<W: Write>(
        &mut self,
        w: &mut W,
        max_chunks: usize,
        cork: &mut Cork,
        turn: &[u8],
    ) -> io::Result<usize> {
        let (Some(head), Some(next)) = (self.chunks.front(), self.chunks.get(1)) else {
            return self.write_to(w, max_chunks, turn);
        };
        if max_chunks < 2 || head.len() - self.head_offset + next.len() > CORK_BYTES {
            return self.write_to(w, max_chunks, turn);
        }
        if !self.starts_with_cork(cork, max_chunks) {
            self.fill_cork(cork, max_chunks, turn);
        } else {
            cork.reused += 1;
        }
        let written = w.write(&cork.buf)?;
        self.advance(written);
        Ok(written)
    }

    /// Whether the queue starts with the cork's frames, whole, and the cork is all that one
    /// corked write would take from it (nothing more would fit, or nothing more is queued).
    fn starts_with_cork(&self, cork: &Cork, max_chunks: usize) -> bool {
        let n = cork.frames.len();
        if n == 0 || self.head_offset != 0 || self.chunks.len() < n {
            return false;
        }
        let same = self
            .chunks
            .iter()
            .zip(&cork.frames)
            .all(|(c, f)| matches!(c, Chunk::Shared(s) if Rc::ptr_eq(s, f)));
        same && match self.chunks.get(n) {
            None => true,
            Some(more) => n >= max_chunks || cork.buf.len() + more.len() > CORK_BYTES,
        }
    }

    /// Copies chunks from the head into the cork while they fit (at least two: the caller
    /// checked). The cork remembers the frames only if all of them are shared and whole.
    fn fill_cork(&self, cork: &mut Cork, max_chunks: usize, turn: &[u8]) {
        cork.buf.clear();
        cork.frames.clear();
        let mut cacheable = self.head_offset == 0;
        for (i, c) in self.chunks.iter().take(max_chunks).enumerate() {
            let bytes = c.bytes(turn);
            let bytes = if i == 0 {
                &bytes[self.head_offset..]
            } else {
                bytes
            };
            if i > 0 && cork.buf.len() + bytes.len() > CORK_BYTES {
                break;
            }
            cork.buf.extend_from_slice(bytes);
            match c {
                Chunk::Shared(f) if cacheable => cork.frames.push(f.clone()),
                _ => cacheable = false,
            }
        }
        if !cacheable {
            cork.frames.clear();
        }
    }

    fn advance(&mut self, mut written: usize) {
        if written > 0 && written == self.bytes() {
            // Everything went (the common case after a turn's writes): one pass that only
            // drops the chunks, instead of retiring them one at a time. The ring is kept for
            // the next turn, unless this was the 101 response: a connection that just opened
            // may stay idle for long.
            let opened = self.pinned_head;
            self.chunks.clear();
            self.cost = 0;
            self.owned = 0;
            self.head_offset = 0;
            self.pinned_head = false;
            if opened || self.chunks.capacity() > RING_KEEP {
                self.chunks = VecDeque::new();
            }
            return;
        }
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
        if self.chunks.is_empty() && self.chunks.capacity() > RING_KEEP {
            // Release the ring after a big burst; a smaller one is kept for the next turn (see
            // RING_KEEP) until the connection goes quiet (release_idle).
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
            q.write_to(&mut w, MAX_IOVECS, &[]).unwrap();
        }
        assert_eq!(w.got, expected);
        assert_eq!(q.bytes(), 0);
        assert_eq!(q.cost(), 0);
        assert_eq!(q.owned_bytes(), 0);
        assert_eq!(Rc::strong_count(&shared), 1);
    }

    /// Small unshared frames share a chunk (one allocation, one write) unless a shared frame,
    /// the pinned response or the size bound comes between; every byte still goes out in order
    /// through partial writes, and the accounting returns to zero.
    #[test]
    fn small_owned_frames_share_a_chunk() {
        let shared: SharedFrame = Rc::from(&b"shared-frame"[..]);
        let big = vec![7u8; APPEND_MAX];
        for limit in [1, 3, 7, 100, 100_000] {
            let mut q = OutQueue::default();
            let mut expected = Vec::new();
            q.push_pinned(Chunk::Owned(b"HTTP/1.1 101\r\n\r\n".to_vec()));
            expected.extend_from_slice(b"HTTP/1.1 101\r\n\r\n");
            let payloads: Vec<Vec<u8>> =
                (0..40u8).map(|i| vec![b'a' + i % 26; i as usize]).collect();
            for (i, p) in payloads.iter().enumerate() {
                q.push_frame(OpCode::Text, p);
                frame::encode(&mut expected, true, OpCode::Text, p, None);
                if i == 10 {
                    q.push_shared(shared.clone());
                    expected.extend_from_slice(&shared);
                }
            }
            // The 101 alone; 11 frames; the shared one; 29 frames: four chunks.
            assert_eq!(q.chunks.len(), 4);
            q.push_frame(OpCode::Binary, &big);
            frame::encode(&mut expected, true, OpCode::Binary, &big, None);
            assert_eq!(
                q.chunks.len(),
                5,
                "a frame over APPEND_MAX gets a chunk of its own"
            );
            q.push_frame(OpCode::Text, b"after");
            frame::encode(&mut expected, true, OpCode::Text, b"after", None);
            assert_eq!(q.chunks.len(), 6, "nothing is appended to a full chunk");
            assert_eq!(q.bytes(), expected.len());
            assert_eq!(q.cost(), expected.len() + 6 * CHUNK_OVERHEAD);
            let mut cork = Cork::default();
            let mut w = Trickle {
                got: Vec::new(),
                limit,
            };
            while !q.is_empty() {
                q.write_corked(&mut w, usize::MAX, &mut cork, &[]).unwrap();
            }
            assert_eq!(w.got, expected, "limit {limit}");
            assert_eq!((q.bytes(), q.cost(), q.owned_bytes()), (0, 0, 0));
        }
    }

    /// Inside a chunk of several frames a partial write may stop between two of them; the
    /// queue cannot see that, so it reports mid-frame (a pong or close waits for the chunk).
    #[test]
    fn frame_boundaries_inside_a_shared_chunk_are_conservative() {
        let mut q = OutQueue::default();
        q.push_frame(OpCode::Text, b"one");
        q.push_frame(OpCode::Text, b"two");
        let mut w = Trickle {
            got: Vec::new(),
            limit: 5,
        };
        q.write_to(&mut w, MAX_IOVECS, &[]).unwrap();
        assert_eq!(w.got.len(), 5, "exactly the first frame");
        assert!(q.mid_frame());
        assert!(!q.at_frame_boundary());
        q.write_to(&mut w, MAX_IOVECS, &[]).unwrap();
        assert!(q.is_empty() && q.at_frame_boundary());
    }

    /// Broadcasts of one turn: consecutive ranges to a queue merge into one chunk (a new one
    /// only after something else was queued), and the bytes go out in queue order.
    #[test]
    fn turn_ranges_merge_and_keep_queue_order() {
        let mut turn = TurnFrames::default();
        let mut q = OutQueue::default();
        let mut expected = Vec::new();
        let frames: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 10 + i as usize]).collect();
        let mut new_chunks = 0;
        for (i, f) in frames.iter().enumerate() {
            let (start, len) = turn.add(f).unwrap();
            new_chunks += usize::from(q.push_turn(start, len));
            expected.extend_from_slice(f);
            if i == 2 {
                q.push_frame(OpCode::Text, b"ack");
                frame::encode(&mut expected, true, OpCode::Text, b"ack", None);
            }
        }
        assert_eq!(new_chunks, 2, "ranges 0-2, then the ack, then ranges 3-4");
        assert_eq!(q.chunks.len(), 3);
        assert_eq!(q.bytes(), expected.len());
        assert_eq!(q.cost(), expected.len() + 3 * CHUNK_OVERHEAD);
        assert_eq!(q.owned_bytes(), 5, "only the ack is the queue's own memory");
        let mut w = Trickle {
            got: Vec::new(),
            limit: 9,
        };
        let mut cork = Cork::default();
        while !q.is_empty() {
            q.write_corked(&mut w, usize::MAX, &mut cork, &turn.buf)
                .unwrap();
        }
        assert_eq!(w.got, expected);
        assert_eq!((q.bytes(), q.cost(), q.owned_bytes()), (0, 0, 0));
    }

    /// What a turn leaves unwritten survives the turn's buffer: ranges become shared frames,
    /// one copy per distinct range however many queues hold it, and a partly written head
    /// continues where it stopped.
    #[test]
    fn retired_ranges_outlive_the_turn_buffer_and_share_one_copy() {
        let mut turn = TurnFrames::default();
        let mut queues: Vec<OutQueue> = (0..3).map(|_| OutQueue::default()).collect();
        let mut expected = Vec::new();
        for i in 0..4u8 {
            let f = vec![b'a' + i; 20];
            let (start, len) = turn.add(&f).unwrap();
            for q in &mut queues {
                q.push_turn(start, len);
            }
            expected.extend_from_slice(&f);
        }
        // The first queue wrote 30 bytes before its socket filled.
        let mut first = Trickle {
            got: Vec::new(),
            limit: 30,
        };
        queues[0]
            .write_to(&mut first, MAX_IOVECS, &turn.buf)
            .unwrap();
        let mut copies = Vec::new();
        for q in &mut queues {
            q.retire_turn(&turn.buf, &mut copies);
        }
        assert_eq!(copies.len(), 1, "one range, one copy");
        assert_eq!(
            Rc::strong_count(&copies[0].2),
            4,
            "three queues and the map"
        );
        copies.clear();
        turn.buf.clear();
        turn.buf.extend_from_slice(&[0xee; 200]); // the next turn's frames
        for (i, q) in queues.iter_mut().enumerate() {
            let mut w = Trickle {
                got: if i == 0 {
                    first.got.clone()
                } else {
                    Vec::new()
                },
                limit: 7,
            };
            while !q.is_empty() {
                q.write_corked(&mut w, usize::MAX, &mut Cork::default(), &turn.buf)
                    .unwrap();
            }
            assert_eq!(w.got, expected, "queue {i}");
        }
    }

    #[test]
    fn the_turn_buffer_takes_small_frames_up_to_its_bound() {
        let mut turn = TurnFrames::default();
        assert!(
            turn.add(&vec![1; TURN_FRAME_MAX + 1]).is_none(),
            "too big to copy"
        );
        let f = vec![2; TURN_FRAME_MAX];
        let mut n = 0;
        while turn.add(&f).is_some() {
            n += 1;
        }
        assert_eq!(n, TURN_BYTES / TURN_FRAME_MAX);
        assert!(turn.buf.len() <= TURN_BYTES);
    }

    /// Counts the calls a write takes, plain and vectored.
    #[derive(Default)]
    struct Counting {
        got: Vec<u8>,
        limit: usize,
        writes: usize,
        vectored: usize,
    }

    impl Write for Counting {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.writes += 1;
            let n = buf.len().min(self.limit);
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.vectored += 1;
            let mut total = 0;
            for b in bufs {
                let n = b.len().min(self.limit - total);
                self.got.extend_from_slice(&b[..n]);
                total += n;
            }
            Ok(total)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn corked_partial_writes_preserve_order_bytes_and_accounting() {
        let shared: SharedFrame = Rc::from(&b"shared-frame"[..]);
        let big: SharedFrame = Rc::from(vec![9u8; CORK_BYTES + 3]);
        for limit in [1, 5, 7, 100, 4096, CORK_BYTES, 10 * CORK_BYTES] {
            let mut q = OutQueue::default();
            let mut expected = Vec::new();
            for i in 0..300u32 {
                let c = match i % 50 {
                    0 => Chunk::Shared(big.clone()),
                    n if n % 3 == 0 => Chunk::Shared(shared.clone()),
                    _ => Chunk::Owned(format!("msg{i};").into_bytes()),
                };
                expected.extend_from_slice(c.bytes(&[]));
                q.push(c);
            }
            let mut w = Counting {
                limit,
                ..Default::default()
            };
            let mut cork = Cork::default();
            let mut calls = 0;
            while !q.is_empty() {
                let before = q.bytes();
                let n = q.write_corked(&mut w, MAX_IOVECS, &mut cork, &[]).unwrap();
                assert_eq!(q.bytes(), before - n, "limit {limit}");
                calls += 1;
                assert!(calls < 1_000_000);
            }
            assert_eq!(w.got, expected, "limit {limit}");
            assert_eq!((q.bytes(), q.cost(), q.owned_bytes()), (0, 0, 0));
            assert_eq!(Rc::strong_count(&shared), 1);
            assert_eq!(Rc::strong_count(&big), 1);
        }
    }

    #[test]
    fn small_frames_go_out_in_one_plain_write_big_ones_in_place() {
        let mut q = OutQueue::default();
        let frame: SharedFrame = Rc::from(&[1u8; 170][..]);
        for _ in 0..200 {
            q.push(Chunk::Shared(frame.clone()));
        }
        let mut w = Counting {
            limit: usize::MAX / 2,
            ..Default::default()
        };
        let mut cork = Cork::default();
        // 200 × 170 bytes fit in the cork: one write, no writev (MAX_IOVECS is no limit here).
        assert_eq!(
            q.write_corked(&mut w, usize::MAX, &mut cork, &[]).unwrap(),
            34_000
        );
        assert!(q.is_empty());
        assert_eq!((w.writes, w.vectored), (1, 0));
        // A frame too big for the cork, and a lone frame, are written in place.
        q.push(Chunk::Owned(vec![2; CORK_BYTES]));
        q.push(Chunk::Shared(frame.clone()));
        q.write_corked(&mut w, MAX_IOVECS, &mut cork, &[]).unwrap();
        assert_eq!((w.writes, w.vectored), (1, 1));
        assert!(q.is_empty());
        q.push(Chunk::Shared(frame.clone()));
        q.write_corked(&mut w, MAX_IOVECS, &mut cork, &[]).unwrap();
        assert_eq!((w.writes, w.vectored), (2, 1), "one slice: a plain write");
        assert_eq!(w.got.len(), 34_000 + CORK_BYTES + 340);
    }

    #[test]
    fn corked_write_limited_to_one_chunk_writes_only_the_head() {
        // How a pending pong waits for the frame boundary: the half-written head goes alone.
        let mut q = OutQueue::default();
        q.push(Chunk::Owned(b"head".to_vec()));
        q.push(Chunk::Owned(b"next".to_vec()));
        let mut w = Counting {
            limit: 3,
            ..Default::default()
        };
        let mut cork = Cork::default();
        q.write_corked(&mut w, 1, &mut cork, &[]).unwrap();
        assert!(q.mid_frame());
        w.limit = 100;
        assert_eq!(q.write_corked(&mut w, 1, &mut cork, &[]).unwrap(), 1);
        assert!(q.at_frame_boundary());
        assert_eq!(w.got, b"head");
        // With the limit lifted, a partly written head is corked together with the rest.
        q.push(Chunk::Owned(b"more".to_vec()));
        w.limit = 2;
        q.write_corked(&mut w, MAX_IOVECS, &mut cork, &[]).unwrap();
        w.limit = 100;
        q.write_corked(&mut w, MAX_IOVECS, &mut cork, &[]).unwrap();
        assert_eq!(w.got, b"headnextmore");
        assert!(q.is_empty());
    }

    #[test]
    fn a_drained_ring_is_kept_up_to_ring_keep_and_released_when_idle() {
        let frame: SharedFrame = Rc::from(&b"f"[..]);
        let mut w = Counting {
            limit: usize::MAX / 2,
            ..Default::default()
        };
        let mut cork = Cork::default();
        let mut q = OutQueue::default();
        assert_eq!(q.ring_bytes(), 0);
        for _ in 0..30 {
            q.push(Chunk::Shared(frame.clone()));
        }
        q.write_corked(&mut w, usize::MAX, &mut cork, &[]).unwrap();
        assert!(q.is_empty());
        let kept = q.ring_bytes();
        assert!(kept > 0, "a small ring is kept for the next turn");
        for _ in 0..30 {
            q.push(Chunk::Shared(frame.clone()));
        }
        assert_eq!(q.ring_bytes(), kept, "and reused without growing");
        // Not released while frames wait.
        q.release_idle();
        assert_eq!(q.ring_bytes(), kept);
        q.write_corked(&mut w, usize::MAX, &mut cork, &[]).unwrap();
        q.release_idle();
        assert_eq!(q.ring_bytes(), 0);
        // A burst past RING_KEEP gives its ring back as soon as it drains.
        for _ in 0..RING_KEEP + 1 {
            q.push(Chunk::Shared(frame.clone()));
        }
        while !q.is_empty() {
            q.write_corked(&mut w, usize::MAX, &mut cork, &[]).unwrap();
        }
        assert_eq!(q.ring_bytes(), 0);
        cork.release();
        assert_eq!(Rc::strong_count(&frame), 1);
    }

    #[test]
    fn the_next_recipient_of_the_same_frames_reuses_the_cork() {
        let f1: SharedFrame = Rc::from(&b"one"[..]);
        let f2: SharedFrame = Rc::from(&b"two"[..]);
        let f3: SharedFrame = Rc::from(&b"three"[..]);
        let queue = |chunks: Vec<Chunk>| {
            let mut q = OutQueue::default();
            for c in chunks {
                q.push(c);
            }
            q
        };
        let shared = |f: &SharedFrame| Chunk::Shared(f.clone());
        let mut w = Counting {
            limit: usize::MAX / 2,
            ..Default::default()
        };
        let mut cork = Cork::default();
        let mut a = queue(vec![shared(&f1), shared(&f2)]);
        let mut b = queue(vec![shared(&f1), shared(&f2)]);
        a.write_corked(&mut w, usize::MAX, &mut cork, &[]).unwrap();
        assert_eq!(cork.reused, 0);
        // The cork holds its own references: the test's, b's and the cork's.
        assert_eq!(Rc::strong_count(&f1), 3);
        b.write_corked(&mut w, usize::MAX, &mut cork, &[]).unwrap();
        assert_eq!(cork.reused, 1);
        assert_eq!(w.got, b"onetwoonetwo");
        // Same frames with an owned one between them: copied afresh, not cached.
        let mut c = queue(vec![shared(&f1), Chunk::Owned(b"x".to_vec()), shared(&f2)]);
        c.write_corked(&mut w, usize::MAX, &mut cork, &[]).unwrap();
        assert_eq!(cork.reused, 1);
        assert_eq!(
            Rc::strong_count(&f1),
            1,
            "an uncacheable cork holds no frames"
        );
        // A queue that holds more than the cached frames, and the rest would fit: it takes
        // them all in one write instead of reusing a shorter cork.
        let mut d = queue(vec![shared(&f1), shared(&f2)]);
        let mut e = queue(vec![shared(&f1), shared(&f2), shared(&f3)]);
        d.write_corked(&mut w, usize::MAX, &mut cork, &[]).unwrap();
        let writes = w.writes;
        e.write_corked(&mut w, usize::MAX, &mut cork, &[]).unwrap();
        assert_eq!(cork.reused, 1);
        assert_eq!(w.writes, writes + 1);
        assert!(e.is_empty());
        // A partly written head is never matched against the cork.
        let mut f = queue(vec![shared(&f1), shared(&f2), shared(&f3)]);
        w.limit = 2;
        f.write_corked(&mut w, usize::MAX, &mut cork, &[]).unwrap();
        assert!(f.mid_frame());
        assert_eq!(cork.reused, 2, "f's whole queue matched the cork e left");
        w.limit = usize::MAX / 2;
        f.write_corked(&mut w, usize::MAX, &mut cork, &[]).unwrap();
        assert_eq!(cork.reused, 2);
        assert!(f.is_empty());
        assert_eq!(
            w.got,
            b"onetwoonetwoonextwoonetwoonetwothreeonetwothree".to_vec()
        );
        cork.release();
        assert_eq!(Rc::strong_count(&f1), 1);
        assert_eq!(Rc::strong_count(&f3), 1);
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
        q.write_to(&mut w, MAX_IOVECS, &[]).unwrap();
        assert!(q.at_frame_boundary());
        q.push_front(Chunk::Owned(b"pong".to_vec()));
        let mut opened = OutQueue::default();
        opened.push_pinned(Chunk::Owned(b"HTTP/1.1 101\r\n\r\n".to_vec()));
        opened.write_to(&mut Vec::new(), MAX_IOVECS, &[]).unwrap();
        assert!(opened.is_empty());
        assert_eq!(
            opened.ring_bytes(),
            0,
            "a connection that just opened keeps no ring"
        );
        while !q.is_empty() {
            q.write_to(&mut w, MAX_IOVECS, &[]).unwrap();
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
        q.write_to(&mut w, 1, &[]).unwrap();
        assert!(!q.at_frame_boundary());
        w.limit = 100;
        assert_eq!(q.write_to(&mut w, 1, &[]).unwrap(), 1);
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
        q.write_to(&mut w, MAX_IOVECS, &[]).unwrap();
        assert_eq!(q.owned_bytes(), 30);
        assert!(q.mid_frame());
        q.discard_unstarted();
        assert_eq!(q.owned_bytes(), 0);
        w.limit = 1000;
        q.write_to(&mut w, MAX_IOVECS, &[]).unwrap();
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
        q.write_to(&mut w, MAX_IOVECS, &[]).unwrap();
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
