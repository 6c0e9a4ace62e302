//! Disks as OpenVZ makes and uses them: a GPT with the filesystem in
//! partition 1 (built here by sgdisk, mkfs and qemu-img, never by us),
//! OpenVZ's descriptor elements kept through our rewrites, encrypted disks
//! refused, and OpenVZ's locks honoured and held. Needs root, loop devices
//! and /dev/fuse (CI has them).

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{
    data, md5, ok, openvz_check, ploop, qemu_check, qemu_convert, run, tempdir, Loop, Mounted,
};

/// Mounts and loop devices: one test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const SECTOR: u64 = 512;
const BALLOON: &str = ".balloon-c3a5ae3d-ce7f-43c4-a1ea-c61e2b4504e8";

/// The MD5 of everything a disk holds, as `ploop read` gives it.
fn disk_md5(dd: &str) -> String {
    let cmd = format!("set -o pipefail; '{}' read '{dd}' | md5sum", common::bin());
    ok(run("bash", &["-c", &cmd]), "ploop read | md5sum")
}

/// OpenVZ's DiskDescriptor.xml for one base image, as its lib/xml.c
/// writes it (OpenVZ 9 names the root Virtuozzo_disk_image).
fn openvz_descriptor(sectors: u64, file: &str, extra_params: &str) -> String {
    let top = common::TOP_GUID;
    let cyl = sectors / (16 * 63);
    format!(
        r#"<?xml version="1.0"?>
<Virtuozzo_disk_image>
  <Disk_Parameters>
    <Disk_size>{sectors}</Disk_size>
    <Cylinders>{cyl}</Cylinders>
    <Heads>16</Heads>
    <Sectors>63</Sectors>
    <Padding>0</Padding>{extra_params}
  </Disk_Parameters>
  <StorageData>
    <Storage>
      <Start>0</Start>
      <End>{sectors}</End>
      <Blocksize>2048</Blocksize>
      <Image>
        <GUID>{top}</GUID>
        <Type>Compressed</Type>
        <File>{file}</File>
      </Image>
    </Storage>
  </StorageData>
  <Snapshots>
    <TopGUID>{top}</TopGUID>
    <Shot>
      <GUID>{top}</GUID>
      <ParentGUID>{{00000000-0000-0000-0000-000000000000}}</ParentGUID>
    </Shot>
  </Snapshots>
</Virtuozzo_disk_image>
"#
    )
}

/// The files a container might hold: names and contents.
fn tree() -> Vec<(String, Vec<u8>)> {
    let mut files = vec![("big".to_string(), data(7, 9 << 20))];
    for i in 0..40u64 {
        files.push((
            format!("etc/d{}/f{i}", i % 4),
            data(100 + i, 100 + 997 * i as usize),
        ));
    }
    files
}

fn write_tree(root: &Path) {
    for (name, bytes) in tree() {
        let p = root.join(&name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, &bytes).unwrap();
    }
}

