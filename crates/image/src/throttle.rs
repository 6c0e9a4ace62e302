//! Per-disk I/O limits and statistics, as container hosts expect them
//! (OpenVZ's iolimit/iopslimit, QEMU's throttle groups): a token bucket
//! for requests per second and one for bytes per second, each with a
//! burst, changeable while the disk is served; and counters of what the
//! disk was asked, so a host's monitoring can see which container is
//! noisy.
//!
//! A request takes its tokens when it arrives, even into debt, and its
//! thread waits until the debt is paid: concurrent requests queue in
//! arrival order of their debts, and over any second the rate holds
//! within one burst.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Limits of one disk; None is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Requests per second (reads, writes and discards).
    pub iops: Option<u64>,
    /// Bytes read and written per second.
    pub bps: Option<u64>,
    /// Requests that may go at once above the rate (default: a tenth of
    /// a second's worth).
    pub iops_burst: Option<u64>,
    /// Bytes that may go at once above the rate (default: a tenth of a
    /// second's worth).
    pub bps_burst: Option<u64>,
}

impl Limits {
    /// Refuse what cannot be meant: a burst without its rate, zeros.
    pub fn validate(&self) -> Result<(), String> {
        if self.iops == Some(0) || self.bps == Some(0) {
            return Err("a limit of 0 would stop the disk: leave it out for none".into());
        }
        if self.iops_burst.is_some() && self.iops.is_none() {
            return Err("an IOPS burst needs an IOPS limit".into());
        }
        if self.bps_burst.is_some() && self.bps.is_none() {
            return Err("a bytes-per-second burst needs a bytes-per-second limit".into());
        }
        if self.iops_burst == Some(0) || self.bps_burst == Some(0) {
            return Err("a burst of 0 would stop the disk".into());
        }
        if self.bps.is_some_and(|b| b < MIN_BPS) {
            return Err(format!(
                "a limit under {MIN_BPS} bytes per second would hold one request for longer than a second"
            ));
        }
        Ok(())
    }
}

/// The longest one request waits.
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// The smallest bytes-per-second limit: one 4 KiB request a second.
pub const MIN_BPS: u64 = 4096;

struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64, burst: Option<u64>, now: Instant) -> Self {
        // A tenth of a second's worth by default:
        // over ten seconds the rate then holds within 1%.
        let burst = burst.unwrap_or(rate / 10).max(1) as f64;
        Self {
            rate: rate as f64,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Take `n` tokens; how long the taker must wait for them.
    fn take(&mut self, n: f64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            // Bounded: a wait past a day is a limit nobody meant (and
            // Duration and Instant must not overflow).
            Duration::try_from_secs_f64(-self.tokens / self.rate)
                .unwrap_or(MAX_WAIT)
                .min(MAX_WAIT)
        }
    }
}

#[derive(Default)]
struct Buckets {
    iops: Option<Bucket>,
    bps: Option<Bucket>,
    /// Bumped by every change of limits: waiting requests wake and
    /// take their tokens from the new buckets.
    generation: u64,
}

/// What a request is, for the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    Discard,
    Flush,
}

/// Counters of one disk since it was mounted.
#[derive(Default)]
pub struct Stats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub discards: AtomicU64,
    pub flushes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub discard_bytes: AtomicU64,
    /// Requests that waited for a limit, and for how long in all.
    pub throttled: AtomicU64,
    pub throttled_ns: AtomicU64,
}

/// A copy of the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub discards: u64,
    pub flushes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub discard_bytes: u64,
    pub throttled: u64,
    pub throttled_ns: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            reads: g(&self.reads),
            writes: g(&self.writes),
            discards: g(&self.discards),
            flushes: g(&self.flushes),
            read_bytes: g(&self.read_bytes),
            write_bytes: g(&self.write_bytes),
            discard_bytes: g(&self.discard_bytes),
            throttled: g(&self.throttled),
            throttled_ns: g(&self.throttled_ns),
        }
    }
}

/// The limits and counters of one served disk.
#[derive(Default)]
pub struct Throttle {
    buckets: Mutex<Buckets>,
    /// Waiting requests sleep on this: a change of limits wakes them.
    changed: std::sync::Condvar,
    /// Whether a limit is set: the unlimited path takes no lock.
    active: std::sync::atomic::AtomicBool,
    pub stats: Stats,
}

