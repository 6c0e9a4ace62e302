//! One ploop delta file: header, BAT and data clusters.
//!
//! Concurrency: lookups take the BAT read lock only; writes to allocated
//! clusters go straight to the file. Allocation is serialised by one mutex
//! that is held while the new cluster's data is written, so two writers can
//! never allocate the same virtual cluster twice.
//!
//! Durability: a BAT entry reaches the disk only in [`PloopDelta::flush`],
//! after an fdatasync that made every cluster it may point at durable. A
//! crash can therefore leak clusters at the end of the file but never
//! expose a BAT entry that points at unwritten data.
//!
//! Reuse: a cluster unmapped by a discard may still be the target of I/O
//! that looked its mapping up just before (a write queued on io_uring, or
//! one between its lookup and its `pwrite`). Such I/O pins the current
//! epoch ([`PloopDelta::pin`]); freed clusters wait in quarantine until
//! every pin from their epoch is gone, so late data can only land in a
//! cluster nobody reads, never in one handed to another virtual cluster.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use ploop_io::{AlignedBuf, SharedIo};

use super::bat::scan_bat;
use super::cbt::Cbt;
use super::free::FreeClusters;
use super::header::{
    entry_to_offset, offset_to_entry, Header, RawHeader, Version, CLOSED_V21_MAGIC, FLAG_EMPTY,
    HEADER_SIZE, IN_USE_MAGIC,
};
use crate::{Error, Result};

mod relocate;
pub use relocate::Move;

/// Metadata is written back in pages of this size (O_DIRECT-friendly).
pub const META_PAGE: u64 = 4096;

/// Supplies a cluster's content from below the delta being written.
pub type FillFn<'a> = &'a dyn Fn(&mut [u8]) -> Result<()>;

/// How to open a delta.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenFlags {
    pub writable: bool,
    /// Open even if the in-use flag is set (read-only opens always may).
    pub allow_dirty: bool,
}

/// Parameters of a new delta.
#[derive(Clone, Copy, Debug)]
pub struct CreateOptions {
    pub virtual_size: u64,
    pub cluster_size: u64,
    pub version: Version,
    /// Allocate and map every cluster up front (OpenVZ "preallocated").
    pub preallocate: bool,
}

struct Dirty {
    pages: BTreeSet<u64>,
    /// File clusters unmapped since the last flush: reusable once the BAT
    /// that no longer points at them is durable.
    freed: Vec<u64>,
}

struct Alloc {
    /// File cluster index where the next new cluster goes.
    end: u64,
    /// Unreferenced file clusters inside the file, safe to reuse.
    free: FreeClusters,
    /// Unreferenced durably, but maybe still targeted by pinned I/O:
    /// (epoch when quarantined, file cluster index).
    quarantine: Vec<(u64, u64)>,
}

/// Grace periods for reusing clusters, in the manner of RCU with two
/// counters: pins are counted in the slot of the epoch they started in, and
/// the epoch moves on only once the slot of the one before is empty.
#[derive(Default)]
struct Epochs {
    current: AtomicU64,
    pins: [AtomicUsize; 2],
}

