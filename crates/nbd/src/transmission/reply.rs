//! Replies: encoding them, and sending each whole without holding up
//! the workers. A worker that finds the socket free writes without
//! waiting for it; what the socket cannot take at once goes to the
//! connection's own writer thread, so a client slow to read holds up only
//! itself. Replies waiting to be sent count against the connection's
//! budget, so its reader stops taking requests instead of memory growing.

use std::collections::VecDeque;
use std::thread::JoinHandle;

use super::*;

/// The sending half of a connection, shared by the workers.
pub trait ReplySink: Write + Send {
    /// Cut the connection: a reply could not be sent.
    fn abort(&mut self) {}

    /// Write what the other end takes now, without waiting: WouldBlock if
    /// nothing. Sinks that never wait need not say.
    fn write_now(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.write_vectored(bufs)
    }
}

impl ReplySink for Vec<u8> {}

/// The socket, and replies taken from the queue that it has not taken
/// whole yet (in order; the first one perhaps in part).
pub(super) struct Sender {
    pub(super) sink: Box<dyn ReplySink>,
    pending: VecDeque<Reply>,
    /// Bytes of the first pending reply already sent.
    sent: usize,
}

impl Sender {
    pub(super) fn new(sink: Box<dyn ReplySink>) -> Self {
        Sender {
            sink,
            pending: VecDeque::new(),
            sent: 0,
        }
    }
}

/// Replies queued while another thread had the socket.
#[derive(Default)]
pub(super) struct Queue {
    replies: Vec<Reply>,
}

/// The connection's writer thread: started the first time the socket is
/// full, it sends with waiting (up to the send timeout per call).
#[derive(Default)]
pub(super) struct Writer {
    wanted: bool,
    closing: bool,
    thread: Option<JoinHandle<()>>,
}

/// What a reply costs its connection's budget while it waits: its bytes,
/// and about what holding it costs besides.
fn reply_cost(r: &Reply) -> usize {
    r.len() + 128
}

/// At most this many pieces per system call (the kernel's IOV_MAX).
const MAX_IOV: usize = 1024;

/// The next pieces to send: those of `pending` past the first `sent`
/// bytes, at most MAX_IOV of them (a reply may have more pieces than one
/// call takes, so the count starts after what is sent).
fn unsent_slices(pending: &VecDeque<Reply>, sent: usize) -> Vec<IoSlice<'_>> {
    let mut skip = sent;
    let mut slices = Vec::new();
    for piece in pending.iter().flat_map(Reply::slices) {
        if skip >= piece.len() {
            // Sent already, or empty.
            skip -= piece.len();
            continue;
        }
        slices.push(IoSlice::new(&piece[skip..]));
        skip = 0;
        if slices.len() == MAX_IOV {
            break;
        }
    }
    slices
}

