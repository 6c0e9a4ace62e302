//! Which clusters of a served disk changed since a point: what `ploop
//! copy` sends again in its next pass. Every write, discard and zeroing
//! of the chain notes its clusters (before it starts and after its data
//! is in place), so a reader that takes the set after a read of a cluster
//! sees any write that raced with that read.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;

/// The clusters changed since the log was started or last taken. Off, it
/// costs each write one atomic load.
#[derive(Default)]
pub struct DirtyLog {
    on: AtomicBool,
    /// The process that started it (the copy's sender).
    owner: AtomicU32,
    set: Mutex<BTreeSet<u64>>,
}

impl DirtyLog {
    /// Note that `cluster` changes (no-op unless started).
    pub fn note(&self, cluster: u64) {
        if self.on.load(Ordering::SeqCst) {
            self.set.lock().expect("dirty log").insert(cluster);
        }
    }

    /// Start recording, empty, for process `owner`. False if it is on for
    /// another owner that `alive` says still runs (someone else's copy is
    /// under way); a dead owner's log is taken over.
    pub fn start(&self, owner: u32, alive: impl Fn(u32) -> bool) -> bool {
        let mut set = self.set.lock().expect("dirty log");
        if self.on.load(Ordering::SeqCst) {
            let old = self.owner.load(Ordering::SeqCst);
            if old != owner && alive(old) {
                return false;
            }
        }
        self.owner.store(owner, Ordering::SeqCst);
        self.on.store(true, Ordering::SeqCst);
        set.clear();
        true
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }

    /// The clusters changed since the last take (or the start), as runs
    /// of (first cluster, count); the log goes on, empty.
    pub fn take(&self) -> Vec<(u64, u64)> {
        let set = std::mem::take(&mut *self.set.lock().expect("dirty log"));
        runs(set)
    }

    /// Stop recording and forget what was noted.
    pub fn stop(&self) {
        let mut set = self.set.lock().expect("dirty log");
        self.on.store(false, Ordering::SeqCst);
        set.clear();
    }
}

/// Sorted clusters as runs of (first, count).
fn runs(set: BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for c in set {
        match out.last_mut() {
            Some((first, n)) if *first + *n == c => *n += 1,
            _ => out.push((c, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_notes_nothing_and_on_notes_runs() {
        let log = DirtyLog::default();
        log.note(3);
        assert!(log.start(7, |_| true));
        assert!(!log.start(8, |_| true), "a second copy is refused");
        assert!(log.start(7, |_| true), "its own owner starts again");
        assert!(log.take().is_empty(), "nothing from before the start");
        for c in [9, 4, 5, 6, 12, 5] {
            log.note(c);
        }
        assert_eq!(log.take(), vec![(4, 3), (9, 1), (12, 1)]);
        assert!(log.take().is_empty(), "taken means cleared");
        log.note(1);
        log.stop();
        assert!(!log.is_on());
        log.note(2);
        assert!(log.start(8, |_| true));
        assert!(log.take().is_empty());
        log.note(3);
        assert!(log.start(9, |_| false), "a dead owner's log is taken over");
        assert!(log.take().is_empty());
    }
}
