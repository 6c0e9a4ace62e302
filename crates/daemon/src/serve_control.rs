//! The control socket of a disk `ploop serve` exports over NBD: it is
//! registered as mounted views are (without a device), so `snapshot`,
//! `snapshot-merge`, `snapshot-delete` and `backup` find it and work on
//! the disk while clients use it, as they do on a mounted one. (`copy`
//! needs a mounted disk: it reads the FUSE file and freezes the
//! filesystem.)

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use ploop_format::descriptor::guid_string;
use ploop_image::served::ServedDisk;
use serde_json::json;
use tracing::warn;

use crate::control::{self, Request, Response};
use crate::registry::{self, MountRecord, ViewLock};
use crate::session::{disk_request, log_path, snapshot_request};
use crate::{Error, Result};

/// Registered while alive: the record, its view lock and its socket go
/// when it is dropped.
pub struct ServeControl {
    record: MountRecord,
    _lock: ViewLock,
    /// Held while a request runs.
    busy: Arc<Mutex<()>>,
}

impl ServeControl {
    /// Wait for the request under way, if any, and hold off the next:
    /// the disk can then be closed under no online operation.
    pub fn quiesce(&self) -> MutexGuard<'_, ()> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for ServeControl {
    fn drop(&mut self) {
        registry::remove(&self.record);
        let _ = std::fs::remove_file(&self.record.socket);
    }
}

/// Register the writable disk `served` (its descriptor `dd`, canonical)
/// and answer its control socket on a thread of its own. Snapshots are
/// taken without a freeze: the filesystem is the NBD client's, which must
/// have flushed what it wants in the snapshot.
pub fn start(served: Arc<ServedDisk>, dd: &Path) -> Result<ServeControl> {
    let guid = guid_string(&served.guid);
    let id = registry::id_for(dd, &guid, served.read_only);
    let lock = registry::lock_view(&id).map_err(|_| {
        Error::Refused(format!(
            "{} is served or mounted by another process",
            dd.display()
        ))
    })?;
    let dir = registry::run_dir().join(&id);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(dir.display(), e))?;
    let socket = dir.join("ctl.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(|e| Error::io(socket.display(), e))?;
    let record = MountRecord {
        id: id.clone(),
        descriptor: dd.to_path_buf(),
        guid,
        read_only: served.read_only,
        pid: std::process::id(),
        fuse_file: Default::default(),
        socket,
        log: log_path(&id),
        device: None,
        partition: None,
        mountpoint: None,
        limits: Default::default(),
        cgroup: None,
    };
    record
        .save()
        .map_err(|e| Error::io(record.dir().display(), e))?;
    let status = record.clone();
    let busy = Arc::new(Mutex::new(()));
    let held = busy.clone();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            control::serve(&listener, |req, caller| {
                let _busy = held.lock().unwrap_or_else(|e| e.into_inner());
                let progress = &|done, total| caller.progress(done, total);
                let result = match &req {
                    Request::Status => Ok(Some(json!({
                        "record": &status,
                        "deltas": served.current().layers().len(),
                    }))),
                    Request::Snapshot { uuid, cbt } => {
                        snapshot_request(&served, uuid.as_deref(), cbt.as_deref(), || Ok(()))
                    }
                    Request::Stop => Err("`ploop serve` stops on a signal".to_string()),
                    other => disk_request(&served, other, progress).unwrap_or_else(|| {
                        Err("not available on a disk served over NBD".to_string())
                    }),
                };
                match result {
                    Ok(v) => (Response::ok(v), false),
                    Err(e) => {
                        warn!("control request failed: {e}");
                        (Response::err(e), false)
                    }
                }
            })
        })
        .map_err(|e| Error::io("starting the control thread", e))?;
    Ok(ServeControl {
        record,
        _lock: lock,
        busy,
    })
}
