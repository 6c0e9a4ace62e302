//! A record of every write and flush to a set of files, for crash
//! exploration: the files can be rebuilt as a power cut at any point of
//! the record would leave them.
//!
//! Each [`JournaledIo`] is one file; all of a [`Journal`]'s files share one
//! sequence of operations, as the files of one disk share one power supply.
//! A crash at point `k` (the first `k` operations issued) keeps, for each
//! file, everything before that file's last flush before `k`, plus any
//! subset of the later operations, in any order; a kept write may be torn,
//! keeping only some of its 512-byte sectors.

use std::collections::{BTreeMap, HashMap as NameMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::fsys::Fs;
use crate::{BlockIo, MemIo, OpenMode, SharedIo};

use crate::SECTOR;

#[derive(Clone, Debug)]
enum Change {
    Write(u64, Vec<u8>),
    Punch(u64, u64),
    SetLen(u64),
    Flush,
    /// Folder changes (recorded under [`FOLDER`]).
    Create(PathBuf, usize),
    Rename(PathBuf, PathBuf),
    Link(PathBuf, PathBuf),
    Remove(PathBuf),
    SyncDir,
}

/// The file id folder changes are recorded under.
const FOLDER: usize = usize::MAX;

#[derive(Default)]
struct Record {
    /// (file, change), in the order they were issued.
    ops: Vec<(usize, Change)>,
    names: Vec<String>,
}

/// The shared record of a set of files.
#[derive(Clone, Default)]
pub struct Journal {
    record: Arc<Mutex<Record>>,
}

/// How a crash treats the operations not yet flushed.
pub trait Survivors {
    /// Whether the drive wrote this one back before the power went.
    fn keep(&mut self) -> bool;
    /// For a kept write: which of its `sectors` made it (all, if None).
    fn torn(&mut self, sectors: usize) -> Option<Vec<bool>>;
    /// A permutation of `0..n`: the order kept operations land in.
    fn order(&mut self, n: usize) -> Vec<usize>;
    /// How many of `n` unsynced folder changes survive (they keep their
    /// order, so a prefix).
    fn prefix(&mut self, n: usize) -> usize {
        n
    }
}

impl Journal {
    pub fn new() -> Self {
        Self::default()
    }

    /// A new, empty file in this journal.
    pub fn create(&self, name: &str) -> JournaledIo {
        let mut r = self.record.lock().expect("journal lock");
        r.names.push(name.to_string());
        JournaledIo {
            id: r.names.len() - 1,
            live: MemIo::new(name),
            journal: self.clone(),
        }
    }

    fn push(&self, file: usize, c: Change) {
        self.record
            .lock()
            .expect("journal lock")
            .ops
            .push((file, c));
    }

    pub(crate) fn dir_create(&self, path: &Path, id: usize) {
        self.push(FOLDER, Change::Create(path.to_path_buf(), id));
    }

    pub(crate) fn dir_rename(&self, from: &Path, to: &Path) {
        self.push(FOLDER, Change::Rename(from.to_path_buf(), to.to_path_buf()));
    }

    pub(crate) fn dir_link(&self, from: &Path, to: &Path) {
        self.push(FOLDER, Change::Link(from.to_path_buf(), to.to_path_buf()));
    }

    pub(crate) fn dir_remove(&self, path: &Path) {
        self.push(FOLDER, Change::Remove(path.to_path_buf()));
    }

    pub(crate) fn dir_sync(&self) {
        self.push(FOLDER, Change::SyncDir);
    }

    /// The folder as a crash after the first `point` operations leaves it:
    /// file name to content. Folder changes since the last folder sync
    /// survive as a prefix (a journaling filesystem keeps their order);
    /// each file's content is as [`Journal::crash`] makes it.
    pub fn crash_folder(&self, point: usize, s: &mut dyn Survivors) -> BTreeMap<PathBuf, Vec<u8>> {
        let contents = self.crash(point, s);
        let r = self.record.lock().expect("journal lock");
        let changes: Vec<&Change> = r.ops[..point.min(r.ops.len())]
            .iter()
            .filter(|(f, _)| *f == FOLDER)
            .map(|(_, c)| c)
            .collect();
        let synced = changes
            .iter()
            .rposition(|c| matches!(c, Change::SyncDir))
            .map_or(0, |i| i + 1);
        let pending = changes.len() - synced;
        let kept = synced + s.prefix(pending);
        let mut names: BTreeMap<PathBuf, usize> = BTreeMap::new();
        for c in &changes[..kept] {
            match c {
                Change::Create(p, id) => {
                    names.insert(p.clone(), *id);
                }
                Change::Rename(from, to) => {
                    if let Some(id) = names.remove(from) {
                        names.insert(to.clone(), id);
                    }
                }
                Change::Link(from, to) => {
                    if let Some(&id) = names.get(from) {
                        names.insert(to.clone(), id);
                    }
                }
                Change::Remove(p) => {
                    names.remove(p);
                }
                _ => {}
            }
        }
        names
            .into_iter()
            .map(|(p, id)| (p, contents[id].clone()))
            .collect()
    }

    /// Operations recorded so far: crash points are `0..=len()`.
    pub fn len(&self) -> usize {
        self.record.lock().expect("journal lock").ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether operation `i` is a flush (a point worth crashing at twice).
    pub fn is_flush(&self, i: usize) -> bool {
        matches!(
            self.record.lock().expect("journal lock").ops.get(i),
            Some((_, Change::Flush))
        )
    }

    /// Every file as a crash after the first `point` operations leaves it
    /// (index = file id).
    pub fn crash(&self, point: usize, s: &mut dyn Survivors) -> Vec<Vec<u8>> {
        let r = self.record.lock().expect("journal lock");
        let ops = &r.ops[..point.min(r.ops.len())];
        (0..r.names.len())
            .map(|file| {
                let mine: Vec<&Change> = ops
                    .iter()
                    .filter(|(f, _)| *f == file)
                    .map(|(_, c)| c)
                    .collect();
                let flushed = mine
                    .iter()
                    .rposition(|c| matches!(c, Change::Flush))
                    .map_or(0, |i| i + 1);
                let img = MemIo::new(&r.names[file]);
                for c in &mine[..flushed] {
                    apply(&img, c, None);
                }
                let pending: Vec<&Change> = mine[flushed..]
                    .iter()
                    .copied()
                    .filter(|c| !matches!(c, Change::Flush))
                    .collect();
                let kept: Vec<&Change> = pending.into_iter().filter(|_| s.keep()).collect();
                for i in s.order(kept.len()) {
                    let c = kept[i];
                    let torn = match c {
                        Change::Write(off, data) => s.torn(sectors_spanned(*off, data.len())),
                        _ => None,
                    };
                    apply(&img, c, torn.as_deref());
                }
                img.snapshot()
            })
            .collect()
    }
}

/// How many device sectors a write touches.
fn sectors_spanned(off: u64, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let last = off + len as u64 - 1;
    (last / SECTOR - off / SECTOR + 1) as usize
}

fn apply(img: &MemIo, c: &Change, sectors: Option<&[bool]>) {
    // In-memory: these cannot fail.
    let _ = match c {
        Change::Write(off, data) => match sectors {
            None => img.write_at(data, *off),
            Some(keep) => {
                // Pieces split at the device's sector boundaries.
                let mut at = 0usize;
                let mut i = 0;
                while at < data.len() {
                    let pos = off + at as u64;
                    let n = ((SECTOR - pos % SECTOR) as usize).min(data.len() - at);
                    if keep.get(i).copied().unwrap_or(true) {
                        let _ = img.write_at(&data[at..at + n], pos);
                    }
                    at += n;
                    i += 1;
                }
                Ok(())
            }
        },
        Change::Punch(off, len) => img.punch_hole(*off, *len),
        Change::SetLen(len) => img.set_len(*len),
        _ => Ok(()),
    };
}

/// One file of a [`Journal`]: reads see every write at once; the journal
/// keeps what a crash would make of them.
pub struct JournaledIo {
    id: usize,
    live: MemIo,
    journal: Journal,
}

impl JournaledIo {
    /// This file's id in its journal.
    pub fn id(&self) -> usize {
        self.id
    }

    fn record(&self, c: Change) {
        self.journal
            .record
            .lock()
            .expect("journal lock")
            .ops
            .push((self.id, c));
    }
}

impl BlockIo for JournaledIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.live.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.live.write_at(buf, offset)?;
        self.record(Change::Write(offset, buf.to_vec()));
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.record(Change::Flush);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.live.punch_hole(offset, len)?;
        self.record(Change::Punch(offset, len));
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.live.set_len(len)?;
        self.record(Change::SetLen(len));
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        self.live.size()
    }

    fn describe(&self) -> String {
        self.live.describe()
    }
}

