//! The filesystem as the image layer sees it: files to open, names to
//! rename and remove, folders to sync. Normally the real one; a crash test
//! can put a journaled one in its place for the calling thread, so that
//! the real operations (snapshot, merge, descriptor saves) run on files
//! whose every write, rename and sync is recorded.

use std::cell::RefCell;
use std::io;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use crate::{Folder, OpenMode, SharedIo};

/// What the image layer needs of a filesystem.
pub trait Fs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<SharedIo>;
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// A second name for a file, in its folder.
    fn link(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
    /// Make the folder's entries (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

thread_local! {
    static REPLACED: RefCell<Option<Rc<dyn Fs>>> = const { RefCell::new(None) };
}

/// Run `f` with `fs` in place of the real filesystem on this thread.
pub fn with_fs<T>(fs: Rc<dyn Fs>, f: impl FnOnce() -> T) -> T {
    /// Puts the earlier filesystem back, even if `f` panics.
    struct Restore(Option<Rc<dyn Fs>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let before = self.0.take();
            REPLACED.with(|r| *r.borrow_mut() = before);
        }
    }
    let _restore = Restore(REPLACED.with(|r| r.replace(Some(fs))));
    f()
}

fn replaced() -> Option<Rc<dyn Fs>> {
    REPLACED.with(|r| r.borrow().clone())
}

/// Whether a replacement is in place (file locks then mean nothing).
pub fn is_replaced() -> bool {
    replaced().is_some()
}

// On the real filesystem every name is looked up in its folder without
// following a symbolic link, and only regular files are opened (see
// `Folder`): the folder of a disk may belong to a container's owner.

/// Open the regular file at `path` (its last name never a link).
pub fn open(path: &Path, mode: OpenMode) -> io::Result<SharedIo> {
    match replaced() {
        Some(fs) => fs.open(path, mode),
        None => {
            let (dir, name) = Folder::of(path)?;
            Ok(Arc::new(dir.open_file(name, mode)?))
        }
    }
}

/// Files read whole (descriptors) are refused past this size.
pub const READ_LIMIT: u64 = 1 << 20;

/// The whole regular file at `path`, up to [`READ_LIMIT`] bytes.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    match replaced() {
        Some(fs) => fs.read(path),
        None => {
            let (dir, name) = Folder::of(path)?;
            dir.read(name, READ_LIMIT)
        }
    }
}

/// Rename within one folder.
pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    match replaced() {
        Some(fs) => fs.rename(from, to),
        None => {
            let (dir, from_name) = Folder::of(from)?;
            if to.parent() != from.parent() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: a rename leaves its folder", to.display()),
                ));
            }
            let to_name = to.file_name().unwrap_or_default();
            dir.rename(from_name, to_name)
        }
    }
}

/// A second name for the file `from`, in the same folder.
pub fn link(from: &Path, to: &Path) -> io::Result<()> {
    match replaced() {
        Some(fs) => fs.link(from, to),
        None => {
            let (dir, from_name) = Folder::of(from)?;
            if to.parent() != from.parent() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: a link leaves its folder", to.display()),
                ));
            }
            dir.link(from_name, to.file_name().unwrap_or_default())
        }
    }
}

/// Remove a name (a link itself, never what it points at).
pub fn remove(path: &Path) -> io::Result<()> {
    match replaced() {
        Some(fs) => fs.remove(path),
        None => {
            let (dir, name) = Folder::of(path)?;
            dir.remove(name)
        }
    }
}

/// Whether something of that name is there (a link counts).
pub fn exists(path: &Path) -> bool {
    match replaced() {
        Some(fs) => fs.exists(path),
        None => Folder::of(path).is_ok_and(|(dir, name)| dir.exists(name)),
    }
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    match replaced() {
        Some(fs) => fs.sync_dir(dir),
        None => Folder::open(dir)?.sync(),
    }
}

/// Write a new file, replacing any of that name, and make its content
/// durable (not its folder entry).
pub fn write_synced(path: &Path, data: &[u8]) -> io::Result<()> {
    match remove(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        r => r?,
    }
    let io = open(path, OpenMode::create())?;
    io.write_at(data, 0)?;
    io.flush()
}

#[cfg(any(test, feature = "test-support"))]
pub use crate::journal::JournaledFs;
