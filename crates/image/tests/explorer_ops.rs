//! Crash explorer for the operations that change a disk's files and its
//! DiskDescriptor.xml: snapshot (with a changed-block bitmap, `-b`, too),
//! merge, delete, switch, `convert -v` and `convert -f`, and the saving of
//! the bitmap on every close, run as they are (the real `ops` code) on a journaled
//! in-memory filesystem. At every recorded write, flush, creation, rename,
//! removal and folder sync, the folder is rebuilt as a power cut would
//! leave it (files: any subset of unflushed writes, in any order, some
//! torn; folder changes since the last folder sync: any prefix), written
//! to a real directory, and then:
//!   - `check` (the real one, on real files) must repair the disk;
//!   - the disk must open and read as it did before or after the step
//!     under way (after it, once it is over); a write under way may leave
//!     each sector old or new. The contents come from a model, and the
//!     real code must agree with it after every step;
//!   - a changed-block bitmap the top still holds after the repair marks
//!     every cluster written since it started, in the steps before;
//!   - once per crash point, that repair is itself crashed at each of its
//!     writes, and what it leaves must repair to the same disk.
//!
//! Figures go to target/crash-explorer-ops.txt (scripts/test.sh prints it).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use ploop_format::descriptor::{Descriptor, TOP_GUID};
use ploop_format::ploop::Version;
use ploop_image::ops::{self, DiskFormat, InitOptions};
use ploop_image::{Disk, OpenOptions};
use ploop_io::fsys::{self, with_fs, JournaledFs};
use ploop_io::{BlockIo, Journal, OpenMode};
use uuid::Uuid;

use common::Rng;

const CS: u64 = 64 << 10;
const CLUSTERS: u64 = 6;
const SIZE: u64 = CS * CLUSTERS;
const LIVES: u64 = 8;
const DRAWS: usize = 4;

/// One step of a life: the journal span it covers, and the disk's content
/// before (None: no disk yet) and after it, from the model.
struct Step {
    what: String,
    from: usize,
    to: usize,
    before: Option<Vec<u8>>,
    after: Vec<u8>,
    /// Clusters written since the bitmap started, in the steps before
    /// this one: a bitmap left after a crash must mark them all.
    floor: Option<BTreeSet<u64>>,
}

/// The bitmap the lives start.
const CBT_ID: Uuid = Uuid::from_u128(0x6f1d_2c3b_0a4e_4c55_9d66_7e8f_90a1_b2c3);

impl Step {
    /// Writes change clusters in place: a crash may tear them per sector.
    fn is_write(&self) -> bool {
        self.what == "write"
    }
}

/// The disk's content through the real code (on whatever fs is in place).
fn content(dd: &Path) -> Vec<u8> {
    let disk = Disk::open(dd, OpenOptions::default()).expect("open");
    // The disk's own size: resize changes it.
    let mut buf = vec![0u8; disk.chain.virtual_size() as usize];
    disk.chain.read_at(&mut buf, 0).expect("read");
    disk.close().expect("close");
    buf
}

/// Write whole clusters with new values through the real chain, and close;
/// the model gets the same values.
fn write_clusters(dd: &Path, rng: &mut Rng, model: &mut [u8]) -> Vec<u64> {
    let disk = Disk::open(
        dd,
        OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
    )
    .expect("open writable");
    // Distinct clusters: a sector is then either as before or as written.
    let first = rng.below(CLUSTERS);
    let written: Vec<u64> = (0..1 + rng.below(3))
        .map(|i| (first + 2 * i) % CLUSTERS)
        .collect();
    for &c in &written {
        let val = 1 + rng.below(255) as u8;
        disk.chain
            .write_at(&vec![val; CS as usize], c * CS)
            .expect("write");
        model[(c * CS) as usize..((c + 1) * CS) as usize].fill(val);
    }
    disk.close().expect("close");
    written
}

fn snapshots(dd: &Path) -> Vec<Uuid> {
    let d = ploop_format::descriptor::Descriptor::load(dd).expect("descriptor");
    d.snapshots.iter().map(|s| s.guid).collect()
}