impl Epochs {
    fn pin(self: &Arc<Self>) -> MappingPin {
        loop {
            let epoch = self.current.load(Ordering::SeqCst);
            let slot = (epoch & 1) as usize;
            self.pins[slot].fetch_add(1, Ordering::SeqCst);
            // Counted in the slot an advance checks before it moves on,
            // or not at all (try again in the new epoch).
            if self.current.load(Ordering::SeqCst) == epoch {
                return MappingPin {
                    epochs: self.clone(),
                    slot,
                };
            }
            self.pins[slot].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Move on if no pin of the previous epoch is left; the epoch now.
    /// Callers hold the allocation lock, so advances never race.
    fn try_advance(&self) -> u64 {
        let epoch = self.current.load(Ordering::SeqCst);
        let previous = ((epoch + 1) & 1) as usize;
        if self.pins[previous].load(Ordering::SeqCst) != 0 {
            return epoch;
        }
        self.current.store(epoch + 1, Ordering::SeqCst);
        epoch + 1
    }
}

/// Held by I/O from before it looks a mapping up until its data has moved:
/// clusters unmapped meanwhile are not reused before it is dropped.
pub struct MappingPin {
    epochs: Arc<Epochs>,
    slot: usize,
}

impl Drop for MappingPin {
    fn drop(&mut self) {
        self.epochs.pins[self.slot].fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct PloopDelta {
    io: SharedIo,
    path: String,
    header: Header,
    raw: Mutex<RawHeader>,
    bat: RwLock<Vec<u32>>,
    dirty: Mutex<Dirty>,
    alloc: Mutex<Alloc>,
    /// Serialises flushes and header writes.
    meta: Mutex<()>,
    /// Number of mapped BAT entries.
    mapped: AtomicU64,
    /// Freed clusters a flush has taken and not yet quarantined (while it
    /// writes the BAT): pending like those still in `dirty.freed`.
    freeing: AtomicU64,
    /// Data syncs of the file made outside [`flush`](Self::flush) (an
    /// io_uring fsync), in flight: a flush waits for them, so that a
    /// write-back error one of them consumes is known (as `failed`)
    /// before the flush writes BAT entries.
    outside_syncs: AtomicUsize,
    /// Virtual clusters changed while tracking is on (an online merge
    /// copies them again at the end).
    tracking: AtomicBool,
    changed: Mutex<BTreeSet<u64>>,
    /// The changed-block bitmap kept while open for writing (loaded from
    /// the format extension of a cleanly closed image, or started by a
    /// snapshot), saved in it again by a clean close.
    cbt: RwLock<Option<Arc<Cbt>>>,
    /// Whether `cbt` holds one: every write asks, most disks keep none,
    /// and a load costs less than taking the lock. Changed under its
    /// write lock.
    has_cbt: AtomicBool,
    epochs: Arc<Epochs>,
    writable: bool,
    open: AtomicBool,
    /// A data sync failed: Linux may have dropped the pages it could not
    /// write and will not report that again, so a later sync could
    /// succeed with data missing. The delta then takes no more writes and
    /// makes nothing durable, its in-use flag stays set, and the next
    /// writer must check it.
    failed: AtomicBool,
}

/// Read header + BAT from a backend without validating the BAT entries.
pub(crate) fn read_metadata(io: &SharedIo) -> Result<(Header, Vec<u32>, u64)> {
    let path = io.describe();
    let size = io
        .size()
        .map_err(|e| Error::io(&path, "reading file size", 0, e))?;
    if size < HEADER_SIZE as u64 {
        return Err(Error::corrupt(
            &path,
            format!("truncated: file is {size} bytes, a ploop header needs {HEADER_SIZE}"),
        ));
    }
    let mut hb = [0u8; HEADER_SIZE];
    io.read_at(&mut hb, 0)
        .map_err(|e| Error::io(&path, "reading header", 0, e))?;
    let header = Header::validate(RawHeader::parse(&hb), &path)?;
    let bat_bytes = 4 * u64::from(header.bat_entries);
    if size < HEADER_SIZE as u64 + bat_bytes {
        return Err(Error::corrupt(
            &path,
            format!(
                "truncated: file is {size} bytes but its BAT of {} entries ends at byte {}",
                header.bat_entries,
                HEADER_SIZE as u64 + bat_bytes
            ),
        ));
    }
    // Read in chunks, the table growing as the file really holds it (a
    // sparse file may claim billions of entries), and memory refused with
    // an error rather than an abort.
    let mut bat: Vec<u32> = Vec::new();
    let mut chunk = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < bat_bytes {
        let n = (bat_bytes - at).min(chunk.len() as u64) as usize;
        bat.try_reserve(n / 4).map_err(|_| {
            Error::corrupt(
                &path,
                format!(
                    "its BAT of {} entries does not fit in memory",
                    header.bat_entries
                ),
            )
        })?;
        let off = HEADER_SIZE as u64 + at;
        io.read_at(&mut chunk[..n], off)
            .map_err(|e| Error::io(&path, "reading BAT", off, e))?;
        bat.extend(
            chunk[..n]
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))),
        );
        at += n as u64;
    }
    Ok((header, bat, size))
}

/// The bytes of metadata page `page` (header + BAT) from in-memory state.
pub(crate) fn metadata_page(page: u64, raw: &RawHeader, bat: &[u32]) -> AlignedBuf {
    let mut buf = AlignedBuf::zeroed(META_PAGE as usize);
    let out = buf.as_mut_slice();
    let start = page * META_PAGE;
    if page == 0 {
        out[..HEADER_SIZE].copy_from_slice(&raw.to_bytes());
    }
    let first = start.saturating_sub(HEADER_SIZE as u64) / 4;
    for i in first..bat.len() as u64 {
        let at = HEADER_SIZE as u64 + 4 * i - start;
        if at >= META_PAGE {
            break;
        }
        let at = at as usize;
        out[at..at + 4].copy_from_slice(&bat[i as usize].to_le_bytes());
    }
    buf
}

/// Write metadata pages (header + BAT) `pages` from in-memory state.
pub(crate) fn write_metadata_pages(
    io: &SharedIo,
    pages: impl IntoIterator<Item = u64>,
    raw: &RawHeader,
    bat: &[u32],
) -> Result<()> {
    for page in pages {
        let b = metadata_page(page, raw, bat);
        io.write_at(b.as_slice(), page * META_PAGE)
            .map_err(|e| Error::io(io.describe(), "writing BAT", page * META_PAGE, e))?;
    }
    Ok(())
}

/// Metadata page that holds BAT entry `cluster`.
pub(crate) fn page_of(cluster: u64) -> u64 {
    (HEADER_SIZE as u64 + 4 * cluster) / META_PAGE
}

impl PloopDelta {
    /// Write a new, empty (or preallocated) delta to an empty backend.
    pub fn create(io: SharedIo, opts: CreateOptions) -> Result<()> {
        let path = io.describe();
        let header = Header::new(opts.virtual_size, opts.cluster_size, opts.version)?;
        let name = path.as_str();
        let ioerr = |op, off| move |e| Error::io(name, op, off, e);
        let mut bat = vec![0u32; header.bat_entries as usize];
        let mut end = header.data_offset;
        let mut raw = header.raw;
        if opts.preallocate {
            let data = u64::from(header.bat_entries) * header.cluster_size;
            io.preallocate(header.data_offset, data)
                .map_err(ioerr("preallocating data clusters", header.data_offset))?;
            // Written zeros, not just reserved space: OpenVZ's check refuses
            // unwritten extents that later writes split off cluster bounds.
            let zeros = AlignedBuf::zeroed(header.cluster_size.min(1 << 20) as usize);
            let mut off = header.data_offset;
            while off < header.data_offset + data {
                io.write_at(zeros.as_slice(), off)
                    .map_err(ioerr("zeroing data clusters", off))?;
                off += zeros.len() as u64;
            }
            for (i, e) in bat.iter_mut().enumerate() {
                let off = header.data_offset + i as u64 * header.cluster_size;
                *e = offset_to_entry(&header, off).ok_or_else(|| {
                    Error::Invalid("image too large to preallocate in this version".into())
                })?;
            }
            end += data;
            raw.flags &= !FLAG_EMPTY;
        }
        io.set_len(end).map_err(ioerr("setting file size", end))?;
        let pages = header.data_offset.div_ceil(META_PAGE);
        for page in 0..pages {
            let buf = metadata_page(page, &raw, &bat);
            io.write_at(buf.as_slice(), page * META_PAGE)
                .map_err(ioerr("writing metadata", page * META_PAGE))?;
        }
        io.flush().map_err(ioerr("syncing new image", 0))?;
        Ok(())
    }

