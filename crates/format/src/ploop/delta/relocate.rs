//! Moving the data clusters of a delta that is being written: compaction
//! and defragmentation while the disk is served.
//!
//! A batch of moves runs in three steps. Planning reserves each target, a
//! cluster nothing references, by taking it from the allocator, so no
//! write can be given it. Copying runs with I/O going on: a write that
//! lands in a source meanwhile is recorded by change tracking, which the
//! caller keeps on from before the first batch. Committing runs with no
//! I/O in flight (the caller drains it): the sources written since the
//! last commit are copied again, moves whose source is no longer the
//! cluster's home (discarded, moved) are dropped, and the BAT is pointed
//! at the copies and flushed the way every allocation is, data first.
//! Until that flush the old copies are what the BAT names on disk, so a
//! crash anywhere leaves the content it had; the old places are then free
//! and a tail of them is cut off the file.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use super::*;

/// One cluster to move: virtual cluster `cluster` from file cluster
/// `from` to file cluster `to` (indexes in clusters from the file start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Move {
    pub cluster: u64,
    pub from: u64,
    pub to: u64,
}

impl PloopDelta {
    /// The data clusters on the cluster grid: (file cluster, virtual
    /// cluster). Entries off the grid (a v1 image a foreign tool wrote)
    /// stay where they are.
    fn homes<'a>(&'a self, bat: &'a [u32]) -> impl Iterator<Item = (u64, u64)> + 'a {
        let cs = self.header.cluster_size;
        let header = &self.header;
        bat.iter()
            .enumerate()
            .filter(|(_, &e)| e != 0)
            .map(move |(v, &e)| (entry_to_offset(header, e), v as u64))
            .filter(move |(off, _)| off % cs == 0)
            .map(move |(off, v)| (off / cs, v))
    }

    /// First file cluster of the data area.
    fn first_data(&self) -> u64 {
        self.header.data_offset.div_ceil(self.header.cluster_size)
    }

    /// Data clusters that compaction still has to move: those above where
    /// the data ends once the file holds no gap.
    pub fn compaction_left(&self) -> u64 {
        let bat = self.bat.read().expect("bat lock");
        let end = self.first_data() + self.mapped.load(Ordering::Relaxed);
        self.homes(&bat).filter(|&(f, _)| f >= end).count() as u64
    }

    /// Data clusters not at their place in virtual order.
    pub fn defrag_left(&self) -> u64 {
        let bat = self.bat.read().expect("bat lock");
        let first = self.first_data();
        let mut homes: Vec<(u64, u64)> = self.homes(&bat).map(|(f, v)| (v, f)).collect();
        homes.sort_unstable();
        homes
            .iter()
            .enumerate()
            .filter(|&(rank, &(_, f))| f != first + rank as u64)
            .count() as u64
    }

    /// Up to `max` moves that bring the end of the file down: its highest
    /// data clusters into the lowest free clusters below them. Their
    /// targets are reserved until [`commit_moves`](Self::commit_moves) or
    /// [`abandon_moves`](Self::abandon_moves).
    pub fn plan_compaction(&self, max: usize) -> Result<Vec<Move>> {
        self.ensure_writable()?;
        // The `max` highest, kept in a heap of that size: the BAT may be
        // millions of entries long. Scanned without the allocation lock
        // (writes that allocate go on): a home that changes before the
        // commit is dropped there.
        let mut highest = BinaryHeap::with_capacity(max + 1);
        for home in self.homes(&self.bat.read().expect("bat lock")) {
            highest.push(Reverse(home));
            if highest.len() > max {
                highest.pop();
            }
        }
        let mut alloc = self.alloc.lock().expect("alloc lock");
        self.release_quarantined(&mut alloc);
        let mut highest: Vec<(u64, u64)> = highest.into_iter().map(|Reverse(h)| h).collect();
        highest.sort_unstable_by(|a, b| b.cmp(a));
        let mut moves: Vec<(u64, u64, u64)> = Vec::new();
        for (from, cluster) in highest {
            let Some(to) = alloc.free.pop_first() else {
                break;
            };
            if to >= from {
                alloc.free.insert(to);
                break;
            }
            moves.push((cluster, from, to));
        }
        // In order on both sides, so that neighbours move together.
        crate::ploop::compact::pair_in_order(&mut moves);
        Ok(moves
            .into_iter()
            .map(|(cluster, from, to)| Move { cluster, from, to })
            .collect())
    }