// --- A whole filesystem in the journal --------------------------------------

/// A filesystem held in a [`Journal`]: file contents, and the folder's
/// creations, renames and removals, all in one recorded sequence.
pub struct JournaledFs {
    journal: Journal,
    names: Mutex<NameMap<PathBuf, Arc<JournaledIo>>>,
}

impl JournaledFs {
    pub fn new(journal: Journal) -> Self {
        Self {
            journal,
            names: Mutex::new(NameMap::new()),
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

    fn link(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut names = self.names.lock().expect("names lock");
        let f = names.get(from).ok_or_else(|| not_found(from))?.clone();
        if names.contains_key(to) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        names.insert(to.to_path_buf(), f);
        self.journal.dir_link(from, to);
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

#[cfg(test)]
mod tests {
    use super::*;

    struct KeepNone;
    impl Survivors for KeepNone {
        fn keep(&mut self) -> bool {
            false
        }
        fn torn(&mut self, _: usize) -> Option<Vec<bool>> {
            None
        }
        fn order(&mut self, n: usize) -> Vec<usize> {
            (0..n).collect()
        }
    }

    struct KeepAllTornFirstSector;
    impl Survivors for KeepAllTornFirstSector {
        fn keep(&mut self) -> bool {
            true
        }
        fn torn(&mut self, n: usize) -> Option<Vec<bool>> {
            Some((0..n).map(|i| i == 0).collect())
        }
        fn order(&mut self, n: usize) -> Vec<usize> {
            (0..n).rev().collect()
        }
    }

    #[test]
    fn crash_keeps_flushed_and_chosen_writes_per_file() {
        let j = Journal::new();
        let a = j.create("a");
        let b = j.create("b");
        a.write_at(&[1; 1024], 0).unwrap();
        a.flush().unwrap();
        b.write_at(&[2; 1024], 0).unwrap();
        a.write_at(&[3; 1024], 0).unwrap();
        assert_eq!(j.len(), 4);
        let none = j.crash(4, &mut KeepNone);
        assert_eq!(none[0], vec![1; 1024]);
        assert!(none[1].is_empty());
        let torn = j.crash(4, &mut KeepAllTornFirstSector);
        assert_eq!(&torn[0][..512], &[3; 512]);
        assert_eq!(&torn[0][512..], &[1; 512]);
        assert_eq!(torn[1].len(), 512);
        // Before the flush, nothing of a is certain.
        assert!(j.crash(1, &mut KeepNone)[0].is_empty());
    }
}
