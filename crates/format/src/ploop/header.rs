//! The 64-byte ploop header: the wire struct, and the validated view of it.

use crate::{Error, Result, SECTOR};

pub const HEADER_SIZE: usize = 64;
pub const SIGNATURE_V1: [u8; 16] = *b"WithoutFreeSpace";
pub const SIGNATURE_V2: [u8; 16] = *b"WithouFreSpacExt";
/// The only image type OpenVZ and qemu write ("compressed", i.e. sparse).
pub const IMAGE_TYPE: u32 = 2;
/// "Ynot": set while the image is open read-write.
pub const IN_USE_MAGIC: u32 = 0x746F_6E59;
/// `disk_in_use` of an image closed by a writer of version 2.1 of the
/// format ("v2.1"), which may leave a format extension.
pub const CLOSED_V21_MAGIC: u32 = 0x312e_3276;
pub const HEADS: u32 = 16;
/// Header flag: the image has no data yet.
pub const FLAG_EMPTY: u32 = 1;
/// Header flag: a version conversion was interrupted.
pub const FLAG_CONVERTING: u32 = 2;

/// Smallest and largest cluster we create (OpenVZ's limits).
pub const MIN_CLUSTER: u64 = 32 << 10;
pub const MIN_CLUSTER_SECTORS: u64 = MIN_CLUSTER / 512;
pub const MAX_CLUSTER: u64 = 64 << 20;
/// Smallest cluster we read: qemu creates images down to 4 KiB clusters.
pub const MIN_READ_CLUSTER: u64 = 4 << 10;

/// Header fields exactly as on disk (all little-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawHeader {
    pub signature: [u8; 16],
    pub image_type: u32,
    pub heads: u32,
    pub cylinders: u32,
    /// Cluster size in sectors.
    pub sectors: u32,
    pub bat_entries: u32,
    pub size_in_sectors: u64,
    pub disk_in_use: u32,
    pub first_block_offset: u32,
    pub flags: u32,
    pub format_extension_offset: u64,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl RawHeader {
    pub fn parse(b: &[u8; HEADER_SIZE]) -> Self {
        Self {
            signature: b[0..16].try_into().expect("16 bytes"),
            image_type: u32_at(b, 16),
            heads: u32_at(b, 20),
            cylinders: u32_at(b, 24),
            sectors: u32_at(b, 28),
            bat_entries: u32_at(b, 32),
            size_in_sectors: u64_at(b, 36),
            disk_in_use: u32_at(b, 44),
            first_block_offset: u32_at(b, 48),
            flags: u32_at(b, 52),
            format_extension_offset: u64_at(b, 56),
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..16].copy_from_slice(&self.signature);
        b[16..20].copy_from_slice(&self.image_type.to_le_bytes());
        b[20..24].copy_from_slice(&self.heads.to_le_bytes());
        b[24..28].copy_from_slice(&self.cylinders.to_le_bytes());
        b[28..32].copy_from_slice(&self.sectors.to_le_bytes());
        b[32..36].copy_from_slice(&self.bat_entries.to_le_bytes());
        b[36..44].copy_from_slice(&self.size_in_sectors.to_le_bytes());
        b[44..48].copy_from_slice(&self.disk_in_use.to_le_bytes());
        b[48..52].copy_from_slice(&self.first_block_offset.to_le_bytes());
        b[52..56].copy_from_slice(&self.flags.to_le_bytes());
        b[56..64].copy_from_slice(&self.format_extension_offset.to_le_bytes());
        b
    }
}

/// Format version: how BAT entries are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// Entries are sector offsets; files stop just under 2 TiB.
    V1,
    /// Entries are cluster indexes.
    V2,
}

impl Version {
    pub fn number(self) -> u32 {
        match self {
            Version::V1 => 1,
            Version::V2 => 2,
        }
    }

    pub fn signature(self) -> [u8; 16] {
        match self {
            Version::V1 => SIGNATURE_V1,
            Version::V2 => SIGNATURE_V2,
        }
    }
}

/// Legacy cylinder/head/sector geometry, computed the way OpenVZ does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chs {
    pub cylinders: u32,
    pub heads: u32,
    pub sectors: u32,
}

impl Chs {
    pub fn from_sectors(n: u64) -> Self {
        let clamp = |v: u64| v.min(u64::from(u32::MAX)) as u32;
        if n > 1_032_192 && n < 16_777_216 {
            return Self {
                cylinders: clamp(n / 1008),
                heads: HEADS,
                sectors: 63,
            };
        }
        for s in [63u64, 32, 16, 8] {
            if n.is_multiple_of(s) {
                for h in [16u64, 8, 4, 2] {
                    if (n / s).is_multiple_of(h) {
                        return Self {
                            cylinders: clamp(n / s / h),
                            heads: h as u32,
                            sectors: s as u32,
                        };
                    }
                }
            }
        }
        Self {
            cylinders: clamp(n),
            heads: 1,
            sectors: 1,
        }
    }
}

