//! Helpers shared by the end-to-end tests: run the real binary and the
//! independent tools, build deterministic data, keep an in-memory model of
//! what the virtual disk should contain.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// OpenVZ's own `ploop` (only its `check` works on these machines).
pub const OPENVZ_PLOOP: &str = "/usr/sbin/ploop";

/// The GUID the top delta always has.
pub const TOP_GUID: &str = "{5fbaabe3-6958-40ff-92a7-860e329aab41}";

pub const MIB: usize = 1 << 20;

/// Our binary, as cargo built it for this test run.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ploop")
}

/// A finished command, with what is needed to explain a failure.
pub struct Out {
    pub what: String,
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Out {
    pub fn from_output(what: String, o: Output) -> Self {
        Self {
            what,
            code: o.status.code(),
            signal: std::os::unix::process::ExitStatusExt::signal(&o.status),
            stdout: o.stdout,
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Panic unless the command exited 0.
    #[track_caller]
    pub fn success(self) -> Self {
        assert!(self.ok(), "command failed:\n{self}");
        self
    }

    /// Panic unless the command failed with exit code `code`.
    #[track_caller]
    pub fn failure(self, code: i32) -> Self {
        assert_eq!(self.code, Some(code), "expected exit code {code}:\n{self}");
        self
    }
}

impl fmt::Display for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Binary output (`ploop read`) is summarised, not dumped.
        let stdout = if self.stdout.len() > 4000 {
            format!(
                "{}... ({} bytes)",
                String::from_utf8_lossy(&self.stdout[..4000]),
                self.stdout.len()
            )
        } else {
            String::from_utf8_lossy(&self.stdout).into_owned()
        };
        write!(
            f,
            "  $ {}\n  exit: {:?}{}\n  stdout: {}\n  stderr: {}",
            self.what,
            self.code,
            self.signal
                .map(|s| format!(" (killed by signal {s})"))
                .unwrap_or_default(),
            stdout,
            self.stderr
        )
    }
}

fn describe(prog: &str, args: &[&OsStr]) -> String {
    let mut s = prog.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run `prog args...` in `dir` (if given) and collect its output.
pub fn run_in<S: AsRef<OsStr>>(dir: Option<&Path>, prog: &str, args: &[S]) -> Out {
    let args: Vec<&OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let mut cmd = Command::new(prog);
    cmd.args(&args).stdin(Stdio::null());
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    Out::from_output(describe(prog, &args), o)
}

/// Run a prepared command and collect its output.
pub fn output(cmd: &mut Command) -> Out {
    let what = format!("{cmd:?}");
    Out::from_output(what, cmd.output().expect("spawn"))
}

/// The trimmed standard output of a command that must succeed.
#[track_caller]
pub fn ok(out: Out, what: &str) -> String {
    assert!(out.ok(), "{what} failed:\n{out}");
    out.stdout_str().trim().to_string()
}

pub fn run<S: AsRef<OsStr>>(prog: &str, args: &[S]) -> Out {
    run_in(None, prog, args)
}

/// Our `ploop` with these arguments.
pub fn ploop<S: AsRef<OsStr>>(args: &[S]) -> Out {
    run(bin(), args)
}

/// Our `ploop`, which must succeed.
#[track_caller]
pub fn ploop_ok<S: AsRef<OsStr>>(args: &[S]) -> Out {
    ploop(args).success()
}

/// `qemu-img check -f parallels FILE` must pass.
#[track_caller]
pub fn qemu_check(file: &Path) {
    run(
        "qemu-img",
        &[
            OsStr::new("check"),
            "-f".as_ref(),
            "parallels".as_ref(),
            file.as_os_str(),
        ],
    )
    .success();
}

/// OpenVZ's `ploop check -f -c -r FILE` (read-only, forced, detailed).
pub fn openvz_check_result(file: &Path) -> Out {
    run(
        OPENVZ_PLOOP,
        &[
            OsStr::new("check"),
            "-f".as_ref(),
            "-c".as_ref(),
            "-r".as_ref(),
            file.as_os_str(),
        ],
    )
}

/// OpenVZ's `ploop check -f -c -r FILE` must pass (exit 0).
#[track_caller]
pub fn openvz_check(file: &Path) {
    openvz_check_result(file).success();
}

/// Both independent checkers must accept this delta file.
#[track_caller]
pub fn peers_check(file: &Path) {
    qemu_check(file);
    openvz_check(file);
}

/// A scratch folder on /var/tmp (ext4: OpenVZ's check inspects sparse
/// files only there).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ploop-e2e-")
        .tempdir_in("/var/tmp")
        .expect("creating a temp dir under /var/tmp")
}

pub use ploop_test_support::data;

/// First differing byte of two buffers, for assertion messages.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// [`assert_same`] for two files' contents.
#[track_caller]
pub fn assert_same_files(got: &Path, want: &Path, what: &str) {
    let read =
        |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    assert_same(&read(got), &read(want), what);
}

#[track_caller]
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(at) = first_diff(got, want) {
        let show = |v: &[u8]| {
            v.get(at..(at + 16).min(v.len()))
                .map(|s| format!("{s:02x?}"))
                .unwrap_or_else(|| "<past end>".into())
        };
        panic!(
            "{what}: contents differ at byte {at} (got {} bytes, want {} bytes)\n  got : {}\n  want: {}",
            got.len(),
            want.len(),
            show(got),
            show(want)
        );
    }
}

