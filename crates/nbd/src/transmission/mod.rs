//! The transmission phase: one reader per connection parses requests and
//! hands them to a shared pool of workers, which do the I/O on the delta
//! chain and send their replies as they finish (out of order).
//!
//! Here: the connection, its budgets and the request loop. `pool`: the
//! workers and what connections share. `commands`: each command.
//! `reply`: encoding and sending replies. `ring`: the io_uring path.
//! The submodules share this module's imports (`use super::*`).

use std::cell::RefCell;
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError, Weak};

use ploop_io::AlignedBuf;
use tracing::{debug, error, warn};

use super::handshake::{Agreed, ALLOCATION_ID, BITMAP_ID};
use super::proto::*;
use super::Export;
use ploop_uring::Op;

mod commands;
mod pool;
mod reply;
mod ring;

pub use pool::{Executor, Inline, Pool, Shared};
pub use reply::ReplySink;
use reply::{errno_failure, failure, image_failure, Failure, Queue, Reply, Sender, Writer};
use ring::Completed;
pub use ring::{ConnRing, Gathered, RingInput};

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
/// Payloads and read data up to this size reuse pooled buffers...
const POOLED_BUF: usize = 1 << 20;
/// ...unless they are this small.
const SMALL_BUF: usize = 64 << 10;
const POOL_KEEP: usize = 64;

// Compact replies carry 32-bit lengths: keep what we send within them.
const _: () = assert!(MAX_STATUS_SPAN <= u32::MAX as u64);
const _: () = assert!((MAX_PAYLOAD as u64) < u32::MAX as u64 - 8);

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

/// A condition variable that counts its waiters, so that a notice when
/// nobody waits (the usual case, one per request) costs no system call:
/// std's `Condvar` makes one on every notice.
#[derive(Default)]
pub(super) struct Signal {
    cv: Condvar,
    waiters: AtomicUsize,
}

impl Signal {
    /// Wait for a notice; `guard` locks the state that notifiers change.
    pub(super) fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.counted(|| self.cv.wait(guard).unwrap_or_else(PoisonError::into_inner))
    }

    /// [`Self::wait`], for at most `limit`.
    pub(super) fn wait_timeout<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        limit: std::time::Duration,
    ) -> MutexGuard<'a, T> {
        self.counted(|| {
            let waited = self.cv.wait_timeout(guard, limit);
            waited.unwrap_or_else(PoisonError::into_inner).0
        })
    }

    /// Count this thread as a waiter while it waits. Counted under the
    /// lock: a notifier that changes the state after this thread let go
    /// of it sees the count.
    fn counted<R>(&self, wait: impl FnOnce() -> R) -> R {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let woken = wait();
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        woken
    }

    /// Wake every waiter; call once the state has changed under its lock
    /// (holding it still, or after letting go).
    pub(super) fn notify_all(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.cv.notify_all();
        }
    }
}

struct Budget {
    requests: usize,
    bytes: usize,
    /// What replies waiting to be sent cost (see `reply_cost`).
    replies: usize,
}

/// When a connection last took a request, how many requests and replies
/// it has under way, and since when it waits for a write's payload: what
/// the server's watchdog looks at (idle clients, stalled payloads).
pub struct Activity {
    since: std::time::Instant,
    last_ms: std::sync::atomic::AtomicU64,
    in_flight: std::sync::atomic::AtomicUsize,
    /// Transmission has begun (negotiation has its own deadline).
    started: AtomicBool,
    /// When (ms since `since`, plus one) a payload read began to wait;
    /// 0 when none is waiting.
    payload_from: std::sync::atomic::AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            since: std::time::Instant::now(),
            last_ms: Default::default(),
            in_flight: Default::default(),
            started: AtomicBool::new(false),
            payload_from: Default::default(),
        }
    }
}

impl Activity {
    fn now_ms(&self) -> u64 {
        self.since.elapsed().as_millis() as u64
    }

    /// A write's payload is not all here: reading it may wait.
    fn payload_waits(&self) {
        self.payload_from.store(self.now_ms() + 1, Ordering::SeqCst);
    }

    fn payload_read(&self) {
        self.payload_from.store(0, Ordering::SeqCst);
    }

    /// How long a payload read has waited, if one does: a client that
    /// sends a write's header and then nothing holds the write's budget.
    pub fn payload_stalled_for(&self) -> Option<std::time::Duration> {
        match self.payload_from.load(Ordering::SeqCst) {
            0 => None,
            from => Some(std::time::Duration::from_millis(
                self.now_ms().saturating_sub(from - 1),
            )),
        }
    }

    fn took(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.touch();
    }

