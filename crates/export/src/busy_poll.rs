//! Busy polling before a ring thread sleeps. Sleeping and being woken
//! again costs tens of microseconds on a virtual machine (an exit to the
//! host for the idle CPU, an interrupt to wake it), as much as the rest of
//! a 4 KiB request. So a thread whose waits have often been short of late
//! (a quarter of them or more, in a moving average) spins on its
//! completion queue for up to a limit before it sleeps, the way QEMU's
//! adaptive polling does. A thread whose waits are long (an idle client or
//! queue) stops spinning after a few of them and costs no CPU.
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

/// Requests past this size are large.
const LARGE_REQUEST: usize = 64 << 10;

/// Spin while at least this share of recent waits ended within the limit
/// (in 1/1024ths): a quarter.
const SPIN_SHARE: u32 = 256;

impl BusyPoll {
    /// Wait for a completion on `ring`: spin for up to the limit while
    /// waits have been short of late, then `sleep` (which submits what is
    /// queued and waits in the kernel).
    pub fn wait<S: squeue::EntryMarker, C: cqueue::EntryMarker>(
        &mut self,
        ring: &mut IoUring<S, C>,
        sleep: impl FnOnce(&mut IoUring<S, C>) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let limit = limit();
        if limit.is_zero() {
            return sleep(ring);
        }
        let start = Instant::now();
        if self.spins() && spin(ring, start + limit) {
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
        // The kernel posts completions while this thread runs (it is sent
        // a signal for the task work that posts them).
        while !came && Instant::now() < until {
            std::hint::spin_loop();
            came = !ring.completion().is_empty();
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
        let mut ring: IoUring = IoUring::new(8).expect("io_uring");
        let nop = io_uring::opcode::Nop::new().build().user_data(7);
        // SAFETY: a nop points at no memory.
        unsafe { ring.submission().push(&nop).expect("room") };
        assert!(spin(&mut ring, Instant::now() + Duration::from_secs(5)));
        assert_eq!(ring.completion().next().map(|c| c.user_data()), Some(7));
    }
}
