//! `ploop resize` for real: image, partition table and filesystem grow
//! and shrink together, offline; what cannot be done is refused before
//! anything changes. Needs root, loop devices and /dev/fuse.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{
    data, md5, ok, openvz_check, ploop, qemu_check, qemu_convert, run, tempdir, Loop, Mounted,
};

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A new disk in `dir`, made by `init` with `args` (size, type, ...):
/// its image, its descriptor, and an empty folder to mount it on.
fn new_disk(dir: &Path, args: &[&str]) -> (PathBuf, String, PathBuf) {
    let img = dir.join("root.hdd");
    let mut init = vec!["init"];
    init.extend(args);
    init.push(img.to_str().unwrap());
    ok(ploop(&init), "init");
    let dd = dir.join("DiskDescriptor.xml").to_str().unwrap().to_string();
    let mnt = dir.join("mnt");
    fs::create_dir(&mnt).unwrap();
    (img, dd, mnt)
}

/// Mount, run `f` on the mount point, unmount.
fn mounted(dd: &str, mnt: &Path, f: impl FnOnce(&Path)) {
    ok(ploop(&["mount", "-m", mnt.to_str().unwrap(), dd]), "mount");
    let _m = Mounted(dd.to_string());
    f(mnt);
    ok(ploop(&["umount", dd]), "umount");
}

/// One of df's figures (`size`, `used`, `avail`) for the filesystem on
/// `mnt`, in the unit `block` asks for (`-k`, `-B1`).
fn df(mnt: &Path, block: &str, field: &str) -> u64 {
    let out = ok(
        run(
            "df",
            &[block, &format!("--output={field}"), mnt.to_str().unwrap()],
        ),
        "df",
    );
    out.lines().nth(1).unwrap().trim().parse().unwrap()
}

/// The filesystem's size in KiB, as df sees it.
fn df_kib(mnt: &Path) -> u64 {
    df(mnt, "-k", "size")
}

/// sgdisk finds the table of the disk's raw form sound, partition 1 where
/// OpenVZ's layout puts it for this size, and the filesystem is clean.
fn table_and_fs_sound(dir: &Path, img: &Path, fstype: &str, cs: u64) {
    let raw = dir.join("check.raw");
    qemu_convert("parallels", "raw", img, &raw);
    let v = ok(run("sgdisk", &["-v", raw.to_str().unwrap()]), "sgdisk -v");
    assert!(v.contains("No problems found"), "{v}");
    let sectors = fs::metadata(&raw).unwrap().len() / 512;
    let end = (sectors - cs) / cs * cs / 8 * 8;
    let info = ok(
        run("sgdisk", &["-i", "1", raw.to_str().unwrap()]),
        "sgdisk -i",
    );
    assert!(
        info.contains(&format!("Last sector: {} ", end - 1)),
        "{info}"
    );
    let part = Loop::attach(&raw, cs * 512, (end - cs) * 512);
    let checked = match fstype {
        "xfs" => run("xfs_repair", &["-n", &part.0]),
        _ => run("e2fsck", &["-fn", &part.0]),
    };
    drop(part);
    ok(checked, "fsck");
    fs::remove_file(&raw).unwrap();
}

#[test]
fn ext4_grows_and_shrinks_with_its_table_and_data() {
    let _s = serial();
    let dir = tempdir();
    let (img, dd, mnt) = new_disk(dir.path(), &["-s", "1G"]);
    let dd = dd.as_str();
    let big = data(3, 60 << 20);
    let mut before = 0;
    mounted(dd, &mnt, |m| {
        fs::write(m.join("big"), &big).unwrap();
        before = df_kib(m);
    });
    ok(ploop(&["resize", "-s", "3G", dd]), "grow");
    mounted(dd, &mnt, |m| {
        let after = df_kib(m);
        assert!(after > before * 29 / 10, "{before} KiB grew to {after}");
        assert!(fs::read(m.join("big")).unwrap() == big);
    });
    table_and_fs_sound(dir.path(), &img, "ext4", 2048);
    qemu_check(&img);
    openvz_check(&img);

    ok(ploop(&["resize", "-s", "512M", dd]), "shrink");
    mounted(dd, &mnt, |m| {
        let after = df_kib(m);
        assert!(after < 512 << 10 && after > 400 << 10, "{after} KiB");
        assert!(fs::read(m.join("big")).unwrap() == big);
    });
    table_and_fs_sound(dir.path(), &img, "ext4", 2048);
    openvz_check(&img);

    // Below what the filesystem holds: refused, nothing written.
    let sum = md5(&img);
    let out = ploop(&["resize", "-s", "40M", dd]);
    assert!(
        !out.ok() && out.stderr.contains("nothing was changed"),
        "{out}"
    );
    assert_eq!(md5(&img), sum);
    let info = ok(ploop(&["info", "-s", dd]), "info");
    assert!(info.contains("size:\t\t1048576"), "{info}");
}

