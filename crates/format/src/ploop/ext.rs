//! The format extension: one cluster that the header's `ext_off` points
//! at, written by Parallels/Virtuozzo and OpenVZ tools on a clean close,
//! holding optional features such as a changed-block (dirty) bitmap.
//! Layout (qemu's docs/interop/parallels.rst, OpenVZ's ploop1_image.h):
//!
//! ```text
//! u64 magic 0xAB234CEF23DCEA87 | md5 of the rest of the cluster (16 bytes)
//! then features, each 8-byte aligned:
//!   u64 magic | u64 flags | u32 data size | u32 unused | data
//! ending with a feature whose magic is 0.
//! dirty bitmap data: u64 disk size (sectors) | uuid (16) |
//!   u32 granularity (sectors) | u32 l1 size | u64 l1[l1 size]
//!   (l1: 0 all clear, 1 all set, else the sector of a bitmap cluster)
//! ```
//!
//! A read-write open cannot keep a bitmap true, so it drops the extension
//! (clears `ext_off` in the header write that marks the image in use, as
//! qemu does); until then its clusters are live and never reused. A
//! feature this code does not know, flagged NECESSARY (the file must not
//! change without it) or TRANSIT (it must be kept as it is), makes the
//! image read-only instead. `check` tells a live extension from a
//! dangling offset.

use std::collections::HashSet;

use md5::{Digest, Md5};
use ploop_io::{AlignedBuf, SharedIo};

use super::header::entry_to_offset;
use super::header::Header;
use crate::SECTOR;

pub const EXT_MAGIC: u64 = 0xAB23_4CEF_23DC_EA87;
pub const DIRTY_BITMAP_MAGIC: u64 = 0x2038_5FAE_252C_B34A;
/// Feature flag: software that cannot load the feature must not change
/// the file.
pub const FLAG_NECESSARY: u64 = 1;
/// Feature flag: software that does not know the feature keeps it as is.
pub const FLAG_TRANSIT: u64 = 2;
const FEATURE_HEADER: usize = 24;
const DIRTY_BITMAP_FIXED: usize = 32;

/// One feature of an extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Feature {
    /// A changed-block bitmap.
    DirtyBitmap {
        /// Disk size it covers, in sectors.
        size_sectors: u64,
        id: uuid::Uuid,
        /// Sectors per bit.
        granularity: u32,
        /// Per bitmap cluster: 0 all clear, 1 all set, else its sector.
        l1: Vec<u64>,
    },
    /// A feature this code does not know.
    Unknown { magic: u64, flags: u64, size: u32 },
}

impl Feature {
    /// Whether a writer that drops the extension would break this
    /// feature's rules (an unknown one flagged NECESSARY or TRANSIT).
    pub fn forbids_dropping(&self) -> bool {
        matches!(self, Feature::Unknown { flags, .. } if flags & (FLAG_NECESSARY | FLAG_TRANSIT) != 0)
    }
}

/// A format extension that checks out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extension {
    pub features: Vec<Feature>,
    /// File clusters it occupies: its own, then every bitmap cluster.
    pub clusters: Vec<u64>,
}

/// What the header's `ext_off` leads to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// No extension.
    None,
    /// An extension that checks out.
    Live(Extension),
    /// An offset that leads to no usable extension, and why.
    Dangling(String),
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Read the extension `header` points at. Err only for an I/O error: an
/// offset that leads nowhere usable (no extension there, a broken one,
/// clusters that data now uses) is `State::Dangling`.
pub fn read(io: &SharedIo, header: &Header, bat: &[u32], file_size: u64) -> std::io::Result<State> {
    let sector = header.raw.format_extension_offset;
    if sector == 0 {
        return Ok(State::None);
    }
    let cs = header.cluster_size;
    let mapped: HashSet<u64> = bat
        .iter()
        .filter(|&&e| e != 0)
        .map(|&e| entry_to_offset(header, e) / cs)
        .collect();
    let place = |sector: u64, what: &str| cluster_at(header, &mapped, file_size, sector, what);
    let own = match place(sector, "format extension") {
        Ok(c) => c,
        Err(why) => return Ok(State::Dangling(why)),
    };
    let mut buf = AlignedBuf::zeroed(cs as usize);
    io.read_at(buf.as_mut_slice(), own * cs)?;
    Ok(
        match parse(buf.as_slice(), own, |s| place(s, "dirty bitmap cluster")) {
            Ok(ext) => State::Live(ext),
            Err(why) => State::Dangling(why),
        },
    )
}

