//! Offline operations on a disk: init, snapshot, merge, delete, switch,
//! convert, check. Each one changes files first and the descriptor last
//! (atomically), so a crash in between leaves a disk that still reads the
//! same and at worst an orphan file.

use std::path::{Path, PathBuf};

use ploop_format::descriptor::{
    guid_string, parse_guid, Descriptor, ImageEntry, ImageType, Shot, FILE_NAME, MAX_DELTAS,
    NONE_GUID, TOP_GUID,
};
use ploop_format::ploop::check::{check_with_backup, CheckReport};
use ploop_format::ploop::{CreateOptions, PloopDelta, Version};
use ploop_format::raw::RawDelta;
use ploop_format::{Error, Result, SECTOR};
use ploop_io::{is_zero, OpenMode};
use uuid::Uuid;

use crate::chain::{Chain, Delta};
use crate::disk::{dd_dir, image_path, open_delta, open_file, DescriptorLock, Disk, OpenOptions};

/// Progress callback: (done, total) in bytes or clusters.
pub type Progress<'a> = &'a dyn Fn(u64, u64);

/// Image formats `init` and `convert` know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    /// ploop1, grows as data is written ("expanded").
    Expanded,
    /// ploop1 with every cluster allocated up front.
    Preallocated,
}

#[derive(Clone, Copy, Debug)]
pub struct InitOptions {
    pub size: u64,
    pub format: DiskFormat,
    pub version: Version,
    pub cluster_size: u64,
}

fn desc_err(dd: &Path, what: String) -> Error {
    Error::Descriptor {
        path: dd.display().to_string(),
        what,
    }
}

/// Create an image file and the DiskDescriptor.xml beside it.
pub fn init(image: &Path, opts: InitOptions, progress: Progress) -> Result<PathBuf> {
    let dir = dd_dir(image);
    let dd = dir.join(FILE_NAME);
    if ploop_io::fsys::exists(&dd) {
        return Err(desc_err(&dd, "already exists".into()));
    }
    let file_name = image
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Invalid(format!("{}: not a file name", image.display())))?;
    // Validate the geometry before creating anything.
    let header = ploop_format::ploop::Header::new(opts.size, opts.cluster_size, opts.version)?;
    let io = open_file(image, OpenMode::create())?;
    let kind = match opts.format {
        DiskFormat::Raw => {
            RawDelta::create(io, header.virtual_size, false)?;
            ImageType::Plain
        }
        DiskFormat::Expanded | DiskFormat::Preallocated => {
            PloopDelta::create(
                io.clone(),
                CreateOptions {
                    virtual_size: header.virtual_size,
                    cluster_size: opts.cluster_size,
                    version: opts.version,
                    preallocate: false,
                },
            )?;
            if opts.format == DiskFormat::Preallocated {
                // Cluster by cluster, so a large image shows progress.
                let filled = PloopDelta::open(
                    io,
                    ploop_format::ploop::OpenFlags {
                        writable: true,
                        allow_dirty: false,
                    },
                )
                .and_then(|p| allocate_all(&p, progress).and_then(|()| p.close()));
                if let Err(e) = filled {
                    let _ = ploop_io::fsys::remove(image);
                    return Err(e);
                }
            }
            ImageType::Compressed
        }
    };
    let d = Descriptor::new_single(
        header.virtual_size / SECTOR,
        (opts.cluster_size / SECTOR) as u32,
        kind,
        file_name,
        opts.format == DiskFormat::Preallocated,
    );
    if let Err(e) = d.save(&dd) {
        let _ = ploop_io::fsys::remove(image);
        return Err(e);
    }
    Ok(dd)
}

/// Map every cluster of a delta to written zeros, in order (what OpenVZ
/// calls a preallocated image).
fn allocate_all(p: &PloopDelta, progress: Progress) -> Result<()> {
    let zeros = ploop_io::AlignedBuf::zeroed(p.cluster_size() as usize);
    let n = p.clusters();
    for c in 0..n {
        if p.map(c).is_none() {
            p.write_cluster(c, 0, zeros.as_slice(), None)?;
        }
        progress(c + 1, n);
    }
    p.flush()
}

/// Write a descriptor in `dir` for an existing base image. `raw` forces
/// the format (default: detected from the signature); `cluster` is the
/// cluster size for a raw image (default 1 MiB).
pub fn restore_descriptor(
    dir: &Path,
    image: &Path,
    raw: Option<bool>,
    cluster: Option<u64>,
) -> Result<PathBuf> {
    let dd = dir.join(FILE_NAME);
    if ploop_io::fsys::exists(&dd) {
        return Err(desc_err(&dd, "already exists".into()));
    }
    let io = open_file(image, OpenMode::read_only())?;
    let mut first = [0u8; 16];
    io.read_at(&mut first, 0)
        .map_err(|e| Error::io(image.display().to_string(), "reading header", 0, e))?;
    let raw = raw.unwrap_or(!ploop_format::ploop::has_signature(&first));
    let (size, cs, kind) = if raw {
        let size = io
            .size()
            .map_err(|e| Error::io(image.display().to_string(), "reading size", 0, e))?;
        (size, cluster.unwrap_or(1 << 20), ImageType::Plain)
    } else {
        let p = PloopDelta::open(io, ploop_format::ploop::OpenFlags::default())?;
        (p.virtual_size(), p.cluster_size(), ImageType::Compressed)
    };
    if !cs.is_power_of_two()
        || !(ploop_format::ploop::MIN_CLUSTER_SECTORS * SECTOR..=64 << 20).contains(&cs)
    {
        return Err(Error::Invalid(format!("invalid cluster size {cs}")));
    }
    let dir_abs = dir
        .canonicalize()
        .map_err(|e| Error::io(dir.display().to_string(), "resolving folder", 0, e))?;
    let img_abs = image
        .canonicalize()
        .map_err(|e| Error::io(image.display().to_string(), "resolving image", 0, e))?;
    let file = img_abs
        .strip_prefix(&dir_abs)
        .map_err(|_| {
            Error::Invalid(format!(
                "{}: the image must be inside {}",
                image.display(),
                dir.display()
            ))
        })?
        .display()
        .to_string();
    let d = Descriptor::new_single(size / SECTOR, (cs / SECTOR) as u32, kind, &file, false);
    d.save(&dd)?;
    Ok(dd)
}

/// Name for a new delta file: `<first image file>.{uuid}`, as libploop.
pub fn new_delta_name(d: &Descriptor) -> String {
    // After an online merge the surviving file may itself be a snapshot
    // delta: keep the names flat (`root.hdd.{a}`, not `root.hdd.{a}.{b}`).
    let mut base = d.images[0].file.as_str();
    while let Some((head, tail)) = base.rsplit_once('.') {
        let is_guid = tail.starts_with('{') && parse_guid(tail).is_some();
        if !is_guid {
            break;
        }
        base = head;
    }
    format!("{base}.{}", guid_string(&Uuid::new_v4()))
}

/// Create an empty ploop delta shaped like the disk, durable with its
/// folder entry before any descriptor names it.
pub fn create_empty_delta(dd: &Path, d: &Descriptor, file: &str, version: Version) -> Result<()> {
    let path = image_path(dd, file)?;
    let io = open_file(&path, OpenMode::create())?;
    PloopDelta::create(
        io,
        CreateOptions {
            virtual_size: d.size_sectors * SECTOR,
            cluster_size: u64::from(d.blocksize) * SECTOR,
            version,
            preallocate: false,
        },
    )?;
    sync_folder_of(&path)
}

/// Make the folder entry of `path` durable (it may differ from the
/// descriptor's folder).
fn sync_folder_of(path: &Path) -> Result<()> {
    let dir = dd_dir(path);
    ploop_io::fsys::sync_dir(&dir)
        .map_err(|e| Error::io(dir.display().to_string(), "syncing folder", 0, e))
}

/// Version of a delta file (V2 for a raw one).
fn delta_version(dd: &Path, entry: &ImageEntry) -> Result<Version> {
    if entry.kind == ImageType::Plain {
        return Ok(Version::V2);
    }
    let delta = open_delta(
        &image_path(dd, &entry.file)?,
        entry.kind,
        &OpenOptions::default(),
    )?;
    Ok(delta
        .as_ploop()
        .map(|p| p.header().version)
        .unwrap_or(Version::V2))
}

