//! The GUID partition table inside a virtual disk, laid out as OpenVZ's
//! `ploop init` lays it out (its lib/fsutils.c `create_gpt_partition`):
//! one partition, from one cluster in to the end of the disk less one
//! cluster, rounded down to the cluster and then to 4 KiB, of the Linux
//! filesystem type. The structures and their checksums are the
//! `gpt_disk_io` crate's; what is decided here is the layout, and how
//! strictly a table read from a disk is checked before a partition found
//! in it is trusted with a filesystem.

use gpt_disk_io::{BlockIo, Disk as GptDisk};
use gpt_disk_types::{
    guid, BlockSize, Chs, Crc32, GptHeader, GptHeaderRevision, GptHeaderSignature,
    GptPartitionAttributes, GptPartitionEntry, GptPartitionEntryArray,
    GptPartitionEntryArrayLayout, GptPartitionEntrySize, GptPartitionName, GptPartitionType, Guid,
    Lba, LbaLe, MasterBootRecord, U32Le,
};
use ploop_format::{Error, Result};

use crate::Chain;

const SECTOR: u64 = 512;
/// Partition entries OpenVZ (parted) writes, of 128 bytes each: 32 sectors.
const ENTRIES: u32 = 128;
const ENTRY_SIZE: u32 = 128;
/// An entry array larger than this is refused before it is read (the
/// usual one is 16 KiB).
const MAX_ENTRY_BYTES: u64 = 1 << 20;
/// "Linux filesystem data", sgdisk's type 8300, which OpenVZ's
/// `sgdisk -n` gives partition 1.
pub const LINUX_FS: Guid = guid!("0fc63daf-8483-4772-8e79-3d69d8477de4");

/// Partition 1 of a disk: where the filesystem lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Always 1 here: OpenVZ uses partition 1 and no other.
    pub number: u32,
    /// First byte on the virtual disk.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// The partition's type GUID, lowercase.
    pub type_guid: String,
    /// The partition's own GUID, lowercase.
    pub guid: String,
    /// The primary table was damaged and the backup at the disk's end was
    /// used (nothing was repaired: that is `sgdisk`'s job).
    pub from_backup: bool,
}

impl Partition {
    pub fn first_sector(&self) -> u64 {
        self.start / SECTOR
    }

    pub fn last_sector(&self) -> u64 {
        (self.start + self.len) / SECTOR - 1
    }
}

/// How a virtual disk holds its filesystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// No partition table: the filesystem (if any) is the whole disk.
    Whole,
    /// A GPT, and the filesystem in its partition 1.
    Gpt(Partition),
}

/// Where OpenVZ puts partition 1 on a disk of `sectors` 512-byte sectors
/// with clusters of `cluster_sectors`: first and last sector. For clusters
/// smaller than the table itself (under 17 KiB) the start moves up to the
/// first cluster past the table, and the end below the backup table,
/// where OpenVZ's sgdisk call would fail.
pub fn openvz_range(sectors: u64, cluster_sectors: u64) -> Option<(u64, u64)> {
    let cluster = cluster_sectors.max(8);
    let first_usable = 2 + u64::from(ENTRIES * ENTRY_SIZE) / SECTOR;
    let start = first_usable.div_ceil(cluster).max(1) * cluster;
    let last_usable = sectors.checked_sub(first_usable + 1)?;
    let end = (sectors.checked_sub(cluster)? / cluster * cluster).min(last_usable + 1) / 8 * 8;
    let last = end.checked_sub(1)?;
    (last >= start).then_some((start, last))
}

/// What the table is read from and written to: a virtual disk, as bytes.
pub trait Medium {
    /// Size in bytes.
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    fn flush(&self) -> Result<()>;
}

impl Medium for Chain {
    fn size(&self) -> u64 {
        self.virtual_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Chain::read_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        Chain::write_at(self, buf, offset)
    }
    fn flush(&self) -> Result<()> {
        Chain::flush(self)
    }
}

/// A medium seen as 512-byte blocks, for the `gpt_disk_io` crate.
struct Blocks<'a, M: Medium + ?Sized>(&'a M);

impl<M: Medium + ?Sized> Blocks<'_, M> {
    /// The byte offset of `len` bytes at `lba`, if they lie on the disk
    /// and are whole sectors (the crate's contract, checked here rather
    /// than trusted).
    fn range(&self, lba: Lba, len: usize) -> Result<u64> {
        let offset = lba.to_u64().checked_mul(SECTOR);
        match offset {
            Some(o)
                if (len as u64).is_multiple_of(SECTOR)
                    && o.checked_add(len as u64)
                        .is_some_and(|end| end <= self.0.size()) =>
            {
                Ok(o)
            }
            _ => Err(Error::Invalid(format!(
                "partition table I/O of {len} bytes at sector {} is outside the disk",
                lba.to_u64()
            ))),
        }
    }
}

