//! Compatibility with the independent tools: images we write must pass
//! qemu-img's and OpenVZ's checks and read the same through qemu-img;
//! images qemu writes must read the same through us.

mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::*;

const SIZE: usize = 64 * MIB;

/// Writes at awkward places: unaligned, across cluster boundaries, at the
/// very end of the disk, and overwriting earlier data.
fn write_pattern(disk: &mut TestDisk, cluster: usize, seed: u64) {
    disk.write_random(seed, 5000, 3 * MIB + 777);
    disk.write_random(seed + 1, 7 * cluster - 1000, 2000);
    disk.write_random(seed + 2, 40 * MIB + 123, MIB + MIB / 2);
    disk.write_random(seed + 3, SIZE - 7000, 7000);
    disk.write_random(seed + 4, MIB - 17, 100);
    disk.write_random(seed + 5, 20 * MIB, 2 * cluster);
}

/// `qemu-img compare -f parallels -F raw IMAGE expected.raw` must pass.
#[track_caller]
fn qemu_compare(disk: &TestDisk, image: &Path) {
    let raw = disk.expected_raw();
    run(
        "qemu-img",
        &[
            OsStr::new("compare"),
            "-f".as_ref(),
            "parallels".as_ref(),
            "-F".as_ref(),
            "raw".as_ref(),
            image.as_os_str(),
            raw.as_os_str(),
        ],
    )
    .success();
    std::fs::remove_file(raw).ok();
}

fn roundtrip(extra: &[&str], cluster: usize) {
    let tmp = tempdir();
    let mut disk = TestDisk::init(tmp.path(), SIZE, extra);
    qemu_check(&disk.image);
    // OpenVZ's verdicts are collected and asserted last, so that a failure
    // there does not hide what qemu-img and our own read say.
    let mut openvz = vec![("fresh image", openvz_check_result(&disk.image))];
    write_pattern(&mut disk, cluster, 0x1234);
    qemu_check(&disk.image);
    qemu_compare(&disk, &disk.image);
    disk.assert_content(&format!("ploop read after writes ({extra:?})"));
    openvz.push(("after writes", openvz_check_result(&disk.image)));
    let failed: Vec<String> = openvz
        .iter()
        .filter(|(_, o)| !o.ok())
        .map(|(when, o)| format!("{when}:\n{o}"))
        .collect();
    assert!(
        failed.is_empty(),
        "OpenVZ's ploop check rejects the image ({extra:?}):\n{}",
        failed.join("\n")
    );
}

#[test]
fn roundtrip_v2_1m_clusters() {
    roundtrip(&["-b", "2048"], MIB);
}

#[test]
fn roundtrip_v2_64k_clusters() {
    roundtrip(&["-b", "128"], 64 << 10);
}

#[test]
fn roundtrip_v1_1m_clusters() {
    roundtrip(&["-v", "1"], MIB);
    let tmp = tempdir();
    let disk = TestDisk::init(tmp.path(), SIZE, &["-v", "1"]);
    let head = std::fs::read(&disk.image).unwrap();
    assert_eq!(
        &head[..16],
        b"WithoutFreeSpace",
        "-v 1 must write a v1 signature"
    );
}

// Regression: `init -f preallocated` leaves the CIF_Empty flag set on an
// image whose clusters are all allocated (OpenVZ: "CIF_Empty flag is
// incorrect", exit 7), and its fallocate()d clusters become unwritten
// extents that partial writes split off the cluster grid (OpenVZ: "contains
// uninitialized blocks ... not aligned to cluster size", exit 11).
#[test]
fn roundtrip_preallocated() {
    roundtrip(&["-f", "preallocated"], MIB);
}