    /// Up to `max` moves toward virtual order: the k-th data cluster goes
    /// to the k-th cluster of the data area. A cluster in the way moves
    /// out first, above the area the data will fill (to the file's end if
    /// nothing is free there); the one it was in the way of follows in a
    /// later batch. Targets are reserved as in
    /// [`plan_compaction`](Self::plan_compaction).
    pub fn plan_defrag(&self, max: usize) -> Result<Vec<Move>> {
        self.ensure_writable()?;
        let cs = self.header.cluster_size;
        let first = self.first_data();
        let at: BTreeMap<u64, u64> = self.homes(&self.bat.read().expect("bat lock")).collect();
        let mut alloc = self.alloc.lock().expect("alloc lock");
        self.release_quarantined(&mut alloc);
        let mut order: Vec<(u64, u64)> = at.iter().map(|(&f, &v)| (v, f)).collect();
        order.sort_unstable();
        let area_end = first + order.len() as u64;
        let mut moves = Vec::new();
        // Clusters that already move in this batch, as sources.
        let mut moving = BTreeSet::new();
        for (rank, &(cluster, here)) in order.iter().enumerate() {
            if moves.len() >= max {
                break;
            }
            let target = first + rank as u64;
            if here == target || moving.contains(&cluster) {
                continue;
            }
            match at.get(&target) {
                None => {
                    if alloc.free.remove(target) {
                        moving.insert(cluster);
                        moves.push(Move {
                            cluster,
                            from: here,
                            to: target,
                        });
                    }
                    // Else reserved by a move of this batch or held by
                    // I/O of its time: a later batch.
                }
                Some(&other) if !moving.contains(&other) => {
                    let out = match alloc.free.pop_at_or_above(area_end) {
                        Some(c) => c,
                        None => {
                            if offset_to_entry(&self.header, alloc.end * cs).is_none() {
                                // A v1 image at its 2 TiB limit.
                                continue;
                            }
                            alloc.end += 1;
                            alloc.end - 1
                        }
                    };
                    moving.insert(other);
                    moves.push(Move {
                        cluster: other,
                        from: target,
                        to: out,
                    });
                }
                Some(_) => {}
            }
        }
        Ok(moves)
    }

    /// Buffers for moving clusters: runs of them at once.
    pub fn move_buffers(&self) -> [AlignedBuf; 2] {
        crate::ploop::compact::run_buffers(self.header.cluster_size)
    }

    /// Copy each move's cluster to its target, with I/O going on;
    /// neighbours together, as far as `bufs` (from [`move_buffers`]) hold.
    ///
    /// [`move_buffers`]: Self::move_buffers
    pub fn copy_moves(&self, moves: &[Move], bufs: &mut [AlignedBuf; 2]) -> Result<()> {
        self.ensure_writable()?;
        let pairs: Vec<(u64, u64)> = moves.iter().map(|m| (m.from, m.to)).collect();
        crate::ploop::compact::copy_runs(&self.io, self.header.cluster_size, &pairs, bufs)
    }

    fn copy_cluster(&self, m: &Move, buf: &mut AlignedBuf) -> Result<()> {
        let cs = self.header.cluster_size;
        let b = &mut buf.as_mut_slice()[..cs as usize];
        self.io
            .read_at(b, m.from * cs)
            .map_err(|e| Error::io(&self.path, "reading a cluster to move", m.from * cs, e))?;
        self.io
            .write_at(b, m.to * cs)
            .map_err(|e| Error::io(&self.path, "writing a moved cluster", m.to * cs, e))
    }

    /// Give the targets of moves that will not be committed back.
    pub fn abandon_moves(&self, moves: &[Move]) -> Result<()> {
        let mut alloc = self.alloc.lock().expect("alloc lock");
        for m in moves {
            alloc.free.insert(m.to);
        }
        self.trim_tail(&mut alloc)
    }

