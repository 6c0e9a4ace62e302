//! `ploop serve` against real NBD clients: qemu-img, qemu-io, nbdinfo,
//! nbdcopy and nbdsh (libnbd), with and without TLS; and against hostile
//! clients speaking raw bytes.

mod common;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// A qcow2 file with known patterns, and the same content as raw bytes.
fn qcow2_source(dir: &Path, size: usize) -> (PathBuf, Vec<u8>) {
    let q = dir.join("src.qcow2");
    run(
        "qemu-img",
        &[
            OsStr::new("create"),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            q.as_os_str(),
            size.to_string().as_ref(),
        ],
    )
    .success();
    let mut want = vec![0u8; size];
    let writes: [(usize, usize, u8); 4] = [
        (0, 3 * MIB, 0x5a),
        (10 * MIB + 4096, 100 * 1024, 0x11),
        (size - 8192, 8192, 0xee),
        (20 * MIB - 512, 1024, 0x77),
    ];
    let mut args: Vec<String> = Vec::new();
    for (off, len, pat) in writes {
        args.push("-c".into());
        args.push(format!("write -P {pat:#x} {off} {len}"));
        want[off..off + len].fill(pat);
    }
    args.push(q.display().to_string());
    run("qemu-io", &args).success();
    (q, want)
}

/// `qemu-img compare` of a qcow2 file with an NBD export must pass.
#[track_caller]
fn qemu_compare(qcow2: &Path, uri: &str) {
    run(
        "qemu-img",
        &[
            OsStr::new("compare"),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "raw".as_ref(),
            qcow2.as_os_str(),
            nbd_uri_arg(uri),
        ],
    )
    .success();
}

fn nbd_uri_arg(uri: &str) -> &OsStr {
    OsStr::new(uri)
}

#[test]
fn qemu_img_convert_and_compare_over_unix_and_tcp() {
    let tmp = tempdir();
    let size = 64 * MIB;
    let disk = TestDisk::init(tmp.path(), size, &[]);
    let (src, want) = qcow2_source(tmp.path(), size);
    let sock = tmp.path().join("nbd.sock");
    let server = Server::on_socket(tmp.path(), &sock, &disk.dd);
    assert!(server.uri.starts_with("nbd+unix:///"), "{}", server.uri);
    let info = run("qemu-img", &["info", "--output=json", &server.uri]).success();
    assert!(
        info.stdout_str()
            .contains(&format!("\"virtual-size\": {size}")),
        "{info}"
    );
    run(
        "qemu-img",
        &[
            OsStr::new("convert"),
            "-n".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            src.as_os_str(),
            nbd_uri_arg(&server.uri),
        ],
    )
    .success();
    qemu_compare(&src, &server.uri);
    server.stop();
    // What the clients wrote is in the ploop file itself, which the peers accept.
    peers_check(&disk.image);
    assert_same(&disk.read(None), &want, "disk after qemu-img convert");

    // Read-only over plain TCP on a port the kernel picks (loopback:
    // --insecure, as any local user could connect).
    let server = Server::start(
        tmp.path(),
        &[
            OsStr::new("--tcp"),
            "127.0.0.1:0".as_ref(),
            "--insecure".as_ref(),
            "-r".as_ref(),
            "--name".as_ref(),
            "root".as_ref(),
            disk.dd.as_os_str(),
        ],
    );
    assert!(server.uri.starts_with("nbd://127.0.0.1:"), "{}", server.uri);
    assert!(server.uri.ends_with("/root"), "{}", server.uri);
    qemu_compare(&src, &server.uri);
    let refused = run("qemu-io", &["-f", "raw", "-c", "write 0 4k", &server.uri]);
    assert!(
        !refused.ok()
            || refused.stderr.contains("ermission")
            || refused.stdout_str().contains("ermission"),
        "a write to a read-only export went through:\n{refused}"
    );
    assert!(
        format!("{}{}", refused.stdout_str(), refused.stderr).contains("ermission")
            || format!("{}{}", refused.stdout_str(), refused.stderr).contains("read-only")
            || format!("{}{}", refused.stdout_str(), refused.stderr).contains("read only"),
        "expected a permission error:\n{refused}"
    );
    server.stop();
    assert_same(&disk.read(None), &want, "disk after the read-only export");
}

/// Parse `nbdinfo --map` lines: (start, length, type).
fn nbd_map(uri: &str) -> Vec<(u64, u64, u32)> {
    let out = run("nbdinfo", &["--map", uri]).success();
    out.stdout_str()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().expect("start"),
                f[1].parse().expect("length"),
                f[2].parse().expect("type"),
            )
        })
        .collect()
}