    /// Open and validate a delta. A writable open marks the image in use.
    pub fn open(io: SharedIo, flags: OpenFlags) -> Result<Self> {
        let path = io.describe();
        let (mut header, bat, size) = read_metadata(&io)?;
        if flags.writable && header.in_use && !flags.allow_dirty {
            return Err(Error::Dirty { path });
        }
        let mut cbt = None;
        if flags.writable && header.raw.format_extension_offset != 0 {
            // The extension's clusters would be reused by new data: drop
            // it in the header write below that marks the image in use,
            // as OpenVZ does (and cut them off the file); unless it holds
            // a feature we do not know and may not drop. Its bitmap goes
            // on in memory, and is saved again by a clean close; not after
            // a crash (the in-use flag still set): writes made since may
            // be missing from it.
            let state = super::ext::read(&io, &header, &bat, size)
                .map_err(|e| Error::io(&path, "reading the format extension", 0, e))?;
            if let super::ext::State::Live(ext) = &state {
                if let Some(f) = ext.features.iter().find(|f| f.forbids_dropping()) {
                    return Err(Error::Invalid(format!(
                        "{path}: its format extension holds a feature this tool does not know and must keep ({f:?}): it can only be opened read-only"
                    )));
                }
                if header.in_use {
                    tracing::warn!(
                        "{path}: not closed cleanly: its changed-block bitmap cannot be trusted and is dropped"
                    );
                } else {
                    cbt = super::ext::load_bitmap(&io, &header, ext)
                        .map_err(|e| Error::io(&path, "reading the changed-block bitmap", 0, e))?
                        .map(Arc::new);
                    if cbt.is_none()
                        && ext
                            .features
                            .iter()
                            .any(|f| matches!(f, super::ext::Feature::DirtyBitmap { .. }))
                    {
                        tracing::warn!(
                            "{path}: its changed-block bitmap does not fit the disk: dropped"
                        );
                    }
                }
            } else {
                tracing::warn!("{path}: dropping a format extension that does not check out");
            }
            header.raw.format_extension_offset = 0;
        }
        if let Some(p) = scan_bat(&header, &bat, size).into_iter().next() {
            return Err(Error::corrupt(&path, p.to_string()));
        }
        let cs = header.cluster_size;
        let end = size.div_ceil(cs).max(header.data_offset / cs);
        let free = unreferenced_clusters(&header, &bat, end);
        let mapped = bat.iter().filter(|&&e| e != 0).count() as u64;
        let delta = Self {
            mapped: AtomicU64::new(mapped),
            freeing: AtomicU64::new(0),
            outside_syncs: AtomicUsize::new(0),
            tracking: AtomicBool::new(false),
            changed: Mutex::new(BTreeSet::new()),
            has_cbt: AtomicBool::new(cbt.is_some()),
            cbt: RwLock::new(cbt),
            raw: Mutex::new(header.raw),
            io,
            path,
            header,
            bat: RwLock::new(bat),
            dirty: Mutex::new(Dirty {
                pages: BTreeSet::new(),
                freed: Vec::new(),
            }),
            alloc: Mutex::new(Alloc {
                end,
                free,
                quarantine: Vec::new(),
            }),
            epochs: Arc::default(),
            meta: Mutex::new(()),
            writable: flags.writable,
            open: AtomicBool::new(true),
            failed: AtomicBool::new(false),
        };
        if flags.writable {
            delta.set_in_use(true)?;
            // Clusters leaked at the tail by a crash go back, and those of
            // a dropped extension, now that the header no longer names it.
            delta.trim_tail(&mut delta.alloc.lock().expect("alloc lock"))?;
        }
        Ok(delta)
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn io(&self) -> &SharedIo {
        &self.io
    }

    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size
    }

