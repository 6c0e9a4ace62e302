//! The kernel's NBD client as the device under a mount (`ploop mount
//! --nbd`), for hosts that have the nbd module: the daemon claims a free
//! /dev/nbdN, hands it one end of a few socket pairs (NBD_SET_SOCK) and
//! serves the other ends with the NBD server's transmission phase. Nothing
//! goes through FUSE or a loop device.
//!
//! The ioctl interface is the one nbd-client uses without netlink; a thread
//! sits in NBD_DO_IT for as long as the device is connected.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::transmission::{Pool, Shared};
use crate::{self as nbd, Export};

// include/uapi/linux/nbd.h: _IO(0xab, n).
const NBD_SET_SOCK: u64 = 0xab00;
const NBD_SET_BLKSIZE: u64 = 0xab01;
const NBD_SET_SIZE: u64 = 0xab02;
const NBD_DO_IT: u64 = 0xab03;
const NBD_CLEAR_SOCK: u64 = 0xab04;
const NBD_CLEAR_QUE: u64 = 0xab05;
const NBD_DISCONNECT: u64 = 0xab08;
const NBD_SET_TIMEOUT: u64 = 0xab09;
const NBD_SET_FLAGS: u64 = 0xab0a;

/// The kernel's timeout for one request, in seconds. Its default (blk-mq's
/// 30 s) marks a connection dead when one request takes longer (a long
/// flush or discard); ioctl-made connections are never replaced, so the
/// device would end up failing all I/O. A daemon that dies closes its
/// sockets, which fails I/O at once, whatever this says.
const REQUEST_TIMEOUT_S: u64 = 24 * 3600;

