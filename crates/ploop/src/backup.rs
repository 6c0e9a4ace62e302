//! `ploop backup`: full and incremental backups of a disk, mounted or
//! not, through a snapshot and the changed-block bitmap.
//!
//! A backup folder is itself a disk: its DiskDescriptor.xml chains the
//! full backup (the base) and each incremental (a delta holding the
//! clusters changed since the backup before), so it mounts as it is, read
//! only, at its newest point; `--restore` folds it into one image.
//! `ploop-backup.json` beside it names the bitmap the next incremental
//! starts from.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use ploop_daemon::control::Request;
use ploop_format::descriptor::{guid_string, parse_guid, FILE_NAME, TOP_GUID};
use ploop_format::ploop::cbt::Cbt;
use ploop_format::ploop::Version;
use ploop_image::ops::{self, DiskFormat, InitOptions};
use ploop_image::{Chain, Disk, OpenOptions};
use serde_json::json;
use uuid::Uuid;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const STATE: &str = "ploop-backup.json";

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Only the clusters changed since the backup folder's last backup
    /// (by the bitmap that backup started)
    #[arg(long, conflicts_with = "restore")]
    incremental: bool,
    /// The GUID of the bitmap this backup starts, for the next
    /// incremental (default: random)
    #[arg(short = 'b', value_name = "CBT_UUID")]
    cbt: Option<String>,
    /// Fold the backup folder (DISK) into a new image at TARGET
    #[arg(long)]
    restore: bool,
    /// The disk's DiskDescriptor.xml (with --restore: the backup folder)
    disk: PathBuf,
    /// The backup folder (with --restore: the new image file)
    target: PathBuf,
}

pub fn run(a: BackupArgs) -> Res<ExitCode> {
    if a.restore {
        return restore(&a.disk, &a.target);
    }
    let dd = if a.disk.is_dir() {
        a.disk.join(FILE_NAME)
    } else {
        a.disk.clone()
    };
    let new_cbt = match a.cbt.as_deref() {
        Some(s) => parse_guid(s).ok_or_else(|| format!("incorrect uuid: {s}"))?,
        None => Uuid::new_v4(),
    };
    std::fs::create_dir_all(&a.target).map_err(|e| format!("{}: {e}", a.target.display()))?;
    let backup_dd = a.target.join(FILE_NAME);
    let state_path = a.target.join(STATE);
    let since = if a.incremental {
        let s: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&state_path).map_err(|e| {
                format!("{}: {e} (take a full backup first)", state_path.display())
            })?)
            .map_err(|e| format!("{}: {e}", state_path.display()))?;
        let cbt = s["cbt"].as_str().and_then(parse_guid);
        Some(cbt.ok_or_else(|| format!("{}: no bitmap named", state_path.display()))?)
    } else {
        if ploop_io::fsys::exists(&backup_dd) {
            return Err(format!(
                "{}: a backup is there already (--incremental adds to it)",
                a.target.display()
            )
            .into());
        }
        None
    };

    // The point of the backup: a snapshot, whose new top starts the bitmap
    // the next incremental reads.
    let t0 = Instant::now();
    let online = crate::mount::served_rw(&dd);
    let snap = match &online {
        Some(rec) => crate::mount::online_snapshot(rec, None, Some(new_cbt))?,
        None => ops::snapshot_with_cbt(&dd, None, Some(new_cbt))?,
    };
    let copied = copy_point(&dd, snap, since, &a.target, &backup_dd);
    // The snapshot goes again whatever happened: the new top merges into
    // it and the merged file keeps the new bitmap.
    let merged = match &online {
        Some(rec) => crate::mount::online_call(rec, &Request::Merge { guid: None }).map(|_| ()),
        None => ops::merge(&dd, Some(TOP_GUID), &|_, _| {}).map_err(Into::into),
    };
    let (clusters, bytes) = copied?;
    merged.map_err(|e| format!("merging the backup's snapshot away: {e}"))?;
    let mut history = std::fs::read(&state_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["history"].as_array().cloned())
        .unwrap_or_default();
    history.push(json!({
        "kind": if since.is_some() { "incremental" } else { "full" },
        "clusters": clusters,
        "bytes": bytes,
        "cbt": guid_string(&new_cbt),
    }));
    let state = json!({ "cbt": guid_string(&new_cbt), "history": history });
    write_durably(&state_path, serde_json::to_vec_pretty(&state)?.as_slice())?;
    eprintln!(
        "ploop backup: {} backup of {} clusters ({} bytes) in {:.2} s into {}; the next incremental starts from bitmap {}",
        if since.is_some() { "incremental" } else { "full" },
        clusters,
        bytes,
        t0.elapsed().as_secs_f64(),
        a.target.display(),
        guid_string(&new_cbt)
    );
    Ok(ExitCode::SUCCESS)
}

