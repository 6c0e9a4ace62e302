//! The io_uring engine of the exports: plain file reads and writes
//! started in batches (one doorbell for the disk instead of one per
//! request), each operation answered through its own callback when its
//! last piece completes; busy polling; ring builders. It knows nothing of
//! FUSE or NBD: an operation is pieces of file I/O, a buffer, and a
//! callback. FUSE workers hand theirs to a shared [`Ring`] with its own
//! thread and go back for the next request; an NBD connection's reader
//! owns a [`RingCore`] and reaps it while it waits for its client.
//!
//! Which requests come here is the caller's choice: the exports send
//! plain reads and in-place writes; allocation, copy-up, discard and
//! flush stay synchronous in their workers.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use io_uring::{opcode, types, IoUring};
use ploop_io::{AlignedBuf, Segment};
use rustix::event::{eventfd, EventfdFlags};
use tracing::error;

pub mod busy_poll;

use busy_poll::BusyPoll;

/// Requests the ring may take as they are: at offsets and of lengths
/// that are multiples of this (the smallest logical block). The plan of
/// each request then checks the blocks of the files it lands in
/// (`BlockIo::direct_align`); the others go through the image layer.
pub const QUEUE_ALIGN: u64 = 512;

/// The entry that reads (or writes) segment `s` of the request buffer at
/// `base`. Making it is safe; pushing it is not: the buffer range and the
/// file must outlive the operation.
pub fn segment_entry(base: *mut u8, s: &Segment, read: bool) -> io_uring::squeue::Entry {
    let ptr = base.wrapping_add(s.buf_offset);
    if read {
        opcode::Read::new(types::Fd(s.fd), ptr, s.len as u32)
            .offset(s.file_offset)
            .build()
    } else {
        opcode::Write::new(types::Fd(s.fd), ptr, s.len as u32)
            .offset(s.file_offset)
            .build()
    }
}

/// Whether every segment lies inside a buffer of `buf_len` bytes, is one
/// entry long (at most 4 GiB - 1) and has a piece number (16 bits of the
/// entry's user data): what pushing their entries relies on.
pub fn segments_fit(segments: &[Segment], buf_len: usize) -> bool {
    segments.len() <= 1 << 16
        && segments.iter().all(|s| {
            s.len <= u32::MAX as usize
                && s.buf_offset
                    .checked_add(s.len)
                    .is_some_and(|end| end <= buf_len)
        })
}

/// What the completion `res` of segment `s` means for its request: `None`
/// when the piece is done, or the errno that fails the request. A short
/// read (past the end of a file) reads the rest as zeros; a short write is
/// an I/O error.
///
/// # Safety
/// `base + s.buf_offset .. + s.len` lies in the request's buffer, this
/// piece has completed and nothing else touches its range (other pieces
/// may still be in flight, so no slice over the whole buffer is made).
pub unsafe fn segment_done(base: *mut u8, s: &Segment, read: bool, res: i32) -> Option<i32> {
    if res < 0 {
        return Some(-res);
    }
    let done = res as usize;
    if done >= s.len {
        return None;
    }
    if !read {
        return Some(libc::EIO);
    }
    let tail = base.wrapping_add(s.buf_offset + done);
    // SAFETY: `tail .. tail + len - done` is this piece's unread rest,
    // inside the buffer (the caller's promise) and touched by no one else.
    unsafe { std::ptr::write_bytes(tail, 0, s.len - done) };
    None
}

/// What an operation calls once its last piece completes, on the thread
/// that reaps the ring, with its buffer and the errno of a failed piece
/// (None: all went well). It must not block. Whatever must live until the
/// I/O is over (the files the pieces name, their mappings' pins) is
/// captured by it.
pub type Done = Box<dyn FnOnce(AlignedBuf, Option<i32>) + Send>;

/// One request turned into file I/O.
pub struct Op {
    /// Pieces of file I/O, each into or out of a part of `buf`.
    pub segments: Vec<Segment>,
    /// Read target or write source; aligned for O_DIRECT.
    pub buf: AlignedBuf,
    /// Reads (a short read ends in zeros) or writes.
    pub read: bool,
    pub done: Done,
}

struct Pending {
    op: Op,
    /// The start of `op.buf`, taken before its pieces were queued: a short
    /// read zeroes the rest of its piece through it, never through a
    /// slice over the whole buffer, which other pieces may still be
    /// reading into.
    base: BufBase,
    remaining: usize,
    failed: Option<i32>,
}

struct BufBase(*mut u8);

// SAFETY: the pointer names the buffer owned by the same `Pending`, and is
// only used by the thread that owns the ring (a `RingCore` moves to its
// thread before any operation is started).
unsafe impl Send for BufBase {}