/// Refuse to touch a delta another process holds open read-write.
fn ensure_not_in_use(dd: &Path, entry: &ImageEntry) -> Result<()> {
    let path = image_path(dd, &entry.file)?;
    let io = open_file(&path, OpenMode::read_write())?;
    drop(io);
    Ok(())
}

/// A top delta still marked in use (its writer died) is checked and
/// repaired before it becomes a snapshot: a mount checks only the top, so
/// nothing would clear the mark on a lower delta later, and merges into it
/// would be refused.
fn repair_if_left_in_use(dd: &Path, entry: &ImageEntry) -> Result<()> {
    if entry.kind != ImageType::Compressed {
        return Ok(());
    }
    let path = image_path(dd, &entry.file)?;
    let in_use = open_delta(&path, entry.kind, &OpenOptions::default())?
        .as_ploop()
        .is_some_and(|p| p.header().in_use);
    if in_use {
        tracing::warn!("{} was not closed cleanly: checking it", path.display());
        check_file(&path, false)?;
    }
    Ok(())
}

/// Take an offline snapshot: the current top is frozen under `uuid` (or a
/// random GUID) and a new empty top delta is created above it.
pub fn snapshot(dd: &Path, uuid: Option<Uuid>) -> Result<Uuid> {
    snapshot_with_cbt(dd, uuid, None)
}

/// [`snapshot`], and the new top's changed-block bitmap: a new, empty one
/// named `cbt` (the snapshot is the point it counts from), or else the
/// old top's, carried on (the snapshot keeps its copy).
pub fn snapshot_with_cbt(dd: &Path, uuid: Option<Uuid>, cbt: Option<Uuid>) -> Result<Uuid> {
    let _lock = DescriptorLock::acquire(dd)?;
    let mut d = Descriptor::load(dd)?;
    let chain_len = d.chain(d.top_guid, &dd.display().to_string())?.len();
    let snap = new_snapshot_guid(dd, &d, uuid, chain_len)?;
    let top = d
        .image(d.top_guid)
        .cloned()
        .expect("validated descriptor has its top");
    ensure_not_in_use(dd, &top)?;
    repair_if_left_in_use(dd, &top)?;
    let version = delta_version(dd, &top)?;
    let file = new_delta_name(&d);
    create_empty_delta(dd, &d, &file, version)?;
    let new_path = image_path(dd, &file)?;
    if let Err(e) = carry_bitmap(dd, &top, &new_path, cbt) {
        let _ = ploop_io::fsys::remove(&new_path);
        return Err(e);
    }
    freeze_top(&mut d, snap, file.clone());
    if let Err(e) = d.save(dd) {
        let _ = ploop_io::fsys::remove(&new_path);
        return Err(e);
    }
    Ok(snap)
}

/// Give the new top at `new_path` its bitmap: a new one named `cbt`, or
/// the one the old top's file holds, if any.
fn carry_bitmap(dd: &Path, top: &ImageEntry, new_path: &Path, cbt: Option<Uuid>) -> Result<()> {
    let ro = ploop_format::ploop::OpenFlags {
        writable: false,
        allow_dirty: true,
    };
    let bitmap = match cbt {
        Some(id) => {
            let io = open_file(new_path, OpenMode::read_only())?;
            let p = PloopDelta::open(io, ro)?;
            ploop_format::ploop::cbt::Cbt::new(id, p.cluster_size(), p.virtual_size())
        }
        None if top.kind == ImageType::Compressed => {
            let io = open_file(&image_path(dd, &top.file)?, OpenMode::read_only())?;
            match PloopDelta::open(io, ro)?.saved_cbt()? {
                Some(b) => b,
                None => return Ok(()),
            }
        }
        None => return Ok(()),
    };
    let io = open_file(new_path, OpenMode::read_write())?;
    PloopDelta::put_cbt(io, std::sync::Arc::new(bitmap))
}

/// The GUID a new snapshot gets (`uuid` or a random one), checked against
/// the descriptor and the chain-depth limit.
pub fn new_snapshot_guid(
    dd: &Path,
    d: &Descriptor,
    uuid: Option<Uuid>,
    chain_len: usize,
) -> Result<Uuid> {
    let snap = uuid.unwrap_or_else(Uuid::new_v4);
    if d.shot(snap).is_some() || snap == TOP_GUID || snap == NONE_GUID {
        return Err(desc_err(
            dd,
            format!("snapshot {} already exists", guid_string(&snap)),
        ));
    }
    if chain_len + 1 > MAX_DELTAS {
        return Err(desc_err(
            dd,
            format!("the maximum number of deltas ({MAX_DELTAS}) has been reached"),
        ));
    }
    Ok(snap)
}

/// Descriptor side of a snapshot: the top is renamed `snap` and a new top
/// delta in `file` goes on it.
pub fn freeze_top(d: &mut Descriptor, snap: Uuid, file: String) {
    d.rename_guid(TOP_GUID, snap);
    push_top(d, snap, file);
}

/// Add a new top delta in `file` over `parent`.
fn push_top(d: &mut Descriptor, parent: Uuid, file: String) {
    d.images.push(ImageEntry {
        guid: TOP_GUID,
        kind: ImageType::Compressed,
        file,
        extra: Default::default(),
    });
    d.snapshots.push(Shot {
        guid: TOP_GUID,
        parent,
        temporary: false,
        extra: Default::default(),
    });
    d.top_guid = TOP_GUID;
}

/// The shot of `child` if it can be merged with its parent: it has one,
/// and the parent has no other child.
pub fn mergeable(dd: &Path, d: &Descriptor, child: Uuid) -> Result<Shot> {
    let shot = d
        .shot(child)
        .cloned()
        .ok_or_else(|| desc_err(dd, format!("no snapshot {}", guid_string(&child))))?;
    if shot.parent == NONE_GUID {
        return Err(desc_err(
            dd,
            format!(
                "{} is the base image: it has no parent to merge with",
                guid_string(&child)
            ),
        ));
    }
    let siblings = d.children(shot.parent).len();
    if siblings != 1 {
        return Err(desc_err(
            dd,
            format!(
                "cannot merge into {}: it has {siblings} children",
                guid_string(&shot.parent)
            ),
        ));
    }
    Ok(shot)
}

/// Drop an image and its shot from the descriptor; returns its file.
pub fn remove_image(dd: &Path, d: &mut Descriptor, guid: Uuid) -> Result<PathBuf> {
    let pos = d
        .images
        .iter()
        .position(|i| i.guid == guid)
        .expect("image exists");
    let entry = d.images.remove(pos);
    d.snapshots.retain(|s| s.guid != guid);
    image_path(dd, &entry.file)
}

/// Copy every cluster `child` holds into the top of `chain` (its parent,
/// open as a merge target), then flush: the data half of a merge.
pub fn copy_down(child: &Delta, chain: &Chain, progress: Progress) -> Result<()> {
    let cs = chain.cluster_size();
    let Some(p) = child.as_ploop() else {
        return Err(Error::Invalid(
            "cannot merge a raw delta into another".into(),
        ));
    };
    let bat = p.bat_snapshot();
    let total = bat.iter().filter(|&&e| e != 0).count() as u64;
    let mut buf = ploop_io::AlignedBuf::zeroed(cs as usize);
    let mut done = 0;
    let clusters = chain.virtual_size().div_ceil(cs);
    for (cluster, _) in bat.iter().enumerate().filter(|(_, &e)| e != 0) {
        let cluster = cluster as u64;
        if cluster >= clusters {
            continue;
        }
        let off = p.map(cluster).expect("mapped");
        let len = (chain.virtual_size() - cluster * cs).min(cs) as usize;
        p.read_data(&mut buf.as_mut_slice()[..len], off)?;
        chain.write_at(&buf.as_slice()[..len], cluster * cs)?;
        done += 1;
        progress(done, total);
    }
    chain.flush()
}