/// A disk's life on the journaled filesystem; returns the steps. After
/// every step the disk must read as the model says: operations that keep
/// the content keep it, a switch brings back the snapshot's content.
fn life(seed: u64, j: &Journal, dir: &Path) -> (Vec<Step>, Views) {
    let fs = Rc::new(JournaledFs::new(j.clone()));
    with_fs(fs, || {
        let mut rng = Rng::new(seed);
        let image = dir.join("root.hdd");
        let dd = dir.join("DiskDescriptor.xml");
        let mut steps: Vec<Step> = Vec::new();
        let mut model = vec![0u8; SIZE as usize];
        // Content of each snapshot, as it was when taken.
        let mut saved: Views = HashMap::new();
        // Clusters written since the bitmap started (None: no bitmap).
        let floor: std::cell::RefCell<Option<BTreeSet<u64>>> = Default::default();
        let record = |steps: &mut Vec<Step>, what: &str, from: usize, model: &[u8]| {
            let got = content(&dd);
            assert!(
                got == model,
                "life {seed}: after {what}, the disk does not read as it should"
            );
            steps.push(Step {
                what: what.to_string(),
                from,
                to: j.len(),
                before: steps.last().map(|s| s.after.clone()),
                after: model.to_vec(),
                floor: floor.borrow().clone(),
            });
        };
        let from = j.len();
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
        record(&mut steps, "init", from, &model);
        let write = |steps: &mut Vec<Step>, model: &mut Vec<u8>, rng: &mut Rng| {
            let from = j.len();
            let written = write_clusters(&dd, rng, model);
            record(steps, "write", from, model);
            if let Some(f) = floor.borrow_mut().as_mut() {
                f.extend(written);
            }
        };
        write(&mut steps, &mut model, &mut rng);
        if seed.is_multiple_of(2) {
            // Format conversions rewrite the image into a new file.
            for (what, to) in [
                ("convert -f raw", DiskFormat::Raw),
                ("convert -f ploop1", DiskFormat::Expanded),
                ("convert -f preallocated", DiskFormat::Preallocated),
                ("convert -f ploop1", DiskFormat::Expanded),
            ] {
                let from = j.len();
                ops::convert_format(&dd, to, &|_, _| {}).expect("convert");
                record(&mut steps, what, from, &model);
                write(&mut steps, &mut model, &mut rng);
            }
            return (steps, saved);
        }
        // A bitmap from here on: each write's close saves it; snapshots
        // and merges carry it.
        let from = j.len();
        let g = ops::snapshot_with_cbt(&dd, None, Some(CBT_ID)).expect("snapshot -b");
        saved.insert(g, model.clone());
        record(&mut steps, "snapshot -b", from, &model);
        *floor.borrow_mut() = Some(BTreeSet::new());
        write(&mut steps, &mut model, &mut rng);
        let mut snapshot = |steps: &mut Vec<Step>, model: &Vec<u8>| {
            let from = j.len();
            let g = ops::snapshot(&dd, None).expect("snapshot");
            saved.insert(g, model.clone());
            record(steps, "snapshot", from, model);
            g
        };
        let first = snapshot(&mut steps, &model);
        write(&mut steps, &mut model, &mut rng);
        snapshot(&mut steps, &model);
        write(&mut steps, &mut model, &mut rng);
        let from = j.len();
        ops::merge(&dd, None, &|_, _| {}).expect("merge");
        record(&mut steps, "merge", from, &model);
        write(&mut steps, &mut model, &mut rng);
        let from = j.len();
        ops::delete(&dd, first, &|_, _| {}).expect("delete");
        record(&mut steps, "snapshot-delete", from, &model);
        snapshot(&mut steps, &model);
        write(&mut steps, &mut model, &mut rng);
        // Merges keep each remaining snapshot's view; take one that is left.
        let left = snapshots(&dd);
        let back = *left
            .iter()
            .find(|g| saved.contains_key(g))
            .expect("a snapshot taken here");
        // Back to an older point: the new top keeps no bitmap.
        *floor.borrow_mut() = None;
        let from = j.len();
        ops::switch(&dd, back).expect("switch");
        model = saved[&back].clone();
        record(&mut steps, "snapshot-switch", from, &model);
        // snapshot-merge -n: the merged delta gets a new name (link, then
        // descriptor, then the old name goes).
        let mut take = |steps: &mut Vec<Step>, model: &Vec<u8>| {
            let from = j.len();
            let g = ops::snapshot(&dd, None).expect("snapshot");
            saved.insert(g, model.clone());
            record(steps, "snapshot", from, model);
            g
        };
        take(&mut steps, &model);
        write(&mut steps, &mut model, &mut rng);
        let from = j.len();
        ops::merge(&dd, None, &|_, _| {}).expect("merge");
        record(&mut steps, "merge", from, &model);
        let from = j.len();
        ops::move_delta(&dd, TOP_GUID, &dir.join("moved.hdd")).expect("merge -n");
        record(&mut steps, "merge -n", from, &model);
        // A snapshot marked temporary (snapshot-delete with children).
        let marked = take(&mut steps, &model);
        write(&mut steps, &mut model, &mut rng);
        let from = j.len();
        ops::mark_temporary(&dd, marked).expect("mark temporary");
        record(&mut steps, "mark temporary", from, &model);
        ops::merge(&dd, None, &|_, _| {}).expect("merge the marked one away");
        // replace: the base swapped for an identical copy.
        let base = {
            let d = Descriptor::load(&dd).expect("descriptor");
            dir.join(&d.base().expect("a base").file)
        };
        take(&mut steps, &model);
        let copy = dir.join("copy.hdd");
        {
            let bytes = ploop_io::fsys::read(&base).expect("read base");
            let f = ploop_io::fsys::open(
                &copy,
                ploop_io::OpenMode {
                    create_new: true,
                    ..ploop_io::OpenMode::read_write()
                },
            )
            .expect("create copy");
            f.write_at(&bytes, 0).expect("write copy");
            f.flush().expect("flush copy");
        }
        let from = j.len();
        ops::replace(&dd, &ops::ReplaceTarget::Level(0), &copy, false, &|_, _| {})
            .expect("replace");
        record(&mut steps, "replace", from, &model);
        write(&mut steps, &mut model, &mut rng);
        let from = j.len();
        ops::convert_version(&dd, Version::V1).expect("convert");
        record(&mut steps, "convert -v 1", from, &model);
        write(&mut steps, &mut model, &mut rng);
        // compact: the first clusters discarded (holes low in the top),
        // then clusters move down into them and the file is cut.
        {
            let disk = Disk::open(
                &dd,
                OpenOptions {
                    writable: true,
                    ..OpenOptions::default()
                },
            )
            .expect("open");
            disk.chain.discard(0, 2 * CS).expect("discard");
            disk.close().expect("close");
            model[..(2 * CS) as usize].fill(0);
            record(&mut steps, "discard", j.len(), &model);
        }
        let from = j.len();
        ops::compact(&dd, false, None, &|_, _| {}, &|| false).expect("compact");
        record(&mut steps, "compact", from, &model);
        // resize, last (the writes above know the first size only): grown,
        // the new clusters read as zeros; shrunk, the tail is gone.
        let from = j.len();
        ops::resize_image(&dd, SIZE + 4 * CS).expect("grow");
        model.resize((SIZE + 4 * CS) as usize, 0);
        record(&mut steps, "resize (grow)", from, &model);
        let from = j.len();
        ops::resize_image(&dd, SIZE - 2 * CS).expect("shrink");
        model.truncate((SIZE - 2 * CS) as usize);
        record(&mut steps, "resize (shrink)", from, &model);
        (steps, saved)
    })
}

