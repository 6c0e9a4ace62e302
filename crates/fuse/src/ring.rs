//! FUSE over io_uring (Linux 6.14+, with the fuse module's `enable_uring`
//! parameter set).
//!
//! Over /dev/fuse every request costs a read() and a write() by a worker
//! thread, and a worker blocks in the disk I/O. Here the kernel hands each
//! request to a per-CPU queue of registered buffers and takes the answer
//! and the next request in one io_uring command. At most [`RING_THREADS`]
//! threads serve all the queues (see [`queues_served`]): plain reads
//! and in-place writes of the image go on the same ring, straight into or
//! out of the request's registered buffer, so the thread never waits for
//! the disk. What needs the image layer's logic
//! (allocation, copy-up, discard, flush) goes to a few helper threads.
//!
//! fuser owns the mount and answers INIT. Once the queues run, /dev/fuse
//! carries only FORGET and INTERRUPT: the first ring thread reads it too,
//! so that no fuser worker has to wait on it (see [`Queues::start_if_negotiated`]).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, UNIX_EPOCH};

use fuser::Errno;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use ploop_image::Segment;
use ploop_io::AlignedBuf;
use rustix::event::{eventfd, EventfdFlags};
use tracing::{debug, error, warn};

use crate::file::DiskFile;
use ploop_image::served::InFlight;
use ploop_image::throttle::IoKind;
use ploop_uring::busy_poll::BusyPoll;

/// Requests in flight over all queues (each has a buffer of the largest
/// request), and the most one queue takes.
const TOTAL_DEPTH: usize = 128;
const MAX_DEPTH: usize = 32;

/// Ring threads per disk at most, whatever the CPUs. A host serves many
/// disks, and a loop device sends its requests from one worker at a time:
/// two threads sharing every queue took all a disk gave on two CPUs (see
/// [`queues_served`]), and a thread per CPU would make an idle disk cost
/// as many threads as the host has CPUs.
const RING_THREADS: usize = 2;

use crate::abi::{self, *};
use zerocopy::FromZeros;

const CMD_REGISTER: u32 = FUSE_IO_URING_CMD_REGISTER;
const CMD_COMMIT_AND_FETCH: u32 = FUSE_IO_URING_CMD_COMMIT_AND_FETCH;
const HEADER_LEN: usize = size_of::<UringReqHeader>();

/// File pieces one request may have in flight on the ring; a request cut
/// into more (small clusters) goes to a helper.
const MAX_SEGMENTS: usize = 16;

use ploop_uring::QUEUE_ALIGN;

// user_data: what completed, in the top byte; the slot and piece below.
const KIND_CMD: u64 = 1 << 56;
const KIND_IO: u64 = 2 << 56;
const KIND_WAKE: u64 = 3 << 56;
const KIND_FSYNC: u64 = 4 << 56;
const KIND_DEV: u64 = 5 << 56;
const KIND_MASK: u64 = 0xff << 56;

/// The queues, made before the mount's INIT so that INIT only asks the
/// kernel for io_uring when they exist.
pub struct Queues {
    file: Arc<DiskFile>,
    /// /dev/fuse of the session (a duplicate), set once it is mounted.
    device: OnceLock<OwnedFd>,
    /// INIT asked the kernel for io_uring.
    negotiated: AtomicBool,
    prepared: Mutex<Vec<Queue>>,
    payload_len: usize,
    helpers: usize,
    /// Ring threads started and not yet returned.
    running: Arc<AtomicUsize>,
}

/// Why FUSE over io_uring cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("FUSE over io_uring: the fuse module does not offer it ({ENABLE_URING} is not Y)")]
    NotOffered,
    #[error("FUSE over io_uring: counting CPUs: {0}")]
    Cpus(#[source] std::io::Error),
    #[error("FUSE over io_uring: setting up ring thread {index}: {err}")]
    Queue {
        index: usize,
        #[source]
        err: std::io::Error,
    },
    #[error(
        "FUSE over io_uring: request buffers of {0} bytes are below the 4 KiB the protocol needs"
    )]
    Payload(usize),
}

impl Queues {
    /// Queues for every possible CPU (the kernel wants all of them before it
    /// sends a request over the ring), or None with the reason logged.
    pub fn prepare(
        file: Arc<DiskFile>,
        payload_len: usize,
        helpers: usize,
    ) -> Result<Arc<Queues>, Error> {
        if !kernel_offers() {
            return Err(Error::NotOffered);
        }
        if payload_len < 4096 {
            return Err(Error::Payload(payload_len));
        }
        let cpus = possible_cpus().map_err(Error::Cpus)?;
        // Buffers on CPUs that never send a request are never touched.
        let depth = (TOTAL_DEPTH / cpus).clamp(4, MAX_DEPTH);
        let threads = cpus.min(RING_THREADS);
        let mut prepared = Vec::with_capacity(threads);
        for index in 0..threads {
            let qids = queues_served(index, threads, cpus, depth);
            let q =
                Queue::new(index, &qids, payload_len).map_err(|err| Error::Queue { index, err })?;
            prepared.push(q);
        }
        Ok(Arc::new(Queues {
            helpers: helpers.max(1),
            file,
            device: OnceLock::new(),
            negotiated: AtomicBool::new(false),
            prepared: Mutex::new(prepared),
            payload_len,
            running: Arc::new(AtomicUsize::new(0)),
        }))
    }

