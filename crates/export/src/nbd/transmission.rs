//! The transmission phase: one reader per connection parses requests and
//! hands them to a shared pool of workers, which do the I/O on the delta
//! chain and send their replies as they finish (out of order).

use std::io::{self, BufReader, IoSlice, Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError};

use ploop_io::AlignedBuf;
use tracing::{debug, error, warn};

use super::handshake::{Agreed, ALLOCATION_ID};
use super::proto::*;
use super::Export;
use crate::uring::{Answer, Op, Ring};

/// Largest READ or WRITE payload we take (advertised as the maximum).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// A WRITE payload above this ends the connection instead of being
/// read and thrown away.
const MAX_DRAIN: u64 = 256 << 20;
/// Block status looks at no more than this much of the disk per request.
const MAX_STATUS_SPAN: u64 = 1 << 30;
const MAX_STATUS_RUNS: usize = 64 * 1024;
/// Per connection: requests and payload bytes in flight before the reader
/// waits, so that a client cannot make us buffer without bound.
const MAX_IN_FLIGHT: usize = 256;
const MAX_IN_FLIGHT_BYTES: usize = 256 << 20;
/// All connections together: payload bytes held before readers wait.
const MAX_TOTAL_BYTES: usize = 1 << 30;
/// Payloads and read data up to this size reuse pooled buffers.
const POOLED_BUF: usize = 1 << 20;
const POOL_KEEP: usize = 64;

// Compact replies carry 32-bit lengths: keep what we send within them.
const _: () = assert!(MAX_STATUS_SPAN <= u32::MAX as u64);
const _: () = assert!((MAX_PAYLOAD as u64) < u32::MAX as u64 - 8);

/// Runs jobs for every connection.
pub trait Executor: Send + Sync {
    fn run(&self, job: Box<dyn FnOnce() + Send>);
}

/// Runs each job on the calling thread (tests, fuzzing).
pub struct Inline;

impl Executor for Inline {
    fn run(&self, job: Box<dyn FnOnce() + Send>) {
        job()
    }
}

/// A fixed pool of worker threads.
pub struct Pool {
    tx: crossbeam_channel::Sender<Box<dyn FnOnce() + Send>>,
}

impl Pool {
    pub fn new(threads: usize) -> io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded::<Box<dyn FnOnce() + Send>>();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                })?;
        }
        Ok(Self { tx })
    }
}

impl Executor for Pool {
    fn run(&self, job: Box<dyn FnOnce() + Send>) {
        if let Err(e) = self.tx.send(job) {
            // Only when every worker is gone: run it here rather than drop it.
            (e.into_inner())();
        }
    }
}

/// The sending half of a connection, shared by the workers.
pub trait ReplySink: Write + Send {
    /// Cut the connection: a reply could not be sent.
    fn abort(&mut self) {}
}

impl ReplySink for Vec<u8> {}

/// Lock a mutex even if a panicking thread held it: what it guards (a
/// socket, counters) stays usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// [`lock`] without waiting: None only when another thread holds it.
fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// Replies waiting for the worker that is sending, and their size.
#[derive(Default)]
struct Queue {
    replies: Vec<Reply>,
    bytes: usize,
}

/// Most reply bytes one connection queues behind a busy socket.
const MAX_QUEUED: usize = 64 << 20;

/// What all connections of one server share.
pub struct Shared {
    exec: Box<dyn Executor>,
    /// Plain reads and in-place writes go here, batched, when set.
    ring: Option<Arc<Ring>>,
    /// The server is stopping: new requests get ESHUTDOWN.
    stop: Arc<AtomicBool>,
    bytes: Mutex<usize>,
    bytes_freed: Condvar,
    buffers: Mutex<Vec<AlignedBuf>>,
}