/// The file cluster at `sector`, if it can belong to the extension.
fn cluster_at(
    header: &Header,
    mapped: &HashSet<u64>,
    file_size: u64,
    sector: u64,
    what: &str,
) -> Result<u64, String> {
    let cs = header.cluster_size;
    let off = sector
        .checked_mul(SECTOR)
        .ok_or_else(|| format!("the {what} offset overflows"))?;
    if !off.is_multiple_of(cs) {
        return Err(format!("the {what} at byte {off} is not cluster-aligned"));
    }
    if off < header.data_offset {
        return Err(format!(
            "the {what} at byte {off} lies in the header/BAT area"
        ));
    }
    if off.saturating_add(cs) > file_size {
        return Err(format!(
            "the {what} at byte {off} lies past the end of the file"
        ));
    }
    if mapped.contains(&(off / cs)) {
        return Err(format!("the {what} at byte {off} now holds data"));
    }
    Ok(off / cs)
}

/// Parse the extension cluster `b` (file cluster `own`); `bitmap_cluster`
/// places a bitmap cluster's sector.
fn parse(
    b: &[u8],
    own: u64,
    bitmap_cluster: impl Fn(u64) -> Result<u64, String>,
) -> Result<Extension, String> {
    if u64_at(b, 0) != EXT_MAGIC {
        return Err(format!(
            "no format extension at its offset (magic {:#x})",
            u64_at(b, 0)
        ));
    }
    if Md5::digest(&b[24..]).as_slice() != &b[8..24] {
        return Err("the format extension's checksum is wrong".into());
    }
    let mut ext = Extension {
        features: Vec::new(),
        clusters: vec![own],
    };
    let mut pos = 24;
    loop {
        if pos + FEATURE_HEADER > b.len() {
            return Err("the format extension's features run past its cluster".into());
        }
        let magic = u64_at(b, pos);
        let flags = u64_at(b, pos + 8);
        let size = u32_at(b, pos + 16);
        pos += FEATURE_HEADER;
        if magic == 0 {
            return Ok(ext);
        }
        if flags & !(FLAG_NECESSARY | FLAG_TRANSIT) != 0 {
            return Err(format!("feature {magic:#x} has unknown flags {flags:#x}"));
        }
        let end = pos
            .checked_add(size as usize)
            .filter(|&e| e <= b.len())
            .ok_or("a feature's data runs past the format extension's cluster")?;
        let data = &b[pos..end];
        if magic == DIRTY_BITMAP_MAGIC {
            if data.len() < DIRTY_BITMAP_FIXED {
                return Err("a dirty bitmap feature is too short".into());
            }
            let l1_size = u32_at(data, 28) as usize;
            if l1_size > (data.len() - DIRTY_BITMAP_FIXED) / 8 {
                return Err("a dirty bitmap's table runs past its feature".into());
            }
            let l1: Vec<u64> = (0..l1_size)
                .map(|i| u64_at(data, DIRTY_BITMAP_FIXED + 8 * i))
                .collect();
            for &entry in l1.iter().filter(|&&e| e > 1) {
                ext.clusters.push(bitmap_cluster(entry)?);
            }
            ext.features.push(Feature::DirtyBitmap {
                size_sectors: u64_at(data, 0),
                id: uuid::Uuid::from_bytes(data[8..24].try_into().expect("16 bytes")),
                granularity: u32_at(data, 24),
                l1,
            });
        } else {
            ext.features.push(Feature::Unknown { magic, flags, size });
        }
        pos = end.next_multiple_of(8);
    }
}

/// The first dirty bitmap of a live extension, read into memory. None if
/// it has none, or one that does not fit this disk (its size or its
/// table's length differ, its granularity is no power of two): such a
/// bitmap cannot be trusted to cover every change.
pub fn load_bitmap(
    io: &SharedIo,
    header: &Header,
    ext: &Extension,
) -> std::io::Result<Option<super::cbt::Cbt>> {
    let Some(Feature::DirtyBitmap {
        size_sectors,
        id,
        granularity,
        l1,
    }) = ext
        .features
        .iter()
        .find(|f| matches!(f, Feature::DirtyBitmap { .. }))
    else {
        return Ok(None);
    };
    let gran = u64::from(*granularity) * SECTOR;
    if !gran.is_power_of_two() || size_sectors.checked_mul(SECTOR) != Some(header.virtual_size) {
        return Ok(None);
    }
    // Sized from the file's own table before anything is allocated: a
    // header may name any disk size.
    let cs = header.cluster_size;
    let per_entry = cs * 8;
    let bits = header.virtual_size.div_ceil(gran);
    if l1.len() as u64 != bits.div_ceil(per_entry) || bits > super::cbt::MAX_BITS {
        return Ok(None);
    }
    let cbt = super::cbt::Cbt::new(*id, gran, header.virtual_size);
    let mut buf = AlignedBuf::zeroed(cs as usize);
    for (i, &e) in l1.iter().enumerate() {
        let first = i as u64 * per_entry;
        match e {
            0 => {}
            1 => cbt.set_all(first, per_entry),
            sector => {
                io.read_at(buf.as_mut_slice(), sector * SECTOR)?;
                cbt.set_bytes(first, buf.as_slice());
            }
        }
    }
    Ok(Some(cbt))
}

