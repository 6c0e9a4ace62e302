//! `ploop copy`, OpenVZ's command for moving a running container's disk:
//! the sender reads a mounted disk in passes while the container runs
//! (the daemon records which clusters change meanwhile), freezes its
//! filesystem for the last pass, and writes one stream (standard output,
//! a file descriptor, a TCP connection); the receiver writes the stream
//! into a new image and its DiskDescriptor.xml. The stream's layout is in
//! the `ploop-copy` crate.

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use ploop_copy::stream::{FORMAT_PLOOP, FORMAT_RAW};
use ploop_copy::{Control, RecvStats, SendOptions, SendStats, Sink, Source, Start};
use ploop_daemon::control::Request;
use ploop_daemon::registry::{self, MountRecord};
use ploop_format::descriptor::FILE_NAME;
use ploop_image::ops::DiskFormat;
use ploop_image::Disk;
use serde_json::Value;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// What a receiver on a TCP connection answers once the image is whole.
const DONE: &[u8; 8] = b"PCPYDONE";
const FAILED: &[u8; 8] = b"PCPYFAIL";
/// How long a receiver on a socket may stay silent before the sender
/// gives up waiting for its answer (it flushes the image first).
const ANSWER_WAIT: Duration = Duration::from_secs(600);

#[derive(Args, Debug)]
pub struct CopyArgs {
    /// Send from this mounted disk: its device (as `ploop list` shows it)
    /// or its DiskDescriptor.xml
    #[arg(short = 's', value_name = "DEVICE")]
    source: Option<PathBuf>,
    /// The image to write (a new file; its DiskDescriptor.xml goes beside
    /// it). Alone: receive into it; with -s: copy into it here
    #[arg(short = 'd', value_name = "FILE")]
    dest: Option<PathBuf>,
    /// Send to this open file descriptor (default: standard output)
    #[arg(short = 'o', value_name = "OFD")]
    ofd: Option<i32>,
    /// Receive from this open file descriptor (default: standard input)
    #[arg(short = 'i', value_name = "IFD")]
    ifd: Option<i32>,
    /// Format of the image written: ploop1 (default) or raw
    #[arg(short = 't', value_name = "FORMAT")]
    format: Option<String>,
    /// Command that stops the container before the last pass (run with
    /// sh -c; the filesystem is then frozen as well)
    #[arg(short = 'F', value_name = "STOP_CMD")]
    stop_cmd: Option<String>,
    /// Send over a TCP connection to HOST:PORT
    #[arg(long, value_name = "HOST:PORT")]
    to: Option<String>,
    /// Receive over one TCP connection accepted on ADDR:PORT
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// Passes at most, the frozen last one included
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..=100))]
    passes: u32,
    /// Leave the filesystem frozen after a copy that succeeded (for the
    /// handover; `fsfreeze -u` thaws it). A failed copy always thaws
    #[arg(long)]
    keep_frozen: bool,
}

pub fn run(a: CopyArgs) -> Res<ExitCode> {
    // Descriptors named by number are taken before this process opens
    // anything: a number not inherited must not name a file of ours.
    let ofd = a.ofd.map(|fd| fd_arg(fd, "-o")).transpose()?;
    let ifd = a.ifd.map(|fd| fd_arg(fd, "-i")).transpose()?;
    let format = match a.format.as_deref() {
        None | Some("ploop1") | Some("ploop") | Some("expanded") => FORMAT_PLOOP,
        Some("raw") => FORMAT_RAW,
        Some(f) => return Err(format!("-t {f}: the image formats are ploop1 and raw").into()),
    };
    match &a.source {
        Some(src) => {
            if a.ifd.is_some() || a.listen.is_some() {
                return Err("-i and --listen are the receiver's: not with -s".into());
            }
            let outputs = [a.dest.is_some(), a.ofd.is_some(), a.to.is_some()];
            if outputs.iter().filter(|x| **x).count() > 1 {
                return Err("send to one of -d, -o and --to".into());
            }
            sender(src, &a, format, ofd)
        }
        None => {
            let Some(dest) = &a.dest else {
                return Err("either -s DEVICE (send) or -d FILE (receive) is needed".into());
            };
            if a.ofd.is_some() || a.to.is_some() || a.stop_cmd.is_some() || a.keep_frozen {
                return Err("-o, --to, -F and --keep-frozen are the sender's: they need -s".into());
            }
            if a.ifd.is_some() && a.listen.is_some() {
                return Err("receive from one of -i and --listen".into());
            }
            receiver(dest, &a, a.format.as_ref().map(|_| format), ifd)
        }
    }
}

