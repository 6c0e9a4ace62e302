//! Busy polling before a ring thread sleeps. Sleeping and being woken
//! again costs tens of microseconds on a virtual machine (an exit to the
//! host for the idle CPU, an interrupt to wake it), as much as the rest of
//! a 4 KiB request. So a thread whose waits have often been short of late
//! (a quarter of them or more, in a moving average) spins on its
//! completion queue for up to a limit before it sleeps, much as QEMU
//! polls its event loop. A thread whose waits are long (an idle client or
//! queue) stops spinning after a few of them and costs no CPU; so does one
//! whose last request was large, where the transfer takes the time and the
//! CPU is better left to whoever moves the data.
//!
//! Over NBD, where the client waits for each batch of replies before it
//! sends the next requests, polling takes the server's wake-up out of
//! every round trip: see docs/benchmarks.md for the figures.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use io_uring::{cqueue, squeue, IoUring};

/// The longest spin, process-wide, in nanoseconds; 0 turns polling off.
static LIMIT_NS: AtomicU64 = AtomicU64::new(0);
/// Threads spinning now.
static SPINNING: AtomicUsize = AtomicUsize::new(0);

/// Set how long a ring thread may spin before it sleeps (zero: never).
pub fn set_limit(limit: Duration) {
    LIMIT_NS.store(limit.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
}

/// The process-wide limit.
pub fn limit() -> Duration {
    Duration::from_nanos(LIMIT_NS.load(Relaxed))
}

/// At most half the CPUs (and at least one) spin at once: the others
/// are left to the clients and to the kernel's own threads.
fn max_spinning() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| (n.get() / 2).max(1))
            .unwrap_or(1)
    })
}

/// One thread's polling state: how often its waits have been short of
/// late (a moving average, in 1/1024ths).
#[derive(Default)]
pub struct BusyPoll {
    short: u32,
    /// The last request was large: its transfer, not a wake-up, is what
    /// takes the time, and a spinning thread would take a CPU from the
    /// client (or the kernel) that moves the data.
    large: bool,
    /// A spin found its CPU wanted by another thread (another disk's
    /// daemon, a client): no spinning until then.
    backed_off_until: Option<Instant>,
}

/// A yield that gives the CPU away for longer than this met another
/// thread that wanted it: the CPU is contended.
const CONTENDED: Duration = Duration::from_micros(50);

/// How long a thread that met contention sleeps at once instead of
/// spinning.
const BACK_OFF: Duration = Duration::from_millis(100);

/// A spinning thread yields its CPU this often, so that it spins only on
/// time nobody else wants: other exports' threads (one daemon per mounted
/// disk) and the clients. With two servers and two clients on two CPUs,
/// spinning without yielding lost 5-19% of the random reads that sleeping
/// at once gave; yielding every 20 microseconds lost none.
const YIELD_EVERY: Duration = Duration::from_micros(20);

/// Requests past this size are large.
const LARGE_REQUEST: usize = 64 << 10;

/// Spin while at least this share of recent waits ended within the limit
/// (in 1/1024ths): a quarter.
const SPIN_SHARE: u32 = 256;

impl BusyPoll {
    /// Wait for a completion on `ring`: spin for up to the limit (or
    /// `timeout`, if shorter) while waits have been short of late, then
    /// `sleep` (which submits what is queued and waits in the kernel).
    pub fn wait<S: squeue::EntryMarker, C: cqueue::EntryMarker>(
        &mut self,
        ring: &mut IoUring<S, C>,
        timeout: Option<Duration>,
        sleep: impl FnOnce(&mut IoUring<S, C>) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let limit = limit();
        if limit.is_zero() {
            return sleep(ring);
        }
        let start = Instant::now();
        let spin_for = timeout.map_or(limit, |t| t.min(limit));
        if self.backed_off_until.is_some_and(|t| start < t) {
            return sleep(ring);
        }
        self.backed_off_until = None;
        if self.spins() {
            match spin(ring, start + spin_for) {
                Spun::Came => {
                    self.note(true);
                    return Ok(0);
                }
                Spun::Contended => {
                    // Another thread wants this CPU (a neighbour disk's
                    // daemon, say): leave it the CPU for a while.
                    self.backed_off_until = Some(Instant::now() + BACK_OFF);
                    return sleep(ring);
                }
                Spun::Nothing => {}
            }
        }
        let slept = sleep(ring);
        self.note(start.elapsed() <= limit);
        slept
    }