#[test]
fn qemu_io_patterns_zeroes_discard_and_allocation_map() {
    let tmp = tempdir();
    let size = 32 * MIB;
    let disk = TestDisk::init(tmp.path(), size, &["-b", "128"]); // 64 KiB clusters
    let sock = tmp.path().join("nbd.sock");
    let server = Server::on_socket(tmp.path(), &sock, &disk.dd);
    let k64 = 64 * 1024;
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xaa 0 192k",
            "-c",
            "write -f -P 0xbb 1M 64k",
            "-c",
            "write -z -u 64k 64k",
            "-c",
            "write -z 2M 64k",
            "-c",
            "write -P 0xcc 4M 64k",
            "-c",
            "discard 4M 64k",
            "-c",
            "write -P 0xdd 8M 4k",
            "-c",
            "flush",
            "-c",
            "read -P 0xaa 0 64k",
            "-c",
            "read -P 0 64k 64k",
            "-c",
            "read -P 0xaa 128k 64k",
            "-c",
            "read -P 0xbb 1M 64k",
            "-c",
            "read -P 0 2M 64k",
            "-c",
            "read -P 0 4M 64k",
            "-c",
            "read -P 0xdd 8M 4k",
            "-c",
            "read -P 0 8196k 60k",
            &server.uri,
        ],
    )
    .success();
    // Data where written; the clusters zeroed with unmap allowed (-u) and
    // discarded are holes again; `write -z` without -u asks for no hole
    // (NO_HOLE), so its cluster is provisioned, holding zeros.
    let map = nbd_map(&server.uri);
    let data: Vec<(u64, u64)> = map
        .iter()
        .filter(|m| m.2 == 0)
        .map(|m| (m.0, m.1))
        .collect();
    assert_eq!(
        data,
        vec![
            (0, k64),
            (2 * k64, k64),
            (MIB as u64, k64),
            (2 * MIB as u64, k64),
            (8 * MIB as u64, k64)
        ],
        "allocation map: {map:?}"
    );
    assert!(
        map.iter().all(|m| m.2 == 0 || m.2 == 3),
        "holes read as zero: {map:?}"
    );
    let covered: u64 = map.iter().map(|m| m.1).sum();
    assert_eq!(covered, size as u64, "{map:?}");
    // qemu asks over extended headers (64-bit block status): same answer.
    let out = run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", server.uri.as_str()],
    )
    .success();
    let extents: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let qemu_data: Vec<(u64, u64)> = extents
        .as_array()
        .expect("a list")
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(qemu_data, data, "qemu-img map: {out}");
    server.stop();
    // Not OpenVZ's check: the discard punched a hole in the file, which it
    // calls "sparse" (its own discard compacts instead).
    qemu_check(&disk.image);

    // A raw image file served on its own.
    let raw = tmp.path().join("plain.raw");
    std::fs::write(&raw, data_pattern(4 * MIB)).expect("raw image");
    let server = Server::on_socket(tmp.path(), &sock, &raw);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x42 1000 3000",
            "-c",
            "read -P 0x42 1000 3000",
            &server.uri,
        ],
    )
    .success();
    server.stop();
    let mut want = data_pattern(4 * MIB);
    want[1000..4000].fill(0x42);
    assert_same(&std::fs::read(&raw).unwrap(), &want, "raw image file");
}

fn data_pattern(len: usize) -> Vec<u8> {
    data(99, len)
}

#[test]
fn nbdcopy_both_ways_with_several_connections() {
    nbdcopy_both_ways("sync");
}

#[test]
fn nbdcopy_both_ways_through_io_uring() {
    nbdcopy_both_ways("uring");
}

fn nbdcopy_both_ways(io: &str) {
    let tmp = tempdir();
    let size = 48 * MIB;
    let mut disk = TestDisk::init(tmp.path(), size, &[]);
    disk.write_random(1, 0, 2 * MIB);
    disk.write_random(2, 17 * MIB + 12345, 3 * MIB);
    disk.write_random(3, size - MIB, MIB);
    let sock = tmp.path().join("nbd.sock");
    let server = Server::on_socket_with(tmp.path(), &sock, &["--io", io], &disk.dd);
    let out = tmp.path().join("copy.raw");
    run(
        "nbdcopy",
        &[
            OsStr::new("--connections=4"),
            nbd_uri_arg(&server.uri),
            out.as_os_str(),
        ],
    )
    .success();
    assert_same(&std::fs::read(&out).unwrap(), &disk.expected, "nbdcopy out");

    // And back in: new content from a file, over four connections.
    let input = tmp.path().join("in.raw");
    let fresh = data(7, size);
    std::fs::write(&input, &fresh).unwrap();
    run(
        "nbdcopy",
        &[
            OsStr::new("--connections=4"),
            "--flush".as_ref(),
            input.as_os_str(),
            nbd_uri_arg(&server.uri),
        ],
    )
    .success();
    server.stop();
    assert_same(&disk.read(None), &fresh, "disk after nbdcopy in");
    peers_check(&disk.image);
}