impl Shared {
    pub fn new(
        exec: Box<dyn Executor>,
        ring: Option<Arc<Ring>>,
        stop: Arc<AtomicBool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            exec,
            ring,
            stop,
            bytes: Mutex::new(0),
            bytes_freed: Condvar::new(),
            buffers: Mutex::new(Vec::new()),
        })
    }

    fn take_bytes(&self, n: usize) {
        let mut used = lock(&self.bytes);
        while *used > 0 && *used + n > MAX_TOTAL_BYTES {
            used = self
                .bytes_freed
                .wait(used)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *used += n;
    }

    fn give_bytes(&self, n: usize) {
        *lock(&self.bytes) -= n;
        self.bytes_freed.notify_all();
    }

    /// An aligned buffer of at least `len` bytes (contents undefined).
    fn buffer(&self, len: usize) -> AlignedBuf {
        if len <= POOLED_BUF {
            if let Some(b) = lock(&self.buffers).pop() {
                return b;
            }
            return AlignedBuf::zeroed(POOLED_BUF);
        }
        AlignedBuf::zeroed(len)
    }

    fn recycle(&self, buf: AlignedBuf) {
        if buf.len() == POOLED_BUF {
            let mut pool = lock(&self.buffers);
            if pool.len() < POOL_KEEP {
                pool.push(buf);
            }
        }
    }
}

struct Budget {
    requests: usize,
    bytes: usize,
}

/// One connection in transmission.
pub struct Connection {
    export: Arc<Export>,
    agreed: Agreed,
    shared: Arc<Shared>,
    out: Mutex<Box<dyn ReplySink>>,
    /// Replies waiting for the worker that is sending.
    queued: Mutex<Queue>,
    /// Requests the ring has done, waiting for a worker to reply.
    completed: Mutex<Vec<Completed>>,
    reply_scheduled: AtomicBool,
    budget: Mutex<Budget>,
    budget_freed: Condvar,
    /// A reply could not be sent: stop reading requests.
    broken: AtomicBool,
}

/// A READ or WRITE the ring has done, waiting for its reply.
struct Completed {
    req: Request,
    buf: AlignedBuf,
    /// Allocation of a structured read, for its hole chunks.
    runs: Vec<(u64, bool)>,
    failed: Option<i32>,
    _budget: BudgetGuard,
}

/// Requests the ring can take: whole O_DIRECT blocks.
const QUEUE_ALIGN: u64 = 4096;

/// Gives a request's budget back however its job ends.
struct BudgetGuard {
    conn: Arc<Connection>,
    bytes: usize,
}

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        self.conn.give_budget(self.bytes);
    }
}

/// A whole reply, ready to send: header bytes, and ranges of a data
/// buffer it owns (so a queued reply moves its data instead of copying it).
struct Reply {
    parts: Vec<Part>,
    data: Option<AlignedBuf>,
}

enum Part {
    Bytes(Vec<u8>),
    /// A range of the reply's data buffer.
    Data(usize, usize),
}

impl Reply {
    fn bytes(b: Vec<u8>) -> Self {
        Reply {
            parts: vec![Part::Bytes(b)],
            data: None,
        }
    }

    fn len(&self) -> usize {
        self.slices().map(<[u8]>::len).sum()
    }

    /// Copy data much smaller than its buffer out of it, and give the
    /// buffer back.
    fn compact(self, shared: &Shared) -> Reply {
        let Some(buf) = &self.data else {
            return self;
        };
        if buf.len() < 4 * self.len() {
            return self;
        }
        let parts = self
            .slices()
            .map(|s| Part::Bytes(s.to_vec()))
            .collect::<Vec<_>>();
        if let Some(buf) = self.data {
            shared.recycle(buf);
        }
        Reply { parts, data: None }
    }

    fn slices(&self) -> impl Iterator<Item = &[u8]> {
        self.parts.iter().map(move |p| match p {
            Part::Bytes(b) => b.as_slice(),
            Part::Data(from, to) => &self
                .data
                .as_ref()
                .expect("a data part has a buffer")
                .as_slice()[*from..*to],
        })
    }
}

/// Why a request failed: an NBD error number and a message for the client.
struct Failure(u32, String);

fn failure(errno: u32, msg: impl Into<String>) -> Failure {
    Failure(errno, msg.into())
}

/// The NBD error number for a system one.
fn nbd_errno(errno: Option<i32>) -> u32 {
    match errno {
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ENOSPC,
        Some(libc::EROFS | libc::EPERM | libc::EACCES) => EPERM,
        _ => EIO,
    }
}

/// The NBD error for a system error number.
fn errno_failure(errno: i32) -> Failure {
    failure(
        nbd_errno(Some(errno)),
        std::io::Error::from_raw_os_error(errno).to_string(),
    )
}

