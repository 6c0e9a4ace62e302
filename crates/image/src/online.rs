//! Operations on a disk while it is served: snapshot, and merging a delta
//! with its parent, with I/O going on.
//!
//! Merging online copies the child's clusters *down* into its parent, as
//! OpenVZ does, so the work is the size of the (usually small) child. The
//! child masks the parent for every cluster it holds, so no view of the disk
//! changes while the copy runs; when the child is the live top, clusters the
//! guest changes during the copy are recorded and copied again with I/O
//! briefly paused, and the parent becomes the new top.

use std::sync::Arc;

use crate::disk::{image_path, open_delta, DescriptorLock};
use crate::ops;
use crate::{Chain, Delta, OpenOptions};
use ploop_format::descriptor::{guid_string, Descriptor, ImageEntry, ImageType};
use ploop_format::ploop::{OpenFlags, PloopDelta, Version};
use ploop_format::raw::RawDelta;
use ploop_format::{Error, Result};
use ploop_io::{AlignedBuf, LockMode, OpenMode};
use uuid::Uuid;

use crate::served::ServedDisk;

fn desc_err(served: &ServedDisk, what: String) -> Error {
    Error::Descriptor {
        path: served.dd_path.display().to_string(),
        what,
    }
}

/// Take a snapshot of a served disk: the current top is frozen under
/// `uuid` and a new empty top takes over, with no request in flight.
pub fn snapshot(served: &ServedDisk, uuid: Option<Uuid>, cbt: Option<Uuid>) -> Result<Uuid> {
    if served.read_only {
        return Err(Error::Invalid(
            "a read-only mount cannot take snapshots".into(),
        ));
    }
    let dd = served.dd_path.as_path();
    let _lock = DescriptorLock::acquire(dd)?;
    served.exclusive(|chain| {
        let mut d = Descriptor::load(dd)?;
        let snap = ops::new_snapshot_guid(dd, &d, uuid, chain.layers().len())?;
        let top = chain.top().clone();
        top.flush()?;
        let version = top
            .as_ploop()
            .map(|p| p.header().version)
            .unwrap_or(Version::V2);
        let file = ops::new_delta_name(&d);
        ops::create_empty_delta(dd, &d, &file, version)?;
        let path = image_path(dd, &file)?;
        let opened = open_delta(
            &path,
            ImageType::Compressed,
            &OpenOptions {
                writable: true,
                direct: true,
                ..OpenOptions::default()
            },
        )
        .and_then(|new_top| {
            // Its changed-block bitmap: a new one (`cbt`), or the old
            // top's, going on (the old top saves its copy as it closes).
            if let Delta::Ploop(p) = &new_top {
                let bitmap = match cbt {
                    Some(id) => Some(Arc::new(ploop_format::ploop::cbt::Cbt::new(
                        id,
                        chain.cluster_size(),
                        chain.virtual_size(),
                    ))),
                    None => top.as_ploop().and_then(|o| o.cbt()),
                };
                p.set_cbt(bitmap);
            }
            let mut layers = chain.layers().to_vec();
            layers.push(Arc::new(new_top));
            Chain::new(layers, chain.cluster_size(), chain.virtual_size())
        });
        let new_chain = match opened {
            Ok(c) => c,
            Err(e) => {
                let _ = ploop_io::fsys::remove(&path);
                return Err(e);
            }
        };
        ops::freeze_top(&mut d, snap, file);
        if let Err(e) = d.save(dd) {
            drop(new_chain);
            let _ = ploop_io::fsys::remove(&path);
            return Err(e);
        }
        // The old top is read-only from now on: clean flag, shared lock,
        // so a backup can mount it read-only beside us.
        // The descriptor is saved: the swap must happen whatever follows.
        if let Err(e) = top.close() {
            tracing::warn!("closing the frozen top delta: {e}");
        }
        let _ = layer_io(&top).set_lock(LockMode::Shared);
        Ok((Some(new_chain), snap))
    })
}