/// write, snapshot, write more: every delta passes both peers, every
/// snapshot reads as it was, and merging brings back one clean file.
fn snapshots(extra: &[&str], cluster: usize) {
    let tmp = tempdir();
    let mut disk = TestDisk::init(tmp.path(), SIZE, extra);
    write_pattern(&mut disk, cluster, 0x50);
    let at_a = disk.expected.clone();
    let a = disk.snapshot();

    // Partial writes into clusters the base holds: copy-on-write.
    disk.write_random(0x60, 5000 + cluster / 3, 4096);
    disk.write_random(0x61, 10 * MIB + 1, 2 * MIB);
    disk.write_random(0x62, SIZE - 100, 100);
    let at_b = disk.expected.clone();
    let b = disk.snapshot();

    disk.write_random(0x70, 3 * cluster + 11, cluster);
    disk.write_random(0x71, 30 * MIB, 5 * MIB / 2);

    let files = disk.delta_files();
    assert_eq!(files.len(), 3, "base + 2 snapshots: {files:?}");
    assert_eq!(files[0], disk.image.canonicalize().unwrap());
    for f in &files[1..] {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("root.hdd.{") && name.ends_with('}'),
            "delta file name {name} is not root.hdd.{{uuid}}"
        );
    }
    for f in &files {
        peers_check(f);
    }
    disk.assert_content("top after two snapshots");
    assert_same(&disk.read(Some(&a)), &at_a, "read -u A (first snapshot)");
    assert_same(&disk.read(Some(&b)), &at_b, "read -u B (second snapshot)");
    assert_same(
        &disk.read(Some(TOP_GUID)),
        &disk.expected,
        "read -u top GUID",
    );

    // Merge the top down twice: only root.hdd remains.
    ploop_ok(&[OsStr::new("snapshot-merge"), disk.dd.as_os_str()]);
    disk.assert_content("after first merge");
    assert_same(&disk.read(Some(&a)), &at_a, "read -u A after first merge");
    ploop_ok(&[OsStr::new("snapshot-merge"), disk.dd.as_os_str()]);
    disk.assert_content("after second merge");

    let snaps = disk.snapshots();
    assert_eq!(snaps.len(), 1, "one delta after merging: {snaps:#?}");
    assert_eq!(snaps[0]["uuid"], TOP_GUID);
    assert_eq!(snaps[0]["current"], true);
    let mut deltas: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("root.hdd"))
        .collect();
    deltas.sort();
    assert_eq!(
        deltas,
        vec!["root.hdd".to_string()],
        "files left after merge"
    );
    peers_check(&disk.image);
    qemu_compare(&disk, &disk.image);
}

#[test]
fn snapshots_v2_64k() {
    snapshots(&["-b", "128"], 64 << 10);
}

#[test]
fn snapshots_v1_1m() {
    snapshots(&["-v", "1"], MIB);
}

/// Images qemu made (sparse, qemu's own allocation order) read the same
/// through us, and stay valid for qemu after we write into them.
fn qemu_image(cluster: &str) {
    let tmp = tempdir();
    let dir = tmp.path();
    let q = dir.join("q.hdd");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "parallels",
            "-o",
            &format!("cluster_size={cluster}"),
            q.to_str().unwrap(),
            "64M",
        ],
    )
    .success();
    run(
        "qemu-io",
        &[
            "-f",
            "parallels",
            "-c",
            "write -P 0x5a 1000k 300k",
            "-c",
            "write -P 0x11 50M 64k",
            q.to_str().unwrap(),
        ],
    )
    .success();
    ploop_ok(&[
        OsStr::new("restore-descriptor"),
        dir.as_os_str(),
        q.as_os_str(),
    ]);

    let qraw = dir.join("q.raw");
    let convert = |what: &str| -> Vec<u8> {
        std::fs::remove_file(&qraw).ok();
        run(
            "qemu-img",
            &[
                OsStr::new("convert"),
                "-f".as_ref(),
                "parallels".as_ref(),
                "-O".as_ref(),
                "raw".as_ref(),
                q.as_os_str(),
                qraw.as_os_str(),
            ],
        )
        .success();
        let v = std::fs::read(&qraw).unwrap_or_else(|e| panic!("{what}: reading q.raw: {e}"));
        assert_eq!(v.len(), SIZE, "{what}: qemu-img convert output size");
        v
    };
    let theirs = convert("before our writes");
    let mut want = vec![0u8; SIZE];
    want[1000 << 10..1300 << 10].fill(0x5a);
    want[50 << 20..(50 << 20) + (64 << 10)].fill(0x11);
    assert_same(
        &theirs,
        &want,
        "qemu-img convert vs the pattern qemu-io wrote",
    );

    let mut disk = TestDisk::adopt(dir, &q, theirs);
    disk.assert_content(&format!("ploop read of a qemu image ({cluster} clusters)"));

    // Our writes: into qemu's clusters, across them, and into new ones.
    disk.write_random(0xc1, 999 << 10, 100_000);
    disk.write_random(0xc2, 50 * MIB - 5000, 70_000);
    disk.write_random(0xc3, 13 * MIB + 3, 3 * MIB);
    qemu_check(&q);
    let after = convert("after our writes");
    assert_same(&after, &disk.expected, "qemu-img convert after our writes");
    disk.assert_content("ploop read after our writes");
}

