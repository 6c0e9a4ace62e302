//! BAT validation shared by open (which refuses a bad image) and check
//! (which reports and repairs).

use std::collections::HashMap;
use std::fmt;

use super::header::entry_to_offset;
use super::header::Header;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatProblem {
    /// The entry points into the header/BAT area.
    InMetadata { cluster: u64, offset: u64 },
    /// The cluster the entry points at does not fit in the file.
    PastEof {
        cluster: u64,
        offset: u64,
        file_size: u64,
    },
    /// The entry is not on the cluster grid.
    Misaligned { cluster: u64, offset: u64 },
    /// Two virtual clusters share one file cluster.
    Duplicate {
        cluster: u64,
        first: u64,
        offset: u64,
    },
}

impl fmt::Display for BatProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatProblem::InMetadata { cluster, offset } => write!(
                f,
                "BAT entry for cluster {cluster} points into the header/BAT area (byte {offset})"
            ),
            BatProblem::PastEof {
                cluster,
                offset,
                file_size,
            } => write!(
                f,
                "BAT entry for cluster {cluster} points past the end of the file (byte {offset}, file is {file_size} bytes)"
            ),
            BatProblem::Misaligned { cluster, offset } => write!(
                f,
                "BAT entry for cluster {cluster} is not cluster-aligned (byte {offset})"
            ),
            BatProblem::Duplicate {
                cluster,
                first,
                offset,
            } => write!(
                f,
                "BAT entries for clusters {first} and {cluster} both point at byte {offset}"
            ),
        }
    }
}

impl BatProblem {
    pub fn cluster(&self) -> u64 {
        match *self {
            BatProblem::InMetadata { cluster, .. }
            | BatProblem::PastEof { cluster, .. }
            | BatProblem::Misaligned { cluster, .. }
            | BatProblem::Duplicate { cluster, .. } => cluster,
        }
    }
}

/// Every problem in `bat` for a file of `file_size` bytes, in cluster order.
pub fn scan_bat(header: &Header, bat: &[u32], file_size: u64) -> Vec<BatProblem> {
    let cs = header.cluster_size;
    let mut seen: HashMap<u64, u64> = HashMap::new();
    let mut problems = Vec::new();
    for (cluster, &e) in bat.iter().enumerate() {
        if e == 0 {
            continue;
        }
        let cluster = cluster as u64;
        let offset = entry_to_offset(header, e);
        if offset < header.data_offset {
            problems.push(BatProblem::InMetadata { cluster, offset });
        } else if !offset.is_multiple_of(cs) {
            problems.push(BatProblem::Misaligned { cluster, offset });
        } else if offset + cs > file_size {
            problems.push(BatProblem::PastEof {
                cluster,
                offset,
                file_size,
            });
        } else if let Some(&first) = seen.get(&offset) {
            problems.push(BatProblem::Duplicate {
                cluster,
                first,
                offset,
            });
        } else {
            seen.insert(offset, cluster);
        }
    }
    problems
}
