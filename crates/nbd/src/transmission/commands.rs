//! The commands: each checks its request, does the I/O on the delta
//! chain and sends its reply.

use super::*;
use ploop_image::throttle::IoKind;

impl Connection {
    pub(super) fn check_range(&self, req: &Request, past_end: u32) -> Result<(), Failure> {
        match req.offset.checked_add(req.length) {
            Some(end) if end <= self.export.size() => Ok(()),
            _ => Err(failure(
                past_end,
                format!(
                    "{}+{} is past the end of the {}-byte export",
                    req.offset,
                    req.length,
                    self.export.size()
                ),
            )),
        }
    }

    pub(super) fn check_writable(&self) -> Result<(), Failure> {
        if self.export.read_only {
            Err(failure(EPERM, "the export is read-only"))
        } else {
            Ok(())
        }
    }

    pub(super) fn fua(&self, req: &Request) -> Result<(), Failure> {
        if req.flags & CMD_FLAG_FUA != 0 {
            self.export
                .disk
                .chain()
                .flush()
                .map_err(|e| image_failure(&e))?;
        }
        Ok(())
    }

    pub(super) fn read(&self, req: &Request) {
        let result = self.check_range(req, EINVAL).and_then(|()| {
            if req.length > u64::from(MAX_PAYLOAD) {
                return Err(failure(EINVAL, "read longer than the maximum payload"));
            }
            Ok(())
        });
        if let Err(f) = result {
            return self.reply_error(req, f);
        }
        let len = req.length as usize;
        let mut buf = self.shared.buffer(len);
        let chain = self.export.disk.chain();
        let holes = self.structured() && req.flags & CMD_FLAG_DF == 0 && len > 0;
        let runs = if holes {
            chain.allocation(req.offset, req.length, MAX_STATUS_RUNS)
        } else {
            Ok(Vec::new())
        };
        let read = runs.and_then(|runs| {
            chain
                .read_at(&mut buf.as_mut_slice()[..len], req.offset)
                .map(|()| runs)
        });
        drop(chain);
        match read {
            Ok(runs) => self.send(self.read_reply(req, buf, &runs)),
            Err(e) => {
                self.shared.recycle(buf);
                self.reply_error(req, image_failure(&e));
            }
        }
    }

    pub(super) fn write(&self, req: &Request, payload: &[u8]) -> Result<(), Failure> {
        self.check_writable()?;
        self.check_range(req, ENOSPC)?;
        self.export
            .disk
            .chain()
            .write_at(payload, req.offset)
            .map_err(|e| image_failure(&e))?;
        self.fua(req)
    }

    pub(super) fn write_zeroes(&self, req: &Request) -> Result<(), Failure> {
        self.check_writable()?;
        self.check_range(req, ENOSPC)?;
        let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
        let chain = self.export.disk.chain();
        if req.flags & CMD_FLAG_NO_HOLE != 0 {
            if fast {
                return Err(failure(ENOTSUP, "zeroes without holes are written in full"));
            }
            let zeros = vec![0u8; req.length.min(1 << 20) as usize];
            let mut at = 0;
            while at < req.length {
                let n = (req.length - at).min(zeros.len() as u64);
                chain
                    .write_provisioned(&zeros[..n as usize], req.offset + at)
                    .map_err(|e| image_failure(&e))?;
                at += n;
            }
        } else if fast {
            let done = chain
                .zero_fast(req.offset, req.length)
                .map_err(|e| image_failure(&e))?;
            if !done {
                return Err(failure(ENOTSUP, "zeroing here means writing zeros"));
            }
        } else {
            chain
                .discard(req.offset, req.length)
                .map_err(|e| image_failure(&e))?;
        }
        drop(chain);
        self.fua(req)
    }

    pub(super) fn trim(&self, req: &Request) -> Result<(), Failure> {
        self.check_writable()?;
        self.check_range(req, EINVAL)?;
        self.export
            .disk
            .chain()
            .discard(req.offset, req.length)
            .map_err(|e| image_failure(&e))?;
        self.fua(req)
    }

