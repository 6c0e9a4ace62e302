//! The balloon file, OpenVZ's way to shrink a mounted disk: a file in the
//! filesystem's root holds the space the disk gives up, so the filesystem
//! cannot use it; its blocks are then discarded (the image frees their
//! clusters) and compaction gives the space back to the host. The
//! filesystem and the device keep their size, as in OpenVZ.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::mount::BALLOON_FILE;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

pub struct Balloon {
    file: File,
    path: PathBuf,
}

impl Balloon {
    /// The balloon of the filesystem mounted on `mountpoint`, made (empty,
    /// 0600, as OpenVZ's `init` makes it) if it is missing.
    pub fn open(mountpoint: &Path) -> Res<Self> {
        let path = mountpoint.join(BALLOON_FILE);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc_o_nofollow())
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if !file.metadata()?.is_file() {
            return Err(format!("{}: not a regular file", path.display()).into());
        }
        Ok(Self { file, path })
    }

    pub fn size(&self) -> Res<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Inflate (allocate) or deflate (truncate) to `bytes`, synced. A
    /// failed inflation puts the old size back.
    pub fn set_size(&self, bytes: u64) -> Res<()> {
        let old = self.size()?;
        let shown = self.path.display();
        if bytes > old {
            if let Err(e) =
                rustix::fs::fallocate(&self.file, rustix::fs::FallocateFlags::empty(), 0, bytes)
            {
                let _ = self.file.set_len(old);
                return Err(format!("{shown}: allocating {bytes} bytes: {e}").into());
            }
        } else if bytes < old {
            self.file
                .set_len(bytes)
                .map_err(|e| format!("{shown}: truncating to {bytes} bytes: {e}"))?;
        }
        self.file
            .sync_all()
            .map_err(|e| format!("{shown}: syncing: {e}"))?;
        Ok(())
    }

    /// Where the balloon's blocks are on the filesystem's device: (byte
    /// offset, length), after a sync that places them.
    pub fn extents(&self) -> Res<Vec<(u64, u64)>> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for x in fiemap::Fiemap::with_flags(&self.file, fiemap::FiemapFlags::SYNC) {
            let x = x.map_err(|e| format!("{}: mapping its extents: {e}", self.path.display()))?;
            let (at, len) = (x.fe_physical, x.fe_length);
            match out.last_mut() {
                Some((s, l)) if *s + *l == at => *l += len,
                _ => out.push((at, len)),
            }
        }
        Ok(out)
    }
}

/// O_NOFOLLOW: the balloon's name is ours, and the container's owner
/// must not turn it into a link to a file of the host's.
fn libc_o_nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}