    fn gave(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.touch();
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::SeqCst);
    }

    /// How long nothing has been asked or answered, if transmission has
    /// begun and nothing (request or reply) is under way.
    pub fn idle_for(&self) -> Option<std::time::Duration> {
        if !self.started.load(Ordering::SeqCst) || self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let last = std::time::Duration::from_millis(self.last_ms.load(Ordering::SeqCst));
        Some(self.since.elapsed().saturating_sub(last))
    }
}

/// One connection in transmission.
pub struct Connection {
    me: Weak<Connection>,
    export: Arc<Export>,
    agreed: Agreed,
    shared: Arc<Shared>,
    out: Mutex<Sender>,
    /// Replies waiting for the thread that is sending.
    queued: Mutex<Queue>,
    writer: Mutex<Writer>,
    writer_wake: Condvar,
    /// Requests the ring has done, waiting for a worker to reply.
    completed: Mutex<Vec<Completed>>,
    reply_scheduled: AtomicBool,
    budget: Mutex<Budget>,
    budget_freed: Signal,
    /// A reply could not be sent: stop reading requests.
    broken: AtomicBool,
    activity: Arc<Activity>,
}

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

impl Connection {
    pub fn new(
        export: Arc<Export>,
        agreed: Agreed,
        out: Box<dyn ReplySink>,
        shared: Arc<Shared>,
    ) -> Arc<Self> {
        Self::watched(export, agreed, out, shared, Arc::default())
    }

