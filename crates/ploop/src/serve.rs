//! `ploop serve`: an NBD server for a disk (DiskDescriptor.xml) or one
//! image file, in the foreground until a signal stops it.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use ploop_daemon::registry;
use ploop_daemon::session::open_disk;
use ploop_format::descriptor::{guid_string, ImageType, TOP_GUID};
use ploop_image::served::ServedDisk;
use ploop_nbd::{Export, Listen, Listener, ServeOptions};
use tracing::info;
use uuid::Uuid;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

pub struct ServeRequest {
    pub target: PathBuf,
    pub socket: Option<PathBuf>,
    pub tcp: Option<String>,
    pub read_only: bool,
    pub name: String,
    pub uuid: Option<Uuid>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_any_client: bool,
    pub insecure: bool,
    pub threads: usize,
    pub max_connections: usize,
    pub max_per_peer: usize,
    pub idle_timeout: Option<std::time::Duration>,
    /// Plain reads and in-place writes through io_uring.
    pub uring: bool,
    /// Format of an image file given on its own (None: look at it).
    pub image_format: Option<ImageType>,
}

fn is_descriptor(path: &Path) -> bool {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("xml"))
    {
        return true;
    }
    // Looked at without following a link a user could have made, and
    // without blocking on a FIFO.
    let head = ploop_io::FileIo::read_head(path, 64).unwrap_or_default();
    head.iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'<')
}

/// Where to listen. Whoever can connect reads and writes the disk, so:
/// a unix socket only root can use by default; plain TCP, even on
/// loopback (any local user), only with --insecure; TLS only with client
/// certificates, unless --tls-any-client says otherwise.
fn listen_address(r: &ServeRequest, target: &Path) -> Res<Listen> {
    if let Some(path) = &r.socket {
        return Ok(Listen::Unix(path.clone()));
    }
    let Some(text) = &r.tcp else {
        let guid = guid_string(&r.uuid.unwrap_or(TOP_GUID));
        let id = registry::id_for(target, &guid, r.read_only);
        std::fs::create_dir_all(registry::run_dir())?;
        return Ok(Listen::Unix(
            registry::run_dir().join(format!("nbd-{id}.sock")),
        ));
    };
    let addr: SocketAddr = text
        .parse()
        .map_err(|_| format!("--tcp {text}: expected ADDRESS:PORT, like 127.0.0.1:10809"))?;
    let tls = r.tls_cert.is_some();
    if !tls && !r.insecure {
        return Err(format!(
            "refusing to serve {addr} without TLS: anyone who reaches it{} could read and \
             write the disk. Give --tls-cert and --tls-key, serve on a unix socket (the \
             default), or --insecure if every peer is trusted",
            if addr.ip().is_loopback() {
                " (any local user)"
            } else {
                ""
            }
        )
        .into());
    }
    if tls && r.tls_ca.is_none() && !r.tls_any_client {
        // TLS alone authenticates the server, not the client: on loopback
        // too, any local user could connect.
        return Err(format!(
            "refusing to serve {addr} to any TLS client: give --tls-ca so that clients must \
             present a certificate it signed, or --tls-any-client"
        )
        .into());
    }
    Ok(Listen::Tcp(addr))
}

pub fn serve(r: ServeRequest) -> Res<ExitCode> {
    // A kernel NBD client on this host (nbd-client) may write a mounted
    // filesystem back through us under memory pressure. Needs
    // CAP_SYS_RESOURCE; a user's server goes on without it.
    if let Err(e) = ploop_daemon::kernel::become_io_flusher() {
        tracing::debug!("not marked as an I/O flusher: {e}");
    }

    let tls = match (&r.tls_cert, &r.tls_key) {
        (Some(cert), Some(key)) => Some(
            ploop_nbd::tls::server_config(cert, key, r.tls_ca.as_deref())
                .map_err(|e| format!("TLS: {e}"))?,
        ),
        (None, None) if r.tls_ca.is_none() => None,
        _ => return Err("TLS needs both --tls-cert and --tls-key".into()),
    };
    if r.uuid.is_some() && !r.read_only {
        return Err("a snapshot (-u) can only be served read-only: add -r".into());
    }
    // The folder resolved, the last name kept: a descriptor that is a
    // link is refused when it is read, never followed into another folder.
    let target =
        ploop_io::resolve_folder(&r.target).map_err(|e| format!("{}: {e}", r.target.display()))?;
    let listen = listen_address(&r, &target)?;
    // OpenVZ 9's lock on the base delta, held while serving.
    let mut _openvz_lock = None;
    let disk = if is_descriptor(&target) {
        let disk = open_disk(&target, r.read_only, r.uuid)?;
        match ploop_image::disk::hold_openvz_lock(&target) {
            Ok(l) => _openvz_lock = l,
            Err(e) => {
                let _ = disk.close();
                return Err(e.into());
            }
        }
        ServedDisk::new(target.clone(), disk.guid, r.read_only, disk.chain)
    } else {
        if r.uuid.is_some() {
            return Err("-u needs a DiskDescriptor.xml, not an image file".into());
        }
        let chain = ploop_image::disk::open_image(&target, !r.read_only, r.image_format)?;
        ServedDisk::new(target.clone(), TOP_GUID, r.read_only, chain)
    };
    let disk = Arc::new(disk);
    // A writable disk's control socket: snapshots, merges, copies and
    // backups work on it while clients use it.
    let _control = if is_descriptor(&target) && !r.read_only {
        match ploop_daemon::serve_control::start(disk.clone(), &target) {
            Ok(c) => Some(c),
            Err(e) => {
                let _ = disk.current().close();
                return Err(e.into());
            }
        }
    } else {
        None
    };
    let export = Arc::new(Export {
        name: r.name.clone(),
        // Clients see the export's name only, never where the disk lives.
        description: "ploop disk".into(),
        read_only: r.read_only,
        disk: disk.clone(),
    });
    let listener = Listener::bind(&listen).map_err(|e| {
        let _ = disk.current().close();
        format!("listening on {listen:?}: {e}")
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ] {
        // A second signal while stopping exits at once (image left in use).
        signal_hook::flag::register_conditional_shutdown(sig, 1, stop.clone())?;
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let uri = listener.uri(&r.name, tls.is_some());
    info!("serving {} at {uri}", target.display());
    // The address on stdout (scripts wait for it); the rest on stderr.
    println!("{uri}");
    std::io::stdout().flush()?;
    eprintln!(
        "ploop: serving {} ({} bytes{}) at {uri}{}",
        target.display(),
        export.size(),
        if r.read_only { ", read-only" } else { "" },
        if tls.is_some() { " with TLS" } else { "" }
    );
    let served = ploop_nbd::serve(
        &listener,
        ServeOptions {
            export,
            tls,
            threads: r.threads,
            max_connections: r.max_connections,
            max_per_peer: r.max_per_peer.max(1),
            idle_timeout: r.idle_timeout,
            uring: r.uring,
        },
        stop,
    );
    drop(listener);
    // No snapshot or merge under way while the disk closes.
    let _quiet = _control.as_ref().map(|c| c.quiesce());
    let closed = match served {
        Ok(true) => disk.current().close(),
        // Requests may still be running: flush what is done, and leave the
        // image marked in use so that the next open checks it.
        _ => disk.current().flush(),
    };
    if matches!(served, Ok(false)) {
        eprintln!("ploop: some clients did not let go; the image is left marked in use");
    }
    served?;
    closed?;
    eprintln!("ploop: stopped serving {}", target.display());
    Ok(ExitCode::SUCCESS)
}
