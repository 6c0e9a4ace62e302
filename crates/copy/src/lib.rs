//! The `ploop copy` stream: a served disk's clusters sent in passes while
//! the container runs (first every cluster some delta holds, then those
//! written meanwhile), a last pass with the filesystem frozen, each piece
//! checksummed; and the receiving end, which writes them into a new image.
//!
//! The stream goes one way (a pipe, ssh, a file or a TCP connection); see
//! [`stream`] for its layout. What reads the disk, records its changes
//! and freezes it ([`Source`], [`Control`]) and what writes the image
//! ([`Sink`]) are the caller's.

mod receive;
mod send;
pub mod stream;

pub use receive::{receive, RecvStats, Sink};
pub use send::{send, Control, PassStats, SendOptions, SendStats, Source, Start};

/// Why a copy failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The stream is not one we can take: cut short, corrupted, or
    /// hostile.
    #[error("copy stream: {0}")]
    Stream(String),
    /// Reading, tracking or freezing the disk failed.
    #[error("source: {0}")]
    Source(String),
    /// Writing the image failed.
    #[error("destination: {0}")]
    Sink(String),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A file descriptor handed to this process by number (OpenVZ's `-o OFD`
/// and `-i IFD`), taken over. Err unless it is open.
pub fn adopt_fd(fd: i32) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: fcntl(F_GETFD) only reads the descriptor table entry; on a
    // number that is not open it fails with EBADF and touches nothing.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(std::io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: the descriptor is open (checked above) and was handed to us
    // by the caller for this use; nothing else in the process owns it, so
    // the File is its one owner and closes it once.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}
