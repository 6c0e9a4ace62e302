//! A FUSE filesystem whose root is one regular file: the virtual disk.
//! A loop device on top of that file turns it into a block device.
//!
//! The file is served with FOPEN_DIRECT_IO, so the kernel keeps no page
//! cache for it: the only cache is the one of the filesystem on the loop
//! device. fallocate's punch-hole and zero-range (what the loop device turns
//! DISCARD and WRITE_ZEROES into) are implemented for real: an export that
//! refused them would let mkfs finish with an unzeroed journal.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use ploop_io::AlignedBuf;
use tracing::{error, warn};

use ploop_image::served::{InFlight, ServedDisk};
use ploop_image::throttle::IoKind;
use ploop_uring::{Op, Ring};

/// Largest request we ask the kernel for.
pub const MAX_REQUEST: u32 = 1 << 20;

const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;
const SEEK_DATA: i32 = 3;
const SEEK_HOLE: i32 = 4;

/// The one file and what can be done to it, whichever way requests come
/// in (/dev/fuse through fuser, or FUSE over io_uring).
pub struct DiskFile {
    pub(crate) disk: Arc<ServedDisk>,
    started: SystemTime,
}

pub struct OneFileFs {
    file: Arc<DiskFile>,
    disk: Arc<ServedDisk>,
    /// Queued I/O for plain reads and in-place writes, if enabled.
    ring: Option<Arc<Ring>>,
    /// Queues ready to take requests over io_uring, if the kernel agrees.
    fuse_ring: Option<Arc<crate::ring::Queues>>,
}

/// A request ready for the ring: the chain it was planned on, the file
/// pieces, and its in-flight mark.
type Queued = (Vec<ploop_image::Segment>, InFlight);

use ploop_uring::QUEUE_ALIGN;

impl OneFileFs {
    pub fn new(
        file: Arc<DiskFile>,
        ring: Option<Arc<Ring>>,
        fuse_ring: Option<Arc<crate::ring::Queues>>,
    ) -> Self {
        Self {
            disk: file.disk.clone(),
            file,
            ring,
            fuse_ring,
        }
    }

    /// Plan a request for the ring: Some((chain, segments)) when it can go
    /// there; errors are answered by the caller.
    fn plan(&self, offset: u64, len: u64, write: bool) -> ploop_format::Result<Option<Queued>> {
        if self.ring.is_none()
            || !offset.is_multiple_of(QUEUE_ALIGN)
            || !len.is_multiple_of(QUEUE_ALIGN)
            || self.disk.throttle.limited()
        {
            return Ok(None);
        }
        let chain = self.disk.chain();
        let plan = if write {
            chain.plan_write(offset, len)?
        } else {
            chain.plan_read(offset, len)?
        };
        // Registered while the guard is held: see ServedDisk::begin_queued.
        Ok(plan.map(|plan| {
            // Counted (no limit is set: nothing to wait for).
            let kind = if write { IoKind::Write } else { IoKind::Read };
            self.disk.throttle.count(kind, len);
            self.disk.begin_queued(&chain, plan)
        }))
    }
}

impl DiskFile {
    pub fn new(disk: Arc<ServedDisk>) -> Self {
        Self {
            disk,
            started: SystemTime::now(),
        }
    }