fn check_tree(root: &Path) {
    for (name, bytes) in tree() {
        let got = fs::read(root.join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(got == bytes, "{name} differs");
    }
}

/// OpenVZ's layout built without us: a raw disk, `sgdisk` puts partition 1
/// where OpenVZ's create_gpt_partition does, ext4 is made on the
/// partition's byte range through a loop device and filled, qemu-img
/// converts it to the ploop format, and the descriptor is OpenVZ's. Our
/// `mount` finds partition 1 and every file reads back.
#[test]
fn a_disk_laid_out_by_openvz_tools_mounts_and_reads_back() {
    let _s = serial();
    let dir = tempdir();
    let raw = dir.path().join("disk.raw");
    let sectors: u64 = 256 << 11; // 256 MiB
    fs::File::create(&raw)
        .unwrap()
        .set_len(sectors * SECTOR)
        .unwrap();
    // OpenVZ: start = one cluster; end = (size - cluster) rounded down to
    // the cluster, then to 8 sectors; sgdisk -n 1:start:end-1.
    let end = (sectors - 2048) / 2048 * 2048 / 8 * 8;
    ok(run("sgdisk", &["-o", raw.to_str().unwrap()]), "sgdisk -o");
    ok(
        run(
            "sgdisk",
            &[
                &format!("-n=1:2048:{}", end - 1),
                "-t=1:8300",
                raw.to_str().unwrap(),
            ],
        ),
        "sgdisk -n",
    );
    let (start, len) = (2048 * SECTOR, (end - 2048) * SECTOR);
    {
        let part = Loop::attach(&raw, start, len);
        ok(run("mkfs.ext4", &["-q", "-F", &part.0]), "mkfs");
        let mnt = dir.path().join("fill");
        fs::create_dir(&mnt).unwrap();
        ok(run("mount", &[&part.0, mnt.to_str().unwrap()]), "mount");
        write_tree(&mnt);
        ok(run("umount", &[&mnt]), "umount");
    }
    let image = dir.path().join("root.hds");
    qemu_convert("raw", "parallels", &raw, &image);
    fs::remove_file(&raw).unwrap();
    let dd = dir.path().join("DiskDescriptor.xml");
    fs::write(&dd, openvz_descriptor(sectors, "root.hds", "")).unwrap();
    let dd_s = dd.to_str().unwrap().to_string();

    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let dev = ok(
        ploop(&["mount", "-m", mnt.to_str().unwrap(), &dd_s]),
        "mount",
    );
    let _m = Mounted(dd_s.clone());
    check_tree(&mnt);
    // Which partition is mounted, and over which range.
    let list: serde_json::Value =
        serde_json::from_str(&ok(ploop(&["list", "--json"]), "list")).unwrap();
    let rec = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["descriptor"] == dd_s.as_str())
        .expect("listed");
    assert_eq!(rec["partition"]["number"], 1, "{rec}");
    assert_eq!(rec["partition"]["start"], start, "{rec}");
    assert_eq!(rec["partition"]["length"], len, "{rec}");
    assert_eq!(rec["fs_device"], dev.as_str(), "{rec}");
    assert_ne!(rec["device"], rec["fs_device"], "{rec}");
    let text = ok(ploop(&["list"]), "list");
    assert!(text.contains("partition=1 of"), "{text}");
    let info = ok(ploop(&["info", &dd_s]), "info");
    assert!(
        info.contains(&format!("{dev} (partition 1 of ")),
        "info names the partition: {info}"
    );
    // The container writes; its descriptor keeps OpenVZ's root name.
    fs::write(mnt.join("new"), b"written through ploop").unwrap();
    ok(ploop(&["umount", &dd_s]), "umount");
    let x = fs::read_to_string(&dd).unwrap();
    assert!(x.contains("<Virtuozzo_disk_image>"), "{x}");
    qemu_check(&image);
    // OpenVZ's own check refuses this file as qemu-img wrote it (the rest
    // of its header cluster is a hole, "sparse"); check -S fills it, and
    // changes nothing the disk holds.
    let sparse = run(
        common::OPENVZ_PLOOP,
        &["check", "-f", "-c", "-r", image.to_str().unwrap()],
    );
    assert!(!sparse.ok() && sparse.stderr.contains("sparse"), "{sparse}");
    let before = disk_md5(&dd_s);
    let out = ok(ploop(&["check", "-S", image.to_str().unwrap()]), "check -S");
    assert!(out.contains("sparse") && out.contains("repaired"), "{out}");
    openvz_check(&image);
    assert_eq!(disk_md5(&dd_s), before);
    let again = ok(
        ploop(&["check", "-S", image.to_str().unwrap()]),
        "check -S again",
    );
    assert!(!again.contains("sparse"), "{again}");
    // And the filesystem is clean, seen through qemu's reading of it.
    let back = dir.path().join("back.raw");
    qemu_convert("parallels", "raw", &image, &back);
    let part = Loop::attach(&back, start, len);
    ok(run("e2fsck", &["-fn", &part.0]), "e2fsck");
}

