//! Change the virtual size of a closed ploop delta, as OpenVZ's
//! `ploop resize` does to a disk's top delta.
//!
//! Growing adds BAT entries. They usually fit in the clusters the header
//! and BAT already occupy (one 1 MiB cluster holds 262,128 entries); when
//! they do not, the data clusters in the way move to the end of the file
//! first. Every step leaves a delta that opens, and that `check` at worst
//! trims: the moved data is written and synced before the BAT points at
//! it, the BAT before the old places are cleared, and the header (which
//! alone says how large the disk and its BAT are) last.
//!
//! Shrinking drops the BAT entries past the new end, header and BAT in one
//! synced write of the metadata pages (their data is past the disk's end
//! from then on), then gives the tail of the file back.

use ploop_io::{AlignedBuf, SharedIo};

use super::delta::{read_metadata, write_metadata_pages, META_PAGE};
use super::header::{entry_to_offset, offset_to_entry, Header, FLAG_EMPTY, HEADER_SIZE};
use super::scan_bat;
use crate::{Error, Result};

/// Check that a closed delta can be resized to `new_size` bytes, writing
/// nothing: it is clean, its BAT sound, the size fits its version, and a
/// format extension it carries may be dropped. Returns its header, BAT,
/// file size and the header a fresh delta of that size would have.
pub fn plan(io: &SharedIo, new_size: u64) -> Result<(Header, Vec<u32>, u64, Header)> {
    let path = io.describe();
    let (header, bat, size) = read_metadata(io)?;
    if header.in_use {
        return Err(Error::Dirty { path });
    }
    if let Some(p) = scan_bat(&header, &bat, size).into_iter().next() {
        return Err(Error::corrupt(&path, p.to_string()));
    }
    if header.raw.format_extension_offset != 0 {
        if let super::ext::State::Live(x) = super::ext::read(io, &header, &bat, size)
            .map_err(|e| Error::io(&path, "reading the format extension", 0, e))?
        {
            if let Some(f) = x.features.iter().find(|f| f.forbids_dropping()) {
                return Err(Error::Invalid(format!(
                    "{path}: its format extension holds a feature this tool does not know and must keep ({f:?}): it cannot be resized"
                )));
            }
        }
    }
    let target = Header::new(new_size, header.cluster_size, header.version)
        .map_err(|e| Error::Invalid(format!("{path}: a {new_size}-byte disk: {e}")))?;
    Ok((header, bat, size, target))
}

