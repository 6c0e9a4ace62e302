//! The stream's layout. All numbers are little-endian.
//!
//! ```text
//! header   magic "PLOOPCPY", version 1, format, disk size, cluster size, crc
//! packet   marker 0x4cc0ac3e (OpenVZ's PCOPY_MARKER), kind, pos, len, crc
//!          DATA: `len` bytes of the disk at `pos` follow (at most MAX_DATA)
//!          ZERO: `len` bytes at `pos` read as zeros
//!          PASS: pass number `pos` is over
//!          END:  `pos` DATA and ZERO packets came, covering `len` bytes
//! ```
//!
//! Each crc is CRC-32C of the header or packet with its crc field zero,
//! followed, for DATA, by the data: a flipped bit anywhere is caught.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub const MAGIC: [u8; 8] = *b"PLOOPCPY";
pub const VERSION: u32 = 1;
/// OpenVZ's marker of a copy packet (lib/ploop-copy.c).
pub const MARKER: u32 = 0x4cc0_ac3e;
/// The most data one packet carries (what a receiver buffers).
pub const MAX_DATA: u64 = 8 << 20;
/// Cluster sizes a stream may name.
pub const MIN_CLUSTER: u64 = 512;
pub const MAX_CLUSTER: u64 = 64 << 20;
/// Disk sizes a stream may name (64 TiB): what a receiver makes an
/// image of, BAT and all, before any data comes.
pub const MAX_SIZE: u64 = 1 << 46;

/// The image format the receiver should write.
pub const FORMAT_PLOOP: u32 = 0;
pub const FORMAT_RAW: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Header {
    pub magic: [u8; 8],
    pub version: U32,
    pub format: U32,
    pub size: U64,
    pub cluster: U64,
    pub crc: U32,
    pub reserved: U32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Packet {
    pub marker: U32,
    pub kind: U32,
    pub pos: U64,
    pub len: U64,
    pub crc: U32,
    pub reserved: U32,
}

const _: () = assert!(size_of::<Header>() == 40);
const _: () = assert!(size_of::<Packet>() == 32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Data = 1,
    Zero = 2,
    Pass = 3,
    End = 4,
}

impl Kind {
    pub fn from_u32(v: u32) -> Option<Kind> {
        Some(match v {
            1 => Kind::Data,
            2 => Kind::Zero,
            3 => Kind::Pass,
            4 => Kind::End,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Data => "DATA",
            Kind::Zero => "ZERO",
            Kind::Pass => "PASS",
            Kind::End => "END",
        }
    }
}

impl Header {
    pub fn new(format: u32, size: u64, cluster: u64) -> Header {
        let mut h = Header {
            magic: MAGIC,
            version: VERSION.into(),
            format: format.into(),
            size: size.into(),
            cluster: cluster.into(),
            crc: 0.into(),
            reserved: 0.into(),
        };
        h.crc = h.checksum().into();
        h
    }

    /// CRC-32C of the header with its crc field zero.
    pub fn checksum(&self) -> u32 {
        let mut h = *self;
        h.crc = 0.into();
        crc32c::crc32c(h.as_bytes())
    }

    /// Why the header cannot start a stream we take, if it cannot.
    pub fn problem(&self) -> Option<String> {
        if self.magic != MAGIC {
            return Some("not a ploop copy stream (bad magic)".into());
        }
        if self.version.get() != VERSION {
            return Some(format!(
                "stream version {} (we read {VERSION})",
                self.version
            ));
        }
        if self.checksum() != self.crc.get() {
            return Some("header checksum mismatch".into());
        }
        let (size, cluster) = (self.size.get(), self.cluster.get());
        if !cluster.is_power_of_two() || !(MIN_CLUSTER..=MAX_CLUSTER).contains(&cluster) {
            return Some(format!("cluster size {cluster} out of range"));
        }
        if size == 0 || size > MAX_SIZE || size % MIN_CLUSTER != 0 {
            return Some(format!("disk size {size} out of range"));
        }
        if self.format.get() != FORMAT_PLOOP && self.format.get() != FORMAT_RAW {
            return Some(format!("unknown image format {}", self.format));
        }
        None
    }
}

impl Packet {
    pub fn new(kind: Kind, pos: u64, len: u64, data: &[u8]) -> Packet {
        let mut p = Packet {
            marker: MARKER.into(),
            kind: (kind as u32).into(),
            pos: pos.into(),
            len: len.into(),
            crc: 0.into(),
            reserved: 0.into(),
        };
        p.crc = p.checksum(data).into();
        p
    }

    /// CRC-32C of the packet with its crc field zero, then `data`.
    pub fn checksum(&self, data: &[u8]) -> u32 {
        let mut p = *self;
        p.crc = 0.into();
        crc32c::crc32c_append(crc32c::crc32c(p.as_bytes()), data)
    }
}
