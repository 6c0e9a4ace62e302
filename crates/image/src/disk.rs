//! A disk as a DiskDescriptor.xml names it: open its chain, lock it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ploop_format::descriptor::{resolve_image_path, Descriptor, ImageType, TOP_GUID};
use ploop_format::ploop::{OpenFlags, PloopDelta};
use ploop_format::raw::RawDelta;
use ploop_format::{Error, Result, SECTOR};
use ploop_io::{LockMode, OpenMode, SharedIo};
use uuid::Uuid;

use crate::chain::{Chain, Delta};

/// How to open a disk.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    pub writable: bool,
    /// O_DIRECT on every delta (falls back to buffered where refused).
    pub direct: bool,
    /// Open the chain ending at this snapshot instead of the top.
    pub guid: Option<Uuid>,
    /// Open a top whose in-use flag is set (check has been skipped).
    pub allow_dirty: bool,
    /// Allow writing a snapshot that has children. Only merge does this:
    /// it writes the child's own data into the parent, which the child
    /// masks, so no view of the disk changes.
    pub merge_target: bool,
}

/// Open one file as an I/O backend, mapping lock conflicts to a clear error.
pub fn open_file(path: &Path, mode: OpenMode) -> Result<SharedIo> {
    let name = path.display().to_string();
    match ploop_io::fsys::open(path, mode) {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(Error::Locked { path: name }),
        Err(e) => Err(Error::io(name, "opening", 0, e)),
    }
}

fn delta_mode(opts: &OpenOptions) -> OpenMode {
    OpenMode {
        write: opts.writable,
        direct: opts.direct,
        create_new: false,
        lock: if opts.writable {
            LockMode::Exclusive
        } else {
            LockMode::Shared
        },
    }
}

/// Open one delta file of a disk, in either format: a regular file,
/// never reached through a symbolic link (see `ploop_io::Folder`).
pub fn open_delta(path: &Path, kind: ImageType, opts: &OpenOptions) -> Result<Delta> {
    let io = open_file(path, delta_mode(opts))?;
    delta_on(io, path, kind, opts)
}

/// A delta of either format on an open file.
fn delta_on(io: SharedIo, path: &Path, kind: ImageType, opts: &OpenOptions) -> Result<Delta> {
    let mut first = [0u8; 16];
    io.read_at(&mut first, 0)
        .map_err(|e| Error::io(path.display().to_string(), "reading header", 0, e))?;
    if kind == ImageType::Plain && ploop_format::ploop::has_signature(&first) {
        return Err(Error::corrupt(
            path.display().to_string(),
            "the descriptor says this is a raw (Plain) image, but the file is a ploop image",
        ));
    }
    Ok(match kind {
        ImageType::Plain => Delta::Raw(RawDelta::open(io, opts.writable)?),
        ImageType::Compressed => Delta::Ploop(PloopDelta::open(
            io,
            OpenFlags {
                writable: opts.writable,
                allow_dirty: opts.allow_dirty,
            },
        )?),
    })
}

/// The snapshot (descriptor, GUID) that `path` holds, if the
/// DiskDescriptor.xml beside it names the file as a delta that later
/// deltas build on. A descriptor that cannot be read says nothing.
pub fn known_parent(path: &Path) -> Option<(PathBuf, Uuid)> {
    use std::os::unix::fs::MetadataExt;
    let dd = dd_dir(path).join(ploop_format::descriptor::FILE_NAME);
    let d = Descriptor::load(&dd).ok()?;
    let me = std::fs::metadata(path).ok()?;
    d.images.iter().find_map(|entry| {
        let other = std::fs::metadata(image_path(&dd, &entry.file).ok()?).ok()?;
        let same = other.dev() == me.dev() && other.ino() == me.ino();
        (same && !d.children(entry.guid).is_empty()).then(|| (dd.clone(), entry.guid))
    })
}

