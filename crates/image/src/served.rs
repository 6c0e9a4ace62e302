//! The disk a daemon serves: a delta chain that online operations can
//! replace while the export keeps running.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use crate::{Chain, Plan, Segment};
use ploop_format::ploop::MappingPin;
use uuid::Uuid;

pub struct ServedDisk {
    pub dd_path: PathBuf,
    /// GUID of the delta the chain ends at (the top GUID for a writable mount).
    pub guid: Uuid,
    pub read_only: bool,
    /// The disk's size: it grows when an online resize swaps the chain.
    size: AtomicU64,
    /// Each request holds the read side for its whole duration; an online
    /// operation takes the write side to drain requests before it swaps.
    chain: RwLock<Arc<Chain>>,
    /// Queued requests that outlive their read guard.
    in_flight: AtomicUsize,
    /// I/O limits and counters: every request of the exports is admitted
    /// here first.
    pub throttle: crate::throttle::Throttle,
}

/// Marks one queued request in flight until dropped, holds the chain it
/// was planned on, and keeps the clusters it was planned on from being
/// reused meanwhile.
pub struct InFlight {
    /// Let go of before the in-flight mark: while the request is in flight
    /// no online operation can have replaced the chain, so this is never
    /// its last reference, whose drop would close deltas on the thread
    /// that completes the I/O (a ring's).
    chain: Option<Arc<Chain>>,
    disk: Arc<ServedDisk>,
    _pin: Option<MappingPin>,
}

impl InFlight {
    /// The chain the request was planned on.
    pub fn chain(&self) -> &Chain {
        self.chain.as_deref().expect("held until dropped")
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        drop(self.chain.take());
        self.disk.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ServedDisk {
    pub fn new(dd_path: PathBuf, guid: Uuid, read_only: bool, chain: Chain) -> Self {
        Self {
            dd_path,
            guid,
            read_only,
            size: AtomicU64::new(chain.virtual_size()),
            chain: RwLock::new(Arc::new(chain)),
            in_flight: AtomicUsize::new(0),
            throttle: Default::default(),
        }
    }

    /// Register a request queued on `chain` (from the guard of [`chain`]
    /// or [`try_chain`], still held, so an online operation either waits
    /// for it or it sees the new chain). Hold the InFlight until the
    /// plan's I/O has completed.
    ///
    /// [`chain`]: Self::chain
    /// [`try_chain`]: Self::try_chain
    pub fn begin_queued(
        self: &Arc<Self>,
        chain: &Arc<Chain>,
        plan: Plan,
    ) -> (Vec<Segment>, InFlight) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let (segments, pin) = plan.into_parts();
        let in_flight = InFlight {
            chain: Some(Arc::clone(chain)),
            disk: self.clone(),
            _pin: pin,
        };
        (segments, in_flight)
    }

    /// A writable (or read-only) disk of `size` bytes on one empty ploop
    /// delta held in memory: for tests and fuzzing of the exports.
    #[cfg(any(test, feature = "test-support"))]
    pub fn in_memory(size: u64, cluster: u64, read_only: bool) -> Self {
        use ploop_format::ploop::{CreateOptions, OpenFlags, PloopDelta, Version};
        let io: ploop_io::SharedIo = Arc::new(ploop_io::MemIo::new("memory.hdd"));
        PloopDelta::create(
            io.clone(),
            CreateOptions {
                virtual_size: size,
                cluster_size: cluster,
                version: Version::V2,
                preallocate: false,
            },
        )
        .expect("creating an in-memory delta");
        let delta = PloopDelta::open(
            io,
            OpenFlags {
                writable: !read_only,
                allow_dirty: false,
            },
        )
        .expect("opening an in-memory delta");
        let chain = Chain::new(vec![Arc::new(crate::Delta::Ploop(delta))], cluster, size)
            .expect("a chain of one delta");
        Self::new(
            PathBuf::from("memory"),
            ploop_format::descriptor::TOP_GUID,
            read_only,
            chain,
        )
    }

    /// The chain, held for one request.
    pub fn chain(&self) -> RwLockReadGuard<'_, Arc<Chain>> {
        self.chain.read().expect("chain lock")
    }

    /// The chain if it can be had without waiting (no online operation
    /// holds or waits for it).
    pub fn try_chain(&self) -> Option<RwLockReadGuard<'_, Arc<Chain>>> {
        self.chain.try_read().ok()
    }

    /// The disk's size in bytes, now.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    /// Run `f` with no request in flight; it may return a new chain.
    pub fn exclusive<T>(
        &self,
        f: impl FnOnce(&Arc<Chain>) -> ploop_format::Result<(Option<Chain>, T)>,
    ) -> ploop_format::Result<T> {
        let mut guard = self.chain.write().expect("chain lock");
        // New requests wait on the lock; queued ones finish first.
        while self.in_flight.load(Ordering::SeqCst) != 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
        let (new, out) = f(&guard)?;
        if let Some(mut new) = new {
            new.take_over_dirty_log(&guard);
            self.size.store(new.virtual_size(), Ordering::SeqCst);
            *guard = Arc::new(new);
        }
        Ok(out)
    }

    /// A clone of the current chain (for long operations that must not
    /// block requests).
    pub fn current(&self) -> Arc<Chain> {
        self.chain().clone()
    }
}