    pub(super) fn block_status(&self, req: &Request) {
        if self.agreed.allocation.is_none() && self.agreed.bitmap.is_none() {
            return self.reply_error(req, failure(EINVAL, "no metadata context selected"));
        }
        if let Err(f) = self.check_range(req, EINVAL) {
            return self.reply_error(req, f);
        }
        if req.length == 0 {
            return self.reply_error(req, failure(EINVAL, "zero-length block status"));
        }
        let span = req.length.min(MAX_STATUS_SPAN);
        let one = req.flags & CMD_FLAG_REQ_ONE != 0;
        let most = if one { 1 } else { MAX_STATUS_RUNS };
        // One chunk per selected context: (id, runs of (length, status)).
        let mut chunks: Vec<(u32, Vec<(u64, u32)>)> = Vec::with_capacity(2);
        if let Some(id) = self.agreed.allocation {
            debug_assert_eq!(id, ALLOCATION_ID);
            let runs = {
                let chain = self.export.disk.chain();
                chain.allocation(req.offset, span, most)
            };
            let runs = match runs {
                Ok(r) => r,
                Err(e) => return self.reply_error(req, image_failure(&e)),
            };
            let status = |held: bool| if held { 0 } else { STATE_HOLE | STATE_ZERO };
            chunks.push((
                ALLOCATION_ID,
                runs.into_iter()
                    .map(|(len, held)| (len, status(held)))
                    .collect(),
            ));
        }
        if let Some(chosen) = &self.agreed.bitmap {
            // A written disk's bitmap is the one its top keeps now: after
            // an online snapshot or a grow, the one chosen may have
            // stopped taking marks, and must not be read as if it had not.
            let now = if self.export.read_only {
                Some(chosen.clone())
            } else {
                self.export.dirty_bitmap().filter(|b| b.id == chosen.id)
            };
            match now {
                Some(b) if req.offset + span <= b.size => {
                    chunks.push((BITMAP_ID, bitmap_runs(&b, req.offset, span, most)))
                }
                _ => {
                    return self.reply_error(
                        req,
                        failure(EINVAL, "the dirty bitmap chosen is no longer kept"),
                    )
                }
            }
        }
        let ext = self.agreed.extended;
        let kind = if ext {
            CHUNK_BLOCK_STATUS_EXT
        } else {
            CHUNK_BLOCK_STATUS
        };
        let last = chunks.len() - 1;
        let mut out = Vec::new();
        for (n, (id, runs)) in chunks.into_iter().enumerate() {
            let mut p = Vec::with_capacity(8 + runs.len() * 16);
            p.extend_from_slice(&id.to_be_bytes());
            if ext {
                p.extend_from_slice(&(runs.len() as u32).to_be_bytes());
                for &(len, status) in &runs {
                    p.extend_from_slice(&len.to_be_bytes());
                    p.extend_from_slice(&u64::from(status).to_be_bytes());
                }
            } else {
                for &(len, status) in &runs {
                    p.extend_from_slice(&(len as u32).to_be_bytes());
                    p.extend_from_slice(&status.to_be_bytes());
                }
            }
            let flags = if n == last { REPLY_FLAG_DONE } else { 0 };
            let h = chunk_header(ext, flags, kind, req.cookie, req.offset, p.len() as u64);
            out.extend_from_slice(&h);
            out.extend_from_slice(&p);
        }
        self.send(Reply::bytes(out));
    }

    /// Carry out one request and send its reply.
    pub(super) fn execute(&self, req: Request, payload: Option<(AlignedBuf, usize)>) {
        // Counted, and held by the disk's limits, before it runs: only a
        // request that will run (a refused one costs no tokens), for at
        // most what one request can move.
        let kind = match req.kind {
            CMD_READ => Some(IoKind::Read),
            CMD_WRITE => Some(IoKind::Write),
            CMD_WRITE_ZEROES | CMD_TRIM => Some(IoKind::Discard),
            CMD_FLUSH => Some(IoKind::Flush),
            _ => None,
        };
        if let Some(k) = kind {
            if k == IoKind::Flush || self.check_range(&req, EINVAL).is_ok() {
                let bytes = match k {
                    IoKind::Read | IoKind::Write => req.length.min(u64::from(MAX_PAYLOAD)),
                    _ => req.length,
                };
                self.export.disk.throttle.admit(k, bytes);
            }
        }
        match req.kind {
            CMD_READ => self.read(&req),
            CMD_WRITE => {
                let (buf, len) = payload.expect("WRITE carries its payload");
                let r = self.write(&req, &buf.as_slice()[..len]);
                self.shared.recycle(buf);
                self.reply_done(&req, r);
            }
            CMD_WRITE_ZEROES => {
                let r = self.write_zeroes(&req);
                self.reply_done(&req, r);
            }
            CMD_TRIM => {
                let r = self.trim(&req);
                self.reply_done(&req, r);
            }
            CMD_FLUSH => {
                let r = self
                    .export
                    .disk
                    .chain()
                    .flush()
                    .map_err(|e| image_failure(&e));
                self.reply_done(&req, r);
            }
            CMD_CACHE => {
                // The image is read with O_DIRECT: there is no cache to fill.
                let r = self.check_range(&req, EINVAL);
                self.reply_done(&req, r);
            }
            CMD_BLOCK_STATUS => self.block_status(&req),
            _ => unreachable!("filtered by the reader"),
        }
    }
}

/// The bitmap over `[offset, offset + len)` as runs of (length, status):
/// STATE_DIRTY where a bit is set. At most `most` runs, covering at least
/// the first byte.
fn bitmap_runs(
    b: &ploop_format::ploop::cbt::Cbt,
    offset: u64,
    len: u64,
    most: usize,
) -> Vec<(u64, u32)> {
    let end = offset + len;
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut at = offset;
    while at < end {
        let bit = at / b.granularity;
        let next = ((bit + 1) * b.granularity).min(end);
        let status = if b.is_set(bit) { STATE_DIRTY } else { 0 };
        match out.last_mut() {
            Some((l, s)) if *s == status => *l += next - at,
            _ => {
                if out.len() == most {
                    break;
                }
                out.push((next - at, status));
            }
        }
        at = next;
    }
    out
}