/// Open one image file on its own, as a chain of one delta: in the format
/// given, or else a ploop delta if it has the signature, raw if not. The
/// path is the administrator's own (`ploop serve IMAGE`): it may be a
/// link or a block device. A delta that a descriptor beside it shows
/// snapshots built on opens read-only only: writing it would change what
/// they show.
pub fn open_image(path: &Path, writable: bool, kind: Option<ImageType>) -> Result<Chain> {
    if writable {
        if let Some((dd, guid)) = known_parent(path) {
            return Err(Error::Invalid(format!(
                "{}: this file is snapshot {} of {}, and later deltas build on it: writing it \
                 would change what they show. Open it read-only (-r), or use the descriptor",
                path.display(),
                ploop_format::descriptor::guid_string(&guid),
                dd.display()
            )));
        }
    }
    let opts = OpenOptions {
        writable,
        direct: true,
        ..OpenOptions::default()
    };
    let explicit = |mode: OpenMode| -> Result<SharedIo> {
        match ploop_io::FileIo::open_named(path, mode) {
            Ok(f) => Ok(std::sync::Arc::new(f)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(Error::Locked {
                path: path.display().to_string(),
            }),
            Err(e) => Err(Error::io(path.display().to_string(), "opening", 0, e)),
        }
    };
    let probe = explicit(OpenMode {
        write: false,
        direct: false,
        create_new: false,
        lock: LockMode::None,
    })?;
    let mut first = [0u8; 16];
    probe
        .read_at(&mut first, 0)
        .map_err(|e| Error::io(path.display().to_string(), "reading header", 0, e))?;
    drop(probe);
    let kind = if let Some(k) = kind {
        k
    } else if ploop_format::ploop::has_signature(&first) {
        ImageType::Compressed
    } else {
        ImageType::Plain
    };
    let delta = delta_on(explicit(delta_mode(&opts))?, path, kind, &opts)?;
    let (cluster, size) = match &delta {
        Delta::Ploop(p) => (p.cluster_size(), p.virtual_size()),
        Delta::Raw(r) => (RAW_IMAGE_CLUSTER, r.virtual_size()),
    };
    Chain::new(vec![Arc::new(delta)], cluster, size)
}

/// The unit a raw image on its own is split into (any size works).
const RAW_IMAGE_CLUSTER: u64 = 1 << 20;

/// An open disk: its descriptor and its chain.
pub struct Disk {
    pub dd_path: PathBuf,
    pub descriptor: Descriptor,
    pub chain: Chain,
    /// GUID of the delta the chain ends at.
    pub guid: Uuid,
}

/// The folder a descriptor lives in ("." for a bare file name).
pub fn dd_dir(dd_path: &Path) -> PathBuf {
    match dd_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Absolute path of an image file named in a descriptor.
pub fn image_path(dd_path: &Path, file: &str) -> Result<PathBuf> {
    resolve_image_path(&dd_dir(dd_path), file, &dd_path.display().to_string())
}

impl Disk {
    pub fn open(dd_path: &Path, opts: OpenOptions) -> Result<Self> {
        let descriptor = Descriptor::load(dd_path)?;
        Self::open_with(dd_path, descriptor, opts)
    }

    pub fn open_with(dd_path: &Path, descriptor: Descriptor, opts: OpenOptions) -> Result<Self> {
        let name = dd_path.display().to_string();
        let guid = opts.guid.unwrap_or(descriptor.top_guid);
        if descriptor.shot(guid).is_none() {
            return Err(Error::Descriptor {
                path: name,
                what: format!(
                    "no snapshot {}",
                    ploop_format::descriptor::guid_string(&guid)
                ),
            });
        }
        // A merge under way marks its target temporary, and a merge target
        // has exactly one child; one marked with more (a snapshot-delete
        // that had to keep it) holds what it always held.
        let temporary = descriptor.shot(guid).is_some_and(|s| s.temporary)
            && descriptor.children(guid).len() == 1;
        if temporary && !opts.merge_target {
            let child = descriptor.children(guid);
            let how = match child.as_slice() {
                [only] => format!(
                    "`ploop snapshot-merge -u {}` or `ploop check` finishes it",
                    ploop_format::descriptor::guid_string(only)
                ),
                _ => "`ploop snapshot-delete` removes it".into(),
            };
            return Err(Error::Descriptor {
                path: name,
                what: format!(
                    "snapshot {} is being merged away (a merge into it started and did not finish): \
                     what it holds on its own is not defined until then ({how})",
                    ploop_format::descriptor::guid_string(&guid)
                ),
            });
        }
        if opts.writable && !opts.merge_target && !descriptor.children(guid).is_empty() {
            return Err(Error::Invalid(format!(
                "snapshot {} has children: it can only be opened read-only",
                ploop_format::descriptor::guid_string(&guid)
            )));
        }
        let entries = descriptor.chain(guid, &name)?;
        let mut layers = Vec::with_capacity(entries.len());
        let last = entries.len() - 1;
        for (i, entry) in entries.iter().enumerate() {
            let path = image_path(dd_path, &entry.file)?;
            if !ploop_io::fsys::exists(&path) {
                return Err(Error::Descriptor {
                    path: name.clone(),
                    what: format!("image file {} is missing", path.display()),
                });
            }
            let layer_opts = OpenOptions {
                writable: opts.writable && i == last,
                ..opts
            };
            layers.push(Arc::new(open_delta(&path, entry.kind, &layer_opts)?));
        }
        let cluster = u64::from(descriptor.blocksize) * SECTOR;
        let size = descriptor.size_sectors * SECTOR;
        // The top must cover the disk (it takes every write, and a resize
        // grows it before the descriptor); a snapshot may be smaller
        // (OpenVZ grows only the top): past its end it holds nothing, and
        // reads fall through to zeros.
        let is_top = guid == descriptor.top_guid;
        if let Some(l) = layers.last().filter(|_| opts.writable || is_top) {
            if let Delta::Ploop(p) = &**l {
                if p.virtual_size() < size {
                    return Err(Error::corrupt(
                        p.path(),
                        format!(
                            "delta is {} bytes but the descriptor says the disk is {size}",
                            p.virtual_size()
                        ),
                    ));
                }
            }
        }
        let chain = Chain::new(layers, cluster, size)?;
        Ok(Self {
            dd_path: dd_path.to_path_buf(),
            descriptor,
            chain,
            guid,
        })
    }

    pub fn is_top(&self) -> bool {
        self.guid == TOP_GUID
    }

    pub fn close(self) -> Result<()> {
        self.chain.close()
    }
}

/// Refuse a disk whose data is encrypted (OpenVZ's `ploop init -k`: LUKS
/// inside the virtual disk, named by `<Encryption><KeyId>`): this tool has
/// no encryption, and serving ciphertext as a disk would let a mount or a
/// client write over it.
pub fn refuse_encrypted(dd_path: &Path, descriptor: &Descriptor) -> Result<()> {
    match &descriptor.encryption_key_id {
        None => Ok(()),
        Some(key) => Err(Error::Descriptor {
            path: dd_path.display().to_string(),
            what: format!(
                "the disk is encrypted (key id {key:?}); encrypted disks are not supported \
                 here: open it with OpenVZ's ploop"
            ),
        }),
    }
}

/// Serialises changes to one descriptor between processes: an exclusive
/// lock on `DiskDescriptor.xml.lck`, as OpenVZ 7's libploop takes it, and
/// OpenVZ 9's lock on the base delta, both held until dropped.
pub struct DescriptorLock {
    _file: Option<std::fs::File>,
    _openvz: Option<ploop_io::locks::OfdReadLock>,
}

impl DescriptorLock {
    pub fn acquire(dd_path: &Path) -> Result<Self> {
        if ploop_io::fsys::is_replaced() {
            // A test's in-memory filesystem: one thread, nothing to lock.
            return Ok(Self {
                _file: None,
                _openvz: None,
            });
        }
        let mut lck = dd_path.as_os_str().to_owned();
        lck.push(".lck");
        let lck = PathBuf::from(lck);
        let name = lck.display().to_string();
        // A regular file, never reached through a link: the folder may be
        // a container owner's, and the lock is created by root.
        let opened = ploop_io::Folder::of(&lck).and_then(|(dir, file)| dir.open_lock_file(file));
        let file = match opened {
            Ok(f) => f,
            // On a read-only filesystem nothing can change the descriptor:
            // there is no one to serialise with.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::ROFS.raw_os_error()) => {
                return Ok(Self {
                    _file: None,
                    _openvz: None,
                });
            }
            Err(e) => return Err(Error::io(&name, "opening lock file", 0, e)),
        };
        if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            // OpenVZ 7's tools take this very lock for each operation.
            let by = match ploop_io::locks::flock_holders(&file).first() {
                Some(pid) => format!(" by process {pid}"),
                None => String::new(),
            };
            return Err(Error::Descriptor {
                path: dd_path.display().to_string(),
                what: format!("another ploop command is changing this disk ({name} is locked{by})"),
            });
        }
        let openvz = hold_openvz_lock(dd_path)?;
        Ok(Self {
            _file: Some(file),
            _openvz: openvz,
        })
    }
}

