//! Commands, named and flagged as in OpenVZ's `ploop`.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ploop_daemon::control::Request;
use ploop_daemon::registry::LimitsRecord;
use ploop_format::descriptor::{guid_string, parse_guid, Descriptor, ImageType, TOP_GUID};
use ploop_format::ploop::{has_signature, Version, MIN_CLUSTER_SECTORS};
use ploop_format::SECTOR;
use ploop_image::disk::image_path;
use ploop_image::ops::{self, DiskFormat, InitOptions};
use ploop_image::{Disk, OpenOptions};
use serde_json::json;
use uuid::Uuid;

use crate::size::parse_size;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(
    name = "ploop",
    version,
    about = "Container disks in one image file (OpenVZ ploop compatible)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create an image and the DiskDescriptor.xml beside it.
    Init(InitArgs),
    /// Show a disk's size, format and deltas.
    Info(InfoArgs),
    /// Check a disk or one delta file and repair it (unless -r).
    Check(CheckArgs),
    /// OpenVZ's old name of `check`.
    #[command(hide = true)]
    Fsck(CheckArgs),
    /// Take a snapshot: freeze the top delta and start a new one.
    Snapshot {
        /// GUID for the snapshot (default: random).
        #[arg(short = 'u', long = "uuid")]
        uuid: Option<String>,
        /// Start a changed-block bitmap of this GUID in the new top delta
        /// (OpenVZ's -b): it records every cluster written after the
        /// snapshot, for an incremental backup. Without it, a bitmap the
        /// top kept goes on in the new top (the snapshot keeps a copy)
        #[arg(short = 'b', value_name = "CBT_UUID")]
        cbt: Option<String>,
        descriptor: PathBuf,
    },
    /// Grow or shrink a disk: its image, partition table and filesystem
    /// (ext4 shrinks, offline; XFS only grows). The disk must be unmounted.
    Resize {
        /// New size: a number of 512-byte sectors, or with a K/M/G/T suffix.
        #[arg(short = 's', long = "size")]
        size: String,
        descriptor: PathBuf,
    },
    /// Give free space back: discard the filesystem's free blocks, move
    /// the top delta's clusters down into the holes and cut the file
    /// (offline; on a mounted disk only the discard).
    Compact {
        /// Print the figures and what would be done; change nothing.
        #[arg(short = 'n', long = "dry-run")]
        dry_run: bool,
        /// Compact only when (file - data) / disk is at least this many
        /// percent (OpenVZ's rule).
        #[arg(long, default_value_t = 10.0)]
        threshold: f64,
        descriptor: PathBuf,
    },
    /// OpenVZ's ploop-balloon: `discard` gives free space back (what
    /// `compact` does, with OpenVZ's options).
    #[command(subcommand)]
    Balloon(BalloonCmd),
    /// Swap a read-only delta (a snapshot) for an identical copy, on a
    /// mounted disk too: the copy is compared cluster by cluster first.
    Replace(ReplaceArgs),
    /// Take a temporary snapshot and mount it read-only (e.g. for a
    /// backup); it is merged away once its mount is gone, at the next
    /// mount, snapshot or snapshot-delete of the disk.
    Tsnapshot(TsnapshotArgs),
    /// List snapshots.
    #[command(name = "snapshot-list")]
    SnapshotList(ListArgs),
    /// Delete a snapshot (merging its child into it, if it has one).
    #[command(name = "snapshot-delete")]
    SnapshotDelete {
        #[arg(short = 'u', long = "uuid")]
        uuid: String,
        descriptor: PathBuf,
    },
    /// Merge a snapshot (default: the top delta) into its parent.
    #[command(name = "snapshot-merge")]
    SnapshotMerge {
        #[arg(short = 'u', long = "uuid", conflicts_with = "all")]
        uuid: Option<String>,
        /// Merge every snapshot, down to one image.
        #[arg(short = 'A', long = "all")]
        all: bool,
        /// Write the merged image to this new file (beside the descriptor;
        /// it must not exist) instead of the parent's; offline only.
        #[arg(short = 'n', long = "new-delta", value_name = "DELTA")]
        new_delta: Option<PathBuf>,
        descriptor: PathBuf,
    },
    /// Drop the current top delta and continue from a snapshot.
    #[command(name = "snapshot-switch")]
    SnapshotSwitch {
        #[arg(short = 'u', long = "uuid")]
        uuid: String,
        descriptor: PathBuf,
    },
    /// Convert the image format (-f) or the ploop version (-v).
    Convert {
        #[arg(
            short = 'f',
            long = "format",
            conflicts_with = "version",
            required_unless_present = "version"
        )]
        format: Option<String>,
        #[arg(short = 'v', long = "version")]
        version: Option<u32>,
        descriptor: PathBuf,
    },
    /// Write a DiskDescriptor.xml for an existing base image (e.g. one
    /// made by qemu-img), in DIR.
    #[command(name = "restore-descriptor")]
    RestoreDescriptor {
        /// Image format: ploop1 or raw (default: detected).
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Cluster size in sectors for a raw image (default 2048).
        #[arg(short = 'b', long = "blocksize")]
        blocksize: Option<String>,
        dir: PathBuf,
        image: PathBuf,
    },
    /// Serve a disk as a block device (FUSE + loop) and mount its filesystem.
    Mount(MountArgs),
    /// Unmount, detach and stop serving a disk.
    Umount(UmountArgs),
    /// Serve a disk or an image file over NBD (foreground, until a signal).
    Serve(ServeArgs),
    /// Change a mounted disk's I/O limits while it is in use (0 removes
    /// one; what is not given stays).
    SetLimits {
        #[command(flatten)]
        limits: LimitArgs,
        descriptor: PathBuf,
    },
    /// Show a mounted disk's I/O counters and limits (as OpenVZ's `ploop
    /// stat`).
    Stat {
        #[arg(long)]
        json: bool,
        descriptor: PathBuf,
    },
    /// Copy a mounted disk while it is in use (OpenVZ's `ploop copy`):
    /// `-s DEVICE` sends it in passes, the last one with its filesystem
    /// frozen, to standard output, `-o OFD`, `--to HOST:PORT` or, with
    /// `-d FILE`, into a new image here; `-d FILE` alone receives a
    /// stream (standard input, `-i IFD`, `--listen ADDR:PORT`) into one
    Copy(crate::copy::CopyArgs),
    /// Back a disk up, mounted or not, into a folder that is itself a
    /// disk: a full backup, then `--incremental` ones of only the clusters
    /// changed since (by the changed-block bitmap each backup starts);
    /// `--restore` folds the folder into one image
    Backup(crate::backup::BackupArgs),
    /// Show mounted disks.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Read bytes of the virtual disk to standard output (no device needed).
    Read {
        /// Byte offset (K/M/G/T suffixes allowed).
        #[arg(long, default_value = "0")]
        offset: String,
        /// Bytes to read (default: to the end of the disk).
        #[arg(long)]
        length: Option<String>,
        /// Read a snapshot instead of the top.
        #[arg(short = 'u', long = "uuid")]
        uuid: Option<String>,
        descriptor: PathBuf,
    },
    /// Write a file (or - for standard input) into the virtual disk.
    Write {
        /// Byte offset (K/M/G/T suffixes allowed).
        #[arg(long, default_value = "0")]
        offset: String,
        descriptor: PathBuf,
        input: PathBuf,
    },
}