/// Our `init` makes OpenVZ's layout: converted to raw by qemu-img, the
/// disk has partition 1 where OpenVZ puts it, of the Linux filesystem
/// type, a table sgdisk finds sound, and a clean filesystem with the
/// balloon file in its root.
#[test]
fn our_init_lays_the_disk_out_as_openvz_does() {
    let _s = serial();
    for fstype in ["ext4", "xfs"] {
        let dir = tempdir();
        let img = dir.path().join("root.hdd");
        ok(
            ploop(&["init", "-s", "1G", "-t", fstype, img.to_str().unwrap()]),
            "init",
        );
        let raw = dir.path().join("disk.raw");
        qemu_convert("parallels", "raw", &img, &raw);
        let verify = ok(run("sgdisk", &["-v", raw.to_str().unwrap()]), "sgdisk -v");
        assert!(verify.contains("No problems found"), "{verify}");
        let part = ok(
            run("sgdisk", &["-i", "1", raw.to_str().unwrap()]),
            "sgdisk -i",
        );
        // 1 GiB, 1 MiB clusters: (2097152 - 2048) / 2048 * 2048 = 2095104.
        for want in [
            "Partition GUID code: 0FC63DAF-8483-4772-8E79-3D69D8477DE4",
            "First sector: 2048 ",
            "Last sector: 2095103 ",
        ] {
            assert!(part.contains(want), "{want} in:\n{part}");
        }
        let part = Loop::attach(&raw, 2048 * SECTOR, (2095104 - 2048) * SECTOR);
        match fstype {
            "xfs" => ok(run("xfs_repair", &["-n", &part.0]), "xfs_repair"),
            _ => ok(run("e2fsck", &["-fn", &part.0]), "e2fsck"),
        };
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        ok(
            run("mount", &["-o", "ro", &part.0, mnt.to_str().unwrap()]),
            "mount",
        );
        let balloon = fs::metadata(mnt.join(BALLOON));
        let _ = run("umount", &[&mnt]);
        let balloon = balloon.expect("the balloon file is in the root");
        assert_eq!(balloon.len(), 0);
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&balloon.permissions()) & 0o777,
            0o600
        );
    }
    // -P: no table, the filesystem on the whole disk (as before).
    let dir = tempdir();
    let img = dir.path().join("root.hdd");
    ok(
        ploop(&["init", "-P", "-s", "256M", img.to_str().unwrap()]),
        "init -P",
    );
    let raw = dir.path().join("disk.raw");
    qemu_convert("parallels", "raw", &img, &raw);
    ok(
        run("e2fsck", &["-fn", raw.to_str().unwrap()]),
        "e2fsck whole",
    );
}