/// The base delta of a disk (where OpenVZ 9 takes its locks), opened
/// read-only; None where the descriptor cannot be read (its reader says
/// why) or names no base.
fn open_base(dd_path: &Path) -> Result<Option<(PathBuf, std::fs::File)>> {
    let Ok(d) = Descriptor::load(dd_path) else {
        return Ok(None);
    };
    let Some(base) = d.base() else {
        return Ok(None);
    };
    let Ok(path) = image_path(dd_path, &base.file) else {
        return Ok(None);
    };
    // A base that cannot be opened (missing, mid-conversion) has no lock
    // to probe: the command that needs it says what is wrong with it.
    match ploop_io::Folder::of(&path).and_then(|(dir, file)| dir.open_read(file)) {
        Ok(file) => Ok(Some((path, file))),
        Err(e) => {
            tracing::debug!("{}: not probed for OpenVZ's lock: {e}", path.display());
            Ok(None)
        }
    }
}

/// Whether process `pid` runs this very program (a daemon or command of
/// ours: they exclude each other with their own file locks).
fn runs_this_program(pid: u32) -> bool {
    let exe = |p: &str| {
        std::fs::read_link(format!("/proc/{p}/exe")).ok().map(|l| {
            let s = l.to_string_lossy().into_owned();
            s.strip_suffix(" (deleted)")
                .map(str::to_string)
                .unwrap_or(s)
        })
    };
    pid > 0 && exe(&pid.to_string()).is_some_and(|e| Some(e) == exe("self"))
}

