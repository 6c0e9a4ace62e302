//! Bad input gets a clear error, never a panic: exit code 1, stderr starts
//! with `ploop: error:`, names the file and says what is wrong. `ploop
//! check` repairs what a crash can leave behind, and `check -r` reports
//! without touching anything.

mod common;

use std::ffi::OsStr;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// 64 KiB clusters: the BAT of a 64 MiB disk fits the first cluster, so
/// data cluster N of the file starts at byte N * 64 KiB.
const CLUSTER: usize = 64 << 10;
const SIZE: usize = 64 * MIB;
/// OpenVZ's in-use magic ("Ynot"), header bytes 44..48.
const IN_USE: u32 = 0x746F_6E59;

/// A disk in `tmp/disk/` with data in virtual clusters 0..=3 (file
/// clusters 1..=4, in that order).
fn fixture(tmp: &Path) -> TestDisk {
    let dir = tmp.join("disk");
    std::fs::create_dir(&dir).unwrap();
    let mut disk = TestDisk::init(&dir, SIZE, &["-b", "128"]);
    disk.write_random(0xbad, 0, 4 * CLUSTER);
    assert_eq!(
        std::fs::metadata(&disk.image).unwrap().len(),
        5 * CLUSTER as u64,
        "fixture layout: header cluster + 4 data clusters"
    );
    for c in 0..4u64 {
        assert_eq!(
            read_u32(&disk.image, 64 + 4 * c),
            c as u32 + 1,
            "fixture layout: virtual cluster {c} at file cluster {}",
            c + 1
        );
    }
    disk
}

/// Exit code 1, `ploop: error:` first, no panic, the file named, and every
/// needle (alternatives separated by `|`, case-insensitive) present.
#[track_caller]
fn expect_error(out: &Out, file: &str, needles: &[&str]) {
    assert!(
        !out.stderr.contains("panicked") && out.code != Some(101),
        "panic instead of an error:\n{out}"
    );
    assert_eq!(out.code, Some(1), "expected exit code 1:\n{out}");
    assert!(
        out.stderr.starts_with("ploop: error:"),
        "stderr must start with `ploop: error:`:\n{out}"
    );
    assert!(
        out.stderr.contains(file),
        "the error does not name {file}:\n{out}"
    );
    let err = out.stderr.to_lowercase();
    for n in needles {
        assert!(
            n.split('|').any(|alt| err.contains(&alt.to_lowercase())),
            "the error does not say {n:?}:\n{out}"
        );
    }
}

/// `ploop CMD DiskDescriptor.xml` for each command must fail cleanly.
#[track_caller]
fn expect_errors(dd: &Path, cmds: &[&str], file: &str, needles: &[&str]) {
    for cmd in cmds {
        let out = ploop(&[OsStr::new(cmd), dd.as_os_str()]);
        expect_error(&out, file, needles);
    }
}

/// Corrupt the fixture's image with `f`, then `read` and `info` must fail.
#[track_caller]
fn corrupt_image(f: impl FnOnce(&TestDisk), needles: &[&str]) {
    let tmp = tempdir();
    let disk = fixture(tmp.path());
    f(&disk);
    expect_errors(&disk.dd, &["read", "info"], "root.hdd", needles);
}

fn set_u32(path: &Path, at: u64, v: u32) {
    patch(path, at, &v.to_le_bytes());
}