/// The mounted disk `src` names: a device of it, or its descriptor.
fn find_mount(src: &Path) -> Res<MountRecord> {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let want = canon(src);
    let live: Vec<MountRecord> = registry::all()
        .into_iter()
        .filter(|r| r.daemon_alive())
        .collect();
    let by_device = live.iter().find(|r| {
        r.device.as_deref().map(canon).as_ref() == Some(&want)
            || r.fs_device().map(canon).as_ref() == Some(&want)
    });
    if let Some(r) = by_device {
        return Ok(r.clone());
    }
    let dd = if src.is_dir() {
        src.join(FILE_NAME)
    } else {
        src.to_path_buf()
    };
    let dd = ploop_io::resolve_folder(&dd).unwrap_or(dd);
    live.into_iter()
        .filter(|r| r.descriptor == dd)
        .min_by_key(|r| r.read_only)
        .ok_or_else(|| format!("{}: not a mounted ploop disk or its device", src.display()).into())
}

/// The disk, read through its FUSE file with O_DIRECT (as the loop
/// device reads it: nothing is cached that a later write would leave
/// stale).
struct FuseSource {
    file: File,
    path: PathBuf,
}

impl Source for FuseSource {
    fn read(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("{} at {offset}: {e}", self.path.display()),
            )
        })
    }
}

/// The daemon's change log, the container's stop command and the freeze.
struct DaemonControl<'a> {
    rec: &'a MountRecord,
    stop_cmd: Option<&'a str>,
    frozen: Option<PathBuf>,
}

impl Control for DaemonControl<'_> {
    fn take_dirty(&mut self) -> Result<(u64, Vec<(u64, u64)>), String> {
        let v = crate::mount::online_call(self.rec, &Request::TrackTake)
            .map_err(|e| e.to_string())?
            .unwrap_or(Value::Null);
        let size = v["size"].as_u64().ok_or("the daemon gave no size")?;
        Ok((size, pairs(&v["dirty"])?))
    }

    fn freeze(&mut self) -> Result<(), String> {
        if let Some(cmd) = self.stop_cmd {
            let st = std::process::Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .status()
                .map_err(|e| format!("running the stop command: {e}"))?;
            if !st.success() {
                return Err(format!("the stop command {cmd:?} failed ({st})"));
            }
        }
        if let (Some(m), Some(dev)) = (&self.rec.mountpoint, self.rec.fs_device()) {
            // Only our filesystem (after a manual umount something else
            // may be mounted there).
            if ploop_daemon::kernel::mounted_from(m).as_deref() == Some(dev) {
                ploop_daemon::kernel::freeze(m).map_err(|e| e.to_string())?;
                self.frozen = Some(m.clone());
            }
        }
        crate::mount::online_call(self.rec, &Request::Flush).map_err(|e| e.to_string())?;
        Ok(())
    }

    fn thaw(&mut self) -> Result<(), String> {
        match self.frozen.take() {
            Some(m) => ploop_daemon::kernel::thaw(&m).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}

/// [[a, b], ...] as pairs.
fn pairs(v: &Value) -> Result<Vec<(u64, u64)>, String> {
    let list = v.as_array().ok_or("the daemon gave no list")?;
    list.iter()
        .map(|p| match (p[0].as_u64(), p[1].as_u64()) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => Err(format!("bad pair {p} from the daemon")),
        })
        .collect()
}

/// Tracking stops however the copy ends.
struct Tracking<'a>(&'a MountRecord);

impl Drop for Tracking<'_> {
    fn drop(&mut self) {
        let _ = crate::mount::online_call(self.0, &Request::TrackStop);
    }
}

/// What waits for the receiver's answer, where it can give one.
type Ack = Box<dyn FnMut() -> std::io::Result<()>>;

/// How long a write to a TCP receiver may stall before the copy fails.
const SEND_STALL: Duration = Duration::from_secs(60);

/// On SIGINT, SIGTERM or SIGHUP: thaw the disk's filesystem (it may be
/// frozen for the last pass), stop the daemon's recording and exit.
fn watch_signals(rec: &MountRecord) -> Res<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    let rec = rec.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                if let Some(m) = &rec.mountpoint {
                    // EINVAL when it was not frozen: nothing to undo.
                    let _ = ploop_daemon::kernel::thaw(m);
                }
                let _ = crate::mount::online_call(&rec, &Request::TrackStop);
                eprintln!("ploop copy: stopped by signal {sig}; the source goes on");
                std::process::exit(128 + sig);
            }
        })?;
    Ok(())
}

/// A file descriptor the caller passed by number, taken over.
fn fd_arg(fd: i32, what: &str) -> Res<File> {
    ploop_copy::adopt_fd(fd)
        .map_err(|e| format!("{what} {fd}: not an open file descriptor ({e})").into())
}

