//! Crash explorer: runs a disk's life (writes that allocate, partial
//! writes, discards, flushes, a snapshot with copy-on-write into the new
//! delta, a merge back down, compaction and defragmentation online with
//! writes under way, clean closes, and both again offline) on journaled
//! in-memory files, then rebuilds the files as a power cut at every
//! recorded write and flush would leave them, several times per point
//! with different survivors (any subset of the unflushed writes, in any
//! order, some torn at sector boundaries). For every crash state:
//!   - each delta the disk is made of at that moment passes `check` after
//!     repair, with nothing worse than an in-use flag, leaked clusters or
//!     a ragged tail;
//!   - the disk opens, and every cluster not written since the last
//!     completed flush reads back exactly as it was then.
//!
//! The figures go to target/crash-explorer.txt (scripts/test.sh prints it).

mod common;

use std::sync::Arc;

use common::Rng;

use ploop_format::ploop::check::check;
use ploop_format::ploop::{CreateOptions, OpenFlags, PloopDelta, Version};
use ploop_image::ops::copy_down;
use ploop_image::{Chain, Delta};
use ploop_io::{Journal, MemIo, SharedIo};

const CS: u64 = 32 << 10;
const CLUSTERS: u64 = 8;
const SIZE: u64 = CS * CLUSTERS;
/// Seeds (disk lives) and survivor draws per crash point.
const LIVES: u64 = 32;
const DRAWS: usize = 5;

/// A write or discard: when it began, where, and the byte it leaves.
#[derive(Clone, Copy)]
struct Touch {
    point: usize,
    at: u64,
    len: u64,
    val: u8,
}

/// What the disk should hold, and when.
#[derive(Default)]
struct Model {
    live: Vec<u8>,
    /// (journal point, content) at each completed flush.
    checkpoints: Vec<(usize, Vec<u8>)>,
    /// (journal point when it began, cluster) of each write and discard.
    touches: Vec<Touch>,
    /// (journal point, files making up the disk from then on).
    views: Vec<(usize, Vec<usize>)>,
    /// Clusters moved online (with writes between copy and commit).
    moved_online: u64,
}

fn create(io: SharedIo) {
    PloopDelta::create(
        io,
        CreateOptions {
            virtual_size: SIZE,
            cluster_size: CS,
            version: Version::V2,
            preallocate: false,
        },
    )
    .expect("create");
}

fn open(io: SharedIo, writable: bool) -> Arc<Delta> {
    let d = PloopDelta::open(
        io,
        OpenFlags {
            writable,
            allow_dirty: false,
        },
    )
    .expect("open");
    Arc::new(Delta::Ploop(d))
}

/// Random writes, discards and flushes on `chain`, mirrored in the model.
fn work(chain: &Chain, j: &Journal, m: &mut Model, rng: &mut Rng, steps: usize) {
    for _ in 0..steps {
        let cluster = rng.below(CLUSTERS);
        let start = j.len();
        match rng.below(8) {
            0..=3 => {
                // Whole or partial cluster, sector-aligned or not.
                let off = if rng.below(2) == 0 { 0 } else { rng.below(CS) };
                let len = (1 + rng.below(CS)).min(CS - off);
                let at = cluster * CS + off;
                let val = 1 + rng.below(255) as u8;
                chain.write_at(&vec![val; len as usize], at).expect("write");
                m.live[at as usize..(at + len) as usize].fill(val);
                m.touches.push(Touch {
                    point: start,
                    at,
                    len,
                    val,
                });
            }
            4 => {
                let (off, len) = if rng.below(2) == 0 {
                    (0, CS)
                } else {
                    let off = rng.below(CS);
                    (off, (1 + rng.below(CS)).min(CS - off))
                };
                let at = cluster * CS + off;
                chain.discard(at, len).expect("discard");
                m.live[at as usize..(at + len) as usize].fill(0);
                m.touches.push(Touch {
                    point: start,
                    at,
                    len,
                    val: 0,
                });
            }
            _ => {
                chain.flush().expect("flush");
                m.checkpoints.push((j.len(), m.live.clone()));
            }
        }
    }
}

