//! Plain reads and in-place writes through io_uring. Each connection's
//! reader owns a ring: it starts the disk I/O of the requests it parses,
//! and while it waits for the client it waits on the ring too, so it
//! answers what the disk has finished without handing anything to another
//! thread (no wake-up between reading a request and starting its I/O, nor
//! between its completion and the reply).

use std::cell::RefCell;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::Duration;

use io_uring::{opcode, types};

use ploop_image::throttle::IoKind;
use ploop_uring::{RingCore, FOREIGN};

use super::*;

/// A connection's ring, shared by its reader's input and request loop
/// (one thread).
pub struct ConnRing {
    core: RingCore,
    socket: RawFd,
    polling: bool,
    readable: bool,
}

const SOCKET_READABLE: u64 = FOREIGN | 2;

impl ConnRing {
    /// A ring for the connection on `socket`, which must stay open while
    /// the ring lives.
    pub fn new(socket: RawFd) -> io::Result<Rc<RefCell<ConnRing>>> {
        Ok(Rc::new(RefCell::new(ConnRing {
            core: RingCore::new()?,
            socket,
            polling: false,
            readable: false,
        })))
    }

    fn push(&mut self, op: Op) {
        self.core.push(op);
    }

    fn submit(&mut self) {
        self.core.submit();
    }

    fn busy(&self) -> bool {
        self.core.busy()
    }

    /// Answer what completes, waiting up to `timeout` for something to.
    fn reap(&mut self, timeout: Option<Duration>) {
        let foreign = self.core.wait(timeout);
        self.note(foreign);
    }

    /// Answer what has completed already, without waiting.
    fn reap_ready(&mut self) {
        let foreign = self.core.reap_ready();
        self.note(foreign);
    }

    fn note(&mut self, foreign: ploop_uring::Foreign) {
        for (data, _) in foreign {
            if data == SOCKET_READABLE {
                self.polling = false;
                self.readable = true;
            }
        }
    }

    /// Answer what completes until the socket has input (or news).
    fn wait_readable(&mut self) {
        if !self.polling {
            let sqe = opcode::PollAdd::new(types::Fd(self.socket), libc::POLLIN as u32)
                .build()
                .user_data(SOCKET_READABLE);
            // SAFETY: a poll points at no memory; the socket outlives the
            // ring (see `new`).
            unsafe { self.core.push_foreign(&sqe) };
            self.polling = true;
        }
        while !self.readable {
            self.reap(None);
        }
        self.readable = false;
    }

    /// Answer everything in flight.
    pub fn finish_all(&mut self) {
        while self.core.busy() {
            self.reap(None);
        }
    }
}

/// The socket read through its connection's ring.
pub struct RingInput {
    pub ring: Rc<RefCell<ConnRing>>,
}