/// A disk made with our `init`, plus a model of what it should hold.
pub struct TestDisk {
    pub dir: PathBuf,
    pub dd: PathBuf,
    pub image: PathBuf,
    pub expected: Vec<u8>,
    seq: u32,
}

impl TestDisk {
    /// `ploop init -s SIZE -t none EXTRA... DIR/root.hdd`.
    #[track_caller]
    pub fn init(dir: &Path, size: usize, extra: &[&str]) -> Self {
        let image = dir.join("root.hdd");
        let size_arg = format!("{}K", size / 1024);
        let mut args: Vec<&OsStr> = vec!["init".as_ref(), "-s".as_ref(), size_arg.as_ref()];
        // No filesystem (the default is ext4, made through a mount): these
        // tests look at the raw bytes of the virtual disk.
        if !extra.contains(&"-t") {
            args.extend([OsStr::new("-t"), OsStr::new("none")]);
        }
        args.extend(extra.iter().map(OsStr::new));
        args.push(image.as_os_str());
        ploop_ok(&args);
        let dd = dir.join("DiskDescriptor.xml");
        assert!(dd.exists(), "init did not create {}", dd.display());
        Self {
            dir: dir.to_path_buf(),
            dd,
            image,
            expected: vec![0; size],
            seq: 0,
        }
    }

    /// Adopt an existing descriptor whose content is `expected`.
    pub fn adopt(dir: &Path, image: &Path, expected: Vec<u8>) -> Self {
        Self {
            dir: dir.to_path_buf(),
            dd: dir.join("DiskDescriptor.xml"),
            image: image.to_path_buf(),
            expected,
            seq: 0,
        }
    }

