//! Operations on a disk while it is served: snapshot, and merging a delta
//! with its parent, with I/O going on.
//!
//! Merging online copies the parent's clusters *up* into the child (only
//! those the child does not hold yet, allocated only if still unmapped, so
//! concurrent writers always win), then drops the parent from the chain.
//! Every view of the disk stays the same throughout: the child masks the
//! parent for every cluster it holds.

use std::sync::Arc;

use ploop_format::descriptor::{guid_string, Descriptor, ImageEntry, ImageType, NONE_GUID};
use ploop_format::ploop::{OpenFlags, PloopDelta, Version};
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

/// Merge `child` with its parent while the disk is served. Deltas outside
/// the served chain are merged the offline way.
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
    let parent = chain.layers()[pi].clone();
    let Some(parent_ploop) = parent.as_ploop() else {
        return Err(Error::Invalid(
            "merging into a raw base needs the disk unmounted".into(),
        ));
    };
    let is_top = ci == chain.layers().len() - 1;
    let target: Arc<Delta> = if is_top {
        chain.top().clone()
    } else {
        // A second, writable handle on a lower delta (we already hold its
        // shared lock through the served chain).
        let path = image_path(dd, &entries[ci].file)?;
        let io = open_file(
            &path,
            OpenMode {
                write: true,
                direct: true,
                create_new: false,
                lock: LockMode::None,
            },
        )?;
        Arc::new(Delta::Ploop(PloopDelta::open(
            io,
            OpenFlags {
                writable: true,
                allow_dirty: false,
            },
        )?))
    };
    let target_ploop = target
        .as_ploop()
        .ok_or_else(|| Error::Invalid("cannot merge into a raw delta".into()))?;
    let cs = chain.cluster_size();
    let bat = parent_ploop.bat_snapshot();
    let total = bat.iter().filter(|&&e| e != 0).count() as u64;
    let mut buf = AlignedBuf::zeroed(cs as usize);
    let mut done = 0;
    for (cluster, _) in bat.iter().enumerate().filter(|(_, &e)| e != 0) {
        let cluster = cluster as u64;
        if target_ploop.map(cluster).is_none() {
            let off = parent_ploop.map(cluster).expect("mapped in the snapshot");
            parent_ploop.read_data(buf.as_mut_slice(), off)?;
            target_ploop.populate(cluster, buf.as_slice())?;
        }
        done += 1;
        progress(done, total);
    }
    target.flush()?;
    let parent_path = served.exclusive(|cur| {
        let mut layers = cur.layers().to_vec();
        if !is_top {
            layers[ci] = target.clone();
        }
        layers.remove(pi);
        let new_chain = Chain::new(layers, cur.cluster_size(), cur.virtual_size())?;
        let mut d = Descriptor::load(dd)?;
        let grandparent = d.shot(shot.parent).map(|s| s.parent).unwrap_or(NONE_GUID);
        let path = ops::remove_image(dd, &mut d, shot.parent)?;
        for s in &mut d.snapshots {
            if s.guid == child {
                s.parent = grandparent;
            }
        }
        d.save(dd)?;
        Ok((Some(new_chain), path))
    })?;
    drop(parent);
    std::fs::remove_file(&parent_path).map_err(|e| {
        Error::io(
            parent_path.display().to_string(),
            "removing merged delta",
            0,
            e,
        )
    })?;
    if !is_top {
        target.close()?;
        if let Some(p) = target.as_ploop() {
            let _ = p.io().set_lock(LockMode::Shared);
        }
    }
    Ok(())
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