#[derive(Args)]
struct InitArgs {
    /// Disk size: a number of 512-byte sectors, or with a K/M/G/T suffix.
    #[arg(short = 's', long = "size")]
    size: String,
    /// raw, ploop1 (= expanded) or preallocated.
    #[arg(short = 'f', long = "format", default_value = "ploop1")]
    format: String,
    /// ploop format version.
    #[arg(short = 'v', long = "version", default_value_t = 2)]
    version: u32,
    /// Cluster size in 512-byte sectors (or with a suffix); default 1M.
    #[arg(short = 'b', long = "blocksize", default_value = "2048")]
    blocksize: String,
    /// Filesystem to create: ext4 (default), ext3, xfs or none.
    #[arg(short = 't', long = "type", default_value = "ext4")]
    fstype: String,
    /// Filesystem block size in bytes.
    #[arg(short = 'B', long = "fs-blocksize")]
    fs_block: Option<String>,
    /// Filesystem label.
    #[arg(short = 'L', long = "label")]
    label: Option<String>,
    /// Initialise the filesystem's inode tables and journal now rather
    /// than lazily after the first mount (ext3/ext4).
    #[arg(short = 'n', long = "nolazy")]
    nolazy: bool,
    /// No partition table: the filesystem on the whole disk. By default
    /// a disk with a filesystem gets OpenVZ's layout: a GPT with
    /// partition 1 from one cluster in to one cluster before the end (a
    /// disk made with -t none has no table, as in OpenVZ).
    #[arg(short = 'P', long = "no-partition")]
    no_partition: bool,
    /// Encryption key id (OpenVZ's -k): not supported.
    #[arg(short = 'k', hide = true)]
    keyid: Option<String>,
    /// Image format (OpenVZ's -T): only ploop here.
    #[arg(short = 'T', hide = true)]
    image_format: Option<String>,
    image: PathBuf,
}

#[derive(Args)]
#[group(skip)]
#[command(group(clap::ArgGroup::new("which").required(true).multiple(false).args(["uuid", "level", "old"])))]
struct ReplaceArgs {
    /// The snapshot whose delta is replaced.
    #[arg(short = 'u', long = "uuid")]
    uuid: Option<String>,
    /// Its level in the top's chain (0: the base).
    #[arg(short = 'l', long = "level")]
    level: Option<usize>,
    /// Its current file.
    #[arg(short = 'o', long = "old")]
    old: Option<PathBuf>,
    /// The copy, beside the descriptor.
    #[arg(short = 'i', long = "image")]
    image: PathBuf,
    /// Rename the copy over the old file instead of naming it in the
    /// descriptor.
    #[arg(short = 'k', long = "keep-name")]
    keep_name: bool,
    descriptor: PathBuf,
}

#[derive(Args)]
struct TsnapshotArgs {
    /// GUID for the snapshot.
    #[arg(short = 'u', long = "uuid")]
    uuid: String,
    /// The name of whoever holds the snapshot (OpenVZ's component name;
    /// recorded in the log only).
    #[arg(short = 'c', long = "component")]
    component: String,
    /// Mount the snapshot's filesystem here (without: only the device).
    #[arg(short = 'm', long = "mount-point")]
    mountpoint: Option<PathBuf>,
    descriptor: PathBuf,
}

#[derive(Subcommand)]
enum BalloonCmd {
    /// Discard the filesystem's free blocks and give the space back:
    /// clusters move down and the image file is cut (offline; on a
    /// mounted disk, only the discard).
    Discard(DiscardArgs),
}

#[derive(Args)]
struct DiscardArgs {
    /// Print the balloon, data, disk and image sizes only.
    #[arg(long)]
    stat: bool,
    /// Give back at most about this much (K/M/G/T suffixes).
    #[arg(long = "to-free", value_name = "SIZE")]
    to_free: Option<String>,
    /// Discard only free ranges at least this long.
    #[arg(long = "min-block", value_name = "SIZE")]
    min_block: Option<String>,
    /// Defragment the image afterwards.
    #[arg(long)]
    defrag: bool,
    /// Only defragment.
    #[arg(long = "defrag-only", conflicts_with = "defrag")]
    defrag_only: bool,
    /// Mount the disk if it is not (done anyway, privately): kept for
    /// OpenVZ.
    #[arg(long)]
    automount: bool,
    /// The device or mount point forms (OpenVZ's -d, -m): not built.
    #[arg(short = 'd', hide = true)]
    device: Option<String>,
    #[arg(short = 'm', hide = true)]
    mountpoint: Option<String>,
    descriptor: PathBuf,
}

/// Defragment a disk's top delta (online through its daemon when it is
/// mounted) or one delta file; the clusters moved.
fn defrag(target: &Path, is_disk: bool) -> Res<u64> {
    if let Some(rec) = is_disk.then(|| crate::mount::served_rw(target)).flatten() {
        let req = Request::Compact {
            limit: None,
            defrag: true,
        };
        return Ok(crate::resize::relocate_online(&rec, "defragmenting", req)?.moved);
    }
    Ok(with_progress("defragmenting", |p| {
        ops::defrag(target, is_disk, p, &|| false)
    })?)
}

