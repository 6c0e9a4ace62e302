//! The mount daemon: serves one view of a disk over FUSE, puts a loop
//! device on it, mounts the filesystem, and answers its control socket
//! until told to stop.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption, SessionACL};
use ploop_format::descriptor::{guid_string, parse_guid, TOP_GUID};
use ploop_image::disk::DescriptorLock;
use ploop_image::gpt::{self, Layout};
use ploop_image::{ops, Disk, OpenOptions};
use serde_json::json;
use tracing::{error, info, warn};
use uuid::Uuid;

use crate::control::{self, Request, Response};
use crate::kernel;
use crate::registry::{self, MountRecord, PartitionRecord};
use crate::{Error, Result};
use ploop_fuse::file::{DiskFile, OneFileFs, MAX_REQUEST};
use ploop_fuse::ring::Queues;
use ploop_image::served::ServedDisk;
use ploop_image::{moves, online};
use ploop_nbd::kernel_client::NbdDevice;
use ploop_nbd::Export;

#[derive(Clone, Debug)]
pub struct MountOptions {
    pub descriptor: PathBuf,
    pub guid: Option<Uuid>,
    pub read_only: bool,
    pub mountpoint: Option<PathBuf>,
    /// Extra mount options for the filesystem.
    pub fs_options: String,
    /// FUSE worker threads.
    pub threads: usize,
    /// Queue plain reads and in-place writes through io_uring.
    pub uring: bool,
    /// How the kernel hands FUSE requests over.
    pub fuse_queues: FuseQueues,
    /// Export through the kernel's NBD client (/dev/nbdN) instead of FUSE
    /// and a loop device.
    pub nbd: bool,
    /// Check (and fix what is safe to fix) the filesystem before mounting.
    pub fsck: bool,
    /// I/O limits from the start.
    pub limits: crate::registry::LimitsRecord,
    /// A cgroup (v1 or v2 folder) to put the daemon in, so that the host's
    /// own I/O controllers (blkio, io) apply to the disk's I/O.
    pub cgroup: Option<PathBuf>,
}

/// What the device is made of.
/// Who answers the kernel's FUSE requests.
enum FuseServer {
    /// fuser's session loop, on its own thread.
    Thread(std::thread::JoinHandle<std::io::Result<()>>),
    /// The io_uring queues' threads, which read /dev/fuse too; the session
    /// is kept for the mount it owns.
    Ring(Box<fuser::Session<OneFileFs>>, Arc<Queues>),
}

impl FuseServer {
    fn is_finished(&self) -> bool {
        match self {
            FuseServer::Thread(t) => t.is_finished(),
            FuseServer::Ring(_, queues) => queues.stopped(),
        }
    }
}

enum Backend {
    /// A FUSE session under a loop device (until it ended).
    Fuse(Option<FuseServer>),
    /// The kernel's NBD client, connected to our server.
    Nbd(NbdDevice),
}

/// NBD connections of a `--nbd` device (the kernel spreads its queues
/// over them).
fn nbd_connections() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// FUSE over io_uring (per-CPU queues) or /dev/fuse (worker threads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FuseQueues {
    /// io_uring where the kernel offers it, /dev/fuse otherwise.
    Auto,
    /// io_uring or fail.
    Ring,
    /// /dev/fuse.
    Dev,
}

/// The descriptor's path with its folder resolved and its own name not
/// followed (a link there is refused when it is read).
fn canonical(p: &Path) -> Result<PathBuf> {
    ploop_io::resolve_folder(p).map_err(|e| Error::io(p.display(), e))
}

