//! Change tracking, which an online merge relies on: a cluster written
//! while the merge copies must be recorded again once its data is in place,
//! or the merge keeps the copy it took before the write landed.

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
    let segments = chain.plan_write(3 * CLUSTER, 4096).unwrap().unwrap();
    assert_eq!(segments.len(), 1);
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