    pub(crate) fn attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo::ROOT,
            size: self.disk.size(),
            blocks: self.disk.size() / 512,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::RegularFile,
            perm: if self.disk.read_only { 0o400 } else { 0o600 },
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Refuse a writable open of a read-only disk.
    pub(crate) fn check_open(&self, acc_mode: OpenAccMode) -> Result<(), Errno> {
        if self.disk.read_only && acc_mode != OpenAccMode::O_RDONLY {
            return Err(Errno::EROFS);
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset` (the caller clamps to the disk).
    pub(crate) fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        self.disk.throttle.admit(IoKind::Read, buf.len() as u64);
        self.disk.chain().read_at(buf, offset).map_err(|e| {
            error!("read at {offset}: {e}");
            errno(&e)
        })
    }

    /// Refuse a write the disk cannot take before doing any work.
    pub(crate) fn check_write(&self, offset: u64, len: u64) -> Result<(), Errno> {
        if self.disk.read_only {
            return Err(Errno::EROFS);
        }
        if offset.saturating_add(len) > self.disk.size() {
            return Err(Errno::ENOSPC);
        }
        Ok(())
    }

    pub(crate) fn write(&self, data: &[u8], offset: u64) -> Result<(), Errno> {
        self.disk.throttle.admit(IoKind::Write, data.len() as u64);
        self.check_write(offset, data.len() as u64)?;
        self.disk.chain().write_at(data, offset).map_err(|e| {
            error!("write at {offset}: {e}");
            errno(&e)
        })
    }

    pub(crate) fn fsync(&self) -> Result<(), Errno> {
        self.disk.throttle.admit(IoKind::Flush, 0);
        if self.disk.read_only {
            return Ok(());
        }
        self.disk.chain().flush().map_err(|e| {
            error!("fsync: {e}");
            errno(&e)
        })
    }

    pub(crate) fn fallocate(&self, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        self.disk.throttle.admit(IoKind::Discard, length);
        if self.disk.read_only {
            return Err(Errno::EROFS);
        }
        tracing::debug!("fallocate mode {mode:#x} at {offset}+{length}");
        let end = offset.saturating_add(length);
        let zeroing = mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0;
        if mode & !(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0
            || (mode & FALLOC_FL_PUNCH_HOLE != 0 && mode & FALLOC_FL_KEEP_SIZE == 0)
        {
            return Err(Errno::EOPNOTSUPP);
        }
        if !zeroing {
            // Plain preallocation: space is allocated on first write; only
            // a request to grow the disk is refused.
            if end > self.disk.size() && mode & FALLOC_FL_KEEP_SIZE == 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            return Ok(());
        }
        if mode & FALLOC_FL_KEEP_SIZE == 0 && end > self.disk.size() {
            // Zeroing past the end would grow the disk, which it cannot.
            return Err(Errno::EOPNOTSUPP);
        }
        let end = end.min(self.disk.size());
        if offset >= end {
            return Ok(());
        }
        self.disk
            .chain()
            .discard(offset, end - offset)
            .map_err(|e| {
                error!("fallocate mode {mode:#x} at {offset}+{length}: {e}");
                errno(&e)
            })
    }

    pub(crate) fn lseek(&self, offset: i64, whence: i32) -> Result<i64, Errno> {
        let size = self.disk.size() as i64;
        match whence {
            // Everything counts as data; the only hole is at the end.
            SEEK_DATA if (0..size).contains(&offset) => Ok(offset),
            SEEK_HOLE if (0..size).contains(&offset) => Ok(size),
            SEEK_DATA | SEEK_HOLE => Err(Errno::ENXIO),
            other => {
                warn!("lseek whence {other} not supported");
                Err(Errno::EINVAL)
            }
        }
    }
}

/// Map an image error to the errno the kernel passes up.
fn errno(e: &ploop_format::Error) -> Errno {
    match e {
        ploop_format::Error::Io { err, .. } => err
            .raw_os_error()
            .map(Errno::from_i32)
            .unwrap_or(Errno::EIO),
        ploop_format::Error::Invalid(_) => Errno::EINVAL,
        _ => Errno::EIO,
    }
}

pub(crate) const TTL: Duration = Duration::from_secs(1);

thread_local! {
    /// Each FUSE worker reads into its own aligned buffer (O_DIRECT-ready),
    /// instead of allocating up to 1 MiB per request. Not the I/O layer's
    /// `with_scratch`: the read below may use that one for a bounce.
    static READ_BUF: std::cell::RefCell<AlignedBuf> = std::cell::RefCell::new(AlignedBuf::zeroed(0));
}

impl Filesystem for OneFileFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_REQUEST);
        let _ = config.set_max_background(512);
        let _ = config.set_congestion_threshold(384);
        // Parallel async direct I/O from the loop device.
        let wanted = InitFlags::FUSE_ASYNC_DIO & config.capabilities();
        let _ = config.add_capabilities(wanted);
        if let Some(queues) = &self.fuse_ring {
            let _ = config.set_max_readahead(MAX_REQUEST);
            let offered = config
                .capabilities()
                .contains(InitFlags::FUSE_OVER_IO_URING);
            let pages = MAX_REQUEST.div_ceil(4096) as usize;
            if offered
                && queues.negotiate(MAX_REQUEST, pages)
                && config
                    .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                    .is_ok()
            {
                tracing::info!("serving requests over io_uring");
            } else {
                tracing::info!("serving requests over /dev/fuse (io_uring offered: {offered})");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::ENOENT);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.size(0);
    }

    fn getattr(&self, _req: &Request, _ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.attr(&TTL, &self.file.attr());
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match size {
            Some(s) if s != self.disk.size() => reply.error(Errno::EINVAL),
            _ => reply.attr(&TTL, &self.file.attr()),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.file.check_open(flags.acc_mode()) {
            Ok(()) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let end = offset.saturating_add(u64::from(size)).min(self.disk.size());
        if offset >= end {
            reply.data(&[]);
            return;
        }
        match self.plan(offset, end - offset, false) {
            Ok(Some((segments, in_flight))) => {
                let ring = self.ring.as_ref().expect("planned for the ring");
                ring.submit(Op {
                    segments,
                    buf: AlignedBuf::zeroed((end - offset) as usize),
                    read: true,
                    done: Box::new(move |buf, failed| {
                        match failed {
                            Some(e) => reply.error(Errno::from_i32(e)),
                            None => reply.data(buf.as_slice()),
                        }
                        drop(in_flight);
                    }),
                });
                return;
            }
            Ok(None) => {}
            Err(e) => {
                error!("read at {offset}: {e}");
                reply.error(errno(&e));
                return;
            }
        }
        // The reply is written out before the buffer is reused.
        READ_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            let len = (end - offset) as usize;
            if buf.len() < len {
                *buf = AlignedBuf::zeroed(len.next_power_of_two());
            }
            match self.file.read(&mut buf.as_mut_slice()[..len], offset) {
                Ok(()) => reply.data(&buf.as_slice()[..len]),
                Err(e) => reply.error(e),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if let Err(e) = self.file.check_write(offset, data.len() as u64) {
            reply.error(e);
            return;
        }
        match self.plan(offset, data.len() as u64, true) {
            Ok(Some((segments, in_flight))) => {
                let mut buf = AlignedBuf::zeroed(data.len());
                buf.as_mut_slice().copy_from_slice(data);
                let ring = self.ring.as_ref().expect("planned for the ring");
                ring.submit(Op {
                    segments,
                    buf,
                    read: false,
                    done: Box::new(move |buf, failed| {
                        // Again now that the data is in place: an online
                        // merge that copied the cluster meanwhile must copy
                        // it once more.
                        in_flight.chain().note_written(offset, buf.len() as u64);
                        match failed {
                            Some(e) => reply.error(Errno::from_i32(e)),
                            None => reply.written(buf.len() as u32),
                        }
                        drop(in_flight);
                    }),
                });
                return;
            }
            Ok(None) => {}
            Err(e) => {
                error!("write at {offset}: {e}");
                reply.error(errno(&e));
                return;
            }
        }
        match self.file.write(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.file.fsync() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.file.fallocate(offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.file.lseek(offset, whence) {
            Ok(at) => reply.offset(at),
            Err(e) => reply.error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ploop_image::served::ServedDisk;
    use std::sync::Arc;

    const DISK_SIZE: u64 = 1 << 20;

    fn file() -> DiskFile {
        DiskFile::new(Arc::new(ServedDisk::in_memory(DISK_SIZE, 64 << 10, false)))
    }

    #[test]
    fn lseek_finds_data_everywhere_and_the_hole_at_the_end() {
        let f = file();
        let size = DISK_SIZE as i64;
        assert_eq!(f.lseek(0, SEEK_DATA), Ok(0));
        assert_eq!(f.lseek(4097, SEEK_DATA), Ok(4097));
        assert_eq!(f.lseek(0, SEEK_HOLE), Ok(size));
        for (offset, whence) in [
            (-1, SEEK_DATA),
            (-1, SEEK_HOLE),
            (size, SEEK_DATA),
            (size, SEEK_HOLE),
        ] {
            assert_eq!(
                f.lseek(offset, whence),
                Err(Errno::ENXIO),
                "{offset} {whence}"
            );
        }
        assert_eq!(f.lseek(0, 99), Err(Errno::EINVAL));
    }

    #[test]
    fn fallocate_zeroes_in_place_and_never_grows_the_disk() {
        let f = file();
        let size = DISK_SIZE;
        f.write(&[7u8; 8192], 4096).unwrap();
        // Punching needs KEEP_SIZE; zeroing past the end without it would
        // grow the disk.
        assert_eq!(
            f.fallocate(4096, 4096, FALLOC_FL_PUNCH_HOLE),
            Err(Errno::EOPNOTSUPP)
        );
        assert_eq!(
            f.fallocate(size - 4096, 8192, FALLOC_FL_ZERO_RANGE),
            Err(Errno::EOPNOTSUPP)
        );
        assert_eq!(
            f.fallocate(
                size - 4096,
                8192,
                FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
            ),
            Ok(())
        );
        f.fallocate(4096, 4096, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
            .unwrap();
        f.fallocate(8192 + 100, 200, FALLOC_FL_ZERO_RANGE).unwrap();
        let mut back = vec![1u8; 3 * 4096];
        f.read(&mut back, 0).unwrap();
        let mut want = vec![0u8; 3 * 4096];
        want[8192..].fill(7);
        want[8192 + 100..8192 + 300].fill(0);
        assert_eq!(back, want);
        // Plain preallocation inside the disk is a no-op that succeeds.
        assert_eq!(f.fallocate(0, 4096, 0), Ok(()));
    }
}