/// Hand `value` to `run` and never free it, however `run` ends, unwinding
/// included: what the kernel may still write into (armed reads, FUSE
/// commands' buffers) must outlive any stack frame or owner.
pub fn keep_forever<T: 'static, R>(value: T, run: impl FnOnce(&'static mut T) -> R) -> R {
    run(Box::leak(Box::new(value)))
}

/// Operations on one io_uring: started as room allows, answered as their
/// last piece completes. Used by one thread at a time; `user_data` with
/// the top bit set is left to the owner (wake-ups, socket polls).
pub struct RingCore {
    ring: IoUring,
    slots: Vec<Option<Pending>>,
    free: Vec<usize>,
    waiting: VecDeque<Op>,
    pieces: usize,
    poll: BusyPoll,
}

/// Completions of the owner's own entries: (user_data, result).
pub type Foreign = Vec<(u64, i32)>;

/// The bit that marks the owner's own entries.
pub const FOREIGN: u64 = 1 << 63;

const ENTRIES: u32 = 256;
/// Pieces in flight at most, so that neither the submission queue (with
/// the owner's entries) nor the completion queue can overflow; operations
/// past it wait their turn.
const MAX_PIECES: usize = ENTRIES as usize - 2;
const COMPLETIONS: u32 = 16384;

impl RingCore {
    pub fn new() -> io::Result<RingCore> {
        // One request may be cut in more pieces than MAX_PIECES (32 MiB in
        // 4 KiB clusters laid out apart): room for all their completions.
        // See busy_poll::build_ring for how completions reach a thread.
        let ring = busy_poll::build_ring(IoUring::builder().setup_cqsize(COMPLETIONS), ENTRIES)?;
        Ok(RingCore {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            waiting: VecDeque::new(),
            pieces: 0,
            poll: BusyPoll::default(),
        })
    }

    /// Operations started or waiting to start.
    pub fn busy(&self) -> bool {
        self.pieces > 0 || !self.waiting.is_empty()
    }

    /// Take an operation; it starts as soon as there is room.
    pub fn push(&mut self, op: Op) {
        self.poll.note_request(op.buf.len());
        if !segments_fit(&op.segments, op.buf.len()) {
            // A planner's bug, not input: refused, never handed to the
            // kernel to read or write past the buffer.
            error!("an operation's pieces do not fit its buffer: refused");
            finish(op, Some(libc::EINVAL));
        } else if op.segments.is_empty() {
            // Nothing to do on disk (all zeros): answer at once.
            finish(op, None);
        } else {
            self.waiting.push_back(op);
        }
    }

    /// Queue one of the owner's entries (its user_data has [`FOREIGN`]).
    ///
    /// # Safety
    /// What the entry points at must stay valid until it completes.
    pub unsafe fn push_foreign(&mut self, sqe: &io_uring::squeue::Entry) {
        debug_assert!(sqe.get_user_data() & FOREIGN != 0);
        // SAFETY: the caller keeps the entry's memory valid.
        unsafe { push_entry(&mut self.ring, sqe) }
    }

    /// Start what fits and hand it to the kernel now.
    pub fn submit(&mut self) {
        self.start_waiting();
        if !self.ring.submission().is_empty() {
            if let Err(e) = self.ring.submit() {
                error!("io_uring submit: {e}");
            }
        }
    }

