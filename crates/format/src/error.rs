use std::io;

/// Every error names the file and says what was being done or what is wrong.
/// Its message has every control character escaped (names come from files
/// a container's owner may write).
#[derive(Debug)]
pub enum Error {
    // The OS error is part of the message and deliberately not a chained
    // `source`, so printers of the error chain show it once.
    Io {
        path: String,
        op: &'static str,
        offset: u64,
        err: io::Error,
    },
    Corrupt {
        path: String,
        what: String,
    },
    Locked {
        path: String,
    },
    Dirty {
        path: String,
    },
    Descriptor {
        path: String,
        what: String,
    },
    FlushFailed {
        path: String,
    },
    Invalid(String),
}

impl Error {
    fn render(&self) -> String {
        match self {
            Error::Io {
                path,
                op,
                offset,
                err,
            } => format!("{path}: {op} at byte {offset}: {err}"),
            Error::Corrupt { path, what } | Error::Descriptor { path, what } => {
                format!("{path}: {what}")
            }
            Error::Locked { path } => {
                format!("{path}: image is in use by another process (it is locked)")
            }
            Error::Dirty { path } => format!(
                "{path}: image was not closed cleanly (in-use flag is set); run `ploop check` on it first"
            ),
            Error::FlushFailed { path } => format!(
                "{path}: an earlier flush of this image failed, so writes since the last good flush may not be on disk; it takes no more writes until it is closed and checked (`ploop check`)"
            ),
            Error::Invalid(what) => what.clone(),
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::escape_control(&self.render(), false))
    }
}

impl std::error::Error for Error {}

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