impl Read for RingInput {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let fd = self.ring.borrow().socket;
        // SAFETY: the socket stays open while the ring lives (ConnRing::new).
        let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        loop {
            let got = rustix::net::recv(socket, &mut *buf, rustix::net::RecvFlags::DONTWAIT);
            // A client that keeps the socket full must still get replies
            // (and waiting requests their start): the system call has
            // posted what completed meanwhile.
            self.ring.borrow_mut().reap_ready();
            match got {
                Ok((n, _)) => return Ok(n),
                Err(rustix::io::Errno::AGAIN) => self.ring.borrow_mut().wait_readable(),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Requests parsed for the ring, not yet handed to it.
pub struct Gathered {
    pub(super) ops: Vec<Op>,
    pub(super) ring: Option<Rc<RefCell<ConnRing>>>,
}

impl Gathered {
    pub fn new(ring: Option<Rc<RefCell<ConnRing>>>) -> Self {
        Gathered {
            ops: Vec::new(),
            ring,
        }
    }

    /// Start the gathered requests' I/O.
    pub(super) fn submit(&mut self) {
        if let Some(ring) = &self.ring {
            let mut ring = ring.borrow_mut();
            self.ops.drain(..).for_each(|op| ring.push(op));
            ring.submit();
        }
    }

    /// Wait a little for budget to come back: by answering what the ring
    /// finishes (only this thread does), else for other threads.
    pub(super) fn wait_for_budget(&mut self, conn: &Connection) {
        self.submit();
        const A_LITTLE: Duration = Duration::from_millis(5);
        match &self.ring {
            Some(ring) if ring.borrow().busy() => ring.borrow_mut().reap(Some(A_LITTLE)),
            _ => {
                let b = lock(&conn.budget);
                drop(conn.budget_freed.wait_timeout(b, A_LITTLE));
            }
        }
    }

    /// Answer everything started.
    pub(super) fn finish_all(&mut self) {
        self.submit();
        if let Some(ring) = &self.ring {
            ring.borrow_mut().finish_all();
        }
    }
}

/// A READ or WRITE the ring has done, waiting for its reply.
pub(super) struct Completed {
    pub(super) req: Request,
    pub(super) buf: AlignedBuf,
    /// Allocation of a structured read, for its hole chunks.
    pub(super) runs: Vec<(u64, bool)>,
    pub(super) failed: Option<i32>,
    pub(super) _budget: BudgetGuard,
}

use ploop_uring::QUEUE_ALIGN;

impl Connection {
    /// Hand a plain READ or in-place WRITE to the ring. Gives the payload
    /// and budget back when the request needs the image layer instead.
    pub(super) fn try_queue(
        self: &Arc<Self>,
        g: &Gathered,
        req: Request,
        payload: Option<(AlignedBuf, usize)>,
        budget: BudgetGuard,
    ) -> Result<Op, (Option<(AlignedBuf, usize)>, BudgetGuard)> {
        if g.ring.is_none() {
            return Err((payload, budget));
        }
        let read = req.kind == CMD_READ;
        let plain = (read || (req.kind == CMD_WRITE && !self.export.read_only))
            && req.length > 0
            && req.length <= u64::from(MAX_PAYLOAD)
            && req.offset.is_multiple_of(QUEUE_ALIGN)
            && req.length.is_multiple_of(QUEUE_ALIGN)
            && self.check_range(&req, EINVAL).is_ok();
        // A limited disk's requests wait in the pool, not on the reader.
        if !plain || self.export.disk.throttle.limited() {
            return Err((payload, budget));
        }
        let disk = &self.export.disk;
        // The reader holds requests on its ring: never wait here for an
        // online operation that waits for those (the pool can wait).
        let Some(chain) = disk.try_chain() else {
            return Err((payload, budget));
        };
        let plan = if read {
            chain.plan_read(req.offset, req.length)
        } else {
            chain.plan_write(req.offset, req.length)
        };
        let Ok(Some(plan)) = plan else {
            return Err((payload, budget));
        };
        let runs = if read && self.structured() && req.flags & CMD_FLAG_DF == 0 {
            match chain.allocation(req.offset, req.length, MAX_STATUS_RUNS) {
                Ok(r) => r,
                Err(_) => return Err((payload, budget)),
            }
        } else {
            Vec::new()
        };
        let len = req.length as usize;
        let buf = if read {
            let mut buf = self.shared.buffer(len);
            // Pieces no delta holds read as zeros.
            let b = buf.as_mut_slice();
            let mut at = 0;
            for s in &plan.segments {
                b[at..s.buf_offset].fill(0);
                at = s.buf_offset + s.len;
            }
            b[at..len].fill(0);
            buf
        } else {
            payload.expect("WRITE carries its payload").0
        };
        // Counted (no limit is set: nothing to wait for).
        let kind = if read { IoKind::Read } else { IoKind::Write };
        disk.throttle.count(kind, req.length);
        // Registered while the guard is held: see ServedDisk::begin_queued.
        let (segments, in_flight) = disk.begin_queued(&chain, plan);
        drop(chain);
        let conn = self.clone();
        Ok(Op {
            segments,
            buf,
            read,
            done: Box::new(move |buf, failed| {
                if !read {
                    // Again now that the data is in place: an online merge
                    // that copied the cluster meanwhile must copy it again.
                    in_flight.chain().note_written(req.offset, buf.len() as u64);
                }
                conn.completed_by_ring(Completed {
                    req,
                    buf,
                    runs,
                    failed,
                    _budget: budget,
                });
                drop(in_flight);
            }),
        })
    }

    /// On the reader's thread: keep the result, and reply once the ring has
    /// handled the completions at hand, all in one send. Sending never
    /// waits for the client (what the socket does not take goes to the
    /// connection's writer), so the reader replies itself, saving a
    /// worker's wake-up; a FUA write, which must flush first, goes to a
    /// worker.
    pub(super) fn completed_by_ring(self: &Arc<Self>, c: Completed) {
        lock(&self.completed).push(c);
        if !self.reply_scheduled.swap(true, Ordering::SeqCst) {
            let conn = self.clone();
            ploop_uring::after_batch(Box::new(move || conn.reply_completed(false)));
        }
    }

    /// Reply to everything the ring has finished, in one send. With
    /// `may_wait` false, a batch with a FUA write goes to a worker.
    pub(super) fn reply_completed(self: &Arc<Self>, may_wait: bool) {
        let done = catch_unwind(AssertUnwindSafe(|| self.reply_completed_batches(may_wait)));
        if let Err(panic) = done {
            error!("replying to queued requests panicked: {panic:?}; cutting the connection");
            self.broken.store(true, Ordering::SeqCst);
            if let Some(mut out) = try_lock(&self.out) {
                out.sink.abort();
            }
            // Their budgets go back; nothing more is sent.
            lock(&self.completed).clear();
            self.reply_scheduled.store(false, Ordering::SeqCst);
        }
    }

    fn reply_completed_batches(self: &Arc<Self>, may_wait: bool) {
        let fua = |c: &Completed| {
            c.req.kind == CMD_WRITE && c.failed.is_none() && c.req.flags & CMD_FLAG_FUA != 0
        };
        loop {
            if !may_wait && lock(&self.completed).iter().any(fua) {
                // Still scheduled: the worker takes everything.
                let conn = self.clone();
                self.shared
                    .exec
                    .run(Box::new(move || conn.reply_completed(true)));
                return;
            }
            self.reply_scheduled.store(false, Ordering::SeqCst);
            let batch = std::mem::take(&mut *lock(&self.completed));
            if batch.is_empty() {
                return;
            }
            let flushed = if batch.iter().any(fua) {
                self.export
                    .disk
                    .chain()
                    .flush()
                    .map_err(|e| image_failure(&e).1)
            } else {
                Ok(())
            };
            let mut replies = Vec::with_capacity(batch.len());
            // Budgets go back once the replies hold theirs: until then the
            // connection must not look finished.
            let mut budgets = Vec::with_capacity(batch.len());
            for c in batch {
                let is_fua = fua(&c);
                let Completed {
                    req,
                    buf,
                    runs,
                    failed,
                    _budget,
                } = c;
                budgets.push(_budget);
                replies.push(match failed {
                    Some(e) => {
                        self.shared.recycle(buf);
                        Reply::bytes(self.error_reply(&req, errno_failure(e)))
                    }
                    None if req.kind == CMD_READ => self.read_reply(&req, buf, &runs),
                    None => {
                        let r = match &flushed {
                            Err(msg) if is_fua => self.error_reply(&req, failure(EIO, msg.clone())),
                            _ => self.done_reply(&req),
                        };
                        self.shared.recycle(buf);
                        Reply::bytes(r)
                    }
                });
            }
            self.send_all(replies);
            drop(budgets);
        }
    }
}
