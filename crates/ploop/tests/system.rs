//! System tests of what goes wrong around a disk: the filesystem holding
//! the image fills up or is read-only, and two servers race for one image.
//! The client side is libnbd (nbdsh) against `ploop serve`.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// A small filesystem in a file, loop-mounted; unmounted on drop.
struct SmallFs {
    mnt: PathBuf,
}

impl SmallFs {
    /// An ext4 filesystem of `mib` MiB.
    fn new(dir: &Path, mib: u64) -> SmallFs {
        SmallFs::made_by(dir, mib, "mkfs.ext4")
    }

    fn made_by(dir: &Path, mib: u64, mkfs: &str) -> SmallFs {
        let img = dir.join("backing.fs");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(mib << 20).unwrap();
        run(mkfs, &[OsStr::new("-q"), OsStr::new("-F"), img.as_os_str()]).success();
        let mnt = dir.join("backing");
        std::fs::create_dir_all(&mnt).unwrap();
        run(
            "mount",
            &[
                OsStr::new("-o"),
                OsStr::new("loop"),
                img.as_os_str(),
                mnt.as_os_str(),
            ],
        )
        .success();
        SmallFs { mnt }
    }

    /// A ramfs: a real filesystem that cannot punch holes or zero ranges
    /// (fallocate says EOPNOTSUPP to every mode) nor do O_DIRECT.
    fn ramfs(dir: &Path) -> SmallFs {
        let mnt = dir.join("backing");
        std::fs::create_dir_all(&mnt).unwrap();
        run(
            "mount",
            &[
                OsStr::new("-t"),
                OsStr::new("ramfs"),
                OsStr::new("ramfs"),
                mnt.as_os_str(),
            ],
        )
        .success();
        SmallFs { mnt }
    }

