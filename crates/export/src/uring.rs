//! Queued I/O for the exports: FUSE workers and NBD readers hand plain
//! reads and in-place writes to one io_uring thread and go back for the
//! next request. The ring thread submits whatever has queued up in one batch
//! (one doorbell for the disk instead of one per request) and answers each
//! FUSE request when its last piece completes.
//!
//! Requests that need the image layer's logic (allocation, copy-up,
//! discard, flush) never come here: they stay synchronous in the workers.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use fuser::{Errno, ReplyData, ReplyWrite};
use io_uring::{opcode, types, IoUring};
use ploop_image::{Chain, Segment};
use ploop_io::AlignedBuf;
use rustix::event::{eventfd, EventfdFlags};
use tracing::error;

use crate::served::InFlight;

/// The answer owed when an operation completes.
pub enum Answer {
    /// A FUSE read: the data, or an errno.
    Read(ReplyData),
    /// A FUSE write.
    Write(ReplyWrite),
    /// Anything else: called on the ring thread with the buffer and the
    /// errno of a failed piece. It must not block.
    Call {
        read: bool,
        done: Box<dyn FnOnce(AlignedBuf, Option<i32>) + Send>,
    },
}

impl Answer {
    fn is_read(&self) -> bool {
        match self {
            Answer::Read(_) => true,
            Answer::Write(_) => false,
            Answer::Call { read, .. } => *read,
        }
    }
}

/// One FUSE request turned into file I/O.
pub struct Op {
    /// Where the request lies on the disk.
    pub offset: u64,
    pub segments: Vec<Segment>,
    /// Read target or write source; aligned for O_DIRECT.
    pub buf: AlignedBuf,
    pub answer: Answer,
    /// Keeps the deltas' files open and online operations waiting.
    pub chain: Arc<Chain>,
    pub in_flight: InFlight,
}

struct Pending {
    op: Op,
    remaining: usize,
    failed: Option<i32>,
}

pub struct Ring {
    queue: Mutex<VecDeque<Op>>,
    wake: OwnedFd,
}

const WAKE: u64 = u64::MAX;
const ENTRIES: u32 = 256;
/// Pieces in flight at most, so that neither the submission queue (with
/// the wake-up read) nor the completion queue can overflow; operations
/// past it wait their turn.
const MAX_PIECES: usize = ENTRIES as usize - 1;
const COMPLETIONS: u32 = 16384;