fn set_len(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

#[test]
fn wrong_signature() {
    corrupt_image(
        |d| patch(&d.image, 0, b"NotAPloopImage!!"),
        &["signature|not a ploop"],
    );
}

#[test]
fn cluster_size_zero() {
    corrupt_image(|d| set_u32(&d.image, 28, 0), &["cluster size"]);
}

#[test]
fn cluster_size_not_power_of_two() {
    corrupt_image(
        |d| set_u32(&d.image, 28, 3000),
        &["cluster size", "3000", "power of two"],
    );
}

#[test]
fn cluster_size_too_large() {
    // A power of two, but 1 GiB: must not be used to size a buffer.
    corrupt_image(|d| set_u32(&d.image, 28, 1 << 21), &["cluster size"]);
}

#[test]
fn size_field_overflow() {
    corrupt_image(
        |d| patch(&d.image, 36, &u64::MAX.to_le_bytes()),
        &["size", "overflow|too large|too big|needs"],
    );
}

#[test]
fn bat_entries_field_huge() {
    // u32::MAX entries: 16 GiB of BAT that the file does not hold.
    corrupt_image(
        |d| set_u32(&d.image, 32, u32::MAX),
        &["bat|truncated|overlaps"],
    );
}

#[test]
fn bat_entry_past_eof() {
    corrupt_image(
        |d| set_u32(&d.image, 64, 0x0010_0000),
        &["cluster 0", "past|beyond|eof|end of the file"],
    );
}

#[test]
fn bat_entry_into_metadata() {
    // first_block_offset moved to two clusters: entry 0 (file cluster 1)
    // now points into the header/BAT area.
    corrupt_image(|d| set_u32(&d.image, 48, 2 * 128), &["header|metadata|bat"]);
}

/// A data start off the cluster grid (qemu's spec allows sector-aligned
/// ones for version 1; OpenVZ refuses them): refused, never "repaired" by
/// dropping every entry, and `check -r` leaves the file alone.
#[test]
fn first_block_off_the_cluster_grid_is_refused() {
    for (sectors, what) in [
        (1u32, "one sector"),
        (0, "zero"),
        (129, "a cluster and a sector"),
    ] {
        let tmp = tempdir();
        let disk = fixture(tmp.path());
        set_u32(&disk.image, 48, sectors);
        let before = std::fs::read(&disk.image).unwrap();
        expect_errors(
            &disk.dd,
            &["read", "info"],
            "root.hdd",
            &["whole number of"],
        );
        let out = check(&disk.dd, false);
        assert_ne!(out.code, Some(0), "{what}: check must fail:\n{out}");
        assert!(
            std::fs::read(&disk.image).unwrap() == before,
            "{what}: check changed the image"
        );
    }
}

/// A delta file with a huge sparse tail (1 TiB) opens, reads, and a writer
/// trims the tail; free space is kept as runs, not one entry per cluster.
#[test]
fn a_huge_sparse_tail_is_trimmed() {
    let tmp = tempdir();
    let mut disk = fixture(tmp.path());
    let used = std::fs::metadata(&disk.image).unwrap().len();
    set_len(&disk.image, 1 << 40);
    disk.assert_content("read with a sparse tail");
    disk.write_random(9, 0, 4096);
    disk.assert_content("write with a sparse tail");
    assert_eq!(std::fs::metadata(&disk.image).unwrap().len(), used);
    peers_check(&disk.image);
}

#[test]
fn duplicated_bat_entries() {
    corrupt_image(
        |d| set_u32(&d.image, 64 + 4 * 2, read_u32(&d.image, 64 + 4)),
        &["duplicat|both point|more than once|twice"],
    );
}

#[test]
fn truncated_inside_header() {
    corrupt_image(|d| set_len(&d.image, 40), &["truncated|too short|short"]);
}

#[test]
fn truncated_just_past_header() {
    corrupt_image(
        |d| set_len(&d.image, 64 + 40),
        &["truncated|too short|short"],
    );
}

#[test]
fn truncated_data_clusters() {
    // Header and BAT intact, the data clusters they map are gone.
    corrupt_image(
        |d| set_len(&d.image, CLUSTER as u64 + 100),
        &["past|beyond|eof|end of the file|truncated"],
    );
}

#[test]
fn empty_image_file() {
    corrupt_image(
        |d| set_len(&d.image, 0),
        &["truncated|too short|short|empty"],
    );
}

/// Edit the descriptor's text.
fn edit_dd(dd: &Path, from: &str, to: &str) {
    let s = std::fs::read_to_string(dd).unwrap();
    assert!(s.contains(from), "{from} not in {}:\n{s}", dd.display());
    std::fs::write(dd, s.replace(from, to)).unwrap();
}

#[test]
fn descriptor_names_missing_file() {
    let tmp = tempdir();
    let disk = fixture(tmp.path());
    edit_dd(
        &disk.dd,
        "<File>root.hdd</File>",
        "<File>missing.hdd</File>",
    );
    expect_errors(
        &disk.dd,
        &["read", "info", "check"],
        "missing.hdd",
        &["missing|no such file|not found"],
    );
    let out = ploop(&[
        OsStr::new("write"),
        disk.dd.as_os_str(),
        "/dev/null".as_ref(),
    ]);
    expect_error(&out, "missing.hdd", &["missing|no such file|not found"]);
}

#[test]
fn snapshot_tree_with_cycle() {
    let tmp = tempdir();
    let disk = fixture(tmp.path());
    disk.snapshot();
    // The base's parent becomes the top: base -> top -> base.
    edit_dd(
        &disk.dd,
        "<ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID>",
        &format!("<ParentGUID>{TOP_GUID}</ParentGUID>"),
    );
    expect_errors(
        &disk.dd,
        &[
            "read",
            "info",
            "check",
            "snapshot-list",
            "snapshot",
            "snapshot-merge",
        ],
        "DiskDescriptor.xml",
        &["cycle|loop|circular"],
    );
}

#[test]
fn image_path_with_dotdot() {
    let tmp = tempdir();
    let disk = fixture(tmp.path());
    // The file exists: only the path is wrong.
    std::fs::copy(&disk.image, tmp.path().join("x.hdd")).unwrap();
    edit_dd(&disk.dd, "<File>root.hdd</File>", "<File>../x.hdd</File>");
    expect_errors(
        &disk.dd,
        &["read", "info", "check", "snapshot-list", "snapshot"],
        "DiskDescriptor.xml",
        &["../x.hdd", "leaves|outside"],
    );
}

#[test]
fn image_path_absolute_outside() {
    let tmp = tempdir();
    let disk = fixture(tmp.path());
    let outside = tmp.path().join("x.hdd");
    std::fs::copy(&disk.image, &outside).unwrap();
    let outside = outside.to_str().unwrap().to_string();
    edit_dd(
        &disk.dd,
        "<File>root.hdd</File>",
        &format!("<File>{outside}</File>"),
    );
    expect_errors(
        &disk.dd,
        &["read", "info", "check", "snapshot-list", "snapshot"],
        "DiskDescriptor.xml",
        &[&outside, "leaves|outside"],
    );
}

#[test]
fn image_path_absolute_inside_is_accepted() {
    let tmp = tempdir();
    let disk = fixture(tmp.path());
    let inside = disk.image.canonicalize().unwrap();
    edit_dd(
        &disk.dd,
        "<File>root.hdd</File>",
        &format!("<File>{}</File>", inside.display()),
    );
    disk.assert_content("read through an absolute path inside the folder");
}

#[test]
fn malformed_descriptor() {
    let tmp = tempdir();
    let disk = fixture(tmp.path());
    let good = std::fs::read_to_string(&disk.dd).unwrap();
    let cases: Vec<(&str, String, &[&str])> = vec![
        ("truncated XML", good[..good.len() / 2].to_string(), &[]),
        ("not XML", "this is not xml\n".to_string(), &[]),
        ("empty file", String::new(), &[]),
        (
            "mismatched tags",
            good.replace("</Disk_size>", "</Disk_sizeX>"),
            &[],
        ),
        (
            "size not a number",
            good.replace(
                "<Disk_size>131072</Disk_size>",
                "<Disk_size>abc</Disk_size>",
            ),
            &["disk_size"],
        ),
        (
            "blocksize zero",
            good.replace("<Blocksize>128</Blocksize>", "<Blocksize>0</Blocksize>"),
            &["blocksize"],
        ),
        (
            "no images",
            {
                let a = good.find("<Image>").unwrap();
                let b = good.find("</Image>").unwrap() + "</Image>".len();
                format!("{}{}", &good[..a], &good[b..])
            },
            &[],
        ),
        (
            "top GUID without an image",
            good.replace(
                &format!("<TopGUID>{TOP_GUID}</TopGUID>"),
                "<TopGUID>{11111111-2222-3333-4444-555555555555}</TopGUID>",
            ),
            &[],
        ),
    ];
    for (what, text, needles) in cases {
        std::fs::write(&disk.dd, &text).unwrap();
        for cmd in ["read", "info", "check", "snapshot-list", "snapshot"] {
            let out = ploop(&[OsStr::new(cmd), disk.dd.as_os_str()]);
            assert!(
                out.code == Some(1),
                "{what}: `ploop {cmd}` must fail:\n{out}\n--- descriptor:\n{text}"
            );
            expect_error(&out, "DiskDescriptor.xml", needles);
        }
    }
    // Nothing was created beside the broken descriptor.
    let names: Vec<String> = std::fs::read_dir(&disk.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("root.hdd."))
        .collect();
    assert!(names.is_empty(), "stray deltas: {names:?}");
}

/// `ploop write` past the end of the disk writes nothing at all, whether
/// the input is a file or a pipe of unknown length.
#[test]
fn a_write_past_the_end_writes_nothing() {
    let tmp = tempdir();
    let disk = TestDisk::init(tmp.path(), 2 * MIB, &[]);
    let src = tmp.path().join("3M.bin");
    std::fs::write(&src, data(7, 3 * MIB)).unwrap();
    let out = ploop(&[
        OsStr::new("write"),
        OsStr::new("--offset"),
        OsStr::new("64K"),
        disk.dd.as_os_str(),
        src.as_os_str(),
    ]);
    disk.assert_content("after a file too long for the disk");
    expect_error(&out, "DiskDescriptor.xml", &["past the end"]);
    // The same bytes through a pipe.
    let mut child = std::process::Command::new(bin())
        .args([
            OsStr::new("write"),
            OsStr::new("--offset"),
            OsStr::new("64K"),
        ])
        .arg(&disk.dd)
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(&data(7, 3 * MIB));
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    let out = Out::from_output("ploop write - < pipe".into(), out);
    disk.assert_content("after a pipe too long for the disk");
    expect_error(&out, "-:", &["more than"]);
    // What fits goes in, from a pipe as from a file.
    let mut child = std::process::Command::new(bin())
        .args([
            OsStr::new("write"),
            OsStr::new("--offset"),
            OsStr::new("1M"),
        ])
        .arg(&disk.dd)
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&data(8, MIB)).unwrap();
    }
    assert!(child.wait().unwrap().success());
    let mut want = vec![0u8; 2 * MIB];
    want[MIB..].copy_from_slice(&data(8, MIB));
    assert_same(&disk.read(None), &want, "a pipe that fits");
}