    /// Submit what is queued, wait for a completion (up to `timeout`) and
    /// answer the operations that are done. Returns the owner's entries
    /// that completed.
    pub fn wait(&mut self, timeout: Option<std::time::Duration>) -> Foreign {
        self.start_waiting();
        let waited = self
            .poll
            .wait(&mut self.ring, timeout, |ring| match timeout {
                None => ring.submit_and_wait(1),
                Some(t) => {
                    let ts = types::Timespec::from(t);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    ring.submitter().submit_with_args(1, &args)
                }
            });
        if let Err(e) = waited {
            if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::ETIME)) {
                error!("io_uring wait: {e}");
            }
        }
        self.reap_ready()
    }

    /// Answer the operations whose completions are there already, without
    /// entering the kernel (a system call on this thread has just posted
    /// them, say); returns the owner's entries among them.
    pub fn reap_ready(&mut self) -> Foreign {
        let mut foreign = Vec::new();
        if self.ring.completion().is_empty() {
            return foreign;
        }
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let outer = AFTER_BATCH.with(|a| a.replace(Some(Vec::new())));
        for (data, res) in done {
            if data & FOREIGN != 0 {
                foreign.push((data, res));
            } else {
                self.completed(data, res);
            }
        }
        run_after_batch();
        AFTER_BATCH.with(|a| *a.borrow_mut() = outer);
        // Room freed: start what waited for it.
        self.submit();
        foreign
    }

    /// Whether the kernel can wait for completions with a timeout (5.11+).
    pub fn waits_with_timeout(&self) -> bool {
        self.ring.params().is_feature_ext_arg()
    }

    fn completed(&mut self, data: u64, res: i32) {
        self.pieces -= 1;
        let slot = (data >> 16) as usize;
        let piece = (data & 0xffff) as usize;
        let Some(p) = self.slots.get_mut(slot).and_then(|s| s.as_mut()) else {
            return;
        };
        let s = p.op.segments[piece];
        // SAFETY: the piece has completed; its range lies in the op's
        // buffer, which the slot owns until every piece has.
        if let Some(e) = unsafe { segment_done(p.base.0, &s, p.op.read, res) } {
            p.failed = Some(e);
        }
        p.remaining -= 1;
        if p.remaining == 0 {
            let p = self.slots[slot].take().expect("slot in use");
            self.free.push(slot);
            finish(p.op, p.failed);
        }
    }

    /// Start what fits; an operation larger than the limit goes alone.
    fn start_waiting(&mut self) {
        while let Some(n) = self.waiting.front().map(|op| op.segments.len()) {
            if self.pieces > 0 && self.pieces + n > MAX_PIECES {
                break;
            }
            let op = self.waiting.pop_front().expect("a waiting op");
            self.pieces += n;
            self.start_op(op);
        }
    }

    fn start_op(&mut self, op: Op) {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let n = op.segments.len();
        self.slots[slot] = Some(Pending {
            op,
            base: BufBase(std::ptr::null_mut()),
            remaining: n,
            failed: None,
        });
        let p = self.slots[slot].as_mut().expect("just set");
        let is_read = p.op.read;
        // Taken once, before any piece is in flight.
        let base = p.op.buf.as_mut_slice().as_mut_ptr();
        p.base = BufBase(base);
        for (i, s) in p.op.segments.iter().enumerate() {
            let user_data = ((slot as u64) << 16) | i as u64;
            let sqe = segment_entry(base, s, is_read).user_data(user_data);
            // SAFETY: the piece lies inside the op's buffer (checked by
            // `push`), which the slot owns until every piece has
            // completed; the files stay open through what `done` holds
            // (see `Done`).
            unsafe { push_entry(&mut self.ring, &sqe) };
        }
    }
}

/// Queue an entry, handing what is queued to the kernel first if the
/// submission queue is full.
///
/// # Safety
/// What the entry points at must stay valid until it completes.
unsafe fn push_entry(ring: &mut IoUring, sqe: &io_uring::squeue::Entry) {
    // SAFETY: the caller's promise.
    while unsafe { ring.submission().push(sqe) }.is_err() {
        if let Err(e) = ring.submit() {
            error!("io_uring submit: {e}");
        }
    }
}

impl Drop for RingCore {
    fn drop(&mut self) {
        if self.pieces > 0 {
            // Only if the owner unwound with I/O in flight: the kernel may
            // still move data to or from the buffers after the ring is
            // gone, so they are never freed.
            error!("io_uring dropped with I/O in flight: leaking its buffers");
            std::mem::forget(std::mem::take(&mut self.slots));
        }
    }
}

/// One ring shared by many threads: they queue operations, and the ring's
/// own thread starts and answers them.
pub struct Ring {
    queue: Mutex<VecDeque<Op>>,
    wake: OwnedFd,
}

const WAKE: u64 = FOREIGN | 1;

impl Ring {
    /// Start the ring thread.
    pub fn start() -> io::Result<Arc<Ring>> {
        let core = RingCore::new()?;
        let wake = eventfd(0, EventfdFlags::CLOEXEC)?;
        let this = Arc::new(Ring {
            queue: Mutex::new(VecDeque::new()),
            wake,
        });
        let worker = this.clone();
        std::thread::Builder::new()
            .name("io-uring".into())
            // The eventfd read stays armed as long as the ring lives: its
            // 8 bytes are never freed, so a panic that unwinds this thread
            // cannot leave the kernel a stack slot to write into.
            .spawn(move || keep_forever([0u8; 8], |wake_buf| worker.run(core, wake_buf)))?;
        Ok(this)
    }

    /// The ring if `wanted` and the kernel gives us one; None (synchronous
    /// I/O) otherwise, with a warning.
    pub fn start_if(wanted: bool) -> Option<Arc<Ring>> {
        if !wanted {
            return None;
        }
        Ring::start()
            .inspect_err(|e| tracing::warn!("io_uring unavailable ({e}); using synchronous I/O"))
            .ok()
    }

    /// Queue an operation; the ring thread answers it.
    pub fn submit(&self, op: Op) {
        if op.segments.is_empty() {
            // Nothing to do on disk (all zeros): answer at once.
            finish(op, None);
            return;
        }
        self.queue.lock().expect("ring queue").push_back(op);
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }

