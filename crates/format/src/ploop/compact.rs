//! Give a closed delta's free space back: data clusters from the end of
//! the file move into the unreferenced clusters below them (a discard, a
//! merge, a crash leaves those), and the file is cut after the last one
//! still used.
//!
//! Each batch of moves is crash-safe on its own: the data goes into
//! clusters nothing references and is synced, then the BAT entries are
//! pointed at it and synced; until then the old copies are what the BAT
//! names, after it the new ones are, and the places left behind are as
//! unreferenced as the ones filled were. The file is cut last. So a
//! compaction stopped anywhere (a crash, a signal between batches) leaves
//! a delta that opens with the same content.

use std::collections::BTreeMap;

use ploop_io::{AlignedBuf, SharedIo};

use super::delta::{page_of, read_metadata, write_metadata_pages};
use super::ext::{self, State};
use super::header::{entry_to_offset, offset_to_entry, Header};
use super::scan_bat;
use crate::{Error, Result};

/// Clusters moved per synced batch.
const BATCH: usize = 256;

/// Bytes read and written at once where moved clusters sit side by side.
const RUN_BYTES: usize = 8 << 20;

/// Buffers for [`copy_runs`]: two runs of clusters (at least one cluster
/// each), one read while the other is written.
pub(crate) fn run_buffers(cluster_size: u64) -> [AlignedBuf; 2] {
    let cs = cluster_size as usize;
    let len = cs.max(RUN_BYTES / cs * cs);
    [AlignedBuf::zeroed(len), AlignedBuf::zeroed(len)]
}

/// Copy file cluster `from` to file cluster `to` for each pair (indexes
/// in clusters). Pairs that continue the one before on both sides go in
/// one read and one write, as long as a buffer holds them (compaction
/// pairs its highest clusters with its lowest free ones in order, so a
/// tail usually moves in runs); the next run is read while one is
/// written, as `cp` overlaps them through the page cache.
pub(crate) fn copy_runs(
    io: &SharedIo,
    cs: u64,
    pairs: &[(u64, u64)],
    bufs: &mut [AlignedBuf; 2],
) -> Result<()> {
    let path = io.describe();
    let most = (bufs[0].len() as u64 / cs).max(1) as usize;
    // (from, to, clusters)
    let mut runs: Vec<(u64, u64, usize)> = Vec::new();
    for &(from, to) in pairs {
        match runs.last_mut() {
            Some((f, t, n)) if *n < most && from == *f + *n as u64 && to == *t + *n as u64 => {
                *n += 1
            }
            _ => runs.push((from, to, 1)),
        }
    }
    let [a, b] = bufs;
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(usize, &mut AlignedBuf)>(1);
    let (empty_tx, empty_rx) = std::sync::mpsc::sync_channel::<&mut AlignedBuf>(2);
    let _ = empty_tx.send(a);
    let _ = empty_tx.send(b);
    let (runs, path) = (&runs, &path);
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || -> Result<()> {
            for (k, &(from, _, n)) in runs.iter().enumerate() {
                let Ok(buf) = empty_rx.recv() else {
                    return Ok(()); // the writer stopped on an error
                };
                let len = n * cs as usize;
                io.read_at(&mut buf.as_mut_slice()[..len], from * cs)
                    .map_err(|e| Error::io(path, "reading clusters to move", from * cs, e))?;
                if full_tx.send((k, buf)).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        });
        let written = (|| -> Result<()> {
            for (k, buf) in full_rx.iter() {
                let (_, to, n) = runs[k];
                let len = n * cs as usize;
                io.write_at(&buf.as_slice()[..len], to * cs)
                    .map_err(|e| Error::io(path, "writing moved clusters", to * cs, e))?;
                let _ = empty_tx.send(buf);
            }
            Ok(())
        })();
        drop(full_rx);
        drop(empty_tx);
        let read = reader.join().unwrap_or_else(|_| {
            Err(Error::Invalid(
                "the thread reading clusters to move panicked".into(),
            ))
        });
        read.and(written)
    })
}