impl<M: Medium + ?Sized> BlockIo for Blocks<'_, M> {
    type Error = Error;

    fn block_size(&self) -> BlockSize {
        BlockSize::BS_512
    }

    fn num_blocks(&mut self) -> Result<u64> {
        Ok(self.0.size() / SECTOR)
    }

    fn read_blocks(&mut self, start_lba: Lba, dst: &mut [u8]) -> Result<()> {
        let at = self.range(start_lba, dst.len())?;
        self.0.read_at(dst, at)
    }

    fn write_blocks(&mut self, start_lba: Lba, src: &[u8]) -> Result<()> {
        let at = self.range(start_lba, src.len())?;
        self.0.write_at(src, at)
    }

    fn flush(&mut self) -> Result<()> {
        self.0.flush()
    }
}

fn corrupt(name: &str, what: String) -> Error {
    Error::Corrupt {
        path: format!("{name} (partition table)"),
        what,
    }
}

/// Find how a disk holds its filesystem. `name` names the disk in errors.
/// Only reads. A GPT is trusted only whole: header and entry checksums,
/// a header that fits the disk, partition 1 in use and inside both the
/// table's usable sectors and the disk; a damaged primary table falls
/// back to the backup at the disk's end. Tables of other kinds (an MBR,
/// a protective MBR with no GPT behind it) are refused, never read as a
/// whole-disk filesystem.
pub fn probe<M: Medium + ?Sized>(m: &M, name: &str) -> Result<Layout> {
    let bad = |what: String| corrupt(name, what);
    let total = m.size() / SECTOR;
    if total < 3 {
        return Ok(Layout::Whole);
    }
    let mut head = vec![0u8; (total.min(8) * SECTOR) as usize];
    m.read_at(&mut head, 0)?;
    let sig = |at: usize| head.get(at..at + 8) == Some(&b"EFI PART"[..]);
    if sig(512) {
        let Table {
            entry, from_backup, ..
        } = read_gpt(m, total).map_err(bad)?;
        let first = entry.starting_lba.to_u64();
        let last = entry.ending_lba.to_u64();
        return Ok(Layout::Gpt(Partition {
            number: 1,
            start: first * SECTOR,
            len: (last - first + 1) * SECTOR,
            type_guid: { entry.partition_type_guid }.0.to_string(),
            guid: { entry.unique_partition_guid }.to_string(),
            from_backup,
        }));
    }
    if sig(4096) {
        return Err(bad(
            "the GPT is laid out for 4096-byte sectors; only 512-byte sectors are supported".into(),
        ));
    }
    // A filesystem on the whole disk: ext2/3/4's magic at byte 1080,
    // XFS's at 0. (Its boot sector may end in 55 aa too.)
    if head.get(1080..1082) == Some(&[0x53, 0xef][..]) || head.starts_with(b"XFSB") {
        return Ok(Layout::Whole);
    }
    if head[510..512] == [0x55, 0xaa] {
        let records: Vec<&[u8]> = (0..4).map(|i| &head[446 + 16 * i..462 + 16 * i]).collect();
        if records.iter().any(|r| r[4] == 0xee) {
            return Err(bad("the disk has a protective MBR but no GPT behind it \
                 (no 'EFI PART' signature at sector 1)"
                .into()));
        }
        let plausible =
            records.iter().all(|r| r[0] == 0 || r[0] == 0x80) && records.iter().any(|r| r[4] != 0);
        if plausible {
            return Err(bad(
                "the disk has an MBR (DOS) partition table; only GPT is \
                 supported (convert it with `sgdisk -g`)"
                    .into(),
            ));
        }
    }
    Ok(Layout::Whole)
}

/// Partition 1 of the GPT on a disk of `total` sectors, and whether it
/// came from the backup table.
/// A table read and checked: its header, its entry array as stored, and
/// partition 1.
struct Table {
    header: GptHeader,
    entries: Vec<u8>,
    entry: GptPartitionEntry,
    from_backup: bool,
}