/// Mark `parent` as the target of a merge under way (OpenVZ's
/// `<Temporary/>`), durably, before any of the child's clusters is
/// written into it: if the merge stops halfway, nobody opens the parent's
/// half-merged content as the snapshot it was.
pub fn mark_merge_target(dd: &Path, d: &mut Descriptor, parent: Uuid) -> Result<()> {
    let shot = d
        .snapshots
        .iter_mut()
        .find(|s| s.guid == parent)
        .expect("validated: the parent has a shot");
    if shot.temporary {
        return Ok(());
    }
    shot.temporary = true;
    d.save(dd)
}

/// Descriptor side of a finished merge: `child`'s image and shot go, and
/// the parent (its mark cleared) takes `child`'s GUID. Returns the
/// child's file, to be removed once the descriptor is saved.
pub fn finish_merge(dd: &Path, d: &mut Descriptor, parent: Uuid, child: Uuid) -> Result<PathBuf> {
    // The survivor is the child's view: it keeps the child's own mark (a
    // merge into the child may itself be unfinished).
    let child_temporary = d.shot(child).is_some_and(|s| s.temporary);
    let child_path = remove_image(dd, d, child)?;
    if let Some(s) = d.snapshots.iter_mut().find(|s| s.guid == parent) {
        s.temporary = child_temporary;
    }
    d.rename_guid(parent, child);
    Ok(child_path)
}

/// Whether `parent` can take every cluster `child` holds within a disk of
/// `size` bytes: a ploop delta whose BAT is shorter than the disk (qemu
/// and OpenVZ accept such images) cannot, and the merge must be refused
/// before anything is marked or written.
pub fn parent_can_hold(parent: &Delta, child: &PloopDelta, size: u64) -> Result<()> {
    let Some(p) = parent.as_ploop() else {
        return Ok(());
    };
    let disk_clusters = size.div_ceil(child.cluster_size());
    let needed = child
        .bat_snapshot()
        .iter()
        .enumerate()
        .filter(|&(c, &e)| e != 0 && (c as u64) < disk_clusters)
        .map(|(c, _)| c as u64 + 1)
        .max()
        .unwrap_or(0);
    if needed > p.clusters() {
        return Err(Error::Invalid(format!(
            "{}: its BAT maps only {} clusters, but the delta merged into it holds cluster {}: \
             it cannot be merged into",
            p.path(),
            p.clusters(),
            needed - 1
        )));
    }
    Ok(())
}

/// Merge snapshot `guid` (default: the top) down into its parent. The
/// parent's file survives under `guid`'s GUID; `guid`'s file is removed.
/// A merge that stopped halfway is finished the same way.
pub fn merge(dd: &Path, guid: Option<Uuid>, progress: Progress) -> Result<()> {
    let lock = DescriptorLock::acquire(dd)?;
    let d = Descriptor::load(dd)?;
    let child = guid.unwrap_or(d.top_guid);
    merge_locked(dd, &lock, d, child, progress)
}

/// The body of `merge`, under the caller's descriptor lock, with the
/// descriptor as loaded under it.
fn merge_locked(
    dd: &Path,
    _lock: &DescriptorLock,
    mut d: Descriptor,
    child: Uuid,
    progress: Progress,
) -> Result<()> {
    let shot = mergeable(dd, &d, child)?;
    let child_entry = d.image(child).cloned().expect("validated");
    ensure_not_in_use(dd, &child_entry)?;
    {
        // The parent's chain, writable at the parent, receives the child.
        // Both are open (and the parent locked) before the parent is
        // marked: a merge that cannot start marks nothing.
        let parent_disk = Disk::open_with(
            dd,
            d.clone(),
            OpenOptions {
                writable: true,
                guid: Some(shot.parent),
                merge_target: true,
                ..OpenOptions::default()
            },
        )?;
        let child_delta = open_delta(
            &image_path(dd, &child_entry.file)?,
            child_entry.kind,
            &OpenOptions::default(),
        )?;
        if let Some(c) = child_delta.as_ploop() {
            parent_can_hold(parent_disk.chain.top(), c, parent_disk.chain.virtual_size())?;
        }
        mark_merge_target(dd, &mut d, shot.parent)?;
        copy_down(&child_delta, &parent_disk.chain, progress)?;
        // The merged file takes the child's place: its bitmap is the
        // child's, where it has one (the newest point); else the parent's
        // own, which the copy has just marked with every cluster the child
        // held.
        if let Some(c) = child_delta.as_ploop() {
            if let Some(b) = c.saved_cbt()? {
                if let Some(p) = parent_disk.chain.top().as_ploop() {
                    p.set_cbt(Some(std::sync::Arc::new(b)));
                }
            }
        }
        parent_disk.close()?;
    }
    let child_path = finish_merge(dd, &mut d, shot.parent, child)?;
    d.save(dd)?;
    ploop_io::fsys::remove(&child_path).map_err(|e| {
        Error::io(
            child_path.display().to_string(),
            "removing merged delta",
            0,
            e,
        )
    })?;
    Ok(())
}

/// Delete snapshot `guid`. With one child, the child is merged into it (so
/// the data stays); with none, its delta is dropped.
pub fn delete(dd: &Path, guid: Uuid, progress: Progress) -> Result<()> {
    let d = Descriptor::load(dd)?;
    let shot = d
        .shot(guid)
        .cloned()
        .ok_or_else(|| desc_err(dd, format!("no snapshot {}", guid_string(&guid))))?;
    let children = d.children(guid);
    match children.len() {
        1 => merge(dd, Some(children[0]), progress),
        0 => {
            if shot.parent == NONE_GUID {
                return Err(desc_err(dd, "unable to delete the base image".into()));
            }
            let _lock = DescriptorLock::acquire(dd)?;
            // Again under the lock: another command may have changed it.
            let mut d = Descriptor::load(dd)?;
            let gone = || desc_err(dd, format!("no snapshot {}", guid_string(&guid)));
            let shot = d.shot(guid).cloned().ok_or_else(gone)?;
            let entry = d.image(guid).cloned().ok_or_else(gone)?;
            if !d.children(guid).is_empty() {
                return Err(desc_err(
                    dd,
                    format!(
                        "snapshot {} changed meanwhile: try again",
                        guid_string(&guid)
                    ),
                ));
            }
            if guid == d.top_guid && d.shot(shot.parent).is_some_and(|s| s.temporary) {
                // The parent would become a top that refuses to open.
                return Err(desc_err(
                    dd,
                    format!(
                        "unable to delete the top: a merge into its parent {} did not finish (`ploop check` finishes it)",
                        guid_string(&shot.parent)
                    ),
                ));
            }
            if guid == d.top_guid && d.children(shot.parent).len() > 1 {
                // The parent would become a top with snapshots above it.
                return Err(desc_err(
                    dd,
                    format!(
                        "unable to delete the top: its parent {} has other snapshots over it (switch to one of them instead)",
                        guid_string(&shot.parent)
                    ),
                ));
            }
            ensure_not_in_use(dd, &entry)?;
            let path = remove_image(dd, &mut d, guid)?;
            if guid == d.top_guid {
                // The parent becomes the top again.
                d.rename_guid(shot.parent, TOP_GUID);
            }
            d.save(dd)?;
            ploop_io::fsys::remove(&path)
                .map_err(|e| Error::io(path.display().to_string(), "removing delta", 0, e))
        }
        n => Err(desc_err(
            dd,
            format!(
                "snapshot {} has {n} children: delete them first",
                guid_string(&guid)
            ),
        )),
    }
}

/// Switch to snapshot `guid`: the current top delta is discarded and a new
/// empty top is created over `guid`.
pub fn switch(dd: &Path, guid: Uuid) -> Result<()> {
    let _lock = DescriptorLock::acquire(dd)?;
    let mut d = Descriptor::load(dd)?;
    if guid == d.top_guid {
        return Err(desc_err(
            dd,
            format!("already on snapshot {}", guid_string(&guid)),
        ));
    }
    let target = d
        .image(guid)
        .cloned()
        .ok_or_else(|| desc_err(dd, format!("no snapshot {}", guid_string(&guid))))?;
    if d.shot(guid).is_some_and(|s| s.temporary) {
        return Err(desc_err(
            dd,
            format!(
                "snapshot {} is temporary (a merge into it did not finish): it cannot be switched to",
                guid_string(&guid)
            ),
        ));
    }
    let top = d.image(d.top_guid).cloned().expect("validated");
    ensure_not_in_use(dd, &top)?;
    let version = delta_version(dd, &target)?;
    let file = new_delta_name(&d);
    create_empty_delta(dd, &d, &file, version)?;
    let top_guid = d.top_guid;
    let old_top = remove_image(dd, &mut d, top_guid)?;
    push_top(&mut d, guid, file);
    d.save(dd)?;
    ploop_io::fsys::remove(&old_top).map_err(|e| {
        Error::io(
            old_top.display().to_string(),
            "removing old top delta",
            0,
            e,
        )
    })
}

