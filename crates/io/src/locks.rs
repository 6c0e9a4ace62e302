//! The locks OpenVZ's tools take, so that they and ours exclude each
//! other, and who holds a lock (for messages that name a process).
//!
//! OpenVZ 7 takes `flock` on `DiskDescriptor.xml.lck` for each operation;
//! we take the same lock the same way. OpenVZ 9 (its lib/lock.c since
//! 8.0.59) takes POSIX record locks on the base delta instead: a read
//! lock on bytes 200..205 for every operation, and on 300..305 for long
//! ones, and finds holders with F_GETLK for a write lock over them. We
//! probe those ranges before changing or serving a disk, and a daemon of
//! ours holds the read lock on 200..205 while it serves one, so that
//! OpenVZ 9 sees the disk as in use ("Already locked by pid N").

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use nix::fcntl::{fcntl, FcntlArg};

/// OpenVZ 9's lock of every operation: bytes 200..205 of the base delta.
pub const OPENVZ_LOCK: (i64, i64) = (200, 5);
/// OpenVZ 9's lock of long operations: bytes 300..305.
pub const OPENVZ_LONG_LOCK: (i64, i64) = (300, 5);

fn flock_struct(kind: libc::c_short, (start, len): (i64, i64)) -> libc::flock {
    libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: len,
        l_pid: 0,
    }
}

/// The process holding a lock that conflicts with a write lock over
/// `range` of `file` (a POSIX or OFD record lock; OFD locks have no
/// process: -1). Locks this process holds itself through POSIX calls are
/// not seen (the kernel's rule).
pub fn range_holder(file: &File, range: (i64, i64)) -> io::Result<Option<i32>> {
    let mut fl = flock_struct(libc::F_WRLCK as libc::c_short, range);
    fcntl(file.as_fd(), FcntlArg::F_GETLK(&mut fl)).map_err(io::Error::from)?;
    Ok((fl.l_type != libc::F_UNLCK as libc::c_short).then_some(fl.l_pid))
}

/// Who holds OpenVZ 9's locks on this base delta, if anyone: the first
/// holder of the operation lock or the long-operation lock.
pub fn openvz_holder(base: &File) -> io::Result<Option<i32>> {
    for range in [OPENVZ_LONG_LOCK, OPENVZ_LOCK] {
        if let Some(pid) = range_holder(base, range)? {
            return Ok(Some(pid));
        }
    }
    Ok(None)
}

/// OpenVZ 9's read lock on bytes 200..205 of a base delta, held as long
/// as this lives. A POSIX lock, as OpenVZ takes it, so that its F_GETLK
/// names our process; the kernel drops such a lock when the process
/// closes any descriptor of the file, so a holder that may have done so
/// calls [`RangeReadLock::reassert`].
pub struct RangeReadLock {
    file: File,
}

impl RangeReadLock {
    pub fn take(file: File) -> io::Result<Self> {
        let lock = Self { file };
        lock.reassert()?;
        Ok(lock)
    }

    /// Take the lock again (a no-op while it is still held).
    pub fn reassert(&self) -> io::Result<()> {
        let fl = flock_struct(libc::F_RDLCK as libc::c_short, OPENVZ_LOCK);
        fcntl(self.file.as_fd(), FcntlArg::F_SETLK(&fl))
            .map(|_| ())
            .map_err(io::Error::from)
    }
}

/// Processes holding a `flock` on `file` ("FLOCK" lines of /proc/locks
/// for its device and inode). Empty where /proc/locks cannot be read.
pub fn flock_holders(file: &File) -> Vec<u32> {
    let Ok(meta) = file.metadata() else {
        return Vec::new();
    };
    let dev = meta.dev();
    let want = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    let Ok(text) = std::fs::read_to_string("/proc/locks") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for line in text.lines() {
        // "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; blocked
        // waiters are listed with "->" and hold nothing.
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 6 && f[1] == "FLOCK" && f[5] == want {
            if let Ok(pid) = f[4].parse() {
                pids.push(pid);
            }
        }
    }
    pids
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_range_read_lock_is_seen_by_a_write_probe() {
        let path = std::env::temp_dir().join(format!("ploop-locks-{}", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&[0; 4096])
            .unwrap();
        // The same process does not see its own POSIX locks: probe from a
        // child, as OpenVZ's tool would.
        let held = RangeReadLock::take(File::open(&path).unwrap()).unwrap();
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import fcntl,struct,sys\n\
                 f=open(sys.argv[1],'rb')\n\
                 r=fcntl.fcntl(f.fileno(),fcntl.F_GETLK,struct.pack('hhqqi4x',fcntl.F_WRLCK,0,200,5,0))\n\
                 print(struct.unpack('hhqqi4x',r)[4])",
                path.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            std::process::id().to_string(),
            "the holder is named: {out:?}"
        );
        drop(held);
        // A flock shows up in /proc/locks with its process.
        let f = File::open(&path).unwrap();
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).unwrap();
        assert_eq!(flock_holders(&f), vec![std::process::id()]);
        let _ = std::fs::remove_file(&path);
    }
}