/// What each snapshot held when it was taken. A snapshot's view never
/// changes: merges keep the child's view under the child's GUID, and the
/// parent's GUID goes.
type Views = HashMap<Uuid, Vec<u8>>;

/// Every snapshot of the disk in `dir` other than the top reads as it
/// did when taken; none is left marked as a merge target.
fn check_views(dir: &Path, views: &Views) -> Result<(), String> {
    let dd = dir.join("DiskDescriptor.xml");
    let d = ploop_format::descriptor::Descriptor::load(&dd).map_err(|e| e.to_string())?;
    for s in d.snapshots.iter().filter(|s| s.guid != d.top_guid) {
        if s.temporary {
            return Err(format!("snapshot {} is still a merge target", s.guid));
        }
        let want = views
            .get(&s.guid)
            .ok_or_else(|| format!("snapshot {} was never taken", s.guid))?;
        let disk = Disk::open(
            &dd,
            OpenOptions {
                guid: Some(s.guid),
                ..OpenOptions::default()
            },
        )
        .map_err(|e| format!("opening snapshot {}: {e}", s.guid))?;
        // A snapshot shows the disk at its size now (a resize changes it
        // for every view): what was taken, cut or extended with zeros.
        let mut back = vec![0u8; disk.chain.virtual_size() as usize];
        disk.chain
            .read_at(&mut back, 0)
            .map_err(|e| format!("reading snapshot {}: {e}", s.guid))?;
        let _ = disk.close();
        let mut want = want.clone();
        want.resize(back.len(), 0);
        if back != want {
            return Err(format!("snapshot {} does not read as taken", s.guid));
        }
    }
    Ok(())
}