/// Convert a disk without snapshots to another format.
pub fn convert_format(dd: &Path, to: DiskFormat, progress: Progress) -> Result<()> {
    let _lock = DescriptorLock::acquire(dd)?;
    let mut d = Descriptor::load(dd)?;
    if d.images.len() != 1 {
        return Err(desc_err(
            dd,
            "convert works on a disk without snapshots; merge or delete them first".into(),
        ));
    }
    let entry = d.images[0].clone();
    let path = image_path(dd, &entry.file)?;
    let cs = u64::from(d.blocksize) * SECTOR;
    let size = d.size_sectors * SECTOR;
    let from = match (entry.kind, d.preallocated) {
        (ImageType::Plain, _) => DiskFormat::Raw,
        (ImageType::Compressed, false) => DiskFormat::Expanded,
        (ImageType::Compressed, true) => DiskFormat::Preallocated,
    };
    if from == to {
        return Ok(());
    }
    match (from, to) {
        (DiskFormat::Expanded, DiskFormat::Preallocated) => {
            let delta = open_delta(
                &path,
                entry.kind,
                &OpenOptions {
                    writable: true,
                    ..Default::default()
                },
            )?;
            allocate_all(delta.as_ploop().expect("ploop"), progress)?;
            delta.close()?;
        }
        (DiskFormat::Preallocated, DiskFormat::Expanded) => {}
        _ => {
            // Rewrite into a new file, then rename over the old one.
            let tmp_name = format!("{}.convert.tmp", entry.file);
            let tmp = image_path(dd, &tmp_name)?;
            let _ = ploop_io::fsys::remove(&tmp);
            let src = Disk::open_with(dd, d.clone(), OpenOptions::default())?;
            {
                let io = open_file(&tmp, OpenMode::create())?;
                let dst = match to {
                    DiskFormat::Raw => {
                        RawDelta::create(io.clone(), size, false)?;
                        Delta::Raw(RawDelta::open(io, true)?)
                    }
                    _ => {
                        PloopDelta::create(
                            io.clone(),
                            CreateOptions {
                                virtual_size: size,
                                cluster_size: cs,
                                version: Version::V2,
                                preallocate: to == DiskFormat::Preallocated,
                            },
                        )?;
                        Delta::Ploop(PloopDelta::open(
                            io,
                            ploop_format::ploop::OpenFlags {
                                writable: true,
                                allow_dirty: false,
                            },
                        )?)
                    }
                };
                let dst = Chain::new(vec![std::sync::Arc::new(dst)], cs, size)?;
                let mut buf = ploop_io::AlignedBuf::zeroed(cs as usize);
                let n = size.div_ceil(cs);
                for c in 0..n {
                    let len = (size - c * cs).min(cs) as usize;
                    src.chain.read_at(&mut buf.as_mut_slice()[..len], c * cs)?;
                    if !is_zero(&buf.as_slice()[..len]) {
                        dst.write_at(&buf.as_slice()[..len], c * cs)?;
                    }
                    progress(c + 1, n);
                }
                dst.close()?;
                sync_folder_of(&tmp)?;
            }
            src.close()?;
            // The descriptor names the new file before it takes the old
            // one's name, so a crash at any point leaves a descriptor that
            // matches a file; check finishes the job (finish_conversion).
            set_format(&mut d, to);
            d.images[0].file = tmp_name;
            d.save(dd)?;
            return finish_conversion(dd).map(|_| ());
        }
    }
    set_format(&mut d, to);
    d.save(dd)
}

fn set_format(d: &mut Descriptor, to: DiskFormat) {
    d.images[0].kind = if to == DiskFormat::Raw {
        ImageType::Plain
    } else {
        ImageType::Compressed
    };
    d.preallocated = to == DiskFormat::Preallocated;
}

/// Suffix of the file a format conversion writes before renaming it.
const CONVERT_SUFFIX: &str = ".convert.tmp";

/// Finish a format conversion the descriptor shows under way (an image
/// named `*.convert.tmp`): the new file takes the old name. Returns the
/// image names it fixed.
pub fn finish_conversion(dd: &Path) -> Result<Vec<String>> {
    let mut d = Descriptor::load(dd)?;
    let mut fixed = Vec::new();
    for i in 0..d.images.len() {
        let Some(final_name) = d.images[i].file.strip_suffix(CONVERT_SUFFIX) else {
            continue;
        };
        let final_name = final_name.to_string();
        let tmp = image_path(dd, &d.images[i].file)?;
        let target = image_path(dd, &final_name)?;
        if ploop_io::fsys::exists(&tmp) {
            ploop_io::fsys::rename(&tmp, &target)
                .map_err(|e| Error::io(target.display().to_string(), "replacing image", 0, e))?;
            // The image's new name is durable before the descriptor uses it.
            sync_folder_of(&target)?;
        } else if !ploop_io::fsys::exists(&target) {
            return Err(desc_err(
                dd,
                format!("image file {} is missing", tmp.display()),
            ));
        }
        fixed.push(final_name.clone());
        d.images[i].file = final_name;
    }
    if !fixed.is_empty() {
        d.save(dd)?;
    }
    Ok(fixed)
}

/// Change the ploop format version of every delta of a disk.
pub fn convert_version(dd: &Path, to: Version) -> Result<()> {
    let _lock = DescriptorLock::acquire(dd)?;
    let d = Descriptor::load(dd)?;
    for entry in &d.images {
        if entry.kind == ImageType::Plain {
            return Err(desc_err(dd, "a raw image has no format version".into()));
        }
        let path = image_path(dd, &entry.file)?;
        let io = open_file(&path, OpenMode::read_write())?;
        // Keep the header and BAT aside until the conversion is done, so
        // check can roll an interrupted one back (as OpenVZ does).
        let backup = backup_path(&path);
        let meta = ploop_format::ploop::PloopDelta::open(io.clone(), Default::default())?
            .header()
            .data_offset;
        let mut saved = vec![0u8; meta as usize];
        io.read_at(&mut saved, 0)
            .map_err(|e| Error::io(path.display().to_string(), "reading BAT", 0, e))?;
        write_synced(&backup, &saved)?;
        ploop_format::ploop::convert::convert_version(&io, to)?;
        ploop_io::fsys::remove(&backup)
            .map_err(|e| Error::io(backup.display().to_string(), "removing BAT backup", 0, e))?;
    }
    Ok(())
}

/// Where a version conversion keeps the old header and BAT.
pub fn backup_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".idx");
    PathBuf::from(p)
}

/// Write a whole file and make it (and its name) durable.
fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    ploop_io::fsys::write_synced(path, data)
        .and_then(|()| ploop_io::fsys::sync_dir(&dd_dir(path)))
        .map_err(|e| Error::io(path.display().to_string(), "writing", 0, e))
}

/// Result of checking one delta.
pub struct DeltaCheck {
    pub path: PathBuf,
    pub report: CheckReport,
}

/// Check (and unless `read_only`, repair) one ploop delta file.
pub fn check_file(path: &Path, read_only: bool) -> Result<DeltaCheck> {
    let mode = if read_only {
        OpenMode::read_only()
    } else {
        OpenMode::read_write()
    };
    let io = open_file(path, mode)?;
    let backup_file = backup_path(path);
    let backup = if ploop_io::fsys::exists(&backup_file) {
        Some(open_file(&backup_file, OpenMode::read_only())?)
    } else {
        None
    };
    let report = check_with_backup(&io, !read_only, backup.as_ref())?;
    if backup.is_some() && report.repaired {
        drop(backup);
        let _ = ploop_io::fsys::remove(&backup_file);
    }
    Ok(DeltaCheck {
        path: path.to_path_buf(),
        report,
    })
}