/// Pair planned moves in order on both sides (the lowest source with the
/// lowest target), so that neighbours move together. Every target is
/// below every source in a compaction batch, so each move still goes
/// down.
pub(crate) fn pair_in_order<T: Copy + Ord>(moves: &mut [(T, u64, u64)]) {
    let mut sources: Vec<(u64, T)> = moves.iter().map(|&(i, from, _)| (from, i)).collect();
    let mut targets: Vec<u64> = moves.iter().map(|&(_, _, to)| to).collect();
    sources.sort_unstable();
    targets.sort_unstable();
    for (m, ((from, i), to)) in moves.iter_mut().zip(sources.into_iter().zip(targets)) {
        *m = (i, from, to);
    }
}

/// What a compaction did (or, dry, would do).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compacted {
    /// File size before and after, in bytes.
    pub size_before: u64,
    pub size_after: u64,
    /// Data clusters moved down.
    pub moved: u64,
    /// Whether it stopped early (asked to) with clusters left to move.
    pub stopped: bool,
}

/// The file clusters in use: each data cluster with its BAT index, and a
/// live format extension's clusters (cluster indexes, not offsets) with
/// none: they stay where they are.
fn used_clusters(header: &Header, bat: &[u32], ext_state: &State) -> BTreeMap<u64, Option<usize>> {
    let mut owner: BTreeMap<u64, Option<usize>> = BTreeMap::new();
    for (i, &e) in bat.iter().enumerate() {
        if e != 0 {
            owner.insert(entry_to_offset(header, e) / header.cluster_size, Some(i));
        }
    }
    if let State::Live(x) = ext_state {
        for &c in &x.clusters {
            owner.insert(c, None);
        }
    }
    owner
}

/// Compact a closed delta (its file locked by the caller). `progress`
/// gets (moved, to move); `stop` is asked between batches. With `dry`,
/// nothing is written: the figures say what would happen.
pub fn compact(
    io: &SharedIo,
    dry: bool,
    progress: &dyn Fn(u64, u64),
    stop: &dyn Fn() -> bool,
) -> Result<Compacted> {
    compact_at_most(io, dry, None, progress, stop)
}