/// Before any repair: a snapshot marked as a merge target (its merge was
/// cut short) must refuse to open on its own.
fn merge_targets_refused(dir: &Path) -> Result<(), String> {
    let dd = dir.join("DiskDescriptor.xml");
    let Ok(d) = ploop_format::descriptor::Descriptor::load(&dd) else {
        return Ok(()); // a torn descriptor is check's to judge
    };
    for s in d.snapshots.iter().filter(|s| s.temporary) {
        let opened = Disk::open(
            &dd,
            OpenOptions {
                guid: Some(s.guid),
                ..OpenOptions::default()
            },
        );
        if opened.is_ok() {
            return Err(format!("half-merged snapshot {} opened", s.guid));
        }
    }
    Ok(())
}

#[derive(Default)]
struct Figures {
    states: u64,
    repair_states: u64,
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

/// Repair the disk in `dir` with the real check, open it and read it all.
fn repair_and_read(dir: &Path) -> Result<Vec<u8>, String> {
    let dd = dir.join("DiskDescriptor.xml");
    ops::check_disk(&dd, false).map_err(|e| format!("check: {e}"))?;
    let disk = Disk::open(&dd, OpenOptions::default()).map_err(|e| format!("open: {e}"))?;
    let mut back = vec![0u8; disk.chain.virtual_size() as usize];
    disk.chain
        .read_at(&mut back, 0)
        .map_err(|e| format!("read: {e}"))?;
    let _ = disk.close();
    Ok(back)
}

/// Check a crash state against its step; returns what the disk holds
/// (None: no disk yet).
fn verify(dir: &Path, step: &Step, point: usize, views: &Views) -> Result<Option<Vec<u8>>, String> {
    if !dir.join("DiskDescriptor.xml").exists() {
        // Only a crash inside init may leave no disk at all.
        return match step.before {
            None if point < step.to => Ok(None),
            _ => Err("the descriptor is gone".into()),
        };
    }
    merge_targets_refused(dir)?;
    // Whatever an interrupted operation left: the real check repairs it.
    let back = repair_and_read(dir)?;
    check_content(&back, step, point)?;
    check_views(dir, views)?;
    check_bitmap(dir, step)?;
    Ok(Some(back))
}

/// A bitmap the top still holds marks every cluster written since it
/// started (in the steps before the one under way).
fn check_bitmap(dir: &Path, step: &Step) -> Result<(), String> {
    let Some(floor) = &step.floor else {
        return Ok(());
    };
    let dd = dir.join("DiskDescriptor.xml");
    let d = Descriptor::load(&dd).map_err(|e| format!("descriptor: {e}"))?;
    let top = d.image(d.top_guid).expect("a top").clone();
    if top.kind != ploop_format::descriptor::ImageType::Compressed {
        return Ok(());
    }
    let io: ploop_io::SharedIo = std::sync::Arc::new(
        ploop_io::FileIo::open(&dir.join(&top.file), OpenMode::read_only())
            .map_err(|e| format!("top: {e}"))?,
    );
    let p = ploop_format::ploop::PloopDelta::open(
        io,
        ploop_format::ploop::OpenFlags {
            writable: false,
            allow_dirty: true,
        },
    )
    .map_err(|e| format!("top: {e}"))?;
    match p.saved_cbt().map_err(|e| format!("bitmap: {e}"))? {
        Some(b) if b.id == CBT_ID => {
            let missing: Vec<_> = floor
                .iter()
                .filter(|&&c| !b.is_set(c * CS / b.granularity))
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("the bitmap claims clusters {missing:?} unchanged"))
            }
        }
        _ => Ok(()),
    }
}

fn check_content(back: &[u8], step: &Step, point: usize) -> Result<(), String> {
    if back == step.after {
        return Ok(());
    }
    // Once the step is over, its result is durable.
    if point == step.to {
        return Err("the completed step's result is not all there".into());
    }
    let Some(before) = &step.before else {
        return Err("a disk made by an unfinished init is not empty".into());
    };
    if back == before.as_slice() {
        return Ok(());
    }
    if !step.is_write() {
        return Err("the disk is neither as before nor as after".into());
    }
    // A write under way: each sector holds its old or its new content.
    let sector = 512;
    for (i, got) in back.chunks(sector).enumerate() {
        let r = i * sector..(i + 1) * sector;
        if got != &before[r.clone()] && got != &step.after[r] {
            return Err(format!("sector {i} is neither as before nor as written"));
        }
    }
    Ok(())
}