#[test]
fn nbdsh_edge_cases() {
    let tmp = tempdir();
    let size = 16 * MIB;
    let mut disk = TestDisk::init(tmp.path(), size, &[]);
    disk.write_random(5, 0, MIB);
    // A snapshot: the old data now lies below the top.
    disk.snapshot();
    let sock = tmp.path().join("nbd.sock");
    let server = Server::on_socket(tmp.path(), &sock, &disk.dd);
    let script = r#"
def conn():
    h = nbd.NBD()
    h.set_strict_mode(0)   # let odd requests reach the server
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h

def fails(f, code):
    try:
        f()
    except nbd.Error as e:
        assert e.errnum == code, (e.errnum, code, e)
        return
    raise AssertionError("no error, expected %d" % code)

h = conn()
size = h.get_size()
assert size == 16 * 1024 * 1024
assert h.can_multi_conn() and h.can_flush() and h.can_fua() and h.can_trim()
assert h.can_zero() and h.can_fast_zero() and h.can_df() and h.can_cache()
assert h.can_meta_context("base:allocation")

# Zero-length requests succeed and change nothing.
assert h.pread(0, 0) == b""
h.pwrite(b"", 4096)
h.trim(0, 0)
h.zero(0, 0)
h.flush()

# The last bytes of the disk, and one past.
h.pwrite(b"\x01" * 512, size - 512, nbd.CMD_FLAG_FUA)
assert h.pread(512, size - 512) == b"\x01" * 512
fails(lambda: h.pread(512, size - 256), errno.EINVAL)
fails(lambda: h.pwrite(b"x" * 512, size), errno.ENOSPC)
fails(lambda: h.trim(4096, size), errno.EINVAL)
fails(lambda: h.zero(1024, size - 512), errno.ENOSPC)
fails(lambda: h.cache(4096, size), errno.EINVAL)

# Unaligned pieces inside one cluster, read back exactly.
h.pwrite(b"abc", 3 * 1024 * 1024 + 7)
assert h.pread(5, 3 * 1024 * 1024 + 5) == b"\0\0abc"

# Fast zero where data lies below the top means copy-up: refused, untouched.
before = h.pread(4096, 8192)
fails(lambda: h.zero(4096, 8192, nbd.CMD_FLAG_FAST_ZERO), errno.ENOTSUP)
assert h.pread(4096, 8192) == before
h.zero(4096, 8192)
assert h.pread(4096, 8192) == b"\0" * 4096
# Fast zero where nothing lies below: a hole.
h.zero(1024 * 1024, 8 * 1024 * 1024, nbd.CMD_FLAG_FAST_ZERO)
# Fast zero of part of a cluster the top holds means writing zeros:
# refused, untouched.
h.pwrite(b"\x07" * 8192, 5 * 1024 * 1024)
fails(lambda: h.zero(4096, 5 * 1024 * 1024 + 4096, nbd.CMD_FLAG_FAST_ZERO), errno.ENOTSUP)
assert h.pread(8192, 5 * 1024 * 1024) == b"\x07" * 8192

# Block status with REQ_ONE gives one extent within the request.
seen = []
def cb(ctx, offset, entries, err):
    seen.append((ctx, list(entries)))
    return 0
h.block_status(4 * 1024 * 1024, 0, cb, nbd.CMD_FLAG_REQ_ONE)
assert len(seen) == 1 and len(seen[0][1]) == 2, seen
assert seen[0][1][0] <= 4 * 1024 * 1024, seen

# Zeroes with NO_HOLE over clusters nobody holds provision them (the
# protocol: the area MUST be fully provisioned), even across clusters.
def status(length, offset):
    runs = []
    def cb(ctx, off, entries, err):
        runs.extend(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(length, offset, cb)
    return runs
M = 1024 * 1024
assert status(2 * M, 13 * M) == [(2 * M, 3)], status(2 * M, 13 * M)
h.zero(M, 13 * M + M // 2, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(M, 13 * M + M // 2) == b"\0" * M
assert status(2 * M, 13 * M) == [(2 * M, 0)], status(2 * M, 13 * M)

# Unfragmented read across data and a hole.
assert h.pread(1024 * 1024 + 4096, 1024 * 1024 - 4096, nbd.CMD_FLAG_DF)[-4096:] == b"\0" * 4096

# A second connection sees the first one's flushed writes (multi-conn).
g = conn()
h.pwrite(b"\x5a" * 65536, 9 * 1024 * 1024)
h.flush()
assert g.pread(65536, 9 * 1024 * 1024) == b"\x5a" * 65536
g.pwrite(b"\x6b" * 4096, 9 * 1024 * 1024, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 9 * 1024 * 1024) == b"\x6b" * 4096

# Many requests in flight on one connection, answered out of order.
bufs = []
for i in range(64):
    b = nbd.Buffer(4096)
    bufs.append((i, b, h.aio_pread(b, 12 * 1024 * 1024 + i * 4096)))
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, b, c in bufs:
    assert h.aio_command_completed(c)
h.shutdown()
g.shutdown()
print("ok")
"#;
    let out = nbdsh(&server.uri, script);
    assert!(
        out.ok() && out.stdout_str().contains("ok"),
        "{out}\nserver log:\n{}",
        server.log()
    );
    server.stop();
    disk.peers_check_all();

    // Read-only: every kind of write is refused with EPERM.
    let server = Server::on_socket_with(tmp.path(), &sock, &["-r"], &disk.dd);
    let script = r#"
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(uri)
assert h.is_read_only()
for f in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.trim(4096, 0), lambda: h.zero(4096, 0)):
    try:
        f()
        raise AssertionError("write allowed")
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, e
print("ok")
"#;
    let out = nbdsh(&server.uri, script);
    assert!(out.ok() && out.stdout_str().contains("ok"), "{out}");
    server.stop();
}

/// A CA and a server certificate for 127.0.0.1, made with openssl, laid
/// out as qemu and libnbd look for them (ca-cert.pem in the folder).
fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    make_certs_with(dir, "rsa:2048")
}

