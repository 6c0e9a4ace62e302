//! The files of one folder, reached without following symbolic links.
//!
//! `ploop` runs as root on a disk's folder, whose content a container's
//! owner may control: any name in it may be a symbolic link to a file of
//! the host, a FIFO that blocks an open forever, or a device. Every file
//! the image layer touches is therefore one plain name inside the folder
//! (the folder's own path comes from the administrator and is trusted),
//! opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` and
//! checked with `fstat` to be a regular file, and removed or renamed with
//! `unlinkat`/`renameat`, which never follow a link in the last name.
//! Kernels older than 5.6 have no `openat2`: for one plain name,
//! `O_NOFOLLOW` refuses exactly the same links, and is used there.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

use crate::file::{FileIo, OpenMode};

/// `path` with its folder resolved (links followed: the administrator's)
/// and its last name kept as it is, not followed: the name of a disk's
/// descriptor, which must not lead into another folder.
pub fn resolve_folder(path: &Path) -> io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| bad_name(path.as_os_str()))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok(parent.canonicalize()?.join(name))
}

/// A folder, opened once; the names below are looked up in it.
pub struct Folder {
    dir: OwnedFd,
    path: PathBuf,
}

/// Why a name is refused: it is not one plain file name.
fn bad_name(name: &OsStr) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{}: not a plain file name in the disk's folder",
            Path::new(name).display()
        ),
    )
}

fn check_name(name: &OsStr) -> io::Result<()> {
    let mut parts = Path::new(name).components();
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(_)), None) => Ok(()),
        _ => Err(bad_name(name)),
    }
}

impl Folder {
    /// Open the folder at `path` (a path the administrator gave: links in
    /// it are followed).
    pub fn open(path: &Path) -> io::Result<Self> {
        let at = if path.as_os_str().is_empty() {
            Path::new(".")
        } else {
            path
        };
        let dir = rustix::fs::open(
            at,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self {
            dir,
            path: path.to_path_buf(),
        })
    }