fn read_gpt<M: Medium + ?Sized>(m: &M, total: u64) -> std::result::Result<Table, String> {
    // The primary table whole (header and entries), or failing that the
    // backup: at the disk's last sector, or where the primary's header
    // says (not trusted first: its checksum may be what failed). A table
    // that checks out but has no partition 1 is final, not a failure.
    let primary = match read_header(m, 1, total) {
        Err(e) => Err((e.what, e.alternate)),
        Ok(h) => match first_entry(m, &h) {
            Ok((e, a)) => Ok((h, e, a)),
            // A sound table with no partition 1: final.
            Err(EntryError::Final(what)) => return Err(what),
            Err(EntryError::Damaged(what)) => Err((what, Some(h.alternate_lba.to_u64()))),
        },
    };
    let (header, entry, entries, from_backup) = match primary {
        Ok((h, e, a)) => (h, e, a, false),
        Err((what, alternate)) => {
            let mut places = vec![total - 1];
            if let Some(a) = alternate.filter(|&a| a < total && a != total - 1 && a > 1) {
                places.push(a);
            }
            let backup = places.into_iter().find_map(|at| {
                let h = read_header(m, at, total).ok()?;
                let (e, a) = first_entry(m, &h).ok()?;
                Some((h, e, a))
            });
            match backup {
                Some((h, e, a)) => {
                    tracing::warn!("primary GPT unusable ({what}); using the backup");
                    (h, e, a, true)
                }
                None => return Err(format!("primary GPT: {what}; no usable backup either")),
            }
        }
    };
    let (first, last) = (entry.starting_lba.to_u64(), entry.ending_lba.to_u64());
    let (usable_lo, usable_hi) = (
        header.first_usable_lba.to_u64(),
        header.last_usable_lba.to_u64(),
    );
    if first > last {
        return Err(format!(
            "partition 1 ends (sector {last}) before it starts ({first})"
        ));
    }
    if last >= total {
        return Err(format!(
            "partition 1 (sectors {first}-{last}) lies past the end of the {total}-sector disk"
        ));
    }
    if first < usable_lo || last > usable_hi {
        return Err(format!(
            "partition 1 (sectors {first}-{last}) lies outside the table's usable sectors \
             {usable_lo}-{usable_hi}"
        ));
    }
    Ok(Table {
        header,
        entries,
        entry,
        from_backup,
    })
}

struct HeaderError {
    what: String,
    /// Where the header says its twin is, when it could be read that far.
    alternate: Option<u64>,
}

/// The GPT header at `lba`, checked whole.
fn read_header<M: Medium + ?Sized>(
    m: &M,
    lba: u64,
    total: u64,
) -> std::result::Result<GptHeader, HeaderError> {
    let fail = |what: String, alternate: Option<u64>| HeaderError { what, alternate };
    let mut block = [0u8; SECTOR as usize];
    let mut disk = GptDisk::new(Blocks(m)).map_err(|e| fail(e.to_string(), None))?;
    let h = disk
        .read_gpt_header(Lba(lba), &mut block)
        .map_err(|e| fail(format!("reading sector {lba}: {e}"), None))?;
    if !h.is_signature_valid() {
        return Err(fail(
            format!("no 'EFI PART' signature at sector {lba}"),
            None,
        ));
    }
    let alternate = Some(h.alternate_lba.to_u64());
    let size = h.header_size.to_u32() as usize;
    if !(92..=SECTOR as usize).contains(&size) {
        return Err(fail(
            format!("header size {size} (92 to 512 expected)"),
            alternate,
        ));
    }
    let mut covered = block[..size].to_vec();
    covered[16..20].fill(0);
    let crc = gpt_disk_types::crc::Crc::<u32>::new(&Crc32::ALGORITHM).checksum(&covered);
    if crc != h.header_crc32.0.to_u32() {
        return Err(fail("header checksum mismatch".into(), alternate));
    }
    if h.revision.major() != 1 {
        return Err(fail(
            format!("unknown revision {:#x}", h.revision.0.to_u32()),
            alternate,
        ));
    }
    if h.my_lba.to_u64() != lba {
        return Err(fail(
            format!(
                "the header at sector {lba} says it is at sector {}",
                h.my_lba
            ),
            alternate,
        ));
    }
    let (lo, hi) = (h.first_usable_lba.to_u64(), h.last_usable_lba.to_u64());
    if h.alternate_lba.to_u64() >= total || hi >= total {
        return Err(fail(
            format!(
                "the table describes a disk of at least {} sectors, but this one has {total} \
                 (was the disk resized without its table?)",
                h.alternate_lba.to_u64().max(hi).saturating_add(1)
            ),
            alternate,
        ));
    }
    if lo > hi {
        return Err(fail(
            format!("first usable sector {lo} is past the last, {hi}"),
            alternate,
        ));
    }
    let count = u64::from(h.number_of_partition_entries.to_u32());
    let esize = u64::from(h.size_of_partition_entry.to_u32());
    if esize < 128 || !esize.is_power_of_two() || count == 0 || count * esize > MAX_ENTRY_BYTES {
        return Err(fail(
            format!("{count} partition entries of {esize} bytes: not a table this tool reads"),
            alternate,
        ));
    }
    let start = h.partition_entry_lba.to_u64();
    // count * esize is at most MAX_ENTRY_BYTES (checked above).
    let Some(end) = start.checked_add((count * esize).div_ceil(SECTOR) - 1) else {
        return Err(fail(
            format!("the entry array's start, sector {start}, is past any disk"),
            alternate,
        ));
    };
    let inside = if lba == 1 {
        start >= 2 && end < lo
    } else {
        start > hi && end < lba
    };
    if !inside {
        return Err(fail(
            format!(
                "the entry array (sectors {start}-{end}) overlaps the header or the usable sectors"
            ),
            alternate,
        ));
    }
    Ok(h)
}

