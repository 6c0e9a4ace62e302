//! The device layer for real: FUSE + loop, mkfs, mount, fsck, online
//! snapshots, a killed daemon, page-cache use. Needs root, /dev/fuse and
//! loop devices (CI has them).

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bin, data, ok, output, ploop};

/// These tests share the machine's page cache (one of them measures it)
/// and loop devices: run them one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A disk in a temporary folder that is unmounted however the test ends.
struct Disk {
    dir: tempfile::TempDir,
}

impl Disk {
    fn new(size: &str, fstype: &str) -> Self {
        Self::init(&["-s", size, "-t", fstype])
    }

    /// `ploop init ARGS... root.hdd` in a new folder.
    fn init(args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ploop-mount-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let img = dir.path().join("root.hdd");
        let mut all = vec!["init"];
        all.extend_from_slice(args);
        all.push(img.to_str().unwrap());
        ok(ploop(&all), "init");
        Self { dir }
    }

    fn dd(&self) -> String {
        self.dir
            .path()
            .join("DiskDescriptor.xml")
            .display()
            .to_string()
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn mnt(&self, name: &str) -> PathBuf {
        let m = self.path(name);
        fs::create_dir_all(&m).unwrap();
        m
    }

    fn mount(&self, mnt: &Path) -> String {
        self.mount_with(mnt, &[])
    }

    fn mount_with(&self, mnt: &Path, extra: &[&str]) -> String {
        let dd = self.dd();
        let mut args = vec!["mount"];
        args.extend_from_slice(extra);
        args.extend(["-m", mnt.to_str().unwrap(), &dd]);
        ok(ploop(&args), "mount")
    }

    fn umount(&self) {
        ok(ploop(&["umount", &self.dd()]), "umount");
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = ploop(&["umount", &self.dd()]);
    }
}

fn write_synced(path: &Path, data: &[u8]) {
    let mut f = fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// qemu-img's own check of a delta file passes.
fn qemu_img_check(delta: &Path) {
    let out = output(Command::new("qemu-img").args([
        "check",
        "-f",
        "parallels",
        delta.to_str().unwrap(),
    ]));
    ok(out, "qemu-img check");
}

fn fsck_clean(disk: &Disk, fstype: &str) {
    let dev = ok(ploop(&["mount", &disk.dd()]), "mount device only");
    let out = match fstype {
        "xfs" => output(Command::new("xfs_repair").args(["-n", &dev])),
        _ => output(Command::new("fsck.ext4").args(["-n", "-f", &dev])),
    };
    disk.umount();
    ok(out, &format!("fsck of {fstype}"));
}

/// `queues`: extra mount arguments choosing how FUSE requests arrive.
fn roundtrip(fstype: &str, queues: &[&str]) {
    let disk = Disk::new("512M", fstype);
    let mnt = disk.mnt("mnt");
    let dev = disk.mount_with(&mnt, queues);
    assert!(dev.starts_with("/dev/loop"), "device {dev}");
    let ring_offered = fs::read_to_string(ENABLE_URING).is_ok_and(|v| v.trim() == "Y");
    let log = daemon_log(&disk.dd());
    assert_eq!(
        log.contains("serving requests over io_uring"),
        !queues.contains(&"dev") && ring_offered,
        "transport for {queues:?}: {log}"
    );
    let dio = fs::read_to_string(format!(
        "/sys/block/{}/loop/dio",
        Path::new(&dev).file_name().unwrap().to_str().unwrap()
    ))
    .unwrap();
    assert_eq!(dio.trim(), "1", "loop device uses direct I/O");
    let big = data(1, 40 << 20);
    write_synced(&mnt.join("big"), &big);
    fs::create_dir(mnt.join("d")).unwrap();
    for i in 0..50 {
        write_synced(
            &mnt.join(format!("d/small{i}")),
            &data(100 + i, 3000 + i as usize),
        );
    }
    disk.umount();
    assert!(!mnt.join("big").exists(), "unmounted");
    disk.mount_with(&mnt, queues);
    assert!(
        fs::read(mnt.join("big")).unwrap() == big,
        "big file survives remount"
    );
    for i in 0..50 {
        assert_eq!(
            fs::read(mnt.join(format!("d/small{i}"))).unwrap(),
            data(100 + i, 3000 + i as usize)
        );
    }
    disk.umount();
    fsck_clean(&disk, fstype);
    // The delta itself stays valid for the independent tools.
    qemu_img_check(&disk.path("root.hdd"));
}

#[test]
fn ext4_write_remount_fsck() {
    let _serial = serial();
    // FUSE over io_uring where the kernel offers it (the default).
    roundtrip("ext4", &[]);
}

#[test]
fn xfs_write_remount_fsck() {
    let _serial = serial();
    // /dev/fuse and its worker threads.
    roundtrip("xfs", &["--fuse-queues", "dev"]);
}

#[test]
fn online_snapshot_with_running_writer() {
    let _serial = serial();
    let disk = Disk::new("512M", "ext4");
    let mnt = disk.mnt("mnt");
    // FUSE over io_uring where the kernel offers it: its queues must let
    // the switch drain them.
    disk.mount_with(&mnt, &["--fuse-queues", "auto"]);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let writer = {
        let (stop, done, mnt) = (stop.clone(), done.clone(), mnt.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                write_synced(&mnt.join(format!("f{i}")), &data(i, 256 << 10));
                done.lock().unwrap().push(i);
                i += 1;
            }
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    let before: Vec<u64> = done.lock().unwrap().clone();
    let out = ok(ploop(&["snapshot", &disk.dd()]), "online snapshot");
    let snap = out
        .split_whitespace()
        .find(|w| w.starts_with('{'))
        .expect("snapshot guid in output")
        .to_string();
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let all: Vec<u64> = done.lock().unwrap().clone();
    assert!(
        all.len() > before.len(),
        "the writer kept going after the snapshot"
    );

    // The snapshot mounts read-only beside the running top.
    let smnt = disk.mnt("snap");
    ok(
        ploop(&[
            "mount",
            "-r",
            "-u",
            &snap,
            "-m",
            smnt.to_str().unwrap(),
            &disk.dd(),
        ]),
        "mount snapshot read-only",
    );
    for i in &before {
        let got = fs::read(smnt.join(format!("f{i}"))).unwrap();
        assert!(got == data(*i, 256 << 10), "snapshot file f{i}");
    }
    // Files in the snapshot are whole or absent: nothing torn.
    for e in fs::read_dir(&smnt).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if let Some(i) = name.strip_prefix('f').and_then(|n| n.parse::<u64>().ok()) {
            let got = fs::read(smnt.join(&name)).unwrap();
            assert!(
                got.is_empty() || got == data(i, 256 << 10),
                "snapshot file {name} is torn"
            );
        }
    }
    // Merging would change the snapshot under the backup's feet: refused.
    let out = ploop(&["snapshot-merge", &disk.dd()]);
    assert!(!out.ok(), "merge into a mounted snapshot must fail");
    let err = out.stderr.clone();
    assert!(err.contains("locked") || err.contains("in use"), "{err}");
    ok(
        ploop(&["umount", "-m", smnt.to_str().unwrap()]),
        "umount snapshot",
    );
    // The top lost nothing.
    for i in &all {
        assert!(fs::read(mnt.join(format!("f{i}"))).unwrap() == data(*i, 256 << 10));
    }
    // Merge the snapshot away online while writing more.
    write_synced(&mnt.join("after"), b"after merge");
    ok(ploop(&["snapshot-merge", &disk.dd()]), "online merge");
    assert_eq!(fs::read(mnt.join("after")).unwrap(), b"after merge");
    disk.umount();
    let list = ok(
        ploop(&["snapshot-list", "-H", "-o", "uuid", &disk.dd()]),
        "list",
    );
    assert_eq!(list.lines().count(), 1, "merged into one delta: {list}");
    disk.mount(&mnt);
    for i in &all {
        assert!(fs::read(mnt.join(format!("f{i}"))).unwrap() == data(*i, 256 << 10));
    }
    disk.umount();
    fsck_clean(&disk, "ext4");
}

/// `ploop list --json`'s record of the disk `dd` serves.
fn record(dd: &str) -> serde_json::Value {
    let out = ok(ploop(&["list", "--json"]), "list");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let canon = fs::canonicalize(dd).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|r| Path::new(r["descriptor"].as_str().unwrap()) == canon)
        .cloned()
        .expect("our disk is listed")
}

fn daemon_pid(dd: &str) -> u32 {
    record(dd)["pid"].as_u64().expect("a pid") as u32
}

/// The log of the daemon serving `dd`, as `list` names it.
fn daemon_log(dd: &str) -> String {
    fs::read_to_string(record(dd)["log"].as_str().expect("a log path")).unwrap()
}

#[test]
fn killed_daemon_gives_errors_and_recovers() {
    let _serial = serial();
    // Over /dev/fuse, and over io_uring queues where the kernel has them.
    for queues in ["dev", "auto"] {
        killed_daemon_case(queues);
    }
}

/// Each disk has its own daemon: one killed leaves its neighbours served,
/// reading and writing, while its own I/O fails and umount cleans it up.
#[test]
fn a_killed_daemon_leaves_the_other_disks_served() {
    let _serial = serial();
    let disks: Vec<Disk> = (0..3).map(|_| Disk::new("128M", "ext4")).collect();
    let mnts: Vec<PathBuf> = disks.iter().map(|d| d.mnt("mnt")).collect();
    for (d, m) in disks.iter().zip(&mnts) {
        d.mount_with(m, &[]);
        write_synced(&m.join("before"), &data(1, 4 << 20));
    }
    let victim = daemon_pid(&disks[1].dd());
    ok(
        output(Command::new("kill").args(["-9", &victim.to_string()])),
        "kill -9",
    );
    std::thread::sleep(Duration::from_millis(300));
    for (i, (d, m)) in disks.iter().zip(&mnts).enumerate() {
        if i == 1 {
            let out = output(Command::new("timeout").args([
                "30",
                "dd",
                "if=/dev/zero",
                &format!("of={}", m.join("after").display()),
                "bs=1M",
                "count=2",
                "oflag=direct",
            ]));
            assert!(!out.ok(), "I/O on the killed disk must fail");
            continue;
        }
        // The others go on: new data written and synced, old data read.
        let after = data(2 + i as u64, 4 << 20);
        write_synced(&m.join("after"), &after);
        assert!(fs::read(m.join("before")).unwrap() == data(1, 4 << 20));
        assert!(fs::read(m.join("after")).unwrap() == after);
        assert_ne!(daemon_pid(&d.dd()), victim);
    }
    ok(
        ploop(&["umount", "-m", mnts[1].to_str().unwrap()]),
        "umount after kill",
    );
    for m in [&mnts[0], &mnts[2]] {
        ok(ploop(&["umount", "-m", m.to_str().unwrap()]), "umount");
    }
    for d in &disks {
        let out = ok(ploop(&["check", &d.dd()]), "check");
        assert!(!out.contains("cannot"), "{out}");
    }
}

fn killed_daemon_case(queues: &str) {
    let disk = Disk::new("256M", "ext4");
    let mnt = disk.mnt("mnt");
    disk.mount_with(&mnt, &["--fuse-queues", queues]);
    let data = data(7, 8 << 20);
    write_synced(&mnt.join("kept"), &data);
    let pid = daemon_pid(&disk.dd());
    ok(
        output(Command::new("kill").args(["-9", &pid.to_string()])),
        "kill -9",
    );
    std::thread::sleep(Duration::from_millis(300));
    // I/O now fails instead of hanging.
    let start = Instant::now();
    let out = output(Command::new("timeout").args([
        "30",
        "dd",
        "if=/dev/zero",
        &format!("of={}", mnt.join("new").display()),
        "bs=1M",
        "count=4",
        "oflag=direct",
    ]));
    assert!(
        start.elapsed() < Duration::from_secs(25),
        "I/O hung after the daemon died ({queues})"
    );
    assert!(!out.ok(), "I/O after the daemon died must fail ({queues})");
    // umount cleans up, a remount checks the image and sees flushed data.
    ok(
        ploop(&["umount", "-m", mnt.to_str().unwrap()]),
        "umount after kill",
    );
    let listed = ok(ploop(&["list"]), "list");
    assert!(!listed.contains(&disk.dd()), "record removed: {listed}");
    let out = ploop(&["mount", "-m", mnt.to_str().unwrap(), &disk.dd()]);
    ok(out, "remount after crash");
    assert!(
        fs::read(mnt.join("kept")).unwrap() == data,
        "flushed data survived"
    );
    disk.umount();
    fsck_clean(&disk, "ext4");
}

/// A dead daemon's pid reused by a user's process whose name says ploop
/// (any user can name a process so): the mount counts as gone, `umount`
/// cleans it up and a remount works; the view's lock file goes with the
/// daemon that held it.
#[test]
fn a_reused_daemon_pid_keeps_no_dead_mount_alive() {
    let _serial = serial();
    let disk = Disk::new("64M", "none");
    ok(ploop(&["mount", &disk.dd()]), "mount");
    let pid = daemon_pid(&disk.dd());
    ok(
        output(Command::new("kill").args(["-9", &pid.to_string()])),
        "kill -9",
    );
    while Path::new(&format!("/proc/{pid}")).exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    // The user's process, as if it had been given the dead daemon's pid.
    let mut impostor = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .args(["bash", "-c", "exec -a ploop-mount sleep 60"])
        .spawn()
        .unwrap();
    let run_dir = Path::new("/run/ploop");
    let state = fs::read_dir(run_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("state.json"))
        .find(|p| fs::read_to_string(p).is_ok_and(|t| t.contains(&disk.dd())))
        .expect("the dead daemon's record");
    let text = fs::read_to_string(&state).unwrap();
    fs::write(
        &state,
        text.replace(
            &format!("\"pid\": {pid}"),
            &format!("\"pid\": {}", impostor.id()),
        ),
    )
    .unwrap();
    let running = record(&disk.dd())["running"].as_bool();
    let umounted = ploop(&["umount", &disk.dd()]);
    let _ = impostor.kill();
    let _ = impostor.wait();
    assert_eq!(
        running,
        Some(false),
        "a user's process passed for the daemon"
    );
    ok(umounted, "umount of a disk whose daemon died");
    ok(ploop(&["mount", &disk.dd()]), "remount");
    let id = state.parent().unwrap().file_name().unwrap().to_owned();
    let lock = run_dir.join(format!("{}.lock", id.to_str().unwrap()));
    assert!(lock.exists(), "the live daemon holds its lock file");
    disk.umount();
    assert!(!lock.exists(), "the lock file outlived its daemon");
}

/// What the writer loop below puts in file `i`.
fn loop_file(i: u64) -> Vec<u8> {
    format!("{i}\n").repeat(65536).into_bytes()[..65536].to_vec()
}

#[test]
fn daemon_killed_during_a_write_and_fsync_loop_loses_nothing_flushed() {
    let _serial = serial();
    let disk = Disk::new("256M", "ext4");
    let mnt = disk.mnt("mnt");
    disk.mount(&mnt);
    // Each file is written, fsynced, then its number printed: a printed
    // number is a write the filesystem has made durable.
    let script = format!(
        "i=0; while :; do i=$((i+1)); yes \"$i\" | head -c 65536 > {m}/f$i && sync {m}/f$i && echo $i || exit 1; done",
        m = mnt.display()
    );
    let mut writer = Command::new("bash")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let pid = daemon_pid(&disk.dd());
    ok(
        output(Command::new("kill").args(["-9", &pid.to_string()])),
        "kill -9",
    );
    let start = Instant::now();
    while writer.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the writer hung after the daemon died"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut printed = String::new();
    std::io::Read::read_to_string(&mut writer.stdout.take().unwrap(), &mut printed).unwrap();
    let last: u64 = printed
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .max()
        .expect("some files were flushed before the kill");
    ok(
        ploop(&["umount", "-m", mnt.to_str().unwrap()]),
        "umount after kill",
    );
    ok(
        ploop(&["mount", "-m", mnt.to_str().unwrap(), &disk.dd()]),
        "remount after the kill",
    );
    for i in 1..=last {
        let got = fs::read(mnt.join(format!("f{i}")))
            .unwrap_or_else(|e| panic!("file {i} of {last} flushed files: {e}"));
        assert!(got == loop_file(i), "file {i} of {last} differs");
    }
    disk.umount();
    fsck_clean(&disk, "ext4");
}

#[test]
fn second_writer_is_refused() {
    let _serial = serial();
    let disk = Disk::new("128M", "ext4");
    let mnt = disk.mnt("mnt");
    disk.mount(&mnt);
    // info works on a mounted disk and says where it is mounted.
    let info = ok(ploop(&["info", &disk.dd()]), "info while mounted");
    assert!(
        info.contains("mounted:") && info.contains("/dev/loop"),
        "{info}"
    );
    let out = ploop(&["mount", &disk.dd()]);
    assert!(!out.ok(), "second mount must fail");
    let err = out.stderr.clone();
    assert!(err.contains("already mounted"), "{err}");
    let mut child = Command::new(bin())
        .args(["write", &disk.dd(), "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdin.take());
    let out = common::Out::from_output("ploop write".into(), child.wait_with_output().unwrap());
    assert!(!out.ok(), "offline write while mounted must fail");
    let err = out.stderr.clone();
    assert!(err.contains("in use") || err.contains("locked"), "{err}");
    disk.umount();
}

/// An online snapshot of a raw top shares the old top's lock as it does a
/// ploop one's, so a backup mounts it read-only beside the running disk
/// (the exclusive lock used to stay: "locked").
#[test]
fn a_raw_top_frozen_by_an_online_snapshot_mounts_read_only() {
    let _serial = serial();
    let disk = Disk::init(&["-s", "64M", "-t", "ext4", "-f", "raw"]);
    let mnt = disk.mnt("mnt");
    disk.mount(&mnt);
    write_synced(&mnt.join("kept"), b"in the snapshot");
    let out = ok(ploop(&["snapshot", &disk.dd()]), "online snapshot");
    let snap = out
        .split_whitespace()
        .find(|w| w.starts_with('{'))
        .expect("snapshot guid in output")
        .to_string();
    let smnt = disk.mnt("snap");
    ok(
        ploop(&[
            "mount",
            "-r",
            "-u",
            &snap,
            "-m",
            smnt.to_str().unwrap(),
            &disk.dd(),
        ]),
        "mount the raw snapshot read-only",
    );
    assert_eq!(fs::read(smnt.join("kept")).unwrap(), b"in the snapshot");
    ok(
        ploop(&["umount", "-m", smnt.to_str().unwrap()]),
        "umount snapshot",
    );
    disk.umount();
}

/// An online merge that runs out of space halfway marks its parent in the
/// descriptor: the running disk is untouched, the half-merged parent is
/// refused to a read-only mount, and `check` finishes the merge later.
#[test]
fn an_online_merge_that_fails_halfway_leaves_its_parent_unusable() {
    let _serial = serial();
    let tmp = tempfile::Builder::new()
        .prefix("ploop-mount-")
        .tempdir_in("/var/tmp")
        .unwrap();
    // A 160 MiB ext4 to hold the disk, so that it can fill up.
    let backing = tmp.path().join("backing.fs");
    fs::File::create(&backing)
        .unwrap()
        .set_len(160 << 20)
        .unwrap();
    ok(
        output(Command::new("mkfs.ext4").args(["-q", "-F", backing.to_str().unwrap()])),
        "mkfs",
    );
    let home = tmp.path().join("home");
    fs::create_dir_all(&home).unwrap();
    ok(
        output(Command::new("mount").args([
            "-o",
            "loop",
            backing.to_str().unwrap(),
            home.to_str().unwrap(),
        ])),
        "mount backing",
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let dd = self.0.join("DiskDescriptor.xml");
            let _ = ploop(&["umount", dd.to_str().unwrap()]);
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(home.clone());
    let img = home.join("root.hdd");
    ok(
        ploop(&["init", "-s", "256M", "-t", "ext4", img.to_str().unwrap()]),
        "init",
    );
    let dd = home.join("DiskDescriptor.xml").display().to_string();
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    ok(ploop(&["mount", "-m", mnt.to_str().unwrap(), &dd]), "mount");
    write_synced(&mnt.join("old"), &data(1, 8 << 20));
    let out = ok(ploop(&["snapshot", &dd]), "snapshot");
    let base = out
        .split_whitespace()
        .find(|w| w.starts_with('{'))
        .expect("snapshot guid in output")
        .to_string();
    write_synced(&mnt.join("new"), &data(2, 48 << 20));
    // Leave room for about a third of what the merge copies.
    let df = ok(
        output(Command::new("df").args(["-B1", "--output=avail", home.to_str().unwrap()])),
        "df",
    );
    let free: u64 = df.lines().nth(1).unwrap().trim().parse().unwrap();
    ok(
        output(Command::new("fallocate").args([
            "-l",
            &(free - (16 << 20)).to_string(),
            home.join("filler").to_str().unwrap(),
        ])),
        "fallocate",
    );
    let out = ploop(&["snapshot-merge", &dd]);
    assert!(!out.ok(), "the merge should run out of space");
    let xml = fs::read_to_string(&dd).unwrap();
    assert!(xml.contains("<Temporary/>"), "no merge mark:\n{xml}");
    // The running disk lost nothing.
    assert!(fs::read(mnt.join("old")).unwrap() == data(1, 8 << 20));
    assert!(fs::read(mnt.join("new")).unwrap() == data(2, 48 << 20));
    // The half-merged parent is refused.
    let smnt = tmp.path().join("snap");
    fs::create_dir_all(&smnt).unwrap();
    let out = ploop(&[
        "mount",
        "-r",
        "-u",
        &base,
        "-m",
        smnt.to_str().unwrap(),
        &dd,
    ]);
    assert!(!out.ok(), "a half-merged parent mounted");
    assert!(out.stderr.clone().contains("merge"));
    ok(ploop(&["umount", &dd]), "umount");
    fs::remove_file(home.join("filler")).unwrap();
    ok(ploop(&["check", &dd]), "check finishes the merge");
    assert!(!fs::read_to_string(&dd).unwrap().contains("<Temporary/>"));
    ok(
        ploop(&["mount", "-m", mnt.to_str().unwrap(), &dd]),
        "mount again",
    );
    assert!(fs::read(mnt.join("old")).unwrap() == data(1, 8 << 20));
    assert!(fs::read(mnt.join("new")).unwrap() == data(2, 48 << 20));
    ok(ploop(&["umount", &dd]), "umount");
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// Bytes of `file` held in the page cache (util-linux's fincore, which
/// asks mincore): what this file costs, whatever else runs on the host.
fn cached_bytes(file: &Path) -> u64 {
    let out = ok(
        output(Command::new("fincore").args([
            "--bytes",
            "--noheadings",
            "--output",
            "RES",
            file.to_str().unwrap(),
        ])),
        "fincore",
    );
    out.trim().parse().expect("fincore prints a byte count")
}

/// Read `data` (inside a mounted disk) once from a cold cache; returns the
/// bytes then cached of the data file itself and of the image files
/// beneath it.
fn cache_after_read(data: &Path, images: &[PathBuf]) -> (u64, u64) {
    drop_caches();
    let bytes = fs::read(data).unwrap();
    drop(bytes);
    let under = images.iter().map(|f| cached_bytes(f)).sum();
    (cached_bytes(data), under)
}

#[test]
fn data_is_cached_once() {
    let _serial = serial();
    const N: usize = 128 << 20;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let disk = Disk::new("512M", "ext4");
    let mnt = disk.mnt("mnt");
    let image = vec![disk.path("root.hdd")];
    let mut rows = Vec::new();
    for (what, queues) in [("ploop", "dev"), ("ploop over io_uring queues", "auto")] {
        disk.mount_with(&mnt, &["--fuse-queues", queues]);
        if queues == "dev" {
            write_synced(&mnt.join("data"), &data(3, N));
        }
        let (upper, under) = cache_after_read(&mnt.join("data"), &image);
        disk.umount();
        rows.push((what, upper, under));
    }

    // The same through a plain loop device without direct I/O on a raw
    // file: the image's pages are cached a second time.
    let raw = disk.path("plain.raw");
    ok(
        output(Command::new("truncate").args(["-s", "512M", raw.to_str().unwrap()])),
        "truncate",
    );
    ok(
        output(Command::new("mkfs.ext4").args(["-q", "-F", raw.to_str().unwrap()])),
        "mkfs",
    );
    let dev = ok(
        output(Command::new("losetup").args(["-f", "--show", raw.to_str().unwrap()])),
        "losetup",
    );
    let pmnt = disk.mnt("plain");
    ok(
        output(Command::new("mount").args([&dev, pmnt.to_str().unwrap()])),
        "mount plain",
    );
    write_synced(&pmnt.join("data"), &data(3, N));
    let (upper, under) = cache_after_read(&pmnt.join("data"), std::slice::from_ref(&raw));
    let _ = output(Command::new("umount").arg(&pmnt));
    let _ = output(Command::new("losetup").args(["-d", &dev]));
    rows.push(("plain loop", upper, under));

    let line: Vec<String> = rows
        .iter()
        .map(|(what, upper, under)| {
            format!(
                "{what}: data file {:.0} MiB, image {:.0} MiB",
                mib(*upper),
                mib(*under)
            )
        })
        .collect();
    println!(
        "page cache after reading {} MiB once: {}",
        N >> 20,
        line.join("; ")
    );
    for (what, upper, under) in &rows {
        // The read is cached once, by the container's filesystem.
        assert!(
            *upper as f64 >= 0.9 * N as f64,
            "{what}: only {:.0} MiB of the data file cached",
            mib(*upper)
        );
        if *what == "plain loop" {
            // What the check tells apart: a plain loop device caches the
            // image too.
            assert!(
                *under as f64 >= 0.5 * N as f64,
                "plain loop: the image holds only {:.0} MiB: the measure misses double caching",
                mib(*under)
            );
        } else {
            assert!(
                (*under as f64) <= 0.05 * N as f64,
                "{what}: the image file holds {:.0} MiB of cache for {} MiB read",
                mib(*under),
                N >> 20
            );
        }
    }
}

#[test]
fn fstrim_gives_space_back() {
    let _serial = serial();
    let disk = Disk::new("512M", "ext4");
    let mnt = disk.mnt("mnt");
    disk.mount(&mnt);
    write_synced(&mnt.join("big"), &data(9, 96 << 20));
    let img = disk.path("root.hdd");
    let used = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(p).unwrap().blocks() * 512
    };
    let full = used(&img);
    fs::remove_file(mnt.join("big")).unwrap();
    // ext4 frees the blocks at the journal commit; fstrim skips them before.
    ok(output(Command::new("sync").arg("-f").arg(&mnt)), "sync");
    ok(
        output(Command::new("fstrim").arg(mnt.to_str().unwrap())),
        "fstrim",
    );
    ok(output(Command::new("sync").arg("-f").arg(&mnt)), "sync");
    let trimmed = used(&img);
    assert!(
        trimmed + (64 << 20) < full,
        "fstrim freed too little: {full} -> {trimmed} bytes"
    );
    disk.umount();
    fsck_clean(&disk, "ext4");
}

/// Runs a writer of synced 64 KiB files in `dir` until stopped; returns
/// the indexes it completed.
struct Writer {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<u64>>,
}

impl Writer {
    fn start(dir: &Path, prefix: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (stop, dir) = (stop.clone(), dir.to_path_buf());
            std::thread::spawn(move || {
                let mut done = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    write_synced(&dir.join(format!("{prefix}{i}")), &data(i, 64 << 10));
                    done.push(i);
                    i += 1;
                }
                done
            })
        };
        Self { stop, handle }
    }

    fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap()
    }
}

#[test]
fn online_delete_and_merge_while_writing() {
    let _serial = serial();
    let disk = Disk::new("512M", "ext4");
    let mnt = disk.mnt("mnt");
    disk.mount(&mnt);
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut guids = Vec::new();
    for step in 0..2u64 {
        let data = data(1000 + step, 3 << 20);
        let name = format!("base{step}");
        write_synced(&mnt.join(&name), &data);
        files.push((name, data));
        let out = ok(ploop(&["snapshot", &disk.dd()]), "snapshot");
        guids.push(
            out.split_whitespace()
                .find(|w| w.starts_with('{'))
                .unwrap()
                .to_string(),
        );
    }
    // Delete the oldest snapshot (its child is a lower delta), then merge
    // the top with its parent, each while a writer keeps going.
    let w = Writer::start(&mnt, "a");
    std::thread::sleep(Duration::from_millis(300));
    ok(
        ploop(&["snapshot-delete", "-u", &guids[0], &disk.dd()]),
        "online delete",
    );
    let a = w.finish();
    let w = Writer::start(&mnt, "b");
    std::thread::sleep(Duration::from_millis(300));
    ok(
        ploop(&["snapshot-merge", &disk.dd()]),
        "online merge of the top",
    );
    let b = w.finish();
    assert!(!a.is_empty() && !b.is_empty(), "the writers ran");
    let list = ok(
        ploop(&["snapshot-list", "-H", "-o", "uuid", &disk.dd()]),
        "list",
    );
    assert_eq!(list.lines().count(), 1, "one delta left: {list}");
    // Merges go down, as in OpenVZ: the base file is the one that stays.
    let files_left: Vec<String> = fs::read_dir(disk.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("root.hdd"))
        .collect();
    assert_eq!(files_left, vec!["root.hdd".to_string()]);
    disk.umount();
    disk.mount(&mnt);
    for (name, data) in &files {
        assert!(&fs::read(mnt.join(name)).unwrap() == data, "{name}");
    }
    for (prefix, done) in [("a", &a), ("b", &b)] {
        for i in done {
            assert!(
                fs::read(mnt.join(format!("{prefix}{i}"))).unwrap() == data(*i, 64 << 10),
                "{prefix}{i}"
            );
        }
    }
    disk.umount();
    fsck_clean(&disk, "ext4");
    for f in fs::read_dir(disk.dir.path()).unwrap() {
        let p = f.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("root.hdd")
        {
            qemu_img_check(&p);
        }
    }
}

#[test]
fn io_uring_engine_serves_the_same_data() {
    let _serial = serial();
    let disk = Disk::new("256M", "ext4");
    let mnt = disk.mnt("mnt");
    ok(
        ploop(&[
            "mount",
            "--fuse-queues",
            "dev",
            "--io",
            "uring",
            "-m",
            mnt.to_str().unwrap(),
            &disk.dd(),
        ]),
        "mount with io_uring",
    );
    let a = data(11, 24 << 20);
    write_synced(&mnt.join("a"), &a);
    // Overwrites in place go through the ring too.
    write_synced(&mnt.join("a"), &a);
    let out = ok(ploop(&["snapshot", &disk.dd()]), "online snapshot");
    assert!(out.contains('{'), "{out}");
    write_synced(&mnt.join("b"), &data(12, 5 << 20));
    ok(output(&mut Command::new("sync")), "sync");
    drop_caches();
    assert!(fs::read(mnt.join("a")).unwrap() == a);
    disk.umount();
    disk.mount(&mnt);
    assert!(fs::read(mnt.join("a")).unwrap() == a);
    assert!(fs::read(mnt.join("b")).unwrap() == data(12, 5 << 20));
    disk.umount();
    fsck_clean(&disk, "ext4");
}

#[test]
fn busy_umount_can_be_retried() {
    let _serial = serial();
    let disk = Disk::new("128M", "ext4");
    let mnt = disk.mnt("mnt");
    disk.mount(&mnt);
    let mut holder = Command::new("sleep")
        .arg("60")
        .current_dir(&mnt)
        .spawn()
        .unwrap();
    for attempt in 0..2 {
        let out = ploop(&["umount", "-m", mnt.to_str().unwrap()]);
        assert!(!out.ok(), "umount of a busy mount point must fail");
        let err = out.stderr.clone();
        assert!(err.contains("busy"), "attempt {attempt}: {err}");
    }
    holder.kill().unwrap();
    holder.wait().unwrap();
    ok(
        ploop(&["umount", "-m", mnt.to_str().unwrap()]),
        "umount once free",
    );
    let listed = ok(ploop(&["list"]), "list");
    assert!(!listed.contains(&disk.dd()), "{listed}");
    fsck_clean(&disk, "ext4");
}

/// Someone unmounts the container's filesystem by hand; `ploop snapshot`
/// must then not freeze the filesystem that holds the mount point (here a
/// tmpfs, which cannot be frozen: trying fails the snapshot).
#[test]
fn snapshot_after_a_manual_umount_freezes_nothing_else() {
    let _serial = serial();
    let disk = Disk::new("64M", "ext4");
    let host = disk.mnt("host");
    ok(
        output(Command::new("mount").args(["-t", "tmpfs", "tmpfs", host.to_str().unwrap()])),
        "mount tmpfs",
    );
    let mnt = host.join("root");
    fs::create_dir(&mnt).unwrap();
    disk.mount(&mnt);
    fs::write(mnt.join("kept"), b"before the snapshot").unwrap();
    ok(output(Command::new("umount").arg(&mnt)), "plain umount");
    let taken = ploop(&["snapshot", &disk.dd()]);
    let _ = output(Command::new("umount").arg(&host));
    ok(taken, "snapshot of a disk whose filesystem was unmounted");
    disk.umount();
    // The snapshot holds what was written.
    let back = disk.mnt("back");
    disk.mount(&back);
    assert_eq!(fs::read(back.join("kept")).unwrap(), b"before the snapshot");
    disk.umount();
    fsck_clean(&disk, "ext4");
}

#[test]
fn sigterm_stops_the_daemon_cleanly() {
    let _serial = serial();
    let disk = Disk::new("128M", "ext4");
    let mnt = disk.mnt("mnt");
    disk.mount(&mnt);
    write_synced(&mnt.join("f"), b"kept");
    let pid = daemon_pid(&disk.dd());
    ok(
        output(Command::new("kill").args(["-TERM", &pid.to_string()])),
        "kill -TERM",
    );
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}/stat")).exists()
        && fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z"))
            .unwrap_or(false)
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "daemon still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!mnt.join("f").exists(), "the filesystem was unmounted");
    let listed = ok(ploop(&["list"]), "list");
    assert!(!listed.contains(&disk.dd()), "record removed: {listed}");
    // Closed cleanly: the in-use flag is clear, nothing to repair.
    let out = ok(ploop(&["check", "-r", &disk.dd()]), "read-only check");
    assert!(out.contains("clean"), "{out}");
    disk.mount(&mnt);
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"kept");
    disk.umount();
}