/// Resize a closed delta (its file locked by the caller) to hold a disk of
/// `new_size` bytes, rounded up to whole clusters; with `preallocate`,
/// clusters added are allocated and zeroed, as in a preallocated image.
/// Returns the size it now has.
pub fn resize(io: &SharedIo, new_size: u64, preallocate: bool) -> Result<u64> {
    let path = io.describe();
    let (header, mut bat, size, target) = plan(io, new_size)?;
    let cs = header.cluster_size;
    let ioerr = |op: &'static str, off: u64| {
        let p = path.clone();
        move |e| Error::io(p, op, off, e)
    };
    let old_entries = bat.len();
    let new_entries = target.bat_entries as usize;
    if new_entries == old_entries && target.virtual_size == header.virtual_size {
        return Ok(target.virtual_size);
    }
    // The data area never starts earlier than it did: clusters already
    // there stay where they are.
    let new_do = header.data_offset.max(target.data_offset);
    let mut raw = header.raw;
    raw.bat_entries = target.raw.bat_entries;
    raw.size_in_sectors = target.raw.size_in_sectors;
    raw.heads = target.raw.heads;
    raw.cylinders = target.raw.cylinders;
    // A changed-block bitmap covers the old size: it goes, in a synced
    // header write of its own before any of its clusters can be reused
    // (plan refused one that may not be dropped).
    if raw.format_extension_offset != 0 {
        tracing::warn!("{path}: dropping its format extension: the disk changes size");
        let mut dropped = header.raw;
        dropped.format_extension_offset = 0;
        write_metadata_pages(io, 0..1, &dropped, &bat)?;
        io.flush().map_err(ioerr("syncing the header", 0))?;
        raw.format_extension_offset = 0;
    }
    raw.first_block_offset = u32::try_from(new_do / crate::SECTOR).map_err(|_| {
        Error::Invalid(format!("{path}: the BAT for {new_size} bytes is too large"))
    })?;
    let write_pages = |pages: std::ops::Range<u64>, raw: &super::RawHeader, bat: &[u32]| {
        write_metadata_pages(io, pages, raw, bat)
    };
    let sync = |op: &'static str| io.flush().map_err(ioerr(op, 0));

    if new_entries < old_entries {
        // Shrink: header and BAT in one go (page 0 last), then the tail.
        // The data area stays where it is, so the BAT keeps enough
        // entries to reach it (zeros past the disk's end: OpenVZ and qemu
        // accept a table longer than the disk).
        bat.truncate(new_entries);
        let reach = (header
            .data_offset
            .saturating_sub(cs)
            .saturating_sub(HEADER_SIZE as u64)
            / 4
            + 1) as usize;
        if header.data_offset > cs && bat.len() < reach {
            bat.resize(reach, 0);
        }
        raw.bat_entries = u32::try_from(bat.len()).expect("no more than it had");
        Header::validate(raw, &path)?;
        let pages = header.data_offset.div_ceil(META_PAGE);
        write_pages(1..pages, &raw, &bat)?;
        write_pages(0..1, &raw, &bat)?;
        sync("syncing the smaller BAT")?;
        let end = bat
            .iter()
            .filter(|&&e| e != 0)
            .map(|&e| entry_to_offset(&header, e) + cs)
            .max()
            .unwrap_or(0)
            .max(new_do);
        if end < size {
            io.set_len(end)
                .map_err(ioerr("truncating the freed tail", end))?;
            sync("syncing the truncated file")?;
        }
        return Ok(target.virtual_size);
    }

    bat.try_reserve(new_entries - old_entries).map_err(|_| {
        Error::Invalid(format!(
            "{path}: a BAT of {new_entries} entries does not fit in memory"
        ))
    })?;
    bat.resize(new_entries, 0);
    Header::validate(raw, &path)?;
    let mut end = size.div_ceil(cs).max(new_do.div_ceil(cs)) * cs;
    let mut buf = AlignedBuf::zeroed(cs as usize);
    let mut moved = false;
    if new_do > header.data_offset {
        // Data clusters where the larger BAT goes move to the end.
        for slot in bat.iter_mut().take(old_entries) {
            let e = *slot;
            if e == 0 {
                continue;
            }
            let off = entry_to_offset(&header, e);
            if off >= new_do {
                continue;
            }
            io.read_at(buf.as_mut_slice(), off)
                .map_err(ioerr("reading a cluster to move", off))?;
            io.write_at(buf.as_slice(), end)
                .map_err(ioerr("writing a moved cluster", end))?;
            *slot = offset_to_entry(&target, end).ok_or_else(|| {
                Error::Invalid(format!("{path}: the file grows too large for its version"))
            })?;
            end += cs;
            moved = true;
        }
    }
    if preallocate {
        let zeros = AlignedBuf::zeroed(cs as usize);
        for e in bat.iter_mut().skip(old_entries) {
            io.write_at(zeros.as_slice(), end)
                .map_err(ioerr("zeroing a new cluster", end))?;
            *e = offset_to_entry(&target, end).ok_or_else(|| {
                Error::Invalid(format!("{path}: the file grows too large for its version"))
            })?;
            end += cs;
        }
    }
    if moved || preallocate {
        // Data first.
        sync("syncing moved and new clusters")?;
    }
    if moved {
        // The old BAT now points at the moved copies (the header still
        // says the old size: the new entries are not read yet).
        let old_pages = header.data_offset.div_ceil(META_PAGE);
        write_pages(1..old_pages, &header.raw, &bat[..old_entries])?;
        write_pages(0..1, &header.raw, &bat[..old_entries])?;
        sync("syncing the moved clusters' BAT entries")?;
    }
    if bat.iter().any(|&e| e != 0) {
        raw.flags &= !FLAG_EMPTY;
    }
    // The new BAT pages (zeros where clusters were), then the header.
    let pages = new_do.div_ceil(META_PAGE);
    write_pages(1..pages, &raw, &bat)?;
    sync("syncing the larger BAT")?;
    write_pages(0..1, &raw, &bat)?;
    sync("syncing the new header")?;
    Ok(target.virtual_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ploop::compact::tests::{fresh, CS};
    use crate::ploop::{OpenFlags, PloopDelta, Version};

    fn pattern(cluster: u64) -> Vec<u8> {
        (0..CS)
            .map(|i| (i as u8) ^ (cluster as u8) ^ 0x5a)
            .collect()
    }

    /// A delta of `clusters` clusters with every third one written.
    fn delta(clusters: u64, version: Version) -> SharedIo {
        let (io, d) = fresh(clusters, version);
        for c in (0..clusters).step_by(3) {
            d.write_cluster(c, 0, &pattern(c), None).unwrap();
        }
        d.close().unwrap();
        io
    }

    fn read_back(io: &SharedIo, clusters: u64) -> PloopDelta {
        let d = PloopDelta::open(io.clone(), OpenFlags::default()).unwrap();
        let mut buf = vec![0u8; CS as usize];
        for c in 0..clusters {
            match d.map(c) {
                Some(off) => {
                    d.read_data(&mut buf, off).unwrap();
                    assert!(c % 3 == 0 && buf == pattern(c), "cluster {c}");
                }
                None => assert!(c % 3 != 0, "cluster {c} lost"),
            }
        }
        d
    }

    /// Growing past what the header cluster's BAT holds (8,176 entries of
    /// 32 KiB clusters) moves the data clusters in the way; every cluster
    /// reads back, the new ones are unmapped, and the check is clean.
    #[test]
    fn growth_moves_clusters_out_of_the_bats_way() {
        for version in [Version::V1, Version::V2] {
            let io = delta(8000, version);
            let before = read_metadata(&io).unwrap().0;
            let got = resize(&io, 30_000 * CS, false).unwrap();
            assert_eq!(got, 30_000 * CS);
            let (h, bat, size) = read_metadata(&io).unwrap();
            assert!(
                h.data_offset > before.data_offset,
                "the BAT grew past its cluster"
            );
            assert_eq!(h.bat_entries, 30_000);
            assert!(scan_bat(&h, &bat, size).is_empty());
            let d = read_back(&io, 8000);
            assert_eq!(d.virtual_size(), 30_000 * CS);
            assert!((8000..30_000).all(|c| d.map(c).is_none()));
            let report = crate::ploop::check::check(&io, false).unwrap();
            assert!(report.is_clean(), "{version:?}: {:?}", report.problems);
        }
    }

    #[test]
    fn growth_in_place_and_shrink() {
        let io = delta(100, Version::V2);
        let do_before = read_metadata(&io).unwrap().0.data_offset;
        resize(&io, 1000 * CS + 1, false).unwrap();
        let h = read_metadata(&io).unwrap().0;
        assert_eq!((h.virtual_size, h.data_offset), (1001 * CS, do_before));
        read_back(&io, 100);
        // Shrink below the written clusters: those past the end go, the
        // file's tail with them.
        let size_before = io.size().unwrap();
        resize(&io, 50 * CS, false).unwrap();
        let (h, bat, size) = read_metadata(&io).unwrap();
        assert_eq!(h.virtual_size, 50 * CS);
        assert!(scan_bat(&h, &bat, size).is_empty());
        assert!(size < size_before, "{size} < {size_before}");
        read_back(&io, 50);
        // Preallocated growth maps every new cluster, zeroed.
        resize(&io, 60 * CS, true).unwrap();
        let d = PloopDelta::open(io.clone(), OpenFlags::default()).unwrap();
        let mut buf = vec![1u8; CS as usize];
        for c in 50..60 {
            d.read_data(&mut buf, d.map(c).expect("allocated")).unwrap();
            assert!(buf.iter().all(|&b| b == 0));
        }
    }

    /// Shrinking below what the first BAT cluster holds keeps the data
    /// area where it is: the BAT keeps entries (zeros) up to it, so the
    /// header stays valid.
    #[test]
    fn a_shrink_across_a_bat_cluster_keeps_a_valid_header() {
        let io = delta(9000, Version::V2);
        let (h, _, _) = read_metadata(&io).unwrap();
        assert!(h.data_offset > CS, "the BAT spans two clusters");
        resize(&io, 100 * CS, false).unwrap();
        let (h2, bat, size) = read_metadata(&io).unwrap();
        assert_eq!(h2.virtual_size, 100 * CS);
        assert_eq!(h2.data_offset, h.data_offset);
        assert!(bat[100..].iter().all(|&e| e == 0));
        assert!(scan_bat(&h2, &bat, size).is_empty());
        read_back(&io, 100);
        assert!(crate::ploop::check::check(&io, false).unwrap().is_clean());
        // And grown again from there.
        resize(&io, 9000 * CS, false).unwrap();
        read_back(&io, 100);
    }
}
