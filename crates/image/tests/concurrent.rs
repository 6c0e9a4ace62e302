//! I/O that runs beside changes to the same disk:
//! - change tracking, which an online merge relies on: a cluster written
//!   while the merge copies must be recorded again once its data is in
//!   place, or the merge keeps the copy it took before the write landed;
//! - cluster reuse: a cluster a discard frees must not be handed to another
//!   virtual cluster while I/O planned on its old mapping may still land.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ploop_format::ploop::PloopDelta;
use ploop_image::{Chain, Delta};
use ploop_io::{FileIo, OpenMode, SharedIo};

mod one_delta;

const CLUSTER: u64 = 64 << 10;
const SIZE: u64 = 16 * CLUSTER;

/// A ploop delta in a real file: queued I/O is planned on file descriptors.
fn chain(dir: &std::path::Path) -> (Chain, Arc<Delta>) {
    let path = dir.join("root.hds");
    let io: SharedIo = Arc::new(FileIo::open(&path, OpenMode::create()).unwrap());
    one_delta::create(io.clone(), SIZE, CLUSTER);
    one_delta::open(io, SIZE, CLUSTER)
}

fn tracked(top: &Delta) -> &PloopDelta {
    match top {
        Delta::Ploop(p) => p,
        Delta::Raw(_) => unreachable!("the test makes a ploop delta"),
    }
}

#[test]
fn a_queued_write_is_recorded_again_when_it_lands() {
    let dir = tempfile::tempdir().unwrap();
    let (chain, top) = chain(dir.path());
    chain.write_at(&[1u8; 4096], 3 * CLUSTER).unwrap(); // allocate
    let p = tracked(&top);
    p.start_tracking();
    // Planned (recorded), then a merge takes the changes and copies the
    // cluster before the queued write reaches the file.
    let plan = chain.plan_write(3 * CLUSTER, 4096).unwrap().unwrap();
    assert_eq!(plan.segments.len(), 1);
    assert!(p.take_changes().contains(&3));
    assert!(p.take_changes().is_empty());
    // The write completes: the cluster must be copied once more.
    chain.note_written(3 * CLUSTER, 4096);
    assert_eq!(p.take_changes().into_iter().collect::<Vec<_>>(), vec![3]);
    // Synchronous writes and discards record what they changed.
    chain.write_at(&[2u8; 8192], 5 * CLUSTER - 4096).unwrap();
    chain.discard(9 * CLUSTER, CLUSTER).unwrap();
    assert_eq!(
        p.stop_tracking().into_iter().collect::<Vec<_>>(),
        vec![4, 5, 9]
    );
    // Past the end of the disk nothing is recorded, and nothing panics.
    chain.note_written(SIZE - 4096, 1 << 20);
}

#[test]
fn a_cluster_freed_under_queued_io_waits_for_it_before_reuse() {
    let dir = tempfile::tempdir().unwrap();
    let (chain, top) = chain(dir.path());
    let p = tracked(&top);
    chain
        .write_at(&[1u8; CLUSTER as usize], 3 * CLUSTER)
        .unwrap();
    let freed = p.map(3).unwrap();
    // A write is planned on cluster 3 and queued...
    let plan = chain.plan_write(3 * CLUSTER, 4096).unwrap().unwrap();
    assert_eq!(plan.segments[0].file_offset, freed);
    // ...meanwhile the cluster is discarded, the unmapping made durable,
    // and another cluster allocated.
    chain.discard(3 * CLUSTER, CLUSTER).unwrap();
    chain.flush().unwrap();
    chain
        .write_at(&[7u8; CLUSTER as usize], 5 * CLUSTER)
        .unwrap();
    assert_ne!(p.map(5), Some(freed), "reused under queued I/O");
    // The queued write lands late, where cluster 3 used to be.
    let late = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("root.hds"))
        .unwrap();
    late.write_at(&[9u8; 4096], freed).unwrap();
    drop(plan);
    let mut back = vec![0u8; CLUSTER as usize];
    chain.read_at(&mut back, 5 * CLUSTER).unwrap();
    assert!(
        back.iter().all(|&b| b == 7),
        "cluster 5 took the late write"
    );
    chain.read_at(&mut back, 3 * CLUSTER).unwrap();
    assert!(
        back.iter().all(|&b| b == 0),
        "a discarded cluster reads zeros"
    );
    // Once the I/O is over the space is reused, not leaked.
    chain.flush().unwrap();
    chain
        .write_at(&[8u8; CLUSTER as usize], 8 * CLUSTER)
        .unwrap();
    assert_eq!(p.map(8), Some(freed));
    chain.close().unwrap();
}