/// Copy the disk as snapshot `snap` holds it into the backup: every
/// cluster some delta holds (full), or those the snapshot's bitmap
/// `since` marks (incremental, a new delta of the backup). Returns the
/// clusters and bytes written.
fn copy_point(
    dd: &Path,
    snap: Uuid,
    since: Option<Uuid>,
    dir: &Path,
    backup_dd: &Path,
) -> Res<(u64, u64)> {
    let view = Disk::open(
        dd,
        OpenOptions {
            guid: Some(snap),
            direct: true,
            ..OpenOptions::default()
        },
    )?;
    let chain = &view.chain;
    let (size, cs) = (chain.virtual_size(), chain.cluster_size());
    let ranges: Vec<(u64, u64)> = match since {
        None => chain.held_ranges()?,
        Some(id) => {
            let bitmap = snapshot_bitmap(chain)?;
            match bitmap {
                Some(b) if b.id == id && b.size == size => b.runs(),
                Some(b) => {
                    return Err(format!(
                        "the disk's bitmap is {}, not the last backup's {}: take a full backup",
                        guid_string(&b.id),
                        guid_string(&id)
                    )
                    .into())
                }
                None => {
                    return Err(format!(
                        "the disk keeps no bitmap {} (dropped by a crash, a resize or a merge): take a full backup",
                        guid_string(&id)
                    )
                    .into())
                }
            }
        }
    };
    // What this backup adds, taken away again if it fails: the full
    // backup's files, or the incremental's new delta.
    let undo: Box<dyn FnOnce()>;
    let target = if since.is_none() {
        let img = dir.join("root.hdd");
        new_image(&img, size, cs, DiskFormat::Expanded)?;
        let (img, dd) = (img.clone(), backup_dd.to_path_buf());
        undo = Box::new(move || {
            let _ = std::fs::remove_file(&img);
            let _ = std::fs::remove_file(&dd);
        });
        backup_dd.to_path_buf()
    } else {
        let b = Disk::open(backup_dd, OpenOptions::default())?;
        if b.chain.virtual_size() != size || b.chain.cluster_size() != cs {
            return Err(format!(
                "{}: its disk is {} bytes in clusters of {}, the disk now {} in {}",
                backup_dd.display(),
                b.chain.virtual_size(),
                b.chain.cluster_size(),
                size,
                cs
            )
            .into());
        }
        drop(b);
        let previous = ops::snapshot(backup_dd, None)?;
        let dd = backup_dd.to_path_buf();
        // Back to the point before: the partial delta is dropped.
        undo = Box::new(move || {
            if let Err(e) = ops::switch(&dd, previous) {
                eprintln!("ploop backup: dropping the unfinished incremental: {e}");
            }
        });
        backup_dd.to_path_buf()
    };
    let copied = (|| -> Res<(u64, u64)> {
        let out = open_writable(&target)?;
        // Allocated even where zeros: an incremental's cluster masks what
        // the backups before it hold there.
        let done = copy_clusters(chain, &out.chain, &ranges, true)?;
        out.close()?;
        Ok(done)
    })();
    if copied.is_err() {
        undo();
    }
    copied
}