/// A header that passed validation, in bytes rather than sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: Version,
    pub cluster_size: u64,
    pub bat_entries: u32,
    pub virtual_size: u64,
    /// Start of the data area; header + BAT live before it.
    pub data_offset: u64,
    pub in_use: bool,
    pub flags: u32,
    pub raw: RawHeader,
}

/// Bytes taken by header + BAT before rounding to clusters.
pub fn metadata_bytes(bat_entries: u64) -> u64 {
    HEADER_SIZE as u64 + 4 * bat_entries
}

impl Header {
    /// Validate a wire header. `path` only names the file in errors.
    pub fn validate(raw: RawHeader, path: &str) -> Result<Self> {
        let bad = |what: String| Error::corrupt(path, what);
        let version = match raw.signature {
            SIGNATURE_V1 => Version::V1,
            SIGNATURE_V2 => Version::V2,
            other => {
                return Err(bad(format!(
                    "not a ploop image: signature is {:?}, expected \"WithoutFreeSpace\" or \"WithouFreSpacExt\"",
                    String::from_utf8_lossy(&other)
                )))
            }
        };
        if raw.image_type != IMAGE_TYPE {
            return Err(bad(format!(
                "unsupported image type {} (expected {IMAGE_TYPE})",
                raw.image_type
            )));
        }
        let cluster_sectors = u64::from(raw.sectors);
        let cluster_size = cluster_sectors * SECTOR;
        if cluster_sectors == 0 || !cluster_sectors.is_power_of_two() {
            return Err(bad(format!(
                "cluster size of {} sectors is not a power of two",
                raw.sectors
            )));
        }
        if !(MIN_READ_CLUSTER..=MAX_CLUSTER).contains(&cluster_size) {
            return Err(bad(format!(
                "cluster size {cluster_size} bytes is outside {MIN_READ_CLUSTER}..={MAX_CLUSTER}"
            )));
        }
        let size_sectors = match version {
            Version::V1 => raw.size_in_sectors & 0xffff_ffff,
            Version::V2 => raw.size_in_sectors,
        };
        let virtual_size = size_sectors
            .checked_mul(SECTOR)
            .ok_or_else(|| bad(format!("size of {size_sectors} sectors overflows")))?;
        // OpenVZ and qemu write exactly size / cluster entries, but both
        // accept a table that holds more (entries past the disk's end are
        // never used) or fewer (the clusters past its end read as zeros
        // and cannot be written): so do we.
        let meta = metadata_bytes(u64::from(raw.bat_entries));
        let data_offset = u64::from(raw.first_block_offset) * SECTOR;
        // Clusters sit on a grid from byte 0, as OpenVZ requires (its check
        // refuses other layouts); a data start off that grid would make
        // every BAT entry look misaligned to the check and its repair.
        if data_offset == 0 || !data_offset.is_multiple_of(cluster_size) {
            return Err(bad(format!(
                "first data block at byte {data_offset} is not a whole number of {cluster_size}-byte clusters: this layout is not supported"
            )));
        }
        if data_offset < meta {
            return Err(bad(format!(
                "first data block at byte {data_offset} overlaps the BAT, which ends at byte {meta}"
            )));
        }
        let meta_end = meta.div_ceil(cluster_size) * cluster_size;
        if data_offset > meta_end {
            return Err(bad(format!(
                "first data block at byte {data_offset} lies past the end of the header and BAT clusters (byte {meta_end})"
            )));
        }
        if raw.flags & FLAG_CONVERTING != 0 {
            return Err(bad(
                "a format version conversion was interrupted; run `ploop check` to roll it back"
                    .into(),
            ));
        }
        Ok(Self {
            version,
            cluster_size,
            bat_entries: raw.bat_entries,
            virtual_size,
            data_offset,
            in_use: raw.disk_in_use == IN_USE_MAGIC,
            flags: raw.flags,
            raw,
        })
    }

    /// A fresh header for a new image.
    pub fn new(virtual_size: u64, cluster_size: u64, version: Version) -> Result<Self> {
        if !cluster_size.is_power_of_two() || !(MIN_CLUSTER..=MAX_CLUSTER).contains(&cluster_size) {
            return Err(Error::Invalid(format!(
                "cluster size {cluster_size} bytes: must be a power of two from 32 KiB to 64 MiB"
            )));
        }
        if virtual_size == 0 {
            return Err(Error::Invalid("image size must be positive".into()));
        }
        // OpenVZ rounds the size up to whole clusters.
        let virtual_size = virtual_size
            .checked_next_multiple_of(cluster_size)
            .ok_or_else(|| Error::Invalid(format!("image size {virtual_size} bytes overflows")))?;
        let bat_entries = virtual_size / cluster_size;
        let size_sectors = virtual_size / SECTOR;
        let limit = match version {
            Version::V1 => u64::from(u32::MAX),
            Version::V2 => u64::from(u32::MAX) * (cluster_size / SECTOR),
        };
        if size_sectors > limit || bat_entries > u64::from(u32::MAX) {
            return Err(Error::Invalid(format!(
                "image size {virtual_size} bytes is too large for ploop version {}",
                version.number()
            )));
        }
        let meta = metadata_bytes(bat_entries);
        let data_offset = meta.div_ceil(cluster_size) * cluster_size;
        let cluster_sectors = (cluster_size / SECTOR) as u32;
        let chs = Chs::from_sectors(size_sectors);
        let raw = RawHeader {
            signature: version.signature(),
            image_type: IMAGE_TYPE,
            heads: chs.heads,
            cylinders: chs.cylinders,
            sectors: cluster_sectors,
            bat_entries: bat_entries as u32,
            size_in_sectors: size_sectors,
            disk_in_use: 0,
            first_block_offset: u32::try_from(data_offset / SECTOR).map_err(|_| {
                Error::Invalid(format!(
                    "image size {virtual_size} bytes needs too large a BAT"
                ))
            })?,
            flags: FLAG_EMPTY,
            format_extension_offset: 0,
        };
        Header::validate(raw, "<new image>")
    }
}