/// Readers pin, look a cluster up and hold its mapping while a writer
/// discards, flushes and allocates: no other virtual cluster may be given
/// the file cluster a pinned mapping names.
#[test]
fn a_pinned_mapping_is_never_handed_to_another_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let (chain, top) = chain(dir.path());
    let chain = Arc::new(chain);
    // Few clusters, so that freed ones come back quickly.
    let clusters = 4;
    let stop = Arc::new(AtomicBool::new(false));
    let checkers: Vec<_> = (0..2u64)
        .map(|seed| {
            let (top, stop) = (top.clone(), stop.clone());
            std::thread::spawn(move || {
                let p = tracked(&top);
                let (mut checked, mut x) = (0u64, seed + 1);
                while !stop.load(Ordering::Relaxed) {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let c = (x >> 33) % clusters;
                    let _pin = p.pin();
                    let Some(off) = p.map(c) else { continue };
                    for _ in 0..50 {
                        std::thread::yield_now();
                        for other in (0..clusters).filter(|&o| o != c) {
                            assert_ne!(
                                p.map(other),
                                Some(off),
                                "{off} given to {other} under a pin"
                            );
                        }
                    }
                    checked += 1;
                }
                checked
            })
        })
        .collect();
    let mut x = 99u64;
    for round in 0..6000u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let c = (x >> 33) % clusters;
        if x & 1 == 0 {
            chain.discard(c * CLUSTER, CLUSTER).unwrap();
        } else {
            chain.write_at(&[round as u8; 4096], c * CLUSTER).unwrap();
        }
        chain.flush().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let checked: u64 = checkers.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(checked > 100, "only {checked} mappings were checked");
    chain.close().unwrap();
}

/// Clusters laid out in order in the file make one piece of queued I/O;
/// a cluster no delta holds splits a read.
#[test]
fn planned_pieces_join_where_the_file_continues() {
    let dir = tempfile::tempdir().unwrap();
    let (chain, _top) = chain(dir.path());
    chain.write_at(&vec![3u8; 4 * CLUSTER as usize], 0).unwrap();
    let read = chain.plan_read(0, 4 * CLUSTER).unwrap().unwrap();
    assert_eq!(read.segments.len(), 1, "{:?}", read.segments);
    assert_eq!(read.segments[0].len as u64, 4 * CLUSTER);
    let write = chain.plan_write(CLUSTER / 2, 2 * CLUSTER).unwrap().unwrap();
    assert_eq!(write.segments.len(), 1, "{:?}", write.segments);
    assert_eq!(write.segments[0].buf_offset, 0);
    // Cluster 4 is held by nobody: two pieces, the hole left out.
    chain
        .write_at(&vec![4u8; CLUSTER as usize], 5 * CLUSTER)
        .unwrap();
    let read = chain.plan_read(3 * CLUSTER, 3 * CLUSTER).unwrap().unwrap();
    let pieces: Vec<_> = read
        .segments
        .iter()
        .map(|s| (s.buf_offset, s.len as u64))
        .collect();
    assert_eq!(pieces, vec![(0, CLUSTER), (2 * CLUSTER as usize, CLUSTER)]);
    chain.close().unwrap();
}

#[test]
fn a_tail_freed_under_queued_io_is_trimmed_by_close() {
    let dir = tempfile::tempdir().unwrap();
    let (chain, top) = chain(dir.path());
    let p = tracked(&top);
    chain.write_at(&[1u8; 4096], CLUSTER).unwrap();
    chain.write_at(&[2u8; 4096], 3 * CLUSTER).unwrap();
    let kept_end = p.map(1).unwrap() + CLUSTER;
    assert!(
        p.map(3).unwrap() >= kept_end,
        "cluster 3 is the file's tail"
    );
    // Freed while a queued write still holds its mapping: quarantined.
    let plan = chain.plan_write(3 * CLUSTER, 4096).unwrap().unwrap();
    chain.discard(3 * CLUSTER, CLUSTER).unwrap();
    chain.flush().unwrap();
    drop(plan);
    // Nothing is dirty now, yet close must still give the tail back
    // (OpenVZ's check wants the file to end at its last mapped cluster).
    chain.close().unwrap();
    let len = std::fs::metadata(dir.path().join("root.hds"))
        .unwrap()
        .len();
    assert_eq!(len, kept_end, "file length after close");
}

