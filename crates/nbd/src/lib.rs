//! The NBD export: a server for the NBD protocol (fixed newstyle
//! negotiation, structured replies, base:allocation, extended headers,
//! STARTTLS) on a unix socket or TCP, serving one disk to many clients;
//! and the kernel's NBD client as a device ([`kernel_client`]).

pub mod handshake;
pub mod kernel_client;
pub mod proto;
#[cfg(any(test, feature = "test-support"))]
pub mod replay;
pub mod tls;
pub mod transmission;

use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use handshake::{Agreed, Outcome, TlsPolicy};
use ploop_format::ploop::cbt::Cbt;
use ploop_image::served::ServedDisk;
use transmission::{Connection, Pool, Shared, MAX_PAYLOAD};

/// One disk as clients see it.
pub struct Export {
    pub name: String,
    pub description: String,
    pub read_only: bool,
    pub disk: Arc<ServedDisk>,
}

impl Export {
    pub fn size(&self) -> u64 {
        self.disk.size()
    }

    /// The empty name asks for the default export, which this is.
    pub fn answers_to(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }

    /// (minimum, preferred, maximum) request sizes.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        (1, 4096, MAX_PAYLOAD)
    }

    /// The changed-block bitmap this export offers as the metadata
    /// context `qemu:dirty-bitmap:UUID`: the one the top delta keeps
    /// while it is written, or the one a read-only top's file holds (a
    /// snapshot served for a backup).
    pub fn dirty_bitmap(&self) -> Option<Arc<Cbt>> {
        let chain = self.disk.current();
        let p = chain.top().as_ploop()?;
        if let Some(live) = p.cbt() {
            return Some(live);
        }
        if p.is_writable() {
            return None;
        }
        match p.saved_cbt() {
            Ok(b) => b.map(Arc::new),
            Err(e) => {
                warn!("reading the changed-block bitmap: {e}");
                None
            }
        }
    }
}

/// The metadata context name of a bitmap.
pub fn bitmap_context(b: &Cbt) -> String {
    format!("{}{}", proto::DIRTY_BITMAP_PREFIX, b.id.hyphenated())
}