/// A crash state copied onto a fresh journaled filesystem (every file and
/// name durable), in a folder named `dir`.
fn journaled_copy(files: &BTreeMap<PathBuf, Vec<u8>>, dir: &Path) -> (Journal, Rc<JournaledFs>) {
    let j = Journal::new();
    let fs = Rc::new(JournaledFs::new(j.clone()));
    with_fs(fs.clone(), || {
        for (path, data) in files {
            let p = dir.join(path.file_name().expect("a file name"));
            let io = fsys::open(&p, OpenMode::create()).expect("create");
            io.write_at(data, 0).expect("write");
            io.flush().expect("flush");
        }
        fsys::sync_dir(dir).expect("sync");
    });
    (j, fs)
}

/// Crash the repair of a crash state: run the real check on a journaled
/// copy of `files`, crash it at every point, and repair what that leaves
/// on real files; the disk must read `want` every time.
fn crash_the_repair(
    files: &BTreeMap<PathBuf, Vec<u8>>,
    want: &[u8],
    views: &Views,
    scratch: &Path,
    rng: &mut Rng,
    f: &mut Figures,
) {
    let dir = scratch.join("repair-home");
    let (j, fs) = journaled_copy(files, &dir);
    let from = j.len();
    let dd = dir.join("DiskDescriptor.xml");
    if with_fs(fs, || ops::check_disk(&dd, false)).is_err() {
        f.failed += 1;
        eprintln!("check failed on the journaled copy of a state it repairs on files");
        return;
    }
    let crashed = scratch.join("repair-crashed");
    for point in from..=j.len() {
        let files = j.crash_folder(point, rng);
        materialize(&files, &crashed);
        f.repair_states += 1;
        match repair_and_read(&crashed).and_then(|back| check_views(&crashed, views).map(|()| back))
        {
            Ok(back) if back == want => {}
            Ok(_) => {
                f.failed += 1;
                eprintln!("a repair cut at point {point} changed the disk");
            }
            Err(e) => {
                f.failed += 1;
                eprintln!("a repair cut at point {point}: {e}");
            }
        }
    }
}

#[test]
fn crashes_during_snapshot_merge_delete_switch_and_convert_keep_the_disk() {
    let scratch = tempfile::tempdir().unwrap();
    let mut f = Figures::default();
    for seed in 1..=LIVES {
        let j = Journal::new();
        let home = scratch.path().join(format!("life-{seed}"));
        let (steps, views) = life(seed, &j, &home);
        let mut rng = Rng(seed | 0xabcd_0000);
        let crashed = scratch.path().join("crashed");
        for step in &steps {
            for point in step.from..=step.to {
                f.points += 1;
                for draw in 0..DRAWS {
                    let files = j.crash_folder(point, &mut rng);
                    materialize(&files, &crashed);
                    f.states += 1;
                    *f.per_op.entry(step.what.clone()).or_default() += 1;
                    match verify(&crashed, step, point, &views) {
                        Err(e) => {
                            f.failed += 1;
                            eprintln!("life {seed}, {} at point {point}: {e}", step.what);
                        }
                        // The repair itself may be cut short: crash that
                        // too, once per crash point.
                        Ok(Some(back)) if draw == 0 => {
                            crash_the_repair(
                                &files,
                                &back,
                                &views,
                                scratch.path(),
                                &mut rng,
                                &mut f,
                            );
                        }
                        Ok(_) => {}
                    }
                }
            }
        }
    }
    let per_op: Vec<String> = f.per_op.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let report = format!(
        "crash explorer (operations): {} crash points, {} crash states ({}), \
         {} more with the repair of a crash state crashed too; failed: {}\n",
        f.points,
        f.states,
        per_op.join(", "),
        f.repair_states,
        f.failed
    );
    print!("{report}");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../crash-explorer-ops.txt");
    let _ = std::fs::write(out, &report);
    assert_eq!(f.failed, 0, "{report}");
    assert!(f.states >= 2_000, "{report}");
}