    /// The folder of `path` and its last name.
    pub fn of(path: &Path) -> io::Result<(Self, &OsStr)> {
        let name = path.file_name().ok_or_else(|| bad_name(path.as_os_str()))?;
        let parent = path.parent().unwrap_or(Path::new(""));
        Ok((Self::open(parent)?, name))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Open `name` beneath the folder, never through a symbolic link;
    /// refused unless it is a regular file (a FIFO is looked at without
    /// blocking).
    fn open_fd(&self, name: &OsStr, flags: OFlags, create: bool) -> io::Result<OwnedFd> {
        check_name(name)?;
        let mut flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK;
        if create {
            flags |= OFlags::CREATE | OFlags::EXCL;
        }
        // openat2 takes a mode only with O_CREAT (EINVAL otherwise).
        let mode = if create {
            Mode::from_raw_mode(0o600)
        } else {
            Mode::empty()
        };
        let resolve =
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        let fd = match rustix::fs::openat2(&self.dir, name, flags, mode, resolve) {
            Err(rustix::io::Errno::NOSYS) => rustix::fs::openat(&self.dir, name, flags, mode),
            other => other,
        }
        .map_err(|e| self.explain(name, e))?;
        let st = rustix::fs::fstat(&fd)?;
        let kind = FileType::from_raw_mode(st.st_mode);
        if kind != FileType::RegularFile {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: is a {kind:?}, not a regular file: refused",
                    self.path.join(name).display()
                ),
            ));
        }
        // A second name for a file elsewhere (where hard links to others'
        // files are allowed: fs.protected_hardlinks=0) must not be written.
        if flags.contains(OFlags::RDWR) && st.st_nlink > 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: has {} names (hard links): a disk's file may have one only",
                    self.path.join(name).display(),
                    st.st_nlink
                ),
            ));
        }
        // Back to blocking I/O, which regular files ignore anyway.
        rustix::fs::fcntl_setfl(&fd, rustix::fs::fcntl_getfl(&fd)? - OFlags::NONBLOCK)?;
        Ok(fd)
    }

    /// A clear error for a link met on the way.
    fn explain(&self, name: &OsStr, e: rustix::io::Errno) -> io::Error {
        if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::XDEV {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: is a symbolic link: files of a disk must be regular files in its folder",
                    self.path.join(name).display()
                ),
            )
        } else {
            e.into()
        }
    }

    /// Open the regular file `name` as an image backend.
    pub fn open_file(&self, name: &OsStr, mode: OpenMode) -> io::Result<FileIo> {
        let access = if mode.write {
            OFlags::RDWR
        } else {
            OFlags::RDONLY
        };
        let path = self.path.join(name);
        if mode.direct {
            match self.open_fd(name, access | OFlags::DIRECT, mode.create_new) {
                Ok(fd) => return FileIo::from_file(File::from(fd), &path, mode.lock, true),
                // tmpfs and some FUSE filesystems refuse O_DIRECT (a new
                // file was not made: EINVAL comes before the creation).
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {}
                Err(e) => return Err(e),
            }
        }
        let fd = self.open_fd(name, access, mode.create_new)?;
        FileIo::from_file(File::from(fd), &path, mode.lock, false)
    }

    /// Open the regular file `name` read-only, never through a link (for
    /// record locks on an image: see [`crate::locks`]).
    pub fn open_read(&self, name: &OsStr) -> io::Result<File> {
        self.open_fd(name, OFlags::RDONLY, false).map(File::from)
    }

    /// Open (or create) a regular file for a lock, never through a link.
    pub fn open_lock_file(&self, name: &OsStr) -> io::Result<File> {
        match self.open_fd(name, OFlags::RDWR, true) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                self.open_fd(name, OFlags::RDWR, false).map(File::from)
            }
            other => other.map(File::from),
        }
    }

    /// The whole of the regular file `name`, refused past `limit` bytes.
    pub fn read(&self, name: &OsStr, limit: u64) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let file = File::from(self.open_fd(name, OFlags::RDONLY, false)?);
        let mut out = Vec::new();
        file.take(limit + 1).read_to_end(&mut out)?;
        if out.len() as u64 > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: larger than {limit} bytes: refused",
                    self.path.join(name).display()
                ),
            ));
        }
        Ok(out)
    }

    /// Remove `name` (a link itself, never what it points at).
    pub fn remove(&self, name: &OsStr) -> io::Result<()> {
        check_name(name)?;
        Ok(rustix::fs::unlinkat(&self.dir, name, AtFlags::empty())?)
    }

    /// Rename `from` to `to`, both in this folder.
    pub fn rename(&self, from: &OsStr, to: &OsStr) -> io::Result<()> {
        check_name(from)?;
        check_name(to)?;
        Ok(rustix::fs::renameat(&self.dir, from, &self.dir, to)?)
    }

    /// A second name for the regular file `from`, in this folder (never
    /// following a link named `from`; `to` must not exist).
    pub fn link(&self, from: &OsStr, to: &OsStr) -> io::Result<()> {
        check_name(from)?;
        check_name(to)?;
        Ok(rustix::fs::linkat(
            &self.dir,
            from,
            &self.dir,
            to,
            rustix::fs::AtFlags::empty(),
        )?)
    }

    /// Whether something of that name is there (a link counts).
    pub fn exists(&self, name: &OsStr) -> bool {
        check_name(name).is_ok()
            && rustix::fs::statat(&self.dir, name, AtFlags::SYMLINK_NOFOLLOW).is_ok()
    }

    /// Device and inode of `name`, not following a link.
    pub fn identity(&self, name: &OsStr) -> io::Result<(u64, u64)> {
        check_name(name)?;
        let st = rustix::fs::statat(&self.dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
        Ok((st.st_dev, st.st_ino))
    }

    /// Make the folder's entries durable.
    pub fn sync(&self) -> io::Result<()> {
        let fd = rustix::fs::openat(
            &self.dir,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(rustix::fs::fsync(fd)?)
    }
}

impl AsFd for Folder {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.dir.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::CWD;

    #[test]
    fn links_fifos_and_paths_are_refused() {
        let tmp = std::env::temp_dir().join(format!("ploop-folder-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(tmp.join("plain"), b"data").unwrap();
        std::fs::write(tmp.join("secret"), b"root only").unwrap();
        std::os::unix::fs::symlink(tmp.join("secret"), tmp.join("link")).unwrap();
        rustix::fs::mkfifoat(CWD, tmp.join("fifo"), Mode::from_raw_mode(0o600)).unwrap();
        let f = Folder::open(&tmp).unwrap();
        assert_eq!(f.read(OsStr::new("plain"), 100).unwrap(), b"data");
        let e = f.read(OsStr::new("link"), 100).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        let e = f.read(OsStr::new("fifo"), 100).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = f.read(OsStr::new("../plain"), 100).unwrap_err().to_string();
        assert!(e.contains("not a plain file name"), "{e}");
        assert!(f.read(OsStr::new("plain"), 3).is_err(), "the size limit");
        // Removing a link removes the link only.
        f.remove(OsStr::new("link")).unwrap();
        assert!(tmp.join("secret").exists());
        // A lock file that is a link is refused, a new one is made.
        std::os::unix::fs::symlink(tmp.join("secret"), tmp.join("lck")).unwrap();
        assert!(f.open_lock_file(OsStr::new("lck")).is_err());
        f.open_lock_file(OsStr::new("new.lck")).unwrap();
        f.open_lock_file(OsStr::new("new.lck")).unwrap();
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