    /// Write `bytes` at `offset` through `ploop write`, and into the model.
    #[track_caller]
    pub fn write(&mut self, offset: usize, bytes: &[u8]) {
        self.seq += 1;
        let src = self.dir.join(format!("input-{}.bin", self.seq));
        std::fs::write(&src, bytes).expect("writing input file");
        let off = offset.to_string();
        ploop_ok(&[
            OsStr::new("write"),
            "--offset".as_ref(),
            off.as_ref(),
            self.dd.as_os_str(),
            src.as_os_str(),
        ]);
        std::fs::remove_file(&src).ok();
        self.expected[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    /// Write `len` bytes of seeded random data at `offset`.
    #[track_caller]
    pub fn write_random(&mut self, seed: u64, offset: usize, len: usize) {
        self.write(offset, &data(seed, len));
    }

    /// The whole disk through `ploop read` (optionally a snapshot).
    #[track_caller]
    pub fn read(&self, uuid: Option<&str>) -> Vec<u8> {
        let mut args: Vec<&OsStr> = vec!["read".as_ref()];
        if let Some(u) = uuid {
            args.push("-u".as_ref());
            args.push(u.as_ref());
        }
        args.push(self.dd.as_os_str());
        ploop_ok(&args).stdout
    }

    /// `ploop read` must equal the model.
    #[track_caller]
    pub fn assert_content(&self, what: &str) {
        assert_same(&self.read(None), &self.expected, what);
    }

    /// The model as a raw file, for `qemu-img compare`.
    pub fn expected_raw(&self) -> PathBuf {
        let p = self.dir.join("expected.raw");
        std::fs::write(&p, &self.expected).expect("writing expected.raw");
        p
    }

    /// Every delta file of the disk, base first, per `snapshot-list --json`.
    #[track_caller]
    pub fn delta_files(&self) -> Vec<PathBuf> {
        self.snapshots()
            .iter()
            .map(|s| PathBuf::from(s["fname"].as_str().expect("fname")))
            .collect()
    }

    /// `snapshot-list --json`, parsed.
    #[track_caller]
    pub fn snapshots(&self) -> Vec<serde_json::Value> {
        let out = ploop_ok(&[
            OsStr::new("snapshot-list"),
            "--json".as_ref(),
            self.dd.as_os_str(),
        ]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("snapshot-list --json is not JSON ({e}):\n{out}"));
        v.as_array()
            .unwrap_or_else(|| panic!("snapshot-list --json is not an array:\n{out}"))
            .clone()
    }

    /// `ploop snapshot`, returning the new snapshot's GUID.
    #[track_caller]
    pub fn snapshot(&self) -> String {
        let before: Vec<String> = self
            .snapshots()
            .iter()
            .map(|s| s["uuid"].to_string())
            .collect();
        let out = ploop_ok(&[OsStr::new("snapshot"), self.dd.as_os_str()]);
        let after = self.snapshots();
        let new: Vec<String> = after
            .iter()
            .filter(|s| !before.contains(&s["uuid"].to_string()))
            .map(|s| s["uuid"].as_str().expect("uuid").to_string())
            .collect();
        // The old top was renamed to the snapshot's GUID; the new top has
        // the fixed top GUID (already present before), so exactly one
        // GUID is new.
        assert_eq!(
            new.len(),
            1,
            "expected one new GUID after snapshot:\n{out}\n{after:#?}"
        );
        let guid = new[0].clone();
        assert!(
            out.stdout_str().contains(&guid),
            "snapshot's output does not name the new GUID {guid}:\n{out}"
        );
        guid
    }

    /// Both peers accept every delta file of the disk.
    #[track_caller]
    pub fn peers_check_all(&self) {
        for f in self.delta_files() {
            peers_check(&f);
        }
    }
}

/// Read a little-endian u32 at `at` of a file.
pub fn read_u32(path: &Path, at: u64) -> u32 {
    let b = std::fs::read(path).expect("reading image");
    u32::from_le_bytes(b[at as usize..at as usize + 4].try_into().unwrap())
}

/// Overwrite bytes of a file in place.
pub fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("opening image to patch");
    f.write_all_at(bytes, at).expect("patching image");
    f.sync_all().ok();
}

// --- ploop serve and NBD clients ---------------------------------------

/// A running `ploop serve`.
pub struct Server {
    child: Option<Child>,
    pub uri: String,
    log: PathBuf,
}

impl Server {
    /// `ploop serve --socket SOCK TARGET`.
    #[track_caller]
    pub fn on_socket(dir: &Path, sock: &Path, target: &Path) -> Server {
        Server::on_socket_with(dir, sock, &[], target)
    }

    /// `ploop serve --socket SOCK OPTIONS... TARGET`.
    #[track_caller]
    pub fn on_socket_with(dir: &Path, sock: &Path, options: &[&str], target: &Path) -> Server {
        let mut args = vec![OsStr::new("--socket"), sock.as_os_str()];
        args.extend(options.iter().map(OsStr::new));
        args.push(target.as_os_str());
        Server::start(dir, &args)
    }

