//! `ploop check`: find, and unless asked not to, repair what a crash or a
//! foreign writer can leave behind in one delta file.

use ploop_io::{AlignedBuf, SharedIo};

use super::bat::{scan_bat, BatProblem};
use super::delta::{read_metadata, write_metadata_pages, META_PAGE};
use super::header::{entry_to_offset, offset_to_entry};
use super::header::{Header, RawHeader, FLAG_CONVERTING, FLAG_EMPTY, HEADER_SIZE};
use crate::{Error, Result};

/// What check found and did.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    /// One line per problem found.
    pub problems: Vec<String>,
    /// Whether the problems were repaired on disk.
    pub repaired: bool,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Put back the header and BAT saved before a version conversion. The
/// backup is trusted for nothing: it must describe this image's geometry
/// and be exactly its metadata area, which is copied in pieces (a sparse
/// backup claiming terabytes costs no memory).
fn restore_backup(io: &SharedIo, backup: &SharedIo) -> Result<()> {
    let path = io.describe();
    let bpath = backup.describe();
    let len = backup
        .size()
        .map_err(|e| Error::io(&bpath, "reading size", 0, e))?;
    let unusable = || Error::corrupt(&bpath, "not a usable BAT backup for this image");
    if len < HEADER_SIZE as u64 {
        return Err(unusable());
    }
    let mut ob = [0u8; HEADER_SIZE];
    backup
        .read_at(&mut ob, 0)
        .map_err(|e| Error::io(&bpath, "reading BAT backup", 0, e))?;
    let old = RawHeader::parse(&ob);
    let mut hb = [0u8; HEADER_SIZE];
    io.read_at(&mut hb, 0)
        .map_err(|e| Error::io(&path, "reading header", 0, e))?;
    let now = RawHeader::parse(&hb);
    // Same geometry, a clean state, a valid header, and exactly the
    // header + BAT area, which the image itself must hold.
    let same = old.sectors == now.sectors
        && old.bat_entries == now.bat_entries
        && old.first_block_offset == now.first_block_offset
        && old.size_in_sectors & 0xffff_ffff == now.size_in_sectors & 0xffff_ffff;
    let image_len = io
        .size()
        .map_err(|e| Error::io(&path, "reading file size", 0, e))?;
    let area = u64::from(old.first_block_offset) * crate::SECTOR;
    if !same
        || old.flags & FLAG_CONVERTING != 0
        || Header::validate(old, &bpath).is_err()
        || len != area
        || area > image_len
    {
        return Err(unusable());
    }
    let mut chunk = AlignedBuf::zeroed(1 << 20);
    let mut at = 0;
    while at < area {
        let n = (area - at).min(chunk.len() as u64) as usize;
        let piece = &mut chunk.as_mut_slice()[..n];
        backup
            .read_at(piece, at)
            .map_err(|e| Error::io(&bpath, "reading BAT backup", at, e))?;
        io.write_at(piece, at)
            .map_err(|e| Error::io(&path, "restoring BAT", at, e))?;
        at += n as u64;
    }
    io.flush()
        .map_err(|e| Error::io(&path, "syncing restored BAT", 0, e))
}

/// Check one ploop delta. With `repair`, fix everything that can be fixed
/// and leave the image closed cleanly.
pub fn check(io: &SharedIo, repair: bool) -> Result<CheckReport> {
    check_with_backup(io, repair, None)
}

