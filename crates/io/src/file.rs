//! File backends: direct (O_DIRECT with aligned bounce buffers where a
//! request is not aligned) and buffered (any filesystem, including network
//! ones and tmpfs, which refuse O_DIRECT).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use rustix::fs::{fallocate, fdatasync, flock, FallocateFlags, FlockOperation, OFlags};

use crate::aligned::{is_direct_ready, with_scratch, AlignedBuf, DIRECT_ALIGN};
use crate::BlockIo;

/// Advisory lock taken on open, held until the file is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    None,
    /// Readers: any number, but no writer.
    Shared,
    /// One writer and nobody else.
    Exclusive,
}

/// How to open an image file.
#[derive(Clone, Copy, Debug)]
pub struct OpenMode {
    pub write: bool,
    /// Ask for O_DIRECT; silently falls back to buffered where refused.
    pub direct: bool,
    /// Create the file; fail if it exists.
    pub create_new: bool,
    pub lock: LockMode,
}

impl OpenMode {
    pub fn read_only() -> Self {
        Self {
            write: false,
            direct: false,
            create_new: false,
            lock: LockMode::Shared,
        }
    }

    pub fn read_write() -> Self {
        Self {
            write: true,
            direct: false,
            create_new: false,
            lock: LockMode::Exclusive,
        }
    }

    pub fn create() -> Self {
        Self {
            create_new: true,
            ..Self::read_write()
        }
    }

    pub fn direct(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }
}

pub struct FileIo {
    file: File,
    path: PathBuf,
    direct: bool,
    /// A block device: its end is fixed, and may not be a multiple of
    /// [`DIRECT_ALIGN`] (only of its 512-byte logical block).
    block_device: bool,
    /// The block direct I/O keeps to (offsets, lengths, memory): the
    /// device's logical block where the filesystem allows it, else
    /// [`DIRECT_ALIGN`]. Writes inside one go straight to the file
    /// instead of read-modify-write of the 4 KiB around them.
    align: usize,
    /// Read-modify-write of partial blocks on a direct file: shared by
    /// those that stay inside the file, each of which also holds the
    /// stripe locks of its blocks; taken alone by one that reaches past
    /// the end (it may cut the file back).
    rmw: RwLock<()>,
    /// Partial writes of the same block wait for each other (one stripe
    /// per block number modulo their count); of different blocks they
    /// run at once (they were all serialised: 1 KiB random writes ran at
    /// a tenth of the 4 KiB rate whatever the queue depth).
    stripes: [Mutex<()>; RMW_STRIPES],
}

/// Stripe locks for partial writes.
const RMW_STRIPES: usize = 64;