#[test]
fn qemu_image_64k() {
    qemu_image("64k");
}

#[test]
fn qemu_image_1m() {
    qemu_image("1M");
}

#[test]
fn qemu_image_4m() {
    qemu_image("4M");
}

#[test]
fn convert_preserves_content() {
    let tmp = tempdir();
    let mut disk = TestDisk::init(tmp.path(), SIZE, &[]);
    write_pattern(&mut disk, MIB, 0xc0);
    let dd = disk.dd.clone();
    let convert = |flag: &str, value: &str| {
        ploop_ok(&[
            OsStr::new("convert"),
            flag.as_ref(),
            value.as_ref(),
            dd.as_os_str(),
        ]);
    };

    convert("-f", "raw");
    disk.assert_content("after convert -f raw");
    let raw = std::fs::read(&disk.image).unwrap();
    assert_same(&raw, &disk.expected, "the raw image file itself");
    let info = ploop_ok(&[OsStr::new("info"), "--json".as_ref(), dd.as_os_str()]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["format"], "raw", "info after convert -f raw:\n{info}");

    convert("-f", "ploop1");
    disk.assert_content("after convert -f ploop1");
    peers_check(&disk.image);
    qemu_compare(&disk, &disk.image);

    convert("-v", "1");
    let head = std::fs::read(&disk.image).unwrap();
    assert_eq!(&head[..16], b"WithoutFreeSpace", "signature after -v 1");
    disk.assert_content("after convert -v 1");
    peers_check(&disk.image);
    qemu_compare(&disk, &disk.image);

    // Still writable as v1.
    disk.write_random(0xc9, 33 * MIB + 5, 200_000);
    peers_check(&disk.image);

    convert("-v", "2");
    let head = std::fs::read(&disk.image).unwrap();
    assert_eq!(&head[..16], b"WithouFreSpacExt", "signature after -v 2");
    disk.assert_content("after convert -v 2");
    peers_check(&disk.image);
    qemu_compare(&disk, &disk.image);

    convert("-f", "preallocated");
    disk.assert_content("after convert -f preallocated");
    peers_check(&disk.image);
    qemu_compare(&disk, &disk.image);
}