/// Open the disk; an image left in use by a crash is checked and repaired
/// first, as OpenVZ does on mount.
pub fn open_disk(dd: &Path, read_only: bool, guid: Option<Uuid>) -> Result<Disk> {
    // Held while opening: an offline snapshot, merge or switch is either
    // done before we look at the descriptor or waits for our file locks.
    let lock = DescriptorLock::acquire(dd)?;
    let descriptor = ploop_format::descriptor::Descriptor::load(dd)?;
    ploop_image::disk::refuse_encrypted(dd, &descriptor)?;
    let open = || {
        Disk::open(
            dd,
            OpenOptions {
                writable: !read_only,
                direct: true,
                guid,
                ..OpenOptions::default()
            },
        )
    };
    match open() {
        Err(ploop_format::Error::Dirty { path }) => {
            warn!("{path} was not closed cleanly: running check");
            eprintln!(
                "ploop: {} was not closed cleanly: checking and repairing it",
                ploop_format::escape_control(&path, false)
            );
            for r in ops::repair_disk_locked(dd, &lock)? {
                for p in &r.report.problems {
                    warn!("check {}: {p}", r.path.display());
                }
            }
            Ok(open()?)
        }
        other => Ok(other?),
    }
}

/// Serve until stopped. `ready` runs once the device (and mount) is up.
pub fn serve(opts: MountOptions, ready: impl FnOnce(&MountRecord)) -> Result<()> {
    // Before any thread starts: they all inherit it.
    if let Err(e) = kernel::become_io_flusher() {
        info!("not marked as an I/O flusher ({e}): heavy memory pressure may stall the device");
    }
    // Before any thread starts too (in cgroup v2, a process whose threads
    // are spread cannot move; in v1 all its threads move anyway).
    if let Some(cg) = &opts.cgroup {
        join_cgroup(cg)?;
    }
    let dd = canonical(&opts.descriptor)?;
    let guid = opts.guid.unwrap_or(TOP_GUID);
    let guid_s = guid_string(&guid);
    let id = registry::id_for(&dd, &guid_s, opts.read_only);
    // One daemon per view, even when two start at the same instant: the
    // second fails on this lock, held for the daemon's whole life.
    let view_lock = registry::lock_view(&id);
    let existing = registry::all().into_iter().find(|r| r.id == id);
    if let Some(old) = &existing {
        if old.daemon_alive() || view_lock.is_err() {
            return Err(Error::Refused(format!(
                "{} is already mounted (device {}, daemon pid {})",
                dd.display(),
                old.device
                    .as_ref()
                    .map_or("-".into(), |d| d.display().to_string()),
                old.pid
            )));
        }
    }
    let _view_lock = view_lock.map_err(|_| {
        Error::Refused(format!(
            "{} is being mounted by another daemon right now",
            dd.display()
        ))
    })?;
    if let Some(old) = existing {
        return Err(Error::Refused(format!(
            "{} has a stale mount record (daemon {} is gone); run `ploop umount {}` first",
            dd.display(),
            old.pid,
            dd.display()
        )));
    }
    let disk = open_disk(&dd, opts.read_only, opts.guid)?;
    // Held for the daemon's life: OpenVZ 9's tools see the disk in use.
    // (Not atomic with open_disk's probe: both sides take the lock first
    // and probe after, so this probe catches a tool that came between.)
    let mut openvz_lock = match ploop_image::disk::hold_openvz_lock(&dd) {
        Ok(l) => l,
        Err(e) => {
            let _ = disk.close();
            return Err(e.into());
        }
    };
    // Where the filesystem is, before anything is set up: a table that
    // cannot be trusted stops the mount with the image untouched.
    let layout = match gpt::probe(&disk.chain, &dd.display().to_string()) {
        Ok(l) => l,
        Err(e) => {
            if let Err(c) = disk.close() {
                warn!(
                    "closing {} after a refused partition table: {c}",
                    dd.display()
                );
            }
            return Err(e.into());
        }
    };
    if let Layout::Gpt(p) = &layout {
        info!(
            "partition {} (sectors {}-{}, type {}{}) holds the filesystem",
            p.number,
            p.first_sector(),
            p.last_sector(),
            p.type_guid,
            if p.from_backup {
                "; primary table damaged, backup used"
            } else {
                ""
            }
        );
    }
    let served = Arc::new(ServedDisk::new(
        dd.clone(),
        disk.guid,
        opts.read_only,
        disk.chain,
    ));
    served
        .throttle
        .set(opts.limits.into())
        .map_err(Error::Refused)?;
    let dir = registry::run_dir().join(&id);
    let fuse_file = dir.join("disk");
    let socket = dir.join("ctl.sock");
    let log = log_path(&id);
    // From here on, whatever fails undoes what was done: see Session.
    let mut session = Session {
        served: served.clone(),
        record: MountRecord {
            id,
            descriptor: dd.clone(),
            guid: guid_s,
            read_only: opts.read_only,
            pid: std::process::id(),
            fuse_file: fuse_file.clone(),
            socket: socket.clone(),
            log,
            device: None,
            partition: match &layout {
                Layout::Gpt(p) => Some(PartitionRecord {
                    number: p.number,
                    start: p.start,
                    len: p.len,
                    device: None,
                }),
                Layout::Whole => None,
            },
            mountpoint: None,
            limits: opts.limits,
            cgroup: opts.cgroup.clone(),
        },
        saved: false,
        backend: None,
        notifier: None,
        late_requests: false,
        finished: false,
    };
    let file = Arc::new(DiskFile::new(served.clone()));
    let queues = match opts.fuse_queues {
        _ if opts.nbd => None,
        FuseQueues::Dev => None,
        mode => match Queues::prepare(file.clone(), MAX_REQUEST as usize, opts.threads) {
            Ok(q) => Some(q),
            Err(e) if mode == FuseQueues::Auto => {
                info!("{e}; serving over /dev/fuse");
                None
            }
            Err(e) => return Err(e.into()),
        },
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(dir.display(), e))?;
    // The control socket inside takes merge, delete and stop: root only.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(|e| Error::io(dir.display(), e))?;
    if kernel::is_mounted(&fuse_file) {
        // A dead daemon's FUSE mount (not connected): drop it first.
        if let Err(e) = kernel::umount_lazy(&fuse_file) {
            warn!("dropping a dead daemon's FUSE mount: {e}");
        }
    }
    std::fs::write(&fuse_file, b"").map_err(|e| Error::io(fuse_file.display(), e))?;
    match std::fs::remove_file(&socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io(socket.display(), e))
        }
        _ => {}
    }
    session.save()?;

    let backend = if opts.nbd {
        let export = Arc::new(Export {
            name: String::new(),
            description: format!("ploop disk {}", dd.display()),
            read_only: opts.read_only,
            disk: served.clone(),
        });
        Backend::Nbd(NbdDevice::attach(
            export,
            nbd_connections(),
            opts.threads,
            opts.uring,
        )?)
    } else {
        let mut cfg = Config::default();
        cfg.mount_options = vec![
            MountOption::FSName("ploop".into()),
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
            MountOption::CUSTOM(format!("max_read={MAX_REQUEST}")),
            if opts.read_only {
                MountOption::RO
            } else {
                MountOption::RW
            },
        ];
        cfg.acl = SessionACL::All;
        // fuser's workers run only where the io_uring queues do not (INIT
        // decides, after this): with `auto`, two, so that a fallback to
        // /dev/fuse does not serve one request at a time.
        cfg.n_threads = Some(match (&queues, opts.fuse_queues) {
            (Some(_), FuseQueues::Ring) => 1,
            (Some(_), _) => 2.min(opts.threads.max(1)),
            (None, _) => opts.threads.max(1),
        });
        cfg.clone_fd = true;
        let ring = ploop_uring::Ring::start_if(opts.uring);
        let fs = OneFileFs::new(file, ring, queues.clone());
        let fuse = fuser::Session::new(fs, &fuse_file, &cfg)
            .map_err(|e| Error::io(format!("FUSE mount on {}", fuse_file.display()), e))?;
        let mut ring = None;
        if let Some(q) = &queues {
            match q.start_if_negotiated(&fuse) {
                Ok(false) if opts.fuse_queues == FuseQueues::Ring => {
                    return Err(Error::Refused(
                        "the kernel did not agree to FUSE over io_uring".to_string(),
                    ))
                }
                Ok(true) => ring = Some(q.clone()),
                Ok(false) => {}
                Err(e) => return Err(Error::io("starting the FUSE queues", e)),
            }
        }
        session.notifier = Some(fuse.notifier());
        let server = match ring {
            // The ring threads read /dev/fuse as well: no thread of
            // fuser's waits on it.
            Some(q) => FuseServer::Ring(Box::new(fuse), q),
            None => FuseServer::Thread(
                std::thread::Builder::new()
                    .name("fuse".into())
                    .spawn(move || fuse.run())
                    .map_err(|e| Error::io("starting the FUSE thread", e))?,
            ),
        };
        Backend::Fuse(Some(server))
    };
    let nbd_device = match &backend {
        Backend::Nbd(device) => Some(device.path().to_path_buf()),
        Backend::Fuse(_) => None,
    };
    session.backend = Some(backend);

    let dev = match nbd_device {
        Some(d) => d,
        None => kernel::loop_attach(&fuse_file, opts.read_only)?,
    };
    session.record.device = Some(dev.clone());
    let fs_dev = match session.record.partition.as_mut() {
        Some(p) => {
            // A loop device over the partition's bytes: of the FUSE file
            // directly, or of the NBD device.
            let under = if opts.nbd { &dev } else { &fuse_file };
            let part = kernel::loop_attach_range(under, opts.read_only, Some((p.start, p.len)))?;
            p.device = Some(part.clone());
            part
        }
        None => dev.clone(),
    };
    if opts.fsck {
        kernel::fsck(&fs_dev, opts.read_only)?;
    }
    if let Some(m) = &opts.mountpoint {
        let mp = kernel::MountPoint::open(m)?;
        kernel::mount(&fs_dev, &mp, &opts.fs_options, opts.read_only)?;
        session.record.mountpoint = Some(mp.path().to_path_buf());
    }
    session.save()?;
    let listener = UnixListener::bind(&socket).map_err(|e| Error::io(socket.display(), e))?;
    info!(
        "serving {} ({}) on {} as {}",
        dd.display(),
        session.record.guid,
        fuse_file.display(),
        fs_dev.display()
    );
    ready(&session.record);
    let signals = watch_signals();

    let handler = |req, caller: &control::Caller| {
        let progress = &|done, total| caller.progress(done, total);
        let result = match req {
            Request::Status => Ok(Some(json!({
                "record": &session.record,
                "deltas": served.current().layers().len(),
                "stats": stats_json(&served),
            }))),
            Request::SetLimits(limits) => {
                let old = session.record.limits;
                match served.throttle.set(limits.into()) {
                    Ok(()) => {
                        session.record.limits = limits;
                        session.save().map(|()| None).map_err(|e| {
                            // Recorded or not at all: the old limits back.
                            session.record.limits = old;
                            let _ = served.throttle.set(old.into());
                            e.to_string()
                        })
                    }
                    Err(e) => Err(e),
                }
            }
            Request::Flush
            | Request::TrackStart { .. }
            | Request::TrackTake
            | Request::TrackStop
            | Request::Merge { .. }
            | Request::Delete { .. } => match disk_request(&served, &req, progress) {
                Some(r) => r,
                None => Err("not handled".to_string()),
            },
            Request::Snapshot { uuid, cbt } => {
                snapshot_request(&served, uuid.as_deref(), cbt.as_deref(), || {
                    Frozen::if_mounted(&session.record)
                })
            }
            Request::Replace {
                target,
                new,
                keep_name,
            } => match parse_replace_target(&target) {
                None => Err(format!("bad replace target {target:?}")),
                Some(t) => online::replace(&served, &t, &new, keep_name, progress)
                    .map(|_| None)
                    .map_err(|e| e.to_string())
                    .inspect(|_| {
                        // The base may be another file now: lock that one.
                        match ploop_image::disk::hold_openvz_lock(&dd) {
                            Ok(l) => openvz_lock = l,
                            Err(e) => warn!("OpenVZ's lock on the new base delta: {e}"),
                        }
                    }),
            },
            Request::Grow { size } => {
                grow_online(&served, &mut session, &fuse_file, opts.nbd, size)
                    .map(Some)
                    .map_err(|e| e.to_string())
            }
            Request::Compact { limit, defrag } => {
                let goal = if defrag {
                    moves::Goal::Defrag
                } else {
                    moves::Goal::Compact { limit }
                };
                let stop = || caller.gone() || stopping().load(std::sync::atomic::Ordering::SeqCst);
                moves::relocate(&served, goal, progress, &stop)
                    .map(|done| {
                        Some(json!({
                            "moved": done.moved,
                            "size_before": done.size_before,
                            "size_after": done.size_after,
                            "stopped": done.stopped,
                        }))
                    })
                    .map_err(|e| e.to_string())
            }
            Request::Stop => {
                let r = served
                    .chain()
                    .flush()
                    .map_err(|e| e.to_string())
                    .and_then(|_| session.shutdown().map_err(|e| e.to_string()));
                return match r {
                    Ok(()) => (Response::ok(None), true),
                    Err(e) => (Response::err(e), false),
                };
            }
        };
        match result {
            Ok(v) => (Response::ok(v), false),
            Err(e) => {
                warn!("control request failed: {e}");
                (Response::err(e), false)
            }
        }
    };
    match &signals {
        Some(wake) => control::serve_until_signalled(&listener, wake, handler),
        None => control::serve(&listener, handler),
    }
    let stopped = session.finish();
    info!("stopped serving {}", dd.display());
    stopped
}

