//! `ploop resize`: the disk, its partition table and its filesystem
//! together, as OpenVZ's ploop_resize_image does them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ploop_daemon::control::Request;
use ploop_daemon::kernel;
use ploop_daemon::registry::MountRecord;
use ploop_format::descriptor::Descriptor;
use ploop_format::SECTOR;
use ploop_image::gpt::{self, Layout};
use ploop_image::{ops, Disk, OpenOptions};

use crate::balloon::Balloon;
use crate::mount::{self, MountRequest};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Serve the disk (its filesystem mounted on a private folder, or only
/// its device) for `f`, and stop serving it whatever `f` returns.
fn served<T>(
    dd: &Path,
    with_mount: bool,
    f: impl FnOnce(&Path, Option<&Path>) -> Res<T>,
) -> Res<T> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = ploop_daemon::registry::run_dir().join(format!("resize.{}", std::process::id()));
    if with_mount {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mp = with_mount.then_some(dir.as_path());
    let started = mount::start_daemon(&MountRequest::internal(dd, false, mp));
    let result = started.and_then(|dev| f(Path::new(&dev), mp));
    let stopped = mount::umount(None, None, Some(dd));
    if with_mount {
        let _ = std::fs::remove_dir(&dir);
    }
    let r = result?;
    stopped?;
    Ok(r)
}

/// The table's partition 1 and cluster size, or None for a bare disk.
fn layout(dd: &Path) -> Res<Layout> {
    let disk = Disk::open(dd, OpenOptions::default())?;
    let l = gpt::probe(&disk.chain, &dd.display().to_string());
    disk.close()?;
    Ok(l?)
}

/// Fit the table to a disk of `sectors`, on the image as it is now.
fn fit_table(dd: &Path, sectors: u64, cluster_sectors: u64) -> Res<()> {
    let disk = Disk::open(
        dd,
        OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
    )?;
    let done = gpt::resize(
        &disk.chain,
        sectors,
        cluster_sectors,
        &dd.display().to_string(),
    );
    disk.close()?;
    done?;
    Ok(())
}

/// The disk's cluster size, `new_size` rounded up to whole clusters,
/// and the size the descriptor gives now.
fn sizes(dd: &Path, new_size: u64) -> Res<(u64, u64, u64)> {
    let d = Descriptor::load(dd)?;
    let cs = u64::from(d.blocksize) * SECTOR;
    let new_size = new_size
        .checked_next_multiple_of(cs)
        .filter(|&n| n > 0)
        .ok_or("invalid size")?;
    Ok((cs, new_size, d.size_sectors * SECTOR))
}

pub fn resize(dd: &Path, new_size: u64) -> Res<ExitCode> {
    if let Some(rec) = mount::served_rw(dd) {
        return resize_online(dd, &rec, new_size);
    }
    if let Some(rec) = ploop_daemon::registry::all()
        .into_iter()
        .find(|r| Some(&r.descriptor) == ploop_io::resolve_folder(dd).ok().as_ref())
    {
        return Err(format!(
            "{} is mounted read-only (daemon pid {}): umount it to resize",
            dd.display(),
            rec.pid
        )
        .into());
    }
    let (cs, new_size, old_size) = sizes(dd, new_size)?;
    let layout = layout(dd)?;
    let cluster_sectors = cs / SECTOR;
    ops::resize_plan(dd, new_size)?;
    // Where the filesystem would be on the resized disk.
    // (The table says, by the same rule it will be rewritten with.)
    let fs_bytes = match &layout {
        Layout::Whole => new_size,
        Layout::Gpt(_) => {
            let disk = Disk::open(dd, OpenOptions::default())?;
            let planned = gpt::plan_partition(
                &disk.chain,
                new_size / SECTOR,
                cluster_sectors,
                &dd.display().to_string(),
            );
            disk.close()?;
            let (first, last) = planned?;
            (last - first + 1) * SECTOR
        }
    };
    if new_size < old_size {
        // Looked at before the daemon holds the image.
        let known_fs = mount::has_filesystem(dd);
        // The filesystem first, checked against what it holds before
        // anything changes; then the table; then the image.
        served(dd, false, |dev, _| {
            let dev = dev.to_path_buf();
            match kernel::fs_type(&dev).as_deref() {
                // Nothing blkid knows: shrunk as a bare disk only if no
                // filesystem we know is there either (blkid may be
                // missing or fail).
                None if !known_fs => Ok(()),
                None => {
                    Err("the filesystem's type cannot be found (blkid): nothing was changed".into())
                }
                Some("xfs") => {
                    Err("an XFS filesystem cannot shrink: the disk keeps its size".into())
                }
                Some("ext2" | "ext3" | "ext4") => {
                    let min = kernel::ext_min_size(&dev)?;
                    if min > fs_bytes {
                        return Err(format!(
                            "the filesystem needs at least {min} bytes, more than the {fs_bytes} the resized disk leaves it: nothing was changed"
                        )
                        .into());
                    }
                    Ok(kernel::resize_ext(&dev, Some(fs_bytes))?)
                }
                Some(other) => Err(format!("cannot shrink a {other} filesystem").into()),
            }
        })?;
        if matches!(layout, Layout::Gpt(_)) {
            fit_table(dd, new_size / SECTOR, cluster_sectors)?;
        }
        ops::resize_image(dd, new_size)?;
    } else {
        // The image first, then the table, then the filesystem (online,
        // on a private mount). Run again, each step is a no-op if done.
        ops::resize_image(dd, new_size)?;
        if matches!(layout, Layout::Gpt(_)) {
            fit_table(dd, new_size / SECTOR, cluster_sectors)?;
        }
        if mount::has_filesystem(dd) {
            let xfs = served(dd, false, |dev, _| match kernel::fs_type(dev).as_deref() {
                Some("ext2" | "ext3" | "ext4") => {
                    kernel::resize_ext(dev, None)?;
                    Ok(false)
                }
                Some("xfs") => Ok(true),
                other => {
                    Err(format!("cannot grow a {} filesystem", other.unwrap_or("missing")).into())
                }
            })?;
            if xfs {
                // XFS grows only mounted.
                served(dd, true, |_, mp| {
                    Ok(kernel::grow_xfs(mp.expect("mounted"))?)
                })?;
            }
        }
    }
    println!(
        "ploop image has been successfully resized to {} sectors",
        new_size / SECTOR
    );
    Ok(ExitCode::SUCCESS)
}

/// Resize a mounted disk. Growing, as OpenVZ: the image and its chain,
/// the partition table, the devices (the daemon does those), then the
/// filesystem, online. Shrinking goes through the balloon file.
fn resize_online(dd: &Path, rec: &MountRecord, new_size: u64) -> Res<ExitCode> {
    let (_, new_size, old_size) = sizes(dd, new_size)?;
    if new_size < old_size {
        return shrink_online(rec, new_size);
    }
    // Also at the same size: a grow that stopped after the image (at the
    // table, at the devices) is finished.
    mount::online_call(rec, &Request::Grow { size: new_size })?;
    // A balloon inflated by an online shrink gives its space back.
    if let Some(m) = fs_mountpoint(rec) {
        let balloon = Balloon::open(&m)?;
        if balloon.size()? > 0 {
            println!("deflating the balloon ({})", mib(balloon.size()?));
            balloon.set_size(0)?;
        }
    }
    // The filesystem (also when an earlier run stopped before it).
    let dev = rec.fs_device().ok_or("the disk has no device")?;
    let grown = match (kernel::fs_type(dev).as_deref(), fs_mountpoint(rec)) {
        (None, _) => Ok(()),
        (Some("xfs"), Some(m)) => kernel::grow_xfs(&m),
        (Some("xfs"), None) => Err(ploop_daemon::Error::Refused(
            "XFS grows only mounted: mount it and resize again".into(),
        )),
        (Some("ext2" | "ext3" | "ext4"), Some(_)) => {
            kernel::run("resize2fs", &[&dev.display().to_string()]).map(drop)
        }
        (Some("ext2" | "ext3" | "ext4"), None) => kernel::resize_ext(dev, None),
        (Some(other), _) => Err(ploop_daemon::Error::Refused(format!(
            "cannot grow a {other} filesystem"
        ))),
    };
    if let Err(e) = grown {
        return Err(format!(
            "the disk grew to {} sectors, its filesystem did not ({e}); growing a mounted ext4 needs CAP_SYS_RESOURCE: without it, umount and run the same resize again",
            new_size / SECTOR
        )
        .into());
    }
    println!(
        "ploop image has been successfully resized to {} sectors",
        new_size / SECTOR
    );
    Ok(ExitCode::SUCCESS)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / f64::from(1 << 20))
}