impl Throttle {
    /// Whether a limit is set: queued paths that must not wait (ring
    /// threads) leave limited requests to threads that may.
    pub fn limited(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Set new limits, at once (buckets start full).
    pub fn set(&self, limits: Limits) -> Result<(), String> {
        limits.validate()?;
        let now = Instant::now();
        let mut b = self.buckets.lock().expect("throttle lock");
        b.iops = limits.iops.map(|r| Bucket::new(r, limits.iops_burst, now));
        b.bps = limits.bps.map(|r| Bucket::new(r, limits.bps_burst, now));
        b.generation += 1;
        self.active
            .store(b.iops.is_some() || b.bps.is_some(), Ordering::Relaxed);
        self.changed.notify_all();
        Ok(())
    }

    /// Count a request of `bytes`, without waiting: for paths that found
    /// no limit set and must not wait (a ring thread), even if one is set
    /// meanwhile.
    pub fn count(&self, kind: IoKind, bytes: u64) {
        let s = &self.stats;
        let (ops, moved) = match kind {
            IoKind::Read => (&s.reads, Some(&s.read_bytes)),
            IoKind::Write => (&s.writes, Some(&s.write_bytes)),
            IoKind::Discard => (&s.discards, Some(&s.discard_bytes)),
            IoKind::Flush => (&s.flushes, None),
        };
        ops.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = moved {
            m.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Count a request of `bytes` and hold the calling thread until the
    /// limits let it go; a change of limits wakes it to take its tokens
    /// from the new ones (or none). Flushes are counted, never held.
    pub fn admit(&self, kind: IoKind, bytes: u64) {
        self.count(kind, bytes);
        if kind == IoKind::Flush || !self.limited() {
            return;
        }
        // Discards move no data: they count as requests only.
        let n = if kind == IoKind::Discard { 0 } else { bytes };
        let started = Instant::now();
        let mut held = false;
        let mut b = self.buckets.lock().expect("throttle lock");
        'take: loop {
            if b.iops.is_none() && b.bps.is_none() {
                break;
            }
            let now = Instant::now();
            let a = b.iops.as_mut().map_or(Duration::ZERO, |k| k.take(1.0, now));
            let c = b
                .bps
                .as_mut()
                .map_or(Duration::ZERO, |k| k.take(n as f64, now));
            let wait = a.max(c);
            if wait.is_zero() {
                break;
            }
            held = true;
            let generation = b.generation;
            let deadline = now + wait;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break 'take;
                }
                b = self.changed.wait_timeout(b, left).expect("throttle lock").0;
                if b.generation != generation {
                    continue 'take;
                }
            }
        }
        drop(b);
        if held {
            let s = &self.stats;
            s.throttled.fetch_add(1, Ordering::Relaxed);
            s.throttled_ns
                .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_holds_its_rate_after_the_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, Some(10), t0);
        // The burst goes at once, then each request waits its share.
        let waits: Vec<Duration> = (0..30).map(|_| b.take(1.0, t0)).collect();
        assert!(waits[..10].iter().all(|w| w.is_zero()));
        assert_eq!(waits[10], Duration::from_millis(10));
        assert_eq!(waits[29], Duration::from_millis(200));
        // A second later, it has refilled up to the burst only.
        let later = t0 + Duration::from_secs(10);
        let mut b2 = Bucket::new(100, Some(10), t0);
        for _ in 0..10 {
            assert!(b2.take(1.0, later).is_zero());
        }
        assert!(!b2.take(1.0, later).is_zero());
    }

    #[test]
    fn limits_refuse_what_cannot_be_meant() {
        let ok = Limits {
            iops: Some(100),
            bps: None,
            iops_burst: Some(5),
            bps_burst: None,
        };
        assert!(ok.validate().is_ok());
        for bad in [
            Limits {
                iops: Some(0),
                ..Limits::default()
            },
            Limits {
                bps_burst: Some(10),
                ..Limits::default()
            },
            Limits {
                bps: Some(10),
                bps_burst: Some(0),
                ..Limits::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    /// A request held by a limit nobody meant wakes when the limit goes.
    #[test]
    fn a_change_of_limits_wakes_the_held() {
        let t = std::sync::Arc::new(Throttle::default());
        t.set(Limits {
            bps: Some(MIN_BPS),
            bps_burst: Some(1),
            ..Limits::default()
        })
        .unwrap();
        let held = {
            let t = t.clone();
            std::thread::spawn(move || {
                let start = Instant::now();
                // Sixteen seconds' worth at this rate.
                t.admit(IoKind::Write, 16 * MIN_BPS);
                start.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        t.set(Limits::default()).unwrap();
        let waited = held.join().unwrap();
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        assert!(Limits {
            bps: Some(MIN_BPS - 1),
            ..Limits::default()
        }
        .validate()
        .is_err());
        // A wait past what Duration holds is bounded, not a panic.
        let mut b = Bucket::new(1, Some(1), Instant::now());
        assert_eq!(b.take(1e30, Instant::now()), MAX_WAIT);
    }

    #[test]
    fn counters_and_waits() {
        let t = Throttle::default();
        t.admit(IoKind::Read, 4096);
        t.admit(IoKind::Flush, 0);
        t.set(Limits {
            iops: Some(1000),
            iops_burst: Some(1),
            ..Limits::default()
        })
        .unwrap();
        let start = Instant::now();
        for _ in 0..21 {
            t.admit(IoKind::Write, 512);
        }
        // 20 past the burst of one, at 1 ms each.
        assert!(start.elapsed() >= Duration::from_millis(19));
        let s = t.stats.snapshot();
        assert_eq!((s.reads, s.writes, s.flushes), (1, 21, 1));
        assert_eq!((s.read_bytes, s.write_bytes), (4096, 21 * 512));
        assert!(s.throttled >= 19, "{s:?}");
    }
}