/// A replace target as the control socket carries it.
fn parse_replace_target(t: &str) -> Option<ops::ReplaceTarget> {
    let (kind, value) = t.split_once(':')?;
    match kind {
        "guid" => parse_guid(value).map(ops::ReplaceTarget::Guid),
        "level" => value.parse().ok().map(ops::ReplaceTarget::Level),
        "file" => Some(ops::ReplaceTarget::File(PathBuf::from(value))),
        _ => None,
    }
}

/// What `serve` has set up. Dropped before `finish` — any step of the
/// start failed — it undoes all of it in reverse: the kernel side, the
/// image (closed) and the mount record, so no error path repeats the
/// cleanup or forgets part of it.
/// The disk's counters, as `ploop stat` and `list --json` show them.
fn stats_json(served: &ServedDisk) -> serde_json::Value {
    let s = served.throttle.stats.snapshot();
    json!({
        "reads": s.reads,
        "writes": s.writes,
        "discards": s.discards,
        "flushes": s.flushes,
        "read_bytes": s.read_bytes,
        "write_bytes": s.write_bytes,
        "discard_bytes": s.discard_bytes,
        "throttled": s.throttled,
        "throttled_ms": s.throttled_ns / 1_000_000,
    })
}

/// Put this process (all its threads) in the cgroup folder `dir`.
fn join_cgroup(dir: &Path) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, format!("{}\n", std::process::id()))
        .map_err(|e| Error::io(procs.display(), e))
}