    pub fn virtual_size(&self) -> u64 {
        self.header.virtual_size
    }

    /// Open for writing, and not closed since.
    pub fn is_writable(&self) -> bool {
        self.writable && self.open.load(Ordering::SeqCst)
    }

    /// Number of virtual clusters this delta can hold: the disk's, or
    /// fewer where its BAT is shorter than the disk.
    pub fn clusters(&self) -> u64 {
        self.header
            .virtual_size
            .div_ceil(self.header.cluster_size)
            .min(u64::from(self.header.bat_entries))
    }

    /// File offset of virtual cluster `cluster` if this delta holds it.
    pub fn map(&self, cluster: u64) -> Option<u64> {
        let bat = self.bat.read().expect("bat lock");
        match bat.get(cluster as usize) {
            Some(&e) if e != 0 => Some(entry_to_offset(&self.header, e)),
            _ => None,
        }
    }

    /// Pin the mappings looked up from now until the pin is dropped: a
    /// cluster unmapped meanwhile is not handed to another virtual cluster.
    pub fn pin(&self) -> MappingPin {
        self.epochs.pin()
    }

    /// Count of mapped clusters.
    pub fn allocated_clusters(&self) -> u64 {
        let bat = self.bat.read().expect("bat lock");
        bat.iter().filter(|&&e| e != 0).count() as u64
    }

    /// Read from the file at a mapped offset.
    pub fn read_data(&self, buf: &mut [u8], file_offset: u64) -> Result<()> {
        self.io
            .read_at(buf, file_offset)
            .map_err(|e| Error::io(&self.path, "reading data", file_offset, e))
    }

    /// Write into an already mapped cluster.
    pub fn write_data(&self, buf: &[u8], file_offset: u64) -> Result<()> {
        self.ensure_open()?;
        self.ensure_healthy()?;
        self.io
            .write_at(buf, file_offset)
            .map_err(|e| Error::io(&self.path, "writing data", file_offset, e))
    }

