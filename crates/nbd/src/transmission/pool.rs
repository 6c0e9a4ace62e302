//! Who runs requests: a fixed pool of worker threads (or the calling
//! thread, for tests), and what all connections of a server share.

use super::*;

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

/// What all connections of one server share.
pub struct Shared {
    pub(super) exec: Box<dyn Executor>,
    /// Plain reads and in-place writes go through each connection's own
    /// io_uring.
    pub(super) uring: bool,
    /// The server is stopping: new requests get ESHUTDOWN.
    pub(super) stop: Arc<AtomicBool>,
    pub(super) bytes: Mutex<usize>,
    pub(super) bytes_freed: Signal,
    pub(super) buffers: Mutex<Vec<AlignedBuf>>,
}

impl Shared {
    pub fn new(exec: Box<dyn Executor>, uring: bool, stop: Arc<AtomicBool>) -> Arc<Self> {
        Arc::new(Self {
            exec,
            uring,
            stop,
            bytes: Mutex::new(0),
            bytes_freed: Signal::default(),
            buffers: Mutex::new(Vec::new()),
        })
    }

    /// Whether connections use their own io_uring.
    pub fn uring(&self) -> bool {
        self.uring
    }

    pub(super) fn take_bytes(&self, n: usize) {
        let mut used = lock(&self.bytes);
        while *used > 0 && *used + n > MAX_TOTAL_BYTES {
            used = self.bytes_freed.wait(used);
        }
        *used += n;
    }

    /// [`Self::take_bytes`] if that needs no waiting.
    pub(super) fn try_take_bytes(&self, n: usize) -> bool {
        let mut used = lock(&self.bytes);
        if *used > 0 && *used + n > MAX_TOTAL_BYTES {
            return false;
        }
        *used += n;
        true
    }

    /// Count bytes that are already held (replies waiting to be sent).
    pub(super) fn add_bytes(&self, n: usize) {
        *lock(&self.bytes) += n;
    }

    pub(super) fn give_bytes(&self, n: usize) {
        *lock(&self.bytes) -= n;
        self.bytes_freed.notify_all();
    }

    /// An aligned buffer of at least `len` bytes (contents undefined).
    pub(super) fn buffer(&self, len: usize) -> AlignedBuf {
        if len <= SMALL_BUF {
            // Cheap to make, and a pooled one would pin a whole 1 MiB
            // (zeroed, so resident) for each request in flight.
            return AlignedBuf::zeroed(len.next_multiple_of(4096).max(4096));
        }
        if len <= POOLED_BUF {
            if let Some(b) = lock(&self.buffers).pop() {
                return b;
            }
            return AlignedBuf::zeroed(POOLED_BUF);
        }
        AlignedBuf::zeroed(len)
    }

    pub(super) fn recycle(&self, buf: AlignedBuf) {
        if buf.len() == POOLED_BUF {
            let mut pool = lock(&self.buffers);
            if pool.len() < POOL_KEEP {
                pool.push(buf);
            }
        }
    }
}
