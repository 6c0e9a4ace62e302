//! Kernel-facing steps done with util-linux and friends: loop devices,
//! mounts, freeze/thaw, mkfs. Each failure carries the tool's own message.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

/// Where tools are looked for: the system's own folders, never the PATH
/// root inherited (a user's folder first in it would run that user's
/// `mount` as root).
pub const TOOL_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// The absolute path of `tool` in [`TOOL_PATH`].
pub fn tool_path(tool: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    TOOL_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(tool))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| Error::NotInstalled {
            tool: tool.to_string(),
            path: TOOL_PATH,
        })
}

/// A tool's command, found in [`TOOL_PATH`] and run with a clean
/// environment (no LD_PRELOAD, IFS or locale of the caller's).
fn command(tool: &str) -> Result<Command> {
    let mut cmd = Command::new(tool_path(tool)?);
    cmd.env_clear().env("PATH", TOOL_PATH).env("LC_ALL", "C");
    Ok(cmd)
}

/// Run a tool; on failure return "TOOL ARGS: stderr".
pub fn run(tool: &str, args: &[&str]) -> Result<String> {
    let out = command(tool)?
        .args(args)
        .output()
        .map_err(|err| Error::Spawn {
            tool: tool.to_string(),
            err,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(Error::Tool {
            tool: tool.to_string(),
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Attach a loop device with direct I/O to `file`; returns the device.
pub fn loop_attach(file: &Path, read_only: bool) -> Result<PathBuf> {
    loop_attach_range(file, read_only, None)
}

/// [`loop_attach`] to `len` bytes of `file` from `offset` (a partition).
pub fn loop_attach_range(
    file: &Path,
    read_only: bool,
    range: Option<(u64, u64)>,
) -> Result<PathBuf> {
    let mut args = vec![
        "-f".to_string(),
        "--show".to_string(),
        "--direct-io=on".to_string(),
    ];
    if read_only {
        args.push("-r".into());
    }
    if let Some((offset, len)) = range {
        args.extend([
            "-o".into(),
            offset.to_string(),
            "--sizelimit".into(),
            len.to_string(),
        ]);
    }
    args.push(s(file).to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("losetup", &args).map(PathBuf::from)
}

pub fn loop_detach(dev: &Path) -> Result<()> {
    run("losetup", &["-d", s(dev)]).map(|_| ())
}

/// Wait until a detached loop device no longer holds `file`.
pub fn wait_loop_released(dev: &Path, file: &Path, limit: std::time::Duration) {
    let Some(name) = dev.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let backing = format!("/sys/block/{name}/loop/backing_file");
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        match std::fs::read_to_string(&backing) {
            Ok(b) if Path::new(b.trim()) == file => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            _ => return,
        }
    }
}

/// Filesystem type on a device, if any.
pub fn fs_type(dev: &Path) -> Option<String> {
    run("blkid", &["-o", "value", "-s", "TYPE", s(dev)])
        .ok()
        .filter(|t| !t.is_empty())
}

/// A mount point, opened once: the mount lands on the directory opened,
/// whatever its name leads to by then (a swap for a link between a check
/// and the mount cannot move it).
pub struct MountPoint {
    fd: OwnedFd,
    path: PathBuf,
    /// Some folder on the way is root's and closed to others: only root
    /// can reach what gets mounted here.
    private: bool,
}

impl MountPoint {
    /// Open `path` (made absolute and resolved first) with no link in it,
    /// and check that no user but root can replace any folder on the way:
    /// each is root's and writable by no one else, or sticky with a
    /// root-owned entry for the next name.
    pub fn open(path: &Path) -> Result<MountPoint> {
        let refused = |what: String| Error::MountPoint {
            path: path.display().to_string(),
            what,
        };
        let real = path.canonicalize().map_err(|e| refused(e.to_string()))?;
        let resolve =
            rustix::fs::ResolveFlags::NO_SYMLINKS | rustix::fs::ResolveFlags::NO_MAGICLINKS;
        let flags =
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC;
        let fd = match rustix::fs::openat2(
            rustix::fs::CWD,
            &real,
            flags,
            rustix::fs::Mode::empty(),
            resolve,
        ) {
            Err(rustix::io::Errno::NOSYS) => rustix::fs::open(
                &real,
                flags | rustix::fs::OFlags::NOFOLLOW,
                rustix::fs::Mode::empty(),
            ),
            other => other,
        }
        .map_err(|e| {
            refused(format!(
                "{e} (it must be a directory, reached without links)"
            ))
        })?;
        let mut at = PathBuf::from("/");
        let mut private = false;
        for part in real.components().skip(1) {
            let Component::Normal(name) = part else {
                return Err(refused("not a plain path".into()));
            };
            let dir = std::fs::metadata(&at).map_err(|e| Error::io(at.display(), e))?;
            private |= dir.uid() == 0 && dir.mode() & 0o011 == 0;
            let next = at.join(name);
            let others_write = dir.uid() != 0 || dir.mode() & 0o022 != 0;
            if others_write {
                // A sticky folder keeps others from renaming root's entry,
                // but only if root owns the folder itself.
                let sticky = dir.uid() == 0 && dir.mode() & 0o1000 != 0;
                let entry =
                    std::fs::symlink_metadata(&next).map_err(|e| Error::io(next.display(), e))?;
                if !sticky || entry.uid() != 0 {
                    return Err(refused(format!(
                        "{} can be replaced by a user other than root (its folder {} is writable by uid {} or others): refused",
                        next.display(),
                        at.display(),
                        dir.uid()
                    )));
                }
            }
            at = next;
        }
        Ok(MountPoint {
            fd,
            path: real,
            private,
        })
    }

    /// The resolved path (for records and messages).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Mount `dev` on `mp`. The filesystem is the container owner's: its
/// setuid programs and device nodes must not serve users of the host. So
/// it gets nosuid and nodev (unless `opts` asks otherwise), but for a
/// read-write mount under a folder closed to all but root, where OpenVZ's
/// behaviour is kept (a container's root needs its setuid programs; OpenVZ
/// mounts them in /vz/root, mode 0700).
pub fn mount(dev: &Path, mp: &MountPoint, opts: &str, read_only: bool) -> Result<()> {
    let mut o = String::from(match (read_only, mp.private) {
        (true, _) => "ro,nosuid,nodev",
        (false, true) => "rw",
        (false, false) => "rw,nosuid,nodev",
    });
    if read_only && fs_type(dev).as_deref() == Some("xfs") {
        // A snapshot of a mounted xfs has the same UUID and a dirty log.
        o.push_str(",nouuid,norecovery");
    }
    if !opts.is_empty() {
        o.push(',');
        o.push_str(opts);
    }
    // mount(8) gets the opened directory as /proc/self/fd/N, which the
    // kernel resolves to that very directory; --no-canonicalize keeps
    // mount(8) from turning it back into a path. The descriptor is handed
    // down for this command (a child another thread starts meanwhile gets
    // it too: an O_PATH handle of a folder, which grants nothing).
    let target = format!("/proc/self/fd/{}", mp.fd.as_raw_fd());
    rustix::io::fcntl_setfd(mp.fd.as_fd(), rustix::io::FdFlags::empty())
        .map_err(|e| Error::io(mp.path.display(), e.into()))?;
    let done = run("mount", &["--no-canonicalize", "-o", &o, s(dev), &target]);
    let _ = rustix::io::fcntl_setfd(mp.fd.as_fd(), rustix::io::FdFlags::CLOEXEC);
    done.map(|_| ())
}

pub fn umount(dir: &Path) -> Result<()> {
    run("umount", &[s(dir)]).map(|_| ())
}

/// Put this thread, and the threads it starts from now on, in the block
/// I/O path (PR_SET_IO_FLUSHER, Linux 5.6+): their allocations never wait
/// for I/O. A daemon serving the device under a mounted filesystem needs
/// it: memory reclaim may write that filesystem's dirty pages back through
/// us, and must not wait for us while we wait for memory.
pub fn become_io_flusher() -> std::io::Result<()> {
    rustix::process::configure_io_flusher_behavior(true).map_err(Into::into)
}

/// Unmount our FUSE file with umount(2) directly (EBUSY while a loop
/// device still holds it).
pub fn umount_fuse(path: &Path) -> std::io::Result<()> {
    rustix::mount::unmount(path, rustix::mount::UnmountFlags::empty()).map_err(Into::into)
}

/// Lazy unmount, for a FUSE file whose daemon is gone.
pub fn umount_lazy(path: &Path) -> Result<()> {
    run("umount", &["-l", s(path)]).map(|_| ())
}

pub fn freeze(dir: &Path) -> Result<()> {
    run("fsfreeze", &["-f", s(dir)]).map(|_| ())
}

pub fn thaw(dir: &Path) -> Result<()> {
    run("fsfreeze", &["-u", s(dir)]).map(|_| ())
}

/// Check a filesystem before it is mounted (`mount -F`): `e2fsck -p`
/// (what it can fix unattended) for ext2/3/4, `xfs_repair` for XFS (which
/// refuses a dirty log rather than zero it); `-n` for both on a read-only
/// device. Problems left unfixed are an error.
pub fn fsck(dev: &Path, read_only: bool) -> Result<()> {
    let fstype = fs_type(dev).unwrap_or_default();
    let (tool, mut args): (&str, Vec<&str>) = match fstype.as_str() {
        "ext2" | "ext3" | "ext4" => ("e2fsck", vec![if read_only { "-n" } else { "-p" }]),
        "xfs" => ("xfs_repair", if read_only { vec!["-n"] } else { vec![] }),
        "" => {
            return Err(Error::Refused(format!(
                "{}: no filesystem found to check",
                dev.display()
            )))
        }
        other => {
            return Err(Error::Refused(format!(
                "{}: cannot check a {other} filesystem",
                dev.display()
            )))
        }
    };
    args.push(s(dev));
    let out = command(tool)?
        .args(&args)
        .output()
        .map_err(|err| Error::Spawn {
            tool: tool.to_string(),
            err,
        })?;
    // e2fsck: 1 and 2 mean errors were fixed; 4 and up, left or failed.
    let code = out.status.code().unwrap_or(8);
    let fixed_only = tool == "e2fsck" && code < 4;
    if out.status.success() || fixed_only {
        return Ok(());
    }
    Err(Error::Tool {
        tool: tool.to_string(),
        args: args.join(" "),
        stderr: format!(
            "exit code {code}: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        ),
    })
}

/// Discard a mounted filesystem's free blocks (the disk gives them back);
/// returns fstrim's report.
pub fn fstrim(mountpoint: &Path, minimum: Option<u64>) -> Result<String> {
    match minimum {
        Some(m) => run(
            "fstrim",
            &["-v", "--minimum", &m.to_string(), s(mountpoint)],
        ),
        None => run("fstrim", &["-v", s(mountpoint)]),
    }
}

/// Grow a mounted XFS filesystem to fill its device.
pub fn grow_xfs(mountpoint: &Path) -> Result<()> {
    run("xfs_growfs", &[s(mountpoint)]).map(|_| ())
}

/// The smallest an unmounted ext2/3/4 filesystem can be shrunk to, in
/// bytes (`resize2fs -P`'s estimate, in its own blocks).
pub fn ext_min_size(dev: &Path) -> Result<u64> {
    let out = run("resize2fs", &["-P", s(dev)])?;
    let blocks: u64 = out
        .lines()
        .find_map(|l| l.split("minimum size of the filesystem:").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| Error::Tool {
            tool: "resize2fs".into(),
            args: format!("-P {}", dev.display()),
            stderr: format!("no estimate in: {out}"),
        })?;
    let info = run("dumpe2fs", &["-h", s(dev)])?;
    let block: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| Error::Tool {
            tool: "dumpe2fs".into(),
            args: format!("-h {}", dev.display()),
            stderr: "no block size".into(),
        })?;
    Ok(blocks * block)
}

/// An ext2/3/4 filesystem's size in bytes, from its superblock
/// (`dumpe2fs -h`; it may be mounted).
pub fn ext_size(dev: &Path) -> Result<u64> {
    let info = run("dumpe2fs", &["-h", s(dev)])?;
    let field = |name: &str| -> Result<u64> {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| Error::Tool {
                tool: "dumpe2fs".into(),
                args: format!("-h {}", dev.display()),
                stderr: format!("no {name:?}"),
            })
    };
    Ok(field("Block count:")? * field("Block size:")?)
}

/// Resize an unmounted ext2/3/4 filesystem to `bytes` (None: to fill its
/// device): checked first (`e2fsck -f -p`, which resize2fs requires),
/// then `resize2fs`. Offline because growing a mounted ext4 needs
/// CAP_SYS_RESOURCE, which containers (and these test machines) drop.
pub fn resize_ext(dev: &Path, bytes: Option<u64>) -> Result<()> {
    let out = command("e2fsck")?
        .args(["-f", "-p", s(dev)])
        .output()
        .map_err(|err| Error::Spawn {
            tool: "e2fsck".into(),
            err,
        })?;
    if out.status.code().unwrap_or(8) >= 4 {
        return Err(Error::Tool {
            tool: "e2fsck".into(),
            args: format!("-f -p {}", dev.display()),
            stderr: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        });
    }
    match bytes {
        Some(b) => run("resize2fs", &[s(dev), &format!("{}K", b / 1024)]),
        None => run("resize2fs", &[s(dev)]),
    }
    .map(|_| ())
}

/// How [`mkfs`] makes a filesystem.
#[derive(Clone, Debug, Default)]
pub struct MkfsOptions {
    /// Block size in bytes (the tool's default without).
    pub block_size: Option<u32>,
    pub label: Option<String>,
    /// ext3/ext4: initialise inode tables and journal now, not lazily in
    /// the background after the first mount.
    pub no_lazy: bool,
}

/// Make a filesystem on a device (ext4, ext3 or xfs), quietly.
pub fn mkfs(dev: &Path, fstype: &str, o: &MkfsOptions) -> Result<()> {
    let mut args: Vec<String> = Vec::new();
    let tool = match fstype {
        "ext4" | "ext3" => {
            args.extend(["-q".into(), "-F".into()]);
            if let Some(b) = o.block_size {
                args.extend(["-b".into(), b.to_string()]);
            }
            if o.no_lazy {
                args.extend(["-E".into(), "lazy_itable_init=0,lazy_journal_init=0".into()]);
            }
            format!("mkfs.{fstype}")
        }
        "xfs" => {
            args.extend(["-q".into(), "-f".into()]);
            if let Some(b) = o.block_size {
                args.extend(["-b".into(), format!("size={b}")]);
            }
            "mkfs.xfs".to_string()
        }
        other => {
            return Err(Error::Refused(format!(
                "unsupported filesystem type {other} (ext4, ext3 or xfs)"
            )))
        }
    };
    if let Some(l) = &o.label {
        args.extend(["-L".into(), l.clone()]);
    }
    args.push(s(dev).to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&tool, &args).map(|_| ())
}

/// Whether `path` is a mount point (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|m| Path::new(&unescape_mount(m)) == want)
    })
}

/// What is mounted at `path` (the device or source the mount table
/// names), if anything.
pub fn mounted_from(path: &Path) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    // The last mount at a path hides the ones below it.
    info.lines().rev().find_map(|l| {
        let (fields, fs) = l.split_once(" - ")?;
        let at = fields.split(' ').nth(4)?;
        if Path::new(&unescape_mount(at)) != want {
            return None;
        }
        fs.split(' ')
            .nth(1)
            .map(|src| PathBuf::from(unescape_mount(src)))
    })
}

/// Where device `dev` is mounted (the first mount of it), if anywhere.
pub fn mount_of(dev: &Path) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (fields, fs) = l.split_once(" - ")?;
        let src = fs.split(' ').nth(1)?;
        (Path::new(&unescape_mount(src)) == dev)
            .then(|| {
                fields
                    .split(' ')
                    .nth(4)
                    .map(|m| PathBuf::from(unescape_mount(m)))
            })
            .flatten()
    })
}

fn unescape_mount(m: &str) -> String {
    m.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ploop_test_support::has_sys_resource;

    /// With CAP_SYS_RESOURCE the daemon's threads are I/O flushers;
    /// without it (some sandboxes drop it, even for root) the call fails
    /// for exactly that reason, and the daemon goes on.
    #[test]
    fn threads_started_by_an_io_flusher_are_io_flushers() {
        match become_io_flusher() {
            Ok(()) => {
                let inherited = std::thread::spawn(rustix::process::is_io_flusher)
                    .join()
                    .unwrap()
                    .unwrap();
                assert!(inherited);
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
                assert!(!has_sys_resource(), "EPERM with CAP_SYS_RESOURCE");
            }
        }
    }
}