#[test]
fn descriptor_missing_altogether() {
    let tmp = tempdir();
    let dd = tmp.path().join("DiskDescriptor.xml");
    expect_errors(
        &dd,
        &["read", "info", "check", "snapshot-list"],
        "DiskDescriptor.xml",
        &["no such file|not found|missing"],
    );
}

// ---- ploop check: repair -------------------------------------------------

fn check(target: &Path, read_only: bool) -> Out {
    let mut args: Vec<&OsStr> = vec!["check".as_ref()];
    if read_only {
        args.push("-r".as_ref());
    }
    args.push(target.as_os_str());
    ploop(&args)
}

/// `check -r` (on the descriptor and on the file) reports the problem with
/// exit code 2 and leaves the file byte for byte as it was.
#[track_caller]
fn expect_read_only_report(disk: &TestDisk, what: &str) {
    let before = std::fs::read(&disk.image).unwrap();
    for target in [&disk.dd, &disk.image] {
        let out = check(target, true);
        assert!(!out.stderr.contains("panicked"), "{what}: panic:\n{out}");
        assert_eq!(out.code, Some(2), "{what}: check -r exit code:\n{out}");
        assert!(
            out.stdout_str().contains("root.hdd"),
            "{what}: the report names the file:\n{out}"
        );
        let after = std::fs::read(&disk.image).unwrap();
        assert!(
            before == after,
            "{what}: check -r modified the image (first difference at {:?}):\n{out}",
            first_diff(&after, &before)
        );
    }
}