fn balloon_discard(a: DiscardArgs) -> Res<ExitCode> {
    let _ = a.automount;
    if a.device.is_some() || a.mountpoint.is_some() {
        return Err("balloon discard -d/-m is not supported: give the DiskDescriptor.xml".into());
    }
    if a.stat {
        return crate::resize::discard_stat(&a.descriptor);
    }
    if !a.defrag_only {
        let opts = crate::resize::CompactOptions {
            dry: false,
            threshold: 0.0,
            to_free: a.to_free.as_deref().map(|s| parse_size(s, 1)).transpose()?,
            min_block: a
                .min_block
                .as_deref()
                .map(|s| parse_size(s, 1))
                .transpose()?,
        };
        crate::resize::compact(&a.descriptor, &opts)?;
    }
    if a.defrag || a.defrag_only {
        let moved = defrag(&a.descriptor, true)?;
        println!(
            "{}: defragmented ({moved} clusters moved)",
            a.descriptor.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
struct InfoArgs {
    /// The disk's layout only (size, blocksize, format, deltas), without
    /// the filesystem's figures (OpenVZ's -s).
    #[arg(short = 's', long = "spec")]
    spec: bool,
    /// The devices of a mounted disk (OpenVZ's -d).
    #[arg(short = 'd', long = "device")]
    device: bool,
    #[arg(long)]
    json: bool,
    /// DiskDescriptor.xml, its folder, or one image file.
    target: PathBuf,
}

#[derive(Args)]
struct MountArgs {
    /// Read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Mount the filesystem here (without it: only the device).
    #[arg(short = 'm', long = "mount-point")]
    mountpoint: Option<PathBuf>,
    /// Filesystem mount options.
    #[arg(short = 'o', long = "options", default_value = "")]
    options: String,
    /// Serve this snapshot (read-only, as it has children) instead of the
    /// top; `base` names the base image.
    #[arg(short = 'u', long = "uuid")]
    uuid: Option<String>,
    /// OpenVZ's options this mount does not build (component names, a
    /// given device, an image list's format, no partprobe): refused.
    #[arg(short = 'c', hide = true)]
    component: Option<String>,
    #[arg(short = 'd', hide = true)]
    device: Option<String>,
    #[arg(short = 't', hide = true)]
    fstype: Option<String>,
    #[arg(short = 'b', hide = true)]
    blocksize: Option<String>,
    #[arg(short = 'f', hide = true)]
    format: Option<String>,
    /// Check the filesystem before mounting it (e2fsck -p, or xfs_repair):
    /// errors it cannot fix stop the mount.
    #[arg(short = 'F', long = "fsck")]
    fsck: bool,
    /// Stay in the foreground and log to stderr.
    #[arg(long)]
    foreground: bool,
    /// FUSE worker threads (each has one request in flight).
    #[arg(long, default_value_t = 24)]
    threads: usize,
    /// I/O engine for plain reads and in-place writes: sync (pread/pwrite
    /// in the FUSE workers) or uring (queued to one io_uring thread, which
    /// batches submissions; not faster on the machines measured so far).
    #[arg(long, default_value = "sync", value_parser = ["uring", "sync"])]
    io: String,
    /// How the kernel hands requests to the daemon: auto (ring where the
    /// kernel offers it, dev otherwise), ring (FUSE over io_uring: per-CPU
    /// queues, Linux 6.14+ with the fuse module's enable_uring set; less
    /// CPU per I/O, faster 4 KiB I/O), or dev (/dev/fuse and worker
    /// threads).
    #[arg(long, default_value = "auto", value_parser = ["auto", "ring", "dev"])]
    fuse_queues: String,
    /// Use the kernel's NBD client (a free /dev/nbdN, connected to this
    /// daemon over socket pairs) instead of FUSE and a loop device; needs
    /// the nbd module. The FUSE options do not apply.
    #[arg(long)]
    nbd: bool,
    #[command(flatten)]
    poll: BusyPollArg,
    #[command(flatten)]
    limits: LimitArgs,
    /// Put the disk's daemon in this cgroup (a folder of the cgroup v1
    /// blkio hierarchy or of cgroup v2), so that the host's own I/O
    /// controllers apply to the disk's I/O.
    #[arg(long, value_name = "DIR")]
    cgroup: Option<PathBuf>,
    descriptor: PathBuf,
}

/// A disk's I/O limits; 0 (or leaving one out at mount) is none. Bursts
/// default to a tenth of a second's worth.
#[derive(Args, Default)]
struct LimitArgs {
    /// Requests per second (reads, writes, discards).
    #[arg(long = "iops-limit", value_name = "N")]
    iops: Option<u64>,
    /// Bytes per second read and written (K, M, G suffixes).
    #[arg(long = "bps-limit", value_name = "SIZE", value_parser = bytes_arg)]
    bps: Option<u64>,
    /// Requests that may go at once above the rate.
    #[arg(long = "iops-burst", value_name = "N")]
    iops_burst: Option<u64>,
    /// Bytes that may go at once above the rate.
    #[arg(long = "bps-burst", value_name = "SIZE", value_parser = bytes_arg)]
    bps_burst: Option<u64>,
}

fn bytes_arg(s: &str) -> Result<u64, String> {
    parse_size(s, 1)
}

impl LimitArgs {
    /// `now` with what was given applied (0: that limit removed),
    /// checked.
    fn apply(&self, now: LimitsRecord) -> Res<LimitsRecord> {
        let pick = |given: Option<u64>, old: Option<u64>| match given {
            Some(0) => None,
            Some(n) => Some(n),
            None => old,
        };
        let l = LimitsRecord {
            iops: pick(self.iops, now.iops),
            bps: pick(self.bps, now.bps),
            iops_burst: pick(self.iops_burst, now.iops_burst),
            bps_burst: pick(self.bps_burst, now.bps_burst),
        };
        // A burst left behind by a removed rate goes with it.
        let l = LimitsRecord {
            iops_burst: l
                .iops_burst
                .filter(|_| l.iops.is_some() || self.iops_burst.is_some()),
            bps_burst: l
                .bps_burst
                .filter(|_| l.bps.is_some() || self.bps_burst.is_some()),
            ..l
        };
        ploop_image::throttle::Limits::from(l).validate()?;
        Ok(l)
    }
}

/// Busy polling of the exports' ring threads.
#[derive(Args)]
struct BusyPollArg {
    /// Spin up to this many microseconds for the next completion before
    /// sleeping (0: never). A thread spins only while a quarter or more of
    /// its recent waits were that short and its last request was at most
    /// 64 KiB, so an idle export costs no CPU. At most half the CPUs spin
    /// at once.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 200)]
    busy_poll: u64,
}

#[derive(Args)]
struct ServeArgs {
    /// Listen on this unix socket (made so that only root can connect).
    /// Without --socket or --tcp: a socket in /run/ploop, named on the
    /// first line printed.
    #[arg(long, conflicts_with = "tcp")]
    socket: Option<PathBuf>,
    /// Listen on TCP (e.g. 127.0.0.1:10809). Plain text needs --insecure,
    /// even on loopback (any local user could connect); TLS needs client
    /// certificates (--tls-ca) or --tls-any-client.
    #[arg(long, value_name = "ADDR:PORT")]
    tcp: Option<String>,
    /// Read-only export.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Export name (clients may also ask for the default, "").
    #[arg(long, default_value = "")]
    name: String,
    /// Serve this snapshot (with -r) instead of the top.
    #[arg(short = 'u', long = "uuid")]
    uuid: Option<String>,
    /// PEM certificate chain: require TLS (STARTTLS) from every client.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA: clients must present a certificate it signed. Required
    /// with TLS unless --tls-any-client. (Shared secrets, TLS-PSK, are not
    /// offered: rustls has none.)
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Accept TLS clients without a client certificate (anyone who
    /// reaches the port may use the disk).
    #[arg(long, requires = "tls_cert")]
    tls_any_client: bool,
    /// Allow plain text over TCP (anyone who reaches the port may read
    /// and write the disk).
    #[arg(long)]
    insecure: bool,
    /// Worker threads doing the disk I/O, shared by all clients.
    #[arg(long, default_value_t = 16)]
    threads: usize,
    /// Most clients connected at once.
    #[arg(long, default_value_t = 64)]
    max_connections: usize,
    /// Most connections from one peer (a local user on a unix socket, an
    /// address over TCP).
    #[arg(long, default_value_t = 16)]
    max_connections_per_peer: usize,
    /// Cut off a client that has asked for nothing for this many seconds
    /// (0: never; clients such as qemu keep idle connections open).
    #[arg(long, default_value_t = 0, value_name = "SECONDS")]
    idle_timeout: u64,
    /// I/O engine for plain reads and in-place writes: uring (each
    /// connection's reader starts them on its own io_uring and replies as
    /// they complete) or sync (pread/pwrite in the workers). Other
    /// requests always run in the workers.
    #[arg(long, default_value = "uring", value_parser = ["uring", "sync"])]
    io: String,
    #[command(flatten)]
    poll: BusyPollArg,
    /// Format of an image file given on its own: raw or ploop. Without
    /// it, a file with the ploop signature is served as ploop; give -f raw
    /// for raw disks whose guest could have written that signature.
    #[arg(short = 'f', long = "format", value_parser = ["raw", "ploop"])]
    format: Option<String>,
    /// DiskDescriptor.xml, or one image file (ploop or raw).
    target: PathBuf,
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct UmountTarget {
    /// The mount point.
    #[arg(short = 'm', long = "mount-point")]
    mountpoint: Option<PathBuf>,
    /// The device.
    #[arg(short = 'd', long = "device")]
    device: Option<PathBuf>,
    /// DiskDescriptor.xml (every view of it that is mounted), or the
    /// base image file of a mounted disk.
    descriptor: Option<PathBuf>,
}

#[derive(Args)]
struct UmountArgs {
    #[command(flatten)]
    target: UmountTarget,
}

#[derive(Args)]
struct CheckArgs {
    /// Check even if the image was closed cleanly.
    #[arg(short = 'f', long = "force")]
    force: bool,
    /// Fix even what OpenVZ calls fatal (BAT entries past the end of the
    /// file or into metadata): always done here, kept for OpenVZ.
    #[arg(short = 'F', long = "hard-force")]
    hard_force: bool,
    /// Drop the image's in-use flag: always done by a repair, kept for
    /// OpenVZ.
    #[arg(short = 'd', long = "drop-inuse")]
    drop_inuse: bool,
    /// Report problems only (no "clean" lines).
    #[arg(short = 's', long = "silent")]
    silent: bool,
    /// Repair a sparse image: fill holes inside the clusters the image
    /// uses with written zeros (OpenVZ's check refuses sparse images, as a
    /// discard or a copy by another tool leaves them) and punch out data
    /// nothing references.
    #[arg(short = 'S', long = "repair-sparse")]
    repair_sparse: bool,
    /// Defragment (after the check): the top delta's clusters in the
    /// disk's order, offline, so that reading the disk in order reads the
    /// file in order.
    #[arg(short = 'D', long = "defrag")]
    defrag: bool,
    /// A raw image (OpenVZ's -R, -b): nothing to check in one.
    #[arg(short = 'R', long = "raw", hide = true)]
    raw: bool,
    #[arg(short = 'b', long = "blocksize", hide = true)]
    blocksize: Option<String>,
    /// Check the chain up to a snapshot (OpenVZ's -u): not built.
    #[arg(short = 'u', long = "uuid", hide = true)]
    uuid: Option<String>,
    /// Detailed check (duplicates); always done here, kept for OpenVZ.
    #[arg(short = 'c', long = "check")]
    check: bool,
    /// Read-only: report problems, change nothing.
    #[arg(short = 'r', long = "ro")]
    read_only: bool,
    #[arg(long)]
    json: bool,
    /// DiskDescriptor.xml or one delta file.
    target: PathBuf,
}

#[derive(Args)]
struct ListArgs {
    /// No header line.
    #[arg(short = 'H', long = "no-header")]
    no_header: bool,
    /// Fields: uuid, parent_uuid, current, fname.
    #[arg(
        short = 'o',
        long = "output",
        default_value = "parent_uuid,current,uuid,fname"
    )]
    output: String,
    /// Only the chain from this snapshot down to the base.
    #[arg(short = 'u', long = "uuid")]
    uuid: Option<String>,
    #[arg(long)]
    json: bool,
    descriptor: PathBuf,
}

fn guid_arg(s: &str) -> Res<Uuid> {
    parse_guid(s).ok_or_else(|| format!("incorrect uuid specified: {s}").into())
}

/// A progress bar on a terminal, nothing elsewhere.
fn progress_bar(what: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({eta})")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    Some(pb)
}

pub fn with_progress<T>(what: &str, f: impl FnOnce(&dyn Fn(u64, u64)) -> T) -> T {
    let pb = progress_bar(what);
    let cb = |done: u64, total: u64| {
        if let Some(pb) = &pb {
            pb.set_length(total);
            pb.set_position(done);
        }
    };
    let r = f(&cb);
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    r
}

pub fn run() -> Res<ExitCode> {
    // Usage errors exit 1 like every other error (2 means `check -r`
    // found problems); help and version exit 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return Ok(if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            });
        }
    };
    match cli.cmd {
        Cmd::Init(a) => init(a),
        Cmd::Info(a) => info(a),
        Cmd::Check(a) => check(a),
        Cmd::Fsck(a) => {
            eprintln!("WARNING: ploop fsck command is obsoleted, please use ploop check");
            check(a)
        }
        Cmd::Snapshot {
            uuid,
            cbt,
            descriptor,
        } => {
            let uuid = uuid.as_deref().map(guid_arg).transpose()?;
            let cbt = cbt.as_deref().map(guid_arg).transpose()?;
            let snap = match crate::mount::served_rw(&descriptor) {
                Some(rec) => crate::mount::online_snapshot(&rec, uuid, cbt)?,
                None => ops::snapshot_with_cbt(&descriptor, uuid, cbt)?,
            };
            println!(
                "ploop snapshot {} has been successfully created",
                guid_string(&snap)
            );
            merge_temporary(&descriptor);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::SnapshotList(a) => snapshot_list(a),
        Cmd::SnapshotDelete { uuid, descriptor } => {
            let g = guid_arg(&uuid)?;
            let d = Descriptor::load(&descriptor)?;
            let children = d.children(g).len();
            if d.shot(g).is_some() && children > 1 {
                // As OpenVZ: kept, and merged away once one child is left.
                ops::mark_temporary(&descriptor, g)?;
                println!(
                    "Warning: Unable to delete snapshot {} as there are {children} references to it; marking it as temporary instead",
                    guid_string(&g)
                );
                return Ok(ExitCode::SUCCESS);
            }
            match crate::mount::served_rw(&descriptor) {
                Some(rec) => with_progress("merging", |p| {
                    let req = Request::Delete {
                        guid: guid_string(&g),
                    };
                    crate::mount::online_call_with_progress(&rec, &req, p)
                })
                .map(|_| ())?,
                None => with_progress("merging", |p| ops::delete(&descriptor, g, p))?,
            }
            println!(
                "ploop snapshot {} has been successfully deleted",
                guid_string(&g)
            );
            merge_temporary(&descriptor);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Tsnapshot(a) => tsnapshot(a),
        Cmd::Replace(a) => replace(a),
        Cmd::Compact {
            dry_run,
            threshold,
            descriptor,
        } => crate::resize::compact(
            &descriptor,
            &crate::resize::CompactOptions {
                dry: dry_run,
                threshold,
                ..Default::default()
            },
        ),
        Cmd::Balloon(BalloonCmd::Discard(a)) => balloon_discard(a),
        Cmd::Resize { size, descriptor } => {
            crate::resize::resize(&descriptor, parse_size(&size, SECTOR)?)
        }
        Cmd::SnapshotMerge {
            uuid,
            all,
            new_delta,
            descriptor,
        } => {
            let g = uuid.as_deref().map(guid_arg).transpose()?;
            let online = crate::mount::served_rw(&descriptor);
            if new_delta.is_some() && online.is_some() {
                return Err("-n works on an unmounted disk only: umount it first".into());
            }
            if let Some(n) = &new_delta {
                if all {
                    return Err("-n and -A cannot be used together".into());
                }
                ops::check_new_delta(&descriptor, n)?;
            }
            loop {
                let d = Descriptor::load(&descriptor)?;
                if all && d.images.len() == 1 {
                    break;
                }
                match &online {
                    Some(rec) => with_progress("merging", |p| {
                        let req = Request::Merge {
                            guid: g.map(|g| guid_string(&g)),
                        };
                        crate::mount::online_call_with_progress(rec, &req, p)
                    })
                    .map(|_| ())?,
                    None => with_progress("merging", |p| ops::merge(&descriptor, g, p))?,
                };
                if let Some(n) = &new_delta {
                    ops::move_delta(&descriptor, g.unwrap_or(TOP_GUID), n)?;
                }
                if !all {
                    break;
                }
            }
            println!("ploop snapshot has been successfully merged");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::SnapshotSwitch { uuid, descriptor } => {
            if crate::mount::served_rw(&descriptor).is_some() {
                return Err("unable to switch snapshots of a mounted disk: umount it first".into());
            }
            ops::switch(&descriptor, guid_arg(&uuid)?)?;
            println!("ploop snapshot has been successfully switched");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Convert {
            format,
            version,
            descriptor,
        } => {
            if let Some(f) = format {
                let to = parse_format(&f)?;
                with_progress("converting", |p| ops::convert_format(&descriptor, to, p))?;
            } else if let Some(v) = version {
                ops::convert_version(&descriptor, parse_version(v)?)?;
            }
            println!("ploop image has been successfully converted");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::RestoreDescriptor {
            format,
            blocksize,
            dir,
            image,
        } => {
            let raw = format
                .as_deref()
                .map(parse_format)
                .transpose()?
                .map(|f| f == DiskFormat::Raw);
            let bs = blocksize
                .as_deref()
                .map(|b| parse_size(b, SECTOR))
                .transpose()?;
            let dd = ops::restore_descriptor(&dir, &image, raw, bs)?;
            println!("{}", dd.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Mount(mut a) => {
            // Checked here: the conversion below cannot fail.
            a.limits.apply(LimitsRecord::default())?;
            let unbuilt = [
                ("-c (component names)", a.component.is_some()),
                ("-d (a given device: one is chosen)", a.device.is_some()),
                ("-t (the filesystem type is detected)", a.fstype.is_some()),
                (
                    "-b and -f (mounting a list of images)",
                    a.blocksize.is_some() || a.format.is_some(),
                ),
            ];
            if let Some((what, _)) = unbuilt.iter().find(|(_, used)| *used) {
                return Err(
                    format!("mount {what} is not supported: mount a DiskDescriptor.xml").into(),
                );
            }
            if a.uuid.as_deref() == Some("base") {
                // OpenVZ's man page: the base (lowest) image.
                let d = Descriptor::load(&a.descriptor)?;
                let base = d.base().ok_or("the descriptor has no base image")?;
                a.uuid = Some(guid_string(&base.guid));
            }
            let dd = a.descriptor.clone();
            let top_rw = a.uuid.is_none() && !a.read_only && !a.foreground;
            let r = crate::mount::mount(a.into())?;
            if top_rw {
                merge_temporary(&dd);
            }
            Ok(r)
        }
        Cmd::Umount(a) => {
            let dd = match a.target.descriptor {
                Some(t) if !is_descriptor(&t)? => Some(crate::mount::descriptor_of_image(&t)?),
                other => other,
            };
            crate::mount::umount(
                a.target.mountpoint.as_deref(),
                a.target.device.as_deref(),
                dd.as_deref(),
            )
        }
        Cmd::List { json } => crate::mount::list(json),
        Cmd::Copy(a) => crate::copy::run(a),
        Cmd::Backup(a) => crate::backup::run(a),
        Cmd::SetLimits { limits, descriptor } => {
            // Every view of the disk (the top, snapshots mounted beside).
            let recs = crate::mount::served_views(&descriptor);
            if recs.is_empty() {
                return Err(format!("{} is not mounted", descriptor.display()).into());
            }
            for rec in recs {
                let l = limits.apply(rec.limits)?;
                crate::mount::online_call(&rec, &Request::SetLimits(l))?;
                println!(
                    "{} {}",
                    rec.fs_device()
                        .map_or_else(String::new, |d| d.display().to_string()),
                    crate::mount::limits_line(&l)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Stat { json, descriptor } => crate::mount::stat(&descriptor, json),
        Cmd::Serve(a) => {
            ploop_uring::busy_poll::set_limit(std::time::Duration::from_micros(a.poll.busy_poll));
            crate::serve::serve(crate::serve::ServeRequest {
                uuid: a.uuid.as_deref().map(guid_arg).transpose()?,
                target: a.target,
                socket: a.socket,
                tcp: a.tcp,
                read_only: a.read_only,
                name: a.name,
                tls_cert: a.tls_cert,
                tls_key: a.tls_key,
                tls_ca: a.tls_ca,
                tls_any_client: a.tls_any_client,
                insecure: a.insecure,
                threads: a.threads,
                max_connections: a.max_connections,
                max_per_peer: a.max_connections_per_peer,
                idle_timeout: (a.idle_timeout > 0)
                    .then(|| std::time::Duration::from_secs(a.idle_timeout)),
                uring: a.io == "uring",
                image_format: a.format.as_deref().map(|f| match f {
                    "raw" => ImageType::Plain,
                    _ => ImageType::Compressed,
                }),
            })
        }
        Cmd::Read {
            offset,
            length,
            uuid,
            descriptor,
        } => read(&descriptor, &offset, length.as_deref(), uuid.as_deref()),
        Cmd::Write {
            offset,
            descriptor,
            input,
        } => write(&descriptor, &offset, &input),
    }
}

fn parse_format(f: &str) -> Res<DiskFormat> {
    Ok(match f {
        "raw" => DiskFormat::Raw,
        "ploop1" | "expanded" => DiskFormat::Expanded,
        "preallocated" => DiskFormat::Preallocated,
        other => {
            return Err(
                format!("bad -f argument: {other} (raw, ploop1, expanded, preallocated)").into(),
            )
        }
    })
}

fn parse_version(v: u32) -> Res<Version> {
    match v {
        1 => Ok(Version::V1),
        2 => Ok(Version::V2),
        other => Err(format!("invalid -v argument: {other} (1 or 2)").into()),
    }
}

fn init(a: InitArgs) -> Res<ExitCode> {
    let size = parse_size(&a.size, SECTOR)?;
    let cluster = parse_size(&a.blocksize, SECTOR)?;
    if cluster < MIN_CLUSTER_SECTORS * SECTOR {
        return Err(format!("incorrect blocksize specified: {}", a.blocksize).into());
    }
    if !["none", "ext4", "ext3", "xfs"].contains(&a.fstype.as_str()) {
        return Err(format!("incorrect file system type specified: {}", a.fstype).into());
    }
    // Before anything is created: a bad -B must not leave a disk behind.
    let fs_block = a
        .fs_block
        .as_deref()
        .map(|b| {
            parse_size(b, 1).and_then(|n| {
                u32::try_from(n)
                    .map_err(|_| format!("incorrect file system block size specified: {b}"))
            })
        })
        .transpose()?;
    if let Some(k) = &a.keyid {
        return Err(format!(
            "encrypted disks are not supported (key id {k}): this ploop has no encryption"
        )
        .into());
    }
    if let Some(t) = a.image_format.as_deref().filter(|t| *t != "ploop") {
        return Err(format!("image format {t} is not supported by init: only ploop").into());
    }
    let opts = InitOptions {
        size,
        format: parse_format(&a.format)?,
        version: parse_version(a.version)?,
        cluster_size: cluster,
    };
    let dd = with_progress("allocating", |p| ops::init(&a.image, opts, p))?;
    let mkfs = ploop_daemon::kernel::MkfsOptions {
        block_size: fs_block,
        label: a.label.clone(),
        no_lazy: a.nolazy,
    };
    let layout = || -> Res<()> {
        // As OpenVZ: the table comes with the filesystem (`-t none`
        // makes a bare disk, like its ploop_create_image).
        if !a.no_partition && a.fstype != "none" {
            let disk = Disk::open(
                &dd,
                OpenOptions {
                    writable: true,
                    ..OpenOptions::default()
                },
            )?;
            let made = ploop_image::gpt::write_openvz(
                &disk.chain,
                cluster / SECTOR,
                &dd.display().to_string(),
            );
            disk.close()?;
            made?;
        }
        if a.fstype != "none" {
            crate::mount::make_filesystem(&dd, &a.fstype, &mkfs)?;
        }
        Ok(())
    };
    if let Err(e) = layout() {
        // Remove the half-made disk, unless a daemon still serves it.
        if crate::mount::served_rw(&dd).is_none() {
            let _ = std::fs::remove_file(&dd);
            let _ = std::fs::remove_file(&a.image);
        }
        return Err(e);
    }
    println!("{}", dd.display());
    Ok(ExitCode::SUCCESS)
}

/// OpenVZ's merge_temporary_snapshots: every temporary snapshot left
/// with one child is merged into it (none: dropped), online where the
/// disk is mounted. One still in use (a tsnapshot's mount) is skipped:
/// merging into it needs its file, which that mount holds.
fn merge_temporary(dd: &Path) {
    let mut skipped = std::collections::HashSet::new();
    for _ in 0..ploop_format::descriptor::MAX_IMAGES {
        let Ok(d) = Descriptor::load(dd) else { return };
        let Some(shot) = d.snapshots.iter().find(|s| {
            s.temporary
                && s.guid != d.top_guid
                && d.children(s.guid).len() <= 1
                && !skipped.contains(&s.guid)
        }) else {
            return;
        };
        let guid = shot.guid;
        let online = crate::mount::served_rw(dd);
        let done: Res<()> = match d.children(guid).as_slice() {
            [child] => match &online {
                Some(rec) => crate::mount::online_call(
                    rec,
                    &Request::Merge {
                        guid: Some(guid_string(child)),
                    },
                )
                .map(|_| ()),
                None => ops::merge(dd, Some(*child), &|_, _| {}).map_err(Into::into),
            },
            _ => match &online {
                Some(rec) => crate::mount::online_call(
                    rec,
                    &Request::Delete {
                        guid: guid_string(&guid),
                    },
                )
                .map(|_| ()),
                None => ops::delete(dd, guid, &|_, _| {}).map_err(Into::into),
            },
        };
        match done {
            Ok(()) => println!(
                "temporary snapshot {} has been merged away",
                guid_string(&guid)
            ),
            Err(e) => {
                tracing::info!("temporary snapshot {} kept: {e}", guid_string(&guid));
                skipped.insert(guid);
            }
        }
    }
}

/// `tsnapshot`: a snapshot, mounted read-only, then marked temporary (so
/// that it is merged away once that mount is gone). Marked after the
/// mount opened it: a temporary snapshot is otherwise not opened on its
/// own (it may be the target of a merge under way).
fn tsnapshot(a: TsnapshotArgs) -> Res<ExitCode> {
    let g = guid_arg(&a.uuid)?;
    let dd = &a.descriptor;
    if let Some(m) = &a.mountpoint {
        // Before the snapshot: a bad mount point must not leave one.
        ploop_daemon::kernel::MountPoint::open(m)?;
    }
    let snap = match crate::mount::served_rw(dd) {
        Some(rec) => crate::mount::online_snapshot(&rec, Some(g), None)?,
        None => ops::snapshot(dd, Some(g))?,
    };
    let req = crate::mount::MountRequest {
        uuid: Some(guid_string(&snap)),
        fuse_queues: "auto".into(),
        ..crate::mount::MountRequest::internal(dd, true, a.mountpoint.as_deref())
    };
    let dev = match crate::mount::start_daemon(&req) {
        Ok(dev) => dev,
        Err(e) => {
            // As OpenVZ: a snapshot that cannot be mounted is merged back.
            let back: Res<()> = match crate::mount::served_rw(dd) {
                Some(rec) => crate::mount::online_call(
                    &rec,
                    &Request::Delete {
                        guid: guid_string(&snap),
                    },
                )
                .map(|_| ()),
                None => ops::delete(dd, snap, &|_, _| {}).map_err(Into::into),
            };
            if let Err(b) = back {
                eprintln!("ploop: merging the snapshot back failed too: {b}");
            }
            return Err(e);
        }
    };
    ops::mark_temporary(dd, snap)?;
    tracing::info!("temporary snapshot for {}", a.component);
    println!(
        "ploop temporary snapshot {} has been successfully created",
        guid_string(&snap)
    );
    println!("{dev}");
    Ok(ExitCode::SUCCESS)
}

fn replace(a: ReplaceArgs) -> Res<ExitCode> {
    let (target, wire) = match (&a.uuid, a.level, &a.old) {
        (Some(u), _, _) => {
            let g = guid_arg(u)?;
            (
                ops::ReplaceTarget::Guid(g),
                format!("guid:{}", guid_string(&g)),
            )
        }
        (_, Some(l), _) => (ops::ReplaceTarget::Level(l), format!("level:{l}")),
        (_, _, Some(o)) => {
            let o = std::fs::canonicalize(o).map_err(|e| format!("{}: {e}", o.display()))?;
            (
                ops::ReplaceTarget::File(o.clone()),
                format!("file:{}", o.display()),
            )
        }
        _ => unreachable!("clap requires one"),
    };
    let new = std::path::absolute(&a.image)?;
    let online = crate::mount::served_rw(&a.descriptor);
    match &online {
        Some(rec) => with_progress("comparing", |p| {
            crate::mount::online_call_with_progress(
                rec,
                &Request::Replace {
                    target: wire,
                    new: new.clone(),
                    keep_name: a.keep_name,
                },
                p,
            )
        })
        .map(|_| ())?,
        None => with_progress("comparing", |p| {
            ops::replace(&a.descriptor, &target, &new, a.keep_name, p)
        })?,
    }
    println!(
        "ploop delta {} has been replaced ({})",
        a.image.display(),
        if online.is_some() {
            "online"
        } else {
            "offline"
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Whether `path` is a DiskDescriptor.xml rather than an image file.
fn is_descriptor(path: &Path) -> Res<bool> {
    if path.extension().is_some_and(|e| e == "xml") {
        return Ok(true);
    }
    let first =
        ploop_io::FileIo::read_head(path, 16).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(!has_signature(&first) && first.starts_with(b"<"))
}

fn info(a: InfoArgs) -> Res<ExitCode> {
    let target = if a.target.is_dir() {
        a.target.join(ploop_format::descriptor::FILE_NAME)
    } else {
        a.target.clone()
    };
    if !is_descriptor(&target)? {
        return image_info(&target, a.json);
    }
    if a.device {
        return device_info(&target);
    }
    disk_info(&target, a.json, !a.spec)
}

/// `info -d`: the devices of a mounted disk, as OpenVZ prints them.
fn device_info(dd: &Path) -> Res<ExitCode> {
    let canonical = ploop_io::resolve_folder(dd).ok();
    let rec = ploop_daemon::registry::all()
        .into_iter()
        .find(|r| Some(&r.descriptor) == canonical.as_ref() && r.daemon_alive())
        .ok_or_else(|| format!("{}: not mounted", dd.display()))?;
    let show = |d: Option<&Path>| d.map_or("-".to_string(), |d| d.display().to_string());
    println!("device:\t\t{}", show(rec.device.as_deref()));
    println!("partition:\t{}", show(rec.fs_device()));
    Ok(ExitCode::SUCCESS)
}

/// The features of a delta's format extension, in words.
fn extension_features(p: &ploop_format::ploop::PloopDelta, file_size: u64) -> Vec<String> {
    use ploop_format::ploop::ext::{self, Feature, State};
    match ext::read(p.io(), p.header(), &p.bat_snapshot(), file_size) {
        Ok(State::None) => Vec::new(),
        Ok(State::Live(e)) => e
            .features
            .iter()
            .map(|f| match f {
                Feature::DirtyBitmap {
                    id, granularity, ..
                } => format!(
                    "dirty bitmap {} ({} KiB per bit)",
                    guid_string(id),
                    u64::from(*granularity) * SECTOR / 1024
                ),
                Feature::Unknown { magic, flags, .. } => {
                    format!("unknown feature {magic:#018x} (flags {flags:#x})")
                }
            })
            .collect(),
        Ok(State::Dangling(why)) => vec![format!("format extension unusable: {why}")],
        Err(e) => vec![format!("format extension unreadable: {e}")],
    }
}

/// `info IMAGE`: one delta file on its own.
fn image_info(path: &Path, as_json: bool) -> Res<ExitCode> {
    let meta =
        std::fs::symlink_metadata(path).map_err(|err| format!("{}: {err}", path.display()))?;
    let io = ploop_image::disk::open_file(
        path,
        ploop_io::OpenMode {
            lock: ploop_io::LockMode::None,
            ..ploop_io::OpenMode::read_only()
        },
    )?;
    let head =
        ploop_io::FileIo::read_head(path, 16).map_err(|e| format!("{}: {e}", path.display()))?;
    if !has_signature(&head) {
        return Err(format!(
            "{}: not a ploop image (no signature) nor a DiskDescriptor.xml; a raw image has no header to show",
            path.display()
        )
        .into());
    }
    let p = ploop_format::ploop::PloopDelta::open(io, Default::default())?;
    let h = p.header();
    let features = extension_features(&p, meta.len());
    let v = json!({
        "file": path.display().to_string(),
        "format": "ploop1",
        "version": h.version.number(),
        "size": p.virtual_size(),
        "size_sectors": p.virtual_size() / SECTOR,
        "cluster_size": p.cluster_size(),
        "blocksize": p.cluster_size() / SECTOR,
        "allocated_clusters": p.allocated_clusters(),
        "in_use": h.in_use,
        "file_size": meta.len(),
        "features": features,
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("size:\t\t{}", p.virtual_size() / SECTOR);
        println!("blocksize:\t{}", p.cluster_size() / SECTOR);
        println!("fmt_version:\t{}", h.version.number());
        println!("allocated:\t{} clusters", p.allocated_clusters());
        println!("in_use:\t\t{}", if h.in_use { "yes" } else { "no" });
        for f in &features {
            println!("feature:\t{f}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn disk_info(dd: &Path, as_json: bool, with_fs: bool) -> Res<ExitCode> {
    let d = Descriptor::load(dd)?;
    let name = dd.display().to_string();
    let mut deltas = Vec::new();
    for e in d.chain(d.top_guid, &name)? {
        let path = image_path(dd, &e.file)?;
        // Not through a link: the folder may be a container owner's.
        let meta =
            std::fs::symlink_metadata(&path).map_err(|err| format!("{}: {err}", path.display()))?;
        let (version, allocated, features) = if e.kind == ImageType::Compressed {
            // A peek without a lock, so info works on a mounted disk too
            // (the on-disk BAT may then lag the daemon's by one flush).
            let io = ploop_image::disk::open_file(
                &path,
                ploop_io::OpenMode {
                    lock: ploop_io::LockMode::None,
                    ..ploop_io::OpenMode::read_only()
                },
            )?;
            let p = ploop_format::ploop::PloopDelta::open(io, Default::default())?;
            (
                Some(p.header().version.number()),
                Some(p.allocated_clusters()),
                extension_features(&p, meta.len()),
            )
        } else {
            (None, None, Vec::new())
        };
        use std::os::unix::fs::MetadataExt;
        deltas.push(json!({
            "guid": guid_string(&e.guid),
            "file": path.display().to_string(),
            "format": if e.kind == ImageType::Plain { "raw" } else { "ploop1" },
            "version": version,
            "allocated_clusters": allocated,
            "file_size": meta.len(),
            "disk_usage": meta.blocks() * 512,
            "features": features,
        }));
    }
    let size = d.size_sectors * SECTOR;
    let cluster = u64::from(d.blocksize) * SECTOR;
    let format = match (d.images[0].kind, d.preallocated) {
        (ImageType::Plain, _) => "raw",
        (_, true) => "preallocated",
        _ => "ploop1",
    };
    let canonical = ploop_io::resolve_folder(dd).ok();
    let mounts: Vec<_> = ploop_daemon::registry::all()
        .into_iter()
        .filter(|r| Some(&r.descriptor) == canonical.as_ref())
        .map(|r| crate::mount::record_json(&r))
        .collect();
    let partition = disk_partition(dd);
    let fs = if with_fs {
        crate::mount::fs_stats(dd)
    } else {
        None
    };
    if as_json {
        let v = json!({
            "partition": partition.as_ref().map(|p| json!({
                "number": p.number,
                "start": p.start,
                "length": p.len,
                "type": p.type_guid,
                "guid": p.guid,
            })),
            "mounts": mounts,
            "descriptor": name,
            "size": size,
            "size_sectors": d.size_sectors,
            "cluster_size": cluster,
            "blocksize": d.blocksize,
            "format": format,
            "snapshots": d.snapshots.len(),
            "deltas": deltas,
            "filesystem": fs.as_ref().map(|f| json!({
                "block_size": f.block_size,
                "blocks": f.blocks,
                "blocks_free": f.blocks_free,
                "blocks_available": f.blocks_available,
                "inodes": f.inodes,
                "inodes_free": f.inodes_free,
            })),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("size:\t\t{}", d.size_sectors);
        println!("blocksize:\t{}", d.blocksize);
        if let Some(v) = deltas.last().and_then(|x| x["version"].as_u64()) {
            println!("fmt_version:\t{v}");
        }
        println!("format:\t\t{format}");
        if let Some(p) = &partition {
            println!(
                "partition:\t{} (sectors {}-{}, type {})",
                p.number,
                p.first_sector(),
                p.last_sector(),
                p.type_guid
            );
        }
        for m in &mounts {
            println!(
                "mounted:\t{}{} at {} ({}, daemon pid {}{})",
                m["fs_device"].as_str().unwrap_or("-"),
                match m["partition"]["number"].as_u64() {
                    Some(n) => format!(
                        " (partition {n} of {})",
                        m["device"].as_str().unwrap_or("-")
                    ),
                    None => String::new(),
                },
                m["mountpoint"].as_str().unwrap_or("-"),
                if m["read_only"] == true { "ro" } else { "rw" },
                m["pid"],
                if m["running"] == true { "" } else { ", gone" }
            );
        }
        println!("deltas (base first):");
        for x in &deltas {
            println!(
                "  {} {} allocated={} file_size={}",
                x["guid"].as_str().unwrap_or(""),
                ploop_format::escape_control(x["file"].as_str().unwrap_or(""), false),
                x["allocated_clusters"]
                    .as_u64()
                    .map_or("-".to_string(), |c| format!("{c} clusters")),
                x["file_size"]
            );
            for f in x["features"].as_array().into_iter().flatten() {
                println!("    feature: {}", f.as_str().unwrap_or(""));
            }
        }
        if let Some(f) = &fs {
            // OpenVZ's own table (its tools/ploop.c print_info).
            let kib = |blocks: u64| blocks * f.block_size / 1024;
            println!("{:>11} {:>14} {:>14}", "resource", "Size", "Used");
            println!(
                "{:>11} {:>14} {:>14}",
                "1k-blocks",
                kib(f.blocks),
                kib(f.blocks.saturating_sub(f.blocks_free))
            );
            println!(
                "{:>11} {:>14} {:>14}",
                "inodes",
                f.inodes,
                f.inodes.saturating_sub(f.inodes_free)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Partition 1 of a disk's top, if it has a partition table and can be
/// read now (not while a daemon holds it for writing).
fn disk_partition(dd: &Path) -> Option<ploop_image::gpt::Partition> {
    let disk = Disk::open(dd, OpenOptions::default()).ok()?;
    let layout = ploop_image::gpt::probe(&disk.chain, &dd.display().to_string());
    let _ = disk.close();
    match layout {
        Ok(ploop_image::gpt::Layout::Gpt(p)) => Some(p),
        _ => None,
    }
}

fn check(a: CheckArgs) -> Res<ExitCode> {
    let _ = (a.force, a.check, a.hard_force, a.drop_inuse);
    if a.raw || a.blocksize.is_some() {
        return Err("check -R/-b: a raw image has no metadata to check".into());
    }
    if a.uuid.is_some() {
        return Err("check -u is not built: the whole chain is checked".into());
    }
    let is_dd = a.target.extension().is_some_and(|e| e == "xml") || {
        let first = ploop_io::FileIo::read_head(&a.target, 16)
            .map_err(|e| format!("{}: {e}", a.target.display()))?;
        !has_signature(&first) && first.starts_with(b"<")
    };
    let mut results = if is_dd {
        ops::check_disk(&a.target, a.read_only)?
    } else {
        vec![ops::check_file(&a.target, a.read_only)?]
    };
    if a.repair_sparse {
        // After the repair above, on every ploop delta checked: the top
        // repaired, the others (read-only snapshots) too, as OpenVZ's -S.
        let files: Vec<PathBuf> = results
            .iter()
            .map(|r| r.path.clone())
            .filter(|p| !is_descriptor(p).unwrap_or(true))
            .collect();
        for f in files {
            let report = ops::repair_sparse(&f, a.read_only)?;
            results.push(ops::DeltaCheck { path: f, report });
        }
    }
    if a.defrag && !a.read_only {
        let moved = defrag(&a.target, is_dd)?;
        println!(
            "{}: defragmented ({moved} clusters moved)",
            a.target.display()
        );
    }
    let unrepaired = results
        .iter()
        .any(|r| !r.report.is_clean() && !r.report.repaired);
    if a.json {
        let v: Vec<_> = results
            .iter()
            .map(|r| {
                json!({
                    "file": r.path.display().to_string(),
                    "problems": r.report.problems,
                    "repaired": r.report.repaired,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for r in &results {
            if r.report.is_clean() {
                if !a.silent {
                    println!("{}: clean", r.path.display());
                }
                continue;
            }
            for p in &r.report.problems {
                println!("{}: {p}", r.path.display());
            }
            println!(
                "{}: {}",
                r.path.display(),
                if r.report.repaired {
                    "repaired"
                } else {
                    "NOT repaired (read-only check)"
                }
            );
        }
    }
    Ok(if unrepaired {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn snapshot_list(a: ListArgs) -> Res<ExitCode> {
    let d = Descriptor::load(&a.descriptor)?;
    let name = a.descriptor.display().to_string();
    let fields: Vec<String> = a
        .output
        .split(',')
        .map(|f| f.trim().to_lowercase())
        .collect();
    for f in &fields {
        if !["uuid", "parent_uuid", "current", "fname"].contains(&f.as_str()) {
            return Err(format!("unknown field: {f}").into());
        }
    }
    let shots: Vec<_> = match &a.uuid {
        Some(u) => {
            let g = guid_arg(u)?;
            let mut chain = d.chain(g, &name)?;
            chain.reverse();
            chain
                .iter()
                .map(|e| d.shot(e.guid).expect("validated").clone())
                .collect()
        }
        None => d.snapshots.clone(),
    };
    let mut rows = Vec::new();
    for s in &shots {
        let file = &d.image(s.guid).expect("validated").file;
        let fname = image_path(&a.descriptor, file)?;
        let fname = ploop_io::resolve_folder(&fname).unwrap_or(fname);
        rows.push((s, fname.display().to_string()));
    }
    if a.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(s, f)| {
                json!({
                    "uuid": guid_string(&s.guid),
                    "parent_uuid": guid_string(&s.parent),
                    "current": s.guid == d.top_guid,
                    "fname": f,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout().lock();
    let cell = |f: &str, s: &ploop_format::descriptor::Shot, fname: &str| -> (String, usize) {
        match f {
            "uuid" => (guid_string(&s.guid), 38),
            "parent_uuid" => (guid_string(&s.parent), 38),
            "current" => ((if s.guid == d.top_guid { "*" } else { "" }).to_string(), 1),
            // Names come from the descriptor: control characters escaped.
            _ => (ploop_format::escape_control(fname, false).into_owned(), 32),
        }
    };
    if !a.no_header {
        let mut line = String::new();
        for f in &fields {
            let (h, w) = match f.as_str() {
                "uuid" => ("UUID", 38),
                "parent_uuid" => ("PARENT_UUID", 38),
                "current" => ("C", 1),
                _ => ("FNAME", 32),
            };
            line.push_str(&format!("{h:<w$} "));
        }
        writeln!(out, "{line}")?;
    }
    for (s, fname) in &rows {
        let mut line = String::new();
        for (i, f) in fields.iter().enumerate() {
            let (v, w) = cell(f, s, fname);
            if i + 1 == fields.len() {
                line.push_str(&v);
            } else {
                line.push_str(&format!("{v:<w$} "));
            }
        }
        writeln!(out, "{line}")?;
    }
    Ok(ExitCode::SUCCESS)
}

fn read(dd: &Path, offset: &str, length: Option<&str>, uuid: Option<&str>) -> Res<ExitCode> {
    let guid = uuid.map(guid_arg).transpose()?;
    ploop_image::disk::refuse_encrypted(dd, &Descriptor::load(dd)?)?;
    let disk = Disk::open(
        dd,
        OpenOptions {
            guid: guid.or(Some(TOP_GUID)),
            ..OpenOptions::default()
        },
    )?;
    let size = disk.chain.virtual_size();
    let offset = parse_size(offset, 1)?;
    let length = match length {
        Some(l) => parse_size(l, 1)?,
        None => size.saturating_sub(offset),
    };
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = offset;
    let end = offset
        .checked_add(length)
        .filter(|&e| e <= size)
        .ok_or_else(|| {
            format!("range {offset}+{length} is past the end of the {size}-byte disk")
        })?;
    while pos < end {
        let n = (end - pos).min(buf.len() as u64) as usize;
        disk.chain.read_at(&mut buf[..n], pos)?;
        out.write_all(&buf[..n])?;
        pos += n as u64;
    }
    out.flush()?;
    disk.close()?;
    Ok(ExitCode::SUCCESS)
}

fn write(dd: &Path, offset: &str, input: &Path) -> Res<ExitCode> {
    // Held while opening, so no offline snapshot/merge/switch is midway.
    let lock = ploop_image::disk::DescriptorLock::acquire(dd)?;
    ploop_image::disk::refuse_encrypted(dd, &Descriptor::load(dd)?)?;
    let disk = Disk::open(
        dd,
        OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
    )?;
    drop(lock);
    let size = disk.chain.virtual_size();
    let mut pos = parse_size(offset, 1)?;
    // All or nothing: the whole input is sized, and checked against the
    // disk, before its first byte is written.
    let result = sized_input(input, size.saturating_sub(pos)).and_then(|(mut src, len)| {
        if pos.checked_add(len).is_none_or(|end| end > size) {
            return Err(format!(
                "{}: range {pos}+{len} is past the end of the {size}-byte disk",
                dd.display()
            )
            .into());
        }
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let mut filled = 0;
            while filled < buf.len() {
                let n = src.read(&mut buf[filled..])?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                return Ok(());
            }
            disk.chain.write_at(&buf[..filled], pos)?;
            pos += filled as u64;
        }
    });
    let closed = disk.close();
    result?;
    closed?;
    Ok(ExitCode::SUCCESS)
}

/// The input of `write` and its length. A regular file or a block device
/// (or standard input redirected from one) says its length; a pipe is
/// copied into an unnamed temporary file first, read no further than one
/// byte past `room`, so that its length is known before anything is
/// written.
fn sized_input(input: &Path, room: u64) -> Res<(Box<dyn Read>, u64)> {
    use std::io::{Seek, SeekFrom};
    use std::os::fd::AsFd;
    let name = input.display().to_string();
    let ctx = |e: std::io::Error| format!("{name}: {e}");
    let mut file = if input == Path::new("-") {
        std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned().map_err(ctx)?)
    } else {
        std::fs::File::open(input).map_err(ctx)?
    };
    let kind = file.metadata().map_err(ctx)?.file_type();
    if kind.is_file() || std::os::unix::fs::FileTypeExt::is_block_device(&kind) {
        // A device's length is where its end is; a file's too. Only that
        // much is read, should the file grow meanwhile.
        let at = file.stream_position().map_err(ctx)?;
        let end = file.seek(SeekFrom::End(0)).map_err(ctx)?;
        file.seek(SeekFrom::Start(at)).map_err(ctx)?;
        let len = end.saturating_sub(at);
        return Ok((Box::new(file.take(len)), len));
    }
    let mut staged = tempfile::tempfile().map_err(|e| format!("staging {name}: {e}"))?;
    let len = std::io::copy(&mut (&mut file).take(room.saturating_add(1)), &mut staged)
        .map_err(|e| format!("staging {name}: {e}"))?;
    if len > room {
        return Err(format!(
            "{name}: more than the {room} bytes from the offset to the end of the disk"
        )
        .into());
    }
    staged.seek(SeekFrom::Start(0))?;
    Ok((Box::new(staged), len))
}

impl From<MountArgs> for crate::mount::MountRequest {
    fn from(a: MountArgs) -> Self {
        Self {
            descriptor: a.descriptor,
            read_only: a.read_only,
            mountpoint: a.mountpoint,
            options: a.options,
            uuid: a.uuid,
            foreground: a.foreground,
            threads: a.threads,
            uring: a.io == "uring",
            fuse_queues: a.fuse_queues,
            busy_poll_us: a.poll.busy_poll,
            nbd: a.nbd,
            fsck: a.fsck,
            limits: a.limits.apply(LimitsRecord::default()).unwrap_or_default(),
            cgroup: a.cgroup,
        }
    }
}
