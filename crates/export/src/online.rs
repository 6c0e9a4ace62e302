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

use ploop_format::descriptor::{guid_string, Descriptor, ImageEntry, ImageType};
use ploop_format::ploop::{OpenFlags, PloopDelta, Version};
use ploop_format::raw::RawDelta;
use ploop_format::{Error, Result};
use ploop_image::disk::{image_path, open_delta, open_file, DescriptorLock};
use ploop_image::ops;
use ploop_image::{Chain, Delta, OpenOptions};
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
pub fn snapshot(served: &ServedDisk, uuid: Option<Uuid>) -> Result<Uuid> {
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
            let mut layers = chain.layers().to_vec();
            layers.push(Arc::new(new_top));
            Chain::new(layers, chain.cluster_size(), chain.virtual_size())
        });
        let new_chain = match opened {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        ops::freeze_top(&mut d, snap, file);
        if let Err(e) = d.save(dd) {
            drop(new_chain);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        // The old top is read-only from now on: clean flag, shared lock,
        // so a backup can mount it read-only beside us.
        // The descriptor is saved: the swap must happen whatever follows.
        if let Err(e) = top.close() {
            tracing::warn!("closing the frozen top delta: {e}");
        }
        if let Some(p) = top.as_ploop() {
            let _ = p.io().set_lock(LockMode::Shared);
        }
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
    let d = Descriptor::load(dd)?;
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

    // A second, writable handle on the parent. Its lock must become
    // exclusive: a read-only mount of the parent elsewhere (a backup) would
    // otherwise see it change.
    let parent_old = chain.layers()[pi].clone();
    let parent = Arc::new(open_writable_twin(dd, &entries[pi])?);
    let _ = layer_io(&parent_old).set_lock(LockMode::None);
    if layer_io(&parent).set_lock(LockMode::Exclusive).is_err() {
        let _ = layer_io(&parent_old).set_lock(LockMode::Shared);
        return Err(Error::Locked {
            path: parent.path().to_string(),
        });
    }
    let mut lower: Vec<Arc<Delta>> = chain.layers()[..pi].to_vec();
    lower.push(parent.clone());
    let target = Chain::new(lower, chain.cluster_size(), chain.virtual_size())?;

    // Phase 1, with I/O going on: copy what the child holds now. Clusters
    // the guest changes meanwhile are recorded and copied again below.
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
    let mut buf = AlignedBuf::zeroed(chain.cluster_size() as usize);
    let mut copy = |cluster: u64| copy_cluster(src, &target, cluster, &mut buf);
    let mut done = 0;
    let mut phase1 = Ok(());
    for (cluster, _) in bat.iter().enumerate().filter(|(_, &e)| e != 0) {
        phase1 = copy(cluster as u64);
        if phase1.is_err() {
            break;
        }
        done += 1;
        progress(done, total);
    }
    let restore_locks = || {
        let _ = layer_io(&parent).set_lock(LockMode::None);
        let _ = layer_io(&parent_old).set_lock(LockMode::Shared);
    };
    if let Err(e) = phase1 {
        if is_top {
            src.stop_tracking();
        }
        restore_locks();
        return Err(e);
    }

    // Phase 2, with no request in flight: catch up, then switch the chain
    // and the descriptor over.
    let switched = served.exclusive(|cur| {
        if is_top {
            for cluster in src.stop_tracking() {
                copy(cluster)?;
            }
        }
        target.flush()?;
        let mut layers = cur.layers().to_vec();
        layers[pi] = parent.clone();
        layers.remove(ci);
        let new_chain = Chain::new(layers, cur.cluster_size(), cur.virtual_size())?;
        let mut d = Descriptor::load(dd)?;
        let child_path = ops::remove_image(dd, &mut d, child)?;
        d.rename_guid(shot.parent, child);
        d.save(dd)?;
        Ok((Some(new_chain), child_path))
    });
    let child_path = match switched {
        Ok(p) => p,
        Err(e) => {
            if is_top {
                src.stop_tracking();
            }
            restore_locks();
            return Err(e);
        }
    };
    drop(chain);
    if let Err(e) = source.close() {
        tracing::warn!("closing the merged delta: {e}");
    }
    drop(source);
    std::fs::remove_file(&child_path).map_err(|e| {
        Error::io(
            child_path.display().to_string(),
            "removing merged delta",
            0,
            e,
        )
    })?;
    if !is_top {
        // The parent stays a read-only layer: clean flag, shared lock.
        parent.close()?;
        let _ = layer_io(&parent).set_lock(LockMode::Shared);
    }
    Ok(())
}

fn layer_io(d: &Delta) -> &ploop_io::SharedIo {
    match d {
        Delta::Ploop(p) => p.io(),
        Delta::Raw(r) => r.io(),
    }
}

/// Open a delta of the served chain a second time, writable, without a
/// lock (the served chain already holds one on it).
fn open_writable_twin(dd: &std::path::Path, entry: &ImageEntry) -> Result<Delta> {
    let path = image_path(dd, &entry.file)?;
    let io = open_file(
        &path,
        OpenMode {
            write: true,
            direct: true,
            create_new: false,
            lock: LockMode::None,
        },
    )?;
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

/// Copy one cluster as the child sees it into the parent's chain (zeros
/// where the child no longer holds it).
fn copy_cluster(
    src: &PloopDelta,
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
    match src.map(cluster) {
        Some(off) => {
            src.read_data(&mut buf.as_mut_slice()[..len], off)?;
            target.write_at(&buf.as_slice()[..len], start)
        }
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