#[test]
fn snapshot_list_output() {
    let tmp = tempdir();
    let mut disk = TestDisk::init(tmp.path(), SIZE, &["-b", "128"]);
    let dd = disk.dd.clone();

    let out = ploop_ok(&[OsStr::new("snapshot-list"), dd.as_os_str()]);
    let text = out.stdout_str();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "header + one row:\n{out}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["PARENT_UUID", "C", "UUID", "FNAME"],
        "header:\n{out}"
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    let root = disk.image.canonicalize().unwrap();
    assert_eq!(
        row,
        [
            "{00000000-0000-0000-0000-000000000000}",
            "*",
            TOP_GUID,
            root.to_str().unwrap()
        ],
        "only row:\n{out}"
    );

    disk.write_random(1, 0, 1000);
    let a = disk.snapshot();
    let out = ploop_ok(&[OsStr::new("snapshot-list"), dd.as_os_str()]);
    let text = out.stdout_str();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "header + two rows:\n{out}");
    assert!(lines[0].starts_with("PARENT_UUID"), "header:\n{out}");
    // Columns line up under the header.
    let c_col = lines[0].find(" C ").expect("C column") + 1;
    let uuid_col = c_col + 2;
    assert!(lines[0][uuid_col..].starts_with("UUID"), "header:\n{out}");
    for row in &lines[1..] {
        let cur = &row[c_col..c_col + 1];
        let uuid = &row[uuid_col..uuid_col + TOP_GUID.len()];
        if uuid == TOP_GUID {
            assert_eq!(cur, "*", "the top delta's row carries the * marker:\n{out}");
            assert!(row.starts_with(&a), "top's parent is the snapshot:\n{out}");
        } else {
            assert_eq!(uuid, a, "rows are the snapshot and the top:\n{out}");
            assert_eq!(cur, " ", "only the top row is marked current:\n{out}");
        }
    }
    assert_eq!(
        lines.iter().filter(|l| l.contains(" * ")).count(),
        1,
        "{out}"
    );

    // -H: the same rows, no header.
    let h = ploop_ok(&[OsStr::new("snapshot-list"), "-H".as_ref(), dd.as_os_str()]);
    let h_text = h.stdout_str();
    let h_lines: Vec<&str> = h_text.lines().collect();
    assert_eq!(
        h_lines,
        lines[1..].to_vec(),
        "-H drops only the header:\n{h}"
    );
    assert!(!h_text.contains("PARENT_UUID"), "{h}");

    // -H -o uuid: bare GUIDs.
    let u = ploop_ok(&[
        OsStr::new("snapshot-list"),
        "-H".as_ref(),
        "-o".as_ref(),
        "uuid".as_ref(),
        dd.as_os_str(),
    ]);
    let mut guids: Vec<String> = u
        .stdout_str()
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    guids.sort();
    let mut want = vec![a.clone(), TOP_GUID.to_string()];
    want.sort();
    assert_eq!(guids, want, "-H -o uuid:\n{u}");

    // --json parses and agrees.
    let snaps = disk.snapshots();
    assert_eq!(snaps.len(), 2, "{snaps:#?}");
    for s in &snaps {
        for k in ["uuid", "parent_uuid", "current", "fname"] {
            assert!(s.get(k).is_some(), "--json entry lacks {k}: {s}");
        }
        let is_top = s["uuid"] == TOP_GUID;
        assert_eq!(s["current"], is_top, "{s}");
        if is_top {
            assert_eq!(s["parent_uuid"], a.as_str(), "{s}");
        } else {
            assert_eq!(s["uuid"], a.as_str(), "{s}");
            assert_eq!(s["parent_uuid"], "{00000000-0000-0000-0000-000000000000}");
            assert_eq!(s["fname"], root.to_str().unwrap());
        }
    }
}

#[test]
fn snapshot_switch_goes_back() {
    let tmp = tempdir();
    let mut disk = TestDisk::init(tmp.path(), SIZE, &["-b", "128"]);
    disk.write_random(0x5a, 5000, 2 * MIB);
    let at_a = disk.expected.clone();
    let a = disk.snapshot();
    let old_top = disk.delta_files()[1].clone();
    disk.write_random(0x5b, 100_000, 3 * MIB);
    disk.write_random(0x5c, 60 * MIB, MIB);
    disk.assert_content("before switch");

    let out = ploop_ok(&[
        OsStr::new("snapshot-switch"),
        "-u".as_ref(),
        a.as_ref(),
        disk.dd.as_os_str(),
    ]);
    disk.expected = at_a.clone();
    disk.assert_content(&format!("after switch to A\n{out}"));
    assert!(
        !old_top.exists(),
        "the discarded top {} still exists",
        old_top.display()
    );
    let files = disk.delta_files();
    assert_eq!(files.len(), 2, "A + a new top: {files:?}");
    for f in &files {
        peers_check(f);
    }
    assert_same(&disk.read(Some(&a)), &at_a, "read -u A after switch");

    // The new top is writable and independent of A.
    disk.write_random(0x5d, 1 << 20, 70_000);
    disk.assert_content("write after switch");
    assert_same(
        &disk.read(Some(&a)),
        &at_a,
        "A unchanged by writes after switch",
    );
    for f in disk.delta_files() {
        peers_check(&f);
    }
}