/// Why entry 1 could not be had: a table that is damaged (the backup may
/// serve), or one that is sound and says no.
enum EntryError {
    Damaged(String),
    Final(String),
}

/// Entry 1 of the table `h` heads, after checking the array's checksum,
/// and the array as stored.
fn first_entry<M: Medium + ?Sized>(
    m: &M,
    h: &GptHeader,
) -> std::result::Result<(GptPartitionEntry, Vec<u8>), EntryError> {
    let damaged = EntryError::Damaged;
    let layout = h
        .get_partition_entry_array_layout()
        .map_err(|e| damaged(format!("partition entries: {e}")))?;
    let bytes = layout
        .num_bytes_rounded_to_block_as_usize(BlockSize::BS_512)
        .ok_or_else(|| damaged("partition entries: size overflows".into()))?;
    let mut storage = vec![0u8; bytes];
    let mut disk = GptDisk::new(Blocks(m)).map_err(|e| damaged(e.to_string()))?;
    let array = disk
        .read_gpt_partition_entry_array(layout, &mut storage)
        .map_err(|e| damaged(format!("reading the partition entries: {e}")))?;
    if array.calculate_crc32() != h.partition_entry_array_crc32 {
        return Err(damaged("partition entry checksum mismatch".into()));
    }
    match array.get_partition_entry(0).copied() {
        Some(e) if e.is_used() => Ok((e, storage)),
        _ => Err(EntryError::Final(
            "there is no partition 1 (the table's first entry is empty)".into(),
        )),
    }
}

fn random_guid() -> Guid {
    Guid::from_random_bytes(uuid::Uuid::new_v4().into_bytes())
}

/// Write OpenVZ's layout (protective MBR, primary and backup GPT, one
/// Linux partition where [`openvz_range`] puts it) and flush. For a new
/// disk: whatever was in those sectors is overwritten. Returns partition 1.
pub fn write_openvz<M: Medium + ?Sized>(
    m: &M,
    cluster_sectors: u64,
    name: &str,
) -> Result<Partition> {
    let total = m.size() / SECTOR;
    let (first, last) = openvz_range(total, cluster_sectors).ok_or_else(|| {
        Error::Invalid(format!(
            "{name}: a disk of {} bytes is too small for a partition table with {} KiB clusters; \
             make it without one (-P)",
            m.size(),
            cluster_sectors * SECTOR / 1024
        ))
    })?;
    let io_err = |what: &str, e: gpt_disk_io::DiskError<Error>| match e {
        gpt_disk_io::DiskError::Io(e) => e,
        other => Error::Invalid(format!("{name}: writing the {what}: {other}")),
    };
    let mut disk = GptDisk::new(Blocks(m)).map_err(|e| io_err("table", e))?;
    let mut block = [0u8; SECTOR as usize];

    // As parted writes it: the protective record covers the whole disk
    // (up to what 32 bits hold), its end CHS "unknown".
    let mut mbr = MasterBootRecord::protective_mbr(total);
    mbr.partitions[0].end_chs = Chs([0xff, 0xff, 0xff]);
    mbr.partitions[0].size_in_lba = U32Le::from_u32(u32::try_from(total - 1).unwrap_or(u32::MAX));
    disk.write_mbr(&mbr, &mut block)
        .map_err(|e| io_err("protective MBR", e))?;

    let entry_size = GptPartitionEntrySize::new(ENTRY_SIZE).expect("128 is a valid entry size");
    let entry_sectors = u64::from(ENTRIES * ENTRY_SIZE) / SECTOR;
    let layout = GptPartitionEntryArrayLayout {
        start_lba: Lba(2),
        entry_size,
        num_entries: ENTRIES,
    };
    let mut storage = vec![0u8; (ENTRIES * ENTRY_SIZE) as usize];
    let mut array = GptPartitionEntryArray::new(layout, BlockSize::BS_512, &mut storage)
        .map_err(|e| Error::Invalid(format!("{name}: partition entries: {e}")))?;
    let part_guid = random_guid();
    *array
        .get_partition_entry_mut(0)
        .expect("the array has 128 entries") = GptPartitionEntry {
        partition_type_guid: GptPartitionType(LINUX_FS),
        unique_partition_guid: part_guid,
        starting_lba: LbaLe::from_u64(first),
        ending_lba: LbaLe::from_u64(last),
        attributes: GptPartitionAttributes::default(),
        name: GptPartitionName::default(),
    };
    let mut header = GptHeader {
        signature: GptHeaderSignature::EFI_COMPATIBLE_PARTITION_TABLE_HEADER,
        revision: GptHeaderRevision::VERSION_1_0,
        my_lba: LbaLe::from_u64(1),
        alternate_lba: LbaLe::from_u64(total - 1),
        first_usable_lba: LbaLe::from_u64(2 + entry_sectors),
        last_usable_lba: LbaLe::from_u64(total - 2 - entry_sectors),
        disk_guid: random_guid(),
        partition_entry_lba: LbaLe::from_u64(2),
        number_of_partition_entries: U32Le::from_u32(ENTRIES),
        size_of_partition_entry: U32Le::from_u32(ENTRY_SIZE),
        partition_entry_array_crc32: array.calculate_crc32(),
        ..GptHeader::default()
    };
    header.update_header_crc32();
    disk.write_gpt_partition_entry_array(&array)
        .map_err(|e| io_err("partition entries", e))?;
    disk.write_primary_gpt_header(&header, &mut block)
        .map_err(|e| io_err("GPT header", e))?;

    // The backup: entries just before the last sector, header in it.
    array.set_start_lba(Lba(total - 1 - entry_sectors));
    let mut backup = header;
    backup.my_lba = LbaLe::from_u64(total - 1);
    backup.alternate_lba = LbaLe::from_u64(1);
    backup.partition_entry_lba = LbaLe::from_u64(total - 1 - entry_sectors);
    backup.update_header_crc32();
    disk.write_gpt_partition_entry_array(&array)
        .map_err(|e| io_err("backup partition entries", e))?;
    disk.write_secondary_gpt_header(&backup, &mut block)
        .map_err(|e| io_err("backup GPT header", e))?;
    disk.flush().map_err(|e| io_err("table", e))?;
    Ok(Partition {
        number: 1,
        start: first * SECTOR,
        len: (last - first + 1) * SECTOR,
        type_guid: LINUX_FS.to_string(),
        guid: part_guid.to_string(),
        from_backup: false,
    })
}