/// A new image of `size` bytes in clusters of `cs` in `format` (and its
/// descriptor); returns the descriptor. Also the receiving end of `ploop
/// copy`'s.
pub(crate) fn new_image(image: &Path, size: u64, cs: u64, format: DiskFormat) -> Res<PathBuf> {
    Ok(ops::init(
        image,
        InitOptions {
            size,
            format,
            version: Version::V2,
            cluster_size: cs,
        },
        &|_, _| {},
    )?)
}

/// A disk opened for writing, with direct I/O.
pub(crate) fn open_writable(dd: &Path) -> Res<Disk> {
    Ok(Disk::open(
        dd,
        OpenOptions {
            writable: true,
            direct: true,
            ..OpenOptions::default()
        },
    )?)
}

/// Copy the clusters that `ranges` touch from `from` to `to`, each once;
/// `provisioned`: allocated in `to` even where they read as zeros.
/// Returns the clusters and bytes copied.
fn copy_clusters(
    from: &Chain,
    to: &Chain,
    ranges: &[(u64, u64)],
    provisioned: bool,
) -> Res<(u64, u64)> {
    let (size, cs) = (from.virtual_size(), from.cluster_size());
    let mut buf = ploop_io::AlignedBuf::zeroed(cs as usize);
    let (mut clusters, mut bytes) = (0u64, 0u64);
    // The end of the last cluster copied: ranges finer than a cluster (a
    // bitmap of 64 KiB bits) may touch one cluster more than once.
    let mut copied_to = 0u64;
    for &(start, len) in ranges {
        let mut at = (start / cs * cs).max(copied_to);
        while at < start + len && at < size {
            let n = cs.min(size - at) as usize;
            from.read_at(&mut buf.as_mut_slice()[..n], at)?;
            if provisioned {
                to.write_provisioned(&buf.as_slice()[..n], at)?;
            } else {
                to.write_at(&buf.as_slice()[..n], at)?;
            }
            clusters += 1;
            bytes += n as u64;
            at += cs;
            copied_to = at;
        }
    }
    Ok((clusters, bytes))
}

/// The bitmap the snapshot's top delta saved as it was frozen.
fn snapshot_bitmap(chain: &Chain) -> Res<Option<Arc<Cbt>>> {
    match chain.top().as_ploop() {
        Some(p) => Ok(p.saved_cbt()?.map(Arc::new)),
        None => Ok(None),
    }
}

/// Fold a backup folder into one new image at `image` (and its
/// DiskDescriptor.xml beside it).
fn restore(dir: &Path, image: &Path) -> Res<ExitCode> {
    let dd = if dir.is_dir() {
        dir.join(FILE_NAME)
    } else {
        dir.to_path_buf()
    };
    let backup = Disk::open(
        &dd,
        OpenOptions {
            direct: true,
            ..OpenOptions::default()
        },
    )?;
    let (size, cs) = (backup.chain.virtual_size(), backup.chain.cluster_size());
    if ploop_io::fsys::exists(image) {
        return Err(format!("{}: already exists", image.display()).into());
    }
    if let Some(parent) = image.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let new_dd = new_image(image, size, cs, DiskFormat::Expanded)?;
    let out = open_writable(&new_dd)?;
    let (_, bytes) = copy_clusters(
        &backup.chain,
        &out.chain,
        &backup.chain.held_ranges()?,
        false,
    )?;
    out.close()?;
    eprintln!(
        "ploop backup: restored {} bytes into {} ({})",
        bytes,
        image.display(),
        new_dd.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Write a small file whole or not at all: a temporary beside it, synced,
/// renamed over it, the folder synced.
fn write_durably(path: &Path, bytes: &[u8]) -> Res<()> {
    use std::io::Write;
    let tmp: PathBuf = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
