//! The filesystem as the image layer sees it: files to open, names to
//! rename and remove, folders to sync. Normally the real one; a crash test
//! can put a journaled one in its place for the calling thread, so that
//! the real operations (snapshot, merge, descriptor saves) run on files
//! whose every write, rename and sync is recorded.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use crate::journal::{Journal, JournaledIo};
use crate::{BlockIo, Folder, OpenMode, SharedIo};

/// What the image layer needs of a filesystem.
pub trait Fs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<SharedIo>;
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
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

/// A filesystem held in a [`Journal`]: file contents, and the folder's
/// creations, renames and removals, all in one recorded sequence.
pub struct JournaledFs {
    journal: Journal,
    names: Mutex<HashMap<PathBuf, Arc<JournaledIo>>>,
}

impl JournaledFs {
    pub fn new(journal: Journal) -> Self {
        Self {
            journal,
            names: Mutex::new(HashMap::new()),
        }
    }
}

/// A handle opened without write access: writes fail, as with EBADF.
struct ReadOnly(Arc<JournaledIo>);

fn read_only() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "file opened read-only")
}

impl BlockIo for ReadOnly {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(read_only())
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
    fn punch_hole(&self, _: u64, _: u64) -> io::Result<()> {
        Err(read_only())
    }
    fn set_len(&self, _: u64) -> io::Result<()> {
        Err(read_only())
    }
    fn size(&self) -> io::Result<u64> {
        self.0.size()
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file", path.display()),
    )
}

impl Fs for JournaledFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<SharedIo> {
        let mut names = self.names.lock().expect("names lock");
        if let Some(f) = names.get(path) {
            if mode.create_new {
                return Err(io::ErrorKind::AlreadyExists.into());
            }
            if !mode.write {
                return Ok(Arc::new(ReadOnly(f.clone())));
            }
            return Ok(f.clone());
        }
        if !mode.create_new {
            return Err(not_found(path));
        }
        let f = Arc::new(self.journal.create(&path.display().to_string()));
        self.journal.dir_create(path, f.id());
        names.insert(path.to_path_buf(), f.clone());
        Ok(f)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let names = self.names.lock().expect("names lock");
        let f = names.get(path).ok_or_else(|| not_found(path))?;
        let mut buf = vec![0u8; f.size()? as usize];
        f.read_at(&mut buf, 0)?;
        Ok(buf)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut names = self.names.lock().expect("names lock");
        let f = names.remove(from).ok_or_else(|| not_found(from))?;
        names.insert(to.to_path_buf(), f);
        self.journal.dir_rename(from, to);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut names = self.names.lock().expect("names lock");
        names.remove(path).ok_or_else(|| not_found(path))?;
        self.journal.dir_remove(path);
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        self.names.lock().expect("names lock").contains_key(path)
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        self.journal.dir_sync();
        Ok(())
    }
}