    /// [`Self::new`], recording its requests in `activity`.
    pub fn watched(
        export: Arc<Export>,
        agreed: Agreed,
        out: Box<dyn ReplySink>,
        shared: Arc<Shared>,
        activity: Arc<Activity>,
    ) -> Arc<Self> {
        activity.touch();
        activity.started.store(true, Ordering::SeqCst);
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            export,
            agreed,
            shared,
            out: Mutex::new(Sender::new(out)),
            queued: Mutex::new(Queue::default()),
            writer: Mutex::new(Writer::default()),
            writer_wake: Condvar::new(),
            completed: Mutex::new(Vec::new()),
            reply_scheduled: AtomicBool::new(false),
            budget: Mutex::new(Budget {
                requests: 0,
                bytes: 0,
                replies: 0,
            }),
            budget_freed: Signal::default(),
            broken: AtomicBool::new(false),
            activity,
        })
    }

    fn structured(&self) -> bool {
        self.agreed.structured || self.agreed.extended
    }

    /// Wait for room for one more request of `bytes` payload, then take
    /// it; the payload is allocated only after this.
    fn take_budget(&self, bytes: usize) {
        let mut b = lock(&self.budget);
        while !Self::room(&b, bytes) {
            b = self.budget_freed.wait(b);
        }
        b.requests += 1;
        b.bytes += bytes;
        drop(b);
        self.shared.take_bytes(bytes);
        self.activity.took();
    }

    /// [`Self::take_budget`] if that needs no waiting.
    fn try_take_budget(&self, bytes: usize) -> bool {
        let mut b = lock(&self.budget);
        if !Self::room(&b, bytes) || !self.shared.try_take_bytes(bytes) {
            return false;
        }
        b.requests += 1;
        b.bytes += bytes;
        self.activity.took();
        true
    }

    fn room(b: &Budget, bytes: usize) -> bool {
        let held = b.bytes + b.replies;
        b.requests < MAX_IN_FLIGHT && (held == 0 || held + bytes <= MAX_IN_FLIGHT_BYTES)
    }

    fn give_budget(&self, bytes: usize) {
        self.shared.give_bytes(bytes);
        self.activity.gave();
        let mut b = lock(&self.budget);
        b.requests -= 1;
        b.bytes -= bytes;
        self.budget_freed.notify_all();
    }

    /// Replies of this cost wait to be sent (taken without waiting: the
    /// request they answer held its budget until now).
    fn hold_reply_bytes(&self, cost: usize) {
        self.shared.add_bytes(cost);
        // Not idle while a reply waits to be sent (a slow reader).
        self.activity.took();
        lock(&self.budget).replies += cost;
    }

    fn release_reply_bytes(&self, cost: usize) {
        self.shared.give_bytes(cost);
        self.activity.gave();
        let mut b = lock(&self.budget);
        b.replies -= cost;
        self.budget_freed.notify_all();
    }

    /// Wait until every request handed to the workers has been answered
    /// and every answer sent (or dropped with a cut connection); then end
    /// the writer thread.
    fn drain(&self) {
        let mut b = lock(&self.budget);
        while b.requests > 0 || b.replies > 0 {
            b = self.budget_freed.wait(b);
        }
        drop(b);
        self.close_writer();
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
/// With a ring (the connection's own, read through by `input`), plain
/// reads and writes go to it. Returns once every request handed out has
/// been answered.
pub fn serve_requests<R: Read>(
    conn: &Arc<Connection>,
    input: &mut BufReader<R>,
    ring: Option<Rc<RefCell<ConnRing>>>,
) -> End {
    let mut gathered = Gathered::new(ring);
    let end = request_loop_batched(conn, input, &mut gathered);
    gathered.finish_all();
    conn.drain();
    end
}

/// Requests for the ring gather while more are buffered, up to this many.
const MAX_BATCH: usize = 64;

/// Answer a request the reader refuses itself. Such answers take no
/// request budget, so first wait while the replies already waiting for
/// the client are past the budget: a client that sends bad requests and
/// never reads cannot make us hold their answers without bound.
fn refuse_here(conn: &Connection, g: &mut Gathered, req: &Request, f: Failure) {
    g.submit();
    while lock(&conn.budget).replies > MAX_IN_FLIGHT_BYTES && !conn.broken.load(Ordering::SeqCst) {
        g.wait_for_budget(conn);
    }
    conn.reply_error(req, f);
}

/// Take budget for a request, waiting for it if need be.
fn take_budget(conn: &Connection, g: &mut Gathered, bytes: usize) {
    if g.ring.is_none() {
        return conn.take_budget(bytes);
    }
    // Only this thread answers the ring's requests: wait by doing so.
    while !conn.try_take_budget(bytes) {
        g.wait_for_budget(conn);
    }
}

/// The request loop; requests for the ring gather in `g` while more
/// are already buffered, and go to the ring together. Gathered requests
/// hold budget and keep online operations waiting, so they go to the ring
/// before anything here may wait.
fn request_loop_batched<R: Read>(
    conn: &Arc<Connection>,
    input: &mut BufReader<R>,
    g: &mut Gathered,
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
        if input.buffer().len() < header_len || g.ops.len() >= MAX_BATCH {
            // Nothing more without waiting: let the ring start on these.
            g.submit();
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
                g.submit();
                if skip(input, req.length).is_err() {
                    return End::IoError;
                }
                let why = if req.kind == CMD_WRITE {
                    "write longer than the maximum payload"
                } else {
                    "this command takes no payload"
                };
                refuse_here(conn, g, &req, failure(EINVAL, why));
                continue;
            }
            let len = req.length as usize;
            take_budget(conn, g, len);
            let mut buf = conn.shared.buffer(len);
            let waits = input.buffer().len() < len;
            if waits {
                g.submit();
                conn.activity.payload_waits();
            }
            let read = input.read_exact(&mut buf.as_mut_slice()[..len]);
            if waits {
                conn.activity.payload_read();
            }
            if read.is_err() {
                // Cut off in the middle of a write: nothing was acknowledged.
                conn.give_budget(len);
                return End::IoError;
            }
            payload = Some((buf, len));
        } else if req.kind == CMD_WRITE {
            refuse_here(conn, g, &req, failure(EINVAL, "WRITE without a payload"));
            continue;
        }
        let bytes = payload.as_ref().map_or(0, |p| p.1);
        // A payload took its budget before it was read.
        let budgeted = payload.is_some();
        let refuse = |g: &mut Gathered, f: Failure| {
            if budgeted {
                conn.give_budget(bytes);
            }
            refuse_here(conn, g, &req, f);
        };
        if conn.shared.stop.load(Ordering::SeqCst) {
            refuse(g, failure(ESHUTDOWN, "the server is stopping"));
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
            refuse(g, failure(EINVAL, format!("unknown command {}", req.kind)));
            continue;
        }
        let extra = req.flags & !allowed_flags(req.kind, extended);
        if extra != 0 || (req.flags & CMD_FLAG_DF != 0 && !conn.structured()) {
            refuse(g, failure(EINVAL, format!("unexpected flags {extra:#x}")));
            continue;
        }
        // A read's reply may wait in memory: it counts like a payload.
        let bytes = if req.kind == CMD_READ {
            req.length.min(u64::from(MAX_PAYLOAD)) as usize
        } else {
            bytes
        };
        if !budgeted {
            take_budget(conn, g, bytes);
        }
        let guard = BudgetGuard {
            conn: conn.clone(),
            bytes,
        };
        let (payload, guard) = match conn.try_queue(g, req, payload, guard) {
            Ok(op) => {
                g.ops.push(op);
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
                if let Some(mut out) = try_lock(&c.out) {
                    out.sink.abort();
                }
            }
            drop(guard);
        }));
    }
}