/// A disk whose table is foreign or damaged is refused before anything
/// is served, and its image is not written at all.
#[test]
fn a_foreign_or_damaged_table_is_refused_and_nothing_is_written() {
    let _s = serial();
    // A GPT made for a 64 MiB disk, on a 32 MiB one (the table's backup
    // and usable range lie past the end); then a protective MBR with no
    // GPT behind it; then a DOS table.
    let big = tempdir();
    let raw = big.path().join("big.raw");
    fs::File::create(&raw).unwrap().set_len(64 << 20).unwrap();
    ok(
        run("sgdisk", &["-o", "-n=1:2048:0", raw.to_str().unwrap()]),
        "sgdisk",
    );
    let gpt_head = fs::read(&raw).unwrap()[..34 * 512].to_vec();
    let mut protective = gpt_head[..512].to_vec();
    protective.resize(4096, 0);
    let mut dos = vec![0u8; 512];
    dos[446 + 4] = 0x83;
    dos[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    dos[446 + 12..446 + 16].copy_from_slice(&60000u32.to_le_bytes());
    dos[510] = 0x55;
    dos[511] = 0xaa;
    for (head, needle) in [
        (gpt_head, "was the disk resized"),
        (protective, "protective MBR but no GPT"),
        (dos, "MBR (DOS) partition table"),
    ] {
        let dir = tempdir();
        let img = dir.path().join("root.hdd");
        ok(
            ploop(&["init", "-s", "32M", "-t", "none", img.to_str().unwrap()]),
            "init",
        );
        let dd = dir.path().join("DiskDescriptor.xml");
        let head_file = dir.path().join("head");
        fs::write(&head_file, &head).unwrap();
        ok(
            ploop(&["write", dd.to_str().unwrap(), head_file.to_str().unwrap()]),
            "write",
        );
        let before = md5(&img);
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let out = ploop(&["mount", "-m", mnt.to_str().unwrap(), dd.to_str().unwrap()]);
        let _m = Mounted(dd.to_str().unwrap().to_string());
        assert!(!out.ok(), "refused: {out}");
        assert!(
            out.stderr.contains(needle) && out.stderr.contains("partition table"),
            "{needle}: {out}"
        );
        assert_eq!(md5(&img), before, "nothing written to the image");
        assert!(
            !ok(ploop(&["list"]), "list").contains(dd.to_str().unwrap()),
            "nothing left mounted"
        );
    }
}

/// What we do not model in an OpenVZ descriptor survives every rewrite:
/// snapshot, merge, delete, switch, version conversion.
#[test]
fn openvz_descriptor_elements_survive_every_rewrite() {
    let dir = tempdir();
    let img = dir.path().join("root.hds");
    ok(
        ploop(&["init", "-s", "64M", "-t", "none", img.to_str().unwrap()]),
        "init",
    );
    let dd = dir.path().join("DiskDescriptor.xml");
    let dd_s = dd.to_str().unwrap();
    // Our init wrote its own: make it OpenVZ's, with elements of OpenVZ 9
    // (Max_delta_size) and of someone else.
    let x = openvz_descriptor(
        131072,
        "root.hds",
        "\n    <Max_delta_size>0</Max_delta_size>",
    )
    .replace(
        "<Virtuozzo_disk_image>",
        "<Virtuozzo_disk_image Version=\"9\">",
    )
    .replace(
        "<Type>Compressed</Type>",
        "<Type>Compressed</Type>\n        <Origin site=\"a&amp;b\">backup</Origin>",
    );
    fs::write(&dd, x).unwrap();
    let kept = |what: &str| {
        let x = fs::read_to_string(&dd).unwrap();
        for s in [
            "<Virtuozzo_disk_image Version=\"9\">",
            "<Max_delta_size>0</Max_delta_size>",
            "<Origin site=\"a&amp;b\">backup</Origin>",
        ] {
            assert!(x.contains(s), "{s} lost after {what}:\n{x}");
        }
        assert!(x.find("<Padding>") < x.find("<Max_delta_size>"), "{x}");
    };
    let snap = ok(ploop(&["snapshot", dd_s]), "snapshot");
    kept("snapshot");
    let guid = snap.split_whitespace().nth(2).unwrap().to_string();
    ok(ploop(&["snapshot", dd_s]), "snapshot 2");
    ok(ploop(&["snapshot-merge", dd_s]), "merge");
    kept("merge");
    ok(ploop(&["snapshot-switch", "-u", &guid, dd_s]), "switch");
    kept("switch");
    ok(ploop(&["convert", "-v", "1", dd_s]), "convert");
    kept("convert");
    ok(ploop(&["check", dd_s]), "check");
    kept("check");
}

/// An encrypted disk (OpenVZ's `init -k`) is refused by every path that
/// reads or writes its data, naming the key, and is not written.
#[test]
fn an_encrypted_disk_is_refused_naming_its_key() {
    let _s = serial();
    let dir = tempdir();
    let img = dir.path().join("root.hds");
    ok(
        ploop(&["init", "-s", "64M", "-t", "none", img.to_str().unwrap()]),
        "init",
    );
    let dd = dir.path().join("DiskDescriptor.xml");
    let dd_s = dd.to_str().unwrap();
    fs::write(
        &dd,
        openvz_descriptor(
            131072,
            "root.hds",
            "\n    <Encryption>\n      <KeyId>vz-key-0042</KeyId>\n    </Encryption>",
        ),
    )
    .unwrap();
    let before = md5(&img);
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let sock = dir.path().join("nbd.sock");
    let input = dir.path().join("in");
    fs::write(&input, [1u8; 4096]).unwrap();
    let _m = Mounted(dd_s.to_string());
    for args in [
        vec!["mount", "-m", mnt.to_str().unwrap(), dd_s],
        vec!["mount", dd_s],
        vec!["serve", "--socket", sock.to_str().unwrap(), dd_s],
        vec!["read", "--length", "4096", dd_s],
        vec!["write", dd_s, input.to_str().unwrap()],
    ] {
        let out = ploop(&args);
        assert!(!out.ok(), "{args:?} refused: {out}");
        assert!(
            out.stderr.contains("encrypted") && out.stderr.contains("vz-key-0042"),
            "{args:?}: {out}"
        );
    }
    assert_eq!(md5(&img), before, "nothing written");
    let out = ploop(&["init", "-k", "k1", "-s", "64M", "/var/tmp/never.hdd"]);
    assert!(!out.ok() && out.stderr.contains("not supported"), "{out}");
    assert!(!Path::new("/var/tmp/never.hdd").exists());
}

/// A process holding OpenVZ 9's locks (python's fcntl, as its lib/lock.c
/// takes them) until its standard input closes.
fn hold_fcntl_lock(file: &Path, start: u64) -> Child {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import fcntl,struct,sys\n\
             f=open(sys.argv[1],'rb')\n\
             fcntl.fcntl(f.fileno(),fcntl.F_SETLK,struct.pack('hhqqi4x',fcntl.F_RDLCK,0,int(sys.argv[2]),5,0))\n\
             print('held',flush=True)\n\
             sys.stdin.read()",
            file.to_str().unwrap(),
            &start.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "held");
    child
}

