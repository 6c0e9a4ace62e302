//! What the tests of every crate share: deterministic random choices and
//! data (the crash explorers draw their survivors from them too). Not part
//! of any release build.

#![forbid(unsafe_code)]

use ploop_io::Survivors;

/// xorshift64: deterministic, dependency-free choices and test data.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// A generator for `seed` (any value, zero included).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (which must not be 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// `len` pseudo-random bytes from `seed`.
/// Whether this process has CAP_SYS_RESOURCE (bit 24 of CapEff): some
/// sandboxes drop it even for root, and what needs it (growing a mounted
/// ext4, PR_SET_IO_FLUSHER) fails there.
pub fn has_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff in /proc/self/status");
    u64::from_str_radix(eff.trim(), 16).expect("CapEff in hex") & (1 << 24) != 0
}

pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

impl Survivors for Rng {
    /// Each unflushed write survives with even odds.
    fn keep(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }

    /// One kept write in four is torn, keeping a random set of sectors.
    fn torn(&mut self, sectors: usize) -> Option<Vec<bool>> {
        (sectors > 1 && self.below(4) == 0)
            .then(|| (0..sectors).map(|_| self.next_u64() & 1 == 1).collect())
    }

    /// Kept writes land in a random order.
    fn order(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
        v
    }

    /// Any prefix of the unsynced folder changes survives.
    fn prefix(&mut self, n: usize) -> usize {
        self.below(n as u64 + 1) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_data() {
        assert_eq!(data(7, 100), data(7, 100));
        assert_ne!(data(7, 100), data(8, 100));
        assert!(data(0, 64).iter().any(|&b| b != 0));
    }
}