/// Like [`check`], with the metadata backup a version conversion leaves
/// (`IMAGE.idx`), used if that conversion was interrupted.
pub fn check_with_backup(
    io: &SharedIo,
    repair: bool,
    backup: Option<&SharedIo>,
) -> Result<CheckReport> {
    let path = io.describe();
    let mut report = CheckReport::default();
    let mut hb = [0u8; HEADER_SIZE];
    io.read_at(&mut hb, 0)
        .map_err(|e| Error::io(&path, "reading header", 0, e))?;
    let raw_header = RawHeader::parse(&hb);
    if raw_header.flags & FLAG_CONVERTING != 0 {
        // Only a ploop image can be half converted: anything else is
        // called what it is first.
        Header::validate(
            RawHeader {
                flags: raw_header.flags & !FLAG_CONVERTING,
                ..raw_header
            },
            &path,
        )?;
        let Some(backup) = backup else {
            return Err(Error::corrupt(
                &path,
                "a format version conversion was interrupted and its BAT backup (.idx) is missing",
            ));
        };
        report.problems.push(
            "a format version conversion was interrupted (fix: restore the BAT from its backup)"
                .into(),
        );
        if !repair {
            return Ok(report);
        }
        restore_backup(io, backup)?;
        report.repaired = true;
    }
    let restored = report.problems.len();
    let (header, mut bat, size) = read_metadata(io)?;
    let cs = header.cluster_size;
    let mut raw = header.raw;
    if header.in_use {
        report
            .problems
            .push("in-use flag is set: the image was not closed cleanly".into());
        raw.disk_in_use = 0;
    }

    // A ragged tail: grow it to a whole cluster if data lives there,
    // otherwise cut it back.
    let mut new_size = size.max(header.data_offset);
    if new_size != size {
        report.problems.push(format!(
            "file is {size} bytes, shorter than its metadata area ({} bytes)",
            header.data_offset
        ));
    }
    if new_size % cs != 0 {
        let floor = new_size / cs * cs;
        let used = bat
            .iter()
            .any(|&e| e != 0 && entry_to_offset(&header, e) == floor);
        let fixed = if used { floor + cs } else { floor };
        report.problems.push(format!(
            "file size {new_size} is not a multiple of the cluster size {cs} (fix: {} to {fixed})",
            if used { "extend" } else { "truncate" }
        ));
        new_size = fixed;
    }

    let mut copies = Vec::new();
    let bat_problems = scan_bat(&header, &bat, new_size);
    let content_repaired = !bat_problems.is_empty();
    for p in bat_problems {
        report.problems.push(p.to_string());
        match p {
            BatProblem::Duplicate {
                cluster, offset, ..
            } => copies.push((cluster, offset)),
            other => bat[other.cluster() as usize] = 0,
        }
    }
    // A live format extension's clusters are used like data clusters; an
    // offset that dangles is cleared (qemu refuses a file whose extension
    // offset names no extension).
    let mut ext_clusters = Vec::new();
    let state = if raw.format_extension_offset == 0 {
        super::ext::State::None
    } else if header.in_use {
        super::ext::State::Dangling(
            "the image was not closed cleanly, so its changed-block bitmap cannot be trusted"
                .into(),
        )
    } else if content_repaired {
        // Clusters this repair zeroes or copies change what the disk
        // reads, and no bitmap marks them.
        super::ext::State::Dangling(
            "this repair changes clusters its changed-block bitmap does not mark".into(),
        )
    } else {
        super::ext::read(io, &header, &bat, new_size)
            .map_err(|e| Error::io(&path, "reading the format extension", 0, e))?
    };
    match state {
        super::ext::State::None => {}
        super::ext::State::Live(ext) => ext_clusters = ext.clusters,
        super::ext::State::Dangling(why) => {
            report.problems.push(format!(
                "the header names a format extension at sector {}, but {why} (fix: drop the extension)",
                raw.format_extension_offset
            ));
            raw.format_extension_offset = 0;
        }
    }
    let highest = bat
        .iter()
        .filter(|&&e| e != 0)
        .map(|&e| entry_to_offset(&header, e) + cs)
        .chain(ext_clusters.iter().map(|&c| (c + 1) * cs))
        .max()
        .unwrap_or(0)
        .max(header.data_offset);
    // Duplicates get a private copy at the end, so no virtual cluster loses
    // its data and neither aliases the other.
    let mut end = highest.max(new_size);
    let mut relocations = Vec::new();
    for (cluster, from) in copies {
        let entry = offset_to_entry(&header, end)
            .ok_or_else(|| Error::corrupt(&path, "no room to relocate a duplicated cluster"))?;
        bat[cluster as usize] = entry;
        relocations.push((from, end));
        end += cs;
    }
    if relocations.is_empty() && new_size > highest {
        report.problems.push(format!(
            "{} unreferenced cluster(s) at the end of the file (fix: truncate to {highest} bytes)",
            (new_size - highest) / cs
        ));
        end = highest;
    }

    // A set "empty" flag over mapped data is wrong. A clear one over no
    // data is not: OpenVZ's own repair clears every flag, and images made
    // by Virtuozzo's tools carry it clear (qemu's sample with a bitmap).
    if raw.flags & FLAG_EMPTY != 0 && bat.iter().any(|&e| e != 0) {
        report
            .problems
            .push("the header's empty flag is set, but the image holds data".into());
        raw.flags &= !FLAG_EMPTY;
    }

    if !repair || report.problems.len() == restored {
        return Ok(report);
    }
    let name = path.as_str();
    let ioerr = |op, off| move |e| Error::io(name, op, off, e);
    // Data first (copies, a grown tail), then the header and BAT, then a
    // cut of the tail: the header never names what is not there yet, nor
    // (a dropped extension) what is no longer there.
    let mut buf = AlignedBuf::zeroed(cs as usize);
    if end > size {
        io.set_len(end).map_err(ioerr("resizing file", end))?;
    }
    for &(from, to) in &relocations {
        io.read_at(buf.as_mut_slice(), from)
            .map_err(ioerr("reading duplicated cluster", from))?;
        io.write_at(buf.as_slice(), to)
            .map_err(ioerr("copying duplicated cluster", to))?;
    }
    io.flush().map_err(ioerr("syncing data", 0))?;
    write_metadata_pages(io, 0..header.data_offset.div_ceil(META_PAGE), &raw, &bat)?;
    io.flush().map_err(ioerr("syncing BAT", 0))?;
    if end < size {
        io.set_len(end).map_err(ioerr("resizing file", end))?;
        io.flush().map_err(ioerr("syncing file size", 0))?;
    }
    report.repaired = true;
    Ok(report)
}
