//! A delta chain: one writable top over read-only lower deltas.
//!
//! Reads fall through to the first delta (from the top) that holds a
//! cluster, and see zeros at the bottom. Writes go to the top; a partial
//! write to a cluster held only below copies the cluster up first, and an
//! all-zero write to a cluster held nowhere stays sparse.

use std::sync::Arc;

use ploop_format::ploop::{FillFn, MappingPin, PloopDelta};
use ploop_format::raw::RawDelta;
use ploop_format::{Error, Result};
use ploop_io::{is_zero, Segment};

use crate::dirty::DirtyLog;

/// One delta of a chain, in either format. Deltas live behind an `Arc`,
/// so the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Delta {
    Raw(RawDelta),
    Ploop(PloopDelta),
}

/// How to do a request with plain file I/O: its pieces, and a pin that
/// keeps the clusters they name from being reused (after a concurrent
/// discard) until the plan is dropped, once the I/O has completed.
pub struct Plan {
    pub segments: Vec<Segment>,
    _pin: Option<MappingPin>,
}

/// Add a piece, joined to the previous one where both the file and the
/// buffer continue it (clusters laid out in order make one piece).
fn push_merged(out: &mut Vec<Segment>, s: Segment) {
    if let Some(last) = out.last_mut() {
        if last.fd == s.fd
            && last.file_offset + last.len as u64 == s.file_offset
            && last.buf_offset + last.len == s.buf_offset
        {
            last.len += s.len;
            return;
        }
    }
    out.push(s);
}

impl Plan {
    /// The pieces, and the pin to hold until their I/O has completed.
    pub fn into_parts(self) -> (Vec<Segment>, Option<MappingPin>) {
        (self.segments, self._pin)
    }
}

impl Delta {
    /// See [`PloopDelta::pin`]; a raw delta never moves its data.
    pub fn pin(&self) -> Option<MappingPin> {
        match self {
            Delta::Raw(_) => None,
            Delta::Ploop(p) => Some(p.pin()),
        }
    }

    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        match self {
            Delta::Raw(r) => r.io().raw_fd(),
            Delta::Ploop(p) => p.io().raw_fd(),
        }
    }

    /// The raw_fd of this delta takes a piece as it is: its offset, its
    /// length and its place in the request's buffer (which starts on a
    /// 4 KiB boundary) in the file's direct I/O blocks.
    fn takes_directly(&self, file_offset: u64, len: usize, at: usize) -> bool {
        let a = match self {
            Delta::Raw(r) => r.io().direct_align(),
            Delta::Ploop(p) => p.io().direct_align(),
        };
        file_offset.is_multiple_of(a)
            && (len as u64).is_multiple_of(a)
            && (at as u64).is_multiple_of(a)
    }

    pub fn path(&self) -> &str {
        match self {
            Delta::Raw(r) => r.path(),
            Delta::Ploop(p) => p.path(),
        }
    }

    /// File offset of `cluster` if this delta holds it.
    pub fn map(&self, cluster: u64, cluster_size: u64) -> Option<u64> {
        match self {
            Delta::Raw(_) => Some(cluster * cluster_size),
            Delta::Ploop(p) => p.map(cluster),
        }
    }

    pub(crate) fn read(&self, buf: &mut [u8], file_offset: u64) -> Result<()> {
        match self {
            Delta::Raw(r) => r.read(buf, file_offset),
            Delta::Ploop(p) => p.read_data(buf, file_offset),
        }
    }

    pub fn flush(&self) -> Result<()> {
        match self {
            Delta::Raw(r) => r.flush(),
            Delta::Ploop(p) => p.flush(),
        }
    }

    pub fn close(&self) -> Result<()> {
        match self {
            Delta::Raw(r) => r.flush(),
            Delta::Ploop(p) => p.close(),
        }
    }

    /// Tell a ploop delta that tracks changes that `cluster` changes.
    fn note_change(&self, cluster: u64) {
        if let Delta::Ploop(p) = self {
            p.note_change(cluster);
        }
    }

    pub fn is_writable(&self) -> bool {
        match self {
            Delta::Raw(r) => r.is_writable(),
            Delta::Ploop(p) => p.is_writable(),
        }
    }

    /// Err once a flush of this delta has failed: it takes no more writes.
    pub fn ensure_healthy(&self) -> Result<()> {
        match self {
            Delta::Raw(r) => r.ensure_healthy(),
            Delta::Ploop(p) => p.ensure_healthy(),
        }
    }

    pub fn as_ploop(&self) -> Option<&PloopDelta> {
        match self {
            Delta::Ploop(p) => Some(p),
            Delta::Raw(_) => None,
        }
    }
}

