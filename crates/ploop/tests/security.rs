//! Root must not be turned against the host. Each test hands a disk's
//! folder to an unprivileged user (`nobody`), lets that user prepare an
//! attack in it as a container's owner could, then runs `ploop` as root
//! and checks that the attack is refused and the host's files untouched.

mod common;

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use common::*;

/// A shell command run as `nobody`.
#[track_caller]
fn as_nobody(script: &str) {
    run(
        "setpriv",
        &[
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ],
    )
    .success();
}

/// A scratch area: `host/` holds root's files (0700), `ct/` is a disk's
/// folder that `nobody` owns.
struct Scene {
    _tmp: tempfile::TempDir,
    host: PathBuf,
    ct: PathBuf,
}

impl Scene {
    fn new() -> Scene {
        let tmp = tempdir();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let host = tmp.path().join("host");
        std::fs::create_dir(&host).unwrap();
        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o700)).unwrap();
        let ct = tmp.path().join("ct");
        std::fs::create_dir(&ct).unwrap();
        Scene {
            host,
            ct,
            _tmp: tmp,
        }
    }

    /// A root-only file on the host, with known content.
    fn secret(&self, name: &str) -> (PathBuf, Vec<u8>) {
        let p = self.host.join(name);
        let content = data(7, 4 << 20);
        std::fs::write(&p, &content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        (p, content)
    }

    /// Give the disk's folder (and everything in it) to `nobody`.
    fn hand_over(&self) {
        run(
            "chown",
            &[
                OsStr::new("-R"),
                OsStr::new("nobody:nogroup"),
                self.ct.as_os_str(),
            ],
        )
        .success();
    }
}

/// Exit status 1, and the message says `needle`.
#[track_caller]
fn refused(out: Out, needle: &str) {
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains(needle),
        "the error does not say {needle:?}:\n{out}"
    );
}

/// A delta swapped for a link to a host file: root's write, read and
/// mount used to follow it, and wrote into (or exposed) the host file.
#[test]
fn a_delta_that_is_a_link_to_a_host_file_is_refused() {
    let s = Scene::new();
    let disk = TestDisk::init(&s.ct, 4 * MIB, &["-f", "raw"]);
    let (secret, content) = s.secret("shadow");
    s.hand_over();
    as_nobody(&format!(
        "cd {} && rm root.hdd && ln -s {} root.hdd",
        s.ct.display(),
        secret.display()
    ));
    let input = s.host.join("input");
    std::fs::write(&input, vec![0x41u8; 65536]).unwrap();
    refused(
        ploop(&[OsStr::new("write"), disk.dd.as_os_str(), input.as_os_str()]),
        "symbolic link",
    );
    refused(
        ploop(&[OsStr::new("read"), disk.dd.as_os_str()]),
        "symbolic link",
    );
    refused(
        ploop(&[OsStr::new("mount"), disk.dd.as_os_str()]),
        "symbolic link",
    );
    assert!(
        std::fs::read(&secret).unwrap() == content,
        "the host file changed"
    );
}

/// `<File>d/precious</File>` with `d` a link to a host folder: root's
/// snapshot-delete used to unlink the host's file.
#[test]
fn a_delta_in_a_linked_subfolder_is_refused() {
    let s = Scene::new();
    let mut disk = TestDisk::init(&s.ct, 4 * MIB, &[]);
    disk.write_random(1, 0, MIB);
    let snap = disk.snapshot();
    let (precious, _) = s.secret("precious");
    let top = disk
        .delta_files()
        .into_iter()
        .find(|f| f != &disk.image)
        .expect("a top delta");
    let top_name = top.file_name().unwrap().to_str().unwrap().to_string();
    s.hand_over();
    as_nobody(&format!(
        "cd {} && ln -s {} d && sed -i 's|<File>{top_name}</File>|<File>d/precious</File>|' DiskDescriptor.xml",
        s.ct.display(),
        s.host.display(),
    ));
    refused(
        ploop(&[
            OsStr::new("snapshot-delete"),
            OsStr::new("-u"),
            OsStr::new(&snap),
            disk.dd.as_os_str(),
        ]),
        "subfolder",
    );
    assert!(precious.exists(), "root removed a host file");
}