/// [`compact`], moving at most `limit` clusters (OpenVZ's `--to-free`):
/// the highest first, so the file is cut by as much.
pub fn compact_at_most(
    io: &SharedIo,
    dry: bool,
    limit: Option<u64>,
    progress: &dyn Fn(u64, u64),
    stop: &dyn Fn() -> bool,
) -> Result<Compacted> {
    let path = io.describe();
    let (header, mut bat, size) = read_metadata(io)?;
    if header.in_use {
        return Err(Error::Dirty { path });
    }
    if let Some(p) = scan_bat(&header, &bat, size).into_iter().next() {
        return Err(Error::corrupt(&path, p.to_string()));
    }
    let cs = header.cluster_size;
    let first = header.data_offset / cs;
    let ext_state = ext::read(io, &header, &bat, size)
        .map_err(|e| Error::io(&path, "reading the format extension", 0, e))?;
    let owner = used_clusters(&header, &bat, &ext_state);
    let end = |owner: &BTreeMap<u64, Option<usize>>| {
        owner
            .keys()
            .next_back()
            .map_or(first, |&c| c + 1)
            .max(first)
    };
    let used: Vec<u64> = owner.keys().copied().collect();
    let mut free = super::free::FreeClusters::gaps(first, end(&owner), used);
    // Plan: the highest movable cluster into the lowest free one, while
    // that is a move down.
    let mut plan: Vec<(usize, u64, u64)> = Vec::new();
    let mut owners = owner.clone();
    while let Some(slot) = free.pop_first() {
        let Some((&from, &who)) = owners.iter().next_back() else {
            break;
        };
        if from <= slot {
            break;
        }
        let Some(i) = who else {
            // The extension's cluster at the end: nothing above it moves.
            break;
        };
        owners.remove(&from);
        owners.insert(slot, Some(i));
        plan.push((i, from, slot));
    }
    if let Some(limit) = limit.filter(|_| !dry) {
        plan.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    }
    let total = plan.len() as u64;
    let size_after = (end(&owners) * cs).min(size);
    let mut done = Compacted {
        size_before: size,
        size_after: if dry { size_after } else { size },
        moved: 0,
        stopped: false,
    };
    if dry || plan.is_empty() {
        if !dry && size_after < size {
            io.set_len(size_after)
                .map_err(|e| Error::io(&path, "cutting the file", size_after, e))?;
            io.flush().map_err(|e| Error::io(&path, "syncing", 0, e))?;
            done.size_after = size_after;
        }
        return Ok(done);
    }
    let mut bufs = run_buffers(cs);
    let raw = header.raw;
    for batch in plan.chunks_mut(BATCH) {
        if stop() {
            done.stopped = true;
            break;
        }
        pair_in_order(batch);
        let pairs: Vec<(u64, u64)> = batch.iter().map(|&(_, from, to)| (from, to)).collect();
        copy_runs(io, cs, &pairs, &mut bufs)?;
        io.flush()
            .map_err(|e| Error::io(&path, "syncing moved clusters", 0, e))?;
        let mut pages = std::collections::BTreeSet::new();
        for &(i, _, to) in batch.iter() {
            bat[i] = offset_to_entry(&header, to * cs).expect("a lower offset fits");
            pages.insert(page_of(i as u64));
        }
        write_metadata_pages(io, pages, &raw, &bat)?;
        io.flush()
            .map_err(|e| Error::io(&path, "syncing the BAT", 0, e))?;
        done.moved += batch.len() as u64;
        progress(done.moved, total);
    }
    // Cut after the last cluster still used (all moves done, or as far
    // as they went).
    let cut = (end(&used_clusters(&header, &bat, &ext_state)) * cs).min(size);
    if cut < size {
        io.set_len(cut)
            .map_err(|e| Error::io(&path, "cutting the file", cut, e))?;
        io.flush().map_err(|e| Error::io(&path, "syncing", 0, e))?;
    }
    done.size_after = cut;
    Ok(done)
}