/// The pieces of a byte range, one per cluster: (cluster, offset in it,
/// offset in the request, length).
fn pieces(offset: u64, len: u64, cs: u64) -> impl Iterator<Item = (u64, u64, usize, usize)> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let cluster = pos / cs;
        let in_off = pos % cs;
        let n = (cs - in_off).min(end - pos);
        let item = (cluster, in_off, (pos - offset) as usize, n as usize);
        pos += n;
        Some(item)
    })
}

pub struct Chain {
    /// Base first, top last.
    layers: Vec<Arc<Delta>>,
    cluster_size: u64,
    virtual_size: u64,
    /// Clusters changed while a copy of the disk is under way; a chain
    /// that replaces this one online takes it over.
    dirty: Arc<DirtyLog>,
}

impl Chain {
    pub fn new(layers: Vec<Arc<Delta>>, cluster_size: u64, virtual_size: u64) -> Result<Self> {
        if layers.is_empty() {
            return Err(Error::Invalid("a chain needs at least one delta".into()));
        }
        if layers.iter().skip(1).any(|d| matches!(**d, Delta::Raw(_))) {
            return Err(Error::Invalid("a raw delta can only be the base".into()));
        }
        for d in &layers {
            if let Delta::Ploop(p) = &**d {
                if p.cluster_size() != cluster_size {
                    return Err(Error::corrupt(
                        p.path(),
                        format!(
                            "cluster size {} differs from the chain's {cluster_size}",
                            p.cluster_size()
                        ),
                    ));
                }
            }
        }
        Ok(Self {
            layers,
            cluster_size,
            virtual_size,
            dirty: Arc::default(),
        })
    }

    /// The log of changed clusters (see [`DirtyLog`]).
    pub fn dirty_log(&self) -> &Arc<DirtyLog> {
        &self.dirty
    }

    /// Keep recording changes in `from`'s log: this chain replaces it.
    pub fn take_over_dirty_log(&mut self, from: &Chain) {
        self.dirty = from.dirty.clone();
    }

    /// `cluster` changes: tell the top (an online move or merge may be
    /// copying it) and the dirty log.
    fn note_change(&self, top: &Delta, cluster: u64) {
        top.note_change(cluster);
        self.dirty.note(cluster);
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    pub fn layers(&self) -> &[Arc<Delta>] {
        &self.layers
    }

    pub fn top(&self) -> &Arc<Delta> {
        self.layers.last().expect("non-empty chain")
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.virtual_size => Ok(()),
            _ => Err(Error::Invalid(format!(
                "range {offset}+{len} is past the end of the {}-byte disk",
                self.virtual_size
            ))),
        }
    }

    /// Whether a layer under `layer` holds `cluster`.
    pub fn held_below(&self, cluster: u64, layer: usize) -> bool {
        self.holder(cluster, layer).is_some()
    }

    /// Index of the top-most layer at or below `below` that holds `cluster`.
    fn holder(&self, cluster: u64, below: usize) -> Option<(usize, u64)> {
        self.layers[..below]
            .iter()
            .enumerate()
            .rev()
            .find_map(|(i, d)| d.map(cluster, self.cluster_size).map(|off| (i, off)))
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        // Only the top frees clusters (lower deltas are read-only).
        let _pin = self.top().pin();
        for (cluster, in_off, at, n) in pieces(offset, buf.len() as u64, self.cluster_size) {
            let out = &mut buf[at..at + n];
            match self.holder(cluster, self.layers.len()) {
                Some((i, off)) => self.layers[i].read(out, off + in_off)?,
                None => out.fill(0),
            }
        }
        Ok(())
    }