/// `check` on the descriptor repairs and exits 0; a second check is clean.
#[track_caller]
fn repair(disk: &TestDisk, what: &str) -> Out {
    let out = check(&disk.dd, false);
    assert_eq!(out.code, Some(0), "{what}: check must repair:\n{out}");
    assert!(
        out.stdout_str().contains("repaired"),
        "{what}: check says it repaired:\n{out}"
    );
    let again = check(&disk.dd, true);
    assert_eq!(again.code, Some(0), "{what}: clean after repair:\n{again}");
    out
}

#[test]
fn check_clean_image() {
    let tmp = tempdir();
    let disk = fixture(tmp.path());
    let before = std::fs::read(&disk.image).unwrap();
    for ro in [true, false] {
        for target in [&disk.dd, &disk.image] {
            let out = check(target, ro);
            assert_eq!(out.code, Some(0), "clean image:\n{out}");
            assert!(out.stdout_str().contains("clean"), "{out}");
        }
    }
    assert!(
        before == std::fs::read(&disk.image).unwrap(),
        "check changed a clean image"
    );
}

#[test]
fn check_clears_stale_in_use_flag() {
    let tmp = tempdir();
    let mut disk = fixture(tmp.path());
    set_u32(&disk.image, 44, IN_USE);

    // A writer refuses the dirty image and says what to do.
    let src = tmp.path().join("small.bin");
    std::fs::write(&src, data(7, 1000)).unwrap();
    let out = ploop(&[OsStr::new("write"), disk.dd.as_os_str(), src.as_os_str()]);
    expect_error(&out, "root.hdd", &["check|in use|in-use|not closed"]);
    // Readers still see the data.
    disk.assert_content("read of an image with a stale in-use flag");

    expect_read_only_report(&disk, "stale in-use flag");
    let out = repair(&disk, "stale in-use flag");
    assert!(out.stdout_str().contains("in-use"), "{out}");
    assert_eq!(read_u32(&disk.image, 44), 0, "in-use flag after repair");
    peers_check(&disk.image);

    disk.write_random(8, 3 * CLUSTER - 10, 20_000);
    disk.assert_content("write after repair");
    peers_check(&disk.image);
}

/// An offline snapshot of a top left in use (its daemon was killed) checks
/// it first: as a lower delta nothing would clear the mark, and merges into
/// it would be refused.
#[test]
fn offline_snapshot_repairs_a_top_left_in_use() {
    let tmp = tempdir();
    let disk = fixture(tmp.path());
    set_u32(&disk.image, 44, IN_USE);
    ploop_ok(&[OsStr::new("snapshot"), disk.dd.as_os_str()]);
    assert_eq!(read_u32(&disk.image, 44), 0, "in-use flag of the snapshot");
    disk.assert_content("read through the new top");
    ploop_ok(&[OsStr::new("snapshot-merge"), disk.dd.as_os_str()]);
    disk.assert_content("read after merging the new top down");
    peers_check(&disk.image);
}

#[test]
fn check_drops_bat_entry_past_eof() {
    let tmp = tempdir();
    let mut disk = fixture(tmp.path());
    set_u32(&disk.image, 64, 0x0010_0000);
    expect_read_only_report(&disk, "BAT entry past EOF");
    let out = repair(&disk, "BAT entry past EOF");
    assert!(out.stdout_str().contains("cluster 0"), "{out}");
    assert_eq!(read_u32(&disk.image, 64), 0, "entry 0 after repair");
    // Cluster 0 lost its (never durable) mapping: it reads zeros now.
    disk.expected[..CLUSTER].fill(0);
    disk.assert_content("after dropping entry 0");
    peers_check(&disk.image);
    // Its old file cluster is unreferenced now; a write reuses space.
    disk.write_random(9, 100, 5000);
    disk.assert_content("write after repair");
    peers_check(&disk.image);
}

#[test]
fn check_trims_ragged_tail() {
    let tmp = tempdir();
    let disk = fixture(tmp.path());
    let len = std::fs::metadata(&disk.image).unwrap().len();
    {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&disk.image)
            .unwrap();
        f.write_all(&data(3, 1000)).unwrap();
    }
    expect_read_only_report(&disk, "ragged tail");
    repair(&disk, "ragged tail");
    assert_eq!(
        std::fs::metadata(&disk.image).unwrap().len(),
        len,
        "file size after trimming the tail"
    );
    disk.assert_content("after trimming the tail");
    peers_check(&disk.image);
}