/// Where partition 1 would be on the disk resized to `new_total`
/// sectors (first and last sector, as [`resize`] puts it), read from the
/// table now and checked: nothing else in the way, room for it. Only
/// reads.
pub fn plan_partition<M: Medium + ?Sized>(
    m: &M,
    new_total: u64,
    cluster_sectors: u64,
    name: &str,
) -> Result<(u64, u64)> {
    plan(m, new_total, cluster_sectors, name).map(|(_, first, last, _)| (first, last))
}

/// The table, partition 1's new first and last sector, and the new last
/// usable sector.
fn plan<M: Medium + ?Sized>(
    m: &M,
    new_total: u64,
    cluster_sectors: u64,
    name: &str,
) -> Result<(Table, u64, u64, u64)> {
    let bad = |what: String| corrupt(name, what);
    let total = m.size() / SECTOR;
    let t = read_gpt(m, total).map_err(bad)?;
    let h = t.header;
    if h.header_size.to_u32() != 92 {
        // Its checksum covers bytes this tool does not rewrite.
        return Err(Error::Invalid(format!(
            "{name}: a GPT header of {} bytes: only 92-byte headers are resized",
            h.header_size.to_u32()
        )));
    }
    let layout = h
        .get_partition_entry_array_layout()
        .map_err(|e| bad(format!("partition entries: {e}")))?;
    let array_sectors = (t.entries.len() as u64) / SECTOR;
    let first = t.entry.starting_lba.to_u64();
    let (_, openvz_last) = openvz_range(new_total, cluster_sectors).unwrap_or((0, 0));
    let last_usable = new_total
        .checked_sub(2 + array_sectors)
        .ok_or_else(|| Error::Invalid(format!("{name}: {new_total} sectors hold no table")))?;
    let last = openvz_last.min(last_usable);
    if last < first {
        return Err(Error::Invalid(format!(
            "{name}: partition 1 starts at sector {first}; a disk of {new_total} sectors has no room for it"
        )));
    }
    let mut entries = t.entries.clone();
    let array = GptPartitionEntryArray::new(layout, BlockSize::BS_512, &mut entries)
        .map_err(|e| bad(format!("partition entries: {e}")))?;
    for i in 1..layout.num_entries {
        if let Some(e) = array.get_partition_entry(i) {
            let (a, b) = (e.starting_lba.to_u64(), e.ending_lba.to_u64());
            if e.is_used() && (b > last_usable || (a <= last && b >= first)) {
                return Err(Error::Invalid(format!(
                    "{name}: partition {} (sectors {a}-{b}) is in the way of partition 1 on a disk of {new_total} sectors",
                    i + 1
                )));
            }
        }
    }
    Ok((t, first, last, last_usable))
}

