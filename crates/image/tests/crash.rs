//! Power-cut and full-disk behaviour of a ploop delta, on the
//! fault-injecting backend: after a crash that keeps any subset of the
//! unflushed writes, `check` repairs the image and every cluster that was
//! flushed and not touched since reads back exactly.

use std::collections::HashSet;
use std::sync::Arc;

use ploop_format::ploop::check::check;
use ploop_image::Chain;
use ploop_io::{FaultPlan, FaultyIo, MemIo, SharedIo};
use proptest::prelude::*;

mod one_delta;

const CLUSTER: u64 = 32 << 10;
const CLUSTERS: u64 = 12;
const SIZE: u64 = CLUSTERS * CLUSTER;

fn open_chain(io: SharedIo) -> Chain {
    one_delta::open(io, SIZE, CLUSTER).0
}

/// A new empty delta on the fault-injecting backend, open in a chain.
fn new_disk(name: &str) -> (Arc<FaultyIo>, Chain) {
    let faulty = Arc::new(FaultyIo::new(name));
    one_delta::create(faulty.clone(), SIZE, CLUSTER);
    let chain = open_chain(faulty.clone());
    (faulty, chain)
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        cluster: u64,
        off: u64,
        len: u64,
        val: u8,
    },
    Discard {
        cluster: u64,
    },
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..CLUSTERS, 0..CLUSTER, 1..CLUSTER, 1..=255u8).prop_map(|(cluster, off, len, val)| Op::Write {
            cluster,
            off,
            len: len.min(CLUSTER - off),
            val
        }),
        1 => (0..CLUSTERS).prop_map(|cluster| Op::Discard { cluster }),
        2 => Just(Op::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn crash_loses_nothing_flushed(ops in proptest::collection::vec(op(), 1..30), keep_seed in any::<u64>()) {
        let (faulty, chain) = new_disk("crash.hdd");
        let mut live = vec![0u8; SIZE as usize];
        let mut durable = live.clone();
        let mut touched: HashSet<u64> = HashSet::new();
        for op in &ops {
            match *op {
                Op::Write { cluster, off, len, val } => {
                    let at = cluster * CLUSTER + off;
                    chain.write_at(&vec![val; len as usize], at).unwrap();
                    live[at as usize..(at + len) as usize].fill(val);
                    touched.insert(cluster);
                }
                Op::Discard { cluster } => {
                    chain.discard(cluster * CLUSTER, CLUSTER).unwrap();
                    let at = (cluster * CLUSTER) as usize;
                    live[at..at + CLUSTER as usize].fill(0);
                    touched.insert(cluster);
                }
                Op::Flush => {
                    chain.flush().unwrap();
                    durable = live.clone();
                    touched.clear();
                }
            }
        }
        // Power cut: a pseudo-random subset of unflushed operations survives.
        let mut rng = ploop_test_support::Rng::new(keep_seed);
        let image = faulty.crash_image(|_| rng.next_u64() & 1 == 1);
        std::mem::forget(chain); // no clean close after a power cut
        let mem: SharedIo = Arc::new(MemIo::from_bytes("crashed.hdd", image));
        let report = check(&mem, true).unwrap();
        prop_assert!(report.problems.iter().all(|p| !p.contains("points into")), "{:?}", report.problems);
        // After repair the image opens and checks clean.
        prop_assert!(check(&mem, false).unwrap().is_clean());
        let chain = open_chain(mem.clone());
        let mut back = vec![0u8; SIZE as usize];
        chain.read_at(&mut back, 0).unwrap();
        for c in 0..CLUSTERS {
            if touched.contains(&c) {
                continue;
            }
            let r = (c * CLUSTER) as usize..((c + 1) * CLUSTER) as usize;
            prop_assert!(back[r.clone()] == durable[r], "cluster {} lost flushed data", c);
        }
        chain.close().unwrap();
    }
}