#[test]
fn xfs_grows_and_refuses_to_shrink() {
    let _s = serial();
    let dir = tempdir();
    let (img, dd, mnt) = new_disk(dir.path(), &["-t", "xfs", "-s", "1G"]);
    let dd = dd.as_str();
    let file = data(5, 5 << 20);
    mounted(dd, &mnt, |m| fs::write(m.join("f"), &file).unwrap());
    ok(ploop(&["resize", "-s", "2G", dd]), "grow");
    mounted(dd, &mnt, |m| {
        assert!(df_kib(m) > 1900 << 10, "{}", df_kib(m));
        assert!(fs::read(m.join("f")).unwrap() == file);
    });
    table_and_fs_sound(dir.path(), &img, "xfs", 2048);
    let sum = md5(&img);
    let out = ploop(&["resize", "-s", "1G", dd]);
    assert!(
        !out.ok() && out.stderr.contains("XFS filesystem cannot shrink"),
        "{out}"
    );
    assert_eq!(md5(&img), sum, "nothing written");
}

/// 32 KiB clusters: the BAT of a 200 MiB disk fits its first cluster, that
/// of a 1 GiB disk does not, so growing moves data clusters out of its way.
#[test]
fn growth_past_the_first_bat_cluster_moves_data() {
    let _s = serial();
    let dir = tempdir();
    let (img, dd, mnt) = new_disk(dir.path(), &["-b", "64", "-s", "200M"]);
    let dd = dd.as_str();
    let file = data(9, 20 << 20);
    mounted(dd, &mnt, |m| fs::write(m.join("f"), &file).unwrap());
    let first_block = |p: &Path| common::read_u32(p, 48);
    let before = first_block(&img);
    ok(ploop(&["resize", "-s", "1G", dd]), "grow");
    assert!(first_block(&img) > before, "the data area moved");
    mounted(dd, &mnt, |m| {
        assert!(fs::read(m.join("f")).unwrap() == file)
    });
    ok(ploop(&["check", "-r", dd]), "check");
    qemu_check(&img);
    openvz_check(&img);
    table_and_fs_sound(dir.path(), &img, "ext4", 64);
}

