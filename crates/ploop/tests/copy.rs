//! `ploop copy` for real: a running container's disk moved between two
//! hosts made of network namespaces, files and inode numbers kept, beside
//! rsync, which changes them; streams cut, corrupted or refused leave the
//! source running and no image behind. Needs root, loop devices,
//! /dev/fuse and `ip netns`.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{data, ok, peers_check, ploop, run, tempdir, wait_timeout, Mounted};

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every entry under `root`: its path, inode number, kind and size, and a
/// hash of a file's content.
fn tree(root: &Path) -> BTreeMap<PathBuf, (u64, u32, u64, u64)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (u64, u32, u64, u64)>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if rel.starts_with("lost+found") {
                continue;
            }
            let hash = if m.is_file() {
                let mut h: u64 = 0xcbf2_9ce4_8422_2325;
                for b in fs::read(&p).unwrap() {
                    h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
                }
                h
            } else {
                0
            };
            out.insert(rel, (m.ino(), m.mode(), m.len(), hash));
            if m.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Files made, some removed and made again, so that inode numbers do not
/// follow the names' order.
fn populate(m: &Path, files: usize, big_mib: usize) {
    for d in 0..10 {
        fs::create_dir_all(m.join(format!("d{d}"))).unwrap();
    }
    for i in 0..files {
        let p = m.join(format!("d{}/f{i}", i % 10));
        fs::write(&p, data(i as u64, 512 + (i * 997) % 12_000)).unwrap();
        if i % 3 == 0 && i > 0 {
            fs::remove_file(m.join(format!("d{}/f{}", (i - 1) % 10, i - 1))).unwrap();
        }
    }
    fs::write(m.join("big"), data(7, big_mib << 20)).unwrap();
    std::os::unix::fs::symlink("d1/f1", m.join("link")).unwrap();
}

/// A mounted disk of `size` in `dir`/src, populated and synced: its
/// mount point, its descriptor, and what unmounts it.
fn source(dir: &Path, size: &str, files: usize, big_mib: usize) -> (PathBuf, String, Mounted) {
    let src = dir.join("src");
    let m = src.join("m");
    fs::create_dir_all(&m).unwrap();
    ok(
        ploop(&["init", "-s", size, src.join("root.hdd").to_str().unwrap()]),
        "init",
    );
    let dd = src.join("DiskDescriptor.xml").to_str().unwrap().to_string();
    ok(ploop(&["mount", "-m", m.to_str().unwrap(), &dd]), "mount");
    let mounted = Mounted(dd.clone());
    populate(&m, files, big_mib);
    ok(run("sync", &[] as &[&str]), "sync");
    (m, dd, mounted)
}

/// Two network namespaces joined by a veth pair, removed on drop.
struct Hosts {
    a: String,
    b: String,
    addr_b: String,
}

impl Hosts {
    fn new() -> Hosts {
        let id = std::process::id() % 10_000;
        let (a, b) = (format!("plcpa{id}"), format!("plcpb{id}"));
        let (va, vb) = (format!("pca{id}"), format!("pcb{id}"));
        let net = 100 + id % 100;
        let h = Hosts {
            a: a.clone(),
            b: b.clone(),
            addr_b: format!("10.231.{net}.2"),
        };
        for cmd in [
            vec!["netns", "add", &a],
            vec!["netns", "add", &b],
            vec!["link", "add", &va, "type", "veth", "peer", "name", &vb],
            vec!["link", "set", &va, "netns", &a],
            vec!["link", "set", &vb, "netns", &b],
        ] {
            ok(run("ip", &cmd), "ip");
        }
        for (ns, dev, addr) in [
            (&a, &va, format!("10.231.{net}.1/24")),
            (&b, &vb, format!("10.231.{net}.2/24")),
        ] {
            ok(
                run("ip", &["-n", ns, "addr", "add", &addr, "dev", dev]),
                "ip addr",
            );
            ok(
                run("ip", &["-n", ns, "link", "set", dev, "up"]),
                "ip link up",
            );
            ok(
                run("ip", &["-n", ns, "link", "set", "lo", "up"]),
                "ip lo up",
            );
        }
        h
    }

    fn in_ns(&self, ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, common::bin()]).args(args);
        c
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.a]);
        let _ = run("ip", &["netns", "del", &self.b]);
    }
}

/// A receiver on host B: started, and waiting for its connection.
fn receiver(hosts: &Hosts, dest: &Path, port: u16) -> std::process::Child {
    let mut child = hosts
        .in_ns(
            &hosts.b,
            &[
                "copy",
                "-d",
                dest.to_str().unwrap(),
                "--listen",
                &format!("{}:{port}", hosts.addr_b),
            ],
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("waiting on"), "receiver said: {line}");
    // The rest of its messages, for a failure's explanation.
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = err.read_to_string(&mut rest);
        eprint!("receiver: {rest}");
    });
    child
}

