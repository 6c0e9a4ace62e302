//! mount / umount / list, and the online paths of snapshot commands.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use ploop_daemon::control::{self, Request};
use ploop_daemon::kernel;
use ploop_daemon::registry::{self, LimitsRecord, MountRecord};
use ploop_daemon::session::{self, MountOptions};
use ploop_format::descriptor::{guid_string, parse_guid};
use ploop_nbd::kernel_client;
use serde_json::json;
use uuid::Uuid;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

pub struct MountRequest {
    pub descriptor: PathBuf,
    pub read_only: bool,
    pub mountpoint: Option<PathBuf>,
    pub options: String,
    pub uuid: Option<String>,
    pub foreground: bool,
    pub threads: usize,
    pub uring: bool,
    /// How the kernel hands FUSE requests over: auto, ring or dev.
    pub fuse_queues: String,
    /// Longest busy poll of the ring threads, in microseconds.
    pub busy_poll_us: u64,
    /// The kernel's NBD client as the device, instead of FUSE + loop.
    pub nbd: bool,
    /// Check the filesystem before mounting it.
    pub fsck: bool,
    /// I/O limits from the start.
    pub limits: LimitsRecord,
    /// A cgroup folder for the daemon.
    pub cgroup: Option<PathBuf>,
}

impl MountRequest {
    /// A view this tool serves for its own work (mkfs, figures, resize,
    /// a temporary snapshot): a few /dev/fuse workers, no busy polling.
    pub fn internal(dd: &Path, read_only: bool, mountpoint: Option<&Path>) -> Self {
        Self {
            descriptor: dd.to_path_buf(),
            read_only,
            mountpoint: mountpoint.map(Path::to_path_buf),
            options: String::new(),
            uuid: None,
            foreground: false,
            threads: 4,
            uring: false,
            fuse_queues: "dev".into(),
            busy_poll_us: 0,
            nbd: false,
            fsck: false,
            limits: LimitsRecord::default(),
            cgroup: None,
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Start a daemon in the background; returns the device once it is up.
pub fn start_daemon(r: &MountRequest) -> Res<String> {
    let dd = ploop_io::resolve_folder(&r.descriptor)
        .map_err(|e| format!("{}: {e}", r.descriptor.display()))?;
    let guid = match &r.uuid {
        Some(u) => parse_guid(u).ok_or_else(|| format!("incorrect uuid specified: {u}"))?,
        None => ploop_format::descriptor::TOP_GUID,
    };
    let id = registry::id_for(&dd, &guid_string(&guid), r.read_only);
    let (log, log_file) =
        session::open_log(&id).map_err(|e| format!("the daemon's log for {id}: {e}"))?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("mount").arg("--foreground");
    cmd.arg("--threads").arg(r.threads.to_string());
    cmd.arg("--io").arg(if r.uring { "uring" } else { "sync" });
    cmd.arg("--fuse-queues").arg(&r.fuse_queues);
    cmd.arg("--busy-poll").arg(r.busy_poll_us.to_string());
    if r.read_only {
        cmd.arg("-r");
    }
    if r.nbd {
        cmd.arg("--nbd");
    }
    if r.fsck {
        cmd.arg("-F");
    }
    let l = &r.limits;
    for (flag, v) in [
        ("--iops-limit", l.iops),
        ("--bps-limit", l.bps),
        ("--iops-burst", l.iops_burst),
        ("--bps-burst", l.bps_burst),
    ] {
        if let Some(v) = v {
            cmd.arg(flag).arg(v.to_string());
        }
    }
    if let Some(c) = &r.cgroup {
        cmd.arg("--cgroup").arg(c);
    }
    if let Some(m) = &r.mountpoint {
        cmd.arg("-m").arg(m);
    }
    if !r.options.is_empty() {
        cmd.arg("-o").arg(&r.options);
    }
    if let Some(u) = &r.uuid {
        cmd.arg("-u").arg(u);
    }
    cmd.arg(&dd);
    if std::env::var_os("PLOOP_LOG").is_none() {
        // fuser warns when its own unmount finds ours already done.
        cmd.env("PLOOP_LOG", "info,fuser::session=error");
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the daemon: {e}"))?;
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped");
    BufReader::new(stdout).read_line(&mut line)?;
    let device = line.trim().to_string();
    if device.is_empty() {
        let status = child.wait()?;
        // The log's last lines, each on its own line with its control
        // characters escaped (names in it come from the disk's folder).
        eprintln!("ploop: the daemon's log {} ends with:", log.display());
        for line in tail(&log, 5).lines() {
            eprintln!("  {}", ploop_format::escape_control(line, false));
        }
        return Err(format!("the daemon failed ({status})").into());
    }
    Ok(device)
}

pub fn mount(r: MountRequest) -> Res<ExitCode> {
    if let Some(m) = &r.mountpoint {
        // Checked here for a clear error before the daemon starts; the
        // daemon opens it again and mounts on what it opened.
        ploop_daemon::kernel::MountPoint::open(m)?;
    }
    if !r.foreground {
        let dev = start_daemon(&r)?;
        println!("{dev}");
        return Ok(ExitCode::SUCCESS);
    }
    let guid = match &r.uuid {
        Some(u) => Some(parse_guid(u).ok_or_else(|| format!("incorrect uuid specified: {u}"))?),
        None => None,
    };
    ploop_uring::busy_poll::set_limit(std::time::Duration::from_micros(r.busy_poll_us));
    let opts = MountOptions {
        descriptor: r.descriptor.clone(),
        guid,
        read_only: r.read_only,
        mountpoint: r.mountpoint.clone(),
        fs_options: r.options.clone(),
        threads: r.threads,
        uring: r.uring,
        fuse_queues: match r.fuse_queues.as_str() {
            "ring" => session::FuseQueues::Ring,
            "dev" => session::FuseQueues::Dev,
            _ => session::FuseQueues::Auto,
        },
        nbd: r.nbd,
        fsck: r.fsck,
        limits: r.limits,
        cgroup: r.cgroup.clone(),
    };
    session::serve(opts, |rec| {
        if let Some(d) = rec.fs_device() {
            // The parent `ploop mount` may be gone: a closed pipe is fine.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", d.display()).and_then(|()| out.flush());
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

fn canonical(p: &Path) -> PathBuf {
    ploop_io::resolve_folder(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Every view of a disk that a live daemon serves.
pub fn served_views(dd: &Path) -> Vec<MountRecord> {
    let dd = canonical(dd);
    registry::all()
        .into_iter()
        .filter(|r| r.descriptor == dd && r.daemon_alive())
        .collect()
}

/// "iops N (burst B), bps N (burst B)" or "no limits".
pub fn limits_line(l: &LimitsRecord) -> String {
    let one = |what: &str, rate: Option<u64>, burst: Option<u64>| {
        rate.map(|r| match burst {
            Some(b) => format!("{what} {r} (burst {b})"),
            None => format!("{what} {r}"),
        })
    };
    let parts: Vec<String> = [
        one("iops", l.iops, l.iops_burst),
        one("bytes/s", l.bps, l.bps_burst),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        "limits: none".into()
    } else {
        format!("limits: {}", parts.join(", "))
    }
}

/// The daemon's counters for `rec`, if it answers.
fn daemon_stats(rec: &MountRecord) -> Option<serde_json::Value> {
    let r = control::call(&rec.socket, &Request::Status, Duration::from_secs(5)).ok()?;
    r.value?.get("stats").cloned()
}

/// `ploop stat`: a mounted disk's counters and limits.
pub fn stat(dd: &Path, as_json: bool) -> Res<ExitCode> {
    let recs = served_views(dd);
    if recs.is_empty() {
        return Err(format!("{} is not mounted", dd.display()).into());
    }
    let mut out = Vec::new();
    for r in &recs {
        let stats = daemon_stats(r).ok_or("the daemon did not answer")?;
        if as_json {
            out.push(json!({
                "descriptor": r.descriptor,
                "device": r.fs_device(),
                "limits": r.limits,
                "stats": stats,
            }));
            continue;
        }
        println!(
            "{} {}",
            r.fs_device()
                .map_or_else(String::new, |d| d.display().to_string()),
            limits_line(&r.limits)
        );
        if let Some(m) = stats.as_object() {
            for (k, v) in m {
                println!("  {k:<14} {v}");
            }
        }
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// The read-write view of a disk that a live daemon serves.
pub fn served_rw(dd: &Path) -> Option<MountRecord> {
    let dd = ploop_io::resolve_folder(dd).ok()?;
    registry::all()
        .into_iter()
        .find(|r| r.descriptor == dd && !r.read_only && r.daemon_alive())
}

fn wait_gone(pid: u32, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !registry::process_alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Clean up after a daemon that died (kill -9): unmount, detach, drop
/// the dead FUSE mount and the record.
fn cleanup_dead(rec: &MountRecord) -> Res<()> {
    if let Some(m) = &rec.mountpoint {
        if kernel::is_mounted(m) && kernel::umount(m).is_err() {
            kernel::umount_lazy(m)?;
        }
    }
    let part = rec.partition.as_ref().and_then(|p| p.device.as_ref());
    if let Some(d) = part {
        // Best effort, as below.
        if let Err(e) = kernel::loop_detach(d) {
            eprintln!("warning: {}: {e}", d.display());
        }
    }
    if let Some(d) = &rec.device {
        // Best effort: the device may be gone with the daemon already.
        let detached = if kernel_client::is_nbd(d) {
            kernel_client::disconnect(d).map_err(|e| e.to_string())
        } else {
            kernel::loop_detach(d).map_err(|e| e.to_string())
        };
        if let Err(e) = detached {
            eprintln!("warning: {}: {e}", d.display());
        }
    }
    if kernel::is_mounted(&rec.fuse_file) {
        kernel::umount_lazy(&rec.fuse_file)?;
    }
    registry::remove(rec);
    Ok(())
}

pub fn umount(
    mountpoint: Option<&Path>,
    device: Option<&Path>,
    dd: Option<&Path>,
) -> Res<ExitCode> {
    let all = registry::all();
    let chosen: Vec<MountRecord> = all
        .into_iter()
        .filter(|r| match (mountpoint, device, dd) {
            (Some(m), _, _) => r.mountpoint.as_deref() == Some(canonical(m).as_path()),
            (_, Some(d), _) => r.device.as_deref() == Some(d) || r.fs_device() == Some(d),
            (_, _, Some(dd)) => r.descriptor == canonical(dd),
            _ => false,
        })
        .collect();
    if chosen.is_empty() {
        let what = mountpoint
            .or(device)
            .or(dd)
            .map(|p| p.display().to_string());
        return Err(format!("{} is not mounted", what.unwrap_or_default()).into());
    }
    for rec in chosen {
        if rec.daemon_alive() {
            let resp = control::call(&rec.socket, &Request::Stop, Duration::from_secs(600))?;
            if !resp.ok {
                return Err(resp.error.unwrap_or_else(|| "umount failed".into()).into());
            }
            if !wait_gone(rec.pid, Duration::from_secs(30)) {
                return Err(format!("daemon {} did not exit", rec.pid).into());
            }
        } else {
            eprintln!(
                "ploop: the daemon of {} (pid {}) is gone; cleaning up",
                rec.descriptor.display(),
                rec.pid
            );
            cleanup_dead(&rec)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A mount record as `list --json` and `info --json` show it.
pub fn record_json(r: &MountRecord) -> serde_json::Value {
    json!({
        "descriptor": r.descriptor,
        "uuid": r.guid,
        "read_only": r.read_only,
        "device": r.device,
        "partition": r.partition.as_ref().map(|p| json!({
            "number": p.number,
            "start": p.start,
            "length": p.len,
            "device": p.device,
        })),
        "fs_device": r.fs_device(),
        "mountpoint": r.mountpoint,
        "pid": r.pid,
        "running": r.daemon_alive(),
        "log": r.log,
        "limits": r.limits,
        "cgroup": r.cgroup,
        "stats": if r.daemon_alive() { daemon_stats(r) } else { None },
    })
}

pub fn list(as_json: bool) -> Res<ExitCode> {
    let recs = registry::all();
    if as_json {
        let v: Vec<_> = recs.iter().map(record_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    for r in &recs {
        println!(
            "{:<12} {} {} {} pid={}{}{}{}",
            r.fs_device()
                .map_or("-".into(), |d| d.display().to_string()),
            r.descriptor.display(),
            r.mountpoint
                .as_ref()
                .map_or("-".into(), |m| m.display().to_string()),
            if r.read_only { "ro" } else { "rw" },
            r.pid,
            match &r.partition {
                Some(p) => format!(
                    " partition={} of {}",
                    p.number,
                    r.device
                        .as_ref()
                        .map_or("-".into(), |d| d.display().to_string())
                ),
                None => String::new(),
            },
            if r.guid == guid_string(&ploop_format::descriptor::TOP_GUID) {
                String::new()
            } else {
                format!(" snapshot={}", r.guid)
            },
            if r.daemon_alive() {
                ""
            } else {
                " (daemon gone)"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn online_call(rec: &MountRecord, req: &Request) -> Res<Option<serde_json::Value>> {
    online_call_with_progress(rec, req, &|_, _| {})
}

/// [`online_call`] for a long operation, which reports progress.
pub fn online_call_with_progress(
    rec: &MountRecord,
    req: &Request,
    progress: &dyn Fn(u64, u64),
) -> Res<Option<serde_json::Value>> {
    let resp =
        control::call_with_progress(&rec.socket, req, Duration::from_secs(24 * 3600), progress)?;
    if resp.ok {
        Ok(resp.value)
    } else {
        Err(resp.error.unwrap_or_else(|| "daemon refused".into()).into())
    }
}

/// Snapshot a mounted disk: the daemon freezes the filesystem, switches to
/// a new top delta and thaws.
pub fn online_snapshot(rec: &MountRecord, uuid: Option<Uuid>, cbt: Option<Uuid>) -> Res<Uuid> {
    let v = online_call(
        rec,
        &Request::Snapshot {
            uuid: uuid.map(|u| guid_string(&u)),
            cbt: cbt.map(|u| guid_string(&u)),
        },
    )?;
    v.as_ref()
        .and_then(|v| v.as_str())
        .and_then(parse_guid)
        .ok_or_else(|| "daemon did not return the snapshot GUID".into())
}

/// OpenVZ's hidden balloon file in a filesystem's root (its lib/ploop.h
/// BALLOON_FNAME): online shrink inflates it to take space from the
/// filesystem and hand it back.
pub const BALLOON_FILE: &str = ".balloon-c3a5ae3d-ce7f-43c4-a1ea-c61e2b4504e8";

/// Make a filesystem on a new image through the same FUSE + loop path
/// (on partition 1 where the disk has a partition table), and put the
/// balloon file in its root as OpenVZ's `ploop init` does.
pub fn make_filesystem(dd: &Path, fstype: &str, o: &kernel::MkfsOptions) -> Res<()> {
    let dev = start_daemon(&MountRequest::internal(dd, false, None))?;
    let dev = Path::new(&dev);
    let made = kernel::mkfs(dev, fstype, o)
        .map_err(|e| e.into())
        .and_then(|()| create_balloon(dev));
    umount(None, None, Some(dd))?;
    made
}

/// Mount the new filesystem on a private folder, create the balloon file
/// (empty, 0600, as OpenVZ's create_balloon_file does) and unmount.
fn create_balloon(dev: &Path) -> Res<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let run = registry::run_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&run)
        .map_err(|e| format!("{}: {e}", run.display()))?;
    let dir = run.join(format!("init.{}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = kernel::MountPoint::open(&dir)
        .and_then(|mp| kernel::mount(dev, &mp, "", false))
        .map_err(|e| -> Box<dyn std::error::Error> { e.into() })
        .and_then(|()| {
            let path = dir.join(BALLOON_FILE);
            let made = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("creating the balloon file: {e}").into());
            let unmounted = kernel::umount(&dir);
            made.and(unmounted.map_err(|e| e.into()))
        });
    let _ = std::fs::remove_dir(&dir);
    result
}

/// A filesystem's size and use, as statfs gives them.
pub struct FsStats {
    pub block_size: u64,
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_available: u64,
    pub inodes: u64,
    pub inodes_free: u64,
}

fn statvfs(dir: &Path) -> Option<FsStats> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(FsStats {
        block_size: s.f_frsize,
        blocks: s.f_blocks,
        blocks_free: s.f_bfree,
        blocks_available: s.f_bavail,
        inodes: s.f_files,
        inodes_free: s.f_ffree,
    })
}

/// The figures of a disk's filesystem, as OpenVZ's `info` gets them: from
/// where it is mounted, or (not mounted at all, and as root) from a
/// read-only mount made for the purpose and undone. None where neither
/// works (no filesystem, mounted without a mount point, not root).
pub fn fs_stats(dd: &Path) -> Option<FsStats> {
    let canonical = canonical(dd);
    let recs: Vec<MountRecord> = registry::all()
        .into_iter()
        .filter(|r| r.descriptor == canonical && r.daemon_alive())
        .collect();
    for r in &recs {
        if let (Some(m), Some(dev)) = (&r.mountpoint, r.fs_device()) {
            if kernel::mounted_from(m).as_deref() == Some(dev) {
                return statvfs(m);
            }
        }
    }
    if !recs.is_empty() || !rustix::process::geteuid().is_root() || !has_filesystem(dd) {
        return None;
    }
    use std::os::unix::fs::DirBuilderExt;
    let run = registry::run_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&run)
        .ok()?;
    let dir = run.join(format!("info.{}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir).ok()?;
    let req = MountRequest {
        threads: 2,
        ..MountRequest::internal(dd, true, Some(&dir))
    };
    let stats = match start_daemon(&req) {
        Ok(_) => {
            let s = statvfs(&dir);
            // By its mount point: a view someone else mounted meanwhile
            // stays.
            if let Err(e) = umount(Some(&dir), None, None) {
                eprintln!("ploop: unmounting the disk mounted for its figures: {e}");
            }
            s
        }
        Err(_) => None,
    };
    let _ = std::fs::remove_dir(&dir);
    stats
}

/// Whether a disk holds an ext2/3/4 or XFS filesystem where it would be
/// mounted (partition 1, or the whole disk), by its magic numbers.
pub fn has_filesystem(dd: &Path) -> bool {
    use ploop_image::gpt::{self, Layout};
    let Ok(disk) = ploop_image::Disk::open(dd, ploop_image::OpenOptions::default()) else {
        return false;
    };
    let start = match gpt::probe(&disk.chain, &dd.display().to_string()) {
        Ok(Layout::Gpt(p)) => Some(p.start),
        Ok(Layout::Whole) => Some(0),
        Err(_) => None,
    };
    let mut head = vec![0u8; 2048];
    let found = start.is_some_and(|at| {
        disk.chain.read_at(&mut head, at).is_ok()
            && (head[1080..1082] == [0x53, 0xef] || head.starts_with(b"XFSB"))
    });
    let _ = disk.close();
    found
}

/// The descriptor of the mounted disk whose base image is `image`
/// (OpenVZ's `umount DELTA`).
pub fn descriptor_of_image(image: &Path) -> Res<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let want = std::fs::metadata(image).map_err(|e| format!("{}: {e}", image.display()))?;
    for rec in registry::all() {
        let Ok(d) = ploop_format::descriptor::Descriptor::load(&rec.descriptor) else {
            continue;
        };
        let Some(base) = d.base() else { continue };
        let Ok(path) = ploop_image::disk::image_path(&rec.descriptor, &base.file) else {
            continue;
        };
        if std::fs::metadata(&path).is_ok_and(|m| m.dev() == want.dev() && m.ino() == want.ino()) {
            return Ok(rec.descriptor);
        }
    }
    Err(format!("image {} is not mounted", image.display()).into())
}