impl FileIo {
    pub fn open(path: &Path, mode: OpenMode) -> io::Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(mode.write);
        if mode.create_new {
            opts.create_new(true);
        }
        let (file, direct) = if mode.direct {
            match opts
                .clone()
                .custom_flags(OFlags::DIRECT.bits() as i32)
                .open(path)
            {
                Ok(f) => (f, true),
                // tmpfs and some FUSE filesystems refuse O_DIRECT.
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    (opts.open(path)?, false)
                }
                Err(e) => return Err(e),
            }
        } else {
            (opts.open(path)?, false)
        };
        Self::from_file(file, path, mode.lock, direct)
    }

    /// Open a path the administrator named (`ploop serve IMAGE`): a
    /// regular file or a block device, never a FIFO (looked at without
    /// blocking); a link is followed only where it sits in a folder that
    /// only root can change (as in /dev/disk/by-id), not in one a user
    /// could have put it in.
    pub fn open_named(path: &Path, mode: OpenMode) -> io::Result<Self> {
        check_named(path)?;
        Self::open_nonblocking(path, mode)
    }

    /// The first `len` bytes (fewer if it is shorter) of a path the
    /// administrator named, opened as [`Self::open_named`] does.
    pub fn read_head(path: &Path, len: usize) -> io::Result<Vec<u8>> {
        let io = Self::open_named(
            path,
            OpenMode {
                write: false,
                direct: false,
                create_new: false,
                lock: LockMode::None,
            },
        )?;
        let mut head = vec![0u8; len];
        let n = io.file.read_at(&mut head, 0)?;
        head.truncate(n);
        Ok(head)
    }

    fn open_nonblocking(path: &Path, mode: OpenMode) -> io::Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(mode.write);
        let nonblock = OFlags::NONBLOCK.bits() as i32;
        let (file, direct) = if mode.direct {
            match opts
                .clone()
                .custom_flags(OFlags::DIRECT.bits() as i32 | nonblock)
                .open(path)
            {
                Ok(f) => (f, true),
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    (opts.custom_flags(nonblock).open(path)?, false)
                }
                Err(e) => return Err(e),
            }
        } else {
            (opts.custom_flags(nonblock).open(path)?, false)
        };
        let kind = file.metadata()?.file_type();
        if !kind.is_file() && !std::os::unix::fs::FileTypeExt::is_block_device(&kind) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: neither a regular file nor a block device",
                    path.display()
                ),
            ));
        }
        rustix::fs::fcntl_setfl(&file, rustix::fs::fcntl_getfl(&file)? - OFlags::NONBLOCK)?;
        Self::from_file(file, path, mode.lock, direct)
    }

    /// A backend over an open file: takes its lock; `direct` says whether
    /// it was opened with O_DIRECT.
    pub(crate) fn from_file(
        file: File,
        path: &Path,
        lock: LockMode,
        direct: bool,
    ) -> io::Result<Self> {
        take_lock(&file, lock)?;
        let meta = file.metadata()?;
        let block_device = std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type());
        let align = if direct && meta.is_file() {
            direct_block(&file, meta.dev())
        } else {
            DIRECT_ALIGN
        };
        Ok(Self {
            file,
            path: path.to_path_buf(),
            direct,
            block_device,
            align,
            rmw: RwLock::new(()),
            stripes: std::array::from_fn(|_| Mutex::new(())),
        })
    }

    /// The same file opened again (a new open file description, so with
    /// a lock of its own), through the descriptor this one holds: the file
    /// it is, whatever its name now leads to.
    pub fn reopen(&self, mode: OpenMode) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        let mut opts = OpenOptions::new();
        opts.read(true).write(mode.write);
        let proc_path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        let (file, direct) = if mode.direct {
            match opts
                .clone()
                .custom_flags(OFlags::DIRECT.bits() as i32)
                .open(&proc_path)
            {
                Ok(f) => (f, true),
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    (opts.open(&proc_path)?, false)
                }
                Err(e) => return Err(e),
            }
        } else {
            (opts.open(&proc_path)?, false)
        };
        Self::from_file(file, &self.path, mode.lock, direct)
    }

    /// Device and inode of the open file.
    pub fn identity(&self) -> io::Result<(u64, u64)> {
        let m = self.file.metadata()?;
        Ok((m.dev(), m.ino()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether O_DIRECT is really in effect.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    fn read_raw(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_raw(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// The block-aligned span that covers `[offset, offset + len)`.
    fn aligned_span(&self, offset: u64, len: usize) -> (u64, usize) {
        let a = self.align as u64;
        let start = offset / a * a;
        let end = (offset + len as u64).div_ceil(a) * a;
        (start, (end - start) as usize)
    }

    /// Write zeros over a range.
    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunk = AlignedBuf::zeroed(len.min(1 << 20) as usize);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.write_at(&chunk.as_slice()[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Write zeros into the holes of a range (and past the end), keeping
    /// its data. Where holes cannot be told from data, only the part past
    /// the end is written.
    fn fill_holes(&self, offset: u64, len: u64) -> io::Result<()> {
        let runs = match self.data_runs(offset, len)? {
            Some(runs) => runs,
            None => {
                let data = self.size()?.saturating_sub(offset).min(len);
                vec![(data, true), (len - data, false)]
            }
        };
        let mut at = offset;
        for (n, data) in runs {
            if !data {
                self.write_zeros(at, n)?;
            }
            at += n;
        }
        Ok(())
    }
}

/// The block a direct file takes I/O in. The kernel's own answer for the
/// file where it gives one (statx's DIOALIGN, Linux 6.1+; per file, so
/// right for an XFS realtime file or an encrypted one). Otherwise, on
/// ext4, the logical block of the device beneath (ext4 takes direct
/// writes of part of its own 4 KiB block as long as they overwrite data,
/// and serialises the others itself). Elsewhere (an XFS file may live on
/// its realtime device, btrfs wants its sector, NFS and FUSE their own
/// rules) and where the device cannot be told, [`DIRECT_ALIGN`].
fn direct_block(file: &File, dev: u64) -> usize {
    const EXT4_SUPER_MAGIC: i64 = 0xEF53;
    let usable = |a: usize| a.is_power_of_two() && (512..=DIRECT_ALIGN).contains(&a);
    use rustix::fs::{AtFlags, StatxFlags};
    if let Ok(st) = rustix::fs::statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
        if st.stx_mask & StatxFlags::DIOALIGN.bits() != 0 {
            let a = st.stx_dio_offset_align.max(st.stx_dio_mem_align) as usize;
            return if usable(a) { a } else { DIRECT_ALIGN };
        }
    }
    let Ok(fs) = rustix::fs::fstatfs(file) else {
        return DIRECT_ALIGN;
    };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs by arch
    let kind = fs.f_type as i64;
    if kind != EXT4_SUPER_MAGIC {
        return DIRECT_ALIGN;
    }
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    // A partition has its queue in its disk's folder, one level up.
    let whole = format!("/sys/dev/block/{major}:{minor}/queue/logical_block_size");
    let part = format!("/sys/dev/block/{major}:{minor}/../queue/logical_block_size");
    let size = std::fs::read_to_string(&whole)
        .or_else(|_| std::fs::read_to_string(&part))
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok());
    match size {
        Some(n) if usable(n) => n,
        _ => DIRECT_ALIGN,
    }
}

/// A link in `path`'s last name is allowed only in a folder no one but
/// root can change (root's, writable by no one else).
pub(crate) fn check_named(path: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.file_type().is_symlink() {
        return Ok(());
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = std::fs::metadata(parent)?;
    if dir.uid() == 0 && dir.mode() & 0o022 == 0 {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{}: is a link in a folder users other than root can change: name its target",
            path.display()
        ),
    ))
}

fn take_lock(file: &File, mode: LockMode) -> io::Result<()> {
    let op = match mode {
        LockMode::None => FlockOperation::Unlock,
        LockMode::Shared => FlockOperation::NonBlockingLockShared,
        LockMode::Exclusive => FlockOperation::NonBlockingLockExclusive,
    };
    flock(file, op).map_err(|e| {
        if e == rustix::io::Errno::WOULDBLOCK {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                "file is locked by another process (image in use)",
            )
        } else {
            io::Error::from(e)
        }
    })
}

impl BlockIo for FileIo {
    fn set_lock(&self, mode: LockMode) -> io::Result<()> {
        take_lock(&self.file, mode)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if !self.direct || is_direct_ready(buf.as_ptr(), offset, buf.len(), self.align) {
            return self.read_raw(buf, offset);
        }
        let (start, span) = self.aligned_span(offset, buf.len());
        let skip = (offset - start) as usize;
        with_scratch(span, |bounce| {
            self.read_raw(bounce, start)?;
            buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
            Ok(())
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.direct {
            return self.write_raw(buf, offset);
        }
        if is_direct_ready(buf.as_ptr(), offset, buf.len(), self.align) {
            return self.write_raw(buf, offset);
        }
        let (start, span) = self.aligned_span(offset, buf.len());
        let skip = (offset - start) as usize;
        if skip == 0 && span == buf.len() {
            // Aligned range, unaligned memory: a plain copy, no read needed.
            return with_scratch(span, |bounce| {
                bounce.copy_from_slice(buf);
                self.write_raw(bounce, start)
            });
        }
        {
            // Inside the file: blocks of other stripes go on meanwhile.
            let _shared = self.rmw.read().expect("rmw lock");
            let size = self.size()?;
            if start + span as u64 <= size {
                let a = self.align as u64;
                let mut mask = 0u64;
                for b in start / a..(start + span as u64) / a {
                    mask |= 1 << (b % RMW_STRIPES as u64);
                    if mask == u64::MAX {
                        break;
                    }
                }
                // Taken in stripe order, so that two writes never deadlock.
                let _held: Vec<_> = (0..RMW_STRIPES)
                    .filter(|i| mask & (1 << i) != 0)
                    .map(|i| self.stripes[i].lock().expect("stripe lock"))
                    .collect();
                return with_scratch(span, |bounce| {
                    self.read_raw(bounce, start)?;
                    bounce[skip..skip + buf.len()].copy_from_slice(buf);
                    self.write_raw(bounce, start)
                });
            }
        }
        // Past the end: alone.
        let _guard = self.rmw.write().expect("rmw lock");
        let old_size = self.size()?;
        let end = offset + buf.len() as u64;
        // A device's last aligned block may reach past its end: write only
        // what lies inside (whole logical blocks, as O_DIRECT wants).
        let len = if self.block_device {
            if end > old_size {
                return Err(io::Error::from(rustix::io::Errno::NOSPC));
            }
            span.min((old_size - start) as usize)
        } else {
            span
        };
        with_scratch(span, |bounce| {
            self.read_raw(bounce, start)?;
            bounce[skip..skip + buf.len()].copy_from_slice(buf);
            self.write_raw(&bounce[..len], start)
        })?;
        // The bounce may have written past the intended end: trim it back.
        let want = old_size.max(end);
        if !self.block_device && start + span as u64 > want {
            self.file.set_len(want)?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        fdatasync(&self.file).map_err(io::Error::from)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .map_err(io::Error::from)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        // Not under a read-modify-write that judged the file's end before
        // (it would bring a cut block back).
        let _alone = self.rmw.write().expect("rmw lock");
        self.file.set_len(len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match fallocate(&self.file, FallocateFlags::ZERO_RANGE, offset, len) {
            Ok(()) => Ok(()),
            // Not every filesystem zeroes ranges in place: write zeros.
            Err(e) if e == rustix::io::Errno::OPNOTSUPP => self.write_zeros(offset, len),
            Err(e) => Err(e.into()),
        }
    }

    fn size(&self) -> io::Result<u64> {
        let meta = self.file.metadata()?;
        if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
            // A block device's length is where its end is, not st_size.
            return Ok(rustix::fs::seek(&self.file, rustix::fs::SeekFrom::End(0))?);
        }
        Ok(meta.len())
    }

    fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        match fallocate(&self.file, FallocateFlags::empty(), offset, len) {
            // Filesystems that cannot reserve space (ext2 and ext3 files,
            // some FUSE and network filesystems): allocate by writing, as
            // glibc's posix_fallocate does.
            Err(e) if e == rustix::io::Errno::OPNOTSUPP => self.fill_holes(offset, len),
            r => r.map_err(io::Error::from),
        }
    }

    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        Ok(Some(self.file.metadata()?.blocks() * 512))
    }

    fn data_runs(&self, offset: u64, len: u64) -> io::Result<Option<Vec<(u64, bool)>>> {
        use rustix::fs::{seek, SeekFrom};
        let end = offset.saturating_add(len);
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut push = |n: u64, data: bool| match runs.last_mut() {
            Some((run, d)) if *d == data => *run += n,
            _ if n > 0 => runs.push((n, data)),
            _ => {}
        };
        let mut pos = offset;
        while pos < end {
            let data = match seek(&self.file, SeekFrom::Data(pos)) {
                Ok(d) => d.min(end),
                // No data from here on (past the end, or all hole).
                Err(rustix::io::Errno::NXIO) => end,
                // Not supported here (some filesystems, block devices).
                Err(_) => return Ok(None),
            };
            push(data - pos, false);
            if data >= end {
                break;
            }
            let hole = match seek(&self.file, SeekFrom::Hole(data)) {
                Ok(h) => h.clamp(data, end),
                Err(_) => return Ok(None),
            };
            if hole == data {
                return Ok(None); // a filesystem that says nothing useful
            }
            push(hole - data, true);
            pos = hole;
        }
        Ok(Some(runs))
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.file.as_raw_fd())
    }

    fn direct_align(&self) -> u64 {
        self.align as u64
    }

    fn reopen(&self, mode: OpenMode) -> io::Result<Option<crate::SharedIo>> {
        Ok(Some(std::sync::Arc::new(FileIo::reopen(self, mode)?)))
    }

    fn identity(&self) -> io::Result<Option<(u64, u64)>> {
        FileIo::identity(self).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new file `f` for direct I/O in a fresh folder on /var/tmp (a
    /// filesystem with O_DIRECT; tmpfs has none): the folder and the file.
    fn direct_file(name: &str) -> (std::path::PathBuf, FileIo) {
        let dir = std::path::Path::new("/var/tmp")
            .join(format!("ploop-io-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let _ = std::fs::remove_file(&path);
        let io = FileIo::open(&path, OpenMode::create().direct(true)).unwrap();
        (dir, io)
    }

    /// Partial writes racing in the same blocks (each its own 64 bytes of
    /// the first 512) and in others: none is lost, on a direct file where
    /// each is a read-modify-write of its block.
    #[test]
    fn racing_partial_writes_lose_nothing() {
        let (dir, io) = direct_file("race");
        let io = std::sync::Arc::new(io);
        assert!(io.direct, "the read-modify-write path needs O_DIRECT");
        const BLOCKS: u64 = 8;
        io.set_len(BLOCKS * 4096).unwrap();
        // Eight threads, each owning one 64-byte slot of every block.
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let io = io.clone();
                s.spawn(move || {
                    for round in 0..200u64 {
                        let b = (round * 3 + t) % BLOCKS;
                        let v = (t * 31 + round) as u8 | 1;
                        io.write_at(&[v; 64], b * 4096 + t * 64).unwrap();
                    }
                });
            }
        });
        // Each slot holds its thread's last write there.
        for t in 0..8u64 {
            for b in 0..BLOCKS {
                let last = (0..200u64).rev().find(|r| (r * 3 + t) % BLOCKS == b);
                let mut got = [0u8; 64];
                io.read_at(&mut got, b * 4096 + t * 64).unwrap();
                let want = last.map_or(0, |r| (t * 31 + r) as u8 | 1);
                assert!(got.iter().all(|&x| x == want), "thread {t} block {b}");
            }
        }
        drop(io);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The block a direct file says it takes is one the kernel takes:
    /// a write of one such block, off the 4 KiB grid, goes to the file as
    /// it is and reads back.
    #[test]
    fn the_direct_block_is_one_the_kernel_takes() {
        let (dir, io) = direct_file("align");
        if !io.direct {
            eprintln!("/var/tmp takes no O_DIRECT here: nothing to check");
            std::fs::remove_dir_all(&dir).unwrap();
            return;
        }
        io.set_len(64 << 10).unwrap();
        io.write_at(&[0x5a; 8192], 0).unwrap();
        let a = io.direct_align() as usize;
        assert!(a.is_power_of_two() && (512..=4096).contains(&a), "{a}");
        let mut block = AlignedBuf::zeroed(a);
        block.as_mut_slice().fill(0xa5);
        // Straight to the file, past the read-modify-write path: EINVAL
        // here would mean the block is not one O_DIRECT takes.
        io.write_raw(block.as_slice(), 4096 + a as u64 % 4096)
            .unwrap();
        io.write_at(block.as_slice(), 4096 + a as u64 % 4096)
            .unwrap();
        let mut back = vec![0u8; 8192];
        io.read_at(&mut back, 0).unwrap();
        let at = 4096 + a % 4096;
        assert!(back[..at].iter().all(|&x| x == 0x5a));
        assert!(back[at..at + a].iter().all(|&x| x == 0xa5));
        assert!(back[at + a..].iter().all(|&x| x == 0x5a));
        drop(io);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn roundtrip(direct: bool) {
        let dir = std::env::temp_dir().join(format!("ploop-io-{}-{direct}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let _ = std::fs::remove_file(&path);
        let io = FileIo::open(&path, OpenMode::create().direct(direct)).unwrap();
        io.set_len(10_000).unwrap();
        io.write_at(b"hello", 4093).unwrap();
        let mut b = [0u8; 9];
        io.read_at(&mut b, 4091).unwrap();
        assert_eq!(&b, b"\0\0hello\0\0");
        assert_eq!(io.size().unwrap(), 10_000);
        // Unaligned write past the end grows to exactly its end.
        io.write_at(b"tail", 12_000).unwrap();
        assert_eq!(io.size().unwrap(), 12_004);
        let mut big = vec![7u8; 3];
        io.read_at(&mut big, 20_000).unwrap();
        assert_eq!(big, [0, 0, 0]);
        io.punch_hole(4096, 4096).unwrap();
        io.read_at(&mut b, 4091).unwrap();
        assert_eq!(&b, b"\0\0hel\0\0\0\0");
        // A second exclusive lock is refused.
        let err = FileIo::open(&path, OpenMode::read_write()).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        drop(io);
        FileIo::open(&path, OpenMode::read_write()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn buffered_roundtrip() {
        roundtrip(false);
    }

    #[test]
    fn direct_roundtrip() {
        roundtrip(true);
    }
}
