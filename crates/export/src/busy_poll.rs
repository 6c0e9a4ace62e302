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
//! every round trip: see README.md for the figures.

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
}

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
        if self.spins() && spin(ring, start + spin_for) {
            self.note(true);
            return Ok(0);
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

/// Submit what is queued, then spin until a completion is there (true) or
/// `until` passes (false). Gives up at once (false) when enough threads
/// spin already, or when the submission fails (the sleep that follows
/// submits again and reports it).
fn spin<S: squeue::EntryMarker, C: cqueue::EntryMarker>(
    ring: &mut IoUring<S, C>,
    until: Instant,
) -> bool {
    if SPINNING.fetch_add(1, Relaxed) >= max_spinning() {
        SPINNING.fetch_sub(1, Relaxed);
        return false;
    }
    let submitted = ring.submission().is_empty() || ring.submit().is_ok();
    let mut came = false;
    if submitted {
        // SAFETY: `status` reads the ring's head and tail, and the ring
        // outlives it (it is dropped at the end of this function).
        let status = unsafe { ring.completion().status() };
        // The kernel posts completions while this thread runs in user
        // space: it is sent a signal for the task work that posts them
        // (the rings are built without COOP_TASKRUN or DEFER_TASKRUN,
        // which would leave that work until the next system call).
        let mut next_yield = Instant::now() + YIELD_EVERY;
        while !came {
            let now = Instant::now();
            if now >= until {
                break;
            }
            if now >= next_yield {
                std::thread::yield_now();
                next_yield = now + YIELD_EVERY;
            }
            std::hint::spin_loop();
            came = !status.is_empty();
        }
    }
    SPINNING.fetch_sub(1, Relaxed);
    came
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
        assert!(spin(&mut ring, start + Duration::from_secs(5)));
        assert!(
            start.elapsed() >= Duration::from_millis(10),
            "the read was not armed"
        );
        assert_eq!(ring.completion().next().map(|c| c.user_data()), Some(7));
        writer.join().unwrap();
        assert_eq!(u64::from_ne_bytes(counter), 1);
        // (In the same test: two at once could pass the cap on spinners.)
        let nothing_comes = spin(&mut ring, Instant::now() + Duration::from_millis(2));
        assert!(!nothing_comes, "a spin gives up at its deadline");
    }
}
