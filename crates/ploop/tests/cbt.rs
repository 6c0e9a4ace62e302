//! Changed-block tracking for real: `snapshot -b` starts a bitmap, writes
//! offline, through a mounted disk and over NBD mark it, a clean close
//! saves it in the format extension where qemu reads the same dirty
//! clusters that our NBD server's `qemu:dirty-bitmap:` context gives; a
//! killed daemon leaves no bitmap that claims less than what changed.
//! Needs root, loop devices, /dev/fuse, qemu-nbd and nbdinfo.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::{nbd_bitmap_map, ok, ploop, qemu_bitmap_map, run, tempdir, Server, MIB};

const BITMAP: &str = "{6f1d2c3b-0a4e-4c55-9d66-7e8f90a1b2c3}";
const NAME: &str = "6f1d2c3b-0a4e-4c55-9d66-7e8f90a1b2c3";

/// (offset, length, dirty) extents over a disk of `size` bytes with the
/// given 1 MiB clusters dirty.
fn expected(size: u64, dirty: &[u64]) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for c in 0..size / MIB as u64 {
        let d = dirty.contains(&c);
        match out.last_mut() {
            Some((_, l, x)) if *x == d => *l += MIB as u64,
            _ => out.push((c * MIB as u64, MIB as u64, d)),
        }
    }
    out
}

fn write(dd: &str, dir: &Path, offset: u64, len: usize, seed: u64) {
    let f = dir.join(format!("w{seed}"));
    fs::write(&f, common::data(seed, len)).unwrap();
    ok(
        ploop(&[
            "write",
            "--offset",
            &offset.to_string(),
            dd,
            f.to_str().unwrap(),
        ]),
        "write",
    );
}

/// A disk of `size` with neither table nor filesystem in `d`: its
/// descriptor.
fn bare_disk(d: &Path, size: &str) -> String {
    ok(
        ploop(&[
            "init",
            "-s",
            size,
            "-t",
            "none",
            d.join("root.hdd").to_str().unwrap(),
        ]),
        "init",
    );
    d.join("DiskDescriptor.xml").to_str().unwrap().to_string()
}

/// `count` blocks of `bs` random bytes onto the device at block `seek`,
/// with O_DIRECT.
fn dd_to(dev: &str, bs: &str, count: u64, seek: u64) {
    ok(
        run(
            "dd",
            &[
                "if=/dev/urandom",
                &format!("of={dev}"),
                &format!("bs={bs}"),
                &format!("count={count}"),
                &format!("seek={seek}"),
                "oflag=direct",
                "status=none",
            ],
        ),
        "dd",
    );
}

/// The delta files in `dir`.
fn deltas(dir: &Path) -> std::collections::BTreeSet<std::path::PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("root.hdd")
        })
        .collect()
}

/// Take a snapshot with `args` and return the new top delta's file.
fn snapshot(dd: &str, dir: &Path, args: &[&str]) -> std::path::PathBuf {
    let before = deltas(dir);
    let mut a = vec!["snapshot"];
    a.extend(args);
    a.push(dd);
    ok(ploop(&a), "snapshot");
    let mut new: Vec<_> = deltas(dir).difference(&before).cloned().collect();
    assert_eq!(new.len(), 1, "one new delta");
    new.pop().unwrap()
}