/// As [`make_certs`], the server's key made by `openssl req -newkey KEY`.
fn make_certs_with(dir: &Path, server_key: &str) -> (PathBuf, PathBuf, PathBuf) {
    let d = dir.join("pki");
    std::fs::create_dir_all(&d).unwrap();
    let p = |f: &str| d.join(f).display().to_string();
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=ploop test CA",
            "-keyout",
            &p("ca-key.pem"),
            "-out",
            &p("ca-cert.pem"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    )
    .success();
    run(
        "openssl",
        &[
            "req",
            "-newkey",
            server_key,
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &p("server-key.pem"),
            "-out",
            &p("server.csr"),
        ],
    )
    .success();
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &p("server.csr"),
            "-CA",
            &p("ca-cert.pem"),
            "-CAkey",
            &p("ca-key.pem"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &p("ext.cnf"),
            "-out",
            &p("server-cert.pem"),
        ],
    )
    .success();
    (
        d.clone(),
        d.join("server-cert.pem"),
        d.join("server-key.pem"),
    )
}

#[test]
fn tls_with_qemu_img_and_libnbd() {
    let tmp = tempdir();
    let size = 16 * MIB;
    let mut disk = TestDisk::init(tmp.path(), size, &[]);
    disk.write_random(11, 5 * MIB, MIB + 4096);
    let (pki, cert, key) = make_certs(tmp.path());
    let server = Server::start(
        tmp.path(),
        &[
            OsStr::new("--tcp"),
            "127.0.0.1:0".as_ref(),
            "--tls-any-client".as_ref(),
            "--tls-cert".as_ref(),
            cert.as_os_str(),
            "--tls-key".as_ref(),
            key.as_os_str(),
            disk.dd.as_os_str(),
        ],
    );
    assert!(
        server.uri.starts_with("nbds://"),
        "TLS is in the URI: {}",
        server.uri
    );
    let port = server
        .uri
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok())
        .expect("port in URI");
    // qemu-img with X.509 credentials: read everything back and write.
    let expected = disk.expected_raw();
    let json = format!(
        "json:{{\"driver\":\"raw\",\"file\":{{\"driver\":\"nbd\",\"server\":{{\"type\":\"inet\",\"host\":\"127.0.0.1\",\"port\":\"{port}\"}},\"tls-creds\":\"tls0\"}}}}"
    );
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        pki.display()
    );
    run(
        "qemu-img",
        &[
            OsStr::new("compare"),
            "--object".as_ref(),
            object.as_ref(),
            "-f".as_ref(),
            "raw".as_ref(),
            expected.as_os_str(),
            json.as_ref(),
        ],
    )
    .success();
    run(
        "qemu-io",
        &[
            "--object",
            &object,
            "-c",
            "write -P 0x3c 0 256k",
            "-c",
            "read -P 0x3c 0 256k",
            &json,
        ],
    )
    .success();
    disk.expected[..256 * 1024].fill(0x3c);
    // libnbd (GnuTLS) too; and a plain-text client gets nothing.
    let tls_uri = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        pki.display()
    );
    let info = run("nbdinfo", &[&tls_uri]).success();
    assert!(info.stdout_str().contains("with TLS"), "{info}");
    let copy = tmp.path().join("copy.raw");
    run("nbdcopy", &[tls_uri.as_str(), copy.to_str().unwrap()]).success();
    assert_same(
        &std::fs::read(&copy).unwrap(),
        &disk.expected,
        "copy over TLS",
    );
    let plain = run("nbdinfo", &[format!("nbd://127.0.0.1:{port}/")]);
    assert!(!plain.ok(), "a client without TLS was served:\n{plain}");
    server.stop();
    disk.assert_content("disk after TLS writes");
}