/// Deleting the top offline makes its parent the top again, which it
/// cannot be while other snapshots sit over it: refused, and the disk
/// stays usable.
#[test]
fn deleting_a_top_whose_parent_has_other_children_is_refused() {
    let tmp = tempdir();
    let mut disk = TestDisk::init(tmp.path(), SIZE, &["-b", "128"]);
    disk.write_random(0x61, 0, MIB);
    let s1 = disk.snapshot();
    disk.write_random(0x62, MIB, MIB);
    disk.snapshot();
    ploop_ok(&[
        OsStr::new("snapshot-switch"),
        "-u".as_ref(),
        s1.as_ref(),
        disk.dd.as_os_str(),
    ]);
    let out = ploop(&[
        OsStr::new("snapshot-delete"),
        "-u".as_ref(),
        "{5fbaabe3-6958-40ff-92a7-860e329aab41}".as_ref(),
        disk.dd.as_os_str(),
    ]);
    assert!(!out.ok(), "deleting the top must be refused:\n{out}");
    assert!(out.stderr.contains("other snapshots"), "{out}");
    // Still writable.
    disk.write_random(0x63, 2 * MIB, 4096);
    ploop_ok(&[OsStr::new("snapshot-list"), disk.dd.as_os_str()]);
}

#[test]
fn snapshot_delete_middle_keeps_top() {
    let tmp = tempdir();
    let mut disk = TestDisk::init(tmp.path(), SIZE, &[]);
    disk.write_random(0xd1, 0, 3 * MIB);
    let at_a = disk.expected.clone();
    let a = disk.snapshot();
    disk.write_random(0xd2, MIB / 2, 2 * MIB);
    let b = disk.snapshot();
    disk.write_random(0xd3, 2 * MIB + 99, 2 * MIB);
    disk.write_random(0xd4, 50 * MIB, 1000);
    disk.assert_content("before delete");

    ploop_ok(&[
        OsStr::new("snapshot-delete"),
        "-u".as_ref(),
        b.as_ref(),
        disk.dd.as_os_str(),
    ]);
    disk.assert_content("top after deleting the middle snapshot");
    assert_same(
        &disk.read(Some(&a)),
        &at_a,
        "A after deleting the middle snapshot",
    );
    let snaps = disk.snapshots();
    let guids: Vec<&str> = snaps.iter().map(|s| s["uuid"].as_str().unwrap()).collect();
    assert_eq!(guids.len(), 2, "{snaps:#?}");
    assert!(
        guids.contains(&a.as_str()) && guids.contains(&TOP_GUID),
        "{snaps:#?}"
    );
    assert!(!guids.contains(&b.as_str()), "{snaps:#?}");
    let delta_count = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("root.hdd")
        })
        .count();
    assert_eq!(delta_count, 2, "delta files on disk after delete");
    for f in disk.delta_files() {
        peers_check(&f);
    }
    let r = ploop(&[
        OsStr::new("read"),
        "-u".as_ref(),
        b.as_ref(),
        disk.dd.as_os_str(),
    ]);
    assert_eq!(
        r.code,
        Some(1),
        "reading a deleted snapshot must fail:\n{r}"
    );
}

#[test]
fn snapshot_over_raw_base() {
    let tmp = tempdir();
    let mut disk = TestDisk::init(tmp.path(), SIZE, &["-f", "raw"]);
    disk.write_random(0x7a, 5000, 3 * MIB);
    let at_a = disk.expected.clone();
    let a = disk.snapshot();
    disk.write_random(0x7b, 100_000, MIB);
    disk.write_random(0x7c, SIZE - 3000, 3000);
    disk.assert_content("raw base + ploop delta");
    assert_same(&disk.read(Some(&a)), &at_a, "read -u the raw base");
    let files = disk.delta_files();
    assert_eq!(files.len(), 2, "{files:?}");
    // The base is raw: its bytes are the snapshot's content.
    assert_same(&std::fs::read(&files[0]).unwrap(), &at_a, "raw base file");
    peers_check(&files[1]);

    ploop_ok(&[OsStr::new("snapshot-merge"), disk.dd.as_os_str()]);
    disk.assert_content("after merging into the raw base");
    assert_same(
        &std::fs::read(&disk.image).unwrap(),
        &disk.expected,
        "raw base file after merge",
    );
    assert_eq!(disk.delta_files().len(), 1);
}