#[test]
fn a_bitmap_we_write_is_read_by_qemu_with_the_clusters_our_server_shows() {
    let dir = tempdir();
    let d = dir.path();
    let size = 64 * MIB as u64;
    let dd = bare_disk(d, "64M");
    write(&dd, d, 0, 8 * MIB, 1); // before the backup point: not in the bitmap
    let top = snapshot(&dd, d, &["-b", BITMAP]);

    // Offline writes: clusters 3 and 10-11.
    write(&dd, d, 3 * MIB as u64 + 4096, 4096, 2);
    write(&dd, d, 10 * MIB as u64 + 512 * 1024, MIB, 3);
    let info = ok(ploop(&["info", top.to_str().unwrap()]), "info");
    assert!(info.contains(&format!("dirty bitmap {BITMAP}")), "{info}");
    assert_eq!(
        qemu_bitmap_map(&top, NAME),
        expected(size, &[3, 10, 11]),
        "qemu, offline writes"
    );

    // Through the mounted disk: cluster 20.
    let dev = ok(ploop(&["mount", &dd]), "mount");
    {
        let _m = common::Mounted(dd.clone());
        dd_to(&dev, "64k", 1, 320);
    }
    assert_eq!(
        qemu_bitmap_map(&top, NAME),
        expected(size, &[3, 10, 11, 20]),
        "qemu, after the mounted disk's close"
    );

    // Over NBD: the live bitmap gains cluster 40 as it is written, and a
    // read-only server gives what qemu reads.
    let sock = d.join("nbd.sock");
    let srv = Server::on_socket(d, &sock, Path::new(&dd));
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let list = ok(run("nbdinfo", &["--list", &uri]), "nbdinfo --list");
    assert!(
        list.contains(&format!("qemu:dirty-bitmap:{NAME}")),
        "{list}"
    );
    assert_eq!(
        nbd_bitmap_map(&uri, NAME),
        expected(size, &[3, 10, 11, 20]),
        "served, live"
    );
    common::nbdsh(
        &uri,
        &format!("h.connect_uri(uri)\nh.pwrite(b'x' * 4096, {})", 40 * MIB),
    )
    .success();
    assert_eq!(
        nbd_bitmap_map(&uri, NAME),
        expected(size, &[3, 10, 11, 20, 40]),
        "served, after a write"
    );
    srv.stop();
    let ro = Server::on_socket_with(d, &sock, &["-r"], Path::new(&dd));
    let ours = nbd_bitmap_map(&uri, NAME);
    ro.stop();
    let qemu = qemu_bitmap_map(&top, NAME);
    assert_eq!(ours, qemu, "our server and qemu read the same bitmap");
    assert_eq!(qemu, expected(size, &[3, 10, 11, 20, 40]));

    // The next backup point: the snapshot keeps the bitmap up to it; the
    // new top starts an empty one.
    let new_top = snapshot(&dd, d, &["-b", "{00000000-0000-4000-8000-000000000001}"]);
    assert_eq!(
        qemu_bitmap_map(&top, NAME),
        expected(size, &[3, 10, 11, 20, 40]),
        "the snapshot's copy"
    );
    assert_eq!(
        qemu_bitmap_map(&new_top, "00000000-0000-4000-8000-000000000001"),
        expected(size, &[]),
        "a new, empty bitmap"
    );
}

/// A repair that changes clusters (a BAT entry past the file's end
/// zeroed) drops the bitmap: it would not mark them.
#[test]
fn a_repair_that_changes_clusters_drops_the_bitmap() {
    let dir = tempdir();
    let d = dir.path();
    let dd = bare_disk(d, "32M");
    let top = snapshot(&dd, d, &["-b", BITMAP]);
    write(&dd, d, 0, 4096, 1);
    let info = ok(ploop(&["info", top.to_str().unwrap()]), "info");
    assert!(info.contains("dirty bitmap"), "{info}");
    // BAT entry of cluster 3 (after the 64-byte header): far past the end.
    common::patch(&top, 64 + 4 * 3, &0x00ff_0000u32.to_le_bytes());
    let out = ploop(&["check", top.to_str().unwrap()]);
    assert!(out.stdout_str().contains("changed-block bitmap"), "{out}");
    let info = ok(ploop(&["info", top.to_str().unwrap()]), "info");
    assert!(
        !info.contains("dirty bitmap"),
        "the bitmap survived the repair: {info}"
    );
}

#[test]
fn a_killed_daemon_leaves_no_bitmap_that_claims_less() {
    let dir = tempdir();
    let d = dir.path();
    let size = 32 * MIB as u64;
    let dd = bare_disk(d, "32M");
    let top = snapshot(&dd, d, &["-b", BITMAP]);
    write(&dd, d, 2 * MIB as u64, 4096, 1);
    assert_eq!(qemu_bitmap_map(&top, NAME), expected(size, &[2]));

    // Mounted (the bitmap is taken over), written, then the daemon dies.
    let dev = ok(ploop(&["mount", &dd]), "mount");
    dd_to(&dev, "64k", 2, 160);
    let list = ok(ploop(&["list", "--json"]), "list");
    let recs: serde_json::Value = serde_json::from_str(&list).unwrap();
    let pid = recs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["descriptor"].as_str() == Some(&dd))
        .map(|r| r["pid"].as_u64().unwrap())
        .unwrap();
    ok(run("kill", &["-9", &pid.to_string()]), "kill -9");
    std::thread::sleep(Duration::from_millis(300));
    let _ = ploop(&["umount", &dd]);

    // The top was in use: no bitmap survives, so none claims that cluster
    // 10 stayed clean. check repairs; the next writer says why it has none.
    let info = ok(ploop(&["info", top.to_str().unwrap()]), "info");
    assert!(
        !info.contains("dirty bitmap"),
        "a bitmap survived the crash: {info}"
    );
    let _ = ploop(&["check", &dd]);
    write(&dd, d, 5 * MIB as u64, 4096, 2);
    let info = ok(ploop(&["info", top.to_str().unwrap()]), "info");
    assert!(!info.contains("dirty bitmap"), "a bitmap came back: {info}");
}