/// One disk's life; returns its journal, its files and the model.
fn life(seed: u64) -> (Journal, Vec<String>, Model) {
    let mut rng = Rng::new(seed);
    let j = Journal::new();
    let mut m = Model {
        live: vec![0; SIZE as usize],
        ..Model::default()
    };
    let d0: SharedIo = Arc::new(j.create("root.hdd"));
    create(d0.clone());
    if seed.is_multiple_of(2) {
        add_extension(&d0);
    }
    // Crashes from here on, the first writable open included (it takes
    // the bitmap of the lives that have one over, and cuts the extension
    // off the file; each clean close saves it again).
    m.views.push((j.len(), vec![0]));
    m.checkpoints.push((j.len(), m.live.clone()));
    let chain = Chain::new(vec![open(d0.clone(), true)], CS, SIZE).unwrap();
    chain.flush().unwrap();
    work(&chain, &j, &mut m, &mut rng, 14);

    // Snapshot: close the top, make the new delta, then (as the
    // descriptor is saved) the disk is both.
    chain.close().unwrap();
    m.checkpoints.push((j.len(), m.live.clone()));
    let d1: SharedIo = Arc::new(j.create("root.hdd.snap"));
    create(d1.clone());
    m.views.push((j.len(), vec![0, 1]));
    let chain = Chain::new(
        vec![open(d0.clone(), false), open(d1.clone(), true)],
        CS,
        SIZE,
    )
    .unwrap();
    work(&chain, &j, &mut m, &mut rng, 14);
    chain.close().unwrap();
    m.checkpoints.push((j.len(), m.live.clone()));

    // Merge the new delta down; until the descriptor drops it, the disk is
    // still both deltas (the copies land under the child's clusters).
    let parent = Chain::new(vec![open(d0.clone(), true)], CS, SIZE).unwrap();
    let child = open(d1.clone(), false);
    copy_down(&child, &parent, &|_, _| {}).unwrap();
    parent.close().unwrap();
    m.views.push((j.len(), vec![0]));
    m.checkpoints.push((j.len(), m.live.clone()));

    let chain = Chain::new(vec![open(d0.clone(), true)], CS, SIZE).unwrap();
    work(&chain, &j, &mut m, &mut rng, 10);
    // Online compaction and defragmentation: batches copied while the
    // guest writes and discards, committed after (as a served disk does
    // with no request in flight).
    let top = chain.top().as_ploop().expect("ploop");
    top.start_tracking();
    let mut buf = top.move_buffers();
    for round in 0..4 {
        let moves = if round % 2 == 0 {
            top.plan_compaction(2)
        } else {
            top.plan_defrag(2)
        }
        .unwrap();
        top.copy_moves(&moves, &mut buf).unwrap();
        work(&chain, &j, &mut m, &mut rng, 2);
        m.moved_online += top
            .commit_moves(&moves, &top.take_changes(), &mut buf)
            .unwrap();
        // A commit flushes: everything before it is durable.
        m.checkpoints.push((j.len(), m.live.clone()));
    }
    top.stop_tracking();
    chain.close().unwrap();
    m.checkpoints.push((j.len(), m.live.clone()));

    // Compaction and defragmentation of the closed delta: clusters move,
    // the content stays, at every crash in them too.
    ploop_format::ploop::compact::compact(&d0, false, &|_, _| {}, &|| false).unwrap();
    m.checkpoints.push((j.len(), m.live.clone()));
    // Defragmentation wants no extension in the way: the bitmap is set
    // aside and saved again after, as `ops::defrag` does.
    let bitmap = PloopDelta::take_cbt(d0.clone()).unwrap();
    m.checkpoints.push((j.len(), m.live.clone()));
    ploop_format::ploop::compact::defrag(&d0, &|_, _| {}, &|| false).unwrap();
    m.checkpoints.push((j.len(), m.live.clone()));
    if let Some(b) = bitmap {
        PloopDelta::put_cbt(d0.clone(), b).unwrap();
        m.checkpoints.push((j.len(), m.live.clone()));
    }
    (j, vec!["root.hdd".into(), "root.hdd.snap".into()], m)
}

