//! Changed-block tracking (CBT): which parts of the disk changed since a
//! point, one bit per `granularity` bytes, named by a UUID. Kept in memory
//! while the top delta is open for writing; saved in the format extension
//! on a clean close (see [`super::ext`]) as OpenVZ and Parallels save it,
//! where qemu's `parallels` driver reads it too.

use std::sync::atomic::{AtomicU64, Ordering};

/// The most bits a bitmap read from a file may have (32 MiB of memory):
/// a 16 TiB disk at 64 KiB a bit, or far more at a cluster a bit.
pub const MAX_BITS: u64 = 1 << 28;

/// A dirty bitmap. Bits are set as writes come (never cleared but by
/// starting a new one), so it never claims less than what changed.
pub struct Cbt {
    pub id: uuid::Uuid,
    /// Bytes per bit (a power of two, at least a sector).
    pub granularity: u64,
    /// The disk's size in bytes.
    pub size: u64,
    words: Box<[AtomicU64]>,
}

impl std::fmt::Debug for Cbt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cbt")
            .field("id", &self.id)
            .field("granularity", &self.granularity)
            .field("size", &self.size)
            .field("set", &self.count())
            .finish()
    }
}

impl Cbt {
    /// An empty bitmap over `size` bytes. `granularity` must be a power
    /// of two of at least 512 bytes.
    pub fn new(id: uuid::Uuid, granularity: u64, size: u64) -> Cbt {
        debug_assert!(granularity.is_power_of_two() && granularity >= 512);
        let bits = size.div_ceil(granularity);
        let words = (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Cbt {
            id,
            granularity,
            size,
            words,
        }
    }

    /// Bits in the bitmap.
    pub fn bits(&self) -> u64 {
        self.size.div_ceil(self.granularity)
    }

    /// Mark `[offset, offset + len)` changed.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let first = offset / self.granularity;
        let last = (offset.saturating_add(len).min(self.size) - 1) / self.granularity;
        for bit in first..=last {
            self.words[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::Relaxed);
        }
    }

    pub fn is_set(&self, bit: u64) -> bool {
        bit < self.bits()
            && self.words[(bit / 64) as usize].load(Ordering::Relaxed) & (1 << (bit % 64)) != 0
    }

    /// Bits set.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// The changed byte ranges, in order, as (offset, length).
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for bit in 0..self.bits() {
            if !self.is_set(bit) {
                continue;
            }
            let start = bit * self.granularity;
            let len = self.granularity.min(self.size - start);
            match out.last_mut() {
                Some((s, l)) if *s + *l == start => *l += len,
                _ => out.push((start, len)),
            }
        }
        out
    }

    /// `len` bytes of the bitmap from bit `first_bit` (a multiple of 8),
    /// as stored: bit i of the run in byte i / 8, bit i % 8.
    pub fn bytes(&self, first_bit: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        for (i, b) in out.iter_mut().enumerate() {
            let bit0 = first_bit + 8 * i as u64;
            if bit0 >= self.bits() {
                break;
            }
            let w = self.words[(bit0 / 64) as usize].load(Ordering::Relaxed);
            *b = (w >> (bit0 % 64)) as u8;
        }
        out
    }

    /// Set the bits that `bytes` (stored as [`bytes`](Self::bytes) gives
    /// them) has set, from bit `first_bit` (a multiple of 8); bits past
    /// the disk are ignored.
    pub fn set_bytes(&self, first_bit: u64, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            let bit0 = first_bit + 8 * i as u64;
            if bit0 >= self.bits() {
                break;
            }
            let mut v = u64::from(b);
            let room = self.bits() - bit0;
            if room < 8 {
                v &= (1 << room) - 1;
            }
            self.words[(bit0 / 64) as usize].fetch_or(v << (bit0 % 64), Ordering::Relaxed);
        }
    }

    /// Set every bit from `first_bit` for `count` bits (clipped).
    pub fn set_all(&self, first_bit: u64, count: u64) {
        let end = first_bit.saturating_add(count).min(self.bits());
        for bit in first_bit..end {
            self.words[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_trip_through_bytes() {
        let c = Cbt::new(uuid::Uuid::nil(), 4096, 100 * 4096 + 512);
        assert_eq!(c.bits(), 101);
        c.mark(4096 * 3 + 10, 1);
        c.mark(4096 * 9, 4096 * 2);
        c.mark(100 * 4096, 512);
        c.mark(200 * 4096, 1); // past the end: ignored
        assert_eq!(c.count(), 4);
        assert_eq!(
            c.runs(),
            vec![(3 * 4096, 4096), (9 * 4096, 2 * 4096), (100 * 4096, 512)]
        );
        let b = c.bytes(0, 13);
        assert_eq!(b[0], 0b0000_1000);
        assert_eq!(b[1], 0b0000_0110);
        assert_eq!(b[12], 0b0001_0000);
        let d = Cbt::new(uuid::Uuid::nil(), 4096, 100 * 4096 + 512);
        d.set_bytes(0, &[0xff; 20]);
        assert_eq!(d.count(), 101, "bits past the disk stay clear");
        let e = Cbt::new(uuid::Uuid::nil(), 4096, 100 * 4096 + 512);
        e.set_bytes(0, &b);
        assert_eq!(e.runs(), c.runs());
    }
}