    /// Whether the next wait spins first.
    fn spins(&self) -> bool {
        self.short >= SPIN_SHARE && !self.large
    }

    /// Note the size of a request handed to the ring.
    pub fn note_request(&mut self, len: usize) {
        self.large = len > LARGE_REQUEST;
    }

    /// Count a wait in the moving average (each weighs 1/8).
    fn note(&mut self, short: bool) {
        self.short -= self.short / 8;
        if short {
            self.short += 1024 / 8;
        }
    }
}

/// Build a ring for a polling thread. Where the kernel can (5.19+), the
/// work that posts completions waits for the thread's next system call
/// instead of interrupting it (COOP_TASKRUN: no inter-processor interrupt
/// per completion, or per FUSE request, while the thread runs), and the
/// ring flags that work (TASKRUN_FLAG), so that a spin sees it and enters
/// the kernel to run it. A sleeping thread is still woken for it.
///
/// Measured in 6 paired rounds on two CPUs against the interrupting kind:
/// FUSE queues +19% 4 KiB random reads and +27% random writes, better in
/// every round, with less CPU per I/O (18 against 22 microseconds); NBD
/// +5% random reads and +15% random writes.
pub fn build_ring<S: squeue::EntryMarker, C: cqueue::EntryMarker>(
    builder: &io_uring::Builder<S, C>,
    entries: u32,
) -> io::Result<IoUring<S, C>> {
    let mut coop = builder.clone();
    coop.setup_coop_taskrun().setup_taskrun_flag();
    match coop.build(entries) {
        // An older kernel.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => builder.build(entries),
        built => built,
    }
}

/// How a spin ended.
#[derive(Debug, PartialEq, Eq)]
enum Spun {
    /// A completion is there.
    Came,
    /// The time ran out, or the spin was not worth starting.
    Nothing,
    /// A yield gave the CPU to another thread for long: it is wanted.
    Contended,
}