/// Fit the table on a disk to `new_total` sectors (OpenVZ's
/// resize_gpt_partition): partition 1 keeps its start and ends where
/// OpenVZ's layout ends it on a disk of that size; the backup table goes
/// to the new last sectors, then the primary is rewritten, then the
/// protective MBR. Growing, the medium is already `new_total` long;
/// shrinking, it is still longer (its filesystem already shrunk), and the
/// table describes the smaller disk before the image itself shrinks. Each
/// step leaves a table [`probe`] accepts. Refused before anything is
/// written: no table, another partition in the way, a partition 1 that
/// would not fit. Returns partition 1 as it is now.
pub fn resize<M: Medium + ?Sized>(
    m: &M,
    new_total: u64,
    cluster_sectors: u64,
    name: &str,
) -> Result<Partition> {
    let bad = |what: String| corrupt(name, what);
    let total = m.size() / SECTOR;
    if new_total > total {
        return Err(Error::Invalid(format!(
            "{name}: the disk is {total} sectors, the table cannot describe {new_total}"
        )));
    }
    let (t, first, last, last_usable) = plan(m, new_total, cluster_sectors, name)?;
    let h = t.header;
    let layout = h
        .get_partition_entry_array_layout()
        .map_err(|e| bad(format!("partition entries: {e}")))?;
    let array_sectors = (t.entries.len() as u64) / SECTOR;
    let mut entries = t.entries.clone();
    let mut array = GptPartitionEntryArray::new(layout, BlockSize::BS_512, &mut entries)
        .map_err(|e| bad(format!("partition entries: {e}")))?;
    array
        .get_partition_entry_mut(0)
        .expect("entry 1 was read")
        .ending_lba = LbaLe::from_u64(last);
    let crc = array.calculate_crc32();
    let io_err = |what: &str, e: gpt_disk_io::DiskError<Error>| match e {
        gpt_disk_io::DiskError::Io(e) => e,
        other => Error::Invalid(format!("{name}: writing the {what}: {other}")),
    };
    let mut disk = GptDisk::new(Blocks(m)).map_err(|e| io_err("table", e))?;
    let mut block = [0u8; SECTOR as usize];
    let backup_array = new_total - 1 - array_sectors;
    let mut backup = h;
    backup.my_lba = LbaLe::from_u64(new_total - 1);
    backup.alternate_lba = LbaLe::from_u64(1);
    backup.partition_entry_lba = LbaLe::from_u64(backup_array);
    backup.last_usable_lba = LbaLe::from_u64(last_usable);
    backup.partition_entry_array_crc32 = crc;
    backup.update_header_crc32();
    array.set_start_lba(Lba(backup_array));
    disk.write_gpt_partition_entry_array(&array)
        .map_err(|e| io_err("backup partition entries", e))?;
    disk.write_gpt_header(Lba(new_total - 1), &backup, &mut block)
        .map_err(|e| io_err("backup GPT header", e))?;
    disk.flush().map_err(|e| io_err("backup table", e))?;
    let mut primary = h;
    primary.my_lba = LbaLe::from_u64(1);
    primary.alternate_lba = LbaLe::from_u64(new_total - 1);
    primary.partition_entry_lba = LbaLe::from_u64(2);
    primary.last_usable_lba = LbaLe::from_u64(last_usable);
    primary.partition_entry_array_crc32 = crc;
    primary.update_header_crc32();
    array.set_start_lba(Lba(2));
    disk.write_gpt_partition_entry_array(&array)
        .map_err(|e| io_err("partition entries", e))?;
    disk.write_primary_gpt_header(&primary, &mut block)
        .map_err(|e| io_err("GPT header", e))?;
    disk.flush().map_err(|e| io_err("table", e))?;
    // The protective record's size, as parted keeps it.
    let mut mbr = [0u8; SECTOR as usize];
    m.read_at(&mut mbr, 0)?;
    if mbr[446 + 4] == 0xee {
        let n = u32::try_from(new_total - 1).unwrap_or(u32::MAX);
        mbr[446 + 12..446 + 16].copy_from_slice(&n.to_le_bytes());
        m.write_at(&mbr, 0)?;
        m.flush()?;
    }
    Ok(Partition {
        number: 1,
        start: first * SECTOR,
        len: (last - first + 1) * SECTOR,
        type_guid: { t.entry.partition_type_guid }.0.to_string(),
        guid: { t.entry.unique_partition_guid }.to_string(),
        from_backup: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Mem(Mutex<Vec<u8>>);

    impl Medium for Mem {
        fn size(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            let v = self.0.lock().unwrap();
            buf.copy_from_slice(&v[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            let mut v = self.0.lock().unwrap();
            v[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
    }

    const MIB: u64 = 1 << 20;

    fn made(size: u64) -> (Mem, Partition) {
        let m = Mem(Mutex::new(vec![0; size as usize]));
        let p = write_openvz(&m, 2048, "d").unwrap();
        (m, p)
    }

    /// OpenVZ's own figures for a 10 GiB disk with 1 MiB clusters (parted
    /// mklabel + sgdisk -n 1:2048:20969471, as its create_gpt_partition
    /// runs them).
    #[test]
    fn openvz_places_partition_one_like_openvz() {
        assert_eq!(openvz_range(20971520, 2048), Some((2048, 20969471)));
        // Odd sizes: the end is rounded to the cluster, then to 4 KiB.
        assert_eq!(openvz_range(204800 + 17, 2048), Some((2048, 202751)));
        assert_eq!(openvz_range(2048 * 2, 2048), None);
        // Clusters smaller than the table: start past the table, on the grid.
        assert_eq!(openvz_range(1 << 20, 8).map(|r| r.0), Some(40));
    }

    #[test]
    fn a_written_table_reads_back() {
        let (m, p) = made(64 * MIB);
        assert_eq!(p.start, MIB);
        assert_eq!(p.len, 64 * MIB - 2 * MIB);
        assert_eq!(probe(&m, "d").unwrap(), Layout::Gpt(p.clone()));
        // Damage the primary header: the backup is used.
        m.0.lock().unwrap()[512 + 40] ^= 1;
        match probe(&m, "d").unwrap() {
            Layout::Gpt(q) => {
                assert!(q.from_backup);
                assert_eq!((q.start, q.len), (p.start, p.len));
            }
            other => panic!("{other:?}"),
        }
        // Both damaged: refused, naming the primary's fault.
        let end = m.size() as usize - 512;
        m.0.lock().unwrap()[end + 40] ^= 1;
        let e = probe(&m, "d").unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
    }

    fn refused(m: &Mem, needle: &str) {
        let e = probe(m, "disk").unwrap_err().to_string();
        assert!(e.contains(needle), "{e:?} should say {needle:?}");
        assert!(e.starts_with("disk (partition table)"), "{e}");
    }

    /// Rewrite partition 1 (and the checksums over it) in both tables.
    fn set_partition(m: &Mem, first: u64, last: u64) {
        set_entry(m, 0, first, last);
    }

    /// Rewrite entry `index` (type: Linux, if it was empty) in both
    /// tables, and the checksums over it.
    fn set_entry(m: &Mem, index: usize, first: u64, last: u64) {
        let total = m.size() / SECTOR;
        for (hdr_lba, arr_lba) in [(1, 2), (total - 1, total - 33)] {
            let mut v = m.0.lock().unwrap();
            let base = (arr_lba * SECTOR) as usize;
            let e = base + 128 * index;
            if v[e..e + 16].iter().all(|&b| b == 0) {
                let type_guid = v[base..base + 16].to_vec();
                v[e..e + 16].copy_from_slice(&type_guid);
                v[e + 16] = 1 + index as u8;
            }
            v[e + 32..e + 40].copy_from_slice(&first.to_le_bytes());
            v[e + 40..e + 48].copy_from_slice(&last.to_le_bytes());
            let crc = gpt_disk_types::crc::Crc::<u32>::new(&Crc32::ALGORITHM);
            let arr = crc.checksum(&v[base..base + 16384]);
            let h = (hdr_lba * SECTOR) as usize;
            v[h + 88..h + 92].copy_from_slice(&arr.to_le_bytes());
            v[h + 16..h + 20].fill(0);
            let hc = crc.checksum(&v[h..h + 92]);
            v[h + 16..h + 20].copy_from_slice(&hc.to_le_bytes());
        }
    }

    #[test]
    fn bad_and_foreign_tables_are_refused() {
        let (m, _) = made(16 * MIB);
        let total = m.size() / SECTOR;
        set_partition(&m, 2048, total + 10);
        refused(&m, "past the end");
        set_partition(&m, 2048, total - 20);
        refused(&m, "usable sectors");
        set_partition(&m, 0, 0);
        // Type GUID still set: clear it too for an empty entry.
        {
            let mut v = m.0.lock().unwrap();
            for base in [1024usize, ((total - 33) * SECTOR) as usize] {
                v[base..base + 16].fill(0);
            }
        }
        set_partition(&m, 0, 0);
        refused(&m, "no partition 1");

        // A protective MBR alone.
        let (m, _) = made(16 * MIB);
        m.0.lock().unwrap()[512..1024].fill(0);
        refused(&m, "protective MBR but no GPT");

        // A DOS table: one Linux partition from sector 2048.
        let m = Mem(Mutex::new(vec![0; 16 * MIB as usize]));
        {
            let mut v = m.0.lock().unwrap();
            v[446 + 4] = 0x83;
            v[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
            v[446 + 12..446 + 16].copy_from_slice(&30000u32.to_le_bytes());
            v[510] = 0x55;
            v[511] = 0xaa;
        }
        refused(&m, "MBR (DOS)");

        // A disk shrunk under its table.
        let (m, _) = made(16 * MIB);
        m.0.lock().unwrap().truncate(8 * MIB as usize);
        refused(&m, "was the disk resized");
    }

    /// Rewrite a field of the header at `lba` and fix its checksum, as a
    /// hostile owner of the disk could.
    fn set_header_u64(m: &Mem, lba: u64, at: usize, v: u64) {
        let mut b = m.0.lock().unwrap();
        let h = (lba * SECTOR) as usize;
        b[h + at..h + at + 8].copy_from_slice(&v.to_le_bytes());
        b[h + 16..h + 20].fill(0);
        let crc = gpt_disk_types::crc::Crc::<u32>::new(&Crc32::ALGORITHM).checksum(&b[h..h + 92]);
        b[h + 16..h + 20].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn the_backup_serves_a_damaged_entry_array_or_alternate() {
        // Entries damaged, header sound: the backup's entries are used.
        let (m, p) = made(16 * MIB);
        m.0.lock().unwrap()[1024 + 100] ^= 1;
        match probe(&m, "d").unwrap() {
            Layout::Gpt(q) => assert!(q.from_backup && q.start == p.start),
            other => panic!("{other:?}"),
        }
        // The primary's pointer to its twin flipped (its checksum then
        // fails): the backup is still found at the last sector.
        let (m, _) = made(16 * MIB);
        m.0.lock().unwrap()[512 + 32] ^= 0x40;
        assert!(matches!(probe(&m, "d").unwrap(), Layout::Gpt(q) if q.from_backup));
    }

    #[test]
    fn hostile_header_values_are_refused_without_panics() {
        for (at, v) in [
            (72usize, u64::MAX),
            (72, u64::MAX - 3),
            (32, u64::MAX),
            (48, u64::MAX),
        ] {
            let (m, _) = made(16 * MIB);
            set_header_u64(&m, 1, at, v);
            let total = m.size() / SECTOR;
            set_header_u64(&m, total - 1, at, v);
            let e = probe(&m, "d").unwrap_err().to_string();
            assert!(e.contains("no usable backup"), "{at}={v:#x}: {e}");
        }
    }

    /// A second partition after partition 1: growing would stretch
    /// partition 1 over it; refused, the table untouched.
    #[test]
    fn a_partition_in_the_way_stops_a_resize() {
        let (m, _) = made(16 * MIB);
        set_partition(&m, 2048, 16383);
        set_entry(&m, 1, 16384, 24575);
        assert!(matches!(probe(&m, "d").unwrap(), Layout::Gpt(_)));
        m.0.lock().unwrap().resize(32 * MIB as usize, 0);
        let before = m.0.lock().unwrap().clone();
        let total = m.size() / SECTOR;
        let e = resize(&m, total, 2048, "d").unwrap_err().to_string();
        assert!(e.contains("partition 2") && e.contains("in the way"), "{e}");
        assert!(*m.0.lock().unwrap() == before, "nothing written");
    }

    #[test]
    fn the_table_follows_the_disk_up_and_down() {
        let (m, p) = made(16 * MIB);
        // Grown: the medium first, then the table.
        m.0.lock().unwrap().resize(32 * MIB as usize, 0);
        let total = m.size() / SECTOR;
        let q = resize(&m, total, 2048, "d").unwrap();
        assert_eq!(q.start, p.start);
        let (_, last) = openvz_range(total, 2048).unwrap();
        assert_eq!(q.last_sector(), last);
        assert_eq!(
            probe(&m, "d").unwrap(),
            Layout::Gpt(Partition {
                guid: p.guid.clone(),
                ..q.clone()
            })
        );
        // Shrunk: the table first (the medium still large), then the medium.
        let small = 24 * MIB / SECTOR;
        let r = resize(&m, small, 2048, "d").unwrap();
        assert!(matches!(probe(&m, "d").unwrap(), Layout::Gpt(x) if x == r));
        m.0.lock().unwrap().truncate(24 * MIB as usize);
        assert!(matches!(probe(&m, "d").unwrap(), Layout::Gpt(x) if x == r && !x.from_backup));
        assert_eq!(r.last_sector(), openvz_range(small, 2048).unwrap().1);
        // Not below partition 1's start.
        let e = resize(&m, 2048, 2048, "d").unwrap_err().to_string();
        assert!(e.contains("no room"), "{e}");
    }

    #[test]
    fn blank_and_whole_disk_filesystems_are_whole() {
        let m = Mem(Mutex::new(vec![0; MIB as usize]));
        assert_eq!(probe(&m, "d").unwrap(), Layout::Whole);
        // An ext4 superblock, with a boot-sector signature beside it.
        {
            let mut v = m.0.lock().unwrap();
            v[1080] = 0x53;
            v[1081] = 0xef;
            v[510] = 0x55;
            v[511] = 0xaa;
            v[446 + 4] = 0x83;
        }
        assert_eq!(probe(&m, "d").unwrap(), Layout::Whole);
    }
}