fn sender(src: &Path, a: &CopyArgs, format: u32, ofd: Option<File>) -> Res<ExitCode> {
    let rec = find_mount(src)?;
    if rec.read_only {
        return Err(format!(
            "{}: a read-only view; copy the disk's own mount",
            src.display()
        )
        .into());
    }
    if rec.device.is_none() {
        return Err(format!(
            "{}: served over NBD, not mounted: ploop copy reads a mounted disk (ploop backup works on a served one)",
            src.display()
        )
        .into());
    }
    if rec.mountpoint.is_none() && a.stop_cmd.is_none() {
        return Err(format!(
            "{}: nothing would stop writes for the last pass: mount its filesystem (ploop mount -m) or give -F STOP_CMD",
            src.display()
        )
        .into());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(&rec.fuse_file)
        .map_err(|e| format!("{}: {e}", rec.fuse_file.display()))?;
    let source = FuseSource {
        file,
        path: rec.fuse_file.clone(),
    };
    let v = crate::mount::online_call(
        &rec,
        &Request::TrackStart {
            owner: std::process::id(),
        },
    )?
    .unwrap_or(Value::Null);
    let tracking = Tracking(&rec);
    // Ctrl-C or a kill while the filesystem is frozen must not leave it
    // frozen: a thread thaws it, stops the recording and exits.
    watch_signals(&rec)?;
    let start = Start {
        size: v["size"].as_u64().ok_or("the daemon gave no size")?,
        cluster: v["cluster"]
            .as_u64()
            .ok_or("the daemon gave no cluster size")?,
        held: pairs(&v["held"])?,
    };
    let mut control = DaemonControl {
        rec: &rec,
        stop_cmd: a.stop_cmd.as_deref(),
        frozen: None,
    };
    let opts = SendOptions {
        max_passes: a.passes,
        keep_frozen: a.keep_frozen,
        format,
    };
    let stats = crate::cli::with_progress("copying", |progress| -> Res<SendStats> {
        if let Some(dest) = &a.dest {
            // Here: the receiving end on a thread, over a pipe.
            let (mut rd, mut wr) = std::io::pipe()?;
            let dest = dest.clone();
            let t_format = a.format.as_ref().map(|_| format);
            let (tx, rx) = std::sync::mpsc::channel();
            let handle = std::thread::spawn(move || {
                let mut sink = FileSink::new(&dest, t_format);
                let r = ploop_copy::receive(&mut rd, &mut sink);
                let _ = tx.send(r.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                r
            });
            let mut ack = || match rx.recv() {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(std::io::Error::other(e)),
                Err(_) => Err(std::io::Error::other("the receiving end stopped")),
            };
            let sent = ploop_copy::send(
                &source,
                &mut control,
                start,
                &mut wr,
                &opts,
                progress,
                &mut ack,
            );
            drop(wr);
            let received = handle.join().map_err(|_| "the receiving end panicked")?;
            let stats = sent?;
            received?;
            return Ok(stats);
        }
        // Over TCP the receiver answers once its image is closed.
        let (out, mut ack): (Box<dyn Write>, Ack) = match (&a.to, ofd) {
            (Some(to), _) => {
                let sock =
                    TcpStream::connect(to).map_err(|e| format!("connecting to {to}: {e}"))?;
                let _ = sock.set_nodelay(true);
                // A receiver that stops reading fails the copy (and
                // thaws the filesystem) rather than holding it frozen.
                sock.set_write_timeout(Some(SEND_STALL))?;
                let mut reader = sock.try_clone()?;
                let ack = move || {
                    reader.shutdown(Shutdown::Write)?;
                    reader.set_read_timeout(Some(ANSWER_WAIT))?;
                    let mut answer = [0u8; 8];
                    reader.read_exact(&mut answer).map_err(|e| {
                        std::io::Error::new(e.kind(), format!("no answer from the receiver ({e})"))
                    })?;
                    if &answer == DONE {
                        Ok(())
                    } else {
                        Err(std::io::Error::other(
                            "the receiver failed (see its messages)",
                        ))
                    }
                };
                (Box::new(sock), Box::new(ack))
            }
            (None, Some(f)) => (Box::new(f), Box::new(|| Ok(()))),
            (None, None) => {
                if std::io::stdout().is_terminal() {
                    return Err(
                        "standard output is a terminal: send with -o, -d or --to, or redirect it"
                            .into(),
                    );
                }
                (Box::new(std::io::stdout().lock()), Box::new(|| Ok(())))
            }
        };
        let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
        Ok(ploop_copy::send(
            &source,
            &mut control,
            start,
            &mut out,
            &opts,
            progress,
            &mut *ack,
        )?)
    });
    drop(tracking);
    let stats = stats?;
    let data = stats.data_bytes.max(1) as f64;
    eprintln!(
        "ploop copy: sent {} bytes ({} of data) in {} passes in {:.2} s; frozen {:.3} s",
        stats.stream_bytes,
        stats.data_bytes,
        stats.passes.len(),
        stats.total.as_secs_f64(),
        stats.frozen.as_secs_f64()
    );
    for (i, p) in stats.passes.iter().enumerate() {
        eprintln!(
            "  pass {}: {} bytes changed, {} of data sent, {:.3} s",
            i + 1,
            p.bytes,
            p.data,
            p.secs
        );
    }
    eprintln!(
        "  stream bytes per byte of data: {:.3}",
        stats.stream_bytes as f64 / data
    );
    Ok(ExitCode::SUCCESS)
}

fn receiver(dest: &Path, a: &CopyArgs, format: Option<u32>, ifd: Option<File>) -> Res<ExitCode> {
    let mut sink = FileSink::new(dest, format);
    let (stats, sock): (Res<RecvStats>, Option<TcpStream>) = if let Some(addr) = &a.listen {
        let listener = TcpListener::bind(addr).map_err(|e| format!("listening on {addr}: {e}"))?;
        eprintln!("ploop copy: waiting on {}", listener.local_addr()?);
        let (sock, peer) = listener.accept()?;
        eprintln!("ploop copy: receiving from {peer}");
        let mut input = std::io::BufReader::with_capacity(1 << 20, sock.try_clone()?);
        (
            ploop_copy::receive(&mut input, &mut sink).map_err(Into::into),
            Some(sock),
        )
    } else {
        let mut input: Box<dyn Read> = match ifd {
            Some(f) => Box::new(f),
            None => Box::new(std::io::stdin().lock()),
        };
        let mut input = std::io::BufReader::with_capacity(1 << 20, &mut input);
        (
            ploop_copy::receive(&mut input, &mut sink).map_err(Into::into),
            None,
        )
    };
    if let Some(mut s) = sock {
        let _ = s.write_all(if stats.is_ok() { DONE } else { FAILED });
        let _ = s.shutdown(Shutdown::Both);
    }
    let stats = stats?;
    eprintln!(
        "ploop copy: received {} bytes ({} of data, {} as zeros) in {} passes into {}",
        stats.stream_bytes,
        stats.data_bytes,
        stats.zero_bytes,
        stats.passes,
        dest.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The received disk: a new image and its descriptor, removed again if
/// the stream fails.
struct FileSink {
    image: PathBuf,
    format: Option<u32>,
    disk: Option<Disk>,
    made: Option<PathBuf>,
}

impl FileSink {
    fn new(image: &Path, format: Option<u32>) -> FileSink {
        FileSink {
            image: image.to_path_buf(),
            format,
            disk: None,
            made: None,
        }
    }

    fn disk(&self) -> Result<&Disk, String> {
        self.disk.as_ref().ok_or_else(|| "no image".to_string())
    }
}

impl Sink for FileSink {
    fn create(&mut self, size: u64, cluster: u64, format: u32) -> Result<(), String> {
        if ploop_io::fsys::exists(&self.image) {
            return Err(format!("{}: already exists", self.image.display()));
        }
        let format = match self.format.unwrap_or(format) {
            FORMAT_RAW => DiskFormat::Raw,
            _ => DiskFormat::Expanded,
        };
        let dd = crate::backup::new_image(&self.image, size, cluster, format)
            .map_err(|e| e.to_string())?;
        self.made = Some(dd.clone());
        self.disk = Some(crate::backup::open_writable(&dd).map_err(|e| e.to_string())?);
        Ok(())
    }

    fn write(&mut self, data: &[u8], pos: u64) -> Result<(), String> {
        self.disk()?
            .chain
            .write_at(data, pos)
            .map_err(|e| e.to_string())
    }

    fn zero(&mut self, pos: u64, len: u64) -> Result<(), String> {
        self.disk()?
            .chain
            .discard(pos, len)
            .map_err(|e| e.to_string())
    }

    fn finish(&mut self) -> Result<(), String> {
        let disk = self.disk.take().ok_or("no image")?;
        disk.close().map_err(|e| e.to_string())?;
        self.made = None;
        Ok(())
    }

    fn abandon(&mut self) {
        drop(self.disk.take());
        if let Some(dd) = self.made.take() {
            let _ = std::fs::remove_file(&self.image);
            let _ = std::fs::remove_file(&dd);
        }
    }
}