    /// Called by INIT: whether to ask the kernel for io_uring (the kernel's
    /// buffers must fit ours). Until the queues are started, the kernel
    /// holds new requests back.
    pub fn negotiate(&self, max_write: u32, max_pages: usize) -> bool {
        let need = (max_write as usize)
            .max(max_pages.saturating_mul(4096))
            .max(8192);
        let yes = need <= self.payload_len;
        self.negotiated.store(yes, Ordering::SeqCst);
        yes
    }

    /// Once the session is mounted (fuser answers INIT while mounting):
    /// start the queues if INIT asked for io_uring. An error means the
    /// mount cannot answer requests.
    ///
    /// When they start, the first ring thread also reads /dev/fuse, where
    /// the kernel then sends only FORGET and INTERRUPT (neither needs an
    /// answer from a filesystem of one file whose requests all complete):
    /// the caller must not run fuser's session loop on it as well.
    pub fn start_if_negotiated(self: &Arc<Self>, device: impl AsFd) -> io::Result<bool> {
        if !self.negotiated.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let fd = device.as_fd().try_clone_to_owned()?;
        let fd = self.device.get_or_init(|| fd).as_raw_fd();
        self.start(fd)?;
        Ok(true)
    }

    /// Every ring thread has returned: the connection is gone.
    pub fn stopped(&self) -> bool {
        self.running.load(Ordering::SeqCst) == 0
    }

