//! Replies: encoding them, and sending each whole without holding up
//! the workers (a reply that finds the socket busy queues for the worker
//! that is sending).

use super::*;

/// The sending half of a connection, shared by the workers.
pub trait ReplySink: Write + Send {
    /// Cut the connection: a reply could not be sent.
    fn abort(&mut self) {}
}

impl ReplySink for Vec<u8> {}

/// Replies waiting for the worker that is sending, and their size.
#[derive(Default)]
pub(super) struct Queue {
    pub(super) replies: Vec<Reply>,
    pub(super) bytes: usize,
}

/// Most reply bytes one connection queues behind a busy socket.
pub(super) const MAX_QUEUED: usize = 64 << 20;

/// A whole reply, ready to send: header bytes, and ranges of a data
/// buffer it owns (so a queued reply moves its data instead of copying it).
pub(super) struct Reply {
    pub(super) parts: Vec<Part>,
    pub(super) data: Option<AlignedBuf>,
}

pub(super) enum Part {
    Bytes(Vec<u8>),
    /// A range of the reply's data buffer.
    Data(usize, usize),
}

impl Reply {
    pub(super) fn bytes(b: Vec<u8>) -> Self {
        Reply {
            parts: vec![Part::Bytes(b)],
            data: None,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.slices().map(<[u8]>::len).sum()
    }

    /// Copy data much smaller than its buffer out of it, and give the
    /// buffer back.
    pub(super) fn compact(self, shared: &Shared) -> Reply {
        let Some(buf) = &self.data else {
            return self;
        };
        if buf.len() < 4 * self.len() {
            return self;
        }
        let parts = self
            .slices()
            .map(|s| Part::Bytes(s.to_vec()))
            .collect::<Vec<_>>();
        if let Some(buf) = self.data {
            shared.recycle(buf);
        }
        Reply { parts, data: None }
    }

    pub(super) fn slices(&self) -> impl Iterator<Item = &[u8]> {
        self.parts.iter().map(move |p| match p {
            Part::Bytes(b) => b.as_slice(),
            Part::Data(from, to) => &self
                .data
                .as_ref()
                .expect("a data part has a buffer")
                .as_slice()[*from..*to],
        })
    }
}

/// Why a request failed: an NBD error number and a message for the client.
pub(super) struct Failure(pub(super) u32, pub(super) String);

pub(super) fn failure(errno: u32, msg: impl Into<String>) -> Failure {
    Failure(errno, msg.into())
}

/// The NBD error number for a system one.
pub(super) fn nbd_errno(errno: Option<i32>) -> u32 {
    match errno {
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ENOSPC,
        Some(libc::EROFS | libc::EPERM | libc::EACCES) => EPERM,
        _ => EIO,
    }
}

/// The NBD error for a system error number.
pub(super) fn errno_failure(errno: i32) -> Failure {
    failure(
        nbd_errno(Some(errno)),
        std::io::Error::from_raw_os_error(errno).to_string(),
    )
}

/// The NBD error for an image error.
pub(super) fn image_failure(e: &ploop_format::Error) -> Failure {
    let code = match e {
        ploop_format::Error::Io { err, .. } => nbd_errno(err.raw_os_error()),
        ploop_format::Error::Invalid(_) => EINVAL,
        _ => EIO,
    };
    failure(code, e.to_string())
}

/// Write all of `bufs`, with as few system calls as the kernel allows.
pub(super) fn write_all_vectored(
    w: &mut dyn Write,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Connection {
    /// Send one whole reply (all its chunks) without interleaving. A
    /// worker that finds another one sending leaves its reply for that one
    /// to send, and goes back to work: a client slow to read holds at most
    /// one worker.
    pub(super) fn send(&self, reply: Reply) {
        self.send_all(vec![reply]);
    }

    /// Send several replies, in one system call where the socket is free.
    /// Queued replies are bounded: past [`MAX_QUEUED`] bytes a worker
    /// waits for the socket instead (a client that stops reading is cut
    /// by the send timeout).
    pub(super) fn send_all(&self, mut replies: Vec<Reply>) {
        if self.broken.load(Ordering::SeqCst) {
            // Being cut: no reply can arrive.
            return replies.into_iter().for_each(|r| self.recycle(r));
        }
        let out = match try_lock(&self.out) {
            Some(out) => out,
            None => {
                let size: usize = replies.iter().map(Reply::len).sum();
                let mut q = lock(&self.queued);
                if q.bytes + size > MAX_QUEUED {
                    drop(q);
                    let out = lock(&self.out);
                    return self.send_queued(out, replies);
                }
                // Small data need not hold on to a large pooled buffer.
                q.replies
                    .extend(replies.drain(..).map(|r| r.compact(&self.shared)));
                q.bytes += size;
                drop(q);
                // The sender may have looked at the queue just before.
                if let Some(out) = try_lock(&self.out) {
                    self.send_queued(out, Vec::new());
                }
                return;
            }
        };
        self.send_queued(out, replies);
    }

    /// Send `batch` and whatever queues meanwhile, then let go of the socket.
    pub(super) fn send_queued<'a>(
        &'a self,
        mut out: MutexGuard<'a, Box<dyn ReplySink>>,
        mut batch: Vec<Reply>,
    ) {
        loop {
            {
                let mut q = lock(&self.queued);
                batch.append(&mut q.replies);
                q.bytes = 0;
            }
            if batch.is_empty() {
                drop(out);
                // One queued between the look and the unlock is ours to
                // send, unless someone else has the socket (then theirs).
                if lock(&self.queued).replies.is_empty() {
                    return;
                }
                match try_lock(&self.out) {
                    Some(o) => out = o,
                    None => return,
                }
                continue;
            }
            let parts: Vec<&[u8]> = batch.iter().flat_map(Reply::slices).collect();
            self.write_parts(&mut out, &parts);
            drop(parts);
            for r in batch.drain(..) {
                self.recycle(r);
            }
        }
    }

    pub(super) fn recycle(&self, reply: Reply) {
        if let Some(buf) = reply.data {
            self.shared.recycle(buf);
        }
    }

    pub(super) fn write_parts(&self, out: &mut Box<dyn ReplySink>, parts: &[&[u8]]) {
        if self.broken.load(Ordering::SeqCst) {
            return;
        }
        let mut slices: Vec<IoSlice> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let r = write_all_vectored(&mut **out, &mut slices).and_then(|_| out.flush());
        if let Err(e) = r {
            // A client that stopped reading (the send timed out) or left.
            debug!("sending a reply failed: {e}: cutting the connection");
            self.broken.store(true, Ordering::SeqCst);
            out.abort();
        }
    }

    /// Reply to a command that returns no data.
    pub(super) fn reply_done(&self, req: &Request, result: Result<(), Failure>) {
        match result {
            Ok(()) => self.send(Reply::bytes(self.done_reply(req))),
            Err(f) => self.reply_error(req, f),
        }
    }

    pub(super) fn reply_error(&self, req: &Request, f: Failure) {
        self.send(Reply::bytes(self.error_reply(req, f)));
    }

    /// A whole error reply for `req`.
    pub(super) fn error_reply(&self, req: &Request, Failure(code, msg): Failure) -> Vec<u8> {
        debug!(
            "request {} at {}+{}: error {code}: {msg}",
            req.kind, req.offset, req.length
        );
        if self.structured() {
            let msg = &msg.as_bytes()[..msg.len().min(MAX_STRING)];
            let mut p = Vec::with_capacity(6 + msg.len());
            p.extend_from_slice(&code.to_be_bytes());
            p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            p.extend_from_slice(msg);
            let h = chunk_header(
                self.agreed.extended,
                REPLY_FLAG_DONE,
                CHUNK_ERROR,
                req.cookie,
                req.offset,
                p.len() as u64,
            );
            [h, p].concat()
        } else {
            simple_reply(code, req.cookie).to_vec()
        }
    }

    /// A whole success reply for a command that returns no data.
    pub(super) fn done_reply(&self, req: &Request) -> Vec<u8> {
        if self.agreed.extended {
            chunk_header(true, REPLY_FLAG_DONE, CHUNK_NONE, req.cookie, req.offset, 0)
        } else {
            simple_reply(0, req.cookie).to_vec()
        }
    }

    /// A successful READ reply from the first `req.length` bytes of
    /// `data`: simple, or structured with data and hole chunks (per
    /// `runs`), the last one DONE.
    pub(super) fn read_reply(
        &self,
        req: &Request,
        data: AlignedBuf,
        runs: &[(u64, bool)],
    ) -> Reply {
        let len = req.length as usize;
        let mut parts = Vec::with_capacity(runs.len() * 2 + 2);
        if !self.structured() {
            parts.push(Part::Bytes(simple_reply(0, req.cookie).to_vec()));
            parts.push(Part::Data(0, len));
        } else if len == 0 {
            let ext = self.agreed.extended;
            let h = chunk_header(ext, REPLY_FLAG_DONE, CHUNK_NONE, req.cookie, req.offset, 0);
            parts.push(Part::Bytes(h));
        } else {
            let ext = self.agreed.extended;
            let covered: u64 = runs.iter().map(|r| r.0).sum();
            let mut runs = runs.to_vec();
            if covered != req.length {
                // Fewer runs than the read (capped, or none asked): the
                // rest goes as data.
                runs.push((req.length - covered, true));
            }
            let mut at = 0u64;
            let last = runs.len() - 1;
            for (i, &(n, held)) in runs.iter().enumerate() {
                let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
                let offset = req.offset + at;
                let mut h;
                if held {
                    h = chunk_header(ext, flags, CHUNK_OFFSET_DATA, req.cookie, req.offset, 8 + n);
                    h.extend_from_slice(&offset.to_be_bytes());
                } else {
                    h = chunk_header(ext, flags, CHUNK_OFFSET_HOLE, req.cookie, req.offset, 12);
                    h.extend_from_slice(&offset.to_be_bytes());
                    h.extend_from_slice(&(n as u32).to_be_bytes());
                }
                parts.push(Part::Bytes(h));
                if held {
                    parts.push(Part::Data(at as usize, (at + n) as usize));
                }
                at += n;
            }
        }
        Reply {
            parts,
            data: Some(data),
        }
    }
}
