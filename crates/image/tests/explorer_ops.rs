//! Crash explorer for the operations that change a disk's files and its
//! DiskDescriptor.xml: snapshot, merge, delete, switch, `convert -v` and
//! `convert -f`, run as they are (the real `ops` code) on a journaled
//! in-memory filesystem. At every recorded write, flush, creation, rename,
//! removal and folder sync, the folder is rebuilt as a power cut would
//! leave it (files: any subset of unflushed writes, in any order, some
//! torn; folder changes since the last folder sync: any prefix), written
//! to a real directory, and then:
//!   - `check` (the real one, on real files) must repair the disk;
//!   - the disk must open, and each cluster must read as it did either
//!     before or after the operation that was under way.
//!
//! Figures go to target/crash-explorer-ops.txt (scripts/test.sh prints it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use ploop_format::ploop::Version;
use ploop_image::ops::{self, DiskFormat, InitOptions};
use ploop_image::{Disk, OpenOptions};
use ploop_io::fsys::{with_fs, JournaledFs};
use ploop_io::{Journal, Survivors};

const CS: u64 = 64 << 10;
const CLUSTERS: u64 = 6;
const SIZE: u64 = CS * CLUSTERS;
const LIVES: u64 = 8;
const DRAWS: usize = 4;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

impl Survivors for Rng {
    fn keep(&mut self) -> bool {
        self.next() & 1 == 1
    }
    fn torn(&mut self, sectors: usize) -> Option<Vec<bool>> {
        (sectors > 1 && self.below(4) == 0)
            .then(|| (0..sectors).map(|_| self.next() & 1 == 1).collect())
    }
    fn order(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
        v
    }
    fn prefix(&mut self, n: usize) -> usize {
        self.below(n as u64 + 1) as usize
    }
}

/// One step of a life: the journal span it covers, and the disk's content
/// before and after it.
struct Step {
    what: String,
    from: usize,
    to: usize,
    before: Vec<u8>,
    after: Vec<u8>,
}

/// The disk's content through the real code (on whatever fs is in place).
fn content(dd: &Path) -> Vec<u8> {
    let disk = Disk::open(dd, OpenOptions::default()).expect("open");
    let mut buf = vec![0u8; SIZE as usize];
    disk.chain.read_at(&mut buf, 0).expect("read");
    disk.close().expect("close");
    buf
}

/// Write whole clusters with new values through the real chain, and close.
fn write_clusters(dd: &Path, rng: &mut Rng) {
    let disk = Disk::open(
        dd,
        OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
    )
    .expect("open writable");
    for _ in 0..1 + rng.below(3) {
        let c = rng.below(CLUSTERS);
        let val = 1 + rng.below(255) as u8;
        disk.chain
            .write_at(&vec![val; CS as usize], c * CS)
            .expect("write");
    }
    disk.close().expect("close");
}

fn snapshots(dd: &Path) -> Vec<uuid::Uuid> {
    let d = ploop_format::descriptor::Descriptor::load(dd).expect("descriptor");
    d.snapshots.iter().map(|s| s.guid).collect()
}