    fn start(self: &Arc<Self>, fd: RawFd) -> io::Result<()> {
        let jobs = Arc::new(Helpers::new(self.file.clone(), self.helpers));
        let mut queues: Vec<Queue> = std::mem::take(&mut *self.prepared.lock().expect("queues"));
        if let Some(first) = queues.first_mut() {
            // Big enough for any request the kernel may put there (it
            // refuses reads below max_write and the headers).
            first.dev = Some(AlignedBuf::zeroed(self.payload_len + 4096));
        }
        for q in queues {
            let this = self.clone();
            let jobs = jobs.clone();
            let index = q.index;
            let running = self.running.clone();
            running.fetch_add(1, Ordering::SeqCst);
            let spawned = std::thread::Builder::new()
                .name(format!("fuse-ring-{index}"))
                .spawn(move || {
                    // Not pinned to the queue's CPU: the scheduler may run
                    // it on another one that is idle (measured: 10% more
                    // 4 KiB random reads, 7-12% more 1 MiB throughput on
                    // two CPUs, where the loop worker and the application
                    // compete for the queue's CPU).
                    // Commands, the wake read or file I/O may still point at
                    // the queue's buffers however run ends (a panic
                    // included): they are never freed.
                    // Counted out however run ends (a panic included), so
                    // that shutdown sees the connection's threads gone.
                    let _out = CountedOut(running);
                    ploop_uring::keep_forever(q, |q| q.run(fd, &this.file, &jobs));
                });
            // The kernel waits for every queue: without this one, requests
            // would hang.
            if let Err(e) = spawned {
                self.running.fetch_sub(1, Ordering::SeqCst);
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Takes one from the count of running ring threads when dropped.
struct CountedOut(Arc<AtomicUsize>);

impl Drop for CountedOut {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The kernel queue of each of ring thread `index`'s buffers, where every
/// queue gets `depth` buffers: half from the thread that owns it (queue
/// `q` belongs to thread `q % threads`), half from the thread before that
/// one.
///
/// The kernel hands a request to the queue of the CPU that sends it, and
/// a loop device sends all of its requests from one worker: with one
/// thread per queue, that thread did all the work while the others idled.
/// The kernel takes any free buffer of the queue, whichever thread
/// registered it, so two threads share every queue (measured on two
/// CPUs, 8 paired rounds: 4 KiB random reads +2% to +14%, mean +9%, in
/// every round; random writes within the noise).
fn queues_served(index: usize, threads: usize, cpus: usize, depth: usize) -> Vec<u16> {
    let mut qids = Vec::new();
    for q in 0..cpus {
        let owner = q % threads;
        let other = (owner + threads - 1) % threads;
        if owner == index {
            qids.extend(std::iter::repeat_n(q as u16, depth - depth / 2));
        }
        if other == index {
            qids.extend(std::iter::repeat_n(q as u16, depth / 2));
        }
    }
    qids
}

/// Whether the fuse module lets a connection use io_uring.
const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

fn kernel_offers() -> bool {
    std::fs::read_to_string(ENABLE_URING)
        .map(|s| s.trim() == "Y" || s.trim() == "1")
        .unwrap_or(false)
}

/// The kernel makes one queue per possible CPU.
fn possible_cpus() -> io::Result<usize> {
    let list = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut max = None;
    for part in list.trim().split(',') {
        let last = part.rsplit('-').next().unwrap_or(part);
        let n: usize = last
            .parse()
            .map_err(|_| io::Error::other(format!("bad CPU list {list:?}")))?;
        max = max.max(Some(n));
    }
    max.map(|n| n + 1)
        .ok_or_else(|| io::Error::other("no CPUs listed"))
}

/// What became of a read or write the queue tried to do itself.
enum Planned {
    /// File I/O under way; answered when it completes.
    Started,
    /// Nothing to do on disk: answer now.
    Answer(Result<usize, i32>),
    /// Needs the image layer's logic, or would wait: a helper does it.
    Helper,
}

/// Plain file I/O under way for one request.
struct Pending {
    /// Where the request lies on the disk.
    offset: u64,
    segments: Vec<Segment>,
    remaining: usize,
    failed: Option<i32>,
    write: bool,
    len: usize,
    in_flight: InFlight,
}

/// struct iovec, held as plain numbers so that a queue can move to its
/// thread (the memory it points at belongs to the same slot).
#[repr(C)]
struct IoVec {
    base: u64,
    len: u64,
}
const _: () = assert!(std::mem::size_of::<IoVec>() == std::mem::size_of::<libc::iovec>());

/// One registered request buffer.
struct Slot {
    /// Header area (the kernel's struct fuse_uring_req_header).
    header: AlignedBuf,
    /// Payload area; lent to a helper while it works on the request.
    payload: Option<AlignedBuf>,
    /// The two areas as the kernel reads them at registration.
    iov: [IoVec; 2],
    io: Option<Pending>,
    /// An fsync of the top delta's file on this ring, in flight.
    fsync: Option<InFlight>,
    /// The command last submitted for this slot (resubmitted on EAGAIN).
    last: Cmd,
    /// Connection gone: no command of this slot is pending any more.
    dead: bool,
    /// The kernel's queue this buffer serves.
    qid: u16,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cmd {
    Register,
    Commit,
}

/// One ring thread: its buffers (registered with the kernel queues of
/// [`queues_served`]) and the ring their commands and file I/O go on.
struct Queue {
    /// Which of the ring threads this is (for logs).
    index: usize,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    slots: Vec<Slot>,
    done: Arc<Completions>,
    /// Where the armed read of the helpers' eventfd lands.
    counter: Box<[u8; 8]>,
    poll: BusyPoll,
    /// Where the armed read of /dev/fuse lands (the first thread only).
    dev: Option<AlignedBuf>,
}

/// Helpers' answers, waiting for their queue thread.
struct Completions {
    list: Mutex<Vec<Done>>,
    wake: OwnedFd,
}

/// Work for a helper thread.
struct Job {
    to: Arc<Completions>,
    slot: usize,
    what: Work,
    payload: AlignedBuf,
}

enum Work {
    Read { offset: u64, len: usize },
    Write { offset: u64, len: usize },
    Fsync,
    Fallocate { offset: u64, length: u64, mode: i32 },
}

struct Done {
    slot: usize,
    payload: AlignedBuf,
    /// Payload bytes of the answer, or a positive errno.
    result: Result<usize, i32>,
}

impl Queue {
    fn new(index: usize, qids: &[u16], payload_len: usize) -> io::Result<Queue> {
        let depth = qids.len();
        // Room for every slot's command plus its file I/O, and the wake.
        // See busy_poll::build_ring for how completions reach the thread.
        let ring = ploop_uring::busy_poll::build_ring(
            IoUring::<squeue::Entry128, cqueue::Entry>::builder()
                .setup_cqsize((depth * (MAX_SEGMENTS + 1) + 1) as u32),
            (depth * 4) as u32,
        )?;
        // File I/O the kernel cannot start without blocking (an O_DIRECT
        // write that updates the file's times, say) goes to io-wq workers;
        // let as many run as requests can be in flight.
        let mut workers = [(depth * 2) as u32, (depth * 2) as u32];
        if let Err(e) = ring.submitter().register_iowq_max_workers(&mut workers) {
            debug!("io-wq worker limit: {e}");
        }
        let mut slots = Vec::with_capacity(depth);
        for &qid in qids {
            let mut header = AlignedBuf::zeroed(4096);
            let mut payload = AlignedBuf::zeroed(payload_len);
            let iov = [
                IoVec {
                    base: header.as_mut_slice().as_mut_ptr() as u64,
                    len: HEADER_LEN as u64,
                },
                IoVec {
                    base: payload.as_mut_slice().as_mut_ptr() as u64,
                    len: payload_len as u64,
                },
            ];
            slots.push(Slot {
                header,
                payload: Some(payload),
                iov,
                io: None,
                fsync: None,
                last: Cmd::Register,
                dead: false,
                qid,
            });
        }
        let done = Arc::new(Completions {
            list: Mutex::new(Vec::new()),
            wake: eventfd(0, EventfdFlags::CLOEXEC)?,
        });
        Ok(Queue {
            index,
            ring,
            slots,
            done,
            counter: Box::new([0; 8]),
            poll: BusyPoll::default(),
            dev: None,
        })
    }

    fn push(&mut self, sqe: squeue::Entry128) {
        loop {
            // SAFETY: every buffer an entry points at (slot headers and
            // payloads, their iovecs, the wake counter, the /dev/fuse read
            // buffer) is owned by this queue, which is never freed
            // (`keep_forever` leaks it), so it outlives any operation, even
            // one still armed when run() returns.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                error!("FUSE ring thread {}: submit: {e}", self.index);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn register(&mut self, fd: RawFd, slot: usize) {
        let iov = self.slots[slot].iov.as_ptr() as u64;
        let sqe = opcode::UringCmd80::new(types::Fd(fd), CMD_REGISTER)
            .cmd(cmd_req(0, self.slots[slot].qid))
            .addr(Some(iov))
            .build()
            .user_data(KIND_CMD | (slot as u64) << 16);
        self.slots[slot].last = Cmd::Register;
        self.push(with_len(sqe, 2));
    }

    /// Answer the request in `slot` and ask for the next one.
    fn commit(&mut self, fd: RawFd, slot: usize, result: Result<usize, i32>) {
        let s = &mut self.slots[slot];
        s.last = Cmd::Commit;
        let mut h: UringReqHeader = abi::read(s.header.as_slice());
        let unique = abi::read::<InHeader>(&h.in_out).unique;
        let commit_id = h.ring_ent_in_out.commit_id;
        let (error, len) = match result {
            Ok(n) => (0i32, n),
            Err(e) => (-e, 0),
        };
        let out = OutHeader {
            len: (size_of::<OutHeader>() + len) as u32,
            error,
            unique,
        };
        abi::write(&mut h.in_out, &out);
        h.ring_ent_in_out.payload_sz = len as u32;
        abi::write(s.header.as_mut_slice(), &h);
        self.submit_commit(fd, slot, commit_id);
    }

    /// (Re)submit the answer already in the slot's header.
    fn submit_commit(&mut self, fd: RawFd, slot: usize, commit_id: u64) {
        let sqe = opcode::UringCmd80::new(types::Fd(fd), CMD_COMMIT_AND_FETCH)
            .cmd(cmd_req(commit_id, self.slots[slot].qid))
            .build()
            .user_data(KIND_CMD | (slot as u64) << 16);
        self.push(sqe);
    }

    fn arm_wake(&mut self) {
        let sqe = opcode::Read::new(
            types::Fd(self.done.wake.as_raw_fd()),
            self.counter.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(KIND_WAKE);
        self.push(squeue::Entry128::from(sqe));
    }

    fn arm_dev(&mut self, fd: RawFd) {
        let Some(buf) = self.dev.as_mut() else {
            return;
        };
        let sqe = opcode::Read::new(
            types::Fd(fd),
            buf.as_mut_slice().as_mut_ptr(),
            buf.len() as u32,
        )
        .build()
        .user_data(KIND_DEV);
        self.push(squeue::Entry128::from(sqe));
    }

    /// A read of /dev/fuse completed with `res`: whether to read again.
    fn dev_request(&mut self, fd: RawFd, res: i32) -> bool {
        if res == -libc::EINTR || res == -libc::EAGAIN || res == -libc::ENOENT {
            return true;
        }
        let Some(buf) = self.dev.as_ref() else {
            return false;
        };
        if res < size_of::<InHeader>() as i32 {
            // ENODEV, ECONNABORTED: unmounted. Anything else stops the
            // reads too (FORGETs then wait in the kernel): say so.
            if res == -libc::ENODEV || res == -libc::ECONNABORTED {
                debug!("FUSE ring thread {}: /dev/fuse closed", self.index);
            } else {
                warn!(
                    "FUSE ring thread {}: reading /dev/fuse stopped: {res}",
                    self.index
                );
            }
            return false;
        }
        let header: InHeader = abi::read(buf.as_slice());
        match header.opcode {
            FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => {}
            other => {
                // Not expected once the queues run: say it is not done
                // rather than leave the caller waiting.
                error!(
                    "FUSE ring thread {}: request {other} over /dev/fuse: ENOSYS",
                    self.index
                );
                let out = OutHeader {
                    len: size_of::<OutHeader>() as u32,
                    error: -libc::ENOSYS,
                    unique: header.unique,
                };
                let mut bytes = [0u8; size_of::<OutHeader>()];
                abi::write(&mut bytes, &out);
                // SAFETY: writes `bytes`, a live local buffer of that
                // length, to the FUSE device descriptor.
                let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
                if n < 0 {
                    debug!(
                        "FUSE ring thread {}: answer over /dev/fuse: {}",
                        self.index,
                        io::Error::last_os_error()
                    );
                }
            }
        }
        true
    }

    fn run(&mut self, fd: RawFd, file: &Arc<DiskFile>, jobs: &Arc<Helpers>) {
        for slot in 0..self.slots.len() {
            self.register(fd, slot);
        }
        self.arm_wake();
        self.arm_dev(fd);
        let mut live = self.slots.len();
        let mut completed: Vec<(u64, i32)> = Vec::with_capacity(self.slots.len() * 4);
        // Runs until the connection ends every slot's command; the caller
        // keeps the buffers alive after that (anything may still be armed).
        while live > 0 {
            if let Err(e) = self
                .poll
                .wait(&mut self.ring, None, |ring| ring.submit_and_wait(1))
            {
                if e.raw_os_error() != Some(libc::EINTR) {
                    // EAGAIN, EBUSY, ENOMEM: the kernel is short of
                    // something for now.
                    error!("FUSE ring thread {}: wait: {e}", self.index);
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            completed.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for (data, res) in completed.drain(..) {
                // Start the file I/O of the requests handled so far before
                // parsing the next: the disk works while this thread does.
                if !self.ring.submission().is_empty() {
                    if let Err(e) = self.ring.submit() {
                        debug!("FUSE ring thread {}: submit: {e}", self.index);
                    }
                }
                let slot = ((data >> 16) & 0xff_ffff) as usize;
                match data & KIND_MASK {
                    KIND_CMD if res == 0 => self.request(fd, slot, file, jobs),
                    KIND_CMD if res == -libc::EAGAIN || res == -libc::EINTR => {
                        // Before the kernel had INIT's answer, say: again.
                        std::thread::sleep(Duration::from_millis(1));
                        match self.slots[slot].last {
                            Cmd::Register => self.register(fd, slot),
                            Cmd::Commit => {
                                let h = self.slots[slot].header.as_slice();
                                let commit_id =
                                    abi::read::<UringReqHeader>(h).ring_ent_in_out.commit_id;
                                self.submit_commit(fd, slot, commit_id);
                            }
                        }
                    }
                    KIND_CMD
                        if res != -libc::ENOTCONN
                            && res != -libc::ECONNABORTED
                            && res != -libc::ECANCELED
                            && self.slots[slot].last == Cmd::Commit =>
                    {
                        // The kernel refused an answer (the request was
                        // interrupted meanwhile, say): the slot goes back
                        // to taking requests.
                        debug!(
                            "FUSE ring thread {}: answer refused: errno {}",
                            self.index, -res
                        );
                        self.register(fd, slot);
                    }
                    KIND_CMD => {
                        // The connection is gone (or refuses the buffers).
                        if res != -libc::ENOTCONN && res != -libc::ECONNABORTED {
                            error!(
                                "FUSE ring thread {}: slot {slot} ended: errno {}",
                                self.index, -res
                            );
                        }
                        if !self.slots[slot].dead {
                            self.slots[slot].dead = true;
                            live -= 1;
                        }
                    }
                    KIND_IO => self.io_done(fd, slot, (data & 0xffff) as usize, res),
                    KIND_FSYNC => self.fsync_done(fd, slot, res),
                    KIND_DEV if self.dev_request(fd, res) => self.arm_dev(fd),
                    KIND_WAKE => {
                        let done: Vec<Done> =
                            std::mem::take(&mut *self.done.list.lock().expect("completions"));
                        for d in done {
                            self.slots[d.slot].payload = Some(d.payload);
                            self.commit(fd, d.slot, d.result);
                        }
                        self.arm_wake();
                    }
                    _ => {}
                }
            }
        }
        debug!("FUSE ring thread {} stopped", self.index);
    }

    /// A request arrived in `slot`.
    fn request(&mut self, fd: RawFd, slot: usize, file: &Arc<DiskFile>, jobs: &Arc<Helpers>) {
        let h: UringReqHeader = abi::read(self.slots[slot].header.as_slice());
        let opcode = abi::read::<InHeader>(&h.in_out).opcode;
        let op = &h.op_in;
        let in_payload = h.ring_ent_in_out.payload_sz as usize;
        let result: Result<usize, i32> = match opcode {
            FUSE_READ => {
                let ReadIn { offset, size, .. } = abi::read(op);
                let size = size as usize;
                let end = offset.saturating_add(size as u64).min(file.disk.size());
                let len = end.saturating_sub(offset) as usize;
                if len == 0 {
                    Ok(0)
                } else if len > self.payload_len() {
                    Err(libc::EINVAL)
                } else {
                    match self.queue_io(slot, file, offset, len, false) {
                        Planned::Started => return,
                        Planned::Answer(r) => r,
                        Planned::Helper => {
                            return self.hand_to_helper(jobs, slot, Work::Read { offset, len })
                        }
                    }
                }
            }
            FUSE_WRITE => {
                let WriteIn { offset, size, .. } = abi::read(op);
                let len = size as usize;
                if len > in_payload || len > self.payload_len() {
                    Err(libc::EINVAL)
                } else if let Err(e) = file.check_write(offset, len as u64) {
                    Err(e.code())
                } else {
                    match self.queue_io(slot, file, offset, len, true) {
                        Planned::Started => return,
                        Planned::Answer(r) => r,
                        Planned::Helper => {
                            return self.hand_to_helper(jobs, slot, Work::Write { offset, len })
                        }
                    }
                }
            }
            FUSE_FSYNC => {
                if self.queue_fsync(slot, file) {
                    return;
                }
                return self.hand_to_helper(jobs, slot, Work::Fsync);
            }
            FUSE_FALLOCATE => {
                let FallocateIn {
                    offset,
                    length,
                    mode,
                    ..
                } = abi::read(op);
                let mode = mode as i32;
                return self.hand_to_helper(
                    jobs,
                    slot,
                    Work::Fallocate {
                        offset,
                        length,
                        mode,
                    },
                );
            }
            FUSE_GETATTR => Ok(self.reply_attr(slot, file)),
            FUSE_SETATTR => {
                let SetattrIn { valid, size, .. } = abi::read(op);
                if valid & FATTR_SIZE != 0 && size != file.disk.size() {
                    Err(libc::EINVAL)
                } else {
                    Ok(self.reply_attr(slot, file))
                }
            }
            FUSE_OPEN => {
                let OpenIn { flags, .. } = abi::read(op);
                let acc = fuser::OpenFlags(flags as i32).acc_mode();
                match file.check_open(acc) {
                    Ok(()) => Ok(abi::write(
                        self.payload_mut(slot),
                        &OpenOut {
                            open_flags: FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES,
                            ..OpenOut::new_zeroed()
                        },
                    )),
                    Err(e) => Err(e.code()),
                }
            }
            FUSE_LSEEK => {
                let LseekIn { offset, whence, .. } = abi::read(op);
                match file.lseek(offset as i64, whence as i32) {
                    Ok(at) => Ok(abi::write(
                        self.payload_mut(slot),
                        &LseekOut { offset: at as u64 },
                    )),
                    Err(e) => Err(e.code()),
                }
            }
            FUSE_STATFS => Ok(abi::write(
                self.payload_mut(slot),
                &StatfsOut {
                    bsize: 512,
                    namelen: 255,
                    frsize: 512,
                    ..StatfsOut::new_zeroed()
                },
            )),
            FUSE_GETXATTR => Err(libc::ENODATA),
            FUSE_LISTXATTR => {
                // A size of 0 asks how much room the list needs: none.
                if abi::read::<GetxattrIn>(op).size == 0 {
                    Ok(abi::write(
                        self.payload_mut(slot),
                        &GetxattrOut::new_zeroed(),
                    ))
                } else {
                    Ok(0)
                }
            }
            FUSE_RELEASE | FUSE_FLUSH | FUSE_DESTROY => Ok(0),
            FUSE_LOOKUP => Err(libc::ENOENT),
            _ => Err(libc::ENOSYS),
        };
        self.commit(fd, slot, result);
    }

    fn payload_len(&self) -> usize {
        self.slots[0].iov[1].len as usize
    }

    fn payload_mut(&mut self, slot: usize) -> &mut [u8] {
        self.slots[slot]
            .payload
            .as_mut()
            .expect("payload is home while the queue answers")
            .as_mut_slice()
    }

    fn reply_attr(&mut self, slot: usize, file: &DiskFile) -> usize {
        let a = file.attr();
        let t = a.mtime.duration_since(UNIX_EPOCH).unwrap_or_default();
        let out = AttrOut {
            attr_valid: crate::file::TTL.as_secs(),
            attr: Attr {
                ino: a.ino.0,
                size: a.size,
                blocks: a.blocks,
                atime: t.as_secs(),
                mtime: t.as_secs(),
                ctime: t.as_secs(),
                atimensec: t.subsec_nanos(),
                mtimensec: t.subsec_nanos(),
                ctimensec: t.subsec_nanos(),
                mode: S_IFREG | u32::from(a.perm),
                nlink: a.nlink,
                uid: a.uid,
                gid: a.gid,
                blksize: a.blksize,
                ..Attr::new_zeroed()
            },
            ..AttrOut::new_zeroed()
        };
        abi::write(self.payload_mut(slot), &out)
    }

    /// Start plain file I/O for a read or an in-place write, if it can be
    /// planned without waiting.
    fn queue_io(
        &mut self,
        slot: usize,
        file: &Arc<DiskFile>,
        offset: u64,
        len: usize,
        write: bool,
    ) -> Planned {
        self.poll.note_request(len);
        // A limited disk's requests wait in helpers, not on this thread.
        if !offset.is_multiple_of(QUEUE_ALIGN)
            || !(len as u64).is_multiple_of(QUEUE_ALIGN)
            || file.disk.throttle.limited()
        {
            return Planned::Helper;
        }
        // Never wait for the chain here: an online operation holding it may
        // be waiting for I/O only this thread completes.
        let Some(guard) = file.disk.try_chain() else {
            return Planned::Helper;
        };
        let plan = if write {
            guard.plan_write(offset, len as u64)
        } else {
            guard.plan_read(offset, len as u64)
        };
        let plan = match plan {
            // Cut in more pieces than the completion queue has room for.
            Ok(Some(p)) if p.segments.len() > MAX_SEGMENTS => return Planned::Helper,
            Ok(Some(p)) => p,
            // Errors get their message from the helper's synchronous try.
            Ok(None) | Err(_) => return Planned::Helper,
        };
        let (segments, in_flight) = file.disk.begin_queued(&guard, plan);
        drop(guard);
        let payload = self.slots[slot]
            .payload
            .as_mut()
            .expect("payload is home while the queue answers");
        if len > payload.len() || !ploop_uring::segments_fit(&segments, len) {
            // A planner's bug, not input: the helper's synchronous path
            // answers (and reports) it; nothing reaches the kernel.
            return Planned::Helper;
        }
        if !write {
            // Pieces no delta holds read as zeros.
            let mut at = 0;
            for s in &segments {
                payload.as_mut_slice()[at..s.buf_offset].fill(0);
                at = s.buf_offset + s.len;
            }
            payload.as_mut_slice()[at..len].fill(0);
        }
        let base = payload.as_mut_slice().as_mut_ptr();
        let mut sqes = Vec::with_capacity(segments.len());
        for (i, s) in segments.iter().enumerate() {
            // buf_offset + len lies inside the request's range of the
            // payload buffer (checked above), which this slot owns until
            // every piece has completed.
            let sqe = ploop_uring::segment_entry(base, s, !write);
            sqes.push(squeue::Entry128::from(
                sqe.user_data(KIND_IO | (slot as u64) << 16 | i as u64),
            ));
        }
        // Counted (no limit is set: nothing to wait for).
        let kind = if write { IoKind::Write } else { IoKind::Read };
        file.disk.throttle.count(kind, len as u64);
        let n = segments.len();
        if n == 0 {
            // A read of what no delta holds: the zeros are in place. (A
            // write always has pieces, unless it is empty.)
            return Planned::Answer(if write {
                Ok(write_out(payload.as_mut_slice(), len))
            } else {
                Ok(len)
            });
        }
        self.slots[slot].io = Some(Pending {
            offset,
            segments,
            remaining: n,
            failed: None,
            write,
            len,
            in_flight,
        });
        for sqe in sqes {
            self.push(sqe);
        }
        Planned::Started
    }

    fn io_done(&mut self, fd: RawFd, slot: usize, piece: usize, res: i32) {
        let base = self.slots[slot].iov[1].base as *mut u8;
        let Some(p) = self.slots[slot].io.as_mut() else {
            return;
        };
        let s = p.segments[piece];
        // SAFETY: the piece has completed; its range lies in the payload
        // buffer, which the slot owns until every piece has.
        if let Some(e) = unsafe { ploop_uring::segment_done(base, &s, !p.write, res) } {
            p.failed = Some(e);
        }
        p.remaining -= 1;
        if p.remaining > 0 {
            return;
        }
        let p = self.slots[slot].io.take().expect("checked above");
        if p.write {
            // Again now that the data is in place: an online merge that
            // copied the cluster meanwhile must copy it once more.
            p.in_flight.chain().note_written(p.offset, p.len as u64);
        }
        let result = match (p.failed, p.write) {
            (Some(e), _) => Err(e),
            (None, false) => Ok(p.len),
            (None, true) => Ok(write_out(self.payload_mut(slot), p.len)),
        };
        self.commit(fd, slot, result);
    }

    /// A flush that is one data sync goes on this ring (no hand-over to
    /// a helper and back: two wake-ups that, on a CPU a neighbour keeps
    /// busy, cost milliseconds). False: the helper does the whole flush.
    fn queue_fsync(&mut self, slot: usize, file: &Arc<DiskFile>) -> bool {
        if file.disk.throttle.limited() {
            return false;
        }
        // Never wait for the chain here (see queue_io).
        let Some(guard) = file.disk.try_chain() else {
            return false;
        };
        let Some((fd, plan)) = guard.plan_flush() else {
            return false;
        };
        file.disk.throttle.count(IoKind::Flush, 0);
        let (_, in_flight) = file.disk.begin_queued(&guard, plan);
        drop(guard);
        self.slots[slot].fsync = Some(in_flight);
        let sqe = opcode::Fsync::new(types::Fd(fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(KIND_FSYNC | (slot as u64) << 16);
        self.push(squeue::Entry128::from(sqe));
        true
    }

    fn fsync_done(&mut self, fd: RawFd, slot: usize, res: i32) {
        let Some(in_flight) = self.slots[slot].fsync.take() else {
            return;
        };
        if res < 0 {
            error!("fsync of the disk's top delta failed: errno {}", -res);
        }
        // A failure stops the delta as a failed flush does (the kernel may
        // have dropped pages it could not write); and a delta that failed
        // meanwhile answers EIO even if this sync found nothing to report.
        let ended = in_flight.chain().end_flush(res >= 0);
        drop(in_flight);
        let result = match (res, ended) {
            (r, _) if r < 0 => Err(-r),
            (_, Err(_)) => Err(libc::EIO),
            _ => Ok(0),
        };
        self.commit(fd, slot, result);
    }

    fn hand_to_helper(&mut self, jobs: &Arc<Helpers>, slot: usize, what: Work) {
        let payload = self.slots[slot]
            .payload
            .take()
            .expect("payload is home while the queue answers");
        let job = Job {
            to: self.done.clone(),
            slot,
            what,
            payload,
        };
        if let Err(job) = jobs.send(job) {
            // No helpers left: answer EIO rather than never.
            self.slots[slot].payload = Some(job.payload);
            error!("FUSE ring thread {}: no helper threads", self.index);
            self.done.list.lock().expect("completions").push(Done {
                slot,
                payload: self.slots[slot].payload.take().expect("just put back"),
                result: Err(libc::EIO),
            });
            let _ = rustix::io::write(&self.done.wake, &1u64.to_ne_bytes());
        }
    }
}

/// The helper threads: synchronous work the ring threads must not wait
/// for (unaligned or unplanned I/O, fsync, fallocate, a limited disk's
/// requests). Started when work finds none idle, up to a most; each
/// leaves after a while with nothing to do, so an idle disk keeps none.
pub(crate) struct Helpers {
    file: Arc<DiskFile>,
    tx: crossbeam_channel::Sender<Job>,
    rx: crossbeam_channel::Receiver<Job>,
    idle: AtomicUsize,
    running: AtomicUsize,
    most: usize,
}

/// How long a helper waits for work before it leaves.
const HELPER_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

impl Helpers {
    fn new(file: Arc<DiskFile>, most: usize) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        Self {
            file,
            tx,
            rx,
            idle: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            most: most.max(1),
        }
    }

    /// Queue a job, starting a helper when more jobs wait than helpers
    /// are idle (a batch handed over at once runs in parallel). Err gives
    /// the job back when it cannot be queued at all.
    fn send(self: &Arc<Self>, job: Job) -> Result<(), Job> {
        self.tx
            .send(job)
            .map_err(crossbeam_channel::SendError::into_inner)?;
        // Sent first, counted after: a helper that leaves checks the queue
        // after it stopped counting as idle, so one of the two sees the job.
        if self.rx.len() > self.idle.load(Ordering::SeqCst) {
            let n = self.running.fetch_add(1, Ordering::SeqCst);
            if n >= self.most {
                self.running.fetch_sub(1, Ordering::SeqCst);
                return Ok(()); // all busy: the job waits for one of them
            }
            let this = self.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("fuse-helper-{n}"))
                .spawn(move || this.work());
            if let Err(e) = spawned {
                self.running.fetch_sub(1, Ordering::SeqCst);
                error!("starting a FUSE helper thread: {e}");
                if self.running.load(Ordering::SeqCst) == 0 {
                    // Nobody else will: run what waits here (each job
                    // answers its own queue and slot).
                    while let Ok(job) = self.rx.try_recv() {
                        run_job(&self.file, job);
                    }
                }
            }
        }
        Ok(())
    }

    fn work(&self) {
        loop {
            self.idle.fetch_add(1, Ordering::SeqCst);
            let got = self.rx.recv_timeout(HELPER_IDLE);
            self.idle.fetch_sub(1, Ordering::SeqCst);
            let job = match got {
                Ok(job) => job,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    self.running.fetch_sub(1, Ordering::SeqCst);
                    match self.rx.try_recv() {
                        // Sent while this one was leaving: stay for it.
                        Ok(job) => {
                            self.running.fetch_add(1, Ordering::SeqCst);
                            job
                        }
                        Err(_) => return,
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    self.running.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
            };
            run_job(&self.file, job);
        }
    }
}

fn run_job(file: &DiskFile, job: Job) {
    let Job {
        to,
        slot,
        what,
        mut payload,
    } = job;
    let work = std::panic::AssertUnwindSafe(|| {
        let buf = payload.as_mut_slice();
        match what {
            Work::Read { offset, len } => file.read(&mut buf[..len], offset).map(|()| len),
            Work::Write { offset, len } => file
                .write(&buf[..len], offset)
                .map(|()| write_out(buf, len)),
            Work::Fsync => file.fsync().map(|()| 0),
            Work::Fallocate {
                offset,
                length,
                mode,
            } => file.fallocate(offset, length, mode).map(|()| 0),
        }
    });
    // A panic answers EIO instead of leaving the request unanswered.
    let result = std::panic::catch_unwind(work).unwrap_or_else(|_| {
        error!("FUSE helper: a request panicked");
        Err(Errno::EIO)
    });
    to.list.lock().expect("completions").push(Done {
        slot,
        payload,
        result: result.map_err(Errno::code),
    });
    let _ = rustix::io::write(&to.wake, &1u64.to_ne_bytes());
}

/// struct fuse_write_out at the start of `buf`: its size.
fn write_out(buf: &mut [u8], written: usize) -> usize {
    abi::write(
        buf,
        &WriteOut {
            size: written as u32,
            padding: 0,
        },
    )
}

/// struct fuse_uring_cmd_req in the command area of the SQE.
fn cmd_req(commit_id: u64, qid: u16) -> [u8; 80] {
    let mut c = [0u8; 80];
    abi::write(
        &mut c,
        &UringCmdReq {
            commit_id,
            qid,
            ..UringCmdReq::new_zeroed()
        },
    );
    c
}

/// Set the `len` field of a 128-byte SQE, which io-uring's UringCmd80
/// builder leaves at zero (the kernel wants the iovec count there).
fn with_len(sqe: squeue::Entry128, len: u32) -> squeue::Entry128 {
    const LEN_AT: usize = 24; // struct io_uring_sqe: len follows addr
    const _: () = assert!(std::mem::size_of::<squeue::Entry128>() == 128);
    // SAFETY: Entry128 is repr(C): a 64-byte struct io_uring_sqe followed
    // by 64 bytes of command data, with no padding and no invalid bit
    // patterns, so it can round-trip through a byte array.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[LEN_AT..LEN_AT + 4].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queue_gets_its_depth_from_two_threads() {
        for cpus in [1, 2, 3, 8, 64] {
            let depth = (TOTAL_DEPTH / cpus).clamp(4, MAX_DEPTH);
            let threads = cpus.min(RING_THREADS);
            let mut per_queue = vec![Vec::new(); cpus];
            let mut total = 0;
            for index in 0..threads {
                let qids = queues_served(index, threads, cpus, depth);
                total += qids.len();
                for q in qids {
                    per_queue[q as usize].push(index);
                }
            }
            assert_eq!(total, depth * cpus, "{cpus} CPUs");
            for (q, threads_of_q) in per_queue.iter_mut().enumerate() {
                assert_eq!(threads_of_q.len(), depth, "queue {q} of {cpus}");
                threads_of_q.sort();
                threads_of_q.dedup();
                let want = threads.min(2);
                assert_eq!(
                    threads_of_q.len(),
                    want,
                    "queue {q} of {cpus}: {threads_of_q:?}"
                );
                assert!(
                    threads_of_q.contains(&(q % threads)),
                    "queue {q} not served by its own thread"
                );
            }
        }
    }
}
