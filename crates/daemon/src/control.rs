//! The daemon's control socket: one JSON request per connection, one JSON
//! response back; long operations send progress lines
//! (`{"progress":[done,total]}`) before it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Flush,
    Snapshot {
        uuid: Option<String>,
        /// Start a new changed-block bitmap of this GUID in the new top.
        #[serde(default)]
        cbt: Option<String>,
    },
    /// Merge `guid` (default: the top) with its parent.
    Merge {
        guid: Option<String>,
    },
    Delete {
        guid: String,
    },
    /// Swap a read-only delta for an identical copy.
    Replace {
        /// `guid:GUID`, `level:N` or `file:PATH`.
        target: String,
        new: std::path::PathBuf,
        keep_name: bool,
    },
    /// Grow the disk to `size` bytes, its partition table and devices
    /// with it (the filesystem is the caller's to grow).
    Grow {
        size: u64,
    },
    /// Replace the disk's I/O limits (None: unlimited).
    SetLimits(crate::registry::LimitsRecord),
    /// Move the top delta's clusters: down into free ones, the file cut
    /// after them (at most `limit` clusters), or into virtual order.
    Compact {
        #[serde(default)]
        limit: Option<u64>,
        #[serde(default)]
        defrag: bool,
    },
    /// `ploop copy`: start recording which clusters change, for the
    /// process `owner` (a dead owner's recording is taken over); answers
    /// the disk's size, its cluster size and the byte ranges some delta
    /// holds.
    TrackStart {
        #[serde(default)]
        owner: u32,
    },
    /// The clusters changed since the start or the last take, as runs of
    /// (first cluster, count); recording goes on.
    TrackTake,
    /// Stop recording changes.
    TrackStop,
    Stop,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
}

impl Response {
    pub fn ok(value: Option<serde_json::Value>) -> Self {
        Self {
            ok: true,
            error: None,
            value,
        }
    }

    pub fn err(e: impl ToString) -> Self {
        Self {
            ok: false,
            error: Some(e.to_string()),
            value: None,
        }
    }
}

/// A line reporting how far a long operation has got.
#[derive(Serialize, Deserialize)]
struct Progress {
    progress: (u64, u64),
}

/// Send one request and wait for the answer.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> crate::Result<Response> {
    call_with_progress(socket, req, timeout, &|_, _| {})
}

/// [`call`], passing progress reports on as they come; `timeout` applies
/// to each line.
pub fn call_with_progress(
    socket: &Path,
    req: &Request,
    timeout: Duration,
    progress: &dyn Fn(u64, u64),
) -> crate::Result<Response> {
    let failed = |what: String| crate::Error::Control {
        path: socket.display().to_string(),
        what,
    };
    let mut s =
        UnixStream::connect(socket).map_err(|e| failed(format!("cannot reach the daemon: {e}")))?;
    s.set_read_timeout(Some(timeout)).ok();
    let mut line = serde_json::to_string(req).map_err(|e| failed(e.to_string()))?;
    line.push('\n');
    s.write_all(line.as_bytes())
        .map_err(|e| failed(e.to_string()))?;
    let mut input = BufReader::new(&s);
    loop {
        let mut answer = String::new();
        input
            .read_line(&mut answer)
            .map_err(|e| failed(format!("the daemon did not answer: {e}")))?;
        if let Ok(Progress {
            progress: (done, total),
        }) = serde_json::from_str(&answer)
        {
            progress(done, total);
            continue;
        }
        return serde_json::from_str(&answer)
            .map_err(|e| failed(format!("a bad answer: {e}: {answer:?}")));
    }
}

/// Progress lines for one connection: one per percent at most.
struct Reporter<'a> {
    conn: &'a UnixStream,
    last: std::cell::Cell<Option<u64>>,
}

impl Reporter<'_> {
    fn report(&self, done: u64, total: u64) {
        let percent = (done.min(total) * 100).checked_div(total).unwrap_or(100);
        if self.last.get() == Some(percent) {
            return;
        }
        self.last.set(Some(percent));
        if let Ok(mut line) = serde_json::to_string(&Progress {
            progress: (done, total),
        }) {
            line.push('\n');
            // A caller that stopped reading loses its reports, not the work.
            let _ = (&mut &*self.conn).write_all(line.as_bytes());
        }
    }
}

/// Requests are one short line.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client may take to send its request: requests are answered
/// one at a time, so a silent client must not hold up the next (a stop).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the client has closed its socket (it gave up waiting).
fn client_gone(conn: &UnixStream) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(conn, PollFlags::empty())];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut fds, Some(&now)).is_ok() && fds[0].revents().contains(PollFlags::HUP)
}