/// Check every ploop delta of a disk, base first, and unless `read_only`
/// repair what can be: an interrupted conversion is finished, each delta
/// repaired, an interrupted merge rolled forward. Takes the descriptor
/// lock to repair.
pub fn check_disk(dd: &Path, read_only: bool) -> Result<Vec<DeltaCheck>> {
    if read_only {
        return check_disk_inner(dd, None);
    }
    let lock = DescriptorLock::acquire(dd)?;
    check_disk_inner(dd, Some(&lock))
}

/// Repair a disk (as `check_disk`) under a descriptor lock the caller
/// already holds (a mount that found its image left in use).
pub fn repair_disk_locked(dd: &Path, lock: &DescriptorLock) -> Result<Vec<DeltaCheck>> {
    check_disk_inner(dd, Some(lock))
}

/// `check_disk`: repairs when given the lock, only reports without it.
fn check_disk_inner(dd: &Path, lock: Option<&DescriptorLock>) -> Result<Vec<DeltaCheck>> {
    let read_only = lock.is_none();
    let mut out = Vec::new();
    let pending = Descriptor::load(dd)?
        .images
        .iter()
        .any(|i| i.file.ends_with(CONVERT_SUFFIX));
    if pending {
        let mut report = CheckReport::default();
        report
            .problems
            .push("a format conversion was interrupted (fix: finish it)".into());
        if !read_only {
            finish_conversion(dd)?;
            report.repaired = true;
        }
        out.push(DeltaCheck {
            path: dd.to_path_buf(),
            report,
        });
        if read_only {
            return Ok(out);
        }
    }
    let d = Descriptor::load(dd)?;
    if let Some(report) = drop_second_names(dd, &d, read_only)? {
        out.push(DeltaCheck {
            path: dd.to_path_buf(),
            report,
        });
    }
    let mut checked = std::collections::HashSet::new();
    let mut check_entry = |entry: &ImageEntry, out: &mut Vec<DeltaCheck>| -> Result<()> {
        let path = image_path(dd, &entry.file)?;
        if !ploop_io::fsys::exists(&path) {
            return Err(desc_err(
                dd,
                format!("image file {} is missing", path.display()),
            ));
        }
        if entry.kind == ImageType::Compressed && checked.insert(path.clone()) {
            out.push(check_file(&path, read_only)?);
        }
        Ok(())
    };
    for entry in d.chain(d.top_guid, &dd.display().to_string())? {
        check_entry(entry, &mut out)?;
    }
    // A version conversion converts every delta, side branches too: one
    // it left half done (its BAT backup still beside it) is rolled back
    // wherever it is, or no view through it opens.
    for entry in &d.images {
        if entry.kind == ImageType::Compressed
            && ploop_io::fsys::exists(&backup_path(&image_path(dd, &entry.file)?))
        {
            check_entry(entry, &mut out)?;
        }
    }
    // Merges that stopped halfway are rolled forward, one at a time (each
    // changes the descriptor), once both deltas are repaired (the parent
    // may have been left in use; a side branch's are not checked above).
    // Under the lock, so what the descriptor says is what is merged.
    let mut merges = d.unfinished_merges();
    for _ in 0..d.snapshots.len() {
        let Some(&(parent, child)) = merges.first() else {
            break;
        };
        let mut report = CheckReport::default();
        report.problems.push(format!(
            "the merge of snapshot {} into {} did not finish (fix: finish it)",
            guid_string(&child),
            guid_string(&parent)
        ));
        let Some(lock) = lock else {
            out.push(DeltaCheck {
                path: dd.to_path_buf(),
                report,
            });
            merges.remove(0);
            continue;
        };
        let d = Descriptor::load(dd)?;
        for guid in [parent, child] {
            let entry = d.image(guid).cloned().expect("validated");
            check_entry(&entry, &mut out)?;
        }
        merge_locked(dd, lock, d, child, &|_, _| {})?;
        report.repaired = true;
        out.push(DeltaCheck {
            path: dd.to_path_buf(),
            report,
        });
        merges = Descriptor::load(dd)?.unfinished_merges();
    }
    Ok(out)
}

/// Where `new` is, if it is beside the descriptor (as every delta
/// lives): a name relative to the descriptor's folder, or a path in it.
fn beside_descriptor(dd: &Path, new: &Path) -> Result<PathBuf> {
    let dir = dd_dir(dd);
    if new.is_absolute() && new.parent() == Some(dir.as_path()) {
        return Ok(new.to_path_buf());
    }
    ploop_format::descriptor::resolve_image_path(
        &dir,
        &new.display().to_string(),
        &dd.display().to_string(),
    )
}

/// The file name `new` gets in a descriptor, if it may be used as a new
/// delta: beside the descriptor (as every delta lives) and not there yet.
pub fn check_new_delta(dd: &Path, new: &Path) -> Result<String> {
    let name = new
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| desc_err(dd, format!("{}: not a file name", new.display())))?
        .to_string();
    let wanted = beside_descriptor(dd, new)?;
    if ploop_io::fsys::exists(&wanted) {
        return Err(desc_err(
            dd,
            format!(
                "can't merge to new image {}: the file exists",
                wanted.display()
            ),
        ));
    }
    Ok(name)
}

/// Give snapshot `guid`'s delta the new name `new` (OpenVZ's
/// `snapshot-merge -n`): a second link first, then the descriptor, then
/// the old name goes, so a crash leaves a descriptor naming a file that
/// exists.
pub fn move_delta(dd: &Path, guid: Uuid, new: &Path) -> Result<()> {
    let _lock = DescriptorLock::acquire(dd)?;
    let mut d = Descriptor::load(dd)?;
    let name = check_new_delta(dd, new)?;
    let entry = d
        .images
        .iter_mut()
        .find(|i| i.guid == guid)
        .ok_or_else(|| desc_err(dd, format!("no snapshot {}", guid_string(&guid))))?;
    let old = image_path(dd, &entry.file)?;
    let target = dd_dir(dd).join(&name);
    ploop_io::fsys::link(&old, &target)
        .map_err(|e| Error::io(target.display().to_string(), "linking the new delta", 0, e))?;
    // The new name is durable before the descriptor names it.
    let _ = ploop_io::fsys::sync_dir(&dd_dir(dd));
    entry.file = name;
    d.save(dd)?;
    ploop_io::fsys::remove(&old)
        .map_err(|e| Error::io(old.display().to_string(), "removing the old name", 0, e))
}

/// Mark snapshot `guid` temporary (OpenVZ's `<Temporary/>`): merged away
/// into its child once it has one. Returns false if it already was.
pub fn mark_temporary(dd: &Path, guid: Uuid) -> Result<bool> {
    let _lock = DescriptorLock::acquire(dd)?;
    let mut d = Descriptor::load(dd)?;
    if guid == d.top_guid {
        return Err(desc_err(dd, "the top delta cannot be temporary".into()));
    }
    let shot = d
        .snapshots
        .iter_mut()
        .find(|s| s.guid == guid)
        .ok_or_else(|| desc_err(dd, format!("no snapshot {}", guid_string(&guid))))?;
    if shot.temporary {
        return Ok(false);
    }
    shot.temporary = true;
    d.save(dd)?;
    Ok(true)
}

