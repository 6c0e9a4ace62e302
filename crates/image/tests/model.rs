//! Random sequences of write / discard / snapshot / merge / delete / switch
//! against an in-memory model of every snapshot's content. Every read of
//! the top and of every live snapshot must match the model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ploop_format::descriptor::{Descriptor, NONE_GUID, TOP_GUID};
use ploop_format::ploop::Version;
use ploop_image::ops::{self, DiskFormat, InitOptions};
use ploop_image::{Disk, OpenOptions};
use proptest::prelude::*;
use uuid::Uuid;

const CLUSTER: u64 = 32 << 10;
const SIZE: u64 = 16 * CLUSTER;

#[derive(Clone, Debug)]
enum Op {
    Write {
        off: u64,
        len: u64,
        seed: u8,
    },
    Zero {
        off: u64,
        len: u64,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Snapshot,
    /// Merge the top into its parent.
    MergeTop,
    /// Index into the live snapshots (modulo their count).
    Delete(usize),
    Switch(usize),
    Reopen,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    // Offsets and lengths that hit cluster edges, sector edges and odd bytes.
    (0..SIZE, 1..3 * CLUSTER).prop_map(|(off, len)| (off, len.min(SIZE - off)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        1 => range().prop_map(|(off, len)| Op::Zero { off, len }),
        2 => range().prop_map(|(off, len)| Op::Discard { off, len }),
        2 => Just(Op::Snapshot),
        1 => Just(Op::MergeTop),
        1 => any::<usize>().prop_map(Op::Delete),
        1 => any::<usize>().prop_map(Op::Switch),
        1 => Just(Op::Reopen),
    ]
}

fn pattern(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as u64).wrapping_mul(31).wrapping_add(off + i) as u8 | 1)
        .collect()
}

struct Model {
    top: Vec<u8>,
    /// Content of every snapshot (non-top delta), by GUID.
    snaps: HashMap<Uuid, Vec<u8>>,
}

fn read_all(dd: &Path, guid: Option<Uuid>) -> Vec<u8> {
    let disk = Disk::open(
        dd,
        OpenOptions {
            guid,
            ..OpenOptions::default()
        },
    )
    .expect("open for read");
    let mut buf = vec![0u8; SIZE as usize];
    disk.chain.read_at(&mut buf, 0).expect("read");
    disk.close().expect("close");
    buf
}

fn live_snapshots(dd: &Path) -> Vec<Uuid> {
    let d = Descriptor::load(dd).unwrap();
    let mut v: Vec<Uuid> = d
        .snapshots
        .iter()
        .map(|s| s.guid)
        .filter(|g| *g != TOP_GUID)
        .collect();
    v.sort();
    v
}

fn run(ops_list: Vec<Op>, dir: &Path) {
    let image: PathBuf = dir.join("root.hdd");
    let dd = ops::init(
        &image,
        InitOptions {
            size: SIZE,
            format: DiskFormat::Expanded,
            version: Version::V2,
            cluster_size: CLUSTER,
        },
        &|_, _| {},
    )
    .unwrap();
    let mut model = Model {
        top: vec![0u8; SIZE as usize],
        snaps: HashMap::new(),
    };
    let mut disk = Some(
        Disk::open(
            &dd,
            OpenOptions {
                writable: true,
                ..OpenOptions::default()
            },
        )
        .unwrap(),
    );
    let no_progress = |_: u64, _: u64| {};
    for op in ops_list {
        // Descriptor-level operations need the disk closed.
        let offline = !matches!(op, Op::Write { .. } | Op::Zero { .. } | Op::Discard { .. });
        if offline {
            if let Some(d) = disk.take() {
                d.close().unwrap();
            }
        } else if disk.is_none() {
            disk = Some(
                Disk::open(
                    &dd,
                    OpenOptions {
                        writable: true,
                        ..OpenOptions::default()
                    },
                )
                .unwrap(),
            );
        }
        match op {
            Op::Write { off, len, seed } => {
                let data = pattern(seed, off, len);
                disk.as_ref().unwrap().chain.write_at(&data, off).unwrap();
                model.top[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Zero { off, len } => {
                let data = vec![0u8; len as usize];
                disk.as_ref().unwrap().chain.write_at(&data, off).unwrap();
                model.top[off as usize..(off + len) as usize].fill(0);
            }
            Op::Discard { off, len } => {
                disk.as_ref().unwrap().chain.discard(off, len).unwrap();
                model.top[off as usize..(off + len) as usize].fill(0);
            }
            Op::Snapshot => {
                let g = ops::snapshot(&dd, None).unwrap();
                model.snaps.insert(g, model.top.clone());
            }
            Op::MergeTop => {
                let d = Descriptor::load(&dd).unwrap();
                let parent = d.shot(TOP_GUID).unwrap().parent;
                let r = ops::merge(&dd, None, &no_progress);
                if parent == NONE_GUID || d.children(parent).len() != 1 {
                    assert!(r.is_err(), "merge must refuse");
                } else {
                    r.unwrap();
                    model.snaps.remove(&parent);
                }
            }
            Op::Delete(i) => {
                let live = live_snapshots(&dd);
                if live.is_empty() {
                    continue;
                }
                let g = live[i % live.len()];
                let d = Descriptor::load(&dd).unwrap();
                let children = d.children(g).len();
                let is_base = d.shot(g).unwrap().parent == NONE_GUID;
                let r = ops::delete(&dd, g, &no_progress);
                if children > 1 || (children == 0 && is_base) {
                    assert!(r.is_err(), "delete must refuse");
                } else {
                    r.unwrap();
                    model.snaps.remove(&g);
                }
            }
            Op::Switch(i) => {
                let live = live_snapshots(&dd);
                if live.is_empty() {
                    continue;
                }
                let g = live[i % live.len()];
                ops::switch(&dd, g).unwrap();
                model.top = model.snaps[&g].clone();
            }
            Op::Reopen => {}
        }
        if offline {
            assert_eq!(read_all(&dd, None), model.top, "top after {op:?}");
            let live = live_snapshots(&dd);
            assert_eq!(live.len(), model.snaps.len(), "snapshot count");
            for g in live {
                assert!(
                    read_all(&dd, Some(g)) == model.snaps[&g],
                    "snapshot {g} after {op:?}"
                );
            }
            // Every delta passes our own read-only check.
            for r in ops::check_disk(&dd, true).unwrap() {
                assert!(r.report.is_clean(), "{:?}", r.report.problems);
            }
        } else {
            let d = disk.as_ref().unwrap();
            let mut buf = vec![0u8; SIZE as usize];
            d.chain.read_at(&mut buf, 0).unwrap();
            assert!(buf == model.top, "top after {op:?}");
        }
    }
    if let Some(d) = disk.take() {
        d.close().unwrap();
    }
    assert_eq!(read_all(&dd, None), model.top);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn chain_matches_model(ops_list in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        run(ops_list, dir.path());
    }
}