#[test]
fn convert_version_with_snapshots() {
    let tmp = tempdir();
    let mut disk = TestDisk::init(tmp.path(), SIZE, &["-b", "128"]);
    disk.write_random(0x80, 5000, 3 * MIB);
    let at_a = disk.expected.clone();
    let a = disk.snapshot();
    disk.write_random(0x81, 100_000, MIB);
    let dd = disk.dd.clone();
    let signatures = |disk: &TestDisk, want: &[u8]| {
        for f in disk.delta_files() {
            let head = std::fs::read(&f).unwrap();
            assert_eq!(&head[..16], want, "signature of {}", f.display());
            peers_check(&f);
        }
    };

    ploop_ok(&[
        OsStr::new("convert"),
        "-v".as_ref(),
        "1".as_ref(),
        dd.as_os_str(),
    ]);
    signatures(&disk, b"WithoutFreeSpace");
    disk.assert_content("every delta converted to v1");
    assert_same(&disk.read(Some(&a)), &at_a, "snapshot after -v 1");

    // A snapshot of a v1 disk is v1 too; writes go on.
    disk.snapshot();
    signatures(&disk, b"WithoutFreeSpace");
    disk.write_random(0x82, 3 * MIB, 200_000);

    ploop_ok(&[
        OsStr::new("convert"),
        "-v".as_ref(),
        "2".as_ref(),
        dd.as_os_str(),
    ]);
    signatures(&disk, b"WithouFreSpacExt");
    disk.assert_content("every delta back to v2");
    assert_same(&disk.read(Some(&a)), &at_a, "snapshot after -v 2");
}