#[test]
fn a_running_container_moves_to_another_host_with_its_inode_numbers() {
    let _s = serial();
    let dir = tempdir();
    let (m, dd, _mounted) = source(dir.path(), "1G", 3000, 150);
    let device = ok(ploop(&["info", "-d", &dd]), "info -d")
        .lines()
        .find_map(|l| l.strip_prefix("device:").map(|d| d.trim().to_string()))
        .unwrap();

    // The container keeps writing (synced 64 KiB files) until the stop
    // command tells it to stop, which waits until it has.
    let stop = dir.path().join("stop");
    let stopped = dir.path().join("stopped");
    fs::create_dir_all(m.join("w")).unwrap();
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "i=0; while [ ! -e {stop} ]; do dd if=/dev/urandom of={w}/f$i bs=64k count=1 conv=fsync status=none; \
             echo $i >> {w}/log; i=$((i+1)); done; sync {w}/log; touch {stopped}",
            stop = stop.display(),
            stopped = stopped.display(),
            w = m.join("w").display()
        ))
        .spawn()
        .unwrap();
    let stop_cmd = format!(
        "touch {}; while [ ! -e {} ]; do sleep 0.01; done",
        stop.display(),
        stopped.display()
    );
    std::thread::sleep(Duration::from_millis(300));

    let hosts = Hosts::new();
    let dst = dir.path().join("dst");
    fs::create_dir_all(&dst).unwrap();
    let dst_img = dst.join("root.hdd");
    let port = 7000 + (std::process::id() % 1000) as u16;
    let mut rx = receiver(&hosts, &dst_img, port);
    let sent = hosts
        .in_ns(
            &hosts.a,
            &[
                "copy",
                "-s",
                &device,
                "--to",
                &format!("{}:{port}", hosts.addr_b),
                "-F",
                &stop_cmd,
            ],
        )
        .output()
        .unwrap();
    let sent_err = String::from_utf8_lossy(&sent.stderr).to_string();
    let rx_status = wait_timeout(&mut rx, Duration::from_secs(60)).expect("receiver ended");
    assert!(sent.status.success(), "sender: {sent_err}");
    assert!(rx_status.success(), "receiver failed");
    let _ = writer.wait();
    eprintln!("sender: {sent_err}");
    assert!(sent_err.contains("passes"), "{sent_err}");
    let writes: usize = fs::read_to_string(m.join("w/log")).unwrap().lines().count();
    assert!(
        writes > 3,
        "the writer wrote during the copy: {writes} files"
    );

    // What the source holds now is what it held when it was frozen (the
    // writer stopped before): the receiver's disk holds the same, with the
    // same inode numbers.
    let want = tree(&m);
    let got_m = dst.join("m");
    fs::create_dir_all(&got_m).unwrap();
    let dst_dd = dst.join("DiskDescriptor.xml").to_str().unwrap().to_string();
    ok(
        ploop(&["mount", "-r", "-m", got_m.to_str().unwrap(), &dst_dd]),
        "mount the copy",
    );
    let got = {
        let _m2 = Mounted(dst_dd.clone());
        tree(&got_m)
    };
    assert_eq!(got.len(), want.len(), "entries");
    for (p, w) in &want {
        assert_eq!(
            got.get(p),
            Some(w),
            "{}: (inode, mode, size, hash)",
            p.display()
        );
    }
    ok(ploop(&["check", "-r", &dst_dd]), "check the copy");
    peers_check(&dst_img);

    // rsync of the same files to the other host's filesystem: the content
    // comes, the inode numbers do not.
    let synced = dir.path().join("rsynced");
    ok(
        run(
            "rsync",
            &["-a", &format!("{}/", m.display()), synced.to_str().unwrap()],
        ),
        "rsync",
    );
    let r = tree(&synced);
    let files: Vec<_> = want
        .iter()
        .filter(|(_, w)| w.1 & 0o170000 == 0o100000)
        .collect();
    let same_content = files
        .iter()
        .filter(|(p, w)| r.get(*p).map(|x| x.3) == Some(w.3))
        .count();
    let same_inode = files
        .iter()
        .filter(|(p, w)| r.get(*p).map(|x| x.0) == Some(w.0))
        .count();
    assert_eq!(same_content, files.len(), "rsync copies every file");
    assert!(
        same_inode * 10 < files.len(),
        "rsync kept {same_inode} of {} inode numbers",
        files.len()
    );
    eprintln!(
        "ploop copy kept all {} inode numbers; rsync kept {same_inode} of {}",
        want.len(),
        files.len()
    );
}

