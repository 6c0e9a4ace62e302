//! The unreferenced file clusters of a delta, as runs: memory follows the
//! number of gaps, not the size of the file (a sparse file may claim
//! terabytes it never used).

use std::collections::BTreeMap;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct FreeClusters {
    /// start -> end (exclusive), neither touching nor overlapping.
    runs: BTreeMap<u64, u64>,
}

impl FreeClusters {
    /// The clusters in `first..end` that no entry of `used` names (`used`
    /// in any order, repeats and values outside the range allowed).
    pub fn gaps(first: u64, end: u64, mut used: Vec<u64>) -> Self {
        used.sort_unstable();
        used.dedup();
        let mut free = Self::default();
        let mut at = first;
        for u in used.into_iter().filter(|&u| u >= first && u < end) {
            if u > at {
                free.runs.insert(at, u);
            }
            at = u + 1;
        }
        if at < end {
            free.runs.insert(at, end);
        }
        free
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// The lowest free cluster, taken out.
    pub fn pop_first(&mut self) -> Option<u64> {
        let (start, end) = self.runs.pop_first()?;
        if start + 1 < end {
            self.runs.insert(start + 1, end);
        }
        Some(start)
    }

    pub fn insert(&mut self, c: u64) {
        let before = self.runs.range(..=c).next_back().map(|(&s, &e)| (s, e));
        if before.is_some_and(|(_, e)| c < e) {
            return; // already free
        }
        let mut start = c;
        let mut end = c + 1;
        if let Some((s, e)) = before.filter(|&(_, e)| e == c) {
            self.runs.remove(&s);
            start = s;
            end = end.max(e);
        }
        if let Some(e) = self.runs.remove(&(c + 1)) {
            end = e;
        }
        self.runs.insert(start, end);
    }

    /// The lowest free cluster at or above `at`, taken out.
    pub fn pop_at_or_above(&mut self, at: u64) -> Option<u64> {
        let found = match self.runs.range(..=at).next_back() {
            Some((_, &e)) if at < e => Some(at),
            _ => self.runs.range(at..).next().map(|(&s, _)| s),
        };
        let c = found?;
        self.remove(c);
        Some(c)
    }

    /// Take `c` out if it is free; whether it was.
    pub fn remove(&mut self, c: u64) -> bool {
        let Some((&s, &e)) = self.runs.range(..=c).next_back() else {
            return false;
        };
        if c >= e {
            return false;
        }
        self.runs.remove(&s);
        if s < c {
            self.runs.insert(s, c);
        }
        if c + 1 < e {
            self.runs.insert(c + 1, e);
        }
        true
    }

    /// Drop the runs that end the file at `end`: the new end.
    pub fn trim_back(&mut self, mut end: u64) -> u64 {
        while let Some((&s, &e)) = self.runs.last_key_value() {
            if e != end {
                break;
            }
            self.runs.remove(&s);
            end = s;
        }
        end
    }

    #[cfg(test)]
    fn runs(&self) -> Vec<(u64, u64)> {
        self.runs.iter().map(|(&s, &e)| (s, e)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_pop_insert_and_trim() {
        let mut f = FreeClusters::gaps(1, 10, vec![5, 3, 3, 0, 42, 8]);
        assert_eq!(f.runs(), vec![(1, 3), (4, 5), (6, 8), (9, 10)]);
        assert_eq!(f.pop_first(), Some(1));
        assert_eq!(f.pop_first(), Some(2));
        assert_eq!(f.runs(), vec![(4, 5), (6, 8), (9, 10)]);
        f.insert(5); // joins both neighbours
        f.insert(8);
        assert_eq!(f.runs(), vec![(4, 10)]);
        f.insert(6); // already free
        f.insert(2);
        assert_eq!(f.runs(), vec![(2, 3), (4, 10)]);
        assert_eq!(f.trim_back(10), 4);
        assert_eq!(f.trim_back(3), 2);
        assert!(f.is_empty());
        assert_eq!(f.trim_back(7), 7);
        assert_eq!(FreeClusters::gaps(5, 5, vec![]).pop_first(), None);
        assert_eq!(FreeClusters::gaps(0, 3, vec![]).runs(), vec![(0, 3)]);
        let mut f = FreeClusters::gaps(0, 10, vec![4]);
        assert!(f.remove(2));
        assert!(!f.remove(2));
        assert!(!f.remove(4));
        assert!(f.remove(9));
        assert!(f.remove(0));
        assert_eq!(f.runs(), vec![(1, 2), (3, 4), (5, 9)]);
        assert_eq!(f.pop_at_or_above(2), Some(3));
        assert_eq!(f.pop_at_or_above(6), Some(6));
        assert_eq!(f.pop_at_or_above(9), None);
        assert_eq!(f.runs(), vec![(1, 2), (5, 6), (7, 9)]);
    }
}
