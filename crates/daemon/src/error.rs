//! What goes wrong in the daemon and the kernel tools it runs: an error a
//! caller can match on, each with the tool, path or device it concerns.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tool ran and failed: its own message.
    #[error("{tool} {args}: {stderr}")]
    Tool {
        tool: String,
        args: String,
        stderr: String,
    },
    #[error("{tool} is not installed (looked in {path})")]
    NotInstalled { tool: String, path: &'static str },
    #[error("cannot run {tool}: {err}")]
    Spawn {
        tool: String,
        #[source]
        err: io::Error,
    },
    /// The mount point cannot be used (and why).
    #[error("mount point {path}: {what}")]
    MountPoint { path: String, what: String },
    /// A file, folder or device the daemon works with.
    #[error("{path}: {err}")]
    Io {
        path: String,
        #[source]
        err: io::Error,
    },
    #[error(transparent)]
    Image(#[from] ploop_format::Error),
    #[error(transparent)]
    KernelNbd(#[from] ploop_nbd::kernel_client::Error),
    #[error(transparent)]
    FuseQueues(#[from] ploop_fuse::ring::Error),
    /// The daemon's control socket (or the daemon behind it).
    #[error("the daemon's control socket {path}: {what}")]
    Control { path: String, what: String },
    /// What the state of a disk refuses: mounted already, a stale record.
    #[error("{0}")]
    Refused(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error about `path`.
    pub fn io(path: impl std::fmt::Display, err: io::Error) -> Self {
        Error::Io {
            path: path.to_string(),
            err,
        }
    }
}
