use std::io;

/// Every error names the file and says what was being done or what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The OS error is part of the message and deliberately not a chained
    // `source`, so printers of the error chain show it once.
    #[error("{path}: {op} at byte {offset}: {err}")]
    Io {
        path: String,
        op: &'static str,
        offset: u64,
        err: io::Error,
    },
    #[error("{path}: {what}")]
    Corrupt { path: String, what: String },
    #[error("{path}: image is in use by another process (it is locked)")]
    Locked { path: String },
    #[error(
        "{path}: image was not closed cleanly (in-use flag is set); run `ploop check` on it first"
    )]
    Dirty { path: String },
    #[error("{path}: {what}")]
    Descriptor { path: String, what: String },
    #[error(
        "{path}: an earlier flush of this image failed, so writes since the last good flush may not be on disk; it takes no more writes until it is closed and checked (`ploop check`)"
    )]
    FlushFailed { path: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<String>, op: &'static str, offset: u64, err: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            offset,
            err,
        }
    }

    pub fn corrupt(path: impl Into<String>, what: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.into(),
            what: what.into(),
        }
    }
}