/// The process an F_GETLK write probe of bytes 200..205 finds, as OpenVZ
/// 9's tools probe ("Already locked by pid N"); 0 when free.
fn openvz_probe(file: &Path) -> i64 {
    let out = ok(
        run(
            "python3",
            &[
                "-c",
                "import fcntl,struct,sys\n\
                 f=open(sys.argv[1],'rb')\n\
                 r=struct.unpack('hhqqi4x',fcntl.fcntl(f.fileno(),fcntl.F_GETLK,struct.pack('hhqqi4x',fcntl.F_WRLCK,0,200,5,0)))\n\
                 print(0 if r[0]==fcntl.F_UNLCK else r[4])",
                file.to_str().unwrap(),
            ],
        ),
        "probe",
    );
    out.parse().unwrap()
}

/// Locks both ways: a disk we serve shows OpenVZ 9's probe our daemon's
/// pid; a disk OpenVZ's tools hold (fcntl on the base delta as OpenVZ 9,
/// flock on DiskDescriptor.xml.lck as OpenVZ 7) is refused by ours,
/// naming the holder; a second ploop mount is refused too.
#[test]
fn openvz_locks_exclude_both_ways() {
    let _s = serial();
    let dir = tempdir();
    let img = dir.path().join("root.hdd");
    ok(
        ploop(&["init", "-s", "128M", "-t", "ext4", img.to_str().unwrap()]),
        "init",
    );
    let dd = dir.path().join("DiskDescriptor.xml");
    let dd_s = dd.to_str().unwrap().to_string();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    assert_eq!(openvz_probe(&img), 0, "free while not mounted");
    ok(
        ploop(&["mount", "-m", mnt.to_str().unwrap(), &dd_s]),
        "mount",
    );
    let m = Mounted(dd_s.clone());
    let list: serde_json::Value =
        serde_json::from_str(&ok(ploop(&["list", "--json"]), "list")).unwrap();
    let pid = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["descriptor"] == dd_s.as_str())
        .unwrap()["pid"]
        .as_i64()
        .unwrap();
    // OpenVZ 9 sees the disk locked (by an open file description lock:
    // pid -1 in its message).
    assert_eq!(openvz_probe(&img), -1, "OpenVZ 9 sees the disk in use");
    let again = ploop(&["mount", &dd_s]);
    assert!(
        !again.ok() && again.stderr.contains(&format!("daemon pid {pid}")),
        "{again}"
    );
    // Still held after an online snapshot and merge (which reopen files).
    ok(ploop(&["snapshot", &dd_s]), "online snapshot");
    ok(ploop(&["snapshot-merge", &dd_s]), "online merge");
    assert_eq!(openvz_probe(&img), -1, "held after a merge");
    drop(m);
    assert_eq!(openvz_probe(&img), 0, "let go at umount");

    for start in [200, 300] {
        let mut holder = hold_fcntl_lock(&img, start);
        let hp = holder.id();
        for args in [
            vec!["mount", "-m", mnt.to_str().unwrap(), dd_s.as_str()],
            vec!["snapshot", dd_s.as_str()],
        ] {
            let out = ploop(&args);
            let _m = Mounted(dd_s.clone());
            assert!(
                !out.ok(),
                "{args:?} refused while {hp} holds {start}: {out}"
            );
            assert!(
                out.stderr.contains(&format!("process {hp}"))
                    && out.stderr.contains("OpenVZ's lock"),
                "{out}"
            );
        }
        drop(holder.stdin.take());
        holder.wait().unwrap();
    }
    // OpenVZ 7: flock on DiskDescriptor.xml.lck for the operation.
    let lck = dir.path().join("DiskDescriptor.xml.lck");
    let mut flock = Command::new("flock")
        .args([lck.to_str().unwrap(), "-c", "echo held; read x"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(flock.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let out = ploop(&["snapshot", &dd_s]);
    assert!(!out.ok(), "{out}");
    assert!(
        out.stderr.contains("is locked by process"),
        "names the holder: {out}"
    );
    writeln!(flock.stdin.take().unwrap()).unwrap();
    flock.wait().unwrap();
    // Free again: everything works.
    ok(
        ploop(&["mount", "-m", mnt.to_str().unwrap(), &dd_s]),
        "mount",
    );
    let _m = Mounted(dd_s.clone());
    ok(ploop(&["umount", &dd_s]), "umount");
}

fn snap(dd: &str) -> String {
    let out = ok(ploop(&["snapshot", dd]), "snapshot");
    out.split_whitespace().nth(2).unwrap().to_string()
}

fn shots(dd: &str) -> Vec<serde_json::Value> {
    serde_json::from_str(&ok(ploop(&["snapshot-list", "--json", dd]), "list")).unwrap()
}

/// OpenVZ's commands and options: snapshot-delete of a snapshot with two
/// children marks it temporary, and it is merged away once one child is
/// left; tsnapshot mounts a temporary snapshot that goes after its
/// umount; snapshot-merge -A and -n; mount -u base and -F; umount IMAGE;
/// info on an image file, -s, -d and OpenVZ's figures; fsck.
#[test]
fn openvz_commands_and_options() {
    let _s = serial();
    let dir = tempdir();
    let img = dir.path().join("root.hdd");
    ok(
        ploop(&["init", "-s", "256M", img.to_str().unwrap()]),
        "init",
    );
    let dd = dir.path().join("DiskDescriptor.xml");
    let dd_s = dd.to_str().unwrap().to_string();
    let dd = dd_s.as_str();
    let mnt = dir.path().join("mnt");
    let bak = dir.path().join("bak");
    fs::create_dir(&mnt).unwrap();
    fs::create_dir(&bak).unwrap();

    // Two children of S1: S2 over it, and the top after a switch to S1.
    let s1 = snap(dd);
    let s2 = snap(dd);
    ok(ploop(&["snapshot-switch", "-u", &s1, dd]), "switch");
    let out = ok(ploop(&["snapshot-delete", "-u", &s1, dd]), "delete");
    assert!(out.contains("marking it as temporary"), "{out}");
    assert!(fs::read_to_string(dd).unwrap().contains("<Temporary/>"));
    assert_eq!(shots(dd).len(), 3, "kept");
    // Its data is whole: it can still be read on its own.
    ok(ploop(&["read", "--length", "1M", "-u", &s1, dd]), "read S1");
    // One child left: the next snapshot-delete merges it away.
    let out = ok(ploop(&["snapshot-delete", "-u", &s2, dd]), "delete S2");
    assert!(
        out.contains(&format!("temporary snapshot {s1} has been merged away")),
        "{out}"
    );
    assert_eq!(shots(dd).len(), 1, "{:?}", shots(dd));
    assert!(!fs::read_to_string(dd).unwrap().contains("Temporary"));

    // tsnapshot of a mounted disk, for a backup.
    ok(ploop(&["mount", "-m", mnt.to_str().unwrap(), dd]), "mount");
    let m = Mounted(dd_s.clone());
    fs::write(mnt.join("at-backup"), b"before").unwrap();
    let t = "{11111111-2222-3333-4444-555555555555}";
    let out = ok(
        ploop(&[
            "tsnapshot",
            "-u",
            t,
            "-c",
            "backup",
            "-m",
            bak.to_str().unwrap(),
            dd,
        ]),
        "tsnapshot",
    );
    assert!(out.contains("temporary snapshot"), "{out}");
    fs::write(mnt.join("at-backup"), b"after").unwrap();
    assert_eq!(fs::read(bak.join("at-backup")).unwrap(), b"before");
    assert!(fs::read_to_string(dd).unwrap().contains("<Temporary/>"));
    // In use by its mount: a snapshot now keeps it.
    let out = ok(ploop(&["snapshot", dd]), "snapshot");
    assert!(!out.contains("merged away"), "{out}");
    ok(
        ploop(&["umount", "-m", bak.to_str().unwrap()]),
        "umount tsnapshot",
    );
    let out = ok(ploop(&["snapshot", dd]), "snapshot");
    assert!(
        out.contains(&format!("temporary snapshot {t} has been merged away")),
        "{out}"
    );
    // snapshot-merge -A: everything, online, down to one image.
    ok(ploop(&["snapshot-merge", "-A", dd]), "merge -A");
    assert_eq!(shots(dd).len(), 1);
    assert_eq!(fs::read(mnt.join("at-backup")).unwrap(), b"after");

    // info: ours, OpenVZ's figures beside them (as df sees them), -d, -s.
    let info = ok(ploop(&["info", dd]), "info");
    let df = ok(
        run("df", &["-k", "--output=size,used", mnt.to_str().unwrap()]),
        "df",
    );
    let df: Vec<&str> = df.lines().nth(1).unwrap().split_whitespace().collect();
    let row = info
        .lines()
        .find(|l| l.trim_start().starts_with("1k-blocks"))
        .unwrap_or_else(|| panic!("{info}"));
    let row: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&row[1..], &df[..], "{info}");
    assert!(info.contains("inodes"), "{info}");
    let spec = ok(ploop(&["info", "-s", dd]), "info -s");
    assert!(
        spec.contains("blocksize:\t2048") && !spec.contains("1k-blocks"),
        "{spec}"
    );
    let devs = ok(ploop(&["info", "-d", dd]), "info -d");
    assert!(
        devs.starts_with("device:\t\t/dev/loop") && devs.contains("partition:\t/dev/loop"),
        "{devs}"
    );
    // umount by the base image file.
    ok(ploop(&["umount", img.to_str().unwrap()]), "umount IMAGE");
    drop(m);
    assert!(!ok(ploop(&["list"]), "list").contains(dd));
    let out = ploop(&["umount", img.to_str().unwrap()]);
    assert!(!out.ok() && out.stderr.contains("is not mounted"), "{out}");

    // info on the image file itself.
    let out = ok(ploop(&["info", img.to_str().unwrap()]), "info IMAGE");
    assert!(
        out.contains("size:\t\t524288") && out.contains("in_use:\t\tno"),
        "{out}"
    );

    // snapshot-merge -n: the merged image under a new name.
    snap(dd);
    ok(
        ploop(&["snapshot-merge", "-n", "merged.hdd", dd]),
        "merge -n",
    );
    let list = shots(dd);
    assert_eq!(list.len(), 1);
    assert!(
        list[0]["fname"].as_str().unwrap().ends_with("/merged.hdd"),
        "{list:?}"
    );
    assert!(!img.exists(), "the old name is gone");
    let out = ploop(&["snapshot-merge", "-n", "merged.hdd", dd]);
    assert!(!out.ok(), "{out}");
    // A crash between -n's link and its removal of the old name leaves the
    // delta with two names, which no read-write open takes: check drops
    // the name the descriptor does not use.
    let merged = dir.path().join("merged.hdd");
    let stray = dir.path().join("root.hdd");
    fs::hard_link(&merged, &stray).unwrap();
    let out = ploop(&["snapshot", dd]);
    assert!(!out.ok(), "two names refused: {out}");
    let out = ploop(&["check", dd]);
    assert!(
        out.ok() && out.stdout_str().contains("second name"),
        "{out}"
    );
    assert!(!stray.exists() && merged.exists());

    // mount -u base (read-only, as the base has a child) and -F.
    snap(dd);
    ok(
        ploop(&["mount", "-r", "-u", "base", "-m", mnt.to_str().unwrap(), dd]),
        "mount base",
    );
    let m = Mounted(dd_s.clone());
    assert_eq!(fs::read(mnt.join("at-backup")).unwrap(), b"after");
    ok(ploop(&["umount", dd]), "umount");
    drop(m);
    ok(
        ploop(&["mount", "-F", "-m", mnt.to_str().unwrap(), dd]),
        "mount -F",
    );
    let m = Mounted(dd_s.clone());
    ok(ploop(&["umount", dd]), "umount");
    drop(m);
    // replace, online: an identical copy of the base takes its place (and
    // OpenVZ's lock moves to it); a copy that differs, and the top, are
    // refused.
    ok(ploop(&["mount", "-m", mnt.to_str().unwrap(), dd]), "mount");
    let m = Mounted(dd_s.clone());
    let base = dir.path().join("merged.hdd");
    let copy = dir.path().join("copy.hdd");
    let bad = dir.path().join("bad.hdd");
    ok(
        run(
            "cp",
            &[
                "--sparse=always",
                base.to_str().unwrap(),
                copy.to_str().unwrap(),
            ],
        ),
        "cp",
    );
    fs::copy(&base, &bad).unwrap();
    // A byte of data changed (the filesystem's clusters start at 1 MiB).
    let mut f = fs::OpenOptions::new().write(true).open(&bad).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start((2 << 20) + 4096 + 7)).unwrap();
    f.write_all(b"X").unwrap();
    drop(f);
    let out = ploop(&["replace", "-l", "0", "-i", bad.to_str().unwrap(), dd]);
    assert!(
        !out.ok() && out.stderr.contains("not an identical copy"),
        "{out}"
    );
    let top_file = shots(dd).iter().find(|x| x["current"] == true).unwrap()["fname"]
        .as_str()
        .unwrap()
        .to_string();
    let out = ploop(&["replace", "-l", "0", "-i", &top_file, dd]);
    assert!(!out.ok() && out.stderr.contains("already a delta"), "{out}");
    let out = ploop(&[
        "replace",
        "-u",
        common::TOP_GUID,
        "-i",
        copy.to_str().unwrap(),
        dd,
    ]);
    assert!(!out.ok() && out.stderr.contains("not the top"), "{out}");
    assert_eq!(openvz_probe(&base), -1);
    let out = ok(
        ploop(&[
            "replace",
            "-o",
            base.to_str().unwrap(),
            "-i",
            copy.to_str().unwrap(),
            dd,
        ]),
        "replace",
    );
    assert!(out.contains("online"), "{out}");
    assert!(shots(dd)[0]["fname"]
        .as_str()
        .unwrap()
        .ends_with("/copy.hdd"));
    assert_eq!(openvz_probe(&copy), -1, "the lock moved to the new base");
    assert_eq!(fs::read(mnt.join("at-backup")).unwrap(), b"after");
    ok(ploop(&["umount", dd]), "umount");
    drop(m);
    ok(
        ploop(&["mount", "-r", "-m", mnt.to_str().unwrap(), dd]),
        "mount again",
    );
    let m = Mounted(dd_s.clone());
    assert_eq!(fs::read(mnt.join("at-backup")).unwrap(), b"after");
    ok(ploop(&["umount", dd]), "umount");
    drop(m);
    // fsck: OpenVZ's old name of check, with its warning.
    let out = ploop(&["fsck", dd]).success();
    assert!(out.stderr.contains("obsoleted"), "{out}");
}