/// A size that is not a multiple of the cluster size: whatever size the
/// disk ends up with, qemu-img agrees, and the last bytes are usable.
#[test]
fn size_not_a_cluster_multiple() {
    let tmp = tempdir();
    let dir = tmp.path();
    // 100001 sectors = 51200512 bytes, 781.25... 64 KiB clusters.
    ploop_ok(&[
        OsStr::new("init"),
        "-s".as_ref(),
        "100001".as_ref(),
        "-t".as_ref(),
        "none".as_ref(),
        "-b".as_ref(),
        "128".as_ref(),
        dir.join("root.hdd").as_os_str(),
    ]);
    let dd = dir.join("DiskDescriptor.xml");
    let info = ploop_ok(&[OsStr::new("info"), "--json".as_ref(), dd.as_os_str()]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let size = v["size"].as_u64().expect("size") as usize;
    assert!(size >= 100_001 * 512, "disk smaller than asked:\n{info}");
    let q = run(
        "qemu-img",
        &[
            "info",
            "--output=json",
            "-f",
            "parallels",
            dir.join("root.hdd").to_str().unwrap(),
        ],
    )
    .success();
    let qv: serde_json::Value = serde_json::from_slice(&q.stdout).unwrap();
    assert_eq!(
        qv["virtual-size"].as_u64(),
        Some(size as u64),
        "qemu-img's size:\n{q}\n{info}"
    );

    let mut disk = TestDisk::adopt(dir, &dir.join("root.hdd"), vec![0; size]);
    disk.write_random(0x90, size - 100_000, 100_000);
    disk.write_random(0x91, 12_345, 54_321);
    disk.assert_content("odd-sized disk");
    peers_check(&disk.image);
    qemu_compare(&disk, &disk.image);
    let past = ploop(&[
        OsStr::new("read"),
        "--offset".as_ref(),
        size.to_string().as_ref(),
        "--length".as_ref(),
        "1".as_ref(),
        dd.as_os_str(),
    ]);
    assert_eq!(
        past.code,
        Some(1),
        "reading past the end must fail:\n{past}"
    );
}

/// The format extension of qemu's sample made by Virtuozzo's tools (a
/// changed-block bitmap at `ext_off`): our check leaves it alone and calls
/// the image clean (its clusters are in use, not leaked); a writer takes
/// the bitmap over, marks what it writes and saves it again at the file's
/// tail on a clean close, where qemu reads the old bits and the new ones
/// (the data no longer lands on the extension's clusters with `ext_off`
/// still set, which qemu then refused); an offset that dangles is
/// reported and cleared by check.
#[test]
fn a_format_extension_is_kept_or_dropped_never_left_dangling() {
    let tmp = tempdir();
    let sample = sample_image(tmp.path(), "parallels-with-bitmap");
    let ext_off = |p: &Path| {
        let b = std::fs::read(p).unwrap();
        u64::from_le_bytes(b[56..64].try_into().unwrap())
    };
    assert_eq!(ext_off(&sample), 4096, "the sample's extension at 2 MiB");
    let pristine = std::fs::read(&sample).unwrap();
    ploop_ok(&[OsStr::new("check"), OsStr::new("-r"), sample.as_os_str()]);
    ploop_ok(&[OsStr::new("check"), sample.as_os_str()]);
    assert!(
        std::fs::read(&sample).unwrap() == pristine,
        "check changed a clean image with an extension"
    );

    // Written through a descriptor: the extension is dropped.
    let dir = tmp.path().join("disk");
    std::fs::create_dir(&dir).unwrap();
    let image = dir.join("root.hds");
    std::fs::copy(&sample, &image).unwrap();
    ploop_ok(&[
        OsStr::new("restore-descriptor"),
        dir.as_os_str(),
        image.as_os_str(),
    ]);
    let mut disk = TestDisk::adopt(&dir, &image, vec![0u8; 4 * MIB]);
    disk.write_random(9, 0, 3 * MIB);
    let moved = ext_off(&image);
    assert!(
        moved > 4096,
        "the bitmap is saved past the data: ext_off {moved}"
    );
    ploop_ok(&[OsStr::new("check"), OsStr::new("-r"), image.as_os_str()]);
    // qemu reads the bitmap: the sample's bits (64 KiB each) and ours
    // (the three 1 MiB clusters written).
    let map = common::qemu_bitmap_map(&image, "e4f2eed0-37fe-4539-b50b-85d2e7fd235f");
    assert_eq!(
        map,
        vec![
            (0, 3 * MIB as u64, true),
            (3 * MIB as u64, (64u64 << 30) - 3 * MIB as u64, false)
        ],
        "qemu's view of the saved bitmap"
    );
    let raw = tmp.path().join("back.raw");
    run(
        "qemu-img",
        &[
            OsStr::new("dd"),
            OsStr::new("-f"),
            OsStr::new("parallels"),
            OsStr::new("-O"),
            OsStr::new("raw"),
            OsStr::new("count=4"),
            OsStr::new("bs=1M"),
            &[OsStr::new("if="), image.as_os_str()].join(OsStr::new("")),
            &[OsStr::new("of="), raw.as_os_str()].join(OsStr::new("")),
        ],
    )
    .success();
    assert_same(
        &std::fs::read(&raw).unwrap(),
        &disk.expected,
        "qemu reads our write",
    );

    // An offset that dangles: data took the extension's cluster.
    let dangling = tmp.path().join("dangling.hds");
    std::fs::write(&dangling, &pristine).unwrap();
    patch(&dangling, 64, &2u32.to_le_bytes()); // virtual cluster 0 -> file cluster 2
    let found = ploop(&[OsStr::new("check"), OsStr::new("-r"), dangling.as_os_str()]);
    assert_eq!(found.code, Some(2), "{found}");
    assert!(found.stdout_str().contains("format extension"), "{found}");
    ploop_ok(&[OsStr::new("check"), dangling.as_os_str()]);
    assert_eq!(ext_off(&dangling), 0);
    ploop_ok(&[OsStr::new("check"), OsStr::new("-r"), dangling.as_os_str()]);
    qemu_check(&dangling);
}