impl Ring {
    /// Start the ring thread.
    pub fn start() -> io::Result<Arc<Ring>> {
        // One request may be cut in more pieces than MAX_PIECES (32 MiB in
        // 4 KiB clusters laid out apart): room for all their completions.
        let ring = IoUring::builder()
            .setup_cqsize(COMPLETIONS)
            .build(ENTRIES)?;
        let wake = eventfd(0, EventfdFlags::CLOEXEC)?;
        let this = Arc::new(Ring {
            queue: Mutex::new(VecDeque::new()),
            wake,
        });
        let worker = this.clone();
        std::thread::Builder::new()
            .name("io-uring".into())
            .spawn(move || worker.run(ring))?;
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

    /// Queue several operations with one wake-up: the ring thread then
    /// hands them to the kernel in one submission.
    pub fn submit_batch(&self, ops: impl IntoIterator<Item = Op>) {
        let mut queue = self.queue.lock().expect("ring queue");
        let before = queue.len();
        for op in ops {
            if op.segments.is_empty() {
                finish(op, None);
            } else {
                queue.push_back(op);
            }
        }
        let added = queue.len() > before;
        drop(queue);
        if added {
            let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
        }
    }

    fn run(&self, mut ring: IoUring) {
        let mut slots: Vec<Option<Pending>> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        let mut waiting: VecDeque<Op> = VecDeque::new();
        let mut pieces = 0usize;
        let mut wake_buf = [0u8; 8];
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
                // SAFETY: wake_buf lives on this thread's stack for the whole
                // loop, and only one read of it is ever queued at a time.
                if unsafe { ring.submission().push(&sqe) }.is_ok() {
                    armed = true;
                }
            }
            if let Err(e) = ring.submit_and_wait(1) {
                if e.raw_os_error() != Some(libc::EINTR) {
                    error!("io_uring wait: {e}");
                }
                continue;
            }
            let done: Vec<(u64, i32)> = ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (data, res) in done {
                if data == WAKE {
                    armed = false;
                    waiting.extend(self.queue.lock().expect("ring queue").drain(..));
                    continue;
                }
                pieces -= 1;
                let slot = (data >> 16) as usize;
                let piece = (data & 0xffff) as usize;
                let Some(p) = slots.get_mut(slot).and_then(|s| s.as_mut()) else {
                    continue;
                };
                let want = p.op.segments[piece].len as i32;
                let is_read = p.op.answer.is_read();
                if res < 0 {
                    p.failed = Some(-res);
                } else if res != want {
                    if is_read {
                        // Past the end of a file: the rest reads as zeros.
                        let s = p.op.segments[piece];
                        let from = s.buf_offset + res as usize;
                        p.op.buf.as_mut_slice()[from..s.buf_offset + s.len].fill(0);
                    } else {
                        p.failed = Some(libc::EIO);
                    }
                }
                p.remaining -= 1;
                if p.remaining == 0 {
                    let p = slots[slot].take().expect("slot in use");
                    free.push(slot);
                    finish(p.op, p.failed);
                }
            }
            // Start what fits; an operation larger than the limit goes
            // alone.
            while let Some(n) = waiting.front().map(|op| op.segments.len()) {
                if pieces > 0 && pieces + n > MAX_PIECES {
                    break;
                }
                let op = waiting.pop_front().expect("a waiting op");
                pieces += n;
                self.start_op(&mut ring, op, &mut slots, &mut free);
            }
        }
    }

    fn start_op(
        &self,
        ring: &mut IoUring,
        op: Op,
        slots: &mut Vec<Option<Pending>>,
        free: &mut Vec<usize>,
    ) {
        let slot = free.pop().unwrap_or_else(|| {
            slots.push(None);
            slots.len() - 1
        });
        let n = op.segments.len();
        slots[slot] = Some(Pending {
            op,
            remaining: n,
            failed: None,
        });
        let p = slots[slot].as_mut().expect("just set");
        let is_read = p.op.answer.is_read();
        let base = p.op.buf.as_mut_slice().as_mut_ptr();
        for (i, s) in p.op.segments.iter().enumerate() {
            let user_data = ((slot as u64) << 16) | i as u64;
            // SAFETY: buf_offset + len lies inside the op's buffer (the
            // planner splits the request's own range), and the buffer is
            // owned by the slot until every piece has completed.
            let ptr = unsafe { base.add(s.buf_offset) };
            let sqe = if is_read {
                opcode::Read::new(types::Fd(s.fd), ptr, s.len as u32)
                    .offset(s.file_offset)
                    .build()
            } else {
                opcode::Write::new(types::Fd(s.fd), ptr, s.len as u32)
                    .offset(s.file_offset)
                    .build()
            }
            .user_data(user_data);
            loop {
                // SAFETY: as above, the memory outlives the operation; the
                // file descriptors stay open through `op.chain`.
                if unsafe { ring.submission().push(&sqe) }.is_ok() {
                    break;
                }
                // Queue full: hand what we have to the kernel first.
                if let Err(e) = ring.submit() {
                    error!("io_uring submit: {e}");
                }
            }
        }
    }
}

fn finish(op: Op, failed: Option<i32>) {
    let Op {
        offset,
        buf,
        answer,
        segments: _,
        chain,
        in_flight,
    } = op;
    if !answer.is_read() {
        // Again now that the data is in place: an online merge that copied
        // the cluster meanwhile must copy it once more.
        chain.note_written(offset, buf.len() as u64);
    }
    match (answer, failed) {
        (Answer::Read(r), Some(e)) => r.error(Errno::from_i32(e)),
        (Answer::Write(r), Some(e)) => r.error(Errno::from_i32(e)),
        (Answer::Read(r), None) => r.data(buf.as_slice()),
        (Answer::Write(r), None) => r.written(buf.len() as u32),
        (Answer::Call { done, .. }, failed) => done(buf, failed),
    }
    drop(in_flight);
}