/// OpenVZ's `check -S` for one ploop delta: every byte the image uses
/// (header and BAT, each cluster the BAT maps, a live format extension)
/// is backed by written blocks, and nothing else is. Holes (and
/// unwritten extents) inside used clusters are what OpenVZ's own check
/// calls a sparse image and refuses, and a discard or a copy by another
/// tool leaves them: they are filled with written zeros. Data in clusters
/// nothing references (a discarded cluster whose punch failed, leaked
/// space) is punched out. Unless `read_only`, which only reports.
pub fn repair_sparse(path: &Path, read_only: bool) -> Result<CheckReport> {
    use ploop_format::ploop::ext::{self, State};
    let name = path.display().to_string();
    let mode = if read_only {
        OpenMode::read_only()
    } else {
        OpenMode::read_write()
    };
    let io = open_file(path, mode)?;
    // OpenVZ 9 takes no flock: its lock is what keeps it off the file.
    let _openvz = if ploop_io::fsys::is_replaced() {
        None
    } else {
        let f = ploop_io::Folder::of(path)
            .and_then(|(dir, f)| dir.open_read(f))
            .map_err(|e| Error::io(&name, "opening", 0, e))?;
        Some(crate::disk::hold_openvz_lock_on(&name, path, f)?)
    };
    let p = PloopDelta::open(
        io.clone(),
        ploop_format::ploop::OpenFlags {
            writable: false,
            ..Default::default()
        },
    )?;
    let h = *p.header();
    let cs = h.cluster_size;
    let file_size = io.size().map_err(|e| Error::io(&name, "sizing", 0, e))?;
    let mut used: Vec<(u64, u64)> = vec![(0, h.data_offset.min(file_size))];
    let bat = p.bat_snapshot();
    for &e in &bat {
        if e != 0 {
            let off = ploop_format::ploop::entry_to_offset(&h, e);
            if off < file_size {
                used.push((off, (off + cs).min(file_size)));
            }
        }
    }
    // A live extension's clusters are used; one that cannot be read
    // stops the repair (its clusters must not be taken for strays).
    match ext::read(&io, &h, &bat, file_size)
        .map_err(|e| Error::io(&name, "reading the format extension", 0, e))?
    {
        State::Live(x) => {
            // Cluster indexes, not offsets.
            for c in x.clusters {
                used.push((c * cs, (c * cs + cs).min(file_size)));
            }
        }
        State::None | State::Dangling(_) => {}
    }
    drop(p);
    used.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in used {
        match merged.last_mut() {
            Some((_, end)) if s <= *end => *end = (*end).max(e),
            _ => merged.push((s, e)),
        }
    }
    let mut report = CheckReport::default();
    // What is written: FIEMAP's extents less the unwritten ones (which
    // read as zeros, and which OpenVZ's check calls uninitialized), after
    // a sync so that delayed allocations are placed.
    let file = ploop_io::Folder::of(path)
        .and_then(|(dir, f)| dir.open_read(f))
        .map_err(|e| Error::io(&name, "opening", 0, e))?;
    let mut written: Vec<(u64, u64)> = Vec::new();
    for extent in fiemap::Fiemap::with_flags(&file, fiemap::FiemapFlags::SYNC) {
        let extent = match extent {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("{name}: the filesystem cannot map its extents ({e}): -S skipped");
                eprintln!("ploop: {name}: the filesystem holding it cannot map its extents ({e}): -S skipped");
                return Ok(report);
            }
        };
        if !extent
            .fe_flags
            .contains(fiemap::FiemapExtentFlags::UNWRITTEN)
        {
            let (a, b) = (extent.fe_logical, extent.fe_logical + extent.fe_length);
            match written.last_mut() {
                Some((_, end)) if a <= *end => *end = (*end).max(b),
                _ => written.push((a, b)),
            }
        }
    }
    // Holes: used bytes outside every written extent.
    let zeros = vec![0u8; 1 << 20];
    let mut holes = 0u64;
    for &(us, ue) in &merged {
        let mut pos = us;
        for &(ws, we) in written.iter().chain([(ue, ue)].iter()) {
            if we <= pos {
                continue;
            }
            let gap_end = ws.min(ue);
            if pos < gap_end {
                holes += gap_end - pos;
                if !read_only {
                    let mut at = pos;
                    while at < gap_end {
                        let k = (gap_end - at).min(zeros.len() as u64) as usize;
                        io.write_at(&zeros[..k], at)
                            .map_err(|e| Error::io(&name, "filling a hole", at, e))?;
                        at += k as u64;
                    }
                }
            }
            pos = pos.max(we);
            if pos >= ue {
                break;
            }
        }
    }
    // Strays: whole clusters written that nothing uses.
    let mut stray = Vec::new();
    for &(ws, we) in &written {
        let mut pos = ws;
        for &(us, ue) in merged.iter().chain([(u64::MAX, u64::MAX)].iter()) {
            if ue <= pos {
                continue;
            }
            let free_end = us.min(we);
            if pos < free_end {
                let (a, b) = (pos.div_ceil(cs) * cs, free_end / cs * cs);
                if a < b {
                    stray.push((a, b - a));
                }
            }
            pos = pos.max(ue);
            if pos >= we {
                break;
            }
        }
    }
    if holes > 0 {
        report.problems.push(format!(
            "the image is sparse: {holes} bytes of the clusters it uses are holes (fix: fill them with zeros)"
        ));
    }
    let stray_bytes: u64 = stray.iter().map(|(_, n)| n).sum();
    if stray_bytes > 0 {
        report.problems.push(format!(
            "{stray_bytes} bytes of data in clusters nothing references (fix: punch them out)"
        ));
        if !read_only {
            for (a, n) in stray {
                io.punch_hole(a, n)
                    .map_err(|e| Error::io(&name, "punching a stray cluster", a, e))?;
            }
        }
    }
    if !report.is_clean() && !read_only {
        io.flush().map_err(|e| Error::io(&name, "flushing", 0, e))?;
        report.repaired = true;
    }
    Ok(report)
}

/// Which delta `replace` swaps.
#[derive(Clone, Debug)]
pub enum ReplaceTarget {
    Guid(Uuid),
    /// Level in the top's chain, 0 being the base.
    Level(usize),
    /// The delta's current file.
    File(PathBuf),
}

/// The GUID of the delta `target` names: a snapshot (never the top, which
/// is written to and has no identical copy).
pub fn replace_target(dd: &Path, d: &Descriptor, target: &ReplaceTarget) -> Result<Uuid> {
    let name = dd.display().to_string();
    let guid = match target {
        ReplaceTarget::Guid(g) => {
            d.image(*g).ok_or_else(|| {
                desc_err(dd, format!("can't find image by guid {}", guid_string(g)))
            })?;
            *g
        }
        ReplaceTarget::Level(l) => {
            let chain = d.chain(d.top_guid, &name)?;
            chain.get(*l).map(|e| e.guid).ok_or_else(|| {
                desc_err(dd, format!("invalid level {l}: 0 to {}", chain.len() - 1))
            })?
        }
        ReplaceTarget::File(f) => {
            use std::os::unix::fs::MetadataExt;
            let want = std::fs::metadata(f)
                .map_err(|e| Error::io(f.display().to_string(), "looking up", 0, e))?;
            d.images
                .iter()
                .find(|i| {
                    image_path(dd, &i.file)
                        .ok()
                        .and_then(|p| std::fs::metadata(p).ok())
                        .is_some_and(|m| m.dev() == want.dev() && m.ino() == want.ino())
                })
                .map(|i| i.guid)
                .ok_or_else(|| {
                    desc_err(
                        dd,
                        format!("can't find image {} in the descriptor", f.display()),
                    )
                })?
        }
    };
    if guid == d.top_guid {
        return Err(desc_err(
            dd,
            "only a read-only delta (a snapshot) can be replaced, not the top".into(),
        ));
    }
    Ok(guid)
}

/// Check that `new` holds what `old` holds: the same clusters allocated,
/// with the same bytes, within a disk of `size` bytes.
pub fn same_content(
    old: &Delta,
    new: &Delta,
    size: u64,
    cs: u64,
    progress: Progress,
) -> Result<()> {
    let clusters = size.div_ceil(cs);
    let mut a = vec![0u8; cs as usize];
    let mut b = vec![0u8; cs as usize];
    for c in 0..clusters {
        let len = (size - c * cs).min(cs) as usize;
        match (old.map(c, cs), new.map(c, cs)) {
            (None, None) => {}
            (Some(x), Some(y)) => {
                old.read(&mut a[..len], x)?;
                new.read(&mut b[..len], y)?;
                if a[..len] != b[..len] {
                    return Err(Error::Invalid(format!(
                        "{} differs from {} in cluster {c}: not an identical copy",
                        new.path(),
                        old.path()
                    )));
                }
            }
            (x, _) => {
                return Err(Error::Invalid(format!(
                    "{} {} cluster {c}, {} {}: not an identical copy",
                    old.path(),
                    if x.is_some() { "holds" } else { "lacks" },
                    new.path(),
                    if x.is_some() { "lacks it" } else { "holds it" }
                )))
            }
        }
        progress(c + 1, clusters);
    }
    Ok(())
}

