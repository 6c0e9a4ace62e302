//! In-memory backend for tests and models.

use std::io;
use std::sync::RwLock;

use crate::BlockIo;

#[derive(Default)]
pub struct MemIo {
    data: RwLock<Vec<u8>>,
    name: String,
}

impl MemIo {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            data: RwLock::new(Vec::new()),
            name: name.into(),
        }
    }

    pub fn from_bytes(name: impl Into<String>, bytes: Vec<u8>) -> Self {
        Self {
            data: RwLock::new(bytes),
            name: name.into(),
        }
    }

    /// A copy of the whole content.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().expect("memio lock").clone()
    }
}

fn range(offset: u64, len: usize) -> io::Result<(usize, usize)> {
    let start = usize::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
    let end = start
        .checked_add(len)
        .ok_or_else(|| io::Error::other("range overflows"))?;
    Ok((start, end))
}

impl BlockIo for MemIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.read().expect("memio lock");
        let (start, end) = range(offset, buf.len())?;
        buf.fill(0);
        if start < data.len() {
            let avail = end.min(data.len());
            buf[..avail - start].copy_from_slice(&data[start..avail]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.data.write().expect("memio lock");
        let (start, end) = range(offset, buf.len())?;
        if data.len() < end {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut data = self.data.write().expect("memio lock");
        let (start, end) = range(offset, len as usize)?;
        let end = end.min(data.len());
        if start < end {
            data[start..end].fill(0);
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("length too large"))?;
        self.data.write().expect("memio lock").resize(len, 0);
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.data.read().expect("memio lock").len() as u64)
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}