/// A backend that holds writes of chosen lengths at gates until the test
/// opens them, so that a writer can be stopped at a chosen point.
struct Gated {
    inner: SharedIo,
    /// Per gated length: (shut, writes waiting).
    gates: std::sync::Mutex<std::collections::HashMap<usize, (bool, usize)>>,
    changed: std::sync::Condvar,
}

impl Gated {
    fn new(inner: SharedIo, lengths: &[usize]) -> Arc<Self> {
        Arc::new(Self {
            inner,
            gates: std::sync::Mutex::new(lengths.iter().map(|&l| (l, (true, 0))).collect()),
            changed: std::sync::Condvar::new(),
        })
    }

    /// Wait until a write of `len` bytes is held at its gate.
    fn wait_for(&self, len: usize) {
        let mut gates = self.gates.lock().unwrap();
        while gates[&len].1 == 0 {
            gates = self.changed.wait(gates).unwrap();
        }
    }

    fn open(&self, len: usize) {
        self.gates.lock().unwrap().get_mut(&len).unwrap().0 = false;
        self.changed.notify_all();
    }
}

impl ploop_io::BlockIo for Gated {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut gates = self.gates.lock().unwrap();
        if let Some(gate) = gates.get_mut(&buf.len()) {
            gate.1 += 1;
            self.changed.notify_all();
            while gates[&buf.len()].0 {
                gates = self.changed.wait(gates).unwrap();
            }
        }
        drop(gates);
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn size(&self) -> std::io::Result<u64> {
        self.inner.size()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Two writers race to allocate one cluster: the winner allocates it while
/// the loser waits for the allocation lock, then finds the cluster mapped
/// and writes into it after letting go of the lock. Until that write
/// lands, a discard, a flush and a new allocation must not hand the
/// cluster to another virtual cluster.
#[test]
fn a_writer_that_lost_the_allocation_race_keeps_the_cluster_pinned() {
    const WHOLE: usize = CLUSTER as usize;
    const PIECE: usize = 4096 + 512; // only the loser writes this much
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root.hds");
    let file: SharedIo = Arc::new(FileIo::open(&path, OpenMode::create()).unwrap());
    one_delta::create(file.clone(), SIZE, CLUSTER);
    let gated = Gated::new(file, &[WHOLE, PIECE]);
    let (chain, top) = one_delta::open(gated.clone(), SIZE, CLUSTER);
    let chain = Arc::new(chain);
    // The winner holds the allocation lock, stopped in its data write.
    let winner = {
        let chain = chain.clone();
        std::thread::spawn(move || chain.write_at(&[1u8; WHOLE], 3 * CLUSTER))
    };
    gated.wait_for(WHOLE);
    // The loser finds cluster 3 unmapped and waits for the lock. Nothing
    // shows that it waits there: give it time (were it late, it would find
    // the cluster mapped on its fast path, pinned, and prove nothing).
    let loser = {
        let chain = chain.clone();
        std::thread::spawn(move || chain.write_at(&[2u8; PIECE], 3 * CLUSTER))
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    gated.open(WHOLE);
    winner.join().unwrap().unwrap();
    // The loser now writes into the winner's cluster: stop it there.
    gated.wait_for(PIECE);
    let p = tracked(&top);
    let taken = p.map(3).unwrap();
    chain.discard(3 * CLUSTER, CLUSTER).unwrap();
    chain.flush().unwrap();
    chain.write_at(&[7u8; WHOLE], 5 * CLUSTER).unwrap();
    assert_ne!(
        p.map(5),
        Some(taken),
        "cluster 3's space reused under a write"
    );
    gated.open(PIECE);
    loser.join().unwrap().unwrap();
    let mut back = vec![0u8; WHOLE];
    chain.read_at(&mut back, 5 * CLUSTER).unwrap();
    assert!(
        back.iter().all(|&b| b == 7),
        "cluster 5 took the late write of cluster 3"
    );
    chain.close().unwrap();
}