/// Grow a served disk: the image and the chain, the partition table,
/// then the devices above (the FUSE file's size, the whole-disk loop
/// device, the partition's loop device). The filesystem is the caller's.
fn grow_online(
    served: &ServedDisk,
    session: &mut Session,
    fuse_file: &Path,
    nbd: bool,
    size: u64,
) -> Result<serde_json::Value> {
    if nbd {
        return Err(Error::Refused(
            "a disk on the kernel's NBD client cannot change size while mounted: umount it to resize"
                .into(),
        ));
    }
    let size = online::grow(served, size)?;
    let chain = served.current();
    let name = served.dd_path.display().to_string();
    let part = match &session.record.partition {
        Some(_) => Some(gpt::resize(
            &*chain,
            size / ploop_format::SECTOR,
            chain.cluster_size() / ploop_format::SECTOR,
            &name,
        )?),
        None => None,
    };
    chain.flush()?;
    drop(chain);
    // The kernel drops the FUSE file's cached attributes when told (else
    // once they expire, after 1 s), and reads the new size.
    if let Some(n) = &session.notifier {
        if let Err(e) = n.inval_inode(fuser::INodeNo::ROOT, -1, 0) {
            warn!("telling the kernel the FUSE file grew: {e}");
        }
    }
    let started = std::time::Instant::now();
    loop {
        let now = std::fs::metadata(fuse_file)
            .map_err(|e| Error::io(fuse_file.display(), e))?
            .len();
        if now == size {
            break;
        }
        if started.elapsed() > Duration::from_secs(5) {
            return Err(Error::io(
                fuse_file.display(),
                std::io::Error::other(format!("still {now} bytes, not {size}")),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(dev) = &session.record.device {
        ploop_loopdev::LoopDevice::open(dev)
            .and_then(|l| l.set_capacity())
            .map_err(|e| Error::io(dev.display(), e))?;
    }
    if let (Some(p), Some(rec)) = (part, session.record.partition.as_mut()) {
        if let Some(dev) = &rec.device {
            if p.start != rec.start {
                return Err(Error::Refused(format!(
                    "partition {} moved from byte {} to {}: its device cannot follow",
                    p.number, rec.start, p.start
                )));
            }
            ploop_loopdev::LoopDevice::open(dev)
                .and_then(|l| l.set_size_limit(p.len))
                .map_err(|e| Error::io(dev.display(), e))?;
        }
        rec.len = p.len;
    }
    session.save()?;
    Ok(json!({
        "size": size,
        "fs_device": session.record.fs_device(),
    }))
}

struct Session {
    served: Arc<ServedDisk>,
    record: MountRecord,
    /// The record is in the registry.
    saved: bool,
    backend: Option<Backend>,
    /// Tells the kernel that the FUSE file changed (its size, on a grow).
    notifier: Option<fuser::Notifier>,
    /// FUSE threads outlived the unmount: requests may still land, so the
    /// image is flushed but left marked in use (the next mount checks it).
    late_requests: bool,
    finished: bool,
}

impl Session {
    fn save(&mut self) -> Result<()> {
        self.record.save().map_err(|e| {
            Error::io(
                format!("the mount record in {}", self.record.dir().display()),
                e,
            )
        })?;
        self.saved = true;
        Ok(())
    }

    /// Undo the kernel side: filesystem, device, FUSE mount. Safe to call
    /// again after a failure (a busy mount point, say).
    fn shutdown(&mut self) -> Result<()> {
        let Session {
            record,
            backend,
            late_requests,
            ..
        } = self;
        if let Some(m) = &record.mountpoint {
            // Only our filesystem: after a manual umount something else
            // may be mounted there.
            if let Some(dev) = record.fs_device() {
                if kernel::mounted_from(m).as_deref() == Some(dev) {
                    kernel::umount(m)?;
                }
            }
        }
        if let Some(p) = record.partition.as_mut() {
            if let Some(d) = &p.device {
                kernel::loop_detach(d)?;
                // It lets go of what it is over (the FUSE file or the NBD
                // device) asynchronously: wait, or their teardown fails.
                let under = match backend {
                    Some(Backend::Nbd(device)) => device.path().to_path_buf(),
                    _ => record.fuse_file.clone(),
                };
                kernel::wait_loop_released(d, &under, Duration::from_secs(10));
                p.device = None;
            }
        }
        let fuse_thread = match backend {
            None => return Ok(()),
            Some(Backend::Nbd(device)) => return Ok(device.detach()?),
            Some(Backend::Fuse(thread)) => thread,
        };
        if let Some(d) = &record.device {
            kernel::loop_detach(d)?;
        }
        let Some(fuse_thread) = fuse_thread.take() else {
            return Ok(());
        };
        // The loop device lets go of the file asynchronously.
        if let Some(d) = &record.device {
            kernel::wait_loop_released(d, &record.fuse_file, Duration::from_secs(10));
        }
        let mut tries = 0;
        loop {
            match kernel::umount_fuse(&record.fuse_file) {
                Ok(()) => break,
                Err(e) if tries < 100 => {
                    tries += 1;
                    if tries == 100 {
                        warn!("FUSE unmount: {e}");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    // Something still holds the file: detach lazily; the
                    // FUSE threads end when the last user lets go, or with us.
                    warn!("FUSE unmount kept failing ({e}); detaching lazily");
                    if let Err(e) = kernel::umount_lazy(&record.fuse_file) {
                        warn!("lazy FUSE unmount: {e}");
                    }
                    break;
                }
            }
        }
        let start = std::time::Instant::now();
        while !fuse_thread.is_finished() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !fuse_thread.is_finished() {
            warn!("FUSE threads still running after unmount; leaving them to exit with us");
            *late_requests = true;
            if let FuseServer::Ring(session, _) = fuse_thread {
                // The ring threads still use its /dev/fuse: never closed.
                std::mem::forget(session);
            }
            return Ok(());
        }
        match fuse_thread {
            FuseServer::Thread(t) => {
                if let Err(e) = t.join() {
                    error!("FUSE thread panicked: {e:?}");
                }
            }
            // Dropping the session lets go of /dev/fuse (the mount is gone).
            FuseServer::Ring(session, _) => drop(session),
        }
        Ok(())
    }

    /// Serving ended (the kernel side is gone): close the image, or only
    /// flush it if requests may still land, and drop the record.
    fn finish(mut self) -> Result<()> {
        self.finished = true;
        let closed = if self.late_requests {
            self.served.current().flush()
        } else {
            self.served.current().close()
        };
        registry::remove(&self.record);
        Ok(closed?)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let kernel_gone = match self.shutdown() {
            Ok(()) => true,
            Err(e) => {
                warn!("undoing a failed start: {e}");
                false
            }
        };
        let what = self.record.descriptor.display();
        if kernel_gone && !self.late_requests {
            if let Err(e) = self.served.current().close() {
                warn!("closing {what} after a failed start: {e}");
            }
        } else if let Err(e) = self.served.current().flush() {
            // Requests may still land: flushed, but left marked in use
            // (the next mount checks it).
            warn!("flushing {what} after a failed start: {e}");
        }
        // A device the kernel still has keeps its record: its daemon will
        // be gone, and `ploop umount` cleans up after dead daemons.
        if kernel_gone && self.saved {
            registry::remove(&self.record);
        }
    }
}

/// Answer the control requests any served disk takes, whatever exports
/// it (a mount or `ploop serve`): flush, merge, delete, and the change log
/// of `ploop copy`. None: not one of those.
pub fn disk_request(
    served: &ServedDisk,
    req: &Request,
    progress: &dyn Fn(u64, u64),
) -> Option<std::result::Result<Option<serde_json::Value>, String>> {
    Some(match req {
        Request::Flush => served
            .chain()
            .flush()
            .map(|_| None)
            .map_err(|e| e.to_string()),
        Request::TrackStart { owner } => track_start(served, *owner),
        Request::TrackTake => {
            let chain = served.current();
            if chain.dirty_log().is_on() {
                Ok(Some(json!({
                    "size": chain.virtual_size(),
                    "dirty": chain.dirty_log().take(),
                })))
            } else {
                Err("no copy of this disk is under way".to_string())
            }
        }
        Request::TrackStop => {
            served.current().dirty_log().stop();
            Ok(None)
        }
        Request::Merge { guid } => match guid.as_deref().map(parse_guid) {
            Some(None) => Err("incorrect uuid".to_string()),
            parsed => {
                online::merge_with_parent(served, parsed.flatten().unwrap_or(TOP_GUID), progress)
                    .map(|_| None)
                    .map_err(|e| e.to_string())
            }
        },
        Request::Delete { guid } => match parse_guid(guid) {
            None => Err("incorrect uuid".to_string()),
            Some(g) => online::delete(served, g, progress)
                .map(|_| None)
                .map_err(|e| e.to_string()),
        },
        _ => return None,
    })
}

/// An online snapshot as the control socket asks for it (GUIDs as
/// strings); what `freeze` returns (a mount's filesystem freeze) is held
/// around the switch to the new top.
pub fn snapshot_request<F>(
    served: &ServedDisk,
    uuid: Option<&str>,
    cbt: Option<&str>,
    freeze: impl FnOnce() -> Result<F>,
) -> std::result::Result<Option<serde_json::Value>, String> {
    // None: given, and not a GUID.
    let parse = |s: Option<&str>| s.map_or(Some(None), |s| parse_guid(s).map(Some));
    let (Some(uuid), Some(cbt)) = (parse(uuid), parse(cbt)) else {
        return Err("incorrect uuid".to_string());
    };
    let frozen = freeze().map_err(|e| e.to_string())?;
    let taken = online::snapshot(served, uuid, cbt);
    drop(frozen);
    taken
        .map(|g| Some(json!(guid_string(&g))))
        .map_err(|e| e.to_string())
}

/// Start recording changed clusters for a copy, and say what to send
/// first: every byte range some delta holds (read after the start, so a
/// cluster allocated meanwhile is in the ranges or in the next take).
fn track_start(
    served: &ServedDisk,
    owner: u32,
) -> std::result::Result<Option<serde_json::Value>, String> {
    let chain = served.current();
    if !chain.dirty_log().start(owner, registry::process_alive) {
        return Err("a copy of this disk is already under way".to_string());
    }
    let held = match chain.held_ranges() {
        Ok(held) => held,
        Err(e) => {
            chain.dirty_log().stop();
            return Err(e.to_string());
        }
    };
    Ok(Some(json!({
        "size": chain.virtual_size(),
        "cluster": chain.cluster_size(),
        "held": held,
    })))
}

/// The container's filesystem, frozen while the top delta is switched (so
/// the snapshot holds a consistent filesystem); thawed when dropped,
/// whatever happened meanwhile. Frozen here, when the switch is about to
/// happen, not by the caller: a request may wait behind a long merge.
struct Frozen(PathBuf);

impl Frozen {
    /// Freeze the filesystem mounted from our device, if it still is (a
    /// mount point someone unmounted by hand would freeze the filesystem
    /// holding it instead).
    fn if_mounted(record: &MountRecord) -> Result<Option<Frozen>> {
        let (Some(m), Some(dev)) = (&record.mountpoint, record.fs_device()) else {
            return Ok(None);
        };
        if kernel::mounted_from(m).as_deref() != Some(dev) {
            warn!(
                "{} is not mounted from {}: snapshot without freezing",
                m.display(),
                dev.display()
            );
            return Ok(None);
        }
        kernel::freeze(m)?;
        Ok(Some(Frozen(m.clone())))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = kernel::thaw(&self.0) {
            error!("thawing {}: {e}", self.0.display());
        }
    }
}

/// SIGTERM, SIGINT and SIGHUP ask the daemon to stop the way `ploop umount`
/// does (unmount, detach, close cleanly); if that fails (a busy mount
/// point), it keeps serving rather than leave a dead device behind.
/// Set when a signal asked the daemon to stop: a long operation under
/// way (compaction) stops at its next step, so the stop is answered.
fn stopping() -> &'static Arc<std::sync::atomic::AtomicBool> {
    static STOPPING: std::sync::OnceLock<Arc<std::sync::atomic::AtomicBool>> =
        std::sync::OnceLock::new();
    STOPPING.get_or_init(Arc::default)
}

/// SIGTERM, SIGINT and SIGHUP write to the returned socket (and set
/// [`stopping`]): the control loop polls it beside its listener and stops
/// as for a stop request, with no thread waiting for signals.
fn watch_signals() -> Option<std::os::unix::net::UnixStream> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let (read, write) = match std::os::unix::net::UnixStream::pair() {
        Ok(p) => p,
        Err(e) => {
            warn!("cannot watch signals: {e}");
            return None;
        }
    };
    let _ = write.set_nonblocking(true);
    let _ = read.set_nonblocking(true);
    for sig in [SIGTERM, SIGINT, SIGHUP] {
        let registered = signal_hook::flag::register(sig, stopping().clone()).and_then(|_| {
            write
                .try_clone()
                .and_then(|w| signal_hook::low_level::pipe::register(sig, w))
        });
        if let Err(e) = registered {
            warn!("cannot watch signal {sig}: {e}");
            return None;
        }
    }
    Some(read)
}

/// The daemon's log, beside the descriptor.
/// Where the daemon of view `id` logs: a folder root owns, never the
/// disk's folder (which a container's owner may control: a link there
/// named like the log would make root append to any file).
pub fn log_path(id: &str) -> PathBuf {
    registry::log_dir().join(format!("{id}.log"))
}

/// Open (create) a daemon's log for appending: in a root-owned folder,
/// made if needed, and never through a link.
pub fn open_log(id: &str) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = registry::log_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(&dir)?;
    let path = log_path(id);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)?;
    Ok((path, file))
}