/// Byte offset in the file that a BAT entry stands for.
pub fn entry_to_offset(header: &Header, entry: u32) -> u64 {
    match header.version {
        Version::V1 => u64::from(entry) * SECTOR,
        Version::V2 => u64::from(entry) * header.cluster_size,
    }
}

/// BAT entry for a file offset, if it fits the version's range.
pub fn offset_to_entry(header: &Header, offset: u64) -> Option<u32> {
    let e = match header.version {
        Version::V1 => offset / SECTOR,
        Version::V2 => offset / header.cluster_size,
    };
    u32::try_from(e).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_layout() {
        let h = Header::new(10 << 30, 1 << 20, Version::V2).unwrap();
        let b = h.raw.to_bytes();
        assert_eq!(&b[0..16], b"WithouFreSpacExt");
        assert_eq!(u32_at(&b, 28), 2048);
        assert_eq!(u32_at(&b, 32), 10240);
        assert_eq!(u64_at(&b, 36), 20971520);
        assert_eq!(u32_at(&b, 48), 2048, "header+BAT fit in the first cluster");
        assert_eq!(RawHeader::parse(&b), h.raw);
        // OpenVZ's worked values: (sectors, heads, cylinders).
        for (size, chs) in [
            (1u64 << 30, (63, 16, 2080)),
            (10 << 30, (32, 16, 40960)),
            (100 << 20, (32, 16, 400)),
            (2 << 30, (63, 16, 4161)),
        ] {
            let c = Chs::from_sectors(size / SECTOR);
            assert_eq!((c.sectors, c.heads, c.cylinders), chs, "size {size}");
        }
    }

    #[test]
    fn rejects_bad_fields() {
        let good = Header::new(1 << 30, 1 << 20, Version::V2).unwrap().raw;
        let check = |raw: RawHeader, needle: &str| {
            let e = Header::validate(raw, "img").unwrap_err().to_string();
            assert!(e.contains(needle), "{e} should mention {needle}");
            assert!(e.starts_with("img: "), "{e} names the file");
        };
        check(
            RawHeader {
                signature: *b"NotAPloopImage!!",
                ..good
            },
            "signature",
        );
        check(RawHeader { sectors: 0, ..good }, "power of two");
        check(
            RawHeader {
                sectors: 3000,
                ..good
            },
            "power of two",
        );
        check(
            RawHeader {
                size_in_sectors: u64::MAX,
                ..good
            },
            "overflows",
        );
        // A table shorter than the disk is accepted, as qemu and OpenVZ
        // do; one longer than its metadata area is not.
        let short = Header::validate(
            RawHeader {
                bat_entries: 1,
                ..good
            },
            "img",
        )
        .unwrap();
        assert_eq!(short.virtual_size, 1 << 30);
        check(
            RawHeader {
                bat_entries: u32::MAX,
                ..good
            },
            "overlaps",
        );
        for sectors in [0, 1, 2049] {
            check(
                RawHeader {
                    first_block_offset: sectors,
                    ..good
                },
                "whole number of",
            );
        }
        // A data start on the grid but inside a BAT of several clusters.
        let small = Header::new(1 << 30, 32 << 10, Version::V2).unwrap().raw;
        check(
            RawHeader {
                first_block_offset: 64,
                ..small
            },
            "overlaps",
        );
        check(
            RawHeader {
                first_block_offset: 0x8000_0000,
                ..good
            },
            "past the end of the header",
        );
        check(
            RawHeader {
                flags: FLAG_CONVERTING,
                ..good
            },
            "conversion",
        );
    }

    #[test]
    fn creation_limits() {
        assert!(Header::new(1 << 30, 3 << 20, Version::V2).is_err());
        assert!(Header::new(1 << 30, 16 << 10, Version::V2).is_err());
        assert!(Header::new(0, 1 << 20, Version::V2).is_err());
        assert_eq!(
            Header::new(1000, 1 << 20, Version::V2)
                .unwrap()
                .virtual_size,
            1 << 20
        );
        assert!(Header::new(4 << 40, 1 << 20, Version::V1).is_err());
        assert!(Header::new(4 << 40, 1 << 20, Version::V2).is_ok());
    }
}