/// A lower delta swapped for a FIFO: mount used to hang forever on it.
#[test]
fn a_fifo_for_a_delta_is_refused_without_hanging() {
    let s = Scene::new();
    let mut disk = TestDisk::init(&s.ct, 4 * MIB, &[]);
    disk.write_random(1, 0, MIB);
    disk.snapshot();
    s.hand_over();
    as_nobody(&format!(
        "cd {} && rm root.hdd && mkfifo root.hdd",
        s.ct.display()
    ));
    let started = std::time::Instant::now();
    let out = run(
        "timeout",
        &[
            OsStr::new("20"),
            OsStr::new(bin()),
            OsStr::new("mount"),
            disk.dd.as_os_str(),
        ],
    );
    refused(out, "not a regular file");
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
}

/// The daemon's log and the descriptor's lock file named as links to host
/// files, and a `<File>` holding a newline and a passwd line: root's
/// failed mount used to append that line to the host file the log link
/// named, print the host file's last lines, and create a file anywhere
/// through the lock link.
#[test]
fn the_daemon_log_and_the_lock_file_cannot_be_aimed_at_host_files() {
    let s = Scene::new();
    let mut disk = TestDisk::init(&s.ct, 4 * MIB, &[]);
    disk.write_random(1, 0, MIB);
    let (passwd, content) = s.secret("passwd");
    let made = s.host.join("made-by-root");
    s.hand_over();
    as_nobody(&format!(
        "cd {} && ln -s {} ploop-daemon.log && \
         sed -i 's|<File>root.hdd</File>|<File>root.hdd\\&#10;toor::0:0:root:/root:/bin/bash</File>|' DiskDescriptor.xml",
        s.ct.display(),
        passwd.display(),
    ));
    let out = ploop(&[OsStr::new("mount"), disk.dd.as_os_str()]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        !out.stderr.contains("\ntoor"),
        "a name printed a line of its own:\n{out}"
    );
    assert!(
        out.stderr.contains("\\ntoor"),
        "the newline is shown escaped:\n{out}"
    );
    assert!(
        std::fs::read(&passwd).unwrap() == content,
        "the host file changed"
    );
    // Whatever prints the name shows it escaped.
    let listed = ploop(&[OsStr::new("snapshot-list"), disk.dd.as_os_str()]);
    let shown = format!("{}{}", listed.stdout_str(), listed.stderr);
    assert!(
        shown.contains("\\ntoor") && !shown.contains("\ntoor"),
        "snapshot-list printed a name raw:\n{listed}"
    );
    as_nobody(&format!(
        "cd {} && ln -sf {} DiskDescriptor.xml.lck",
        s.ct.display(),
        made.display(),
    ));
    let out = ploop(&[OsStr::new("snapshot"), disk.dd.as_os_str()]);
    refused(out, "symbolic link");
    assert!(!made.exists(), "root created a file through the lock link");
}

/// A DiskDescriptor.xml that is itself a link into another folder: every
/// file name in it would be looked up there.
#[test]
fn a_descriptor_that_is_a_link_is_refused() {
    let s = Scene::new();
    let disk = TestDisk::init(&s.ct, 4 * MIB, &[]);
    s.hand_over();
    as_nobody(&format!(
        "cd {} && mkdir elsewhere && mv DiskDescriptor.xml root.hdd elsewhere/ && \
         ln -s elsewhere/DiskDescriptor.xml DiskDescriptor.xml",
        s.ct.display()
    ));
    refused(
        ploop(&[OsStr::new("read"), disk.dd.as_os_str()]),
        "symbolic link",
    );
    refused(
        ploop(&[OsStr::new("mount"), disk.dd.as_os_str()]),
        "symbolic link",
    );
}