    fn ensure_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::Invalid(format!(
                "{}: delta is open read-only",
                self.path
            )));
        }
        self.ensure_open()?;
        self.ensure_healthy()
    }

    /// Err once closed: a closed delta's in-use flag is clear, so a write
    /// after that (a swap that failed halfway) must not land.
    fn ensure_open(&self) -> Result<()> {
        if !self.open.load(Ordering::SeqCst) {
            return Err(Error::Invalid(format!("{}: delta is closed", self.path)));
        }
        Ok(())
    }

    /// Err once a flush has failed (see the `failed` field).
    pub fn ensure_healthy(&self) -> Result<()> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(Error::FlushFailed {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// Write `data` at `offset` inside virtual cluster `cluster`, allocating
    /// the cluster if needed. On allocation the rest of the cluster comes from
    /// `fill` (the content below this delta), or stays zero (sparse) if None.
    pub fn write_cluster(
        &self,
        cluster: u64,
        offset: u64,
        data: &[u8],
        fill: Option<FillFn>,
    ) -> Result<()> {
        self.ensure_writable()?;
        let cs = self.header.cluster_size;
        debug_assert!(offset + data.len() as u64 <= cs);
        if cluster >= self.clusters() {
            // A BAT shorter than the disk (qemu and OpenVZ accept those):
            // the clusters past it read as zeros and have nowhere to go.
            return Err(Error::corrupt(
                &self.path,
                format!(
                    "cannot write cluster {cluster}: the BAT maps only the first {} clusters of the disk",
                    self.clusters()
                ),
            ));
        }
        {
            let _pin = self.pin();
            if let Some(off) = self.map(cluster) {
                return self.write_data(data, off + offset);
            }
        }
        let mut tries = 0;
        let mut alloc = loop {
            let mut alloc = self.alloc.lock().expect("alloc lock");
            // Checked under the lock that allocates: another writer may
            // have taken a free cluster meanwhile. Bounded: a pin held for
            // long (a stuck request) makes the file grow rather than stall.
            if tries == 100 || !self.must_make_room(&mut alloc) {
                break alloc;
            }
            drop(alloc);
            tries += 1;
            if self.frees_unflushed() {
                // Their BAT change made durable (another writer's flush
                // may have done it meanwhile: then this one is cheap).
                self.flush()?;
            } else {
                // Only reads of their time hold them.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        // Pinned before the lookup and held through the write, which runs
        // after the lock is gone: otherwise a discard and a flush could free
        // the cluster and an allocation hand it to another virtual cluster
        // before this write lands. (Pinning cannot spin here: epochs only
        // advance under the allocation lock, which we hold.)
        let pin = self.pin();
        if let Some(off) = self.map(cluster) {
            drop(alloc);
            let written = self.write_data(data, off + offset);
            drop(pin);
            return written;
        }
        drop(pin);
        self.allocate_locked(&mut alloc, cluster, offset, data, fill)
    }

    /// Whether an allocation now would grow the file past the disk's size
    /// plus metadata (no free cluster, the end at the most a disk this
    /// size can use) while clusters freed since the last flush wait: for
    /// their BAT change to be durable, or for reads of their time to end.
    /// A trim-heavy writer with few flushes otherwise grows the image past
    /// the disk. Releases what quarantine may release first.
    fn must_make_room(&self, alloc: &mut Alloc) -> bool {
        let limit = self.header.data_offset / self.header.cluster_size + self.clusters();
        if !alloc.free.is_empty() || alloc.end < limit {
            return false;
        }
        self.release_quarantined(alloc);
        if !alloc.free.is_empty() {
            return false;
        }
        // Read under the dirty lock, under which a flush takes the freed
        // clusters and counts them (or puts them back on an error).
        let dirty = self.dirty.lock().expect("dirty lock");
        !alloc.quarantine.is_empty()
            || !dirty.freed.is_empty()
            || self.freeing.load(Ordering::SeqCst) != 0
    }

    /// Whether freed clusters wait for a flush (rather than only for pins
    /// of their time).
    fn frees_unflushed(&self) -> bool {
        let dirty = self.dirty.lock().expect("dirty lock");
        !dirty.freed.is_empty() || self.freeing.load(Ordering::SeqCst) != 0
    }

    /// Allocate `cluster` (unmapped, allocation lock held) and write it.
    fn allocate_locked(
        &self,
        alloc: &mut Alloc,
        cluster: u64,
        offset: u64,
        data: &[u8],
        fill: Option<FillFn>,
    ) -> Result<()> {
        let cs = self.header.cluster_size;
        if alloc.free.is_empty() {
            self.release_quarantined(alloc);
        }
        let index = match alloc.free.pop_first() {
            Some(i) => i,
            None => alloc.end,
        };
        let file_off = index * cs;
        // Out of room is ENOSPC, as from a full disk: a filesystem or an
        // NBD client then reports (or pauses on) a full device.
        let entry = offset_to_entry(&self.header, file_off).ok_or_else(|| {
            Error::io(
                &self.path,
                "growing the image (a version 1 image stops at 2 TiB: `ploop convert -v 2`)",
                file_off,
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            )
        })?;
        // A new cluster is always written whole: OpenVZ's check refuses
        // sparse delta files, and a full write costs one request anyway.
        if offset == 0 && data.len() as u64 == cs {
            self.write_data(data, file_off)?;
        } else {
            let mut buf = AlignedBuf::zeroed(cs as usize);
            if let Some(fill) = fill {
                fill(buf.as_mut_slice())?;
            }
            buf.as_mut_slice()[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            self.write_data(buf.as_slice(), file_off)?;
        }
        if index == alloc.end {
            alloc.end += 1;
        }
        let mut bat = self.bat.write().expect("bat lock");
        bat[cluster as usize] = entry;
        self.mapped.fetch_add(1, Ordering::Relaxed);
        self.dirty
            .lock()
            .expect("dirty lock")
            .pages
            .insert(page_of(cluster));
        Ok(())
    }

    /// Make a byte range of a mapped cluster read as zeros. If `unmap` and
    /// the range is the whole cluster, the cluster is released instead and
    /// its space returned to the filesystem.
    pub fn discard(&self, cluster: u64, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.ensure_writable()?;
        let cs = self.header.cluster_size;
        let pin = self.pin();
        let Some(file_off) = self.map(cluster) else {
            return Ok(());
        };
        let whole = offset == 0 && len == cs;
        if !whole {
            // Zeros written, not a hole: partial holes make the delta sparse.
            let zeros = AlignedBuf::zeroed(len as usize);
            return self.write_data(zeros.as_slice(), file_off + offset);
        }
        if !unmap {
            return self
                .io
                .zero_range(file_off, cs)
                .map_err(|e| Error::io(&self.path, "zeroing cluster", file_off, e));
        }
        // Unmapping re-checks the BAT under the allocation lock.
        drop(pin);
        let _alloc = self.alloc.lock().expect("alloc lock");
        if self.map(cluster) != Some(file_off) {
            // A concurrent discard got here first (and the cluster may even
            // have been reused since): nothing of ours to release.
            return Ok(());
        }
        {
            let mut bat = self.bat.write().expect("bat lock");
            bat[cluster as usize] = 0;
            self.mapped.fetch_sub(1, Ordering::Relaxed);
            let mut dirty = self.dirty.lock().expect("dirty lock");
            dirty.pages.insert(page_of(cluster));
            // v1 entries may be off the grid (foreign writers): only reuse
            // clusters that sit on it.
            if file_off % cs == 0 {
                dirty.freed.push(file_off / cs);
            }
        }
        // Reads already see zeros through the BAT; the hole gives the space
        // back even before the BAT change is durable. A filesystem that
        // cannot punch holes keeps the old data in a cluster nobody reads
        // until it is reused (and then written whole).
        match self.io.punch_hole(file_off, cs) {
            Err(e) if !ploop_io::is_unsupported(&e) => {
                Err(Error::io(&self.path, "punching hole", file_off, e))
            }
            _ => Ok(()),
        }
    }

    /// Make everything written so far durable: data first, then the BAT.
    pub fn flush(&self) -> Result<()> {
        let _meta = self.meta.lock().expect("meta lock");
        // None starts while the lock is held (see begin_outside_sync).
        while self.outside_syncs.load(Ordering::SeqCst) != 0 {
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        self.ensure_healthy()?;
        let (pages, freed) = {
            let bat = self.bat.read().expect("bat lock");
            let mut dirty = self.dirty.lock().expect("dirty lock");
            let mut raw = self.raw.lock().expect("header lock");
            // OpenVZ keeps the "empty" flag exactly when nothing is mapped.
            let flags = if self.mapped.load(Ordering::Relaxed) == 0 {
                raw.flags | FLAG_EMPTY
            } else {
                raw.flags & !FLAG_EMPTY
            };
            if flags != raw.flags {
                raw.flags = flags;
                dirty.pages.insert(0);
            }
            let raw = *raw;
            let pages: Vec<_> = std::mem::take(&mut dirty.pages)
                .into_iter()
                .map(|p| (p, metadata_page(p, &raw, &bat)))
                .collect();
            let freed = std::mem::take(&mut dirty.freed);
            self.freeing.fetch_add(freed.len() as u64, Ordering::SeqCst);
            (pages, freed)
        };
        let taken = freed.len() as u64;
        let written = self.sync("syncing data").and_then(|()| {
            if pages.is_empty() && freed.is_empty() {
                return Ok(());
            }
            for (page, buf) in &pages {
                self.io
                    .write_at(buf.as_slice(), page * META_PAGE)
                    .map_err(|e| Error::io(&self.path, "writing BAT", page * META_PAGE, e))?;
            }
            self.sync("syncing BAT")
        });
        if let Err(e) = written {
            // Nothing of this flush is known to be durable: keep it all
            // pending so the next flush (or close) tries again.
            let mut dirty = self.dirty.lock().expect("dirty lock");
            dirty.pages.extend(pages.iter().map(|(p, _)| *p));
            dirty.freed.extend(freed);
            self.freeing.fetch_sub(taken, Ordering::SeqCst);
            return Err(e);
        }
        let mut alloc = self.alloc.lock().expect("alloc lock");
        self.freeing.fetch_sub(taken, Ordering::SeqCst);
        if pages.is_empty() && freed.is_empty() && alloc.quarantine.is_empty() {
            return Ok(());
        }
        // Clusters freed by an earlier flush may still wait for pins of
        // that time: once those are gone, they (and the file's tail) are
        // given back here, at the latest by the flush of close.
        let epoch = self.epochs.current.load(Ordering::SeqCst);
        alloc
            .quarantine
            .extend(freed.into_iter().map(|c| (epoch, c)));
        self.release_quarantined(&mut alloc);
        self.trim_tail(&mut alloc)
    }

    /// Make quarantined clusters reusable once no I/O that may have looked
    /// up their old mapping is left (allocation lock held).
    fn release_quarantined(&self, alloc: &mut Alloc) {
        let Some(oldest) = alloc.quarantine.iter().map(|&(e, _)| e).min() else {
            return;
        };
        // A cluster quarantined in epoch e is free once the epoch reaches
        // e + 2: every pin of epoch e or earlier has then been dropped.
        let mut now = self.epochs.try_advance();
        if now < oldest + 2 {
            now = self.epochs.try_advance();
        }
        let Alloc {
            free, quarantine, ..
        } = alloc;
        quarantine.retain(|&(epoch, cluster)| {
            let released = epoch + 2 <= now;
            if released {
                free.insert(cluster);
            }
            !released
        });
    }

    /// Give free clusters at the end of the file back: OpenVZ's check wants
    /// the file to end at the last mapped cluster.
    fn trim_tail(&self, alloc: &mut Alloc) -> Result<()> {
        let old_end = alloc.end;
        alloc.end = alloc.free.trim_back(alloc.end);
        let len = alloc.end * self.header.cluster_size;
        if alloc.end != old_end || (self.writable && self.size_now()? > len) {
            self.io
                .set_len(len)
                .map_err(|e| Error::io(&self.path, "trimming file tail", len, e))?;
        }
        Ok(())
    }

    fn size_now(&self) -> Result<u64> {
        self.io
            .size()
            .map_err(|e| Error::io(&self.path, "reading file size", 0, e))
    }

    /// fdatasync; a failure stops the delta for good (see `failed`).
    fn sync(&self, op: &'static str) -> Result<()> {
        self.io.flush().map_err(|e| {
            self.failed.store(true, Ordering::SeqCst);
            Error::io(&self.path, op, 0, e)
        })
    }

    /// Set or clear the in-use flag durably (after flushing everything).
    fn set_in_use(&self, in_use: bool) -> Result<()> {
        self.flush()?;
        let _meta = self.meta.lock().expect("meta lock");
        let mut raw = self.raw.lock().expect("header lock");
        raw.disk_in_use = if in_use { IN_USE_MAGIC } else { 0 };
        let page = {
            let bat = self.bat.read().expect("bat lock");
            metadata_page(0, &raw, &bat)
        };
        self.io
            .write_at(page.as_slice(), 0)
            .map_err(|e| Error::io(&self.path, "writing header", 0, e))?;
        self.sync("syncing header")
    }

    /// Start a flush that is one data sync done outside
    /// [`flush`](Self::flush) (an io_uring fsync of the file), if that is
    /// all a flush would do now: no flush under way, no BAT page or header
    /// change waiting, no freed cluster, the delta open and healthy. What
    /// an allocation adds after this answer is not part of that flush.
    /// True: the caller syncs, then calls
    /// [`end_outside_sync`](Self::end_outside_sync) whatever happened.
    pub fn begin_outside_sync(&self) -> bool {
        // A flush holds this from before it takes the dirty pages until
        // its BAT is synced; and none starts until the count below is
        // back to zero.
        let Ok(_meta) = self.meta.try_lock() else {
            return false;
        };
        if !self.open.load(Ordering::SeqCst) || self.failed.load(Ordering::SeqCst) {
            return false;
        }
        {
            let dirty = self.dirty.lock().expect("dirty lock");
            if !dirty.pages.is_empty()
                || !dirty.freed.is_empty()
                || self.freeing.load(Ordering::SeqCst) != 0
            {
                return false;
            }
            let raw = self.raw.lock().expect("header lock");
            let empty = self.mapped.load(Ordering::Relaxed) == 0;
            if (raw.flags & FLAG_EMPTY != 0) != empty {
                return false;
            }
        }
        self.outside_syncs.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// The sync begun by [`begin_outside_sync`](Self::begin_outside_sync)
    /// is over. A failure stops the delta as a failed flush does; Err if
    /// the delta has failed (by this sync or another), so the caller
    /// reports the flush failed even where its own sync succeeded (Linux
    /// tells a write-back error to one sync only).
    pub fn end_outside_sync(&self, ok: bool) -> Result<()> {
        if !ok {
            self.failed.store(true, Ordering::SeqCst);
        }
        self.outside_syncs.fetch_sub(1, Ordering::SeqCst);
        self.ensure_healthy()
    }

    /// Flush and mark the image cleanly closed, with its changed-block
    /// bitmap saved if it keeps one. Idempotent.
    pub fn close(&self) -> Result<()> {
        if !self.open.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        if self.writable {
            let closed = match self.cbt() {
                Some(cbt) => self.close_with_bitmap(&cbt).or_else(|e| {
                    // No room for it (a full disk, a table past one
                    // cluster): closed clean without it rather than not
                    // at all. Clusters it wrote past the data are cut off
                    // by the next writer.
                    tracing::warn!("{}: the changed-block bitmap is dropped: {e}", self.path);
                    self.ensure_healthy()?;
                    self.set_cbt(None);
                    self.set_in_use(false)
                }),
                None => self.set_in_use(false),
            };
            if let Err(e) = closed {
                // Still open: a later close (or drop) tries again.
                self.open.store(true, Ordering::SeqCst);
                return Err(e);
            }
        }
        Ok(())
    }

    /// The changed-block bitmap the file holds (read-only opens: a
    /// writable open takes it over, see [`cbt`](Self::cbt)). None if it
    /// holds none, or was not closed cleanly.
    pub fn saved_cbt(&self) -> Result<Option<Cbt>> {
        // The header as the file has it now: a delta this process closed
        // (an online snapshot's) may have saved one since it opened.
        let (header, bat, size) = read_metadata(&self.io)?;
        if header.in_use || header.raw.format_extension_offset == 0 {
            return Ok(None);
        }
        let state = super::ext::read(&self.io, &header, &bat, size)
            .map_err(|e| Error::io(&self.path, "reading the format extension", 0, e))?;
        match state {
            super::ext::State::Live(ext) => super::ext::load_bitmap(&self.io, &header, &ext)
                .map_err(|e| Error::io(&self.path, "reading the changed-block bitmap", 0, e)),
            _ => Ok(None),
        }
    }

    /// Take the bitmap out of a closed delta's file: a writable open
    /// (which takes it over and cuts its extension off the file), then a
    /// clean close without it. For offline work that must not find an
    /// extension in the way (defragmentation); [`put_cbt`](Self::put_cbt)
    /// saves it back. A crash between the two loses the bitmap, never
    /// leaves one that claims less.
    pub fn take_cbt(io: SharedIo) -> Result<Option<Arc<Cbt>>> {
        Self::swap_cbt(io, None)
    }

    /// Save `cbt` into a closed delta's file (a writable open and a clean
    /// close with it).
    pub fn put_cbt(io: SharedIo, cbt: Arc<Cbt>) -> Result<()> {
        Self::swap_cbt(io, Some(cbt)).map(|_| ())
    }

    /// Open a closed delta for writing, give it `cbt` and close it clean;
    /// returns the bitmap it had.
    fn swap_cbt(io: SharedIo, cbt: Option<Arc<Cbt>>) -> Result<Option<Arc<Cbt>>> {
        let p = PloopDelta::open(
            io,
            OpenFlags {
                writable: true,
                allow_dirty: false,
            },
        )?;
        let old = p.set_cbt(cbt);
        p.close()?;
        Ok(old)
    }

    /// The changed-block bitmap this delta keeps, if any.
    pub fn cbt(&self) -> Option<Arc<Cbt>> {
        self.cbt.read().expect("cbt lock").clone()
    }

    /// Keep `cbt` (None: none) from now on; returns the one kept before.
    pub fn set_cbt(&self, cbt: Option<Arc<Cbt>>) -> Option<Arc<Cbt>> {
        let mut slot = self.cbt.write().expect("cbt lock");
        self.has_cbt.store(cbt.is_some(), Ordering::SeqCst);
        std::mem::replace(&mut *slot, cbt)
    }

    /// Close cleanly with the bitmap saved as OpenVZ saves it: bitmap and
    /// extension clusters past the last data cluster, synced; then the
    /// header points at them, marked closed by a v2.1 writer. A crash
    /// before the header write leaves the image in use and the clusters
    /// past its data, which the next writer cuts off.
    fn close_with_bitmap(&self, cbt: &Cbt) -> Result<()> {
        self.flush()?;
        let _meta = self.meta.lock().expect("meta lock");
        let at = self.alloc.lock().expect("alloc lock").end;
        let (sector, end) =
            super::ext::write_bitmap(&self.io, &self.header, at, cbt).map_err(|e| {
                Error::io(
                    &self.path,
                    "writing the changed-block bitmap",
                    at * self.header.cluster_size,
                    e,
                )
            })?;
        self.sync("syncing the changed-block bitmap")?;
        let mut raw = self.raw.lock().expect("header lock");
        // In memory only once on disk: a failed write must not leave a
        // header that a later BAT write would publish as clean.
        let mut closed = *raw;
        closed.disk_in_use = CLOSED_V21_MAGIC;
        closed.format_extension_offset = sector;
        let page = {
            let bat = self.bat.read().expect("bat lock");
            metadata_page(0, &closed, &bat)
        };
        self.io
            .write_at(page.as_slice(), 0)
            .map_err(|e| Error::io(&self.path, "writing header", 0, e))?;
        self.sync("syncing header")?;
        *raw = closed;
        debug_assert!(self.size_now().map_or(true, |s| s >= end));
        Ok(())
    }

    /// Start recording which virtual clusters change.
    pub fn start_tracking(&self) {
        self.changed.lock().expect("changed lock").clear();
        self.tracking.store(true, Ordering::SeqCst);
    }

    /// Stop recording; returns the clusters changed since the start.
    pub fn stop_tracking(&self) -> BTreeSet<u64> {
        self.tracking.store(false, Ordering::SeqCst);
        std::mem::take(&mut *self.changed.lock().expect("changed lock"))
    }

    /// The clusters changed so far, with tracking left on.
    pub fn take_changes(&self) -> BTreeSet<u64> {
        std::mem::take(&mut *self.changed.lock().expect("changed lock"))
    }

    /// Put clusters back into the changed set.
    pub fn note_changes(&self, clusters: BTreeSet<u64>) {
        self.changed.lock().expect("changed lock").extend(clusters);
    }

    /// Record that `cluster` is about to change (in the changed-block
    /// bitmap, if kept, and in the tracked set, if tracking).
    pub fn note_change(&self, cluster: u64) {
        if self.has_cbt.load(Ordering::SeqCst) {
            if let Some(cbt) = self.cbt.read().expect("cbt lock").as_ref() {
                let cs = self.header.cluster_size;
                cbt.mark(cluster * cs, cs);
            }
        }
        if self.tracking.load(Ordering::SeqCst) {
            self.changed.lock().expect("changed lock").insert(cluster);
        }
    }

    /// A copy of the BAT (for check, merge and info).
    pub fn bat_snapshot(&self) -> Vec<u32> {
        self.bat.read().expect("bat lock").clone()
    }
}

impl Drop for PloopDelta {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!("closing image: {e}");
        }
    }
}

/// File clusters between the data start and `end` that no BAT entry uses.
fn unreferenced_clusters(header: &Header, bat: &[u32], end: u64) -> FreeClusters {
    let cs = header.cluster_size;
    let first = header.data_offset.div_ceil(cs);
    let mut used = Vec::new();
    for &e in bat.iter().filter(|&&e| e != 0) {
        let off = entry_to_offset(header, e);
        // Every grid cluster the mapped range touches.
        used.extend(off / cs..=off.div_ceil(cs));
    }
    FreeClusters::gaps(first, end, used)
}

impl std::fmt::Debug for PloopDelta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PloopDelta")
            .field("path", &self.path)
            .field("header", &self.header)
            .finish()
    }
}