#[test]
fn broken_or_refused_streams_leave_the_source_running_and_no_image() {
    let _s = serial();
    let dir = tempdir();
    let (m, dd, _mounted) = source(dir.path(), "512M", 300, 40);

    // A reader that goes away after a MiB: the sender fails, and the
    // source is thawed and its tracking stopped.
    let mut sender = Command::new(common::bin())
        .args(["copy", "-s", &dd])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = sender.stdout.take().unwrap();
    let mut first = vec![0u8; 1 << 20];
    out.read_exact(&mut first).unwrap();
    drop(out);
    let st = wait_timeout(&mut sender, Duration::from_secs(60)).expect("sender ended");
    assert!(!st.success(), "the sender said it succeeded");
    let mut err = String::new();
    sender
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        err.contains("copy stream") || err.contains("Broken pipe"),
        "{err}"
    );
    // Writable (not frozen): a write and a sync finish.
    let mut touch = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo after > {0}/after && sync {0}/after",
            m.display()
        ))
        .spawn()
        .unwrap();
    let st = wait_timeout(&mut touch, Duration::from_secs(20)).expect("the filesystem is frozen");
    assert!(st.success());

    // A whole stream saved to a file (-o FD), then received: identical.
    let stream = dir.path().join("stream");
    ok(
        run(
            "sh",
            &[
                "-c",
                &format!("{} copy -s {dd} -o 3 3>{}", common::bin(), stream.display()),
            ],
        ),
        "copy -o",
    );
    let recv = |from: &Path, to: &Path| {
        Command::new(common::bin())
            .args(["copy", "-d", to.to_str().unwrap()])
            .stdin(fs::File::open(from).unwrap())
            .output()
            .unwrap()
    };
    let good = dir.path().join("good");
    fs::create_dir_all(&good).unwrap();
    let o = recv(&stream, &good.join("root.hdd"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let gm = good.join("m");
    fs::create_dir_all(&gm).unwrap();
    let gdd = good
        .join("DiskDescriptor.xml")
        .to_str()
        .unwrap()
        .to_string();
    ok(
        ploop(&["mount", "-r", "-m", gm.to_str().unwrap(), &gdd]),
        "mount",
    );
    {
        let _g = Mounted(gdd.clone());
        let (a, b) = (tree(&m), tree(&gm));
        assert_eq!(a, b, "the received disk differs");
    }
    // The same target again: refused, the image there untouched.
    let before = fs::metadata(good.join("root.hdd")).unwrap().len();
    let o = recv(&stream, &good.join("root.hdd"));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
    assert_eq!(fs::metadata(good.join("root.hdd")).unwrap().len(), before);

    // A flipped byte in the data, and a stream cut short: refused, and
    // nothing left where the image would have been.
    let bytes = fs::read(&stream).unwrap();
    for (what, bad, says) in [
        (
            "flipped",
            {
                let mut b = bytes.clone();
                let at = b.len() / 2;
                b[at] ^= 1;
                b
            },
            "checksum",
        ),
        ("cut", bytes[..bytes.len() * 2 / 3].to_vec(), "ended before"),
    ] {
        let f = dir.path().join(format!("stream.{what}"));
        fs::write(&f, bad).unwrap();
        let t = dir.path().join(what);
        fs::create_dir_all(&t).unwrap();
        let o = recv(&f, &t.join("root.hdd"));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{what} stream accepted");
        assert!(e.contains(says), "{what}: {e}");
        assert!(
            fs::read_dir(&t).unwrap().next().is_none(),
            "{what}: files left in {}",
            t.display()
        );
    }
    // Nothing else is tracking: a second copy starts.
    let again = dir.path().join("again");
    fs::create_dir_all(&again).unwrap();
    ok(
        ploop(&[
            "copy",
            "-s",
            &dd,
            "-d",
            again.join("root.hdd").to_str().unwrap(),
        ]),
        "copy again",
    );

    // Mounted without a filesystem of ours and no stop command: nothing
    // would stop writes for the last pass, so the copy is refused.
    ok(ploop(&["umount", &dd]), "umount");
    ok(ploop(&["mount", &dd]), "mount, no mount point");
    let never = dir.path().join("never/root.hdd");
    let out = ploop(&["copy", "-s", &dd, "-d", never.to_str().unwrap()]);
    assert!(
        !out.ok() && out.stderr.contains("nothing would stop writes"),
        "{out}"
    );
    assert!(!never.exists());
}
