//! The locks OpenVZ's tools take, so that they and ours exclude each
//! other, and who holds a lock (for messages that name a process).
//!
//! OpenVZ 7 takes `flock` on `DiskDescriptor.xml.lck` for each operation;
//! we take the same lock the same way. OpenVZ 9 (its lib/lock.c since
//! 8.0.59) takes POSIX record locks on the base delta instead: a read
//! lock on bytes 200..205 for every operation, and on 300..305 for long
//! ones, and finds holders with F_GETLK for a write lock over them. We
//! hold the read lock on 200..205 for every operation and for as long as
//! a daemon serves the disk, and probe both ranges after taking it, so
//! each side sees the other ("Already locked by pid -1" on OpenVZ's side:
//! ours is an open file description lock; see [`OfdReadLock`]).

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

/// OpenVZ 9's read lock on bytes 200..205 of a base delta, held as long
/// as this lives, as an open file description lock: unlike a POSIX lock
/// (what OpenVZ takes), it is not dropped when this process closes some
/// other descriptor of the file, which the daemon's merges and our own
/// probes do. OpenVZ's F_GETLK still sees it (as pid -1).
pub struct OfdReadLock {
    file: File,
}

impl OfdReadLock {
    /// Take the lock on `file` (opened for reading).
    pub fn take(file: File) -> io::Result<Self> {
        let fl = flock_struct(libc::F_RDLCK as libc::c_short, OPENVZ_LOCK);
        fcntl(file.as_fd(), FcntlArg::F_OFD_SETLK(&fl)).map_err(io::Error::from)?;
        Ok(Self { file })
    }

    /// Who else holds OpenVZ's locks: a conflict with a write lock over
    /// the operation or long-operation range, from any other process or
    /// open file description (not this lock itself). The pid is -1 for
    /// an open file description lock.
    pub fn others(&self) -> io::Result<Option<i32>> {
        for range in [OPENVZ_LONG_LOCK, OPENVZ_LOCK] {
            let mut fl = flock_struct(libc::F_WRLCK as libc::c_short, range);
            fcntl(self.file.as_fd(), FcntlArg::F_OFD_GETLK(&mut fl)).map_err(io::Error::from)?;
            if fl.l_type != libc::F_UNLCK as libc::c_short {
                return Ok(Some(fl.l_pid));
            }
        }
        Ok(None)
    }

    /// The locked file.
    pub fn file(&self) -> &File {
        &self.file
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
    fn an_ofd_read_lock_is_seen_by_openvz_probe_and_kept_across_closes() {
        let path = std::env::temp_dir().join(format!("ploop-locks-{}", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&[0; 4096])
            .unwrap();
        let held = OfdReadLock::take(File::open(&path).unwrap()).unwrap();
        // Closing another descriptor of the file keeps it (a POSIX lock
        // would be gone now).
        drop(File::open(&path).unwrap());
        let probe = |start: u64| {
            std::process::Command::new("python3")
                .args([
                    "-c",
                    "import fcntl,struct,sys\n\
                     f=open(sys.argv[1],'rb')\n\
                     r=struct.unpack('hhqqi4x',fcntl.fcntl(f.fileno(),fcntl.F_GETLK,struct.pack('hhqqi4x',fcntl.F_WRLCK,0,int(sys.argv[2]),5,0)))\n\
                     print(r[0]!=fcntl.F_UNLCK, r[4])",
                    path.to_str().unwrap(),
                    &start.to_string(),
                ])
                .output()
                .unwrap()
        };
        let out = probe(200);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "True -1",
            "{out:?}"
        );
        assert_eq!(
            held.others().unwrap(),
            None,
            "its own lock is not another's"
        );
        // A second holder in this process is seen, as a lock of its own.
        let second = OfdReadLock::take(File::open(&path).unwrap()).unwrap();
        assert_eq!(held.others().unwrap(), Some(-1));
        drop(second);
        drop(held);
        let out = probe(200);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "False 0",
            "{out:?}"
        );
        // A flock shows up in /proc/locks with its process.
        let f = File::open(&path).unwrap();
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).unwrap();
        assert_eq!(flock_holders(&f), vec![std::process::id()]);
        let _ = std::fs::remove_file(&path);
    }
}
