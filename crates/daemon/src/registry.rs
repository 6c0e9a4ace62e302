//! What is mounted: one folder per served disk under /run/ploop (or
//! $PLOOP_RUN_DIR), holding the FUSE file, the control socket and a
//! state record.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where daemons log: /var/log/ploop (or $PLOOP_LOG_DIR).
pub fn log_dir() -> PathBuf {
    std::env::var_os("PLOOP_LOG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/log/ploop"))
}

pub fn run_dir() -> PathBuf {
    std::env::var_os("PLOOP_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/ploop"))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountRecord {
    pub id: String,
    /// Canonical path of the DiskDescriptor.xml.
    pub descriptor: PathBuf,
    /// Braced GUID of the delta the served chain ends at.
    pub guid: String,
    pub read_only: bool,
    pub pid: u32,
    pub fuse_file: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// The whole virtual disk.
    pub device: Option<PathBuf>,
    /// Where the filesystem is when the disk has a partition table.
    #[serde(default)]
    pub partition: Option<PartitionRecord>,
    pub mountpoint: Option<PathBuf>,
    /// The disk's I/O limits (none set: unlimited).
    #[serde(default)]
    pub limits: LimitsRecord,
    /// The cgroup the daemon was put in, if one was asked for.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
}

/// A disk's I/O limits, as records and the control socket carry them.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LimitsRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_burst: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_burst: Option<u64>,
}

impl From<LimitsRecord> for ploop_image::throttle::Limits {
    fn from(l: LimitsRecord) -> Self {
        Self {
            iops: l.iops,
            bps: l.bps,
            iops_burst: l.iops_burst,
            bps_burst: l.bps_burst,
        }
    }
}

/// Partition 1 of a served disk with a GPT, reached as a loop device over
/// its byte range (the kernel here may have no partition support).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartitionRecord {
    pub number: u32,
    /// First byte on the virtual disk.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    pub device: Option<PathBuf>,
}

impl MountRecord {
    pub fn dir(&self) -> PathBuf {
        run_dir().join(&self.id)
    }

    /// The device holding the filesystem: partition 1's where the disk
    /// has a partition table, the whole disk's otherwise.
    pub fn fs_device(&self) -> Option<&Path> {
        match &self.partition {
            Some(p) => p.device.as_deref(),
            None => self.device.as_deref(),
        }
    }

    /// Whether the daemon recorded still serves: it holds its view's lock
    /// for its whole life, and nothing else holds that lock but for an
    /// instant (this probe). A process that merely reuses the pid holds
    /// no such lock.
    pub fn daemon_alive(&self) -> bool {
        lock_held(&lock_path(&self.id))
    }

    /// Write the record atomically.
    pub fn save(&self) -> std::io::Result<()> {
        let dir = self.dir();
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join("state.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, dir.join("state.json"))
    }
}

/// Whether a process runs (a zombie does not).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Stable id for a served view of a disk.
pub fn id_for(descriptor: &Path, guid: &str, read_only: bool) -> String {
    // FNV-1a: short, stable, no dependency.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in descriptor
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .chain(guid.as_bytes())
        .chain([read_only as u8].iter())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}

fn lock_path(id: &str) -> PathBuf {
    run_dir().join(format!("{id}.lock"))
}

/// The lock of one served view, held for a daemon's life; its file is
/// removed when it is let go (while still held, so that the next daemon
/// locks a file of its own).
pub struct ViewLock {
    /// Held open (and locked) until the lock is let go.
    _file: std::fs::File,
    path: PathBuf,
}

impl Drop for ViewLock {
    fn drop(&mut self) {
        // Removed while still held (the file closes after this).
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Take the lock of one served view (`<run dir>/<id>.lock`).
pub fn lock_view(id: &str) -> std::io::Result<ViewLock> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    std::fs::create_dir_all(run_dir())?;
    let path = lock_path(id);
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        // A probe (lock_held) holds it shared for an instant: try again
        // briefly before calling it taken.
        let mut tries = 0;
        while let Err(e) =
            rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        {
            tries += 1;
            if e != rustix::io::Errno::WOULDBLOCK || tries > 20 {
                return Err(e.into());
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // A daemon that let go of this name may have removed it after we
        // opened it: the lock counts only on the file the name leads to.
        let here = file.metadata()?;
        match std::fs::symlink_metadata(&path) {
            Ok(now) if now.dev() == here.dev() && now.ino() == here.ino() => {
                return Ok(ViewLock { _file: file, path })
            }
            _ => continue,
        }
    }
}

/// Whether someone holds the flock of `path`: tried for a shared lock
/// without waiting, and let go at once if it was free.
fn lock_held(path: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    else {
        return false;
    };
    matches!(
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared),
        Err(rustix::io::Errno::WOULDBLOCK)
    )
}

/// Every record on this machine.
pub fn all() -> Vec<MountRecord> {
    let Ok(entries) = std::fs::read_dir(run_dir()) else {
        return Vec::new();
    };
    let mut out: Vec<MountRecord> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path().join("state.json")).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    // A disk `ploop serve` exported (no FUSE file, no device, no mount)
    // whose process is gone left nothing in the kernel to clean up: its
    // record goes when seen (a killed server cannot remove it itself).
    out.retain(|r: &MountRecord| {
        let stale = r.fuse_file.as_os_str().is_empty()
            && r.device.is_none()
            && r.mountpoint.is_none()
            && !r.daemon_alive();
        if stale {
            remove(r);
        }
        !stale
    });
    out.sort_by(|a, b| a.descriptor.cmp(&b.descriptor).then(a.id.cmp(&b.id)));
    out
}

/// Forget a record, and the lock file of its view unless a daemon holds it.
pub fn remove(rec: &MountRecord) {
    let _ = std::fs::remove_dir_all(rec.dir());
    // Taken and let go: its file goes with it.
    drop(lock_view(&rec.id));
}