/// Merge `child` down into its parent while the disk is served, the way
/// OpenVZ does: the parent's file takes the child's data and GUID, and the
/// child's file goes. Deltas outside the served chain are merged offline.
pub fn merge_with_parent(
    served: &ServedDisk,
    child: Uuid,
    progress: &dyn Fn(u64, u64),
) -> Result<()> {
    if served.read_only {
        return Err(Error::Invalid(
            "a read-only mount cannot merge snapshots".into(),
        ));
    }
    let dd = served.dd_path.as_path();
    let lock = DescriptorLock::acquire(dd)?;
    let mut d = Descriptor::load(dd)?;
    let shot = ops::mergeable(dd, &d, child)?;
    let entries: Vec<ImageEntry> = d
        .chain(served.guid, &dd.display().to_string())?
        .into_iter()
        .cloned()
        .collect();
    let pos = |g: Uuid| entries.iter().position(|e| e.guid == g);
    let (Some(ci), Some(pi)) = (pos(child), pos(shot.parent)) else {
        drop(lock);
        return ops::merge(dd, Some(child), progress);
    };
    let chain = served.current();
    if chain.layers().len() != entries.len() {
        return Err(desc_err(
            served,
            "descriptor and served chain disagree".into(),
        ));
    }
    let source = chain.layers()[ci].clone();
    let Some(src) = source.as_ploop() else {
        return Err(Error::Invalid(
            "cannot merge a raw delta into its parent".into(),
        ));
    };
    let is_top = ci == chain.layers().len() - 1;
    // The merged file takes the child's place, and its bitmap where it has
    // one (the live one of a top); else the parent keeps its own, which
    // the copy below marks with every cluster the child holds.
    let child_bitmap = if is_top {
        src.cbt()
    } else {
        src.saved_cbt()?.map(Arc::new)
    };

    // A second, writable handle on the parent, locked exclusively before
    // it touches the file: a read-only mount of the parent elsewhere (a
    // backup) must not see it change. Our own handle lets go of its shared
    // lock for that.
    let parent_old = chain.layers()[pi].clone();
    let _ = layer_io(&parent_old).set_lock(LockMode::None);
    let parent = match open_writable_twin(&parent_old, &entries[pi]) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            let _ = layer_io(&parent_old).set_lock(LockMode::Shared);
            return Err(e);
        }
    };
    let mut lower: Vec<Arc<Delta>> = chain.layers()[..pi].to_vec();
    lower.push(parent.clone());
    let target = match Chain::new(lower, chain.cluster_size(), chain.virtual_size()) {
        Ok(t) => t,
        Err(e) => {
            abandon(parent, None, &parent_old);
            return Err(e);
        }
    };
    // Marked in the descriptor before its first byte changes: a merge that
    // stops halfway leaves a parent nobody may open as the snapshot it was
    // (a mount of the top still reads right: the child masks it).
    let marked = ops::parent_can_hold(&parent, src, chain.virtual_size())
        .and_then(|()| ops::mark_merge_target(dd, &mut d, shot.parent));
    if let Err(e) = marked {
        abandon(parent, Some(target), &parent_old);
        return Err(e);
    }

    // Phase 1, with I/O going on: copy what the child holds now. Clusters
    // the guest changes meanwhile are recorded and copied again below.
    let mut buf = AlignedBuf::zeroed(chain.cluster_size() as usize);
    let mut copy = |cluster: u64| copy_cluster(src, &chain, ci, &target, cluster, &mut buf);
    let copied = (|| -> Result<()> {
        if is_top {
            // Started with no request in flight, so every write that lands
            // after this point is one that tracking sees.
            served.exclusive(|_| {
                src.start_tracking();
                Ok((None, ()))
            })?;
        }
        let bat = src.bat_snapshot();
        let total = bat.iter().filter(|&&e| e != 0).count() as u64;
        let mut done = 0;
        for (cluster, _) in bat.iter().enumerate().filter(|(_, &e)| e != 0) {
            copy(cluster as u64)?;
            done += 1;
            progress(done, total);
        }
        // Catch up with I/O still running while the guest keeps changing
        // a lot, so the pause below stays short.
        if is_top {
            for _ in 0..8 {
                let changed = src.take_changes();
                if changed.len() < 64 {
                    src.note_changes(changed);
                    break;
                }
                for cluster in changed {
                    copy(cluster)?;
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = copied {
        if is_top {
            src.stop_tracking();
        }
        abandon(parent, Some(target), &parent_old);
        return Err(e);
    }

    // Phase 2, with no request in flight: the last changes, then switch the
    // chain and the descriptor over.
    let switched = served.exclusive(|cur| {
        if is_top {
            for cluster in src.stop_tracking() {
                copy(cluster)?;
            }
        }
        target.flush()?;
        if let (Some(b), Some(p)) = (&child_bitmap, parent.as_ploop()) {
            p.set_cbt(Some(b.clone()));
        }
        let mut layers = cur.layers().to_vec();
        layers[pi] = parent.clone();
        layers.remove(ci);
        let new_chain = Chain::new(layers, cur.cluster_size(), cur.virtual_size())?;
        let mut d = Descriptor::load(dd)?;
        let child_path = ops::finish_merge(dd, &mut d, shot.parent, child)?;
        d.save(dd)?;
        Ok((Some(new_chain), child_path))
    });
    let child_path = match switched {
        Ok(p) => p,
        Err(e) => {
            if is_top {
                src.stop_tracking();
            }
            abandon(parent, Some(target), &parent_old);
            return Err(e);
        }
    };
    // Committed: what follows is tidying up, and failures are only logged.
    // On NFS, flock is emulated with POSIX locks, which belong to the
    // process and the file, not to one descriptor: closing the old
    // read-only handle of the parent below also drops the lock the twin
    // (now the top) holds on the same file. Until the network backends
    // take their own locks, a disk on NFS is not protected against a
    // second writer after an online merge (see the README's limits).
    drop(chain);
    if !is_top {
        // The parent stays a read-only layer: clean flag, shared lock.
        if let Err(e) = parent.close() {
            tracing::warn!("closing the merged parent: {e}");
        }
        let _ = layer_io(&parent).set_lock(LockMode::Shared);
    }
    if let Err(e) = source.close() {
        tracing::warn!("closing the merged delta: {e}");
    }
    // The name the descriptor gave is removed only if it still names the
    // file this merge emptied (the folder's owner may have renamed files
    // meanwhile).
    let merged = layer_io(&source).identity();
    drop(source);
    let removed = ploop_io::Folder::of(&child_path).and_then(|(dir, name)| {
        if dir.identity(name).ok() != merged.ok().flatten() {
            return Err(std::io::Error::other(
                "the name no longer leads to the merged file: left alone",
            ));
        }
        dir.remove(name)
    });
    if let Err(e) = removed {
        tracing::warn!("removing merged delta {}: {e}", child_path.display());
    }
    Ok(())
}

/// Give up a merge: the twin is closed (its BAT written back, its in-use
/// flag cleared) and its file with it, lock and all, before the served
/// chain's handle takes its shared lock back; nothing is ever written to
/// the parent without the exclusive lock.
fn abandon(parent: Arc<Delta>, target: Option<Chain>, parent_old: &Delta) {
    drop(target);
    match Arc::try_unwrap(parent) {
        Ok(twin) => {
            if let Err(e) = twin.close() {
                tracing::warn!("closing the parent of an abandoned merge: {e}");
            }
            // Its file (and lock) goes here, after any retry of its close.
            drop(twin);
        }
        Err(_) => tracing::warn!(
            "the parent of an abandoned merge is still in use: it keeps its lock until released"
        ),
    }
    let _ = layer_io(parent_old).set_lock(LockMode::Shared);
}

fn layer_io(d: &Delta) -> &ploop_io::SharedIo {
    match d {
        Delta::Ploop(p) => p.io(),
        Delta::Raw(r) => r.io(),
    }
}

/// Open a delta of the served chain a second time, writable and locked
/// exclusively (the caller has released the served chain's shared lock):
/// through the handle the daemon holds, so it is the very file served,
/// whatever the descriptor (which the folder's owner may edit) names now.
fn open_writable_twin(served: &Delta, entry: &ImageEntry) -> Result<Delta> {
    let old = layer_io(served);
    let mode = OpenMode {
        write: true,
        direct: true,
        create_new: false,
        lock: LockMode::Exclusive,
    };
    let io = match old.reopen(mode) {
        Ok(Some(io)) => io,
        Ok(None) => {
            return Err(Error::Invalid(format!(
                "{}: cannot be opened a second time",
                old.describe()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            return Err(Error::Locked {
                path: old.describe(),
            })
        }
        Err(e) => return Err(Error::io(old.describe(), "opening again", 0, e)),
    };
    Ok(match entry.kind {
        ImageType::Plain => Delta::Raw(RawDelta::open(io, true)?),
        ImageType::Compressed => Delta::Ploop(PloopDelta::open(
            io,
            OpenFlags {
                writable: true,
                allow_dirty: false,
            },
        )?),
    })
}

/// Copy one cluster as the child sees it into the parent's chain. Where
/// the child does not hold it, the view is what lies below the child in
/// the served chain: untouched if something there holds it, else zeros
/// (the child dropped a cluster an earlier pass had copied down).
fn copy_cluster(
    src: &PloopDelta,
    served: &Chain,
    child_index: usize,
    target: &Chain,
    cluster: u64,
    buf: &mut AlignedBuf,
) -> Result<()> {
    let cs = target.cluster_size();
    let start = cluster * cs;
    if start >= target.virtual_size() {
        return Ok(());
    }
    let len = (target.virtual_size() - start).min(cs) as usize;
    // A discard may free the cluster while we read it; tracking makes the
    // merge copy it again, the pin keeps us from reading its next owner.
    let _pin = src.pin();
    match src.map(cluster) {
        Some(off) => {
            src.read_data(&mut buf.as_mut_slice()[..len], off)?;
            target.write_at(&buf.as_slice()[..len], start)
        }
        None if served.held_below(cluster, child_index) => Ok(()),
        None => target.discard(start, len as u64),
    }
}

/// Delete snapshot `guid` of a served disk.
pub fn delete(served: &ServedDisk, guid: Uuid, progress: &dyn Fn(u64, u64)) -> Result<()> {
    let d = Descriptor::load(&served.dd_path)?;
    if guid == d.top_guid {
        return Err(desc_err(
            served,
            format!(
                "unable to delete the active top delta {}",
                guid_string(&guid)
            ),
        ));
    }
    let children = d.children(guid);
    match children.as_slice() {
        [only] => merge_with_parent(served, *only, progress),
        _ => ops::delete(&served.dd_path, guid, progress),
    }
}

/// `replace` on a served disk: the read-only delta `target` names is
/// swapped in the running chain for `new`, after `new` is found to hold
/// exactly what it holds (checked while I/O goes on: a read-only delta
/// does not change). A delta outside the served chain is replaced
/// offline.
pub fn replace(
    served: &ServedDisk,
    target: &ops::ReplaceTarget,
    new: &std::path::Path,
    keep_name: bool,
    progress: &dyn Fn(u64, u64),
) -> Result<()> {
    let dd = served.dd_path.as_path();
    let lock = DescriptorLock::acquire(dd)?;
    let mut d = Descriptor::load(dd)?;
    let guid = ops::replace_target(dd, &d, target)?;
    let entries: Vec<ImageEntry> = d
        .chain(served.guid, &dd.display().to_string())?
        .into_iter()
        .cloned()
        .collect();
    let Some(level) = entries.iter().position(|e| e.guid == guid) else {
        drop(lock);
        return ops::replace(dd, target, new, keep_name, progress);
    };
    if level + 1 == entries.len() && !served.read_only {
        return Err(desc_err(
            served,
            "only a read-only delta (a snapshot) can be replaced, not the top".into(),
        ));
    }
    let entry = entries[level].clone();
    let name = ops::replacement_name(dd, &d, new, entry.kind)?;
    let new_path = crate::disk::dd_dir(dd).join(&name);
    let chain = served.current();
    if chain.layers().len() != entries.len() {
        return Err(desc_err(
            served,
            "the served chain and the descriptor disagree: try again".into(),
        ));
    }
    let old = chain.layers()[level].clone();
    let newd = open_delta(
        &new_path,
        entry.kind,
        &OpenOptions {
            direct: true,
            ..OpenOptions::default()
        },
    )?;
    ops::same_content(
        &old,
        &newd,
        chain.virtual_size(),
        chain.cluster_size(),
        progress,
    )?;
    drop(chain);
    let newd = Arc::new(newd);
    served.exclusive(|chain| {
        if !Arc::ptr_eq(&chain.layers()[level], &old) {
            return Err(desc_err(
                served,
                "the served chain changed meanwhile: try again".into(),
            ));
        }
        let mut layers = chain.layers().to_vec();
        layers[level] = newd.clone();
        let new_chain = Chain::new(layers, chain.cluster_size(), chain.virtual_size())?;
        ops::finish_replace(dd, &mut d, guid, &name, keep_name)?;
        Ok((Some(new_chain), ()))
    })
}

/// Grow a served disk to `new_size` bytes (rounded up to whole clusters)
/// with no request in flight: every delta's BAT grows, the descriptor
/// says the new size, and a chain of that size replaces the served one.
/// The top may move data out of its BAT's way (it is closed, resized and
/// opened again); a snapshot below must not need that online, since the
/// daemon reads it through the BAT it loaded. Returns the new size.
pub fn grow(served: &ServedDisk, new_size: u64) -> Result<u64> {
    if served.read_only {
        return Err(Error::Invalid("a read-only mount cannot be resized".into()));
    }
    let dd = served.dd_path.as_path();
    let _lock = DescriptorLock::acquire(dd)?;
    let mut d = Descriptor::load(dd)?;
    let cs = u64::from(d.blocksize) * ploop_format::SECTOR;
    let new_size = new_size
        .checked_next_multiple_of(cs)
        .ok_or_else(|| desc_err(served, format!("invalid size {new_size}")))?;
    if d.preallocated {
        // Preallocation writes every new cluster, which would hold the
        // container's I/O for as long.
        return Err(desc_err(
            served,
            "a preallocated disk grows offline (umount it first)".into(),
        ));
    }
    let save = |d: &mut Descriptor| -> Result<()> {
        if d.size_sectors * ploop_format::SECTOR == new_size {
            return Ok(());
        }
        let chs = ploop_format::ploop::header::Chs::from_sectors(new_size / ploop_format::SECTOR);
        d.size_sectors = new_size / ploop_format::SECTOR;
        d.cylinders = chs.cylinders;
        d.heads = chs.heads;
        d.save(dd)
    };
    served.exclusive(|chain| {
        let old_size = chain.virtual_size();
        if new_size == old_size {
            // Done before, maybe but for the descriptor: finish.
            return Ok((None, save(&mut d).map(|()| new_size)));
        }
        if new_size < old_size {
            return Err(Error::Invalid(format!(
                "online, a disk only grows: it has {old_size} bytes, {new_size} asked (shrink through the balloon, or offline)"
            )));
        }
        let layers = chain.layers();
        let (top, lower) = layers.split_last().expect("a chain has a top");
        let Some(top_p) = top.as_ploop() else {
            return Err(Error::Invalid(
                "the top delta is raw: a raw disk is resized offline".into(),
            ));
        };
        // Everything refused is refused before anything changes.
        for l in lower {
            let Some(p) = l.as_ploop() else {
                return Err(Error::Invalid(format!(
                    "{}: a raw snapshot grows offline only: umount and resize",
                    l.path()
                )));
            };
            let (now, ..) = ploop_format::ploop::resize::plan(p.io(), p.virtual_size())?;
            let grown =
                ploop_format::ploop::header::Header::new(new_size, now.cluster_size, now.version)?;
            if grown.data_offset > now.data_offset {
                return Err(Error::Invalid(format!(
                    "{}: the snapshot's BAT would have to move its data to grow to {new_size} bytes: umount and resize offline",
                    p.path()
                )));
            }
        }
        ploop_format::ploop::resize::plan(top_p.io(), top_p.virtual_size())
            .map(drop)
            .or_else(|e| match e {
                // Open for writing: its in-use flag is set, as it should.
                Error::Dirty { .. } => Ok(()),
                e => Err(e),
            })?;
        // Clusters a snapshot still holds past the old end (a shrink
        // leaves them): the grown range must read zeros, not them.
        let (first, end) = (old_size.div_ceil(cs), new_size.div_ceil(cs));
        let masked: Vec<u64> = (first..end)
            .filter(|&c| lower.iter().any(|l| l.map(c, cs).is_some()))
            .collect();
        for l in lower {
            let Some(p) = l.as_ploop() else { continue };
            // Written through a second handle, locked exclusively, as a
            // merge writes a parent: nobody else may read it meanwhile.
            let io = layer_io(l);
            let _ = io.set_lock(LockMode::None);
            let grown = io
                .reopen(ploop_io::OpenMode {
                    write: true,
                    direct: true,
                    create_new: false,
                    lock: LockMode::Exclusive,
                })
                .map_err(|e| Error::io(p.path(), "opening for writing", 0, e))
                .and_then(|twin| {
                    let twin = twin.ok_or_else(|| {
                        Error::Invalid(format!("{}: cannot be opened a second time", p.path()))
                    })?;
                    ploop_format::ploop::resize::resize(&twin, new_size, false)
                });
            let relocked = io
                .set_lock(LockMode::Shared)
                .map_err(|e| Error::io(p.path(), "taking its shared lock back", 0, e));
            grown?;
            relocked?;
        }
        // The top: closed (flushed, clean), resized, opened again.
        top_p.close()?;
        let io = top_p.io().clone();
        let resized = ploop_format::ploop::resize::resize(&io, new_size, false);
        let reopened = match PloopDelta::open(
            io,
            OpenFlags {
                writable: true,
                allow_dirty: false,
            },
        ) {
            Ok(r) => r,
            Err(e) => {
                // The closed top takes no more writes (it refuses them
                // once closed); the disk needs a remount.
                tracing::error!("{}: cannot be opened again after resizing: {e}", top_p.path());
                return Err(e);
            }
        };
        // Served again whatever happened: at the new size once the top
        // has it (then the descriptor; a failure there is reported, and
        // the same resize again finishes), else at the old one.
        let size = if resized.is_ok() { new_size } else { old_size };
        let zeros = vec![0u8; cs as usize];
        let masked = resized.and_then(|_| {
            for &c in &masked {
                reopened.write_cluster(c, 0, &zeros, None)?;
            }
            reopened.flush()
        });
        let mut new_layers = lower.to_vec();
        new_layers.push(Arc::new(Delta::Ploop(reopened)));
        let new_chain = Chain::new(new_layers, cs, size)?;
        let done = masked.and_then(|()| save(&mut d));
        Ok((Some(new_chain), done.map(|()| new_size)))
    })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use ploop_format::ploop::CreateOptions;
    use ploop_io::{MemIo, SharedIo};

    const CS: u64 = 32 << 10;

    fn delta(io: &SharedIo, writable: bool) -> Arc<Delta> {
        Arc::new(Delta::Ploop(
            PloopDelta::open(
                io.clone(),
                OpenFlags {
                    writable,
                    allow_dirty: true,
                },
            )
            .unwrap(),
        ))
    }

    fn new_io(name: &str) -> SharedIo {
        let io: SharedIo = Arc::new(MemIo::new(name));
        PloopDelta::create(
            io.clone(),
            CreateOptions {
                virtual_size: 4 * CS,
                cluster_size: CS,
                version: Version::V2,
                preallocate: false,
            },
        )
        .unwrap();
        io
    }

    /// A cluster the child never held (say a guest write to it failed
    /// during the merge) keeps the parent's data; one the child dropped
    /// after an earlier pass copied it down reads as zeros.
    #[test]
    fn copy_keeps_what_lies_below_the_child() {
        let parent_io = new_io("parent");
        let child_io = new_io("child");
        {
            let p = delta(&parent_io, true);
            let c = Chain::new(vec![p.clone()], CS, 4 * CS).unwrap();
            c.write_at(&vec![7u8; CS as usize], 0).unwrap();
            c.close().unwrap();
        }
        let parent = delta(&parent_io, false);
        let child = delta(&child_io, true);
        let served = Chain::new(vec![parent, child.clone()], CS, 4 * CS).unwrap();
        // The child copies cluster 1 down, then the guest drops it.
        served.write_at(&vec![9u8; CS as usize], CS).unwrap();
        let twin = delta(&parent_io, true);
        let target = Chain::new(vec![twin], CS, 4 * CS).unwrap();
        let src = child.as_ploop().unwrap();
        let mut buf = AlignedBuf::zeroed(CS as usize);
        copy_cluster(src, &served, 1, &target, 1, &mut buf).unwrap();
        served.discard(CS, CS).unwrap();
        for cluster in [0, 1] {
            copy_cluster(src, &served, 1, &target, cluster, &mut buf).unwrap();
        }
        let mut back = vec![0u8; CS as usize];
        target.read_at(&mut back, 0).unwrap();
        assert!(
            back.iter().all(|&b| b == 7),
            "the parent's own cluster survives"
        );
        target.read_at(&mut back, CS).unwrap();
        assert!(
            back.iter().all(|&b| b == 0),
            "a dropped cluster reads as zeros"
        );
    }
}
