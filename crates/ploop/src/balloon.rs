//! The balloon file, OpenVZ's way to shrink a mounted disk: a file in the
//! filesystem's root holds the space the disk gives up, so the filesystem
//! cannot use it; its blocks are then discarded (the image frees their
//! clusters) and compaction gives the space back to the host. The
//! filesystem and the device keep their size, as in OpenVZ.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
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
            .custom_flags(open_flags())
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let meta = file.metadata()?;
        // The container's owner may have replaced it: only our own kind of
        // file is sized and mapped (not a link to another file's data).
        if !meta.is_file() || meta.nlink() != 1 || meta.uid() != 0 {
            return Err(format!(
                "{}: not the balloon (a regular file of root's with one name): left alone",
                path.display()
            )
            .into());
        }
        Ok(Self { file, path })
    }

    /// Whether the balloon lives on the filesystem of device `dev` (and
    /// not on something mounted over its name).
    pub fn is_on(&self, dev: &Path) -> Res<bool> {
        let dev = std::fs::metadata(dev)?;
        Ok(self.file.metadata()?.dev() == dev.rdev())
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

    /// Run `f` with the balloon immutable: nobody without
    /// CAP_LINUX_IMMUTABLE (a container's root) can truncate it or punch
    /// it, so the blocks it maps stay its own meanwhile.
    pub fn frozen<T>(&self, f: impl FnOnce() -> Res<T>) -> Res<T> {
        use rustix::fs::{ioctl_getflags, ioctl_setflags, IFlags};
        let shown = self.path.display();
        let flags = ioctl_getflags(&self.file).map_err(|e| format!("{shown}: flags: {e}"))?;
        ioctl_setflags(&self.file, flags | IFlags::IMMUTABLE)
            .map_err(|e| format!("{shown}: making it immutable: {e}"))?;
        let out = f();
        if let Err(e) = ioctl_setflags(&self.file, flags) {
            eprintln!("ploop: {shown}: making it mutable again: {e}");
        }
        out
    }

    /// Where the balloon's unwritten blocks are on the filesystem's
    /// device: (byte offset, length), after a sync that places them, and
    /// only extents that say plainly where they are and that nothing was
    /// written to (the filesystem never reads those). Call it frozen.
    pub fn extents(&self) -> Res<Vec<(u64, u64)>> {
        use fiemap::FiemapExtentFlags as F;
        let vague = F::UNKNOWN | F::DELALLOC | F::ENCODED | F::DATA_INLINE | F::NOT_ALIGNED;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for x in fiemap::Fiemap::with_flags(&self.file, fiemap::FiemapFlags::SYNC) {
            let x = x.map_err(|e| format!("{}: mapping its extents: {e}", self.path.display()))?;
            if !x.fe_flags.contains(F::UNWRITTEN) || x.fe_flags.intersects(vague) {
                continue;
            }
            let (at, len) = (x.fe_physical, x.fe_length);
            match out.last_mut() {
                Some((s, l)) if *s + *l == at => *l += len,
                _ => out.push((at, len)),
            }
        }
        Ok(out)
    }
}

/// The balloon's name is ours, and the container's owner must not turn
/// it into a link to a file of the host's (O_NOFOLLOW), nor into a device
/// or a FIFO that an open would act on (O_NONBLOCK, O_NOCTTY).
fn open_flags() -> i32 {
    use rustix::fs::OFlags;
    (OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY).bits() as i32
}
