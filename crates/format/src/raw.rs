//! The raw format: the file is the disk, byte for byte. Sparse where the
//! filesystem allows.

use std::sync::atomic::{AtomicBool, Ordering};

use ploop_io::SharedIo;

use crate::{Error, Result};

pub struct RawDelta {
    io: SharedIo,
    path: String,
    virtual_size: u64,
    writable: bool,
    /// A flush failed: as for a ploop delta (`PloopDelta`'s `failed`),
    /// Linux may have dropped the data, so nothing more is written or
    /// called durable.
    failed: AtomicBool,
}

impl RawDelta {
    /// Create a sparse raw image of `size` bytes on an empty backend.
    pub fn create(io: SharedIo, size: u64, preallocate: bool) -> Result<()> {
        let path = io.describe();
        if preallocate {
            io.preallocate(0, size)
        } else {
            io.set_len(size)
        }
        .map_err(|e| Error::io(&path, "sizing raw image", size, e))?;
        io.flush()
            .map_err(|e| Error::io(&path, "syncing raw image", 0, e))
    }

    pub fn open(io: SharedIo, writable: bool) -> Result<Self> {
        let path = io.describe();
        let virtual_size = io
            .size()
            .map_err(|e| Error::io(&path, "reading file size", 0, e))?;
        Ok(Self {
            io,
            path,
            virtual_size,
            writable,
            failed: AtomicBool::new(false),
        })
    }

    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn io(&self) -> &SharedIo {
        &self.io
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.io
            .read_at(buf, offset)
            .map_err(|e| Error::io(&self.path, "reading data", offset, e))
    }

    /// Err once a flush has failed.
    pub fn ensure_healthy(&self) -> Result<()> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(Error::FlushFailed {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    fn ensure_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::Invalid(format!(
                "{}: image is open read-only",
                self.path
            )));
        }
        self.ensure_healthy()
    }

    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.ensure_writable()?;
        self.io
            .write_at(buf, offset)
            .map_err(|e| Error::io(&self.path, "writing data", offset, e))
    }

    /// Make a range read as zeros: a hole where the filesystem can punch
    /// one, written zeros where it cannot.
    pub fn punch(&self, offset: u64, len: u64) -> Result<()> {
        self.ensure_writable()?;
        if self.punch_only(offset, len)? {
            return Ok(());
        }
        self.io
            .zero_range(offset, len)
            .map_err(|e| Error::io(&self.path, "zeroing", offset, e))
    }

    /// Punch a hole; Ok(false), with nothing changed, where the filesystem
    /// cannot.
    pub fn punch_only(&self, offset: u64, len: u64) -> Result<bool> {
        self.ensure_writable()?;
        match self.io.punch_hole(offset, len) {
            Ok(()) => Ok(true),
            Err(e) if ploop_io::is_unsupported(&e) => Ok(false),
            Err(e) => Err(Error::io(&self.path, "punching hole", offset, e)),
        }
    }

    pub fn flush(&self) -> Result<()> {
        self.ensure_healthy()?;
        self.io.flush().map_err(|e| {
            self.failed.store(true, Ordering::SeqCst);
            Error::io(&self.path, "syncing", 0, e)
        })
    }
}