/// The descriptor's name for `new`, a delta beside it, after checking it
/// is one (a ploop image, structurally clean) of the kind `old` is.
pub fn replacement_name(dd: &Path, d: &Descriptor, new: &Path, kind: ImageType) -> Result<String> {
    let name = new
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| desc_err(dd, format!("{}: not a file name", new.display())))?
        .to_string();
    let here = beside_descriptor(dd, new)?;
    if !ploop_io::fsys::exists(&here) {
        return Err(desc_err(dd, format!("{} does not exist", here.display())));
    }
    // Not a delta of this disk already (under its name or another): two
    // entries on one file would let a merge into one destroy the other.
    {
        use std::os::unix::fs::MetadataExt;
        let id = |p: &Path| {
            std::fs::symlink_metadata(p)
                .ok()
                .map(|m| (m.dev(), m.ino()))
        };
        let new_id = id(&here);
        for i in &d.images {
            let p = image_path(dd, &i.file)?;
            if p == here || (new_id.is_some() && id(&p) == new_id) {
                return Err(desc_err(
                    dd,
                    format!(
                        "{} is already a delta of this disk ({})",
                        here.display(),
                        guid_string(&i.guid)
                    ),
                ));
            }
        }
    }
    if kind == ImageType::Compressed {
        let r = check_file(&here, true)?;
        if !r.report.is_clean() {
            return Err(desc_err(
                dd,
                format!(
                    "{} is not clean: {}",
                    here.display(),
                    r.report.problems.join("; ")
                ),
            ));
        }
    }
    Ok(name)
}

/// Offline `replace`: swap snapshot `guid`'s delta for `new`, an
/// identical copy beside the descriptor. The descriptor names the new
/// file, or with `keep_name` the new file takes the old one's name.
pub fn replace(
    dd: &Path,
    target: &ReplaceTarget,
    new: &Path,
    keep_name: bool,
    progress: Progress,
) -> Result<()> {
    let _lock = DescriptorLock::acquire(dd)?;
    let mut d = Descriptor::load(dd)?;
    let guid = replace_target(dd, &d, target)?;
    let entry = d.image(guid).cloned().expect("found above");
    let name = replacement_name(dd, &d, new, entry.kind)?;
    let old_path = image_path(dd, &entry.file)?;
    let new_path = dd_dir(dd).join(&name);
    let old = open_delta(&old_path, entry.kind, &OpenOptions::default())?;
    let newd = open_delta(&new_path, entry.kind, &OpenOptions::default())?;
    let size = d.size_sectors * SECTOR;
    same_content(&old, &newd, size, u64::from(d.blocksize) * SECTOR, progress)?;
    drop((old, newd));
    finish_replace(dd, &mut d, guid, &name, keep_name)
}

/// The descriptor (or with `keep_name`, the file name) side of a replace
/// whose content was checked.
pub fn finish_replace(
    dd: &Path,
    d: &mut Descriptor,
    guid: Uuid,
    name: &str,
    keep_name: bool,
) -> Result<()> {
    let entry = d
        .images
        .iter_mut()
        .find(|i| i.guid == guid)
        .expect("checked by the caller");
    // The copy is durable before anything names it in place of the old
    // delta (cp may have just written it, its blocks not yet placed).
    let new = dd_dir(dd).join(name);
    if !ploop_io::fsys::is_replaced() {
        ploop_io::Folder::of(&new)
            .and_then(|(dir, f)| dir.open_read(f))
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(new.display().to_string(), "syncing the copy", 0, e))?;
    }
    if keep_name {
        let old = image_path(dd, &entry.file)?;
        ploop_io::fsys::rename(&new, &old).map_err(|e| {
            Error::io(
                new.display().to_string(),
                "renaming over the old delta",
                0,
                e,
            )
        })?;
        return ploop_io::fsys::sync_dir(&dd_dir(dd))
            .map_err(|e| Error::io(dd.display().to_string(), "syncing the folder", 0, e));
    }
    entry.file = name.to_string();
    d.save(dd)
}

/// A delta with a second name in its folder that the descriptor does not
/// use is what `snapshot-merge -n` leaves when stopped between its link
/// and its removal of the old name; such a delta cannot be opened for
/// writing (a file with two names is refused). The unused name goes.
fn drop_second_names(dd: &Path, d: &Descriptor, read_only: bool) -> Result<Option<CheckReport>> {
    use std::os::unix::fs::MetadataExt;
    if ploop_io::fsys::is_replaced() {
        return Ok(None);
    }
    let dir = dd_dir(dd);
    let mut named = std::collections::HashMap::new();
    for i in &d.images {
        let p = image_path(dd, &i.file)?;
        if let Ok(m) = std::fs::symlink_metadata(&p) {
            if m.is_file() && m.nlink() > 1 {
                named.insert((m.dev(), m.ino()), p);
            }
        }
    }
    if named.is_empty() {
        return Ok(None);
    }
    let used: std::collections::HashSet<PathBuf> = d
        .images
        .iter()
        .filter_map(|i| image_path(dd, &i.file).ok())
        .collect();
    let mut report = CheckReport::default();
    let entries = std::fs::read_dir(&dir)
        .map_err(|e| Error::io(dir.display().to_string(), "listing", 0, e))?;
    for e in entries.flatten() {
        let p = e.path();
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let Some(delta) = named.get(&(m.dev(), m.ino())) else {
            continue;
        };
        if used.contains(&p) {
            continue;
        }
        report.problems.push(format!(
            "{} is a second name of delta {} (an interrupted merge -n) (fix: remove it)",
            p.display(),
            delta.display()
        ));
        if !read_only {
            ploop_io::fsys::remove(&p)
                .map_err(|e| Error::io(p.display().to_string(), "removing a second name", 0, e))?;
            report.repaired = true;
        }
    }
    Ok((!report.is_clean()).then_some(report))
}

/// Whether a disk's image can be resized to `new_size` bytes (its top is
/// clean, sound, and the size fits its version): checked by `resize`
/// before it changes the filesystem or the table.
pub fn resize_plan(dd: &Path, new_size: u64) -> Result<()> {
    let d = Descriptor::load(dd)?;
    let top = d.image(d.top_guid).cloned().expect("validated");
    if top.kind == ImageType::Compressed {
        let io = open_file(&image_path(dd, &top.file)?, OpenMode::read_only())?;
        ploop_format::ploop::resize::plan(&io, new_size)?;
    }
    Ok(())
}