#[test]
fn check_trims_leaked_clusters() {
    let tmp = tempdir();
    let disk = fixture(tmp.path());
    let len = std::fs::metadata(&disk.image).unwrap().len();
    // Two whole clusters of garbage no BAT entry points at (a crash
    // between the data write and the BAT write).
    {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&disk.image)
            .unwrap();
        f.write_all(&data(4, 2 * CLUSTER)).unwrap();
    }
    expect_read_only_report(&disk, "leaked clusters");
    repair(&disk, "leaked clusters");
    assert_eq!(std::fs::metadata(&disk.image).unwrap().len(), len);
    disk.assert_content("after trimming leaked clusters");
    peers_check(&disk.image);
}

#[test]
fn check_relocates_duplicated_clusters() {
    let tmp = tempdir();
    let mut disk = fixture(tmp.path());
    // Virtual cluster 2 (B, mapped) gets virtual cluster 1's (A) entry.
    let a = CLUSTER;
    let b = 2 * CLUSTER;
    let before = disk.read(None);
    assert_same(&before, &disk.expected, "before corruption");
    set_u32(&disk.image, 64 + 8, read_u32(&disk.image, 64 + 4));
    expect_error(
        &ploop(&[OsStr::new("read"), disk.dd.as_os_str()]),
        "root.hdd",
        &["both point|duplicat"],
    );
    expect_read_only_report(&disk, "duplicated BAT entries");
    let out = repair(&disk, "duplicated BAT entries");
    assert!(
        read_u32(&disk.image, 64 + 4) != read_u32(&disk.image, 64 + 8),
        "the two entries still alias after repair:\n{out}"
    );
    // Both virtual clusters hold A's data (as read before the corruption);
    // nothing else changed.
    let a_data = before[a..a + CLUSTER].to_vec();
    disk.expected[b..b + CLUSTER].copy_from_slice(&a_data);
    disk.assert_content("after relocating the duplicate");
    qemu_check(&disk.image);
    openvz_check(&disk.image);

    // They no longer share storage: writing one leaves the other alone.
    disk.write_random(10, a + 10, 100);
    disk.assert_content("write into A after repair");
    assert_same(
        &disk.read(None)[b..b + CLUSTER],
        &a_data,
        "B keeps A's old data after A is rewritten",
    );
    qemu_check(&disk.image);
}

#[test]
fn check_read_only_several_problems() {
    let tmp = tempdir();
    let disk = fixture(tmp.path());
    set_u32(&disk.image, 44, IN_USE);
    set_u32(&disk.image, 64 + 12, read_u32(&disk.image, 64));
    set_u32(&disk.image, 64 + 8, 0x00ff_0000);
    {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&disk.image)
            .unwrap();
        f.write_all(&data(5, 1234)).unwrap();
    }
    expect_read_only_report(&disk, "several problems");
    let out = check(&disk.dd, true);
    let text = out.stdout_str();
    for n in ["in-use", "cluster 2", "and 3", "NOT repaired"] {
        assert!(text.contains(n), "check -r does not mention {n:?}:\n{out}");
    }
    let json = ploop(&[
        OsStr::new("check"),
        "-r".as_ref(),
        "--json".as_ref(),
        disk.dd.as_os_str(),
    ]);
    assert_eq!(json.code, Some(2), "{json}");
    let v: serde_json::Value = serde_json::from_slice(&json.stdout)
        .unwrap_or_else(|e| panic!("check --json is not JSON ({e}):\n{json}"));
    assert_eq!(v[0]["repaired"], false, "{json}");
    assert!(
        v[0]["problems"].as_array().is_some_and(|p| p.len() >= 4),
        "{json}"
    );
    // Then a real repair makes it pass both peers.
    repair(&disk, "several problems");
    peers_check(&disk.image);
}

// Regression: the header's first_block_offset is trusted without an upper
// bound or a cluster-alignment check (OpenVZ refuses it: "Wrong first block
// offset"). `ploop check` used to "repair" a 320 KiB image by growing it to
// 1 TiB and writing the whole metadata area page by page (gigabytes). The
// command runs under `ulimit -f` (64 MiB) so that the bug cannot fill the
// disk; with the bug it dies of SIGXFSZ instead of failing cleanly.
#[test]
fn check_refuses_absurd_first_block_offset() {
    let tmp = tempdir();
    let disk = fixture(tmp.path());
    // 2^31 sectors = 1 TiB: cluster-aligned, far past the 4 KiB BAT.
    set_u32(&disk.image, 48, 1 << 31);
    let before = std::fs::read(&disk.image).unwrap();
    expect_errors(&disk.dd, &["read", "info"], "root.hdd", &[]);

    let script = format!("ulimit -f 65536; exec timeout 20 {} check \"$0\"", bin());
    let out = run("sh", &["-c", &script, disk.dd.to_str().unwrap()]);
    let len = std::fs::metadata(&disk.image).unwrap().len();
    assert!(
        len <= before.len() as u64,
        "check grew the image from {} to {len} bytes:\n{out}",
        before.len()
    );
    assert!(
        matches!(out.code, Some(1) | Some(2)),
        "check must fail cleanly (exit 1) or report (exit 2):\n{out}"
    );
    if out.code == Some(1) {
        expect_error(&out, "root.hdd", &[]);
    }
}