#[test]
fn refuses_plain_text_on_the_network_and_a_second_writer() {
    let tmp = tempdir();
    let disk = TestDisk::init(tmp.path(), 4 * MIB, &[]);
    let out = ploop(&[
        OsStr::new("serve"),
        "--tcp".as_ref(),
        "0.0.0.0:0".as_ref(),
        disk.dd.as_os_str(),
    ]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("without TLS"), "{out}");
    let sock = tmp.path().join("a.sock");
    let server = Server::on_socket(tmp.path(), &sock, &disk.dd);
    let second = ploop(&[
        OsStr::new("serve"),
        "--socket".as_ref(),
        tmp.path().join("b.sock").as_os_str(),
        disk.dd.as_os_str(),
    ]);
    assert_eq!(second.code, Some(1), "{second}");
    assert!(
        second.stderr.contains("in use") || second.stderr.contains("locked"),
        "{second}"
    );
    server.stop();
}

// --- A raw client for hostile tests -------------------------------------

const REQUEST_MAGIC: u32 = 0x2560_9513;

/// Connect and negotiate with EXPORT_NAME (oldest path), no structured replies.
fn raw_client(sock: &Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("greeting");
    assert_eq!(&hello[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&opt).unwrap();
    let mut export = [0u8; 10];
    s.read_exact(&mut export).expect("export size and flags");
    s
}

fn request(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// Read one simple reply: (error, cookie).
fn simple_reply(s: &mut UnixStream) -> (u32, u64) {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).expect("reply");
    assert_eq!(u32::from_be_bytes(r[0..4].try_into().unwrap()), 0x6744_6698);
    (
        u32::from_be_bytes(r[4..8].try_into().unwrap()),
        u64::from_be_bytes(r[8..16].try_into().unwrap()),
    )
}

/// The connection was closed by the server.
fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn hostile_clients_get_errors_and_lose_nothing() {
    let tmp = tempdir();
    let size = 8 * MIB;
    let disk = TestDisk::init(tmp.path(), size, &[]);
    let sock = tmp.path().join("nbd.sock");
    let mut server = Server::on_socket(tmp.path(), &sock, &disk.dd);
    // An acknowledged, flushed write that everything below must not harm.
    let kept = data(21, 64 * 1024);
    let mut c = raw_client(&sock);
    let mut w = request(1, 0, 1, MIB as u64, kept.len() as u32);
    w.extend_from_slice(&kept);
    c.write_all(&w).unwrap();
    assert_eq!(simple_reply(&mut c), (0, 1));
    c.write_all(&request(3, 0, 2, 0, 0)).unwrap();
    assert_eq!(simple_reply(&mut c), (0, 2));

    // Unknown command: EINVAL, and the connection goes on.
    c.write_all(&request(99, 0, 3, 0, 0)).unwrap();
    assert_eq!(simple_reply(&mut c), (22, 3));
    // Unknown flag on a read.
    c.write_all(&request(0, 1 << 9, 4, 0, 512)).unwrap();
    assert_eq!(simple_reply(&mut c), (22, 4));
    // Read longer than the maximum payload.
    c.write_all(&request(0, 0, 5, 0, 64 << 20)).unwrap();
    assert_eq!(simple_reply(&mut c), (22, 5));
    // Offsets past the end, and offset + length overflowing.
    c.write_all(&request(0, 0, 6, size as u64, 512)).unwrap();
    assert_eq!(simple_reply(&mut c), (22, 6));
    c.write_all(&request(0, 0, 7, u64::MAX - 100, 512)).unwrap();
    assert_eq!(simple_reply(&mut c), (22, 7));
    let mut w = request(1, 0, 8, u64::MAX - 10, 4096);
    w.extend_from_slice(&[0xff; 4096]);
    c.write_all(&w).unwrap();
    assert_eq!(simple_reply(&mut c), (28, 8));
    // A write longer than the maximum: its payload is skipped, EINVAL.
    let big = 40 << 20;
    let mut w = request(1, 0, 9, 0, big as u32);
    w.extend(std::iter::repeat_n(0xffu8, big));
    c.write_all(&w).unwrap();
    assert_eq!(simple_reply(&mut c), (22, 9));
    // Block status without a negotiated context.
    c.write_all(&request(7, 0, 10, 0, 4096)).unwrap();
    assert_eq!(simple_reply(&mut c), (22, 10));
    // Still in step: a good read.
    c.write_all(&request(0, 0, 11, MIB as u64, 4096)).unwrap();
    assert_eq!(simple_reply(&mut c), (0, 11));
    let mut got = vec![0u8; 4096];
    c.read_exact(&mut got).unwrap();
    assert_same(&got, &kept[..4096], "read after errors");
    // Bad magic ends the connection.
    let mut bad = request(0, 0, 12, 0, 512);
    bad[0] ^= 0xff;
    c.write_all(&bad).unwrap();
    assert!(closed(&mut c), "bad magic did not end the connection");

    // A write cut off in the middle: nothing of it is acknowledged.
    let mut c = raw_client(&sock);
    let mut w = request(1, 0, 1, MIB as u64, 65536);
    w.extend_from_slice(&[0xee; 30000]);
    c.write_all(&w).unwrap();
    drop(c);

    // Garbage in the handshake: bad client flags, bad option magic, a huge option.
    for junk in [
        vec![0xff, 0xff, 0xff, 0xff],
        [&3u32.to_be_bytes()[..], b"NOTANOPT\0\0\0\x01\0\0\0\0"].concat(),
        [
            &3u32.to_be_bytes()[..],
            b"IHAVEOPT\0\0\0\x07\xff\xff\xff\xff",
        ]
        .concat(),
        [
            &3u32.to_be_bytes()[..],
            b"IHAVEOPT\0\0\0\x07\0\0\0\x02\xff\xff",
        ]
        .concat(),
    ] {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        let _ = s.write_all(&junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest); // the server answers or hangs up, not hangs
    }

    // A client that asks for 64 MiB and reads none of it holds up no one.
    let mut lazy = raw_client(&sock);
    for i in 0..64u64 {
        lazy.write_all(&request(0, 0, i, 0, MIB as u32)).unwrap();
    }
    let start = std::time::Instant::now();
    let script = format!(
        "h = nbd.NBD()\nh.connect_uri({:?})\nh.pwrite(b'q' * 4096, 0)\nh.flush()\nassert h.pread(4096, 0) == b'q' * 4096\n",
        server.uri
    );
    run(NBDSH[0], &[NBDSH[1], "-c", &script]).success();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "a client that does not read held up another for {:?}",
        start.elapsed()
    );
    drop(lazy);

    // (One that asks for many small reads: see
    // `small_reads_nobody_reads_hold_bounded_memory`.)

    // A thousand short-lived connections.
    for i in 0..1000 {
        let mut s = UnixStream::connect(&sock).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        if i % 2 == 0 {
            let mut hello = [0u8; 18];
            s.read_exact(&mut hello).unwrap();
        }
    }
    assert!(server.alive(), "server died:\n{}", server.log());

    // Everything acknowledged is still there, through a real client.
    let script = format!(
        "h = nbd.NBD()\nh.connect_uri({:?})\nimport sys\nsys.stdout.buffer.write(h.pread(65536, {}))\n",
        server.uri, MIB
    );
    let out = run(NBDSH[0], &[NBDSH[1], "-c", &script]).success();
    assert_same(
        &out.stdout,
        &kept,
        "acknowledged write after hostile clients",
    );
    server.stop();
    peers_check(&disk.image);
    let mut want = vec![0u8; size];
    want[..4096].fill(b'q');
    want[MIB..MIB + kept.len()].copy_from_slice(&kept);
    assert_same(&disk.read(None), &want, "disk after hostile clients");
}