/// A disk's life on the journaled filesystem; returns the steps.
fn life(seed: u64, j: &Journal, dir: &Path) -> Vec<Step> {
    let fs = Rc::new(JournaledFs::new(j.clone()));
    with_fs(fs, || {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let image = dir.join("root.hdd");
        let dd = dir.join("DiskDescriptor.xml");
        ops::init(
            &image,
            InitOptions {
                size: SIZE,
                format: DiskFormat::Expanded,
                version: Version::V2,
                cluster_size: CS,
            },
            &|_, _| {},
        )
        .expect("init");
        let mut steps = Vec::new();
        let mut now = content(&dd);
        let mut step = |what: &str, f: &mut dyn FnMut()| {
            let from = j.len();
            f();
            let after = content(&dd);
            steps.push(Step {
                what: what.to_string(),
                from,
                to: j.len(),
                before: std::mem::replace(&mut now, after.clone()),
                after,
            });
        };
        step("write", &mut || write_clusters(&dd, &mut rng));
        if seed.is_multiple_of(2) {
            // Format conversions rewrite the image into a new file.
            for (what, to) in [
                ("convert -f raw", DiskFormat::Raw),
                ("convert -f ploop1", DiskFormat::Expanded),
                ("convert -f preallocated", DiskFormat::Preallocated),
                ("convert -f ploop1", DiskFormat::Expanded),
            ] {
                step(what, &mut || {
                    ops::convert_format(&dd, to, &|_, _| {}).expect("convert")
                });
                step("write", &mut || write_clusters(&dd, &mut rng));
            }
            return steps;
        }
        let mut first = None;
        step("snapshot", &mut || {
            first = Some(ops::snapshot(&dd, None).expect("snapshot"))
        });
        step("write", &mut || write_clusters(&dd, &mut rng));
        step("snapshot", &mut || {
            ops::snapshot(&dd, None).expect("snapshot");
        });
        step("write", &mut || write_clusters(&dd, &mut rng));
        step("merge", &mut || {
            ops::merge(&dd, None, &|_, _| {}).expect("merge")
        });
        step("write", &mut || write_clusters(&dd, &mut rng));
        let first = first.expect("first snapshot");
        step("snapshot-delete", &mut || {
            ops::delete(&dd, first, &|_, _| {}).expect("delete")
        });
        step("snapshot", &mut || {
            ops::snapshot(&dd, None).expect("snapshot");
        });
        step("write", &mut || write_clusters(&dd, &mut rng));
        let back = *snapshots(&dd)
            .iter()
            .find(|g| **g != ploop_format::descriptor::TOP_GUID)
            .expect("a snapshot");
        step("snapshot-switch", &mut || {
            ops::switch(&dd, back).expect("switch")
        });
        step("convert -v 1", &mut || {
            ops::convert_version(&dd, Version::V1).expect("convert")
        });
        steps
    })
}

#[derive(Default)]
struct Figures {
    states: u64,
    points: u64,
    failed: u64,
    per_op: BTreeMap<String, u64>,
}

/// Rebuild the folder at `point` into `dir` (emptied first).
fn materialize(files: &BTreeMap<PathBuf, Vec<u8>>, dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    for (path, data) in files {
        let name = path.file_name().expect("a file name");
        std::fs::write(dir.join(name), data).unwrap();
    }
}

fn verify(dir: &Path, step: &Step) -> Result<(), String> {
    let dd = dir.join("DiskDescriptor.xml");
    // Whatever an interrupted operation left: the real check repairs it.
    ops::check_disk(&dd, false).map_err(|e| format!("check: {e}"))?;
    let disk = Disk::open(&dd, OpenOptions::default()).map_err(|e| format!("open: {e}"))?;
    let mut back = vec![0u8; SIZE as usize];
    disk.chain
        .read_at(&mut back, 0)
        .map_err(|e| format!("read: {e}"))?;
    let _ = disk.close();
    for c in 0..CLUSTERS as usize {
        let r = c * CS as usize..(c + 1) * CS as usize;
        let (was, will) = (&step.before[r.clone()], &step.after[r.clone()]);
        // A cluster being written in place, not yet flushed, may be torn.
        if step.what == "write" && was != will {
            continue;
        }
        if back[r.clone()] != *was && back[r] != *will {
            return Err(format!("cluster {c} is neither as before nor as after"));
        }
    }
    Ok(())
}

#[test]
fn crashes_during_snapshot_merge_delete_switch_and_convert_keep_the_disk() {
    let scratch = tempfile::tempdir().unwrap();
    let mut f = Figures::default();
    for seed in 1..=LIVES {
        let j = Journal::new();
        let home = scratch.path().join(format!("life-{seed}"));
        let steps = life(seed, &j, &home);
        let mut rng = Rng(seed | 0xabcd_0000);
        let crashed = scratch.path().join("crashed");
        for step in &steps {
            for point in step.from..=step.to {
                f.points += 1;
                for _ in 0..DRAWS {
                    let files = j.crash_folder(point, &mut rng);
                    materialize(&files, &crashed);
                    f.states += 1;
                    *f.per_op.entry(step.what.clone()).or_default() += 1;
                    if let Err(e) = verify(&crashed, step) {
                        f.failed += 1;
                        eprintln!("life {seed}, {} at point {point}: {e}", step.what);
                    }
                }
            }
        }
    }
    let per_op: Vec<String> = f.per_op.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let report = format!(
        "crash explorer (operations): {} crash points, {} crash states ({}); failed: {}\n",
        f.points,
        f.states,
        per_op.join(", "),
        f.failed
    );
    print!("{report}");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../crash-explorer-ops.txt");
    let _ = std::fs::write(out, &report);
    assert_eq!(f.failed, 0, "{report}");
    assert!(f.states >= 2_000, "{report}");
}
