//! The I/O layer: one small positional trait and the backends behind it.
//!
//! Formats never open files themselves; they are handed a [`BlockIo`]. That
//! is what lets the same delta run over direct I/O, over a buffered file on
//! a network filesystem, in memory, or over a fault-injecting backend.
#![forbid(unsafe_code)]

mod aligned;
#[cfg(any(test, feature = "test-support"))]
mod faulty;
mod file;
mod folder;
pub mod fsys;
#[cfg(any(test, feature = "test-support"))]
mod journal;
pub mod locks;
mod memory;

use std::io;
use std::sync::Arc;

pub use aligned::{with_scratch, AlignedBuf};
#[cfg(any(test, feature = "test-support"))]
pub use faulty::{FaultPlan, FaultyIo};
pub use file::{FileIo, LockMode, OpenMode};
pub use folder::{resolve_folder, Folder};
#[cfg(any(test, feature = "test-support"))]
pub use journal::{Journal, JournaledIo, Survivors};
pub use memory::MemIo;

/// Positional I/O on one file-like object.
///
/// Reads past the end of the object return zeros for the missing part: an
/// image is a sparse object and its tail may be short after a crash.
pub trait BlockIo: Send + Sync {
    /// Fill `buf` with the bytes at `offset` (zeros past the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset`, growing the object if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every completed write durable (fdatasync).
    fn flush(&self) -> io::Result<()>;
    /// Deallocate a range; later reads of it return zeros. The size stays.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Make a range read as zeros while keeping it allocated (no holes).
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.write_at(&chunk[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
    /// Truncate or extend (with zeros) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Current size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Reserve backing space for a range (extending the size if needed),
    /// so later writes there cannot fail for lack of space.
    fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        if self.size()? < end {
            self.set_len(end)?;
        }
        Ok(())
    }
    /// Change the advisory lock held on the backing file (e.g. downgrade a
    /// former top delta to shared once it becomes read-only).
    fn set_lock(&self, _mode: LockMode) -> io::Result<()> {
        Ok(())
    }
    /// Bytes actually allocated on the backing store, where known.
    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }
    /// Which parts of a range hold data, as runs of (length, data) in
    /// order, covering the range; None where the backend cannot tell
    /// (then all of it counts as data). Holes read as zeros.
    fn data_runs(&self, _offset: u64, _len: u64) -> io::Result<Option<Vec<(u64, bool)>>> {
        Ok(None)
    }
    /// A short human name for error messages (usually the path).
    fn describe(&self) -> String;
    /// The file descriptor behind this backend, for queued I/O (io_uring)
    /// that bypasses the trait. None for backends without one.
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The block size I/O on [`raw_fd`](Self::raw_fd) must keep to, in
    /// offsets, lengths and memory: ranges off it go through the trait.
    fn direct_align(&self) -> u64 {
        aligned::DIRECT_ALIGN as u64
    }
    /// The same file opened again (with a lock of its own), whatever its
    /// name leads to now. None for backends without a file.
    fn reopen(&self, _mode: OpenMode) -> io::Result<Option<SharedIo>> {
        Ok(None)
    }
    /// Device and inode of the file behind this backend, where there is
    /// one.
    fn identity(&self) -> io::Result<Option<(u64, u64)>> {
        Ok(None)
    }
}

/// Bytes in one sector: the unit of every size field on disk, and what a
/// disk writes atomically.
pub const SECTOR: u64 = 512;

/// Shared handle to any backend.
pub type SharedIo = Arc<dyn BlockIo>;

/// One piece of a request that queued I/O (io_uring) does directly on a
/// file: `len` bytes at `file_offset`, into or out of the request's buffer
/// at `buf_offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub fd: std::os::fd::RawFd,
    pub file_offset: u64,
    pub buf_offset: usize,
    pub len: usize,
}

impl<T: BlockIo + ?Sized> BlockIo for Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).punch_hole(offset, len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).zero_range(offset, len)
    }
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
    fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).preallocate(offset, len)
    }
    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        (**self).allocated_bytes()
    }
    fn data_runs(&self, offset: u64, len: u64) -> io::Result<Option<Vec<(u64, bool)>>> {
        (**self).data_runs(offset, len)
    }
    fn set_lock(&self, mode: LockMode) -> io::Result<()> {
        (**self).set_lock(mode)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        (**self).raw_fd()
    }
    fn direct_align(&self) -> u64 {
        (**self).direct_align()
    }
    fn reopen(&self, mode: OpenMode) -> io::Result<Option<SharedIo>> {
        (**self).reopen(mode)
    }
    fn identity(&self) -> io::Result<Option<(u64, u64)>> {
        (**self).identity()
    }
}

/// True when an error says the operation is not supported here (a
/// filesystem without hole punching answers EOPNOTSUPP, which std does not
/// count as `ErrorKind::Unsupported`).
pub fn is_unsupported(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Unsupported
        || matches!(e.raw_os_error(), Some(code) if code == rustix::io::Errno::OPNOTSUPP.raw_os_error() || code == rustix::io::Errno::NOSYS.raw_os_error())
}

/// True when every byte of `buf` is zero (fast path for sparse writes).
pub fn is_zero(buf: &[u8]) -> bool {
    let words = buf.chunks_exact(8);
    let tail = words.remainder();
    tail.iter().all(|&b| b == 0)
        && words
            .map(|w| u64::from_ne_bytes(w.try_into().expect("chunk of 8")))
            .all(|w| w == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_operations_are_told_by_their_code() {
        assert!(is_unsupported(&io::Error::from_raw_os_error(
            libc_eopnotsupp()
        )));
        assert!(is_unsupported(&io::Error::from(io::ErrorKind::Unsupported)));
        assert!(!is_unsupported(&io::Error::from_raw_os_error(5)));
    }

    fn libc_eopnotsupp() -> i32 {
        rustix::io::Errno::OPNOTSUPP.raw_os_error()
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4099]));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&[]));
    }
}