/// Fill 80% of a filesystem, delete half (the first files written, so the
/// space freed is low in the image and the data high), compact: the image
/// file ends within 5% (plus metadata) of what the filesystem uses, every
/// remaining file verifies, and qemu-img's and OpenVZ's checks pass.
#[test]
fn compaction_gives_the_space_of_deleted_files_back() {
    let _s = serial();
    let dir = tempdir();
    let (img, dd, mnt) = new_disk(dir.path(), &["-s", "1G"]);
    let dd = dd.as_str();
    let files: Vec<Vec<u8>> = (0..16).map(|i| data(100 + i, 48 << 20)).collect();
    let mut used = 0;
    mounted(dd, &mnt, |m| {
        for (i, f) in files.iter().enumerate() {
            fs::write(m.join(format!("f{i}")), f).unwrap();
            ok(run("sync", &[] as &[&str]), "sync");
        }
        for i in 0..8 {
            fs::remove_file(m.join(format!("f{i}"))).unwrap();
        }
        used = df(m, "-B1", "used");
    });
    let before = fs::metadata(&img).unwrap().len();
    // OpenVZ's figures: the image holds the deleted files, the data not.
    let stat = ok(
        ploop(&["balloon", "discard", "--stat", dd]),
        "balloon discard --stat",
    );
    let mb = |what: &str| -> u64 {
        stat.lines()
            .find_map(|l| l.strip_prefix(what))
            .and_then(|v| v.trim().strip_suffix("MB"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{what} in {stat}"))
    };
    assert_eq!(mb("Image size:"), before >> 20, "{stat}");
    assert!(mb("Data size:") < mb("Image size:") * 6 / 10, "{stat}");
    assert_eq!(mb("Ploop size:"), 1024, "{stat}");
    let dry = ok(ploop(&["compact", "-n", dd]), "compact -n");
    assert!(dry.contains("passes the 10% threshold"), "{dry}");
    assert_eq!(
        fs::metadata(&img).unwrap().len(),
        before,
        "a dry run changes nothing"
    );
    let out = ok(ploop(&["compact", dd]), "compact");
    assert!(out.contains("moved"), "{out}");
    let after = fs::metadata(&img).unwrap().len();
    // Metadata: header and BAT (1 MiB), the filesystem's own (in `used`).
    assert!(
        after <= used + used / 20 + (2 << 20),
        "image {after} bytes for {used} bytes used (was {before})"
    );
    mounted(dd, &mnt, |m| {
        for (i, f) in files.iter().enumerate().skip(8) {
            assert!(&fs::read(m.join(format!("f{i}"))).unwrap() == f, "f{i}");
        }
    });
    qemu_check(&img);
    openvz_check(&img);
    // check -D (and OpenVZ's balloon discard --defrag-only): the
    // clusters in the disk's order; the files still read, the checks
    // still pass.
    let out = ok(ploop(&["check", "-D", dd]), "check -D");
    assert!(out.contains("defragmented"), "{out}");
    let out = ok(
        ploop(&["balloon", "discard", "--defrag-only", dd]),
        "balloon discard --defrag-only",
    );
    assert!(
        out.contains("(0 clusters moved)"),
        "already in order: {out}"
    );
    mounted(dd, &mnt, |m| {
        for (i, f) in files.iter().enumerate().skip(8) {
            assert!(&fs::read(m.join(format!("f{i}"))).unwrap() == f, "f{i}");
        }
    });
    qemu_check(&img);
    openvz_check(&img);
    // Nothing left to win: under the threshold, nothing done.
    let again = ok(ploop(&["compact", dd]), "compact again");
    assert!(again.contains("nothing done"), "{again}");
}

/// qemu's sample with a dirty bitmap (a format extension after the
/// data): compaction and check -S leave the extension where it is, listed
/// by info, and the file is not cut under it; defragmentation keeps the
/// bitmap (set aside, saved again after).
#[test]
fn a_format_extension_survives_compaction_and_sparse_repair() {
    let dir = tempdir();
    let img = common::sample_image(dir.path(), "parallels-with-bitmap");
    let dd = ok(
        ploop(&[
            "restore-descriptor",
            dir.path().to_str().unwrap(),
            img.to_str().unwrap(),
        ]),
        "restore-descriptor",
    );
    let dd = dir.path().join(dd.trim_start_matches("./"));
    let dd = if dd.exists() {
        dd
    } else {
        dir.path().join("DiskDescriptor.xml")
    };
    let dd = dd.to_str().unwrap();
    let feature = |what: &str| {
        let out = ok(ploop(&["info", img.to_str().unwrap()]), "info");
        assert!(
            out.contains("feature:\tdirty bitmap"),
            "after {what}: {out}"
        );
    };
    feature("nothing");
    let size = fs::metadata(&img).unwrap().len();
    ok(ploop(&["compact", "--threshold", "0", dd]), "compact");
    feature("compact");
    assert_eq!(fs::metadata(&img).unwrap().len(), size, "not cut under it");
    // Defragmentation sets the bitmap aside and saves it again after:
    // qemu reads the same dirty clusters.
    let name = "e4f2eed0-37fe-4539-b50b-85d2e7fd235f";
    let before = common::qemu_bitmap_map(&img, name);
    ok(ploop(&["check", "-D", img.to_str().unwrap()]), "check -D");
    feature("check -D");
    assert_eq!(
        common::qemu_bitmap_map(&img, name),
        before,
        "the bitmap after check -D"
    );
    let size = fs::metadata(&img).unwrap().len();
    ok(ploop(&["check", "-S", img.to_str().unwrap()]), "check -S");
    feature("check -S");
    // (qemu-img check calls the extension's clusters leaked, on the
    // sample as qemu ships it too: not a check to run here.)
    assert_eq!(fs::metadata(&img).unwrap().len(), size);
}

/// What lay past a smaller end is gone: shrunk with a snapshot holding
/// data there, then grown again, the disk reads zeros there.
#[test]
fn a_shrink_then_growth_reads_zeros_past_the_old_end() {
    let dir = tempdir();
    let (_, dd, _) = new_disk(dir.path(), &["-t", "none", "-s", "64M"]);
    let dd = dd.as_str();
    let input = dir.path().join("in");
    fs::write(&input, data(4, 1 << 20)).unwrap();
    ok(
        ploop(&["write", "--offset", "50M", dd, input.to_str().unwrap()]),
        "write",
    );
    ok(ploop(&["snapshot", dd]), "snapshot");
    ok(ploop(&["resize", "-s", "32M", dd]), "shrink");
    ok(ploop(&["resize", "-s", "64M", dd]), "grow");
    let out = ploop(&["read", "--offset", "50M", "--length", "1M", dd]).success();
    assert!(out.stdout.iter().all(|&b| b == 0), "old data came back");
    ok(ploop(&["check", dd]), "check");
}

/// A writer in the container: 4 KiB writes at pseudo-random places of
/// one 16 MiB file, fdatasync every 16, until told to stop. Returns what
/// the file must hold and how many writes it made.
fn writer(path: &Path, stop: &std::sync::atomic::AtomicBool) -> (Vec<u8>, u64) {
    use std::os::unix::fs::FileExt;
    const LEN: usize = 16 << 20;
    let mut model = data(7, LEN);
    fs::write(path, &model).unwrap();
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut n: u64 = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let at = (n.wrapping_mul(2_654_435_761) % (LEN as u64 / 4096)) as usize * 4096;
        let block = data(1000 + n, 4096);
        f.write_all_at(&block, at as u64).unwrap();
        model[at..at + 4096].copy_from_slice(&block);
        n += 1;
        if n.is_multiple_of(16) {
            f.sync_data().unwrap();
        }
    }
    f.sync_data().unwrap();
    (model, n)
}

/// The issue's case: a filesystem filled to 80%, half of it deleted,
/// compacted online while a writer runs. The image ends within 5% (plus
/// metadata) of what the filesystem uses, every file reads back, and
/// qemu's and OpenVZ's checks pass; then defragmentation, online too.
#[test]
fn compaction_online_while_a_writer_runs() {
    let _s = serial();
    let dir = tempdir();
    let (img, dd, mnt) = new_disk(dir.path(), &["-s", "1G"]);
    let dd = dd.as_str();
    let files: Vec<Vec<u8>> = (0..16).map(|i| data(200 + i, 48 << 20)).collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut written = (Vec::new(), 0);
    mounted(dd, &mnt, |m| {
        for (i, f) in files.iter().enumerate() {
            fs::write(m.join(format!("f{i}")), f).unwrap();
        }
        ok(run("sync", &[] as &[&str]), "sync");
        for i in (0..16).step_by(2) {
            fs::remove_file(m.join(format!("f{i}"))).unwrap();
        }
        ok(run("sync", &[] as &[&str]), "sync");
        // No writer yet: what the trim frees is reusable at once (no
        // guest flush needed); OpenVZ's --to-free moves only so much.
        let before = fs::metadata(&img).unwrap().len();
        let out = ok(
            ploop(&["balloon", "discard", "--to-free", "64M", dd]),
            "balloon discard --to-free",
        );
        assert!(out.contains("moved 64 clusters"), "{out}");
        // (Freed clusters at the end go as well.)
        assert!(fs::metadata(&img).unwrap().len() <= before - (64 << 20));
        let before = fs::metadata(&img).unwrap().len();
        std::thread::scope(|s| {
            let w = s.spawn(|| writer(&m.join("w"), &stop));
            // The writer under way before compaction starts.
            std::thread::sleep(std::time::Duration::from_millis(300));
            let out = ploop(&["compact", dd]);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            written = w.join().unwrap();
            let out = ok(out, "compact online");
            assert!(out.contains("moved"), "{out}");
        });
        assert!(written.1 > 0, "the writer wrote");
        ok(run("sync", &[] as &[&str]), "sync");
        let used = df(m, "-B1", "used");
        let after = fs::metadata(&img).unwrap().len();
        // Metadata: header and BAT (one 1 MiB cluster), the GPT's.
        assert!(
            after <= used + used / 20 + (2 << 20),
            "image {after} bytes for {used} bytes used (was {before})"
        );
        assert!(after < before * 7 / 10, "{after} of {before}");
        // Defragmentation online, then a second compaction finds nothing.
        let out = ok(
            ploop(&["balloon", "discard", "--defrag-only", dd]),
            "balloon discard --defrag-only",
        );
        assert!(out.contains("defragmented"), "{out}");
        assert!(fs::read(m.join("w")).unwrap() == written.0, "w");
    });
    mounted(dd, &mnt, |m| {
        for (i, f) in files.iter().enumerate().skip(1).step_by(2) {
            assert!(&fs::read(m.join(format!("f{i}"))).unwrap() == f, "f{i}");
        }
        assert!(fs::read(m.join("w")).unwrap() == written.0, "w");
    });
    qemu_check(&img);
    openvz_check(&img);
    let d = ok(ploop(&["check", dd]), "check");
    assert!(!d.contains("repaired"), "{d}");
}

/// Online growth, as OpenVZ does it: with a writer running, the image,
/// the GPT and partition 1, the devices and the filesystem grow under a
/// mounted XFS; afterwards the table is sound, every byte written reads
/// back, and the peers' checks pass. ext4 grows its disk the same way;
/// its filesystem grows online only with CAP_SYS_RESOURCE (else the
/// command says so, and the same resize offline finishes).
#[test]
fn online_growth_with_a_writer_running() {
    let _s = serial();
    let dir = tempdir();
    let (img, dd, mnt) = new_disk(dir.path(), &["-t", "xfs", "-s", "1G"]);
    let dd = dd.as_str();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut written = (Vec::new(), 0);
    let big = data(9, 600 << 20);
    mounted(dd, &mnt, |m| {
        let before = df_kib(m);
        std::thread::scope(|s| {
            let w = s.spawn(|| writer(&m.join("w"), &stop));
            std::thread::sleep(std::time::Duration::from_millis(300));
            let out = ploop(&["resize", "-s", "2G", dd]);
            std::thread::sleep(std::time::Duration::from_millis(300));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            written = w.join().unwrap();
            let out = ok(out, "resize online");
            assert!(out.contains("resized to 4194304 sectors"), "{out}");
        });
        assert!(written.1 > 0, "the writer wrote");
        let after = df_kib(m);
        assert!(after > before + (900 << 10), "{before} KiB -> {after} KiB");
        // The new space is usable: more than the old disk held, at once.
        fs::write(m.join("big"), &big).unwrap();
        fs::write(m.join("big2"), &big).unwrap();
        // The record follows the partition's device.
        let list = ok(ploop(&["list", "--json"]), "list");
        let dev = list
            .lines()
            .find_map(|l| l.trim().strip_prefix("\"fs_device\": \""))
            .and_then(|l| l.strip_suffix("\","))
            .unwrap_or_else(|| panic!("{list}"))
            .to_string();
        let bytes = ok(run("blockdev", &["--getsize64", &dev]), "blockdev");
        let bytes: u64 = bytes.trim().parse().unwrap();
        assert!(bytes > 2000 << 20, "{bytes}");
        assert!(list.contains(&format!("\"length\": {bytes}")), "{list}");
        // The same size again: finishes whatever an earlier run left
        // (here nothing), changes nothing.
        ok(ploop(&["resize", "-s", "2G", dd]), "resize again");
        assert_eq!(df_kib(m), after);
        // XFS cannot shrink, online either.
        let out = ploop(&["resize", "-s", "1G", dd]);
        assert!(
            !out.ok() && out.stderr.contains("XFS filesystem cannot shrink"),
            "{out}"
        );
        assert_eq!(balloon_len(m), 0);
    });
    mounted(dd, &mnt, |m| {
        assert!(df_kib(m) > 1900 << 10, "{}", df_kib(m));
        assert!(fs::read(m.join("w")).unwrap() == written.0, "w");
        assert!(fs::read(m.join("big2")).unwrap() == big, "big2");
    });
    table_and_fs_sound(dir.path(), &img, "xfs", 2048);
    qemu_check(&img);
    openvz_check(&img);

    // ext4: the disk grows online; the filesystem as the capability allows.
    let dir = tempdir();
    let (img, dd, mnt) = new_disk(dir.path(), &["-s", "1G"]);
    let dd = dd.as_str();
    let file = data(11, 8 << 20);
    mounted(dd, &mnt, |m| {
        fs::write(m.join("f"), &file).unwrap();
        let out = ploop(&["resize", "-s", "2G", dd]);
        if ploop_test_support::has_sys_resource() {
            ok(out, "resize online");
            assert!(df_kib(m) > 1900 << 10, "{}", df_kib(m));
        } else {
            assert!(
                !out.ok() && out.stderr.contains("needs CAP_SYS_RESOURCE"),
                "{out}"
            );
            assert!(df_kib(m) < 1100 << 10, "{}", df_kib(m));
        }
        let info = ok(ploop(&["info", "-s", dd]), "info");
        assert!(info.contains("4194304"), "the disk grew: {info}");
    });
    ok(ploop(&["resize", "-s", "2G", dd]), "resize offline");
    mounted(dd, &mnt, |m| {
        assert!(df_kib(m) > 1900 << 10, "{}", df_kib(m));
        assert!(fs::read(m.join("f")).unwrap() == file);
    });
    table_and_fs_sound(dir.path(), &img, "ext4", 2048);
}

/// The balloon's size, if the file is there.
fn balloon_len(mnt: &Path) -> u64 {
    fs::metadata(mnt.join(".balloon-c3a5ae3d-ce7f-43c4-a1ea-c61e2b4504e8")).map_or(0, |m| m.len())
}

/// Online shrink through the balloon, as OpenVZ: the filesystem keeps
/// its size but holds the space given up in the balloon, the image file
/// gives it back, files read back; a shrink below what the filesystem
/// uses is refused before anything changes; growing deflates the
/// balloon; the peers' checks pass after.
#[test]
fn online_shrink_through_the_balloon() {
    let _s = serial();
    let dir = tempdir();
    let (img, dd, mnt) = new_disk(dir.path(), &["-s", "2G"]);
    let dd = dd.as_str();
    let keep = data(21, 200 << 20);
    mounted(dd, &mnt, |m| {
        fs::write(m.join("keep"), &keep).unwrap();
        // Space the filesystem used once: the image holds it.
        fs::write(m.join("gone"), data(22, 700 << 20)).unwrap();
        ok(run("sync", &[] as &[&str]), "sync");
        fs::remove_file(m.join("gone")).unwrap();
        ok(run("sync", &[] as &[&str]), "sync");
        let df_before = df_kib(m);
        assert!(fs::metadata(&img).unwrap().len() > 850 << 20);

        // Too small for what the filesystem holds: refused, nothing done.
        let out = ploop(&["resize", "-s", "150M", dd]);
        assert!(!out.ok() && out.stderr.contains("minimal size is"), "{out}");
        assert_eq!(balloon_len(m), 0, "the balloon is untouched");

        let out = ok(ploop(&["resize", "-s", "1G", dd]), "shrink online");
        assert!(out.contains("resized to 2097152 sectors"), "{out}");
        assert_eq!(df_kib(m), df_before, "the filesystem keeps its size");
        // It may hold 1 GiB at most now: the balloon takes the rest.
        let avail = df(m, "-B1", "avail");
        assert!(avail < (1 << 30) - (200 << 20), "{avail} bytes available");
        assert!(balloon_len(m) > 900 << 20, "{}", balloon_len(m));
        // The image gave back the deleted file's space and the balloon's.
        let file = fs::metadata(&img).unwrap().len();
        assert!(file < 260 << 20, "image file {file} bytes");
        assert!(fs::read(m.join("keep")).unwrap() == keep);
        // The container goes on writing in what is left.
        fs::write(m.join("more"), data(23, 100 << 20)).unwrap();

        // Growing back deflates it.
        ok(ploop(&["resize", "-s", "2G", dd]), "grow online");
        assert_eq!(balloon_len(m), 0);
    });
    mounted(dd, &mnt, |m| {
        assert!(fs::read(m.join("keep")).unwrap() == keep);
        assert!(fs::read(m.join("more")).unwrap() == data(23, 100 << 20));
    });
    qemu_check(&img);
    openvz_check(&img);
    table_and_fs_sound(dir.path(), &img, "ext4", 2048);
}