    #[track_caller]
    pub fn start<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> Server {
        let log = dir.join(format!("serve-{}.log", std::process::id()));
        let mut child = Command::new(bin())
            .arg("serve")
            .args(args)
            .env("PLOOP_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("starting ploop serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let uri = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_default()
            .trim()
            .to_string();
        if uri.is_empty() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "ploop serve did not start:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Server {
            child: Some(child),
            uri,
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The server's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM; the server must stop cleanly (exit 0).
    #[track_caller]
    pub fn stop(mut self) {
        let mut child = self.child.take().expect("running");
        run("kill", &["-TERM".to_string(), child.id().to_string()]);
        let status = wait_timeout(&mut child, Duration::from_secs(30));
        assert!(
            status.is_some_and(|s| s.success()),
            "ploop serve did not stop cleanly ({status:?}):\n{}",
            self.log()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = std::time::Instant::now();
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// nbdsh under Debian's Python, whatever python3 is first on PATH.
pub const NBDSH: [&str; 2] = ["/usr/bin/python3", "-mnbd"];

/// Run a Python script under nbdsh, with `uri` and `errno` defined.
#[track_caller]
pub fn nbdsh(uri: &str, script: &str) -> Out {
    let prelude = format!("import errno\nuri = {uri:?}\n");
    run(NBDSH[0], &[NBDSH[1], "-c", &format!("{prelude}{script}")])
}

/// One of qemu's sample Parallels images (tests/fixtures/qemu-parallels,
/// copied from qemu's test suite), unpacked into `dir`.
#[track_caller]
pub fn sample_image(dir: &Path, name: &str) -> PathBuf {
    let packed = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qemu-parallels")
        .join(format!("{name}.bz2"));
    let out = run("bzcat", &[packed.as_os_str()]).success();
    let path = dir.join(format!("{name}.hds"));
    std::fs::write(&path, &out.stdout).unwrap();
    path
}

/// Unmounts a disk (by its DiskDescriptor.xml) however the test ends.
pub struct Mounted(pub String);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = ploop(&["umount", &self.0]);
    }
}

/// A loop device over `len` bytes of `file` from `offset`, detached on drop.
pub struct Loop(pub String);

impl Loop {
    #[track_caller]
    pub fn attach(file: &Path, offset: u64, len: u64) -> Self {
        Self(ok(
            run(
                "losetup",
                &[
                    "-f",
                    "--show",
                    "-o",
                    &offset.to_string(),
                    "--sizelimit",
                    &len.to_string(),
                    file.to_str().unwrap(),
                ],
            ),
            "losetup",
        ))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = run("losetup", &["-d", &self.0]);
    }
}

/// A file's MD5, as md5sum prints it.
#[track_caller]
pub fn md5(path: &Path) -> String {
    ok(run("md5sum", &[path]), "md5sum")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// `qemu-img convert -f FROM -O TO SRC DST`, which must succeed.
#[track_caller]
pub fn qemu_convert(from: &str, to: &str, src: &Path, dst: &Path) {
    ok(
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                from,
                "-O",
                to,
                src.to_str().unwrap(),
                dst.to_str().unwrap(),
            ],
        ),
        "qemu-img convert",
    );
}

/// The extents of `qemu:dirty-bitmap:NAME` as qemu reads them from a
/// parallels image (qemu-nbd -r -B NAME, nbdinfo --map): (offset, length,
/// dirty).
pub fn qemu_bitmap_map(image: &Path, name: &str) -> Vec<(u64, u64, bool)> {
    let sock = image.with_extension("qnbd.sock");
    let _ = std::fs::remove_file(&sock);
    let mut q = Command::new("qemu-nbd")
        .args(["-r", "-t", "-f", "parallels", "-B", name, "-k"])
        .arg(&sock)
        .arg(image)
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-nbd");
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let map = nbd_bitmap_map(&format!("nbd+unix:///?socket={}", sock.display()), name);
    let _ = q.kill();
    let _ = q.wait();
    let _ = std::fs::remove_file(&sock);
    map
}

/// The extents of `qemu:dirty-bitmap:NAME` an NBD server gives (nbdinfo
/// --map): (offset, length, dirty).
pub fn nbd_bitmap_map(uri: &str, name: &str) -> Vec<(u64, u64, bool)> {
    let out = ok(
        run(
            "nbdinfo",
            &[&format!("--map=qemu:dirty-bitmap:{name}"), uri],
        ),
        "nbdinfo --map",
    );
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2] == "1")
        })
        .collect()
}