    /// The byte ranges of the whole disk that some delta holds, as
    /// (offset, length), in order.
    pub fn held_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let mut at = 0;
        for (len, held) in self.allocation(0, self.virtual_size, usize::MAX)? {
            if held {
                out.push((at, len));
            }
            at += len;
        }
        Ok(out)
    }

    /// Which parts of a range some delta stores, as runs of (length, held)
    /// in order. A raw delta stores everything, but for the holes of a raw
    /// image that is the whole chain (its file says where they are, where
    /// the filesystem can tell). Stops after `max_runs`
    /// runs, so the runs may cover less than the range (never nothing).
    pub fn allocation(&self, offset: u64, len: u64, max_runs: usize) -> Result<Vec<(u64, bool)>> {
        self.check_range(offset, len)?;
        if let [layer] = self.layers.as_slice() {
            if let Delta::Raw(r) = &**layer {
                // A raw image alone: its file's own holes.
                let runs = r
                    .io()
                    .data_runs(offset, len)
                    .map_err(|e| Error::io(r.path(), "finding holes", offset, e))?;
                if let Some(mut runs) = runs {
                    runs.truncate(max_runs.max(1));
                    return Ok(runs);
                }
            }
        }
        let mut runs: Vec<(u64, bool)> = Vec::new();
        for (cluster, _, _, n) in pieces(offset, len, self.cluster_size) {
            let held = self.holder(cluster, self.layers.len()).is_some();
            if let Some((run, h)) = runs.last_mut() {
                if *h == held {
                    *run += n as u64;
                    continue;
                }
            }
            if runs.len() == max_runs.max(1) {
                break;
            }
            runs.push((n as u64, held));
        }
        Ok(runs)
    }

    /// Whether a delta under the top stores any part of a range.
    /// Make a range read as zeros if that is cheap: whole clusters
    /// unmapped, or holes punched in a raw image. Ok(false), with nothing
    /// changed, where it would take writing zeros: data below the top to
    /// mask, part of a cluster the top holds, or a raw image on a
    /// filesystem that cannot punch holes.
    pub fn zero_fast(&self, offset: u64, len: u64) -> Result<bool> {
        self.check_range(offset, len)?;
        let top_index = self.layers.len() - 1;
        let top = self.writable_top()?;
        let cs = self.cluster_size;
        for (cluster, in_off, _, n) in pieces(offset, len, cs) {
            if self.holder(cluster, top_index).is_some() {
                return Ok(false);
            }
            let whole = in_off == 0 && n as u64 == cs;
            if !whole && matches!(top, Delta::Ploop(p) if p.map(cluster).is_some()) {
                return Ok(false);
            }
        }
        if let Delta::Raw(r) = top {
            // The file can punch holes or it cannot: the first piece tells,
            // before anything has changed.
            for (cluster, in_off, _, n) in pieces(offset, len, cs) {
                self.note_change(top, cluster);
                let punched = r.punch_only(cluster * cs + in_off, n as u64);
                self.note_change(top, cluster);
                if !punched? {
                    return Ok(false);
                }
            }
            return Ok(true);
        }
        self.discard(offset, len)?;
        Ok(true)
    }

    /// How to read a range with plain file reads: the pieces held by some
    /// delta (pieces held by none read as zeros and are left out). None if
    /// a delta has no file descriptor.
    pub fn plan_read(&self, offset: u64, len: u64) -> Result<Option<Plan>> {
        self.check_range(offset, len)?;
        let pin = self.top().pin();
        let mut out = Vec::new();
        for (cluster, in_off, at, n) in pieces(offset, len, self.cluster_size) {
            if let Some((i, off)) = self.holder(cluster, self.layers.len()) {
                let Some(fd) = self.layers[i].raw_fd() else {
                    return Ok(None);
                };
                if !self.layers[i].takes_directly(off + in_off, n, at) {
                    return Ok(None);
                }
                push_merged(
                    &mut out,
                    Segment {
                        fd,
                        file_offset: off + in_off,
                        buf_offset: at,
                        len: n,
                    },
                );
            }
        }
        Ok(Some(Plan {
            segments: out,
            _pin: pin,
        }))
    }

    /// How to flush with one data sync of the top's file (an io_uring
    /// fsync), if that is all a flush would do now: its descriptor and an
    /// empty plan to register the request in flight with. None otherwise
    /// (call [`flush`](Self::flush)). Some begins the sync: end it with
    /// [`end_flush`](Self::end_flush), whatever happens.
    pub fn plan_flush(&self) -> Option<(std::os::fd::RawFd, Plan)> {
        let top = self.top();
        let p = top.as_ploop()?;
        let fd = top.raw_fd()?;
        if !p.is_writable() || !p.begin_outside_sync() {
            return None;
        }
        Some((
            fd,
            Plan {
                segments: Vec::new(),
                _pin: None,
            },
        ))
    }

    /// The sync of a [`plan_flush`](Self::plan_flush) is over (`ok`: it
    /// succeeded); Err if the flush must be reported failed.
    pub fn end_flush(&self, ok: bool) -> Result<()> {
        match self.top().as_ploop() {
            Some(p) => p.end_outside_sync(ok),
            None => Ok(()),
        }
    }

    /// How to write a range with plain file writes, if every piece lands
    /// in place in the top delta (no allocation, no copy-up). None otherwise.
    pub fn plan_write(&self, offset: u64, len: u64) -> Result<Option<Plan>> {
        self.check_range(offset, len)?;
        let top = self.writable_top()?;
        let Some(fd) = top.raw_fd() else {
            return Ok(None);
        };
        let pin = top.pin();
        let mut out = Vec::new();
        for (cluster, in_off, at, n) in pieces(offset, len, self.cluster_size) {
            let Some(off) = top.map(cluster, self.cluster_size) else {
                return Ok(None);
            };
            if !top.takes_directly(off + in_off, n, at) {
                return Ok(None);
            }
            self.note_change(top, cluster);
            push_merged(
                &mut out,
                Segment {
                    fd,
                    file_offset: off + in_off,
                    buf_offset: at,
                    len: n,
                },
            );
        }
        Ok(Some(Plan {
            segments: out,
            _pin: pin,
        }))
    }

    /// Read the whole of `cluster` as seen from below layer `below`.
    fn read_cluster_below(&self, cluster: u64, below: usize, out: &mut [u8]) -> Result<()> {
        match self.holder(cluster, below) {
            Some((i, off)) => self.layers[i].read(out, off),
            None => {
                out.fill(0);
                Ok(())
            }
        }
    }

    fn writable_top(&self) -> Result<&Delta> {
        let top = self.top();
        if !top.is_writable() {
            return Err(Error::Invalid(format!(
                "{}: image is open read-only",
                top.path()
            )));
        }
        top.ensure_healthy()?;
        Ok(top)
    }

    /// Record that a range was written, once its data is in place: an
    /// online merge copying a cluster meanwhile must copy it again. Writes
    /// through `write_at` and `discard` record themselves; queued writes
    /// planned with `plan_write` call this when they complete.
    pub fn note_written(&self, offset: u64, len: u64) {
        let top = self.top();
        for (cluster, ..) in pieces(
            offset,
            len.min(self.virtual_size().saturating_sub(offset)),
            self.cluster_size,
        ) {
            self.note_change(top, cluster);
        }
    }

    /// Write `buf` at `offset`. Zeros over a cluster no delta holds leave
    /// it unallocated (it reads as zeros either way).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_inner(buf, offset, true)
    }

    /// Write `buf` at `offset`, allocating every cluster it touches even
    /// where it writes zeros over nothing: the range is provisioned, so
    /// later writes there need no new space (NBD's WRITE_ZEROES with
    /// NO_HOLE asks for this).
    pub fn write_provisioned(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_inner(buf, offset, false)
    }

    fn write_inner(&self, buf: &[u8], offset: u64, sparse: bool) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let top_index = self.layers.len() - 1;
        let top = self.writable_top()?;
        for (cluster, in_off, at, n) in pieces(offset, buf.len() as u64, self.cluster_size) {
            let data = &buf[at..at + n];
            self.note_change(top, cluster);
            let written = (|| -> Result<()> {
                match top {
                    Delta::Raw(r) => r.write(data, cluster * self.cluster_size + in_off)?,
                    Delta::Ploop(p) => {
                        let pin = p.pin();
                        if let Some(off) = p.map(cluster) {
                            p.write_data(data, off + in_off)?;
                        } else {
                            drop(pin); // allocation re-checks under its lock
                            let below = self.holder(cluster, top_index);
                            if sparse && below.is_none() && is_zero(data) {
                                return Ok(()); // zeros over nothing: stay sparse
                            }
                            let fill =
                                |out: &mut [u8]| self.read_cluster_below(cluster, top_index, out);
                            let fill: Option<FillFn> = below.map(|_| &fill as FillFn);
                            p.write_cluster(cluster, in_off, data, fill)?;
                        }
                    }
                }
                Ok(())
            })();
            // Noted before (a merge may copy the cluster while the write
            // runs) and after, failed or not (part of it may have landed:
            // a merge or a copy must then read it again).
            self.note_change(top, cluster);
            written?;
        }
        Ok(())
    }

    /// Make a range read as zeros, freeing space where possible (discard,
    /// write-zeroes, punch-hole all land here).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        let top_index = self.layers.len() - 1;
        let top = self.writable_top()?;
        let cs = self.cluster_size;
        for (cluster, in_off, _, n) in pieces(offset, len, cs) {
            let n = n as u64;
            self.note_change(top, cluster);
            let done = (|| -> Result<()> {
                match top {
                    Delta::Raw(r) => r.punch(cluster * cs + in_off, n)?,
                    Delta::Ploop(p) => {
                        let held_below = self.holder(cluster, top_index).is_some();
                        if p.map(cluster).is_some() {
                            p.discard(cluster, in_off, n, !held_below)?;
                        } else if held_below {
                            // Zeros must now mask the lower data.
                            let zeros = vec![0u8; n as usize];
                            let fill =
                                |out: &mut [u8]| self.read_cluster_below(cluster, top_index, out);
                            p.write_cluster(cluster, in_off, &zeros, Some(&fill))?;
                        }
                    }
                }
                Ok(())
            })();
            // After, failed or not (see write_inner).
            self.note_change(top, cluster);
            done?;
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<()> {
        self.top().flush()
    }

    /// Flush and cleanly close every delta.
    pub fn close(&self) -> Result<()> {
        let mut first_err = None;
        for d in self.layers.iter().rev() {
            if let Err(e) = d.close() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_on_clusters() {
        let v: Vec<_> = pieces(1000, 5000, 4096).collect();
        assert_eq!(v, vec![(0, 1000, 0, 3096), (1, 0, 3096, 1904)]);
        assert_eq!(pieces(0, 0, 4096).count(), 0);
    }
}