#[test]
fn full_disk_is_an_error_not_a_panic_and_keeps_flushed_data() {
    let (faulty, chain) = new_disk("full.hdd");
    chain.write_at(&vec![7u8; CLUSTER as usize], 0).unwrap();
    chain.flush().unwrap();
    faulty.set_plan(FaultPlan {
        fail_writes_after: Some(0),
        fail_flush: false,
    });
    let err = chain
        .write_at(&vec![9u8; CLUSTER as usize], CLUSTER)
        .unwrap_err();
    assert!(err.to_string().contains("full.hdd"), "{err}");
    assert!(err.to_string().contains("No space"), "{err}");
    faulty.set_plan(FaultPlan {
        fail_writes_after: None,
        fail_flush: true,
    });
    assert!(chain.flush().is_err(), "a failed fdatasync is reported");
    faulty.set_plan(FaultPlan::default());
    let mut back = vec![0u8; 2 * CLUSTER as usize];
    chain.read_at(&mut back, 0).unwrap();
    assert!(back[..CLUSTER as usize].iter().all(|&b| b == 7));
    assert!(back[CLUSTER as usize..].iter().all(|&b| b == 0));
    // After a failed flush the image is closed as a crash would leave it:
    // the next open checks it first.
    assert!(chain.close().is_err(), "close after a failed flush");
    drop(chain);
    check(&(faulty.clone() as SharedIo), true).unwrap();
    let reopened = open_chain(faulty.clone());
    reopened.read_at(&mut back, 0).unwrap();
    assert!(back[..CLUSTER as usize].iter().all(|&b| b == 7));
    reopened.close().unwrap();
}

/// Linux may drop the pages whose write-back failed and report the
/// failure once: a retried fdatasync then succeeds with the data gone. So
/// after a failed flush the delta must refuse writes and flushes (a flush
/// that succeeded would make the BAT point at data that never reached the
/// disk) until it is reopened and checked.
#[test]
fn a_failed_flush_stops_the_delta_until_it_is_checked() {
    let (faulty, chain) = new_disk("failed.hdd");
    chain.write_at(&vec![1u8; CLUSTER as usize], 0).unwrap();
    chain
        .write_at(&vec![2u8; CLUSTER as usize], CLUSTER)
        .unwrap();
    chain.flush().unwrap();
    // Cluster 1's space goes to cluster 5, whose data then fails to reach
    // the disk: a BAT entry made durable now would show cluster 5 as the
    // zeros of the punched hole.
    chain.discard(CLUSTER, CLUSTER).unwrap();
    chain.flush().unwrap();
    chain
        .write_at(&vec![5u8; CLUSTER as usize], 5 * CLUSTER)
        .unwrap();
    faulty.set_plan(FaultPlan {
        fail_writes_after: None,
        fail_flush: true,
    });
    assert!(chain.flush().is_err());
    faulty.set_plan(FaultPlan::default());
    let again = chain.flush();
    assert!(again.is_err(), "a flush after a failed one succeeded");
    let msg = again.unwrap_err().to_string();
    assert!(msg.contains("failed.hdd") && msg.contains("check"), "{msg}");
    assert!(chain.write_at(&[9u8; 512], 0).is_err(), "a write was taken");
    assert!(chain.discard(0, CLUSTER).is_err(), "a discard was taken");
    assert!(
        chain.plan_write(0, 512).is_err(),
        "queued writes were planned"
    );
    // Reads still work.
    let mut back = vec![0u8; CLUSTER as usize];
    chain.read_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|&b| b == 1));
    assert!(chain.close().is_err(), "close after a failed flush");
    drop(chain);
    // What is on the disk: check, reopen, every flushed cluster is there.
    let image = faulty.crash_image(|_| false);
    let mem: SharedIo = Arc::new(MemIo::from_bytes("after.hdd", image));
    check(&mem, true).unwrap();
    let chain = open_chain(mem);
    chain.read_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|&b| b == 1));
    chain.read_at(&mut back, CLUSTER).unwrap();
    assert!(
        back.iter().all(|&b| b == 0),
        "a discarded cluster reads zeros"
    );
    chain.close().unwrap();
}

/// The same rule for a raw image: once a flush failed, no write and no
/// flush succeeds.
#[test]
fn a_failed_flush_stops_a_raw_image_too() {
    let faulty = Arc::new(FaultyIo::new("raw.img"));
    ploop_format::raw::RawDelta::create(faulty.clone(), SIZE, false).unwrap();
    let raw = ploop_format::raw::RawDelta::open(faulty.clone(), true).unwrap();
    let chain = Chain::new(vec![Arc::new(ploop_image::Delta::Raw(raw))], CLUSTER, SIZE).unwrap();
    chain.write_at(&[1u8; 4096], 0).unwrap();
    faulty.set_plan(FaultPlan {
        fail_writes_after: None,
        fail_flush: true,
    });
    assert!(chain.flush().is_err());
    faulty.set_plan(FaultPlan::default());
    assert!(
        chain.flush().is_err(),
        "a flush after a failed one succeeded"
    );
    assert!(
        chain.write_at(&[2u8; 4096], 0).is_err(),
        "a write was taken"
    );
    assert!(chain.discard(0, 4096).is_err(), "a discard was taken");
}