#[test]
fn an_online_snapshot_starts_a_new_bitmap_and_the_old_one_is_saved() {
    let dir = tempdir();
    let d = dir.path();
    let size = 32 * MIB as u64;
    let dd = bare_disk(d, "32M");
    let first = snapshot(&dd, d, &["-b", BITMAP]);
    let dev = ok(ploop(&["mount", &dd]), "mount");
    let _m = common::Mounted(dd.clone());
    let dd_at = |cluster: u64| dd_to(&dev, "1M", 1, cluster);
    dd_at(4);
    let second = snapshot(&dd, d, &["-b", "{00000000-0000-4000-8000-000000000002}"]);
    dd_at(7);
    // The snapshot holds its bitmap (saved as it was frozen); the live top
    // has only what came after (saved when it closes).
    assert_eq!(qemu_bitmap_map(&first, NAME), expected(size, &[4]));
    ok(ploop(&["umount", &dd]), "umount");
    assert_eq!(
        qemu_bitmap_map(&second, "00000000-0000-4000-8000-000000000002"),
        expected(size, &[7])
    );
}

/// The history entry `n` of a backup folder: (kind, clusters).
fn history(dir: &Path, n: usize) -> (String, u64) {
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("ploop-backup.json")).unwrap()).unwrap();
    let h = &v["history"][n];
    (
        h["kind"].as_str().unwrap().to_string(),
        h["clusters"].as_u64().unwrap(),
    )
}