/// Resize a disk's image, offline: its top delta (a ploop delta's BAT and
/// header, a raw image's length) and the descriptor. Growing, the image
/// grows first and the descriptor follows (a descriptor smaller than its
/// top is valid: the disk is the descriptor's size); shrinking, the other
/// way round. Growing, the snapshots grow too (they read the same: their
/// new clusters are unmapped, a raw one's are sparse zeros), so that any
/// can take a merge; shrinking, they keep their size (a delta larger than
/// the disk is valid). What the disk holds past a smaller end is gone. Returns the new size in bytes (whole clusters).
pub fn resize_image(dd: &Path, new_size: u64) -> Result<u64> {
    let _lock = DescriptorLock::acquire(dd)?;
    let mut d = Descriptor::load(dd)?;
    let name = dd.display().to_string();
    let cs = u64::from(d.blocksize) * SECTOR;
    let new_size = new_size
        .checked_next_multiple_of(cs)
        .filter(|&n| n > 0)
        .ok_or_else(|| desc_err(dd, format!("invalid size {new_size}")))?;
    let old_size = d.size_sectors * SECTOR;
    let chain: Vec<ImageEntry> = d.chain(d.top_guid, &name)?.into_iter().cloned().collect();
    let top = chain.last().expect("a chain has a top").clone();
    let preallocated = d.preallocated;
    let top_path = image_path(dd, &top.file)?;
    // Whatever the top refuses is refused before anything changes.
    let top_size = match top.kind {
        ImageType::Compressed => {
            let io = open_file(&top_path, OpenMode::read_write())?;
            ploop_format::ploop::resize::plan(&io, new_size)?
                .0
                .virtual_size
        }
        ImageType::Plain => old_size,
    };
    if new_size == old_size {
        // A shrink stopped after the descriptor: finish the top.
        if top.kind == ImageType::Compressed && top_size > new_size {
            let io = open_file(&top_path, OpenMode::read_write())?;
            ploop_format::ploop::resize::resize(&io, new_size, preallocated)?;
        }
        return Ok(new_size);
    }
    let resize_top = |new_size: u64| -> Result<()> {
        let path = image_path(dd, &top.file)?;
        let io = open_file(&path, OpenMode::read_write())?;
        match top.kind {
            ImageType::Compressed => {
                ploop_format::ploop::resize::resize(&io, new_size, preallocated)?;
            }
            ImageType::Plain => io
                .set_len(new_size)
                .and_then(|()| io.flush())
                .map_err(|e| Error::io(path.display().to_string(), "resizing", new_size, e))?,
        }
        Ok(())
    };
    let save = |d: &mut Descriptor| -> Result<()> {
        let chs = ploop_format::ploop::header::Chs::from_sectors(new_size / SECTOR);
        d.size_sectors = new_size / SECTOR;
        d.cylinders = chs.cylinders;
        d.heads = chs.heads;
        d.save(dd)
    };
    if new_size > old_size {
        // Every other delta grows too (a snapshot's view does not change:
        // its new clusters are unmapped), so that any of them can later
        // take a merge of a child that is as large as the disk.
        for e in d.images.iter().filter(|e| e.guid != top.guid) {
            let path = image_path(dd, &e.file)?;
            let io = open_file(&path, OpenMode::read_write())?;
            let what = path.display().to_string();
            match e.kind {
                ImageType::Plain => {
                    let len = io
                        .size()
                        .map_err(|err| Error::io(&what, "sizing", 0, err))?;
                    if len < new_size {
                        io.set_len(new_size)
                            .and_then(|()| io.flush())
                            .map_err(|err| Error::io(&what, "extending", len, err))?;
                    }
                }
                ImageType::Compressed => {
                    let size = PloopDelta::open(io.clone(), Default::default())?.virtual_size();
                    if size < new_size {
                        ploop_format::ploop::resize::resize(&io, new_size, false)?;
                    }
                }
            }
        }
        resize_top(new_size)?;
        mask_old_data(dd, &chain, old_size, new_size, cs)?;
        save(&mut d)?;
    } else {
        save(&mut d)?;
        resize_top(new_size)?;
    }
    Ok(new_size)
}

/// What `compact` finds in a disk's top delta: its file's size, the
/// bytes its clusters hold, and the disk's size (OpenVZ's rule compacts
/// when (file - data) / disk passes a threshold).
#[derive(Clone, Copy, Debug)]
pub struct CompactFigures {
    pub file: u64,
    pub data: u64,
    pub disk: u64,
}

/// The figures of a disk's top delta; None for a raw top (nothing to
/// compact: its size is the disk's).
pub fn compact_figures(dd: &Path) -> Result<Option<CompactFigures>> {
    let d = Descriptor::load(dd)?;
    let top = d.image(d.top_guid).cloned().expect("validated");
    if top.kind != ImageType::Compressed {
        return Ok(None);
    }
    let path = image_path(dd, &top.file)?;
    let io = open_file(
        &path,
        OpenMode {
            lock: ploop_io::LockMode::None,
            ..OpenMode::read_only()
        },
    )?;
    let p = PloopDelta::open(io.clone(), Default::default())?;
    let file = io
        .size()
        .map_err(|e| Error::io(path.display().to_string(), "sizing", 0, e))?;
    Ok(Some(CompactFigures {
        file,
        data: p.allocated_clusters() * p.cluster_size() + p.header().data_offset,
        disk: d.size_sectors * SECTOR,
    }))
}

/// Compact a disk's top delta offline (see
/// `ploop_format::ploop::compact`): clusters move down into free ones,
/// the file is cut. `stop` is asked between batches.
pub fn compact(
    dd: &Path,
    dry: bool,
    limit: Option<u64>,
    progress: Progress,
    stop: &dyn Fn() -> bool,
) -> Result<ploop_format::ploop::compact::Compacted> {
    let _lock = DescriptorLock::acquire(dd)?;
    let d = Descriptor::load(dd)?;
    let top = d.image(d.top_guid).cloned().expect("validated");
    let path = image_path(dd, &top.file)?;
    if top.kind != ImageType::Compressed {
        return Err(desc_err(dd, "a raw image has nothing to compact".into()));
    }
    let mode = if dry {
        OpenMode::read_only()
    } else {
        OpenMode::read_write()
    };
    let io = open_file(&path, mode)?;
    ploop_format::ploop::compact::compact_at_most(&io, dry, limit, progress, stop)
}

/// Defragment a disk's top delta (or, given one, a delta file), offline:
/// see `ploop_format::ploop::compact::defrag`. Returns clusters moved.
pub fn defrag(
    target: &Path,
    is_disk: bool,
    progress: Progress,
    stop: &dyn Fn() -> bool,
) -> Result<u64> {
    let (path, _lock) = if is_disk {
        let lock = DescriptorLock::acquire(target)?;
        let d = Descriptor::load(target)?;
        let top = d.image(d.top_guid).cloned().expect("validated");
        if top.kind != ImageType::Compressed {
            return Err(desc_err(
                target,
                "a raw image has nothing to defragment".into(),
            ));
        }
        (image_path(target, &top.file)?, Some(lock))
    } else {
        (target.to_path_buf(), None)
    };
    let io = open_file(&path, OpenMode::read_write())?;
    let _openvz = if ploop_io::fsys::is_replaced() {
        None
    } else {
        let name = path.display().to_string();
        let f = ploop_io::Folder::of(&path)
            .and_then(|(dir, f)| dir.open_read(f))
            .map_err(|e| Error::io(&name, "opening", 0, e))?;
        Some(crate::disk::hold_openvz_lock_on(&name, &path, f)?)
    };
    // A changed-block bitmap is set aside (its extension would be in the
    // way of the moves) and saved again after.
    let bitmap = PloopDelta::take_cbt(io.clone())?;
    let moved = ploop_format::ploop::compact::defrag(&io, progress, stop)?;
    if let Some(b) = bitmap {
        PloopDelta::put_cbt(io, b)?;
    }
    Ok(moved)
}

/// After a shrink, a snapshot below the top still holds what lay past the
/// smaller end; grown again, the disk must read zeros there, not that. So
/// the top gets zeroed clusters wherever a delta below maps one in
/// `old_size..new_size`.
fn mask_old_data(
    dd: &Path,
    chain: &[ImageEntry],
    old_size: u64,
    new_size: u64,
    cs: u64,
) -> Result<()> {
    let (top, below) = chain.split_last().expect("a chain has a top");
    if top.kind != ImageType::Compressed || below.is_empty() {
        return Ok(());
    }
    let (first, end) = (old_size.div_ceil(cs), new_size.div_ceil(cs));
    let mut masked = std::collections::BTreeSet::new();
    for e in below {
        let delta = open_delta(&image_path(dd, &e.file)?, e.kind, &OpenOptions::default())?;
        let limit = match &delta {
            Delta::Ploop(p) => p.clusters(),
            Delta::Raw(r) => r
                .io()
                .size()
                .map_err(|err| Error::io(r.path(), "sizing", 0, err))?
                .div_ceil(cs),
        };
        for c in first..end.min(limit) {
            if delta.map(c, cs).is_some() {
                masked.insert(c);
            }
        }
    }
    if masked.is_empty() {
        return Ok(());
    }
    let path = image_path(dd, &top.file)?;
    let io = open_file(&path, OpenMode::read_write())?;
    let p = PloopDelta::open(
        io,
        ploop_format::ploop::OpenFlags {
            writable: true,
            allow_dirty: false,
        },
    )?;
    let zeros = vec![0u8; cs as usize];
    for c in masked {
        p.write_cluster(c, 0, &zeros, None)?;
    }
    p.close()
}