    fn remount(&self, opts: &str) {
        run(
            "mount",
            &[OsStr::new("-o"), OsStr::new(opts), self.mnt.as_os_str()],
        )
        .success();
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

#[test]
fn a_raw_image_converts_to_preallocated_where_the_filesystem_cannot_reserve_space() {
    // ext2 files have no extents: fallocate says EOPNOTSUPP.
    let tmp = tempdir();
    let fs = SmallFs::made_by(tmp.path(), 64, "mkfs.ext2");
    let probe = fs.mnt.join("probe");
    let refused = run(
        "fallocate",
        &[OsStr::new("-l"), OsStr::new("1M"), probe.as_os_str()],
    );
    assert!(!refused.ok(), "ext2 should refuse fallocate");
    let mut disk = TestDisk::init(&fs.mnt, 16 * MIB, &["-f", "raw"]);
    disk.write_random(1, 3 * MIB + 512, 100_000);
    ploop_ok(&[
        OsStr::new("convert"),
        OsStr::new("-f"),
        OsStr::new("preallocated"),
        disk.dd.as_os_str(),
    ]);
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&disk.image).unwrap().blocks() * 512;
    assert!(
        allocated >= 16 * MIB as u64,
        "only {allocated} bytes allocated"
    );
    disk.assert_content("after converting to preallocated");
    ploop_ok(&[OsStr::new("check"), disk.image.as_os_str()]);
    qemu_check(&disk.image);
}

/// On a filesystem that cannot punch holes, TRIM and WRITE_ZEROES still
/// work (zeros are written instead), FAST_ZERO is answered ENOTSUP as the
/// protocol asks where zeroing would be slow, and nothing fails halfway.
#[test]
fn trim_and_zeroes_work_where_the_filesystem_cannot_punch_holes() {
    let tmp = tempdir();
    let fs = SmallFs::ramfs(tmp.path());
    let probe = fs.mnt.join("probe");
    std::fs::write(&probe, vec![1u8; 8192]).unwrap();
    let refused = run(
        "fallocate",
        &[
            OsStr::new("-p"),
            OsStr::new("-l"),
            OsStr::new("4096"),
            probe.as_os_str(),
        ],
    );
    assert!(!refused.ok(), "ramfs should refuse to punch holes");
    for format in ["raw", "ploop1"] {
        let home = fs.mnt.join(format);
        std::fs::create_dir_all(&home).unwrap();
        let mut disk = TestDisk::init(&home, 8 * MIB, &["-f", format, "-t", "none"]);
        disk.write_random(3, 0, 8 * MIB);
        let sock = tmp.path().join("nbd.sock");
        let server = Server::on_socket(tmp.path(), &sock, &disk.dd);
        // Raw: FAST_ZERO must be refused (zeroing means writing zeros).
        // ploop: whole clusters held by nobody below are dropped, fast.
        let fast = if format == "raw" { "False" } else { "True" };
        let script = format!(
            r#"
h = nbd.NBD()
h.connect_uri(uri)
M = 1 << 20
h.trim(M, 0)
h.trim(4096, 3 * M + 512 * 3)
h.zero(2 * M, 4 * M)
h.zero(8192, M + 4096, flags=nbd.CMD_FLAG_NO_HOLE)
try:
    h.zero(M, 6 * M, flags=nbd.CMD_FLAG_FAST_ZERO)
    fast_ok = True
except nbd.Error as e:
    assert e.errnum == errno.ENOTSUP, e
    fast_ok = False
assert fast_ok == {fast}, fast_ok
h.flush()
for off, n in ((0, M), (3 * M + 1536, 4096), (4 * M, 2 * M), (M + 4096, 8192)):
    assert h.pread(n, off) == bytes(n), (off, n)
if fast_ok:
    assert h.pread(M, 6 * M) == bytes(M)
h.shutdown()
print("ok")
"#
        );
        let out = nbdsh(&server.uri, &script);
        assert!(
            out.ok() && out.stdout_str().contains("ok"),
            "{format}: {out}\nserver log:\n{}",
            server.log()
        );
        server.stop();
        let mut zero = |off: usize, len: usize| disk.expected[off..off + len].fill(0);
        zero(0, MIB);
        zero(3 * MIB + 1536, 4096);
        zero(4 * MIB, 2 * MIB);
        zero(MIB + 4096, 8192);
        if format != "raw" {
            zero(6 * MIB, MIB);
        }
        disk.assert_content(format);
        if format != "raw" {
            peers_check(&disk.image);
        }
    }
}

#[test]
fn full_backing_filesystem_gives_enospc_and_resumes_after_space_is_freed() {
    let tmp = tempdir();
    let fs = SmallFs::new(tmp.path(), 48);
    // Most of the small filesystem taken by a file we can delete later.
    let filler = fs.mnt.join("filler");
    run(
        "fallocate",
        &[OsStr::new("-l"), OsStr::new("30M"), filler.as_os_str()],
    )
    .success();
    let dir = fs.mnt.join("disk");
    std::fs::create_dir_all(&dir).unwrap();
    let disk = TestDisk::init(&dir, 64 * MIB, &[]);
    let sock = tmp.path().join("nbd.sock");
    let server = Server::on_socket(tmp.path(), &sock, &disk.dd);
    let uri = server.uri.clone();
    // Fill until the image cannot grow; what was flushed before must stay.
    let script = r#"
h = nbd.NBD()
h.connect_uri(uri)
mib = 1024 * 1024
h.pwrite(b"K" * mib, 0)
h.flush()
failed_at = None
for i in range(1, 64):
    try:
        h.pwrite(bytes([i]) * mib, i * mib)
    except nbd.Error as e:
        assert e.errnum in (errno.ENOSPC, errno.EIO), e
        failed_at = i
        break
assert failed_at is not None, "the disk never filled"
try:
    h.flush()
except nbd.Error:
    pass
print(failed_at)
"#;
    let out = nbdsh(&uri, script);
    assert!(out.ok(), "{out}\n{}", server.log());
    let failed_at: usize = out.stdout_str().trim().parse().expect("index");
    assert!(failed_at > 1, "nothing could be written: {out}");

    // Free space: work resumes on the same server, nothing acknowledged lost.
    std::fs::remove_file(&filler).unwrap();
    let script = format!(
        r#"
h = nbd.NBD()
h.connect_uri(uri)
mib = 1024 * 1024
assert h.pread(mib, 0) == b"K" * mib
for i in range(1, {failed_at}):
    assert h.pread(mib, i * mib) == bytes([i]) * mib, i
h.pwrite(b"R" * mib, {failed_at} * mib)
h.flush()
assert h.pread(mib, {failed_at} * mib) == b"R" * mib
print("ok")
"#
    );
    let out = nbdsh(&uri, &script);
    assert!(
        out.ok() && out.stdout_str().contains("ok"),
        "{out}\n{}",
        server.log()
    );
    server.stop();
    // The image is consistent for both independent checkers.
    peers_check(&disk.image);
    let data = disk.read(None);
    assert!(data[..MIB].iter().all(|&b| b == b'K'));
    for i in 1..failed_at {
        assert!(data[i * MIB..(i + 1) * MIB].iter().all(|&b| b == i as u8));
    }
    assert!(data[failed_at * MIB..(failed_at + 1) * MIB]
        .iter()
        .all(|&b| b == b'R'));
}

#[test]
fn read_only_backing_filesystem_serves_read_only_and_refuses_writes_clearly() {
    let tmp = tempdir();
    let fs = SmallFs::new(tmp.path(), 32);
    let dir = fs.mnt.join("disk");
    std::fs::create_dir_all(&dir).unwrap();
    let mut disk = TestDisk::init(&dir, 8 * MIB, &[]);
    disk.write_random(3, MIB, 64 * 1024);
    fs.remount("remount,ro");
    let sock = tmp.path().join("nbd.sock");
    let refused = ploop(&[
        OsStr::new("serve"),
        "--socket".as_ref(),
        sock.as_os_str(),
        disk.dd.as_os_str(),
    ]);
    assert_eq!(refused.code, Some(1), "{refused}");
    assert!(
        refused.stderr.contains("Read-only file system") || refused.stderr.contains("read-only"),
        "{refused}"
    );
    let server = Server::start(
        tmp.path(),
        &[
            OsStr::new("--socket"),
            sock.as_os_str(),
            "-r".as_ref(),
            disk.dd.as_os_str(),
        ],
    );
    let copy = tmp.path().join("copy.raw");
    run("nbdcopy", &[server.uri.as_str(), copy.to_str().unwrap()]).success();
    assert_same(
        &std::fs::read(&copy).unwrap(),
        &disk.expected,
        "read-only copy",
    );
    server.stop();
    fs.remount("remount,rw");
}

#[test]
fn two_servers_racing_for_one_image_one_wins() {
    let tmp = tempdir();
    let disk = TestDisk::init(tmp.path(), 8 * MIB, &[]);
    for round in 0..5 {
        let spawn = |n: usize| {
            let log = tmp.path().join(format!("race-{round}-{n}.log"));
            let sock = tmp.path().join(format!("race-{round}-{n}.sock"));
            let child = Command::new(bin())
                .arg("serve")
                .arg("--socket")
                .arg(&sock)
                .arg(&disk.dd)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            (child, log)
        };
        let mut a = spawn(0);
        let mut b = spawn(1);
        std::thread::sleep(Duration::from_millis(700));
        let mut running = Vec::new();
        for (child, log) in [&mut a, &mut b] {
            match child.try_wait().unwrap() {
                None => running.push(child.id()),
                Some(status) => {
                    let err = std::fs::read_to_string(&*log).unwrap();
                    assert_eq!(status.code(), Some(1), "{err}");
                    assert!(err.contains("locked") || err.contains("in use"), "{err}");
                }
            }
        }
        assert_eq!(
            running.len(),
            1,
            "round {round}: {} servers running",
            running.len()
        );
        for (mut child, log) in [a, b] {
            if running.contains(&child.id()) {
                run("kill", &["-TERM".to_string(), child.id().to_string()]);
                let status = wait_timeout(&mut child, Duration::from_secs(30));
                assert!(
                    status.is_some_and(|s| s.success()),
                    "{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
    }
    peers_check(&disk.image);
}

#[test]
fn a_block_device_is_served_whole() {
    let tmp = tempdir();
    let backing = tmp.path().join("dev.img");
    // An odd number of sectors: the last 4 KiB block is partly outside.
    let size = 16 * MIB + 512;
    let want = data(17, size);
    std::fs::write(&backing, &want).unwrap();
    let attached = run(
        "losetup",
        &[OsStr::new("-f"), OsStr::new("--show"), backing.as_os_str()],
    )
    .success();
    let dev = attached.stdout_str().trim().to_string();
    let detach = |dev: &str| {
        run("losetup", &["-d", dev]);
    };
    let sock = tmp.path().join("nbd.sock");
    let server = Server::start(
        tmp.path(),
        &[
            OsStr::new("--socket"),
            sock.as_os_str(),
            "-f".as_ref(),
            "raw".as_ref(),
            dev.as_ref(),
        ],
    );
    let script = r#"
h = nbd.NBD()
h.connect_uri(uri)
assert h.get_size() == 16 * 1024 * 1024 + 512, h.get_size()
h.pwrite(b"D" * 8192, 4096)
# The last sector (a backup GPT header, say), and a write across the last
# whole 4 KiB block into it.
h.pwrite(b"G" * 512, 16 * 1024 * 1024)
h.pwrite(b"E" * 1000, 16 * 1024 * 1024 - 700)
h.flush()
print("ok")
"#;
    let out = nbdsh(&server.uri, script);
    let copy = tmp.path().join("copy.raw");
    let copied = run("nbdcopy", &[server.uri.as_str(), copy.to_str().unwrap()]);
    server.stop();
    detach(&dev);
    assert!(out.ok() && out.stdout_str().contains("ok"), "{out}");
    copied.success();
    let mut want = want;
    want[4096..4096 + 8192].fill(b'D');
    want[16 * MIB..].fill(b'G');
    want[16 * MIB - 700..16 * MIB + 300].fill(b'E');
    assert_same(&std::fs::read(&copy).unwrap(), &want, "copy of the device");
    assert_same(
        &std::fs::read(&backing).unwrap(),
        &want,
        "the device's file",
    );
}

/// A merge that runs out of space halfway leaves its parent marked in the
/// descriptor (OpenVZ's Temporary): the parent's half-merged content is
/// refused to `read -u`, `snapshot-switch -u` and `serve -u`, the top
/// still reads right, and once there is room `check` finishes the merge.
#[test]
fn a_merge_that_fails_halfway_leaves_its_parent_unusable_until_finished() {
    let tmp = tempdir();
    let fs = SmallFs::new(tmp.path(), 96);
    let filler = fs.mnt.join("filler");
    let dir = fs.mnt.join("disk");
    std::fs::create_dir_all(&dir).unwrap();
    let mut disk = TestDisk::init(&dir, 48 * MIB, &[]);
    disk.write_random(1, 0, 4 * MIB);
    let base = disk.snapshot();
    disk.write_random(2, 2 * MIB, 16 * MIB);
    // Leave room for about half of what the merge copies.
    let free = {
        let out = run(
            "df",
            &[
                OsStr::new("-B1"),
                OsStr::new("--output=avail"),
                fs.mnt.as_os_str(),
            ],
        );
        out.stdout_str()
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    run(
        "fallocate",
        &[
            OsStr::new("-l"),
            OsStr::new(&(free - 8 * MIB as u64).to_string()),
            filler.as_os_str(),
        ],
    )
    .success();
    let out = ploop(&[OsStr::new("snapshot-merge"), disk.dd.as_os_str()]);
    assert_eq!(
        out.code,
        Some(1),
        "the merge should run out of space: {out}"
    );
    assert!(out.stderr.contains("No space"), "{out}");
    let xml = std::fs::read_to_string(&disk.dd).unwrap();
    assert!(xml.contains("<Temporary/>"), "no merge mark:\n{xml}");
    // The top reads as before: the child masks every cluster copied.
    disk.assert_content("the top after a failed merge");
    // The parent on its own is refused everywhere.
    for args in [
        vec!["read", "-u", &base],
        vec!["snapshot-switch", "-u", &base],
    ] {
        let mut a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        a.push(disk.dd.as_os_str());
        let out = ploop(&a);
        assert_eq!(out.code, Some(1), "{out}");
        assert!(out.stderr.contains("merge"), "{out}");
    }
    let sock = tmp.path().join("nbd.sock");
    let refused = run(
        "timeout",
        &[
            OsStr::new("20"),
            OsStr::new(bin()),
            OsStr::new("serve"),
            OsStr::new("-r"),
            OsStr::new("-u"),
            OsStr::new(&base),
            OsStr::new("--socket"),
            sock.as_os_str(),
            disk.dd.as_os_str(),
        ],
    );
    assert_eq!(refused.code, Some(1), "{refused}");
    // Room again: check rolls the merge forward.
    std::fs::remove_file(&filler).unwrap();
    let report = ploop(&[OsStr::new("check"), OsStr::new("-r"), disk.dd.as_os_str()]);
    assert_eq!(report.code, Some(2), "{report}");
    assert!(report.stdout_str().contains("did not finish"), "{report}");
    ploop_ok(&[OsStr::new("check"), disk.dd.as_os_str()]);
    let xml = std::fs::read_to_string(&disk.dd).unwrap();
    assert!(!xml.contains("<Temporary/>"), "merge mark left:\n{xml}");
    assert_eq!(disk.snapshots().len(), 1, "merged into one delta");
    disk.assert_content("the disk after the merge finished");
    disk.peers_check_all();
}

/// Mark snapshot `guid` in the descriptor as a merge left unfinished would
/// (OpenVZ's `<Temporary/>`).
fn mark_temporary(dd: &Path, guid: &str) {
    let xml = std::fs::read_to_string(dd).unwrap();
    let shots = xml.find("<Snapshots>").unwrap();
    let at = shots + xml[shots..].find(&format!("<GUID>{guid}</GUID>")).unwrap();
    let end = at + xml[at..].find("</Shot>").unwrap();
    let marked = format!("{}<Temporary/>\n    {}", &xml[..end], &xml[end..]);
    std::fs::write(dd, marked).unwrap();
}

/// The in-use flag a killed writer leaves in a delta's header.
fn mark_in_use(image: &Path) {
    patch(image, 44, &0x746F_6E59u32.to_le_bytes());
}

/// A daemon killed during an online merge leaves its top in use and the
/// merge unfinished: the next mount (here `serve`, which opens disks the
/// same way) repairs the top and rolls the merge forward while it holds
/// the descriptor lock (the roll-forward used to take that lock a second
/// time and fail on it).
#[test]
fn opening_a_disk_rolls_an_unfinished_merge_forward_under_its_own_lock() {
    let tmp = tempdir();
    let mut disk = TestDisk::init(tmp.path(), 8 * MIB, &[]);
    disk.write_random(1, 0, 2 * MIB);
    let base = disk.snapshot();
    disk.write_random(2, MIB, 3 * MIB);
    mark_temporary(&disk.dd, &base);
    let top = disk
        .delta_files()
        .into_iter()
        .find(|f| f != &disk.image)
        .expect("a top delta");
    mark_in_use(&top);
    let sock = tmp.path().join("nbd.sock");
    let server = Server::on_socket(tmp.path(), &sock, &disk.dd);
    let out = nbdsh(
        &server.uri,
        "h = nbd.NBD()\nh.connect_uri(uri)\nimport sys\nsys.stdout.buffer.write(h.pread(8 << 20, 0))\n",
    );
    server.stop();
    assert_same(&out.success().stdout, &disk.expected, "the disk over NBD");
    assert!(!std::fs::read_to_string(&disk.dd)
        .unwrap()
        .contains("<Temporary/>"));
    assert_eq!(disk.snapshots().len(), 1, "the merge was finished");
    disk.assert_content("after the roll-forward");
    disk.peers_check_all();
}

/// A merge that cannot start (its parent is mounted read-only by a
/// backup) marks nothing: the parent stays usable.
#[test]
fn a_merge_that_cannot_start_marks_nothing() {
    let tmp = tempdir();
    let mut disk = TestDisk::init(tmp.path(), 4 * MIB, &[]);
    disk.write_random(1, 0, MIB);
    let base = disk.snapshot();
    disk.write_random(2, 0, MIB);
    let sock = tmp.path().join("nbd.sock");
    let backup = Server::on_socket_with(tmp.path(), &sock, &["-r", "-u", &base], &disk.dd);
    let out = ploop(&[OsStr::new("snapshot-merge"), disk.dd.as_os_str()]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("locked"), "{out}");
    backup.stop();
    let xml = std::fs::read_to_string(&disk.dd).unwrap();
    assert!(
        !xml.contains("<Temporary/>"),
        "a merge that never started marked:\n{xml}"
    );
    ploop_ok(&[
        OsStr::new("read"),
        OsStr::new("-u"),
        OsStr::new(&base),
        disk.dd.as_os_str(),
    ]);
}

/// A parent whose BAT is shorter than the disk (qemu and OpenVZ accept
/// such images) cannot take clusters past its table: the merge is refused
/// before anything is marked or written, rather than failing halfway on
/// every try.
#[test]
fn a_merge_into_a_parent_with_a_short_bat_is_refused_up_front() {
    let tmp = tempdir();
    let sample = sample_image(tmp.path(), "parallels-v2");
    let dir = tmp.path().join("disk");
    std::fs::create_dir(&dir).unwrap();
    let image = dir.join("root.hds");
    std::fs::copy(&sample, &image).unwrap();
    patch(&image, 36, &8192u32.to_le_bytes()); // 4 MiB: 64 clusters, 32 in the BAT
    ploop_ok(&[
        OsStr::new("restore-descriptor"),
        dir.as_os_str(),
        image.as_os_str(),
    ]);
    let mut disk = TestDisk::adopt(&dir, &image, Vec::new());
    disk.expected = disk.read(None);
    disk.snapshot();
    disk.write_random(3, 3 * MIB, 64 << 10); // cluster 48: past the parent's table
    let before = std::fs::read(&image).unwrap();
    let out = ploop(&[OsStr::new("snapshot-merge"), disk.dd.as_os_str()]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("BAT maps only 32 clusters"), "{out}");
    assert!(!std::fs::read_to_string(&disk.dd)
        .unwrap()
        .contains("<Temporary/>"));
    assert!(
        std::fs::read(&image).unwrap() == before,
        "the parent changed"
    );
    disk.assert_content("after a refused merge");
}

/// Deleting the top over a parent whose merge did not finish would make
/// that parent a top that refuses to open: refused, until check finishes
/// the merge.
#[test]
fn the_top_over_an_unfinished_merge_cannot_be_deleted() {
    let tmp = tempdir();
    let mut disk = TestDisk::init(tmp.path(), 4 * MIB, &[]);
    disk.write_random(1, 0, MIB);
    let base = disk.snapshot();
    disk.write_random(2, 0, MIB);
    mark_temporary(&disk.dd, &base);
    let top = "{5fbaabe3-6958-40ff-92a7-860e329aab41}";
    let out = ploop(&[
        OsStr::new("snapshot-delete"),
        OsStr::new("-u"),
        OsStr::new(top),
        disk.dd.as_os_str(),
    ]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("did not finish"), "{out}");
    ploop_ok(&[OsStr::new("check"), disk.dd.as_os_str()]);
    disk.assert_content("after check finished the merge");
}

/// An unfinished merge on a side branch (not under the top): check repairs
/// both of its deltas (a crash left the parent in use) before it rolls the
/// merge forward.
#[test]
fn check_rolls_forward_a_merge_on_a_side_branch() {
    let tmp = tempdir();
    let mut disk = TestDisk::init(tmp.path(), 4 * MIB, &[]);
    disk.write_random(1, 0, MIB);
    let s1 = disk.snapshot();
    disk.write_random(2, 0, MIB);
    let s2 = disk.snapshot();
    disk.write_random(3, MIB, MIB);
    let s3 = disk.snapshot();
    let s3_view = disk.read(Some(&s3));
    ploop_ok(&[
        OsStr::new("snapshot-switch"),
        OsStr::new("-u"),
        OsStr::new(&s1),
        disk.dd.as_os_str(),
    ]);
    // S1 has two children now (S2, and the new top); S2 -> S3 is a side
    // branch. A merge of S3 into S2 was cut short: S2 marked, left in use.
    mark_temporary(&disk.dd, &s2);
    let xml = std::fs::read_to_string(&disk.dd).unwrap();
    let at = xml.find(&format!("<GUID>{s2}</GUID>")).unwrap();
    let file_at = at + xml[at..].find("<File>").unwrap() + 6;
    let file = &xml[file_at..file_at + xml[file_at..].find("</File>").unwrap()];
    mark_in_use(&disk.dir.join(file));
    ploop_ok(&[OsStr::new("check"), disk.dd.as_os_str()]);
    let xml = std::fs::read_to_string(&disk.dd).unwrap();
    assert!(!xml.contains("<Temporary/>"), "{xml}");
    assert!(!xml.contains(&s2), "S2 was merged away:\n{xml}");
    assert_same(&disk.read(Some(&s3)), &s3_view, "S3 after the roll-forward");
}