/// Write `cbt` as a format extension from file cluster `at` on: its
/// bitmap clusters (none for a table entry that is all clear or all set),
/// then the extension cluster. Returns the extension's sector, for the
/// header, and the file's end after it. The caller syncs before it points
/// the header at it.
pub fn write_bitmap(
    io: &SharedIo,
    header: &Header,
    at: u64,
    cbt: &super::cbt::Cbt,
) -> std::io::Result<(u64, u64)> {
    let cs = header.cluster_size;
    let per_entry = cs * 8;
    let bits = cbt.bits();
    let entries = bits.div_ceil(per_entry);
    let need = 24 + FEATURE_HEADER + DIRTY_BITMAP_FIXED + 8 * entries as usize + FEATURE_HEADER;
    if need > cs as usize {
        return Err(std::io::Error::other(format!(
            "a dirty bitmap of {bits} bits needs a table larger than a {cs}-byte cluster"
        )));
    }
    let mut next = at;
    let mut l1 = Vec::with_capacity(entries as usize);
    let mut block = AlignedBuf::zeroed(cs as usize);
    for i in 0..entries {
        let first = i * per_entry;
        let n = per_entry.min(bits - first);
        let bytes = cbt.bytes(first, cs as usize);
        let full = n / 8;
        let all_set = bytes[..full as usize].iter().all(|&b| b == 0xff)
            && (n.is_multiple_of(8) || bytes[full as usize] == (1u8 << (n % 8)) - 1);
        if bytes.iter().all(|&b| b == 0) {
            l1.push(0);
        } else if all_set {
            l1.push(1);
        } else {
            block.as_mut_slice().copy_from_slice(&bytes);
            io.write_at(block.as_slice(), next * cs)?;
            l1.push(next * cs / SECTOR);
            next += 1;
        }
    }
    let c = block.as_mut_slice();
    c.fill(0);
    c[..8].copy_from_slice(&EXT_MAGIC.to_le_bytes());
    let mut pos = 24;
    let size = DIRTY_BITMAP_FIXED + 8 * l1.len();
    c[pos..pos + 8].copy_from_slice(&DIRTY_BITMAP_MAGIC.to_le_bytes());
    c[pos + 16..pos + 20].copy_from_slice(&(size as u32).to_le_bytes());
    pos += FEATURE_HEADER;
    c[pos..pos + 8].copy_from_slice(&(header.virtual_size / SECTOR).to_le_bytes());
    c[pos + 8..pos + 24].copy_from_slice(cbt.id.as_bytes());
    c[pos + 24..pos + 28].copy_from_slice(&((cbt.granularity / SECTOR) as u32).to_le_bytes());
    c[pos + 28..pos + 32].copy_from_slice(&(l1.len() as u32).to_le_bytes());
    for (i, e) in l1.iter().enumerate() {
        let at = pos + DIRTY_BITMAP_FIXED + 8 * i;
        c[at..at + 8].copy_from_slice(&e.to_le_bytes());
    }
    // The zeros after it end the list (a feature of magic 0).
    let sum = Md5::digest(&c[24..]);
    c[8..24].copy_from_slice(&sum);
    io.write_at(block.as_slice(), next * cs)?;
    Ok((next * cs / SECTOR, (next + 1) * cs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ploop::header::Version;
    use ploop_io::MemIo;
    use std::sync::Arc;

    const CS: u64 = 64 << 10;

    /// An image with an extension cluster at file cluster 2 and a bitmap
    /// cluster at 3, holding the given features.
    fn image(features: &[(u64, Vec<u8>)]) -> (SharedIo, Header) {
        let flagged: Vec<(u64, u64, Vec<u8>)> =
            features.iter().map(|(m, d)| (*m, 0, d.clone())).collect();
        image_flagged(&flagged)
    }

    /// Features as (magic, flags, data).
    fn image_flagged(features: &[(u64, u64, Vec<u8>)]) -> (SharedIo, Header) {
        let mut h = Header::new(8 * CS, CS, Version::V2).unwrap();
        h.raw.format_extension_offset = 2 * CS / SECTOR;
        h = Header::validate(h.raw, "t").unwrap();
        let io: SharedIo = Arc::new(MemIo::new("t"));
        io.set_len(4 * CS).unwrap();
        let mut c = vec![0u8; CS as usize];
        c[..8].copy_from_slice(&EXT_MAGIC.to_le_bytes());
        let mut pos = 24;
        for (magic, flags, data) in features {
            c[pos..pos + 8].copy_from_slice(&magic.to_le_bytes());
            c[pos + 8..pos + 16].copy_from_slice(&flags.to_le_bytes());
            c[pos + 16..pos + 20].copy_from_slice(&(data.len() as u32).to_le_bytes());
            pos += 24;
            c[pos..pos + data.len()].copy_from_slice(data);
            pos = (pos + data.len()).next_multiple_of(8);
        }
        let sum = Md5::digest(&c[24..]);
        c[8..24].copy_from_slice(&sum);
        io.write_at(&c, 2 * CS).unwrap();
        (io, h)
    }

    fn bitmap(l1: &[u64]) -> Vec<u8> {
        let mut d = vec![0u8; 32];
        d[..8].copy_from_slice(&(8 * CS / SECTOR).to_le_bytes());
        d[24..28].copy_from_slice(&128u32.to_le_bytes());
        d[28..32].copy_from_slice(&(l1.len() as u32).to_le_bytes());
        for e in l1 {
            d.extend_from_slice(&e.to_le_bytes());
        }
        d
    }

    #[test]
    fn a_bitmap_names_its_clusters() {
        let (io, h) = image(&[(DIRTY_BITMAP_MAGIC, bitmap(&[0, 3 * CS / SECTOR, 1]))]);
        let bat = vec![0u32; 8];
        let State::Live(ext) = read(&io, &h, &bat, 4 * CS).unwrap() else {
            panic!("no live extension");
        };
        assert_eq!(ext.clusters, vec![2, 3]);
        assert!(matches!(&ext.features[0], Feature::DirtyBitmap { l1, .. } if l1.len() == 3));
    }

    #[test]
    fn dangling_and_broken_extensions_say_why() {
        let (io, h) = image(&[(DIRTY_BITMAP_MAGIC, bitmap(&[3 * CS / SECTOR]))]);
        let mut bat = vec![0u32; 8];
        let why = |bat: &[u32], size: u64| match read(&io, &h, bat, size).unwrap() {
            State::Dangling(why) => why,
            other => panic!("{other:?}"),
        };
        assert!(
            why(&bat, 2 * CS).contains("past the end"),
            "{}",
            why(&bat, 2 * CS)
        );
        bat[5] = 3; // data took the bitmap's cluster
        assert!(why(&bat, 4 * CS).contains("holds data"));
        bat[5] = 2;
        assert!(why(&bat, 4 * CS).contains("holds data"));
        // A flipped byte breaks the checksum.
        let mut b = [0u8; 1];
        io.read_at(&mut b, 2 * CS + 100).unwrap();
        io.write_at(&[b[0] ^ 1], 2 * CS + 100).unwrap();
        assert!(why(&[0; 8], 4 * CS).contains("checksum"));
        // No extension at all where the offset points.
        io.write_at(&[0u8; 8], 2 * CS).unwrap();
        assert!(why(&[0; 8], 4 * CS).contains("no format extension"));
    }

    fn dangling(state: State) -> String {
        match state {
            State::Dangling(why) => why,
            other => panic!("{other:?}"),
        }
    }

    /// A header may name any disk size: a bitmap is sized from the
    /// file's own table and bounded before anything is allocated (this
    /// one would take 256 GiB).
    #[test]
    fn a_hostile_bitmap_size_allocates_nothing() {
        let h = Header::new(1 << 50, 64 << 20, Version::V2).unwrap();
        let io: SharedIo = Arc::new(MemIo::new("t"));
        let ext = Extension {
            features: vec![Feature::DirtyBitmap {
                size_sectors: (1 << 50) / SECTOR,
                id: uuid::Uuid::nil(),
                granularity: 1,
                l1: vec![1; 64],
            }],
            clusters: vec![],
        };
        assert!(load_bitmap(&io, &h, &ext).unwrap().is_none());
    }

    /// What is written is read back the same, and an image a writer saves
    /// its bitmap into names only its own clusters.
    #[test]
    fn a_saved_bitmap_reads_back() {
        let h = Header::new(40 * CS, CS, Version::V2).unwrap();
        let io: SharedIo = Arc::new(MemIo::new("t"));
        let c = super::super::cbt::Cbt::new(uuid::Uuid::from_u128(7), 4096, 40 * CS);
        c.mark(5 * 4096, 10);
        c.mark(39 * CS, CS);
        let (sector, end) = write_bitmap(&io, &h, 3, &c).unwrap();
        assert_eq!(end, 5 * CS, "one bitmap cluster, then the extension");
        let mut hb = h;
        hb.raw.format_extension_offset = sector;
        let hb = Header::validate(hb.raw, "t").unwrap();
        let State::Live(ext) = read(&io, &hb, &[0u32; 40], end).unwrap() else {
            panic!("no live extension");
        };
        assert_eq!(ext.clusters, vec![4, 3]);
        let back = load_bitmap(&io, &hb, &ext).unwrap().expect("a bitmap");
        assert_eq!(back.id, c.id);
        assert_eq!(back.runs(), c.runs());
    }

    #[test]
    fn hostile_sizes_stay_inside_the_cluster() {
        let (io, h) = image(&[(DIRTY_BITMAP_MAGIC, {
            let mut d = bitmap(&[]);
            d[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
            d
        })]);
        assert!(dangling(read(&io, &h, &[0; 8], 4 * CS).unwrap()).contains("runs past"));
    }

    /// Unknown features are kept track of with their flags: NECESSARY and
    /// TRANSIT ones forbid dropping the extension; unknown flag bits make
    /// it unusable.
    #[test]
    fn unknown_features_and_their_flags() {
        for (flags, forbids) in [(0, false), (FLAG_NECESSARY, true), (FLAG_TRANSIT, true)] {
            let (io, h) = image_flagged(&[(7, flags, vec![0u8; 16])]);
            let State::Live(ext) = read(&io, &h, &[0; 8], 4 * CS).unwrap() else {
                panic!("no live extension");
            };
            assert_eq!(
                ext.features,
                vec![Feature::Unknown {
                    magic: 7,
                    flags,
                    size: 16
                }]
            );
            assert_eq!(ext.features[0].forbids_dropping(), forbids);
        }
        let (io, h) = image_flagged(&[(7, 4, vec![0u8; 16])]);
        assert!(dangling(read(&io, &h, &[0; 8], 4 * CS).unwrap()).contains("unknown flags"));
    }

    /// A writable open drops an extension it can drop (a bitmap), in the
    /// header it writes, and refuses one with an unknown NECESSARY or
    /// TRANSIT feature, which it must not drop; read-only opens take both.
    #[test]
    fn a_writer_drops_what_it_may_and_refuses_what_it_must_keep() {
        use crate::ploop::{CreateOptions, OpenFlags, PloopDelta};
        for (flags, refused) in [(0, false), (FLAG_NECESSARY, true), (FLAG_TRANSIT, true)] {
            let (ext_io, _) = image_flagged(&[(7, flags, vec![0u8; 16])]);
            let mut cluster = vec![0u8; CS as usize];
            ext_io.read_at(&mut cluster, 2 * CS).unwrap();
            let io: SharedIo = Arc::new(MemIo::new("img"));
            PloopDelta::create(
                io.clone(),
                CreateOptions {
                    virtual_size: 8 * CS,
                    cluster_size: CS,
                    version: Version::V2,
                    preallocate: false,
                },
            )
            .unwrap();
            io.write_at(&cluster, CS).unwrap();
            io.write_at(&(CS / SECTOR).to_le_bytes(), 56).unwrap();
            let writable = OpenFlags {
                writable: true,
                allow_dirty: false,
            };
            let opened = PloopDelta::open(io.clone(), writable);
            let mut ext_off = [0u8; 8];
            assert_eq!(opened.is_err(), refused, "flags {flags}");
            if let Ok(d) = opened {
                d.close().unwrap();
                io.read_at(&mut ext_off, 56).unwrap();
                assert_eq!(u64::from_le_bytes(ext_off), 0, "the extension was kept");
            } else {
                io.read_at(&mut ext_off, 56).unwrap();
                assert_eq!(u64::from_le_bytes(ext_off), CS / SECTOR, "changed anyway");
                PloopDelta::open(io, OpenFlags::default()).unwrap();
            }
        }
    }
}