#[test]
fn a_sparse_raw_image_reports_its_holes() {
    let tmp = tempdir();
    let raw = tmp.path().join("sparse.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(8 * MIB as u64).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x33; 65536], MIB as u64).unwrap();
    drop(f);
    let sock = tmp.path().join("nbd.sock");
    let server = Server::on_socket(tmp.path(), &sock, &raw);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x44 5M 4k", &server.uri],
    )
    .success();
    let data: Vec<(u64, u64)> = nbd_map(&server.uri)
        .into_iter()
        .filter(|m| m.2 == 0)
        .map(|m| (m.0, m.1))
        .collect();
    assert_eq!(
        data,
        vec![(MIB as u64, 65536), (5 * MIB as u64, 4096)],
        "data extents of the sparse raw image"
    );
    // Reads across holes come back right (hole chunks in structured replies).
    let copy = tmp.path().join("copy.raw");
    run("nbdcopy", &[server.uri.as_str(), copy.to_str().unwrap()]).success();
    server.stop();
    assert_same_files(&copy, &raw, "copy of the sparse image");
}

/// A read over thousands of holes and data runs is one structured reply
/// of more pieces than one system call sends: it must go out whole.
#[test]
fn a_read_of_thousands_of_chunks_arrives_whole() {
    let tmp = tempdir();
    let raw = tmp.path().join("striped.raw");
    let size = 32 * MIB;
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(size as u64).unwrap();
    let stripe = data(3, 4096);
    for at in (0..size).step_by(8192) {
        std::os::unix::fs::FileExt::write_all_at(&f, &stripe, at as u64).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let sock = tmp.path().join("nbd.sock");
    let server = Server::on_socket(tmp.path(), &sock, &raw);
    let back = tmp.path().join("back.raw");
    let script = format!(
        r#"
h = nbd.NBD()
h.connect_uri(uri)
assert h.get_structured_replies_negotiated()
chunks = [0]
def chunk(buf, offset, status, err):
    chunks[0] += 1
    return 0
buf = h.pread_structured({size}, 0, chunk)
assert chunks[0] > 4096, chunks[0]
open({back:?}, "wb").write(buf)
h.shutdown()
"#,
        back = back.to_str().unwrap()
    );
    nbdsh(&server.uri, &script).success();
    server.stop();
    assert_same_files(&back, &raw, "a read of the striped image");
}

/// A client that asks for 20,000 small reads of data on disk and reads
/// none: what waits for it in memory stays bounded, with either engine.
#[test]
fn small_reads_nobody_reads_hold_bounded_memory() {
    for io in ["uring", "sync"] {
        let tmp = tempdir();
        let mut disk = TestDisk::init(tmp.path(), 8 * MIB, &[]);
        disk.write_random(4, 0, 8 * MIB);
        let sock = tmp.path().join("nbd.sock");
        let server = Server::on_socket_with(tmp.path(), &sock, &["--io", io], &disk.dd);
        let mut lazy = raw_client(&sock);
        let burst: Vec<u8> = (0..20_000u64)
            .flat_map(|i| request(0, 0, i, (i % 2000) * 4096, 4096))
            .collect();
        // The server stops taking requests once enough wait: do not wait
        // on it.
        lazy.set_write_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let _ = lazy.write_all(&burst);
        std::thread::sleep(Duration::from_millis(1500));
        let rss = server.rss_kib();
        assert!(
            rss < 300 * 1024,
            "--io {io}: server holds {rss} KiB for a client that does not read"
        );
        drop(lazy);
        server.stop();
    }
}

/// Read one simple reply to a READ of `len` bytes: (error, cookie).
fn read_reply(s: &mut UnixStream, len: usize) -> (u32, u64) {
    let (err, cookie) = simple_reply(s);
    if err == 0 {
        let mut data = vec![0u8; len];
        s.read_exact(&mut data).expect("read data");
    }
    (err, cookie)
}

/// A client that asks for a lot and stops reading holds up only itself:
/// the workers, shared by all clients, never wait for its socket.
#[test]
fn a_client_that_stops_reading_holds_up_only_itself() {
    let tmp = tempdir();
    let disk = TestDisk::init(tmp.path(), 8 * MIB, &[]);
    let sock = tmp.path().join("nbd.sock");
    let server = Server::on_socket_with(tmp.path(), &sock, &["--threads", "2"], &disk.dd);
    // 200 MiB of replies, none read for now.
    let mut slow = raw_client(&sock);
    let asks: Vec<u8> = (0..200u64)
        .flat_map(|i| request(0, 0, i, (i % 8) * MIB as u64, MIB as u32))
        .collect();
    slow.write_all(&asks).unwrap();
    std::thread::sleep(Duration::from_secs(1));

    let mut other = raw_client(&sock);
    other
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = std::time::Instant::now();
    let block = data(5, 4096);
    let mut w = request(1, 0, 7, 4096, 4096);
    w.extend_from_slice(&block);
    other.write_all(&w).unwrap();
    assert_eq!(
        simple_reply(&mut other),
        (0, 7),
        "a write beside the slow client"
    );
    other.write_all(&request(0, 0, 8, 4096, 4096)).unwrap();
    assert_eq!(simple_reply(&mut other), (0, 8));
    let mut back = vec![0u8; 4096];
    other.read_exact(&mut back).unwrap();
    assert_eq!(back, block);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "served in {:?} beside a client that does not read",
        started.elapsed()
    );

    // The slow client gets every reply once it reads.
    let mut cookies: Vec<u64> = (0..200).map(|_| read_reply(&mut slow, MIB).1).collect();
    cookies.sort_unstable();
    assert_eq!(cookies, (0..200).collect::<Vec<_>>());
    server.stop();
}