/// How far writing got.
enum Flow {
    /// Everything is sent.
    Empty,
    /// The socket takes no more now (only without waiting).
    Full,
    /// The connection is cut; what was left is dropped.
    Broken,
}

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

    /// Copy data much smaller than what its buffer holds on to (the
    /// aligned buffer keeps up to 4 KiB more than its length) out of it,
    /// and give the buffer back.
    pub(super) fn compact(self, shared: &Shared) -> Reply {
        let Some(buf) = &self.data else {
            return self;
        };
        let len = self.len();
        if buf.len() + 4096 <= len + len / 2 {
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

impl Connection {
    /// Send one whole reply (all its chunks) without interleaving.
    pub(super) fn send(&self, reply: Reply) {
        self.send_all(vec![reply]);
    }

    /// Send several replies, in one system call where the socket is free
    /// and takes them. Never waits for the client.
    pub(super) fn send_all(&self, replies: Vec<Reply>) {
        if self.broken.load(Ordering::SeqCst) {
            // Being cut: no reply can arrive.
            return replies.into_iter().for_each(|r| self.recycle(r));
        }
        self.hold_reply_bytes(replies.iter().map(reply_cost).sum());
        match try_lock(&self.out) {
            Some(mut out) => {
                out.pending.extend(replies);
                self.pump(out);
            }
            None => {
                // Small data need not hold on to a large pooled buffer.
                lock(&self.queued)
                    .replies
                    .extend(replies.into_iter().map(|r| r.compact(&self.shared)));
                // The sender may have looked at the queue just before.
                if let Some(out) = try_lock(&self.out) {
                    self.pump(out);
                }
            }
        }
    }

    /// With the socket held: send what is pending and queued without
    /// waiting; what the socket does not take goes to the writer thread.
    /// Lets go of the socket, then looks at the queue once more (a reply
    /// queued while we held it is ours to send).
    fn pump<'a>(&'a self, mut out: MutexGuard<'a, Sender>) {
        loop {
            if let Flow::Full = self.write_out(&mut out, false) {
                drop(out);
                return self.wake_writer();
            }
            // Everything sent, or dropped on a cut connection: either
            // way a reply queued meanwhile must not be stranded (its
            // bytes hold the budget that the connection's end waits on).
            drop(out);
            if lock(&self.queued).replies.is_empty() {
                return;
            }
            match try_lock(&self.out) {
                Some(o) => out = o,
                None => return,
            }
        }
    }

    /// Write pending and queued replies until all are sent, the socket is
    /// full (without waiting) or the connection is cut.
    fn write_out(&self, s: &mut Sender, wait: bool) -> Flow {
        loop {
            s.pending.extend(lock(&self.queued).replies.drain(..));
            if self.broken.load(Ordering::SeqCst) {
                self.drop_pending(s);
                return Flow::Broken;
            }
            if s.pending.is_empty() {
                return Flow::Empty;
            }
            let slices = unsent_slices(&s.pending, s.sent);
            let written = if wait {
                s.sink.write_vectored(&slices)
            } else {
                s.sink.write_now(&slices)
            };
            drop(slices);
            match written {
                Ok(0) => self.cut(s, &io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent(s, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && !wait => {
                    // They wait for a slow client: small data need not hold
                    // on to large pooled buffers meanwhile.
                    let pending = std::mem::take(&mut s.pending);
                    s.pending = pending
                        .into_iter()
                        .map(|r| r.compact(&self.shared))
                        .collect();
                    return Flow::Full;
                }
                // A client that stopped reading (the send timed out) or left.
                Err(e) => self.cut(s, &e),
            }
        }
    }

    /// `n` more bytes went out: let go of the replies that are whole.
    fn sent(&self, s: &mut Sender, n: usize) {
        s.sent += n;
        while let Some(front) = s.pending.front() {
            let len = front.len();
            if s.sent < len {
                break;
            }
            s.sent -= len;
            let r = s.pending.pop_front().expect("a front reply");
            self.release_reply_bytes(reply_cost(&r));
            self.recycle(r);
        }
    }

    fn cut(&self, s: &mut Sender, e: &io::Error) {
        debug!("sending a reply failed: {e}: cutting the connection");
        self.broken.store(true, Ordering::SeqCst);
        s.sink.abort();
    }

    fn drop_pending(&self, s: &mut Sender) {
        s.sent = 0;
        for r in s.pending.drain(..) {
            self.release_reply_bytes(reply_cost(&r));
            self.recycle(r);
        }
    }

    /// Have the writer thread send what is left, starting it if need be.
    fn wake_writer(&self) {
        let mut w = lock(&self.writer);
        w.wanted = true;
        if w.thread.is_none() && !w.closing {
            let me = self.me.upgrade().expect("a connection in use is alive");
            let spawned = std::thread::Builder::new()
                .name("nbd-writer".into())
                .spawn(move || me.writer_loop());
            match spawned {
                Ok(h) => w.thread = Some(h),
                Err(e) => {
                    // No thread to wait for the client with, and this one
                    // must not (it may be the reader, whose ring others
                    // wait on): cut the connection; its replies are
                    // dropped.
                    warn!("cannot start a writer thread: {e}; cutting the connection");
                    w.wanted = false;
                    drop(w);
                    let mut out = lock(&self.out);
                    self.cut(&mut out, &e);
                    self.drop_pending(&mut out);
                    drop(out);
                    loop {
                        let mut out = lock(&self.out);
                        self.write_out(&mut out, false);
                        drop(out);
                        if lock(&self.queued).replies.is_empty() {
                            return;
                        }
                    }
                }
            }
        }
        self.writer_wake.notify_one();
    }

    fn writer_loop(&self) {
        loop {
            {
                let mut w = lock(&self.writer);
                while !w.wanted && !w.closing {
                    w = self
                        .writer_wake
                        .wait(w)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                if !w.wanted {
                    return; // closing, and nothing left to send
                }
                w.wanted = false;
            }
            let mut out = lock(&self.out);
            self.write_out(&mut out, true);
            drop(out);
            // Queued while we held the socket, by workers that saw it busy.
            if !lock(&self.queued).replies.is_empty() {
                lock(&self.writer).wanted = true;
            }
        }
    }

    /// The connection is over (every reply sent or dropped): end the
    /// writer thread.
    pub(super) fn close_writer(&self) {
        let thread = {
            let mut w = lock(&self.writer);
            w.closing = true;
            w.thread.take()
        };
        self.writer_wake.notify_all();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    pub(super) fn recycle(&self, reply: Reply) {
        if let Some(buf) = reply.data {
            self.shared.recycle(buf);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Replies of many small pieces, as a structured read over many holes.
    fn pending() -> (VecDeque<Reply>, Vec<u8>) {
        let mut all = Vec::new();
        let mut replies = VecDeque::new();
        for r in 0..3u8 {
            let parts: Vec<Part> = (0..1500u32)
                .map(|i| Part::Bytes(vec![r ^ i as u8; (i % 7) as usize]))
                .collect();
            let reply = Reply { parts, data: None };
            reply.slices().for_each(|s| all.extend_from_slice(s));
            replies.push_back(reply);
        }
        (replies, all)
    }

    #[test]
    fn unsent_pieces_start_where_sending_stopped() {
        let (replies, all) = pending();
        let first = replies[0].len();
        for sent in [0, 1, 5, 1000, first - 3, first - 1] {
            let slices = unsent_slices(&replies, sent);
            assert_eq!(slices.len(), MAX_IOV, "sent {sent}");
            let joined: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
            assert_eq!(joined[..], all[sent..sent + joined.len()], "sent {sent}");
            assert!(slices.iter().all(|s| !s.is_empty()));
        }
        // Sending everything piece by piece sends every byte once.
        let (mut queue, mut sent, mut out) = (replies, 0, Vec::new());
        while !queue.is_empty() {
            for s in unsent_slices(&queue, sent).iter().take(3) {
                out.extend_from_slice(s);
                sent += s.len();
            }
            while queue.front().is_some_and(|r| r.len() <= sent) {
                sent -= queue.pop_front().unwrap().len();
            }
        }
        assert_eq!(out, all);
    }
}
