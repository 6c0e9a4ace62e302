//! In-place change of the format version (BAT units and signature).

use ploop_io::SharedIo;

use super::delta::{read_metadata, write_metadata_pages, META_PAGE};
use super::header::{entry_to_offset, offset_to_entry};
use super::header::{Header, Version, FLAG_CONVERTING, IN_USE_MAGIC};
use super::scan_bat;
use crate::{Error, Result};

/// Rewrite a closed delta for format `to`. The header carries the
/// "conversion in progress" flag while the BAT is rewritten, so an
/// interrupted run is refused at the next open instead of misread.
pub fn convert_version(io: &SharedIo, to: Version) -> Result<()> {
    let path = io.describe();
    let (header, bat, size) = read_metadata(io)?;
    if header.in_use {
        return Err(Error::Dirty { path });
    }
    if let Some(p) = scan_bat(&header, &bat, size).into_iter().next() {
        return Err(Error::corrupt(&path, p.to_string()));
    }
    if header.version == to {
        return Ok(());
    }
    let target = Header::new(header.virtual_size, header.cluster_size, to).map_err(|_| {
        Error::Invalid(format!(
            "{path}: a {}-byte disk does not fit ploop version {}",
            header.virtual_size,
            to.number()
        ))
    })?;
    let mut new_bat = Vec::with_capacity(bat.len());
    for &e in &bat {
        new_bat.push(if e == 0 {
            0
        } else {
            offset_to_entry(&target, entry_to_offset(&header, e)).ok_or_else(|| {
                Error::Invalid(format!(
                    "{path}: the file is too large for ploop version {}",
                    to.number()
                ))
            })?
        });
    }
    let ioerr = |op: &'static str| {
        let p = path.clone();
        move |e| Error::io(p, op, 0, e)
    };
    let mut raw = header.raw;
    raw.flags |= FLAG_CONVERTING;
    raw.disk_in_use = IN_USE_MAGIC;
    let pages = header.data_offset.div_ceil(META_PAGE);
    let write_all = |raw: &super::RawHeader, bat: &[u32]| -> Result<()> {
        write_metadata_pages(io, 0..pages, raw, bat)?;
        io.flush().map_err(ioerr("syncing BAT"))
    };
    // 1: mark; 2: new BAT under the mark; 3: new signature, mark cleared.
    write_all(&raw, &bat)?;
    write_all(&raw, &new_bat)?;
    raw.flags &= !FLAG_CONVERTING;
    raw.disk_in_use = 0;
    raw.signature = to.signature();
    raw.size_in_sectors = target.raw.size_in_sectors;
    write_all(&raw, &new_bat)
}