// ---- a second writer -----------------------------------------------------

#[test]
fn second_writer_is_refused() {
    let tmp = tempdir();
    let mut disk = fixture(tmp.path());
    let mut first = Command::new(bin())
        .args([
            OsStr::new("write"),
            "--offset".as_ref(),
            "1000".as_ref(),
            disk.dd.as_os_str(),
            "-".as_ref(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the first writer");

    // The first writer has the image open once the in-use flag is set (it
    // takes the lock before it sets the flag).
    let start = Instant::now();
    while read_u32(&disk.image, 44) != IN_USE {
        if let Ok(Some(st)) = first.try_wait() {
            panic!("the first writer exited early: {st}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the first writer never opened the image"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let src = tmp.path().join("second.bin");
    std::fs::write(&src, data(11, 5000)).unwrap();
    let second = ploop(&[OsStr::new("write"), disk.dd.as_os_str(), src.as_os_str()]);
    expect_error(&second, "root.hdd", &["in use|locked"]);
    for cmd in ["snapshot", "check"] {
        let out = ploop(&[OsStr::new(cmd), disk.dd.as_os_str()]);
        expect_error(&out, "root.hdd", &["in use|locked"]);
    }

    // Feed the first writer and let it finish.
    let payload = data(12, 3 * CLUSTER);
    {
        let mut stdin = first.stdin.take().unwrap();
        stdin.write_all(&payload).unwrap();
    }
    let o = first.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "first writer failed: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    disk.expected[1000..1000 + payload.len()].copy_from_slice(&payload);
    disk.assert_content("after the first writer finished");
    assert_eq!(read_u32(&disk.image, 44), 0, "in-use flag after close");
    peers_check(&disk.image);

    // Now a second writer gets in.
    disk.write_random(13, 7, 70_000);
    disk.assert_content("second writer after the first closed");
}

// ---- more bad input -------------------------------------------------------

#[test]
fn interrupted_version_conversion() {
    // Header flag bit 1: a `convert -v` was interrupted half way.
    corrupt_image(|d| set_u32(&d.image, 52, 2), &["conver|version"]);
}

#[test]
fn v1_bat_entry_off_the_cluster_grid() {
    let tmp = tempdir();
    let mut disk = TestDisk::init(tmp.path(), SIZE, &["-v", "1", "-b", "128"]);
    disk.write_random(1, 0, 3 * CLUSTER);
    // v1 entries count sectors: one sector off is inside a cluster.
    let e = read_u32(&disk.image, 64);
    assert_eq!(e % 128, 0, "v1 entry {e} should be cluster-aligned");
    set_u32(&disk.image, 64, e + 1);
    expect_errors(
        &disk.dd,
        &["read", "info"],
        "root.hdd",
        &["cluster 0", "align|grid"],
    );
    expect_read_only_report(&disk, "v1 entry off the grid");
}

#[test]
fn descriptor_blocksize_differs_from_image() {
    let tmp = tempdir();
    let disk = fixture(tmp.path());
    edit_dd(
        &disk.dd,
        "<Blocksize>128</Blocksize>",
        "<Blocksize>2048</Blocksize>",
    );
    expect_errors(&disk.dd, &["read"], "root.hdd", &["cluster size"]);
    let out = ploop(&[
        OsStr::new("write"),
        disk.dd.as_os_str(),
        "/dev/null".as_ref(),
    ]);
    expect_error(&out, "root.hdd", &["cluster size"]);
}

#[test]
fn descriptor_size_larger_than_image() {
    let tmp = tempdir();
    let disk = fixture(tmp.path());
    let s = std::fs::read_to_string(&disk.dd).unwrap();
    std::fs::write(&disk.dd, s.replace("131072<", "262144<")).unwrap();
    expect_errors(&disk.dd, &["read"], "root.hdd", &["size|bytes"]);
}

// Regression: a descriptor that lists one file for two deltas is not
// rejected. `read` and `info` accept it; `write` and `snapshot-merge` fail
// with the misleading "image is in use by another process (it is locked)"
// (the process conflicts with its own shared lock on the lower "delta").
#[test]
fn descriptor_lists_one_file_twice() {
    let tmp = tempdir();
    let disk = fixture(tmp.path());
    disk.snapshot();
    let s = std::fs::read_to_string(&disk.dd).unwrap();
    let a = s
        .find("<File>root.hdd.{")
        .expect("snapshot file in descriptor");
    let b = a + s[a..].find("</File>").unwrap();
    std::fs::write(&disk.dd, format!("{}<File>root.hdd{}", &s[..a], &s[b..])).unwrap();
    for cmd in ["write", "snapshot-merge", "read", "info"] {
        let out = if cmd == "write" {
            ploop(&[OsStr::new(cmd), disk.dd.as_os_str(), "/dev/null".as_ref()])
        } else {
            ploop(&[OsStr::new(cmd), disk.dd.as_os_str()])
        };
        expect_error(
            &out,
            "root.hdd",
            &["twice|duplicate|more than once|same file"],
        );
    }
}

// Regression: I/O errors print the OS error twice, e.g.
// "root.hdd: opening at byte 0: File exists (os error 17): File exists (os
// error 17)": Error::Io's message includes its source, and main() appends
// the source chain again.
#[test]
fn init_over_existing_image() {
    let tmp = tempdir();
    let image = tmp.path().join("root.hdd");
    std::fs::write(&image, b"precious").unwrap();
    let out = ploop(&[
        OsStr::new("init"),
        "-s".as_ref(),
        "64M".as_ref(),
        "-t".as_ref(),
        "none".as_ref(),
        image.as_os_str(),
    ]);
    expect_error(&out, "root.hdd", &["exists"]);
    assert_eq!(
        std::fs::read(&image).unwrap(),
        b"precious",
        "init clobbered the file"
    );
    assert!(
        !tmp.path().join("DiskDescriptor.xml").exists(),
        "init left a descriptor behind"
    );
    assert_eq!(
        out.stderr.matches("os error").count(),
        1,
        "the OS error is printed more than once:\n{out}"
    );
}

// A crash can leave the header's "empty" flag out of step with the BAT;
// OpenVZ's check refuses such an image, ours must put it right.
#[test]
fn check_repairs_the_empty_flag() {
    let tmp = tempdir();
    let disk = fixture(tmp.path());
    let mut bytes = std::fs::read(&disk.image).unwrap();
    bytes[52] |= 1; // CIF_Empty on an image that holds data
    std::fs::write(&disk.image, &bytes).unwrap();
    let out = ploop(&[OsStr::new("check"), OsStr::new("-r"), disk.dd.as_os_str()]);
    assert_eq!(
        out.code,
        Some(2),
        "read-only check reports it: {}",
        out.stderr
    );
    ploop_ok(&[OsStr::new("check"), disk.dd.as_os_str()]);
    assert_eq!(std::fs::read(&disk.image).unwrap()[52] & 1, 0);
    let openvz = Command::new("/usr/sbin/ploop")
        .args(["check", "-f", "-c", "-r"])
        .arg(&disk.image)
        .output()
        .unwrap();
    assert!(
        openvz.status.success(),
        "{}",
        String::from_utf8_lossy(&openvz.stdout)
    );
}

// A version conversion interrupted halfway leaves a BAT with mixed units;
// check rolls it back from the backup `convert -v` keeps beside the image.
#[test]
fn check_rolls_back_an_interrupted_version_conversion() {
    let tmp = tempdir();
    let disk = fixture(tmp.path());
    let before = disk.read(None);
    let mut bytes = std::fs::read(&disk.image).unwrap();
    let data_offset = u32::from_le_bytes(bytes[48..52].try_into().unwrap()) as usize * 512;
    let mut idx = disk.image.as_os_str().to_owned();
    idx.push(".idx");
    std::fs::write(&idx, &bytes[..data_offset]).unwrap();
    // Half converted: one mapped entry already in v1 units, header marked.
    let first = (0..)
        .map(|i| 64 + 4 * i)
        .find(|&at| bytes[at..at + 4] != [0, 0, 0, 0])
        .unwrap();
    let e = u32::from_le_bytes(bytes[first..first + 4].try_into().unwrap());
    bytes[first..first + 4].copy_from_slice(&(e * 128).to_le_bytes());
    bytes[52] |= 2;
    bytes[44..48].copy_from_slice(&0x746F_6E59u32.to_le_bytes());
    std::fs::write(&disk.image, &bytes).unwrap();
    expect_errors(&disk.dd, &["read"], "root.hdd", &["conversion"]);
    ploop_ok(&[OsStr::new("check"), disk.dd.as_os_str()]);
    assert!(!Path::new(&idx).exists(), "the backup is removed once used");
    assert!(
        disk.read(None) == before,
        "content as before the conversion"
    );
    qemu_check(&disk.image);
    openvz_check(&disk.image);
}

// `convert -f` names the new file in the descriptor before the file takes
// the old name; check finishes a conversion a crash cut short, from either
// side of the rename.
#[test]
fn check_finishes_an_interrupted_format_conversion() {
    for renamed in [false, true] {
        let tmp = tempdir();
        let disk = fixture(tmp.path());
        let before = disk.read(None);
        let converted = disk.dir.join("root.hdd.convert.tmp");
        if renamed {
            // The rename happened; the descriptor was not fixed yet.
        } else {
            std::fs::rename(&disk.image, &converted).unwrap();
        }
        let dd = std::fs::read_to_string(&disk.dd).unwrap();
        std::fs::write(
            &disk.dd,
            dd.replace("<File>root.hdd</File>", "<File>root.hdd.convert.tmp</File>"),
        )
        .unwrap();
        let out = ploop(&[OsStr::new("check"), OsStr::new("-r"), disk.dd.as_os_str()]);
        assert_eq!(
            out.code,
            Some(2),
            "read-only check reports it: {}",
            out.stderr
        );
        ploop_ok(&[OsStr::new("check"), disk.dd.as_os_str()]);
        assert!(!converted.exists());
        let dd = std::fs::read_to_string(&disk.dd).unwrap();
        assert!(dd.contains("<File>root.hdd</File>"), "{dd}");
        assert!(disk.read(None) == before, "renamed={renamed}: content kept");
        qemu_check(&disk.image);
    }
}

/// Usage errors exit 1 like other errors (2 is `check -r` finding
/// problems), and a bad `-B` is refused before anything is created.
#[test]
fn usage_errors_exit_1_and_a_bad_fs_block_leaves_nothing() {
    let tmp = tempdir();
    let out = ploop(&["check", "--no-such-flag", "DiskDescriptor.xml"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert_eq!(ploop(&["--help"]).code, Some(0));
    let img = tmp.path().join("root.hdd");
    for bad in ["4x", "4294971392"] {
        let out = ploop(&[
            OsStr::new("init"),
            "-s".as_ref(),
            "64M".as_ref(),
            "-B".as_ref(),
            bad.as_ref(),
            img.as_os_str(),
        ]);
        assert_eq!(out.code, Some(1), "-B {bad}: {out}");
        assert!(!img.exists(), "-B {bad} left the image behind");
        assert!(!tmp.path().join("DiskDescriptor.xml").exists());
    }
}

/// A BAT backup (`.idx`) is trusted for nothing: one that claims a huge
/// table, sparse and terabytes long, is refused quickly and costs no
/// memory (the backup was once read whole into a buffer of its size).
#[test]
fn a_huge_sparse_bat_backup_is_refused_without_reading_it() {
    let tmp = tempdir();
    let disk = fixture(tmp.path());
    let mut bytes = std::fs::read(&disk.image).unwrap();
    bytes[52] |= 2; // a conversion interrupted
    std::fs::write(&disk.image, &bytes).unwrap();
    let mut idx = disk.image.as_os_str().to_owned();
    idx.push(".idx");
    let mut header = bytes[..64].to_vec();
    header[52] &= !2;
    header[32..36].copy_from_slice(&u32::MAX.to_le_bytes()); // bat_entries
                                                             // 1 TiB "clusters": the old check allowed a backup up to header + BAT
                                                             // + one cluster long, and then read all of it into memory.
    header[28..32].copy_from_slice(&(1u32 << 31).to_le_bytes());
    let f = std::fs::File::create(&idx).unwrap();
    f.set_len(1 << 40).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&header, 0).unwrap();
    drop(f);
    let started = std::time::Instant::now();
    let out = run(
        "timeout",
        &[
            OsStr::new("60"),
            OsStr::new(bin()),
            OsStr::new("check"),
            disk.image.as_os_str(),
        ],
    );
    expect_error(&out, "root.hdd.idx", &["not a usable bat backup"]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "check took {:?}",
        started.elapsed()
    );
}

/// A file of 0xff bytes is not a ploop image, whatever its flag bits say.
#[test]
fn check_of_junk_says_not_a_ploop_image() {
    let tmp = tempdir();
    let junk = tmp.path().join("junk.hdd");
    std::fs::write(&junk, vec![0xffu8; 1 << 20]).unwrap();
    for args in [&["check"][..], &["check", "-r"][..]] {
        let mut a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        a.push(junk.as_os_str());
        let out = ploop(&a);
        expect_error(&out, "junk.hdd", &["not a ploop image"]);
    }
}

/// qemu and OpenVZ accept a header whose disk size needs fewer BAT
/// entries than the table holds, and one whose size needs more (the
/// clusters past the table read as zeros): so must we, reading what qemu
/// reads. Tried on qemu's own sample image with its size field changed.
#[test]
fn a_bat_longer_or_shorter_than_the_disk_is_read_as_qemu_reads_it() {
    let tmp = tempdir();
    let sample = sample_image(tmp.path(), "parallels-v2");
    for (name, sectors) in [("shorter-disk", 2048u32), ("longer-disk", 8192)] {
        let img = tmp.path().join(format!("{name}.hds"));
        std::fs::copy(&sample, &img).unwrap();
        set_u32(&img, 36, sectors);
        let size = u64::from(sectors) * 512;
        qemu_check(&img);
        openvz_check(&img);
        // Our check finds nothing to repair and changes nothing.
        let before = std::fs::read(&img).unwrap();
        ploop_ok(&[OsStr::new("check"), img.as_os_str()]);
        assert!(
            std::fs::read(&img).unwrap() == before,
            "{name}: check changed the file"
        );
        // The bytes qemu reads.
        let want = tmp.path().join(format!("{name}.raw"));
        run(
            "qemu-img",
            &[
                OsStr::new("convert"),
                OsStr::new("-f"),
                OsStr::new("parallels"),
                OsStr::new("-O"),
                OsStr::new("raw"),
                img.as_os_str(),
                want.as_os_str(),
            ],
        )
        .success();
        let want = std::fs::read(&want).unwrap();
        assert_eq!(want.len() as u64, size);
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let adopted = dir.join("root.hds");
        std::fs::copy(&img, &adopted).unwrap();
        ploop_ok(&[
            OsStr::new("restore-descriptor"),
            dir.as_os_str(),
            adopted.as_os_str(),
        ]);
        let got = ploop_ok(&[
            OsStr::new("read"),
            dir.join("DiskDescriptor.xml").as_os_str(),
        ])
        .stdout;
        assert_same(&got, &want, name);
    }
}
