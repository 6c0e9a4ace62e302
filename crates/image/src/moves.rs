//! Compaction and defragmentation of a served disk's top delta, with the
//! guest's I/O going on.
//!
//! Each batch is planned and copied while requests run, then committed
//! with none in flight (see `PloopDelta::commit_moves`): the guest waits
//! only for the commit, which re-copies what it wrote meanwhile and
//! flushes. Change tracking stays on from before the first batch, so the
//! changes taken at each commit are every write since the one before.
//! A stop between batches leaves a consistent image; so does a crash
//! anywhere (the crash explorers replay the same steps offline).

use std::sync::Arc;

use ploop_format::ploop::compact::Compacted;
use ploop_format::ploop::{Move, PloopDelta};
use ploop_format::{Error, Result};
use ploop_io::AlignedBuf;

use crate::served::ServedDisk;
use crate::Chain;

/// Clusters moved per batch: the guest's writes wait for one commit per
/// batch, so a batch is a few MiB, not hundreds.
const BATCH: usize = 16;

/// After a batch during which the container wrote, compaction idles this
/// many times as long as the batch took: it then takes a quarter of the
/// disk's time, and the container's 4 KiB random writes keep about 0.8x
/// of their rate (bench/compact-online.sh); an idle container gets
/// compaction at full speed. (Idling twice as long gave 0.72x, not
/// idling 0.36x.)
const YIELD: u32 = 3;

/// Defragmentation plans from a sorted copy of the whole BAT: larger
/// batches, so that a disk of a million clusters is not sorted a million
/// times over. (Its copies run with I/O going on; only the re-copies of
/// what the guest wrote meanwhile wait in the commit.)
const DEFRAG_BATCH: usize = 128;

/// What to do with the top delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Goal {
    /// Move data clusters from the end into free clusters below them and
    /// cut the file (at most `limit` clusters moved).
    Compact { limit: Option<u64> },
    /// Put data clusters in virtual order.
    Defrag,
}

/// Run `goal` on the served disk's top delta. `progress` gets (moved, to
/// move), `stop` is asked between batches.
pub fn relocate(
    served: &ServedDisk,
    goal: Goal,
    progress: &dyn Fn(u64, u64),
    stop: &dyn Fn() -> bool,
) -> Result<Compacted> {
    if served.read_only {
        return Err(Error::Invalid(
            "a read-only mount cannot move clusters".into(),
        ));
    }
    let chain = served.current();
    let Some(top) = chain.top().as_ploop() else {
        return Err(Error::Invalid(
            "the top delta is raw: it has nothing to compact or defragment".into(),
        ));
    };
    let size = || {
        top.io()
            .size()
            .map_err(|e| Error::io(top.path(), "reading file size", 0, e))
    };
    let mut done = Compacted {
        size_before: size()?,
        ..Compacted::default()
    };
    let left = || match goal {
        Goal::Compact { .. } => top.compaction_left(),
        Goal::Defrag => top.defrag_left(),
    };
    let limit = match goal {
        Goal::Compact { limit } => limit.unwrap_or(u64::MAX),
        Goal::Defrag => u64::MAX,
    };
    // Clusters the guest discarded (an fstrim just now) are reusable only
    // once the BAT that no longer names them is durable.
    top.flush()?;
    let total = left().min(limit);
    let mut buf = top.move_buffers();
    served.exclusive(|_| {
        top.start_tracking();
        Ok((None, ()))
    })?;
    let ran = (|| -> Result<()> {
        // Defragmenting moves some clusters twice (out of the way, then
        // home); a guest that keeps writing could keep it going: bounded.
        let mut budget = total.saturating_mul(3).saturating_add(64);
        while done.moved < limit && budget > 0 {
            if stop() {
                done.stopped = left() > 0;
                break;
            }
            let moves = match goal {
                Goal::Compact { .. } => top.plan_compaction(
                    BATCH.min(usize::try_from(limit - done.moved).unwrap_or(BATCH)),
                )?,
                Goal::Defrag => top.plan_defrag(DEFRAG_BATCH)?,
            };
            if moves.is_empty() {
                break;
            }
            budget = budget.saturating_sub(moves.len() as u64);
            let t = std::time::Instant::now();
            let (moved, active) = batch(served, &chain, top, &moves, &mut buf)?;
            if active {
                // The container wrote meanwhile: give it the disk back.
                std::thread::sleep(t.elapsed() * YIELD);
            }
            done.moved += moved;
            progress(done.moved.min(total), total);
        }
        Ok(())
    })();
    top.stop_tracking();
    ran?;
    done.size_after = size()?;
    Ok(done)
}

/// Copy one batch with I/O going on, commit it with none in flight.
fn batch(
    served: &ServedDisk,
    chain: &Arc<Chain>,
    top: &PloopDelta,
    moves: &[Move],
    buf: &mut [AlignedBuf; 2],
) -> Result<(u64, bool)> {
    if let Err(e) = top.copy_moves(moves, buf) {
        if let Err(a) = top.abandon_moves(moves) {
            tracing::warn!("{}: giving moves up: {a}", top.path());
        }
        return Err(e);
    }
    served.exclusive(|now| {
        if !Arc::ptr_eq(now, chain) {
            // Requests are answered one at a time, so nothing swaps the
            // chain under a compaction; if it happened, stop cleanly.
            top.abandon_moves(moves)?;
            return Err(Error::Invalid(
                "the disk's chain changed during compaction".into(),
            ));
        }
        let changed = top.take_changes();
        let active = !changed.is_empty();
        Ok((None, (top.commit_moves(moves, &changed, buf)?, active)))
    })
}
