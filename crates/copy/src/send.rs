//! The sending end: passes over the disk while it runs, then a frozen one.

use std::io::Write;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ploop_io::AlignedBuf;
use zerocopy::IntoBytes;

use crate::stream::{Header, Kind, Packet, MAX_DATA};
use crate::{Error, Result};

/// Reads the disk (from any thread).
pub trait Source: Sync {
    /// Fill `buf` with the disk's bytes at `offset` (`buf` is aligned to
    /// 4 KiB, and so are `offset` and its length but at the disk's end).
    fn read(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

/// Records the disk's changes and stops them.
pub trait Control {
    /// The disk's size now, and the clusters changed since the last take
    /// (or since tracking started), as runs of (first cluster, count).
    fn take_dirty(&mut self) -> std::result::Result<(u64, Vec<(u64, u64)>), String>;
    /// Stop every change: the container's stop command, a filesystem
    /// freeze, a flush. Changes made before it returns are in the next
    /// [`take_dirty`](Self::take_dirty).
    fn freeze(&mut self) -> std::result::Result<(), String>;
    /// Let changes go on again.
    fn thaw(&mut self) -> std::result::Result<(), String>;
}

/// What to send first: the disk's geometry and the byte ranges some delta
/// holds, read after tracking started.
pub struct Start {
    pub size: u64,
    pub cluster: u64,
    pub held: Vec<(u64, u64)>,
}

pub struct SendOptions {
    /// Passes at most, the frozen one included (at least 2).
    pub max_passes: u32,
    /// Leave the disk frozen after a copy that succeeded (for a handover);
    /// a failed copy always thaws it.
    pub keep_frozen: bool,
    /// The image format the receiver should write (stream::FORMAT_*).
    pub format: u32,
}

#[derive(Clone, Debug, Default)]
pub struct PassStats {
    /// Bytes the pass covered (data and zeros).
    pub bytes: u64,
    /// Bytes of data it sent.
    pub data: u64,
    pub secs: f64,
}

#[derive(Clone, Debug, Default)]
pub struct SendStats {
    /// Every byte written to the stream.
    pub stream_bytes: u64,
    /// Bytes of disk data sent (zeros go as ranges).
    pub data_bytes: u64,
    pub passes: Vec<PassStats>,
    /// From the freeze to the thaw (or to the end, kept frozen).
    pub frozen: Duration,
    pub total: Duration,
}

/// Reads go in pieces of this much (a multiple of any cluster size up to
/// it; larger clusters go one at a time).
const CHUNK: u64 = 4 << 20;
/// Chunks read ahead of the stream.
const AHEAD: usize = 4;

/// Send the disk: every range of `start`, then passes of what changed
/// until the changes stop shrinking (or `max_passes - 1` passes), then,
/// frozen, what is left. `ack` runs once the stream's end is written,
/// before the thaw: it waits for the receiver where it can answer.
pub fn send(
    source: &dyn Source,
    control: &mut dyn Control,
    start: Start,
    out: &mut dyn Write,
    opts: &SendOptions,
    progress: &dyn Fn(u64, u64),
    ack: &mut dyn FnMut() -> std::io::Result<()>,
) -> Result<SendStats> {
    let t0 = Instant::now();
    let mut w = Counted { out, bytes: 0 };
    let (size, cluster) = (start.size, start.cluster);
    let mut stats = SendStats::default();
    let mut end = EndCount::default();
    w.put(Header::new(opts.format, size, cluster).as_bytes())?;

    let pass = |w: &mut Counted, ranges: &[(u64, u64)], n: u64, end: &mut EndCount| {
        let t = Instant::now();
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        let mut ps = PassStats {
            bytes: total,
            ..Default::default()
        };
        send_ranges(source, w, ranges, cluster, size, &mut ps, end, &|done| {
            progress(done, total)
        })?;
        w.put(Packet::new(Kind::Pass, n, 0, &[]).as_bytes())?;
        ps.secs = t.elapsed().as_secs_f64();
        Ok::<PassStats, Error>(ps)
    };

    let first = pass(&mut w, &start.held, 1, &mut end)?;
    stats.passes.push(first);
    // Changes taken but not sent yet (the set stopped shrinking): the
    // frozen pass sends them with the rest.
    let mut pending: Vec<(u64, u64)> = Vec::new();
    let mut last = u64::MAX;
    while (stats.passes.len() as u32) < opts.max_passes.max(2) - 1 {
        let dirty = take(control, size, cluster)?;
        let bytes: u64 = dirty.iter().map(|r| r.1).sum();
        if bytes == 0 {
            break;
        }
        if bytes >= last {
            pending = dirty;
            break;
        }
        last = bytes;
        let n = stats.passes.len() as u64 + 1;
        stats.passes.push(pass(&mut w, &dirty, n, &mut end)?);
    }

    // The frozen pass.
    let frozen_at = Instant::now();
    if let Err(e) = control.freeze() {
        let _ = control.thaw();
        return Err(Error::Source(format!("freezing: {e}")));
    }
    let finished = (|| {
        let dirty = take(control, size, cluster)?;
        let last_ranges = merge_ranges(pending, dirty);
        let n = stats.passes.len() as u64 + 1;
        stats.passes.push(pass(&mut w, &last_ranges, n, &mut end)?);
        w.put(Packet::new(Kind::End, end.packets, end.bytes, &[]).as_bytes())?;
        w.out
            .flush()
            .map_err(|e| Error::io("writing the copy stream", e))?;
        ack().map_err(|e| Error::io("waiting for the receiver", e))
    })();
    if finished.is_err() || !opts.keep_frozen {
        if let Err(e) = control.thaw() {
            // The copy's outcome stands; the thaw's failure is told apart.
            finished?;
            return Err(Error::Source(format!("thawing: {e}")));
        }
    }
    finished?;
    stats.frozen = frozen_at.elapsed();
    stats.stream_bytes = w.bytes;
    stats.data_bytes = stats.passes.iter().map(|p| p.data).sum();
    stats.total = t0.elapsed();
    Ok(stats)
}

/// DATA and ZERO packets so far (the END packet's count).
#[derive(Default)]
struct EndCount {
    packets: u64,
    bytes: u64,
}

struct Counted<'a> {
    out: &'a mut dyn Write,
    bytes: u64,
}

impl Counted<'_> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.out
            .write_all(b)
            .map_err(|e| Error::io("writing the copy stream", e))?;
        self.bytes += b.len() as u64;
        Ok(())
    }
}