/// Descriptors are read with a cap (1 MiB) and validated in time linear
/// in their images, of which there may be at most 1,024: 160,000 images
/// once took 7.4 s, and a descriptor with no end (a link to /dev/zero, a
/// huge file) ran the process out of memory.
#[test]
fn huge_descriptors_are_refused_at_once() {
    let s = Scene::new();
    let disk = TestDisk::init(&s.ct, 4 * MIB, &[]);
    let original = std::fs::read_to_string(&disk.dd).unwrap();
    // Many images, each with its snapshot, in a chain.
    let n = 3000;
    let mut images = String::new();
    let mut shots = String::new();
    let guid = |i: usize| format!("{{{:08x}-0000-4000-8000-000000000000}}", i + 1);
    for i in 0..n {
        images.push_str(&format!(
            "<Image><GUID>{}</GUID><Type>Compressed</Type><File>d{i}</File></Image>",
            guid(i)
        ));
        let parent = if i == 0 {
            "{00000000-0000-0000-0000-000000000000}".to_string()
        } else {
            guid(i - 1)
        };
        shots.push_str(&format!(
            "<Shot><GUID>{}</GUID><ParentGUID>{parent}</ParentGUID></Shot>",
            guid(i)
        ));
    }
    let many = format!(
        "<Parallels_disk_image><Disk_Parameters><Disk_size>8192</Disk_size></Disk_Parameters>\
         <StorageData><Storage><Start>0</Start><End>8192</End><Blocksize>2048</Blocksize>{images}\
         </Storage></StorageData><Snapshots><TopGUID>{}</TopGUID>{shots}</Snapshots>\
         </Parallels_disk_image>",
        guid(n - 1)
    );
    let big = format!("{original}<!--{}-->", " ".repeat(2 << 20));
    for (what, text, needle) in [
        ("many images", many, "more than 1024"),
        ("2 MiB", big, "larger than"),
    ] {
        let staged = s.host.join("staged.xml");
        std::fs::write(&staged, text).unwrap();
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&s.host, std::fs::Permissions::from_mode(0o755)).unwrap();
        s.hand_over();
        as_nobody(&format!("cat {} > {}", staged.display(), disk.dd.display()));
        let started = std::time::Instant::now();
        refused(ploop(&[OsStr::new("info"), disk.dd.as_os_str()]), needle);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{what}: took {:?}",
            started.elapsed()
        );
    }
}

/// A mount point inside a folder a user owns: that user could swap it for
/// a link between root's check and root's mount and have the container's
/// filesystem mounted anywhere. Refused; a root-owned one is mounted, on
/// the directory opened, with nosuid and nodev for a read-only snapshot.
#[test]
fn a_mount_point_a_user_can_replace_is_refused() {
    let s = Scene::new();
    let disk = TestDisk::init(&s.ct, 64 * MIB, &["-t", "ext4"]);
    let snap = disk.snapshot();
    let users = s.ct.join("users-dir");
    std::fs::create_dir(&users).unwrap();
    std::fs::create_dir(users.join("mnt")).unwrap();
    s.hand_over();
    /// Whatever the test's end, nothing stays mounted.
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = ploop(&[OsStr::new("umount"), self.0.as_os_str()]);
        }
    }
    let _unmount = Unmount(disk.dd.clone());
    let out = ploop(&[
        OsStr::new("mount"),
        OsStr::new("-m"),
        users.join("mnt").as_os_str(),
        disk.dd.as_os_str(),
    ]);
    refused(out, "can be replaced by a user other than root");
    // The same from a root-owned folder works; a snapshot mounted
    // read-only gets nosuid and nodev.
    let mnt = s.host.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    ploop_ok(&[
        OsStr::new("mount"),
        OsStr::new("-r"),
        OsStr::new("-u"),
        OsStr::new(&snap),
        OsStr::new("-m"),
        mnt.as_os_str(),
        disk.dd.as_os_str(),
    ]);
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(mnt.to_str().unwrap()))
        .map(str::to_string);
    ploop_ok(&[OsStr::new("umount"), OsStr::new("-m"), mnt.as_os_str()]);
    let line = line.expect("the snapshot is mounted");
    assert!(line.contains("nosuid") && line.contains("nodev"), "{line}");
}