/// How long the kernel gets to bring a configured device up.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// One nbd ioctl with an integer argument.
fn ioctl(fd: RawFd, request: u64, arg: u64) -> io::Result<()> {
    // SAFETY: the nbd ioctls used here take their argument by value (an
    // integer or a file descriptor), never as a pointer into our memory.
    let r = unsafe { libc::ioctl(fd, request as _, arg as libc::c_ulong) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether a device path names an nbd device (not a loop device).
pub fn is_nbd(dev: &Path) -> bool {
    dev.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("nbd"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The nbd devices this kernel has, in numeric order.
fn devices() -> Vec<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n: u32 = name.strip_prefix("nbd")?.parse().ok()?;
            Some((n, Path::new("/dev").join(name)))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

fn sys_dir(dev: &Path) -> PathBuf {
    Path::new("/sys/block").join(dev.file_name().unwrap_or_default())
}

/// A connected device: its server threads and the thread in NBD_DO_IT.
pub struct NbdDevice {
    path: PathBuf,
    file: Arc<File>,
    running: Option<JoinHandle<io::Result<()>>>,
    servers: Vec<JoinHandle<()>>,
}

/// Why the kernel's NBD client could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no nbd devices (/sys/block/nbd*): the kernel's nbd module is not loaded \
         (try `modprobe nbd`), or this kernel has none; mount without --nbd uses \
         FUSE and a loop device"
    )]
    NoModule,
    #[error("every nbd device is in use")]
    AllInUse,
    #[error("the disk has no size")]
    Empty,
    /// A device, or the threads serving it.
    #[error("{what}: {err}")]
    Io {
        what: String,
        #[source]
        err: io::Error,
    },
}

impl NbdDevice {
    /// Claim a free nbd device and connect it to `export` over
    /// `connections` socket pairs.
    pub fn attach(
        export: Arc<Export>,
        connections: usize,
        threads: usize,
        uring: bool,
    ) -> Result<NbdDevice, Error> {
        let candidates = devices();
        if candidates.is_empty() {
            return Err(Error::NoModule);
        }
        if export.size() == 0 {
            return Err(Error::Empty);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let pool = Pool::new(threads).map_err(|err| Error::Io {
            what: "NBD worker threads".into(),
            err,
        })?;
        let shared = Shared::new(Box::new(pool), uring && nbd::uring_works(), stop);
        for dev in candidates {
            // A connected device shows the thread in its NBD_DO_IT (its
            // `pid` file), until its last user closes it.
            if sys_dir(&dev).join("pid").exists() {
                continue;
            }
            match Self::try_claim(&dev, &export, connections.max(1), &shared) {
                Ok(Some(d)) => return Ok(d),
                Ok(None) => continue,
                // Gone meanwhile, or set up through netlink.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOENT | libc::ENXIO | libc::ENODEV)
                    ) =>
                {
                    continue
                }
                Err(err) => {
                    return Err(Error::Io {
                        what: dev.display().to_string(),
                        err,
                    })
                }
            }
        }
        Err(Error::AllInUse)
    }

    /// Ok(None): another process is setting this device up.
    fn try_claim(
        dev: &Path,
        export: &Arc<Export>,
        connections: usize,
        shared: &Arc<Shared>,
    ) -> io::Result<Option<NbdDevice>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(dev)?;
        let fd = file.as_raw_fd();
        let mut servers = Vec::with_capacity(connections);
        for i in 0..connections {
            let (ours, kernels) = UnixStream::pair()?;
            match ioctl(fd, NBD_SET_SOCK, kernels.as_raw_fd() as u64) {
                Ok(()) => {}
                // Set up by another task, connected meanwhile, or bound
                // through netlink.
                Err(e)
                    if i == 0 && matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EINVAL)) =>
                {
                    return Ok(None)
                }
                Err(e) => {
                    let _ = ioctl(fd, NBD_CLEAR_SOCK, 0);
                    return Err(io::Error::new(e.kind(), format!("NBD_SET_SOCK: {e}")));
                }
            }
            // The kernel holds its own reference to `kernels` now.
            let (export, shared) = (export.clone(), shared.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-dev-{i}"))
                .spawn(move || {
                    if let Err(e) = nbd::serve_kernel_socket(ours, &export, &shared) {
                        debug!("nbd connection {i}: {e}");
                    }
                });
            match spawned {
                Ok(h) => servers.push(h),
                Err(e) => {
                    let _ = ioctl(fd, NBD_CLEAR_SOCK, 0);
                    return Err(e);
                }
            }
        }
        let size = export.size();
        // 512-byte sectors, as the loop device has: a filesystem or
        // partition table made there must be found here too (the kernel
        // sets both logical and physical block sizes to this).
        let block = 512;
        let configured = ioctl(fd, NBD_SET_BLKSIZE, block)
            .and_then(|()| ioctl(fd, NBD_SET_SIZE, size))
            .and_then(|()| ioctl(fd, NBD_SET_FLAGS, u64::from(nbd::kernel_flags(export))))
            .and_then(|()| ioctl(fd, NBD_SET_TIMEOUT, REQUEST_TIMEOUT_S));
        if let Err(e) = configured {
            let _ = ioctl(fd, NBD_CLEAR_SOCK, 0);
            return Err(io::Error::new(e.kind(), format!("configuring: {e}")));
        }
        let file = Arc::new(file);
        let in_kernel = file.clone();
        let running = std::thread::Builder::new()
            .name("nbd-do-it".into())
            .spawn(move || {
                block_signals();
                let fd = in_kernel.as_raw_fd();
                // Returns once the device is disconnected.
                let r = ioctl(fd, NBD_DO_IT, 0);
                let _ = ioctl(fd, NBD_CLEAR_QUE, 0);
                let _ = ioctl(fd, NBD_CLEAR_SOCK, 0);
                r
            })?;
        let mut device = NbdDevice {
            path: dev.to_path_buf(),
            file,
            running: Some(running),
            servers,
        };
        device.wait_started()?;
        info!("{} connected ({connections} connection(s))", dev.display());
        Ok(Some(device))
    }

    /// Wait until the kernel shows the device's size.
    fn wait_started(&mut self) -> io::Result<()> {
        let size_file = sys_dir(&self.path).join("size");
        let start = Instant::now();
        loop {
            let sectors: u64 = std::fs::read_to_string(&size_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            if sectors > 0 {
                return Ok(());
            }
            if self.running.as_ref().is_some_and(|h| h.is_finished()) {
                let r = self.running.take().map(|h| h.join());
                return Err(match r {
                    Some(Ok(Err(e))) => io::Error::new(e.kind(), format!("NBD_DO_IT: {e}")),
                    _ => io::Error::other("NBD_DO_IT ended at once"),
                });
            }
            if start.elapsed() > START_TIMEOUT {
                let _ = self.detach();
                return Err(io::Error::other("the device did not come up"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Disconnect the device (the filesystem on it must be unmounted) and
    /// wait for its connections to end.
    pub fn detach(&mut self) -> Result<(), Error> {
        // Writes to the device itself (a device-only mount) may sit in its
        // page cache: after the disconnect they could only fail.
        if let Err(e) = self.file.sync_all() {
            warn!(
                "{}: flushing before the disconnect: {e}",
                self.path.display()
            );
        }
        let fd = self.file.as_raw_fd();
        if let Err(e) = ioctl(fd, NBD_DISCONNECT, 0) {
            warn!("{}: NBD_DISCONNECT: {e}", self.path.display());
        }
        if let Some(h) = self.running.take() {
            match h.join() {
                Ok(Ok(())) => {}
                // A disconnect ends NBD_DO_IT with an error on some kernels.
                Ok(Err(e)) => debug!("NBD_DO_IT: {e}"),
                Err(_) => warn!("the NBD_DO_IT thread panicked"),
            }
        }
        for h in self.servers.drain(..) {
            let _ = h.join();
        }
        Ok(())
    }
}

/// NBD_DO_IT returns when its thread takes a signal, tearing the device
/// down under a mounted filesystem: the daemon's signal handlers (SIGTERM
/// asks for a clean stop) must run on other threads.
fn block_signals() {
    // SAFETY: sigset_t is plain data, and all zeros is a valid (empty) set.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigfillset writes only the set it is given (a local); it
    // cannot fail for a valid pointer.
    unsafe { libc::sigfillset(&mut all) };
    // SAFETY: pthread_sigmask changes only this thread's mask and reads
    // the set we pass.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut()) };
    if rc != 0 {
        warn!(
            "blocking signals on the NBD thread: {}; a signal may tear the device down",
            std::io::Error::from_raw_os_error(rc)
        );
    }
}

/// Let go of a device whose daemon is gone. The kernel shut its sockets
/// down when the daemon died, and frees the device at its last close (the
/// filesystem's unmount, say): this only clears one whose owner is dead
/// and which someone still holds open. A device that another daemon owns
/// by now (its sysfs `pid`, the thread in NBD_DO_IT, is alive) is left
/// alone.
pub fn disconnect(dev: &Path) -> Result<(), Error> {
    let Ok(owner) = std::fs::read_to_string(sys_dir(dev).join("pid")) else {
        return Ok(()); // not connected any more
    };
    let owner_alive = owner
        .trim()
        .parse::<u32>()
        .is_ok_and(|tid| Path::new(&format!("/proc/{tid}")).exists());
    if owner_alive {
        return Ok(());
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|err| Error::Io {
            what: dev.display().to_string(),
            err,
        })?;
    let fd = file.as_raw_fd();
    let _ = ioctl(fd, NBD_DISCONNECT, 0);
    ioctl(fd, NBD_CLEAR_SOCK, 0).map_err(|err| Error::Io {
        what: format!("{}: NBD_CLEAR_SOCK", dev.display()),
        err,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_device_names_are_told_from_loop_devices() {
        assert!(is_nbd(Path::new("/dev/nbd0")));
        assert!(is_nbd(Path::new("/dev/nbd15")));
        assert!(!is_nbd(Path::new("/dev/loop0")));
        assert!(!is_nbd(Path::new("/dev/nbd")));
        assert!(!is_nbd(Path::new("/dev/nbd0p1")));
    }
}