#[test]
fn two_daemons_for_one_view_cannot_both_start() {
    let _serial = serial();
    let disk = Disk::new("128M", "none");
    // Read-only views and the read-write top alike: two mounts started at
    // once, exactly one wins.
    for mode in [&["-r"][..], &[][..]] {
        let spawn = || {
            Command::new(bin())
                .arg("mount")
                .args(mode)
                .arg(disk.dd())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (spawn(), spawn());
        let outs = [a, b]
            .map(|c| common::Out::from_output("ploop mount".into(), c.wait_with_output().unwrap()));
        let started = outs.iter().filter(|o| o.ok()).count();
        assert_eq!(
            started,
            1,
            "exactly one daemon serves the view {mode:?}: {:?}",
            outs.iter().map(|o| o.stderr.clone()).collect::<Vec<_>>()
        );
        disk.umount();
        let listed = ok(ploop(&["list"]), "list");
        assert!(!listed.contains(&disk.dd()), "{listed}");
    }
}

const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Write `data` at `offset` of a block device with O_DIRECT, in requests
/// of `bs` bytes.
fn dd_write(dev: &str, data: &[u8], offset: u64, bs: usize) {
    let src = tempfile::NamedTempFile::new().unwrap();
    fs::write(src.path(), data).unwrap();
    assert_eq!(offset % bs as u64, 0);
    ok(
        output(Command::new("dd").args([
            &format!("if={}", src.path().display()),
            &format!("of={dev}"),
            &format!("bs={bs}"),
            &format!("seek={}", offset / bs as u64),
            "oflag=direct",
            "conv=notrunc,fsync",
            "status=none",
        ])),
        "dd write",
    );
}

fn dd_read(dev: &str, len: usize, bs: usize) -> Vec<u8> {
    let out = output(Command::new("dd").args([
        &format!("if={dev}"),
        &format!("bs={bs}"),
        &format!("count={}", len / bs),
        "iflag=direct",
        "status=none",
    ]));
    assert!(out.ok(), "dd read");
    out.stdout
}

/// FUSE over io_uring where the kernel has it (Linux 6.14+): the queues
/// serve aligned I/O on their own ring, unaligned I/O, discards and
/// flushes through helper threads, holes as zeros from reused buffers; the
/// bytes match a model and /dev/fuse reads the same disk back.
#[test]
fn fuse_over_io_uring_serves_what_dev_fuse_reads_back() {
    let _serial = serial();
    let disk = Disk::new("64M", "none");
    if !Path::new(ENABLE_URING).exists() {
        // No FUSE over io_uring in this kernel: asking for it fails clearly.
        let out = ploop(&["mount", "--fuse-queues", "ring", &disk.dd()]);
        assert!(!out.ok(), "ring without kernel support");
        let err = out.stderr.clone();
        assert!(err.contains("io_uring"), "{err}");
        return;
    }
    fs::write(ENABLE_URING, "Y").unwrap();
    let size = 64usize << 20;
    let mut model = vec![0u8; size];
    let dev = ok(
        ploop(&["mount", "--fuse-queues", "ring", &disk.dd()]),
        "mount over io_uring",
    );
    let log = daemon_log(&disk.dd());
    assert!(log.contains("serving requests over io_uring"), "{log}");
    // Allocating writes (helpers), then in-place rewrites (the ring), at
    // several request sizes, and 512-byte writes off the 4 KiB grid.
    let mut put = |at: usize, len: usize, bs: usize, seed: u64| {
        let data = data(seed, len);
        dd_write(&dev, &data, at as u64, bs);
        model[at..at + len].copy_from_slice(&data);
    };
    put(0, 1 << 20, 1 << 20, 1);
    put(3 << 20, 2 << 20, 64 << 10, 2);
    put(3 << 20, 1 << 20, 4096, 3);
    put((8 << 20) + 512 * 7, 512 * 3, 512, 4);
    put(40 << 20, 4 << 20, 1 << 20, 5);
    put((41 << 20) + 4096, 8192, 4096, 6);
    // A discard: the range reads as zeros.
    ok(
        output(Command::new("blkdiscard").args([
            "-o",
            &(41u64 << 20).to_string(),
            "-l",
            &(1u64 << 20).to_string(),
            &dev,
        ])),
        "blkdiscard",
    );
    model[41 << 20..42 << 20].fill(0);
    // Every request size reads back, holes included; 64 reads of 1 MiB
    // reuse every queue buffer after data went through it.
    for bs in [1 << 20, 64 << 10] {
        let back = dd_read(&dev, size, bs);
        assert!(back == model, "read back in {bs}-byte requests");
    }
    disk.umount();
    let dev = ok(
        ploop(&["mount", "-r", "--fuse-queues", "dev", &disk.dd()]),
        "mount over /dev/fuse",
    );
    assert!(
        dd_read(&dev, size, 1 << 20) == model,
        "/dev/fuse reads what the queues wrote"
    );
    disk.umount();
    qemu_img_check(&disk.path("root.hdd"));
}

/// `mount --nbd` uses the kernel's NBD client. Where the nbd module is
/// loaded, the disk goes through it for real: write, umount, then read
/// back through FUSE + loop and fsck. Where it is not (this project's CI),
/// the mount fails with a clear error and leaves nothing behind: no
/// record, no daemon, no image marked in use.
#[test]
fn mount_over_the_kernel_nbd_client() {
    let _serial = serial();
    let disk = Disk::new("128M", "ext4");
    let mnt = disk.mnt("mnt");
    let has_nbd = Path::new("/sys/block/nbd0").exists();
    let out = ploop(&["mount", "--nbd", "-m", mnt.to_str().unwrap(), &disk.dd()]);
    if has_nbd {
        let dev = ok(out, "mount --nbd");
        assert!(dev.starts_with("/dev/nbd"), "{dev}");
        let data = data(7, 3 << 20);
        write_synced(&mnt.join("over-nbd"), &data);
        let list = ok(ploop(&["list"]), "list");
        assert!(list.contains(&dev), "{list}");
        disk.umount();
        disk.mount(&mnt);
        assert_eq!(fs::read(mnt.join("over-nbd")).unwrap(), data);
        disk.umount();
        fsck_clean(&disk, "ext4");
        return;
    }
    assert!(!out.ok(), "mount --nbd without nbd devices");
    let err = out.stderr.clone();
    assert!(
        err.contains("nbd module") && err.contains("without --nbd"),
        "{err}"
    );
    assert_eq!(ok(ploop(&["list"]), "list"), "", "a record was left");
    // Closed cleanly: the next mount needs no check, and works.
    let again = ploop(&["mount", "-m", mnt.to_str().unwrap(), &disk.dd()]);
    let stderr = again.stderr.clone().to_string();
    ok(again, "mount after a failed --nbd");
    assert!(!stderr.contains("not closed cleanly"), "{stderr}");
    disk.umount();
}

/// A start that fails at any step undoes all it did: the image is closed
/// (not left marked in use) and no record, loop device or FUSE mount stays
/// behind; the next start works.
#[test]
fn a_failed_start_leaves_nothing_behind() {
    let _serial = serial();
    let disk = Disk::new("64M", "none");
    let dd = disk.dd();
    let image = disk.path("root.hdd");
    // Where this view's daemon keeps its FUSE file and socket.
    let dev = ok(ploop(&["mount", &dd]), "mount device only");
    let fuse_file = PathBuf::from(ok(
        output(Command::new("losetup").args(["-n", "-O", "BACK-FILE", "-l", &dev])),
        "losetup of the device",
    ));
    let run = fuse_file.parent().unwrap().to_path_buf();
    disk.umount();
    let leftovers = || {
        let loops = ok(
            output(Command::new("losetup").args(["-l", "-n", "-O", "BACK-FILE"])),
            "losetup -l",
        );
        let loops = loops.lines().filter(|l| l.contains(run.to_str().unwrap()));
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let fuse = mounts
            .lines()
            .filter(|l| l.contains(fuse_file.to_str().unwrap()));
        let listed = ok(ploop(&["list"]), "list");
        (loops.count(), fuse.count(), listed.contains(&dd))
    };
    let in_use = || common::read_u32(&image, 44);
    assert_eq!(in_use(), 0, "closed after a clean umount");

    // The filesystem mount fails (there is none) after the device is up.
    let mnt = disk.mnt("mnt");
    let out = ploop(&["mount", "-m", mnt.to_str().unwrap(), &dd]);
    assert!(!out.ok(), "mounting a disk without a filesystem must fail");
    assert_eq!(leftovers(), (0, 0, false), "after a failed mount: {out}");
    assert_eq!(in_use(), 0, "image left marked in use: {out}");

    // The daemon's folder cannot be made: the image is open by then.
    let _ = fs::remove_dir_all(&run);
    fs::write(&run, b"").unwrap();
    let out = ploop(&["mount", &dd]);
    fs::remove_file(&run).unwrap();
    assert!(!out.ok(), "a start without its folder must fail");
    assert_eq!(leftovers(), (0, 0, false), "after a failed start: {out}");
    assert_eq!(in_use(), 0, "image left marked in use: {out}");

    ok(ploop(&["mount", &dd]), "mount after failed starts");
    disk.umount();
}
