//! What the crash explorers share: deterministic choices, and the
//! survivors of a power cut drawn from them.

use ploop_io::Survivors;

/// xorshift64: deterministic choices.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

impl Survivors for Rng {
    /// Each unflushed write survives with even odds.
    fn keep(&mut self) -> bool {
        self.next() & 1 == 1
    }

    /// One kept write in four is torn, keeping a random set of sectors.
    fn torn(&mut self, sectors: usize) -> Option<Vec<bool>> {
        (sectors > 1 && self.below(4) == 0)
            .then(|| (0..sectors).map(|_| self.next() & 1 == 1).collect())
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