/// Submit what is queued, then spin until a completion is there or
/// `until` passes. Gives up at once when enough threads spin already, or
/// when the submission fails (the sleep that follows submits again and
/// reports it), and as soon as a yield shows another thread wanting the
/// CPU.
fn spin<S: squeue::EntryMarker, C: cqueue::EntryMarker>(
    ring: &mut IoUring<S, C>,
    until: Instant,
) -> Spun {
    if SPINNING.fetch_add(1, Relaxed) >= max_spinning() {
        SPINNING.fetch_sub(1, Relaxed);
        return Spun::Nothing;
    }
    let mut contended = false;
    let submitted = ring.submission().is_empty() || ring.submit().is_ok();
    let mut came = false;
    if submitted {
        // SAFETY: `status` reads the ring's head and tail, and the ring
        // outlives it (it is dropped at the end of this function).
        let status = unsafe { ring.completion().status() };
        // The kernel posts completions by task work. On a ring from
        // build_ring that work waits for this thread's next system call,
        // and the ring's TASKRUN flag says it is there; on an older kernel
        // the thread is interrupted to run it.
        let mut next_yield = Instant::now() + YIELD_EVERY;
        // Look before the deadline: a thread preempted since the caller
        // took the time still sees what came meanwhile.
        loop {
            came = !status.is_empty();
            if !came && ring.submission().taskrun() {
                // Completions wait in task work: run it (a failure is
                // reported by the sleep that follows).
                if ring.submit().is_err() {
                    break;
                }
                came = !status.is_empty();
            }
            let now = Instant::now();
            if came || now >= until {
                break;
            }
            if now >= next_yield {
                std::thread::yield_now();
                let after = Instant::now();
                if after - now > CONTENDED {
                    contended = true;
                    break;
                }
                next_yield = after + YIELD_EVERY;
            }
            std::hint::spin_loop();
        }
    }
    SPINNING.fetch_sub(1, Relaxed);
    if came {
        Spun::Came
    } else if contended {
        Spun::Contended
    } else {
        Spun::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spins_while_a_quarter_of_recent_waits_were_short() {
        let mut p = BusyPoll::default();
        p.note(true);
        p.note(true);
        assert!(p.short < SPIN_SHARE, "two short waits are not enough");
        p.note(true);
        assert!(p.short >= SPIN_SHARE);
        for _ in 0..100 {
            p.note(true);
            p.note(false);
        }
        assert!(p.short >= SPIN_SHARE, "one in two short: spin");
        for _ in 0..10 {
            p.note(false);
        }
        assert!(p.short < SPIN_SHARE, "an idle stretch stops the spinning");
        for _ in 0..100 {
            p.note(true);
            p.note(false);
            p.note(false);
            p.note(false);
            p.note(false);
        }
        assert!(p.short < SPIN_SHARE, "one in five short: sleep");
    }

    #[test]
    fn large_requests_do_not_spin() {
        let mut p = BusyPoll::default();
        for _ in 0..10 {
            p.note(true);
        }
        p.note_request(4096);
        assert!(p.spins());
        p.note_request(1 << 20);
        assert!(!p.spins(), "a 1 MiB request: sleep");
        p.note_request(LARGE_REQUEST);
        assert!(p.spins());
    }

    #[test]
    fn a_spin_sees_a_completion_that_the_kernel_posts_meanwhile() {
        use std::os::fd::AsRawFd;
        let mut ring: IoUring = IoUring::new(8).expect("io_uring");
        let wake =
            rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).expect("eventfd");
        let mut counter = [0u8; 8];
        let read = io_uring::opcode::Read::new(
            io_uring::types::Fd(wake.as_raw_fd()),
            counter.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(7);
        // SAFETY: `counter` and `wake` outlive the read, which completes
        // (and is reaped) below.
        unsafe { ring.submission().push(&read).expect("room") };
        let writer = {
            let wake = wake.try_clone().expect("dup");
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                rustix::io::write(&wake, &1u64.to_ne_bytes()).expect("write");
            })
        };
        let start = Instant::now();
        // (A loaded machine may make a spin give way: spin again.)
        while spin(&mut ring, start + Duration::from_secs(5)) != Spun::Came {
            assert!(start.elapsed() < Duration::from_secs(5), "nothing came");
        }
        assert!(
            start.elapsed() >= Duration::from_millis(10),
            "the read was not armed"
        );
        assert_eq!(ring.completion().next().map(|c| c.user_data()), Some(7));
        writer.join().unwrap();
        assert_eq!(u64::from_ne_bytes(counter), 1);
        // (In the same test: two at once could pass the cap on spinners.)
        let nothing_comes = spin(&mut ring, Instant::now() + Duration::from_millis(2));
        assert_ne!(nothing_comes, Spun::Came, "a spin gives up at its deadline");
        drop(ring);
        on_a_cooperative_ring_a_spin_runs_the_waiting_task_work();
    }

    /// A thread that wants the spinner's CPU makes the spin give way (and
    /// the poller then sleeps at once for a while).
    #[test]
    fn a_spin_gives_way_to_a_thread_that_wants_its_cpu() {
        let cpus = rustix::thread::sched_getaffinity(None).expect("affinity");
        let cpu = (0..rustix::thread::CpuSet::MAX_CPU)
            .find(|&c| cpus.is_set(c))
            .expect("a CPU");
        let mut one = rustix::thread::CpuSet::new();
        one.set(cpu);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let busy = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                rustix::thread::sched_setaffinity(None, &one).expect("affinity");
                while !stop.load(Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let mut ring: IoUring = build_ring(&IoUring::builder(), 8).expect("io_uring");
        let result = std::thread::spawn(move || {
            rustix::thread::sched_setaffinity(None, &one).expect("affinity");
            // Another test may hold the process's one spinning slot (two
            // CPUs): try again while a spin does not even start.
            loop {
                let start = Instant::now();
                let r = spin(&mut ring, start + Duration::from_secs(2));
                if r != Spun::Nothing || start.elapsed() > Duration::from_millis(1) {
                    break (r, start.elapsed());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
        .join()
        .unwrap();
        stop.store(true, Relaxed);
        busy.join().unwrap();
        assert_eq!(result.0, Spun::Contended, "{result:?}");
        assert!(result.1 < Duration::from_secs(1), "{result:?}");
    }

    /// A ring from build_ring leaves the completion in task work, flagged,
    /// until this thread enters the kernel; the spin sees the flag and runs
    /// it, well before its first yield. Any return to user space runs that
    /// work too (an interrupt, a preemption), so an attempt may find the
    /// completion already posted (on a loaded machine, most do): one clean
    /// catch in up to 500 attempts is asked for. The writer runs on another
    /// CPU than this thread, or it would always preempt it.
    fn on_a_cooperative_ring_a_spin_runs_the_waiting_task_work() {
        use std::os::fd::AsRawFd;
        let on_cpu = |cpu: usize| {
            let mut set = rustix::thread::CpuSet::new();
            set.set(cpu);
            rustix::thread::sched_setaffinity(None, &set).expect("affinity");
        };
        let cpus = rustix::thread::sched_getaffinity(None).expect("affinity");
        let mine: Vec<usize> = (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&c| cpus.is_set(c))
            .take(2)
            .collect();
        let [me, writer_cpu] = mine[..] else {
            // One CPU: the writer always preempts this thread, whose return
            // to user space runs the work; there is nothing to catch.
            return;
        };
        on_cpu(me);
        let mut ring: IoUring = build_ring(&IoUring::builder(), 8).expect("io_uring");
        let wake =
            rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).expect("eventfd");
        let mut caught = 0;
        for attempt in 0..500u64 {
            let mut counter = [0u8; 8];
            let read = io_uring::opcode::Read::new(
                io_uring::types::Fd(wake.as_raw_fd()),
                counter.as_mut_ptr(),
                8,
            )
            .build()
            .user_data(attempt);
            // SAFETY: `counter` and `wake` outlive the read, which
            // completes (and is reaped) within this iteration.
            unsafe { ring.submission().push(&read).expect("room") };
            ring.submit().expect("submit");
            let writer = {
                let wake = wake.try_clone().expect("dup");
                std::thread::spawn(move || {
                    on_cpu(writer_cpu);
                    std::thread::sleep(Duration::from_millis(1));
                    rustix::io::write(&wake, &1u64.to_ne_bytes()).expect("write");
                })
            };
            // No system call on this thread meanwhile (Instant reads the
            // clock without one).
            let start = Instant::now();
            let flagged = loop {
                if ring.submission().taskrun() {
                    break ring.completion().is_empty();
                }
                if !ring.completion().is_empty() {
                    break false;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "the read never ended"
                );
                std::hint::spin_loop();
            };
            let came = spin(&mut ring, Instant::now() + Duration::from_micros(10)) == Spun::Came;
            if flagged && came {
                caught += 1;
            }
            writer.join().unwrap();
            if !came {
                ring.submit_and_wait(1).expect("wait");
            }
            let done = ring.completion().next().map(|c| c.user_data());
            assert_eq!(done, Some(attempt));
            assert_eq!(u64::from_ne_bytes(counter), 1);
            if caught > 0 {
                break;
            }
        }
        rustix::thread::sched_setaffinity(None, &cpus).expect("affinity");
        assert!(
            caught > 0,
            "never saw a flagged completion that the spin ran"
        );
    }
}