/// A connected client's socket.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where the server listens.
#[derive(Clone, Debug)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    pub fn bind(at: &Listen) -> io::Result<Listener> {
        let l = match at {
            Listen::Unix(path) => {
                // A socket file left by a server that is gone (never
                // anything else that happens to have that name).
                let is_socket = std::fs::symlink_metadata(path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
                if is_socket && UnixStream::connect(path).is_err() {
                    let _ = std::fs::remove_file(path);
                }
                // Only root (the owner) may connect: whoever can, reads and
                // writes the disk. Made so by the umask while it is bound,
                // so there is no moment when others could connect.
                let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
                let bound = UnixListener::bind(path);
                rustix::process::umask(old);
                Listener::Unix(bound?, path.clone())
            }
            Listen::Tcp(addr) => Listener::Tcp(TcpListener::bind(addr)?),
        };
        match &l {
            Listener::Unix(u, _) => u.set_nonblocking(true)?,
            Listener::Tcp(t) => t.set_nonblocking(true)?,
        }
        Ok(l)
    }

    /// An NBD URI for clients (`nbds` where TLS is required).
    pub fn uri(&self, export: &str, tls: bool) -> String {
        let scheme = if tls { "nbds" } else { "nbd" };
        match self {
            Listener::Unix(_, path) => {
                format!("{scheme}+unix:///{export}?socket={}", path.display())
            }
            Listener::Tcp(t) => match t.local_addr() {
                Ok(a) if a.is_ipv6() => format!("{scheme}://[{}]:{}/{export}", a.ip(), a.port()),
                Ok(a) => format!("{scheme}://{a}/{export}"),
                Err(_) => String::new(),
            },
        }
    }

    /// Wait up to `timeout` for a client.
    fn accept(&self, timeout: Duration) -> io::Result<Option<Stream>> {
        let fd = match self {
            Listener::Unix(u, _) => u.as_fd(),
            Listener::Tcp(t) => t.as_fd(),
        };
        let mut fds = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        let ts = rustix::event::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let r = match self {
            Listener::Unix(u, _) => u.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(t) => t.accept().map(|(s, _)| Stream::Tcp(s)),
        };
        match r {
            Ok(s) => {
                match &s {
                    Stream::Unix(u) => u.set_nonblocking(false)?,
                    Stream::Tcp(t) => {
                        t.set_nonblocking(false)?;
                        t.set_nodelay(true)?;
                    }
                }
                Ok(Some(s))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            // A client that left before we took it.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

pub struct ServeOptions {
    pub export: Arc<Export>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub threads: usize,
    pub max_connections: usize,
    /// Most connections from one peer (a user on a unix socket, an
    /// address over TCP), so that one peer cannot take every slot.
    pub max_per_peer: usize,
    /// A negotiated client with nothing in flight for this long is cut
    /// off (None: never).
    pub idle_timeout: Option<Duration>,
    /// Queue plain reads and in-place writes through io_uring.
    pub uring: bool,
}

/// How long a client may take to negotiate, TLS handshake included: a
/// silent socket holds its slot no longer.
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is at the other end of a connection, for the per-peer limit.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Peer {
    /// A local user (SO_PEERCRED of a unix socket).
    User(u32),
    /// A TCP address.
    Address(std::net::IpAddr),
    Unknown,
}

fn peer_of(s: &Stream) -> Peer {
    match s {
        Stream::Unix(u) => rustix::net::sockopt::socket_peercred(u)
            .map(|c| Peer::User(c.uid.as_raw()))
            .unwrap_or(Peer::Unknown),
        Stream::Tcp(t) => t
            .peer_addr()
            .map(|a| Peer::Address(a.ip()))
            .unwrap_or(Peer::Unknown),
    }
}

/// A client being served: its thread, its socket, who it is, and when it
/// last asked for something.
struct Client {
    thread: JoinHandle<()>,
    stream: Stream,
    peer: Peer,
    activity: Arc<transmission::Activity>,
}
/// A reply the client does not take for this long cuts the connection
/// (so that a client that stops reading cannot hold the workers).
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// On stop: how long clients get to finish what they started, before
/// their connections are cut.
const STOP_GRACE: Duration = Duration::from_secs(10);

impl transmission::ReplySink for Stream {
    fn abort(&mut self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }

    fn write_now(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let fd = match &*self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        };
        let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
        let mut no_control = rustix::net::SendAncillaryBuffer::default();
        Ok(rustix::net::sendmsg(fd, bufs, &mut no_control, flags)?)
    }
}

/// Reads that fail once a deadline has passed, however slowly the bytes
/// trickle in.
struct Deadline<'a> {
    s: &'a mut Stream,
    until: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.s.set_read_timeout(Some(left))?;
        self.s.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A client that never reads our replies must not hold us past the
        // deadline either.
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.s.set_write_timeout(Some(left))?;
        self.s.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Wait for threads to end, up to `limit`; true if all did.
fn wait_finished(clients: &[Client], limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        if clients.iter().all(|c| c.thread.is_finished()) {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Serve clients until `stop` is set; then let each connection finish the
/// requests it has started. Returns true when every connection ended;
/// false when some were still busy after being cut off (their requests
/// may still touch the image).
pub fn serve(listener: &Listener, opts: ServeOptions, stop: Arc<AtomicBool>) -> io::Result<bool> {
    let uring = opts.uring && uring_works();
    let shared = Shared::new(Box::new(Pool::new(opts.threads)?), uring, stop.clone());
    let mut clients: Vec<Client> = Vec::new();
    let mut served = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let accepted = listener.accept(Duration::from_millis(200));
        clients.retain(|c| !c.thread.is_finished());
        // A write's header and then nothing holds the write's budget: cut
        // off after the send timeout, or the idle timeout if shorter.
        let stall = opts
            .idle_timeout
            .map_or(SEND_TIMEOUT, |t| t.min(SEND_TIMEOUT));
        for c in &clients {
            if c.activity.payload_stalled_for().is_some_and(|t| t > stall) {
                warn!("a client sent a write without its payload for {stall:?}: cutting it off");
                let _ = c.stream.shutdown(std::net::Shutdown::Both);
            }
            if let Some(limit) = opts.idle_timeout {
                if c.activity.idle_for().is_some_and(|idle| idle > limit) {
                    debug!("a client idle for over {limit:?}: cutting it off");
                    let _ = c.stream.shutdown(std::net::Shutdown::Both);
                }
            }
        }
        let stream = match accepted {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                // Out of file descriptors and the like: back off, go on.
                warn!("accepting a client: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if clients.len() >= opts.max_connections {
            warn!("{} clients connected: refusing another", clients.len());
            continue; // dropping the stream closes it
        }
        let peer = peer_of(&stream);
        // Root is the administrator (and the only one who can reach the
        // default socket): only others are limited per peer.
        let limited = peer != Peer::User(0);
        if limited && clients.iter().filter(|c| c.peer == peer).count() >= opts.max_per_peer {
            warn!(
                "{peer:?} has {} connections: refusing another",
                opts.max_per_peer
            );
            continue;
        }
        let handle = match stream.try_clone() {
            Ok(h) => h,
            Err(e) => {
                warn!("cannot serve a client: {e}");
                continue;
            }
        };
        served += 1;
        let (export, tls, shared) = (opts.export.clone(), opts.tls.clone(), shared.clone());
        let activity = Arc::new(transmission::Activity::default());
        let watched = activity.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{served}"))
            .spawn(move || {
                if let Err(e) = handle_client(stream, &export, tls, &shared, watched) {
                    debug!("client {served}: {e}");
                }
            });
        match spawned {
            Ok(thread) => clients.push(Client {
                thread,
                stream: handle,
                peer,
                activity,
            }),
            Err(e) => warn!("cannot start a thread for a client: {e}"),
        }
    }
    info!("stopping: {} client(s) connected", clients.len());
    // Readers see the end of their input; requests that still arrive get
    // ESHUTDOWN; what was started is answered.
    for c in &clients {
        let _ = c.stream.shutdown(std::net::Shutdown::Read);
    }
    if !wait_finished(&clients, STOP_GRACE) {
        warn!("clients still busy after {STOP_GRACE:?}: cutting their connections");
        for c in &clients {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
        if !wait_finished(&clients, STOP_GRACE) {
            return Ok(false);
        }
    }
    for c in clients {
        let _ = c.thread.join();
    }
    Ok(true)
}

/// Whether this kernel gives us an io_uring that waits with a timeout
/// (Linux 5.11+); warned about if not.
pub(crate) fn uring_works() -> bool {
    match ploop_uring::RingCore::new() {
        Ok(r) if r.waits_with_timeout() => true,
        Ok(_) => {
            warn!("io_uring cannot wait with a timeout here (Linux < 5.11); using synchronous I/O");
            false
        }
        Err(e) => {
            warn!("io_uring unavailable ({e}); using synchronous I/O");
            false
        }
    }
}

/// Negotiate with one client, then serve its requests (recorded in
/// `activity`).
pub fn handle_client(
    stream: Stream,
    export: &Arc<Export>,
    tls: Option<Arc<rustls::ServerConfig>>,
    shared: &Arc<Shared>,
    activity: Arc<transmission::Activity>,
) -> io::Result<()> {
    let mut s = stream;
    let until = Instant::now() + NEGOTIATION_TIMEOUT;
    let Some(flags) = handshake::greet(&mut Deadline { s: &mut s, until })? else {
        return Ok(()); // unknown client flags: the spec says hang up
    };
    let policy = if tls.is_some() {
        if flags & proto::FLAG_C_FIXED_NEWSTYLE == 0 {
            return Ok(()); // TLS needs fixed newstyle, and we require TLS
        }
        TlsPolicy::Required
    } else {
        TlsPolicy::Off
    };
    let mut agreed = Agreed {
        no_zeroes: flags & proto::FLAG_C_NO_ZEROES != 0,
        ..Agreed::default()
    };
    let agreed = loop {
        let mut d = Deadline { s: &mut s, until };
        match handshake::negotiate(&mut d, export, policy, agreed)? {
            Outcome::Transmit(a) => break a,
            Outcome::Close => return Ok(()),
            Outcome::StartTls(a) => {
                let config = tls.clone().expect("STARTTLS only when configured");
                s = Stream::Unix(tls::start(config, s, until, SEND_TIMEOUT)?);
                agreed = Agreed {
                    tls_done: true,
                    ..a
                };
            }
        }
    };
    transmit(s, export, agreed, shared, activity)
}

/// Serve one socket of the kernel's NBD client (handed to it with
/// NBD_SET_SOCK): there is no negotiation, as the kernel took the size and
/// the flags from ioctls ([`kernel_flags`]), and it reads simple replies.
pub fn serve_kernel_socket(
    s: UnixStream,
    export: &Arc<Export>,
    shared: &Arc<Shared>,
) -> io::Result<()> {
    transmit(
        Stream::Unix(s),
        export,
        Agreed::default(),
        shared,
        Arc::default(),
    )
}

/// The transmission flags to give the kernel's NBD client (NBD_SET_FLAGS).
pub fn kernel_flags(export: &Export) -> u16 {
    handshake::transmission_flags(export, &Agreed::default())
}

/// Serve requests on a connection whose terms are settled, until the client
/// disconnects or the connection fails.
fn transmit(
    mut s: Stream,
    export: &Arc<Export>,
    agreed: Agreed,
    shared: &Arc<Shared>,
    activity: Arc<transmission::Activity>,
) -> io::Result<()> {
    s.set_read_timeout(None)?;
    s.set_write_timeout(Some(SEND_TIMEOUT))?;
    debug!("transmission: {agreed:?}");
    let conn = Connection::watched(
        export.clone(),
        agreed,
        Box::new(s.try_clone()?),
        shared.clone(),
        activity,
    );
    let ring = if shared.uring() {
        // The ring polls the socket through this descriptor: it stays
        // open (in `s`) until the ring is gone.
        transmission::ConnRing::new(s.as_fd().as_raw_fd())
            .inspect_err(|e| warn!("no io_uring for a client ({e}): serving it synchronously"))
            .ok()
    } else {
        None
    };
    let end = match ring {
        Some(ring) => {
            let mut input = BufReader::with_capacity(
                256 * 1024,
                transmission::RingInput { ring: ring.clone() },
            );
            transmission::serve_requests(&conn, &mut input, Some(ring))
        }
        None => {
            let mut input = BufReader::with_capacity(256 * 1024, s.try_clone()?);
            transmission::serve_requests(&conn, &mut input, None)
        }
    };
    debug!("connection ended: {end:?}");
    // Replies first, then let the client see the end; closing with unread
    // input would reset the connection and could drop the last replies.
    // (What the reader had buffered is dropped with it.)
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = io::copy(&mut (&mut s).take(64 << 20), &mut io::sink());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use transmission::Inline;

    /// Plays the kernel's NBD client: requests straight away (no
    /// negotiation), simple replies back.
    struct KernelLike(UnixStream);

    impl KernelLike {
        fn send(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, data: &[u8], len: u32) {
            let mut b = replay::request(kind, flags, cookie, offset, len);
            b.extend_from_slice(data);
            self.0.write_all(&b).unwrap();
        }

        /// (error, cookie) of the next simple reply, then `data` bytes.
        fn reply(&mut self, data: usize) -> (u32, u64, Vec<u8>) {
            let mut h = [0u8; 16];
            self.0.read_exact(&mut h).unwrap();
            let magic = u32::from_be_bytes(h[..4].try_into().unwrap());
            assert_eq!(
                magic,
                proto::SIMPLE_REPLY_MAGIC,
                "not a simple reply: {h:02x?}"
            );
            let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[8..].try_into().unwrap());
            let mut body = vec![0u8; if error == 0 { data } else { 0 }];
            self.0.read_exact(&mut body).unwrap();
            (error, cookie, body)
        }
    }

    fn kernel_session(read_only: bool) -> (KernelLike, std::thread::JoinHandle<()>) {
        let export = replay::memory_export(read_only);
        let shared = Shared::new(Box::new(Inline), false, Arc::new(AtomicBool::new(false)));
        let (ours, kernels) = UnixStream::pair().unwrap();
        kernels
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let server = std::thread::spawn(move || {
            serve_kernel_socket(ours, &export, &shared).unwrap();
        });
        (KernelLike(kernels), server)
    }

    #[test]
    fn the_kernel_client_is_served_without_negotiation() {
        let (mut k, server) = kernel_session(false);
        let data = vec![0x5a; 4096];
        k.send(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 1, 8192, &data, 4096);
        // The very first bytes are the reply: no greeting came before it.
        assert_eq!(k.reply(0), (0, 1, vec![]));
        k.send(proto::CMD_FLUSH, 0, 2, 0, &[], 0);
        assert_eq!(k.reply(0), (0, 2, vec![]));
        k.send(proto::CMD_READ, 0, 3, 8192, &[], 4096);
        assert_eq!(k.reply(4096), (0, 3, data));
        k.send(proto::CMD_TRIM, 0, 4, 8192, &[], 4096);
        assert_eq!(k.reply(0).0, 0);
        k.send(proto::CMD_READ, 0, 5, 8192, &[], 4096);
        assert_eq!(k.reply(4096), (0, 5, vec![0; 4096]));
        k.send(
            proto::CMD_WRITE_ZEROES,
            proto::CMD_FLAG_NO_HOLE,
            6,
            0,
            &[],
            65536,
        );
        assert_eq!(k.reply(0).0, 0);
        // A read past the end fails; the connection goes on.
        k.send(proto::CMD_READ, 0, 7, replay::DISK_SIZE, &[], 512);
        assert_eq!(k.reply(0).0, proto::EINVAL);
        k.send(proto::CMD_DISC, 0, 8, 0, &[], 0);
        server.join().unwrap();
        let mut rest = Vec::new();
        k.0.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "bytes after DISC: {rest:02x?}");
    }

    #[test]
    fn the_kernel_client_gets_the_flags_of_simple_replies() {
        let rw = replay::memory_export(false);
        let f = kernel_flags(&rw);
        for want in [
            proto::TF_HAS_FLAGS,
            proto::TF_SEND_FLUSH,
            proto::TF_SEND_FUA,
            proto::TF_SEND_TRIM,
            proto::TF_SEND_WRITE_ZEROES,
            proto::TF_CAN_MULTI_CONN,
        ] {
            assert_ne!(f & want, 0, "flag {want:#x} missing from {f:#x}");
        }
        // DF belongs to structured replies, which the kernel does not read.
        assert_eq!(f & (proto::TF_SEND_DF | proto::TF_READ_ONLY), 0);
        let ro = replay::memory_export(true);
        assert_ne!(kernel_flags(&ro) & proto::TF_READ_ONLY, 0);
        assert_eq!(kernel_flags(&ro) & proto::TF_SEND_TRIM, 0);
    }

    #[test]
    fn a_read_only_kernel_device_refuses_writes() {
        let (mut k, server) = kernel_session(true);
        k.send(proto::CMD_WRITE, 0, 1, 0, &[1; 512], 512);
        assert_eq!(k.reply(0), (proto::EPERM, 1, vec![]));
        k.send(proto::CMD_READ, 0, 2, 0, &[], 512);
        assert_eq!(k.reply(512), (0, 2, vec![0; 512]));
        k.send(proto::CMD_DISC, 0, 3, 0, &[], 0);
        server.join().unwrap();
    }
}