    /// Commit copied moves. The caller guarantees that no I/O is in flight
    /// and that `changed` holds every virtual cluster written since the
    /// copies began. Returns how many moved; the others (their cluster
    /// discarded or moved meanwhile) gave their targets back.
    pub fn commit_moves(
        &self,
        moves: &[Move],
        changed: &BTreeSet<u64>,
        bufs: &mut [AlignedBuf; 2],
    ) -> Result<u64> {
        if let Err(e) = self.ensure_writable() {
            if let Err(a) = self.abandon_moves(moves) {
                tracing::warn!("{}: giving moves up: {a}", self.path);
            }
            return Err(e);
        }
        let cs = self.header.cluster_size;
        let home = |cluster: u64| self.map(cluster).filter(|o| o % cs == 0).map(|o| o / cs);
        // The copies brought up to date first, the BAT untouched: a
        // failure leaves every move undone.
        let (keep, gone): (Vec<Move>, Vec<Move>) =
            moves.iter().partition(|m| home(m.cluster) == Some(m.from));
        let ready = keep
            .iter()
            .filter(|m| changed.contains(&m.cluster))
            .try_for_each(|m| self.copy_cluster(m, &mut bufs[0]))
            .and_then(|()| {
                keep.iter()
                    .map(|m| {
                        offset_to_entry(&self.header, m.to * cs).ok_or_else(|| {
                            Error::Invalid(format!(
                                "{}: file cluster {} is past what this version can address",
                                self.path, m.to
                            ))
                        })
                    })
                    .collect::<Result<Vec<u32>>>()
            });
        let entries = match ready {
            Ok(e) => e,
            Err(e) => {
                if let Err(a) = self.abandon_moves(moves) {
                    tracing::warn!("{}: giving moves up: {a}", self.path);
                }
                return Err(e);
            }
        };
        {
            let mut alloc = self.alloc.lock().expect("alloc lock");
            for m in &gone {
                alloc.free.insert(m.to);
            }
            let mut bat = self.bat.write().expect("bat lock");
            let mut dirty = self.dirty.lock().expect("dirty lock");
            for (m, entry) in keep.iter().zip(entries) {
                bat[m.cluster as usize] = entry;
                dirty.pages.insert(page_of(m.cluster));
                dirty.freed.push(m.from);
            }
        }
        // Data synced, then the BAT, then the old places freed and the
        // file's free tail cut.
        self.flush()?;
        Ok(keep.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ploop::compact::tests::{fresh as fresh_delta, CS};
    use crate::ploop::Version;

    fn fresh(clusters: u64) -> (SharedIo, PloopDelta) {
        fresh_delta(clusters, Version::V2)
    }

    fn pattern(c: u64, round: u64) -> Vec<u8> {
        (0..CS)
            .map(|i| (i as u8) ^ (c as u8).wrapping_mul(3) ^ (round as u8))
            .collect()
    }

    fn read(d: &PloopDelta, c: u64) -> Option<Vec<u8>> {
        let off = d.map(c)?;
        let mut buf = vec![0u8; CS as usize];
        d.read_data(&mut buf, off).unwrap();
        Some(buf)
    }

    /// Writes and discards between copy and commit: a moved cluster
    /// written meanwhile keeps the new data, a discarded one stays gone,
    /// and the file ends at its data.
    #[test]
    fn compaction_with_writes_between_copy_and_commit() {
        let (io, d) = fresh(100);
        for c in 0..60 {
            d.write_cluster(c, 0, &pattern(c, 0), None).unwrap();
        }
        for c in (0..40).step_by(2) {
            d.discard(c, 0, CS, true).unwrap();
        }
        d.flush().unwrap();
        let mut buf = d.move_buffers();
        d.start_tracking();
        assert_eq!(d.compaction_left(), 20);
        let moves = d.plan_compaction(8).unwrap();
        assert_eq!(moves.len(), 8);
        assert!(moves.iter().all(|m| m.to < m.from));
        d.copy_moves(&moves, &mut buf).unwrap();
        // The guest meanwhile: rewrites one moving cluster, drops another,
        // and allocates a new one (which must not get a reserved target).
        let (w, x) = (moves[0].cluster, moves[1].cluster);
        d.write_cluster(w, 0, &pattern(w, 1), None).unwrap();
        d.note_change(w);
        d.discard(x, 0, CS, true).unwrap();
        d.note_change(x);
        d.write_cluster(0, 0, &pattern(0, 1), None).unwrap();
        let reserved: BTreeSet<u64> = moves.iter().map(|m| m.to).collect();
        assert!(!reserved.contains(&(d.map(0).unwrap() / CS)));
        let moved = d.commit_moves(&moves, &d.take_changes(), &mut buf).unwrap();
        assert_eq!(moved, 7);
        assert_eq!(read(&d, w).unwrap(), pattern(w, 1));
        assert!(read(&d, x).is_none());
        // The rest, to the end.
        loop {
            let moves = d.plan_compaction(8).unwrap();
            if moves.is_empty() {
                break;
            }
            d.copy_moves(&moves, &mut buf).unwrap();
            d.commit_moves(&moves, &d.take_changes(), &mut buf).unwrap();
        }
        d.stop_tracking();
        assert_eq!(d.compaction_left(), 0);
        for c in 1..60 {
            let want = (c >= 40 || c % 2 == 1) && c != x;
            let r = read(&d, c);
            assert_eq!(r.is_some(), want, "cluster {c}");
            if let Some(r) = r {
                assert!(r == pattern(c, u64::from(c == w)), "cluster {c}");
            }
        }
        let data = d.allocated_clusters();
        d.close().unwrap();
        assert_eq!(io.size().unwrap(), d.header().data_offset + data * CS);
        assert!(crate::ploop::check::check(&io, false).unwrap().is_clean());
    }

    #[test]
    fn defrag_in_batches_reaches_virtual_order() {
        let (io, d) = fresh(64);
        let written: Vec<u64> = (0..40).rev().filter(|c| c % 3 != 1).collect();
        for &c in &written {
            d.write_cluster(c, 0, &pattern(c, 0), None).unwrap();
        }
        d.flush().unwrap();
        let mut buf = d.move_buffers();
        assert!(d.defrag_left() > 0);
        for _ in 0..200 {
            let moves = d.plan_defrag(5).unwrap();
            if moves.is_empty() {
                break;
            }
            d.copy_moves(&moves, &mut buf).unwrap();
            d.commit_moves(&moves, &BTreeSet::new(), &mut buf).unwrap();
        }
        assert_eq!(d.defrag_left(), 0);
        for &c in &written {
            assert!(read(&d, c).unwrap() == pattern(c, 0), "cluster {c}");
        }
        d.close().unwrap();
        let first = d.header().data_offset / CS;
        assert_eq!(io.size().unwrap(), (first + written.len() as u64) * CS);
        assert!(crate::ploop::check::check(&io, false).unwrap().is_clean());
    }

    /// A flush is one data sync only while no BAT change waits and no
    /// flush is under way: never after an allocation or a discard until
    /// flushed, nor once failed; and a failed outside sync stops the
    /// delta.
    #[test]
    fn an_outside_sync_only_when_no_metadata_waits() {
        let (_io, d) = fresh(8);
        let data_only = |d: &PloopDelta| {
            let yes = d.begin_outside_sync();
            if yes {
                d.end_outside_sync(true).unwrap();
            }
            yes
        };
        assert!(data_only(&d), "a fresh delta");
        d.write_cluster(1, 0, &pattern(1, 0), None).unwrap();
        assert!(!data_only(&d), "an allocation waits for its BAT page");
        d.flush().unwrap();
        assert!(data_only(&d));
        // In place: data only.
        d.write_cluster(1, 0, &pattern(1, 1), None).unwrap();
        assert!(data_only(&d));
        {
            // A flush under way (it holds this from before it takes the
            // pages until its BAT is synced).
            let _flushing = d.meta.lock().unwrap();
            assert!(!d.begin_outside_sync(), "not beside a flush");
        }
        d.discard(1, 0, CS, true).unwrap();
        assert!(!data_only(&d), "a discard waits for its BAT page");
        d.flush().unwrap();
        assert!(d.begin_outside_sync());
        assert!(d.end_outside_sync(false).is_err(), "a failed sync");
        assert!(!data_only(&d), "a failed delta flushes nothing");
        assert!(d.write_cluster(2, 0, &pattern(2, 0), None).is_err());
        assert!(d.flush().is_err());
    }

    #[test]
    fn abandoned_moves_give_their_targets_back() {
        let (io, d) = fresh(20);
        for c in 0..10 {
            d.write_cluster(c, 0, &pattern(c, 0), None).unwrap();
        }
        d.discard(2, 0, CS, true).unwrap();
        d.flush().unwrap();
        let before = io.size().unwrap();
        let moves = d.plan_compaction(4).unwrap();
        assert_eq!(moves.len(), 1);
        d.abandon_moves(&moves).unwrap();
        // The target is free again: the next allocation takes it.
        d.write_cluster(15, 0, &pattern(15, 0), None).unwrap();
        assert_eq!(d.map(15), Some(moves[0].to * CS));
        assert_eq!(io.size().unwrap(), before);
    }
}