    fn run(&self, mut core: RingCore, wake_buf: &'static mut [u8; 8]) {
        let mut armed = false;
        loop {
            if !armed {
                let sqe = opcode::Read::new(
                    types::Fd(self.wake.as_fd().as_raw_fd()),
                    wake_buf.as_mut_ptr(),
                    8,
                )
                .build()
                .user_data(WAKE);
                // SAFETY: wake_buf is never freed (see Ring::start), and only
                // one read of it is ever queued at a time.
                unsafe { core.push_foreign(&sqe) };
                armed = true;
            }
            for (data, _) in core.wait(None) {
                if data == WAKE {
                    armed = false;
                    let ops: Vec<Op> = self.queue.lock().expect("ring queue").drain(..).collect();
                    ops.into_iter().for_each(|op| core.push(op));
                }
            }
        }
    }
}

/// Work left for after a batch of completions.
type Tasks = Vec<Box<dyn FnOnce()>>;

thread_local! {
    /// While a thread handles a ring's completions: work to run once they
    /// are all handled (None otherwise).
    static AFTER_BATCH: std::cell::RefCell<Option<Tasks>> =
        const { std::cell::RefCell::new(None) };
}

/// Run `task` once the completions at hand are handled (so that one task
/// can answer all of them); outside of that, run it now. It must not
/// block.
pub fn after_batch(task: Box<dyn FnOnce()>) {
    let task = AFTER_BATCH.with(|a| match a.borrow_mut().as_mut() {
        Some(list) => {
            list.push(task);
            None
        }
        None => Some(task),
    });
    if let Some(task) = task {
        task();
    }
}

/// Run what the completions just handled left for later.
fn run_after_batch() {
    loop {
        let tasks =
            AFTER_BATCH.with(|a| std::mem::take(a.borrow_mut().as_mut().expect("in a batch")));
        if tasks.is_empty() {
            return;
        }
        tasks.into_iter().for_each(|t| t());
    }
}

fn finish(op: Op, failed: Option<i32>) {
    (op.done)(op.buf, failed);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run one op on a ring thread; its buffer and errno.
    fn run_op(segments: Vec<Segment>, buf: AlignedBuf, read: bool) -> (AlignedBuf, Option<i32>) {
        let ring = Ring::start().expect("io_uring");
        let (tx, rx) = std::sync::mpsc::channel();
        ring.submit(Op {
            segments,
            buf,
            read,
            done: Box::new(move |buf, failed| tx.send((buf, failed)).unwrap()),
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the op is answered")
    }

    /// A read past the end of the file ends in zeros; pieces that do not
    /// fit the buffer are refused before the kernel sees them.
    #[test]
    fn short_reads_end_in_zeros_and_pieces_must_fit() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 6144]).unwrap();
        let fd = f.as_raw_fd();
        let piece = |buf_offset, len| Segment {
            fd,
            file_offset: 4096,
            buf_offset,
            len,
        };
        let mut buf = AlignedBuf::zeroed(8192);
        buf.as_mut_slice().fill(0xff);
        let (buf, failed) = run_op(vec![piece(4096, 4096)], buf, true);
        assert_eq!(failed, None);
        let b = buf.as_slice();
        assert!(b[..4096].iter().all(|&x| x == 0xff), "outside the piece");
        assert!(b[4096..6144].iter().all(|&x| x == 7), "read");
        assert!(b[6144..].iter().all(|&x| x == 0), "past the end: zeros");

        let (buf, failed) = run_op(vec![piece(4096, 8192)], AlignedBuf::zeroed(8192), true);
        assert_eq!(failed, Some(libc::EINVAL));
        assert!(buf.as_slice().iter().all(|&x| x == 0));
        let (_, failed) = run_op(vec![piece(usize::MAX, 2)], AlignedBuf::zeroed(8192), false);
        assert_eq!(failed, Some(libc::EINVAL));
    }

    /// What `keep_forever` holds is not dropped when its user panics (a
    /// value owned by the thread, as the FUSE queues and the wake buffer
    /// were, is dropped by the unwinding and its memory reused).
    #[test]
    fn kept_values_survive_a_panic() {
        use std::sync::atomic::{AtomicBool, Ordering};
        static DROPPED: AtomicBool = AtomicBool::new(false);
        struct Buffers;
        impl Drop for Buffers {
            fn drop(&mut self) {
                DROPPED.store(true, Ordering::SeqCst);
            }
        }
        let unwound = std::panic::catch_unwind(|| {
            keep_forever(Buffers, |_b| panic!("a request went wrong"));
        });
        assert!(unwound.is_err());
        assert!(!DROPPED.load(Ordering::SeqCst), "the buffers were freed");
        // What the old code did: owned by the thread, dropped on unwind.
        let unwound = std::panic::catch_unwind(|| {
            let b = Buffers;
            let _held = &b;
            panic!("a request went wrong");
        });
        assert!(unwound.is_err());
        assert!(DROPPED.load(Ordering::SeqCst));
    }
}