/// Defragment a closed delta (OpenVZ's `check -D`): its data clusters
/// are put in virtual order from the start of the data area, so that
/// reading the disk in order reads the file in order; the file is then
/// cut after them. A cluster in the way of another first moves to the end
/// of the file; every move is a copy into a cluster nothing references,
/// synced, then its BAT entry, synced, so a stop anywhere leaves the same
/// content. Returns the clusters moved.
pub fn defrag(io: &SharedIo, progress: &dyn Fn(u64, u64), stop: &dyn Fn() -> bool) -> Result<u64> {
    let path = io.describe();
    let (header, mut bat, size) = read_metadata(io)?;
    if header.in_use {
        return Err(Error::Dirty { path });
    }
    if let Some(p) = scan_bat(&header, &bat, size).into_iter().next() {
        return Err(Error::corrupt(&path, p.to_string()));
    }
    let ext_state = ext::read(io, &header, &bat, size)
        .map_err(|e| Error::io(&path, "reading the format extension", 0, e))?;
    if !matches!(ext_state, State::None) {
        return Err(Error::Invalid(format!(
            "{path}: it carries a format extension; defragmentation would move its clusters: drop it first"
        )));
    }
    let cs = header.cluster_size;
    let first = header.data_offset / cs;
    // File cluster -> BAT index (no extension here).
    let mut at: BTreeMap<u64, usize> = used_clusters(&header, &bat, &ext_state)
        .into_iter()
        .filter_map(|(c, i)| Some((c, i?)))
        .collect();
    let order: Vec<usize> = (0..bat.len()).filter(|&i| bat[i] != 0).collect();
    let total = order.len() as u64;
    let mut end = at.keys().next_back().map_or(first, |&c| c + 1).max(first);
    let mut buf = AlignedBuf::zeroed(cs as usize);
    let raw = header.raw;
    let mut moved = 0;
    // One synced move of BAT entry `i` from file cluster `from` to `to`
    // (unreferenced).
    let mut move_one = |bat: &mut Vec<u32>, i: usize, from: u64, to: u64| -> Result<()> {
        io.read_at(buf.as_mut_slice(), from * cs)
            .map_err(|e| Error::io(&path, "reading a cluster to move", from * cs, e))?;
        io.write_at(buf.as_slice(), to * cs)
            .map_err(|e| Error::io(&path, "writing a moved cluster", to * cs, e))?;
        io.flush()
            .map_err(|e| Error::io(&path, "syncing a moved cluster", 0, e))?;
        bat[i] = offset_to_entry(&header, to * cs).ok_or_else(|| {
            Error::Invalid(format!("{path}: the file grows too large for its version"))
        })?;
        write_metadata_pages(io, [page_of(i as u64)], &raw, bat)?;
        io.flush()
            .map_err(|e| Error::io(&path, "syncing the BAT", 0, e))
    };
    for (rank, &i) in order.iter().enumerate() {
        if stop() {
            break;
        }
        let target = first + rank as u64;
        let here = entry_to_offset(&header, bat[i]) / cs;
        if here != target {
            if let Some(&other) = at.get(&target) {
                // Out of the way, to the end.
                move_one(&mut bat, other, target, end)?;
                at.remove(&target);
                at.insert(end, other);
                end += 1;
                moved += 1;
            }
            move_one(&mut bat, i, here, target)?;
            at.remove(&here);
            at.insert(target, i);
            moved += 1;
        }
        progress(rank as u64 + 1, total);
    }
    let cut = at.keys().next_back().map_or(first, |&c| c + 1).max(first) * cs;
    // The file may have grown past its first size (clusters moved out of
    // the way went to its end).
    let now = io.size().map_err(|e| Error::io(&path, "sizing", 0, e))?;
    if cut < now.max(size) {
        io.set_len(cut)
            .map_err(|e| Error::io(&path, "cutting the file", cut, e))?;
        io.flush().map_err(|e| Error::io(&path, "syncing", 0, e))?;
    }
    Ok(moved)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ploop::{CreateOptions, OpenFlags, PloopDelta, Version};
    use ploop_io::MemIo;
    use std::sync::Arc;

    pub(crate) const CS: u64 = 32 << 10;

    /// A new delta of `clusters` clusters of [`CS`] bytes in memory, open
    /// for writing.
    pub(crate) fn fresh(clusters: u64, version: Version) -> (SharedIo, PloopDelta) {
        let io: SharedIo = Arc::new(MemIo::new("img"));
        PloopDelta::create(
            io.clone(),
            CreateOptions {
                virtual_size: clusters * CS,
                cluster_size: CS,
                version,
                preallocate: false,
            },
        )
        .unwrap();
        let rw = OpenFlags {
            writable: true,
            allow_dirty: false,
        };
        let d = PloopDelta::open(io.clone(), rw).unwrap();
        (io, d)
    }

    fn pattern(c: u64) -> Vec<u8> {
        (0..CS)
            .map(|i| (i as u8) ^ (c as u8).wrapping_mul(3))
            .collect()
    }

    #[test]
    fn clusters_move_down_and_the_file_shrinks() {
        let (io, d) = fresh(100, Version::V2);
        for c in 0..60 {
            d.write_cluster(c, 0, &pattern(c), None).unwrap();
        }
        // Every other one of the first 40 goes: holes low in the file.
        for c in (0..40).step_by(2) {
            d.discard(c, 0, CS, true).unwrap();
        }
        d.close().unwrap();
        let before = io.size().unwrap();
        let dry = compact(&io, true, &|_, _| {}, &|| false).unwrap();
        assert_eq!(io.size().unwrap(), before, "dry writes nothing");
        let done = compact(&io, false, &|_, _| {}, &|| false).unwrap();
        assert_eq!(done.size_after, dry.size_after);
        assert_eq!(done.moved, 20);
        assert!(done.size_after < before, "{} < {before}", done.size_after);
        assert_eq!(io.size().unwrap(), done.size_after);
        let d = PloopDelta::open(io.clone(), OpenFlags::default()).unwrap();
        let mut buf = vec![0u8; CS as usize];
        for c in 0..60 {
            match d.map(c) {
                Some(off) => {
                    assert!(off < done.size_after);
                    d.read_data(&mut buf, off).unwrap();
                    assert!(buf == pattern(c), "cluster {c}");
                }
                None => assert!(c < 40 && c % 2 == 0, "cluster {c} lost"),
            }
        }
        drop(d);
        assert!(crate::ploop::check::check(&io, false).unwrap().is_clean());
        // Stopped before the first batch: nothing moves, all still reads.
        let again = compact(&io, false, &|_, _| {}, &|| true).unwrap();
        assert_eq!(again.moved, 0);
    }

    #[test]
    fn defragmentation_puts_clusters_in_virtual_order() {
        let (io, d) = fresh(64, Version::V1);
        // Written backwards, with gaps: file order is the reverse.
        let written: Vec<u64> = (0..40).rev().filter(|c| c % 3 != 1).collect();
        for &c in &written {
            d.write_cluster(c, 0, &pattern(c), None).unwrap();
        }
        d.close().unwrap();
        let moved = defrag(&io, &|_, _| {}, &|| false).unwrap();
        assert!(moved > 0);
        let d = PloopDelta::open(io.clone(), OpenFlags::default()).unwrap();
        let first = d.header().data_offset / CS;
        let mut buf = vec![0u8; CS as usize];
        let mut rank = 0;
        for c in 0..64 {
            match d.map(c) {
                Some(off) => {
                    assert_eq!(off / CS, first + rank, "cluster {c} in order");
                    rank += 1;
                    d.read_data(&mut buf, off).unwrap();
                    assert!(buf == pattern(c), "cluster {c}");
                }
                None => assert!(!written.contains(&c), "cluster {c} lost"),
            }
        }
        assert_eq!(io.size().unwrap(), (first + rank) * CS);
        drop(d);
        assert!(crate::ploop::check::check(&io, false).unwrap().is_clean());
    }

    /// Writes and discards with no flush between them (a trim-heavy
    /// guest): the file never grows past the disk's size plus metadata,
    /// and what was last written reads back.
    #[test]
    fn churn_keeps_the_file_within_the_disk() {
        const N: u64 = 24;
        let (io, d) = fresh(N, Version::V2);
        let limit = d.header().data_offset + N * CS;
        for round in 0..10u64 {
            for c in 0..N {
                d.write_cluster(c, 0, &pattern(c + round), None).unwrap();
                assert!(
                    io.size().unwrap() <= limit,
                    "round {round}: {} > {limit}",
                    io.size().unwrap()
                );
            }
            for c in 0..N {
                d.discard(c, 0, CS, true).unwrap();
            }
        }
        for c in 0..N {
            d.write_cluster(c, 0, &pattern(c), None).unwrap();
        }
        let mut buf = vec![0u8; CS as usize];
        for c in 0..N {
            d.read_data(&mut buf, d.map(c).unwrap()).unwrap();
            assert!(buf == pattern(c));
        }
        assert!(io.size().unwrap() <= limit);
        d.close().unwrap();
        assert!(crate::ploop::check::check(&io, false).unwrap().is_clean());
    }

    #[test]
    fn a_limit_moves_the_highest_clusters_only() {
        let (io, d) = fresh(40, Version::V2);
        for c in 0..20 {
            d.write_cluster(c, 0, &pattern(c), None).unwrap();
        }
        for c in 0..10 {
            d.discard(c, 0, CS, true).unwrap();
        }
        d.close().unwrap();
        let before = io.size().unwrap();
        let done = compact_at_most(&io, false, Some(3), &|_, _| {}, &|| false).unwrap();
        assert_eq!(done.moved, 3);
        assert_eq!(
            io.size().unwrap(),
            before - 3 * CS,
            "cut by the three moved"
        );
        let d = PloopDelta::open(io.clone(), OpenFlags::default()).unwrap();
        let mut buf = vec![0u8; CS as usize];
        for c in 10..20 {
            d.read_data(&mut buf, d.map(c).unwrap()).unwrap();
            assert!(buf == pattern(c), "cluster {c}");
        }
    }
}