/// Give a closed delta a format extension (a dirty bitmap, all set) in
/// the cluster after its BAT, as OpenVZ leaves one on a clean close.
fn add_extension(io: &SharedIo) {
    use md5::Digest;
    use ploop_format::ploop::ext::{DIRTY_BITMAP_MAGIC, EXT_MAGIC};
    let mut header = [0u8; 64];
    io.read_at(&mut header, 0).unwrap();
    let data_offset = u64::from(u32::from_le_bytes(header[48..52].try_into().unwrap())) * 512;
    let mut c = vec![0u8; CS as usize];
    c[..8].copy_from_slice(&EXT_MAGIC.to_le_bytes());
    c[24..32].copy_from_slice(&DIRTY_BITMAP_MAGIC.to_le_bytes());
    c[40..44].copy_from_slice(&40u32.to_le_bytes());
    c[48..56].copy_from_slice(&(SIZE / 512).to_le_bytes());
    c[72..76].copy_from_slice(&64u32.to_le_bytes()); // granularity
    c[76..80].copy_from_slice(&1u32.to_le_bytes()); // l1 size
    c[80..88].copy_from_slice(&1u64.to_le_bytes()); // all set
    let sum = md5::Md5::digest(&c[24..]);
    c[8..24].copy_from_slice(&sum);
    io.write_at(&c, data_offset).unwrap();
    header[44..48].copy_from_slice(&0x312e_3276u32.to_le_bytes()); // "v2.1"
    header[56..64].copy_from_slice(&(data_offset / 512).to_le_bytes());
    io.write_at(&header, 0).unwrap();
    io.flush().unwrap();
}

/// Problems `check` may find after a crash without anything being lost.
fn harmless(problem: &str) -> bool {
    problem.contains("in-use flag")
        || problem.contains("unreferenced cluster")
        || problem.contains("not a multiple of the cluster size")
        || problem.contains("empty flag")
}

#[derive(Default, Debug)]
struct Figures {
    lives: u64,
    points: u64,
    states: u64,
    failed_check: u64,
    failed_open: u64,
    lost: u64,
    repaired: u64,
    moved_online: u64,
}

/// Crash one life at `point` with `rng` choosing survivors.
fn explore(j: &Journal, names: &[String], m: &Model, point: usize, rng: &mut Rng, f: &mut Figures) {
    let view = &m
        .views
        .iter()
        .rev()
        .find(|(p, _)| *p <= point)
        .expect("a view")
        .1;
    let (since, durable) = m
        .checkpoints
        .iter()
        .rev()
        .find(|(p, _)| *p <= point)
        .expect("a checkpoint");
    let images = j.crash(point, rng);
    f.states += 1;
    let mut layers = Vec::new();
    for (i, &file) in view.iter().enumerate() {
        let io: SharedIo = Arc::new(MemIo::from_bytes(&names[file], images[file].clone()));
        match check(&io, true) {
            Ok(r) => {
                if let Some(why) = dangling_extension(&io) {
                    f.failed_check += 1;
                    eprintln!("point {point}: {}: after check, {why}", names[file]);
                    return;
                }
                if let Some(p) = r.problems.iter().find(|p| !harmless(p)) {
                    f.failed_check += 1;
                    eprintln!("point {point}: {}: {p}", names[file]);
                    return;
                }
                if !r.problems.is_empty() {
                    f.repaired += 1;
                }
            }
            Err(e) => {
                f.failed_check += 1;
                eprintln!("point {point}: {}: check failed: {e}", names[file]);
                return;
            }
        }
        let top = i == view.len() - 1;
        match PloopDelta::open(
            io,
            OpenFlags {
                writable: top,
                allow_dirty: false,
            },
        ) {
            Ok(d) => layers.push(Arc::new(Delta::Ploop(d))),
            Err(e) => {
                f.failed_open += 1;
                eprintln!("point {point}: {}: open failed: {e}", names[file]);
                return;
            }
        }
    }
    let chain = Chain::new(layers, CS, SIZE).expect("chain");
    let mut back = vec![0u8; SIZE as usize];
    if let Err(e) = chain.read_at(&mut back, 0) {
        f.failed_open += 1;
        eprintln!("point {point}: read failed: {e}");
        return;
    }
    // Each byte holds what the last flush left, or what a write or discard
    // since then (flushed or not) put there: nothing else.
    let since_flush: Vec<Touch> = m
        .touches
        .iter()
        .filter(|t| t.point >= *since && t.point < point)
        .copied()
        .collect();
    for c in 0..CLUSTERS {
        let r = (c * CS) as usize..((c + 1) * CS) as usize;
        if back[r.clone()] == durable[r.clone()] {
            continue;
        }
        let bad = r.clone().find(|&b| {
            back[b] != durable[b]
                && !since_flush
                    .iter()
                    .any(|t| (t.at..t.at + t.len).contains(&(b as u64)) && t.val == back[b])
        });
        if let Some(b) = bad {
            f.lost += 1;
            eprintln!("point {point}: byte {b} (cluster {c}) lost its flushed content");
            return;
        }
    }
}