/// With `--io uring` the reader gathers requests for the ring; asking for
/// more than a connection's budget at once must not stall it.
#[test]
fn requests_past_the_budget_through_io_uring_are_all_answered() {
    let tmp = tempdir();
    let mut disk = TestDisk::init(tmp.path(), 64 * MIB, &[]);
    disk.write_random(9, 0, 32 * MIB);
    let sock = tmp.path().join("nbd.sock");
    let server = Server::on_socket_with(tmp.path(), &sock, &["--io", "uring"], &disk.dd);
    let mut c = raw_client(&sock);
    // Nine 32 MiB reads: 288 MiB, past the 256 MiB a connection holds.
    let asks: Vec<u8> = (0..9u64)
        .flat_map(|i| request(0, 0, i, (i % 2) * 32 * MIB as u64, 32 * MIB as u32))
        .collect();
    c.write_all(&asks).unwrap();
    let mut cookies: Vec<u64> = (0..9).map(|_| read_reply(&mut c, 32 * MIB).1).collect();
    cookies.sort_unstable();
    assert_eq!(cookies, (0..9).collect::<Vec<_>>());
    server.stop();
}

/// `ploop serve IMAGE` of a delta that snapshots build on (the descriptor
/// beside it says so) is refused unless read-only: writing it would change
/// what every snapshot above it shows.
#[test]
fn serving_a_lower_delta_writable_is_refused() {
    let tmp = tempdir();
    let mut disk = TestDisk::init(tmp.path(), 4 * MIB, &[]);
    disk.write_random(1, 0, MIB);
    disk.snapshot();
    let sock = tmp.path().join("nbd.sock");
    // (Under a timeout: a server that starts runs until stopped.)
    let out = run(
        "timeout",
        &[
            OsStr::new("20"),
            OsStr::new(bin()),
            OsStr::new("serve"),
            OsStr::new("--socket"),
            sock.as_os_str(),
            disk.image.as_os_str(),
        ],
    );
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("later deltas build on it"), "{out}");
    assert!(out.stderr.contains("root.hdd"), "{out}");
    // Read-only it is served, and shows what the base holds.
    let server = Server::on_socket_with(tmp.path(), &sock, &["-r"], &disk.image);
    let out = nbdsh(
        &server.uri,
        "h = nbd.NBD()\nh.connect_uri(uri)\nimport sys\nsys.stdout.buffer.write(h.pread(1 << 20, 0))\n",
    );
    server.stop();
    assert_same(
        &out.success().stdout,
        &disk.expected[..MIB],
        "the base over NBD",
    );
    // The top has no snapshot over it: served writable as before.
    let top = disk
        .delta_files()
        .into_iter()
        .find(|f| f != &disk.image)
        .expect("a top delta");
    let server = Server::on_socket(tmp.path(), &sock, &top);
    server.stop();
}

