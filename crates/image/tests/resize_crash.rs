//! A resize whose larger BAT needs the room data clusters hold, crashed at
//! every write and flush, with the unflushed writes all lost or all kept:
//! after `check`, the delta opens with its old or its new size, and every
//! cluster reads what was written to it.

use std::sync::Arc;

use ploop_format::ploop::check::check;
use ploop_format::ploop::resize::resize;
use ploop_format::ploop::{CreateOptions, OpenFlags, PloopDelta, Version};
use ploop_io::{Journal, MemIo, SharedIo, Survivors};

const CS: u64 = 32 << 10;
/// 8,000 entries fit the header cluster (8,176 do); 9,000 need a second.
const OLD: u64 = 8000;
const NEW: u64 = 9000;
const WRITTEN: u64 = 6;

fn pattern(c: u64) -> Vec<u8> {
    (0..CS)
        .map(|i| (i as u8).wrapping_mul(7) ^ (c as u8) ^ 0xa5)
        .collect()
}

struct All(bool);

impl Survivors for All {
    fn keep(&mut self) -> bool {
        self.0
    }
    fn torn(&mut self, _sectors: usize) -> Option<Vec<bool>> {
        None
    }
    fn order(&mut self, n: usize) -> Vec<usize> {
        (0..n).collect()
    }
}

/// A delta of `clusters` clusters in a journaled file, open for writing.
fn new_delta(j: &Journal, clusters: u64) -> (SharedIo, PloopDelta) {
    let io: SharedIo = Arc::new(j.create("img"));
    PloopDelta::create(
        io.clone(),
        CreateOptions {
            virtual_size: clusters * CS,
            cluster_size: CS,
            version: Version::V2,
            preallocate: false,
        },
    )
    .unwrap();
    let d = PloopDelta::open(
        io.clone(),
        OpenFlags {
            writable: true,
            allow_dirty: false,
        },
    )
    .unwrap();
    (io, d)
}

/// Crash at every point from `start` to `end`, the unflushed writes all
/// lost and all kept; each state is repaired by `check`, opened and
/// handed to `verify` (point, keep). Returns the states explored.
fn crash_everywhere(
    j: &Journal,
    start: usize,
    end: usize,
    verify: impl Fn(usize, bool, &PloopDelta),
) -> usize {
    let mut states = 0;
    for point in start..=end {
        for keep in [false, true] {
            let files = j.crash(point, &mut All(keep));
            let img: SharedIo = Arc::new(MemIo::new("crashed"));
            img.write_at(&files[0], 0).unwrap();
            check(&img, true).unwrap_or_else(|e| panic!("point {point}: check: {e}"));
            let d = PloopDelta::open(img.clone(), OpenFlags::default())
                .unwrap_or_else(|e| panic!("point {point} keep={keep}: open: {e}"));
            verify(point, keep, &d);
            states += 1;
        }
    }
    states
}

#[test]
fn a_resize_that_moves_clusters_survives_a_crash_anywhere() {
    let j = Journal::new();
    let (io, d) = new_delta(&j, OLD);
    // Clusters 0.. land in the file right after the header cluster: in
    // the way of the larger BAT.
    for c in 0..WRITTEN {
        d.write_cluster(c, 0, &pattern(c), None).unwrap();
    }
    d.close().unwrap();
    let start = j.len();
    resize(&io, NEW * CS, false).unwrap();
    let end = j.len();
    assert!(
        end - start > 6,
        "the resize moved clusters ({} operations)",
        end - start
    );
    let states = crash_everywhere(&j, start, end, |point, keep, d| {
        let size = d.virtual_size();
        assert!(
            size == OLD * CS || size == NEW * CS,
            "point {point}: size {size}"
        );
        let mut buf = vec![0u8; CS as usize];
        for c in 0..WRITTEN {
            let off = d
                .map(c)
                .unwrap_or_else(|| panic!("point {point}: cluster {c} lost"));
            d.read_data(&mut buf, off).unwrap();
            assert!(buf == pattern(c), "point {point} keep={keep}: cluster {c}");
        }
        assert!((WRITTEN..size / CS).all(|c| d.map(c).is_none()));
    });
    println!("resize crash states: {states}");
}

/// Compaction crashed at every write and flush: after `check`, every
/// cluster still reads what was written to it, and the discarded ones
/// read as unmapped.
#[test]
fn a_compaction_survives_a_crash_anywhere() {
    const N: u64 = 12;
    let j = Journal::new();
    let (io, d) = new_delta(&j, 64);
    for c in 0..N {
        d.write_cluster(c, 0, &pattern(c), None).unwrap();
    }
    // The first half goes: holes low in the file, data above them.
    for c in 0..N / 2 {
        d.discard(c, 0, CS, true).unwrap();
    }
    d.close().unwrap();
    let start = j.len();
    let done = ploop_format::ploop::compact::compact(&io, false, &|_, _| {}, &|| false).unwrap();
    assert_eq!(done.moved, N / 2);
    let end = j.len();
    let states = crash_everywhere(&j, start, end, |point, keep, d| {
        let mut buf = vec![0u8; CS as usize];
        for c in 0..N {
            match d.map(c) {
                Some(off) => {
                    assert!(c >= N / 2, "point {point}: discarded cluster {c} is back");
                    d.read_data(&mut buf, off).unwrap();
                    assert!(buf == pattern(c), "point {point} keep={keep}: cluster {c}");
                }
                None => assert!(c < N / 2, "point {point}: cluster {c} lost"),
            }
        }
    });
    println!("compaction crash states: {states}");
}

/// Defragmentation crashed at every write and flush: every cluster still
/// reads what was written to it.
#[test]
fn a_defragmentation_survives_a_crash_anywhere() {
    let j = Journal::new();
    let (io, d) = new_delta(&j, 64);
    // Backwards: every cluster is out of place.
    let written: Vec<u64> = (0..8).rev().collect();
    for &c in &written {
        d.write_cluster(c, 0, &pattern(c), None).unwrap();
    }
    d.close().unwrap();
    let start = j.len();
    let moved = ploop_format::ploop::compact::defrag(&io, &|_, _| {}, &|| false).unwrap();
    assert!(moved >= 8);
    let end = j.len();
    crash_everywhere(&j, start, end, |point, keep, d| {
        let mut buf = vec![0u8; CS as usize];
        for &c in &written {
            let off = d
                .map(c)
                .unwrap_or_else(|| panic!("point {point}: cluster {c} lost"));
            d.read_data(&mut buf, off).unwrap();
            assert!(buf == pattern(c), "point {point} keep={keep}: cluster {c}");
        }
    });
}