/// Why the extension the header names is not there, if it names one.
fn dangling_extension(io: &SharedIo) -> Option<String> {
    let mut hb = [0u8; 64];
    io.read_at(&mut hb, 0).ok()?;
    let raw = ploop_format::ploop::RawHeader::parse(&hb);
    let header = ploop_format::ploop::Header::validate(raw, "crashed").ok()?;
    let size = io.size().ok()?;
    let mut bat = vec![0u8; 4 * header.bat_entries as usize];
    io.read_at(&mut bat, 64).ok()?;
    let bat: Vec<u32> = bat
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    match ploop_format::ploop::ext::read(io, &header, &bat, size) {
        Ok(ploop_format::ploop::ext::State::Dangling(why)) => Some(why),
        Err(e) => Some(e.to_string()),
        Ok(_) => None,
    }
}

#[test]
fn crash_at_every_write_and_flush_loses_nothing_flushed() {
    let mut f = Figures::default();
    for seed in 1..=LIVES {
        let (j, names, m) = life(seed);
        f.lives += 1;
        f.moved_online += m.moved_online;
        let first = m.checkpoints[0].0;
        let mut rng = Rng(seed | 0x1234_5678_0000);
        for point in first..=j.len() {
            f.points += 1;
            for _ in 0..DRAWS {
                explore(&j, &names, &m, point, &mut rng, &mut f);
            }
        }
    }
    let report = format!(
        "crash explorer: {} disk lives, {} crash points (every write and flush), {} crash states\n  \
         failed to check: {}, failed to open or read: {}, flushed data lost: {}\n  \
         states that check repaired (in-use flag, leaked clusters, ragged tail): {}\n  \
         clusters moved online (compaction, defragmentation) with writes under way: {}\n",
        f.lives,
        f.points,
        f.states,
        f.failed_check,
        f.failed_open,
        f.lost,
        f.repaired,
        f.moved_online
    );
    print!("{report}");
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("../crash-explorer.txt");
    let _ = std::fs::write(out, &report);
    assert!(f.states >= 10_000, "{report}");
    assert!(f.moved_online >= LIVES, "{report}");
    assert_eq!(
        (f.failed_check, f.failed_open, f.lost),
        (0, 0, 0),
        "{report}"
    );
}

/// The explorer can fail: told that a write was flushed when it was not
/// (a checkpoint that claims other content), it reports a loss.
#[test]
fn explorer_detects_a_lost_flushed_write() {
    let (j, names, mut m) = life(3);
    // Pretend a flush happened right after the first write of the last
    // phase, that in truth was never flushed: the explorer must report it.
    let last = *m.touches.last().expect("some writes");
    let last_write = last.point + 1;
    let mut fake = m.live.clone();
    fake[last.at as usize] ^= 0xff;
    m.checkpoints.push((last_write, fake));
    m.touches.retain(|t| t.point < last_write);
    let mut f = Figures::default();
    let mut rng = Rng(99);
    explore(&j, &names, &m, last_write, &mut rng, &mut f);
    assert_eq!(f.lost, 1, "{f:?}");
}