/// Take OpenVZ 9's lock on a disk's base delta (a read lock on bytes
/// 200..205, as its lib/lock.c takes for every operation), then refuse
/// the disk if anyone else holds a conflicting one: an OpenVZ 9 command
/// or a disk it set up (a POSIX lock, with its pid), or a program
/// locking the image as QEMU does (an open file description lock, no
/// pid). Taken first and probed after, so two tools starting at once
/// cannot both miss each other. Our own processes hold it too; theirs is
/// told apart by the image lock (`flock`) one of them holds on the base.
/// None where the disk has no base to lock.
pub fn hold_openvz_lock(dd_path: &Path) -> Result<Option<ploop_io::locks::OfdReadLock>> {
    if ploop_io::fsys::is_replaced() {
        return Ok(None);
    }
    let Some((base, file)) = open_base(dd_path)? else {
        return Ok(None);
    };
    hold_openvz_lock_on(&dd_path.display().to_string(), &base, file).map(Some)
}

/// [`hold_openvz_lock`] on one image file, opened for reading; `what`
/// names the disk in errors.
pub fn hold_openvz_lock_on(
    what: &str,
    base: &Path,
    file: std::fs::File,
) -> Result<ploop_io::locks::OfdReadLock> {
    let name = base.display().to_string();
    let lock = ploop_io::locks::OfdReadLock::take(file)
        .map_err(|e| Error::io(&name, "taking OpenVZ's lock", 200, e))?;
    let holder = lock
        .others()
        .map_err(|e| Error::io(&name, "probing OpenVZ's lock", 200, e))?;
    let ours = |pid: i32| match u32::try_from(pid) {
        Ok(pid) => runs_this_program(pid),
        // An open file description lock: ours if a process of ours holds
        // the image itself.
        Err(_) => ploop_io::locks::flock_holders(lock.file())
            .into_iter()
            .any(runs_this_program),
    };
    match holder {
        Some(pid) if !ours(pid) => Err(Error::Descriptor {
            path: what.to_string(),
            what: format!(
                "the disk is in use by another program: {} holds OpenVZ's lock on {name} \
                 (an OpenVZ ploop command or a disk it serves, or an image locked as QEMU locks it)",
                if pid > 0 {
                    format!("process {pid}")
                } else {
                    "an open file description (no process known)".to_string()
                }
            ),
        }),
        _ => Ok(lock),
    }
}