/// Keys of every size and kind the usual tools make serve TLS: RSA keys
/// whose size is not a multiple of 512 bits (the NBD project's own test
/// key has 2432) were refused, with a message naming the certificate
/// instead of the key. A key that cannot be used is named.
#[test]
fn tls_takes_the_keys_the_usual_tools_make() {
    let tmp = tempdir();
    let disk = TestDisk::init(tmp.path(), 4 * MIB, &[]);
    for key in ["rsa:2432", "rsa:3000", "ed25519"] {
        let home = tmp.path().join(key.replace(':', "-"));
        std::fs::create_dir(&home).unwrap();
        let (pki, cert, key_file) = make_certs_with(&home, key);
        let server = Server::start(
            &home,
            &[
                OsStr::new("--tcp"),
                "127.0.0.1:0".as_ref(),
                "--tls-any-client".as_ref(),
                "--tls-cert".as_ref(),
                cert.as_os_str(),
                "--tls-key".as_ref(),
                key_file.as_os_str(),
                disk.dd.as_os_str(),
            ],
        );
        let uri = format!("{}?tls-certificates={}", server.uri, pki.display());
        let out = run("nbdinfo", &["--size", &uri]);
        server.stop();
        assert!(out.ok(), "{key}: {out}");
        assert_eq!(out.stdout_str().trim(), (4 * MIB).to_string(), "{key}");
    }
    let (_, cert, key_file) = make_certs_with(&tmp.path().join("rsa-3000"), "rsa:2048");
    std::fs::write(
        &key_file,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let out = ploop(&[
        OsStr::new("serve"),
        OsStr::new("--tcp"),
        OsStr::new("127.0.0.1:0"),
        OsStr::new("--tls-any-client"),
        OsStr::new("--tls-cert"),
        cert.as_os_str(),
        OsStr::new("--tls-key"),
        key_file.as_os_str(),
        disk.dd.as_os_str(),
    ]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("server-key.pem"),
        "the key is not named:\n{out}"
    );
}