/// Root's PATH may start with a folder a user writes (sudo keeps it,
/// scripts prepend it): the tools ploop runs as root (mkfs, losetup,
/// mount, blkid) come from the system's folders only, with a clean
/// environment.
#[test]
fn tools_are_not_taken_from_the_callers_path() {
    let s = Scene::new();
    let evil = s.ct.join("bin");
    std::fs::create_dir(&evil).unwrap();
    let marker = s.host.join("ran-as-root");
    for tool in ["mkfs.ext4", "losetup", "mount", "blkid", "umount"] {
        let p = evil.join(tool);
        std::fs::write(
            &p,
            format!("#!/bin/sh\ntouch {}\nexit 1\n", marker.display()),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    s.hand_over();
    let path = format!(
        "{}:{}",
        evil.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let image = s.host.join("root.hdd");
    let out = std::process::Command::new(bin())
        .args([
            OsStr::new("init"),
            OsStr::new("-s"),
            OsStr::new("64M"),
            image.as_os_str(),
        ])
        .env("PATH", &path)
        .output()
        .unwrap();
    let out = Out::from_output("ploop init with a user's PATH first".into(), out);
    assert!(out.ok(), "{out}");
    assert!(
        !marker.exists(),
        "a tool from the caller's PATH ran as root"
    );
}

/// The socket `serve` listens on, and what the first line says of it.
fn socket_of(uri: &str) -> PathBuf {
    PathBuf::from(uri.split("socket=").nth(1).expect("a unix socket URI"))
}

/// `ploop serve ARGS`, stopped after 20 s if it started (a refusal ends
/// it at once).
fn serve_for_a_while(args: &[&OsStr]) -> Out {
    let mut all = vec![OsStr::new("20"), OsStr::new(bin()), OsStr::new("serve")];
    all.extend_from_slice(args);
    run("timeout", &all)
}

/// `ploop serve` once listened on 127.0.0.1:10809 in plain text by
/// default, so any local user read and wrote root's disk. Now it listens
/// on a socket only root may use (whatever the umask), plain TCP needs
/// --insecure even on loopback, and TLS off loopback needs client
/// certificates unless --tls-any-client says otherwise. Clients see the
/// export's name, never the descriptor's path.
#[test]
fn only_root_can_use_a_served_disk_by_default() {
    let s = Scene::new();
    let disk = TestDisk::init(&s.ct, 4 * MIB, &[]);
    let server = Server::start(s.host.as_path(), &[disk.dd.as_os_str()]);
    let sock = socket_of(&server.uri);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    let as_user = run(
        "setpriv",
        &[
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "nbdinfo",
            &server.uri,
        ],
    );
    let listed = run("nbdinfo", &["--list", &server.uri]);
    server.stop();
    assert_eq!(mode, 0o600, "{}", sock.display());
    assert!(!as_user.ok(), "a user read the served disk:\n{as_user}");
    assert!(listed.ok(), "{listed}");
    let shown = format!("{}{}", listed.stdout_str(), listed.stderr);
    assert!(
        !shown.contains(s.ct.to_str().unwrap()),
        "the path leaked:\n{shown}"
    );
    // An explicit socket, under a loose umask, is made 0600 too.
    let explicit = s.host.join("nbd.sock");
    let server = Server::on_socket(s.host.as_path(), &explicit, &disk.dd);
    let mode = std::fs::metadata(&explicit).unwrap().permissions().mode() & 0o777;
    server.stop();
    assert_eq!(mode, 0o600);
    // Plain TCP on loopback: refused without --insecure.
    let out = serve_for_a_while(&[
        OsStr::new("--tcp"),
        OsStr::new("127.0.0.1:0"),
        disk.dd.as_os_str(),
    ]);
    refused(out, "any local user");
    // TLS off loopback without client certificates: refused.
    let cert = s.host.join("cert.pem");
    let key = s.host.join("key.pem");
    run(
        "openssl",
        &[
            OsStr::new("req"),
            OsStr::new("-x509"),
            OsStr::new("-newkey"),
            OsStr::new("rsa:2048"),
            OsStr::new("-nodes"),
            OsStr::new("-days"),
            OsStr::new("2"),
            OsStr::new("-subj"),
            OsStr::new("/CN=ploop test"),
            OsStr::new("-keyout"),
            key.as_os_str(),
            OsStr::new("-out"),
            cert.as_os_str(),
        ],
    )
    .success();
    for addr in ["0.0.0.0:0", "127.0.0.1:0"] {
        let out = serve_for_a_while(&[
            OsStr::new("--tcp"),
            OsStr::new(addr),
            OsStr::new("--tls-cert"),
            cert.as_os_str(),
            OsStr::new("--tls-key"),
            key.as_os_str(),
            disk.dd.as_os_str(),
        ]);
        refused(out, "--tls-ca");
    }
}

/// Silent sockets once held every connection slot for 60 s each (and a
/// negotiated idle client forever): negotiation now has 10 s, one peer
/// gets at most --max-connections-per-peer slots, and --idle-timeout cuts
/// off idle clients.
#[test]
fn silent_and_idle_clients_cannot_hold_every_slot() {
    use std::io::Read;
    let s = Scene::new();
    let disk = TestDisk::init(&s.ct, 4 * MIB, &[]);
    // Over TCP every local user is the same peer, 127.0.0.1 (root's own
    // connections on a unix socket are not limited).
    let server = Server::start(
        s.host.as_path(),
        &[
            OsStr::new("--tcp"),
            OsStr::new("127.0.0.1:0"),
            OsStr::new("--insecure"),
            OsStr::new("--max-connections"),
            OsStr::new("8"),
            OsStr::new("--max-connections-per-peer"),
            OsStr::new("4"),
            disk.dd.as_os_str(),
        ],
    );
    let addr = server
        .uri
        .trim_start_matches("nbd://")
        .trim_end_matches('/')
        .to_string();
    // Four silent connections: a fifth from the same peer is closed at
    // once.
    let silent: Vec<std::net::TcpStream> = (0..4)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut fifth = std::net::TcpStream::connect(&addr).unwrap();
    fifth
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 8];
    assert_eq!(
        fifth.read(&mut b).unwrap_or(0),
        0,
        "a fifth connection from one peer was served"
    );
    // Within about 10 s the silent ones are gone and a client is served.
    let started = std::time::Instant::now();
    let served = loop {
        let out = run("nbdinfo", &["--size", &server.uri]);
        if out.ok() {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "never served: {out}"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    assert!(
        served < std::time::Duration::from_secs(20),
        "served after {served:?}"
    );
    assert!(
        served > std::time::Duration::from_secs(5),
        "the silent connections did not hold their slots at all ({served:?})"
    );
    drop(silent);
    server.stop();
    // An idle negotiated client is cut off after --idle-timeout.
    let sock = s.host.join("nbd.sock");
    let server =
        Server::on_socket_with(s.host.as_path(), &sock, &["--idle-timeout", "2"], &disk.dd);
    let script = "h = nbd.NBD()\nh.connect_uri(uri)\nimport time\ntime.sleep(4)\n\
                  try:\n    h.pread(512, 0)\n    print('served')\nexcept nbd.Error:\n    print('cut off')\n";
    let out = nbdsh(&server.uri, script);
    server.stop();
    assert!(out.stdout_str().contains("cut off"), "{out}");
}

/// A client that floods options and never reads the replies once blocked
/// the server's writes forever, past the 10 s negotiation deadline; one
/// that sends a write's header and then nothing held the write's budget
/// and passed for busy, never idle.
#[test]
fn clients_that_stop_reading_or_sending_are_cut_off() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let s = Scene::new();
    let disk = TestDisk::init(&s.ct, 4 * MIB, &[]);
    let sock = s.host.join("nbd.sock");
    let server =
        Server::on_socket_with(s.host.as_path(), &sock, &["--idle-timeout", "2"], &disk.dd);
    // Options, thousands of them, no reply ever read.
    let mut flood = UnixStream::connect(&sock).unwrap();
    let mut hello = [0u8; 18];
    flood.read_exact(&mut hello).unwrap();
    flood.write_all(&3u32.to_be_bytes()).unwrap();
    let mut list = b"IHAVEOPT".to_vec();
    list.extend_from_slice(&3u32.to_be_bytes()); // NBD_OPT_LIST
    list.extend_from_slice(&0u32.to_be_bytes());
    flood
        .set_write_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut sent = 0;
    while started.elapsed() < std::time::Duration::from_secs(30) {
        match flood.write(&list.repeat(256)) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    let cut = started.elapsed();
    assert!(sent > 0);
    assert!(
        cut < std::time::Duration::from_secs(20),
        "the flood held on for {cut:?}"
    );
    // A negotiated client sends a write's header for 1 MiB, then nothing.
    let mut stall = UnixStream::connect(&sock).unwrap();
    stall.read_exact(&mut hello).unwrap();
    stall.write_all(&3u32.to_be_bytes()).unwrap();
    let mut go = b"IHAVEOPT".to_vec();
    go.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    go.extend_from_slice(&0u32.to_be_bytes());
    stall.write_all(&go).unwrap();
    let mut export = [0u8; 10];
    stall.read_exact(&mut export).unwrap();
    let mut write = 0x2560_9513u32.to_be_bytes().to_vec();
    write.extend_from_slice(&0u16.to_be_bytes());
    write.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
    write.extend_from_slice(&7u64.to_be_bytes());
    write.extend_from_slice(&0u64.to_be_bytes());
    write.extend_from_slice(&(1u32 << 20).to_be_bytes());
    stall.write_all(&write).unwrap();
    stall.write_all(&[0u8; 4096]).unwrap();
    stall
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut b = [0u8; 1];
    let ended = matches!(stall.read(&mut b), Ok(0) | Err(_));
    let waited = started.elapsed();
    server.stop();
    assert!(ended, "the stalled writer still has its connection");
    assert!(
        waited < std::time::Duration::from_secs(15),
        "cut off after {waited:?}"
    );
}

/// A read-write mount where users of the host can reach it gets nosuid
/// and nodev (the filesystem's setuid programs and device nodes are the
/// container owner's); under a folder closed to all but root it keeps
/// OpenVZ's behaviour. A sticky folder that a user owns is no safer than
/// any of theirs: refused.
#[test]
fn where_users_can_reach_a_mount_it_gets_nosuid_and_nodev() {
    let s = Scene::new();
    let disk = TestDisk::init(&s.ct, 64 * MIB, &["-t", "ext4"]);
    let public = s.host.parent().unwrap().join("public");
    std::fs::create_dir(&public).unwrap();
    std::fs::create_dir(public.join("mnt")).unwrap();
    std::fs::create_dir(s.host.join("mnt")).unwrap();
    let options = |mnt: &std::path::Path| {
        ploop_ok(&[
            OsStr::new("mount"),
            OsStr::new("-m"),
            mnt.as_os_str(),
            disk.dd.as_os_str(),
        ]);
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = info
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(mnt.to_str().unwrap()))
            .map(str::to_string);
        ploop_ok(&[OsStr::new("umount"), disk.dd.as_os_str()]);
        line.expect("mounted")
    };
    let open = options(&public.join("mnt"));
    assert!(open.contains("nosuid") && open.contains("nodev"), "{open}");
    let private = options(&s.host.join("mnt"));
    assert!(!private.contains("nosuid"), "{private}");
    // A user's sticky folder with root's entry in it.
    let sticky = s.ct.join("sticky");
    std::fs::create_dir(&sticky).unwrap();
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
    run("chown", &[OsStr::new("nobody"), sticky.as_os_str()]).success();
    std::fs::create_dir(sticky.join("mnt")).unwrap();
    let out = ploop(&[
        OsStr::new("mount"),
        OsStr::new("-m"),
        sticky.join("mnt").as_os_str(),
        disk.dd.as_os_str(),
    ]);
    refused(out, "can be replaced by a user other than root");
}

/// `ploop serve IMAGE` with IMAGE in a user's folder: a link there to a
/// host file (or device), or a FIFO, is refused; and a hard link to a
/// host file (where fs.protected_hardlinks=0 lets a user make one) is not
/// written through a descriptor.
#[test]
fn named_images_and_hard_links_are_checked() {
    let s = Scene::new();
    let disk = TestDisk::init(&s.ct, 4 * MIB, &["-f", "raw"]);
    let (secret, content) = s.secret("disk-of-the-host");
    s.hand_over();
    as_nobody(&format!(
        "cd {} && ln -s {} link.img && mkfifo fifo.img",
        s.ct.display(),
        secret.display()
    ));
    for (name, needle) in [
        ("link.img", "is a link"),
        ("fifo.img", "neither a regular file"),
    ] {
        let sock = s.host.join("nbd.sock");
        let out = run(
            "timeout",
            &[
                OsStr::new("20"),
                OsStr::new(bin()),
                OsStr::new("serve"),
                OsStr::new("--socket"),
                sock.as_os_str(),
                s.ct.join(name).as_os_str(),
            ],
        );
        refused(out, needle);
    }
    // As if a user had hard-linked the host file as the disk's image.
    std::fs::remove_file(&disk.image).unwrap();
    std::fs::hard_link(&secret, &disk.image).unwrap();
    let input = s.host.join("input");
    std::fs::write(&input, vec![0x41u8; 4096]).unwrap();
    refused(
        ploop(&[OsStr::new("write"), disk.dd.as_os_str(), input.as_os_str()]),
        "hard links",
    );
    assert!(
        std::fs::read(&secret).unwrap() == content,
        "the host file changed"
    );
}