/// The caller of one request, as its handler sees it.
pub struct Caller<'a> {
    reporter: Reporter<'a>,
}

impl Caller<'_> {
    /// Tell the caller how far the work has got.
    pub fn progress(&self, done: u64, total: u64) {
        self.reporter.report(done, total)
    }

    /// Whether the caller has hung up (interrupted): long work that can
    /// stop cleanly between steps asks this.
    pub fn gone(&self) -> bool {
        client_gone(self.reporter.conn)
    }
}

/// Answer requests until the handler says to stop (its second result).
pub fn serve(listener: &UnixListener, handle: impl FnMut(Request, &Caller) -> (Response, bool)) {
    serve_with(listener, None, REQUEST_TIMEOUT, handle)
}

/// [`serve`], and when `wake` becomes readable (a signal handler writes
/// to it) a [`Request::Stop`] is handled as if a client had sent it: the
/// daemon needs no thread of its own to turn signals into a stop.
pub fn serve_until_signalled(
    listener: &UnixListener,
    wake: &UnixStream,
    handle: impl FnMut(Request, &Caller) -> (Response, bool),
) {
    serve_with(listener, Some(wake), REQUEST_TIMEOUT, handle)
}

/// The next client, or None when `wake` was written to (drained).
fn next_client(listener: &UnixListener, wake: Option<&UnixStream>) -> Option<UnixStream> {
    use rustix::event::{poll, PollFd, PollFlags};
    loop {
        if let Some(w) = wake {
            let mut fds = [
                PollFd::new(listener, PollFlags::IN),
                PollFd::new(w, PollFlags::IN),
            ];
            if poll(&mut fds, None).is_err() {
                continue; // EINTR
            }
            if !fds[1].revents().is_empty() {
                let mut drain = [0u8; 64];
                while matches!((&mut &*w).read(&mut drain), Ok(n) if n > 0) {}
                return None;
            }
            if fds[0].revents().is_empty() {
                continue;
            }
        }
        match listener.accept() {
            Ok((conn, _)) => {
                // Accepted sockets do not inherit the listener's
                // non-blocking mode on Linux; set it plainly anyway.
                let _ = conn.set_nonblocking(false);
                return Some(conn);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => continue,
        }
    }
}

fn serve_with(
    listener: &UnixListener,
    wake: Option<&UnixStream>,
    timeout: Duration,
    mut handle: impl FnMut(Request, &Caller) -> (Response, bool),
) {
    if let Some(w) = wake {
        // Polled: an accept must never block past a client that left, nor
        // the draining of the wake socket once it is empty.
        let _ = listener.set_nonblocking(true);
        let _ = w.set_nonblocking(true);
    }
    loop {
        let Some(mut conn) = next_client(listener, wake) else {
            // Signalled: a stop, answered to nobody.
            let Ok((quiet, _other)) = UnixStream::pair() else {
                continue;
            };
            let caller = Caller {
                reporter: Reporter {
                    conn: &quiet,
                    last: std::cell::Cell::new(None),
                },
            };
            let (resp, stop) = handle(Request::Stop, &caller);
            if stop {
                break;
            }
            tracing::warn!(
                "stop on a signal failed: {}",
                resp.error.unwrap_or_default()
            );
            continue;
        };
        let _ = conn.set_read_timeout(Some(timeout));
        let _ = conn.set_write_timeout(Some(timeout));
        let mut line = String::new();
        if BufReader::new((&conn).take(MAX_REQUEST))
            .read_line(&mut line)
            .is_err()
        {
            continue;
        }
        let parsed = if line.ends_with('\n') {
            serde_json::from_str::<Request>(&line).map_err(|e| format!("bad request: {e}"))
        } else {
            Err("incomplete or oversized request".to_string())
        };
        let (resp, stop) = match parsed {
            // A request that waited behind a long one while its caller gave
            // up (an umount that said it failed must not happen later).
            Ok(req) if client_gone(&conn) => {
                tracing::warn!("not doing {req:?}: its caller is gone");
                continue;
            }
            Ok(req) => {
                let caller = Caller {
                    reporter: Reporter {
                        conn: &conn,
                        last: std::cell::Cell::new(None),
                    },
                };
                handle(req, &caller)
            }
            Err(e) => (Response::err(e), false),
        };
        if let Ok(mut out) = serde_json::to_string(&resp) {
            out.push('\n');
            let _ = conn.write_all(out.as_bytes());
        }
        if stop {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte on the wake socket (what the signal handlers write) is a
    /// stop; clients are served until then, and a failed stop goes on.
    #[test]
    fn a_signal_is_a_stop_and_clients_are_served_meanwhile() {
        let dir = std::env::temp_dir().join(format!("ploop-ctl-sig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("ctl.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).unwrap();
        let (wake, signal) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut stops = 0;
            serve_until_signalled(&listener, &wake, |req, _| match req {
                // The first stop fails (a flush error, say): served on.
                Request::Stop => {
                    stops += 1;
                    if stops == 1 {
                        (Response::err("not yet"), false)
                    } else {
                        (Response::ok(None), true)
                    }
                }
                _ => (Response::ok(None), false),
            });
            stops
        });
        let t = Duration::from_secs(5);
        assert!(call(&sock, &Request::Status, t).unwrap().ok);
        (&signal).write_all(&[1]).unwrap();
        // Still served after the failed stop.
        let mut answered = false;
        for _ in 0..50 {
            if call(&sock, &Request::Status, t).is_ok_and(|r| r.ok) {
                answered = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(answered);
        (&signal).write_all(&[1]).unwrap();
        assert_eq!(server.join().unwrap(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn request_and_response_roundtrip_over_a_socket() {
        let dir = std::env::temp_dir().join(format!("ploop-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("ctl.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            serve(&listener, |req, caller| {
                let stop = matches!(req, Request::Stop);
                seen.push(format!("{req:?}"));
                match req {
                    Request::Merge { .. } => {
                        for done in 0..=400 {
                            caller.progress(done, 400);
                        }
                        (Response::ok(None), false)
                    }
                    Request::Snapshot { uuid, .. } => {
                        (Response::ok(Some(serde_json::json!(uuid))), false)
                    }
                    Request::Stop => (Response::ok(None), stop),
                    _ => (Response::err("no"), false),
                }
            });
            seen
        });
        let t = Duration::from_secs(5);
        let r = call(
            &sock,
            &Request::Snapshot {
                uuid: Some("{x}".into()),
                cbt: None,
            },
            t,
        )
        .unwrap();
        assert!(r.ok);
        assert_eq!(r.value, Some(serde_json::json!("{x}")));
        // Progress comes before the answer, once per percent.
        let seen_progress = std::cell::RefCell::new(Vec::new());
        let r = call_with_progress(&sock, &Request::Merge { guid: None }, t, &|d, t| {
            seen_progress.borrow_mut().push((d, t))
        })
        .unwrap();
        assert!(r.ok);
        let seen_progress = seen_progress.into_inner();
        assert_eq!(seen_progress.len(), 101);
        assert_eq!(seen_progress.first(), Some(&(0, 400)));
        assert_eq!(seen_progress.last(), Some(&(400, 400)));
        let r = call(&sock, &Request::Flush, t).unwrap();
        assert!(!r.ok);
        assert_eq!(r.error.as_deref(), Some("no"));
        // A malformed request gets an error, not a dead daemon.
        {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.write_all(b"{\"cmd\":\"bogus\"}\n").unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            assert!(line.contains("bad request"), "{line}");
        }
        assert!(call(&sock, &Request::Stop, t).unwrap().ok);
        let seen = server.join().unwrap();
        assert_eq!(seen.len(), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Silent, endless and departed clients: none holds up the next
    /// request, and a request whose caller left is not done.
    #[test]
    fn hostile_and_departed_clients_do_not_hold_up_requests() {
        let dir = std::env::temp_dir().join(format!("ploop-ctl2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("ctl.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).unwrap();
        // Queued before the server runs, as behind a long merge: a client
        // that sends nothing, one that sends too much, and a stop whose
        // caller has gone.
        let silent = UnixStream::connect(&sock).unwrap();
        let mut endless = UnixStream::connect(&sock).unwrap();
        endless
            .set_write_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = endless.write_all(&vec![b'x'; MAX_REQUEST as usize + 10]);
        {
            let mut gone = UnixStream::connect(&sock).unwrap();
            gone.write_all(b"{\"cmd\":\"stop\"}\n").unwrap();
        }
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            serve_with(&listener, None, Duration::from_millis(300), |req, _| {
                let stop = matches!(req, Request::Stop);
                seen.push(format!("{req:?}"));
                (Response::ok(None), stop)
            });
            seen
        });
        let mut line = String::new();
        BufReader::new(&endless).read_line(&mut line).unwrap();
        assert!(line.contains("oversized"), "{line}");
        let started = std::time::Instant::now();
        let t = Duration::from_secs(5);
        assert!(call(&sock, &Request::Status, t).unwrap().ok);
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(call(&sock, &Request::Stop, t).unwrap().ok);
        // Only the two calls that waited for their answers were done.
        assert_eq!(server.join().unwrap(), vec!["Status", "Stop"]);
        drop(silent);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