fn read_disk(dd: &str) -> Vec<u8> {
    let out = std::process::Command::new(common::bin())
        .args(["read", dd])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn full_and_incremental_backups_restore_byte_for_byte() {
    let dir = tempdir();
    let d = dir.path();
    let src = d.join("src");
    fs::create_dir_all(&src).unwrap();
    ok(
        ploop(&[
            "init",
            "-s",
            "256M",
            "-t",
            "none",
            src.join("root.hdd").to_str().unwrap(),
        ]),
        "init",
    );
    let dd = src.join("DiskDescriptor.xml").to_str().unwrap().to_string();
    write(&dd, d, 0, 100 * MIB, 1);
    let b = d.join("backup");
    let bs = b.to_str().unwrap();

    // Offline: a full backup, then 1% of the clusters change.
    ok(ploop(&["backup", &dd, bs]), "full backup");
    assert_eq!(history(&b, 0), ("full".into(), 100));
    let bdd = b.join("DiskDescriptor.xml").to_str().unwrap().to_string();
    assert!(read_disk(&bdd) == read_disk(&dd), "the full backup differs");
    for (i, c) in [7u64, 60, 130].iter().enumerate() {
        write(&dd, d, c * MIB as u64 + 12_345, 1000, 10 + i as u64);
    }
    ok(
        ploop(&["backup", "--incremental", &dd, bs]),
        "incremental backup",
    );
    assert_eq!(
        history(&b, 1),
        ("incremental".into(), 3),
        "1% of the clusters, no more"
    );
    assert!(
        read_disk(&bdd) == read_disk(&dd),
        "full + incremental differ"
    );

    // Mounted, written through the device: an incremental online.
    let dev = ok(ploop(&["mount", &dd]), "mount");
    {
        let _m = common::Mounted(dd.clone());
        dd_to(&dev, "4k", 3, 51200);
        ok(
            ploop(&["backup", "--incremental", &dd, bs]),
            "online incremental backup",
        );
        // The disk goes on with its bitmap: a second one finds nothing new.
        ok(
            ploop(&["backup", "--incremental", &dd, bs]),
            "an incremental with no change",
        );
    }
    assert_eq!(history(&b, 2), ("incremental".into(), 1));
    assert_eq!(history(&b, 3), ("incremental".into(), 0));
    let want = read_disk(&dd);
    assert!(read_disk(&bdd) == want, "the backup chain differs");
    // Folded into one image: the same bytes.
    let r = d.join("restored/root.hdd");
    ok(
        ploop(&["backup", "--restore", bs, r.to_str().unwrap()]),
        "restore",
    );
    let rdd = d
        .join("restored/DiskDescriptor.xml")
        .to_str()
        .unwrap()
        .to_string();
    assert!(read_disk(&rdd) == want, "the restored image differs");
    // The source's chain is as it was: one delta (each backup's snapshot
    // merged away).
    let list = ok(ploop(&["snapshot-list", &dd]), "snapshot-list");
    assert_eq!(list.lines().count(), 2, "{list}");

    // Without the last backup's bitmap (a crash dropped it), an
    // incremental is refused and says why.
    let other = d.join("other");
    ok(
        ploop(&["backup", &dd, other.to_str().unwrap()]),
        "another full backup",
    );
    let out = ploop(&["backup", "--incremental", &dd, bs]);
    assert!(
        !out.ok(),
        "an incremental from a bitmap the disk no longer keeps"
    );
    assert!(out.stderr.contains("take a full backup"), "{out}");
}

/// `ploop serve`'s disk takes snapshots, merges and backups while a
/// client writes, as a mounted disk does (it used to refuse them: the
/// image is locked).
#[test]
fn a_disk_served_over_nbd_takes_snapshots_and_backups_in_use() {
    let dir = tempdir();
    let d = dir.path();
    let dd = bare_disk(d, "64M");
    let sock = d.join("nbd.sock");
    let srv = Server::on_socket(d, &sock, Path::new(&dd));
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let put = |at: u64, byte: u8| {
        common::nbdsh(
            &uri,
            &format!("h.connect_uri(uri)\nh.pwrite(bytes([{byte}]) * 65536, {at})\nh.flush()"),
        )
        .success();
    };
    put(0, 1);
    let top = snapshot(&dd, d, &["-b", BITMAP]);
    assert!(top.exists());
    put(5 * MIB as u64, 2);
    assert_eq!(
        nbd_bitmap_map(&uri, NAME),
        expected(64 * MIB as u64, &[5]),
        "live bitmap"
    );
    let b = d.join("backup");
    ok(
        ploop(&["backup", &dd, b.to_str().unwrap()]),
        "full backup of a served disk",
    );
    put(9 * MIB as u64, 3);
    ok(
        ploop(&["backup", "--incremental", &dd, b.to_str().unwrap()]),
        "incremental",
    );
    assert_eq!(history(&b, 1), ("incremental".into(), 1));
    ok(ploop(&["snapshot-merge", &dd]), "merge, online");
    let list = ok(ploop(&["snapshot-list", &dd]), "snapshot-list");
    assert_eq!(list.lines().count(), 2, "one delta left: {list}");
    put(20 * MIB as u64, 4);
    // A client that chose the bitmap, after an online snapshot that starts
    // another: the one it chose no longer takes marks, and is refused
    // rather than shown as if it did.
    snapshot(&dd, d, &["-b", "{00000000-0000-4000-8000-000000000004}"]);
    let script = format!(
        "h.add_meta_context('qemu:dirty-bitmap:00000000-0000-4000-8000-000000000004')\n\
         h.connect_uri(uri)\n\
         cb = lambda ctx, off, entries, err: 0\n\
         h.block_status(65536, 0, cb)\n\
         import subprocess\n\
         subprocess.run([{bin:?}, 'snapshot', '-b', '{{00000000-0000-4000-8000-000000000003}}', {dd:?}], check=True)\n\
         try:\n    h.block_status(65536, 0, cb)\n    print('answered')\n\
         except nbd.Error as e:\n    print('refused', e)\n",
        bin = common::bin(),
        dd = dd,
    );
    let out = common::nbdsh(&uri, &script).success();
    assert!(out.stdout_str().contains("refused"), "{out}");
    srv.stop();
    let bdd = b.join("DiskDescriptor.xml").to_str().unwrap().to_string();
    let mut want = read_disk(&dd);
    // The backup is of the point before the last write.
    want[20 * MIB..20 * MIB + 65536].fill(0);
    assert!(
        read_disk(&bdd) == want,
        "the backup differs from the served disk"
    );
}

/// A served disk is listed while served; a server killed outright leaves
/// no record behind (it cannot remove it itself).
#[test]
fn a_killed_server_leaves_no_record() {
    let dir = tempdir();
    let d = dir.path();
    let dd = bare_disk(d, "16M");
    let sock = d.join("nbd.sock");
    let srv = Server::on_socket(d, &sock, Path::new(&dd));
    assert!(ok(ploop(&["list"]), "list").contains(&dd));
    ok(run("kill", &["-9", &srv.pid().to_string()]), "kill -9");
    std::thread::sleep(Duration::from_millis(300));
    let list = ok(ploop(&["list"]), "list");
    assert!(!list.contains(&dd), "{list}");
    drop(srv);
}