fn print_figures(what: &str, f: &ops::CompactFigures) {
    let waste = f.file.saturating_sub(f.data);
    println!(
        "{what}: image file {}, data {}, disk {}: {} ({:.1}% of the disk) could be given back",
        mib(f.file),
        mib(f.data),
        mib(f.disk),
        mib(waste),
        100.0 * waste as f64 / f.disk.max(1) as f64
    );
}

/// `ploop compact`: the filesystem's free blocks are discarded (fstrim on
/// a private mount), then the top delta's clusters move down into the
/// freed ones and the file is cut, offline. As OpenVZ, only when the
/// space to win, (file - data) / disk, passes `threshold` percent.
/// Ctrl-C stops it between batches, the image consistent.
/// How `compact` (and OpenVZ's `balloon discard`) runs.
#[derive(Clone, Debug, Default)]
pub struct CompactOptions {
    pub dry: bool,
    /// Percent of the disk the space to win must reach.
    pub threshold: f64,
    /// Move at most this many bytes (OpenVZ's --to-free).
    pub to_free: Option<u64>,
    /// Discard only free ranges at least this long (fstrim --minimum).
    pub min_block: Option<u64>,
}

pub fn compact(dd: &Path, o: &CompactOptions) -> Res<ExitCode> {
    let (dry, threshold) = (o.dry, o.threshold);
    let Some(mut before) = ops::compact_figures(dd)? else {
        println!("{}: a raw image: nothing to compact", dd.display());
        return Ok(ExitCode::SUCCESS);
    };
    // The data is what the filesystem uses, where it can be measured (its
    // deleted files still hold clusters until a discard); else what the
    // image holds.
    if let Some(fs) = mount::fs_stats(dd) {
        let used = fs.blocks.saturating_sub(fs.blocks_free) * fs.block_size;
        before.data = before.data.min(used);
    }
    print_figures("before", &before);
    let online = mount::served_rw(dd);
    let waste = 100.0 * before.file.saturating_sub(before.data) as f64 / before.disk.max(1) as f64;
    if dry {
        println!(
            "dry run: {} ({waste:.1}%) {} the {threshold}% threshold: compact would {}",
            mib(before.file.saturating_sub(before.data)),
            if waste < threshold {
                "is under"
            } else {
                "passes"
            },
            if waste < threshold {
                "do nothing"
            } else {
                "discard the filesystem's free blocks, move clusters down and cut the file"
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    if waste < threshold {
        println!("{waste:.1}% is under the {threshold}% threshold: nothing done");
        return Ok(ExitCode::SUCCESS);
    }
    let cs = Descriptor::load(dd).map_or(1, |d| u64::from(d.blocksize) * SECTOR);
    let limit = o.to_free.map(|b| b.div_ceil(cs));
    let started = std::time::Instant::now();
    let done = match &online {
        Some(rec) => compact_online(rec, o, limit)?,
        None => {
            if mount::has_filesystem(dd) {
                served(dd, true, |_, mp| {
                    println!("{}", kernel::fstrim(mp.expect("mounted"), o.min_block)?);
                    Ok(())
                })?;
            }
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let _ = signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone());
            let _ = signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone());
            crate::cli::with_progress("compacting", |p| {
                ops::compact(dd, false, limit, p, &|| {
                    stop.load(std::sync::atomic::Ordering::Relaxed)
                })
            })?
        }
    };
    let secs = started.elapsed().as_secs_f64();
    let bytes = done.moved * cs;
    if let Some(after) = ops::compact_figures(dd)? {
        print_figures("after", &after);
    }
    println!(
        "moved {} clusters ({} in {secs:.2} s, {:.0} MiB/s); the image file went from {} to {}{}",
        done.moved,
        mib(bytes),
        bytes as f64 / f64::from(1 << 20) / secs.max(1e-9),
        mib(done.size_before),
        mib(done.size_after),
        if done.stopped {
            " (stopped: run compact again to finish)"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Where a served disk's filesystem is mounted, if it is: where ploop
/// mounted it, or wherever else its device is mounted (by vzctl, by hand).
fn fs_mountpoint(rec: &MountRecord) -> Option<PathBuf> {
    let dev = rec.fs_device()?;
    if let Some(m) = &rec.mountpoint {
        if kernel::mounted_from(m).as_deref() == Some(dev) {
            return Some(m.clone());
        }
    }
    kernel::mount_of(dev)
}

/// Compact a mounted disk: its filesystem's free blocks discarded, then
/// the daemon moves clusters with the container's I/O going on. Ctrl-C
/// (the caller hanging up) stops the daemon after the batch it is in.
fn compact_online(
    rec: &MountRecord,
    o: &CompactOptions,
    limit: Option<u64>,
) -> Res<ploop_format::ploop::compact::Compacted> {
    match fs_mountpoint(rec) {
        Some(m) => println!("{}", kernel::fstrim(&m, o.min_block)?),
        None => println!(
            "the disk's filesystem is not mounted by ploop: compacting what it has discarded already"
        ),
    }
    relocate_online(
        rec,
        "compacting",
        Request::Compact {
            limit,
            defrag: false,
        },
    )
}

/// Ask the daemon serving `rec` to move clusters (compact or defrag).
pub fn relocate_online(
    rec: &MountRecord,
    what: &str,
    req: Request,
) -> Res<ploop_format::ploop::compact::Compacted> {
    let v = crate::cli::with_progress(what, |p| mount::online_call_with_progress(rec, &req, p))?
        .ok_or("the daemon sent no figures")?;
    let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    Ok(ploop_format::ploop::compact::Compacted {
        size_before: n("size_before"),
        size_after: n("size_after"),
        moved: n("moved"),
        stopped: v.get("stopped").and_then(serde_json::Value::as_bool) == Some(true),
    })
}

/// Shrink a mounted disk as OpenVZ does: the balloon file grows until
/// the filesystem holds no more than the new size (scaled by the share of
/// its size it can use), its reserved blocks become 5% of that, and its
/// blocks are discarded and compacted away, so the image file gives the
/// space back. The device and the filesystem keep their size; a later
/// grow deflates the balloon. Refused before anything changes when the
/// filesystem has not that much free, or cannot be measured (XFS).
fn shrink_online(rec: &MountRecord, new_size: u64) -> Res<ExitCode> {
    let m = fs_mountpoint(rec).ok_or(
        "the disk's filesystem is not mounted by ploop: shrinking it online needs its mount (or umount and resize offline)",
    )?;
    let dev = rec.fs_device().ok_or("the disk has no device")?;
    match kernel::fs_type(dev).as_deref() {
        Some("ext2" | "ext3" | "ext4") => {}
        Some("xfs") => {
            return Err("an XFS filesystem cannot shrink: the disk keeps its size".into())
        }
        other => {
            return Err(format!("cannot shrink a {} filesystem", other.unwrap_or("missing")).into())
        }
    }
    let d = Descriptor::load(&rec.descriptor)?;
    let cs = u64::from(d.blocksize) * SECTOR;
    let fs_size = kernel::ext_size(dev)?;
    // OpenVZ keeps four clusters for alignment (the table, partition 1's
    // start).
    let new_fs = new_size
        .checked_sub(4 * cs)
        .filter(|&n| n > 0)
        .ok_or("the new size leaves no room for a filesystem")?;
    let st = rustix::fs::statvfs(&m).map_err(|e| format!("{}: {e}", m.display()))?;
    let balloon = Balloon::open(&m)?;
    let inflated = balloon.size()?;
    let usable = (st.f_blocks * st.f_frsize) as f64 / fs_size as f64;
    let want = if new_fs >= fs_size {
        0
    } else {
        (((fs_size - new_fs) as f64 * usable) as u64).next_multiple_of(st.f_frsize.max(1))
    };
    let available = inflated + st.f_bfree * st.f_frsize;
    if want > available {
        let least = fs_size.saturating_sub((available as f64 / usable) as u64) + 4 * cs;
        return Err(format!(
            "Unable to change image size to {} sectors, minimal size is {} sectors: the filesystem has {} bytes free: nothing was changed",
            new_size / SECTOR,
            least.div_ceil(SECTOR),
            available - inflated
        )
        .into());
    }
    println!(
        "changing the balloon from {} to {}",
        mib(inflated),
        mib(want)
    );
    balloon.set_size(want)?;
    // Reserved blocks: 5% of what the filesystem may now hold, as
    // OpenVZ's tune_fs; only advice, so a failure is reported, not fatal.
    let reserved = new_fs / 20 / st.f_frsize.max(1);
    if let Err(e) = kernel::run(
        "tune2fs",
        &["-r", &reserved.to_string(), &dev.display().to_string()],
    ) {
        eprintln!("ploop: setting the reserved blocks to {reserved}: {e}");
    }
    if want > inflated {
        // The balloon's blocks are unwritten (fallocate): discarded below
        // the filesystem, which never reads them, their clusters leave the
        // image; compaction then cuts the file.
        if !balloon.is_on(dev)? {
            return Err(format!(
                "{}: the balloon is not on the disk's filesystem ({}): its blocks were not given back",
                m.display(),
                dev.display()
            )
            .into());
        }
        balloon.frozen(|| {
            for (at, len) in balloon.extents()? {
                if at.saturating_add(len) > fs_size {
                    return Err(
                        format!("a balloon extent at byte {at} lies past the filesystem").into(),
                    );
                }
                kernel::run(
                    "blkdiscard",
                    &[
                        "-f",
                        "-o",
                        &at.to_string(),
                        "-l",
                        &len.to_string(),
                        &dev.display().to_string(),
                    ],
                )?;
            }
            Ok(())
        })?;
        let done = compact_online(
            rec,
            &CompactOptions {
                threshold: 0.0,
                ..CompactOptions::default()
            },
            None,
        )?;
        println!(
            "moved {} clusters; the image file went from {} to {}",
            done.moved,
            mib(done.size_before),
            mib(done.size_after)
        );
    }
    println!(
        "ploop image has been successfully resized to {} sectors (online: the filesystem keeps {} in its balloon)",
        new_size / SECTOR,
        mib(want)
    );
    Ok(ExitCode::SUCCESS)
}

/// `balloon discard --stat`, as OpenVZ prints it.
pub fn discard_stat(dd: &Path) -> Res<ExitCode> {
    let f = ops::compact_figures(dd)?.ok_or("a raw image: nothing to report")?;
    let data = mount::fs_stats(dd).map_or(f.data, |fs| {
        fs.blocks.saturating_sub(fs.blocks_free) * fs.block_size
    });
    let balloon = ploop_daemon::registry::all()
        .into_iter()
        .find(|r| Some(&r.descriptor) == ploop_io::resolve_folder(dd).ok().as_ref())
        .and_then(|r| r.mountpoint)
        .and_then(|m| std::fs::metadata(m.join(mount::BALLOON_FILE)).ok())
        .map_or(0, |m| m.len());
    println!("Balloon size: {:8}MB", balloon >> 20);
    println!("Data size:    {:8}MB", data >> 20);
    println!("Ploop size:   {:8}MB", f.disk >> 20);
    println!("Image size:   {:8}MB", f.file >> 20);
    Ok(ExitCode::SUCCESS)
}