/// The NBD error for an image error.
fn image_failure(e: &ploop_format::Error) -> Failure {
    let code = match e {
        ploop_format::Error::Io { err, .. } => nbd_errno(err.raw_os_error()),
        ploop_format::Error::Invalid(_) => EINVAL,
        _ => EIO,
    };
    failure(code, e.to_string())
}

/// Write all of `bufs`, with as few system calls as the kernel allows.
fn write_all_vectored(w: &mut dyn Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Connection {
    pub fn new(
        export: Arc<Export>,
        agreed: Agreed,
        out: Box<dyn ReplySink>,
        shared: Arc<Shared>,
    ) -> Arc<Self> {
        Arc::new(Self {
            export,
            agreed,
            shared,
            out: Mutex::new(out),
            queued: Mutex::new(Queue::default()),
            completed: Mutex::new(Vec::new()),
            reply_scheduled: AtomicBool::new(false),
            budget: Mutex::new(Budget {
                requests: 0,
                bytes: 0,
            }),
            budget_freed: Condvar::new(),
            broken: AtomicBool::new(false),
        })
    }

    fn structured(&self) -> bool {
        self.agreed.structured || self.agreed.extended
    }

    /// Send one whole reply (all its chunks) without interleaving. A
    /// worker that finds another one sending leaves its reply for that one
    /// to send, and goes back to work: a client slow to read holds at most
    /// one worker.
    fn send(&self, reply: Reply) {
        self.send_all(vec![reply]);
    }

    /// Send several replies, in one system call where the socket is free.
    /// Queued replies are bounded: past [`MAX_QUEUED`] bytes a worker
    /// waits for the socket instead (a client that stops reading is cut
    /// by the send timeout).
    fn send_all(&self, mut replies: Vec<Reply>) {
        if self.broken.load(Ordering::SeqCst) {
            // Being cut: no reply can arrive.
            return replies.into_iter().for_each(|r| self.recycle(r));
        }
        let out = match try_lock(&self.out) {
            Some(out) => out,
            None => {
                let size: usize = replies.iter().map(Reply::len).sum();
                let mut q = lock(&self.queued);
                if q.bytes + size > MAX_QUEUED {
                    drop(q);
                    let out = lock(&self.out);
                    return self.send_queued(out, replies);
                }
                // Small data need not hold on to a large pooled buffer.
                q.replies
                    .extend(replies.drain(..).map(|r| r.compact(&self.shared)));
                q.bytes += size;
                drop(q);
                // The sender may have looked at the queue just before.
                if let Some(out) = try_lock(&self.out) {
                    self.send_queued(out, Vec::new());
                }
                return;
            }
        };
        self.send_queued(out, replies);
    }

    /// Send `batch` and whatever queues meanwhile, then let go of the socket.
    fn send_queued<'a>(
        &'a self,
        mut out: MutexGuard<'a, Box<dyn ReplySink>>,
        mut batch: Vec<Reply>,
    ) {
        loop {
            {
                let mut q = lock(&self.queued);
                batch.append(&mut q.replies);
                q.bytes = 0;
            }
            if batch.is_empty() {
                drop(out);
                // One queued between the look and the unlock is ours to
                // send, unless someone else has the socket (then theirs).
                if lock(&self.queued).replies.is_empty() {
                    return;
                }
                match try_lock(&self.out) {
                    Some(o) => out = o,
                    None => return,
                }
                continue;
            }
            let parts: Vec<&[u8]> = batch.iter().flat_map(Reply::slices).collect();
            self.write_parts(&mut out, &parts);
            drop(parts);
            for r in batch.drain(..) {
                self.recycle(r);
            }
        }
    }

    fn recycle(&self, reply: Reply) {
        if let Some(buf) = reply.data {
            self.shared.recycle(buf);
        }
    }

    fn write_parts(&self, out: &mut Box<dyn ReplySink>, parts: &[&[u8]]) {
        if self.broken.load(Ordering::SeqCst) {
            return;
        }
        let mut slices: Vec<IoSlice> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let r = write_all_vectored(&mut **out, &mut slices).and_then(|_| out.flush());
        if let Err(e) = r {
            // A client that stopped reading (the send timed out) or left.
            debug!("sending a reply failed: {e}: cutting the connection");
            self.broken.store(true, Ordering::SeqCst);
            out.abort();
        }
    }

    /// Reply to a command that returns no data.
    fn reply_done(&self, req: &Request, result: Result<(), Failure>) {
        match result {
            Ok(()) => self.send(Reply::bytes(self.done_reply(req))),
            Err(f) => self.reply_error(req, f),
        }
    }

    fn reply_error(&self, req: &Request, f: Failure) {
        self.send(Reply::bytes(self.error_reply(req, f)));
    }

    /// A whole error reply for `req`.
    fn error_reply(&self, req: &Request, Failure(code, msg): Failure) -> Vec<u8> {
        debug!(
            "request {} at {}+{}: error {code}: {msg}",
            req.kind, req.offset, req.length
        );
        if self.structured() {
            let msg = &msg.as_bytes()[..msg.len().min(MAX_STRING)];
            let mut p = Vec::with_capacity(6 + msg.len());
            p.extend_from_slice(&code.to_be_bytes());
            p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            p.extend_from_slice(msg);
            let h = chunk_header(
                self.agreed.extended,
                REPLY_FLAG_DONE,
                CHUNK_ERROR,
                req.cookie,
                req.offset,
                p.len() as u64,
            );
            [h, p].concat()
        } else {
            simple_reply(code, req.cookie).to_vec()
        }
    }

    /// A whole success reply for a command that returns no data.
    fn done_reply(&self, req: &Request) -> Vec<u8> {
        if self.agreed.extended {
            chunk_header(true, REPLY_FLAG_DONE, CHUNK_NONE, req.cookie, req.offset, 0)
        } else {
            simple_reply(0, req.cookie).to_vec()
        }
    }

    fn check_range(&self, req: &Request, past_end: u32) -> Result<(), Failure> {
        match req.offset.checked_add(req.length) {
            Some(end) if end <= self.export.size() => Ok(()),
            _ => Err(failure(
                past_end,
                format!(
                    "{}+{} is past the end of the {}-byte export",
                    req.offset,
                    req.length,
                    self.export.size()
                ),
            )),
        }
    }

    fn check_writable(&self) -> Result<(), Failure> {
        if self.export.read_only {
            Err(failure(EPERM, "the export is read-only"))
        } else {
            Ok(())
        }
    }

    fn fua(&self, req: &Request) -> Result<(), Failure> {
        if req.flags & CMD_FLAG_FUA != 0 {
            self.export
                .disk
                .chain()
                .flush()
                .map_err(|e| image_failure(&e))?;
        }
        Ok(())
    }

    fn read(&self, req: &Request) {
        let result = self.check_range(req, EINVAL).and_then(|()| {
            if req.length > u64::from(MAX_PAYLOAD) {
                return Err(failure(EINVAL, "read longer than the maximum payload"));
            }
            Ok(())
        });
        if let Err(f) = result {
            return self.reply_error(req, f);
        }
        let len = req.length as usize;
        let mut buf = self.shared.buffer(len);
        let chain = self.export.disk.chain();
        let holes = self.structured() && req.flags & CMD_FLAG_DF == 0 && len > 0;
        let runs = if holes {
            chain.allocation(req.offset, req.length, MAX_STATUS_RUNS)
        } else {
            Ok(Vec::new())
        };
        let read = runs.and_then(|runs| {
            chain
                .read_at(&mut buf.as_mut_slice()[..len], req.offset)
                .map(|()| runs)
        });
        drop(chain);
        match read {
            Ok(runs) => self.send(self.read_reply(req, buf, &runs)),
            Err(e) => {
                self.shared.recycle(buf);
                self.reply_error(req, image_failure(&e));
            }
        }
    }

    /// A successful READ reply from the first `req.length` bytes of
    /// `data`: simple, or structured with data and hole chunks (per
    /// `runs`), the last one DONE.
    fn read_reply(&self, req: &Request, data: AlignedBuf, runs: &[(u64, bool)]) -> Reply {
        let len = req.length as usize;
        let mut parts = Vec::with_capacity(runs.len() * 2 + 2);
        if !self.structured() {
            parts.push(Part::Bytes(simple_reply(0, req.cookie).to_vec()));
            parts.push(Part::Data(0, len));
        } else if len == 0 {
            let ext = self.agreed.extended;
            let h = chunk_header(ext, REPLY_FLAG_DONE, CHUNK_NONE, req.cookie, req.offset, 0);
            parts.push(Part::Bytes(h));
        } else {
            let ext = self.agreed.extended;
            let covered: u64 = runs.iter().map(|r| r.0).sum();
            let mut runs = runs.to_vec();
            if covered != req.length {
                // Fewer runs than the read (capped, or none asked): the
                // rest goes as data.
                runs.push((req.length - covered, true));
            }
            let mut at = 0u64;
            let last = runs.len() - 1;
            for (i, &(n, held)) in runs.iter().enumerate() {
                let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
                let offset = req.offset + at;
                let mut h;
                if held {
                    h = chunk_header(ext, flags, CHUNK_OFFSET_DATA, req.cookie, req.offset, 8 + n);
                    h.extend_from_slice(&offset.to_be_bytes());
                } else {
                    h = chunk_header(ext, flags, CHUNK_OFFSET_HOLE, req.cookie, req.offset, 12);
                    h.extend_from_slice(&offset.to_be_bytes());
                    h.extend_from_slice(&(n as u32).to_be_bytes());
                }
                parts.push(Part::Bytes(h));
                if held {
                    parts.push(Part::Data(at as usize, (at + n) as usize));
                }
                at += n;
            }
        }
        Reply {
            parts,
            data: Some(data),
        }
    }

    fn write(&self, req: &Request, payload: &[u8]) -> Result<(), Failure> {
        self.check_writable()?;
        self.check_range(req, ENOSPC)?;
        self.export
            .disk
            .chain()
            .write_at(payload, req.offset)
            .map_err(|e| image_failure(&e))?;
        self.fua(req)
    }

    fn write_zeroes(&self, req: &Request) -> Result<(), Failure> {
        self.check_writable()?;
        self.check_range(req, ENOSPC)?;
        let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
        let chain = self.export.disk.chain();
        if req.flags & CMD_FLAG_NO_HOLE != 0 {
            if fast {
                return Err(failure(ENOTSUP, "zeroes without holes are written in full"));
            }
            let zeros = vec![0u8; req.length.min(1 << 20) as usize];
            let mut at = 0;
            while at < req.length {
                let n = (req.length - at).min(zeros.len() as u64);
                chain
                    .write_at(&zeros[..n as usize], req.offset + at)
                    .map_err(|e| image_failure(&e))?;
                at += n;
            }
        } else {
            // Data below the top must be masked by copying zeros up: not fast.
            let slow = chain
                .held_under_top(req.offset, req.length)
                .map_err(|e| image_failure(&e))?;
            if fast && slow {
                return Err(failure(ENOTSUP, "zeroing here means copying up"));
            }
            chain
                .discard(req.offset, req.length)
                .map_err(|e| image_failure(&e))?;
        }
        drop(chain);
        self.fua(req)
    }

    fn trim(&self, req: &Request) -> Result<(), Failure> {
        self.check_writable()?;
        self.check_range(req, EINVAL)?;
        self.export
            .disk
            .chain()
            .discard(req.offset, req.length)
            .map_err(|e| image_failure(&e))?;
        self.fua(req)
    }

    fn block_status(&self, req: &Request) {
        let Some(id) = self.agreed.allocation else {
            return self.reply_error(req, failure(EINVAL, "no metadata context selected"));
        };
        debug_assert_eq!(id, ALLOCATION_ID);
        if let Err(f) = self.check_range(req, EINVAL) {
            return self.reply_error(req, f);
        }
        if req.length == 0 {
            return self.reply_error(req, failure(EINVAL, "zero-length block status"));
        }
        let span = req.length.min(MAX_STATUS_SPAN);
        let one = req.flags & CMD_FLAG_REQ_ONE != 0;
        let runs = {
            let chain = self.export.disk.chain();
            chain.allocation(req.offset, span, if one { 1 } else { MAX_STATUS_RUNS })
        };
        let runs = match runs {
            Ok(r) => r,
            Err(e) => return self.reply_error(req, image_failure(&e)),
        };
        let status = |held: bool| if held { 0 } else { STATE_HOLE | STATE_ZERO };
        let ext = self.agreed.extended;
        let mut p = Vec::with_capacity(8 + runs.len() * 16);
        p.extend_from_slice(&id.to_be_bytes());
        if ext {
            p.extend_from_slice(&(runs.len() as u32).to_be_bytes());
            for &(len, held) in &runs {
                p.extend_from_slice(&len.to_be_bytes());
                p.extend_from_slice(&u64::from(status(held)).to_be_bytes());
            }
        } else {
            for &(len, held) in &runs {
                p.extend_from_slice(&(len as u32).to_be_bytes());
                p.extend_from_slice(&status(held).to_be_bytes());
            }
        }
        let kind = if ext {
            CHUNK_BLOCK_STATUS_EXT
        } else {
            CHUNK_BLOCK_STATUS
        };
        let h = chunk_header(
            ext,
            REPLY_FLAG_DONE,
            kind,
            req.cookie,
            req.offset,
            p.len() as u64,
        );
        self.send(Reply::bytes([h, p].concat()));
    }

    /// Hand a plain READ or in-place WRITE to the ring. Gives the payload
    /// and budget back when the request needs the image layer instead.
    fn try_queue(
        self: &Arc<Self>,
        req: Request,
        payload: Option<(AlignedBuf, usize)>,
        budget: BudgetGuard,
    ) -> Result<Op, (Option<(AlignedBuf, usize)>, BudgetGuard)> {
        if self.shared.ring.is_none() {
            return Err((payload, budget));
        }
        let read = req.kind == CMD_READ;
        let plain = (read || (req.kind == CMD_WRITE && !self.export.read_only))
            && req.length > 0
            && req.length <= u64::from(MAX_PAYLOAD)
            && req.offset.is_multiple_of(QUEUE_ALIGN)
            && req.length.is_multiple_of(QUEUE_ALIGN)
            && self.check_range(&req, EINVAL).is_ok();
        if !plain {
            return Err((payload, budget));
        }
        let disk = &self.export.disk;
        let chain = disk.chain();
        let plan = if read {
            chain.plan_read(req.offset, req.length)
        } else {
            chain.plan_write(req.offset, req.length)
        };
        let Ok(Some(segments)) = plan else {
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
            for s in &segments {
                b[at..s.buf_offset].fill(0);
                at = s.buf_offset + s.len;
            }
            b[at..len].fill(0);
            buf
        } else {
            payload.expect("WRITE carries its payload").0
        };
        // Registered while the guard is held: see ServedDisk::begin_queued.
        let in_flight = disk.begin_queued();
        let planned_on = Arc::clone(&chain);
        drop(chain);
        let conn = self.clone();
        Ok(Op {
            segments,
            buf,
            chain: planned_on,
            in_flight,
            answer: Answer::Call {
                read,
                done: Box::new(move |buf, failed| {
                    conn.completed_by_ring(Completed {
                        req,
                        buf,
                        runs,
                        failed,
                        _budget: budget,
                    })
                }),
            },
        })
    }

    /// On the ring thread: keep the result, and have a worker reply
    /// (a send may block; the ring must not).
    fn completed_by_ring(self: &Arc<Self>, c: Completed) {
        lock(&self.completed).push(c);
        if !self.reply_scheduled.swap(true, Ordering::SeqCst) {
            let conn = self.clone();
            self.shared
                .exec
                .run(Box::new(move || conn.reply_completed()));
        }
    }

    /// Reply to everything the ring has finished, in one send.
    fn reply_completed(&self) {
        let done = catch_unwind(AssertUnwindSafe(|| self.reply_completed_batches()));
        if let Err(panic) = done {
            error!("replying to queued requests panicked: {panic:?}; cutting the connection");
            self.broken.store(true, Ordering::SeqCst);
            if let Some(mut out) = try_lock(&self.out) {
                out.abort();
            }
            // Their budgets go back; nothing more is sent.
            lock(&self.completed).clear();
            self.reply_scheduled.store(false, Ordering::SeqCst);
        }
    }

    fn reply_completed_batches(&self) {
        loop {
            self.reply_scheduled.store(false, Ordering::SeqCst);
            let batch = std::mem::take(&mut *lock(&self.completed));
            if batch.is_empty() {
                return;
            }
            let fua = |c: &Completed| {
                c.req.kind == CMD_WRITE && c.failed.is_none() && c.req.flags & CMD_FLAG_FUA != 0
            };
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
            for c in batch {
                replies.push(match c.failed {
                    Some(e) => {
                        self.shared.recycle(c.buf);
                        Reply::bytes(self.error_reply(&c.req, errno_failure(e)))
                    }
                    None if c.req.kind == CMD_READ => self.read_reply(&c.req, c.buf, &c.runs),
                    None => {
                        let r = match &flushed {
                            Err(msg) if fua(&c) => {
                                self.error_reply(&c.req, failure(EIO, msg.clone()))
                            }
                            _ => self.done_reply(&c.req),
                        };
                        self.shared.recycle(c.buf);
                        Reply::bytes(r)
                    }
                });
            }
            self.send_all(replies);
        }
    }

    /// Carry out one request and send its reply.
    fn execute(&self, req: Request, payload: Option<(AlignedBuf, usize)>) {
        match req.kind {
            CMD_READ => self.read(&req),
            CMD_WRITE => {
                let (buf, len) = payload.expect("WRITE carries its payload");
                let r = self.write(&req, &buf.as_slice()[..len]);
                self.shared.recycle(buf);
                self.reply_done(&req, r);
            }
            CMD_WRITE_ZEROES => {
                let r = self.write_zeroes(&req);
                self.reply_done(&req, r);
            }
            CMD_TRIM => {
                let r = self.trim(&req);
                self.reply_done(&req, r);
            }
            CMD_FLUSH => {
                let r = self
                    .export
                    .disk
                    .chain()
                    .flush()
                    .map_err(|e| image_failure(&e));
                self.reply_done(&req, r);
            }
            CMD_CACHE => {
                // The image is read with O_DIRECT: there is no cache to fill.
                let r = self.check_range(&req, EINVAL);
                self.reply_done(&req, r);
            }
            CMD_BLOCK_STATUS => self.block_status(&req),
            _ => unreachable!("filtered by the reader"),
        }
    }

    /// Wait for room for one more request of `bytes` payload, then take
    /// it; the payload is allocated only after this.
    fn take_budget(&self, bytes: usize) {
        let mut b = lock(&self.budget);
        while b.requests >= MAX_IN_FLIGHT || (b.bytes > 0 && b.bytes + bytes > MAX_IN_FLIGHT_BYTES)
        {
            b = self
                .budget_freed
                .wait(b)
                .unwrap_or_else(PoisonError::into_inner);
        }
        b.requests += 1;
        b.bytes += bytes;
        drop(b);
        self.shared.take_bytes(bytes);
    }

    fn give_budget(&self, bytes: usize) {
        self.shared.give_bytes(bytes);
        let mut b = lock(&self.budget);
        b.requests -= 1;
        b.bytes -= bytes;
        self.budget_freed.notify_all();
    }

    /// Wait until every request handed to the workers has been answered.
    fn drain(&self) {
        let mut b = lock(&self.budget);
        while b.requests > 0 {
            b = self
                .budget_freed
                .wait(b)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Read and throw away `len` bytes.
fn skip(r: &mut dyn Read, len: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(len), &mut io::sink())?;
    if copied < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Which flags each command accepts.
fn allowed_flags(kind: u16, extended: bool) -> u16 {
    let payload = if extended { CMD_FLAG_PAYLOAD_LEN } else { 0 };
    match kind {
        CMD_READ => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE => CMD_FLAG_FUA | payload,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_TRIM | CMD_FLUSH | CMD_CACHE => CMD_FLAG_FUA,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => 0,
    }
}

/// How the request loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// NBD_CMD_DISC, or the client closed the connection.
    Disconnect,
    /// The client broke the protocol (bad magic, oversized payload).
    Violation,
    /// A read or a reply failed.
    IoError,
}

/// Read requests until the client leaves; replies go through `conn`.
/// Returns once every request handed out has been answered.
pub fn serve_requests<R: Read>(conn: &Arc<Connection>, input: &mut BufReader<R>) -> End {
    let end = request_loop(conn, input);
    conn.drain();
    end
}

fn request_loop<R: Read>(conn: &Arc<Connection>, input: &mut BufReader<R>) -> End {
    let mut batch: Vec<Op> = Vec::new();
    let end = request_loop_batched(conn, input, &mut batch);
    if let Some(ring) = &conn.shared.ring {
        ring.submit_batch(batch.drain(..));
    }
    end
}

/// The request loop; requests for the ring gather in `batch` while more
/// are already buffered, and go to the ring together.
fn request_loop_batched<R: Read>(
    conn: &Arc<Connection>,
    input: &mut BufReader<R>,
    batch: &mut Vec<Op>,
) -> End {
    let extended = conn.agreed.extended;
    let mut header = [0u8; EXTENDED_REQUEST_LEN];
    let header_len = if extended {
        EXTENDED_REQUEST_LEN
    } else {
        REQUEST_LEN
    };
    loop {
        if conn.broken.load(Ordering::SeqCst) {
            return End::IoError;
        }
        if !batch.is_empty() && input.buffer().len() < header_len {
            // Nothing more without waiting: let the ring start on these.
            if let Some(ring) = &conn.shared.ring {
                ring.submit_batch(batch.drain(..));
            }
        }
        match input.read_exact(&mut header[..header_len]) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return End::Disconnect,
            Err(e) => {
                debug!("reading a request: {e}");
                return End::IoError;
            }
        }
        let parsed = if extended {
            Request::parse_extended(&header)
        } else {
            Request::parse(header[..REQUEST_LEN].try_into().expect("28 bytes"))
        };
        let Some(req) = parsed else {
            warn!("bad request magic: dropping the client");
            return End::Violation;
        };
        if req.kind == CMD_DISC {
            return End::Disconnect;
        }
        // Payload first: whatever we answer, the stream must stay in step.
        let mut payload = None;
        if req.has_payload(extended) {
            if req.length > u64::from(MAX_PAYLOAD) || req.kind != CMD_WRITE {
                if req.length > MAX_DRAIN || extended && req.length > u64::from(MAX_PAYLOAD) {
                    warn!("{}-byte payload: dropping the client", req.length);
                    return End::Violation;
                }
                if skip(input, req.length).is_err() {
                    return End::IoError;
                }
                let why = if req.kind == CMD_WRITE {
                    "write longer than the maximum payload"
                } else {
                    "this command takes no payload"
                };
                conn.reply_error(&req, failure(EINVAL, why));
                continue;
            }
            let len = req.length as usize;
            conn.take_budget(len);
            let mut buf = conn.shared.buffer(len);
            if input.read_exact(&mut buf.as_mut_slice()[..len]).is_err() {
                // Cut off in the middle of a write: nothing was acknowledged.
                conn.give_budget(len);
                return End::IoError;
            }
            payload = Some((buf, len));
        } else if req.kind == CMD_WRITE {
            conn.reply_error(&req, failure(EINVAL, "WRITE without a payload"));
            continue;
        }
        let bytes = payload.as_ref().map_or(0, |p| p.1);
        // A payload took its budget before it was read.
        let budgeted = payload.is_some();
        let refuse = |f: Failure| {
            conn.reply_error(&req, f);
            if budgeted {
                conn.give_budget(bytes);
            }
        };
        if conn.shared.stop.load(Ordering::SeqCst) {
            refuse(failure(ESHUTDOWN, "the server is stopping"));
            continue;
        }
        let known = matches!(
            req.kind,
            CMD_READ
                | CMD_WRITE
                | CMD_FLUSH
                | CMD_TRIM
                | CMD_CACHE
                | CMD_WRITE_ZEROES
                | CMD_BLOCK_STATUS
        );
        if !known {
            refuse(failure(EINVAL, format!("unknown command {}", req.kind)));
            continue;
        }
        let extra = req.flags & !allowed_flags(req.kind, extended);
        if extra != 0 || (req.flags & CMD_FLAG_DF != 0 && !conn.structured()) {
            refuse(failure(EINVAL, format!("unexpected flags {extra:#x}")));
            continue;
        }
        // A read's reply may wait in memory: it counts like a payload.
        let bytes = if req.kind == CMD_READ {
            req.length.min(u64::from(MAX_PAYLOAD)) as usize
        } else {
            bytes
        };
        if !budgeted {
            conn.take_budget(bytes);
        }
        let guard = BudgetGuard {
            conn: conn.clone(),
            bytes,
        };
        let (payload, guard) = match conn.try_queue(req, payload, guard) {
            Ok(op) => {
                batch.push(op);
                continue;
            }
            Err(back) => back,
        };
        conn.shared.exec.run(Box::new(move || {
            let c = guard.conn.clone();
            let done = catch_unwind(AssertUnwindSafe(|| c.execute(req, payload)));
            if let Err(panic) = done {
                // A bug, not the client's fault: this connection cannot be
                // trusted to stay in step; the others go on.
                error!("request {req:?} panicked: {panic:?}; cutting the connection");
                c.broken.store(true, Ordering::SeqCst);
                lock(&c.out).abort();
            }
            drop(guard);
        }));
    }
}