/// The changed clusters as byte ranges inside the disk.
fn take(control: &mut dyn Control, size: u64, cluster: u64) -> Result<Vec<(u64, u64)>> {
    let (now, runs) = control.take_dirty().map_err(Error::Source)?;
    if now != size {
        return Err(Error::Source(format!(
            "the disk's size changed during the copy ({size} -> {now} bytes)"
        )));
    }
    let mut out = Vec::with_capacity(runs.len());
    for (first, count) in runs {
        let start = first.saturating_mul(cluster);
        let end = first
            .saturating_add(count)
            .saturating_mul(cluster)
            .min(size);
        if start < end {
            out.push((start, end - start));
        }
    }
    Ok(out)
}

/// Two sorted lists of byte ranges as one, sorted, overlaps joined.
fn merge_ranges(a: Vec<(u64, u64)>, b: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = a.into_iter().chain(b).collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (s, l) in all {
        match out.last_mut() {
            Some((ps, pl)) if *ps + *pl >= s => *pl = (*pl).max(s + l - *ps),
            _ => out.push((s, l)),
        }
    }
    out
}

/// Read `ranges` on a thread of their own, a few chunks ahead, and send
/// them: clusters of zeros as ZERO ranges, the rest as DATA.
#[allow(clippy::too_many_arguments)]
fn send_ranges(
    source: &dyn Source,
    w: &mut Counted,
    ranges: &[(u64, u64)],
    cluster: u64,
    size: u64,
    ps: &mut PassStats,
    end: &mut EndCount,
    progress: &dyn Fn(u64),
) -> Result<()> {
    let chunk = CHUNK.max(cluster);
    let (full_tx, full_rx) = mpsc::sync_channel::<std::io::Result<(u64, AlignedBuf, usize)>>(AHEAD);
    let (empty_tx, empty_rx) = mpsc::channel::<AlignedBuf>();
    for _ in 0..AHEAD + 1 {
        let _ = empty_tx.send(AlignedBuf::zeroed(chunk as usize));
    }
    std::thread::scope(|s| {
        s.spawn(move || {
            for &(start, len) in ranges {
                let end = (start + len).min(size);
                let mut at = start;
                while at < end {
                    let n = (end - at).min(chunk - at % chunk);
                    let Ok(mut buf) = empty_rx.recv() else {
                        return; // the sender stopped
                    };
                    let r = source
                        .read(&mut buf.as_mut_slice()[..n as usize], at)
                        .map(|()| (at, buf, n as usize));
                    let failed = r.is_err();
                    if full_tx.send(r).is_err() || failed {
                        return;
                    }
                    at += n;
                }
            }
        });
        let mut done = 0u64;
        let mut zeros: Option<(u64, u64)> = None;
        let result = (|| {
            for item in full_rx.iter() {
                let (at, buf, n) =
                    item.map_err(|e| Error::Source(format!("reading the disk: {e}")))?;
                let data = &buf.as_slice()[..n];
                // Cluster by cluster: zeros join a ZERO range, data goes as
                // DATA of as many clusters as follow each other.
                let mut i = 0usize;
                while i < n {
                    let piece =
                        (cluster as usize - ((at + i as u64) % cluster) as usize).min(n - i);
                    let is_zero = ploop_io::is_zero(&data[i..i + piece]);
                    if is_zero {
                        zeros = match zeros {
                            Some((zs, zl)) if zs + zl == at + i as u64 => {
                                Some((zs, zl + piece as u64))
                            }
                            Some(z) => {
                                put_zero(w, z, end)?;
                                Some((at + i as u64, piece as u64))
                            }
                            None => Some((at + i as u64, piece as u64)),
                        };
                        i += piece;
                        continue;
                    }
                    if let Some(z) = zeros.take() {
                        put_zero(w, z, end)?;
                    }
                    // Data up to the next zero cluster, at most MAX_DATA.
                    let mut j = i + piece;
                    while j < n && ((j - i) as u64) < MAX_DATA {
                        let p = (cluster as usize).min(n - j);
                        if ploop_io::is_zero(&data[j..j + p]) {
                            break;
                        }
                        j += p;
                    }
                    let j = j.min(i + MAX_DATA as usize);
                    let bytes = &data[i..j];
                    w.put(
                        Packet::new(Kind::Data, at + i as u64, bytes.len() as u64, bytes)
                            .as_bytes(),
                    )?;
                    w.put(bytes)?;
                    ps.data += bytes.len() as u64;
                    end.packets += 1;
                    end.bytes += bytes.len() as u64;
                    i = j;
                }
                done += n as u64;
                progress(done);
                let _ = empty_tx.send(buf);
            }
            if let Some(z) = zeros.take() {
                put_zero(w, z, end)?;
            }
            Ok(())
        })();
        // Stop the reader if the stream failed.
        drop(full_rx);
        drop(empty_tx);
        result
    })
}

fn put_zero(w: &mut Counted, (pos, len): (u64, u64), end: &mut EndCount) -> Result<()> {
    w.put(Packet::new(Kind::Zero, pos, len, &[]).as_bytes())?;
    end.packets += 1;
    end.bytes += len;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_sorted_and_joined() {
        assert_eq!(
            merge_ranges(vec![(0, 10), (30, 5)], vec![(5, 10), (40, 1), (35, 2)]),
            vec![(0, 15), (30, 7), (40, 1)]
        );
    }
}
